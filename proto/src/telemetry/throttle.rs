//! Rate limiting of a repeated log line, such as a warning logged for every failed request
//! while the store is down.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Default interval between two lines of one throttled call site.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// Lets one line through per interval and counts the others.
///
/// Typical use, as a `static` per call site:
/// `if let Some(suppressed) = THROTTLE.allow() { tracing::warn!(suppressed, ...) }`, so the
/// line that gets through reports how many were left out since the previous one.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// Creates a throttle that lets one line through per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Returns `Some(suppressed)` when a line may be logged now, with the number of lines left
    /// out since the last one, or `None` when this one is to be left out.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        // The state is two plain fields, consistent after every statement.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let due = state
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            state.last = Some(now);
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(throttle.allow_at(start), Some(0));
        assert_eq!(throttle.allow_at(start + Duration::from_secs(1)), None);
        assert_eq!(throttle.allow_at(start + Duration::from_secs(9)), None);
        assert_eq!(throttle.allow_at(start + Duration::from_secs(10)), Some(2));
        assert_eq!(throttle.allow_at(start + Duration::from_secs(11)), None);
        assert_eq!(throttle.allow_at(start + Duration::from_secs(25)), Some(1));
    }
}
