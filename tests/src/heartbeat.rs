//! Tells a frozen L1 from a slow one.
//!
//! QEMU's emulated SVM can wedge the L1 so that nothing in it runs any more:
//! no timer fires, so neither the L1 kernel's lockup detectors nor the
//! scenario's own deadlines ever trip, and the run would sit until its
//! timeout (seen in CI: the L1 went silent right after starting an L2 and
//! stayed so for 295 s). A process in the L1 therefore writes a line a
//! second to a serial port of its own (ttyS2, a file on the host); the
//! harness watches that file grow. Once the beat has started, a silence of
//! `FREEZE_LIMIT` means the L1 is frozen: the harness saves what QEMU's
//! monitor says about the vCPUs (where they are stuck) and ends the run.
//!
//! A busy L1 still beats: the beat runs at the highest priority, needs a few
//! milliseconds of CPU a second, and the L1 kernel's soft-lockup detector
//! (20 s, `softlockup_panic=1`) ends runs whose CPUs are stuck in the kernel
//! with interrupts on long before the limit.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// By default, a heartbeat that stays silent this long after it started
/// means a frozen L1 (`Scenario::freeze_limit`).
pub const FREEZE_LIMIT: Duration = Duration::from_secs(60);

/// How often the L1's beat writes (the shell loop's `sleep`).
pub const BEAT_PERIOD_SECS: u32 = 1;

/// Where the L1's beat process writes its pid (a test stops it to fake a
/// freeze).
pub const BEAT_PID_FILE: &str = "/run/heartbeat.pid";

/// The L1 side: a shell line for the L1's `/init` that starts the beat on
/// `tty` in the background.
pub fn beat_command(tty: &str) -> String {
    format!(
        "sh -c 'echo $$ >{BEAT_PID_FILE}; renice -n -20 -p $$ >/dev/null; \
         while :; do cut -d\" \" -f1 /proc/uptime; sleep {BEAT_PERIOD_SECS}; done' \
         >{tty} 2>/dev/null </dev/null &\n"
    )
}

/// The host side: watches the file the L1's beat is written to.
#[derive(Debug)]
pub struct Watch {
    path: PathBuf,
    len: u64,
    last_change: Option<Instant>,
}

impl Watch {
    /// Watches `path` (which QEMU creates when it starts).
    pub fn new(path: &Path) -> Watch {
        Watch {
            path: path.to_path_buf(),
            len: 0,
            last_change: None,
        }
    }

    /// Looks at the file; returns how long the beat has been silent if that
    /// is at least `limit` (never before the first beat).
    pub fn silent_for(&mut self, now: Instant, limit: Duration) -> Option<Duration> {
        let len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if len != self.len {
            self.len = len;
            self.last_change = Some(now);
            return None;
        }
        let silent = now.saturating_duration_since(self.last_change?);
        (silent >= limit).then_some(silent)
    }
}

/// Asks QEMU's human monitor at `socket` for every vCPU's registers, to see
/// where a frozen L1 is stuck. Best effort: whatever arrives within a few
/// seconds, or why nothing did.
pub fn vcpu_registers(socket: &Path) -> String {
    let ask = || -> std::io::Result<String> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"info registers -a\n")?;
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        // Past the monitor's banner and its readline echo of the command.
        let text = String::from_utf8_lossy(&out);
        Ok(match text.find("CPU#") {
            Some(at) => text[at..].to_string(),
            None => text.into_owned(),
        })
    };
    ask().unwrap_or_else(|e| {
        format!(
            "QEMU's monitor at {} did not answer: {e}\n",
            socket.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_counts_only_after_the_first_beat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("beat.log");
        let mut w = Watch::new(&path);
        let t0 = Instant::now();
        let limit = Duration::from_secs(60);
        // No file, then an empty file: the L1 has not started beating.
        assert_eq!(w.silent_for(t0 + Duration::from_secs(500), limit), None);
        std::fs::write(&path, "").unwrap();
        assert_eq!(w.silent_for(t0 + Duration::from_secs(600), limit), None);
        // The first beat starts the clock; growth resets it.
        std::fs::write(&path, "1.0\n").unwrap();
        assert_eq!(w.silent_for(t0, limit), None);
        assert_eq!(w.silent_for(t0 + Duration::from_secs(59), limit), None);
        std::fs::write(&path, "1.0\n2.0\n").unwrap();
        assert_eq!(w.silent_for(t0 + Duration::from_secs(61), limit), None);
        assert_eq!(w.silent_for(t0 + Duration::from_secs(120), limit), None);
        assert_eq!(
            w.silent_for(t0 + Duration::from_secs(121), limit),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn the_beat_command_backgrounds_a_loop_on_its_tty() {
        let c = beat_command("/dev/ttyS2");
        assert!(
            c.contains(">/dev/ttyS2") && c.trim_end().ends_with('&'),
            "{c}"
        );
    }

    #[test]
    fn a_missing_monitor_is_reported_not_fatal() {
        let text = vcpu_registers(Path::new("/nonexistent/monitor.sock"));
        assert!(text.contains("did not answer"), "{text}");
    }
}
