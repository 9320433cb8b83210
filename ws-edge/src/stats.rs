//! Counters of what the edge's limits rejected, dropped or closed, by reason. Each counter only
//! grows; a metrics exporter reads them under these names.

use std::sync::atomic::{AtomicU64, Ordering};

use notify_proto::protocol::close;

/// The edge's limit counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Upgrades rejected with HTTP 429 because `HANDSHAKE_RATE` was exceeded.
    pub rejected_handshake_rate_total: AtomicU64,
    /// Upgrades rejected with HTTP 503 because `MAX_SOCKETS` sockets were open.
    pub rejected_max_sockets_total: AtomicU64,
    /// Sockets closed with 4029 after authentication because their user had
    /// `MAX_SOCKETS_PER_USER` sockets open.
    pub closed_max_sockets_per_user_total: AtomicU64,
    /// Client messages dropped by a message rate limit. The first of a run gets a `rate_limited`
    /// error frame.
    pub dropped_rate_limited_total: AtomicU64,
    /// Sockets closed with 4029 because their client kept exceeding a message rate limit.
    pub closed_rate_limited_total: AtomicU64,
    /// Sockets closed with 4008 because their outbound queue or recovery buffer filled up.
    pub dropped_slow_consumer_total: AtomicU64,
    /// Sockets closed with 1009 because a client frame or message exceeded `MAX_MESSAGE_BYTES`.
    pub closed_message_too_big_total: AtomicU64,
    /// Queued event frames replaced by a newer frame with the same conflation key.
    pub conflated_frames_total: AtomicU64,
}

impl Stats {
    /// Adds one to a counter.
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a socket's close code, for the codes a limit sends.
    pub fn record_close(&self, code: u16) {
        let counter = match code {
            close::SLOW_CONSUMER => &self.dropped_slow_consumer_total,
            close::MESSAGE_TOO_BIG => &self.closed_message_too_big_total,
            _ => return,
        };
        Self::add(counter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_count_by_reason() {
        let stats = Stats::default();
        stats.record_close(close::SLOW_CONSUMER);
        stats.record_close(close::MESSAGE_TOO_BIG);
        stats.record_close(1000);
        assert_eq!(stats.dropped_slow_consumer_total.load(Ordering::Relaxed), 1);
        assert_eq!(stats.closed_message_too_big_total.load(Ordering::Relaxed), 1);
    }
}
