//! The security suite, nested: each wall of the VMM's confinement checked
//! from outside on real VMs (real KVM, seccomp, namespaces, cgroups) in the
//! L1, with `host-agent run` (single-shot, embedded orchestrator).
//!
//! * `a_running_vmm_is_confined`: while a job runs, the scenario inspects
//!   the VMM process from the L1: every thread in seccomp filter mode
//!   (`Seccomp: 2`), and, with the jail, its uid/gid, namespaces (an
//!   abstract Unix socket of the host is out of reach from its network
//!   namespace), cgroup limits, rlimits and root directory. The job handles a secret; after it,
//!   the host agent's state directory, its log, the VMM log and the serial
//!   capture must not contain the secret's value.
//! * `a_forbidden_syscall_kills_the_vmm_and_the_job_says_so`: the
//!   `vmm-test-hooks` build makes a vCPU thread issue a forbidden syscall
//!   when the guest asks for it (after boot, mid-job); the VMM must die by
//!   SIGSYS and the job's result must say "vmm killed by seccomp".
//! * `a_device_thread_failure_ends_the_vmm_at_once_and_the_job_says_why`:
//!   the `vmm-test-hooks` build panics its device thread, then (second
//!   job) makes it fail with an error, when the guest asks for it; each
//!   time the VMM must exit at once (not hang until the heartbeat timeout)
//!   and the job's reason must name the thread and what happened.
//! * `a_noisy_neighbour_does_not_slow_another_vm_beyond_twice_its_solo_time`:
//!   the daemon with a quiet and a noisy pool; a fixed job alone, then next
//!   to a VM running a fork bomb, a disk filler, a CPU spinner and log and
//!   serial floods, must take at most twice as long, while the host agent's
//!   metrics endpoint keeps answering and each jail sees only its own VM
//!   directory.
//!
//! The scenarios print `@ SUBJECT key=value` fact lines; the tests assert
//! on them.

use std::path::PathBuf;
use std::time::Duration;

use harness::Outcome;
use harness::e2e::{self, FLEET_HELPERS, Facts, SHELL_HELPERS};

/// Runs `script` with the kernel, the minimal image, `host-agent` with its
/// jailer, `vmm` and `vmm-test-hooks`, the `more` workspace binaries, and
/// the given job files as assets; asserts that it exited 0.
fn run_ok(
    name: &str,
    script: &str,
    timeout_secs: u64,
    more: &[&str],
    jobs: &[(&str, &str)],
) -> Outcome {
    // The host agent starts every VMM through the jailer (jail on by
    // default).
    let bins = [&["vmm", "host-agent", "kindling-jailer"], more].concat();
    let mut sc =
        e2e::scenario(name, script, Duration::from_secs(timeout_secs), &bins, jobs).unwrap();
    sc.bins.push(hooked_vmm());
    let out = harness::run(&sc).unwrap();
    // The report says how it ended.
    assert!(out.success(), "{}\n{}", out.report(), out.output);
    out
}

/// The test-hooks VMM (`cargo build -p vmm --features test-hooks --bin
/// vmm-test-hooks`; scripts/test.sh does it).
fn hooked_vmm() -> PathBuf {
    harness::workspace_binary("vmm-test-hooks").unwrap_or_else(|e| {
        panic!("{e}: build it with `cargo build -p vmm --features test-hooks --bin vmm-test-hooks`")
    })
}

/// Shell helpers of the single-shot scenarios, after [`SHELL_HELPERS`].
const PRELUDE: &str = r#"
# run_agent NAME JOB VMM [SECRET]: host-agent run in the background, output
# to /tmp/NAME.log, state under /tmp/NAME-state.
run_agent() {
    host-agent run "$ASSETS/$2" --secret "TOKEN=${4:-none-given}" --vmm "$(command -v $3)" \
        --kernel "$ASSETS/vmlinux" --image "$ASSETS/minimal.erofs" --memory-mib 256 \
        --state-dir "/tmp/$1-state" > "/tmp/$1.log" 2>&1 &
}
# vmm_pid: pid of the (only) process named vmm or vmm-test-hooks.
vmm_pid() {
    for c in /proc/[0-9]*/comm; do
        case "$(cat $c 2>/dev/null)" in vmm|vmm-test-hook*) p=${c#/proc/}; echo ${p%/comm}; return;; esac
    done
}
"#;

const CONFINED_JOB: &str = "name: confined
runs-on: [linux]
steps:
  - name: uses a secret, then waits to be inspected
    run: |
      echo \"token=$TOKEN\"
      echo \"$TOKEN\" | sha256sum
      echo job-is-running
      sleep 25
      echo job-done
";

const CONFINED_SCRIPT: &str = r#"
SECRET=s3cr3t-Value-8d1f0c
run_agent confined confined.yaml vmm "$SECRET"
agent=$!
wait_for 240 "the job running" grep -qs job-is-running /tmp/confined.log || { cat /tmp/confined.log; fact error why=job-never-ran; exit 1; }
pid=$(vmm_pid)
[ -n "$pid" ] || { fact error why=no-vmm-process; exit 1; }
fact vmm pid=$pid
# Seccomp mode of every thread (2 = filter).
threads=0; filtered=0
for t in /proc/$pid/task/*; do
    threads=$((threads+1))
    grep -q '^Seccomp:[[:space:]]*2' $t/status && filtered=$((filtered+1))
    echo "thread $(cat $t/comm): $(grep '^Seccomp:' $t/status)"
done
fact seccomp threads=$threads filtered=$filtered
fact nnp value=$(awk '/^NoNewPrivs:/ {print $2}' /proc/$pid/status)
# Jail: ids, capabilities, namespaces, cgroup limits, rlimits, root.
fact ids uid=$(awk '/^Uid:/ {print $2}' /proc/$pid/status) gid=$(awk '/^Gid:/ {print $2}' /proc/$pid/status) capeff=$(awk '/^CapEff:/ {print $2}' /proc/$pid/status) nspid=$(awk '/^NSpid:/ {print $NF}' /proc/$pid/status)
for n in mnt pid ipc net; do
    [ "$(readlink /proc/$pid/ns/$n)" != "$(readlink /proc/$agent/ns/$n)" ] && fact ns $n=own || fact ns $n=shared
done
# An abstract Unix socket of the host: reachable from the agent's network
# namespace, not from the VMM's (abstract sockets are per namespace).
netlab unix-listen kindling-host-probe > /tmp/probe.log 2>&1 &
probe=$!
wait_for 10 "the abstract socket probe" grep -qs listening /tmp/probe.log
netlab unix-connect kindling-host-probe && fact abstract host=reachable || fact abstract host=unreachable
nsenter --net=/proc/$pid/ns/net netlab unix-connect kindling-host-probe && fact abstract vmm=reachable || fact abstract vmm=unreachable
kill $probe
cg=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/$pid/cgroup)
echo "cgroup $cg"
fact cgroup named=$(basename $(dirname $cg)) memory=$(cat $cg/memory.max) pids=$(cat $cg/pids.max) cpu=$(cut -d' ' -f1 $cg/cpu.max)
fact rlimit core=$(awk '/core file size/ {print $5}' /proc/$pid/limits) nofile=$(awk '/open files/ {print $4}' /proc/$pid/limits)
echo "jail root:"; ls -la /proc/$pid/root/
[ -e /proc/$pid/root/etc ] && fact root etc=visible || fact root etc=absent
[ -e /proc/$pid/root/proc ] && fact root proc=visible || fact root proc=absent
[ -e /proc/$pid/root/bin ] && fact root bin=visible || fact root bin=absent
fact root entries=$(ls /proc/$pid/root/ | wc -l) vmdirs=$(ls /proc/$pid/root/tmp/confined-state/vms | wc -l) assets=$(ls /proc/$pid/root$ASSETS | wc -l)
# Serial capture and VMM log while the VM runs (teardown removes them).
vmdir=$(ls -d /tmp/confined-state/vms/* | head -1)
cp "$vmdir/serial.log" /tmp/serial-copy.log 2>/dev/null
cp "$vmdir/vmm.log" /tmp/vmm-copy.log 2>/dev/null
fact serial bytes=$(wc -c < /tmp/serial-copy.log)
wait $agent; rc=$?
fact agent rc=$rc
# Secret hygiene: nowhere on disk the agent or the VMM wrote.
leaks=$(grep -rl "$SECRET" /tmp/confined-state /tmp/confined.log /tmp/serial-copy.log /tmp/vmm-copy.log 2>/dev/null | wc -l)
fact secret leaks=$leaks masked=$(grep -c 'token=\*\*\*' /tmp/confined.log)
tail -5 /tmp/confined.log
"#;

#[test]
fn a_running_vmm_is_confined() {
    let script = format!("{SHELL_HELPERS}{PRELUDE}{CONFINED_SCRIPT}");
    let jobs = [("confined.yaml", CONFINED_JOB)];
    let out = run_ok("sec-confined", &script, 420, &["netlab"], &jobs);
    let o = &out.output;
    let f = Facts::parse(o);
    let threads: u32 = f.get("seccomp", "threads").unwrap().parse().unwrap();
    // main + 1 vCPU + device thread at least.
    assert!(threads >= 3, "{o}");
    assert_eq!(
        f.get("seccomp", "filtered"),
        Some(&*threads.to_string()),
        "{o}"
    );
    assert_eq!(f.get("nnp", "value"), Some("1"), "{o}");
    // Jail: own unprivileged ids from the configured range, no capabilities,
    // PID 1 of its own PID namespace.
    let uid: u32 = f.get("ids", "uid").unwrap().parse().unwrap();
    assert!(uid >= 900_000, "{o}");
    assert_eq!(f.get("ids", "gid"), Some(&*uid.to_string()), "{o}");
    assert_eq!(f.get("ids", "capeff"), Some("0000000000000000"), "{o}");
    assert_eq!(f.get("ids", "nspid"), Some("1"), "{o}");
    for ns in ["mnt", "pid", "ipc", "net"] {
        assert_eq!(f.get("ns", ns), Some("own"), "{ns}: {o}");
    }
    // From its own, empty network namespace the host's abstract Unix
    // sockets are out of reach.
    assert_eq!(f.get("abstract", "host"), Some("reachable"), "{o}");
    assert_eq!(f.get("abstract", "vmm"), Some("unreachable"), "{o}");
    // cgroup: 256 MiB guest + 64 MiB overhead, 64 pids, 1 vCPU of CPU.
    assert_eq!(f.get("cgroup", "named"), Some("kindling"), "{o}");
    assert_eq!(
        f.get("cgroup", "memory"),
        Some(&*((256u64 + 64) << 20).to_string()),
        "{o}"
    );
    assert_eq!(f.get("cgroup", "pids"), Some("64"), "{o}");
    assert_eq!(f.get("cgroup", "cpu"), Some("100000"), "{o}");
    assert_eq!(f.get("rlimit", "core"), Some("0"), "{o}");
    assert_eq!(f.get("rlimit", "nofile"), Some("1024"), "{o}");
    // Its root holds only what it needs: no /etc, /proc, /bin; one VM dir;
    // of the assets only the kernel and the image.
    assert_eq!(f.get("root", "etc"), Some("absent"), "{o}");
    assert_eq!(f.get("root", "proc"), Some("absent"), "{o}");
    assert_eq!(f.get("root", "bin"), Some("absent"), "{o}");
    assert_eq!(f.get("root", "vmdirs"), Some("1"), "{o}");
    assert_eq!(f.get("root", "assets"), Some("2"), "{o}");
    assert_eq!(f.get("agent", "rc"), Some("0"), "{o}");
    assert_ne!(
        f.get("serial", "bytes"),
        Some("0"),
        "no serial capture to check:\n{o}"
    );
    assert_eq!(f.get("secret", "leaks"), Some("0"), "{o}");
    assert_eq!(f.get("secret", "masked"), Some("1"), "{o}");
}

const HOOK_JOB: &str = "name: escape-attempt
runs-on: [linux]
steps:
  - name: asks the hooked VMM for a forbidden syscall
    run: |
      echo before-the-attempt
      printf '\\134' | dd of=/dev/port bs=1 seek=1088 count=1
      sleep 30
      echo still-alive
";

const HOOK_SCRIPT: &str = r#"
run_agent hook hook.yaml vmm-test-hooks
agent=$!
wait $agent; rc=$?
fact agent rc=$rc
cat /tmp/hook.log
grep -q 'vmm killed by seccomp' /tmp/hook.log && fact reason seccomp=1
grep -q 'SIGSYS' /tmp/hook.log && fact reason sigsys=1
grep -q 'still-alive' /tmp/hook.log && fact job survived=1
vmms=0; for c in /proc/[0-9]*/comm; do case "$(cat $c 2>/dev/null)" in vmm*) vmms=$((vmms+1));; esac; done
fact left vmms=$vmms dirs=$(ls /tmp/hook-state/vms | wc -l)
"#;

#[test]
fn a_forbidden_syscall_kills_the_vmm_and_the_job_says_so() {
    let script = format!("{SHELL_HELPERS}{PRELUDE}{HOOK_SCRIPT}");
    let out = run_ok("sec-hook", &script, 420, &[], &[("hook.yaml", HOOK_JOB)]);
    let o = &out.output;
    let f = Facts::parse(o);
    assert!(o.contains("before-the-attempt"), "the job never ran:\n{o}");
    assert_eq!(f.get("job", "survived"), None, "the VMM survived:\n{o}");
    assert_eq!(f.get("reason", "seccomp"), Some("1"), "{o}");
    assert_eq!(f.get("reason", "sigsys"), Some("1"), "{o}");
    // `host-agent run` exits 2 for infrastructure errors.
    assert_eq!(f.get("agent", "rc"), Some("2"), "{o}");
    assert_eq!(f.get("left", "vmms"), Some("0"), "{o}");
    assert_eq!(f.get("left", "dirs"), Some("0"), "{o}");
}

/// A job that asks the hooked VMM (`vmm::test_hooks::FAULT_PORT`, 1089)
/// for device-thread fault `mark` (octal, for printf), then would sleep.
fn fault_job(mark: &str) -> String {
    format!(
        "name: device-fault
runs-on: [linux]
steps:
  - name: asks the hooked VMM to break its device thread
    run: |
      echo before-the-fault
      printf '\\{mark}' | dd of=/dev/port bs=1 seek=1089 count=1
      sleep 60
      echo still-alive
"
    )
}

const FAULT_SCRIPT: &str = r#"
# fault_run NAME: the job NAME.yaml on the hooked VMM; facts under NAME.
fault_run() {
    run_agent $1 $1.yaml vmm-test-hooks
    agent=$!
    wait_for 240 "the $1 job running" grep -qs before-the-fault /tmp/$1.log || { cat /tmp/$1.log; fact $1 error=job-never-ran; }
    T=$(now)
    wait $agent; rc=$?
    fact $1 rc=$rc seconds=$(since $T)
    cat /tmp/$1.log
    grep -q 'still-alive' /tmp/$1.log && fact $1 survived=1
    grep -q 'silent' /tmp/$1.log && fact $1 silent=1
    vmms=0; for c in /proc/[0-9]*/comm; do case "$(cat $c 2>/dev/null)" in vmm*) vmms=$((vmms+1));; esac; done
    fact $1_left vmms=$vmms dirs=$(ls /tmp/$1-state/vms | wc -l)
}
fault_run panic
grep -q "exit status: 101" /tmp/panic.log && fact panic status=101
grep -q "thread 'devices' panicked at vmm/src/test_hooks.rs:[0-9:]*: test hook: device thread panic requested by the guest; ending the VMM" /tmp/panic.log && fact panic named=1
fault_run error
grep -q "exit status: 1[^0-9]" /tmp/error.log && fact error status=1
grep -q "vmm: VM stopped: thread 'devices' ended: handler [0-9]*: test hook: device failure requested by the guest" /tmp/error.log && fact error named=1
"#;

#[test]
fn a_device_thread_failure_ends_the_vmm_at_once_and_the_job_says_why() {
    let script = format!("{SHELL_HELPERS}{PRELUDE}{FAULT_SCRIPT}");
    let (panic_job, error_job) = (fault_job("002"), fault_job("003"));
    let jobs = [("panic.yaml", &*panic_job), ("error.yaml", &*error_job)];
    let out = run_ok("sec-device-fault", &script, 600, &[], &jobs);
    let o = &out.output;
    let f = Facts::parse(o);
    for run in ["panic", "error"] {
        assert_eq!(f.get(run, "error"), None, "{run}: the job never ran:\n{o}");
        assert_eq!(
            f.get(run, "survived"),
            None,
            "{run}: the VMM survived:\n{o}"
        );
        // Before, the VM hung until the guest-silence timeout (30 s).
        assert_eq!(
            f.get(run, "silent"),
            None,
            "{run}: hung until silence:\n{o}"
        );
        let seconds: f64 = f.get(run, "seconds").unwrap().parse().unwrap();
        assert!(
            seconds < 20.0,
            "{run}: the VMM took {seconds} s to end:\n{o}"
        );
        assert_eq!(f.get(run, "named"), Some("1"), "{run}: reason:\n{o}");
        // `host-agent run` exits 2 for infrastructure errors.
        assert_eq!(f.get(run, "rc"), Some("2"), "{run}:\n{o}");
        let left = format!("{run}_left");
        assert_eq!(f.get(&left, "vmms"), Some("0"), "{run}:\n{o}");
        assert_eq!(f.get(&left, "dirs"), Some("0"), "{run}:\n{o}");
    }
    assert_eq!(f.get("panic", "status"), Some("101"), "{o}");
    assert_eq!(f.get("error", "status"), Some("1"), "{o}");
}

/// The daemon (orchestrator + host agent with a "quiet" and a "noisy" pool,
/// one VM each): the quiet job alone, then again (up to three trials, until
/// one is within 2x) while the noisy VM runs a fork bomb, a disk filler, a
/// CPU spinner, a log flood and a serial flood.
const NOISY_SCRIPT: &str = r#"
W=/tmp/noisy
mkdir -p $W/jobs && cd $W || exit 1
# CPU time (clock ticks) of a process, and of the VMM in cgroup kindling/$1-*.
ticks() { awk '{print $14 + $15}' /proc/$1/stat 2>/dev/null || echo 0; }
vmm_in() {
    for c in /proc/[0-9]*/comm; do
        [ "$(cat $c 2>/dev/null)" = vmm ] || continue
        p=${c#/proc/}; p=${p%/comm}
        grep -q "kindling/$1-" /proc/$p/cgroup 2>/dev/null && { echo $p; return; }
    done
}
both_idle() { idle quiet && idle noisy; }
start_fleet 180 both_idle <<END_OF_CONFIG
[[pool]]
name = "quiet"
labels = ["linux", "quiet"]
size = 1
vcpus = 1
memory_mib = 192
kernel = "$ASSETS/vmlinux"
image = "$ASSETS/minimal.erofs"

[[pool]]
name = "noisy"
labels = ["linux", "noisy"]
size = 1
vcpus = 1
memory_mib = 192
kernel = "$ASSETS/vmlinux"
image = "$ASSETS/minimal.erofs"
# Relaying a log costs the host CPU outside every VM's cgroup: the noisy
# pool's log rate is capped, so its flood slows down inside its own VM.
log_kib_per_sec = 256
END_OF_CONFIG

for n in 1 2 3 4; do
cat > $W/jobs/quiet$n.yaml <<'END_OF_JOB'
name: quiet
runs-on: [linux, quiet]
steps:
  - name: fixed work
    run: |
      t0=$(cut -d' ' -f1 /proc/uptime)
      i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done
      dd if=/dev/zero of=/tmp/q bs=1M count=16 2>/dev/null; rm -f /tmp/q
      for n in $(seq 1 300); do echo "quiet line $n"; done
      t1=$(cut -d' ' -f1 /proc/uptime)
      echo "guest-seconds $(awk -v a=$t0 -v b=$t1 'BEGIN { printf "%.2f", b - a }')"
END_OF_JOB
done
cat > $W/jobs/noisy.yaml <<'END_OF_JOB'
name: noisy
runs-on: [linux, noisy]
steps:
  - name: abuse
    timeout-minutes: 4
    run: |
      echo noise-started
      yes serial-flood-serial-flood > /dev/console 2>/dev/null &
      yes log-flood-log-flood-log-flood &
      dd if=/dev/zero of=/fill bs=1M 2>/dev/null &
      ( while :; do :; done ) &
      bomb() { bomb | bomb & }
      ( sleep 5; bomb ) &
      sleep 200
END_OF_JOB

# 1. solo
T=$(now); submit quiet1
wait_for 240 "the solo quiet job ended" ended quiet1 || die "the solo quiet job did not end"
SOLO_SECONDS=$(since $T $WAITED_UNTIL)
fact solo seconds=$SOLO_SECONDS rc=$(cat $W/jobs/quiet1.rc) guest=$(sed -n 's/^guest-seconds //p' $W/jobs/quiet1.out)
wait_for 180 "a new quiet VM" idle quiet || die "no new quiet VM"

# 2. with a noisy neighbour
submit noisy
noise() { grep -q noise-started $W/jobs/noisy.out 2>/dev/null; }
wait_for 240 "the noisy job running" noise || die "the noisy job never started"
sleep 15
worst=0
NOISY_VMM=$(vmm_in noisy)
# Two VMs run: each jail shows only its own VM directory.
fact isolation vms=$(ls $W/state/vms | wc -l) noisy_sees=$(ls /proc/$NOISY_VMM/root$W/state/vms | wc -l) quiet_sees=$(ls /proc/$(vmm_in quiet)/root$W/state/vms | wc -l)
a0=$(ticks $AGENT); o0=$(ticks $ORCH); n0=$(ticks $NOISY_VMM)
# Up to three quiet jobs under the noise; the first within twice the solo
# time ends the trials. Isolation that does not hold slows every trial
# alike; what the retries absorb is the build machine itself (2 cores
# shared by QEMU's vCPU threads and whatever else runs there), which can
# halve the L1's second vCPU for seconds at a time.
for n in 2 3 4; do
    wait_for 180 "an idle quiet VM for trial $n" idle quiet || die "no idle quiet VM for trial $n"
    T=$(now); submit quiet$n
    while ! ended quiet$n; do
        m0=$(now)
        agent_metrics | grep -q '^kindling_host_agent' || fact metrics answered=no
        m=$(since $m0)
        worst=$(awk -v a=$worst -v b=$m 'BEGIN { print (b > a) ? b : a }')
        sleep 1
        [ "$(awk -v a="$T" -v b="$(now)" 'BEGIN { print (b - a >= 300) }')" = 1 ] && die "quiet job under noise did not end"
    done
    took=$(since $T)
    fact noisy_trial n=$((n - 1)) seconds=$took rc=$(cat $W/jobs/quiet$n.rc) guest=$(sed -n 's/^guest-seconds //p' $W/jobs/quiet$n.out)
    [ "$(awk -v t=$took -v s=$SOLO_SECONDS 'BEGIN { print (t <= 2 * s) }')" = 1 ] && break
done
fact noisy seconds=$took rc=$(cat $W/jobs/quiet$n.rc) trials=$((n - 1))
fact metrics worst_seconds=$worst
fact cpu_ticks agent=$(( $(ticks $AGENT) - a0 )) orchestrator=$(( $(ticks $ORCH) - o0 )) noisy_vmm=$(( $(ticks $NOISY_VMM) - n0 )) hz=100
ended noisy && fact neighbour still_running=0 || fact neighbour still_running=1
agent_metrics | grep -q '^kindling_host_agent' && fact agent alive=1
tail -3 $W/jobs/noisy.err
dump
"#;

#[test]
fn a_noisy_neighbour_does_not_slow_another_vm_beyond_twice_its_solo_time() {
    let script = format!("{SHELL_HELPERS}{FLEET_HELPERS}{NOISY_SCRIPT}");
    let out = run_ok("sec-noisy", &script, 900, &["orchestrator"], &[]);
    let o = &out.output;
    let f = Facts::parse(o);
    let secs = |subject| -> f64 {
        f.get(subject, "seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {subject} time:\n{o}"))
    };
    assert_eq!(f.get("solo", "rc"), Some("0"), "{o}");
    assert_eq!(f.get("noisy", "rc"), Some("0"), "{o}");
    // The noise must still be there when the quiet job ends, or the timing
    // proves nothing.
    assert_eq!(f.get("neighbour", "still_running"), Some("1"), "{o}");
    let (solo, noisy) = (secs("solo"), secs("noisy"));
    let trials = f.get("noisy", "trials").unwrap_or("?");
    assert!(
        noisy <= 2.0 * solo,
        "solo {solo} s, with a noisy neighbour {noisy} s (the last of {trials} trials):\n{o}"
    );
    assert_eq!(f.get("metrics", "answered"), None, "{o}");
    let worst: f64 = f.get("metrics", "worst_seconds").unwrap().parse().unwrap();
    assert!(worst < 5.0, "metrics took {worst} s:\n{o}");
    assert_eq!(f.get("agent", "alive"), Some("1"), "{o}");
    assert_eq!(f.get("isolation", "vms"), Some("2"), "{o}");
    assert_eq!(f.get("isolation", "noisy_sees"), Some("1"), "{o}");
    assert_eq!(f.get("isolation", "quiet_sees"), Some("1"), "{o}");
}
