use std::collections::BTreeMap;

use protocol::api::VmToken;
use protocol::message::{JobFinished, JobStep, LogChunk, OutputStream, StepFinished, StepStarted};

use super::*;

fn limits() -> Limits {
    Limits {
        timeout_grace: Duration::from_secs(10),
        max_queue_wait: Duration::from_secs(100),
        vm_idle_timeout: Duration::from_secs(1000),
        ..Limits::default()
    }
}

fn labels(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn job(id: &str, steps: usize) -> Job {
    Job {
        id: JobId(id.into()),
        name: format!("job {id}"),
        steps: (0..steps)
            .map(|i| JobStep {
                name: format!("s{i}"),
                run: "true".into(),
                working_directory: None,
                env: BTreeMap::new(),
                timeout_secs: None,
            })
            .collect(),
        env: BTreeMap::new(),
        secrets: Secrets(BTreeMap::from([("TOKEN".into(), "hunter2".into())])),
        timeout_secs: 60,
    }
}

fn jid(id: &str) -> JobId {
    JobId(id.into())
}

struct Fixture {
    reg: Registry<()>,
    now: Instant,
}

impl Fixture {
    fn new() -> Self {
        Self::with(limits())
    }

    fn with(limits: Limits) -> Self {
        Self {
            reg: Registry::new(limits),
            now: Instant::now(),
        }
    }

    fn register(&mut self, vm_labels: &[&str]) -> (VmId, VmToken) {
        let request = RegisterVmRequest {
            host_id: "host-1".into(),
            labels: labels(vm_labels),
            network: true,
        };
        let response = self.reg.register_vm(&request, self.now).unwrap();
        (response.vm_id, response.token)
    }

    fn submit(&mut self, id: &str, runs_on: &[&str]) {
        self.reg
            .submit(job(id, 2), labels(runs_on), (), self.now)
            .unwrap();
    }

    fn start(&mut self, vm: &VmId, token: &VmToken) -> Result<AcquireStart, RegistryError> {
        self.reg.begin_acquire(vm, Some(&token.0), self.now)
    }

    /// Starts a poll that must wait; returns its ticket.
    fn wait(&mut self, vm: &VmId, token: &VmToken) -> u64 {
        match self.start(vm, token).unwrap() {
            AcquireStart::Wait { ticket, .. } => ticket,
            AcquireStart::Job(job) => panic!("unexpected job {}", job.id),
        }
    }

    /// Starts a poll that must get a job at once; returns its id.
    fn acquire_now(&mut self, vm: &VmId, token: &VmToken) -> JobId {
        match self.start(vm, token).unwrap() {
            AcquireStart::Job(job) => job.id,
            AcquireStart::Wait { .. } => panic!("no job"),
        }
    }

    fn poll(&mut self, vm: &VmId, ticket: u64, last: bool) -> Option<JobId> {
        match self.reg.poll_acquire(vm, ticket, last, self.now) {
            AcquirePoll::Job(job) => Some(job.id),
            AcquirePoll::Waiting => None,
            AcquirePoll::Ended => {
                assert!(last, "poll ended unexpectedly");
                None
            }
        }
    }

    fn post(
        &mut self,
        job: &str,
        token: &VmToken,
        events: &[JobEvent],
    ) -> Result<EventPlan, RegistryError> {
        self.reg
            .plan_events(&jid(job), Some(&token.0), events, self.now)
    }

    /// Plans and applies `events` as the service does.
    fn deliver(&mut self, job: &str, token: &VmToken, events: &[JobEvent]) -> Applied {
        let EventPlan::Append { from } = self.post(job, token, events).unwrap() else {
            panic!("not appendable");
        };
        self.reg
            .apply_events(&jid(job), &events[from..], self.now)
            .unwrap()
    }

    fn state(&self, job: &str) -> JobState {
        self.reg.report(&jid(job)).unwrap().status.state
    }
}

fn ev(seq: u64, event: JobEventKind) -> JobEvent {
    JobEvent { seq, event }
}

fn started(seq: u64, step: u32) -> JobEvent {
    ev(
        seq,
        JobEventKind::StepStarted(StepStarted {
            step,
            name: format!("s{step}"),
        }),
    )
}

fn chunk(seq: u64, step: u32) -> JobEvent {
    ev(
        seq,
        JobEventKind::LogChunk(LogChunk {
            step,
            stream: OutputStream::Stdout,
            seq,
            data: b"out\n".to_vec(),
        }),
    )
}

fn step_done(seq: u64, step: u32, code: i32) -> JobEvent {
    ev(
        seq,
        JobEventKind::StepFinished(StepFinished {
            step,
            exit_code: Some(code),
            signal: None,
            duration_ms: 3,
        }),
    )
}

fn job_done(seq: u64, result: JobResult) -> JobEvent {
    ev(seq, JobEventKind::JobFinished(JobFinished { result }))
}

#[test]
fn submitted_job_goes_to_first_waiting_vm_with_matching_labels() {
    let mut f = Fixture::new();
    let (arm, arm_token) = f.register(&["linux", "arm64"]);
    let (x64, x64_token) = f.register(&["linux", "x64"]);
    let arm_ticket = f.wait(&arm, &arm_token);
    let x64_ticket = f.wait(&x64, &x64_token);
    f.submit("j1", &["x64"]);
    assert_eq!(f.poll(&arm, arm_ticket, false), None);
    assert_eq!(f.poll(&x64, x64_ticket, false), Some(jid("j1")));
    assert_eq!(f.state("j1"), JobState::Assigned { vm_id: x64.clone() });
    assert_eq!(f.reg.counts().waiting_vms, 1);
    f.submit("j2", &["linux"]);
    assert_eq!(f.poll(&arm, arm_ticket, false), Some(jid("j2")));
}

#[test]
fn a_no_network_job_only_goes_to_a_vm_without_a_network_device() {
    let mut f = Fixture::new();
    let (net, net_token) = f.register(&["linux"]);
    let request = RegisterVmRequest {
        host_id: "host-1".into(),
        labels: labels(&["linux"]),
        network: false,
    };
    let offline = f.reg.register_vm(&request, f.now).unwrap();
    let (offline, offline_token) = (offline.vm_id, offline.token);
    let net_ticket = f.wait(&net, &net_token);
    // What `SubmitJobRequest` turns `network: false` into.
    let spec = protocol::job::JobSpec::from_yaml(
        "name: j\nruns-on: linux\nnetwork: false\nsteps: [{run: x}]\n",
    )
    .unwrap();
    let required = spec.required_labels();
    let required: Vec<&str> = required.iter().map(String::as_str).collect();
    f.submit("offline-job", &required);
    assert_eq!(
        f.poll(&net, net_ticket, false),
        None,
        "a VM with a network device took it"
    );
    assert_eq!(f.acquire_now(&offline, &offline_token), jid("offline-job"));
    // An ordinary job may run on either kind of VM.
    f.submit("any", &["linux"]);
    assert_eq!(f.poll(&net, net_ticket, false), Some(jid("any")));
    // A user label cannot name the reserved one.
    assert!(
        protocol::job::JobSpec::from_yaml(&format!(
            "name: j\nruns-on: [{}]\nsteps: [{{run: x}}]\n",
            protocol::api::NO_NETWORK_LABEL
        ))
        .is_err()
    );
}

#[test]
fn waiting_vm_takes_queued_job_at_once() {
    let mut f = Fixture::new();
    f.submit("gpu", &["gpu"]);
    f.submit("j1", &["linux"]);
    let (vm, token) = f.register(&["linux"]);
    assert_eq!(f.acquire_now(&vm, &token), jid("j1"));
    assert_eq!(f.state("gpu"), JobState::Queued);
    assert_eq!(f.reg.counts().queued, 1);
}

#[test]
fn queued_job_says_why_it_waits() {
    let mut f = Fixture::new();
    f.submit("j1", &["linux", "gpu"]);
    let detail = f.reg.report(&jid("j1")).unwrap().detail.unwrap();
    assert_eq!(
        detail,
        "no idle VM with labels [linux, gpu]: no registered VM has them (queue position 1)"
    );
    let (vm, token) = f.register(&["linux", "gpu"]);
    f.submit("j0", &["linux"]);
    assert_eq!(f.acquire_now(&vm, &token), jid("j1"));
    f.submit("j2", &["gpu"]);
    let detail = f.reg.report(&jid("j2")).unwrap().detail.unwrap();
    assert_eq!(
        detail,
        "no idle VM with labels [gpu]: the 1 registered VM that has them is busy (queue position 2)"
    );
}

#[test]
fn a_token_acquires_at_most_one_job() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    f.submit("j1", &["linux"]);
    f.submit("j2", &["linux"]);
    assert_eq!(f.acquire_now(&vm, &token), jid("j1"));
    // The answer may have been lost: until the VM reports, the same job again.
    assert_eq!(f.acquire_now(&vm, &token), jid("j1"));
    f.deliver("j1", &token, &[started(0, 0)]);
    assert!(matches!(
        f.start(&vm, &token),
        Err(RegistryError::AlreadyAcquired { job, .. }) if job == jid("j1")
    ));
    f.deliver("j1", &token, &[job_done(1, JobResult::Succeeded)]);
    f.reg.remove_job(&jid("j1"));
    assert!(matches!(
        f.start(&vm, &token),
        Err(RegistryError::AlreadyAcquired { .. })
    ));
    assert_eq!(f.state("j2"), JobState::Queued, "j2 waits for another VM");
}

#[test]
fn wrong_missing_and_revoked_tokens_are_refused() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    let (_other, other_token) = f.register(&["linux"]);
    assert!(matches!(
        f.start(&vm, &other_token),
        Err(RegistryError::BadVmToken)
    ));
    assert!(matches!(
        f.reg.begin_acquire(&vm, None, f.now),
        Err(RegistryError::BadVmToken)
    ));
    f.submit("j1", &["linux"]);
    assert_eq!(f.acquire_now(&vm, &token), jid("j1"));
    assert!(f.reg.is_job_vm(&jid("j1"), Some(&token.0)));
    assert!(!f.reg.is_job_vm(&jid("j1"), Some(&other_token.0)));
    assert!(matches!(
        f.post("j1", &other_token, &[started(0, 0)]),
        Err(RegistryError::BadVmToken)
    ));
    assert_eq!(f.reg.deregister_vm(&vm).unwrap(), Some(jid("j1")));
    assert!(matches!(
        f.start(&vm, &token),
        Err(RegistryError::BadVmToken)
    ));
    assert!(!f.reg.is_job_vm(&jid("j1"), Some(&token.0)));
    assert!(matches!(
        f.post("j1", &token, &[started(0, 0)]),
        Err(RegistryError::BadVmToken)
    ));
    assert!(matches!(
        f.reg.deregister_vm(&vm),
        Err(RegistryError::UnknownVm(_))
    ));
}

#[test]
fn event_retries_are_ignored_and_gaps_refused() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    f.submit("j", &["linux"]);
    f.acquire_now(&vm, &token);
    let batch = [started(0, 0), chunk(1, 0)];
    assert_eq!(f.deliver("j", &token, &batch).next_seq, 2);
    assert_eq!(f.state("j"), JobState::Running { vm_id: vm.clone() });
    assert_eq!(
        f.post("j", &token, &batch).unwrap(),
        EventPlan::Append { from: 2 },
        "a full retry appends nothing"
    );
    assert_eq!(
        f.post("j", &token, &[chunk(1, 0), chunk(2, 0)]).unwrap(),
        EventPlan::Append { from: 1 },
        "an overlapping batch appends only the new part"
    );
    assert!(matches!(
        f.post("j", &token, &[chunk(5, 0)]),
        Err(RegistryError::Gap {
            expected: 2,
            got: 5
        })
    ));
    assert_eq!(
        f.post("j", &token, &[]).unwrap(),
        EventPlan::Append { from: 0 }
    );
}

#[test]
fn events_must_fit_the_job() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    f.submit("j", &["linux"]);
    f.acquire_now(&vm, &token);
    let err = f.post("j", &token, &[started(0, 2)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid events: event seq 0 refers to step 2, but the job has 2 steps"
    );
    let err = f
        .post(
            "j",
            &token,
            &[job_done(0, JobResult::Succeeded), chunk(1, 0)],
        )
        .unwrap_err();
    assert!(matches!(err, RegistryError::InvalidEvents(_)), "{err}");
    let err = f
        .post("j", &token, &[job_done(0, JobResult::Failed { step: 9 })])
        .unwrap_err();
    assert!(matches!(err, RegistryError::InvalidEvents(_)), "{err}");
}

#[test]
fn job_finished_ends_the_job_and_later_posts_are_retries_or_gone() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    f.submit("j", &["linux"]);
    f.acquire_now(&vm, &token);
    let events = [
        started(0, 0),
        step_done(1, 0, 3),
        job_done(2, JobResult::Failed { step: 0 }),
    ];
    let applied = f.deliver("j", &token, &events);
    let report = applied.finished.unwrap();
    assert_eq!(report.status.state, JobState::Failed { step: 0 });
    assert_eq!(
        report.detail.as_deref(),
        Some("step 0 \"s0\" exited with code 3")
    );
    assert_eq!(applied.next_seq, 3);
    for _ in 0..2 {
        // Once while the job is still in memory, once after it is archived.
        assert_eq!(
            f.post("j", &token, &events[1..]).unwrap(),
            EventPlan::AlreadyStored { next_seq: 3 }
        );
        let err = f.post("j", &token, &[chunk(3, 0)]).unwrap_err();
        assert!(matches!(err, RegistryError::JobOver { .. }), "{err}");
        let err = f.post("j", &token, &[]).unwrap_err();
        assert!(matches!(err, RegistryError::JobOver { .. }), "{err}");
        f.reg.remove_job(&jid("j"));
    }
    assert!(f.reg.report(&jid("j")).is_none());
    assert_eq!(
        f.reg.counts(),
        Counts {
            vms: 1,
            ..Counts::default()
        }
    );
}

#[test]
fn secrets_are_dropped_once_the_vm_reports() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    f.submit("j", &["linux"]);
    match f.start(&vm, &token).unwrap() {
        AcquireStart::Job(job) => assert_eq!(job.secrets.0["TOKEN"], "hunter2"),
        AcquireStart::Wait { .. } => panic!("no job"),
    }
    assert!(!f.reg.jobs[&jid("j")].job.secrets.0.is_empty());
    f.deliver("j", &token, &[started(0, 0)]);
    assert!(f.reg.jobs[&jid("j")].job.secrets.0.is_empty());
    f.submit("k", &["gpu"]);
    f.reg
        .end_job(&jid("k"), JobResult::Cancelled, None, f.now)
        .unwrap();
    assert!(f.reg.jobs[&jid("k")].job.secrets.0.is_empty());
}

#[test]
fn abandoned_poll_gives_its_job_back_to_the_queue_front() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    let ticket = f.wait(&vm, &token);
    f.submit("first", &["linux"]);
    f.submit("second", &["linux"]);
    assert_eq!(f.state("first"), JobState::Assigned { vm_id: vm.clone() });
    f.reg.abandon_acquire(&vm, ticket, f.now);
    assert_eq!(f.state("first"), JobState::Queued);
    assert_eq!(
        f.reg.matchmaker.queued_jobs().collect::<Vec<_>>(),
        [&jid("first"), &jid("second")]
    );
    // The VM was never given the job, so its token may still acquire one.
    assert_eq!(f.acquire_now(&vm, &token), jid("first"));

    let (idle, idle_token) = f.register(&["arm64"]);
    let ticket = f.wait(&idle, &idle_token);
    f.reg.abandon_acquire(&idle, ticket, f.now);
    assert_eq!(f.reg.counts().waiting_vms, 0);
    f.submit("arm", &["arm64"]);
    assert_eq!(f.state("arm"), JobState::Queued, "not given to a gone poll");
    assert_eq!(f.acquire_now(&idle, &idle_token), jid("arm"));
}

#[test]
fn abandoned_job_goes_to_another_waiting_vm() {
    let mut f = Fixture::new();
    let (a, a_token) = f.register(&["linux"]);
    let (b, b_token) = f.register(&["linux"]);
    let a_ticket = f.wait(&a, &a_token);
    f.submit("j", &["linux"]);
    let b_ticket = f.wait(&b, &b_token);
    f.reg.abandon_acquire(&a, a_ticket, f.now);
    assert_eq!(f.poll(&b, b_ticket, false), Some(jid("j")));
}

#[test]
fn a_second_poll_supersedes_the_first() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    let first = f.wait(&vm, &token);
    let second = f.wait(&vm, &token);
    assert!(matches!(
        f.reg.poll_acquire(&vm, first, false, f.now),
        AcquirePoll::Ended
    ));
    f.reg.abandon_acquire(&vm, first, f.now);
    assert_eq!(f.reg.counts().waiting_vms, 1, "still waiting once");
    f.submit("j", &["linux"]);
    assert_eq!(f.poll(&vm, second, false), Some(jid("j")));
}

#[test]
fn expired_poll_stops_waiting() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    let ticket = f.wait(&vm, &token);
    assert_eq!(f.poll(&vm, ticket, true), None);
    assert_eq!(f.reg.counts().waiting_vms, 0);
    f.submit("j", &["linux"]);
    assert_eq!(f.state("j"), JobState::Queued);
}

#[test]
fn ending_jobs_withdraws_them_once() {
    let mut f = Fixture::new();
    f.submit("queued", &["linux"]);
    let report = f
        .reg
        .end_job(
            &jid("queued"),
            JobResult::Cancelled,
            Some("obsolete".into()),
            f.now,
        )
        .unwrap();
    assert_eq!(report.status.state, JobState::Cancelled);
    assert_eq!(report.detail.as_deref(), Some("obsolete"));
    assert_eq!(f.reg.counts().queued, 0);
    assert!(matches!(
        f.reg
            .end_job(&jid("queued"), JobResult::Cancelled, None, f.now),
        Err(RegistryError::AlreadyFinished(_))
    ));
    let (vm, token) = f.register(&["linux"]);
    let ticket = f.wait(&vm, &token);
    assert_eq!(
        f.reg.counts().waiting_vms,
        1,
        "cancelled job was not handed out"
    );
    f.submit("running", &["linux"]);
    assert_eq!(f.poll(&vm, ticket, false), Some(jid("running")));
    f.reg
        .end_job(&jid("running"), JobResult::Cancelled, None, f.now)
        .unwrap();
    let err = f.post("running", &token, &[started(0, 0)]).unwrap_err();
    assert_eq!(err.to_string(), "job running is over (cancelled)");
}

#[test]
fn releasing_a_vm_requeues_its_unstarted_job_at_the_front_and_retires_the_vm() {
    let mut f = Fixture::new();
    let (dead, dead_token) = f.register(&["linux"]);
    f.submit("first", &["linux"]);
    f.submit("second", &["linux"]);
    assert_eq!(f.acquire_now(&dead, &dead_token), jid("first"));
    let release = f.reg.release_vm(&dead, Some(&dead_token.0), f.now).unwrap();
    assert_eq!(release, Release::Requeued(jid("first")));
    assert_eq!(f.state("first"), JobState::Queued);
    assert_eq!(
        f.reg.matchmaker.queued_jobs().collect::<Vec<_>>(),
        [&jid("first"), &jid("second")]
    );
    // The released VM takes no job any more, and its token no longer
    // passes for the job's VM.
    assert!(matches!(
        f.start(&dead, &dead_token),
        Err(RegistryError::Released(_))
    ));
    assert!(!f.reg.is_job_vm(&jid("first"), Some(&dead_token.0)));
    // Releasing again is a no-op; deregistering it fails nothing.
    let again = f.reg.release_vm(&dead, Some(&dead_token.0), f.now).unwrap();
    assert_eq!(again, Release::Nothing);
    assert_eq!(f.reg.deregister_vm(&dead).unwrap(), None);
    // The job, secrets intact, goes to the next VM.
    let (next, next_token) = f.register(&["linux"]);
    assert_eq!(f.acquire_now(&next, &next_token), jid("first"));
    assert_eq!(
        f.reg.report(&jid("first")).unwrap().vm_id,
        Some(next.clone())
    );
    let applied = f.deliver("first", &next_token, &[started(0, 0)]);
    assert_eq!(applied.next_seq, 1);
}

#[test]
fn a_released_job_goes_straight_to_a_waiting_vm() {
    let mut f = Fixture::new();
    let (a, a_token) = f.register(&["linux"]);
    let (b, b_token) = f.register(&["linux"]);
    f.submit("j", &["linux"]);
    assert_eq!(f.acquire_now(&a, &a_token), jid("j"));
    let b_ticket = f.wait(&b, &b_token);
    f.reg.release_vm(&a, Some(&a_token.0), f.now).unwrap();
    assert_eq!(f.poll(&b, b_ticket, false), Some(jid("j")));
}

#[test]
fn releasing_a_waiting_vm_ends_its_poll_and_its_token_takes_no_job() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    let ticket = f.wait(&vm, &token);
    let release = f.reg.release_vm(&vm, Some(&token.0), f.now).unwrap();
    assert_eq!(release, Release::Nothing);
    assert_eq!(f.reg.counts().waiting_vms, 0);
    assert!(matches!(
        f.reg.poll_acquire(&vm, ticket, false, f.now),
        AcquirePoll::Ended
    ));
    f.submit("j", &["linux"]);
    assert_eq!(f.state("j"), JobState::Queued, "not given to a released VM");
}

#[test]
fn a_started_job_cannot_be_released_and_bad_tokens_are_refused() {
    let mut f = Fixture::new();
    let (vm, token) = f.register(&["linux"]);
    let (_, other_token) = f.register(&["linux"]);
    f.submit("j", &["linux"]);
    f.acquire_now(&vm, &token);
    assert!(matches!(
        f.reg.release_vm(&vm, Some(&other_token.0), f.now),
        Err(RegistryError::BadVmToken)
    ));
    assert!(matches!(
        f.reg.release_vm(&vm, None, f.now),
        Err(RegistryError::BadVmToken)
    ));
    f.deliver("j", &token, &[started(0, 0)]);
    assert!(matches!(
        f.reg.release_vm(&vm, Some(&token.0), f.now),
        Err(RegistryError::JobStarted { .. })
    ));
    assert!(matches!(f.state("j"), JobState::Running { .. }));
}

#[test]
fn a_job_handed_back_too_often_is_given_up() {
    let mut f = Fixture::new();
    f.submit("j", &["linux"]);
    for round in 1..=MAX_RELEASES {
        let (vm, token) = f.register(&["linux"]);
        assert_eq!(f.acquire_now(&vm, &token), jid("j"));
        let release = f.reg.release_vm(&vm, Some(&token.0), f.now).unwrap();
        if round < MAX_RELEASES {
            assert_eq!(release, Release::Requeued(jid("j")));
        } else {
            assert_eq!(release, Release::GaveUp(jid("j")));
            // Still active: the caller ends it with a reason.
            assert!(matches!(f.state("j"), JobState::Assigned { .. }));
        }
    }
}

#[test]
fn deregistering_a_busy_vm_hands_back_its_job_to_fail() {
    let mut f = Fixture::new();
    let (idle, _) = f.register(&["linux"]);
    let (busy, token) = f.register(&["linux"]);
    f.submit("j", &["linux"]);
    f.acquire_now(&busy, &token);
    assert_eq!(f.reg.deregister_vm(&idle).unwrap(), None);
    assert_eq!(f.reg.deregister_vm(&busy).unwrap(), Some(jid("j")));
    assert_eq!(f.reg.counts().vms, 0);
}

#[test]
fn expiry_of_queue_waits_timeouts_and_idle_vms() {
    let mut f = Fixture::new();
    let t0 = f.now;
    f.submit("stuck", &["gpu"]);
    let (vm, token) = f.register(&["linux"]);
    let (_idle, _) = f.register(&["linux"]);
    f.submit("slow", &["linux"]);
    f.acquire_now(&vm, &token);
    // timeout 60 s + grace 10 s.
    assert!(f.reg.expire(t0 + Duration::from_secs(69)).is_empty());
    let expired = f.reg.expire(t0 + Duration::from_secs(70));
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].job, jid("slow"));
    assert!(
        expired[0].reason.starts_with("no completion from VM vm-"),
        "{}",
        expired[0].reason
    );
    assert!(
        expired[0]
            .reason
            .ends_with("job timeout of 1m plus 10s grace")
    );
    let expired = f.reg.expire(t0 + Duration::from_secs(100));
    let stuck = expired.iter().find(|e| e.job == jid("stuck")).unwrap();
    assert_eq!(stuck.reason, "no idle VM with labels [gpu] within 1m 40s");
    f.reg.expire(t0 + Duration::from_secs(1000));
    assert_eq!(
        f.reg.counts().vms,
        1,
        "the idle VM is forgotten, the busy one kept"
    );
    assert!(f.reg.is_job_vm(&jid("slow"), Some(&token.0)));
}

#[test]
fn bounds_on_vms_waiting_vms_and_queue() {
    let mut f = Fixture::with(Limits {
        max_vms: 2,
        max_waiting_vms: 1,
        max_queued_jobs: 1,
        ..limits()
    });
    let (a, a_token) = f.register(&["linux"]);
    let (b, b_token) = f.register(&["linux"]);
    let request = RegisterVmRequest {
        host_id: "h".into(),
        labels: labels(&["linux"]),
        network: true,
    };
    assert!(matches!(
        f.reg.register_vm(&request, f.now),
        Err(RegistryError::Full { limit: 2, .. })
    ));
    f.wait(&a, &a_token);
    assert!(matches!(
        f.start(&b, &b_token),
        Err(RegistryError::Full { limit: 1, .. })
    ));
    assert_eq!(f.reg.counts().waiting_vms, 1);
    f.submit("q1", &["gpu"]);
    assert!(matches!(
        f.reg.submit(job("q2", 1), labels(&["gpu"]), (), f.now),
        Err(RegistryError::Full { limit: 1, .. })
    ));
}

#[test]
fn registration_is_validated() {
    let mut f = Fixture::new();
    let request = RegisterVmRequest {
        host_id: "host/1".into(),
        labels: vec![],
        network: true,
    };
    let err = f.reg.register_vm(&request, f.now).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("host_id"), "{text}");
    assert!(text.contains("labels: must not be empty"), "{text}");
}
