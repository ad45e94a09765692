//! Token-bucket rate limiting of a device's I/O, one limiter per direction.
//!
//! A [`RateLimiter`] has up to two buckets: bytes and operations (here:
//! frames). A bucket holds at most `burst` tokens and gains `rate` tokens
//! per second, refilled lazily from the monotonic clock whenever it is
//! asked. An operation of `n` bytes passes only if *both* buckets hold
//! enough (`n` bytes and one operation); then both are charged. Otherwise
//! nothing is charged and the limiter arms its timerfd for the moment both
//! will hold enough, so the device can stop work and resume when the timer
//! fd becomes readable in its event loop (semantics as in Firecracker's
//! rate limiter: a blocked device does no work and is woken by a timer, it
//! never spins).
//!
//! An operation larger than a bucket's burst could never pass, so the
//! configuration requires `burst >= ` the largest operation (checked by the
//! caller: the device knows its largest frame).
//!
//! Syscalls: `timerfd_create` (once), `timerfd_settime` (arm/disarm) and
//! `read` on the timer fd (clearing an expiry); clock reads are vDSO.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// Errors of a rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// The timer fd could not be created or armed.
    #[error("rate limiter timer: {0}")]
    Timer(#[from] vmm_sys_util::errno::Error),
}

/// Rate and burst of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Tokens added per second (> 0).
    pub rate: u64,
    /// Most tokens the bucket holds; also its initial content (> 0).
    pub burst: u64,
}

/// Limits of one direction: bytes and/or operations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Bytes per second, burst in bytes.
    #[serde(default)]
    pub bytes: Option<BucketConfig>,
    /// Operations (frames) per second, burst in operations.
    #[serde(default)]
    pub ops: Option<BucketConfig>,
}

impl RateLimit {
    /// Whether no bucket is configured.
    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }
}

/// One token bucket, refilled from an explicit clock (testable).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: BucketConfig,
    /// Tokens, scaled by 1e9 (nano-tokens) so refills of a few ns add up.
    nano_tokens: u128,
    last: Instant,
}

const NANO: u128 = 1_000_000_000;

impl TokenBucket {
    /// A full bucket.
    pub fn new(config: BucketConfig, now: Instant) -> Self {
        Self {
            config,
            nano_tokens: u128::from(config.burst) * NANO,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        let cap = u128::from(self.config.burst) * NANO;
        self.nano_tokens = (self.nano_tokens + elapsed * u128::from(self.config.rate)).min(cap);
    }

    /// Tokens now held (whole).
    pub fn tokens(&mut self, now: Instant) -> u64 {
        self.refill(now);
        (self.nano_tokens / NANO) as u64
    }

    /// How long until `n` tokens are held (zero if they are).
    pub fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let want = u128::from(n) * NANO;
        if self.nano_tokens >= want {
            return Duration::ZERO;
        }
        let missing = want - self.nano_tokens;
        let nanos = missing.div_ceil(u128::from(self.config.rate.max(1)));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn take(&mut self, n: u64) {
        self.nano_tokens = self.nano_tokens.saturating_sub(u128::from(n) * NANO);
    }
}

/// The limiter of one direction of one device.
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter with full buckets.
    pub fn new(limit: RateLimit) -> Result<Self, RateLimiterError> {
        let now = Instant::now();
        Ok(Self {
            bytes: limit.bytes.map(|c| TokenBucket::new(c, now)),
            ops: limit.ops.map(|c| TokenBucket::new(c, now)),
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    /// Charges one operation of `bytes` bytes if both buckets allow it.
    /// If not, charges nothing, arms the timer for when they will, and
    /// returns `false`: the caller stops and retries on the timer event.
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let wait = [
            self.bytes.as_mut().map(|b| b.wait_for(bytes, now)),
            self.ops.as_mut().map(|b| b.wait_for(1, now)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or_default();
        if wait.is_zero() {
            if let Some(b) = &mut self.bytes {
                b.take(bytes);
            }
            if let Some(b) = &mut self.ops {
                b.take(1);
            }
            return true;
        }
        // A zero timeout would disarm the timer: wait at least 1 us.
        match self.timer.reset(wait.max(Duration::from_micros(1)), None) {
            Ok(()) => self.blocked = true,
            // Without a timer we cannot wake up later: let it pass rather
            // than stall the device forever.
            Err(e) => {
                crate::limited_log!(
                    kind = "rate-limiter timer failures",
                    log::Level::Warn,
                    "rate limiter: cannot arm the timer ({e}); not limiting"
                );
                return true;
            }
        }
        false
    }

    /// Whether the limiter is waiting for its timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Handles the timer event: clears it and unblocks.
    pub fn on_timer(&mut self) {
        // Reading clears the expiry count; the fd is only read when epoll
        // reported it readable, so this does not block.
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// The timer fd, to register with the event loop.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Waits up to 2 s for the timer fd to become readable (tests stand in
    /// for the event loop); whether it did.
    #[cfg(test)]
    pub fn wait_for_timer(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 2000) == 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(rate: u64, burst: u64) -> BucketConfig {
        BucketConfig { rate, burst }
    }

    #[test]
    fn a_bucket_starts_full_refills_at_its_rate_and_caps_at_its_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(bucket(1000, 500), t0);
        assert_eq!(b.tokens(t0), 500);
        b.take(500);
        assert_eq!(b.tokens(t0 + Duration::from_millis(100)), 100);
        assert_eq!(b.tokens(t0 + Duration::from_millis(250)), 250);
        assert_eq!(b.tokens(t0 + Duration::from_secs(60)), 500, "capped");
        b.take(500);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.wait_for(200, later), Duration::from_millis(200));
        assert_eq!(b.wait_for(0, later), Duration::ZERO);
    }

    #[test]
    fn sustained_throughput_is_the_rate_plus_the_burst() {
        // Simulate a sender that always has a 1500-byte frame ready and a
        // clock that jumps to the moment the limiter asks for.
        let limit = RateLimit {
            bytes: Some(bucket(1_000_000, 64 * 1024)),
            ops: None,
        };
        let mut limiter = RateLimiter::new(limit).unwrap();
        let t0 = Instant::now();
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(10) {
            if limiter.consume_at(1500, now) {
                sent += 1500;
            } else {
                now += limiter
                    .bytes
                    .as_mut()
                    .unwrap()
                    .wait_for(1500, now)
                    .max(Duration::from_nanos(1));
                limiter.blocked = false;
            }
        }
        let expected = 10 * 1_000_000 + 64 * 1024;
        assert!(
            sent.abs_diff(expected) <= 1500,
            "sent {sent}, expected ~{expected}"
        );
    }

    #[test]
    fn both_buckets_must_allow_and_a_refusal_arms_the_timer() {
        let limit = RateLimit {
            bytes: Some(bucket(1_000_000, 10_000)),
            ops: Some(bucket(10, 2)),
        };
        let mut limiter = RateLimiter::new(limit).unwrap();
        assert!(limiter.consume(100));
        assert!(limiter.consume(100));
        // Bytes remain, but the frame budget (burst 2) is spent.
        assert!(!limiter.consume(100));
        assert!(limiter.is_blocked());
        assert!(!limiter.consume(1), "blocked until the timer fires");
        // The timer fires after ~100 ms (one frame at 10/s).
        assert!(limiter.wait_for_timer(), "the timer did not fire");
        limiter.on_timer();
        assert!(!limiter.is_blocked());
        assert!(limiter.consume(100));
    }

    #[test]
    fn an_unlimited_limiter_always_passes() {
        let mut limiter = RateLimiter::new(RateLimit::default()).unwrap();
        assert!(RateLimit::default().is_unlimited());
        for _ in 0..1000 {
            assert!(limiter.consume(65536));
        }
    }
}
