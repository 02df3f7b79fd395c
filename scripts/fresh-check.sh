#!/usr/bin/env bash
# Prove the README's two commands on a machine in the state a fresh image has, without a
# new machine: put this machine back into that state (the backport qemu-utils installed;
# qemu-system, libvirt, nbdkit, sshd and the test guest's packages absent; no vmkeep
# installed, no cached test guest or Garage build), clone the committed HEAD
# afresh, run ./scripts/demo.sh and then ./scripts/test.sh there with no step by hand in
# between, and fail unless both exit 0.
#
#   ./scripts/fresh-check.sh --yes      as root; purges and reinstalls packages, builds
#                                       Garage from nothing (~25 min plus Garage's cold build)
#
# The fresh image got its qemu-utils from the distribution's -backports suite, which the
# machine's sources do not list: the .deb is fetched through a temporary sources list on
# the same mirror, and installed with apt so its dependencies come along.
source "$(dirname "$0")/lib.sh"
as_root
[ "${1:-}" = "--yes" ] || die "this purges qemu-system, libvirt and nbdkit from this machine; run it with --yes"

WORK=$(mktemp -d /var/tmp/vmkeep-fresh.XXXXXX)
# Absent from the image too, installed by the project's scripts: the test guest's packages
# and sshd (the image has openssh-client; it has neither cpio nor kmod).
STATE_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-system-gui qemu-block-extra
    libvirt-daemon-system libvirt-daemon libvirt-clients libvirt-dev libvirt0 nbdkit libnbd-bin libnbd0 gnutls-bin
    openssh-server openssh-sftp-server qemu-guest-agent busybox-static cpio kmod ovmf swtpm swtpm-tools)

log "1/4 back to the fresh-image state"
for d in $(virsh -q list --all --name 2>/dev/null); do
    virsh -q destroy "$d" >/dev/null 2>&1 || true
    virsh -q undefine "$d" --checkpoints-metadata --nvram >/dev/null 2>&1 || true
done
pkill -x libvirtd || true
pkill -x virtlogd || true
pkill -x virtlockd || true
pkill -f qemu-system-x86_64 || true
sleep 1
export DEBIAN_FRONTEND=noninteractive
installed=()
for p in "${STATE_PACKAGES[@]}"; do pkg_installed "$p" && installed+=("$p"); done
if [ ${#installed[@]} -gt 0 ]; then
    apt-get purge -y -qq --autoremove "${installed[@]}" >"$WORK/purge.log" 2>&1 ||
        { tail -20 "$WORK/purge.log" >&2; die "apt-get purge failed"; }
fi
rm -f /usr/local/bin/vmkeep
rm -rf /var/cache/vmkeep-test-guest
# Garage's build cache goes too, as the test guest's does: test.sh must build it from nothing.
rm -rf /var/cache/vmkeep-garage

codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
mkdir -p "$WORK/bpo/lists/partial" "$WORK/bpo/deb"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $codename-backports main" \
    >"$WORK/bpo/sources.list"
bpo=(-o "Dir::Etc::sourcelist=$WORK/bpo/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::lists=$WORK/bpo/lists")
apt-get "${bpo[@]}" update -qq >"$WORK/bpo.log" 2>&1 || { tail "$WORK/bpo.log" >&2; die "cannot read $codename-backports"; }
chmod 0777 "$WORK/bpo/deb" # apt's download sandbox user writes here
(cd "$WORK/bpo/deb" && apt-get "${bpo[@]}" download "qemu-utils/$codename-backports") >>"$WORK/bpo.log" 2>&1 ||
    { tail "$WORK/bpo.log" >&2; die "cannot download qemu-utils from $codename-backports"; }
deb=$(ls "$WORK"/bpo/deb/qemu-utils_*.deb)
apt-get install -y -qq --allow-downgrades "$deb" >>"$WORK/bpo.log" 2>&1 ||
    { tail "$WORK/bpo.log" >&2; die "cannot install $deb"; }
for p in "${STATE_PACKAGES[@]}"; do pkg_installed "$p" && die "$p is still installed"; done
case "$(pkg_version qemu-utils)" in *bpo*) ;; *) die "qemu-utils $(pkg_version qemu-utils) is not the backport" ;; esac
log "fresh-image state: qemu-utils $(pkg_version qemu-utils); ${STATE_PACKAGES[*]} absent"

log "2/4 a fresh clone of $(git -C "$REPO_ROOT" rev-parse --short HEAD)"
git clone -q "$REPO_ROOT" "$WORK/vmkeep"
cd "$WORK/vmkeep"

log "3/4 the README's first command: ./scripts/demo.sh"
demo=0
./scripts/demo.sh >"$WORK/demo.log" 2>&1 || demo=$?
tail -5 "$WORK/demo.log"
log "4/4 the README's second command: ./scripts/test.sh"
tests=0
./scripts/test.sh >"$WORK/test.log" 2>&1 || tests=$?
tail -3 "$WORK/test.log"

echo "fresh-check: demo.sh exit $demo, test.sh exit $tests (logs in $WORK)"
[ $demo -eq 0 ] && [ $tests -eq 0 ] || exit 1
rm -rf "$WORK/vmkeep/target"
echo "fresh-check: ok"
