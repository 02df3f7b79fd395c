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

# Install Debian packages that are missing (idempotent; no network use when all are there).
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "${p%%/*}" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if ! apt-get install -y -qq "${missing[@]}" >/tmp/vmkeep-apt.log 2>&1; then
        # qemu-system and qemu-utils must come from the same release: a newer qemu-utils
        # (a backport) blocks qemu-system, so take both from the distribution's release.
        local codename
        codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
        local pinned=()
        for p in "${missing[@]}"; do
            case "$p" in qemu-utils|qemu-system-x86) pinned+=("$p/$codename");; *) pinned+=("$p");; esac
        done
        case " ${pinned[*]} " in *" qemu-utils/"*) ;; *) pinned+=("qemu-utils/$codename");; esac
        apt-get install -y -qq --allow-downgrades "${pinned[@]}" >/tmp/vmkeep-apt.log 2>&1 || {
            tail -20 /tmp/vmkeep-apt.log >&2
            exit 1
        }
    fi
}

# Everything vmkeep and its tests use at run time and build time.
BASE_PACKAGES=(pkg-config qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-dev nbdkit libnbd-bin)

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
