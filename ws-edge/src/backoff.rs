//! Exponential backoff for the retry loops that never give up (stream reads, head loading, gap
//! fill).

use std::time::Duration;

/// First delay after a failure.
pub const RETRY_START: Duration = Duration::from_millis(100);
/// Largest delay between two attempts.
pub const RETRY_CAP: Duration = Duration::from_secs(5);

/// Delays that double from [`RETRY_START`] up to [`RETRY_CAP`], without jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: RETRY_START }
    }
}

impl Backoff {
    /// Returns the delay before the next attempt and doubles the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(RETRY_CAP);
        delay
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = RETRY_START;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_cap() {
        let mut backoff = Backoff::default();
        let delays: Vec<u128> = (0..8).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), RETRY_START);
    }
}
