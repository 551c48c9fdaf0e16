#!/bin/sh
# Runs inside the test VM (tools/vm/run) after tests/vm/ublk.sh, as root. ARG: the stasis binary.
# Checks ublk user recovery (`stasis serve DISK --ublk --recover`): a server killed with -9
# while a filesystem on its device is mounted and a writer runs; the device stays, a plain
# serve (and compact, rm, swapout) and a recover while the old server lives are refused,
# --recover takes the same /dev/ublkbN over, the writer continues, every file whose fsync
# returned is intact, twice in a row; then umount, e2fsck -fn clean, SIGTERM; `stasis ublk delete` of an orphan; then
# swapout of the disk and swapin on another store, served as ublk at once (e2fsck, files).
set -eu
STASIS="$1"
export STASIS_STORE=/dev/shm/store-recover
W=/dev/shm/work-recover
M=/dev/shm/mnt-recover
rm -rf "$STASIS_STORE" "$W"
mkdir -p "$W" "$M"
say() { echo "ublk-test: $*"; }
fail() { echo "ublk-test: FAIL: $*"; dmesg | tail -20; exit 1; }

# If anything hangs (I/O to a quiesced device waits forever), show where before the harness
# times out.
(
    sleep 120
    echo "ublk-test: WATCHDOG: still running after 120 s"
    ps -eo pid,stat,wchan:30,args | grep -v "\["
    dmesg | tail -30
    for p in /proc/[0-9]*; do
        grep -q "State:.*D" "$p/status" 2>/dev/null && { echo "== $p $(cat "$p/comm")"; cat "$p/stack"; }
    done
) &
head -c 16M /dev/urandom > "$W/golden.raw"
"$STASIS" image import g "$W/golden.raw" >/dev/null 2>&1
"$STASIS" disk create r --from g --size 256M >/dev/null

# Starts `stasis serve r --ublk [--recover]` in the background; sets DEV and PID.
# Runs `stasis --json ARGS` (a command that serves a ublk device) in the background; sets
# PID, and DEV once the device exists.
start_ublk() {
    : > "$W/serve.out"
    "$STASIS" --json "$@" > "$W/serve.out" 2>"$W/serve.err" &
    PID=$!
    for _ in $(seq 600); do
        DEV=$(sed -n 's/.*"ublk":"\([^"]*\)".*/\1/p' "$W/serve.out")
        [ -n "$DEV" ] && [ -b "$DEV" ] && return 0
        kill -0 "$PID" 2>/dev/null || fail "$*: died: $(cat "$W/serve.err")"
        sleep 0.1
    done
    fail "$*: no device after 60 s: $(cat "$W/serve.err")"
}

serve() { start_ublk serve r --ublk "$@"; }

# Runs stasis expecting exit status 2 (refused, nothing changed).
refused() {
    rc=0
    "$STASIS" "$@" > "$W/refused.out" 2>&1 || rc=$?
    [ "$rc" = 2 ] || fail "stasis $* exited $rc, expected 2: $(cat "$W/refused.out")"
}

serve --queues 2
FIRST=$DEV
/sbin/mkfs.ext4 -q -F -E nodiscard "$DEV"
mount -t ext4 "$DEV" "$M"

# The writer: each file is written and fsynced, then its checksum is logged outside the
# disk. A logged file must survive any crash of the server.
writer() {
    i=0
    while [ ! -e "$W/stop-writer" ]; do
        i=$((i + 1))
        head -c 200K /dev/urandom > "$W/chunk"
        dd if="$W/chunk" of="$M/f$i" bs=64k conv=fsync 2>/dev/null || { echo "dd f$i failed" >> "$W/writer.err"; exit 1; }
        echo "$(sha256sum < "$W/chunk" | cut -d' ' -f1)  f$i" >> "$W/synced"
    done
}
: > "$W/synced"
writer &
WRITER=$!
sleep 2

# While the server lives: --recover is refused (the disk is locked) and changes nothing.
refused serve r --ublk --recover
[ -b "$DEV" ] || fail "a refused --recover removed $DEV"

for round in 1 2; do
    before=$(wc -l < "$W/synced")
    kill -9 "$PID"
    wait "$PID" 2>/dev/null || true
    [ -b "$DEV" ] || fail "round $round: $DEV vanished with its server"
    # A plain serve would fork the disk's history under the mounted filesystem: refused.
    refused serve r --ublk
    refused serve r --nbd unix:"$W/nbd.sock"
    # So is anything else that would change the disk behind the waiting device.
    refused disk compact r
    refused disk rm r
    refused swapout r --repo /dev/shm/repo
    "$STASIS" disk info r > /dev/null || fail "disk info of a disk with an orphaned device"
    serve --recover
    [ "$DEV" = "$FIRST" ] || fail "round $round: recovered as $DEV, expected $FIRST"
    grep -q '"recovered":true' "$W/serve.out" || fail "round $round: $(cat "$W/serve.out")"
    # The writer was blocked; it goes on.
    for _ in $(seq 600); do
        [ "$(wc -l < "$W/synced")" -gt $((before + 3)) ] && break
        kill -0 "$WRITER" 2>/dev/null || fail "round $round: the writer died: $(cat "$W/writer.err" 2>/dev/null)"
        sleep 0.1
    done
    [ "$(wc -l < "$W/synced")" -gt $((before + 3)) ] || fail "round $round: I/O did not resume"
    say "kill -9 round $round: device kept, refusals ok, --recover took $DEV over, I/O resumed ($(wc -l < "$W/synced") files synced)"
done

touch "$W/stop-writer"
wait "$WRITER" || fail "writer: $(cat "$W/writer.err" 2>/dev/null)"
(cd "$M" && sha256sum -c --quiet "$W/synced") || fail "a file whose fsync returned differs after recovery"
umount "$M"
e2fsck -fn "$DEV" > "$W/fsck.txt" 2>&1 || fail "e2fsck after recovery: $(cat "$W/fsck.txt")"
say "after 2 recoveries: all $(wc -l < "$W/synced") fsynced files intact, e2fsck -fn clean"

kill -TERM "$PID"
wait "$PID" || fail "recovered server exited with $?: $(cat "$W/serve.err")"
[ ! -e "$DEV" ] || fail "$DEV still exists after SIGTERM"
[ ! -e "$STASIS_STORE/run/r.ublk" ] || fail "device record left after a clean stop"
refused serve r --ublk --recover
say "SIGTERM of the recovered server deletes $DEV; --recover with nothing to recover is refused"

# An orphan given up instead of recovered.
serve
kill -9 "$PID"
wait "$PID" 2>/dev/null || true
[ -b "$DEV" ] || fail "$DEV vanished with its server"
"$STASIS" ublk delete r > "$W/delete.out" 2>&1 || fail "ublk delete: $(cat "$W/delete.out")"
for _ in $(seq 50); do [ -e "$DEV" ] || break; sleep 0.1; done
[ ! -e "$DEV" ] || fail "$DEV still exists after ublk delete"
"$STASIS" disk verify r > /dev/null 2>&1 || fail "disk verify after ublk delete"
say "stasis ublk delete removes an orphaned device; the disk verifies"

# Swapout of that disk (an ext4 filesystem with the files), swapin on another store (another
# node): served at once as a ublk device while its data arrives, the filesystem checks clean
# and every file is intact.
"$STASIS" swapout r --repo /dev/shm/repo --name r1 > "$W/swapout.out" 2>&1 || fail "swapout: $(cat "$W/swapout.out")"
export STASIS_STORE=/dev/shm/store-node-b
start_ublk swapin r1 --as r --repo /dev/shm/repo --ublk
e2fsck -fn "$DEV" > "$W/fsck2.txt" 2>&1 || fail "e2fsck after swapin: $(cat "$W/fsck2.txt")"
mount -t ext4 "$DEV" "$M"
(cd "$M" && sha256sum -c --quiet "$W/synced") || fail "files differ after swapout/swapin"
say "swapout, swapin on another store served as ublk at once: e2fsck clean, all files intact"

# Swapout of the disk while it is served (through its control socket): a new file written on
# node B, unmounted, then swapped out; the server stops by itself, its device goes, and the
# disk is released. Back on node A, swapped in and served as ublk again: all files there.
head -c 3000000 /dev/urandom > "$M/after-swapin"
(cd "$M" && sha256sum after-swapin >> "$W/synced")
umount "$M"
"$STASIS" --json swapout r --repo /dev/shm/repo --name r2 > "$W/swapout2.out" 2>&1 || fail "served swapout: $(cat "$W/swapout2.out")"
grep -Eq '"server_stopped": ?true' "$W/swapout2.out" || fail "served swapout: $(cat "$W/swapout2.out")"
wait "$PID" || fail "the server of the swapped-out disk exited with $?: $(cat "$W/serve.err")"
[ -b "$DEV" ] && fail "$DEV still exists after the served swapout"
"$STASIS" disk info r > /dev/null 2>&1 && fail "disk r still in store B after the served swapout"
export STASIS_STORE=/dev/shm/store-recover
start_ublk swapin r2 --as r --repo /dev/shm/repo --ublk
e2fsck -fn "$DEV" > "$W/fsck3.txt" 2>&1 || fail "e2fsck after the served swapout: $(cat "$W/fsck3.txt")"
mount -t ext4 "$DEV" "$M"
(cd "$M" && sha256sum -c --quiet "$W/synced") || fail "files differ after the served swapout"
umount "$M"
kill -TERM "$PID"
wait "$PID" || fail "swapped-in server exited with $?: $(cat "$W/serve.err")"
say "swapout of a served ublk disk through its control socket: server stopped, device gone, swapped in on node A intact"
say "PASS"
