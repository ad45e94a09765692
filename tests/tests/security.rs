//! The security suite, nested: each wall of the VMM's confinement checked
//! from outside on real VMs (real KVM, seccomp, namespaces, cgroups) in the
//! L1, with `host-agent run` (single-shot, embedded orchestrator).
//!
//! * `a_running_vmm_is_confined`: while a job runs, the scenario inspects
//!   the VMM process from the L1: every thread in seccomp filter mode
//!   (`Seccomp: 2`), and, with the jail, its uid/gid, namespaces, cgroup
//!   limits, rlimits and root directory. The job handles a secret; after it,
//!   the host agent's state directory, its log, the VMM log and the serial
//!   capture must not contain the secret's value.
//! * `a_forbidden_syscall_kills_the_vmm_and_the_job_says_so`: the
//!   `vmm-test-hooks` build makes a vCPU thread issue a forbidden syscall
//!   when the guest asks for it (after boot, mid-job); the VMM must die by
//!   SIGSYS and the job's result must say "vmm killed by seccomp".
//!
//! The scenarios print `@ SUBJECT key=value` fact lines; the tests assert
//! on them.

use std::path::PathBuf;
use std::time::Duration;

use harness::assets::kernel_and_minimal_image;
use harness::{Asset, Scenario, Status, workspace_binary};

/// A scenario with the kernel, the minimal image, `host-agent`, `vmm` and
/// `vmm-test-hooks`, and the given job files as assets.
fn scenario(name: &str, script: &str, jobs: &[(&str, &str)]) -> Scenario {
    let dir = std::env::temp_dir().join(format!("kindling-sec-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut sc = Scenario::new(name, script);
    sc.timeout = Duration::from_secs(420);
    sc.bins = vec![
        workspace_binary("vmm").unwrap(),
        workspace_binary("host-agent").unwrap(),
        // The host agent starts every VMM through it (jail on by default).
        workspace_binary("kindling-jailer").unwrap(),
        hooked_vmm(),
    ];
    sc.assets = kernel_and_minimal_image().unwrap();
    for (file, text) in jobs {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        sc.assets.push(Asset {
            host_path: path,
            name: (*file).into(),
        });
    }
    sc
}

/// The test-hooks VMM (`cargo build -p vmm --features test-hooks --bin
/// vmm-test-hooks`; scripts/test.sh does it).
fn hooked_vmm() -> PathBuf {
    workspace_binary("vmm-test-hooks").unwrap_or_else(|e| {
        panic!("{e}: build it with `cargo build -p vmm --features test-hooks --bin vmm-test-hooks`")
    })
}

/// Shell helpers shared by the scenarios.
const PRELUDE: &str = r#"
set -u
fact() { echo "@ $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
# run_agent NAME JOB VMM [SECRET]: host-agent run in the background, output
# to /tmp/NAME.log, state under /tmp/NAME-state.
run_agent() {
    host-agent run "$ASSETS/$2" --secret "TOKEN=${4:-none-given}" --vmm "$(command -v $3)" \
        --kernel "$ASSETS/vmlinux" --image "$ASSETS/minimal.erofs" --memory-mib 256 \
        --state-dir "/tmp/$1-state" > "/tmp/$1.log" 2>&1 &
}
# wait_log NAME TEXT SECONDS: waits until /tmp/NAME.log contains TEXT.
wait_log() {
    i=0
    while ! grep -q "$2" "/tmp/$1.log" 2>/dev/null; do
        i=$((i+1)); [ $i -gt $(($3 * 5)) ] && return 1; sleep 0.2
    done
}
# vmm_pid: pid of the (only) process named vmm or vmm-test-hooks.
vmm_pid() {
    for c in /proc/[0-9]*/comm; do
        case "$(cat $c 2>/dev/null)" in vmm|vmm-test-hook*) p=${c#/proc/}; echo ${p%/comm}; return;; esac
    done
}
"#;

/// Parses `@ SUBJECT k=v ...` lines into (subject, key, value) triples.
fn facts(output: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("@ ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(subject) = words.next() else {
            continue;
        };
        for word in words {
            if let Some((k, v)) = word.split_once('=') {
                out.push((subject.to_string(), k.to_string(), v.to_string()));
            }
        }
    }
    out
}

fn fact<'a>(facts: &'a [(String, String, String)], subject: &str, key: &str) -> Option<&'a str> {
    facts
        .iter()
        .find(|(s, k, _)| s == subject && k == key)
        .map(|(_, _, v)| v.as_str())
}

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
wait_log confined job-is-running 240 || { cat /tmp/confined.log; fact error why=job-never-ran; exit 1; }
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
for n in mnt pid ipc; do
    [ "$(readlink /proc/$pid/ns/$n)" != "$(readlink /proc/$agent/ns/$n)" ] && fact ns $n=own || fact ns $n=shared
done
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
    let script = format!("{PRELUDE}{CONFINED_SCRIPT}");
    let out = harness::run(&scenario(
        "sec-confined",
        &script,
        &[("confined.yaml", CONFINED_JOB)],
    ))
    .unwrap();
    let o = &out.output;
    assert_eq!(out.status, Status::Exited(0), "{}\n{o}", out.report());
    let f = facts(o);
    let threads: u32 = fact(&f, "seccomp", "threads").unwrap().parse().unwrap();
    // main + 1 vCPU + device thread at least.
    assert!(threads >= 3, "{o}");
    assert_eq!(
        fact(&f, "seccomp", "filtered"),
        Some(&*threads.to_string()),
        "{o}"
    );
    assert_eq!(fact(&f, "nnp", "value"), Some("1"), "{o}");
    // Jail: own unprivileged ids from the configured range, no capabilities,
    // PID 1 of its own PID namespace.
    let uid: u32 = fact(&f, "ids", "uid").unwrap().parse().unwrap();
    assert!(uid >= 900_000, "{o}");
    assert_eq!(fact(&f, "ids", "gid"), Some(&*uid.to_string()), "{o}");
    assert_eq!(fact(&f, "ids", "capeff"), Some("0000000000000000"), "{o}");
    assert_eq!(fact(&f, "ids", "nspid"), Some("1"), "{o}");
    for ns in ["mnt", "pid", "ipc"] {
        assert_eq!(fact(&f, "ns", ns), Some("own"), "{ns}: {o}");
    }
    // cgroup: 256 MiB guest + 64 MiB overhead, 64 pids, 1 vCPU of CPU.
    assert_eq!(fact(&f, "cgroup", "named"), Some("kindling"), "{o}");
    assert_eq!(
        fact(&f, "cgroup", "memory"),
        Some(&*((256u64 + 64) << 20).to_string()),
        "{o}"
    );
    assert_eq!(fact(&f, "cgroup", "pids"), Some("64"), "{o}");
    assert_eq!(fact(&f, "cgroup", "cpu"), Some("100000"), "{o}");
    assert_eq!(fact(&f, "rlimit", "core"), Some("0"), "{o}");
    assert_eq!(fact(&f, "rlimit", "nofile"), Some("1024"), "{o}");
    // Its root holds only what it needs: no /etc, /proc, /bin; one VM dir;
    // of the assets only the kernel and the image.
    assert_eq!(fact(&f, "root", "etc"), Some("absent"), "{o}");
    assert_eq!(fact(&f, "root", "proc"), Some("absent"), "{o}");
    assert_eq!(fact(&f, "root", "bin"), Some("absent"), "{o}");
    assert_eq!(fact(&f, "root", "vmdirs"), Some("1"), "{o}");
    assert_eq!(fact(&f, "root", "assets"), Some("2"), "{o}");
    assert_eq!(fact(&f, "agent", "rc"), Some("0"), "{o}");
    assert_ne!(
        fact(&f, "serial", "bytes"),
        Some("0"),
        "no serial capture to check:\n{o}"
    );
    assert_eq!(fact(&f, "secret", "leaks"), Some("0"), "{o}");
    assert_eq!(fact(&f, "secret", "masked"), Some("1"), "{o}");
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
    let script = format!("{PRELUDE}{HOOK_SCRIPT}");
    let out = harness::run(&scenario("sec-hook", &script, &[("hook.yaml", HOOK_JOB)])).unwrap();
    let o = &out.output;
    assert_eq!(out.status, Status::Exited(0), "{}\n{o}", out.report());
    let f = facts(o);
    assert!(o.contains("before-the-attempt"), "the job never ran:\n{o}");
    assert_eq!(fact(&f, "job", "survived"), None, "the VMM survived:\n{o}");
    assert_eq!(fact(&f, "reason", "seccomp"), Some("1"), "{o}");
    assert_eq!(fact(&f, "reason", "sigsys"), Some("1"), "{o}");
    // `host-agent run` exits 2 for infrastructure errors.
    assert_eq!(fact(&f, "agent", "rc"), Some("2"), "{o}");
    assert_eq!(fact(&f, "left", "vmms"), Some("0"), "{o}");
    assert_eq!(fact(&f, "left", "dirs"), Some("0"), "{o}");
}

/// The daemon (orchestrator + host agent with a "quiet" and a "noisy" pool,
/// one VM each): the quiet job alone, then again (up to three trials, until
/// one is within 2x) while the noisy VM runs a fork bomb, a disk filler, a
/// CPU spinner, a log flood and a serial flood.
const NOISY_SCRIPT: &str = r#"
HC=host-credential-0123456789abcdef
CC=client-credential-0123456789abcdef
export KINDLING_SERVER=http://127.0.0.1:8080 KINDLING_CLIENT_CREDENTIAL=$CC
W=/tmp/noisy
mkdir -p $W/jobs && cd $W || exit 1
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
wait_for() {
    limit=$1; shift; start=$(now)
    while ! "$@"; do
        [ "$(awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN { print (b - a >= l) }')" = 1 ] && return 1
        sleep 0.3
    done
}
agent_metrics() { timeout 10 wget -q -O - http://127.0.0.1:9100/metrics 2>/dev/null; }
idle() { agent_metrics | grep -q "kindling_host_agent_vms{pool=\"$1\",state=\"idle\"} 1"; }
submit() {
    name=$1
    ( orchestrator submit $W/jobs/$name.yaml --follow > $W/jobs/$name.out 2> $W/jobs/$name.err
      echo $? > $W/jobs/$name.rc ) &
}
ended() { [ -s $W/jobs/$1.rc ]; }
dump() { echo "--- agent log"; tail -30 $W/agent.log; echo "--- orchestrator log"; tail -10 $W/orch.log; }
die() { echo "FATAL: $*"; dump; exit 1; }

cat > $W/agent.toml <<END_OF_CONFIG
host_id = "l1-host"
state_dir = "$W/state"
vmm = "$(command -v vmm)"
metrics_listen = "127.0.0.1:9100"

[orchestrator]
url = "http://127.0.0.1:8080"
host_credential = "$HC"

[limits]
vcpus = 2
memory_mib = 512

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
orchestrator serve --listen 127.0.0.1:8080 --archive $W/archive \
    --host-credential $HC --client-credential $CC > $W/orch.log 2>&1 &
ORCH=$!
RUST_LOG=info host-agent serve --config $W/agent.toml > $W/agent.log 2>&1 &
AGENT=$!
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
wait_for 180 both_idle || die "pools never became idle"

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
wait_for 240 ended quiet1 || die "the solo quiet job did not end"
SOLO_SECONDS=$(since $T)
fact solo seconds=$SOLO_SECONDS rc=$(cat $W/jobs/quiet1.rc) guest=$(sed -n 's/^guest-seconds //p' $W/jobs/quiet1.out)
wait_for 180 idle quiet || die "no new quiet VM"

# 2. with a noisy neighbour
submit noisy
noise() { grep -q noise-started $W/jobs/noisy.out 2>/dev/null; }
wait_for 240 noise || die "the noisy job never started"
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
    wait_for 180 idle quiet || die "no idle quiet VM for trial $n"
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
    let script = format!("{PRELUDE}{NOISY_SCRIPT}");
    let mut sc = scenario("sec-noisy", &script, &[]);
    sc.bins.push(workspace_binary("orchestrator").unwrap());
    sc.timeout = Duration::from_secs(900);
    let out = harness::run(&sc).unwrap();
    let o = &out.output;
    assert_eq!(out.status, Status::Exited(0), "{}\n{o}", out.report());
    let f = facts(o);
    let secs = |subject| -> f64 {
        fact(&f, subject, "seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {subject} time:\n{o}"))
    };
    assert_eq!(fact(&f, "solo", "rc"), Some("0"), "{o}");
    assert_eq!(fact(&f, "noisy", "rc"), Some("0"), "{o}");
    // The noise must still be there when the quiet job ends, or the timing
    // proves nothing.
    assert_eq!(fact(&f, "neighbour", "still_running"), Some("1"), "{o}");
    let (solo, noisy) = (secs("solo"), secs("noisy"));
    let trials = fact(&f, "noisy", "trials").unwrap_or("?");
    assert!(
        noisy <= 2.0 * solo,
        "solo {solo} s, with a noisy neighbour {noisy} s (the last of {trials} trials):\n{o}"
    );
    assert_eq!(fact(&f, "metrics", "answered"), None, "{o}");
    let worst: f64 = fact(&f, "metrics", "worst_seconds")
        .unwrap()
        .parse()
        .unwrap();
    assert!(worst < 5.0, "metrics took {worst} s:\n{o}");
    assert_eq!(fact(&f, "agent", "alive"), Some("1"), "{o}");
    assert_eq!(fact(&f, "isolation", "vms"), Some("2"), "{o}");
    assert_eq!(fact(&f, "isolation", "noisy_sees"), Some("1"), "{o}");
    assert_eq!(fact(&f, "isolation", "quiet_sees"), Some("1"), "{o}");
}
