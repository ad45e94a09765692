#!/bin/sh
# run.sh [RUNS]: boot-cycle benchmark of vmm (and Firecracker, when
# ../shared/peers/firecracker exists) on the project kernel in the nested
# harness. From the repository root: sh vmm/bench/run.sh 7
#
# The L1 runs with transparent huge pages on, as a KVM host normally does
# (the harness turns them off for tests, where they made emulator faults
# under floods more frequent): guest RAM is 2 MiB-aligned so that KVM can
# map it with huge pages, and that is part of what is measured.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${1:-5}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
KERNEL_DIR=$(bash "$ROOT/kernel-config/build.sh" --print-dir)
PEER="${FIRECRACKER:-$ROOT/../shared/peers/firecracker}"
cd "$ROOT"
cargo build --release -p vmm --bin vmm
cargo build --release -p harness
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/root/bin" "$WORK/root/dev" "$WORK/root/proc" "$WORK/root/sys"
cp "$(command -v busybox)" "$WORK/root/bin/busybox"
cp "$ROOT/vmm/bench/bench-init" "$WORK/root/init"
chmod 755 "$WORK/root/init"
truncate -s 16M "$WORK/rootfs.ext4"
mkfs.ext4 -q -d "$WORK/root" "$WORK/rootfs.ext4"
{ echo "RUNS=$RUNS"; cat "$ROOT/vmm/bench/scenario.sh"; } > "$WORK/scenario.sh"
set -- --bin "$TARGET/release/vmm"
if [ -x "$PEER" ]; then set -- "$@" --bin "$PEER"; else echo "no Firecracker at $PEER: ours only" >&2; fi
"$TARGET/release/harness" run --name vmm-boot-bench --script "$WORK/scenario.sh" "$@" \
  --asset "$KERNEL_DIR/vmlinux" --asset "$WORK/rootfs.ext4" --timeout 900 \
  --l1-kernel-arg transparent_hugepage=always
