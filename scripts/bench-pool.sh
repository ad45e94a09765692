#!/usr/bin/env bash
# The warm-pool benchmark: one orchestrator and one host agent whose pool
# keeps POOL_SIZE microVMs booted, driven through the client CLI. Prints
# submit -> first log line at the client with a warm pool, job end ->
# replacement VM ready, VM boot and teardown times, jobs per minute on one
# host, and the ratio first-log-line / VM boot (target: under 5 %, i.e. the
# pool hides the boot). Release builds; runs in the nested harness where
# this host's KVM cannot run a Linux guest at speed (the harness says so).
#
#   scripts/bench-pool.sh                      # 5 warm samples, 12 jobs, pool of 2
#   SAMPLES=10 JOBS=20 POOL_SIZE=2 MEMORY_MIB=192 scripts/bench-pool.sh
#
# CARGO_TARGET_DIR is honoured; the scenario is scripts/bench/pool-scenario.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_root"

samples="${SAMPLES:-5}"
jobs="${JOBS:-12}"
pool_size="${POOL_SIZE:-2}"
memory_mib="${MEMORY_MIB:-192}"
for v in "$samples" "$jobs" "$pool_size" "$memory_mib"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "SAMPLES, JOBS, POOL_SIZE and MEMORY_MIB must be positive integers"
done
((pool_size <= 4)) || die "POOL_SIZE above 4 does not fit the L1 (2 vCPUs)"

"$repo_root/scripts/setup.sh"
kernel="$("$repo_root/kernel-config/build.sh" --print-dir)/vmlinux"
image="$("$repo_root/guest-image/build.sh" minimal --print-path)"

say "building release binaries"
cargo build --release --locked -p harness -p vmm -p host-agent -p kindling-jailer -p orchestrator --bins
bin="${CARGO_TARGET_DIR:-$repo_root/target}/release"

scenario="$(mktemp --suffix=.sh)"
trap 'rm -f "$scenario"' EXIT
{
    echo "SAMPLES=$samples JOBS=$jobs POOL_SIZE=$pool_size MEMORY_MIB=$memory_mib"
    cat "$repo_root/scripts/bench/pool-scenario.sh"
} > "$scenario"

"$bin/harness" detect
say "pool benchmark: $samples warm samples, $jobs jobs, pool of $pool_size x $memory_mib MiB"
# L1: 2 vCPUs; memory for the pool's guests plus the L1's own processes.
"$bin/harness" run --name bench-pool --timeout 900 \
    --memory $((1024 + pool_size * memory_mib)) \
    --bin "$bin/vmm" --bin "$bin/host-agent" --bin "$bin/kindling-jailer" --bin "$bin/orchestrator" \
    --asset "$kernel=vmlinux" --asset "$image=minimal.erofs" \
    --script "$scenario"
