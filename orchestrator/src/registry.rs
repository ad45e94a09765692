//! The orchestrator's in-memory state: registered VMs, active jobs, and the
//! rules that move them. Synchronous and free of I/O; the service wraps it
//! in a mutex and does the file and network work around it.
//!
//! # Jobs
//!
//! ```text
//! Queued --matched--> Assigned{vm} --first event--> Running{vm} --JobFinished--> terminal
//!   |  ^                 |                              |
//!   |  +--poll dropped---+ (job never reached the VM)   |
//!   |  +--VM released----+ (the host agent could not deliver it)
//!   +------------------ cancel / timeout / VM deregistered / shutdown --------> terminal
//! ```
//!
//! A terminal job stays here only until its archive record is written, then
//! [`Registry::remove_job`] drops it: finished jobs live in the archive.
//! Secrets stay in memory only until the VM has demonstrably received the
//! job (its first event), or the job ends.
//!
//! # VMs and their tokens
//!
//! ```text
//! Idle <--poll ends-- Waiting{ticket}     Idle/Waiting --job--> Busy{job} --job ends--> Done{job}
//! Idle/Waiting/Busy{job not started} --release--> Released
//! ```
//!
//! A VM token acquires at most one job, ever: once a VM is `Busy` or
//! `Done`, acquiring again returns the same job while the VM has not yet
//! reported anything (its first response may have been lost), and is refused
//! after that. Deregistration removes the VM, which revokes its token; a job
//! it still ran fails with a reason. A `Done` VM is kept (until deregistered
//! or idle too long) so that the host agent's retries of its last events are
//! still recognised as retries.
//!
//! A host agent whose VM died before its job started (the guest went
//! silent while idle, or the job could not be delivered) releases the VM:
//! the VM takes no job any more, and a job it acquired but never reported
//! on goes back to the front of the queue, at most [`MAX_RELEASES`] times
//! per job (then it fails: something about the job may kill its VMs).
//!
//! Each long poll gets a ticket. If a poll ends before the job matched to it
//! was handed out (the HTTP request was dropped), the job goes back to the
//! front of the queue. A second poll for the same VM supersedes the first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use protocol::api::{
    JobEvent, JobEventKind, JobState, JobStatus, RegisterVmRequest, RegisterVmResponse, StepState,
    StepStatus, VmId,
};
use protocol::message::{Job, JobId, JobResult, Secrets};
use protocol::validation::Violations;
use tokio::sync::Notify;

use crate::auth::{self, AuthError, Secret};
use crate::config::Limits;
use crate::matching::{Matchmaker, satisfies};
use crate::report::{JobReport, describe_result, state_name, unix_ms};

/// How often a job may be handed back by released VMs before it fails.
pub const MAX_RELEASES: u32 = 3;

/// Why a request was refused by the state rules.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The token does not belong to the VM (or the VM is gone: token revoked).
    #[error("unknown VM or invalid VM token")]
    BadVmToken,
    /// No active or archived job has this id (as far as the registry knows).
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    /// No registered VM has this id.
    #[error("unknown VM {0}")]
    UnknownVm(VmId),
    /// The VM's token already acquired a job.
    #[error("VM {vm} already acquired job {job}; a VM token acquires one job only")]
    AlreadyAcquired {
        /// The VM.
        vm: VmId,
        /// Its job.
        job: JobId,
    },
    /// The job ended; new events are not accepted.
    #[error("job {job} is over ({state}){detail}")]
    JobOver {
        /// The job.
        job: JobId,
        /// Its terminal state's name.
        state: &'static str,
        /// `: <why>` or empty.
        detail: String,
    },
    /// Events skip ahead of the next expected `seq`.
    #[error("event gap: expected seq {expected}, got {got}")]
    Gap {
        /// The next expected seq.
        expected: u64,
        /// The first seq posted past the stored ones.
        got: u64,
    },
    /// Events that cannot belong to this job.
    #[error("invalid events: {0}")]
    InvalidEvents(String),
    /// Release of a VM whose job already reported events.
    #[error("VM {vm} cannot be released: its job {job} has started")]
    JobStarted {
        /// The VM.
        vm: VmId,
        /// Its job.
        job: JobId,
    },
    /// Acquire by a VM that was released.
    #[error("VM {0} was released; it takes no job")]
    Released(VmId),
    /// Cancel of a job that already ended.
    #[error("job {0} already finished")]
    AlreadyFinished(JobId),
    /// A bound was reached.
    #[error("too many {what} (limit {limit}); retry later")]
    Full {
        /// What is full.
        what: &'static str,
        /// The bound.
        limit: usize,
    },
    /// A request body broke a rule.
    #[error("invalid request: {0}")]
    Invalid(#[from] Violations),
    /// No randomness for a token.
    #[error(transparent)]
    Random(#[from] AuthError),
}

/// What a VM is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum VmPhase {
    /// Registered, not polling.
    Idle,
    /// In an acquire long poll.
    Waiting { ticket: u64 },
    /// Holds a job. `undelivered` is the ticket of the poll the job was
    /// matched to while that poll has not yet returned it.
    Busy {
        job: JobId,
        undelivered: Option<u64>,
    },
    /// Its job ended (`state`, `detail`); `host_events` events came from
    /// the host agent.
    Done {
        job: JobId,
        host_events: u64,
        state: &'static str,
        detail: Option<String>,
    },
    /// Released by its host agent: takes no job any more.
    Released,
}

#[derive(Debug)]
struct VmEntry {
    labels: Vec<String>,
    token: Secret,
    phase: VmPhase,
    last_seen: Instant,
    wake: Arc<Notify>,
}

#[derive(Debug)]
struct JobEntry<H> {
    handle: H,
    job: Job,
    runs_on: Vec<String>,
    state: JobState,
    steps: Vec<StepStatus>,
    detail: Option<String>,
    vm: Option<VmId>,
    submitted_at: SystemTime,
    assigned_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
    queued_since: Instant,
    deadline: Option<Instant>,
    host_events: u64,
    /// How often a released VM handed the job back.
    releases: u32,
}

/// The first step of an acquire: an answer now, or a ticket to wait with.
#[derive(Debug)]
pub enum AcquireStart {
    /// The VM's job (secrets included).
    Job(Box<Job>),
    /// No job yet: wait on `wake`, then [`Registry::poll_acquire`] with `ticket`.
    Wait {
        /// This poll's ticket.
        ticket: u64,
        /// Notified when the VM's state changes.
        wake: Arc<Notify>,
    },
}

/// The state of a waiting acquire.
#[derive(Debug)]
pub enum AcquirePoll {
    /// The job matched to this poll.
    Job(Box<Job>),
    /// Still nothing; keep waiting.
    Waiting,
    /// The poll is over without a job (timed out, superseded, VM gone).
    Ended,
}

/// What releasing a VM did to its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// The VM held no job that could go back (none, or one that ended).
    Nothing,
    /// The job it had acquired but not started is queued again.
    Requeued(JobId),
    /// The job was handed back [`MAX_RELEASES`] times: the caller fails it.
    GaveUp(JobId),
}

/// Which of the posted events are new.
#[derive(Debug, PartialEq, Eq)]
pub enum EventPlan {
    /// Append the events from this index of the batch on (may be none).
    Append {
        /// Index of the first new event.
        from: usize,
    },
    /// The job is over and every posted event is already stored: a retry.
    AlreadyStored {
        /// Number of events stored from the host agent.
        next_seq: u64,
    },
}

/// What applying events changed.
#[derive(Debug, PartialEq, Eq)]
pub struct Applied {
    /// The next seq expected from the host agent.
    pub next_seq: u64,
    /// The final report, if a `JobFinished` ended the job.
    pub finished: Option<JobReport>,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Jobs waiting for a VM.
    pub queued: usize,
    /// Jobs handed to a VM that reported nothing yet.
    pub assigned: usize,
    /// Jobs running.
    pub running: usize,
    /// VMs registered.
    pub vms: usize,
    /// VMs in an acquire long poll.
    pub waiting_vms: usize,
}

/// A job the registry wants ended, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The job.
    pub job: JobId,
    /// Why it ends.
    pub reason: String,
}

/// Registered VMs, active jobs, and the matchmaker between them. `H` is a
/// per-job handle owned by the caller (the service's log and notifier).
#[derive(Debug)]
pub struct Registry<H> {
    limits: Limits,
    vms: HashMap<VmId, VmEntry>,
    jobs: HashMap<JobId, JobEntry<H>>,
    job_vm: HashMap<JobId, VmId>,
    matchmaker: Matchmaker,
    next_ticket: u64,
}

impl<H: Clone> Registry<H> {
    /// An empty registry enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            vms: HashMap::new(),
            jobs: HashMap::new(),
            job_vm: HashMap::new(),
            matchmaker: Matchmaker::new(),
            next_ticket: 0,
        }
    }

    /// Registers a VM and issues its id and token.
    pub fn register_vm(
        &mut self,
        request: &RegisterVmRequest,
        now: Instant,
    ) -> Result<RegisterVmResponse, RegistryError> {
        request.validate()?;
        if self.vms.len() >= self.limits.max_vms {
            return Err(RegistryError::Full {
                what: "registered VMs",
                limit: self.limits.max_vms,
            });
        }
        let vm_id = auth::new_vm_id()?;
        let token = auth::new_vm_token()?;
        self.vms.insert(
            vm_id.clone(),
            VmEntry {
                labels: request.matching_labels(),
                token: Secret::new(token.0.clone()),
                phase: VmPhase::Idle,
                last_seen: now,
                wake: Arc::new(Notify::new()),
            },
        );
        Ok(RegisterVmResponse { vm_id, token })
    }

    /// Removes a VM, revoking its token. Returns its job if that job is still
    /// active (the caller fails it).
    pub fn deregister_vm(&mut self, vm_id: &VmId) -> Result<Option<JobId>, RegistryError> {
        let vm = self
            .vms
            .remove(vm_id)
            .ok_or_else(|| RegistryError::UnknownVm(vm_id.clone()))?;
        self.matchmaker.withdraw_vm(vm_id);
        vm.wake.notify_waiters();
        self.job_vm.retain(|_, holder| holder != vm_id);
        Ok(match vm.phase {
            VmPhase::Busy { job, .. } => {
                let active = self.jobs.get(&job).is_some_and(|j| !j.state.is_terminal());
                active.then_some(job)
            }
            VmPhase::Idle | VmPhase::Waiting { .. } | VmPhase::Done { .. } | VmPhase::Released => {
                None
            }
        })
    }

    /// Releases the VM holding `token`: it takes no job any more (a waiting
    /// poll ends empty-handed), and a job it acquired but never reported
    /// on goes back to the front of the queue. Idempotent. Refused once the
    /// job has reported events: it may have run.
    pub fn release_vm(
        &mut self,
        vm_id: &VmId,
        token: Option<&str>,
        now: Instant,
    ) -> Result<Release, RegistryError> {
        let vm = self.authenticate(vm_id, token, now)?;
        let job = match vm.phase.clone() {
            VmPhase::Done { .. } | VmPhase::Released => return Ok(Release::Nothing),
            VmPhase::Idle | VmPhase::Waiting { .. } => None,
            VmPhase::Busy { job, .. } => Some(job),
        };
        let started = job.as_ref().and_then(|job| {
            let entry = self.jobs.get(job)?;
            let unstarted = matches!(entry.state, JobState::Assigned { .. });
            (!entry.state.is_terminal() && !unstarted).then(|| job.clone())
        });
        if let Some(job) = started {
            return Err(RegistryError::JobStarted {
                vm: vm_id.clone(),
                job,
            });
        }
        let vm = self.vm_mut(vm_id)?;
        vm.phase = VmPhase::Released;
        vm.wake.notify_waiters();
        self.matchmaker.withdraw_vm(vm_id);
        let Some(job) =
            job.filter(|job| self.jobs.get(job).is_some_and(|e| !e.state.is_terminal()))
        else {
            return Ok(Release::Nothing);
        };
        let entry = self
            .jobs
            .get_mut(&job)
            .ok_or_else(|| RegistryError::UnknownJob(job.clone()))?;
        entry.releases += 1;
        if entry.releases >= MAX_RELEASES {
            return Ok(Release::GaveUp(job));
        }
        entry.queued_since = now;
        self.requeue(&job, now);
        Ok(Release::Requeued(job))
    }

    /// Adds a validated job (id and secrets set, timeout already capped) and
    /// matches it to a waiting VM if one fits.
    pub fn submit(
        &mut self,
        job: Job,
        runs_on: Vec<String>,
        handle: H,
        now: Instant,
    ) -> Result<(), RegistryError> {
        if self.matchmaker.queued_len() >= self.limits.max_queued_jobs {
            return Err(RegistryError::Full {
                what: "queued jobs",
                limit: self.limits.max_queued_jobs,
            });
        }
        let id = job.id.clone();
        let steps = job
            .steps
            .iter()
            .map(|step| StepStatus {
                name: step.name.clone(),
                state: StepState::Pending,
            })
            .collect();
        self.jobs.insert(
            id.clone(),
            JobEntry {
                handle,
                job,
                runs_on: runs_on.clone(),
                state: JobState::Queued,
                steps,
                detail: None,
                vm: None,
                submitted_at: SystemTime::now(),
                assigned_at: None,
                finished_at: None,
                queued_since: now,
                deadline: None,
                host_events: 0,
                releases: 0,
            },
        );
        if let Some(vm) = self.matchmaker.offer_job(id.clone(), runs_on) {
            self.assign_to_waiting(&id, &vm, now);
        }
        Ok(())
    }

    /// Starts an acquire by the VM holding `token`.
    pub fn begin_acquire(
        &mut self,
        vm_id: &VmId,
        token: Option<&str>,
        now: Instant,
    ) -> Result<AcquireStart, RegistryError> {
        let vm = self.authenticate(vm_id, token, now)?;
        match vm.phase.clone() {
            VmPhase::Busy { job, .. } => {
                let entry = self.jobs.get(&job);
                let unreported =
                    entry.is_some_and(|j| matches!(j.state, JobState::Assigned { .. }));
                match entry {
                    Some(entry) if unreported => {
                        let job_to_send = Box::new(entry.job.clone());
                        if let Some(vm) = self.vms.get_mut(vm_id) {
                            vm.phase = VmPhase::Busy {
                                job,
                                undelivered: None,
                            };
                            // A poll this one replaces must end empty-handed.
                            vm.wake.notify_waiters();
                        }
                        Ok(AcquireStart::Job(job_to_send))
                    }
                    _ => Err(RegistryError::AlreadyAcquired {
                        vm: vm_id.clone(),
                        job,
                    }),
                }
            }
            VmPhase::Done { job, .. } => Err(RegistryError::AlreadyAcquired {
                vm: vm_id.clone(),
                job,
            }),
            VmPhase::Released => Err(RegistryError::Released(vm_id.clone())),
            VmPhase::Waiting { .. } => {
                // Supersede the earlier poll; the VM keeps its place in line.
                let ticket = self.new_ticket();
                let vm = self.vm_mut(vm_id)?;
                vm.phase = VmPhase::Waiting { ticket };
                vm.wake.notify_waiters();
                Ok(AcquireStart::Wait {
                    ticket,
                    wake: Arc::clone(&vm.wake),
                })
            }
            VmPhase::Idle => {
                let labels = vm.labels.clone();
                if let Some(job_id) = self.matchmaker.offer_vm(vm_id.clone(), labels) {
                    self.assign(&job_id, vm_id, None, now);
                    let entry = self
                        .jobs
                        .get(&job_id)
                        .ok_or(RegistryError::UnknownJob(job_id))?;
                    return Ok(AcquireStart::Job(Box::new(entry.job.clone())));
                }
                if self.matchmaker.waiting_len() > self.limits.max_waiting_vms {
                    self.matchmaker.withdraw_vm(vm_id);
                    return Err(RegistryError::Full {
                        what: "waiting VMs",
                        limit: self.limits.max_waiting_vms,
                    });
                }
                let ticket = self.new_ticket();
                let vm = self.vm_mut(vm_id)?;
                vm.phase = VmPhase::Waiting { ticket };
                Ok(AcquireStart::Wait {
                    ticket,
                    wake: Arc::clone(&vm.wake),
                })
            }
        }
    }

    /// Checks a waiting acquire after a wake-up, or for the last time when
    /// its wait expired (`last`), which ends the wait.
    pub fn poll_acquire(
        &mut self,
        vm_id: &VmId,
        ticket: u64,
        last: bool,
        now: Instant,
    ) -> AcquirePoll {
        let Some(vm) = self.vms.get_mut(vm_id) else {
            return AcquirePoll::Ended;
        };
        vm.last_seen = now;
        match &vm.phase {
            VmPhase::Waiting { ticket: t } if *t == ticket => {
                if !last {
                    return AcquirePoll::Waiting;
                }
                vm.phase = VmPhase::Idle;
                self.matchmaker.withdraw_vm(vm_id);
                AcquirePoll::Ended
            }
            VmPhase::Busy {
                job,
                undelivered: Some(t),
            } if *t == ticket => {
                let job = job.clone();
                vm.phase = VmPhase::Busy {
                    job: job.clone(),
                    undelivered: None,
                };
                match self.jobs.get(&job) {
                    Some(entry) => AcquirePoll::Job(Box::new(entry.job.clone())),
                    None => AcquirePoll::Ended,
                }
            }
            _ => AcquirePoll::Ended,
        }
    }

    /// A waiting acquire was dropped before it answered: the VM stops
    /// waiting, and a job matched to this poll goes back to the queue.
    pub fn abandon_acquire(&mut self, vm_id: &VmId, ticket: u64, now: Instant) {
        let Some(vm) = self.vms.get_mut(vm_id) else {
            return;
        };
        match vm.phase.clone() {
            VmPhase::Waiting { ticket: t } if t == ticket => {
                vm.phase = VmPhase::Idle;
                self.matchmaker.withdraw_vm(vm_id);
            }
            VmPhase::Busy {
                job,
                undelivered: Some(t),
            } if t == ticket => {
                vm.phase = VmPhase::Idle;
                self.requeue(&job, now);
            }
            _ => {}
        }
    }

    /// Puts an assigned job back at the front of the queue (or straight to
    /// a waiting VM); its VM no longer holds it.
    fn requeue(&mut self, job: &JobId, now: Instant) {
        self.job_vm.remove(job);
        let Some(entry) = self.jobs.get_mut(job) else {
            return;
        };
        entry.state = JobState::Queued;
        entry.vm = None;
        entry.assigned_at = None;
        entry.deadline = None;
        let runs_on = entry.runs_on.clone();
        if let Some(other) = self.matchmaker.return_job(job.clone(), runs_on) {
            self.assign_to_waiting(job, &other, now);
        }
    }

    /// Whether `token` is the token of the VM that holds (or held) job `job_id`.
    pub fn is_job_vm(&self, job_id: &JobId, token: Option<&str>) -> bool {
        let Some(token) = token else { return false };
        self.job_vm
            .get(job_id)
            .and_then(|vm| self.vms.get(vm))
            .is_some_and(|vm| vm.token.matches(token))
    }

    /// Whether `token` is the token of VM `vm_id` (reads only: for checking
    /// a request's credential before its body is read).
    pub fn is_vm_token(&self, vm_id: &VmId, token: Option<&str>) -> bool {
        let Some(token) = token else { return false };
        self.vms
            .get(vm_id)
            .is_some_and(|vm| vm.token.matches(token))
    }

    /// Whether `token` is the token of some registered VM (each compared in
    /// constant time).
    pub fn is_any_vm_token(&self, token: Option<&str>) -> bool {
        let Some(token) = token else { return false };
        self.vms
            .values()
            .fold(false, |found, vm| vm.token.matches(token) | found)
    }

    /// Decides which posted events are new, after checking the token and
    /// that the events fit the job. Nothing changes.
    pub fn plan_events(
        &mut self,
        job_id: &JobId,
        token: Option<&str>,
        events: &[JobEvent],
        now: Instant,
    ) -> Result<EventPlan, RegistryError> {
        if !self.is_job_vm(job_id, token) {
            return Err(RegistryError::BadVmToken);
        }
        if let Some(vm) = self.job_vm.get(job_id).and_then(|vm| self.vms.get_mut(vm)) {
            vm.last_seen = now;
        }
        let Some(entry) = self.jobs.get(job_id).filter(|e| !e.state.is_terminal()) else {
            return self.plan_for_finished(job_id, events);
        };
        let stored = entry.host_events;
        let from = events.partition_point(|e| e.seq < stored);
        let Some(first_new) = events.get(from) else {
            return Ok(EventPlan::Append { from });
        };
        if first_new.seq != stored {
            return Err(RegistryError::Gap {
                expected: stored,
                got: first_new.seq,
            });
        }
        check_events_fit(&events[from..], entry.steps.len())?;
        Ok(EventPlan::Append { from })
    }

    fn plan_for_finished(
        &self,
        job_id: &JobId,
        events: &[JobEvent],
    ) -> Result<EventPlan, RegistryError> {
        let (state, detail, host_events) = match self.jobs.get(job_id) {
            Some(entry) => (
                state_name(&entry.state),
                entry.detail.clone(),
                entry.host_events,
            ),
            None => {
                let vm = self.job_vm.get(job_id).and_then(|vm| self.vms.get(vm));
                match vm.map(|vm| &vm.phase) {
                    Some(VmPhase::Done {
                        host_events,
                        state,
                        detail,
                        ..
                    }) => (*state, detail.clone(), *host_events),
                    _ => return Err(RegistryError::UnknownJob(job_id.clone())),
                }
            }
        };
        if events.iter().all(|e| e.seq < host_events) && !events.is_empty() {
            return Ok(EventPlan::AlreadyStored {
                next_seq: host_events,
            });
        }
        Err(RegistryError::JobOver {
            job: job_id.clone(),
            state,
            detail: detail.map(|d| format!(": {d}")).unwrap_or_default(),
        })
    }

    /// Applies events that were just appended to the job's log (the new
    /// ones from [`Self::plan_events`]).
    pub fn apply_events(
        &mut self,
        job_id: &JobId,
        events: &[JobEvent],
        now: Instant,
    ) -> Result<Applied, RegistryError> {
        let entry = self
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| RegistryError::UnknownJob(job_id.clone()))?;
        if !events.is_empty() {
            if let JobState::Assigned { vm_id } = &entry.state {
                entry.state = JobState::Running {
                    vm_id: vm_id.clone(),
                };
            }
            // The VM has the job: the secrets are no longer needed here.
            entry.job.secrets = Secrets::default();
        }
        let mut result = None;
        for event in events {
            entry.host_events = event.seq + 1;
            match &event.event {
                JobEventKind::StepStarted(started) => {
                    if let Some(step) = entry.steps.get_mut(started.step as usize) {
                        step.state = StepState::Running;
                    }
                }
                JobEventKind::StepFinished(finished) => {
                    if let Some(step) = entry.steps.get_mut(finished.step as usize) {
                        step.state = StepState::Finished {
                            exit_code: finished.exit_code,
                            signal: finished.signal,
                            duration_ms: finished.duration_ms,
                        };
                    }
                }
                JobEventKind::JobFinished(finished) => result = Some(finished.result.clone()),
                JobEventKind::LogChunk(_) => {}
            }
        }
        let next_seq = entry.host_events;
        let finished = match result {
            Some(result) => {
                let detail = describe_result(&result, &entry.steps);
                Some(self.end_job(job_id, result, detail, now)?)
            }
            None => None,
        };
        Ok(Applied { next_seq, finished })
    }

    /// Checks that job `job_id` is active (for cancel).
    pub fn check_active(&self, job_id: &JobId) -> Result<(), RegistryError> {
        match self.jobs.get(job_id) {
            Some(entry) if entry.state.is_terminal() => {
                Err(RegistryError::AlreadyFinished(job_id.clone()))
            }
            Some(_) => Ok(()),
            None => Err(RegistryError::UnknownJob(job_id.clone())),
        }
    }

    /// Ends an active job with `result` (cancel, timeout, lost VM, shutdown).
    /// Returns its final report; the caller appends the matching
    /// `JobFinished` event, archives the job, then calls [`Self::remove_job`].
    pub fn end_job(
        &mut self,
        job_id: &JobId,
        result: JobResult,
        detail: Option<String>,
        now: Instant,
    ) -> Result<JobReport, RegistryError> {
        self.check_active(job_id)?;
        self.matchmaker.withdraw_job(job_id);
        let entry = self
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| RegistryError::UnknownJob(job_id.clone()))?;
        entry.state = JobState::from(result);
        let state = state_name(&entry.state);
        entry.detail = detail.clone();
        entry.finished_at = Some(SystemTime::now());
        entry.deadline = None;
        entry.job.secrets = Secrets::default();
        let host_events = entry.host_events;
        if let Some(vm) = entry.vm.as_ref().and_then(|vm| self.vms.get_mut(vm))
            && matches!(&vm.phase, VmPhase::Busy { job, .. } if job == job_id)
        {
            vm.phase = VmPhase::Done {
                job: job_id.clone(),
                host_events,
                state,
                detail,
            };
            vm.last_seen = now;
            vm.wake.notify_waiters();
        }
        self.report(job_id)
            .ok_or_else(|| RegistryError::UnknownJob(job_id.clone()))
    }

    /// Forgets a terminal job (once it is archived).
    pub fn remove_job(&mut self, job_id: &JobId) {
        if self.jobs.get(job_id).is_some_and(|e| e.state.is_terminal()) {
            self.jobs.remove(job_id);
        }
    }

    /// The per-job handle of an active (or just finished) job.
    pub fn handle(&self, job_id: &JobId) -> Option<H> {
        self.jobs.get(job_id).map(|entry| entry.handle.clone())
    }

    /// The report of an active (or just finished) job.
    pub fn report(&self, job_id: &JobId) -> Option<JobReport> {
        let entry = self.jobs.get(job_id)?;
        let detail = match entry.state {
            JobState::Queued => Some(self.waiting_reason(job_id, &entry.runs_on)),
            _ => entry.detail.clone(),
        };
        Some(JobReport {
            status: JobStatus {
                id: job_id.clone(),
                name: entry.job.name.clone(),
                runs_on: entry.runs_on.clone(),
                state: entry.state.clone(),
                steps: entry.steps.clone(),
            },
            detail,
            vm_id: entry.vm.clone(),
            timeout_secs: entry.job.timeout_secs,
            submitted_at_ms: unix_ms(entry.submitted_at),
            assigned_at_ms: entry.assigned_at.map(unix_ms),
            finished_at_ms: entry.finished_at.map(unix_ms),
        })
    }

    fn waiting_reason(&self, job_id: &JobId, runs_on: &[String]) -> String {
        let labels = runs_on.join(", ");
        let matching = self
            .vms
            .values()
            .filter(|vm| satisfies(&vm.labels, runs_on))
            .count();
        let position = self
            .matchmaker
            .queued_jobs()
            .position(|id| id == job_id)
            .map_or(0, |p| p + 1);
        let why = match matching {
            0 => "no registered VM has them".to_owned(),
            1 => "the 1 registered VM that has them is busy".to_owned(),
            n => format!("all {n} registered VMs that have them are busy"),
        };
        format!("no idle VM with labels [{labels}]: {why} (queue position {position})")
    }

    /// Jobs that waited in the queue too long, and jobs whose VM did not
    /// report completion by their timeout plus grace; removes VMs idle for
    /// too long. The caller ends the returned jobs.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let limits = &self.limits;
        let mut expired = Vec::new();
        for (id, entry) in &self.jobs {
            if entry.state.is_terminal() {
                continue;
            }
            if entry.state == JobState::Queued {
                if now.duration_since(entry.queued_since) >= limits.max_queue_wait {
                    expired.push(Expired {
                        job: id.clone(),
                        reason: format!(
                            "no idle VM with labels [{}] within {}",
                            entry.runs_on.join(", "),
                            humantime::format_duration(limits.max_queue_wait)
                        ),
                    });
                }
            } else if entry.deadline.is_some_and(|deadline| now >= deadline) {
                let vm = entry.vm.as_ref().map_or("?", |vm| vm.0.as_str());
                expired.push(Expired {
                    job: id.clone(),
                    reason: format!(
                        "no completion from VM {vm} within the job timeout of {} plus {} grace",
                        humantime::format_duration(Duration::from_secs(entry.job.timeout_secs)),
                        humantime::format_duration(limits.timeout_grace)
                    ),
                });
            }
        }
        let idle_timeout = limits.vm_idle_timeout;
        let stale: Vec<VmId> = self
            .vms
            .iter()
            .filter(|(_, vm)| {
                matches!(
                    vm.phase,
                    VmPhase::Idle | VmPhase::Done { .. } | VmPhase::Released
                )
            })
            .filter(|(_, vm)| now.duration_since(vm.last_seen) >= idle_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for vm in stale {
            // Idle, Done and Released VMs hold no active job: nothing to fail.
            let _ = self.deregister_vm(&vm);
        }
        expired
    }

    /// Ids of every job not yet terminal.
    pub fn active_jobs(&self) -> Vec<JobId> {
        self.jobs
            .iter()
            .filter(|(_, entry)| !entry.state.is_terminal())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Counts for metrics.
    pub fn counts(&self) -> Counts {
        let mut counts = Counts {
            vms: self.vms.len(),
            waiting_vms: self.matchmaker.waiting_len(),
            ..Counts::default()
        };
        for entry in self.jobs.values() {
            match entry.state {
                JobState::Queued => counts.queued += 1,
                JobState::Assigned { .. } => counts.assigned += 1,
                JobState::Running { .. } => counts.running += 1,
                _ => {}
            }
        }
        counts
    }

    fn authenticate(
        &mut self,
        vm_id: &VmId,
        token: Option<&str>,
        now: Instant,
    ) -> Result<&mut VmEntry, RegistryError> {
        let vm = self.vms.get_mut(vm_id).ok_or(RegistryError::BadVmToken)?;
        if !token.is_some_and(|t| vm.token.matches(t)) {
            return Err(RegistryError::BadVmToken);
        }
        vm.last_seen = now;
        Ok(vm)
    }

    fn vm_mut(&mut self, vm_id: &VmId) -> Result<&mut VmEntry, RegistryError> {
        self.vms
            .get_mut(vm_id)
            .ok_or_else(|| RegistryError::UnknownVm(vm_id.clone()))
    }

    fn new_ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.next_ticket
    }

    /// Hands `job` to `vm`, which the matchmaker just took out of its waiting
    /// line, and wakes the VM's poll.
    fn assign_to_waiting(&mut self, job: &JobId, vm: &VmId, now: Instant) {
        let ticket = match self.vms.get(vm).map(|entry| &entry.phase) {
            Some(VmPhase::Waiting { ticket }) => Some(*ticket),
            _ => None,
        };
        self.assign(job, vm, ticket, now);
        if let Some(entry) = self.vms.get(vm) {
            entry.wake.notify_waiters();
        }
    }

    fn assign(&mut self, job_id: &JobId, vm_id: &VmId, undelivered: Option<u64>, now: Instant) {
        let grace = self.limits.timeout_grace;
        let Some(entry) = self.jobs.get_mut(job_id) else {
            return;
        };
        entry.state = JobState::Assigned {
            vm_id: vm_id.clone(),
        };
        entry.vm = Some(vm_id.clone());
        entry.assigned_at = Some(SystemTime::now());
        entry.deadline = Some(now + Duration::from_secs(entry.job.timeout_secs) + grace);
        self.job_vm.insert(job_id.clone(), vm_id.clone());
        if let Some(vm) = self.vms.get_mut(vm_id) {
            vm.phase = VmPhase::Busy {
                job: job_id.clone(),
                undelivered,
            };
        }
    }
}

/// Checks that events (the new ones of a batch) fit a job of `step_count`
/// steps: step indices in range, nothing after `JobFinished`.
fn check_events_fit(events: &[JobEvent], step_count: usize) -> Result<(), RegistryError> {
    let in_range = |step: u32| (step as usize) < step_count;
    for (i, event) in events.iter().enumerate() {
        let step = match &event.event {
            JobEventKind::LogChunk(chunk) => Some(chunk.step),
            JobEventKind::StepStarted(started) => Some(started.step),
            JobEventKind::StepFinished(finished) => Some(finished.step),
            JobEventKind::JobFinished(finished) => {
                if i + 1 != events.len() {
                    return Err(RegistryError::InvalidEvents(format!(
                        "event seq {} follows job_finished",
                        events[i + 1].seq
                    )));
                }
                match finished.result {
                    JobResult::Failed { step } | JobResult::TimedOut { step } => Some(step),
                    _ => None,
                }
            }
        };
        if let Some(step) = step.filter(|s| !in_range(*s)) {
            return Err(RegistryError::InvalidEvents(format!(
                "event seq {} refers to step {step}, but the job has {step_count} steps",
                event.seq
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
