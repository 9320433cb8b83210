//! The window of recently delivered events of one partition, which serves most resumes (a
//! reconnect after a deploy or a network blip) from memory, without a stream or store read.

use std::collections::VecDeque;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::Delivery;

/// Default number of events kept per partition.
pub const DEFAULT_RECENT_EVENTS: usize = 1024;
/// Default total size of the events kept per partition, in bytes (frame, channel and user id).
pub const DEFAULT_RECENT_BYTES: usize = 4 * 1024 * 1024;

/// Capacity of a window. Overflow: the oldest events are evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentLimits {
    /// Maximum number of events.
    pub events: usize,
    /// Maximum total size of the events, in bytes.
    pub bytes: usize,
}

impl Default for RecentLimits {
    fn default() -> Self {
        Self {
            events: DEFAULT_RECENT_EVENTS,
            bytes: DEFAULT_RECENT_BYTES,
        }
    }
}

/// Contiguous recent events of one partition: their sequence numbers have no holes, and the
/// newest is the partition's head whenever the window is not empty.
pub struct Recent {
    events: VecDeque<Delivery>,
    bytes: usize,
    limits: RecentLimits,
}

impl Recent {
    /// Creates an empty window.
    pub fn new(limits: RecentLimits) -> Self {
        Self {
            events: VecDeque::new(),
            bytes: 0,
            limits,
        }
    }

    /// Adds the partition's next event. An event that does not follow the newest one starts the
    /// window over, so that it stays contiguous.
    pub fn push(&mut self, delivery: Delivery) {
        if self.events.back().is_some_and(|last| last.seq + 1 != delivery.seq) {
            self.clear();
        }
        self.bytes += delivery.size();
        self.events.push_back(delivery);
        while self.events.len() > self.limits.events || self.bytes > self.limits.bytes {
            let Some(evicted) = self.events.pop_front() else { break };
            self.bytes -= evicted.size();
        }
    }

    /// Empties the window, when the partition's sequence jumps.
    pub fn clear(&mut self) {
        self.events.clear();
        self.bytes = 0;
    }

    /// Returns the frames of `channel` meant for `user_id` with sequence numbers in
    /// `(after, head]`, or `None` when the window does not reach back to `after + 1`.
    pub fn replay(&self, channel: &str, user_id: &str, after: u64, head: u64) -> Option<Vec<Utf8Bytes>> {
        if after >= head {
            return Some(Vec::new());
        }
        let (first, last) = (self.events.front()?, self.events.back()?);
        if first.seq > after + 1 || last.seq != head {
            return None;
        }
        let start = self.events.partition_point(|event| event.seq <= after);
        let frames = self
            .events
            .range(start..)
            .filter(|event| event.channel == channel && event.is_for(user_id))
            .map(|event| event.frame.clone())
            .collect();
        Some(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(seq: u64, channel: &str) -> Delivery {
        Delivery {
            seq,
            channel: channel.into(),
            user_id: String::new(),
            frame: format!("f{seq}").into(),
            trace: None,
            committed_ms: 0,
        }
    }

    fn window(events: usize, seqs: std::ops::RangeInclusive<u64>) -> Recent {
        let mut recent = Recent::new(RecentLimits {
            events,
            bytes: usize::MAX,
        });
        for seq in seqs {
            recent.push(delivery(seq, if seq % 2 == 0 { "even" } else { "odd" }));
        }
        recent
    }

    fn texts(frames: Option<Vec<Utf8Bytes>>) -> Option<Vec<String>> {
        frames.map(|frames| frames.iter().map(|frame| frame.as_str().to_owned()).collect())
    }

    #[test]
    fn replay_filters_channel_and_range() {
        let recent = window(10, 1..=6);
        assert_eq!(
            texts(recent.replay("even", "", 2, 6)),
            Some(vec!["f4".into(), "f6".into()])
        );
        assert_eq!(
            texts(recent.replay("odd", "", 0, 6)),
            Some(vec!["f1".into(), "f3".into(), "f5".into()])
        );
    }

    #[test]
    fn replay_needs_window_to_reach_back() {
        let recent = window(3, 1..=6);
        assert_eq!(
            texts(recent.replay("even", "", 3, 6)),
            Some(vec!["f4".into(), "f6".into()])
        );
        assert_eq!(recent.replay("even", "", 2, 6), None);
    }

    #[test]
    fn replay_at_head_is_empty() {
        assert_eq!(
            texts(Recent::new(RecentLimits::default()).replay("x", "", 9, 9)),
            Some(vec![])
        );
    }

    #[test]
    fn jump_restarts_window() {
        let mut recent = window(10, 1..=3);
        recent.push(delivery(7, "odd"));
        assert_eq!(recent.replay("odd", "", 3, 7), None);
        assert_eq!(texts(recent.replay("odd", "", 6, 7)), Some(vec!["f7".into()]));
    }

    #[test]
    fn byte_limit_evicts_oldest() {
        let mut recent = Recent::new(RecentLimits {
            events: 100,
            bytes: 2 * delivery(1, "odd").size(),
        });
        for seq in 1..=3 {
            recent.push(delivery(seq, "odd"));
        }
        assert_eq!(recent.replay("odd", "", 1, 3).map(|frames| frames.len()), Some(2));
        assert_eq!(recent.replay("odd", "", 0, 3), None);
    }

    #[test]
    fn targeted_events_only_for_their_user() {
        let mut recent = Recent::new(RecentLimits::default());
        recent.push(Delivery {
            user_id: "bob".into(),
            ..delivery(1, "team")
        });
        assert_eq!(recent.replay("team", "alice", 0, 1).map(|frames| frames.len()), Some(0));
        assert_eq!(recent.replay("team", "bob", 0, 1).map(|frames| frames.len()), Some(1));
    }
}
