//! Shared fixtures of the integration tests: a real server on loopback
//! with a temporary archive, and fake VMs (plain HTTP clients acting as a
//! host agent would for one VM).

#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use orchestrator::auth::Credentials;
use orchestrator::client::{ApiClient, ClientError};
use orchestrator::config::{Limits, ServerConfig};
use orchestrator::server::Server;
use orchestrator::service::Orchestrator;
use protocol::api::{JobEvent, JobEventKind, RegisterVmRequest, SubmitJobRequest, VmId, VmToken};
use protocol::job::JobSpec;
use protocol::message::{
    Job, JobFinished, JobId, JobResult, LogChunk, OutputStream, Secrets, StepFinished, StepStarted,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A raw HTTP client for loopback tests that craft their own requests.
/// reqwest here is built without a default crypto provider (the API client
/// brings its own rustls configuration), so it gets one too.
pub fn plain_http() -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(orchestrator::tls::unused_client_config().unwrap())
        .build()
        .unwrap()
}

pub const HOST: &str = "host-credential-for-tests";
pub const CLIENT: &str = "client-credential-for-tests";

pub struct TestServer {
    pub url: String,
    pub addr: SocketAddr,
    pub client: ApiClient,
    pub archive: PathBuf,
    pub service: Arc<Orchestrator>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive");
        let mut server = Self::start_in(archive, limits).await;
        server._dir = Some(dir);
        server
    }

    /// A server on an existing archive directory (owned by the caller).
    pub async fn start_in(archive: PathBuf, limits: Limits) -> Self {
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            archive_dir: archive.clone(),
            credentials: Credentials::new(HOST, CLIENT).unwrap(),
            limits,
            tls: None,
            allow_insecure_http: false,
        };
        let server = Server::bind(config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let service = server.service();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        let url = format!("http://{addr}");
        Self {
            client: ApiClient::new(&url).unwrap(),
            url,
            addr,
            archive,
            service,
            stop: Some(stop),
            task: Some(task),
            _dir: None,
        }
    }

    /// Stops the server and waits until it is down.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops within 10 s")
                .unwrap();
        }
    }

    pub async fn submit_yaml(&self, yaml: &str, secrets: &[(&str, &str)]) -> JobId {
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

    /// Submits a job of `steps` steps for `runs_on`.
    pub async fn submit(&self, name: &str, runs_on: &[&str], steps: usize) -> JobId {
        let mut yaml = format!("name: {name}\nruns-on: [{}]\nsteps:\n", runs_on.join(", "));
        for i in 0..steps {
            yaml.push_str(&format!("  - name: step{i}\n    run: echo {i}\n"));
        }
        self.submit_yaml(&yaml, &[]).await
    }

    /// All events of a finished job, following from the start.
    pub async fn all_events(&self, job: &JobId) -> Vec<JobEvent> {
        let mut events = Vec::new();
        self.client
            .follow(CLIENT, job, |e| events.push(e.clone()))
            .await
            .unwrap();
        events
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A VM as its host agent sees it: registered, polling, posting events.
pub struct FakeVm {
    pub id: VmId,
    pub token: VmToken,
    pub labels: Vec<String>,
    pub client: ApiClient,
    pub next_seq: u64,
    pub chunk_seq: u64,
}

impl FakeVm {
    pub async fn register(server: &TestServer, labels: &[&str]) -> Self {
        Self::register_with(&server.client, labels).await
    }

    pub async fn register_with(client: &ApiClient, labels: &[&str]) -> Self {
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let request = RegisterVmRequest {
            host_id: "test-host".into(),
            labels: labels.clone(),
            network: true,
        };
        let response = client.register_vm(HOST, &request).await.unwrap();
        Self {
            id: response.vm_id,
            token: response.token,
            labels,
            client: client.clone(),
            next_seq: 0,
            chunk_seq: 0,
        }
    }

    pub async fn acquire(&self, wait_secs: u32) -> Result<Option<Job>, ClientError> {
        self.client.acquire(&self.id, &self.token, wait_secs).await
    }

    /// Posts `kinds` as the next events; returns the server's next seq.
    pub async fn send(
        &mut self,
        job: &JobId,
        kinds: Vec<JobEventKind>,
    ) -> Result<u64, ClientError> {
        let events: Vec<JobEvent> = kinds
            .into_iter()
            .enumerate()
            .map(|(i, event)| JobEvent {
                seq: self.next_seq + i as u64,
                event,
            })
            .collect();
        let next = self.client.post_events(job, &self.token, events).await?;
        self.next_seq = next;
        Ok(next)
    }

    pub fn chunk(&mut self, step: u32, stream: OutputStream, text: &str) -> JobEventKind {
        let seq = self.chunk_seq;
        self.chunk_seq += 1;
        JobEventKind::LogChunk(LogChunk {
            step,
            stream,
            seq,
            data: text.as_bytes().to_vec(),
        })
    }

    /// Runs every step of `job`: each prints `lines` lines of
    /// "<job id> step <i> line <n>", posted in batches of 3 events.
    pub async fn run(&mut self, job: &Job, lines: usize, result: JobResult) {
        let mut kinds = Vec::new();
        for (i, step) in job.steps.iter().enumerate() {
            let i = i as u32;
            kinds.push(started(i, &step.name));
            for n in 0..lines {
                let text = format!("{} step {i} line {n}\n", job.id);
                kinds.push(self.chunk(i, OutputStream::Stdout, &text));
            }
            kinds.push(step_finished(i, 0));
        }
        kinds.push(finished(result));
        let mut kinds = kinds.into_iter().peekable();
        while kinds.peek().is_some() {
            let batch: Vec<_> = kinds.by_ref().take(3).collect();
            self.send(&job.id, batch).await.unwrap();
        }
    }

    pub async fn deregister(&self) {
        self.client.deregister_vm(HOST, &self.id).await.unwrap();
    }
}

pub fn started(step: u32, name: &str) -> JobEventKind {
    JobEventKind::StepStarted(StepStarted {
        step,
        name: name.into(),
    })
}

pub fn step_finished(step: u32, code: i32) -> JobEventKind {
    JobEventKind::StepFinished(StepFinished {
        step,
        exit_code: Some(code),
        signal: None,
        duration_ms: 1,
    })
}

pub fn finished(result: JobResult) -> JobEventKind {
    JobEventKind::JobFinished(JobFinished { result })
}

/// The stdout text of a list of events, in order.
pub fn stdout_of(events: &[JobEvent]) -> String {
    let mut text = Vec::new();
    for event in events {
        if let JobEventKind::LogChunk(chunk) = &event.event
            && chunk.stream == OutputStream::Stdout
        {
            text.extend_from_slice(&chunk.data);
        }
    }
    String::from_utf8(text).unwrap()
}
