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

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::seccomp::{Filters, SeccompError, ThreadKind};

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
}

/// Something the loop dispatches events to.
pub trait EventHandler: Send {
    /// Handles `events` on the fd registered with `sub`.
    fn handle_event(&mut self, sub: u32, events: EventSet);
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
    /// that is done (or failed).
    pub fn spawn(self, filters: Option<Filters>) -> Result<RunningEventLoop, EventLoopError> {
        let stop = self.stop.try_clone().map_err(EventLoopError::Setup)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .stack_size(crate::memory::THREAD_STACK_SIZE)
            .spawn(move || {
                let installed = filters.map_or(Ok(()), |f| f.install(ThreadKind::Devices));
                let ok = installed.is_ok();
                let _ = ready_tx.send(installed);
                if ok {
                    self.run();
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

    fn run(self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("device thread: epoll_wait failed: {e}");
                    return;
                }
            };
            for event in &events[..count] {
                let token = event.data();
                if token == STOP_TOKEN {
                    return;
                }
                let (id, sub) = ((token >> 32) as usize, token as u32);
                if let Some(Some(handler)) = self.handlers.get(id) {
                    handler
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .handle_event(sub, event.event_set());
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
        if self.thread.join().is_err() {
            log::error!("the device thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        let running = event_loop.spawn(None).unwrap();
        trigger.write(1).unwrap();
        for _ in 0..200 {
            if !seen.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        running.stop();
        assert_eq!(*seen.lock().unwrap(), vec![7]);
    }
}
