#!/usr/bin/env bash
# What TLS costs a backup from an NBD export: the same qcow2 exported by qemu-nbd on a
# unix socket and on TCP 127.0.0.1 with TLS, backed up by vmkeep and copied by nbdcopy.
#
#   bench/tls.sh [SIZE_GIB]        (as root; default 4 GiB; REPS=3 ROUNDS=REPS)
#
# Makes one deterministic disk (bench/gen.py: 1 MiB extents, 40 % random, 30 % text, 30 %
# holes) and its qcow2 copy, x509 credentials with certtool (a CA, a server certificate
# for 127.0.0.1, a client certificate), and two read-only exports of the qcow2 (qemu-nbd
# --shared=4, so multi-conn as in bench/run.sh): (a) nbd+unix://, (b) nbds://127.0.0.1
# requiring a client certificate (tls-creds-x509, verify-peer=on). Then, with the page
# cache dropped before every timed command and the order unix/TLS alternating:
#   REPS full backups of each into fresh repositories, and nbdcopy of each (+ sync) as the
#   limit;
#   ROUNDS rounds of 1 % scattered 4-256 KiB writes (gen.py scatter on the raw file, the
#   same writes through qemu-io on the qcow2, both exports stopped meanwhile), each backed
#   up as an incr of both repositories from the round's changed-block list
#   (--changed-blocks; a qcow2 bitmap would need vmkeep's private qemu-nbd, not these
#   exports), which reads only the changed blocks.
# Finally both repositories' newest generations are restored and compared with the raw
# disk. Samples (seconds, peak RSS, user and system CPU, whether a rustc of another build
# ran) go to bench/out/tls.tsv, the table to bench/out/tls.md, the work to bench/out/tls/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
size_gib=${1:-4}
reps=${REPS:-3}
rounds=${ROUNDS:-$reps}
out=$root/bench/out
w=$out/tls
tsv=$out/tls.tsv
log=$out/tls.log
[ -w /proc/sys/vm/drop_caches ] || { echo "run as root (drops the page cache)" >&2; exit 2; }
for c in qemu-img qemu-nbd qemu-io nbdcopy nbdinfo certtool python3 bc; do
    command -v "$c" >/dev/null || { echo "missing $c (qemu-utils, libnbd-bin, gnutls-bin)" >&2; exit 2; }
done
[ -x /usr/bin/time ] || { echo "missing /usr/bin/time (package time)" >&2; exit 2; }

echo "building vmkeep (release)"
cargo build --release --locked -q -p vmkeep-cli
vk=$root/target/release/vmkeep
export VMKEEP_CONFIG=/dev/null

qu_pid=; qt_pid=
stop_servers() {
    for p in $qu_pid $qt_pid; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    qu_pid=; qt_pid=
}
trap stop_servers EXIT

rm -rf "$w"; mkdir -p "$w"
: >"$tsv"; : >"$log"
t_start=$EPOCHREALTIME
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# measure KEY CMD...: drop caches, time CMD (wall clock), its peak RSS and CPU; one sample.
# The last column is 1 when a rustc (another build on this shared machine) ran at the start
# or the end of the sample.
others() { pgrep -x rustc >/dev/null && echo 1 || echo 0; }
measure() {
    local key=$1; shift
    sync; echo 3 >/proc/sys/vm/drop_caches
    local b0; b0=$(others)
    local t0=$EPOCHREALTIME
    if ! /usr/bin/time -f "%M %U %S" -o "$w/time.tmp" "$@" >>"$log" 2>&1; then
        echo "FAILED ($key): $*" >&2; tail -20 "$log" >&2; exit 1
    fi
    local t1=$EPOCHREALTIME
    local b1; b1=$(others)
    local rss user sys; read -r rss user sys < <(tail -1 "$w/time.tmp")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$key" "$(echo "$t1 - $t0" | bc)" "$rss" "$user" "$sys" \
        "$((b0 | b1))" >>"$tsv"
}
# both I FN: FN unix, then FN tls for odd I; the other way round for even I.
both() { if [ $(($1 % 2)) = 1 ]; then "$2" unix; "$2" tls; else "$2" tls; "$2" unix; fi; }
col() { awk -F'\t' -v k="$1" -v c="$2" '$1 == k { print $c }' "$tsv"; }
median() {
    sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
med() { col "$1" 2 | median; }                  # median seconds of KEY
cpu() { paste <(col "$1" 4) <(col "$1" 5) | awk '{ print $1 + $2 }' | median; } # median user+sys s
rss() { col "$1" 3 | awk '$1 > m { m = $1 } END { printf "%.0f", m / 1024 }'; } # peak RSS MiB
busy() { awk -F'\t' '$6 == 1' "$tsv" | wc -l; }
mib() { echo "scale=1; $1 / 1048576" | bc; }

echo "making a ${size_gib} GiB disk and its qcow2"
python3 bench/gen.py disk "$w/disk.raw" $((size_gib * 1024)) 1
qemu-img convert -f raw -O qcow2 "$w/disk.raw" "$w/disk.qcow2"
disk_alloc=$(du -sB1 "$w/disk.raw" | cut -f1)

echo "credentials (certtool): a CA, a server certificate for 127.0.0.1, a client certificate"
pki=$w/pki
mkdir -p "$pki/server" "$pki/client"
ct() { (cd "$pki" && certtool "$@" >>"$log" 2>&1) || { echo "certtool $* failed" >&2; exit 1; }; }
printf 'cn = bench CA\nca\ncert_signing_key\nexpiration_days = 2\n' >"$pki/ca.info"
printf 'cn = server\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n' >"$pki/server.info"
printf 'cn = client\ntls_www_client\nsigning_key\nexpiration_days = 2\n' >"$pki/client.info"
ct --generate-privkey --outfile=ca-key.pem
ct --generate-self-signed --load-privkey=ca-key.pem --template=ca.info --outfile=ca-cert.pem
ct --generate-privkey --outfile=server/server-key.pem
ct --generate-certificate --load-privkey=server/server-key.pem --load-ca-certificate=ca-cert.pem \
    --load-ca-privkey=ca-key.pem --template=server.info --outfile=server/server-cert.pem
ct --generate-privkey --key-type=ecdsa --outfile=client/client-key.pem
ct --generate-certificate --load-privkey=client/client-key.pem --load-ca-certificate=ca-cert.pem \
    --load-ca-privkey=ca-key.pem --template=client.info --outfile=client/client-cert.pem
cp "$pki/ca-cert.pem" "$pki/server/"; cp "$pki/ca-cert.pem" "$pki/client/"
key_info=$(certtool --certificate-info --infile "$pki/server/server-cert.pem" |
    awk -F': ' '/Subject Public Key Algorithm/ { a = $2 } /Algorithm Security Level/ { l = $2 } END { print a ", " l }')

sock=$w/q.sock
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
uuri="nbd+unix:///?socket=$sock"
turi="nbds://127.0.0.1:$port/?tls-certificates=$pki/client"
declare -A uri=([unix]=$uuri [tls]=$turi)   # and the repositories: $w/R_unix, $w/R_tls
# Both exports of the qcow2, read-only, persistent; restarted around each round's writes
# (qemu-io needs the image's write lock), with the same socket and port, so the URIs (the
# sources' recorded identities) stay the same.
start_servers() {
    rm -f "$sock"
    qemu-nbd -r -f qcow2 --shared=4 -t -k "$sock" "$w/disk.qcow2" >>"$log" 2>&1 & qu_pid=$!
    qemu-nbd -r -f qcow2 --shared=4 -t -b 127.0.0.1 -p "$port" \
        --object "tls-creds-x509,id=tls0,dir=$pki/server,endpoint=server,verify-peer=on" \
        --tls-creds tls0 "$w/disk.qcow2" >>"$log" 2>&1 & qt_pid=$!
    for u in "$uuri" "$turi"; do
        for _ in $(seq 1 200); do nbdinfo --size "$u" >/dev/null 2>&1 && continue 2; sleep 0.05; done
        echo "export $u did not come up" >&2; tail -20 "$log" >&2; exit 1
    done
}
start_servers
size=$(nbdinfo --size "$turi")
[ "$size" = $((size_gib << 30)) ] || { echo "TLS export has $size bytes" >&2; exit 1; }

# ---------------------------------------------------------------- full backups
echo "$reps full backups of each export into fresh repositories; nbdcopy of each + sync"
full() { rm -rf "$w/R_$1"; "$vk" --repo "$w/R_$1" -q init
         measure "full_$1" "$vk" --repo "$w/R_$1" -q backup vm --disk vda="${uri[$1]}" --mode full; }
copy() { rm -f "$w/copy.raw"
         measure "nbdcopy_$1" sh -c "nbdcopy '${uri[$1]}' '$w/copy.raw' && sync '$w/copy.raw'"; }
for i in $(seq 1 "$reps"); do both "$i" full; both "$i" copy; done
rm -f "$w/copy.raw"

# ---------------------------------------------------------------- incrementals
echo "$rounds rounds of 1 % scattered 4-256 KiB writes, each an incr (changed-block list) of both"
: >"$w/changed_bytes"
incr() { measure "incr_$1" "$vk" --repo "$w/R_$1" -q backup vm --disk vda="${uri[$1]}" \
             --changed-blocks vda="$w/changed.$r" --mode incr; }
for r in $(seq 1 "$rounds"); do
    stop_servers
    python3 bench/gen.py scatter "$w/disk.raw" 1 $((100 + r)) 4 256 "$w/changed.$r" "$w/dump.$r" >>"$w/changed_bytes"
    qio=(); while read -r c; do qio+=(-c "$c"); done <"$w/dump.$r/qemu-io.cmds"
    qemu-io -f qcow2 "${qio[@]}" "$w/disk.qcow2" >>"$log" 2>&1 || { echo "qemu-io failed" >&2; exit 1; }
    rm -rf "$w/dump.$r"
    start_servers
    both "$r" incr
done
stop_servers
changed=$(awk '{ s += $1 } END { printf "%.0f\n", s / NR }' "$w/changed_bytes")

echo "restoring both repositories' newest generation and comparing with the disk"
for k in unix tls; do
    "$vk" --repo "$w/R_$k" -q restore vm -g 0 --to "$w/restored.raw"
    cmp "$w/restored.raw" "$w/disk.raw" || { echo "$k: the restored newest generation differs from the disk" >&2; exit 1; }
    rm -f "$w/restored.raw"
done

# ---------------------------------------------------------------- report
f() { printf '%.2f' "$1"; }
x() { printf '%.2f×' "$(echo "$1 / $2" | bc -l)"; }
verdict() { if [ "$(echo "$1" | bc -l)" = 1 ]; then echo met; else echo "**not met**"; fi; }
fu=$(med full_unix); ft=$(med full_tls); iu=$(med incr_unix); it=$(med incr_tls)
cu=$(med nbdcopy_unix); ctl=$(med nbdcopy_tls)
elapsed=$(echo "$EPOCHREALTIME - $t_start" | bc)
n=$(wc -l <"$tsv")
row() { # LABEL KEY_UNIX KEY_TLS TARGET
    local u t; u=$(med "$2"); t=$(med "$3")
    echo "| $1 | $(f "$u") | $(f "$t") | $(x "$t" "$u") | $4 | $(f "$(cpu "$2")") / $(f "$(cpu "$3")") | $(rss "$2") / $(rss "$3") |"
}
{
echo "### Run of $(date -u +%Y-%m-%dT%H:%MZ): ${size_gib} GiB disk, $(mib "$disk_alloc") MiB allocated, qcow2 via qemu-nbd"
echo
echo "$(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -r); cold: page cache dropped before every timed command."
echo "Load average at the start $load_start, at the end $(cut -d' ' -f1-3 /proc/loadavg); a rustc of another build was running in $(busy) of the $n samples."
echo "Server certificate: $key_info; client certificate ECDSA. Medians of $reps full and $rounds incr runs, unix and TLS alternating; the incrs back up $(mib "$changed") MiB of 1 % writes each (changed-block list). Whole run: $(printf '%.0f' "$elapsed") s."
echo
echo "| operation | unix s | TLS s | TLS / unix | target | CPU s (user+sys) unix / TLS | peak RSS MiB unix / TLS |"
echo "|---|---|---|---|---|---|---|"
row "vmkeep full backup" full_unix full_tls "≤ 1.3×: $(verdict "$ft <= 1.3 * $fu")"
row "vmkeep incr 1 %, changed-block list" incr_unix incr_tls "≤ 1.3×: $(verdict "$it <= 1.3 * $iu")"
row "nbdcopy + sync (the limit)" nbdcopy_unix nbdcopy_tls ""
echo
echo "vmkeep against nbdcopy: $(x "$fu" "$cu") over the unix socket, $(x "$ft" "$ctl") over TLS."
echo "TLS costs the full backup $(f "$(echo "$ft - $fu" | bc)") s ($(printf '%+.0f %%' "$(echo "100 * ($ft - $fu) / $fu" | bc -l)")), the incr $(f "$(echo "$it - $iu" | bc)") s, nbdcopy $(f "$(echo "$ctl - $cu" | bc)") s."
} | tee "$out/tls.md"
