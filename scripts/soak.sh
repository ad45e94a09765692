#!/bin/sh
# soak.sh [N]: boot-job-teardown soak of our VMM and of Firecracker (when
# ../shared/peers/firecracker exists) under the same load in the same L1
# (nested harness): N VMs each (default 100), two at a time, each booting
# the minimal image (runner agent as PID 1), running one job that prints a
# numbered line every 10 ms for ~3 s plus 4 KiB bursts, checking the output
# arrived complete and in order, and tearing the VM down. Batches of BATCH
# (default 10) alternate between the two VMMs, so both see the same machine
# load; a harness run holds at most PER_RUN (default 10) VMs per VMM, so that
# no run holds the machine-wide L1 lock for long, and the counts are summed (an L1 that panics midway
# is rerun by the harness; the VMs it finished still count). START numbers
# the first VM, to tell runs apart.
# Each VM is ok / boot-hang (no Hello+Ready in 60 s) / job-hang (no guest
# message for 30 s mid-job; per-thread CPU of the VMM and its log tail are
# printed) / triple-fault / other. See host-agent/examples/soak.rs.
# From the repository root: sh scripts/soak.sh 100
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-100}
BATCH=${BATCH:-10}
PER_RUN=${PER_RUN:-10}
START=${START:-0}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
KERNEL_DIR=$(bash "$ROOT/kernel-config/build.sh" --print-dir)
IMAGE=$(bash "$ROOT/guest-image/build.sh" minimal --print-path)
PEER="${FIRECRACKER:-$ROOT/../shared/peers/firecracker}"
cd "$ROOT"
cargo build -p vmm --bin vmm
cargo build -p harness
cargo build -p host-agent --example soak
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The debug-info build is ~130 MiB: the L1's initramfs gets a stripped copy.
strip -o "$WORK/soak" "$TARGET/debug/examples/soak"
OUT="$TARGET/soak/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
VMMS=ours
set -- --bin "$WORK/soak" --bin "$TARGET/debug/vmm"
if [ -x "$PEER" ]; then
  VMMS="ours firecracker"
  set -- "$@" --bin "$PEER"
else
  echo "no Firecracker at $PEER: ours only" >&2
fi
first=0
run=1
while [ "$first" -lt "$N" ]; do
  count=$((N - first))
  [ "$count" -gt "$PER_RUN" ] && count=$PER_RUN
  cat > "$WORK/scenario.sh" <<SCEN
FIRST=$((START + first))
END=$((START + first + count))
BATCH=$BATCH
VMMS="$VMMS"
SCEN
  cat >> "$WORK/scenario.sh" <<'SCEN'
bin_of() { if [ "$1" = ours ]; then command -v vmm; else command -v firecracker; fi; }
i=$FIRST
while [ "$i" -lt "$END" ]; do
  n=$BATCH
  [ $((i + n)) -gt "$END" ] && n=$((END - i))
  for v in $VMMS; do
    soak run --vmm "$v" --bin "$(bin_of "$v")" --kernel "$ASSETS/vmlinux" \
      --image "$ASSETS/rootfs.erofs" --count "$n" --first "$i" --parallel 2 \
      --work /tmp/soak --results /tmp/soak.results
  done
  i=$((i + n))
done
for f in /tmp/soak/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 30 "$f"; }; done
soak summary /tmp/soak.results
SCEN
  echo "soak: harness run $run, VMs $((START + first))..$((START + first + count - 1)) of each VMM" >&2
  "$TARGET/debug/harness" run --name soak --script "$WORK/scenario.sh" "$@" \
    --asset "$KERNEL_DIR/vmlinux" --asset "$IMAGE=rootfs.erofs" --timeout 1800 \
    2>&1 | tee "$OUT/run$run.log" || true
  first=$((first + count))
  run=$((run + 1))
done
echo
echo "soak: $N VMs per VMM, two at a time, batches of $BATCH alternating (logs: $OUT)"
"$TARGET/debug/examples/soak" summary "$OUT"/run*.log
grep -h 'SOAK .* \(boot-hang\|job-hang\|triple-fault\|other\) ' "$OUT"/run*.log | sed 's/^.*SOAK /SOAK /' | sort -u || true
