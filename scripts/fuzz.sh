#!/usr/bin/env bash
# Run every cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS each (default 60), then
# merge the inputs that found new coverage into the checked-in corpus, fuzz/corpus/TARGET/,
# minimised. Crashes are saved under fuzz/artifacts/TARGET/ and make the script fail.
#
# For developers. CI does not run this: `cargo test` runs the proptest harness
# (crates/vmkeep/tests/fuzz_parsers.rs) over random and mutated inputs and replays every
# file of fuzz/corpus/ through the same harness. Commit the corpus changes this script
# makes (keep fuzz/corpus under 2 MB).
#
# Needs cargo-fuzz (installed here if missing) and a nightly compiler: the rustup
# `nightly` toolchain when there is one, else the stable one with RUSTC_BOOTSTRAP=1.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
source "$(dirname "$0")/lib.sh"
ensure_cargo

SECONDS_EACH=${1:-60}
[ $# -gt 0 ] && shift
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(rdiff partial digest profile txn changed nbd)

TOOLCHAIN=()
if rustup run nightly rustc --version >/dev/null 2>&1; then
    TOOLCHAIN=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
command -v cargo-fuzz >/dev/null 2>&1 || {
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
}

cd "$REPO_ROOT/fuzz"
log "building the fuzz targets"
cargo "${TOOLCHAIN[@]}" fuzz build -O

failed=()
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t"
    found=$(mktemp -d)
    # The server's threads outlive each input and the run by design (a client sees the
    # end of its connection before the thread has exited): not leaks.
    leaks=1
    [ "$t" = nbd ] && leaks=0
    export ASAN_OPTIONS="detect_leaks=$leaks"
    extra=(-detect_leaks="$leaks")
    log "fuzzing $t for ${SECONDS_EACH}s"
    # New inputs go to $found; the checked-in corpus is read as the starting point.
    if ! cargo "${TOOLCHAIN[@]}" fuzz run -O "$t" "$found" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=30 -print_final_stats=1 "${extra[@]}"; then
        failed+=("$t")
    fi
    log "merging what $t found into fuzz/corpus/$t (smallest set covering the same)"
    merged=$(mktemp -d)
    if cargo "${TOOLCHAIN[@]}" fuzz run -O "$t" "$merged" "corpus/$t" "$found" -- \
        -set_cover_merge=1 "${extra[@]}" >/dev/null 2>&1 && [ -n "$(ls -A "$merged")" ]; then
        rm -rf "corpus/$t"
        mv "$merged" "corpus/$t"
        chmod 755 "corpus/$t"
    else
        rm -rf "$merged"
    fi
    rm -rf "$found"
done

log "corpus: $(find corpus -type f | wc -l) files, $(du -sh corpus | cut -f1)"
if [ ${#failed[@]} -gt 0 ]; then
    log "targets that crashed: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
