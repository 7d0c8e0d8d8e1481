//! Pure retry policy: from a handler outcome and a delivery count to what the
//! runtime does with the message. No I/O, so it is tested without a server.

use std::time::Duration;

/// How transient failures are retried.
///
/// The delay before attempt `n + 1` grows as `base * 2^(n-1)`, capped at
/// `cap`, with "equal jitter": half of it is fixed and half random, so delays
/// still grow while replicas that failed together do not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt (before jitter).
    pub base: Duration,
    /// Largest delay. Must stay below the consumer's ack wait, so a message
    /// held behind a delayed retry is never redelivered before it (ordering).
    pub cap: Duration,
    /// Attempts (deliveries) before a transient failure is dead-lettered.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(15),
            max_attempts: 8,
        }
    }
}

impl RetryPolicy {
    /// The delay before the next attempt after `attempt` (1-based) failed.
    ///
    /// `unit` is a random number in `[0, 1)` (passed in so the function stays
    /// pure and testable).
    pub fn delay(&self, attempt: u64, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let unit = unit.clamp(0.0, 1.0);
        let half = ceiling / 2;
        half + half.mul_f64(unit)
    }

    /// The delay before jitter: `base * 2^(attempt-1)`, at most `cap`.
    pub fn ceiling(&self, attempt: u64) -> Duration {
        let exp = attempt.saturating_sub(1).min(32) as u32;
        let factor = 2u32.saturating_pow(exp);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// How a handler finished with one delivery, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled.
    Ok,
    /// Failed, worth retrying (database down, timeout).
    Transient(String),
    /// Failed, retrying cannot help (decode error, rejected, panic).
    Permanent(String),
}

/// What the runtime does with a delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Acknowledge: done.
    Ack,
    /// Negative-acknowledge: the server redelivers after the delay.
    Retry(Duration),
    /// Copy to the dead-letter stream (awaited), park the aggregate, then
    /// terminate the original with the reason.
    DeadLetter(String),
}

/// Decides what to do with a delivery: the handler classifies, the policy
/// decides. `attempt` is the server's delivery count (1 for the first).
pub fn decide(outcome: &Outcome, attempt: u64, policy: &RetryPolicy, unit: f64) -> Action {
    match outcome {
        Outcome::Ok => Action::Ack,
        Outcome::Permanent(reason) => Action::DeadLetter(reason.clone()),
        Outcome::Transient(reason) if attempt >= u64::from(policy.max_attempts) => {
            Action::DeadLetter(format!(
                "retries exhausted after {attempt} attempts; last error: {reason}"
            ))
        }
        Outcome::Transient(_) => Action::Retry(policy.delay(attempt, unit)),
    }
}

/// A cheap random number in `[0, 1)` for jitter. Jitter needs spread, not
/// cryptographic quality, so the clock's nanoseconds mixed with a counter do.
pub(crate) fn jitter_unit() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let mut x = COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ nanos;
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            max_attempts: 5,
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let p = policy();
        let ceilings: Vec<u64> = (1..=7).map(|a| p.ceiling(a).as_millis() as u64).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        // Huge attempt counts neither overflow nor exceed the cap.
        assert_eq!(p.ceiling(u64::MAX), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_between_half_and_full_ceiling() {
        let p = policy();
        for attempt in 1..10 {
            let c = p.ceiling(attempt);
            assert_eq!(p.delay(attempt, 0.0), c / 2);
            assert!(p.delay(attempt, 0.999_999) <= c);
            assert!(p.delay(attempt, 0.5) >= c / 2);
        }
        for _ in 0..1000 {
            let u = jitter_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn jittered_delays_still_grow_below_the_cap() {
        let p = policy();
        // The smallest delay of attempt n+1 is the largest of attempt n.
        for attempt in 1..4 {
            assert!(p.delay(attempt + 1, 0.0) >= p.delay(attempt, 0.999_999));
        }
    }

    #[test]
    fn policy_decisions() {
        let p = policy();
        assert_eq!(decide(&Outcome::Ok, 1, &p, 0.5), Action::Ack);
        assert_eq!(
            decide(&Outcome::Permanent("bad".into()), 1, &p, 0.5),
            Action::DeadLetter("bad".into())
        );
        match decide(&Outcome::Transient("db down".into()), 2, &p, 0.0) {
            Action::Retry(d) => assert_eq!(d, Duration::from_millis(100)),
            other => panic!("expected a retry, got {other:?}"),
        }
        match decide(&Outcome::Transient("db down".into()), 5, &p, 0.0) {
            Action::DeadLetter(reason) => {
                assert!(
                    reason.contains("retries exhausted after 5 attempts"),
                    "{reason}"
                );
                assert!(reason.contains("db down"), "{reason}");
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }
}
