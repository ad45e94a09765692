//! `host-agent run` (single-shot mode) on loopback without KVM: the real
//! embedded orchestrator, the real host agent, and the real runner agent
//! behind a script standing in for the VMM. The summary's "VMs left on
//! this host" must count what is really left.

mod common;
use common::workspace_binary;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use host_agent::config::PoolNetwork;
use host_agent::single_shot::{EXIT_LEFTOVERS, RunOptions, run};

/// A stand-in VMM running the runner agent on the vsock socket path; with
/// `leave`, it first starts a process in a session of its own (out of the
/// VMM's process group, so the teardown's group kill misses it; and
/// orphaned, so the runner agent does not kill it as its descendant) whose
/// command line names the VM's directory, and writes its pid to `leave`.
fn fake_vmm(dir: &Path, leave: Option<&Path>) -> PathBuf {
    let agent = workspace_binary("runner-agent");
    let path = dir.join("fake-vmm");
    let escape = match leave {
        Some(pidfile) => format!(
            "(setsid sh -c 'sleep 600' leftover \"$uds\" </dev/null >/dev/null 2>&1 & echo $! > {})\n",
            pidfile.display()
        ),
        None => String::new(),
    };
    let script = format!(
        r#"#!/bin/sh
uds=""
for a in "$@"; do case "$a" in cid=*,uds=*) uds="${{a#*uds=}}";; esac; done
[ -n "$uds" ] || {{ echo "fake-vmm: no --vsock flag" >&2; exit 2; }}
{escape}exec {agent} --connect "unix:${{uds}}_10000" --workspace "$(dirname "$uds")/ws" --heartbeat-ms 500 --log warn
"#,
        agent = agent.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn options(dir: &Path, vmm: PathBuf) -> RunOptions {
    let job = dir.join("job.yaml");
    std::fs::write(
        &job,
        "name: hello\nruns-on: [linux]\nsteps:\n  - run: echo hello\n",
    )
    .unwrap();
    for f in ["vmlinux", "image"] {
        std::fs::write(dir.join(f), b"x").unwrap();
    }
    RunOptions {
        job,
        secrets: Vec::new(),
        vmm,
        kernel: dir.join("vmlinux"),
        image: dir.join("image"),
        vcpus: 1,
        memory_mib: 128,
        state_dir: Some(dir.join("state")),
        boot_timeout_secs: 20,
        jail: false,
        network: PoolNetwork::None,
        dns: None,
        rate_limit: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_leaves_nothing_and_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = fake_vmm(dir.path(), None);
    let code = run(options(dir.path(), vmm)).await.unwrap();
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_left_behind_is_counted_and_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("leftover.pid");
    let vmm = fake_vmm(dir.path(), Some(&pidfile));
    let code = run(options(dir.path(), vmm)).await.unwrap();
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(alive, "the escaped process should still have been running");
    assert_eq!(code, EXIT_LEFTOVERS, "a leftover process must fail the run");
}
