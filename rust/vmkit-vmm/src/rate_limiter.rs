//! Token-bucket I/O rate limiting with Cloud Hypervisor's (Firecracker's)
//! semantics: a bucket of `size` tokens that refills linearly over
//! `refill_time` milliseconds, plus `one_time_burst` extra tokens spent first
//! and never refilled. A [`RateLimiter`] has a bandwidth bucket (bytes) and an
//! ops bucket (requests); a request is admitted only when both have room.
//!
//! The arithmetic takes the current time as an argument so it can be tested
//! with a fake clock; [`SharedRateLimiter`] reads the real monotonic clock and
//! is what devices share (all queues of a disk, or a `rate_limit_group`).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmkit_config::{RateLimiterConfig, TokenBucketConfig};

/// The longest single wait handed out: a caller re-checks after it, so a
/// pathological configuration cannot park a queue for days on one timer.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Waits shorter than this are rounded up so a throttled worker does not spin
/// on timers that expire immediately.
const MIN_WAIT: Duration = Duration::from_micros(100);

/// One token bucket. `budget` is signed: a request larger than the whole
/// bucket is admitted once the bucket is full and leaves it in debt, so the
/// long-run rate still holds.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    budget: i128,
    one_time_burst: u64,
    /// Partial token carried between refills, in token-nanoseconds
    /// (`refill_ns` of them make one token), so small steps lose nothing.
    fraction: u128,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket, or `None` when `size` or `refill_time` is 0 (no limit).
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Option<Self> {
        if config.size == 0 || config.refill_time == 0 {
            return None;
        }
        Some(TokenBucket {
            size: config.size,
            refill_ns: u128::from(config.refill_time) * 1_000_000,
            budget: i128::from(config.size),
            one_time_burst: config.one_time_burst.unwrap_or(0),
            fraction: 0,
            last_update: now,
        })
    }

    /// Tokens available now from the refilling part (negative: in debt).
    pub fn budget(&self) -> i128 {
        self.budget
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    fn refill(&mut self, now: Instant) {
        let size = i128::from(self.size);
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        self.last_update = now.max(self.last_update);
        if self.budget >= size {
            self.fraction = 0;
            return;
        }
        let accumulated = elapsed
            .saturating_mul(u128::from(self.size))
            .saturating_add(self.fraction);
        // Capped before the conversion: anything above 2 * u64::MAX fills
        // any bucket from any debt.
        let new_tokens = (accumulated / self.refill_ns).min(u128::from(u64::MAX) * 2) as i128;
        self.budget += new_tokens;
        if self.budget >= size {
            self.budget = size;
            self.fraction = 0;
        } else {
            self.fraction = accumulated % self.refill_ns;
        }
    }

    /// How long until `tokens` could be taken, or `None` if they can now.
    /// The bucket must have been refilled to `now` already.
    fn shortfall(&self, tokens: u64) -> Option<Duration> {
        let rest = tokens.saturating_sub(self.one_time_burst);
        if rest == 0 {
            return None;
        }
        // A request larger than the bucket waits for a full bucket only.
        let needed = i128::from(rest.min(self.size));
        if self.budget >= needed {
            return None;
        }
        let deficit = (needed - self.budget) as u128;
        let wait_ns = deficit
            .saturating_mul(self.refill_ns)
            .saturating_sub(self.fraction)
            .div_ceil(u128::from(self.size));
        let wait = Duration::from_nanos(u64::try_from(wait_ns).unwrap_or(u64::MAX));
        Some(wait.clamp(MIN_WAIT, MAX_WAIT))
    }

    /// Takes `tokens`, burst first; the caller checked `shortfall`.
    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    /// Takes `tokens` if they are available at `now`; otherwise takes nothing
    /// and says how long to wait before trying again.
    pub fn try_take(&mut self, tokens: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        match self.shortfall(tokens) {
            Some(wait) => Err(wait),
            None => {
                self.take(tokens);
                Ok(())
            }
        }
    }

    /// Gives back tokens taken for a request that was not run after all
    /// (never beyond a full bucket; a spent burst stays spent).
    pub fn give_back(&mut self, tokens: u64) {
        let size = i128::from(self.size);
        self.budget = self.budget.saturating_add(i128::from(tokens)).min(size);
    }
}

/// A bandwidth (bytes) and an ops (requests) bucket; either may be absent.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(config: &RateLimiterConfig, now: Instant) -> Self {
        RateLimiter {
            bandwidth: config
                .bandwidth
                .as_ref()
                .and_then(|c| TokenBucket::new(c, now)),
            ops: config.ops.as_ref().and_then(|c| TokenBucket::new(c, now)),
        }
    }

    /// True when neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Admits a request of `ops` operations and `bytes` bytes at `now`, taking
    /// from both buckets, or takes nothing and says how long to wait.
    pub fn try_consume(&mut self, ops: u64, bytes: u64, now: Instant) -> Result<(), Duration> {
        let mut wait: Option<Duration> = None;
        for (bucket, tokens) in [(&mut self.ops, ops), (&mut self.bandwidth, bytes)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                if let Some(w) = bucket.shortfall(tokens) {
                    wait = Some(wait.map_or(w, |old| old.max(w)));
                }
            }
        }
        if let Some(wait) = wait {
            return Err(wait);
        }
        if let Some(bucket) = &mut self.ops {
            bucket.take(ops);
        }
        if let Some(bucket) = &mut self.bandwidth {
            bucket.take(bytes);
        }
        Ok(())
    }

    /// Undoes a successful [`try_consume`](Self::try_consume) whose request
    /// was not run (another limiter refused it).
    pub fn give_back(&mut self, ops: u64, bytes: u64) {
        if let Some(bucket) = &mut self.ops {
            bucket.give_back(ops);
        }
        if let Some(bucket) = &mut self.bandwidth {
            bucket.give_back(bytes);
        }
    }

    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }
}

/// A [`RateLimiter`] on the real clock, shared (in an `Arc`) by every queue
/// it limits: all queues of one disk, or all disks of a `rate_limit_group`.
#[derive(Debug)]
pub struct SharedRateLimiter {
    inner: Mutex<RateLimiter>,
}

impl SharedRateLimiter {
    /// Builds the limiter for a disk's `rate_limiter_config` or a
    /// `RateLimiterGroupConfig`'s `rate_limiter_config`; wrap it in an `Arc`.
    pub fn new(config: &RateLimiterConfig) -> Self {
        SharedRateLimiter {
            inner: Mutex::new(RateLimiter::new(config, Instant::now())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RateLimiter> {
        // The state is plain numbers, valid even if a holder panicked.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`RateLimiter::try_consume`]; uses the monotonic clock.
    pub fn try_consume(&self, ops: u64, bytes: u64) -> Result<(), Duration> {
        self.lock().try_consume(ops, bytes, Instant::now())
    }

    /// See [`RateLimiter::give_back`].
    pub fn give_back(&self, ops: u64, bytes: u64) {
        self.lock().give_back(ops, bytes)
    }

    pub fn is_unlimited(&self) -> bool {
        self.lock().is_unlimited()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: Some(burst),
            refill_time: refill_ms,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn zero_size_or_refill_means_no_bucket() {
        let t0 = Instant::now();
        assert!(TokenBucket::new(&bucket(0, 0, 100), t0).is_none());
        assert!(TokenBucket::new(&bucket(10, 0, 0), t0).is_none());
        let limiter = RateLimiter::new(
            &RateLimiterConfig {
                bandwidth: Some(bucket(0, 5, 10)),
                ops: None,
            },
            t0,
        );
        assert!(limiter.is_unlimited());
    }

    #[test]
    fn starts_full_and_refills_linearly() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(100, 0, 1000), t0).unwrap();
        assert_eq!(b.try_take(100, t0), Ok(()));
        assert_eq!(b.budget(), 0);
        // 10 tokens per 100 ms.
        assert_eq!(b.try_take(1, t0), Err(ms(10)));
        assert_eq!(b.try_take(50, t0 + ms(500)), Ok(()));
        assert_eq!(b.budget(), 0);
        assert!(b.try_take(1, t0 + ms(505)).is_err());
        assert_eq!(b.try_take(1, t0 + ms(510)), Ok(()));
        // Never above the size, however long it sits.
        assert_eq!(b.try_take(0, t0 + Duration::from_secs(3600)), Ok(()));
        assert_eq!(b.budget(), 100);
    }

    #[test]
    fn waiting_the_reported_time_is_enough() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(7, 0, 333), t0).unwrap();
        b.try_take(7, t0).unwrap();
        let mut now = t0;
        for _ in 0..50 {
            match b.try_take(3, now) {
                Ok(()) => {}
                Err(wait) => {
                    now += wait;
                    assert_eq!(b.try_take(3, now), Ok(()), "after waiting {wait:?}");
                }
            }
        }
        // 150 tokens at 7 per 333 ms, minus nothing in the bank: ~7.1 s.
        let expected = Duration::from_nanos(333_000_000 * 150 / 7);
        let elapsed = now - t0;
        assert!(
            elapsed >= expected - ms(1) && elapsed <= expected + ms(60),
            "{elapsed:?}"
        );
    }

    #[test]
    fn small_steps_do_not_lose_fractional_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(3, 0, 1000), t0).unwrap();
        b.try_take(3, t0).unwrap();
        for step in 1..=1000 {
            let _ = b.try_take(0, t0 + ms(step));
        }
        assert_eq!(b.budget(), 3);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(10, 25, 1000), t0).unwrap();
        assert_eq!(b.try_take(20, t0), Ok(()));
        assert_eq!((b.one_time_burst(), b.budget()), (5, 10));
        // 5 from the burst, 10 from the bucket.
        assert_eq!(b.try_take(15, t0), Ok(()));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 0));
        assert!(b.try_take(1, t0).is_err());
        assert_eq!(b.try_take(0, t0 + Duration::from_secs(10)), Ok(()));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 10));
    }

    #[test]
    fn a_refused_request_takes_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(10, 4, 1000), t0).unwrap();
        b.try_take(14, t0).unwrap();
        assert_eq!(b.try_take(5, t0 + ms(300)), Err(ms(200)));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 3));
        assert_eq!(b.try_take(5, t0 + ms(500)), Ok(()));
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn oversized_request_waits_for_a_full_bucket_then_goes_into_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(100, 0, 1000), t0).unwrap();
        b.try_take(50, t0).unwrap();
        // 400 tokens: needs a full bucket (50 more = 500 ms).
        assert_eq!(b.try_take(400, t0), Err(ms(500)));
        assert_eq!(b.try_take(400, t0 + ms(500)), Ok(()));
        assert_eq!(b.budget(), -300);
        // The debt is paid back at the normal rate before anything else.
        assert_eq!(b.try_take(1, t0 + ms(500)), Err(ms(3010)));
        assert_eq!(b.try_take(1, t0 + ms(3510)), Ok(()));
    }

    #[test]
    fn both_buckets_must_admit_and_a_refusal_takes_from_neither() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(
            &RateLimiterConfig {
                bandwidth: Some(bucket(1000, 0, 1000)),
                ops: Some(bucket(2, 0, 1000)),
            },
            t0,
        );
        assert_eq!(limiter.try_consume(1, 600, t0), Ok(()));
        // Ops would allow it, bandwidth does not.
        assert_eq!(limiter.try_consume(1, 600, t0), Err(ms(200)));
        assert_eq!(limiter.ops().unwrap().budget(), 1);
        assert_eq!(limiter.try_consume(1, 400, t0), Ok(()));
        // Now ops is empty too: the longer wait wins.
        assert_eq!(limiter.try_consume(1, 100, t0), Err(ms(500)));
        assert_eq!(limiter.bandwidth().unwrap().budget(), 0);
        limiter.give_back(1, 400);
        assert_eq!(limiter.ops().unwrap().budget(), 1);
        assert_eq!(limiter.bandwidth().unwrap().budget(), 400);
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut b = TokenBucket::new(&bucket(10, 0, 100), t0).unwrap();
        b.try_take(10, t0).unwrap();
        assert!(b.try_take(1, t0 - Duration::from_secs(5)).is_err());
        assert_eq!(b.try_take(10, t0 + ms(100)), Ok(()));
    }

    #[test]
    fn extreme_configurations_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(u64::MAX, u64::MAX, u64::MAX), t0).unwrap();
        assert_eq!(b.try_take(u64::MAX, t0), Ok(()));
        assert_eq!(b.try_take(u64::MAX, t0), Ok(()));
        assert_eq!(b.try_take(u64::MAX, t0), Err(MAX_WAIT));
        let mut tiny = TokenBucket::new(&bucket(1, 0, u64::MAX), t0).unwrap();
        tiny.try_take(u64::MAX, t0).unwrap();
        assert_eq!(
            tiny.try_take(1, t0 + Duration::from_secs(1 << 40)),
            Err(MAX_WAIT)
        );
        let mut fast = TokenBucket::new(&bucket(u64::MAX, 0, 1), t0).unwrap();
        fast.try_take(u64::MAX, t0).unwrap();
        assert_eq!(
            fast.try_take(u64::MAX, t0 + Duration::from_secs(1 << 40)),
            Ok(())
        );
    }

    #[test]
    fn shared_limiter_uses_the_real_clock() {
        let limiter = SharedRateLimiter::new(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(1, 0, 20)),
        });
        assert!(!limiter.is_unlimited());
        assert_eq!(limiter.try_consume(1, 0), Ok(()));
        let wait = limiter.try_consume(1, 0).unwrap_err();
        assert!(wait <= ms(20));
        std::thread::sleep(wait + ms(2));
        assert_eq!(limiter.try_consume(1, 0), Ok(()));
    }
}
