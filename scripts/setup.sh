#!/usr/bin/env bash
# Installs everything Kindling needs on a fresh Debian 12 machine, skipping
# what is already there, then builds (or finds in the cache) the guest
# kernel. Safe to run again at any time.
#
#   scripts/setup.sh            packages + guest kernel + minimal guest image
#   scripts/setup.sh --packages only the Debian packages
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# (qemu-system-x86, the L1 VM of the nested harness, comes from backports:
# see install_backports_qemu below.)
# linux-image-cloud-amd64: the L1 kernel; its kvm-amd module gives the L1 /dev/kvm.
# busybox-static: the L1's userland.
# e2fsprogs: mkfs.ext4 for guest images.
packages=(linux-image-cloud-amd64 busybox-static e2fsprogs
    nftables iproute2 conntrack # guest networking and its nested tests
    ca-certificates) # the system roots an https:// orchestrator URL is checked against

# apt_install [APT-GET INSTALL OPTIONS...] PACKAGE...: refreshes the package
# lists and installs, without recommends; dies with what failed.
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed; check the machine's Debian mirror"
    apt-get install -y -q --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed (see above)"
}

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
    apt_install "${missing[@]}"
}

# QEMU for the nested harness comes from Debian's bookworm-backports (10.0),
# not bookworm (7.2). Under 7.2's emulated SVM, L2 guests triple-faulted or
# took the L1 down in a few percent of heavy runs (every run when the L1 and
# L2 kernels share their virtual addresses, i.e. `nokaslr` in the L1: 9 of
# 9); 10.0 ran that same worst case clean. See the README's harness section.
QEMU_MIN_MAJOR=10

qemu_major() {
    command -v qemu-system-x86_64 >/dev/null || { echo 0; return; }
    qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9]*\)\..*/\1/p'
}

install_backports_qemu() {
    local major
    major="$(qemu_major)"
    if ((major >= QEMU_MIN_MAJOR)); then
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "QEMU $major is too old for the nested harness (need $QEMU_MIN_MAJOR, from bookworm-backports); run this as root"
    local list=/etc/apt/sources.list.d/kindling-bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # The machine's own Debian mirror, so a local mirror keeps working.
        local mirror
        mirror="$(sed -n 's/^URIs: *\([^ ]*\/debian\)\/\?$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)"
        mirror="${mirror:-http://deb.debian.org/debian}"
        say "adding Debian's bookworm-backports ($mirror) for QEMU $QEMU_MIN_MAJOR"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" >"$list"
    fi
    say "installing qemu-system-x86 from bookworm-backports (have QEMU $major)"
    apt_install -t bookworm-backports qemu-system-x86
    major="$(qemu_major)"
    ((major >= QEMU_MIN_MAJOR)) || die "QEMU is still $major after the install; expected $QEMU_MIN_MAJOR"
}

command -v cargo >/dev/null || die "cargo not found: install Rust 1.95 (rustup) first"

t0=$(now)
install_packages "${packages[@]}"
install_backports_qemu
say "packages ready ($(elapsed "$t0"))"

if [[ "${1:-}" != "--packages" ]]; then
    t0=$(now)
    KINDLING_KERNEL_DIR="$("$repo_root/kernel-config/build.sh" --print-dir)"
    say "guest kernel ready in $KINDLING_KERNEL_DIR ($(elapsed "$t0"))"
    t0=$(now)
    KINDLING_IMAGE="$("$repo_root/guest-image/build.sh" minimal --print-path)"
    say "minimal guest image ready: $KINDLING_IMAGE ($(elapsed "$t0"))"
fi
