#!/usr/bin/env bash
# fuzz.sh [SECONDS]: runs every cargo-fuzz target of the project for SECONDS
# each (default 30), one after the other, and fails on the first crash.
#
#   vmm/fuzz:       virtio_block (virtio-blk requests), vsock_tx (vsock packets),
#                   net_tx (virtio-net headers and frames)
#   protocol/fuzz:  frame_decoder (host/guest frames), job_spec (job spec parser)
#
# cargo-fuzz needs nightly flags (-Zsanitizer); on a stable-only machine this
# script sets RUSTC_BOOTSTRAP=1, which lets stable rustc accept them. With a
# nightly toolchain installed, FUZZ_TOOLCHAIN=nightly uses it instead.
# Longer runs: `scripts/fuzz.sh 3600`, or one target by hand, e.g.
#   cd vmm && RUSTC_BOOTSTRAP=1 cargo fuzz run virtio_block -- -max_total_time=3600 -jobs=2
# Crashes are saved under <crate>/fuzz/artifacts/<target>/ and replayed with
#   cargo fuzz run <target> <artifact>
# The fuzz bodies also run in plain `cargo test` over fixed inputs.
set -euo pipefail
secs=${1:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
toolchain=()
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    toolchain=("+$FUZZ_TOOLCHAIN")
else
    export RUSTC_BOOTSTRAP=1
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}/fuzz
for entry in vmm:virtio_block vmm:vsock_tx vmm:net_tx protocol:frame_decoder protocol:job_spec; do
    crate=${entry%%:*}
    target=${entry#*:}
    echo "==> fuzzing $crate/$target for ${secs}s" >&2
    (cd "$root/$crate" && cargo "${toolchain[@]}" fuzz run "$target" -- \
        -max_total_time="$secs" -print_final_stats=1)
done
echo "==> all fuzz targets ran ${secs}s each without a crash" >&2
