#!/usr/bin/env bash
# Boot-path benchmark of the runner agent, for the minimal and the debian
# image, against a bare init on the same kernel:
#
#   VMM start -> runner-agent Hello   (host-agent's summary: VMM spawn -> Hello;
#                                       includes the jail and the VMM's exec)
#   VMM start -> agent connects        (VMM log, as for the bare init: the agent
#                                       sends Hello as soon as it is connected;
#                                       no host agent, no jail)
#   job received -> first LogChunk     (host-agent's summary: job acquired -> first chunk)
#   last step end -> VMM exit          (guest powers itself off; VMM log: the job's
#                                       last step writes boot-timer mark 0xff, the VMM
#                                       logs "VM stopped"; driven by fake-host)
#   teardown                           (host-agent kills and reaps the VMM after JobFinished)
#   bare init                          (VMM start -> an /init that only writes a
#                                       boot-timer mark and resets; VMM log)
#
# Everything runs in one harness scenario (nested: inside the L1 under QEMU
# TCG), RUNS times each (default 3); the table shows medians. Release builds.
#
#   scripts/bench-agent.sh [--runs N]
#
# The VMM's clock starts when its logger starts (first thing in main), the
# host agent's when it spawns the VMM: the Hello figure also carries the
# VMM's exec and start-up, so the Hello / bare-init ratio errs against the agent.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_root"

runs=3
while [[ $# -gt 0 ]]; do
    case "$1" in
    --runs)
        runs="${2:?--runs needs a number}"
        shift 2
        ;;
    -h | --help)
        sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "--runs takes a positive number, not '$runs'"

say "guest kernel and images (cached)"
kernel="$("$repo_root/kernel-config/build.sh" --print-dir)/vmlinux"
minimal="$("$repo_root/guest-image/build.sh" minimal --print-path)"
debian="$("$repo_root/guest-image/build.sh" debian --print-path)"

say "release builds"
cargo build --release --locked -p vmm -p host-agent -p kindling-jailer -p harness --bins
cargo build --release --locked -p runner-agent --example fake-host
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
[[ "$target_dir" = /* ]] || target_dir="$repo_root/$target_dir"
bin="$target_dir/release"

work="$(mktemp -d "${TMPDIR:-/tmp}/kindling-bench.XXXXXX")"

say "bare-init image (busybox; /init marks the boot timer and resets)"
command -v mkfs.erofs >/dev/null || die "mkfs.erofs missing (apt-get install erofs-utils)"
[[ -x /bin/busybox ]] || die "/bin/busybox missing (apt-get install busybox-static)"
root="$work/bare-root"
mkdir -p "$root"/{bin,dev,proc,sys}
install -m 0755 /bin/busybox "$root/bin/busybox"
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox printf '\001' | /bin/busybox dd of=/dev/port bs=1 seek=1088 count=1 2>/dev/null
/bin/busybox reboot -f
INIT
chmod 0755 "$root/init"
mkfs.erofs -zlz4hc "$work/bare.erofs" "$root" >/dev/null
size=$(stat -c %s "$work/bare.erofs")
truncate -s $(((size + 4095) / 4096 * 4096)) "$work/bare.erofs"

# The benchmark job: one line of output, then a last step whose final act
# is boot-timer mark 0xff (bash in debian, busybox sh in minimal).
cat >"$work/job.yaml" <<'JOB'
name: bench
runs-on: [linux]
timeout-minutes: 5
steps:
  - name: first output
    run: echo first-line
  - name: last step
    run: printf '\377' | dd of=/dev/port bs=1 seek=1088 count=1 2>/dev/null
JOB

{
    echo "RUNS=$runs"
    cat "$repo_root/scripts/bench/agent-scenario.sh"
} >"$work/scenario.sh"

say "running $runs round(s) in the harness"
"$bin/harness" detect >&2
set +e
"$bin/harness" run --name bench-agent --timeout $((300 + runs * 240)) --memory 3072 \
    --workdir "$work/harness" \
    --bin "$bin/vmm" --bin "$bin/host-agent" --bin "$bin/kindling-jailer" --bin "$bin/examples/fake-host" \
    --asset "$kernel=vmlinux" --asset "$work/bare.erofs=bare.erofs" \
    --asset "$minimal=minimal.erofs" --asset "$debian=debian.erofs" \
    --asset "$work/job.yaml=job.yaml" --script "$work/scenario.sh"
rc=$?
set -e
[[ $rc -eq 0 ]] || die "the benchmark scenario failed (exit $rc); logs in $work/harness"

# Medians of the BENCH lines.
awk -v runs="$runs" '
function median(key,    n, i, j, t, v) {
    n = count[key]
    if (n == 0) return "NA"
    for (i = 1; i <= n; i++) v[i] = vals[key, i]
    for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
function ms(x) { return x == "NA" ? "      -" : sprintf("%7.0f", x) }
function ratio(x, base) { return (x == "NA" || base == "NA" || base == 0) ? "-" : sprintf("%.2f", x / base) }
/^BENCH / {
    image = ""
    for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    image = f["image"]
    for (k in f) if (k ~ /_ms$/ && f[k] != "NA" && f[k] != "") {
        count[image, k]++; vals[image, k, count[image, k]] = f[k] + 0
    }
    delete f
}
END {
    bare = median("bare" SUBSEP "init_ms")
    printf "\nmedians of %d run(s), ms (nested: L2 on KVM in an L1 under QEMU TCG)\n\n", runs
    printf "%-8s %13s %9s %13s %9s %13s %13s %13s %13s\n", "image", "VMM->connect", "connect /", "VMM->Hello", "Hello /", "Hello->Ready", "job->1st log", "last step->", "teardown"
    printf "%-8s %13s %9s %13s %9s %13s %13s %13s %13s\n", "", "(direct)", "bare init", "(host agent)", "bare init", "", "", "VMM exit", "(host kill)"
    for (m = 1; m <= 2; m++) {
        image = (m == 1) ? "minimal" : "debian"
        connect = median(image SUBSEP "connect_ms")
        hello = median(image SUBSEP "hello_ms")
        printf "%-8s %13s %9s %13s %9s %13s %13s %13s %13s\n", image, ms(connect), ratio(connect, bare),
            ms(hello), ratio(hello, bare), ms(median(image SUBSEP "ready_ms")),
            ms(median(image SUBSEP "first_log_ms")), ms(median(image SUBSEP "exit_ms")),
            ms(median(image SUBSEP "teardown_ms"))
    }
    printf "%-8s %13s   (VMM start -> bare /init; VMM exit at %s)\n", "bare", ms(bare), ms(median("bare" SUBSEP "stop_ms"))
}' "$work/harness/output.log"
rm -rf "$work"
