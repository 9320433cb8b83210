//! The relay: brings each partition's stream up to the store when the fast path could not.
//!
//! Normally a partition's committer appends each batch right after its commit. When an append
//! fails (Redis is down), the committer hands the partition to the relay and stops appending it.
//! The relay reads the stream's last sequence number, appends the stored events above it in
//! order, page by page, and hands the partition back once the stream contains everything the
//! committer committed. The handover state lives in [`Lanes`].
//!
//! The relay also sweeps every partition at start, when all partitions begin with the relay,
//! and every [`SWEEP_INTERVAL`]. A sweep takes over a partition whose stream has not reached the
//! head the store had one sweep earlier: the events were committed by a process that stopped
//! before appending them (`kill -9`, a crashed replica).
//!
//! NOTE: if newer events were appended above such missing ones in the meantime, Redis rejects the
//! missing ones as too old. The stream then has a gap, which edges fill from the store.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify_proto::log::{LogError, LogWriter};
use notify_proto::pb::ReadPartitionResponse;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, operation};
use crate::store::{Store, StoreError};

/// Time between sweeps of all partitions while nothing fails.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(2);

/// First wait after a failed sweep; it doubles on each failure in a row.
pub const RETRY_START: Duration = Duration::from_millis(100);

/// Maximum wait between retries. The relay never gives up.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// Events read from the store and appended per round trip.
pub const RELAY_PAGE: u32 = 500;

/// Pages one partition may take per sweep before the relay moves on to the next partition, so
/// that one long backlog does not hold up the others.
const MAX_PAGES_PER_SWEEP: usize = 100;

/// Append ownership of each partition: its committer (the fast path) or the relay.
#[derive(Debug)]
pub struct Lanes {
    lanes: Vec<Mutex<Lane>>,
    /// Wakes the relay when a committer hands a partition over or commits to one the relay owns.
    wake: Notify,
}

#[derive(Debug, Default)]
struct Lane {
    /// The relay appends this partition; its committer only records what it committed.
    relay_owns: bool,
    /// Highest sequence number this process's committer committed.
    committed: u64,
}

impl Lanes {
    /// Creates the lanes of `partitions` partitions, all held by the relay until its first sweep
    /// has caught them up.
    pub fn new(partitions: u32) -> Self {
        let lane = || {
            Mutex::new(Lane {
                relay_owns: true,
                committed: 0,
            })
        };
        Self {
            lanes: (0..partitions).map(|_| lane()).collect(),
            wake: Notify::new(),
        }
    }

    fn with_lane<T>(&self, partition: u32, f: impl FnOnce(&mut Lane) -> T) -> Option<T> {
        let lane = self.lanes.get(partition as usize)?;
        // Every update is a plain field write, so a panic elsewhere cannot leave a lane half-set.
        let mut lane = lane.lock().unwrap_or_else(PoisonError::into_inner);
        Some(f(&mut lane))
    }

    /// Records that the committer committed up to `seq`. Returns whether the committer appends
    /// the batch itself; otherwise the relay will.
    pub fn committed(&self, partition: u32, seq: u64) -> bool {
        let fast = self.with_lane(partition, |lane| {
            lane.committed = lane.committed.max(seq);
            !lane.relay_owns
        });
        if fast != Some(true) {
            self.wake.notify_one();
        }
        fast == Some(true)
    }

    /// Hands a partition to the relay after a failed append.
    pub fn append_failed(&self, partition: u32) {
        self.with_lane(partition, |lane| lane.relay_owns = true);
        self.wake.notify_one();
    }

    /// Returns whether the relay appends this partition, after a failed append or while it
    /// catches the stream up.
    pub fn relay_owns(&self, partition: u32) -> bool {
        self.with_lane(partition, |lane| lane.relay_owns).unwrap_or(false)
    }

    fn take(&self, partition: u32) {
        self.with_lane(partition, |lane| lane.relay_owns = true);
    }

    /// Gives a partition back to its committer if the stream contains everything the committer
    /// committed, `through` being the stream's last sequence number. Checking and releasing
    /// under one lock means a commit that lands in between is either seen here or appended by
    /// the committer itself.
    fn give_back(&self, partition: u32, through: u64) -> bool {
        self.with_lane(partition, |lane| {
            if lane.committed <= through {
                lane.relay_owns = false;
            }
            !lane.relay_owns
        })
        .unwrap_or(true)
    }
}

/// Failure that stops a sweep.
#[derive(Debug, thiserror::Error)]
enum SweepError {
    #[error("partition {partition}: {source}")]
    Log { partition: u32, source: LogError },
    #[error("partition {partition}: {source}")]
    Store { partition: u32, source: StoreError },
    #[error("reading the partition heads: {0}")]
    Heads(StoreError),
}

/// Whether a sweep left a partition with events still to append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    CaughtUp,
    Behind,
}

/// The relay task's state.
pub struct Relay {
    store: Store,
    log: Arc<dyn LogWriter>,
    lanes: Arc<Lanes>,
    /// Approximate stream length cap: an empty stream is refilled with at most this many events.
    stream_max_len: u64,
    /// Store heads seen by the previous sweep.
    previous_heads: Vec<u64>,
    /// Partition the next sweep starts with; after a failure, the one after the failed one.
    start: u32,
    /// Events each partition's stream lacked at its last check, for the backlog gauge.
    backlog: Vec<u64>,
    metrics: Metrics,
}

impl Relay {
    /// Creates the relay for the store's partitions.
    pub fn new(store: Store, log: Arc<dyn LogWriter>, lanes: Arc<Lanes>, stream_max_len: usize) -> Self {
        let partitions = store.partitions();
        Self {
            store,
            log,
            lanes,
            stream_max_len: stream_max_len as u64,
            previous_heads: vec![0; partitions as usize],
            start: 0,
            backlog: vec![0; partitions as usize],
            metrics: Metrics::default(),
        }
    }

    /// Records the backlog, the relayed events and the failed calls in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Sets a partition's backlog: events committed but not yet in its stream.
    fn set_backlog(&mut self, partition: u32, events: u64) {
        if let Some(backlog) = self.backlog.get_mut(partition as usize) {
            *backlog = events;
        }
    }

    /// Publishes the backlog and the number of partitions the relay owns, after a sweep.
    fn report(&self) {
        let partitions = self.store.partitions();
        let owned = (0..partitions)
            .filter(|&partition| self.lanes.relay_owns(partition))
            .count();
        let backlog: u64 = (0..partitions)
            .filter(|&partition| self.lanes.relay_owns(partition))
            .filter_map(|partition| self.backlog.get(partition as usize))
            .sum();
        self.metrics.relay_partitions.set(owned as i64);
        self.metrics
            .relay_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
    }

    /// Sweeps at once, then every [`SWEEP_INTERVAL`] and whenever a committer hands a partition
    /// over. After a failed sweep it waits [`RETRY_START`], doubling up to [`RETRY_MAX`], logs a
    /// warning per failure, and never gives up. When `stop` is cancelled it makes one last sweep
    /// if a partition is still behind, then returns.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut retry = RETRY_START;
        loop {
            let swept = self.sweep().await;
            self.report();
            let delay = match swept {
                // A partition with a long backlog is continued at once.
                Ok(Progress::Behind) => {
                    retry = RETRY_START;
                    Duration::ZERO
                }
                Ok(Progress::CaughtUp) => {
                    retry = RETRY_START;
                    SWEEP_INTERVAL
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = retry.as_millis() as u64, "relay sweep failed");
                    let delay = retry;
                    retry = (retry * 2).min(RETRY_MAX);
                    delay
                }
            };
            // During backoff a committer's wake-up must not cut the wait short.
            let wake_early = retry == RETRY_START;
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
                () = self.lanes.wake.notified(), if wake_early => {}
            }
        }
        self.final_sweep().await;
    }

    async fn final_sweep(&mut self) {
        let partitions = self.store.partitions();
        if (0..partitions).any(|partition| self.lanes.relay_owns(partition))
            && let Err(err) = self.sweep().await
        {
            tracing::warn!(error = %err, "relay could not append every committed event before stopping");
        }
    }

    /// Checks every partition once and catches up those the relay owns or that fell behind.
    async fn sweep(&mut self) -> Result<Progress, SweepError> {
        let heads = self.store.heads().await.map_err(|err| {
            self.metrics.store_error(operation::HEADS);
            SweepError::Heads(err)
        })?;
        let partitions = self.store.partitions();
        let mut progress = Progress::CaughtUp;
        for offset in 0..partitions {
            let partition = (self.start + offset) % partitions;
            match self.check(partition).await {
                Ok(Progress::Behind) => progress = Progress::Behind,
                Ok(Progress::CaughtUp) => {}
                Err(err) => {
                    self.start = (partition + 1) % partitions;
                    return Err(err);
                }
            }
        }
        self.previous_heads = heads;
        Ok(progress)
    }

    async fn check(&mut self, partition: u32) -> Result<Progress, SweepError> {
        if !self.lanes.relay_owns(partition) {
            let last = self.last_seq(partition).await?;
            let previous_head = self.previous_heads.get(partition as usize).copied().unwrap_or(0);
            if last >= previous_head {
                self.set_backlog(partition, 0);
                return Ok(Progress::CaughtUp);
            }
            tracing::info!(
                partition,
                last,
                head = previous_head,
                "stream is behind the store; relaying"
            );
            self.lanes.take(partition);
        }
        self.catch_up(partition).await
    }

    /// Appends the stored events the stream lacks, page by page, and gives the partition back
    /// to its committer when the stream has them all. Stops after [`MAX_PAGES_PER_SWEEP`] pages.
    async fn catch_up(&mut self, partition: u32) -> Result<Progress, SweepError> {
        // Events Redis rejected although they are above the stream's last entry, which happens
        // when the top entries were deleted with XDEL. They can never be appended, so pass them.
        let mut rejected_through = 0;
        for _ in 0..MAX_PAGES_PER_SWEEP {
            let last = self.last_seq(partition).await?.max(rejected_through);
            let (after, page) = self.page_after(partition, last).await?;
            let Some(newest) = page.events.last().map(|event| event.seq) else {
                if self.lanes.give_back(partition, after) {
                    self.set_backlog(partition, 0);
                    return Ok(Progress::CaughtUp);
                }
                continue;
            };
            self.set_backlog(partition, page.head.saturating_sub(after));
            // The same `append` spans as the committer's, so a trace is complete whichever of
            // the two appended its event.
            let append_spans = crate::spans::append(&page.events, partition);
            let appended = self.log.append(partition, &page.events).await;
            drop(append_spans);
            let report = appended.map_err(|source| {
                self.metrics.stream_error(operation::APPEND);
                SweepError::Log { partition, source }
            })?;
            self.metrics.relay_appended.inc_by(report.appended as u64);
            self.set_backlog(partition, page.head.saturating_sub(newest));
            tracing::debug!(
                partition,
                appended = report.appended,
                skipped = report.skipped,
                newest,
                "relayed"
            );
            if report.appended == 0 {
                rejected_through = newest;
            }
        }
        Ok(Progress::Behind)
    }

    /// Reads the page of stored events to relay after the stream's last sequence number `last`.
    /// Returns it with the sequence number it starts after.
    async fn page_after(&self, partition: u32, last: u64) -> Result<(u64, ReadPartitionResponse), SweepError> {
        let page = self.read(partition, last).await?;
        let after = self.start_after(last, page.head);
        if after == last {
            return Ok((after, page));
        }
        Ok((after, self.read(partition, after).await?))
    }

    /// Returns the sequence number to relay from. An empty stream has lost its data, after a Redis
    /// restart without persistence or a flush. It is refilled with at most the last
    /// `stream_max_len` events, as many as it would keep, and edges read older ones from the store.
    fn start_after(&self, last: u64, head: u64) -> u64 {
        if last == 0 {
            head.saturating_sub(self.stream_max_len)
        } else {
            last
        }
    }

    async fn last_seq(&self, partition: u32) -> Result<u64, SweepError> {
        self.log.last_seq(partition).await.map_err(|source| {
            self.metrics.stream_error(operation::LAST_SEQ);
            SweepError::Log { partition, source }
        })
    }

    async fn read(&self, partition: u32, after: u64) -> Result<notify_proto::pb::ReadPartitionResponse, SweepError> {
        self.store.read(partition, after, RELAY_PAGE).await.map_err(|source| {
            self.metrics.store_error(operation::READ_PARTITION);
            SweepError::Store { partition, source }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_start_with_the_relay() {
        let lanes = Lanes::new(2);
        assert!(!lanes.committed(0, 5));
        assert!(!lanes.give_back(0, 4));
        assert!(lanes.give_back(0, 5));
        assert!(lanes.committed(0, 6));
    }

    #[test]
    fn failed_append_hands_partition_over() {
        let lanes = Lanes::new(1);
        assert!(lanes.give_back(0, 0));
        lanes.append_failed(0);
        assert!(!lanes.committed(0, 3));
        assert!(lanes.relay_owns(0));
    }

    #[test]
    fn unknown_partition_is_not_appended() {
        let lanes = Lanes::new(1);
        assert!(!lanes.committed(9, 1));
    }
}
