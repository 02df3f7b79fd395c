#!/usr/bin/env bash
# Measure repository size and backup time per block size: a 1 GiB mixed image, a full
# backup, then ten rounds of 1 % scattered 4–64 KiB writes, each followed by a diff backup.
# Usage: bench/blocksize.sh [SIZE_MIB] [BLOCK_SIZES...]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1024}; shift || true
sizes=("${@:-4K 16K 64K 256K 1M}")
read -r -a sizes <<<"${sizes[*]}"
cargo build --release --locked -q -p vmkeep-cli
vk=$PWD/target/release/vmkeep
out=${BENCH_OUT:-bench/out}/blocksize
rm -rf "$out"; mkdir -p "$out"
printf '| block size | full backup s | mean diff backup s | repository after 10 rounds | reverse diffs | digest file |\n|---|---|---|---|---|---|\n'
for bs in "${sizes[@]}"; do
    d=$out/$bs; mkdir -p "$d"
    python3 bench/gen.py disk "$d/disk.raw" "$size" 7
    export VMKEEP_REPO=$d/repo VMKEEP_CONFIG=/dev/null
    "$vk" -q init
    sync; t0=$(date +%s.%N)
    "$vk" -q backup vm --disk vda="$d/disk.raw" --block-size "$bs"
    t1=$(date +%s.%N)
    full=$(echo "$t1 - $t0" | bc)
    total=0
    for round in $(seq 1 10); do
        python3 bench/gen.py scatter "$d/disk.raw" 1 "$round" 4 64 >/dev/null
        sync; t0=$(date +%s.%N)
        "$vk" -q backup vm --disk vda="$d/disk.raw" --mode diff
        t1=$(date +%s.%N)
        total=$(echo "$total + $t1 - $t0" | bc)
    done
    repo=$(du -sb --apparent-size "$d/repo" | cut -f1)
    repo_alloc=$(du -sB1 "$d/repo" | cut -f1)
    rdiffs=$(find "$d/repo" -name '*.rdiff' -printf '%s\n' | awk '{s+=$1} END {print s}')
    digest=$(find "$d/repo" -name '*.digest' -printf '%s\n' | awk '{s+=$1} END {print s}')
    printf '| %s | %.2f | %.2f | %s MiB | %s MiB | %s KiB |\n' "$bs" "$full" "$(echo "$total / 10" | bc -l)" \
        "$((repo_alloc >> 20))" "$((rdiffs >> 20))" "$((digest >> 10))"
    rm -rf "$d"
done
