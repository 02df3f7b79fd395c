#!/usr/bin/env bash
# The tests' real guest: a Linux kernel and an initramfs, from Debian packages only, booted
# by direct kernel boot (<os><kernel>/<initrd>) under QEMU TCG. Its /init mounts the ext4
# data disk /dev/vda at /data, runs qemu-guest-agent on the virtio-serial port
# org.qemu.guest_agent.0 (guest-exec, fsfreeze, guest-shutdown work), mounts efivarfs when
# booted by UEFI firmware (OVMF) and prints "vmkeep-guest: ready" on the serial console.
#
#   scripts/guest-image.sh [OUT_DIR]                     as root; builds into OUT_DIR
#                                                         (default /var/cache/vmkeep-test-guest)
#   scripts/guest-image.sh --data-disk FOLDER IMG SIZE   an ext4 image IMG of SIZE (e.g. 64M)
#                                                         holding FOLDER's files (mke2fs -d)
#
# The build is cached: OUT_DIR/stamp records the kernel package and version, the versions of
# busybox-static and qemu-guest-agent, a digest of every library qemu-ga loads and a digest
# of this script's text; when it matches, the script does nothing. Delete OUT_DIR (or its
# stamp) to rebuild by force.
#
# OUT_DIR holds vmlinuz (from the linux-image-cloud-amd64 package, downloaded and unpacked,
# never installed: see GUEST_KERNEL_PACKAGE in lib.sh), initrd.img (a gzip'd cpio) and stamp.
source "$(dirname "$0")/lib.sh"

SELF="${BASH_SOURCE[0]}"

# The kernel modules the guest loads, dependencies first (resolved from the module tree);
# those the kernel has built in are skipped. crc32c_generic backs ext4's and jbd2's
# metadata checksums (they ask the crypto API for "crc32c", and the guest has no modprobe).
# efivarfs (the UEFI variables at /sys/firmware/efi/efivars) is loaded on UEFI boots only.
GUEST_MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    virtio_blk virtio_console crc32c_generic ext4 efivarfs)

QEMU_GA=/usr/sbin/qemu-ga
BUSYBOX=/bin/busybox

data_disk() {
    [ $# -eq 3 ] || die "usage: $0 --data-disk FOLDER IMG SIZE"
    local folder=$1 img=$2 size=$3
    [ -d "$folder" ] || die "--data-disk: $folder is not a folder"
    command -v mke2fs >/dev/null || die "mke2fs is missing (install e2fsprogs)"
    rm -f "$img"
    mke2fs -q -F -t ext4 -L vmkeep-data -d "$folder" "$img" "$size" ||
        die "mke2fs could not make $img ($size) from $folder"
}

# The libraries qemu-ga loads, as ldd resolves them (the dynamic loader included).
ga_libraries() {
    ldd "$QEMU_GA" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u
}

# The linux-image package the cloud meta-package points at, and its version: "NAME VERSION".
kernel_package() {
    local dep
    dep=$(apt-cache show --no-all-versions "$GUEST_KERNEL_PACKAGE" 2>/dev/null | sed -n 's/^Depends: //p' | head -1)
    if [ -z "$dep" ]; then
        log "apt-get update (no package list names $GUEST_KERNEL_PACKAGE)"
        apt-get update -qq
        dep=$(apt-cache show --no-all-versions "$GUEST_KERNEL_PACKAGE" | sed -n 's/^Depends: //p' | head -1)
    fi
    # "linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)"
    local name version
    name=$(printf '%s\n' "$dep" | sed -n 's/^\(linux-image-[^ ,]*\) (= \([^)]*\)).*/\1/p')
    version=$(printf '%s\n' "$dep" | sed -n 's/^\(linux-image-[^ ,]*\) (= \([^)]*\)).*/\2/p')
    [ -n "$name" ] && [ -n "$version" ] || die "cannot tell which kernel $GUEST_KERNEL_PACKAGE depends on (Depends: $dep)"
    echo "$name $version"
}

# Everything the image is built from, one line each: equal stamps, equal images.
stamp_text() {
    local kernel=$1 lib
    echo "script $(sha256sum <"$SELF" | cut -d' ' -f1)"
    echo "kernel $kernel"
    echo "busybox-static $(pkg_version busybox-static)"
    echo "qemu-guest-agent $(pkg_version qemu-guest-agent)"
    for lib in $(ga_libraries); do
        echo "library $lib $(sha256sum <"$lib" | cut -d' ' -f1)"
    done
}

# Download the kernel package into $1 and unpack it there (into $1/root).
unpack_kernel() {
    local dir=$1 name=$2 version=$3
    mkdir -p "$dir/deb"
    # apt drops root to _apt for downloads: let it write there.
    id _apt >/dev/null 2>&1 && chown _apt "$dir/deb"
    if ! (cd "$dir/deb" && apt-get download -qq "$name=$version" >/dev/null 2>"$dir/download.log"); then
        log "apt-get update (downloading $name $version failed)"
        apt-get update -qq
        (cd "$dir/deb" && apt-get download -qq "$name=$version" >/dev/null 2>"$dir/download.log") || {
            cat "$dir/download.log" >&2
            die "apt-get download $name=$version failed"
        }
    fi
    dpkg-deb -x "$dir"/deb/*.deb "$dir/root"
}

# Print the modules to load for "$@" in dependency order (each once), from the module
# tree $MODDIR; a module the kernel has built in is skipped, one neither built in nor
# found ends the build.
declare -A MOD_FILE=() MOD_SEEN=()
module_order() {
    local m f dep
    for m in "$@"; do
        m=${m//-/_}
        [ -n "${MOD_SEEN[$m]:-}" ] && continue
        MOD_SEEN[$m]=1
        f=${MOD_FILE[$m]:-}
        if [ -z "$f" ]; then
            grep -q "/${m}.ko\$\|/${m//_/-}.ko\$" "$MODDIR/modules.builtin" ||
                die "kernel module $m is neither in $MODDIR nor built in"
            log "module $m is built in"
            continue
        fi
        dep=$(modinfo -F depends "$f")
        [ -n "$dep" ] && module_order ${dep//,/ }
        echo "$m"
    done
}

write_init() {
    cat >"$1" <<'EOF'
#!/bin/sh
# vmkeep's test guest. Never exits: PID 1 ending would panic the kernel.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
say() { echo "vmkeep-guest: $*"; }
say "init on $(uname -r)"
while read -r m; do
    [ "$m" = efivarfs ] && [ ! -d /sys/firmware/efi ] && continue
    insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done </etc/modules-order
if [ -d /sys/firmware/efi ]; then
    if mount -t efivarfs efivarfs /sys/firmware/efi/efivars; then
        say "UEFI variables at /sys/firmware/efi/efivars"
    else
        say "ERROR: efivarfs not mounted"
    fi
fi
# Wait (up to 10 s) until a condition holds.
settle() {
    i=0
    while ! eval "$1"; do
        [ $i -ge 100 ] && return 1
        usleep 100000
        i=$((i + 1))
    done
}
if settle '[ -b /dev/vda ]' && mount -t ext4 -o rw /dev/vda /data; then
    say "data disk /dev/vda mounted at /data"
else
    say "ERROR: data disk /dev/vda not mounted"
fi
# The links udev would make: /dev/virtio-ports/NAME -> ../vportNpM.
mkdir -p /dev/virtio-ports
settle '[ -e /sys/class/virtio-ports/vport0p1 ] || ls /sys/class/virtio-ports/ | grep -q .' ||
    say "ERROR: no virtio-serial port"
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    n=$(cat "$p/name")
    [ -n "$n" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$n"
done
AGENT_PORT=/dev/virtio-ports/org.qemu.guest_agent.0
[ -e $AGENT_PORT ] || say "ERROR: no $AGENT_PORT"
(
    while :; do
        # guest-exec without input-data lets the command inherit this stdin: none.
        qemu-ga -m virtio-serial -p $AGENT_PORT </dev/null
        say "qemu-ga ended ($?), starting it again"
        sleep 1
    done
) &
say "ready"
while :; do
    sleep 3600
done
EOF
    chmod 0755 "$1"
}

# What qemu-ga runs for guest-shutdown ("shutdown -h -P +0 MSG" or "-r"): the file system
# written out and unmounted, then the kernel powers off (or reboots) at once.
write_shutdown() {
    cat >"$1" <<'EOF'
#!/bin/sh
sync
umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
case " $* " in
*" -r "*) exec reboot -f ;;
*) exec poweroff -f ;;
esac
EOF
    chmod 0755 "$1"
}

build() {
    local out=$1
    as_root
    local p
    for p in "${GUEST_PACKAGES[@]}"; do
        pkg_installed "$p" || die "package $p is not installed (scripts/test.sh installs it)"
    done
    for p in "$QEMU_GA" "$BUSYBOX"; do [ -x "$p" ] || die "$p is missing"; done

    local kernel name version stamp
    kernel=$(kernel_package)
    read -r name version <<<"$kernel"
    stamp=$(stamp_text "$kernel")
    if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/stamp" ] &&
        [ "$(cat "$out/stamp")" = "$stamp" ]; then
        log "test guest in $out is up to date ($name $version)"
        return 0
    fi

    log "building the test guest into $out ($name $version)"
    local work
    work=$(mktemp -d /var/tmp/vmkeep-guest.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    chmod 0755 "$work"
    unpack_kernel "$work/kernel" "$name" "$version"
    local vmlinuz kver
    vmlinuz=$(ls "$work"/kernel/root/boot/vmlinuz-* 2>/dev/null | head -1)
    [ -n "$vmlinuz" ] || die "$name holds no /boot/vmlinuz-*"
    kver=${vmlinuz##*/vmlinuz-}
    MODDIR=$work/kernel/root/lib/modules/$kver
    [ -d "$MODDIR" ] || MODDIR=$work/kernel/root/usr/lib/modules/$kver
    [ -d "$MODDIR" ] || die "$name holds no module tree for $kver"
    local f base
    while IFS= read -r f; do
        base=${f##*/}
        base=${base%%.ko*}
        MOD_FILE[${base//-/_}]=$f
    done < <(find "$MODDIR" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

    local root=$work/initrd
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,data,tmp,run,var,lib/modules}
    ln -s ../run "$root/var/run"
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3

    # busybox and its applets
    cp "$BUSYBOX" "$root/bin/busybox"
    local a
    for a in $("$BUSYBOX" --list); do
        [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
    done

    # qemu-ga and every library it loads, at the paths ldd names
    cp "$QEMU_GA" "$root/bin/qemu-ga"
    local lib
    for lib in $(ga_libraries); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done

    # the modules, uncompressed (busybox insmod reads plain .ko), and their order
    local m order
    order=$(module_order "${GUEST_MODULES[@]}")
    for m in $order; do
        f=${MOD_FILE[$m]}
        case "$f" in
        *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
        esac
    done
    printf '%s\n' $order >"$root/etc/modules-order"
    log "modules: $(echo $order)"

    write_init "$root/init"
    write_shutdown "$root/sbin/shutdown"

    (cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -6 >"$work/initrd.img"

    mkdir -p "$out"
    chmod 0755 "$out"
    rm -f "$out/stamp"
    install -m 0644 "$vmlinuz" "$out/.vmlinuz.new"
    install -m 0644 "$work/initrd.img" "$out/.initrd.img.new"
    mv -f "$out/.vmlinuz.new" "$out/vmlinuz"
    mv -f "$out/.initrd.img.new" "$out/initrd.img"
    printf '%s\n' "$stamp" >"$out/stamp"
    log "test guest built: $out/vmlinuz ($kver), $out/initrd.img ($(du -k "$out/initrd.img" | cut -f1) KiB)"
}

case "${1:-}" in
--data-disk)
    shift
    data_disk "$@"
    ;;
-h | --help)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"
    ;;
-*) die "unknown option $1 (see $0 --help)" ;;
*) build "${1:-/var/cache/vmkeep-test-guest}" ;;
esac
