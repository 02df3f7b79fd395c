#!/usr/bin/env bash
# Set up a fresh Debian machine (as root) and run vmkeep's main job on a demo VM:
# a throwaway libvirt domain (no OS needed) backed up live, guest writes, an incremental
# backup from the checkpoint's dirty bitmap, a generation restored as a new VM, proven
# with verify and compared, a deep check and the status table. The domains are removed
# at the end; the repository stays in $DEMO_DIR (default /var/tmp/vmkeep-demo) for a look around.
source "$(dirname "$0")/lib.sh"
as_root
ensure_packages "${BASE_PACKAGES[@]}"
ensure_cargo
ensure_libvirtd
cd "$REPO_ROOT"
log "building and installing vmkeep (release)"
cargo build --release --locked -p vmkeep-cli
install_vmkeep target/release/vmkeep

DEMO_DIR=${DEMO_DIR:-/var/tmp/vmkeep-demo}
DOM=vmkeep-demo-$$
COPY=$DOM-restored
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"
chmod 0711 "$DEMO_DIR" # QEMU (libvirt-qemu) must reach the disks inside
export VMKEEP_REPO=$DEMO_DIR/repo VMKEEP_CONFIG=$DEMO_DIR/vmkeep.toml
cat >"$VMKEEP_CONFIG" <<EOF
repository = "$VMKEEP_REPO"
connect = "qemu:///system"
EOF
vk() { echo "+ vmkeep $*" >&2; vmkeep "$@"; }
cleanup() {
    for d in "$DOM" "$COPY"; do
        virsh -q destroy "$d" >/dev/null 2>&1 || true
        virsh -q undefine "$d" --checkpoints-metadata >/dev/null 2>&1 || true
    done
    rm -f "$DEMO_DIR"/*.qcow2 "$DEMO_DIR"/*.raw
}
trap cleanup EXIT

log "a throwaway VM: $DOM (TCG, no OS, one 256 MiB qcow2 disk)"
qemu-img create -q -f qcow2 "$DEMO_DIR/$DOM-vda.qcow2" 256M
cat >"$DEMO_DIR/$DOM.xml" <<EOF
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$DEMO_DIR/$DOM-vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
  </devices>
</domain>
EOF
virsh -q define "$DEMO_DIR/$DOM.xml" >/dev/null
virsh -q start "$DOM" >/dev/null

guest_write() { # PATTERN OFFSET LENGTH: what the guest's own writes look like to QEMU
    virsh -q qemu-monitor-command "$DOM" --hmp \
        "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P $1 $2 $3\"" >/dev/null
}
flush() {
    virsh -q qemu-monitor-command "$DOM" --hmp \
        "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend flush" >/dev/null
}

vk init
log "the guest writes 32 MiB; the first backup is full (a pull-mode backup job, live)"
guest_write 0x11 16M 32M
vk backup "$DOM"
flush
qemu-img convert -U -O raw "$DEMO_DIR/$DOM-vda.qcow2" "$DEMO_DIR/at-first-backup.raw"

log "the guest writes 1 MiB here and there; the next backup reads only what the dirty bitmap names"
guest_write 0x22 100M 512k
guest_write 0x33 200M 512k
vk backup "$DOM"
virsh -q checkpoint-list "$DOM" --name | sed 's/^/checkpoint kept for the next run: /'

log "the newest generation is a plain raw image"
flush
qemu-img convert -U -O raw "$DEMO_DIR/$DOM-vda.qcow2" "$DEMO_DIR/now.raw"
cmp "$DEMO_DIR/now.raw" "$VMKEEP_REPO/$DOM/latest/vda.raw" && echo "latest/vda.raw equals the running VM's disk"

log "restore the first generation as a new VM, prove its disk equals the generation, start it"
vk restore "$DOM" --generation 1 --as-vm "$COPY" --disk-dir "$DEMO_DIR"
# verify reads the copy through qemu-nbd, which needs the image unlocked: before the start.
vk verify "$DOM" --generation 1 --disk vda="$DEMO_DIR/$COPY-vda.qcow2"
virsh -q start "$COPY" >/dev/null
qemu-img compare -q -U "$DEMO_DIR/at-first-backup.raw" "$DEMO_DIR/$COPY-vda.qcow2" &&
    echo "$COPY's disk equals $DOM's disk at the first backup"
virsh -q domstate "$COPY" | sed "s/^/$COPY is /"

vk check "$DOM" --deep
vk status "$DOM"
log "done: the demo VMs are removed; the repository stays in $VMKEEP_REPO"
cat <<EOF
Look around:
  vmkeep --repo $VMKEEP_REPO status $DOM       the generations (--json for scripts)
  vmkeep --repo $VMKEEP_REPO restore $DOM --generation 1 --to /var/tmp/gen1.raw
  ls -ls $VMKEEP_REPO/$DOM/latest/              the newest disk: a plain sparse raw image
Next: README.md (quick start, config, systemd timers), docs/libvirt.md (live backups),
docs/recovery.md (disaster and instant recovery), docs/check.md (what check proves).
EOF
