#!/bin/sh
# Runs inside the test VM (tools/vm/run), as root, in a chroot of the host's /, with a real
# kernel that has ublk. ARG: "STASIS_BIN,CACHE" (the stasis binary, and the directory with
# the counter guest's vmlinuz and counter.cpio.gz, built by tools/vm/build).
# A whole VM whose drive is a ublk device (`vm start --drive ublk`): QEMU (nested, TCG in
# TCG: slow, ~70 s to boot) opens /dev/ublkbN directly. The counter guest writes a record per
# tick through it. Swapout on node A (the ublk device goes with the disk server), swapin on
# node B (a new ublk device): the counter goes on, no reboot; the disk, swapped in a third
# time as a plain disk, holds a record for every tick the guest printed.
set -eu
STASIS="${1%%,*}"
CACHE="${1#*,}"
A=/dev/shm/a B=/dev/shm/b C=/dev/shm/c R=/dev/shm/repo
ERR=/dev/shm/stasis.err
say() { echo "vm-ublk: $*"; }
fail() {
    echo "vm-ublk: FAIL: $*"
    tail -5 "$ERR" 2>/dev/null
    for f in "$A"/vms/*/console.log "$B"/vms/*/console.log "$A"/vms/*/disk-server.log "$B"/vms/*/disk-server.log; do
        [ -f "$f" ] && { echo "--- $f"; tail -5 "$f"; }
    done
    exit 1
}
# stderr (progress bars: the guest's console is a terminal) to a log shown on failure.
on() { node="$1"; shift; STASIS_STORE="$node" "$STASIS" "$@" 2>>"$ERR"; }
ticks() { tr -d '\r' < "$1" 2>/dev/null | grep -a '^T i=.* date=[0-9]*$' || true; }
wait_ticks() { # LOG N
    for _ in $(seq 1500); do [ "$(ticks "$1" | wc -l)" -ge "$2" ] && return 0; sleep 0.2; done
    fail "$1: fewer than $2 ticks after 300 s"
}
field() { echo "$1" | sed -n "s/.* $2=\([0-9.]*\).*/\1/p"; }
[ -e /dev/ublk-control ] || fail "no /dev/ublk-control (ublk_drv not loaded?)"
[ -s "$CACHE/counter.cpio.gz" ] || fail "no counter guest in $CACHE"

head -c 16M /dev/urandom > /dev/shm/g.raw
on "$A" image import g /dev/shm/g.raw >/dev/null
on "$A" disk create d --from g --size 64M >/dev/null
on "$A" --json vm start u --disk d --mem 160M --kernel "$CACHE/vmlinuz" --initrd "$CACHE/counter.cpio.gz" \
    --append "console=ttyS0 quiet panic=-1 nokaslr" --accel tcg --drive ublk > /dev/shm/start.json ||
    fail "vm start --drive ublk: $(cat /dev/shm/start.json)"
dev_a=$(sed -n 's/.*"disk_device": *"\([^"]*\)".*/\1/p' /dev/shm/start.json)
case "$dev_a" in /dev/ublkb*) ;; *) fail "the VM's disk is not a ublk device: $(cat /dev/shm/start.json)" ;; esac
[ -b "$dev_a" ] || fail "$dev_a is not a block device"
grep -q "host_device" /proc/"$(cat "$A/vms/u/qemu.pid")"/cmdline || fail "QEMU does not open the ublk device"
say "VM u started on $dev_a"
wait_ticks "$A/vms/u/console.log" 3
on "$A" vm swapout u --repo "$R" >/dev/null || fail "vm swapout"
t_out=$(date +%s)
[ -e "$dev_a" ] && fail "$dev_a outlived the swapout"
say "swapped out; $dev_a is gone"
on "$B" --json vm swapin u --repo "$R" >/dev/null || fail "vm swapin"
dev_b=$(on "$B" --json vm status u | sed -n 's/.*"disk_device": *"\([^"]*\)".*/\1/p')
case "$dev_b" in /dev/ublkb*) ;; *) fail "the VM swapped in on B is not on a ublk device" ;; esac
last_a=$(ticks "$A/vms/u/console.log" | tail -1)
n_a=$(ticks "$A/vms/u/console.log" | wc -l)
wait_ticks "$B/vms/u/console.log" 2
first_b=$(ticks "$B/vms/u/console.log" | head -1)
grep -aq '^BOOT' "$B/vms/u/console.log" && fail "the guest booted again on B"
ia=$(field "$last_a" i) ib=$(field "$first_b" i)
[ "$ib" -gt "$ia" ] && [ "$ib" -le $((ia + 2)) ] || fail "counter went from $ia to $ib"
say "swapped in on B as $dev_b after $(( $(date +%s) - t_out ))s: counter $ia -> $ib, no reboot"
# The records the guest wrote through both ublk devices: swap out again, then bring the disk
# in on node C as a plain disk and read it.
on "$B" --json vm swapout u > /dev/shm/out2.json || fail "second vm swapout"
last_i=$(field "$(ticks "$B/vms/u/console.log" | tail -1)" i)
disk_m=$(sed -n 's/.*"manifest": *"\([^"]*\.disk\)".*/\1/p' /dev/shm/out2.json | head -1)
[ -n "$disk_m" ] || fail "no disk manifest in the swapout summary"
on "$C" swapin "$disk_m" --as check --repo "$R" >/dev/null
on "$C" disk export check /dev/shm/check.raw >/dev/null
i=1
while [ "$i" -le "$last_i" ]; do
    want=$(printf 'rec %08d' "$i")
    got=$(dd if=/dev/shm/check.raw bs=4096 skip="$i" count=1 2>/dev/null | head -c 12)
    [ "$got" = "$want" ] || fail "disk block $i holds '$got', not '$want'"
    i=$((i + 1))
done
say "the disk holds the records of ticks 1..$last_i ($n_a written on node A, the rest on node B)"
say "PASS"
