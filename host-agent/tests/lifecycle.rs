//! The whole host-side lifecycle on loopback, without KVM: a real
//! orchestrator server, the real host agent, and the real runner agent
//! standing in for the guest. The "VMM" is a script that takes the VMM's
//! flags and runs the runner agent against the vsock socket path the host
//! agent listens on (`unix:` endpoint instead of vsock).

mod common;
use common::workspace_binary;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use host_agent::agent::Agent;
use host_agent::config::{Config, Limits, OrchestratorConfig, PoolConfig};
use orchestrator::auth::Credentials;
use orchestrator::client::ApiClient;
use orchestrator::config::{Limits as OrchestratorLimits, ServerConfig};
use orchestrator::server::Server;
use protocol::api::{JobEventKind, JobState, SubmitJobRequest};
use protocol::job::JobSpec;
use protocol::message::{JobId, Secrets};

const HOST: &str = "host-credential-0123456789";
const CLIENT: &str = "client-credential-0123456789";

fn fake_vmm(dir: &Path) -> PathBuf {
    let agent = workspace_binary("runner-agent");
    let path = dir.join("fake-vmm");
    let script = format!(
        r#"#!/bin/sh
# Stand-in VMM: finds the vsock socket in its flags and runs the runner agent on it.
uds=""
for a in "$@"; do case "$a" in cid=*,uds=*) uds="${{a#*uds=}}";; esac; done
[ -n "$uds" ] || {{ echo "fake-vmm: no --vsock flag" >&2; exit 2; }}
exec {agent} --connect "unix:${{uds}}_10000" --workspace "$(dirname "$uds")/ws" --heartbeat-ms 500 --log warn
"#,
        agent = agent.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

struct World {
    _dir: tempfile::TempDir,
    state: PathBuf,
    client: ApiClient,
    agent: Option<Agent>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn world(pools: &[(&str, &[&str], u32)]) -> World {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::bind(ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        archive_dir: dir.path().join("archive"),
        credentials: Credentials::new(HOST, CLIENT).unwrap(),
        limits: OrchestratorLimits::default(),
        tls: None,
        allow_insecure_http: false,
    })
    .await
    .unwrap();
    let url = format!("http://{}", server.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    for f in ["vmlinux", "image"] {
        std::fs::write(dir.path().join(f), b"x").unwrap();
    }
    let state = dir.path().join("state");
    let config = Config {
        host_id: "test-host".into(),
        state_dir: state.clone(),
        vmm: fake_vmm(dir.path()),
        metrics_listen: None,
        shutdown_grace_secs: 60,
        network: Default::default(),
        orchestrator: OrchestratorConfig {
            url: url.clone(),
            host_credential: HOST.into(),
            ca_cert: None,
            allow_insecure_http: false,
        },
        limits: Limits {
            vcpus: 64,
            memory_mib: 65536,
        },
        pools: pools
            .iter()
            .map(|(name, labels, size)| PoolConfig {
                name: name.to_string(),
                labels: labels.iter().map(|l| l.to_string()).collect(),
                size: *size,
                vcpus: 1,
                memory_mib: 128,
                kernel: dir.path().join("vmlinux"),
                image: dir.path().join("image"),
                cmdline_extra: String::new(),
                boot_timeout_secs: 20,
                log_kib_per_sec: 0,
                network: Default::default(),
                allow: Vec::new(),
                rate_limit: Default::default(),
                conntrack_limit: host_agent::config::DEFAULT_CONNTRACK_LIMIT,
            })
            .collect(),
        // A script stands in for the VMM here: no jail.
        jail: host_agent::jail::JailConfig {
            enabled: false,
            ..Default::default()
        },
    };
    config.validate().unwrap();
    let agent = Agent::start(config, false).await.unwrap();
    World {
        _dir: dir,
        state,
        client: ApiClient::new(&url).unwrap(),
        agent: Some(agent),
        stop: Some(stop),
    }
}

impl World {
    async fn submit(&self, yaml: &str, secrets: &[(&str, &str)]) -> JobId {
        let spec = JobSpec::from_yaml(yaml).unwrap();
        let secrets = Secrets(
            secrets
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        self.client
            .submit(CLIENT, &SubmitJobRequest { spec, secrets })
            .await
            .unwrap()
    }

    /// Follows a job to its end: (final state, stdout+stderr text).
    async fn follow(&self, id: &JobId) -> (JobState, String) {
        let mut out = Vec::new();
        let report = tokio::time::timeout(
            Duration::from_secs(60),
            self.client.follow(CLIENT, id, |e| {
                if let JobEventKind::LogChunk(c) = &e.event {
                    out.extend_from_slice(&c.data);
                }
            }),
        )
        .await
        .expect("job did not finish within 60 s")
        .unwrap();
        (
            report.status.state,
            String::from_utf8_lossy(&out).into_owned(),
        )
    }

    async fn shutdown(mut self) {
        self.agent
            .take()
            .unwrap()
            .shutdown(Duration::from_secs(10))
            .await;
        let _ = self.stop.take().unwrap().send(());
        let left = std::fs::read_dir(self.state.join("vms"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "VM directories left after shutdown");
        let records = host_agent::records::records_dir(&self.state);
        let (records, junk) = host_agent::records::read_all(&records).unwrap();
        assert!(
            records.is_empty() && junk.is_empty(),
            "VM records left after shutdown: {records:?} {junk:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_run_on_matching_pools_with_intact_logs() {
    let w = world(&[("a", &["linux", "small"], 2), ("b", &["linux", "big"], 1)]).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let label = if i % 2 == 0 { "small" } else { "big" };
        let yaml = format!(
            "name: job{i}\nruns-on: [linux, {label}]\nsteps:\n  - run: for n in $(seq 1 50); do echo job{i} line $n; done\n  - run: echo secret is $TOKEN; echo err >&2\n"
        );
        ids.push(w.submit(&yaml, &[("TOKEN", "hunter2-secret")]).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let (state, out) = w.follow(id).await;
        assert_eq!(state, JobState::Succeeded, "job{i}: {out}");
        let expected: String = (1..=50).map(|n| format!("job{i} line {n}\n")).collect();
        assert!(
            out.starts_with(&expected),
            "job{i} log out of order:\n{out}"
        );
        assert!(!out.contains("hunter2-secret"), "secret leaked: {out}");
        assert!(out.contains("secret is ***"), "{out}");
    }
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_step_fails_the_job_and_the_vm_is_replaced() {
    let w = world(&[("a", &["linux"], 1)]).await;
    let id = w.submit("name: f\nruns-on: [linux]\nsteps:\n  - run: echo one\n  - run: exit 3\n  - run: echo never\n", &[]).await;
    let (state, out) = w.follow(&id).await;
    assert_eq!(state, JobState::Failed { step: 1 });
    assert!(!out.contains("never"));
    // The pool's only VM was destroyed; a replacement takes the next job.
    let id = w
        .submit(
            "name: g\nruns-on: [linux]\nsteps:\n  - run: echo again\n",
            &[],
        )
        .await;
    let (state, out) = w.follow(&id).await;
    assert_eq!(state, JobState::Succeeded);
    assert_eq!(out, "again\n");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_mid_step_ends_the_job() {
    let w = world(&[("a", &["linux"], 1)]).await;
    let id = w
        .submit(
            "name: c\nruns-on: [linux]\nsteps:\n  - run: echo started; sleep 300\n",
            &[],
        )
        .await;
    // Wait until the step has printed, then cancel.
    let mut after = 0;
    'outer: loop {
        let page = w.client.events(CLIENT, &id, after, 5).await.unwrap();
        for e in &page.events {
            if matches!(e.event, JobEventKind::LogChunk(_)) {
                break 'outer;
            }
        }
        after = page.next_seq;
    }
    let t = std::time::Instant::now();
    w.client
        .cancel(CLIENT, &id, Some("test".into()))
        .await
        .unwrap();
    let (state, _) = w.follow(&id).await;
    assert_eq!(state, JobState::Cancelled);
    // The next job gets a fresh VM promptly (the cancelled one was torn down).
    let id = w
        .submit(
            "name: d\nruns-on: [linux]\nsteps:\n  - run: echo next\n",
            &[],
        )
        .await;
    let (state, _) = w.follow(&id).await;
    assert_eq!(state, JobState::Succeeded);
    assert!(t.elapsed() < Duration::from_secs(30));
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_vmm_fails_its_job_with_a_reason() {
    let w = world(&[("a", &["linux"], 1)]).await;
    let id = w
        .submit(
            "name: k\nruns-on: [linux]\nsteps:\n  - run: echo up; sleep 300\n",
            &[],
        )
        .await;
    // Wait for the step to run, then kill -9 the VMM (here: the agent process).
    let mut killed = false;
    for _ in 0..200 {
        // The agent's own records (never a file in the VM directory).
        let records = host_agent::records::records_dir(&w.state);
        let pids: Vec<i32> = host_agent::records::read_all(&records)
            .unwrap()
            .0
            .iter()
            .filter_map(|r| r.process)
            .map(|p| p.pid)
            .collect();
        let page = w.client.events(CLIENT, &id, 0, 0).await.unwrap();
        let running = page
            .events
            .iter()
            .any(|e| matches!(e.event, JobEventKind::LogChunk(_)));
        if running && let Some(pid) = pids.first() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            killed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(killed, "never saw the job running");
    let (state, _) = w.follow(&id).await;
    let JobState::Error { reason } = &state else {
        panic!("{state:?}")
    };
    assert!(reason.contains("during step 1"), "{reason}");
    w.shutdown().await;
}
