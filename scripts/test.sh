#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): installs what is
# missing, builds or reuses the guest kernel, then runs the kernel-config
# completeness check, format and lint checks, and every cargo test in the
# workspace, including the end-to-end tests in the nested harness.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_root"

# The suite builds from scratch in CI: incremental-compilation state would
# only add gigabytes to `target/` (2.4 GiB of 6.4 GiB in a clean build).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

declare -a phases=()
phase() { phases+=("$(printf '%-28s %s' "$1" "$2")"); }

say "cargo fmt --check"
cargo fmt --all --check || die "formatting differs: run \`cargo fmt --all\`"

t0=$(now)
"$repo_root/scripts/setup.sh"
KINDLING_KERNEL_DIR="$("$repo_root/kernel-config/build.sh" --print-dir)"
KINDLING_IMAGE="$("$repo_root/guest-image/build.sh" minimal --print-path)"
export KINDLING_KERNEL_DIR KINDLING_IMAGE
phase "setup + guest kernel" "$(elapsed "$t0")"

t0=$(now)
say "debian guest image (debootstrap on a cache miss, a few minutes)"
KINDLING_DEBIAN_IMAGE="$("$repo_root/guest-image/build.sh" debian --print-path)"
export KINDLING_DEBIAN_IMAGE
phase "debian guest image" "$(elapsed "$t0")"

say "kernel config completeness ($KINDLING_KERNEL_DIR/config)"
"$repo_root/kernel-config/check-config.sh" "$KINDLING_KERNEL_DIR/config"

t0=$(now)
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
phase "lint" "$(elapsed "$t0")"

t0=$(now)
say "cargo build"
cargo build --workspace --bins --locked
# The VMM with test hooks, for the security suite (tests/tests/security.rs);
# a separate binary, so the shipped `vmm` never contains the hooks.
cargo build -p vmm --features test-hooks --bin vmm-test-hooks --locked
phase "build" "$(elapsed "$t0")"

t0=$(now)
say "cargo test (unit, KVM-on-host and nested end-to-end tests)"
cargo test --workspace --locked
phase "tests" "$(elapsed "$t0")"

t0=$(now)
say "vmm end-to-end in the nested harness (1 and 2 vCPUs: blk, vsock both ways, net, rng, reboot)"
sh "$repo_root/vmm/tests/nested/run.sh" 1
sh "$repo_root/vmm/tests/nested/run.sh" 2
phase "vmm nested end-to-end" "$(elapsed "$t0")"

say "summary"
printf '  %s\n' "${phases[@]}" >&2
