#!/bin/sh
# Runs inside the test VM, booted by QEMU with a Stasis disk served over NBD as its virtio
# drive (/dev/vda). ARG: the host directory holding golden.raw and pattern.bin (the host
# checks afterwards, from `stasis disk export`, that the pattern landed).
set -eu
D="$1"
fail() { echo "nbd-drive-test: FAIL: $*"; exit 1; }
[ -b /dev/vda ] || fail "no /dev/vda"
[ "$(blockdev --getsize64 /dev/vda)" = $((64 << 20)) ] || fail "size $(blockdev --getsize64 /dev/vda)"
a=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | sha256sum)
b=$(head -c 16M "$D/golden.raw" | sha256sum)
[ "$a" = "$b" ] || fail "the golden part of the disk reads differently in the guest"
dd if="$D/pattern.bin" of=/dev/vda bs=1M seek=32 oflag=direct conv=fsync 2>/dev/null || fail "write"
c=$(dd if=/dev/vda bs=1M skip=32 count=4 iflag=direct 2>/dev/null | sha256sum)
[ "$c" = "$(sha256sum < "$D/pattern.bin")" ] || fail "read-back after write differs"
echo "nbd-drive-test: PASS (/dev/vda over NBD: golden reads back, a 4 MiB write lands)"
