//! Jittered exponential backoff for reconnecting and retrying.
//!
//! Each delay is the current base, doubled per failure up to a cap, scaled by a
//! random factor in `[1 - jitter, 1 + jitter]`, so that a fleet of workers that
//! lost the same dispatcher does not come back in lockstep.

use std::time::Duration;

use rand::Rng;

/// The shape of a backoff: first base, cap, and jitter as a fraction of the base.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub max: Duration,
    /// 0.5 means ±50 %.
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            jitter: 0.5,
        }
    }
}

/// One retry sequence.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    base: Duration,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Self {
        let config = BackoffConfig {
            initial: config.initial.max(Duration::from_millis(1)),
            max: config.max.max(config.initial),
            jitter: config.jitter.clamp(0.0, 1.0),
        };
        Self {
            base: config.initial,
            config,
        }
    }

    /// The base the next delay is drawn around (before jitter).
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The next delay; doubles the base for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = (base * 2).min(self.config.max);
        let j = self.config.jitter;
        if j == 0.0 {
            return base;
        }
        base.mul_f64(rand::rng().random_range((1.0 - j)..=(1.0 + j)))
    }

    /// Starts over from the initial delay (after a success).
    pub fn reset(&mut self) {
        self.base = self.config.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_initial_to_the_cap_within_the_jitter_bounds() {
        let mut b = Backoff::new(BackoffConfig::default());
        let mut base = Duration::from_millis(100);
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= base.mul_f64(0.5) && d <= base.mul_f64(1.5),
                "{d:?} outside ±50 % of {base:?}"
            );
            base = (base * 2).min(Duration::from_secs(10));
        }
        // Far along, the base sits at the cap and delays stay within 5 s..15 s.
        assert_eq!(b.base(), Duration::from_secs(10));
        for _ in 0..200 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_secs(5) && d <= Duration::from_secs(15),
                "{d:?}"
            );
        }
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(BackoffConfig::default());
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 10, "jitter gives distinct delays: {seen:?}");
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(BackoffConfig {
            jitter: 0.0,
            ..BackoffConfig::default()
        });
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        assert_eq!(b.next_delay(), Duration::from_millis(200));
        assert_eq!(b.next_delay(), Duration::from_millis(400));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
