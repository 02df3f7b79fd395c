#!/usr/bin/env bash
# vmkeep against the copy limit and against the tools users would pick instead.
#
#   bench/run.sh [SIZE_GIB]        (as root; default 2 GiB; REPS=5 repetitions)
#
# Builds vmkeep (release), makes deterministic disks with bench/gen.py (1 MiB extents:
# 40 % random, 30 % text, 30 % holes), and measures, each repetition in a rotating order
# and with the page cache dropped before every timed command:
#   full backups (raw file; qcow2 through qemu-nbd) against cp, dd, nbdcopy, qemu-img;
#   ten rounds of 1 % scattered 4-256 KiB writes, each backed up as incr (changed-block
#   list), incr (qcow2 persistent bitmap) and diff; restores, deep checks, serve, a 1 TiB
#   sparse disk, and restic. Medians and ratios come from this one run.
# Everything goes to bench/out/ (git-ignored); the tables are printed at the end and kept
# in bench/out/results.md, every sample in bench/out/samples.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
size_gib=${1:-2}
reps=${REPS:-5}
rounds=${ROUNDS:-10}
out=$root/bench/out
w=$out/work
tsv=$out/samples.tsv
log=$out/run.log

need() { # command package
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
missing=()
need b3sum b3sum; need restic restic; need hyperfine hyperfine; need bc bc; need zstd zstd
need qemu-img qemu-utils; need qemu-nbd qemu-utils; need qemu-io qemu-utils
need nbdcopy libnbd-bin; need python3 python3; need cargo cargo
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

echo "building vmkeep (release)"
cargo build --release --locked -q -p vmkeep-cli
vk=$root/target/release/vmkeep
# The same program without the libvirt feature: what start-up costs without libvirt's
# 56 shared libraries.
cargo build --release --locked -q -p vmkeep-cli --no-default-features --target-dir "$root/target/bench-nolibvirt"
vk_nolv=$root/target/bench-nolibvirt/release/vmkeep
export VMKEEP_CONFIG=/dev/null RESTIC_PASSWORD=bench

started=()      # pids of servers this script started
cleanup() {
    for p in "${started[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

rm -rf "$w"; mkdir -p "$w"
: >"$tsv"; : >"$log"
t_start=$EPOCHREALTIME

. "$root/bench/cache.sh"

# measure KEY CMD...: drop caches, time CMD (wall clock) and its peak RSS; one sample.
measure() {
    local key=$1; shift
    drop
    local t0=$EPOCHREALTIME
    if ! /usr/bin/time -f "%M" -o "$w/rss.tmp" "$@" >>"$log" 2>&1; then
        echo "FAILED ($key): $*" >&2; tail -20 "$log" >&2; exit 1
    fi
    local t1=$EPOCHREALTIME
    local rss; rss=$(tail -1 "$w/rss.tmp")
    printf '%s\t%s\t%s\n' "$key" "$(echo "$t1 - $t0" | bc)" "$rss" >>"$tsv"
}
# rotate I CMD...: run the commands in an order that rotates with I (a name each).
rotate() {
    local i=$1; shift
    local n=$#; local fns=("$@")
    for k in $(seq 0 $((n - 1))); do "${fns[$(((i + k) % n))]}"; done
}
med() { # median seconds of KEY
    awk -F'\t' -v k="$1" '$1 == k { print $2 }' "$tsv" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
rss() { # highest peak RSS (MiB) over the samples of KEY
    awk -F'\t' -v k="$1" '$1 == k && $3 > m { m = $3 } END { printf "%.0f", m / 1024 }' "$tsv"
}
count() { awk -F'\t' -v k="$1" '$1 == k' "$tsv" | wc -l; }
ratio() { echo "scale=3; $1 / $2" | bc; }
alloc() { du -sB1 "$@" | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
mib() { echo "scale=1; $1 / 1048576" | bc; }
wait_socket() { for _ in $(seq 1 300); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

echo "making a ${size_gib} GiB disk"
python3 bench/gen.py disk "$w/disk.raw" $((size_gib * 1024)) 1
qemu-img convert -f raw -O qcow2 "$w/disk.raw" "$w/disk.qcow2"
disk_alloc=$(alloc "$w/disk.raw")

# ---------------------------------------------------------------- full backup, raw file
echo "full backup of a raw file: vmkeep, cp --sparse=always + sync, dd conv=fsync"
full_vk() { rm -rf "$w/R1"; "$vk" --repo "$w/R1" -q init
            measure full_raw "$vk" --repo "$w/R1" -q backup vm --disk vda="$w/disk.raw" --mode full; }
full_cp() { rm -f "$w/copy.raw"
            measure cp sh -c "cp --sparse=always '$w/disk.raw' '$w/copy.raw' && sync '$w/copy.raw'"; }
full_dd() { rm -f "$w/copy.raw"
            measure dd dd if="$w/disk.raw" of="$w/copy.raw" bs=4M conv=fsync status=none; }
for i in $(seq 1 "$reps"); do rotate "$i" full_vk full_cp full_dd; done
rm -f "$w/copy.raw"

# ---------------------------------------------------------------- full backup over NBD
echo "full backup from qemu-nbd (qcow2): vmkeep, nbdcopy, qemu-img convert"
qsock=$w/qemu.sock
qemu-nbd -r -f qcow2 --shared=4 -t -k "$qsock" "$w/disk.qcow2" & started+=($!); qpid=$!
wait_socket "$qsock"
quri="nbd+unix:///?socket=$qsock"
nbd_vk() { rm -rf "$w/RN"; "$vk" --repo "$w/RN" -q init
           measure full_nbd "$vk" --repo "$w/RN" -q backup vm --disk vda="$quri" --mode full; }
nbd_copy() { rm -f "$w/copy.raw"
             measure nbdcopy sh -c "nbdcopy '$quri' '$w/copy.raw' && sync '$w/copy.raw'"; }
nbd_qimg() { rm -f "$w/copy.raw"
             measure qemu_img sh -c "qemu-img convert -f raw -O raw '$quri' '$w/copy.raw' && sync '$w/copy.raw'"; }
for i in $(seq 1 "$reps"); do rotate "$i" nbd_vk nbd_copy nbd_qimg; done
kill "$qpid"; wait "$qpid" 2>/dev/null || true
rm -rf "$w/RN" "$w/copy.raw"

# ---------------------------------------------------------------- generations
echo "full backups that start the chains: qcow2 with a bitmap; a diff chain; restic"
"$vk" --repo "$w/R2" -q init
measure full_bitmap "$vk" --repo "$w/R2" -q backup vm --disk vda="$w/disk.qcow2?bitmap=vmkeep" --mode full
cp -a --sparse=always "$w/R1" "$w/R3"
restic -q init --repo "$w/restic" >>"$log" 2>&1
measure restic_1 restic -q --repo "$w/restic" backup "$w/disk.raw"

echo "$rounds rounds of 1 % scattered 4-256 KiB writes; incr (list), incr (bitmap), diff"
: >"$w/changed_bytes"
round_cbt() { measure incr_list "$vk" --repo "$w/R1" -q backup vm --disk vda="$w/disk.raw" \
                  --changed-blocks vda="$w/changed.$r" --mode incr; }
round_bitmap() { measure incr_bitmap "$vk" --repo "$w/R2" -q backup vm \
                     --disk vda="$w/disk.qcow2?bitmap=vmkeep" --mode incr; }
round_diff() { measure diff "$vk" --repo "$w/R3" -q backup vm --disk vda="$w/disk.raw" --mode diff; }
for r in $(seq 1 "$rounds"); do
    python3 bench/gen.py scatter "$w/disk.raw" 1 $((100 + r)) 4 256 "$w/changed.$r" "$w/dump.$r" >>"$w/changed_bytes"
    qio=(); while read -r c; do qio+=(-c "$c"); done <"$w/dump.$r/qemu-io.cmds"
    qemu-io -f qcow2 "${qio[@]}" "$w/disk.qcow2" >>"$log" 2>&1 || { echo "qemu-io failed" >&2; exit 1; }
    rotate "$r" round_cbt round_bitmap round_diff
    if [ "$r" = 1 ]; then
        measure restic_2 restic -q --repo "$w/restic" backup "$w/disk.raw"
        repo1_after1=$(alloc "$w/R1")
    fi
done
changed=$(awk '{ s += $1 } END { printf "%.0f\n", s }' "$w/changed_bytes")
changed_z=$(cat "$w"/dump.*/*.bin | zstd -3 -q -c | wc -c)
repo1=$(alloc "$w/R1")
repo3=$(alloc "$w/R3")
restic_size=$(alloc "$w/restic")
data_final=$(alloc "$w/disk.raw")
rdiffs=$(find "$w/R1" -name '*.rdiff' -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }')
rm -rf "$w"/dump.*

echo "fixed costs: start-up alone, and an incr with an empty changed-block list"
: >"$w/changed.none"
fixed_start() { measure startup "$vk" --version; }
fixed_nolv() { measure startup_nolv "$vk_nolv" --version; }
fixed_incr() { measure incr_empty "$vk" --repo "$w/R3" -q backup vm --disk vda="$w/disk.raw" \
                   --changed-blocks vda="$w/changed.none" --mode incr; }
for i in $(seq 1 "$reps"); do rotate "$i" fixed_start fixed_nolv fixed_incr; done

# ---------------------------------------------------------------- restore
echo "restore: newest, five back, against cp --sparse=always + sync of the newest image"
newest=$w/R1/vm/latest/vda.raw
rest_0() { rm -f "$w/r0.raw"; measure restore_0 "$vk" --repo "$w/R1" -q restore vm -g 0 --to "$w/r0.raw"; }
rest_5() { rm -f "$w/r5.raw"; measure restore_5 "$vk" --repo "$w/R1" -q restore vm -g 5 --to "$w/r5.raw"; }
rest_cp() { rm -f "$w/copy.raw"
            measure cp_restore sh -c "cp --sparse=always '$newest' '$w/copy.raw' && sync '$w/copy.raw'"; }
for i in $(seq 1 "$reps"); do rotate "$i" rest_0 rest_5 rest_cp; done
cmp "$w/r0.raw" "$w/disk.raw" || { echo "restore of the newest generation differs from the disk" >&2; exit 1; }
rm -f "$w/r0.raw" "$w/copy.raw"

# ---------------------------------------------------------------- check
echo "check --deep of every generation against b3sum of the same files"
repo_files=$(find "$w/R1/vm" -name '*.raw' -o -name '*.digest' -o -name '*.rdiff' | sort)
check_vk() { measure check "$vk" --repo "$w/R1" -q check vm --deep; }
check_b3() { measure b3sum sh -c "b3sum $(echo $repo_files) >/dev/null"; }
for i in $(seq 1 "$reps"); do rotate "$i" check_vk check_b3; done

# ---------------------------------------------------------------- serve
echo "serve five back, read with nbdcopy, against qemu-nbd serving the restored raw file"
vsock=$w/vmkeep.sock
/usr/bin/time -f "%M" -o "$w/serve.rss" "$vk" --repo "$w/R1" -q serve vm -g 5 --socket "$vsock" & started+=($!); vtime=$!
qemu-nbd -r -f raw --shared=4 -t -k "$qsock" "$w/r5.raw" & started+=($!); qpid=$!
wait_socket "$vsock"; wait_socket "$qsock"
serve_vk() { measure serve nbdcopy "nbd+unix:///vda?socket=$vsock" null:; }
serve_q() { measure serve_qemu nbdcopy "$quri" null:; }
for i in $(seq 1 "$reps"); do rotate "$i" serve_vk serve_q; done
kill "$qpid"; kill -TERM "$(pgrep -P "$vtime")"; wait "$vtime" 2>/dev/null || true
printf 'serve_process\t0\t%s\n' "$(tail -1 "$w/serve.rss")" >>"$tsv"
rm -f "$w/r5.raw"

# ---------------------------------------------------------------- 1 TiB sparse disk
echo "a 1 TiB sparse disk with 256 MiB of data: backup, restore to a sparse file, verify it, check"
python3 bench/gen.py sparse "$w/big.raw" 1024 256 3
"$vk" --repo "$w/RB" -q init
measure tib_backup "$vk" --repo "$w/RB" -q backup vm --disk vda="$w/big.raw"
python3 bench/gen.py scatter "$w/big.raw" 0.001 9 4 256 "$w/big.changed" >/dev/null
measure tib_incr "$vk" --repo "$w/RB" -q backup vm --disk vda="$w/big.raw" --changed-blocks vda="$w/big.changed" --mode incr
measure tib_restore "$vk" --repo "$w/RB" -q restore vm -g 1 --to "$w/big.out"
measure tib_verify "$vk" --repo "$w/RB" -q verify vm -g 1 --disk vda="$w/big.out"
measure tib_check "$vk" --repo "$w/RB" -q check vm --deep
rm -rf "$w/big.raw" "$w/big.out" "$w/RB"

# ---------------------------------------------------------------- report
f() { printf '%.2f' "$1"; }
pct() { printf '%.1f %%' "$(echo "100 * $1 / $2" | bc -l)"; }
x() { printf '%.2f×' "$(echo "$1 / $2" | bc -l)"; }
verdict() { if [ "$(echo "$1" | bc -l)" = 1 ]; then echo met; else echo "**not met**"; fi; }
full=$(med full_raw); cpm=$(med cp); ddm=$(med dd)
nbd=$(med full_nbd); ncp=$(med nbdcopy); qimg=$(med qemu_img)
il=$(med incr_list); ib=$(med incr_bitmap); df=$(med diff); fb=$(med full_bitmap)
r0=$(med restore_0); r5=$(med restore_5); rcp=$(med cp_restore)
ck=$(med check); b3=$(med b3sum)
sv=$(med serve); sq=$(med serve_qemu)
limit_repo=$(echo "$data_final + 1.5 * $changed_z" | bc)
gib=$((size_gib << 30))
elapsed=$(echo "$EPOCHREALTIME - $t_start" | bc)
{
echo "## Results ($(date -u +%Y-%m-%dT%H:%MZ), ${size_gib} GiB disk, $(mib "$disk_alloc") MiB allocated)"
echo
echo "$(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -r); $cache."
echo "Medians of $reps interleaved runs (the incrementals: of $rounds rounds); ratios from medians of this run. Whole run: $(printf '%.0f' "$elapsed") s."
echo
echo "| operation | vmkeep s | baseline | baseline s | ratio | target | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|"
echo "| full backup, raw file | $(f "$full") | cp --sparse=always + sync | $(f "$cpm") | $(x "$full" "$cpm") | ≤ 1.3× cp: $(verdict "$full <= 1.3 * $cpm") | $(rss full_raw) |"
echo "| | | dd bs=4M conv=fsync | $(f "$ddm") | $(x "$full" "$ddm") | | |"
echo "| full backup, qcow2 via qemu-nbd | $(f "$nbd") | nbdcopy + sync | $(f "$ncp") | $(x "$nbd" "$ncp") | ≤ 1.2× nbdcopy: $(verdict "$nbd <= 1.2 * $ncp") | $(rss full_nbd) |"
echo "| | | qemu-img convert + sync | $(f "$qimg") | $(x "$nbd" "$qimg") | | |"
echo "| incr 1 %, changed-block list | $(f "$il") | full backup, raw | $(f "$full") | $(pct "$il" "$full") | ≤ 5 %: $(verdict "$il <= 0.05 * $full") | $(rss incr_list) |"
echo "| incr 1 %, qcow2 bitmap (private qemu-nbd) | $(f "$ib") | full backup, same source | $(f "$fb") | $(pct "$ib" "$fb") | ≤ 5 %: $(verdict "$ib <= 0.05 * $fb") | $(rss incr_bitmap) |"
echo "| incr, empty changed-block list (fixed cost) | $(f "$(med incr_empty)") | full backup, raw | $(f "$full") | $(pct "$(med incr_empty)" "$full") | | $(rss incr_empty) |"
echo "| start-up alone (vmkeep --version) | $(f "$(med startup)") | full backup, raw | $(f "$full") | $(pct "$(med startup)" "$full") | | $(rss startup) |"
echo "| start-up alone, built without libvirt | $(f "$(med startup_nolv)") | full backup, raw | $(f "$full") | $(pct "$(med startup_nolv)" "$full") | | $(rss startup_nolv) |"
echo "| diff 1 % (reads everything) | $(f "$df") | full backup, raw | $(f "$full") | $(pct "$df" "$full") | | $(rss diff) |"
echo "| restore newest | $(f "$r0") | cp --sparse=always + sync | $(f "$rcp") | $(x "$r0" "$rcp") | ≤ 1.2×: $(verdict "$r0 <= 1.2 * $rcp") | $(rss restore_0) |"
echo "| restore five back (-g 5) | $(f "$r5") | cp --sparse=always + sync | $(f "$rcp") | $(x "$r5" "$rcp") | ≤ 1.5×: $(verdict "$r5 <= 1.5 * $rcp") | $(rss restore_5) |"
echo "| check --deep, $((rounds + 1)) generations | $(f "$ck") | b3sum of the same files | $(f "$b3") | $(x "$ck" "$b3") | | $(rss check) |"
echo "| serve -g 5, read by nbdcopy to null | $(f "$sv") | nbdcopy from qemu-nbd of the restored file | $(f "$sq") | $(pct "$sq" "$sv") of its speed | ≥ 80 %: $(verdict "$sq >= 0.8 * $sv") | $(rss serve_process) |"
echo "| restic backup, first | $(f "$(med restic_1)") | vmkeep full, raw | $(f "$full") | | | $(rss restic_1) |"
echo "| restic backup, after round 1 | $(f "$(med restic_2)") | vmkeep incr, list | $(f "$il") | | | $(rss restic_2) |"
echo
echo "| repository | MiB | |"
echo "|---|---|---|"
echo "| disk data (allocated) after $rounds rounds | $(mib "$data_final") | raw data |"
echo "| data written in $rounds rounds | $(mib "$changed") | zstd -3: $(mib "$changed_z") MiB |"
echo "| vmkeep, full + $rounds incr (list) | $(mib "$repo1") | reverse diffs $(mib "$rdiffs") MiB; limit raw + 1.5 × compressed changes = $(mib "$limit_repo") MiB: $(verdict "$repo1 <= $limit_repo") |"
echo "| vmkeep, full + $rounds diff | $(mib "$repo3") | |"
echo "| vmkeep after full + 1 incr | $(mib "$repo1_after1") | |"
echo "| restic after 2 backups (full, round 1) | $(mib "$restic_size") | |"
echo
echo "| 1 TiB sparse disk, 256 MiB data | s | peak RSS MiB | target ≤ 256 MiB |"
echo "|---|---|---|---|"
for k in tib_backup tib_incr tib_restore tib_verify tib_check; do
    echo "| ${k#tib_} | $(f "$(med $k)") | $(rss $k) | $(verdict "$(rss $k) <= 256") |"
done
} | tee "$out/results.md"
