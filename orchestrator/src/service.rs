//! The orchestrator's operations, one method per API route, independent of
//! HTTP: authentication, the registry's rules, the event logs, the archive,
//! long polls and timeouts.
//!
//! # Locking
//!
//! Two kinds of locks exist: the registry mutex (a `std` mutex, held only
//! for short synchronous sections, never across an `.await`) and one async
//! mutex per active job around its [`EventLog`]. Whoever changes a job's
//! events (the host agent's posts, or the orchestrator ending the job:
//! cancel, timeout, deregistration, shutdown) takes the job's log lock first
//! and the registry lock inside it, so the log and the job's state change
//! together and the order of a job's events is the order of their appends.
//!
//! # Ending a job
//!
//! Whoever ends a job appends its last event: the host agent's own
//! `JobFinished`, or one the orchestrator appends (cancelled, or an error
//! with its reason), so a follower always sees a `JobFinished` last. Then
//! the log is synced, the archive record written, followers are told, and
//! the job leaves memory. A host agent whose job was ended by the
//! orchestrator learns it from its next event post (410 Gone, with the
//! reason), from an empty event post (the cheap "cancel poll"), or from
//! `GET /v1/jobs/{id}` with its VM token (terminal state).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use protocol::api::{
    AcquireJobRequest, CancelJobRequest, JobEvent, JobEventKind, JobEventsPage,
    PostJobEventsRequest, RegisterVmRequest, RegisterVmResponse, SubmitJobRequest, VmId,
};
use protocol::limits;
use protocol::message::{Job, JobFinished, JobId, JobResult};
use protocol::validation::Violations;
use tokio::sync::{Mutex as AsyncMutex, watch};

use crate::archive::{Archive, ArchiveError, ArchiveRecord};
use crate::auth::{self, Access, AuthError, Credentials};
use crate::config::Limits;
use crate::event_log::{EventLog, EventLogError, ReadCursor, read_page};
use crate::metrics::Metrics;
use crate::registry::{
    AcquirePoll, AcquireStart, EventPlan, MAX_RELEASES, Registry, RegistryError, Release,
};
use crate::report::{JobReport, state_name};

/// Why an operation failed. The HTTP layer maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The bearer token is missing or not the credential this route needs.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A state rule refused the request.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The request body broke a rule (message names the field).
    #[error("invalid request: {0}")]
    Invalid(#[from] Violations),
    /// The job spec is invalid.
    #[error("{0}")]
    Spec(String),
    /// No active or archived job has this id.
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// The orchestrator is stopping.
    #[error("the orchestrator is shutting down")]
    ShuttingDown,
    /// A job's log could not be written or read.
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    /// The archive could not be written or read.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// No randomness for an id.
    #[error(transparent)]
    Random(#[from] AuthError),
    /// A blocking task died.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// How far a job's log is, for followers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    /// Events in the log.
    events: u64,
    /// The job is over and archived: no event will follow.
    finished: bool,
}

/// What the service keeps per active job besides the registry entry.
#[derive(Debug)]
pub struct JobHandle {
    log: AsyncMutex<EventLog>,
    progress: watch::Sender<Progress>,
}

/// The orchestrator: registry, logs, archive, credentials and metrics.
#[derive(Debug)]
pub struct Orchestrator {
    registry: Mutex<Registry<Arc<JobHandle>>>,
    archive: Archive,
    credentials: Credentials,
    limits: Limits,
    metrics: Metrics,
    shutdown: watch::Sender<bool>,
}

const HOST_ONLY: &str = "this route needs the host credential";
const CLIENT_ONLY: &str = "this route needs the client credential";
const CLIENT_OR_VM: &str = "this route needs the client credential or the job's VM token";
const ANY_CREDENTIAL: &str = "this route needs a credential";

impl Orchestrator {
    /// An orchestrator with no VMs and no jobs.
    pub fn new(archive: Archive, credentials: Credentials, limits: Limits) -> Self {
        Self {
            registry: Mutex::new(Registry::new(limits.clone())),
            archive,
            credentials,
            limits,
            metrics: Metrics::new(),
            shutdown: watch::channel(false).0,
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry<Arc<JobHandle>>> {
        // The registry's methods keep it consistent at every return, so a
        // panic elsewhere while holding the lock leaves nothing half-done.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The bounds this orchestrator enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks `bearer` against what a route needs, changing nothing. The
    /// HTTP layer calls it before reading a request's body; each operation
    /// still checks its own credential.
    pub fn authorize(&self, access: &Access, bearer: Option<&str>) -> Result<(), ServiceError> {
        let creds = &self.credentials;
        let (allowed, refusal) = match access {
            Access::Public => (true, None),
            Access::Host => (creds.is_host(bearer), Some(HOST_ONLY)),
            Access::Client => (creds.is_client(bearer), Some(CLIENT_ONLY)),
            Access::Vm(vm_id) => (self.registry().is_vm_token(vm_id, bearer), None),
            Access::JobVm(job_id) => (self.registry().is_job_vm(job_id, bearer), None),
            Access::ClientOrJobVm(job_id) => (
                creds.is_client(bearer) || self.registry().is_job_vm(job_id, bearer),
                Some(CLIENT_OR_VM),
            ),
            Access::Any => (
                creds.is_host(bearer)
                    || creds.is_client(bearer)
                    || self.registry().is_any_vm_token(bearer),
                Some(ANY_CREDENTIAL),
            ),
        };
        match (allowed, refusal) {
            (true, _) => Ok(()),
            (false, Some(message)) => Err(ServiceError::Unauthorized(message)),
            (false, None) => Err(RegistryError::BadVmToken.into()),
        }
    }

    /// The metrics, rendered with current counts.
    pub fn render_metrics(&self) -> String {
        let counts = self.registry().counts();
        self.metrics.render(counts)
    }

    /// Counts an error response (for metrics).
    pub fn count_api_error(&self, status: u16) {
        self.metrics.api_error(status);
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// `POST /v1/vms`: registers a VM (host credential).
    pub fn register_vm(
        &self,
        bearer: Option<&str>,
        request: &RegisterVmRequest,
    ) -> Result<RegisterVmResponse, ServiceError> {
        if !self.credentials.is_host(bearer) {
            return Err(ServiceError::Unauthorized(HOST_ONLY));
        }
        if self.shutting_down() {
            return Err(ServiceError::ShuttingDown);
        }
        let response = self.registry().register_vm(request, Instant::now())?;
        tracing::info!(vm_id = %response.vm_id, host_id = %request.host_id,
            labels = ?request.labels, "VM registered");
        Ok(response)
    }

    /// `DELETE /v1/vms/{vm_id}`: removes a VM and revokes its token (host
    /// credential). A job it still ran fails.
    pub async fn deregister_vm(
        &self,
        bearer: Option<&str>,
        vm_id: &VmId,
    ) -> Result<(), ServiceError> {
        if !self.credentials.is_host(bearer) {
            return Err(ServiceError::Unauthorized(HOST_ONLY));
        }
        let orphan = self.registry().deregister_vm(vm_id)?;
        tracing::info!(%vm_id, "VM deregistered");
        if let Some(job) = orphan {
            let reason = format!("VM {vm_id} was deregistered before the job finished");
            self.end_job_quietly(&job, JobResult::Error { reason })
                .await;
        }
        Ok(())
    }

    /// `POST /v1/vms/{vm_id}/acquire`: the VM's job, waiting up to
    /// `wait_secs` for one (VM token).
    pub async fn acquire(
        &self,
        bearer: Option<&str>,
        vm_id: &VmId,
        request: &AcquireJobRequest,
    ) -> Result<Option<Job>, ServiceError> {
        request.validate()?;
        if self.shutting_down() {
            return Err(ServiceError::ShuttingDown);
        }
        let start = self
            .registry()
            .begin_acquire(vm_id, bearer, Instant::now())?;
        let (ticket, wake) = match start {
            AcquireStart::Job(job) => {
                tracing::info!(%vm_id, job_id = %job.id, "job handed to VM");
                return Ok(Some(*job));
            }
            AcquireStart::Wait { ticket, wake } => (ticket, wake),
        };
        let mut guard = AbandonGuard {
            service: self,
            vm_id,
            ticket,
            armed: true,
        };
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(u64::from(request.wait_secs.min(limits::MAX_LONG_POLL_SECS)));
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            // Register for wake-ups before looking, so none is missed.
            notified.as_mut().enable();
            let last = tokio::time::Instant::now() >= deadline || *shutdown.borrow_and_update();
            let poll = self
                .registry()
                .poll_acquire(vm_id, ticket, last, Instant::now());
            match poll {
                AcquirePoll::Job(job) => {
                    guard.armed = false;
                    tracing::info!(%vm_id, job_id = %job.id, "job handed to waiting VM");
                    return Ok(Some(*job));
                }
                AcquirePoll::Ended => {
                    guard.armed = false;
                    return Ok(None);
                }
                AcquirePoll::Waiting => {}
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// `POST /v1/vms/{vm_id}/release`: the VM takes no job any more, and a
    /// job it acquired but never started goes back to the queue (VM token).
    /// A job handed back [`MAX_RELEASES`] times fails instead. Returns the
    /// job queued again, if any.
    pub async fn release_vm(
        &self,
        bearer: Option<&str>,
        vm_id: &VmId,
    ) -> Result<Option<JobId>, ServiceError> {
        let release = self.registry().release_vm(vm_id, bearer, Instant::now())?;
        match release {
            Release::Nothing => {
                tracing::info!(%vm_id, "VM released");
                Ok(None)
            }
            Release::Requeued(job_id) => {
                tracing::warn!(%vm_id, %job_id, "VM released before its job started; job queued again");
                Ok(Some(job_id))
            }
            Release::GaveUp(job_id) => {
                let reason = format!(
                    "the job was handed back by {MAX_RELEASES} VMs that died before it started"
                );
                self.end_job_quietly(&job_id, JobResult::Error { reason })
                    .await;
                Ok(None)
            }
        }
    }

    /// `POST /v1/jobs/{job_id}/events`: stores a batch of the job's events
    /// (the job's VM token). Returns the next seq expected.
    pub async fn post_events(
        &self,
        bearer: Option<&str>,
        job_id: &JobId,
        request: PostJobEventsRequest,
    ) -> Result<u64, ServiceError> {
        request.validate()?;
        let mut events = request.events;
        let handle = self.registry().handle(job_id);
        let Some(handle) = handle else {
            // Not active: only a retry of events already stored succeeds.
            return match self
                .registry()
                .plan_events(job_id, bearer, &events, Instant::now())?
            {
                EventPlan::AlreadyStored { next_seq } => Ok(next_seq),
                EventPlan::Append { .. } => Err(ServiceError::JobNotFound(job_id.clone())),
            };
        };
        let mut log = handle.log.lock().await;
        let plan = self
            .registry()
            .plan_events(job_id, bearer, &events, Instant::now())?;
        let from = match plan {
            EventPlan::AlreadyStored { next_seq } => return Ok(next_seq),
            EventPlan::Append { from } => from,
        };
        let new = &mut events[from..];
        if let Err(err) = log.append(new).await {
            drop(log);
            tracing::error!(%job_id, %err, "cannot write job log");
            let reason = format!("orchestrator cannot store the job's log: {err}");
            self.end_job_quietly(job_id, JobResult::Error { reason })
                .await;
            return Err(err.into());
        }
        let applied = self.registry().apply_events(job_id, new, Instant::now())?;
        let events_now = log.next_seq();
        handle.progress.send_modify(|p| p.events = events_now);
        if let Some(report) = applied.finished {
            tracing::info!(%job_id, state = state_name(&report.status.state),
                detail = report.detail.as_deref().unwrap_or(""), "job finished");
            self.archive_job(job_id, &handle, &log, report).await?;
        }
        Ok(applied.next_seq)
    }

    /// `POST /v1/jobs`: validates and queues a job (client credential).
    pub async fn submit(
        &self,
        bearer: Option<&str>,
        request: &SubmitJobRequest,
    ) -> Result<JobId, ServiceError> {
        if !self.credentials.is_client(bearer) {
            return Err(ServiceError::Unauthorized(CLIENT_ONLY));
        }
        if self.shutting_down() {
            return Err(ServiceError::ShuttingDown);
        }
        let id = auth::new_job_id()?;
        let mut job = request
            .to_job(id.clone())
            .map_err(|err| ServiceError::Spec(format!("invalid job spec: {err}")))?;
        job.timeout_secs = self.limits.job_timeout_secs(job.timeout_secs);
        for step in &mut job.steps {
            step.timeout_secs = step.timeout_secs.map(|secs| secs.min(job.timeout_secs));
        }
        let path = self
            .archive
            .log_path(&id)
            .ok_or_else(|| ServiceError::Spec(format!("job id {id} is not an identifier")))?;
        let bounds = self.limits.log_bounds();
        let create_path = path.clone();
        let log = tokio::task::spawn_blocking(move || EventLog::create(create_path, bounds))
            .await
            .map_err(|err| ServiceError::Task(err.to_string()))??;
        let handle = Arc::new(JobHandle {
            log: AsyncMutex::new(log),
            progress: watch::channel(Progress::default()).0,
        });
        let runs_on = request.spec.required_labels();
        let submitted = self
            .registry()
            .submit(job, runs_on.clone(), handle, Instant::now());
        if let Err(err) = submitted {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(err.into());
        }
        self.metrics.job_submitted();
        tracing::info!(job_id = %id, name = %request.spec.name, ?runs_on, "job submitted");
        Ok(id)
    }

    /// `GET /v1/jobs/{job_id}`: the job's report, active or archived
    /// (client credential, or the VM token of the job's VM).
    pub async fn job_report(
        &self,
        bearer: Option<&str>,
        job_id: &JobId,
    ) -> Result<JobReport, ServiceError> {
        let report = {
            let registry = self.registry();
            if !self.credentials.is_client(bearer) && !registry.is_job_vm(job_id, bearer) {
                return Err(ServiceError::Unauthorized(CLIENT_OR_VM));
            }
            registry.report(job_id)
        };
        if let Some(report) = report {
            return Ok(report);
        }
        match self.archive.load(job_id).await? {
            Some(record) => Ok(record.report),
            None => Err(ServiceError::JobNotFound(job_id.clone())),
        }
    }

    /// `GET /v1/jobs/{job_id}/events?after=N&wait_secs=S`: the job's events
    /// from `after` on, waiting up to `wait_secs` for new ones while the
    /// job is active (client credential).
    pub async fn events_page(
        &self,
        bearer: Option<&str>,
        job_id: &JobId,
        after: u64,
        wait_secs: u32,
    ) -> Result<JobEventsPage, ServiceError> {
        if !self.credentials.is_client(bearer) {
            return Err(ServiceError::Unauthorized(CLIENT_ONLY));
        }
        let wait = Duration::from_secs(u64::from(wait_secs.min(limits::MAX_LONG_POLL_SECS)));
        let deadline = tokio::time::Instant::now() + wait;
        let handle = self.registry().handle(job_id);
        let Some(handle) = handle else {
            return self.archived_page(job_id, after).await;
        };
        let mut progress_rx = handle.progress.subscribe();
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let progress = *progress_rx.borrow_and_update();
            if after < progress.events {
                let cursor = handle.log.lock().await.cursor(after);
                let events = self.read_page(cursor, after).await?;
                return Ok(page(events, after, progress.finished, progress.events));
            }
            if progress.finished || tokio::time::Instant::now() >= deadline {
                return Ok(page(Vec::new(), after, progress.finished, progress.events));
            }
            tokio::select! {
                changed = progress_rx.changed() => {
                    if changed.is_err() {
                        return Ok(page(Vec::new(), after, false, progress.events));
                    }
                }
                () = tokio::time::sleep_until(deadline) => {}
                _ = shutdown.changed() => {
                    return Ok(page(Vec::new(), after, false, progress.events));
                }
            }
        }
    }

    async fn archived_page(
        &self,
        job_id: &JobId,
        after: u64,
    ) -> Result<JobEventsPage, ServiceError> {
        let record = self
            .archive
            .load(job_id)
            .await?
            .ok_or_else(|| ServiceError::JobNotFound(job_id.clone()))?;
        let path = self
            .archive
            .log_path(job_id)
            .ok_or_else(|| ServiceError::JobNotFound(job_id.clone()))?;
        let cursor = record.log.cursor(path, after);
        let events = if after < record.log.events {
            self.read_page(cursor, after).await?
        } else {
            Vec::new()
        };
        Ok(page(events, after, true, record.log.events))
    }

    async fn read_page(
        &self,
        cursor: ReadCursor,
        after: u64,
    ) -> Result<Vec<JobEvent>, ServiceError> {
        let max_events = self.limits.page_max_events;
        let max_bytes = self.limits.page_max_bytes;
        let events =
            tokio::task::spawn_blocking(move || read_page(&cursor, after, max_events, max_bytes))
                .await
                .map_err(|err| ServiceError::Task(err.to_string()))??;
        Ok(events)
    }

    /// `POST /v1/jobs/{job_id}/cancel`: ends a queued or running job as
    /// cancelled (client credential). Its VM's host agent learns it from its
    /// next event post (410) or job status.
    pub async fn cancel(
        &self,
        bearer: Option<&str>,
        job_id: &JobId,
        request: &CancelJobRequest,
    ) -> Result<JobReport, ServiceError> {
        if !self.credentials.is_client(bearer) {
            return Err(ServiceError::Unauthorized(CLIENT_ONLY));
        }
        request.validate()?;
        let active = self.registry().check_active(job_id);
        if let Err(RegistryError::UnknownJob(_)) = active {
            return match self.archive.load(job_id).await? {
                Some(_) => Err(RegistryError::AlreadyFinished(job_id.clone()).into()),
                None => Err(ServiceError::JobNotFound(job_id.clone())),
            };
        }
        active?;
        let detail = request.reason.clone().filter(|r| !r.trim().is_empty());
        let report = self.end_job(job_id, JobResult::Cancelled, detail).await?;
        tracing::info!(%job_id, "job cancelled");
        Ok(report)
    }

    /// Ends an active job from the orchestrator's side: appends the final
    /// `JobFinished`, archives the job, and returns its final report.
    async fn end_job(
        &self,
        job_id: &JobId,
        result: JobResult,
        detail: Option<String>,
    ) -> Result<JobReport, ServiceError> {
        let handle = self
            .registry()
            .handle(job_id)
            .ok_or_else(|| ServiceError::JobNotFound(job_id.clone()))?;
        let mut log = handle.log.lock().await;
        let report = self
            .registry()
            .end_job(job_id, result.clone(), detail, Instant::now())?;
        let mut last = [JobEvent {
            seq: log.next_seq(),
            event: JobEventKind::JobFinished(JobFinished { result }),
        }];
        if let Err(err) = log.append(&mut last).await {
            tracing::error!(%job_id, %err, "cannot append the final event");
        }
        let events_now = log.next_seq();
        handle.progress.send_modify(|p| p.events = events_now);
        self.archive_job(job_id, &handle, &log, report.clone())
            .await?;
        Ok(report)
    }

    /// [`Self::end_job`] where the caller has no one to report failure to.
    async fn end_job_quietly(&self, job_id: &JobId, result: JobResult) {
        let detail = match &result {
            JobResult::Error { reason } => Some(reason.clone()),
            _ => None,
        };
        match self.end_job(job_id, result, detail).await {
            Ok(report) => {
                tracing::warn!(%job_id, detail = report.detail.as_deref().unwrap_or(""),
                    "job ended by the orchestrator");
            }
            Err(ServiceError::Registry(RegistryError::AlreadyFinished(_))) => {}
            Err(err) => tracing::error!(%job_id, %err, "cannot end job"),
        }
    }

    /// Syncs the log, writes the archive record, tells followers, and drops
    /// the job from memory.
    async fn archive_job(
        &self,
        job_id: &JobId,
        handle: &JobHandle,
        log: &EventLog,
        report: JobReport,
    ) -> Result<(), ServiceError> {
        self.metrics.job_finished(state_name(&report.status.state));
        let synced = log.sync().await;
        let record = ArchiveRecord {
            report,
            log: log.summary().clone(),
        };
        let stored = self.archive.store(&record).await;
        handle.progress.send_modify(|p| p.finished = true);
        self.registry().remove_job(job_id);
        if let Err(err) = &stored {
            tracing::error!(%job_id, %err, "cannot archive job; its record is lost");
        }
        synced?;
        Ok(stored?)
    }

    /// Ends jobs whose queue wait or timeout expired, and forgets VMs idle
    /// too long. Called periodically by [`Self::run_reaper`].
    pub async fn reap(&self) {
        let expired = self.registry().expire(Instant::now());
        for job in expired {
            self.end_job_quietly(&job.job, JobResult::Error { reason: job.reason })
                .await;
        }
    }

    /// Runs [`Self::reap`] every `reaper_interval` until shutdown.
    pub async fn run_reaper(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut ticker = tokio::time::interval(self.limits.reaper_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.reap().await,
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Stops taking work, wakes every long poll, and ends every active job
    /// with an error (their VMs cannot report to a stopped orchestrator).
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let active = self.registry().active_jobs();
        for job in active {
            let reason = "the orchestrator shut down before the job finished".to_owned();
            self.end_job_quietly(&job, JobResult::Error { reason })
                .await;
        }
    }
}

/// A page of `events` read from `after` on, of a log whose next seq is
/// `total`. A log may skip seqs (dropped output): a read that found nothing
/// although `after < total` skipped them all, so the next page starts at
/// `total`.
fn page(events: Vec<JobEvent>, after: u64, job_over: bool, total: u64) -> JobEventsPage {
    let next_seq = events.last().map_or(after.max(total), |e| e.seq + 1);
    JobEventsPage {
        finished: job_over && next_seq >= total,
        next_seq,
        events,
    }
}

/// Ends a waiting acquire that is dropped before it answers (the client
/// went away), so the VM stops counting as waiting and a job matched to it
/// goes back to the queue.
struct AbandonGuard<'a> {
    service: &'a Orchestrator,
    vm_id: &'a VmId,
    ticket: u64,
    armed: bool,
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.service
                .registry()
                .abandon_acquire(self.vm_id, self.ticket, Instant::now());
        }
    }
}
