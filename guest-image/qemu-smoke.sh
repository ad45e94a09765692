#!/usr/bin/env bash
# qemu-smoke.sh: boot a guest image with the runner agent as PID 1 under
# plain QEMU (TCG: no KVM, no vsock needed) and run one job through it.
#
#   guest-image/qemu-smoke.sh [minimal|debian] [--scratch] [--spec FILE] [--secret NAME=VALUE]...
#
#   --scratch   give the guest an ext4 scratch disk (vdb, kindling.scratch=)
#               for its writable layer instead of tmpfs
#   --spec      job spec (YAML) to run; default: fake-host's three-step job
#   --secret    secret for the job (repeatable)
#
# This checks what host-side tests cannot: the PID-1 path (mounts, overlay
# root and pivot_root, hostname, links, reaping) and that the VM powers
# itself off (reboot=k, QEMU -no-reboot) after the job. The channel is a
# serial line (ttyS1, kindling.connect=serial:/dev/ttyS1) because QEMU's
# vsock needs the host's vhost-vsock module, which our build machines lack;
# the runner agent speaks the same protocol over it. With our VMM the
# channel is vsock (the default), and a test driver listens on
# <vsock uds_path>_10000 exactly as fake-host does here.
#
# Without --spec the job must end `Failed { step: 2 }` with the secret
# masked; with --spec the job must end (any result). The exit status is 0
# when that happened and the VM powered off by itself.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/.." && pwd)"
profile=minimal
scratch=false
fake_host_args=()
custom_spec=false
readonly boot_timeout=${KINDLING_SMOKE_TIMEOUT:-300}

log() { echo "[smoke] $*" >&2; }
die() {
    echo "[smoke] error: $*" >&2
    exit 1
}

while [[ $# -gt 0 ]]; do
    case "$1" in
    minimal | debian) profile="$1" ;;
    --scratch) scratch=true ;;
    --spec)
        fake_host_args+=(--spec "$2")
        custom_spec=true
        shift
        ;;
    --secret)
        fake_host_args+=(--secret "$2")
        shift
        ;;
    -h | --help)
        sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 0
        ;;
    *) die "unknown argument '$1'" ;;
    esac
    shift
done

command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (apt-get install qemu-system-x86)"
image=$("$script_dir/build.sh" "$profile" --print-path)
kernel="$("$repo_root/kernel-config/build.sh" --print-dir)/bzImage"
log "building the fake host driver"
(cd "$repo_root" && cargo build -q -p runner-agent --example fake-host) >&2
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
[[ "$target_dir" = /* ]] || target_dir="$repo_root/$target_dir"
fake_host="$target_dir/debug/examples/fake-host"

work=$(mktemp -d /tmp/kindling-smoke.XXXXXX)
host_pid=""
qemu_pid=""
cleanup() {
    if [[ -n "$qemu_pid" ]]; then kill "$qemu_pid" 2>/dev/null || true; fi
    if [[ -n "$host_pid" ]]; then kill "$host_pid" 2>/dev/null || true; fi
    wait 2>/dev/null || true
}
trap cleanup EXIT
log "work dir: $work"

"$fake_host" --listen "$work/agent.sock" "${fake_host_args[@]}" >"$work/transcript.txt" 2>"$work/fake-host.log" &
host_pid=$!
for _ in $(seq 100); do
    [[ -S "$work/agent.sock" ]] && break
    sleep 0.05
done
[[ -S "$work/agent.sock" ]] || die "fake-host did not start: $(cat "$work/fake-host.log")"

cmdline="console=ttyS0 reboot=k panic=1 root=/dev/vda ro rootfstype=erofs init=/sbin/runner-agent"
cmdline+=" kindling.connect=serial:/dev/ttyS1 kindling.hostname=smoke-vm"
drives=(-drive "file=$image,if=none,id=root,format=raw,readonly=on" -device "virtio-blk-pci,drive=root")
if $scratch; then
    truncate -s 512M "$work/scratch.ext4"
    mkfs.ext4 -q -F "$work/scratch.ext4"
    drives+=(-drive "file=$work/scratch.ext4,if=none,id=scratch,format=raw" -device "virtio-blk-pci,drive=scratch")
    cmdline+=" kindling.scratch=/dev/vdb"
fi

log "booting $(basename "$(dirname "$image")") under QEMU TCG"
started=$(date +%s.%N)
qemu-system-x86_64 -accel tcg -M q35 -cpu max -m 512 -smp 1 \
    -nodefaults -display none -no-reboot \
    -kernel "$kernel" -append "$cmdline" \
    "${drives[@]}" \
    -chardev "file,id=console,path=$work/console.log" -serial chardev:console \
    -chardev "socket,id=agent,path=$work/agent.sock" -serial chardev:agent \
    >"$work/qemu.log" 2>&1 &
qemu_pid=$!

deadline=$(($(date +%s) + boot_timeout))
while kill -0 "$qemu_pid" 2>/dev/null; do
    if (($(date +%s) > deadline)); then
        tail -n 40 "$work/console.log" >&2 || true
        die "the VM did not power off within ${boot_timeout} s"
    fi
    sleep 0.2
done
wait "$qemu_pid" || die "QEMU failed: $(cat "$work/qemu.log")"
qemu_pid=""
elapsed=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
wait "$host_pid" || true
host_pid=""

log "---- transcript ----"
cat "$work/transcript.txt" >&2
log "---- console (agent lines) ----"
grep -E "runner|agent|step|job|overlay|link|hostname|Kernel panic|error" "$work/console.log" >&2 || true

grep -q "JobFinished" "$work/transcript.txt" || die "no JobFinished (console: $work/console.log)"
if ! $custom_spec; then
    grep -q "JobFinished Failed { step: 2 }" "$work/transcript.txt" || die "unexpected job result"
    grep -q "the token is \*\*\*" "$work/transcript.txt" || die "secret not masked"
    ! grep -q "hunter2" "$work/transcript.txt" || die "secret leaked"
fi
grep -q "Kernel panic" "$work/console.log" && die "the guest kernel panicked"
log "ok: job ran and the VM powered off by itself in $elapsed s (QEMU TCG, no KVM)"
trap - EXIT
rm -rf "$work"
