# Shared by the hooks of this directory (not a hook itself): an example of the exec
# driver's contract that drives QEMU by hand. Stasis runs each hook with the VM in its
# environment (STASIS_VM, STASIS_VM_DIR, STASIS_NBD_URI, STASIS_MEM_MIB, STASIS_CPUS,
# STASIS_KERNEL, STASIS_INITRD, STASIS_APPEND, STASIS_CONSOLE_LOG, STASIS_BIN).
set -eu
QMP_SOCK="$STASIS_VM_DIR/hook-qmp.sock"
PIDFILE="$STASIS_VM_DIR/hook-qemu.pid"
qmp() { "$STASIS_BIN" qmp "$QMP_SOCK" "$@"; }
qemu_pid() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && cat "$PIDFILE"; }
launch() {
    rm -f "$QMP_SOCK"
    set -- "$@" -accel "${HOOK_ACCEL:-tcg}" -m "${STASIS_MEM_MIB}M" -smp "$STASIS_CPUS" \
        -nodefaults -no-user-config -display none -rtc base=utc,clock=vm \
        -drive "file=$STASIS_NBD_URI,format=raw,if=virtio,cache=none" \
        -chardev "file,id=console,path=$STASIS_CONSOLE_LOG,append=on" -serial chardev:console \
        -qmp "unix:$QMP_SOCK,server=on,wait=off" -daemonize -pidfile "$PIDFILE"
    [ -n "${STASIS_KERNEL:-}" ] && set -- "$@" -kernel "$STASIS_KERNEL"
    [ -n "${STASIS_INITRD:-}" ] && set -- "$@" -initrd "$STASIS_INITRD"
    [ -n "${STASIS_APPEND:-}" ] && set -- "$@" -append "$STASIS_APPEND"
    qemu-system-x86_64 "$@"
}
mapped_ram() { qmp migrate-set-capabilities '{"capabilities":[{"capability":"mapped-ram","state":true}]}' >/dev/null; }
wait_migration() {
    while :; do
        s="$(qmp query-migrate)"
        case "$s" in
            *'"completed"'*) return 0 ;;
            *'"failed"'*|*'"cancelled"'*) echo "migration failed: $s" >&2; return 1 ;;
        esac
        sleep 0.02
    done
}
wait_exit() {
    pid="$1"
    for _ in $(seq 500); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.02; done
    echo "QEMU (pid $pid) did not exit" >&2; return 1
}
