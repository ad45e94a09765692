//! The API on loopback: a real server, fake VMs acting as host agents.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{CLIENT, FakeVm, HOST, TestServer, finished, started, stdout_of};
use orchestrator::config::Limits;
use protocol::api::{JobEventKind, JobState, VmId};
use protocol::message::{JobId, JobResult, OutputStream};
use reqwest::StatusCode;
use tokio::sync::mpsc;

fn status_of(err: &orchestrator::client::ClientError) -> StatusCode {
    err.status()
        .unwrap_or_else(|| panic!("not an API error: {err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_jobs_across_labelled_pools_all_complete_with_intact_logs() {
    let server = Arc::new(TestServer::start().await);
    let runs_on: [&[&str]; 3] = [&["x64"], &["linux", "arm64"], &["linux"]];
    let mut expected = HashMap::new();
    for i in 0..30 {
        let labels = runs_on[i % 3];
        let id = server.submit(&format!("job{i}"), labels, 2).await;
        expected.insert(id, labels);
    }
    let remaining = Arc::new(AtomicUsize::new(expected.len()));
    let pools: [&[&str]; 2] = [&["linux", "x64"], &["linux", "arm64"]];
    let mut workers = Vec::new();
    for slot in 0..5 {
        let labels = pools[slot % 2];
        let server = Arc::clone(&server);
        let remaining = Arc::clone(&remaining);
        // A pool slot: one fresh VM per job, as a host agent runs them.
        workers.push(tokio::spawn(async move {
            let mut ran = Vec::new();
            while remaining.load(Ordering::SeqCst) > 0 {
                let mut vm = FakeVm::register(&server, labels).await;
                if let Some(job) = vm.acquire(1).await.unwrap() {
                    vm.run(&job, 4, JobResult::Succeeded).await;
                    remaining.fetch_sub(1, Ordering::SeqCst);
                    ran.push((job.id.clone(), vm.labels.clone(), vm.id.clone()));
                }
                vm.deregister().await;
            }
            ran
        }));
    }
    let mut ran = Vec::new();
    for worker in workers {
        ran.extend(
            tokio::time::timeout(Duration::from_secs(60), worker)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(ran.len(), 30, "every job ran exactly once");
    let vms: HashSet<&VmId> = ran.iter().map(|(_, _, vm)| vm).collect();
    assert_eq!(vms.len(), 30, "one VM per job");
    for (job, vm_labels, _) in &ran {
        let wanted = expected[job];
        assert!(
            wanted.iter().all(|l| vm_labels.contains(&l.to_string())),
            "{job} asked for {wanted:?}, ran on {vm_labels:?}"
        );
        let report = server.client.job(CLIENT, job).await.unwrap();
        assert_eq!(report.status.state, JobState::Succeeded);
        let events = server.all_events(job).await;
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
        let mut text = String::new();
        for step in 0..2 {
            for line in 0..4 {
                text.push_str(&format!("{job} step {step} line {line}\n"));
            }
        }
        assert_eq!(stdout_of(&events), text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_promptly_when_a_job_arrives() {
    let server = TestServer::start().await;
    let vm = FakeVm::register(&server, &["linux"]).await;
    let started_at = Instant::now();
    assert_eq!(vm.acquire(1).await.unwrap(), None);
    let waited = started_at.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    let poll = tokio::spawn(async move {
        let job = vm.acquire(30).await.unwrap();
        (job, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let submitted_at = Instant::now();
    let id = server.submit("j", &["linux"], 1).await;
    let (job, woke_at) = poll.await.unwrap();
    assert_eq!(job.unwrap().id, id);
    let latency = woke_at.duration_since(submitted_at);
    assert!(
        latency < Duration::from_millis(500),
        "woke after {latency:?}"
    );
}

#[tokio::test]
async fn event_retries_are_idempotent_and_gaps_get_409() {
    let server = TestServer::start().await;
    let mut vm = FakeVm::register(&server, &["linux"]).await;
    let id = server.submit("j", &["linux"], 1).await;
    let job = vm.acquire(1).await.unwrap().unwrap();
    assert_eq!(job.id, id);
    let c0 = vm.chunk(0, OutputStream::Stdout, "a\n");
    let c1 = vm.chunk(0, OutputStream::Stdout, "b\n");
    let batch = vec![
        protocol::api::JobEvent {
            seq: 0,
            event: started(0, "step0"),
        },
        protocol::api::JobEvent { seq: 1, event: c0 },
    ];
    let client = &server.client;
    assert_eq!(
        client
            .post_events(&id, &vm.token, batch.clone())
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        client
            .post_events(&id, &vm.token, batch.clone())
            .await
            .unwrap(),
        2,
        "a retry changes nothing"
    );
    let overlap = vec![
        batch[1].clone(),
        protocol::api::JobEvent { seq: 2, event: c1 },
    ];
    assert_eq!(
        client.post_events(&id, &vm.token, overlap).await.unwrap(),
        3
    );
    let gap = vec![protocol::api::JobEvent {
        seq: 5,
        event: finished(JobResult::Succeeded),
    }];
    let err = client.post_events(&id, &vm.token, gap).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::CONFLICT);
    let orchestrator::client::ClientError::Api {
        message, next_seq, ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(*next_seq, Some(3));
    assert!(message.contains("expected seq 3, got 5"), "{message}");
    let not_consecutive = vec![
        protocol::api::JobEvent {
            seq: 3,
            event: finished(JobResult::Succeeded),
        },
        protocol::api::JobEvent {
            seq: 5,
            event: finished(JobResult::Succeeded),
        },
    ];
    let err = client
        .post_events(&id, &vm.token, not_consecutive)
        .await
        .unwrap_err();
    assert_eq!(status_of(&err), StatusCode::BAD_REQUEST, "{err}");

    vm.next_seq = 3;
    vm.send(&id, vec![finished(JobResult::Succeeded)])
        .await
        .unwrap();
    // The last answer may be lost: the retry after the job ended still succeeds.
    let last = vec![protocol::api::JobEvent {
        seq: 3,
        event: finished(JobResult::Succeeded),
    }];
    assert_eq!(client.post_events(&id, &vm.token, last).await.unwrap(), 4);
    let events = server.all_events(&id).await;
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert_eq!(stdout_of(&events), "a\nb\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_live_and_ends_with_the_job() {
    let server = TestServer::start().await;
    let mut vm = FakeVm::register(&server, &["linux"]).await;
    let id = server.submit("j", &["linux"], 1).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let client = server.client.clone();
    let follow_id = id.clone();
    let follower = tokio::spawn(async move {
        client
            .follow(CLIENT, &follow_id, |event| {
                let _ = tx.send(event.clone());
            })
            .await
            .unwrap()
    });
    vm.acquire(1).await.unwrap().unwrap();
    vm.send(&id, vec![started(0, "step0")]).await.unwrap();
    for n in 0..5 {
        let text = format!("line {n}\n");
        let chunk = vm.chunk(0, OutputStream::Stdout, &text);
        vm.send(&id, vec![chunk]).await.unwrap();
        // The follower sees each chunk before the next one is even produced.
        loop {
            let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("follower is live")
                .unwrap();
            if let JobEventKind::LogChunk(chunk) = event.event {
                assert_eq!(chunk.data, text.as_bytes());
                break;
            }
        }
    }
    vm.send(&id, vec![finished(JobResult::Succeeded)])
        .await
        .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("follow ends with the job")
        .unwrap();
    assert_eq!(report.status.state, JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_queued_and_running_jobs() {
    let server = TestServer::start().await;
    let queued = server.submit("q", &["gpu"], 1).await;
    let report = server
        .client
        .cancel(CLIENT, &queued, Some("obsolete".into()))
        .await
        .unwrap();
    assert_eq!(report.status.state, JobState::Cancelled);
    assert_eq!(report.detail.as_deref(), Some("obsolete"));
    let events = server.all_events(&queued).await;
    assert!(matches!(
        &events[..],
        [protocol::api::JobEvent { seq: 0, event: JobEventKind::JobFinished(f) }]
            if f.result == JobResult::Cancelled
    ));

    let mut vm = FakeVm::register(&server, &["linux"]).await;
    let running = server.submit("r", &["linux"], 2).await;
    vm.acquire(1).await.unwrap().unwrap();
    vm.send(&running, vec![started(0, "step0")]).await.unwrap();
    // A follower waiting for more output learns of the cancel at once.
    let client = server.client.clone();
    let follow_id = running.clone();
    let follower = tokio::spawn(async move { client.follow(CLIENT, &follow_id, |_| {}).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.client.cancel(CLIENT, &running, None).await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.status.state, JobState::Cancelled);
    // The host agent learns it from its next post, even an empty one...
    let chunk = vm.chunk(0, OutputStream::Stdout, "late\n");
    let err = vm.send(&running, vec![chunk]).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::GONE);
    assert!(err.to_string().ends_with("is over (cancelled)"), "{err}");
    let err = vm.send(&running, vec![]).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::GONE);
    // ...or from the job's status, read with its VM token.
    let seen_by_vm = server.client.job(&vm.token.0, &running).await.unwrap();
    assert_eq!(seen_by_vm.status.state, JobState::Cancelled);
    let err = server
        .client
        .cancel(CLIENT, &running, None)
        .await
        .unwrap_err();
    assert_eq!(status_of(&err), StatusCode::CONFLICT);
    let err = server
        .client
        .cancel(CLIENT, &JobId("job-nope".into()), None)
        .await
        .unwrap_err();
    assert_eq!(status_of(&err), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn finished_jobs_are_served_from_the_archive_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let mut server = TestServer::start_in(archive.clone(), Limits::default()).await;
    let secret = "s3cr3t-value-never-stored";
    let id = server
        .submit_yaml(
            "name: archived\nruns-on: linux\nsteps:\n  - run: echo hi\n",
            &[("TOKEN", secret)],
        )
        .await;
    let mut vm = FakeVm::register(&server, &["linux"]).await;
    let job = vm.acquire(1).await.unwrap().unwrap();
    assert_eq!(job.secrets.0["TOKEN"], secret, "the VM gets the secret");
    vm.run(&job, 3, JobResult::Succeeded).await;

    // The job left memory: what follows comes from the archive.
    let metrics = server.service.render_metrics();
    for state in ["queued", "assigned", "running"] {
        let line = format!("kindling_orchestrator_jobs{{state=\"{state}\"}} 0");
        assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
    }
    let record = archive.join(format!("{id}.json"));
    let log = archive.join(format!("{id}.log.jsonl"));
    assert!(record.exists() && log.exists());
    let live_report = server.client.job(CLIENT, &id).await.unwrap();
    let live_events = server.all_events(&id).await;
    assert_eq!(live_report.status.state, JobState::Succeeded);
    assert!(live_report.finished_at_ms.is_some());
    assert_eq!(live_events.len(), 6);
    let page = server.client.events(CLIENT, &id, 4, 30).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [4, 5]
    );
    assert!(page.finished);
    assert_eq!(page.next_seq, 6);
    let json = serde_json::to_string(&live_report).unwrap();
    assert!(!json.contains(secret));
    for entry in std::fs::read_dir(&archive).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains(secret));
    }

    // And after a restart on the same directory.
    server.stop().await;
    let server = TestServer::start_in(archive, Limits::default()).await;
    assert_eq!(server.client.job(CLIENT, &id).await.unwrap(), live_report);
    assert_eq!(server.all_events(&id).await, live_events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_jobs_and_unmatched_jobs_time_out() {
    let server = TestServer::start_with(Limits {
        max_job_timeout: Duration::from_secs(1),
        timeout_grace: Duration::from_millis(200),
        max_queue_wait: Duration::from_millis(300),
        reaper_interval: Duration::from_millis(50),
        ..Limits::default()
    })
    .await;
    let unmatched = server.submit("nobody", &["gpu"], 1).await;
    let mut vm = FakeVm::register(&server, &["linux"]).await;
    let silent = server.submit("silent", &["linux"], 1).await;
    let job = vm.acquire(1).await.unwrap().unwrap();
    assert_eq!(job.timeout_secs, 1, "the cap is passed on to the VM");
    let started_at = Instant::now();
    let report = server.client.follow(CLIENT, &silent, |_| {}).await.unwrap();
    let took = started_at.elapsed();
    assert!(
        took >= Duration::from_millis(1100) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let JobState::Error { reason } = &report.status.state else {
        panic!("{report:?}");
    };
    assert!(
        reason.ends_with("within the job timeout of 1s plus 200ms grace"),
        "{reason}"
    );
    let err = vm.send(&silent, vec![started(0, "s")]).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::GONE);

    let report = server.client.job(CLIENT, &unmatched).await.unwrap();
    assert_eq!(
        report.status.state,
        JobState::Error {
            reason: "no idle VM with labels [gpu] within 300ms".into()
        }
    );
}

#[tokio::test]
async fn deregistering_a_vm_fails_its_job_and_revokes_its_token() {
    let server = TestServer::start().await;
    let mut vm = FakeVm::register(&server, &["linux"]).await;
    let id = server.submit("j", &["linux"], 1).await;
    vm.acquire(1).await.unwrap().unwrap();
    vm.send(&id, vec![started(0, "s")]).await.unwrap();
    vm.deregister().await;
    let report = server.client.job(CLIENT, &id).await.unwrap();
    let JobState::Error { reason } = &report.status.state else {
        panic!("{report:?}");
    };
    assert_eq!(
        reason,
        &format!("VM {} was deregistered before the job finished", vm.id)
    );
    let err = vm.acquire(0).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::UNAUTHORIZED);
    let err = vm.send(&id, vec![]).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::UNAUTHORIZED);
    let err = server.client.deregister_vm(HOST, &vm.id).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_vm_token_acquires_one_job_only() {
    let server = TestServer::start().await;
    let mut vm = FakeVm::register(&server, &["linux"]).await;
    let first = server.submit("a", &["linux"], 1).await;
    let _second = server.submit("b", &["linux"], 1).await;
    assert_eq!(vm.acquire(0).await.unwrap().unwrap().id, first);
    vm.send(&first, vec![started(0, "s")]).await.unwrap();
    let err = vm.acquire(0).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::CONFLICT);
    assert!(err.to_string().contains("acquires one job only"), "{err}");
}

#[tokio::test]
async fn spec_errors_are_400_with_the_message() {
    let server = TestServer::start().await;
    let http = common::plain_http();
    let url = format!("{}/v1/jobs", server.url);
    let cases = [
        (
            "application/yaml",
            "name: x\nruns-on: linux\nsteps: []\n",
            "steps: must not be empty",
        ),
        (
            "application/yaml",
            "name: x\nruns-on: linux\ntimeout-minute: 5\nsteps:\n  - run: ls\n",
            "unknown field `timeout-minute`",
        ),
        (
            "application/yaml",
            "name: x\nruns-on: linux\ntimeout-minutes: 0\nsteps:\n  - run: ls\n",
            "timeout-minutes: must be at least 1",
        ),
        (
            "application/json",
            r#"{"spec":{"name":"x","runs-on":"linux","steps":[{"run":"ls","bogus":1}]}}"#,
            "spec.steps[0]",
        ),
        (
            "application/json",
            r#"{"spec":{"name":"x","runs-on":"linux","steps":[{"run":"ls"}]},"secrets":{"1BAD":"v"}}"#,
            "secrets[\"1BAD\"]",
        ),
        ("application/json", "{", "invalid JSON body"),
    ];
    for (content_type, body, needle) in cases {
        let response = http
            .post(&url)
            .bearer_auth(CLIENT)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let error: protocol::api::ApiError = response.json().await.unwrap();
        assert!(
            error.error.contains(needle),
            "{needle:?} not in {:?}",
            error.error
        );
    }
    let response = http
        .post(&url)
        .bearer_auth(CLIENT)
        .header("content-type", "application/yaml")
        .body("name: ok\nruns-on: linux\nsteps:\n  - run: ls\n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(response.headers().contains_key("location"));
}

#[tokio::test]
async fn credentials_are_not_interchangeable() {
    let server = TestServer::start().await;
    let client = &server.client;
    let request = protocol::api::RegisterVmRequest {
        host_id: "h".into(),
        labels: vec!["linux".into()],
        network: true,
    };
    let err = client.register_vm(CLIENT, &request).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::UNAUTHORIZED);
    let vm = FakeVm::register(&server, &["linux"]).await;
    let other = FakeVm::register(&server, &["linux"]).await;
    let spec = protocol::job::JobSpec::from_yaml("name: x\nruns-on: linux\nsteps:\n  - run: ls\n")
        .unwrap();
    let submit = protocol::api::SubmitJobRequest {
        spec,
        secrets: Default::default(),
    };
    for bearer in [HOST, vm.token.0.as_str(), "nope"] {
        let err = client.submit(bearer, &submit).await.unwrap_err();
        assert_eq!(status_of(&err), StatusCode::UNAUTHORIZED);
    }
    let id = client.submit(CLIENT, &submit).await.unwrap();
    for token in [CLIENT, HOST] {
        let err = client
            .acquire(&vm.id, &protocol::api::VmToken(token.into()), 0)
            .await
            .unwrap_err();
        assert_eq!(status_of(&err), StatusCode::UNAUTHORIZED);
    }
    let err = client.acquire(&vm.id, &other.token, 0).await.unwrap_err();
    assert_eq!(
        status_of(&err),
        StatusCode::UNAUTHORIZED,
        "another VM's token"
    );
    assert_eq!(vm.acquire(0).await.unwrap().unwrap().id, id);
    let err = client
        .post_events(&id, &other.token, vec![])
        .await
        .unwrap_err();
    assert_eq!(status_of(&err), StatusCode::UNAUTHORIZED);
    let err = client.job(&other.token.0, &id).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::UNAUTHORIZED);
    let err = client.events(&vm.token.0, &id, 0, 0).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::UNAUTHORIZED);
    let err = client.deregister_vm(CLIENT, &vm.id).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::UNAUTHORIZED);
    let response = common::plain_http()
        .get(format!("{}/v1/jobs/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
}

#[tokio::test]
async fn oversized_bodies_and_bad_queries_are_refused() {
    let server = TestServer::start().await;
    let http = common::plain_http();
    let response = http
        .post(format!("{}/v1/vms", server.url))
        .bearer_auth(HOST)
        .header("content-type", "application/json")
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let id = server.submit("j", &["linux"], 1).await;
    let response = http
        .get(format!("{}/v1/jobs/{id}/events?wait_secs=61", server.url))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = http
        .get(format!("{}/v1/nothing", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let vm = FakeVm::register(&server, &["linux"]).await;
    let err = vm.acquire(61).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn queued_job_status_says_why_and_metrics_count() {
    let server = TestServer::start_with(Limits {
        max_queued_jobs: 1,
        ..Limits::default()
    })
    .await;
    let id = server.submit("j", &["linux", "gpu"], 1).await;
    let report = server.client.job(CLIENT, &id).await.unwrap();
    assert_eq!(report.status.state, JobState::Queued);
    assert_eq!(
        report.detail.as_deref(),
        Some("no idle VM with labels [linux, gpu]: no registered VM has them (queue position 1)")
    );
    let spec = protocol::job::JobSpec::from_yaml("name: x\nruns-on: linux\nsteps:\n  - run: ls\n")
        .unwrap();
    let request = protocol::api::SubmitJobRequest {
        spec,
        secrets: Default::default(),
    };
    let err = server.client.submit(CLIENT, &request).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::SERVICE_UNAVAILABLE);
    let _vm = FakeVm::register(&server, &["linux"]).await;
    let text = common::plain_http()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "kindling_orchestrator_queue_length 1",
        "kindling_orchestrator_vms 1",
        "kindling_orchestrator_jobs_submitted_total 1",
        "kindling_orchestrator_api_errors_total{status=\"503\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_active_jobs_and_wakes_polls() {
    let mut server = TestServer::start().await;
    let vm = FakeVm::register(&server, &["linux"]).await;
    let id = server.submit("j", &["gpu"], 1).await;
    let poll = tokio::spawn(async move { vm.acquire(60).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started_at = Instant::now();
    server.stop().await;
    assert!(started_at.elapsed() < Duration::from_secs(5));
    assert_eq!(poll.await.unwrap().unwrap(), None);
    let record = std::fs::read_to_string(server.archive.join(format!("{id}.json"))).unwrap();
    assert!(record.contains("the orchestrator shut down before the job finished"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_long_poll_does_not_swallow_a_job() {
    let server = TestServer::start().await;
    let gone = FakeVm::register(&server, &["linux"]).await;
    let poll = tokio::spawn(async move { gone.acquire(30).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The host agent dies mid-poll: its connection closes.
    poll.abort();
    let _ = poll.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id = server.submit("j", &["linux"], 1).await;
    let report = server.client.job(CLIENT, &id).await.unwrap();
    assert_eq!(report.status.state, JobState::Queued, "{report:?}");
    let vm = FakeVm::register(&server, &["linux"]).await;
    assert_eq!(vm.acquire(1).await.unwrap().unwrap().id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_vm_gives_back_a_job_it_never_started() {
    let server = TestServer::start().await;
    let dead = FakeVm::register(&server, &["linux"]).await;
    let id = server.submit("j", &["linux"], 1).await;
    assert_eq!(dead.acquire(0).await.unwrap().unwrap().id, id);
    // Only the VM's own token releases it.
    let other = FakeVm::register(&server, &["arm64"]).await;
    let err = server
        .client
        .release_vm(&dead.id, &other.token)
        .await
        .unwrap_err();
    assert_eq!(status_of(&err), StatusCode::UNAUTHORIZED);
    // The job never reached the guest: the host agent gives it back.
    let requeued = server
        .client
        .release_vm(&dead.id, &dead.token)
        .await
        .unwrap();
    assert_eq!(requeued, Some(id.clone()));
    let report = server.client.job(CLIENT, &id).await.unwrap();
    assert_eq!(report.status.state, JobState::Queued, "{report:?}");
    // The released VM takes no job, and deregistering it fails nothing.
    let err = dead.acquire(0).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::CONFLICT);
    dead.deregister().await;
    // Another VM runs it, secrets and all.
    let mut next = FakeVm::register(&server, &["linux"]).await;
    let job = next.acquire(1).await.unwrap().unwrap();
    assert_eq!(job.id, id);
    next.run(&job, 1, JobResult::Succeeded).await;
    let report = server.client.job(CLIENT, &id).await.unwrap();
    assert_eq!(report.status.state, JobState::Succeeded);
    assert_eq!(report.vm_id, Some(next.id.clone()));
}

#[tokio::test]
async fn a_started_job_cannot_be_given_back() {
    let server = TestServer::start().await;
    let mut vm = FakeVm::register(&server, &["linux"]).await;
    let id = server.submit("j", &["linux"], 1).await;
    vm.acquire(0).await.unwrap().unwrap();
    vm.send(&id, vec![started(0, "s")]).await.unwrap();
    let err = server
        .client
        .release_vm(&vm.id, &vm.token)
        .await
        .unwrap_err();
    assert_eq!(status_of(&err), StatusCode::CONFLICT);
    assert!(err.to_string().contains("has started"), "{err}");
    let report = server.client.job(CLIENT, &id).await.unwrap();
    assert!(
        matches!(report.status.state, JobState::Running { .. }),
        "{report:?}"
    );
}

#[tokio::test]
async fn a_job_given_back_too_often_fails_with_a_reason() {
    let server = TestServer::start().await;
    let id = server.submit("j", &["linux"], 1).await;
    for _ in 0..orchestrator::registry::MAX_RELEASES {
        let vm = FakeVm::register(&server, &["linux"]).await;
        assert_eq!(vm.acquire(0).await.unwrap().unwrap().id, id);
        server.client.release_vm(&vm.id, &vm.token).await.unwrap();
        vm.deregister().await;
    }
    let report = server.client.job(CLIENT, &id).await.unwrap();
    let JobState::Error { reason } = &report.status.state else {
        panic!("{report:?}");
    };
    assert!(reason.contains("handed back by 3 VMs"), "{reason}");
}

/// A job whose VM streams tens of thousands of tiny chunks: empty ones are
/// refused, and one-byte ones are charged their fixed per-event cost, so
/// the job's log file stays small (before the fix, 51 200 empty chunks
/// gave a 4.7 MB file with `max_log_bytes = 1024`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_tiny_chunks_cannot_grow_the_log_beyond_its_bound() {
    let server = TestServer::start_with(Limits {
        max_log_bytes: 1024,
        ..Limits::default()
    })
    .await;
    let mut vm = FakeVm::register(&server, &["linux"]).await;
    let id = server.submit("j", &["linux"], 1).await;
    let job = vm.acquire(1).await.unwrap().unwrap();
    vm.send(&id, vec![started(0, &job.steps[0].name)])
        .await
        .unwrap();
    let empty = vm.chunk(0, OutputStream::Stdout, "");
    let err = vm.send(&id, vec![empty]).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::BAD_REQUEST);
    assert!(
        err.to_string()
            .contains("events[0].data: must not be empty"),
        "{err}"
    );
    vm.chunk_seq -= 1;
    let total = 51_200;
    let mut sent = 0;
    while sent < total {
        let batch = (0..256)
            .map(|_| vm.chunk(0, OutputStream::Stdout, "x"))
            .collect();
        vm.send(&id, batch).await.unwrap();
        sent += 256;
    }
    vm.send(
        &id,
        vec![common::step_finished(0, 0), finished(JobResult::Succeeded)],
    )
    .await
    .unwrap();
    let report = server.client.job(CLIENT, &id).await.unwrap();
    assert_eq!(report.status.state, JobState::Succeeded);
    let log = server.archive.join(format!("{id}.log.jsonl"));
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(size < 8 * 1024, "the log file grew to {size} bytes");
    // Followers see the kept output, the notice, the step's end and the
    // job's end, and get past the dropped seqs.
    let events = tokio::time::timeout(Duration::from_secs(10), server.all_events(&id))
        .await
        .expect("following ends");
    assert!(events.len() < 20, "{} events", events.len());
    assert!(stdout_of(&events).contains("output limit of 1024 bytes"));
    assert!(matches!(
        events.last().unwrap().event,
        JobEventKind::JobFinished(_)
    ));
    assert_eq!(events.last().unwrap().seq, total + 2);
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
}

/// Once a job has stored `max_log_events` events, its later log chunks are
/// dropped with one notice; step results and the end still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_cap_keeps_step_results_and_the_end() {
    let server = TestServer::start_with(Limits {
        max_log_events: 50,
        ..Limits::default()
    })
    .await;
    let mut vm = FakeVm::register(&server, &["linux"]).await;
    let id = server.submit("j", &["linux"], 2).await;
    let job = vm.acquire(1).await.unwrap().unwrap();
    vm.run(&job, 200, JobResult::Failed { step: 1 }).await;
    let report = server.client.job(CLIENT, &id).await.unwrap();
    assert_eq!(report.status.state, JobState::Failed { step: 1 });
    let events = server.all_events(&id).await;
    let chunks = events
        .iter()
        .filter(|e| matches!(e.event, JobEventKind::LogChunk(_)))
        .count();
    // The step start and 49 chunks fill the 50 events; the 50th chunk
    // becomes the notice.
    assert_eq!(chunks, 50);
    assert!(stdout_of(&events).contains("log limit of 50 events reached"));
    let steps = events
        .iter()
        .filter(|e| matches!(e.event, JobEventKind::StepFinished(_)))
        .count();
    assert_eq!(steps, 2, "both step results are stored");
    assert!(matches!(
        events.last().unwrap().event,
        JobEventKind::JobFinished(_)
    ));
}

/// Sends `head` on a fresh connection and returns what the server answers
/// within `wait` (empty if nothing). Blocking: run it off the runtime.
async fn raw_exchange(addr: std::net::SocketAddr, head: &str, wait: Duration) -> String {
    let head = head.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let deadline = Instant::now() + wait;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            stream.set_read_timeout(Some(left)).unwrap();
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap()
}

/// A head announcing a `length`-byte body of which only a few bytes follow.
fn partial_request(method: &str, path: &str, bearer: &str, length: usize) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {bearer}\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n{{\"events\": ["
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_bearer_is_refused_before_the_body_is_read() {
    let server = TestServer::start().await;
    let vm = FakeVm::register(&server, &["linux"]).await;
    let id = server.submit("j", &["linux"], 1).await;
    let other = FakeVm::register(&server, &["linux"]).await;
    assert_eq!(vm.acquire(0).await.unwrap().unwrap().id, id);
    let big = 24 * 1024 * 1024;
    let routes = [
        ("POST", "/v1/vms".to_owned(), CLIENT.to_owned()),
        ("DELETE", format!("/v1/vms/{}", vm.id), vm.token.0.clone()),
        (
            "POST",
            format!("/v1/vms/{}/acquire", vm.id),
            other.token.0.clone(),
        ),
        ("POST", "/v1/jobs".to_owned(), HOST.to_owned()),
        (
            "POST",
            format!("/v1/jobs/{id}/events"),
            other.token.0.clone(),
        ),
        ("POST", format!("/v1/jobs/{id}/events"), CLIENT.to_owned()),
        ("POST", format!("/v1/jobs/{id}/cancel"), vm.token.0.clone()),
        ("GET", format!("/v1/jobs/{id}"), other.token.0.clone()),
        // A route without a rule of its own needs some credential.
        ("PUT", "/v1/jobs".to_owned(), "nope".to_owned()),
    ];
    for (method, path, bearer) in routes {
        let started_at = Instant::now();
        let head = partial_request(method, &path, &bearer, big);
        let answer = raw_exchange(server.addr, &head, Duration::from_secs(5)).await;
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "{method} {path}: {answer:?}"
        );
        assert!(
            started_at.elapsed() < Duration::from_secs(2),
            "{method} {path} answered after {:?}",
            started_at.elapsed()
        );
    }
    // With the right token the server does wait for the body (so the
    // answers above did not come from reading it).
    let head = partial_request(
        "POST",
        &format!("/v1/jobs/{id}/events"),
        &vm.token.0,
        1 << 20,
    );
    let answer = raw_exchange(server.addr, &head, Duration::from_millis(500)).await;
    assert_eq!(answer, "", "answered before the body arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_beyond_the_limit_get_503_but_long_polls_do_not_count() {
    use std::io::Write;
    let server = TestServer::start_with(Limits {
        max_concurrent_requests: 2,
        request_queue_wait: Duration::from_millis(200),
        max_long_polls: 1,
        ..Limits::default()
    })
    .await;
    let id = server.submit("j", &["gpu"], 1).await;
    let vm = FakeVm::register(&server, &["linux"]).await;
    let other = FakeVm::register(&server, &["linux"]).await;
    // Two submissions whose bodies never finish hold both slots.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
        let head = partial_request("POST", "/v1/jobs", CLIENT, 1000);
        stream.write_all(head.as_bytes()).unwrap();
        slow.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started_at = Instant::now();
    let err = server.client.job(CLIENT, &id).await.unwrap_err();
    let waited = started_at.elapsed();
    assert_eq!(status_of(&err), StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert!(
        err.to_string().contains("maximum of 2 concurrent requests"),
        "{err}"
    );
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "queued for {waited:?}"
    );
    // Long polls do not take those slots: a VM still polls...
    let poll = tokio::spawn(async move { vm.acquire(1).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...within their own bound (one here): a second one is refused at once.
    let started_at = Instant::now();
    let err = other.acquire(0).await.unwrap_err();
    assert_eq!(status_of(&err), StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert!(err.to_string().contains("maximum of 1 long polls"), "{err}");
    assert!(started_at.elapsed() < Duration::from_millis(150));
    assert_eq!(
        poll.await.unwrap().unwrap(),
        None,
        "the poll ran its course"
    );
    // Slots free again once the slow requests end.
    drop(slow);
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.client.job(CLIENT, &id).await.unwrap();
    assert_eq!(other.acquire(0).await.unwrap(), None);
}
