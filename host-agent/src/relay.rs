//! Runs one job on one VM: sends it to the runner agent, relays the guest's
//! events in order to an [`EventSink`] (the orchestrator), forwards cancels,
//! and turns every way the VM can fail into a job result with a reason.
//!
//! Latency: the relay posts at once unless it already posted twice within
//! the last [`FLUSH_INTERVAL`], so the first events after a quiet spell (a
//! step's `StepStarted` and its first line) reach the sink without waiting
//! for a tick; while events stream, they are batched and posted on the
//! tick (every [`FLUSH_INTERVAL`]) or when a batch fills.
//!
//! Backpressure: when a batch is full the relay
//! awaits the sink before it reads from the guest again, so a job printing
//! gigabytes fills the vsock buffers and blocks the guest's writer instead
//! of the host's memory. An optional per-VM [`LogRateLimit`] also paces
//! how fast the relay reads log data at all (see `log_rate`).

use std::time::{Duration, Instant};

use protocol::api::JobEventKind;
use protocol::message::{GuestMessage, HostMessage, Job, JobFinished, JobResult};
use protocol::session::HEARTBEAT_TIMEOUT;

use crate::log_rate::LogRateLimit;
use crate::reason::bounded_reason;
use crate::vcpu_load;
use crate::vm::{GuestChannel, RunningVm};

/// Events per batch posted to the sink.
pub const MAX_BATCH_EVENTS: usize = 64;
/// Log bytes per batch posted to the sink.
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// How long events may wait in a partial batch.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// How often the sink is asked about cancellation when the job is quiet.
pub const CANCEL_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Extra time past the job's own timeout before the host gives up on the guest.
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(15);
/// How long a failed channel waits for the VMM's exit, to report the exit
/// (the cause) rather than the closed socket (its symptom).
pub const EXIT_SETTLE: Duration = Duration::from_secs(1);
/// Attempts at posting the final batch (the one with `JobFinished`); the
/// sink retries transport failures within each.
pub const FINAL_POST_ATTEMPTS: u32 = 3;
/// Pause between two attempts at the final post.
pub const FINAL_POST_BACKOFF: Duration = Duration::from_millis(500);
/// How long a silent guest's vCPU threads are watched to tell a wedged
/// guest from a waiting one (see [`vcpu_load`]).
pub const SILENCE_SAMPLE: Duration = Duration::from_secs(2);

/// Where a job's events go.
pub trait EventSink: Send {
    /// Stores `events` in order; returns `Ok(true)` when the job's cancellation
    /// has been requested.
    fn post(
        &mut self,
        events: Vec<JobEventKind>,
    ) -> impl std::future::Future<Output = Result<bool, String>> + Send;
}

/// How a job ended, from the host's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayOutcome {
    /// The job's result (an `Error` with a reason for infrastructure failures).
    pub result: JobResult,
    /// When the first log chunk arrived, if one did.
    pub first_log: Option<Instant>,
    /// When the job finished (or failed).
    pub finished: Instant,
    /// Why the final `JobFinished` could not be posted, if it could not
    /// (after [`FINAL_POST_ATTEMPTS`]): the orchestrator then does not know
    /// how the job ended.
    pub final_post_error: Option<String>,
}

struct Batch {
    events: Vec<JobEventKind>,
    bytes: usize,
}

impl Batch {
    fn full(&self) -> bool {
        self.events.len() >= MAX_BATCH_EVENTS || self.bytes >= MAX_BATCH_BYTES
    }

    /// Whether to post now, given the time since the post before the last
    /// one: when full, or when fewer than two posts were made in the last
    /// flush interval (an event after a quiet spell would otherwise wait
    /// for the next tick for nothing).
    fn due(&self, since_post_before_last: Duration) -> bool {
        self.full() || (!self.events.is_empty() && since_post_before_last >= FLUSH_INTERVAL)
    }
}

/// Relays `job` on `vm` until it ends, reading the guest's log no faster
/// than `log_rate` allows (if given). The final `JobFinished` event is
/// always posted, also for failures the guest could not report.
pub async fn run_job(
    vm: &mut RunningVm,
    channel: &mut GuestChannel,
    job: &Job,
    sink: &mut impl EventSink,
    log_rate: Option<LogRateLimit>,
) -> RelayOutcome {
    relay(vm, channel, job, sink, log_rate, true).await
}

/// [`run_job`] for a job the caller already sent with
/// [`GuestChannel::send_job`] (the pool sends it itself, so that a job
/// that never reached the guest can go back to the orchestrator's queue).
pub async fn relay_sent_job(
    vm: &mut RunningVm,
    channel: &mut GuestChannel,
    job: &Job,
    sink: &mut impl EventSink,
    log_rate: Option<LogRateLimit>,
) -> RelayOutcome {
    relay(vm, channel, job, sink, log_rate, false).await
}

async fn relay(
    vm: &mut RunningVm,
    channel: &mut GuestChannel,
    job: &Job,
    sink: &mut impl EventSink,
    log_rate: Option<LogRateLimit>,
    send: bool,
) -> RelayOutcome {
    let mut state = Relay::new(log_rate);
    let result = state.drive(vm, channel, job, sink, send).await;
    // Whatever happened, the job's last event says how it ended.
    let mut events = std::mem::take(&mut state.batch.events);
    events.push(JobEventKind::JobFinished(JobFinished {
        result: result.clone(),
    }));
    let final_post_error = post_final(sink, events, &job.id).await.err();
    RelayOutcome {
        result,
        first_log: state.first_log,
        finished: Instant::now(),
        final_post_error,
    }
}

/// Posts the job's last batch, retrying up to [`FINAL_POST_ATTEMPTS`]
/// times (posts are idempotent by sequence number); every failure is
/// logged with the job's id.
async fn post_final(
    sink: &mut impl EventSink,
    events: Vec<JobEventKind>,
    job: &protocol::message::JobId,
) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 1..=FINAL_POST_ATTEMPTS {
        match sink.post(events.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(job = %job, attempt, error = %e, "posting the job's final events failed");
                last = e;
            }
        }
        if attempt < FINAL_POST_ATTEMPTS {
            tokio::time::sleep(FINAL_POST_BACKOFF * attempt).await;
        }
    }
    tracing::error!(job = %job, error = %last, "the job's end could not be reported to the orchestrator");
    Err(last)
}

struct Relay {
    batch: Batch,
    step: Option<u32>,
    first_log: Option<Instant>,
    cancel_sent: bool,
    last_post: Instant,
    /// When the post before `last_post` was made (see [`Batch::due`]).
    post_before_last: Instant,
    log_rate: Option<LogRateLimit>,
    /// Set while the log rate limit has the relay stop reading the guest.
    paused_until: Option<tokio::time::Instant>,
}

impl Relay {
    fn new(log_rate: Option<LogRateLimit>) -> Relay {
        Relay {
            batch: Batch {
                events: Vec::new(),
                bytes: 0,
            },
            step: None,
            first_log: None,
            cancel_sent: false,
            last_post: Instant::now(),
            post_before_last: Instant::now()
                .checked_sub(FLUSH_INTERVAL)
                .unwrap_or_else(Instant::now),
            log_rate,
            paused_until: None,
        }
    }

    /// Why the guest fell silent, as far as its vCPU threads tell (see
    /// [`vcpu_load`]): wedged (busy) or waiting (idle).
    async fn silence_reason(&self, vm: &RunningVm) -> String {
        let during = self.during();
        let load = match vm.process() {
            Some(process) => vcpu_load::sample(process, SILENCE_SAMPLE).await,
            None => None,
        };
        match load {
            Some(load) => {
                let reason = load.silence_reason(HEARTBEAT_TIMEOUT, &during);
                tracing::warn!(vm = %vm.spec.name, busiest_vcpu_percent = load.busiest_percent, "{reason}");
                reason
            }
            None => format!("guest silent for {HEARTBEAT_TIMEOUT:?}{during}"),
        }
    }

    fn during(&self) -> String {
        match self.step {
            Some(s) => format!(" during step {}", s + 1),
            None => String::new(),
        }
    }

    async fn drive(
        &mut self,
        vm: &mut RunningVm,
        channel: &mut GuestChannel,
        job: &Job,
        sink: &mut impl EventSink,
        send: bool,
    ) -> JobResult {
        // Our reasons hold log tails and error texts: made to fit.
        let error = |reason: String| JobResult::Error {
            reason: bounded_reason(&reason),
        };
        if send && let Err(e) = channel.send_job(job).await {
            return error(format!("sending the job to the guest failed: {e}"));
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(job.timeout_secs) + TIMEOUT_GRACE;
        let mut last_heard = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        loop {
            let paused_until = self.paused_until;
            tokio::select! {
                msg = channel.recv(), if paused_until.is_none() => {
                    last_heard = tokio::time::Instant::now();
                    match msg {
                        Ok(GuestMessage::JobFinished(JobFinished { result })) => return result,
                        Ok(msg) => self.record(msg),
                        Err(e) => {
                            // A dying VMM takes the guest's socket with it: if
                            // the VMM exits right after, its exit is the cause.
                            if let Ok(status) = tokio::time::timeout(EXIT_SETTLE, vm.exited()).await {
                                return error(format!("vm exited with {status}{}{}", self.during(), vm.log_tail()));
                            }
                            return error(format!("runner-agent channel failed{}: {e}", self.during()));
                        }
                    }
                    if self.batch.due(self.post_before_last.elapsed()) && let Err(e) = self.flush(channel, sink).await {
                        return error(e);
                    }
                }
                status = vm.exited() => {
                    return error(format!("vm exited with {status}{}{}", self.during(), vm.log_tail()));
                }
                _ = sleep_until_some(paused_until) => {
                    self.paused_until = None;
                    // The guest was not read while paused: its silence is ours.
                    last_heard = tokio::time::Instant::now();
                }
                _ = tick.tick() => {
                    let quiet = self.last_post.elapsed() >= CANCEL_POLL_INTERVAL;
                    if (quiet || !self.batch.events.is_empty()) && let Err(e) = self.post(channel, sink).await {
                        return error(e);
                    }
                    if last_heard.elapsed() > HEARTBEAT_TIMEOUT {
                        return error(self.silence_reason(vm).await);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return JobResult::TimedOut { step: self.step.unwrap_or(0) };
                }
            }
        }
    }

    fn record(&mut self, msg: GuestMessage) {
        let mut output = 0;
        match &msg {
            GuestMessage::StepStarted(s) => self.step = Some(s.step),
            GuestMessage::LogChunk(c) => {
                self.first_log.get_or_insert_with(Instant::now);
                self.batch.bytes += c.data.len();
                output = c.data.len();
            }
            _ => {}
        }
        // Every message costs the host a read and (most) a relayed event,
        // whatever it carries: each is charged a fixed cost plus its output.
        if let Some(limit) = &mut self.log_rate
            && let Some(wait) = limit.charge_event(output, Instant::now())
        {
            self.paused_until = Some(tokio::time::Instant::now() + wait);
        }
        if let Some(event) = JobEventKind::from_guest(msg) {
            self.batch.events.push(event);
        }
    }

    /// Posts the pending batch, if any.
    async fn flush(
        &mut self,
        channel: &mut GuestChannel,
        sink: &mut impl EventSink,
    ) -> Result<(), String> {
        if self.batch.events.is_empty() {
            return Ok(());
        }
        self.post(channel, sink).await
    }

    /// Posts the pending batch (possibly empty, to poll for cancellation);
    /// forwards a cancel the sink reports.
    async fn post(
        &mut self,
        channel: &mut GuestChannel,
        sink: &mut impl EventSink,
    ) -> Result<(), String> {
        self.post_before_last = self.last_post;
        self.last_post = Instant::now();
        let events = std::mem::take(&mut self.batch.events);
        self.batch.bytes = 0;
        let cancel = sink
            .post(events)
            .await
            .map_err(|e| format!("posting job events failed: {e}"))?;
        if cancel && !self.cancel_sent {
            self.cancel_sent = true;
            let msg = HostMessage::Cancel {
                reason: "cancelled by the orchestrator".into(),
            };
            channel
                .send_raw(&msg)
                .await
                .map_err(|e| format!("forwarding the cancel failed: {e}"))?;
        }
        Ok(())
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::message::{LogChunk, OutputStream};

    fn batch_of(events: usize, bytes: usize) -> Batch {
        let chunk = JobEventKind::LogChunk(LogChunk {
            step: 0,
            stream: OutputStream::Stdout,
            seq: 0,
            data: Vec::new(),
        });
        Batch {
            events: vec![chunk; events],
            bytes,
        }
    }

    #[test]
    fn an_event_after_a_quiet_spell_is_posted_at_once() {
        assert!(batch_of(1, 10).due(FLUSH_INTERVAL));
        assert!(batch_of(1, 10).due(Duration::from_secs(5)));
    }

    #[test]
    fn streaming_events_wait_for_the_tick_unless_the_batch_is_full() {
        let recent = FLUSH_INTERVAL / 2;
        assert!(!batch_of(1, 10).due(recent));
        assert!(!batch_of(MAX_BATCH_EVENTS - 1, 10).due(recent));
        assert!(batch_of(MAX_BATCH_EVENTS, 10).due(recent));
        assert!(batch_of(1, MAX_BATCH_BYTES).due(recent));
    }

    #[test]
    fn tiny_log_chunks_are_charged_against_the_rate_limit() {
        use protocol::limits::EVENT_COST_BYTES;
        use std::num::NonZeroU64;
        // A burst of 64 KiB: 1024 one-byte chunks are 1 KiB of output but
        // cost 1024 * (1 + EVENT_COST_BYTES) bytes, well over the burst.
        let rate = NonZeroU64::new(64 << 10).unwrap();
        let mut relay = Relay::new(Some(LogRateLimit::new(rate, Instant::now())));
        let events = 1024;
        assert!(events * (1 + EVENT_COST_BYTES) > 2 * (64 << 10));
        for seq in 0..events as u64 {
            relay.record(GuestMessage::LogChunk(LogChunk {
                step: 0,
                stream: OutputStream::Stdout,
                seq,
                data: vec![b'x'],
            }));
        }
        let paused = relay.paused_until.expect("the relay pauses");
        assert!(
            paused > tokio::time::Instant::now() + Duration::from_millis(500),
            "paused only until {paused:?}"
        );
        // Heartbeats (no event, no output) are charged too.
        let mut relay = Relay::new(Some(LogRateLimit::new(
            NonZeroU64::new(EVENT_COST_BYTES as u64).unwrap(),
            Instant::now(),
        )));
        relay.record(GuestMessage::Heartbeat);
        assert!(relay.paused_until.is_none(), "one fits the burst");
        relay.record(GuestMessage::Heartbeat);
        assert!(relay.paused_until.is_some(), "the second does not");
    }

    #[test]
    fn an_empty_batch_is_never_due() {
        assert!(!batch_of(0, 0).due(Duration::from_secs(5)));
    }
}
