//! End-to-end in the nested harness: a job that floods its output (200 MiB:
//! see [`output_bytes`]) completes, and memory stays bounded on both sides.
//!
//! The flood travels the whole production path: the step's pipe, the runner
//! agent (masking, framing), vsock through our VMM, the host agent's relay,
//! the embedded orchestrator's on-disk event log, and `host-agent run`'s
//! follower printing to stdout. Backpressure must keep every stage's memory
//! flat: the agent blocks in `write(2)` when vsock is full, the relay awaits
//! the orchestrator before reading more, and the orchestrator keeps logs on
//! disk. The orchestrator also caps the stored output per job (128 MiB by
//! default): the follower then sees the first 128 MiB and a notice, and the
//! job still succeeds.
//!
//! What is measured, and where:
//! - host side: a sampler in the L1 reads `VmHWM` of the `host-agent` and
//!   `vmm` processes from `/proc` every half second, and the VMM's RSS
//!   outside guest RAM from its `smaps` (busybox `time -v` would report the
//!   maximum over the host agent's children too, i.e. the VMM with its
//!   guest RAM);
//! - guest side: the job's last step reads the runner agent's (PID 1)
//!   `VmHWM` and writes it to the guest console. The step's stdout would be
//!   past the orchestrator's output cap, and the VM's own `serial.log` goes
//!   with its directory at teardown, so the scenario runs the VMM through a
//!   wrapper that points `--serial` at a file the test reads afterwards.

use std::time::Duration;

use harness::assets::kernel_and_minimal_image;
use harness::{Asset, Scenario, Status, workspace_binary};

/// How many times a run that ended in the L2's emulator triple fault is
/// repeated in a fresh L1 (the harness says so on stderr, with the ended
/// attempt's report).
const TRIPLE_FAULT_RERUNS: u32 = 3;

/// MiB the job writes: 200 as the issue asks, or `$KINDLING_FLOOD_MIB`.
///
/// 200 MiB also crosses the orchestrator's 128 MiB output cap, so the cut
/// and its notice are checked too. The flood takes ~70 s in the L1 (debug
/// build; 100-280 s before the runner agent coalesced output in full flow,
/// with other work on the machine at the upper end). A long vsock
/// flood sometimes ends in a triple fault of the L2 guest with no message
/// before it, and the Firecracker peer in the same L1 under the same flood
/// does the same (1 of 3 runs); and the L1 kernel sometimes panics (an L1
/// timer interrupt delivered inside KVM's SVM world switch, among other
/// shapes). Both are QEMU TCG's emulated SVM, not our VMM: QEMU 10 made
/// them rarer than 7.2 did, not rare enough (CI in session 5: a triple
/// fault ~26 s into the flood, then an L1 panic in the retry). The harness
/// reruns the scenario in a fresh L1 on an L1 panic (up to twice) and on
/// the triple-fault signature (up to `TRIPLE_FAULT_RERUNS` times), saying
/// so; a smaller `KINDLING_FLOOD_MIB` gives a quick local run.
fn output_bytes() -> u64 {
    let mib = std::env::var("KINDLING_FLOOD_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&m| (1..=4096).contains(&m))
        .unwrap_or(200);
    mib << 20
}
/// Memory of the VM, MiB.
const VM_MEMORY_MIB: u64 = 256;

/// Bound on the host agent's peak RSS (measured: 21-26 MiB debug, 13-15
/// MiB release). It holds at most one relay batch (1 MiB of log data), one
/// follower page (4 MiB) and their JSON/base64 encodings; keeping the
/// output would exceed the bound in either build.
const HOST_AGENT_MAX_KIB: u64 = 40 << 10;
/// Bound on the runner agent's peak RSS (measured: 2.2-2.4 MiB): one read
/// buffer per stream, the masker's hold-back and one frame in flight.
const RUNNER_AGENT_MAX_KIB: u64 = 16 << 10;
/// Bound on the VMM's RSS outside guest RAM (measured: ~3.5 MiB): its vsock
/// buffers are bounded by the credit it grants the guest (256 KiB).
const VMM_OVERHEAD_MAX_KIB: u64 = 16 << 10;

/// The VMM wrapper (a shell script, which the jailer refuses to exec: the
/// run uses `--no-jail`; confinement is the security suite's subject): the host agent's `--serial file:<vm dir>/serial.log`
/// becomes `file:/tmp/guest-console.log`, which outlives the VM, and the
/// VMM's log goes to `/tmp/vmm-stderr.log` (shown if the job fails).
const VMM_WRAPPER: &str = r#"#!/bin/sh
n=$#
next=
for arg in "$@"; do
  if [ -n "$next" ]; then arg=file:/tmp/guest-console.log; next=; fi
  if [ "$arg" = --serial ]; then next=1; fi
  set -- "$@" "$arg"
done
shift "$n"
exec vmm "$@" 2>/tmp/vmm-stderr.log
"#;

/// The L1 side: wrapper, memory sampler, the run, and a report in
/// `key: value` lines the test parses.
const SCENARIO: &str = r#"cat > /tmp/vmm-keep-console <<'EOF'
@WRAPPER@EOF
chmod +x /tmp/vmm-keep-console
# keep_max FILE VALUE: FILE holds the largest VALUE seen.
keep_max() {
  old=$(cat "$1" 2>/dev/null || echo 0)
  if [ -n "$2" ] && [ "$2" -gt "$old" ]; then echo "$2" > "$1"; fi
}
# ticks STAT: user + system CPU time (clock ticks) in a /proc stat file.
ticks() { awk '{print $14 + $15}' "$1" 2>/dev/null; }
# sample NAME: for processes named NAME, the highest VmHWM (kB) in
# /tmp/hwm-NAME, CPU time (clock ticks) when last seen in /tmp/cpu-NAME,
# and for the VMM its highest RSS outside the guest-RAM mapping (the one
# of exactly the VM's memory size) in /tmp/overhead-vmm.
sample() {
  for pid in $(pidof "$1"); do
    keep_max /tmp/hwm-$1 "$(awk '/^VmHWM/ {print $2}' /proc/$pid/status 2>/dev/null)"
    ticks /proc/$pid/stat > /tmp/cpu-$1.new &&
      mv /tmp/cpu-$1.new /tmp/cpu-$1
    if [ "$1" = vmm ]; then
      keep_max /tmp/overhead-vmm "$(awk -v guest=$((@MEMORY@ * 1024)) '
        /^[0-9a-f]+-[0-9a-f]+ / { size = 0 }
        /^Size:/ { size = $2 }
        /^Rss:/ { if (size != guest) total += $2 }
        END { print total + 0 }' /proc/$pid/smaps 2>/dev/null)"
    fi
  done
}
# threads NAME: one line per call with the CPU time (clock ticks) of each
# thread of the NAME processes, in /tmp/threads-NAME.log: on a failure it
# shows which thread (a vCPU: the guest; `devices`: our device loop) was
# busy while the job stalled.
threads() {
  for pid in $(pidof "$1"); do
    line="t=$(cut -d' ' -f1 /proc/uptime)"
    for task in /proc/$pid/task/*; do
      line="$line $(cat $task/comm 2>/dev/null)=$(ticks $task/stat)"
    done
    echo "$line" >> /tmp/threads-$1.log
  done
}
( n=0; while :; do
    sample host-agent; sample vmm
    n=$((n + 1)); [ $((n % 4)) = 0 ] && threads vmm
    sleep 0.5
  done ) &
sampler=$!
mkfifo /tmp/out.fifo
wc -c < /tmp/out.fifo > /tmp/out.bytes &
counter=$!
t0=$(cut -d' ' -f1 /proc/uptime)
{ host-agent run $ASSETS/job.yaml --no-jail --vmm /tmp/vmm-keep-console \
    --kernel $ASSETS/vmlinux --image $ASSETS/minimal.erofs \
    --vcpus 1 --memory-mib @MEMORY@ --state-dir /tmp/agent-state
  echo $? > /tmp/rc; } | tee /tmp/out.fifo | tail -c 300 > /tmp/out.tail
wait $counter
sample host-agent; sample vmm
kill $sampler
echo "host-agent run: $(awk -v t=$t0 '{print $1 - t}' /proc/uptime) s, exit $(cat /tmp/rc)"
echo "job stdout bytes on the host: $(cat /tmp/out.bytes)"
echo "host-agent VmHWM kB: $(cat /tmp/hwm-host-agent)"
echo "vmm VmHWM kB: $(cat /tmp/hwm-vmm)"
echo "vmm overhead kB: $(cat /tmp/overhead-vmm)"
hz=100 # USER_HZ
echo "CPU seconds (last sample): host-agent $(awk -v h=$hz '{print $1 / h}' /tmp/cpu-host-agent)," \
  "vmm $(awk -v h=$hz '{print $1 / h}' /tmp/cpu-vmm)"
echo "guest console: $(grep -a 'guest-agent VmHWM' /tmp/guest-console.log)"
echo "--- last bytes of the job's stdout ---"
cat /tmp/out.tail
echo
echo "--- end ---"
echo "left: $(ls /tmp/agent-state/vms | wc -l) vm dirs, $(pidof vmm | wc -w) vmm processes"
rc=$(cat /tmp/rc)
if [ "$rc" != 0 ]; then
  echo "--- guest console (last lines) ---"
  tail -n 40 /tmp/guest-console.log
  echo "--- vmm log (last lines) ---"
  tail -n 20 /tmp/vmm-stderr.log
  echo "--- vmm threads' CPU ticks, every 2 s (last lines) ---"
  tail -n 25 /tmp/threads-vmm.log
fi
exit $rc
"#;

fn job(bytes: u64) -> String {
    format!(
        "name: flood
runs-on: [linux]
timeout-minutes: 10
steps:
  - name: flood
    run: (yes 'kindling output flood 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ' || true) | head -c {bytes}
  - name: agent memory
    run: echo \"guest-agent VmHWM $(awk '/^VmHWM/ {{print $2}}' /proc/1/status) kB\" | tee /dev/console
"
    )
}

/// The number after `key` on its line of `output`.
fn number_after(output: &str, key: &str) -> u64 {
    let line = output
        .lines()
        .find_map(|l| l.split_once(key).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("{key:?} missing in:\n{output}"));
    let digits: String = line
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?} in:\n{output}"))
}

#[test]
fn an_output_flood_completes_with_bounded_memory_on_both_sides() {
    let dir = std::env::temp_dir().join(format!("kindling-e2e-output-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let job_path = dir.join("job.yaml");
    let output_bytes = output_bytes();
    std::fs::write(&job_path, job(output_bytes)).unwrap();
    let script = SCENARIO
        .replace("@WRAPPER@", VMM_WRAPPER)
        .replace("@MEMORY@", &VM_MEMORY_MIB.to_string());
    let mut sc = Scenario::new("output-flood", &script);
    sc.timeout = Duration::from_secs(900);
    sc.bins = vec![
        workspace_binary("vmm").unwrap(),
        workspace_binary("host-agent").unwrap(),
        // The host agent starts every VMM through it (jail on by default).
        workspace_binary("kindling-jailer").unwrap(),
    ];
    sc.assets = kernel_and_minimal_image().unwrap();
    sc.assets.push(Asset {
        host_path: job_path,
        name: "job.yaml".into(),
    });
    sc.l2_triple_fault_reruns = TRIPLE_FAULT_RERUNS;
    let out = harness::run(&sc).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let o = &out.output;
    assert_eq!(out.status, Status::Exited(0), "{}\n{o}", out.report());
    assert!(o.contains("<== step 1: exit 0"), "{o}");
    assert!(o.contains("<== step 2: exit 0"), "{o}");
    assert!(o.contains(": succeeded"), "{o}");
    assert!(o.contains("left: 0 vm dirs, 0 vmm processes"), "{o}");

    // Everything arrived, or the orchestrator's cap (128 MiB, output plus
    // 128 bytes per event) cut it with a notice; the chunk that would cross
    // the cap is dropped whole, a chunk carries at most 64 KiB, and the
    // per-event charge costs at most 1/16 of the cap with chunks of 2 KiB
    // or more (a flood's chunks are much larger).
    let bytes = number_after(o, "job stdout bytes on the host:");
    if bytes < output_bytes {
        assert!(
            bytes >= (128 << 20) - (128 << 20) / 16 - (64 << 10),
            "only {bytes} bytes arrived:\n{o}"
        );
        assert!(o.contains("output limit of"), "cut without a notice:\n{o}");
    }

    let host_agent = number_after(o, "host-agent VmHWM kB:");
    let runner_agent = number_after(o, "guest-agent VmHWM");
    let vmm_overhead = number_after(o, "vmm overhead kB:");
    let vmm = number_after(o, "vmm VmHWM kB:");
    eprintln!(
        "{} MiB of output; peak RSS: host-agent {host_agent} kB, runner agent {runner_agent} kB, \
         vmm {vmm} kB of which {vmm_overhead} kB outside guest RAM",
        output_bytes >> 20
    );
    assert!(host_agent > 0 && host_agent < HOST_AGENT_MAX_KIB, "{o}");
    assert!(
        runner_agent > 0 && runner_agent < RUNNER_AGENT_MAX_KIB,
        "{o}"
    );
    assert!(
        vmm_overhead > 0 && vmm_overhead < VMM_OVERHEAD_MAX_KIB,
        "{o}"
    );
    assert!(vmm < (VM_MEMORY_MIB << 10) + VMM_OVERHEAD_MAX_KIB, "{o}");
}
