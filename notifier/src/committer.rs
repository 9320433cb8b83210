//! The committers and the appenders. A notifier runs `COMMIT_CONCURRENCY` committer tasks (one by
//! default), and committer `i` takes the partitions `p` with `p % committers == i`. A committer
//! takes the waiting publish requests of all its partitions as one batch, commits them in one
//! transaction and replies to each request. It then hands each partition's new events to that
//! partition's appender task, which appends them to the partition's stream with one call. Paying
//! the transaction once per batch instead of once per partition and batch is what lets the store
//! keep up with many partitions at once.
//!
//! The committer never waits for the stream, so a slow or frozen Redis does not delay
//! acknowledgements. Each partition has one committer, which commits its batches one after the
//! other, and one appender, which appends them in that order, so this process never appends a
//! partition out of order. The work runs in the tasks, so a caller that goes away after the
//! commit still gets its event appended.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Maximum number of requests committed in one transaction, over all of a committer's
/// partitions.
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

/// A publish request waiting in a committer's queue.
struct Request {
    partition: u32,
    event: NewEvent,
    /// Receives the response. Dropped without a response only when the committer is aborted at
    /// the end of the shutdown grace period, which the caller sees as [`Error::ShuttingDown`].
    reply: oneshot::Sender<Result<PublishResponse, Error>>,
    /// The call's `publish` span while spans are exported, otherwise a disabled span.
    span: tracing::Span,
}

/// Number of requests waiting for each partition, so that each partition's share of its
/// committer's queue stays bounded.
#[derive(Debug)]
struct Depths {
    waiting: Box<[AtomicUsize]>,
    /// Maximum number of waiting requests per partition.
    capacity: usize,
}

impl Depths {
    /// Counts a request for `partition` unless the partition already has `capacity` waiting.
    fn admit(&self, partition: u32) -> bool {
        let Some(waiting) = self.waiting.get(partition as usize) else {
            return false;
        };
        waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
                (count < self.capacity).then_some(count + 1)
            })
            .is_ok()
    }

    /// Uncounts a request that left the queue or never entered it.
    fn release(&self, partition: u32) {
        if let Some(waiting) = self.waiting.get(partition as usize) {
            waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Hands publish requests to the committers.
///
/// Each partition may have `publish_queue` requests waiting. When it has, `publish` fails at once
/// with [`Error::QueueFull`] and never waits. The queues close when the last clone of the
/// `Publisher` is dropped. Each committer then commits what is queued and stops.
#[derive(Clone, Debug)]
pub struct Publisher {
    /// One queue per committer; partition `p` goes to queue `p % queues.len()`.
    queues: Arc<[mpsc::Sender<Request>]>,
    depths: Arc<Depths>,
}

impl Publisher {
    /// Queues an event for its partition's committer and waits for the commit.
    ///
    /// # Errors
    /// [`Error::QueueFull`] when the partition's queue is full, [`Error::IdempotencyConflict`]
    /// when the key was used for other content, [`Error::StoreUnavailable`] when the commit
    /// failed, and [`Error::ShuttingDown`] when the committer has stopped.
    pub async fn publish(&self, partition: u32, event: NewEvent) -> Result<PublishResponse, Error> {
        self.submit(partition, event)?.committed().await
    }

    /// Queues an event for its partition's committer without waiting for the commit. Events
    /// queued one after the other for one partition are committed in that order.
    ///
    /// # Errors
    /// [`Error::QueueFull`] when the partition's queue is full and [`Error::ShuttingDown`] when
    /// the committer has stopped; the commit's own errors come from [`Queued::committed`].
    pub fn submit(&self, partition: u32, event: NewEvent) -> Result<Queued, Error> {
        if partition as usize >= self.depths.waiting.len() || self.queues.is_empty() {
            return Err(Error::ShuttingDown);
        }
        if !self.depths.admit(partition) {
            return Err(Error::QueueFull { partition });
        }
        let queue = &self.queues[partition as usize % self.queues.len()];
        let (reply, response) = oneshot::channel();
        let span = spans::for_committer();
        let request = Request {
            partition,
            event,
            reply,
            span,
        };
        if let Err(err) = queue.try_send(request) {
            self.depths.release(partition);
            return Err(match err {
                mpsc::error::TrySendError::Full(_) => Error::QueueFull { partition },
                mpsc::error::TrySendError::Closed(_) => Error::ShuttingDown,
            });
        }
        Ok(Queued { response })
    }

    /// Returns a view of the queues' depth that does not keep them open.
    pub fn watch(&self) -> QueueWatch {
        QueueWatch {
            queues: self.queues.iter().map(mpsc::Sender::downgrade).collect(),
            depths: Arc::clone(&self.depths),
        }
    }
}

/// An event in its committer's queue. The committer does its work whether or not this is
/// awaited: dropping it does not withdraw the event.
#[derive(Debug)]
pub struct Queued {
    response: oneshot::Receiver<Result<PublishResponse, Error>>,
}

impl Queued {
    /// Waits for the commit of the event.
    ///
    /// # Errors
    /// [`Error::IdempotencyConflict`] when the key was used for other content,
    /// [`Error::StoreUnavailable`] when the commit failed, and [`Error::ShuttingDown`] when the
    /// committer stopped before it replied.
    pub async fn committed(self) -> Result<PublishResponse, Error> {
        self.response.await.map_err(|_| Error::ShuttingDown)?
    }
}

/// Read-only view of the publish queues' depth, for the metrics. It does not keep the queues
/// open: once every [`Publisher`] is gone, the queues count as empty.
#[derive(Debug)]
pub struct QueueWatch {
    queues: Vec<mpsc::WeakSender<Request>>,
    depths: Arc<Depths>,
}

impl QueueWatch {
    /// Returns the number of requests waiting for each partition.
    pub fn depths(&self) -> Vec<usize> {
        let open = self.queues.iter().any(|queue| queue.upgrade().is_some());
        self.depths
            .waiting
            .iter()
            .map(|waiting| if open { waiting.load(Ordering::Relaxed) } else { 0 })
            .collect()
    }

    /// Returns the number of requests each partition may have waiting.
    pub fn capacity(&self) -> usize {
        self.depths.capacity
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
    /// Number of requests each partition may have waiting.
    pub publish_queue: usize,
    /// Number of committers, each with its own transactions; capped at the partitions and at
    /// [`Store::max_commit_concurrency`].
    pub committers: usize,
    /// How long idempotency keys are remembered.
    pub idempotency_window: Duration,
    /// Counters of failed commits and appends.
    pub metrics: Metrics,
}

impl Committers {
    /// Starts the committers and one appender per partition on `tracker`, and returns the
    /// handle that feeds them. Cancelling `abort` makes them drop what is still queued and stop.
    pub fn spawn(self, tracker: &TaskTracker, abort: &CancellationToken) -> Publisher {
        let partitions = self.store.partitions() as usize;
        let committers = self
            .committers
            .min(self.store.max_commit_concurrency())
            .min(partitions)
            .max(1);
        let capacity = self.publish_queue.max(1);
        let depths = Arc::new(Depths {
            waiting: (0..partitions).map(|_| AtomicUsize::new(0)).collect(),
            capacity,
        });
        let appends: Arc<[_]> = (0..partitions)
            .map(|partition| self.spawn_appender(partition as u32, tracker, abort))
            .collect();
        let queues = (0..committers)
            .map(|index| {
                let owned = (index..partitions).step_by(committers).count();
                let (queue_tx, queue_rx) = mpsc::channel(capacity.saturating_mul(owned).max(1));
                let committer = Committer {
                    queue: queue_rx,
                    depths: Arc::clone(&depths),
                    store: self.store.clone(),
                    appends: Arc::clone(&appends),
                    lanes: Arc::clone(&self.lanes),
                    idempotency_window: self.idempotency_window,
                    metrics: self.metrics.clone(),
                };
                tracker.spawn(committer.run(abort.clone()));
                queue_tx
            })
            .collect();
        Publisher { queues, depths }
    }

    /// Starts a partition's appender and returns its queue.
    fn spawn_appender(
        &self,
        partition: u32,
        tracker: &TaskTracker,
        abort: &CancellationToken,
    ) -> mpsc::Sender<Vec<Event>> {
        let (appends_tx, appends_rx) = mpsc::channel(APPEND_QUEUE);
        let appender = Appender {
            partition,
            batches: appends_rx,
            log: Arc::clone(&self.log),
            lanes: Arc::clone(&self.lanes),
            metrics: self.metrics.clone(),
        };
        tracker.spawn(appender.run(abort.clone()));
        appends_tx
    }
}

struct Committer {
    queue: mpsc::Receiver<Request>,
    depths: Arc<Depths>,
    store: Store,
    /// Every partition's appender, indexed by partition. When the last committer stops, the
    /// queues close, and each appender appends what is queued and stops.
    appends: Arc<[mpsc::Sender<Vec<Event>>]>,
    lanes: Arc<Lanes>,
    idempotency_window: Duration,
    metrics: Metrics,
}

impl Committer {
    async fn run(mut self, abort: CancellationToken) {
        while let Some(batch) = self.next_batch(&abort).await {
            let parents = batch.iter().map(|request| (&request.span, request.partition));
            let commit_spans = spans::commit(parents, batch.len());
            let events = self.commit(batch).await;
            drop(commit_spans);
            self.hand_over(events);
        }
    }

    /// Hands each partition's committed events, sorted by partition, to its appender.
    fn hand_over(&self, events: Vec<Event>) {
        let mut events = events.into_iter().peekable();
        while let Some(first) = events.next() {
            let partition = first.partition;
            let mut run = vec![first];
            while let Some(next) = events.next_if(|event| event.partition == partition) {
                run.push(next);
            }
            self.hand_over_partition(partition, run);
        }
    }

    /// Queues one partition's committed events for its appender unless the relay owns the
    /// partition. When the appender's queue is full, the partition goes to the relay, which
    /// appends these events from the store, so that the next commit does not wait for the
    /// stream.
    fn hand_over_partition(&self, partition: u32, events: Vec<Event>) {
        let Some(newest) = events.last() else {
            return;
        };
        if !self.lanes.committed(partition, newest.seq) {
            return;
        }
        let Some(appends) = self.appends.get(partition as usize) else {
            self.lanes.append_failed(partition);
            return;
        };
        match appends.try_send(events) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if let Some(suppressed) = APPEND_QUEUE_FULL_LOG.allow() {
                    tracing::info!(partition, suppressed, "append queue full; the relay takes over");
                }
                self.lanes.append_failed(partition);
            }
            // The appender stopped on abort; the relay's last sweep appends what it can.
            Err(mpsc::error::TrySendError::Closed(_)) => self.lanes.append_failed(partition),
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
        for request in &batch {
            self.depths.release(request.partition);
        }
        Some(batch)
    }

    /// Commits a batch and replies to every request. Returns the events to append, sorted by
    /// partition.
    async fn commit(&self, batch: Vec<Request>) -> Vec<Event> {
        let (events, replies): (Vec<NewEvent>, Vec<_>) =
            batch.into_iter().map(|request| (request.event, request.reply)).unzip();
        match self.store.commit(&events, self.idempotency_window).await {
            Ok(committed) => {
                for (outcome, reply) in committed.outcomes.into_iter().zip(replies) {
                    // A caller that went away no longer needs its response.
                    let _ = reply.send(response(outcome));
                }
                committed.events
            }
            Err(err) => {
                if let Some(suppressed) = COMMIT_FAILED_LOG.allow() {
                    tracing::warn!(batch = events.len(), suppressed, error = %err, "commit failed");
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
