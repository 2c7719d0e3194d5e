#!/usr/bin/env bash
# Runs Popek's whole test suite (set-up included): formatting, lints, unit tests, and the
# integration tests that drive the real `popek` binary on real KVM. Needs /dev/kvm: the
# KVM tests fail without it rather than skip.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh

if [ ! -e /dev/kvm ]; then
    echo "test: /dev/kvm is missing; the integration tests will fail (they need KVM)" >&2
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path tools/fuzz/Cargo.toml -- --check
echo "== cargo clippy (host crates)"
cargo clippy --release --all-targets --quiet -- -D warnings
echo "== cargo clippy (guest and firmware, x86_64-unknown-none)"
cargo clippy --release --quiet --target x86_64-unknown-none -p popek-guest -p popek-firmware \
    --target-dir target/embedded -- -D warnings
echo "== cargo test"
cargo test --release --workspace --quiet 2>&1 | tee target/test-output.txt
# One closing line for CI: the totals over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f; exit (f > 0) }' \
    target/test-output.txt
# A short migration sweep with a generous downtime gate: a regression that makes a
# migration fail or pause the guest for long fails CI (docs/benchmarks.md).
echo "== migration sweep (gate: median downtime <= 100 ms per cell)"
target/release/migration-bench --runs 1 --memory 256M --workloads idle,dirty \
    --modes precopy,postcopy,hybrid --max-downtime-ms 100 --quiet | grep -v '^BENCH_JSON'
# Fuzzing, bounded: each target replays its corpus and regression inputs (with overflow
# checks on), then fuzzes for 10 s. The first build of tools/fuzz/ compiles every
# dependency again, instrumented: about 2.5 minutes on 2 cores (docs/security.md).
echo "== fuzz (10 s per target; tools/fuzz.sh --seconds N for longer runs)"
tools/fuzz.sh --seconds 10
