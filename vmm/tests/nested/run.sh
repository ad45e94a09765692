#!/bin/sh
# run.sh [VCPUS]: the vmm end-to-end test in the nested harness. From the
# repository root: sh vmm/tests/nested/run.sh 2
# Builds (or takes from the cache) the guest kernel, the vmm, the static
# vsock_echo tool and the test rootfs, then runs scenario.sh in the L1.
set -eu
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
HERE="$ROOT/vmm/tests/nested"
VCPUS=${1:-2}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
STATIC_TARGET=${VMM_STATIC_TARGET_DIR:-$ROOT/target-static}
KERNEL_DIR=$(bash "$ROOT/kernel-config/build.sh" --print-dir)
cd "$ROOT"
cargo build --release -p vmm --bin vmm
cargo build --release -p harness
CARGO_TARGET_DIR="$STATIC_TARGET" RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release -p vmm --example vsock_echo --target x86_64-unknown-linux-gnu
ECHO="$STATIC_TARGET/x86_64-unknown-linux-gnu/release/examples/vsock_echo"
ROOTFS=$(mktemp -d)/rootfs.ext4
sh "$HERE/build-rootfs.sh" "$ROOTFS" "$ECHO"
SCENARIO=$(mktemp)
{ echo "VCPUS=$VCPUS"; cat "$HERE/scenario.sh"; } > "$SCENARIO"
"$TARGET/release/harness" run --name "vmm-e2e-${VCPUS}cpu" --script "$SCENARIO" \
  --module tun --bin "$TARGET/release/vmm" --bin "$ECHO" \
  --asset "$KERNEL_DIR/vmlinux" --asset "$ROOTFS" --timeout 900
