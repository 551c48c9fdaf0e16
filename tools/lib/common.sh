# Shared by tools/*: install what Stasis needs on a Debian machine, and small output helpers.
# Sourced, not run.

STASIS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STASIS_TARGET="${CARGO_TARGET_DIR:-$STASIS_ROOT/target}"
# The release binary the tools build and use.
STASIS_BIN="$STASIS_TARGET/release/stasis"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Debian packages: the build (C compiler for blake3's SIMD code, libclang for libublk), the tests (qemu-img and
# qemu-io for qcow2 import and NBD; nbdinfo, nbdcopy, fio as NBD clients) and the quickstart
# (mkfs.ext4, e2fsck, debugfs).

install_deps() {
    local missing=()
    command -v cc >/dev/null || missing+=(build-essential)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    # libublk's bindings are generated with bindgen, which needs libclang.
    dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
    command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || missing+=(e2fsprogs)
    command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || missing+=(qemu-utils)
    command -v nbdinfo >/dev/null && command -v nbdcopy >/dev/null || missing+=(libnbd-bin)
    command -v fio >/dev/null || missing+=(fio)
    # The VM tests read JSON summaries with python3.
    command -v python3 >/dev/null || missing+=(python3)
    # The TLS test of `repo serve` makes its certificate with openssl.
    command -v openssl >/dev/null || missing+=(openssl)
    # The --boot-disk test builds a BIOS-bootable disk image (a FAT partition with syslinux)
    # without mounting anything: sfdisk, mkfs.vfat --offset, syslinux --offset, mcopy.
    command -v syslinux >/dev/null && [ -f /usr/lib/syslinux/mbr/mbr.bin ] || missing+=(syslinux syslinux-common)
    command -v mcopy >/dev/null || missing+=(mtools)
    command -v mkfs.vfat >/dev/null || missing+=(dosfstools)
    command -v sfdisk >/dev/null || missing+=(fdisk)
    if ((${#missing[@]})); then
        step "installing Debian packages: ${missing[*]}"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null; then
        step "installing Rust from Debian (cargo, rustc)"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cargo rustc >/dev/null
    fi
    install_moto
    local need="1.85"
    local have
    have="$(rustc --version | awk '{print $2}')"
    if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
        die "Stasis needs Rust >= $need (found $have); install it with rustup"
    fi
}

# moto_server (PyPI moto[server]): the local S3 server the S3-brick test runs against. Debian
# ships no recent moto; a virtualenv under the target directory keeps it off the system.
install_moto() {
    local venv="$STASIS_TARGET/moto-venv"
    if ! command -v moto_server >/dev/null && [ ! -x "$venv/bin/moto_server" ]; then
        step "installing moto_server (PyPI moto[server]) into $venv"
        if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv python3-pip >/dev/null
        fi
        mkdir -p "$STASIS_TARGET"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q 'moto[server]>=5,<6'
    fi
    [ -x "$venv/bin/moto_server" ] && export PATH="$PATH:$venv/bin"
    return 0
}
