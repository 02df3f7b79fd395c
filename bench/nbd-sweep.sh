#!/usr/bin/env bash
# Full backups from a qemu-nbd export against nbdcopy of the same export, over request
# sizes and queue depths: the measurements vmkeep's NBD defaults were chosen from.
#
#   bench/nbd-sweep.sh [SIZE_GIB]     (as root; default 4 GiB; REPS=5)
#
# A mixed qcow2 (bench/gen.py) is exported by `qemu-nbd -r --shared=4` (so multi-conn, 4
# connections, as vmkeep and nbdcopy both use); every combination of request size
# (VMKEEP_READ_SIZE) and reads in flight over all connections (VMKEEP_NBD_QUEUE) is timed
# against `nbdcopy` of the same export to `null:` (the read limit: it reads what vmkeep
# reads and writes nothing), in turns, with the page cache dropped before each command.
# The repository lives in a tmpfs (DEST, default /dev/shm): request size and depth act on
# the reading side, and the virtual disk's write speed, which drifts by ±30 % from run to
# run here, would bury them.
# Output: bench/out/nbd-sweep.md (and the samples in bench/out/nbd-sweep.tsv).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
size_gib=${1:-4}
reps=${REPS:-5}
sizes=${SIZES:-"1048576 4194304 16777216"}
queues=${QUEUES:-"4 8 16 32"}
out=$root/bench/out
w=$out/sweep
d=${DEST:-/dev/shm}/vmkeep-sweep.$$
tsv=$out/nbd-sweep.tsv
[ -w /proc/sys/vm/drop_caches ] || { echo "run as root (drops the page cache)" >&2; exit 2; }
for c in qemu-img qemu-nbd nbdcopy python3 bc; do
    command -v "$c" >/dev/null || { echo "missing $c (bench/run.sh installs it)" >&2; exit 2; }
done

cargo build --release --locked -q -p vmkeep-cli
vk=$root/target/release/vmkeep
export VMKEEP_CONFIG=/dev/null
rm -rf "$w" "$d"; mkdir -p "$w" "$d"; : >"$tsv"
qpid=
trap '[ -n "$qpid" ] && kill "$qpid" 2>/dev/null; rm -rf "$w" "$d"' EXIT

python3 bench/gen.py disk "$w/disk.raw" $((size_gib * 1024)) 1
qemu-img convert -f raw -O qcow2 "$w/disk.raw" "$w/disk.qcow2"
rm -f "$w/disk.raw"
sock=$w/q.sock
qemu-nbd -r -f qcow2 --shared=4 -t -k "$sock" "$w/disk.qcow2" & qpid=$!
for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.05; done
uri="nbd+unix:///?socket=$sock"

measure() { # KEY CMD...
    local key=$1; shift
    sync; echo 3 >/proc/sys/vm/drop_caches
    local t0=$EPOCHREALTIME
    "$@" >/dev/null
    printf '%s\t%s\n' "$key" "$(echo "$EPOCHREALTIME - $t0" | bc)" >>"$tsv"
}
for i in $(seq 1 "$reps"); do
    measure nbdcopy nbdcopy "$uri" null:
    for s in $sizes; do
        for q in $queues; do
            rm -rf "$d/R"; "$vk" --repo "$d/R" -q init
            measure "$s $q" env VMKEEP_READ_SIZE="$s" VMKEEP_NBD_QUEUE="$q" \
                "$vk" --repo "$d/R" -q backup vm --disk vda="$uri" --mode full
        done
    done
done

med() {
    awk -F'\t' -v k="$1" '$1 == k { print $2 }' "$tsv" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
nc=$(med nbdcopy)
{
    echo "## Full backup from qemu-nbd (${size_gib} GiB qcow2, 4 connections) into a tmpfs: request size × reads in flight"
    echo
    echo "Medians of $reps cold runs, seconds, and the ratio to nbdcopy to null: ($(printf '%.2f' "$nc") s) in the same run."
    echo
    printf '| request \\ in flight |'; for q in $queues; do printf ' %s |' "$q"; done; echo
    printf '|---|'; for _ in $queues; do printf -- '---|'; done; echo
    for s in $sizes; do
        printf '| %s KiB |' $((s / 1024))
        for q in $queues; do
            m=$(med "$s $q")
            printf ' %.2f (%.2f×) |' "$m" "$(echo "$m / $nc" | bc -l)"
        done
        echo
    done
} | tee "$out/nbd-sweep.md"
