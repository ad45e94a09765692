//! End-to-end in the nested harness: real VMM, real guest kernel, the
//! minimal image with the runner agent as PID 1, real vsock, driven by the
//! host agent's single-shot mode with its embedded orchestrator.

use std::time::Duration;

use harness::{Scenario, Status, e2e};

/// A scenario that runs `job` (YAML text) with `host-agent run` in a fresh VM.
fn job_scenario(name: &str, job: &str, secret: &str) -> Scenario {
    let script = format!(
        "host-agent run $ASSETS/job.yaml --secret TOKEN={secret} --vmm $(command -v vmm) \
         --kernel $ASSETS/vmlinux --image $ASSETS/minimal.erofs --memory-mib 256 \
         --state-dir /tmp/agent-state\n\
         rc=$?\n\
         vmms=0; for c in /proc/[0-9]*/comm; do [ \"$(cat $c 2>/dev/null)\" = vmm ] && vmms=$((vmms+1)); done\n\
         echo \"left: $(ls /tmp/agent-state/vms | wc -l) vm dirs, $vmms vmm processes\"\n\
         exit $rc\n"
    );
    e2e::scenario(
        name,
        &script,
        Duration::from_secs(300),
        // The host agent starts every VMM through the jailer (jail on by
        // default).
        &["vmm", "host-agent", "kindling-jailer"],
        &[("job.yaml", job)],
    )
    .unwrap()
}

#[test]
fn a_three_step_job_streams_masked_logs_in_order_and_the_vm_goes_away() {
    let job = "name: three-steps
runs-on: [linux]
steps:
  - name: to stderr
    run: echo first-out; echo first-err >&2
  - name: secret
    run: echo \"token=$TOKEN\"
  - name: fails
    run: echo before-fail; exit 3
  - name: never
    run: echo never-runs
";
    let out = harness::run(&job_scenario("three-steps", job, "pa55-w0rd-xyz")).unwrap();
    // host-agent run exits 1 when a step fails.
    assert_eq!(
        out.status,
        Status::Exited(1),
        "{}\n{}",
        out.report(),
        out.output
    );
    let o = &out.output;
    let pos = |needle: &str| {
        o.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing in:\n{o}"))
    };
    assert!(pos("first-out") < pos("token=***"));
    assert!(pos("first-err") < pos("token=***"));
    assert!(pos("token=***") < pos("before-fail"));
    assert!(!o.contains("pa55-w0rd-xyz"), "secret leaked:\n{o}");
    assert!(!o.contains("never-runs"));
    assert!(o.contains("<== step 3: exit 3"), "{o}");
    assert!(o.contains("failed at step 3"), "{o}");
    assert!(o.contains("left: 0 vm dirs, 0 vmm processes"), "{o}");
}

#[test]
fn a_job_over_its_timeout_is_killed_and_reported() {
    let job = "name: slow
runs-on: [linux]
steps:
  - name: sleeps
    timeout-minutes: 1
    run: echo sleeping; sleep 600
";
    let out = harness::run(&job_scenario("timeout", job, "x1234567")).unwrap();
    assert_eq!(
        out.status,
        Status::Exited(2),
        "{}\n{}",
        out.report(),
        out.output
    );
    assert!(out.output.contains("timed out in step 1"), "{}", out.output);
    assert!(
        out.output.contains("left: 0 vm dirs, 0 vmm processes"),
        "{}",
        out.output
    );
}
