#!/usr/bin/env bash
# vmkeep sync to a local S3 server (Garage) against rclone uploading the same bytes.
#
#   bench/offsite.sh [SIZE_GIB]     (as root; default 4 GiB; REPS=3 repetitions, JOBS=4)
#
# Installs what it lacks (rclone, bc, time), builds vmkeep and the seal_cpu example in
# release mode, makes the benchmark disk with bench/gen.py (1 MiB extents: 40 % random,
# 30 % text, 30 % holes; seed 1), backs it up (full) into a fresh repository, makes an
# offsite key, and starts a private Garage (scripts/lib.sh ensure_garage: the binary the
# tests use) on free loopback ports with its own folders, one key and one bucket; it is
# killed and its folders removed on exit. Then, with the page cache dropped before every
# timed command and REPS repetitions in an order that rotates:
#   a) vmkeep sync VM --to s3://BUCKET/vmkeep-N of the first generation, a fresh prefix
#      each time;
#   b) vmkeep sync of the same generation to a folder (file:///…/packs-N, fresh each time),
#      and rclone copy of one such folder (the same packs, index objects, manifest) into
#      a fresh prefix of the bucket: rclone's S3 backend set through RCLONE_CONFIG_G_*
#      (provider Other, path-style), --transfers JOBS, the same number of uploads at once
#      as vmkeep's --jobs JOBS (4, vmkeep's default);
#   c) one round of 1 % scattered 4-256 KiB writes (gen.py scatter, as bench/run.sh's
#      rounds), an incr backup from its changed-block list, then vmkeep sync of that one
#      new generation to each prefix of (a) (each holds the first generation);
#   d) CPU: user + system seconds of every timed command (/usr/bin/time), and the
#      seal_cpu example (crates/vmkeep/examples/seal_cpu.rs): the project's own sealing
#      code on 1 GiB of blocks, one thread, CPU seconds per GiB (getrusage).
# The newest generation is restored from one S3 prefix and compared with the disk, and
# rclone's copies pass `vmkeep check --from`. Samples (seconds, peak RSS, user and system
# CPU, whether a rustc of another build ran) go to bench/out/offsite.tsv, the tables to
# bench/out/offsite-results.md, the work to bench/out/offsite/ (its large files are
# removed at the end unless KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
size_gib=${1:-4}
reps=${REPS:-3}
jobs=${JOBS:-4}
out=$root/bench/out
w=$out/offsite
tsv=$out/offsite.tsv
logf=$out/offsite.log
[ -w /proc/sys/vm/drop_caches ] || { echo "run as root (installs packages, drops the page cache)" >&2; exit 2; }

missing=()
for c in rclone:rclone bc:bc python3:python3; do
    command -v "${c%%:*}" >/dev/null 2>&1 || missing+=("${c#*:}")
done
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
. "$root/scripts/lib.sh"
ensure_cargo
ensure_garage
garage_bin=$GARAGE_BIN

echo "building vmkeep and the seal_cpu example (release)"
cargo build --release --locked -q -p vmkeep-cli
cargo build --release --locked -q -p vmkeep --example seal_cpu
vk=$root/target/release/vmkeep
seal_cpu=$root/target/release/examples/seal_cpu
export VMKEEP_CONFIG=/dev/null

rm -rf "$w"; mkdir -p "$w"
: >"$tsv"; : >"$logf"
# The disk (70 % allocated), the repository, two pack folders, Garage's copies (REPS of
# vmkeep, REPS of rclone, about 0.4 × SIZE each) and the restored disk: about
# (3 + REPS) × SIZE GiB, on the file systems of bench/out and /var/tmp (often the same).
need_kib=$(((3 + reps) * size_gib * 1048576))
for d in "$w" /var/tmp; do
    free_kib=$(df -Pk "$d" | awk 'NR == 2 { print $4 }')
    [ "$free_kib" -ge "$need_kib" ] ||
        { echo "$d: $((free_kib >> 20)) GiB free, the run needs about $((need_kib >> 20)) GiB" >&2; exit 2; }
done
t_start=$EPOCHREALTIME
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- Garage
gdir=$(mktemp -d /var/tmp/vmkeep-bench-garage.XXXXXX)
g_pid=
cleanup() {
    if [ -n "$g_pid" ]; then kill "$g_pid" 2>/dev/null || true; wait "$g_pid" 2>/dev/null || true; fi
    rm -rf "$gdir"
}
trap cleanup EXIT
g() { RUST_LOG=warn "$garage_bin" -c "$gdir/garage.toml" "$@"; }
free_ports() { python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))'; }
read -r s3_port rpc_port admin_port < <(free_ports)
# compression_level = "none": the packs are sealed (random to any compressor), and
# Garage's own zstd attempt would burn the two shared cores for vmkeep and rclone alike.
cat >"$gdir/garage.toml" <<EOF
metadata_dir = "$gdir/meta"
data_dir = "$gdir/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
admin_token = "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
EOF
echo "starting Garage ($("$garage_bin" --version | head -1)) on 127.0.0.1:$s3_port"
RUST_LOG=warn "$garage_bin" -c "$gdir/garage.toml" server >"$gdir/server.log" 2>&1 & g_pid=$!
for i in $(seq 1 300); do
    g status >/dev/null 2>&1 && break
    kill -0 "$g_pid" 2>/dev/null || { echo "Garage exited:" >&2; tail -20 "$gdir/server.log" >&2; exit 1; }
    [ "$i" = 300 ] && { echo "Garage did not answer within 60 s" >&2; exit 1; }
    sleep 0.2
done
node=$(g node id -q | cut -d@ -f1)
g layout assign -z dc1 -c 100G "$node" >>"$logf"
g layout apply --version 1 >>"$logf"
keyout=$(g key create vmkeep-bench)
bucket=vmkeep-bench
g bucket create "$bucket" >>"$logf"
g bucket allow --read --write --owner "$bucket" --key vmkeep-bench >>"$logf"
field() { awk -v f="$1" 'index($0, f) { sub(".*" f "[ \t]*", ""); print; exit }' <<<"$keyout"; }
export AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port AWS_REGION=garage
AWS_ACCESS_KEY_ID=$(field "Key ID:"); AWS_SECRET_ACCESS_KEY=$(field "Secret key:")
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
[ -n "$AWS_ACCESS_KEY_ID" ] && [ -n "$AWS_SECRET_ACCESS_KEY" ] || { echo "no key in: $keyout" >&2; exit 1; }
export RCLONE_CONFIG_G_TYPE=s3 RCLONE_CONFIG_G_PROVIDER=Other RCLONE_CONFIG_G_ENV_AUTH=false \
    RCLONE_CONFIG_G_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID RCLONE_CONFIG_G_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY \
    RCLONE_CONFIG_G_ENDPOINT=$AWS_ENDPOINT_URL RCLONE_CONFIG_G_REGION=garage RCLONE_CONFIG_G_FORCE_PATH_STYLE=true
export RCLONE_CONFIG=/dev/null
# rclone's AWS library reads AWS_CA_BUNDLE (a proxy's CA, say) and fails on it for a plain
# http endpoint; the endpoint here is http on loopback.
rcl=(env -u AWS_CA_BUNDLE rclone)

# ---------------------------------------------------------------- measuring
# measure KEY CMD...: drop caches, time CMD (wall clock), its peak RSS and CPU; one sample.
# Its stdout is kept in $w/out.tmp (and the log). The last column is 1 when a rustc
# (another build on this shared machine) ran at the start or the end of the sample.
others() { pgrep -x rustc >/dev/null && echo 1 || echo 0; }
measure() {
    local key=$1; shift
    sync; echo 3 >/proc/sys/vm/drop_caches
    local b0; b0=$(others)
    local t0=$EPOCHREALTIME
    if ! /usr/bin/time -f "%M %U %S" -o "$w/time.tmp" "$@" >"$w/out.tmp" 2>>"$logf"; then
        echo "FAILED ($key): $*" >&2; tail -20 "$logf" >&2; exit 1
    fi
    local t1=$EPOCHREALTIME
    local b1; b1=$(others)
    cat "$w/out.tmp" >>"$logf"
    local rss user sys; read -r rss user sys < <(tail -1 "$w/time.tmp")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$key" "$(echo "$t1 - $t0" | bc)" "$rss" "$user" "$sys" \
        "$((b0 | b1))" >>"$tsv"
}
# rotate I FN...: run the functions in an order that rotates with I.
rotate() {
    local i=$1; shift
    local n=$#; local fns=("$@")
    for k in $(seq 0 $((n - 1))); do "${fns[$(((i + k) % n))]}"; done
}
col() { awk -F'\t' -v k="$1" -v c="$2" '$1 == k { print $c }' "$tsv"; }
median() {
    sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
med() { col "$1" 2 | median; }                  # median seconds of KEY
cpu() { paste <(col "$1" 4) <(col "$1" 5) | awk '{ print $1 + $2 }' | median; } # median user+sys s
rss() { col "$1" 3 | awk '$1 > m { m = $1 } END { printf "%.0f", m / 1024 }'; } # peak RSS MiB
busy() { awk -F'\t' '$6 == 1' "$tsv" | wc -l; }
mib() { echo "scale=1; $1 / 1048576" | bc; }
jfield() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
folder_bytes() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }'; }

# ---------------------------------------------------------------- the repository
echo "making a ${size_gib} GiB disk, its full backup and an offsite key"
python3 bench/gen.py disk "$w/disk.raw" $((size_gib * 1024)) 1
disk_alloc=$(du -sB1 "$w/disk.raw" | cut -f1)
repo=$w/repo
"$vk" --repo "$repo" -q init
"$vk" --repo "$repo" -q backup vm --disk vda="$w/disk.raw" --mode full
"$vk" -q key create "$w/offsite.key" >>"$logf"
key=$w/offsite.key

# ---------------------------------------------------------------- first generation
echo "$reps rounds: sync to S3, sync to a folder, rclone copy of a folder to S3 (jobs $jobs)"
s3_sync() { measure sync_s3 "$vk" --repo "$repo" --json sync vm --to "s3://$bucket/vmkeep-$i" --key "$key" --jobs "$jobs"
            cp "$w/out.tmp" "$w/sync_s3.$i.json"; }
dir_sync() { rm -rf "$w/packs-$i"
             measure sync_dir "$vk" --repo "$repo" --json sync vm --to "file://$w/packs-$i" --key "$key" --jobs "$jobs"
             cp "$w/out.tmp" "$w/sync_dir.$i.json"; }
rc_copy() { # the folder of the previous round (or this one's, in round 1's first turn)
            local src=$w/packs-$i; [ -d "$src" ] || src=$w/packs-$((i - 1))
            [ -d "$src" ] || { dir_sync_quiet; src=$w/packs-$i; }
            echo "rclone copy $src" >>"$logf"
            measure rclone "${rcl[@]}" copy --transfers "$jobs" --checkers "$jobs" --s3-no-check-bucket \
                "$src" "g:$bucket/rclone-$i"; }
dir_sync_quiet() { "$vk" --repo "$repo" -q sync vm --to "file://$w/packs-$i" --key "$key" --jobs "$jobs"; }
for i in $(seq 1 "$reps"); do
    rotate "$i" s3_sync dir_sync rc_copy
    if [ "$i" -gt 1 ]; then rm -rf "$w/packs-$((i - 1))"; fi
done
packs_folder=$w/packs-$reps
folder_size=$(folder_bytes "$packs_folder")
folder_objects=$(find "$packs_folder" -type f | wc -l)
j1=$w/sync_s3.1.json
bytes_total=$(jfield "$j1" bytes_total); bytes_new=$(jfield "$j1" bytes_new)
bytes_up=$(jfield "$j1" bytes_uploaded); objs=$(jfield "$j1" objects_written)
rclone_objs=$("${rcl[@]}" lsf -R --files-only "g:$bucket/rclone-1" | wc -l)
rclone_bytes=$("${rcl[@]}" size --json "g:$bucket/rclone-1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["bytes"])')

# ---------------------------------------------------------------- 1 % incremental
echo "one round of 1 % scattered writes, an incr backup, its sync to each prefix"
changed=$(python3 bench/gen.py scatter "$w/disk.raw" 1 101 4 256 "$w/changed.1")
measure incr_backup "$vk" --repo "$repo" -q backup vm --disk vda="$w/disk.raw" \
    --changed-blocks vda="$w/changed.1" --mode incr
incr_s3() { measure sync_s3_incr "$vk" --repo "$repo" --json sync vm --to "s3://$bucket/vmkeep-$i" --key "$key" --jobs "$jobs"
            cp "$w/out.tmp" "$w/sync_s3_incr.$i.json"; }
incr_dir() { measure sync_dir_incr "$vk" --repo "$repo" --json sync vm --to "file://$packs_folder" --key "$key" --jobs "$jobs"; }
for i in $(seq 1 "$reps"); do incr_s3; done
incr_dir
ji=$w/sync_s3_incr.1.json
incr_new=$(jfield "$ji" bytes_new); incr_up=$(jfield "$ji" bytes_uploaded); incr_objs=$(jfield "$ji" objects_written)
[ "$(jfield "$ji" generations_synced)" = 1 ] || { echo "the incremental sync copied $(jfield "$ji" generations_synced) generations" >&2; exit 1; }

echo "proving the copies: restore the newest generation from S3, check rclone's copies"
"$vk" -q restore vm -g 0 --disk vda --from "s3://$bucket/vmkeep-1" --key "$key" --to "$w/restored.raw"
cmp "$w/restored.raw" "$w/disk.raw" || { echo "the newest generation restored from S3 differs from the disk" >&2; exit 1; }
rm -f "$w/restored.raw"
for i in $(seq 1 "$reps"); do
    "$vk" -q check --from "s3://$bucket/rclone-$i" --key "$key" >>"$logf" 2>&1 ||
        { echo "rclone's copy rclone-$i fails vmkeep check --from" >&2; exit 1; }
done

# ---------------------------------------------------------------- sealing CPU
echo "sealing CPU (seal_cpu example, 1 GiB per phase, one thread)"
"$seal_cpu" 1 >"$w/seal_cpu.tsv" 2>>"$logf"
seal() { awk -F'\t' -v p="$1" -v c="$2" '$1 == p { print $c }' "$w/seal_cpu.tsv"; }

# ---------------------------------------------------------------- report
f() { printf '%.2f' "$1"; }
x() { printf '%.2f×' "$(echo "$1 / $2" | bc -l)"; }
pct() { printf '%.1f %%' "$(echo "100 * $1 / $2" | bc -l)"; }
verdict() { if [ "$(echo "$1" | bc -l)" = 1 ]; then echo met; else echo "**not met**"; fi; }
per_gib() { printf '%.2f' "$(echo "$1 / ($2 / 1073741824)" | bc -l)"; }
s3=$(med sync_s3); sd=$(med sync_dir); rc=$(med rclone); si=$(med sync_s3_incr)
elapsed=$(echo "$EPOCHREALTIME - $t_start" | bc)
n=$(wc -l <"$tsv")
row() { # LABEL KEY BASELINE-LABEL BASELINE-SECONDS RATIO-FORM TARGET
    echo "| $1 | $(f "$(med "$2")") | $(f "$(cpu "$2")") | $(rss "$2") | $3 | $4 | $5 |"
}
{
echo "### Run of $(date -u +%Y-%m-%dT%H:%MZ): ${size_gib} GiB disk, $(mib "$disk_alloc") MiB allocated, to a local Garage"
echo
echo "$(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -r); cold: page cache dropped before every timed command."
echo "Load average at the start $load_start, at the end $(cut -d' ' -f1-3 /proc/loadavg); a rustc of another build was running in $(busy) of the $n samples."
echo "$("$garage_bin" --version | head -1 | cut -d' ' -f1-2) on 127.0.0.1 (sqlite metadata, data on the same disk, compression off); $(rclone version | head -1)."
echo "Uploads at once: vmkeep --jobs $jobs (its default is 4), rclone --transfers $jobs --checkers $jobs. Medians of $reps runs in a rotating order. Whole run: $(printf '%.0f' "$elapsed") s."
echo
echo "The first generation: $(mib "$bytes_total") MiB of non-zero blocks, $(mib "$bytes_new") MiB new, uploaded as $(mib "$bytes_up") MiB in $objs objects (vmkeep); the folder rclone copies holds $(mib "$folder_size") MiB in $folder_objects files, rclone uploaded $(mib "$rclone_bytes") MiB in $rclone_objs objects."
echo "The 1 % round wrote $(mib "$changed") MiB; its sync uploaded $(mib "$incr_new") MiB of new blocks as $(mib "$incr_up") MiB in $incr_objs objects."
echo
echo "| operation | s | CPU s (user+sys) | peak RSS MiB | against | ratio | target |"
echo "|---|---|---|---|---|---|---|"
row "vmkeep sync, first generation, to S3" sync_s3 "rclone copy of the same packs, $(f "$rc") s" "$(x "$s3" "$rc")" "≤ 1.5×: $(verdict "$s3 <= 1.5 * $rc")"
row "rclone copy of the packs folder to S3" rclone "" "" ""
row "vmkeep sync, first generation, to a folder" sync_dir "rclone copy, $(f "$rc") s" "$(x "$sd" "$rc")" ""
row "vmkeep incr backup of the 1 % round (local)" incr_backup "" "" ""
row "vmkeep sync of the 1 % incremental to S3" sync_s3_incr "the first generation's sync, $(f "$s3") s" "$(pct "$si" "$s3")" "≤ 10 %: $(verdict "$si <= 0.1 * $s3")"
row "vmkeep sync of the 1 % incremental to a folder" sync_dir_incr "" "" ""
echo
echo "CPU (user+sys, all threads) per GiB uploaded ($(mib "$bytes_up") MiB, the same bytes for both): vmkeep sync to S3 $(per_gib "$(cpu sync_s3)" "$bytes_up") s (reading, verifying, compressing, sealing, uploading), to a folder $(per_gib "$(cpu sync_dir)" "$bytes_up") s; rclone copy $(per_gib "$(cpu rclone)" "$bytes_up") s (reading and uploading)."
echo
echo "Sealing alone (crates/vmkeep/examples/seal_cpu.rs: 64 KiB blocks, one thread, getrusage):"
echo
echo "| phase | CPU s per GiB | GiB/s of one core | output / input |"
echo "|---|---|---|---|"
while IFS=$'\t' read -r p _g c _wall per ratio; do
    [ "$p" = phase ] && continue
    echo "| $p | $(f "$per") | $(printf '%.2f' "$(echo "1 / $per" | bc -l)") | $(printf '%.3f' "$ratio") |"
done <"$w/seal_cpu.tsv"
} | tee "$out/offsite-results.md"

if [ "${KEEP:-0}" != 1 ]; then
    rm -rf "$w/disk.raw" "$repo" "$w"/packs-*
fi
