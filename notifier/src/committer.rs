//! One committer task per partition. It takes the waiting publish requests as one batch,
//! commits them in one transaction, replies to each request, then appends the new events to the
//! partition's stream with one call. Because one task per partition commits and then appends in
//! order, this process never appends a partition out of order. The work runs in the task, so a
//! caller that goes away after the commit still gets its event appended.

use std::sync::Arc;
use std::time::Duration;

use notify_proto::log::LogWriter;
use notify_proto::pb::{Event, PublishResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::relay::Lanes;
use crate::store::{NewEvent, Outcome, Store};

/// Maximum number of requests committed in one transaction.
pub const MAX_BATCH: usize = 256;

/// A publish request waiting in a partition's queue.
struct Request {
    event: NewEvent,
    /// Receives the response. Dropped without a response only when the committer is aborted at
    /// the end of the shutdown grace period, which the caller sees as [`Error::ShuttingDown`].
    reply: oneshot::Sender<Result<PublishResponse, Error>>,
}

/// Hands publish requests to the partitions' committers.
///
/// Each partition has a bounded queue of `publish_queue` requests. When it is full, `publish`
/// fails at once with [`Error::QueueFull`] and never waits. The queues close when the last clone
/// of the `Publisher` is dropped; each committer then commits what is queued and stops.
#[derive(Clone, Debug)]
pub struct Publisher {
    queues: Arc<[mpsc::Sender<Request>]>,
}

impl Publisher {
    /// Queues an event for its partition's committer and waits for the commit.
    ///
    /// # Errors
    /// [`Error::QueueFull`] when the partition's queue is full, [`Error::IdempotencyConflict`]
    /// when the key was used for other content, [`Error::StoreUnavailable`] when the commit
    /// failed, and [`Error::ShuttingDown`] when the committer has stopped.
    pub async fn publish(&self, partition: u32, event: NewEvent) -> Result<PublishResponse, Error> {
        let queue = self.queues.get(partition as usize).ok_or(Error::ShuttingDown)?;
        let (reply, response) = oneshot::channel();
        queue.try_send(Request { event, reply }).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => Error::QueueFull { partition },
            mpsc::error::TrySendError::Closed(_) => Error::ShuttingDown,
        })?;
        response.await.map_err(|_| Error::ShuttingDown)?
    }
}

/// Shared dependencies and settings of the committers.
pub struct Committers {
    /// Store of record.
    pub store: Store,
    /// Stream to append to.
    pub log: Arc<dyn LogWriter>,
    /// Append ownership of each partition.
    pub lanes: Arc<Lanes>,
    /// Capacity of each partition's queue.
    pub publish_queue: usize,
    /// How long idempotency keys are remembered.
    pub idempotency_window: Duration,
}

impl Committers {
    /// Starts one committer per partition on `tracker` and returns the handle that feeds them.
    /// Cancelling `abort` makes them drop what is still queued and stop.
    pub fn spawn(self, tracker: &TaskTracker, abort: &CancellationToken) -> Publisher {
        let queues = (0..self.store.partitions())
            .map(|partition| {
                let (queue_tx, queue_rx) = mpsc::channel(self.publish_queue.max(1));
                let committer = Committer {
                    partition,
                    queue: queue_rx,
                    store: self.store.clone(),
                    log: Arc::clone(&self.log),
                    lanes: Arc::clone(&self.lanes),
                    idempotency_window: self.idempotency_window,
                };
                tracker.spawn(committer.run(abort.clone()));
                queue_tx
            })
            .collect();
        Publisher { queues }
    }
}

struct Committer {
    partition: u32,
    queue: mpsc::Receiver<Request>,
    store: Store,
    log: Arc<dyn LogWriter>,
    lanes: Arc<Lanes>,
    idempotency_window: Duration,
}

impl Committer {
    async fn run(mut self, abort: CancellationToken) {
        while let Some(batch) = self.next_batch(&abort).await {
            let events = self.commit(batch).await;
            self.append(&events).await;
        }
    }

    /// Waits for a request, then takes the others already waiting, up to [`MAX_BATCH`].
    /// Returns `None` when the queue is closed and empty, or on abort.
    async fn next_batch(&mut self, abort: &CancellationToken) -> Option<Vec<Request>> {
        let first = tokio::select! {
            request = self.queue.recv() => request?,
            () = abort.cancelled() => return None,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match self.queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        Some(batch)
    }

    /// Commits a batch and replies to every request. Returns the events to append.
    async fn commit(&self, batch: Vec<Request>) -> Vec<Event> {
        let (events, replies): (Vec<NewEvent>, Vec<_>) =
            batch.into_iter().map(|request| (request.event, request.reply)).unzip();
        match self
            .store
            .commit(self.partition, &events, self.idempotency_window)
            .await
        {
            Ok(committed) => {
                for (outcome, reply) in committed.outcomes.into_iter().zip(replies) {
                    // A caller that went away no longer needs its response.
                    let _ = reply.send(response(outcome));
                }
                committed.events
            }
            Err(err) => {
                tracing::warn!(partition = self.partition, batch = events.len(), error = %err, "commit failed");
                for reply in replies {
                    let _ = reply.send(Err(Error::StoreUnavailable));
                }
                Vec::new()
            }
        }
    }

    /// Appends committed events unless the relay owns the partition. On failure the partition
    /// goes to the relay, which appends these events from the store.
    async fn append(&self, events: &[Event]) {
        let Some(newest) = events.last() else {
            return;
        };
        if !self.lanes.committed(self.partition, newest.seq) {
            return;
        }
        match self.log.append(self.partition, events).await {
            Ok(report) if report.skipped > 0 => tracing::debug!(
                partition = self.partition,
                skipped = report.skipped,
                "stream already had entries at or above these events"
            ),
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(partition = self.partition, error = %err, "append failed; the relay takes over");
                self.lanes.append_failed(self.partition);
            }
        }
    }
}

fn response(outcome: Outcome) -> Result<PublishResponse, Error> {
    match outcome {
        Outcome::Stored { id, seq, duplicate } => Ok(PublishResponse {
            id,
            position: seq,
            duplicate,
        }),
        Outcome::Conflict { key, first_id } => Err(Error::IdempotencyConflict { key, first_id }),
    }
}
