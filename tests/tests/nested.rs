//! Nested-harness tests: the KVM smoke program runs inside the L1, every
//! way a scenario can go wrong is reported as a failure, never as a pass,
//! an L2 triple fault is rerun however the scenario ends, and the L1 dies
//! with the harness, whatever signal kills it.
//!
//! These boot a real L1 under QEMU; run them through `scripts/test.sh`, which
//! installs QEMU and the L1 kernel first.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{Asset, Scenario, Status, workspace_binary};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn scenario(name: &str, script: &str, timeout_s: u64) -> Scenario {
    let mut sc = Scenario::new(name, script);
    sc.timeout = Duration::from_secs(timeout_s);
    sc
}

#[test]
fn kvm_smoke_enters_long_mode_inside_the_l1() {
    let smoke = workspace_binary("kvm-smoke").unwrap();
    let mut sc = scenario("kvm-smoke", "kvm-smoke", 120);
    sc.bins.push(smoke);
    let out = harness::run(&sc).unwrap();
    assert!(out.success(), "{}\n{}", out.report(), out.output);
    assert!(out.output.contains("kvm-smoke: OK"), "{}", out.output);
    assert!(out.timings.l1_boot.is_some(), "no L1 ready marker");
}

#[test]
fn a_failing_script_is_a_failure_with_its_exit_code() {
    let out = harness::run(&scenario("exit-3", "echo before; exit 3", 60)).unwrap();
    assert_eq!(out.status, Status::Exited(3), "{}", out.report());
    assert_eq!(out.output, "before\n");
    assert!(!out.success());
}

#[test]
fn a_hung_scenario_is_killed_and_reported() {
    let out = harness::run(&scenario("hang", "sleep 600", 20)).unwrap();
    assert_eq!(out.status, Status::TimedOut, "{}", out.report());
    assert!(out.timings.total < Duration::from_secs(40));
    assert!(
        !out.console_tail.is_empty(),
        "a timeout report must carry the console tail"
    );
}

#[test]
fn a_frozen_l1_is_killed_early_rerun_and_reported_with_its_vcpus() {
    // Stopping the L1's heartbeat looks, from the host, exactly like an L1
    // that froze whole.
    let mut sc = scenario(
        "freeze",
        &format!(
            "kill -STOP $(cat {}) && echo beat stopped; sleep 600",
            harness::heartbeat::BEAT_PID_FILE
        ),
        280,
    );
    sc.freeze_limit = Duration::from_secs(10);
    let out = harness::run(&sc).unwrap();
    assert!(
        matches!(out.status, Status::L1Frozen(s) if (10..20).contains(&s)),
        "{}",
        out.report()
    );
    assert_eq!(out.output, "beat stopped\n");
    for attempt in 1..=harness::run::L1_FAULT_RERUNS {
        for log in ["console", "output", "heartbeat", "l1-frozen-vcpus"] {
            let kept = out.workdir.join(format!("{log}-attempt{attempt}.log"));
            assert!(kept.exists(), "a frozen L1 is rerun: no {}", kept.display());
        }
    }
    assert!(
        out.timings.total < Duration::from_secs(200),
        "{}",
        out.report()
    );
    let vcpus = std::fs::read_to_string(out.workdir.join("l1-frozen-vcpus.log")).unwrap();
    assert!(vcpus.contains("RIP="), "QEMU's monitor said: {vcpus}");
}

#[test]
fn an_l2_triple_fault_is_rerun_however_the_scenario_ends() {
    // A real L2 triple fault: a tiny guest whose first instruction is
    // `ud2`, with no IDT (#UD, #GP, #DF, shutdown), under our VMM in the
    // L1. The script hides the VMM's words and exits 0, as a scenario
    // whose facts were spoiled by the emulator's fault may: the L1
    // kernel's report alone must make the harness rerun it once, then
    // fail it.
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("ud2.elf");
    tiny_elf(&guest, &[0x0f, 0x0b]);
    let mut sc = scenario(
        "triple-fault",
        "vmm --kernel $ASSETS/ud2.elf --memory-mib 32 >/dev/null 2>&1; echo vmm-exit=$?",
        120,
    );
    sc.bins.push(workspace_binary("vmm").unwrap());
    sc.assets.push(Asset {
        host_path: guest,
        name: "ud2.elf".into(),
    });
    assert_eq!(sc.l2_triple_fault_reruns, 1, "the default");
    let out = harness::run(&sc).unwrap();
    assert_eq!(out.status, Status::L2TripleFault(1), "{}", out.report());
    assert!(!out.success());
    assert_eq!(out.l2_triple_faults, 1, "{}", out.report());
    assert_eq!(out.output, "vmm-exit=1\n", "{}", out.report());
    let kept = |n: u32| out.workdir.join(format!("output-attempt{n}.log"));
    assert!(kept(1).exists(), "no rerun: {}", out.report());
    assert!(
        !kept(2).exists(),
        "more reruns than asked: {}",
        out.report()
    );
    let console = std::fs::read_to_string(out.workdir.join("console.log")).unwrap();
    let seen: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("kvm_userspace_exit"))
        .collect();
    println!("the L1 kernel's report: {seen:?}");
    assert_eq!(harness::run::l2_triple_faults(&console), 1, "{seen:?}");
}

/// Writes a minimal ELF64 executable whose one PT_LOAD segment puts `code`
/// at 1 MiB, entered there in 64-bit mode (the VMM loads it as a kernel).
fn tiny_elf(path: &Path, code: &[u8]) {
    const LOAD: u64 = 0x10_0000;
    const OFFSET: u64 = 0x1000;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
    let len = code.len() as u64;
    for word in [OFFSET, LOAD, LOAD, len, len, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.resize(OFFSET as usize, 0);
    elf.extend_from_slice(code);
    std::fs::write(path, elf).unwrap();
}

#[test]
fn killing_the_harness_by_any_signal_ends_its_l1() {
    // A CI timeout's SIGTERM, a SIGINT sent to the harness alone (not to
    // its process group, as a terminal's ^C is), and SIGKILL: QEMU must
    // not outlive the harness, or it burns both cores, orphaned.
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGKILL] {
        let dir = tempfile::tempdir().unwrap();
        let err = std::fs::File::create(dir.path().join("harness.err")).unwrap();
        let mut harness = Command::new(env!("CARGO_BIN_EXE_harness"))
            .args(["run", "--mode", "nested", "--quiet", "--timeout", "900"])
            .args(["--name", &format!("killed-by-{}", signal.as_str())])
            .arg("--workdir")
            .arg(dir.path())
            .args(["-c", "echo the-scenario-runs; sleep 300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let qemu = wait_for_the_scenario(dir.path(), &mut harness);
        kill(Pid::from_raw(harness.id() as i32), signal).unwrap();
        let status = harness.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while qemu.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if qemu.alive() {
            let _ = kill(Pid::from_raw(qemu.pid), Signal::SIGKILL);
            panic!(
                "QEMU (pid {}) outlived the harness killed by {signal} ({status}) by 5 s",
                qemu.pid
            );
        }
    }
}

/// A process, told apart from a later one with its pid by its start time.
struct Process {
    pid: i32,
    start: String,
}

impl Process {
    /// The process with `pid` now, if there is one, named `comm`.
    fn find(pid: i32, comm: &str) -> Option<Process> {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let start = stat_field(&stat, 22)?;
        name.trim_end()
            .starts_with(comm)
            .then_some(Process { pid, start })
    }

    /// Whether it still runs (a zombie does not).
    fn alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        stat_field(&stat, 22).as_deref() == Some(&self.start)
            && stat_field(&stat, 3).as_deref() != Some("Z")
    }
}

/// Field `n` (1-based, as in proc(5)) of a `/proc/PID/stat` line.
fn stat_field(stat: &str, n: usize) -> Option<String> {
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n - 3).map(str::to_string)
}

/// Waits until the harness running in `workdir` has its scenario running
/// in the L1 (after the machine-wide run lock and the L1's boot), and
/// returns its QEMU.
fn wait_for_the_scenario(workdir: &Path, harness: &mut Child) -> Process {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        if let Some(status) = harness.try_wait().unwrap() {
            let err = std::fs::read_to_string(workdir.join("harness.err")).unwrap_or_default();
            panic!("the harness ended early ({status}):\n{err}");
        }
        let output = std::fs::read_to_string(workdir.join("output.log")).unwrap_or_default();
        if output.contains("the-scenario-runs") {
            let pid = std::fs::read_to_string(workdir.join(harness::nested::QEMU_PID_FILE))
                .expect("the harness writes its QEMU's pid");
            let pid: i32 = pid.trim().parse().unwrap();
            return Process::find(pid, "qemu-system")
                .unwrap_or_else(|| panic!("pid {pid} is not a running QEMU"));
        }
        if Instant::now() >= deadline {
            let _ = harness.kill();
            panic!("the scenario never ran");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_l1_panic_is_reported_with_the_console_tail() {
    let out = harness::run(&scenario(
        "panic",
        "echo c > /proc/sysrq-trigger; sleep 30",
        60,
    ))
    .unwrap();
    assert_eq!(out.status, Status::L1Panic, "{}", out.report());
    assert!(
        out.console_tail.contains("Kernel panic"),
        "{}",
        out.console_tail
    );
}

#[test]
fn assets_are_visible_whether_copied_or_attached_as_disks() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.txt");
    std::fs::write(&small, "small asset\n").unwrap();
    // Over the initramfs limit: attached as a read-only virtio-blk disk.
    let big = dir.path().join("big.img");
    let mut data = vec![0u8; (harness::nested::INITRAMFS_ASSET_LIMIT + (1 << 20)) as usize];
    data[..10].copy_from_slice(b"big asset\n");
    let tail = data.len() - 8;
    data[tail..].copy_from_slice(b"the end\n");
    std::fs::write(&big, &data).unwrap();
    let mut sc = scenario(
        "assets",
        "cat $ASSETS/small.txt; head -c 10 $ASSETS/big.img; tail -c 8 $ASSETS/big.img; \
         if echo ro > $ASSETS/big.img 2>/dev/null; then echo WRITABLE; fi",
        90,
    );
    sc.assets
        .push(harness::Asset::parse(small.to_str().unwrap()).unwrap());
    sc.assets
        .push(harness::Asset::parse(big.to_str().unwrap()).unwrap());
    let out = harness::run(&sc).unwrap();
    assert!(out.success(), "{}\n{}", out.report(), out.output);
    assert_eq!(
        out.output,
        "small asset\nbig asset\nthe end\n",
        "{}",
        out.report()
    );
}
