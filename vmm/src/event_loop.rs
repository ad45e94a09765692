//! The device thread: one epoll loop that serves every virtio device.
//!
//! Each handler (a virtio-mmio transport) gets an id and a [`Registrar`]
//! through which it adds or removes file descriptors at any time (queue
//! ioeventfds at build time, tap or socket fds later, from any thread). An
//! epoll token is `(handler id << 32) | sub-token`; the sub-token means
//! whatever the handler decided when it registered the fd.
//!
//! The loop ends when its stop eventfd is written. Handlers are called with
//! their mutex held, the same mutex vCPU threads take for MMIO accesses.
//!
//! Any other end of the loop stops the VM: an `epoll_wait` error, a handler
//! reporting a fatal error ([`EventHandler::fatal_error`]), or a panic that
//! unwinds (library and test builds; the `vmm` binary ends the process on
//! any panic, see `crate::panic_hook`). The thread's
//! [`ThreadExitGuard`] records [`crate::lifecycle::ExitReason::ThreadEnded`]
//! with the reason, which wakes the main thread; it kicks the vCPUs out and
//! the process exits non-zero with that reason as its last log line.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::lifecycle::{ExitSignal, ThreadExitGuard};
use crate::seccomp::{Filters, SeccompError, ThreadKind};

/// Name of the device thread (in logs and exit reasons).
pub const DEVICE_THREAD: &str = "devices";

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll or eventfd creation failed.
    #[error("event loop setup: {0}")]
    Setup(std::io::Error),
    /// `epoll_ctl` failed.
    #[error("epoll_ctl on fd {fd}: {source}")]
    Control {
        /// The fd.
        fd: RawFd,
        /// The error.
        source: std::io::Error,
    },
    /// The loop thread could not be spawned.
    #[error("cannot spawn the device thread: {0}")]
    Spawn(std::io::Error),
    /// The device thread could not install its seccomp filter.
    #[error("device thread: {0}")]
    Seccomp(#[from] SeccompError),
    /// `epoll_wait` failed (other than by a signal): the loop cannot go on.
    #[error("epoll_wait failed: {0}")]
    Wait(std::io::Error),
    /// A handler reported an error the VM cannot survive.
    #[error("handler {id}: {message}")]
    Handler {
        /// The handler id.
        id: u32,
        /// What the handler reported.
        message: String,
    },
}

/// Something the loop dispatches events to.
pub trait EventHandler: Send {
    /// Handles `events` on the fd registered with `sub`.
    fn handle_event(&mut self, sub: u32, events: EventSet);

    /// An error the VM cannot survive, if the last event left one: the loop
    /// ends with it and the VM stops. Asked after every event of this
    /// handler; by default there is none.
    fn fatal_error(&mut self) -> Option<String> {
        None
    }
}

/// Adds and removes fds of one handler.
#[derive(Debug, Clone)]
pub struct Registrar {
    epoll: Arc<Epoll>,
    id: u32,
}

impl Registrar {
    /// A registrar for handler `id` on `epoll`.
    fn new(epoll: Arc<Epoll>, id: u32) -> Self {
        Self { epoll, id }
    }

    /// The handler id.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn token(&self, sub: u32) -> u64 {
        (u64::from(self.id) << 32) | u64::from(sub)
    }

    /// Watches `fd` for `events`, reported to the handler as `sub`.
    pub fn add(&self, fd: RawFd, sub: u32, events: EventSet) -> Result<(), EventLoopError> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(events, self.token(sub)),
            )
            .map_err(|source| EventLoopError::Control { fd, source })
    }

    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, sub: u32, events: EventSet) -> Result<(), EventLoopError> {
        self.epoll
            .ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(events, self.token(sub)),
            )
            .map_err(|source| EventLoopError::Control { fd, source })
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> Result<(), EventLoopError> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            .map_err(|source| EventLoopError::Control { fd, source })
    }
}

/// Token of the loop's own stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;

/// An epoll loop not yet running.
pub struct EventLoop {
    epoll: Arc<Epoll>,
    handlers: Vec<Option<Arc<Mutex<dyn EventHandler>>>>,
    stop: EventFd,
}

/// A running loop: stop it with [`RunningEventLoop::stop`].
pub struct RunningEventLoop {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl EventLoop {
    /// A loop with no handlers.
    pub fn new() -> Result<Self, EventLoopError> {
        let epoll = Arc::new(Epoll::new().map_err(EventLoopError::Setup)?);
        let stop = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(EventLoopError::Setup)?;
        Ok(Self {
            epoll,
            handlers: Vec::new(),
            stop,
        })
    }

    /// Reserves a handler id and returns its registrar; attach the handler
    /// with [`EventLoop::set_handler`].
    pub fn registrar(&mut self) -> Registrar {
        self.handlers.push(None);
        Registrar::new(self.epoll.clone(), (self.handlers.len() - 1) as u32)
    }

    /// Attaches the handler for the id of `registrar`.
    pub fn set_handler(&mut self, registrar: &Registrar, handler: Arc<Mutex<dyn EventHandler>>) {
        if let Some(slot) = self.handlers.get_mut(registrar.id() as usize) {
            *slot = Some(handler);
        }
    }

    /// Starts the device thread. With `filters`, the thread installs its
    /// seccomp filter before it handles any event; this returns only once
    /// that is done (or failed). Once running, any end of the loop other
    /// than [`RunningEventLoop::stop`] requests an exit on `exit` with the
    /// reason.
    pub fn spawn(
        self,
        filters: Option<Filters>,
        exit: Arc<ExitSignal>,
    ) -> Result<RunningEventLoop, EventLoopError> {
        let stop = self.stop.try_clone().map_err(EventLoopError::Setup)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(DEVICE_THREAD.into())
            .stack_size(crate::memory::THREAD_STACK_SIZE)
            .spawn(move || {
                let installed = filters.map_or(Ok(()), |f| f.install(ThreadKind::Devices));
                let ok = installed.is_ok();
                let _ = ready_tx.send(installed);
                if ok {
                    // Armed before the first event: from here on the thread
                    // cannot end without the VM ending too.
                    let guard = ThreadExitGuard::new(exit, DEVICE_THREAD);
                    match self.run() {
                        Ok(()) => guard.stopped(),
                        Err(e) => guard.failed(e),
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(RunningEventLoop { stop, thread }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e.into())
            }
            Err(_) => {
                let _ = thread.join();
                Err(EventLoopError::Spawn(std::io::Error::other(
                    "the device thread ended before it started",
                )))
            }
        }
    }

    /// Serves events until the stop eventfd is written (`Ok`) or the loop
    /// cannot go on (`Err`).
    fn run(self) -> Result<(), EventLoopError> {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EventLoopError::Wait(e)),
            };
            for event in &events[..count] {
                let token = event.data();
                if token == STOP_TOKEN {
                    return Ok(());
                }
                let (id, sub) = ((token >> 32) as usize, token as u32);
                if let Some(Some(handler)) = self.handlers.get(id) {
                    let mut handler = handler.lock().unwrap_or_else(|e| e.into_inner());
                    handler.handle_event(sub, event.event_set());
                    if let Some(message) = handler.fatal_error() {
                        return Err(EventLoopError::Handler {
                            id: id as u32,
                            message,
                        });
                    }
                }
            }
        }
    }
}

impl RunningEventLoop {
    /// Stops the loop and joins its thread.
    pub fn stop(self) {
        // A full counter still wakes the loop: the result does not matter.
        let _ = self.stop.write(1);
        // A panic was reported by the thread's exit guard already.
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::ExitReason;
    use std::time::{Duration, Instant};

    struct Counter {
        seen: Arc<Mutex<Vec<u32>>>,
        fd: EventFd,
    }

    impl EventHandler for Counter {
        fn handle_event(&mut self, sub: u32, events: EventSet) {
            assert!(events.contains(EventSet::IN));
            let _ = self.fd.read();
            self.seen.lock().unwrap().push(sub);
        }
    }

    #[test]
    fn events_reach_their_handler_with_sub_token() {
        let mut event_loop = EventLoop::new().unwrap();
        let _unused = event_loop.registrar();
        let registrar = event_loop.registrar();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        registrar.add(fd.as_raw_fd(), 7, EventSet::IN).unwrap();
        let trigger = fd.try_clone().unwrap();
        event_loop.set_handler(
            &registrar,
            Arc::new(Mutex::new(Counter {
                seen: seen.clone(),
                fd,
            })),
        );
        let exit = ExitSignal::new().unwrap();
        let running = event_loop.spawn(None, exit.clone()).unwrap();
        trigger.write(1).unwrap();
        for _ in 0..200 {
            if !seen.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        running.stop();
        assert_eq!(*seen.lock().unwrap(), vec![7]);
        // Told to stop: not a failure.
        assert_eq!(exit.reason(), None);
    }

    /// What a [`Faulty`] handler does on its event.
    #[derive(Clone, Copy)]
    enum Fault {
        /// Reports a fatal error.
        Fatal,
        /// Panics.
        Panic,
        /// Replaces the loop's epoll fd with /dev/null, so that the next
        /// `epoll_wait` fails (EINVAL).
        BreakEpoll(RawFd),
    }

    struct Faulty {
        fd: EventFd,
        fault: Fault,
        fatal: Option<String>,
    }

    impl EventHandler for Faulty {
        fn handle_event(&mut self, _sub: u32, _events: EventSet) {
            let _ = self.fd.read();
            match self.fault {
                Fault::Fatal => self.fatal = Some("backend gone".into()),
                Fault::Panic => panic!("handler panic (expected by the test)"),
                Fault::BreakEpoll(epoll) => {
                    let null = std::fs::File::open("/dev/null").unwrap();
                    // SAFETY: both fds are open; `epoll` is replaced by a
                    // duplicate of /dev/null, which the loop's Epoll closes
                    // when dropped.
                    assert!(unsafe { libc::dup2(null.as_raw_fd(), epoll) } >= 0);
                }
            }
        }

        fn fatal_error(&mut self) -> Option<String> {
            self.fatal.take()
        }
    }

    /// Runs a loop with one [`Faulty`] handler, triggers it, and returns
    /// the exit reason the device thread recorded (within 5 s).
    fn reason_after(fault: impl FnOnce(&EventLoop) -> Fault) -> ExitReason {
        let mut event_loop = EventLoop::new().unwrap();
        let registrar = event_loop.registrar();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        registrar.add(fd.as_raw_fd(), 0, EventSet::IN).unwrap();
        let trigger = fd.try_clone().unwrap();
        let fault = fault(&event_loop);
        event_loop.set_handler(
            &registrar,
            Arc::new(Mutex::new(Faulty {
                fd,
                fault,
                fatal: None,
            })),
        );
        let exit = ExitSignal::new().unwrap();
        let running = event_loop.spawn(None, exit.clone()).unwrap();
        trigger.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let reason = loop {
            if let Some(reason) = exit.reason() {
                break reason;
            }
            assert!(
                Instant::now() < deadline,
                "the device thread ended silently"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        // The thread is gone already; stopping it again is harmless.
        running.stop();
        reason
    }

    fn devices_ended(reason: ExitReason) -> String {
        match reason {
            ExitReason::ThreadEnded { thread, message } if thread == DEVICE_THREAD => message,
            other => panic!("unexpected reason {other:?}"),
        }
    }

    #[test]
    fn a_fatal_handler_error_ends_the_loop_and_stops_the_vm_with_it() {
        let message = devices_ended(reason_after(|_| Fault::Fatal));
        assert!(message.contains("backend gone"), "{message}");
    }

    #[test]
    fn an_epoll_wait_failure_stops_the_vm_with_it() {
        let reason = reason_after(|l| Fault::BreakEpoll(l.epoll.as_raw_fd()));
        assert_eq!(
            reason.exit_code(),
            crate::lifecycle::EXIT_GUEST_OR_VMM_ERROR
        );
        let message = devices_ended(reason);
        assert!(message.contains("epoll_wait failed"), "{message}");
    }

    #[test]
    fn a_panicking_handler_stops_the_vm() {
        let message = devices_ended(reason_after(|_| Fault::Panic));
        assert_eq!(message, "panicked");
    }
}
