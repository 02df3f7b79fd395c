# Shared by the scripts: package installation and building. Source it; don't run it.

set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "run this as root (it installs packages and starts libvirt)" >&2
        exit 1
    fi
}

# Everything vmkeep and its tests use at run time and build time, and the commands that
# prove each package works once installed.
# The test guest's packages (scripts/guest-image.sh) are among them: busybox, qemu-ga and
# the libraries it needs go into its initramfs, modinfo resolves the kernel modules, cpio
# packs it, e2fsprogs makes and reads its ext4 data disks, ovmf is its UEFI firmware, and
# swtpm (with swtpm_setup from swtpm-tools) is the TPM emulator libvirt starts for a <tpm>
# (only swtpm is proven by --version: swtpm_setup 0.7.1 prints its version and exits 1).
GUEST_PACKAGES=(busybox-static qemu-guest-agent kmod cpio e2fsprogs ovmf swtpm swtpm-tools)
# openssh-server and -client: the remote tests reach libvirt over qemu+ssh through an sshd
# they start themselves (on a free port, with keys of their own).
BASE_PACKAGES=(pkg-config qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-dev nbdkit libnbd-bin gnutls-bin
    openssh-server openssh-client "${GUEST_PACKAGES[@]}")
# nbdfuse (libnbd-bin) exposes a served generation as a file for file-level restore
# (docs/recovery.md, tests/guest.rs); as root it mounts without fusermount3, and `umount`
# ends it, so fuse3 is not needed.
BASE_COMMANDS=(qemu-img qemu-nbd qemu-io qemu-system-x86_64 virsh libvirtd nbdkit nbdcopy nbdinfo pkg-config certtool
    qemu-ga modinfo cpio swtpm nbdfuse)

# The test guest's kernel is only downloaded (`apt-get download`) and unpacked into the
# guest's cache folder, never installed: installing a linux-image package runs the host's
# kernel hooks (initramfs-tools builds an initramfs in /boot, a bootloader hook may rewrite
# the boot menu), none of which a test needs or should do to the machine.
GUEST_KERNEL_PACKAGE=linux-image-cloud-amd64

# The packages that must come from one QEMU build: qemu-system-x86 refuses a qemu-utils of
# another version (the machine image ships a newer qemu-utils from backports), and apt
# "solves" that by removing qemu-utils. Both are therefore always installed from the
# distribution's own release, in the same apt-get run.
QEMU_PACKAGES=(qemu-utils qemu-system-x86)

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null; }

# The QEMU packages agree when both are installed with the same version.
qemu_agrees() {
    pkg_installed qemu-utils && pkg_installed qemu-system-x86 &&
        [ "$(pkg_version qemu-utils)" = "$(pkg_version qemu-system-x86)" ]
}

# Install what is missing in one apt-get run whose versions agree, refuse any plan that
# removes a package, and prove the outcome: every package installed, every command runs.
ensure_packages() {
    local codename missing=() p
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
    local wants_qemu=0
    for p in "$@"; do case " ${QEMU_PACKAGES[*]} " in *" $p "*) wants_qemu=1 ;; esac; done
    if [ ${#missing[@]} -gt 0 ] || { [ $wants_qemu -eq 1 ] && ! qemu_agrees; }; then
        local plan=()
        for p in "${missing[@]}"; do
            case " ${QEMU_PACKAGES[*]} " in *" $p "*) ;; *) plan+=("$p") ;; esac
        done
        [ $wants_qemu -eq 1 ] && for p in "${QEMU_PACKAGES[@]}"; do plan+=("$p/$codename"); done
        log "installing ${plan[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        local apt=(apt-get install -y -qq --allow-downgrades -o Dpkg::Options::=--force-confold)
        # Simulate first: a plan that removes anything is refused before it touches the machine.
        local sim removed
        if ! sim=$("${apt[@]}" -s "${plan[@]}" 2>&1); then
            printf '%s\n' "$sim" | tail -20 >&2
            die "apt-get cannot install ${plan[*]}"
        fi
        removed=$(printf '%s\n' "$sim" | awk '/^Remv /{print $2}' | tr '\n' ' ')
        [ -z "$removed" ] || die "installing ${plan[*]} would remove: $removed— refused; install by hand or remove what conflicts"
        "${apt[@]}" "${plan[@]}" >/tmp/vmkeep-apt.log 2>&1 || {
            tail -20 /tmp/vmkeep-apt.log >&2
            die "apt-get install ${plan[*]} failed (log: /tmp/vmkeep-apt.log)"
        }
    fi
    verify_packages "$@"
}

# Every package of the list installed, the QEMU ones of one version, every command present
# and answering --version; otherwise one line naming what is wrong, and exit 1.
verify_packages() {
    local bad=() p c
    for p in "$@"; do pkg_installed "$p" || bad+=("package $p is not installed"); done
    case " $* " in *" qemu-utils "*|*" qemu-system-x86 "*)
        qemu_agrees || bad+=("qemu-utils $(pkg_version qemu-utils) and qemu-system-x86 $(pkg_version qemu-system-x86) differ") ;;
    esac
    for c in "${BASE_COMMANDS[@]}"; do
        if ! command -v "$c" >/dev/null 2>&1; then
            bad+=("command $c is missing")
        elif ! "$c" --version >/dev/null 2>&1; then
            bad+=("command $c does not run ($c --version failed)")
        fi
    done
    [ ${#bad[@]} -eq 0 ] || die "set-up incomplete: $(IFS=';'; echo "${bad[*]}" | sed 's/;/; /g')"
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || {
        echo "cargo not found: install Rust (https://rustup.rs) first" >&2
        exit 1
    }
}

# Start virtlogd and libvirtd when none runs, and wait for them to answer.
ensure_libvirtd() {
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
    for _ in $(seq 1 50); do
        virsh -c qemu:///system version >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "libvirtd did not start" >&2
    exit 1
}

# Garage, the S3-compatible server the offsite tests start (crates/vmkeep/tests/support/
# garage.rs, which finds it through VMKEEP_TEST_GARAGE): no Debian package has it, so it
# is built from crates.io with its own lock file, pinned, into a build cache that
# survives between runs like the test guest's (docs/testing.md says how long a cold build
# takes). Rebuilt only when the binary is missing or reports another version.
GARAGE_VERSION=2.5.0
GARAGE_ROOT=/var/cache/vmkeep-garage
GARAGE_BIN=$GARAGE_ROOT/bin/garage

# The version the cached binary reports, or nothing: a crates.io build says
# "garage cargo:2.5.0 [features: ...]", a git build "garage v2.5.0 ...".
garage_version() {
    [ -x "$GARAGE_BIN" ] || return 0
    "$GARAGE_BIN" --version 2>/dev/null | awk 'NR == 1 { v = $2; sub(/^.*:/, "", v); sub(/^v/, "", v); print v }'
}

ensure_garage() {
    if [ "$(garage_version)" != "$GARAGE_VERSION" ]; then
        log "building garage $GARAGE_VERSION into $GARAGE_ROOT (once; log /tmp/vmkeep-garage-build.log)"
        local start=$SECONDS
        cargo install garage --version "=$GARAGE_VERSION" --locked --force --root "$GARAGE_ROOT" \
            >/tmp/vmkeep-garage-build.log 2>&1 || {
            tail -20 /tmp/vmkeep-garage-build.log >&2
            die "cargo install garage $GARAGE_VERSION failed (log: /tmp/vmkeep-garage-build.log)"
        }
        log "garage $GARAGE_VERSION built in $((SECONDS - start)) s"
    fi
    "$GARAGE_BIN" --version >/dev/null 2>&1 || die "$GARAGE_BIN does not run ($GARAGE_BIN --version failed)"
    [ "$(garage_version)" = "$GARAGE_VERSION" ] ||
        die "$GARAGE_BIN reports version '$(garage_version)', not $GARAGE_VERSION"
    log "$("$GARAGE_BIN" --version | head -1)"
}

# Install the binary, its shell completions and man pages.
install_vmkeep() {
    install -m 0755 "$1" /usr/local/bin/vmkeep
    mkdir -p /usr/share/bash-completion/completions /usr/share/zsh/vendor-completions \
        /usr/share/fish/vendor_completions.d /usr/local/share/man/man1
    vmkeep completions bash >/usr/share/bash-completion/completions/vmkeep
    vmkeep completions zsh >/usr/share/zsh/vendor-completions/_vmkeep
    vmkeep completions fish >/usr/share/fish/vendor_completions.d/vmkeep.fish
    vmkeep manpages /usr/local/share/man/man1
}
