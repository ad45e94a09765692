//! Running the job: the step supervisor.
//!
//! The supervisor (the agent's main thread) runs the steps one after the
//! other. Everything that can happen while a step runs arrives as an
//! [`Event`] on one channel: the shell exited (from the reaper), the host
//! sent `Cancel` or `Shutdown` or went away (from the channel reader or a
//! failed write), a pump reached end-of-file. The supervisor waits on that
//! channel with the step's deadline as timeout, so a timeout, a cancel and
//! a normal exit are handled by the same loop and never race.
//!
//! ```text
//! StepStarted(i) -> spawn shell (own process group) -> pump stdout/stderr
//!   shell exits .................................. drain output -> StepFinished(i)
//!   deadline (step or job) / Cancel .............. SIGTERM group, after the grace SIGKILL
//!   Shutdown / channel lost ...................... SIGKILL group at once
//! exit 0 -> next step; otherwise the job ends: Failed / TimedOut / Cancelled
//! job end: SIGKILL every step group and every descendant, wait for pumps
//! ```
//!
//! Output of a step is complete before its `StepFinished` unless the step
//! left a background process holding its pipes: then the supervisor waits
//! until the pump has been idle for [`RunnerSettings::drain_idle`] (at most
//! [`RunnerSettings::drain_max`]) and lets the pump carry on (see
//! [`output`]). Steps are numbered from 0, as in the protocol.

pub mod output;
pub mod step;

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use protocol::limits::MAX_REASON_LEN;
use protocol::message::{
    GuestMessage, HostMessage, Job, JobResult, JobStep, OutputStream, StepFinished, StepStarted,
    WireMessage,
};

use self::output::Pump;
use self::step::{Shell, StepError};
use crate::channel::outbound::{Outbound, SendError};
use crate::channel::truncate;
use crate::mask::{Masker, SecretSet};
use crate::process;
use crate::reaper::Reaper;

/// How long the job's end waits for pumps to drain after killing everything.
const FINAL_DRAIN: Duration = Duration::from_secs(2);

/// How often the supervisor re-checks a draining pump.
const DRAIN_TICK: Duration = Duration::from_millis(50);

/// Everything that can happen while the job runs.
#[derive(Debug)]
pub enum Event {
    /// A message from the host.
    Host(HostMessage),
    /// The channel to the host ended (closed, broken, or a bad frame).
    ChannelEnded {
        /// Why.
        reason: String,
        /// Whether the host closed cleanly at a frame boundary.
        clean: bool,
    },
    /// A child we spawned exited.
    ChildExited {
        /// Its pid.
        pid: Pid,
        /// How it ended.
        status: WaitStatus,
    },
    /// A step's output pump finished.
    OutputClosed {
        /// The step.
        step: u32,
    },
}

/// How steps are run.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// Default working directory of steps (created if missing).
    pub workspace: PathBuf,
    /// The shell that runs step scripts.
    pub shell: Shell,
    /// Time between SIGTERM and SIGKILL when a step is stopped.
    pub kill_grace: Duration,
    /// After a step's shell exits: how long its pump must be idle before
    /// the supervisor stops waiting for end-of-file.
    pub drain_idle: Duration,
    /// After a step's shell exits: the longest the supervisor waits for its
    /// output before moving on.
    pub drain_max: Duration,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        Self {
            workspace: PathBuf::from("/workspace"),
            shell: Shell::detect(),
            kill_grace: Duration::from_secs(5),
            drain_idle: Duration::from_millis(250),
            drain_max: Duration::from_secs(5),
        }
    }
}

/// The channel and process plumbing a job run uses.
#[derive(Debug)]
pub struct JobIo<'a> {
    /// Where frames go.
    pub outbound: &'a Outbound,
    /// Where events arrive.
    pub events: &'a Receiver<Event>,
    /// Sender side of `events`, for the reaper and the pumps.
    pub events_tx: &'a Sender<Event>,
    /// Spawns (and reaps) the step shells.
    pub reaper: &'a Reaper,
}

/// How a job run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// The job ran to an end the host should hear about: send `JobFinished`.
    Finished(JobResult),
    /// The host asked to power off; nothing more is sent.
    Shutdown,
    /// The channel is gone; nothing can be sent.
    ChannelLost(String),
}

/// Why the job stops early, once decided.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    Cancelled(String),
    Shutdown,
    ChannelLost(String),
}

/// What ended a step's process, when the supervisor ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillCause {
    StepTimeout,
    JobTimeout,
    Stop,
}

/// A step being stopped: SIGTERM sent, SIGKILL due at `escalate_at`.
#[derive(Debug, Clone, Copy)]
struct Kill {
    cause: KillCause,
    escalate_at: Option<Instant>,
}

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepOutcome {
    Succeeded,
    Failed,
    TimedOut,
    Stopped,
}

/// Runs `job` to its end. The caller sends `JobFinished` for
/// [`JobEnd::Finished`].
pub fn run_job(job: &Job, settings: &RunnerSettings, io: &JobIo<'_>) -> JobEnd {
    let secrets = match SecretSet::new(job.secrets.0.values()) {
        Ok(secrets) => Arc::new(secrets),
        Err(err) => return JobEnd::Finished(error_result(&format!("cannot mask secrets: {err}"))),
    };
    if let Err(err) = fs::create_dir_all(&settings.workspace) {
        return JobEnd::Finished(error_result(&format!(
            "cannot create the workspace {}: {err}",
            settings.workspace.display()
        )));
    }
    let mut run = JobRun {
        job,
        settings,
        io,
        secrets,
        deadline: Instant::now() + Duration::from_secs(job.timeout_secs),
        pumps: Vec::new(),
        groups: Vec::new(),
        stop: None,
    };
    tracing::info!(job = %job.id, steps = job.steps.len(), timeout_secs = job.timeout_secs, "job started");
    let result = run.run_steps();
    run.clean_up();
    let end = match run.stop {
        Some(Stop::ChannelLost(reason)) => JobEnd::ChannelLost(reason),
        Some(Stop::Shutdown) => JobEnd::Shutdown,
        Some(Stop::Cancelled(_)) => JobEnd::Finished(JobResult::Cancelled),
        None => JobEnd::Finished(result),
    };
    tracing::info!(job = %job.id, ?end, log_chunks = io.outbound.chunks_sent(), "job ended");
    end
}

/// A `JobResult::Error` with a reason that fits the protocol.
pub fn error_result(reason: &str) -> JobResult {
    JobResult::Error {
        reason: truncate(reason.to_owned(), MAX_REASON_LEN),
    }
}

struct JobRun<'a> {
    job: &'a Job,
    settings: &'a RunnerSettings,
    io: &'a JobIo<'a>,
    secrets: Arc<SecretSet>,
    deadline: Instant,
    pumps: Vec<Pump>,
    groups: Vec<Pid>,
    stop: Option<Stop>,
}

impl JobRun<'_> {
    fn run_steps(&mut self) -> JobResult {
        for (index, step) in self.job.steps.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            self.take_pending_events();
            if self.stop.is_some() {
                break;
            }
            if Instant::now() >= self.deadline {
                return JobResult::TimedOut { step: index };
            }
            match self.run_step(index, step) {
                StepOutcome::Succeeded => {}
                StepOutcome::Failed => return JobResult::Failed { step: index },
                StepOutcome::TimedOut => return JobResult::TimedOut { step: index },
                StepOutcome::Stopped => break,
            }
        }
        JobResult::Succeeded
    }

    fn run_step(&mut self, index: u32, step: &JobStep) -> StepOutcome {
        if !self.send(&GuestMessage::StepStarted(StepStarted {
            step: index,
            name: step.name.clone(),
        })) {
            return StepOutcome::Stopped;
        }
        let started = Instant::now();
        let step_deadline = step
            .timeout_secs
            .map(|secs| started + Duration::from_secs(secs));
        let (deadline, timeout_cause) = match step_deadline {
            Some(at) if at < self.deadline => (at, KillCause::StepTimeout),
            _ => (self.deadline, KillCause::JobTimeout),
        };

        let (pid, pgid) = match self.spawn(index, step) {
            Ok(ids) => ids,
            Err(err) => {
                tracing::warn!(step = index, error = %err, "step did not start");
                self.note(index, &format!("kindling: step did not start: {err}"));
                self.finish_step(index, None, started);
                return StepOutcome::Failed;
            }
        };
        tracing::info!(step = index, %pid, name = %step.name, "step started");

        let mut kill: Option<Kill> = None;
        let status = loop {
            let wake_at = match kill {
                None => Some(deadline),
                Some(Kill { escalate_at, .. }) => escalate_at,
            };
            let event = match wake_at {
                Some(at) => self
                    .io
                    .events
                    .recv_timeout(at.saturating_duration_since(Instant::now())),
                None => self
                    .io
                    .events
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match event {
                Ok(Event::ChildExited {
                    pid: exited,
                    status,
                }) if exited == pid => break status,
                Ok(event) => {
                    let before = self.stop.clone();
                    self.handle_event(event);
                    if self.stop != before {
                        kill = Some(self.on_stop_changed(pgid, kill));
                    }
                }
                Err(RecvTimeoutError::Timeout) => match kill {
                    None => kill = Some(self.begin_kill(pgid, timeout_cause)),
                    Some(ref mut pending) => {
                        tracing::info!(step = index, "grace period over; SIGKILL");
                        process::signal_group(pgid, Signal::SIGKILL);
                        pending.escalate_at = None;
                    }
                },
                Err(RecvTimeoutError::Disconnected) => {
                    // Cannot happen (the reaper's callback holds a sender
                    // until this very exit is reported); if it did, nothing
                    // would ever report the exit, so kill and move on.
                    self.stop_with(Stop::ChannelLost("event channel closed".into()));
                    process::signal_group(pgid, Signal::SIGKILL);
                    break WaitStatus::Signaled(pid, Signal::SIGKILL, false);
                }
            }
        };
        if kill.is_some() {
            // The shell is gone; nothing of a stopped step may linger.
            process::signal_group(pgid, Signal::SIGKILL);
        }
        tracing::info!(step = index, ?status, "step's shell exited");

        if !self.stop_is_urgent() {
            self.drain(index);
        }
        match kill.map(|k| k.cause) {
            Some(KillCause::StepTimeout) => self.note(
                index,
                &format!(
                    "kindling: step timed out after {} s; stopped",
                    step.timeout_secs.unwrap_or_default()
                ),
            ),
            Some(KillCause::JobTimeout) => self.note(
                index,
                &format!(
                    "kindling: job timed out after {} s; stopped",
                    self.job.timeout_secs
                ),
            ),
            Some(KillCause::Stop) | None => {}
        }
        if let Some(Stop::Cancelled(reason)) = &self.stop {
            let reason = reason.clone();
            self.note(index, &format!("kindling: job cancelled: {reason}"));
        }
        self.finish_step(index, Some(status), started);

        match (kill.map(|k| k.cause), &self.stop) {
            (_, Some(_)) => StepOutcome::Stopped,
            (Some(KillCause::StepTimeout | KillCause::JobTimeout), None) => StepOutcome::TimedOut,
            _ if matches!(status, WaitStatus::Exited(_, 0)) => StepOutcome::Succeeded,
            _ => StepOutcome::Failed,
        }
    }

    /// Starts the step's shell and its output pump; returns (pid, pgid).
    fn spawn(&mut self, index: u32, step: &JobStep) -> Result<(Pid, Pid), StepError> {
        let cwd = step::working_directory(&self.settings.workspace, step)?;
        let env = step::environment(self.job, step, index, &self.settings.workspace);
        let mut command = step::command(&self.settings.shell, step, &env, &cwd);
        let events = self.io.events_tx.clone();
        let mut child = self
            .io
            .reaper
            .spawn(&mut command, move |status| {
                if let Some(pid) = status.pid() {
                    let _ = events.send(Event::ChildExited { pid, status });
                }
            })
            .map_err(|source| StepError::Spawn {
                shell: self.settings.shell.path.clone(),
                source,
            })?;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        // process_group(0): the shell leads a group whose id is its pid.
        self.groups.push(pid);
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            process::signal_group(pid, Signal::SIGKILL);
            return Err(StepError::Spawn {
                shell: self.settings.shell.path.clone(),
                source: std::io::Error::other("the step's pipes are missing"),
            });
        };
        let events = self.io.events_tx.clone();
        let pump = Pump::start(
            index,
            stdout,
            stderr,
            Arc::clone(&self.secrets),
            self.io.outbound.clone(),
            move || {
                let _ = events.send(Event::OutputClosed { step: index });
            },
        );
        match pump {
            Ok(pump) => self.pumps.push(pump),
            Err(source) => {
                process::signal_group(pid, Signal::SIGKILL);
                return Err(StepError::Spawn {
                    shell: self.settings.shell.path.clone(),
                    source,
                });
            }
        }
        Ok((pid, pid))
    }

    /// Starts stopping a step: SIGTERM now and SIGKILL after the grace, or
    /// SIGKILL at once when the host is gone or wants the VM off.
    fn begin_kill(&self, pgid: Pid, cause: KillCause) -> Kill {
        if self.stop_is_urgent() {
            tracing::info!(%pgid, ?cause, "killing the step");
            process::signal_group(pgid, Signal::SIGKILL);
            return Kill {
                cause,
                escalate_at: None,
            };
        }
        tracing::info!(%pgid, ?cause, "terminating the step");
        process::signal_group(pgid, Signal::SIGTERM);
        Kill {
            cause,
            escalate_at: Some(Instant::now() + self.settings.kill_grace),
        }
    }

    /// The job's stop reason changed while a step runs: start stopping it,
    /// or hurry a stop in progress if the new reason is urgent. A timeout
    /// already under way keeps its cause (the job still reports it).
    fn on_stop_changed(&self, pgid: Pid, kill: Option<Kill>) -> Kill {
        match kill {
            None => self.begin_kill(pgid, KillCause::Stop),
            Some(kill) if self.stop_is_urgent() && kill.escalate_at.is_some() => {
                process::signal_group(pgid, Signal::SIGKILL);
                Kill {
                    escalate_at: None,
                    ..kill
                }
            }
            Some(kill) => kill,
        }
    }

    /// Whether the job must stop without a grace period.
    fn stop_is_urgent(&self) -> bool {
        matches!(self.stop, Some(Stop::Shutdown | Stop::ChannelLost(_)))
    }

    /// Waits until step `index`'s output is sent (see the module docs).
    fn drain(&mut self, index: u32) {
        let exited_at = Instant::now();
        let give_up_at = exited_at + self.settings.drain_max;
        loop {
            let Some(pump) = self.pumps.iter().find(|p| p.step() == index) else {
                return;
            };
            if pump.is_closed() {
                return;
            }
            // Idle for drain_idle, all of it after the exit: whatever the
            // step wrote before exiting has been read and sent.
            let quiet_since_exit = exited_at.elapsed() >= self.settings.drain_idle
                && pump.activity().is_idle_for(self.settings.drain_idle);
            if quiet_since_exit || Instant::now() >= give_up_at {
                tracing::info!(
                    step = index,
                    "output still open after the shell exited (background process?); moving on"
                );
                return;
            }
            match self.io.events.recv_timeout(DRAIN_TICK) {
                Ok(event) => self.handle_event(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Applies an event that is not the current step's exit.
    fn handle_event(&mut self, event: Event) {
        match event {
            Event::ChildExited { .. } => {}
            Event::OutputClosed { step } => {
                if let Some(pump) = self.pumps.iter_mut().find(|p| p.step() == step) {
                    pump.mark_closed();
                }
            }
            Event::Host(HostMessage::Cancel { reason }) => {
                tracing::info!(%reason, "host cancelled the job");
                self.stop_with(Stop::Cancelled(reason));
            }
            Event::Host(HostMessage::Shutdown) => {
                tracing::info!("host asked for shutdown during the job");
                self.stop_with(Stop::Shutdown);
            }
            Event::Host(other) => {
                let reason = format!("host sent {} during the job", other.kind());
                tracing::error!(%reason, "protocol violation");
                self.io.outbound.close();
                self.stop_with(Stop::ChannelLost(reason));
            }
            Event::ChannelEnded { reason, .. } => {
                tracing::error!(%reason, "lost the channel to the host");
                self.stop_with(Stop::ChannelLost(reason));
            }
        }
    }

    /// Records why the job stops; a later, stronger reason replaces a
    /// weaker one (cancel < shutdown < channel lost).
    fn stop_with(&mut self, stop: Stop) {
        let rank = |s: &Stop| match s {
            Stop::Cancelled(_) => 0,
            Stop::Shutdown => 1,
            Stop::ChannelLost(_) => 2,
        };
        if self
            .stop
            .as_ref()
            .is_none_or(|current| rank(&stop) > rank(current))
        {
            self.stop = Some(stop);
        }
    }

    /// Handles events that arrived while no step was running.
    fn take_pending_events(&mut self) {
        while let Ok(event) = self.io.events.try_recv() {
            self.handle_event(event);
        }
    }

    /// Sends a message; records a lost channel. Returns whether it was sent.
    fn send(&mut self, msg: &GuestMessage) -> bool {
        match self.io.outbound.send(msg) {
            Ok(()) => true,
            Err(err) => {
                self.send_failed(err);
                false
            }
        }
    }

    fn send_failed(&mut self, err: SendError) {
        match err {
            SendError::Invalid { .. } => {}
            SendError::Closed | SendError::Broken(_) => {
                self.stop_with(Stop::ChannelLost(err.to_string()));
            }
        }
    }

    /// A line from the agent itself in the step's stderr (masked too).
    fn note(&mut self, index: u32, text: &str) {
        let mut masker = Masker::new(Arc::clone(&self.secrets));
        let mut line = Vec::new();
        masker.push(text.as_bytes(), &mut line);
        masker.push(b"\n", &mut line);
        masker.finish(&mut line);
        if let Err(err) = self
            .io
            .outbound
            .send_log(index, OutputStream::Stderr, &line)
        {
            self.send_failed(err);
        }
    }

    fn finish_step(&mut self, index: u32, status: Option<WaitStatus>, started: Instant) {
        let (exit_code, signal) = match status {
            Some(WaitStatus::Exited(_, code)) => (Some(code), None),
            Some(WaitStatus::Signaled(_, signal, _)) => (None, Some(signal as i32)),
            _ => (None, None),
        };
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            step = index,
            ?exit_code,
            ?signal,
            duration_ms,
            "step finished"
        );
        self.send(&GuestMessage::StepFinished(StepFinished {
            step: index,
            exit_code,
            signal,
            duration_ms,
        }));
    }

    /// Kills whatever the job left running and lets the pumps finish.
    fn clean_up(&mut self) {
        for &pgid in &self.groups {
            process::signal_group(pgid, Signal::SIGKILL);
        }
        let killed = process::kill_descendants();
        if killed > 0 {
            tracing::info!(killed, "killed processes the job left behind");
        }
        if matches!(self.stop, Some(Stop::ChannelLost(_))) {
            for pump in &self.pumps {
                pump.abandon();
            }
            return;
        }
        let give_up_at = Instant::now() + FINAL_DRAIN;
        while self.pumps.iter().any(|p| !p.is_closed()) && Instant::now() < give_up_at {
            match self.io.events.recv_timeout(DRAIN_TICK) {
                Ok(event) => self.handle_event(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        for pump in self.pumps.iter().filter(|p| !p.is_closed()) {
            tracing::warn!(
                step = pump.step(),
                "output still open at the job's end; dropping it"
            );
            pump.abandon();
        }
    }
}
