//! One exponential backoff for every retry loop of the workspace: projection retries, workers and
//! relays waiting out a failing database or broker, saga steps.
//!
//! Overflow-safe by construction: every multiplication saturates and every wait is capped, so
//! `Duration::MAX` as a first wait or a cap is a long wait, never a panic.

use std::time::Duration;

/// The longest single wait any backoff gives: a day. Longer caps are clamped to it, so a wait can
/// always be added to an `Instant`.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// Exponential backoff with "equal jitter": the n-th wait is `first * 2^(n-1)` capped at `max`, of
/// which half is fixed and half spread at random, so that many retrying together do not retry in
/// step.
///
/// Stateful use: [`next_delay`](Self::next_delay) (or [`wait`](Self::wait)) after each failure,
/// [`reset`](Self::reset) after a success. The pure form is [`Backoff::delay`].
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    jitter: bool,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    /// A backoff from `first`, doubling up to `max` (`max` below `first` is raised to it; both are
    /// clamped to [`MAX_WAIT`]), with jitter.
    #[must_use]
    pub fn new(first: Duration, max: Duration) -> Self {
        let first = first.min(MAX_WAIT);
        Self {
            first,
            max: max.min(MAX_WAIT).max(first),
            jitter: true,
            attempt: 0,
            seed: seed(),
        }
    }

    /// The same backoff without jitter: exactly `first * 2^(n-1)`, capped (for tests and for
    /// loops that are alone in waiting).
    #[must_use]
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// The first wait.
    #[must_use]
    pub fn first(&self) -> Duration {
        self.first
    }

    /// The cap.
    #[must_use]
    pub fn max(&self) -> Duration {
        self.max
    }

    /// How many waits were given since the last reset.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The wait after the next failure (and counts it).
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        if self.jitter {
            Self::delay(self.first, self.max, self.attempt, self.seed)
        } else {
            exponential(self.first, self.max, self.attempt)
        }
    }

    /// Sleeps [`next_delay`](Self::next_delay).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Starts again from the first wait (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The wait after failed try `attempt` (1-based) of a backoff from `first` capped at `max`,
    /// spread by `seed` ("equal jitter": half fixed, half in `[0, half)` from a hash of the seed
    /// and the attempt, so the same seed gives the same waits).
    #[must_use]
    pub fn delay(first: Duration, max: Duration, attempt: u32, seed: u64) -> Duration {
        let full = exponential(first, max, attempt);
        let half = full / 2;
        // splitmix64 of the seed and the attempt: a spread in [0, 1).
        let mut z = seed ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        #[allow(clippy::cast_precision_loss)] // 53 bits into an f64's 53-bit mantissa: exact
        let spread = (z >> 11) as f64 / (1u64 << 53) as f64;
        half + half.mul_f64(spread)
    }
}

/// `first * 2^(attempt-1)`, capped at `max` (and [`MAX_WAIT`]), saturating.
fn exponential(first: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    first
        .saturating_mul(factor)
        .min(max.min(MAX_WAIT).max(first.min(MAX_WAIT)))
}

/// A seed that differs between backoffs of one process and between processes.
fn seed() -> u64 {
    // The low half of a v7 id is random.
    uuid::Uuid::now_v7().as_u64_pair().1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap() {
        let mut b =
            Backoff::new(Duration::from_millis(10), Duration::from_millis(70)).without_jitter();
        let waits: Vec<u128> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 70, 70, 70]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }

    #[test]
    fn jitter_stays_between_half_and_the_full_wait() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 1..=20u32 {
            let full = exponential(b.first(), b.max(), attempt);
            let wait = b.next_delay();
            assert!(
                wait >= full / 2 && wait <= full,
                "{attempt}: {wait:?} of {full:?}"
            );
        }
    }

    #[test]
    fn extreme_durations_never_panic() {
        for (first, max) in [
            (Duration::MAX, Duration::MAX),
            (Duration::MAX, Duration::ZERO),
            (Duration::ZERO, Duration::MAX),
            (Duration::from_nanos(1), Duration::MAX),
        ] {
            let mut b = Backoff::new(first, max);
            for _ in 0..200 {
                assert!(b.next_delay() <= MAX_WAIT);
            }
            assert!(Backoff::delay(first, max, u32::MAX, u64::MAX) <= MAX_WAIT);
            // A wait can always be added to now.
            let _ = std::time::Instant::now() + b.next_delay();
        }
    }
}
