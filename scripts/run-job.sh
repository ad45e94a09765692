#!/usr/bin/env bash
# The main job: prepares everything (packages, guest kernel, release build),
# then runs the sample scenario where a real guest can run: inside the nested
# harness (an L1 under QEMU TCG with emulated SVM) when this host's KVM
# cannot run a Linux guest at speed, directly on hardware KVM otherwise.
# Prints the scenario's output live and a timing summary.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_root"

declare -a phases=()
phase() { phases+=("$(printf '%-24s %s' "$1" "$2")"); }

t0=$(now)
"$repo_root/scripts/setup.sh"
KINDLING_KERNEL_DIR="$("$repo_root/kernel-config/build.sh" --print-dir)"
phase "setup + guest kernel" "$(elapsed "$t0")"

t0=$(now)
say "building release binaries"
cargo build --release --locked -p harness -p vmm --bins
phase "build" "$(elapsed "$t0")"
bin="$repo_root/target/release"

"$bin/harness" detect

say "running the sample scenario"
t0=$(now)
set +e
"$bin/harness" run --name main-job --timeout 300 \
    --bin "$bin/kvm-smoke" \
    --asset "$KINDLING_KERNEL_DIR/vmlinux" \
    --script "$repo_root/scripts/scenarios/main-job.sh"
rc=$?
set -e
phase "scenario (harness)" "$(elapsed "$t0")"

say "timing summary"
printf '  %s\n' "${phases[@]}" >&2
exit "$rc"
