//! A minimal `log` backend: one line per record on stderr, stamped with the
//! time since the VMM process started, so phase timings read directly off
//! the log (`[vmm +12.345ms INFO] first KVM_RUN`).

use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static START: OnceLock<Instant> = OnceLock::new();
static LOGGER: StderrLogger = StderrLogger;

/// Records "now" as the VMM start time; later calls keep the first value.
pub fn mark_process_start() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Time elapsed since [`mark_process_start`] (or since the first call).
pub fn since_start() -> Duration {
    mark_process_start().elapsed()
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
        // Logging must never fail the VMM: a closed stderr loses the line.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
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
