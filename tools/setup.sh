#!/usr/bin/env bash
# Installs what building and testing Popek needs on a fresh Debian machine with rustup:
# the bare-metal Rust target the guest and firmware are built for, and the Debian tools
# the tests call. Idempotent and quiet when everything is already there.
set -euo pipefail

if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none; then
    echo "setup: adding the x86_64-unknown-none Rust target" >&2
    rustup target add x86_64-unknown-none >&2
fi

for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        echo "setup: adding rustup component ${component}" >&2
        rustup component add "${component}" >&2
    fi
done

# setpriv (util-linux) runs the no-permission test without CAP_DAC_OVERRIDE; QEMU boots
# the same guest ELF in the compatibility test and the benchmarks.
missing=()
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
# ip and tc (iproute2) build the two-host network of the cross-namespace migration tests
# and shape its link.
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
# g++ builds libFuzzer for the fuzz targets (tools/fuzz.sh).
command -v g++ >/dev/null 2>&1 || missing+=(g++)
# libclang builds the userfaultfd bindings (post-copy migration).
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
