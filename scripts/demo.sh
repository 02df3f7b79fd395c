#!/usr/bin/env bash
# Set up a fresh Debian machine (as root) and run vmkeep's main job on a real guest: the
# test guest (scripts/guest-image.sh: a Debian kernel, busybox and qemu-guest-agent, booted
# under TCG, with an ext4 data disk at /data) writes a file, a live backup freezes its file
# system through the agent, the guest writes more, an incremental backup reads only what the
# dirty bitmap names, the first generation is restored as a new VM that boots and reads the
# file back through its own agent, and a restore to qcow2 is proven with verify; then a deep
# check and the status table. The domains are removed at the end; the repository stays in
# $DEMO_DIR (default /var/tmp/vmkeep-demo) for a look around.
source "$(dirname "$0")/lib.sh"
as_root
ensure_packages "${BASE_PACKAGES[@]}"
ensure_cargo
ensure_libvirtd
cd "$REPO_ROOT"
log "building and installing vmkeep (release)"
cargo build --release --locked -p vmkeep-cli
install_vmkeep target/release/vmkeep
GUEST_IMAGE=${VMKEEP_TEST_GUEST:-/var/cache/vmkeep-test-guest}
log "the test guest (built once, then cached in $GUEST_IMAGE)"
"$REPO_ROOT/scripts/guest-image.sh" "$GUEST_IMAGE"

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
    rm -rf "$DEMO_DIR"/*.qcow2 "$DEMO_DIR"/*.ext4 "$DEMO_DIR"/vmlinuz "$DEMO_DIR"/initrd.img "$DEMO_DIR"/files
}
trap cleanup EXIT

# The guest agent, through libvirt: one command (JSON), its reply on stdout.
agent() { virsh -q qemu-agent-command "$1" --timeout 10 "$2"; }

# Wait (up to 120 s) until the agent of domain $1 answers guest-ping.
wait_agent() {
    local t0=$SECONDS
    until agent "$1" '{"execute":"guest-ping"}' >/dev/null 2>&1; do
        [ $((SECONDS - t0)) -lt 120 ] || die "$1: no answer from its guest agent after 120 s (console: $DEMO_DIR/$1-console.log)"
        sleep 0.5
    done
    echo "$1: the guest agent answers, $((SECONDS - t0)) s after the start"
}

# Run the shell command $2 in the guest of domain $1 (guest-exec, busybox sh), wait for it,
# print its standard output; fail unless it exits 0. $2 must hold no double quote or
# backslash (it travels inside the JSON command as it is).
guest_sh() {
    local reply pid status code
    reply=$(agent "$1" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"$2\"],\"capture-output\":true}}")
    pid=$(printf '%s' "$reply" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
    [ -n "$pid" ] || die "$1: guest-exec gave no pid: $reply"
    for _ in $(seq 1 600); do
        status=$(agent "$1" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}")
        case $status in *'"exited":true'*) break ;; esac
        sleep 0.1
    done
    case $status in *'"exited":true'*) ;; *) die "$1: '$2' still runs after 60 s" ;; esac
    code=$(printf '%s' "$status" | sed -n 's/.*"exitcode":\([0-9]*\).*/\1/p')
    printf '%s' "$status" | sed -n 's/.*"out-data":"\([^"]*\)".*/\1/p' | base64 -d
    [ "$code" = 0 ] || die "$1: '$2' exited ${code:-by a signal}: $status"
}

log "a real guest: $DOM (TCG, direct kernel boot, guest agent, ext4 data disk vda at /data)"
mkdir -p "$DEMO_DIR/files"
echo "a file of the data disk as it was made" >"$DEMO_DIR/files/hello.txt"
"$REPO_ROOT/scripts/guest-image.sh" --data-disk "$DEMO_DIR/files" "$DEMO_DIR/data.ext4" 64M
qemu-img convert -q -f raw -O qcow2 "$DEMO_DIR/data.ext4" "$DEMO_DIR/$DOM-vda.qcow2"
rm "$DEMO_DIR/data.ext4"
# A copy of the kernel and initrd: libvirt relabels what it boots; the cache stays as built.
cp "$GUEST_IMAGE/vmlinuz" "$GUEST_IMAGE/initrd.img" "$DEMO_DIR/"
cat >"$DEMO_DIR/$DOM.xml" <<EOF
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$DEMO_DIR/vmlinuz</kernel>
    <initrd>$DEMO_DIR/initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$DEMO_DIR/$DOM-vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='file'><source path='$DEMO_DIR/$DOM-console.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
virsh -q define "$DEMO_DIR/$DOM.xml" >/dev/null
virsh -q start "$DOM" >/dev/null
wait_agent "$DOM"

FIRST="written in the guest before the first backup"
SECOND="written in the guest before the second backup"
NOW="written in the guest after the last backup"

vk init
log "the guest writes /data/demo.txt; the first backup is full, live, the guest frozen through its agent"
guest_sh "$DOM" "echo '$FIRST' > /data/demo.txt && sync"
vk backup "$DOM"

log "the guest writes 4 MiB and changes demo.txt; the next backup reads only what the dirty bitmap names"
guest_sh "$DOM" "dd if=/dev/urandom of=/data/more.bin bs=1M count=4 2>/dev/null && echo '$SECOND' > /data/demo.txt && sync"
vk backup "$DOM"
virsh -q checkpoint-list "$DOM" --name | sed 's/^/checkpoint kept for the next run: /'

log "the newest generation is a plain raw image: debugfs reads the guest's file from it, no vmkeep needed"
echo "+ debugfs -R 'cat /demo.txt' $VMKEEP_REPO/$DOM/latest/vda.raw" >&2
debugfs -R 'cat /demo.txt' "$VMKEEP_REPO/$DOM/latest/vda.raw" 2>/dev/null

log "the guest changes demo.txt once more; restore the FIRST generation as a new VM and start it"
guest_sh "$DOM" "echo '$NOW' > /data/demo.txt && sync"
vk restore "$DOM" --generation 1 --as-vm "$COPY" --disk-dir "$DEMO_DIR" --start
wait_agent "$COPY"
echo "+ $COPY reads /data/demo.txt through its guest agent:" >&2
got=$(guest_sh "$COPY" "cat /data/demo.txt")
echo "$got"
[ "$got" = "$FIRST" ] || die "$COPY read '$got', not the first generation's '$FIRST'"
echo "+ $DOM (the original) reads /data/demo.txt:" >&2
guest_sh "$DOM" "cat /data/demo.txt"
more=$(guest_sh "$COPY" "if [ -e /data/more.bin ]; then echo has; else echo lacks; fi")
[ "$more" = lacks ] || die "$COPY has /data/more.bin, written after the first generation"
echo "$COPY is generation 1: the first demo.txt, and no more.bin (written after it)"

log "restore generation 1 to a qcow2 image and prove it equals the generation"
vk restore "$DOM" --generation 1 --disk vda --to "$DEMO_DIR/gen1.qcow2"
vk verify "$DOM" --generation 1 --disk vda="$DEMO_DIR/gen1.qcow2"

vk check "$DOM" --deep
vk status "$DOM"
log "done: the demo VMs are removed; the repository stays in $VMKEEP_REPO"
cat <<EOF
Look around:
  vmkeep --repo $VMKEEP_REPO status $DOM       the generations (--json for scripts)
  vmkeep --repo $VMKEEP_REPO restore $DOM --generation 1 --to /var/tmp/gen1.raw
  ls -ls $VMKEEP_REPO/$DOM/latest/              the newest disk: a plain sparse raw image
Next: README.md (quick start, config, systemd timers), docs/libvirt.md (live backups),
docs/recovery.md (disaster and instant recovery, file-level restore), docs/check.md (what
check proves).
EOF
