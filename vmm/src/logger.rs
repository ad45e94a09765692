//! A minimal `log` backend: one line per record on stderr, stamped with the
//! time since the VMM process started, so phase timings read directly off
//! the log (`[vmm +12.345ms INFO] first KVM_RUN`).
//!
//! The log is bounded: after [`DEFAULT_MAX_BYTES`] (or what
//! [`set_max_bytes`] says; `--log-max-bytes`) one "log truncated" line is
//! written and every later record is dropped. The host agent points stderr
//! at a file in the VM's directory, and nothing a guest does may grow it
//! without bound. Lines a guest can trigger are also rate-limited at their
//! source ([`crate::log_limit`]), so the cap is a backstop, not the plan.
//! The VMM's last words (`vmm: VM stopped: ...`) are written with
//! `eprintln!`, past the cap, so a truncated log still ends with the reason.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Log bytes written at most by default (1 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;

static START: OnceLock<Instant> = OnceLock::new();
static LOGGER: StderrLogger = StderrLogger;
static SINK: Mutex<BoundedWriter<Stderr>> =
    Mutex::new(BoundedWriter::new(Stderr, DEFAULT_MAX_BYTES));

/// Records "now" as the VMM start time; later calls keep the first value.
pub fn mark_process_start() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Time elapsed since [`mark_process_start`] (or since the first call).
pub fn since_start() -> Duration {
    mark_process_start().elapsed()
}

/// Sets the log's byte cap (counting what was already written).
pub fn set_max_bytes(max_bytes: u64) {
    SINK.lock()
        .unwrap_or_else(|e| e.into_inner())
        .set_max_bytes(max_bytes);
}

/// The process's stderr as a `Write` that can live in a `static`.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().lock().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // One `write` call for a whole line: stderr is unbuffered.
        std::io::stderr().lock().write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes whole lines to `inner` until `max_bytes` would be exceeded, then
/// one "log truncated" notice, then nothing: at most `max_bytes` plus the
/// notice ever reach `inner`.
#[derive(Debug)]
pub struct BoundedWriter<W> {
    inner: W,
    max_bytes: u64,
    written: u64,
    truncated: bool,
    dropped_lines: u64,
}

impl<W: Write> BoundedWriter<W> {
    /// A writer passing at most `max_bytes` (plus the notice) to `inner`.
    pub const fn new(inner: W, max_bytes: u64) -> Self {
        Self {
            inner,
            max_bytes,
            written: 0,
            truncated: false,
            dropped_lines: 0,
        }
    }

    /// Changes the cap; bytes already written count against it.
    pub fn set_max_bytes(&mut self, max_bytes: u64) {
        self.max_bytes = max_bytes;
    }

    /// Bytes written so far (the notice included).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Lines dropped after the cap was reached (the first one included).
    pub fn dropped_lines(&self) -> u64 {
        self.dropped_lines
    }

    /// Writes `line` whole, or (once the cap is reached) drops it; write
    /// errors lose the line and never reach the caller (logging must not
    /// fail the VMM).
    pub fn write_line(&mut self, line: &[u8]) {
        if self.truncated {
            self.dropped_lines = self.dropped_lines.saturating_add(1);
            return;
        }
        let len = line.len() as u64;
        if self.written.saturating_add(len) > self.max_bytes {
            self.truncated = true;
            self.dropped_lines = 1;
            let notice = format!(
                "[vmm +{:.3}ms WARN] log truncated: the {}-byte limit is reached, \
                 later lines are dropped\n",
                since_start().as_secs_f64() * 1000.0,
                self.max_bytes
            );
            let _ = self.inner.write_all(notice.as_bytes());
            self.written = self.written.saturating_add(notice.len() as u64);
            return;
        }
        let _ = self.inner.write_all(line);
        self.written = self.written.saturating_add(len);
    }
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = since_start();
        // Formatted first and written with one `write` call: stderr is
        // unbuffered, and writing piece by piece costs a syscall per
        // fragment (about 15 per line), noticeable in the nested harness.
        let line = format!(
            "[vmm +{:.3}ms {}] {}\n",
            elapsed.as_secs_f64() * 1000.0,
            record.level(),
            record.args()
        );
        emit(&line);
    }

    fn flush(&self) {}
}

/// Writes one formatted line through the bounded sink.
#[cfg(not(test))]
fn emit(line: &str) {
    SINK.lock()
        .unwrap_or_else(|e| e.into_inner())
        .write_line(line.as_bytes());
}

/// Tests: the line is captured, or goes through libtest's own output
/// capture (the bounded sink is tested on its own).
#[cfg(test)]
fn emit(line: &str) {
    if !capture::take_line(line) {
        eprint!("{line}");
    }
}

/// Installs the logger; the level comes from `VMM_LOG` (error, warn, info,
/// debug, trace; default info).
pub fn init() {
    mark_process_start();
    let level = std::env::var("VMM_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    // A second init (e.g. from tests) keeps the first logger.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

#[cfg(test)]
mod capture {
    use std::cell::RefCell;

    thread_local! {
        static LINES: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }

    /// Keeps `line` if this thread is capturing; says whether it did.
    pub(super) fn take_line(line: &str) -> bool {
        LINES.with(|lines| match lines.borrow_mut().as_mut() {
            Some(lines) => {
                lines.push(line.to_string());
                true
            }
            None => false,
        })
    }

    pub(super) fn run(f: impl FnOnce()) -> Vec<String> {
        LINES.with(|lines| *lines.borrow_mut() = Some(Vec::new()));
        f();
        LINES.with(|lines| lines.borrow_mut().take().unwrap_or_default())
    }
}

/// Runs `f` and returns the log lines it wrote on this thread (every
/// level, whatever `VMM_LOG` says), instead of writing them to stderr.
#[cfg(test)]
pub(crate) fn capture_lines(f: impl FnOnce()) -> Vec<String> {
    init();
    log::set_max_level(log::LevelFilter::Trace);
    capture::run(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_stops_at_its_cap_with_one_notice() {
        let mut writer = BoundedWriter::new(Vec::new(), 1000);
        let line = [b'x'; 99];
        let mut line = line.to_vec();
        line.push(b'\n');
        for _ in 0..100_000 {
            writer.write_line(&line);
        }
        let out = String::from_utf8(writer.inner.clone()).unwrap();
        assert_eq!(out.matches("xxx\n").count(), 10, "ten whole lines fit");
        assert_eq!(out.matches("log truncated").count(), 1);
        assert!(out.ends_with("later lines are dropped\n"), "{out}");
        assert!(out.len() < 1000 + 200, "{} bytes", out.len());
        assert_eq!(writer.written(), out.len() as u64);
        assert_eq!(writer.dropped_lines(), 100_000 - 10);
    }

    #[test]
    fn a_lowered_cap_counts_what_was_written() {
        let mut writer = BoundedWriter::new(Vec::new(), 1 << 20);
        writer.write_line(b"0123456789\n");
        writer.set_max_bytes(16);
        writer.write_line(b"0123456789\n");
        writer.write_line(b"0123456789\n");
        let out = String::from_utf8(writer.inner).unwrap();
        assert!(out.starts_with("0123456789\n[vmm "), "{out}");
        assert_eq!(out.lines().count(), 2);
    }
}
