//! Rate-limited logging for lines a guest can trigger.
//!
//! Every log line that a guest action can cause (a malformed descriptor
//! chain, a refused register write, a boot-timer mark, a failed backend
//! write on the guest's behalf) goes through a [`LogLimit`], one per kind
//! of line. The first [`LogLimit::burst`] occurrences are logged in full;
//! the next one logs a single notice that later ones are only counted; after
//! that, at most once per [`LogLimit::interval`], the occurrence that
//! arrives is logged together with a summary ("N more <kind> suppressed").
//! A guest looping on such an action therefore adds at most `burst + 1`
//! lines, plus two per interval, whatever its rate.
//!
//! The summary is written when an occurrence arrives after the interval
//! (no timer): a guest that stops leaves its last count unreported, which
//! costs nothing but that count.
//!
//! Use [`limited_log!`](crate::limited_log) at the call site, with a
//! `LogLimit` that is either a field of the device (testable per instance)
//! or a `static` (one per call site).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Occurrences of one kind logged in full before suppression starts.
pub const DEFAULT_BURST: u64 = 10;
/// Shortest time between two summaries of one kind.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// What to do with one occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it.
    Log,
    /// The burst is used up: log a notice that further occurrences are
    /// counted, not the line itself.
    StartSuppressing,
    /// Log a summary of `suppressed` earlier occurrences, then the line.
    Summary {
        /// Occurrences suppressed since the last summary (or the notice).
        suppressed: u64,
    },
    /// Count it only.
    Suppress,
}

impl Verdict {
    /// Log lines this verdict writes.
    pub fn lines(self) -> u64 {
        match self {
            Verdict::Log | Verdict::StartSuppressing => 1,
            Verdict::Summary { .. } => 2,
            Verdict::Suppress => 0,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    occurrences: u64,
    logged: u64,
    suppressed: u64,
    lines: u64,
    window_start: Option<Instant>,
}

/// The log budget of one kind of guest-triggerable line.
#[derive(Debug)]
pub struct LogLimit {
    kind: &'static str,
    burst: u64,
    interval: Duration,
    state: Mutex<State>,
}

impl LogLimit {
    /// A limit with [`DEFAULT_BURST`] and [`DEFAULT_INTERVAL`]; `kind`
    /// names the line in notices and summaries.
    pub const fn new(kind: &'static str) -> Self {
        Self::with_limits(kind, DEFAULT_BURST, DEFAULT_INTERVAL)
    }

    /// A limit logging the first `burst` occurrences, then summarising at
    /// most once per `interval`.
    pub const fn with_limits(kind: &'static str, burst: u64, interval: Duration) -> Self {
        Self {
            kind,
            burst,
            interval,
            state: Mutex::new(State {
                occurrences: 0,
                logged: 0,
                suppressed: 0,
                lines: 0,
                window_start: None,
            }),
        }
    }

    /// The kind of line, as named in notices and summaries.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Occurrences logged in full before suppression starts.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Shortest time between two summaries.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Records one occurrence now and says what to log.
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// Records one occurrence at `now` and says what to log.
    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.occurrences = state.occurrences.saturating_add(1);
        let verdict = if state.logged < self.burst {
            state.logged += 1;
            Verdict::Log
        } else {
            match state.window_start {
                None => {
                    state.window_start = Some(now);
                    state.suppressed = 1;
                    Verdict::StartSuppressing
                }
                Some(start) if now.saturating_duration_since(start) >= self.interval => {
                    state.window_start = Some(now);
                    Verdict::Summary {
                        suppressed: std::mem::take(&mut state.suppressed),
                    }
                }
                Some(_) => {
                    state.suppressed = state.suppressed.saturating_add(1);
                    Verdict::Suppress
                }
            }
        };
        state.lines = state.lines.saturating_add(verdict.lines());
        verdict
    }

    /// Occurrences recorded so far (logged or not).
    pub fn occurrences(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .occurrences
    }

    /// Log lines written for this kind so far (lines, notice, summaries).
    pub fn lines(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).lines
    }
}

/// Logs a guest-triggerable line through a [`LogLimit`]:
/// `limited_log!(self.limit, log::Level::Warn, "vsock: {e}")` with a limit
/// of one's own, or `limited_log!(kind = "vsock errors", log::Level::Warn,
/// "vsock: {e}")` with a `static` limit for this call site.
///
/// The limit is always charged, even when the level is filtered out, so
/// the bound holds whatever `VMM_LOG` says.
#[macro_export]
macro_rules! limited_log {
    (kind = $kind:literal, $level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::new($kind);
        $crate::limited_log!(LIMIT, $level, $($arg)+)
    }};
    ($limit:expr, $level:expr, $($arg:tt)+) => {{
        let limit: &$crate::log_limit::LogLimit = &$limit;
        match limit.check() {
            $crate::log_limit::Verdict::Log => ::log::log!($level, $($arg)+),
            $crate::log_limit::Verdict::StartSuppressing => ::log::log!(
                $level,
                "{}: more than {} occurrences; further ones are counted and summarised \
                 at most every {} s",
                limit.kind(),
                limit.burst(),
                limit.interval().as_secs()
            ),
            $crate::log_limit::Verdict::Summary { suppressed } => {
                ::log::log!(
                    $level,
                    "{} more {} suppressed (one summary per {} s at most); latest:",
                    suppressed,
                    limit.kind(),
                    limit.interval().as_secs()
                );
                ::log::log!($level, $($arg)+);
            }
            $crate::log_limit::Verdict::Suppress => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_burst_then_notice_then_periodic_summaries() {
        let limit = LogLimit::with_limits("test line", 3, Duration::from_secs(10));
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..5).map(|_| limit.check_at(t0)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Log,
                Verdict::Log,
                Verdict::Log,
                Verdict::StartSuppressing,
                Verdict::Suppress
            ]
        );
        // 1000 more within the interval: all counted, none logged.
        for _ in 0..1000 {
            assert_eq!(
                limit.check_at(t0 + Duration::from_secs(9)),
                Verdict::Suppress
            );
        }
        // The first one after the interval carries the summary.
        assert_eq!(
            limit.check_at(t0 + Duration::from_secs(10)),
            Verdict::Summary { suppressed: 1002 }
        );
        assert_eq!(
            limit.check_at(t0 + Duration::from_secs(11)),
            Verdict::Suppress
        );
        assert_eq!(
            limit.check_at(t0 + Duration::from_secs(20)),
            Verdict::Summary { suppressed: 1 }
        );
        assert_eq!(limit.occurrences(), 1008);
        assert_eq!(limit.lines(), 3 + 1 + 2 + 2);
    }

    #[test]
    fn a_flood_writes_a_bounded_number_of_lines() {
        static LIMIT: LogLimit = LogLimit::new("flood line");
        let lines = crate::logger::capture_lines(|| {
            for i in 0..100_000 {
                crate::limited_log!(LIMIT, log::Level::Warn, "flood {i}");
            }
        });
        // A test run is far shorter than the interval: burst + the notice.
        assert_eq!(lines.len() as u64, DEFAULT_BURST + 1, "{lines:?}");
        assert!(lines[0].ends_with("flood 0\n"), "{}", lines[0]);
        assert!(
            lines.last().unwrap().contains("flood line: more than 10"),
            "{lines:?}"
        );
        assert_eq!(LIMIT.occurrences(), 100_000);
    }
}
