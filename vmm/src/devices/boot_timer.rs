//! The boot timer: a guest write to port 0x440 logs the time since the VMM
//! started, so an init can mark milestones ("userspace reached") with e.g.
//! `printf '\x7b' | dd of=/dev/port bs=1 seek=1088 count=1`.
//!
//! Marks are also kept in memory for tests and benchmarks.
//!
//! The port exists to time boot: the first [`LOGGED_MARKS`] writes are
//! logged, later ones only counted (with a periodic summary, see
//! [`crate::log_limit`]), so a guest looping on the port cannot grow the
//! VMM log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::bus::BusDevice;
use crate::log_limit::{DEFAULT_INTERVAL, LogLimit};
use crate::logger::since_start;

/// The boot-timer port (1088).
pub const BOOT_TIMER_PORT: u64 = 0x440;
/// Ports decoded.
pub const BOOT_TIMER_PORT_COUNT: u64 = 1;
/// Marks kept at most (later ones are only counted).
const MAX_MARKS: usize = 64;
/// Marks logged in full; later ones are counted and summarised.
pub const LOGGED_MARKS: u64 = 8;

/// One guest mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootMark {
    /// The byte the guest wrote.
    pub value: u8,
    /// Time since the VMM started.
    pub since_start: Duration,
}

/// The boot-timer device.
#[derive(Debug)]
pub struct BootTimer {
    marks: Arc<Mutex<Vec<BootMark>>>,
    log_limit: LogLimit,
}

impl Default for BootTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BootTimer {
    /// A device with no marks yet.
    pub fn new() -> Self {
        Self {
            marks: Arc::default(),
            log_limit: LogLimit::with_limits("boot-timer marks", LOGGED_MARKS, DEFAULT_INTERVAL),
        }
    }

    /// Guest writes to the port so far.
    pub fn writes(&self) -> u64 {
        self.log_limit.occurrences()
    }

    /// A handle to the marks recorded so far.
    pub fn marks(&self) -> Arc<Mutex<Vec<BootMark>>> {
        Arc::clone(&self.marks)
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        #[cfg(feature = "test-hooks")]
        if value == crate::test_hooks::FORBIDDEN_SYSCALL_MARK {
            crate::test_hooks::forbidden_syscall();
        }
        let since_start = since_start();
        crate::limited_log!(
            self.log_limit,
            log::Level::Info,
            "boot-timer: guest mark {value:#04x} at {} us ({:.3} ms) since VMM start",
            since_start.as_micros(),
            since_start.as_secs_f64() * 1000.0
        );
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if marks.len() < MAX_MARKS {
            marks.push(BootMark { value, since_start });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_recorded_in_order_and_bounded() {
        let mut timer = BootTimer::new();
        let marks = timer.marks();
        timer.write(0, &[0x7b]);
        timer.write(0, &[0x01, 0x02]);
        timer.write(0, &[]);
        let got = marks.lock().unwrap().clone();
        assert_eq!(
            got.iter().map(|m| m.value).collect::<Vec<_>>(),
            [0x7b, 0x01]
        );
        assert!(got[0].since_start <= got[1].since_start);
        for _ in 0..100 {
            timer.write(0, &[0]);
        }
        assert_eq!(marks.lock().unwrap().len(), MAX_MARKS);
    }

    #[test]
    fn a_guest_looping_on_the_port_logs_only_its_first_marks() {
        let mut timer = BootTimer::new();
        let lines = crate::logger::capture_lines(|| {
            for i in 0..100_000u32 {
                timer.write(0, &[i as u8]);
            }
        });
        // The first marks in full, then one notice (a test run is far
        // shorter than the summary interval).
        assert_eq!(lines.len() as u64, LOGGED_MARKS + 1, "{lines:?}");
        assert!(
            lines[0].contains("boot-timer: guest mark 0x00 at"),
            "{}",
            lines[0]
        );
        assert!(lines[7].contains("guest mark 0x07 at"), "{}", lines[7]);
        assert!(
            lines[8].contains("boot-timer marks: more than 8"),
            "{}",
            lines[8]
        );
        assert_eq!(timer.writes(), 100_000);
    }
}
