//! Reaping every child: our step shells and the orphans we inherit.
//!
//! As PID 1 (and, in tests, as a child subreaper) the agent inherits every
//! orphaned process in the guest and must reap them, or they stay zombies.
//! A plain `waitpid(-1)` loop would also steal the exit status of the step
//! shells, which the job supervisor needs, and would race with the standard
//! library, which itself calls `waitpid(pid)` on a child whose `exec`
//! failed. So the reaper thread:
//!
//! 1. peeks at an exited child with `waitid(P_ALL, WEXITED | WNOWAIT)`,
//!    which leaves it a zombie;
//! 2. takes the registry lock, which [`Reaper::spawn`] holds from before
//!    `fork` until the new pid is registered, so a child that exits at once
//!    is never mistaken for an orphan, and the standard library's own reap
//!    of a failed `exec` is over before we look;
//! 3. reaps that pid with `waitpid(pid, WNOHANG)` and, if it was registered,
//!    hands the status to its callback.
//!
//! With no children at all `waitid` fails with `ECHILD`; the thread then
//! sleeps until the next spawn (no descendants means no future orphans).
//! Nothing else in the agent may wait for children.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

/// Called once with the exit status of a registered child.
type ExitCallback = Box<dyn FnOnce(WaitStatus) + Send>;

/// Longest the idle reaper sleeps before looking again anyway.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Registry {
    watched: HashMap<Pid, ExitCallback>,
    /// Bumped on every spawn, so the idle reaper knows to look again.
    generation: u64,
    /// Orphans reaped so far (for logs and tests).
    orphans_reaped: u64,
}

#[derive(Default)]
struct Shared {
    registry: Mutex<Registry>,
    spawned: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Handle on the reaper thread; clone it freely.
#[derive(Clone)]
pub struct Reaper {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// Starts the reaper thread. Start it once, before any child exists.
    pub fn start() -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_forever(&worker))?;
        Ok(Self { shared })
    }

    /// Spawns `command`; `on_exit` gets its exit status once it ends. Never
    /// call `wait` on the returned [`Child`]: the reaper owns its status.
    pub fn spawn(
        &self,
        command: &mut Command,
        on_exit: impl FnOnce(WaitStatus) + Send + 'static,
    ) -> io::Result<Child> {
        let mut registry = self.shared.lock();
        let child = command.spawn()?;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        registry.watched.insert(pid, Box::new(on_exit));
        registry.generation += 1;
        self.shared.spawned.notify_all();
        Ok(child)
    }

    /// Orphans (unregistered children) reaped so far.
    pub fn orphans_reaped(&self) -> u64 {
        self.shared.lock().orphans_reaped
    }
}

fn reap_forever(shared: &Shared) {
    loop {
        let generation = shared.lock().generation;
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(peeked) => {
                if let Some(pid) = peeked.pid() {
                    reap(shared, pid);
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => {
                let registry = shared.lock();
                if registry.generation == generation {
                    // Spurious wakeups and timeouts just loop around.
                    let _ = shared.spawned.wait_timeout(registry, IDLE_RECHECK);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "waitid failed");
                thread::sleep(IDLE_RECHECK);
            }
        }
    }
}

/// Reaps `pid` (which has exited) and reports its status if it is watched.
fn reap(shared: &Shared, pid: Pid) {
    // Taking the lock waits out a spawn in progress (see the module docs).
    let mut registry = shared.lock();
    let callback = registry.watched.remove(&pid);
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => {
            // Cannot happen for a child waitid saw exit; keep watching it.
            if let Some(callback) = callback {
                registry.watched.insert(pid, callback);
            }
        }
        Err(Errno::ECHILD) => {
            // Reaped by the standard library after a failed exec.
        }
        Ok(status) => match callback {
            Some(callback) => {
                drop(registry);
                callback(status);
            }
            None => {
                registry.orphans_reaped += 1;
                tracing::debug!(%pid, ?status, "reaped an orphan");
            }
        },
        Err(err) => tracing::error!(%pid, error = %err, "waitpid failed"),
    }
}
