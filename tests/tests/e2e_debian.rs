//! End-to-end with the Debian image in the nested harness: real VMM, real
//! guest kernel, the Debian 12 image with the runner agent as PID 1, driven
//! by `host-agent run`. The job checks the tools a CI job expects (git,
//! curl, a C compiler) and that `dockerd` starts and answers `docker info`
//! inside the microVM (no image pull: there is no network).
//!
//! Memory: the VM gets 1024 MiB (dockerd + containerd need ~150 MiB, and
//! the overlay's tmpfs layer holds what dockerd writes); first touch of L2
//! memory costs ~42 us a page, but only touched pages count, so a larger VM
//! costs little boot time. The L1 gets 2048 MiB: the VM, the initramfs
//! (debug binaries, guest kernel) and the host agent's state; the image
//! stays on its read-only disk.

use std::time::Duration;

use harness::assets::{debian_image, guest_kernel};
use harness::{Asset, Scenario, Status, workspace_binary};

/// Runs `sc` with the VMM, host agent and jailer on its `PATH` and the
/// guest kernel, the Debian image and `job_path` as assets; removes `dir`
/// (the job file's directory) and asserts that the script exited 0.
fn run_passing(
    mut sc: Scenario,
    dir: &std::path::Path,
    job_path: std::path::PathBuf,
) -> harness::Outcome {
    sc.bins = vec![
        workspace_binary("vmm").unwrap(),
        workspace_binary("host-agent").unwrap(),
        // The host agent starts every VMM through it (jail on by default).
        workspace_binary("kindling-jailer").unwrap(),
    ];
    // The image (391 MiB) reaches the L1 as a read-only virtio disk, and
    // the host agent hands that block device to the VMM as it is.
    sc.assets = vec![
        Asset {
            host_path: guest_kernel().unwrap(),
            name: "vmlinux".into(),
        },
        Asset {
            host_path: debian_image().unwrap(),
            name: "debian.erofs".into(),
        },
        Asset {
            host_path: job_path,
            name: "job.yaml".into(),
        },
    ];
    let out = harness::run(&sc).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(
        out.status,
        Status::Exited(0),
        "{}\n{}",
        out.report(),
        out.output
    );
    out
}

const JOB: &str = r#"name: debian-tools
runs-on: [linux]
timeout-minutes: 10
steps:
  - name: git
    run: git --version
  - name: curl
    run: curl --version
  - name: cc
    run: cc --version
  - name: docker
    timeout-minutes: 5
    run: |
      # containerd first, waited for: dockerd gives the containerd it
      # starts itself only a few seconds, and under nested emulation its
      # first exec once took 14 s (page-faulting in a 40 MB binary).
      containerd >/tmp/containerd.log 2>&1 &
      i=0
      until [ -S /run/containerd/containerd.sock ]; do
        i=$((i + 1))
        if [ "$i" -ge 240 ] || ! kill -0 $! 2>/dev/null; then
          echo "containerd did not come up after $i tries; its log:"
          tail -n 40 /tmp/containerd.log
          exit 1
        fi
        sleep 0.5
      done
      echo "containerd up after $i retries"
      dockerd --containerd=/run/containerd/containerd.sock >/tmp/dockerd.log 2>&1 &
      i=0
      until docker info >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge 240 ] || ! kill -0 $! 2>/dev/null; then
          echo "dockerd did not answer after $i tries; its log:"
          tail -n 40 /tmp/dockerd.log
          exit 1
        fi
        sleep 0.5
      done
      echo "dockerd answered after $i retries"
      docker info --format 'docker-info: server={{.ServerVersion}} driver={{.Driver}} cgroup={{.CgroupVersion}} containers={{.Containers}}'
"#;

#[test]
fn debian_image_has_git_curl_cc_and_a_working_dockerd() {
    let dir = std::env::temp_dir().join(format!("kindling-e2e-debian-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let job_path = dir.join("job.yaml");
    std::fs::write(&job_path, JOB).unwrap();
    let script = "host-agent run $ASSETS/job.yaml --vmm $(command -v vmm) \
                  --kernel $ASSETS/vmlinux --image $ASSETS/debian.erofs \
                  --vcpus 1 --memory-mib 1024 --boot-timeout 180 \
                  --state-dir /tmp/agent-state\n\
                  rc=$?\n\
                  echo \"left: $(ls /tmp/agent-state/vms | wc -l) vm dirs, $(pidof vmm | wc -w) vmm processes\"\n\
                  exit $rc\n";
    let mut sc = Scenario::new("debian-tools", script);
    sc.timeout = Duration::from_secs(600);
    sc.l1_memory_mib = 2048;
    // `dockerd`'s start triple-faulted the L2 once in CI under QEMU 7.2
    // (QEMU TCG's emulated SVM; see `harness::run::l2_triple_faults`).
    sc.l2_triple_fault_reruns = 2;
    let out = run_passing(sc, &dir, job_path);
    let o = &out.output;
    for needle in [
        "git version 2.",
        "curl 7.",
        "cc (Debian",
        "dockerd answered after",
        "driver=overlay2",
        "cgroup=2",
        "<== step 4: exit 0",
        "succeeded",
        "left: 0 vm dirs, 0 vmm processes",
    ] {
        assert!(o.contains(needle), "{needle:?} missing in:\n{o}");
    }
    assert!(
        o.find("git version") < o.find("curl 7.") && o.find("curl 7.") < o.find("cc (Debian"),
        "steps out of order:\n{o}"
    );
}

/// A job that wedges its guest: with RT throttling off, a SCHED_FIFO spin
/// on the VM's one vCPU starves everything else in the guest, the runner
/// agent's heartbeat included, while the vCPU runs flat out. From the host
/// this is the shape of the L2 hangs QEMU TCG's emulated SVM causes now and
/// then (README, "Soak").
const WEDGE_JOB: &str = r#"name: wedge
runs-on: [linux]
timeout-minutes: 4
steps:
  - name: wedge the guest
    run: |
      echo -1 > /proc/sys/kernel/sched_rt_runtime_us
      echo "wedging the guest"
      sleep 1
      exec chrt -f 99 sh -c 'while :; do :; done'
"#;

#[test]
fn a_wedged_guest_fails_its_job_as_a_guest_hang_with_its_vcpu_load() {
    let dir = std::env::temp_dir().join(format!("kindling-e2e-wedge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let job_path = dir.join("job.yaml");
    std::fs::write(&job_path, WEDGE_JOB).unwrap();
    let script = "host-agent run $ASSETS/job.yaml --vmm $(command -v vmm) \
                  --kernel $ASSETS/vmlinux --image $ASSETS/debian.erofs \
                  --vcpus 1 --memory-mib 512 --boot-timeout 180 \
                  --state-dir /tmp/agent-state\n\
                  echo \"host-agent run exit $?\"\n\
                  echo \"left: $(ls /tmp/agent-state/vms | wc -l) vm dirs, $(pidof vmm | wc -w) vmm processes\"\n";
    let mut sc = Scenario::new("debian-wedge", script);
    sc.timeout = Duration::from_secs(480);
    sc.l1_memory_mib = 1536;
    // The hang is this test's result, not the emulator's fault.
    sc.l2_hangs_expected = true;
    let out = run_passing(sc, &dir, job_path);
    let o = &out.output;
    // Exit 2: an infrastructure error, not the job's own failure.
    for needle in [
        "guest hang: silent for 30s during step 1 while a vCPU ran",
        "the guest kernel is wedged",
        "host-agent run exit 2",
        "left: 0 vm dirs, 0 vmm processes",
    ] {
        assert!(o.contains(needle), "{needle:?} missing in:\n{o}");
    }
    assert!(out.l2_hangs > 0, "the harness counts the report: {out:?}");
}
