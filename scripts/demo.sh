#!/usr/bin/env bash
# Set up a fresh Debian machine (as root), build and install vmkeep, and run its main job
# on a demo disk: several generations (full, diff, incr), a restore, a deep check and the
# status table. Everything lives under $DEMO_DIR (default /var/tmp/vmkeep-demo).
source "$(dirname "$0")/lib.sh"
as_root
ensure_packages "${BASE_PACKAGES[@]}"
ensure_cargo
cd "$REPO_ROOT"
log "building vmkeep (release)"
cargo build --release --locked -p vmkeep-cli
install -m 0755 target/release/vmkeep /usr/local/bin/vmkeep

DEMO_DIR=${DEMO_DIR:-/var/tmp/vmkeep-demo}
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"
export VMKEEP_REPO=$DEMO_DIR/repo
disk=$DEMO_DIR/demo-vda.raw
vk() { echo "+ vmkeep $*" >&2; vmkeep "$@"; }

log "a 256 MiB demo disk: data, text and holes"
truncate -s 256M "$disk"
dd if=/dev/urandom of="$disk" bs=1M count=32 seek=16 conv=notrunc status=none
{ yes "vmkeep demo text" || true; } | head -c $((16 << 20)) | dd of="$disk" bs=1M seek=100 conv=notrunc status=none

vk init
vk backup demo --disk vda="$disk"
cp --sparse=always "$disk" "$DEMO_DIR/at-generation-0.raw"

log "the guest writes (scattered 4 KiB blocks); a diff backup reads all, stores the changes"
for i in $(seq 1 40); do
    dd if=/dev/urandom of="$disk" bs=4k count=1 seek=$((RANDOM * 2 % 65536)) conv=notrunc status=none
done
vk backup demo --disk vda="$disk"

log "a changed-block tracker names what changed; an incr backup reads only that"
: >"$DEMO_DIR/changed.txt"
for i in $(seq 1 10); do
    off=$(( (RANDOM % 60000) * 4096 ))
    dd if=/dev/urandom of="$disk" bs=4k count=1 seek=$((off / 4096)) conv=notrunc status=none
    echo "$off 4096" >>"$DEMO_DIR/changed.txt"
done
vk backup demo --disk vda="$disk" --changed-blocks vda="$DEMO_DIR/changed.txt" --mode incr

log "the newest generation is a plain raw image"
cmp "$disk" "$VMKEEP_REPO/demo/latest/vda.raw" && echo "latest/vda.raw equals the disk"

log "restore the oldest generation and compare"
vk restore demo --generation 2 --disk vda --to "$DEMO_DIR/restored-0.raw"
cmp "$DEMO_DIR/at-generation-0.raw" "$DEMO_DIR/restored-0.raw" && echo "generation 2 (the first backup) restored bit for bit"

vk check demo --deep
vk status demo
log "done: repository in $VMKEEP_REPO"
