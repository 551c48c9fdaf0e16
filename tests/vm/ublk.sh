#!/bin/sh
# Runs inside the test VM (tools/vm/run), as root, in a chroot of the host's /, with a real
# kernel that has ublk. ARG: the stasis binary. Scratch space: /dev/shm (tmpfs).
# Checks: ublk device from `stasis serve --ublk`; fio random writes with crc32c verify;
# mkfs.ext4, mount, files, umount, e2fsck -fn clean, remount, checksums match; two forked
# disks served at once stay isolated; SIGTERM deletes the device and closes the disk cleanly;
# the exported disk is a clean filesystem with the files; then tests/vm/ublk-recover.sh.
set -eu
STASIS="$1"
export STASIS_STORE=/dev/shm/store
W=/dev/shm/work
mkdir -p "$W" /dev/shm/mnt
say() { echo "ublk-test: $*"; }
fail() { echo "ublk-test: FAIL: $*"; exit 1; }
[ -e /dev/ublk-control ] || fail "no /dev/ublk-control (ublk_drv not loaded?)"

head -c 32M /dev/urandom > "$W/golden.raw"
"$STASIS" image import g "$W/golden.raw" >/dev/null 2>&1
"$STASIS" disk create a --from g --size 256M >/dev/null

# Starts `stasis serve DISK --ublk` in the background; sets DEV and PID.
serve() {
    "$STASIS" --json serve "$1" --ublk --queues 2 > "$W/$1.serve" 2>"$W/$1.err" &
    PID=$!
    for _ in $(seq 300); do
        DEV=$(sed -n 's/.*"ublk":"\([^"]*\)".*/\1/p' "$W/$1.serve")
        [ -n "$DEV" ] && [ -b "$DEV" ] && return 0
        kill -0 "$PID" 2>/dev/null || fail "serve $1 died: $(cat "$W/$1.err")"
        sleep 0.1
    done
    fail "serve $1: no device after 30 s: $(cat "$W/$1.err")"
}

stop() {
    kill -TERM "$1"
    wait "$1" || fail "serve exited with $?: $(cat "$W"/*.err)"
}

serve a
say "serving disk a as $DEV"

# fio: random 4 KiB writes with checksums, then a verify pass, with O_DIRECT through ublk.
fio --name=verify --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=16 --offset=128M --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --output="$W/fio.txt" >/dev/null 2>&1 || fail "fio verify: $(cat "$W/fio.txt")"
say "fio randwrite + crc32c verify on $DEV: ok"

# Discard and write-zeroes through the block layer: the ranges read back as zeros.
dd if=/dev/urandom of="$DEV" bs=1M seek=224 count=32 oflag=direct 2>/dev/null
blkdiscard -o 224M -l 16M "$DEV" || fail "blkdiscard"
blkdiscard -z -o 240M -l 16M "$DEV" || fail "blkdiscard -z"
nonzero=$(dd if="$DEV" bs=1M skip=224 count=32 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)
[ "$nonzero" = 0 ] || fail "$nonzero non-zero bytes in the discarded/zeroed range"
say "blkdiscard and blkdiscard -z: ranges read back as zeros"

# A filesystem: make, fill, check, remount, compare. (mkfs.ext4 is e2fsprogs' from the host.)
/sbin/mkfs.ext4 -q -F -E nodiscard "$DEV" 120M
mount -t ext4 "$DEV" /dev/shm/mnt
head -c 8M /dev/urandom > /dev/shm/mnt/big.bin
echo "hello from ublk" > /dev/shm/mnt/hello.txt
mkdir /dev/shm/mnt/dir && cp "$W/golden.raw" /dev/shm/mnt/dir/copy.raw
(cd /dev/shm/mnt && sha256sum big.bin hello.txt dir/copy.raw > "$W/sums")
umount /dev/shm/mnt
e2fsck -fn "$DEV" >"$W/fsck.txt" 2>&1 || fail "e2fsck after umount: $(cat "$W/fsck.txt")"
mount -t ext4 "$DEV" /dev/shm/mnt
(cd /dev/shm/mnt && sha256sum -c --quiet "$W/sums") || fail "checksums differ after remount"
umount /dev/shm/mnt
say "mkfs.ext4, mount, write, umount, e2fsck -fn clean, remount, checksums match: ok"
"$STASIS" ctl a stats > "$W/stats.json"
grep -q '"frozen": false' "$W/stats.json" || fail "ctl stats: $(cat "$W/stats.json")"

# Freeze and thaw through the control socket while fio writes: I/O pauses, then resumes,
# and fio's verify pass finds every block it wrote.
writes() { "$STASIS" --json ctl a stats | sed -n 's/.*"write":{"bytes":[0-9]*,"ops":\([0-9]*\)}.*/\1/p'; }
fio --name=frozen --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=8 --offset=192M --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --output="$W/fio2.txt" >/dev/null 2>&1 &
FIO=$!
sleep 1.5
"$STASIS" ctl a freeze >/dev/null || fail "freeze"
W1=$(writes); sleep 1.5; W2=$(writes)
[ -n "$W1" ] && [ "$W1" = "$W2" ] || fail "writes went on while frozen ($W1 -> $W2)"
kill -0 "$FIO" 2>/dev/null || fail "fio finished while the disk was frozen"
"$STASIS" ctl a thaw >/dev/null || fail "thaw"
wait "$FIO" || fail "fio after thaw: $(cat "$W/fio2.txt")"
say "freeze held writes at $W1 while fio ran; thaw resumed them; fio verify: ok"

# SIGTERM: the device goes away and the disk is closed cleanly.
stop "$PID"
[ ! -e "$DEV" ] || fail "$DEV still exists after SIGTERM"
say "SIGTERM: $DEV deleted, server exited 0"

# Two forks of one disk, served at once, stay isolated.
"$STASIS" disk fork b --from a >/dev/null 2>&1
serve a; DEV_A=$DEV; PID_A=$PID
serve b; DEV_B=$DEV; PID_B=$PID
[ "$DEV_A" != "$DEV_B" ] || fail "two disks got one device"
mount -t ext4 "$DEV_A" /dev/shm/mnt && echo "only a" > /dev/shm/mnt/only-a.txt && umount /dev/shm/mnt
mkdir -p /dev/shm/mnt2
mount -t ext4 "$DEV_B" /dev/shm/mnt2
[ ! -e /dev/shm/mnt2/only-a.txt ] || fail "fork b sees a's file"
(cd /dev/shm/mnt2 && sha256sum -c --quiet "$W/sums") || fail "fork b lost the shared files"
umount /dev/shm/mnt2
stop "$PID_A"; stop "$PID_B"
say "two forks served at once: isolated, shared history intact"

"$STASIS" disk export a "$W/a.raw" 2>"$W/export.err" >/dev/null
grep -q "not closed cleanly" "$W/export.err" && fail "disk a was not closed cleanly"
e2fsck -fn "$W/a.raw" >"$W/fsck2.txt" 2>&1 || fail "e2fsck of the export: $(cat "$W/fsck2.txt")"
[ "$(debugfs -R 'cat only-a.txt' "$W/a.raw" 2>/dev/null)" = "only a" ] || fail "export lacks a's file"
say "export after serving: clean filesystem with every file"

# A 4 GiB disk: whole-device discard and write-zeroes (the kernel splits them into 2 GiB
# requests, whose byte count does not fit the i32 result of a ublk command).
"$STASIS" disk create big --from g --size 4G >/dev/null
serve big
blkdiscard "$DEV" || fail "blkdiscard of 4 GiB"
blkdiscard -z "$DEV" || fail "blkdiscard -z of 4 GiB"
stop "$PID"
say "4 GiB discard and write-zeroes: ok"

# User recovery after kill -9: its own script, in the same boot.
exec sh "$(dirname "$0")/ublk-recover.sh" "$STASIS"
