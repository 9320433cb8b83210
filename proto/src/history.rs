//! The store of record as the edges see it: stored events by partition and sequence number. The
//! notifier's store implements it in-process; the edge's gRPC client implements it over the
//! `ReadPartition` and `Heads` calls.

use async_trait::async_trait;

use crate::pb::ReadPartitionResponse;

/// Maximum number of events one history read returns.
pub const MAX_PAGE: u32 = 1000;

/// Why a history read failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The store, or the notifier in front of it, is unreachable; retry with backoff.
    #[error("history unavailable: {0}")]
    Unavailable(String),
    /// The request named a partition that does not exist.
    #[error("partition {partition} does not exist; there are {partitions} partitions")]
    NoSuchPartition {
        /// Requested partition.
        partition: u32,
        /// Number of partitions.
        partitions: u32,
    },
}

/// Read access to stored events.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Returns at most `limit` (capped at [`MAX_PAGE`]) stored events of a partition with
    /// sequence numbers above `after`, in order, with the partition's head and oldest retained
    /// sequence number.
    async fn read_partition(
        &self,
        partition: u32,
        after: u64,
        limit: u32,
    ) -> Result<ReadPartitionResponse, HistoryError>;

    /// Returns the last committed sequence number of every partition, indexed by partition.
    async fn heads(&self) -> Result<Vec<u64>, HistoryError>;
}
