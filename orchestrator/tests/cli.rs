//! The `orchestrator` binary as a client: submit --follow, logs, status,
//! cancel, against a real server with a fake VM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{CLIENT, FakeVm, TestServer, finished, started, step_finished};
use protocol::message::{JobResult, OutputStream};

const SPEC: &str = "name: greet\nruns-on: [linux]\nsteps:\n  - name: greet\n    run: echo hello\n";

fn write_spec(dir: &Path) -> PathBuf {
    let path = dir.join("job.yaml");
    std::fs::write(&path, SPEC).unwrap();
    path
}

/// Runs the binary with `args` against `server`, off the async threads.
async fn run_cli(server: &TestServer, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    command
        .args(args)
        .args(["--server", &server.url, "--credential", CLIENT])
        .env_remove("KINDLING_SERVER")
        .env_remove("KINDLING_CLIENT_CREDENTIAL")
        .env_remove("RUST_LOG");
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// A VM that takes one job, prints to stdout and stderr, and ends it with
/// `result` (step 0 exiting with `code`). Returns the secret it received.
fn spawn_vm(server: &TestServer, code: i32, result: JobResult) -> tokio::task::JoinHandle<String> {
    let client = server.client.clone();
    tokio::spawn(async move {
        let mut vm = FakeVm::register_with(&client, &["linux"]).await;
        let job = loop {
            if let Some(job) = vm.acquire(5).await.unwrap() {
                break job;
            }
        };
        let out = vm.chunk(0, OutputStream::Stdout, "hello from the job\n");
        let err = vm.chunk(0, OutputStream::Stderr, "a warning\n");
        vm.send(&job.id, vec![started(0, "greet"), out, err])
            .await
            .unwrap();
        vm.send(&job.id, vec![step_finished(0, code), finished(result)])
            .await
            .unwrap();
        job.secrets.0.get("TOKEN").cloned().unwrap_or_default()
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_prints_logs_and_exits_with_the_result() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    let spec = spec.to_str().unwrap();

    let vm = spawn_vm(&server, 0, JobResult::Succeeded);
    let output = run_cli(
        &server,
        &["submit", spec, "--secret", "TOKEN=abc", "--follow"],
    )
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&output.stdout), "hello from the job\n");
    assert!(stderr.contains("a warning\n"), "{stderr}");
    assert!(stderr.contains("[kindling] step 0 \"greet\""), "{stderr}");
    assert!(stderr.contains(" succeeded\n"), "{stderr}");
    assert_eq!(vm.await.unwrap(), "abc", "the secret reached the VM");

    let vm = spawn_vm(&server, 3, JobResult::Failed { step: 0 });
    let output = run_cli(&server, &["submit", spec, "--follow"]).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("failed: step 0 \"greet\" exited with code 3"),
        "{stderr}"
    );
    vm.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_logs_and_cancel_commands() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    let spec = spec.to_str().unwrap();

    let output = run_cli(&server, &["submit", spec]).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let job_id = text(&output.stdout).trim().to_owned();
    assert!(job_id.starts_with("job-"), "{job_id}");

    let output = run_cli(&server, &["status", &job_id]).await;
    assert_eq!(output.status.code(), Some(0));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["state"], "queued");
    assert!(
        status["detail"]
            .as_str()
            .unwrap()
            .starts_with("no idle VM with labels [linux]")
    );

    let follower = {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"));
        command.args([
            "logs",
            &job_id,
            "--server",
            &server.url,
            "--credential",
            CLIENT,
        ]);
        tokio::task::spawn_blocking(move || command.output().unwrap())
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let output = run_cli(&server, &["cancel", &job_id, "--reason", "not needed"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["state"], "cancelled");

    let output = follower.await.unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(" cancelled: not needed\n"), "{stderr}");

    let output = run_cli(&server, &["status", "job-unknown"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("404"),
        "{}",
        text(&output.stderr)
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: x\nruns-on: linux\nsteps: []\n").unwrap();
    let output = run_cli(&server, &["submit", bad.to_str().unwrap()]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("steps: must not be empty"),
        "{}",
        text(&output.stderr)
    );
}
