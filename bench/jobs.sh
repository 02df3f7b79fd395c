#!/usr/bin/env bash
# backup --all with --jobs 1, 2 and 3 over several disk images: wall clock and peak RSS.
#
#   bench/jobs.sh [SIZE_MIB]     (as root; default 512 MiB per disk; VMS=6 disks, REPS=3)
#
# Makes VMS deterministic disks with bench/gen.py (each its own seed; 1 MiB extents: 40 %
# random, 30 % text, 30 % holes) and a qcow2 copy of each, one image VM per disk in a
# config file ([vm.dN] disks), and times a full `backup --all` into a fresh repository
# with each --jobs value, raw files and qcow2 images (read through qemu-nbd), in an order
# that rotates each repetition, with the page cache dropped before every timed command.
# Peak RSS from /usr/bin/time -f %M. The newest generation of every VM is compared with
# its disk once per kind. Everything goes to bench/out/jobs/ (git-ignored); the table is
# printed at the end and kept in bench/out/jobs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD out=$PWD/bench/out/jobs
size=${1:-512} vms=${VMS:-6} reps=${REPS:-3}
w=$out/work tsv=$out/samples.tsv log=$out/run.log
[ -x /usr/bin/time ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >/dev/null

echo "building vmkeep (release)"
cargo build --release --locked -q -p vmkeep-cli
vk=$root/target/release/vmkeep

rm -rf "$out"; mkdir -p "$w"
: >"$tsv"; : >"$log"
. "$root/bench/cache.sh"

echo "making $vms disks of $size MiB"
for n in $(seq 1 "$vms"); do
    python3 bench/gen.py disk "$w/d$n.raw" "$size" "$n"
    qemu-img convert -f raw -O qcow2 "$w/d$n.raw" "$w/d$n.qcow2"
done
for kind in raw qcow2; do
    : >"$w/$kind.toml"
    for n in $(seq 1 "$vms"); do
        printf '[vm.d%s]\ndisks = { vda = "%s" }\n' "$n" "$w/d$n.$kind" >>"$w/$kind.toml"
    done
done
alloc=$(du -scB1 "$w"/d*.raw | tail -1 | cut -f1)

# one KIND JOBS: a full backup --all of every VM into a fresh repository; one sample.
one() {
    local kind=$1 jobs=$2 repo=$w/repo-$1-$2
    rm -rf "$repo"; VMKEEP_CONFIG=$w/$kind.toml "$vk" --repo "$repo" -q init
    drop
    local t0=$EPOCHREALTIME
    if ! VMKEEP_CONFIG=$w/$kind.toml /usr/bin/time -f %M -o "$w/rss.tmp" \
        "$vk" --repo "$repo" -q backup --all --mode full --jobs "$jobs" >>"$log" 2>&1; then
        echo "FAILED: $kind --jobs $jobs" >&2; tail -20 "$log" >&2; exit 1
    fi
    local t1=$EPOCHREALTIME
    printf '%s\t%s\t%s\t%s\n' "$kind" "$jobs" "$(echo "$t1 - $t0" | bc)" "$(tail -1 "$w/rss.tmp")" >>"$tsv"
}

for i in $(seq 1 "$reps"); do
    echo "repetition $i of $reps"
    order=(1 2 3)
    for k in 0 1 2; do
        j=${order[$(((i + k) % 3))]}
        one raw "$j"; one qcow2 "$j"
    done
done

echo "checking the newest generations"
for kind in raw qcow2; do
    for n in $(seq 1 "$vms"); do
        cmp -s "$w/repo-$kind-3/d$n/latest/vda.raw" "$w/d$n.raw" ||
            { echo "MISMATCH: $kind d$n" >&2; exit 1; }
    done
done

med() { # median seconds of KIND JOBS
    awk -F'\t' -v k="$1" -v j="$2" '$1 == k && $2 == j { print $3 }' "$tsv" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
rss() { # highest peak RSS (MiB) of KIND JOBS
    awk -F'\t' -v k="$1" -v j="$2" '$1 == k && $2 == j && $4 > m { m = $4 } END { printf "%.0f", m / 1024 }' "$tsv"
}
{
    echo "### backup --all --jobs N: $vms disks of $size MiB ($((alloc >> 20)) MiB allocated in all), $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "$(nproc) cores, $(free -g | awk '/Mem:/ { print $2 }') GiB; $cache; median of $reps."
    echo
    echo "| source | --jobs | wall s | vs --jobs 1 | MiB/s | peak RSS MiB |"
    echo "|---|---|---|---|---|---|"
    for kind in raw qcow2; do
        base=$(med "$kind" 1)
        for j in 1 2 3; do
            m=$(med "$kind" "$j")
            printf '| %s | %s | %.2f | %.2f× | %.0f | %s |\n' "$kind" "$j" "$m" \
                "$(echo "$base / $m" | bc -l)" "$(echo "$alloc / 1048576 / $m" | bc -l)" "$(rss "$kind" "$j")"
        done
    done
} | tee "$out/results.md"
rm -rf "$w"
