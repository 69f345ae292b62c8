//! Exponential backoff with full jitter for reconnecting.

use std::time::Duration;

use rand::Rng;

/// Delays `initial, 2·initial, 4·initial, …` capped at `max`, each drawn
/// uniformly from its upper half so a fleet does not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.initial.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let lo = ceiling / 2;
        lo + (ceiling - lo).mul_f64(rand::rng().random::<f64>())
    }

    /// Back to the initial delay, after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let bounds = [100, 200, 400, 800, 1000, 1000];
        for hi in bounds {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(hi / 2) && d <= Duration::from_millis(hi),
                "{d:?} vs {hi}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
