#!/usr/bin/env bash
# Fixture builder: fetches Debian's current amd64 Linux kernel package, takes its bzImage,
# and extracts the uncompressed vmlinux from it (the kernel's own extract-vmlinux method:
# find the compressed payload by its magic and decompress it with the system's tools).
# Prints the path of the vmlinux. Usage: tools/linux-kernel.sh [OUTPUT_DIR]
set -euo pipefail
out="${1:-target/fixtures/linux}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [ -s "$out/vmlinux" ]; then echo "$out/vmlinux"; exit 0; fi

need() { command -v "$1" >/dev/null 2>&1; }
if ! need xz || ! need zstd || ! need gzip; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xz-utils zstd gzip >&2
fi
pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
[ -n "$pkg" ] || { apt-get update -qq >&2; pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "$pkg" >&2)
dpkg-deb --fsys-tarfile "$work"/*.deb | tar -x -C "$work" --wildcards './boot/vmlinuz-*'
bz="$(ls "$work"/boot/vmlinuz-* | head -n1)"
cp "$bz" "$out/bzImage"

try() { # magic (printf escapes), decompressor
    local pos
    for pos in $(LC_ALL=C grep -aboP "$1" "$bz" 2>/dev/null | cut -d: -f1); do
        if tail -c +$((pos + 1)) "$bz" | $2 > "$out/vmlinux" 2>/dev/null || [ -s "$out/vmlinux" ]; then
            if head -c 4 "$out/vmlinux" | grep -q "ELF"; then return 0; fi
        fi
    done
    return 1
}
try '\x28\xb5\x2f\xfd' 'zstd -dc' || try '\xfd\x37\x7a\x58\x5a\x00' 'xz -dc' || try '\x1f\x8b\x08' 'gzip -dc' || {
    echo "linux-kernel: could not extract vmlinux from $bz" >&2; rm -f "$out/vmlinux"; exit 1; }
echo "$out/vmlinux"
