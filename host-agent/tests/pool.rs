//! A slot's resilience on loopback, without KVM: a real orchestrator and
//! the real host agent. The "VMM" is a script that runs the real runner
//! agent against the host agent's vsock socket path, except for one VM
//! whose guest is played by the test (see [`TestGuest`]): a guest that
//! goes silent after `Ready`, or one that can no longer receive.

mod common;
use common::workspace_binary;

use std::io::Read;
use std::net::{Shutdown, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use host_agent::agent::Agent;
use host_agent::config::{Config, Limits, OrchestratorConfig, PoolConfig};
use host_agent::pool::Tuning;
use orchestrator::auth::Credentials;
use orchestrator::client::ApiClient;
use orchestrator::config::{Limits as OrchestratorLimits, ServerConfig};
use orchestrator::server::Server;
use protocol::api::{JobState, SubmitJobRequest};
use protocol::frame::FrameDecoder;
use protocol::job::JobSpec;
use protocol::message::{GuestHello, GuestMessage, HostMessage, JobId, PROTOCOL_VERSION, Secrets};
use protocol::ports::{RUNNER_AGENT_PORT, host_listener_path};
use protocol::{read_frame, write_frame};

const HOST: &str = "host-credential-0123456789";
const CLIENT: &str = "client-credential-0123456789";
/// Guest silence after which the agent replaces an idle VM, in these tests.
const IDLE_SILENCE: Duration = Duration::from_secs(3);

/// The stand-in VMM. It appends its pid and VM directory to `vmms` in the
/// test directory; if the file `next-guest` exists, it takes it (one VM
/// only), publishes its socket path in `guest-uds` for the test to play
/// the guest, and sleeps; otherwise it runs the real runner agent.
fn fake_vmm(dir: &Path) -> PathBuf {
    let agent = workspace_binary("runner-agent");
    let path = dir.join("fake-vmm");
    let script = format!(
        r#"#!/bin/sh
t="{t}"
uds=""
for a in "$@"; do case "$a" in cid=*,uds=*) uds="${{a#*uds=}}";; esac; done
[ -n "$uds" ] || {{ echo "fake-vmm: no --vsock flag" >&2; exit 2; }}
vm_dir="$(dirname "$uds")"
echo "$$ $vm_dir" >> "$t/vmms"
if mv "$t/next-guest" "$vm_dir/test-guest" 2>/dev/null; then
    echo "$uds" > "$t/guest-uds.tmp" && mv "$t/guest-uds.tmp" "$t/guest-uds"
    exec sleep 600
fi
exec {agent} --connect "unix:${{uds}}_10000" --workspace "$vm_dir/ws" --heartbeat-ms 200 --log warn
"#,
        t = dir.display(),
        agent = agent.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

struct World {
    dir: tempfile::TempDir,
    state: PathBuf,
    client: ApiClient,
    agent: Option<Agent>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// One pool `a` of one slot. With `test_guest`, the first VM's guest is
/// played by the test.
async fn world(tuning: Tuning, test_guest: bool) -> World {
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
    if test_guest {
        std::fs::write(dir.path().join("next-guest"), b"").unwrap();
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
        pools: vec![PoolConfig {
            name: "a".into(),
            labels: vec!["linux".into()],
            size: 1,
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
        }],
        // A script stands in for the VMM here: no jail.
        jail: host_agent::jail::JailConfig {
            enabled: false,
            ..Default::default()
        },
    };
    config.validate().unwrap();
    let agent = Agent::start_tuned(config, false, tuning).await.unwrap();
    World {
        dir,
        state,
        client: ApiClient::new(&url).unwrap(),
        agent: Some(agent),
        stop: Some(stop),
    }
}

impl World {
    async fn submit(&self, yaml: &str) -> JobId {
        let spec = JobSpec::from_yaml(yaml).unwrap();
        let request = SubmitJobRequest {
            spec,
            secrets: Secrets::default(),
        };
        self.client.submit(CLIENT, &request).await.unwrap()
    }

    /// Follows a job to its end; returns its final state and VM id.
    async fn follow(&self, id: &JobId) -> (JobState, String) {
        let report = tokio::time::timeout(
            Duration::from_secs(60),
            self.client.follow(CLIENT, id, |_| {}),
        )
        .await
        .expect("job did not finish within 60 s")
        .unwrap();
        let vm = report.vm_id.map(|v| v.0).unwrap_or_default();
        (report.status.state, vm)
    }

    fn metrics(&self) -> String {
        self.agent.as_ref().unwrap().metrics().encode()
    }

    /// Waits (up to `limit`) until `what` holds.
    async fn wait_until(&self, limit: Duration, what: &str, mut check: impl FnMut(&World) -> bool) {
        let start = Instant::now();
        while !check(self) {
            assert!(
                start.elapsed() < limit,
                "not within {limit:?}: {what}\nmetrics:\n{}",
                self.metrics()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every VMM the agent started, in order: (pid, VM directory).
    fn vmms(&self) -> Vec<(i32, PathBuf)> {
        std::fs::read_to_string(self.dir.path().join("vmms"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (pid, dir) = l.split_once(' ')?;
                Some((pid.parse().ok()?, PathBuf::from(dir)))
            })
            .collect()
    }

    fn vm_dirs(&self) -> usize {
        std::fs::read_dir(self.state.join("vms"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    async fn shutdown(mut self) {
        self.agent
            .take()
            .unwrap()
            .shutdown(Duration::from_secs(10))
            .await;
        let _ = self.stop.take().unwrap().send(());
        assert_eq!(self.vm_dirs(), 0, "VM directories left after shutdown");
    }
}

/// Whether the VM directory `dir` (`<pool>-<slot>-<first 8 alphanumerics
/// of the VM id>`) names the VM `vm_id`.
fn dir_names_vm(dir: &Path, vm_id: &str) -> bool {
    let short: String = vm_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect();
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    name.ends_with(&format!("-{short}"))
}

fn gauge(metrics: &str, state: &str) -> Option<i64> {
    let prefix = format!("kindling_host_agent_vms{{pool=\"a\",state=\"{state}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

/// The guest side of the one VM the test plays: connects to the socket the
/// host agent listens on, says Hello and Ready.
struct TestGuest {
    stream: UnixStream,
    /// The VM's directory.
    vm_dir: PathBuf,
}

impl TestGuest {
    /// Waits for the stand-in VMM to publish its socket, then dials in.
    fn connect(test_dir: &Path) -> TestGuest {
        let published = test_dir.join("guest-uds");
        let start = Instant::now();
        let uds = loop {
            if let Ok(text) = std::fs::read_to_string(&published) {
                break PathBuf::from(text.trim());
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no test VM");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stream = UnixStream::connect(host_listener_path(&uds, RUNNER_AGENT_PORT)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let hello = GuestHello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
            boot_id: "b".into(),
            kernel_release: "6.1".into(),
        };
        write_frame(&mut stream, &GuestMessage::Hello(hello)).unwrap();
        assert!(matches!(
            read_frame::<HostMessage>(&mut stream).unwrap(),
            HostMessage::HelloAck { .. }
        ));
        write_frame(&mut stream, &GuestMessage::Ready).unwrap();
        TestGuest {
            stream,
            vm_dir: uds.parent().unwrap().to_path_buf(),
        }
    }

    /// Reads nothing and says nothing until the host closes the channel;
    /// then returns every message the host had sent meanwhile.
    fn stay_silent(mut self) -> Vec<HostMessage> {
        let mut bytes = Vec::new();
        // EOF once the host tears the VM down (or an error; either ends it).
        let _ = self.stream.read_to_end(&mut bytes);
        let mut decoder = FrameDecoder::<HostMessage>::new();
        decoder.feed(&bytes);
        let mut messages = Vec::new();
        while let Ok(Some(msg)) = decoder.next_message() {
            messages.push(msg);
        }
        messages
    }

    /// Stops receiving (the host's writes fail) but keeps sending
    /// heartbeats, so the VM looks alive, until the host closes.
    fn go_deaf(mut self) {
        self.stream.shutdown(Shutdown::Read).unwrap();
        while write_frame(&mut self.stream, &GuestMessage::Heartbeat).is_ok() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_silent_while_idle_is_replaced_before_it_gets_a_job() {
    let tuning = Tuning {
        idle_silence: IDLE_SILENCE,
        ..Tuning::default()
    };
    let w = world(tuning, true).await;
    let test_dir = w.dir.path().to_path_buf();
    let guest = tokio::task::spawn_blocking(move || {
        let guest = TestGuest::connect(&test_dir);
        let vm_dir = guest.vm_dir.clone();
        (vm_dir, guest.stay_silent())
    });
    // The silent VM is torn down once silent for the idle limit.
    let (silent_dir, received) = tokio::time::timeout(Duration::from_secs(20), guest)
        .await
        .expect("the silent VM was not torn down within 20 s")
        .unwrap();
    assert!(
        !received.iter().any(|m| matches!(m, HostMessage::Job(_))),
        "a job was sent to the silent guest: {received:?}"
    );
    w.wait_until(
        Duration::from_secs(10),
        "the silent VM is torn down",
        |_| !silent_dir.exists(),
    )
    .await;
    // Its replacement (the real runner agent) takes the job.
    let id = w
        .submit("name: j\nruns-on: [linux]\nsteps:\n  - run: echo ok\n")
        .await;
    let (state, vm) = w.follow(&id).await;
    assert_eq!(state, JobState::Succeeded);
    assert!(!dir_names_vm(&silent_dir, &vm), "ran on the silent VM");
    // (At least the silent one: a loaded machine may stall another guest
    // past the short limit these tests use.)
    let metrics = w.metrics();
    let replaced: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kindling_host_agent_idle_vms_replaced_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    assert!(replaced >= 1, "{metrics}");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_never_reached_its_guest_is_requeued_and_runs_on_another_vm() {
    let w = world(Tuning::default(), true).await;
    let test_dir = w.dir.path().to_path_buf();
    let (connected, ready) = std::sync::mpsc::channel();
    let guest = tokio::task::spawn_blocking(move || {
        let guest = TestGuest::connect(&test_dir);
        let vm_dir = guest.vm_dir.clone();
        connected.send(()).unwrap();
        guest.go_deaf();
        vm_dir
    });
    tokio::task::spawn_blocking(move || ready.recv().unwrap())
        .await
        .unwrap();
    // The VM waits for a job, alive as far as anyone can tell.
    w.wait_until(Duration::from_secs(10), "the test VM is idle", |w| {
        gauge(&w.metrics(), "idle") == Some(1)
    })
    .await;
    let id = w
        .submit("name: j\nruns-on: [linux]\nsteps:\n  - run: echo ok\n")
        .await;
    let (state, vm) = w.follow(&id).await;
    assert_eq!(state, JobState::Succeeded, "the job was not requeued");
    let deaf_dir = tokio::time::timeout(Duration::from_secs(10), guest)
        .await
        .expect("the deaf VM was not torn down")
        .unwrap();
    assert!(!dir_names_vm(&deaf_dir, &vm), "ran on the deaf VM");
    let metrics = w.metrics();
    assert!(
        metrics.contains("kindling_host_agent_jobs_handed_back_total 1"),
        "{metrics}"
    );
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_slot_is_restarted_and_its_vm_torn_down() {
    let tuning = Tuning {
        panics_when_idle: Arc::new(AtomicU32::new(1)),
        ..Tuning::default()
    };
    let w = world(tuning, false).await;
    w.wait_until(
        Duration::from_secs(30),
        "the slot restarted and its new VM is idle",
        |w| {
            let metrics = w.metrics();
            metrics.contains(r#"kindling_host_agent_slot_restarts_total{pool="a"} 1"#)
                && gauge(&metrics, "idle") == Some(1)
        },
    )
    .await;
    // The pool is back to its size: one VM, the panicked one gone whole.
    let vmms = w.vmms();
    assert_eq!(vmms.len(), 2, "{vmms:?}");
    let (panicked_pid, panicked_dir) = &vmms[0];
    assert!(
        !panicked_dir.exists(),
        "the panicked VM's directory is left"
    );
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*panicked_pid), None);
    assert_eq!(
        alive,
        Err(nix::errno::Errno::ESRCH),
        "the panicked VM's VMM still runs"
    );
    assert_eq!(w.vm_dirs(), 1);
    let metrics = w.metrics();
    assert_eq!(gauge(&metrics, "booting"), Some(0), "{metrics}");
    assert_eq!(gauge(&metrics, "running").unwrap_or(0), 0, "{metrics}");
    // And the restarted slot runs jobs.
    let id = w
        .submit("name: j\nruns-on: [linux]\nsteps:\n  - run: echo ok\n")
        .await;
    let (state, _) = w.follow(&id).await;
    assert_eq!(state, JobState::Succeeded);
    w.shutdown().await;
}
