#!/usr/bin/env bash
# The main job: prepares everything (packages, guest kernel, guest image,
# release build), then runs examples/hello.yaml end to end with
# `host-agent run`: an embedded orchestrator, a fresh microVM booted by our
# VMM, the runner agent as its PID 1, logs streamed live, the VM destroyed,
# and a timing summary. Where this host's KVM cannot run a Linux guest at
# speed, the harness says so and runs it all inside an L1 VM under QEMU TCG
# with emulated SVM; on hardware KVM it runs directly.
#
#   scripts/run-job.sh [JOB.yaml]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_root"
job="$(realpath "${1:-examples/hello.yaml}")"

declare -a phases=()
phase() { phases+=("$(printf '%-24s %s' "$1" "$2")"); }

t0=$(now)
"$repo_root/scripts/setup.sh"
kernel="$("$repo_root/kernel-config/build.sh" --print-dir)/vmlinux"
image="$("$repo_root/guest-image/build.sh" minimal --print-path)"
phase "setup (cached)" "$(elapsed "$t0")"

t0=$(now)
say "building release binaries"
cargo build --release --locked -p harness -p vmm -p host-agent -p kindling-jailer --bins
phase "build" "$(elapsed "$t0")"
bin="$repo_root/target/release"

"$bin/harness" detect
say "running $(basename "$job") in a fresh microVM"
t0=$(now)
set +e
"$bin/harness" run --name main-job --timeout 600 \
    --bin "$bin/vmm" --bin "$bin/host-agent" --bin "$bin/kindling-jailer" \
    --asset "$kernel=vmlinux" --asset "$image=minimal.erofs" --asset "$job=job.yaml" \
    --script "$repo_root/scripts/scenarios/main-job.sh"
rc=$?
set -e
phase "job (harness, total)" "$(elapsed "$t0")"

say "timing summary (outer phases)"
printf '  %s\n' "${phases[@]}" >&2
exit "$rc"
