//! A per-VM limit on the rate of job log bytes the host relays.
//!
//! Relaying a log costs the host CPU outside every VM's cgroup (framing,
//! JSON, the orchestrator's writes), so a job that floods its output could
//! slow its neighbours through the host agent. The relay charges every log
//! chunk to a token bucket and, when the bucket is in debt, stops reading
//! from the guest until the debt is paid: vsock's credit-based flow control
//! then blocks the guest's writer, so the flood slows down inside its own VM
//! and nothing is dropped or buffered on the host.
//!
//! Every event read from the guest is charged [`EVENT_COST_BYTES`] on top
//! of the output it carries, so a flood of tiny (or output-less) messages
//! is paced like a flood of bytes: relaying an event costs about the same
//! whatever its size.
//!
//! The bucket holds one second's worth of bytes (the burst); a chunk larger
//! than what is left is accepted and leaves the bucket in debt, so a single
//! chunk is never refused and the average rate still holds.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

pub use protocol::limits::EVENT_COST_BYTES;

/// A token bucket over log bytes.
#[derive(Debug, Clone)]
pub struct LogRateLimit {
    bytes_per_sec: f64,
    /// Bytes that may pass now; negative while in debt.
    tokens: f64,
    last_refill: Instant,
}

impl LogRateLimit {
    /// A full bucket admitting `bytes_per_sec` on average, bursts of one
    /// second's worth.
    pub fn new(bytes_per_sec: NonZeroU64, now: Instant) -> LogRateLimit {
        let rate = bytes_per_sec.get() as f64;
        LogRateLimit {
            bytes_per_sec: rate,
            tokens: rate,
            last_refill: now,
        }
    }

    /// Charges one event carrying `output_bytes` of log output at `now`:
    /// [`EVENT_COST_BYTES`] plus the output. Returns what [`Self::charge`]
    /// returns.
    pub fn charge_event(&mut self, output_bytes: usize, now: Instant) -> Option<Duration> {
        self.charge(EVENT_COST_BYTES.saturating_add(output_bytes), now)
    }

    /// Charges `bytes` at `now`; returns how long the relay must wait before
    /// it reads from the guest again (`None`: no wait).
    pub fn charge(&mut self, bytes: usize, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last_refill);
        self.last_refill = now;
        self.tokens =
            (self.tokens + elapsed.as_secs_f64() * self.bytes_per_sec).min(self.bytes_per_sec);
        self.tokens -= bytes as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.bytes_per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: u64, now: Instant) -> LogRateLimit {
        LogRateLimit::new(NonZeroU64::new(rate).unwrap(), now)
    }

    #[test]
    fn a_burst_of_one_second_passes_then_the_debt_is_waited_off() {
        let t0 = Instant::now();
        let mut l = limit(1000, t0);
        assert_eq!(l.charge(600, t0), None);
        assert_eq!(l.charge(400, t0), None);
        // 500 bytes of debt at 1000 B/s: half a second.
        let wait = l.charge(500, t0).unwrap();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // After the wait the debt is paid and the bucket is empty.
        let t1 = t0 + wait;
        let wait = l.charge(100, t1).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
    }

    #[test]
    fn the_average_rate_holds_over_many_chunks() {
        let t0 = Instant::now();
        let mut l = limit(64 << 10, t0);
        let mut now = t0;
        let chunk = 16 << 10;
        let total = 4 << 20;
        for _ in 0..total / chunk {
            if let Some(wait) = l.charge(chunk, now) {
                now += wait;
            }
        }
        // 4 MiB at 64 KiB/s, less the first second's burst: 63 s.
        let secs = (now - t0).as_secs_f64();
        assert!((62.5..=63.5).contains(&secs), "{secs}");
    }

    #[test]
    fn an_idle_bucket_refills_only_up_to_its_burst() {
        let t0 = Instant::now();
        let mut l = limit(1000, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(l.charge(1000, later), None);
        assert!(l.charge(1, later).is_some());
    }

    #[test]
    fn tiny_events_are_charged_their_fixed_cost() {
        let t0 = Instant::now();
        let mut l = limit(64 << 10, t0);
        // A second's worth of bytes in one-byte events: far fewer than 64 Ki
        // of them pass before the relay must wait.
        let passed = (0..(64 << 10))
            .take_while(|_| l.charge_event(1, t0).is_none())
            .count();
        assert_eq!(passed, (64 << 10) / (EVENT_COST_BYTES + 1));
        // An event without output is not free either.
        let mut l = limit(1000, t0);
        let mut now = t0;
        for _ in 0..100 {
            if let Some(wait) = l.charge_event(0, now) {
                now += wait;
            }
        }
        let secs = (now - t0).as_secs_f64();
        let expected = (100 * EVENT_COST_BYTES - 1000) as f64 / 1000.0;
        assert!((secs - expected).abs() < 1e-3, "{secs} vs {expected}");
    }

    #[test]
    fn one_chunk_larger_than_the_burst_is_taken_and_paid_for() {
        let t0 = Instant::now();
        let mut l = limit(1000, t0);
        let wait = l.charge(5000, t0).unwrap();
        assert!((wait.as_secs_f64() - 4.0).abs() < 1e-6, "{wait:?}");
    }
}
