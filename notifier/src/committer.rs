//! One committer task and one appender task per partition. The committer takes the waiting
//! publish requests as one batch, commits them in one transaction, replies to each request, and
//! hands the new events to the appender, which appends each batch to the partition's stream with
//! one call. The committer never waits for the stream, so a slow or frozen Redis does not delay
//! acknowledgements. Because one appender per partition appends the batches in commit order,
//! this process never appends a partition out of order. The work runs in the tasks, so a caller
//! that goes away after the commit still gets its event appended.

use std::sync::Arc;
use std::time::Duration;

use notify_proto::log::LogWriter;
use notify_proto::pb::{Event, PublishResponse};
use notify_proto::telemetry::throttle::{self, LogThrottle};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::metrics::{Metrics, operation};
use crate::relay::Lanes;
use crate::spans;
use crate::store::{NewEvent, Outcome, Store};

/// Maximum number of requests committed in one transaction.
pub const MAX_BATCH: usize = 256;

/// Committed batches waiting for their partition's appender. When the queue is full, because
/// the stream is slow, the committer hands the partition to the relay, which appends from the
/// store, and never waits. Each waiting batch holds at most [`MAX_BATCH`] events.
pub const APPEND_QUEUE: usize = 2;

/// One warning per interval while commits fail, such as while the store is down.
static COMMIT_FAILED_LOG: LogThrottle = LogThrottle::new(throttle::DEFAULT_INTERVAL);
/// One warning per interval while appends fail, such as while Redis is down.
static APPEND_FAILED_LOG: LogThrottle = LogThrottle::new(throttle::DEFAULT_INTERVAL);
/// One line per interval while the appenders fall behind, such as while Redis is slow.
static APPEND_QUEUE_FULL_LOG: LogThrottle = LogThrottle::new(throttle::DEFAULT_INTERVAL);

/// A publish request waiting in a partition's queue.
struct Request {
    event: NewEvent,
    /// Receives the response. Dropped without a response only when the committer is aborted at
    /// the end of the shutdown grace period, which the caller sees as [`Error::ShuttingDown`].
    reply: oneshot::Sender<Result<PublishResponse, Error>>,
    /// The call's `publish` span while spans are exported, otherwise a disabled span.
    span: tracing::Span,
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
        let span = spans::for_committer();
        queue
            .try_send(Request { event, reply, span })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => Error::QueueFull { partition },
                mpsc::error::TrySendError::Closed(_) => Error::ShuttingDown,
            })?;
        response.await.map_err(|_| Error::ShuttingDown)?
    }
}

/// Read-only view of the publish queues' depth, for the metrics. It does not keep the queues
/// open: once every [`Publisher`] is gone, the queues count as empty.
#[derive(Debug)]
pub struct QueueWatch {
    queues: Vec<mpsc::WeakSender<Request>>,
    capacity: usize,
}

impl QueueWatch {
    /// Returns the number of requests waiting in each partition's queue.
    pub fn depths(&self) -> Vec<usize> {
        self.queues
            .iter()
            .map(|queue| {
                queue
                    .upgrade()
                    .map_or(0, |queue| queue.max_capacity() - queue.capacity())
            })
            .collect()
    }

    /// Returns the capacity of each partition's queue.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Publisher {
    /// Returns a view of the queues' depth that does not keep them open.
    pub fn watch(&self) -> QueueWatch {
        QueueWatch {
            queues: self.queues.iter().map(mpsc::Sender::downgrade).collect(),
            capacity: self.queues.first().map_or(0, mpsc::Sender::max_capacity),
        }
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
    /// Counters of failed commits and appends.
    pub metrics: Metrics,
}

impl Committers {
    /// Starts one committer per partition on `tracker` and returns the handle that feeds them.
    /// Cancelling `abort` makes them drop what is still queued and stop.
    pub fn spawn(self, tracker: &TaskTracker, abort: &CancellationToken) -> Publisher {
        let queues = (0..self.store.partitions())
            .map(|partition| {
                let (queue_tx, queue_rx) = mpsc::channel(self.publish_queue.max(1));
                let (appends_tx, appends_rx) = mpsc::channel(APPEND_QUEUE);
                let committer = Committer {
                    partition,
                    queue: queue_rx,
                    store: self.store.clone(),
                    appends: appends_tx,
                    lanes: Arc::clone(&self.lanes),
                    idempotency_window: self.idempotency_window,
                    metrics: self.metrics.clone(),
                };
                let appender = Appender {
                    partition,
                    batches: appends_rx,
                    log: Arc::clone(&self.log),
                    lanes: Arc::clone(&self.lanes),
                    metrics: self.metrics.clone(),
                };
                tracker.spawn(committer.run(abort.clone()));
                tracker.spawn(appender.run(abort.clone()));
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
    /// The partition's appender. Dropping it, when the committer stops, lets the appender
    /// append what is queued and stop.
    appends: mpsc::Sender<Vec<Event>>,
    lanes: Arc<Lanes>,
    idempotency_window: Duration,
    metrics: Metrics,
}

impl Committer {
    async fn run(mut self, abort: CancellationToken) {
        while let Some(batch) = self.next_batch(&abort).await {
            let parents = batch.iter().map(|request| &request.span);
            let commit_spans = spans::commit(parents, self.partition, batch.len());
            let events = self.commit(batch).await;
            drop(commit_spans);
            self.hand_over(events);
        }
    }

    /// Queues committed events for the appender unless the relay owns the partition. When the
    /// appender's queue is full, the partition goes to the relay, which appends these events from
    /// the store, so that the next commit does not wait for the stream.
    fn hand_over(&self, events: Vec<Event>) {
        let Some(newest) = events.last() else {
            return;
        };
        if !self.lanes.committed(self.partition, newest.seq) {
            return;
        }
        match self.appends.try_send(events) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if let Some(suppressed) = APPEND_QUEUE_FULL_LOG.allow() {
                    tracing::info!(
                        partition = self.partition,
                        suppressed,
                        "append queue full; the relay takes over"
                    );
                }
                self.lanes.append_failed(self.partition);
            }
            // The appender stopped on abort; the relay's last sweep appends what it can.
            Err(mpsc::error::TrySendError::Closed(_)) => self.lanes.append_failed(self.partition),
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
                if let Some(suppressed) = COMMIT_FAILED_LOG.allow() {
                    tracing::warn!(partition = self.partition, batch = events.len(), suppressed, error = %err, "commit failed");
                }
                self.metrics.store_error(operation::COMMIT);
                for reply in replies {
                    let _ = reply.send(Err(Error::StoreUnavailable));
                }
                Vec::new()
            }
        }
    }
}

/// Appends one partition's committed batches in commit order.
struct Appender {
    partition: u32,
    /// Batches from the committer; capacity [`APPEND_QUEUE`].
    batches: mpsc::Receiver<Vec<Event>>,
    log: Arc<dyn LogWriter>,
    lanes: Arc<Lanes>,
    metrics: Metrics,
}

impl Appender {
    /// Appends batches until the committer stops and the queue is empty, or until `abort`.
    async fn run(mut self, abort: CancellationToken) {
        loop {
            let events = tokio::select! {
                events = self.batches.recv() => match events {
                    Some(events) => events,
                    None => return,
                },
                () = abort.cancelled() => return,
            };
            let append_spans = spans::append(&events, self.partition);
            self.append(&events).await;
            drop(append_spans);
        }
    }

    /// Appends committed events unless the relay took the partition over after they were
    /// queued; the relay then appends them from the store. On failure the partition goes to the
    /// relay.
    async fn append(&self, events: &[Event]) {
        if self.lanes.relay_owns(self.partition) {
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
                if let Some(suppressed) = APPEND_FAILED_LOG.allow() {
                    tracing::warn!(partition = self.partition, suppressed, error = %err, "append failed; the relay takes over");
                }
                self.metrics.stream_error(operation::APPEND);
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
