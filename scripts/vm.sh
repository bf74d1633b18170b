#!/usr/bin/env bash
# Run one command in a throw-away QEMU guest with Debian's kernel and a busybox initramfs,
# and exit with that command's exit code.
#
#   scripts/vm.sh [OPTIONS] -- CMD [ARGS...]
#
#   --module NAME    load kernel module NAME (and what it depends on) before CMD; repeatable
#   --disk FILE      attach FILE as a raw virtio disk: /dev/vda, /dev/vdb, ... in order
#   --copy SRC:DST   put host file SRC at DST in the guest (ELF binaries bring their shared
#                    libraries, found with ldd, and lose their debug info); repeatable
#   --env NAME=VALUE set for CMD; repeatable
#   --mem MB         guest memory (default 512)
#   --smp N          guest CPUs (default 1)
#   --timeout SECS   kill the guest after SECS (default 120); exit code 124 then
#   --console FILE   also keep the guest console in FILE
#
# The guest has /proc, /sys, /dev (devtmpfs), a tmpfs /tmp, loopback up, no network, and
# busybox applets on PATH; CMD runs as root in /, with HOME=/tmp. Exit codes: CMD's, 124 if
# the guest ran out of time, 125 if the guest never reported one (crash, boot failure).
#
# The kernel and its modules come from Debian's linux-image-amd64 package, downloaded with
# apt-get once and unpacked (never installed) under target/vm/ (VM_CACHE overrides).
# Host packages: qemu-system-x86 busybox-static cpio (scripts/test.sh installs them).
# KVM is used when the host has a real one (kvm_intel / kvm_amd), otherwise TCG.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${VM_CACHE:-$ROOT/target/vm}
MEM=512
SMP=1
TIMEOUT=120
CONSOLE=""
MODULES=()
DISKS=()
COPIES=()
ENVS=()

die() {
    echo "vm.sh: $*" >&2
    exit 125
}

while (($#)); do
    case $1 in
    --module) MODULES+=("$2"); shift 2 ;;
    --disk) [[ -f $2 ]] || die "no such disk image: $2"; DISKS+=("$(realpath "$2")"); shift 2 ;;
    --copy) [[ $2 == *:/* ]] || die "--copy wants SRC:/ABSOLUTE/DST, got $2"; COPIES+=("$2"); shift 2 ;;
    --env) [[ $2 == [A-Za-z_]*=* ]] || die "--env wants NAME=VALUE, got $2"; ENVS+=("$2"); shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --smp) SMP=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --console) CONSOLE=$2; shift 2 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see the header of scripts/vm.sh)" ;;
    esac
done
(($#)) || die "no command given (scripts/vm.sh [OPTIONS] -- CMD ...)"
for tool in qemu-system-x86_64 cpio strings; do
    command -v "$tool" >/dev/null || die "$tool missing (apt-get install qemu-system-x86 cpio)"
done
BUSYBOX=$(command -v busybox || true)
[[ -n $BUSYBOX ]] && ! ldd "$BUSYBOX" >/dev/null 2>&1 || die "a static busybox is needed (apt-get install busybox-static)"

# --- 1. Kernel and modules, cached. ------------------------------------------------------
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9 # one download/unpack at a time; concurrent guests share the result
if [[ ! -d $CACHE/kernel/boot ]]; then
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [[ -n $pkg ]] || die "apt-cache knows no linux-image-amd64 (run apt-get update)"
    rm -rf "$CACHE/deb" "$CACHE/kernel.tmp"
    mkdir -p "$CACHE/deb"
    (cd "$CACHE/deb" && apt-get download "$pkg" >/dev/null) || die "apt-get download $pkg failed"
    dpkg-deb -x "$CACHE"/deb/*.deb "$CACHE/kernel.tmp"
    mv "$CACHE/kernel.tmp" "$CACHE/kernel"
fi
VMLINUZ=$(ls "$CACHE"/kernel/boot/vmlinuz-* | head -1)
KVER=${VMLINUZ##*/vmlinuz-}
MODROOT=$CACHE/kernel/lib/modules/$KVER
# Under TCG, decompressing the bzImage in the guest takes seconds. The kernel is built with
# CONFIG_PVH, so QEMU can boot the uncompressed ELF directly: unpack it once.
KERNEL=$CACHE/vmlinux-$KVER
if [[ ! -s $KERNEL ]]; then
    python3 - "$VMLINUZ" "$KERNEL.tmp" <<'PY' && mv "$KERNEL.tmp" "$KERNEL" || KERNEL=$VMLINUZ
import lzma, sys
image = open(sys.argv[1], "rb").read()
start = image.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit(1)
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image[start:])
if elf[:4] != b"\x7fELF":
    sys.exit(1)
open(sys.argv[2], "wb").write(elf)
PY
fi
flock -u 9

# Modules: the package has no modules.dep (depmod runs at install), so read each module's
# own "depends=" field and load dependencies first.
declare -A MODPATH=()
while IFS= read -r f; do
    n=${f##*/}
    n=${n%.ko}
    MODPATH[${n//-/_}]=$f
done < <(find "$MODROOT/kernel" -name '*.ko')
ORDER=()
declare -A SEEN=()
add_module() {
    local n=${1//-/_} dep
    [[ -n ${SEEN[$n]:-} ]] && return
    SEEN[$n]=1
    [[ -n ${MODPATH[$n]:-} ]] || die "no module $1 in $KVER (built in? then drop --module)"
    for dep in $(strings -a "${MODPATH[$n]}" | sed -n 's/^depends=//p' | tr ',' ' '); do
        add_module "$dep"
    done
    ORDER+=("$n")
}
# crc32c is asked for by name at run time (ext4, jbd2, dm), not listed as a dependency.
((${#DISKS[@]})) && MODULES=(virtio_pci virtio_blk "${MODULES[@]}")
for m in "${MODULES[@]}"; do
    add_module "$m"
    [[ ${m//-/_} == ext4 || ${m//-/_} == libcrc32c ]] && add_module crc32c_generic
done

# --- 2. Initramfs. ---------------------------------------------------------------------
R=$(mktemp -d "${TMPDIR:-/tmp}/outpost-vm.XXXXXX")
trap 'rm -rf "$R"' EXIT
mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,run,mods,etc}
cp "$BUSYBOX" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"
for n in "${ORDER[@]}"; do
    cp "${MODPATH[$n]}" "$R/mods/$n.ko"
done

copy_in() { # SRC DST: a file, and for a dynamically linked ELF its libraries
    local src=$1 dst=$R$2 lib
    [[ -f $src ]] || die "--copy: no such file $src"
    mkdir -p "$(dirname "$dst")"
    cp -L "$src" "$dst"
    if [[ $(head -c4 "$src" | od -An -c | tr -d ' ') == 177ELF ]]; then
        strip --strip-debug "$dst" 2>/dev/null || true
        for lib in $(ldd "$src" 2>/dev/null | grep -oE '/[^ ]+' || true); do
            [[ -e $R$lib ]] || { mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$lib"; }
        done
    fi
}
for c in "${COPIES[@]}"; do
    copy_in "${c%%:/*}" "/${c#*:/}"
done

{
    echo '#!/bin/sh'
    echo '/bin/busybox --install -s /bin'
    echo 'export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/tmp'
    echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
    echo 'mount -t tmpfs tmp /tmp; ip link set lo up'
    for n in "${ORDER[@]}"; do
        echo "insmod /mods/$n.ko || echo 'vm.sh: insmod $n failed'"
    done
    for e in "${ENVS[@]}"; do
        printf 'export %q\n' "$e"
    done
    printf '%q ' "$@"
    echo
    echo 'echo "VM_EXIT_CODE=$?"'
    echo 'sync; poweroff -f'
} >"$R/init"
chmod +x "$R/init"
# Uncompressed: under TCG, gunzip in the guest costs more than reading the larger image.
INITRD=$R.cpio
trap 'rm -rf "$R" "$INITRD"' EXIT
(cd "$R" && find . -print | cpio -o -H newc --quiet) >"$INITRD"

# --- 3. Boot. --------------------------------------------------------------------------
if [[ -w /dev/kvm ]] && { [[ -d /sys/module/kvm_intel ]] || [[ -d /sys/module/kvm_amd ]]; }; then
    ACCEL=(-enable-kvm -cpu host)
else
    ACCEL=(-accel tcg,thread=multi -cpu max)
fi
DRIVES=()
for d in "${DISKS[@]}"; do
    DRIVES+=(-drive "file=$d,format=raw,if=virtio,cache=unsafe")
done
LOG=$R/console.log
rc=0
timeout "$TIMEOUT" qemu-system-x86_64 "${ACCEL[@]}" -machine q35 -m "$MEM" -smp "$SMP" \
    -nographic -no-reboot -nodefaults -serial stdio -net none "${DRIVES[@]}" \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3 mitigations=off nokaslr random.trust_cpu=on" \
    </dev/null | tee "$LOG" || rc=$?
[[ -n $CONSOLE ]] && cp "$LOG" "$CONSOLE"
((rc == 124)) && { echo "vm.sh: guest timed out after ${TIMEOUT}s" >&2; exit 124; }
code=$(grep -aoE 'VM_EXIT_CODE=[0-9]+' "$LOG" | tail -1 | cut -d= -f2 || true)
[[ -n $code ]] || die "the guest reported no exit code (qemu exit $rc)"
exit "$code"
