//! Nested-harness tests: the KVM smoke program runs inside the L1, and every
//! way a scenario can go wrong is reported as a failure, never as a pass.
//!
//! These boot a real L1 under QEMU; run them through `scripts/test.sh`, which
//! installs QEMU and the L1 kernel first.

use std::time::Duration;

use harness::{Scenario, Status, workspace_binary};

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
fn an_l2_triple_fault_is_rerun_only_as_often_as_the_scenario_asks() {
    // The VMM's triple-fault line in a failed run's output looks, from the
    // harness, exactly like the emulator's L2 fault.
    let line = format!("vmm: VM stopped: vCPU 0: {}", harness::run::L2_TRIPLE_FAULT);
    let mut sc = scenario("triple-fault", &format!("echo '{line}'; exit 1"), 60);
    sc.l2_triple_fault_reruns = 1;
    let out = harness::run(&sc).unwrap();
    assert_eq!(out.status, Status::Exited(1), "{}", out.report());
    assert!(out.output.contains(&line), "{}", out.output);
    let kept = |n: u32| out.workdir.join(format!("output-attempt{n}.log"));
    assert!(kept(1).exists(), "no rerun: {}", out.report());
    assert!(
        !kept(2).exists(),
        "more reruns than asked: {}",
        out.report()
    );
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
