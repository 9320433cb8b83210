//! The event stream between notifiers and edges: Redis Streams in production, an in-process
//! buffer in the single-process mode. Each partition is an ordered log keyed by the sequence
//! numbers the store assigned.

use std::time::Duration;

use async_trait::async_trait;

use crate::pb::Event;

/// Why a stream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The stream backend is unreachable or returned an error; retry with backoff.
    #[error("stream unavailable: {0}")]
    Unavailable(String),
}

/// Outcome of an append.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AppendReport {
    /// Events written to the stream.
    pub appended: usize,
    /// Events left out because the stream already had an entry at or above their sequence.
    pub skipped: usize,
}

/// The read position in one partition: deliver events with a sequence number above `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Partition number.
    pub partition: u32,
    /// Last sequence number already read.
    pub after: u64,
}

/// Events of one partition read from the stream, with the oldest sequence number it still holds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RangePage {
    /// Events in sequence order.
    pub events: Vec<Event>,
    /// Sequence number of the first entry the stream retains, 0 when it is empty.
    pub first_seq: u64,
}

/// The writing side of the stream, used by the notifier.
#[async_trait]
pub trait LogWriter: Send + Sync + 'static {
    /// Appends events of one partition in the order given, which must be sequence order. An event
    /// whose sequence number is not above the stream's last entry is skipped: it is already there,
    /// or a later event overtook it and readers fill the gap from the store.
    async fn append(&self, partition: u32, events: &[Event]) -> Result<AppendReport, LogError>;

    /// Returns the sequence number of the partition's last entry, 0 when the stream is empty.
    async fn last_seq(&self, partition: u32) -> Result<u64, LogError>;
}

/// The reading side of the stream, used by the edges.
#[async_trait]
pub trait LogReader: Send + Sync + 'static {
    /// Waits up to `block` for events after the cursors and returns at most `count` events per
    /// partition, each partition's in sequence order. Returns an empty list on timeout.
    async fn read(&self, cursors: &[Cursor], block: Duration, count: usize) -> Result<Vec<Event>, LogError>;

    /// Returns at most `limit` events of a partition with sequence numbers above `after`.
    async fn range(&self, partition: u32, after: u64, limit: usize) -> Result<RangePage, LogError>;

    /// Returns the sequence number of the partition's last entry, 0 when the stream is empty.
    async fn last_seq(&self, partition: u32) -> Result<u64, LogError>;
}
