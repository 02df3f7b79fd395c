#!/usr/bin/env bash
# Set up a fresh Debian machine (as root) and run vmkeep's whole test suite:
# formatting, lints, the image-only build, and every test with every feature
# (libvirt, and the crash hook the kill tests need). Tests start the servers they use;
# the real test guest (scripts/guest-image.sh) and the S3 server Garage (ensure_garage)
# are built, or taken from their caches, first.
source "$(dirname "$0")/lib.sh"
as_root
ensure_packages "${BASE_PACKAGES[@]}"
ensure_cargo
cd "$REPO_ROOT"

log "cargo fmt --check"
cargo fmt --all -- --check
log "clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
log "image-only build (no libvirt)"
cargo build -p vmkeep-cli --no-default-features --locked
log "test guest (cached)"
export VMKEEP_TEST_GUEST=${VMKEEP_TEST_GUEST:-/var/cache/vmkeep-test-guest}
"$REPO_ROOT/scripts/guest-image.sh" "$VMKEEP_TEST_GUEST"
log "garage, the S3 server of the offsite tests (cached)"
ensure_garage
export VMKEEP_TEST_GARAGE=$GARAGE_BIN
log "tests"
cargo test --workspace --all-features --locked 2>&1 | tee /tmp/vmkeep-test.log
# The summary line CI reads: totals over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' /tmp/vmkeep-test.log
