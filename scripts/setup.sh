#!/usr/bin/env bash
# Installs everything Kindling needs on a fresh Debian 12 machine, skipping
# what is already there, then builds (or finds in the cache) the guest
# kernel. Safe to run again at any time.
#
#   scripts/setup.sh            packages + guest kernel + minimal guest image
#   scripts/setup.sh --packages only the Debian packages
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# qemu-system-x86: the L1 VM of the nested harness (TCG with emulated SVM).
# linux-image-cloud-amd64: the L1 kernel; its kvm-amd module gives the L1 /dev/kvm.
# busybox-static: the L1's userland.
# e2fsprogs: mkfs.ext4 for guest images.
packages=(qemu-system-x86 linux-image-cloud-amd64 busybox-static e2fsprogs
    nftables iproute2) # nftables, iproute2: the guest-networking nested tests (issue 6)

install_packages() {
    local missing=()
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "need root to install: ${missing[*]} (run as root, or install them yourself)"
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed; check the machine's Debian mirror"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed (see above)"
}

command -v cargo >/dev/null || die "cargo not found: install Rust 1.95 (rustup) first"

t0=$(now)
install_packages "${packages[@]}"
say "packages ready ($(elapsed "$t0"))"

if [[ "${1:-}" != "--packages" ]]; then
    t0=$(now)
    KINDLING_KERNEL_DIR="$("$repo_root/kernel-config/build.sh" --print-dir)"
    say "guest kernel ready in $KINDLING_KERNEL_DIR ($(elapsed "$t0"))"
    t0=$(now)
    KINDLING_IMAGE="$("$repo_root/guest-image/build.sh" minimal --print-path)"
    say "minimal guest image ready: $KINDLING_IMAGE ($(elapsed "$t0"))"
fi
