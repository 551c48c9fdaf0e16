#!/bin/sh
# Benchmark inside the test VM (tools/vm/run tests/vm/bench-ublk.sh STASIS_BIN): the same fio
# jobs against `stasis serve --ublk` (a branch of a raw golden) and against a kernel loop
# device over a copy of the same golden, in the same guest, alternating. Under TCG only the
# ratios mean anything. Scratch space is tmpfs (/dev/shm), so the loop device cannot use
# direct I/O to its file (tmpfs has no O_DIRECT): both sides run from memory.
set -eu
STASIS="$1"
export STASIS_STORE=/dev/shm/store
W=/dev/shm/work
mkdir -p "$W"
REPEATS=${REPEATS:-3}
RUNTIME=${RUNTIME:-5}
head -c 256M /dev/urandom > "$W/golden.raw"
cp "$W/golden.raw" "$W/loop.raw"
"$STASIS" image import g "$W/golden.raw" >/dev/null 2>&1
"$STASIS" disk create d --from g >/dev/null
"$STASIS" --json serve d --ublk --queues 2 > "$W/serve.json" 2>"$W/serve.err" &
PID=$!
for _ in $(seq 300); do
    UBLK=$(sed -n 's/.*"ublk":"\([^"]*\)".*/\1/p' "$W/serve.json"); [ -n "$UBLK" ] && [ -b "$UBLK" ] && break; sleep 0.1
done
LOOP=$(losetup --find --show "$W/loop.raw")
job() { # NAME TARGET fio-args...
    name=$1; dev=$2; shift 2
    fio --name="$name" --filename="$dev" --ioengine=io_uring --direct=1 --size=256M --time_based \
        --runtime="$RUNTIME" --ramp_time=1 --randrepeat=0 --output-format=terse --terse-version=3 "$@" 2>/dev/null |
        awk -F';' '{ printf "%.0f %.0f\n", $8 + $49, ($7 + $48) / 1024 }'   # read+write IOPS, MiB/s
}
for rep in $(seq "$REPEATS"); do
    for spec in "randread:--rw=randread --bs=4k --iodepth=32" "randwrite:--rw=randwrite --bs=4k --iodepth=32" \
                "randrw:--rw=randrw --rwmixread=70 --bs=4k --iodepth=32" "seqread:--rw=read --bs=1M --iodepth=4" \
                "seqwrite:--rw=write --bs=1M --iodepth=4"; do
        name=${spec%%:*}; args=${spec#*:}
        if [ $((rep % 2)) = 1 ]; then order="ublk loop"; else order="loop ublk"; fi
        for t in $order; do
            if [ "$t" = ublk ]; then dev=$UBLK; else dev=$LOOP; fi
            # shellcheck disable=SC2086
            echo "BENCH $rep $name $t $(job "$name" "$dev" $args)"
        done
    done
done
losetup -d "$LOOP"
kill -TERM "$PID"; wait "$PID"
echo "BENCH-DONE"
