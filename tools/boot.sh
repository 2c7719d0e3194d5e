#!/usr/bin/env bash
# Boots Popek's bundled test guest (set-up included). Extra arguments go to `popek run`,
# e.g. `tools/boot.sh --boot firmware` or `tools/boot.sh --vcpus 2 --cmdline test=smp`.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
cargo build --release --quiet -p popek
exec target/release/popek run "$@"
