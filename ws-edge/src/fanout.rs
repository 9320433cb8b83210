//! The stream reader: a few tasks, each reading a group of partitions with one blocking read,
//! that hand every event to the [`Hub`] in sequence order, with no gap and no duplicate.
//!
//! Each partition has a cursor, the last sequence number delivered. An event at cursor + 1 is
//! delivered, and an event at or below the cursor is a duplicate and dropped. An event further
//! ahead reveals a gap, because two notifiers appended out of commit order or Redis lost entries.
//! The gap is filled from the store before the event is delivered.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use notify_proto::frame::{self, FrameOptions};
use notify_proto::history::{HistoryStore, MAX_PAGE};
use notify_proto::log::{Cursor, LogReader};
use notify_proto::pb::Event;
use notify_proto::telemetry::throttle::{self, LogThrottle};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::delivery_trace::DeliveryTrace;
use crate::hub::{Delivery, Hub};
use crate::metrics::operation;

/// Number of reader tasks; partitions are spread over them round-robin.
pub const READERS: u32 = 4;
/// Time one stream read waits for new events.
pub const READ_BLOCK: Duration = Duration::from_secs(5);
/// Maximum events one read returns per partition.
pub const READ_COUNT: usize = 512;
/// Time a partition may go without a successful read after a failed one before the edge
/// reports itself not ready. A partition whose reads neither succeed nor fail (a hung
/// connection) becomes not ready after [`READ_BLOCK`] plus this time.
pub const UNREADY_AFTER: Duration = Duration::from_secs(5);

/// Encodes an event for delivery, once for every recipient.
///
/// An event whose payload is not JSON (which the notifier's validation rules out) is logged and
/// replaced by a placeholder with an empty channel, which no subscription matches, so that the
/// partition's sequence stays contiguous.
pub fn encode(event: Event) -> Delivery {
    encode_with(event, FrameOptions::default())
}

/// Encodes an event like [`encode`], with the optional frame fields of `options`.
pub fn encode_with(event: Event, options: FrameOptions) -> Delivery {
    match frame::encode_event_with(&event, options) {
        Ok(text) => Delivery {
            trace: DeliveryTrace::start(&event),
            seq: event.seq,
            channel: event.channel,
            user_id: event.user_id,
            frame: text.into(),
            committed_ms: event.ts_ms,
        },
        Err(err) => {
            if let Some(suppressed) = INVALID_PAYLOAD_LOG.allow() {
                tracing::warn!(partition = event.partition, seq = event.seq, suppressed, error = %err, "event payload is not JSON; not delivered");
            }
            Delivery {
                seq: event.seq,
                channel: String::new(),
                user_id: String::new(),
                frame: Default::default(),
                trace: None,
                committed_ms: event.ts_ms,
            }
        }
    }
}

/// One warning per interval about events whose payload is not JSON.
static INVALID_PAYLOAD_LOG: LogThrottle = LogThrottle::new(throttle::DEFAULT_INTERVAL);

/// Reads every partition from the stream and delivers to the hub.
pub struct Fanout {
    hub: Arc<Hub>,
    log: Arc<dyn LogReader>,
    history: Arc<dyn HistoryStore>,
    running: AtomicBool,
    /// Events dropped as duplicates, for the debug log.
    duplicates: AtomicUsize,
    /// Reference point of the times below.
    clock: std::time::Instant,
    /// Per partition: when its last read succeeded (or the reader started), in milliseconds
    /// since `clock`.
    last_read_ms: Box<[AtomicU64]>,
    /// Per partition: whether its last read failed, so that its head may be behind the stream.
    read_failing: Box<[AtomicBool]>,
    /// Optional fields of the event frames.
    frame_options: FrameOptions,
}

impl Fanout {
    /// Creates a reader that delivers to `hub`.
    pub fn new(hub: Arc<Hub>, log: Arc<dyn LogReader>, history: Arc<dyn HistoryStore>) -> Self {
        Self {
            log,
            history,
            running: AtomicBool::new(false),
            duplicates: AtomicUsize::new(0),
            clock: std::time::Instant::now(),
            last_read_ms: (0..hub.partitions()).map(|_| AtomicU64::new(0)).collect(),
            read_failing: (0..hub.partitions()).map(|_| AtomicBool::new(false)).collect(),
            frame_options: FrameOptions::default(),
            hub,
        }
    }

    /// Sets the optional fields of the event frames.
    #[must_use]
    pub fn with_frame_options(mut self, options: FrameOptions) -> Self {
        self.frame_options = options;
        self
    }

    /// Returns whether the readers have loaded their cursors and are reading.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Returns whether the partition's head is as current as the edge can tell: its last read
    /// succeeded. While its reads fail, events may be stored that the edge has not seen, so a
    /// resume cannot know what it missed.
    ///
    /// A partition whose readers have not started yet counts as current. Its head was just
    /// loaded from the store, and a subscriber woken by that head must not be turned away in
    /// the moment before the readers start.
    pub fn is_current(&self, partition: u32) -> bool {
        let failing = self
            .read_failing
            .get(partition as usize)
            .is_some_and(|failing| failing.load(Ordering::Relaxed));
        !failing
    }

    /// Returns whether the edge can deliver: the readers run, and no partition has failed to
    /// read for longer than [`UNREADY_AFTER`] or gone without a read for longer than
    /// [`READ_BLOCK`] plus [`UNREADY_AFTER`].
    pub fn is_healthy(&self) -> bool {
        let now = self.now_ms();
        let grace = UNREADY_AFTER.as_millis() as u64;
        let stalled = grace + READ_BLOCK.as_millis() as u64;
        let unhealthy = self
            .last_read_ms
            .iter()
            .zip(&*self.read_failing)
            .any(|(last, failing)| {
                let age = now.saturating_sub(last.load(Ordering::Relaxed));
                (failing.load(Ordering::Relaxed) && age > grace) || age > stalled
            });
        self.is_running() && !unhealthy
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Records the outcome of a read of these partitions.
    fn record_read(&self, cursors: &[Cursor], succeeded: bool) {
        let now = self.now_ms();
        for cursor in cursors {
            let index = cursor.partition as usize;
            if let Some(failing) = self.read_failing.get(index) {
                failing.store(!succeeded, Ordering::Relaxed);
            }
            if let (true, Some(last)) = (succeeded, self.last_read_ms.get(index)) {
                last.store(now, Ordering::Relaxed);
            }
        }
    }

    /// Loads the cursors from the store's heads, then reads until `shutdown` is cancelled.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(heads) = self.load_heads(&shutdown).await else {
            return;
        };
        let mut readers = JoinSet::new();
        for group in self.groups(&heads) {
            self.record_read(&group, true);
            readers.spawn(self.clone().read_group(group, shutdown.clone()));
        }
        self.running.store(true, Ordering::Relaxed);
        tracing::info!(
            partitions = heads.len(),
            readers = readers.len(),
            "stream reader running"
        );
        while readers.join_next().await.is_some() {}
        self.running.store(false, Ordering::Relaxed);
    }

    /// Returns the store's head of every partition, retrying with [`Backoff`] until the store
    /// responds, or `None` on shutdown.
    async fn load_heads(&self, shutdown: &CancellationToken) -> Option<Vec<u64>> {
        let mut backoff = Backoff::default();
        loop {
            match self.history.heads().await {
                Ok(heads) => return Some(self.fit_heads(heads)),
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "loading partition heads failed");
                    self.hub.metrics().store_error(operation::HEADS);
                    if !sleep_unless_cancelled(delay, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Matches the store's heads to the configured partition count, and starts each partition.
    fn fit_heads(&self, mut heads: Vec<u64>) -> Vec<u64> {
        let partitions = self.hub.partitions() as usize;
        if heads.len() != partitions {
            tracing::warn!(
                store_partitions = heads.len(),
                partitions,
                "the store has another partition count than STREAM_PARTITIONS"
            );
        }
        heads.resize(partitions, 0);
        for (partition, &head) in heads.iter().enumerate() {
            self.hub.jump(partition as u32, head);
        }
        heads
    }

    fn groups(&self, heads: &[u64]) -> Vec<Vec<Cursor>> {
        let count = READERS.min(self.hub.partitions()).max(1) as usize;
        let mut groups = vec![Vec::new(); count];
        for (partition, &after) in heads.iter().enumerate() {
            let cursor = Cursor {
                partition: partition as u32,
                after,
            };
            groups[partition % count].push(cursor);
        }
        groups
    }

    /// Reads a group of partitions until shutdown. A failed read is retried with [`Backoff`] (100 ms
    /// doubling to 5 s, never giving up), from the same cursors.
    async fn read_group(self: Arc<Self>, mut cursors: Vec<Cursor>, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            let read = tokio::select! {
                () = shutdown.cancelled() => return,
                read = self.log.read(&cursors, READ_BLOCK, READ_COUNT) => read,
            };
            match read {
                Ok(events) => {
                    backoff.reset();
                    self.record_read(&cursors, true);
                    self.process(&mut cursors, events, &shutdown).await;
                }
                Err(err) => {
                    self.record_read(&cursors, false);
                    let delay = backoff.next_delay();
                    let partitions: Vec<u32> = cursors.iter().map(|cursor| cursor.partition).collect();
                    tracing::warn!(?partitions, error = %err, retry_in_ms = delay.as_millis() as u64, "stream read failed");
                    self.hub.metrics().stream_error(operation::READ);
                    if !sleep_unless_cancelled(delay, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Delivers the events of one read, partition by partition.
    async fn process(&self, cursors: &mut [Cursor], mut events: Vec<Event>, shutdown: &CancellationToken) {
        // Each partition's events arrive in order; sorting groups the partitions together.
        events.sort_by_key(|event| (event.partition, event.seq));
        let mut events = events.into_iter().peekable();
        while let Some(partition) = events.peek().map(|event| event.partition) {
            let run = std::iter::from_fn(|| events.next_if(|event| event.partition == partition));
            let run: Vec<Event> = run.collect();
            match cursors.iter_mut().find(|cursor| cursor.partition == partition) {
                Some(cursor) => self.process_partition(cursor, run, shutdown).await,
                None => tracing::warn!(partition, "stream returned a partition this reader does not read"),
            }
        }
    }

    /// Delivers one partition's events in order: drops duplicates and fills gaps first.
    async fn process_partition(&self, cursor: &mut Cursor, events: Vec<Event>, shutdown: &CancellationToken) {
        let mut batch = Vec::new();
        for event in events {
            let expected = cursor.after + batch.len() as u64 + 1;
            if event.seq < expected {
                self.count_duplicate(cursor.partition, event.seq);
                continue;
            }
            if event.seq > expected {
                self.deliver(cursor, std::mem::take(&mut batch));
                self.fill_gap(cursor, event.seq - 1, shutdown).await;
                if cursor.after + 1 != event.seq {
                    // Shutdown interrupted the fill; the rest of the read is left undelivered.
                    return;
                }
            }
            batch.push(encode_with(event, self.frame_options));
        }
        self.deliver(cursor, batch);
    }

    fn deliver(&self, cursor: &mut Cursor, batch: Vec<Delivery>) {
        if let Some(last) = batch.last() {
            cursor.after = last.seq;
            self.hub.deliver(cursor.partition, batch);
        }
    }

    fn count_duplicate(&self, partition: u32, seq: u64) {
        let total = self.duplicates.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(
            partition,
            seq,
            duplicates_total = total,
            "dropped duplicate stream event"
        );
    }

    /// Delivers the stored events after the cursor up to `target` (inclusive), reading the store
    /// page by page. Store errors are retried with [`Backoff`] until shutdown. Events the store no
    /// longer keeps are skipped with a warning.
    async fn fill_gap(&self, cursor: &mut Cursor, target: u64, shutdown: &CancellationToken) {
        tracing::debug!(
            partition = cursor.partition,
            after = cursor.after,
            target,
            "filling stream gap from the store"
        );
        let mut backoff = Backoff::default();
        while cursor.after < target {
            let limit = (target - cursor.after).min(u64::from(MAX_PAGE)) as u32;
            match self.history.read_partition(cursor.partition, cursor.after, limit).await {
                Ok(page) => {
                    backoff.reset();
                    self.apply_fill(cursor, page.events, page.oldest, target);
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(partition = cursor.partition, error = %err, retry_in_ms = delay.as_millis() as u64, "gap fill from the store failed");
                    self.hub.metrics().store_error(operation::READ_PARTITION);
                    if !sleep_unless_cancelled(delay, shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Delivers one page of a gap fill. Sequence numbers the store does not hold (removed by
    /// retention, or never stored) are skipped with a warning, up to the next one it holds.
    fn apply_fill(&self, cursor: &mut Cursor, events: Vec<Event>, oldest: u64, target: u64) {
        let start = cursor.after;
        let mut events = events
            .into_iter()
            .filter(|event| event.seq > start && event.seq <= target)
            .peekable();
        let reason = if oldest > start + 1 {
            "removed from the store by retention"
        } else {
            "missing from the store"
        };
        match events.peek().map(|event| event.seq) {
            None => self.skip(cursor, target, reason),
            Some(first) => self.skip(cursor, first - 1, reason),
        }

        let start = cursor.after;
        let batch: Vec<Delivery> = events
            .enumerate()
            .take_while(|(index, event)| event.seq == start + *index as u64 + 1)
            .map(|(_, event)| encode_with(event, self.frame_options))
            .collect();
        self.deliver(cursor, batch);
    }

    fn skip(&self, cursor: &mut Cursor, to: u64, reason: &str) {
        if to <= cursor.after {
            return;
        }
        tracing::warn!(
            partition = cursor.partition,
            from = cursor.after + 1,
            to,
            reason,
            "skipping lost events"
        );
        cursor.after = to;
        self.hub.jump(cursor.partition, to);
    }
}

/// Sleeps for `delay`; returns false when `shutdown` is cancelled first.
async fn sleep_unless_cancelled(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;
    use notify_proto::log::{LogError, LogWriter, RangePage};
    use notify_proto::memory::MemoryLog;

    use super::*;
    use crate::hub::tests::socket;
    use crate::hub::{Socket, Subscription};
    use crate::recent::RecentLimits;
    use crate::testing::{VecHistory, event};

    const PATIENCE: Duration = Duration::from_secs(5);

    struct Setup {
        hub: Arc<Hub>,
        log: Arc<MemoryLog>,
        history: Arc<VecHistory>,
        shutdown: CancellationToken,
    }

    impl Setup {
        fn new(history: VecHistory) -> Self {
            Self {
                hub: Arc::new(Hub::new(1, RecentLimits::default())),
                log: Arc::new(MemoryLog::new(1, 100)),
                history: Arc::new(history),
                shutdown: CancellationToken::new(),
            }
        }

        fn fanout(&self, log: Arc<dyn LogReader>) -> Arc<Fanout> {
            Arc::new(Fanout::new(self.hub.clone(), log, self.history.clone()))
        }

        /// Starts the reader and waits until it has loaded the heads.
        async fn start(&self, log: Arc<dyn LogReader>) {
            tokio::spawn(self.fanout(log).run(self.shutdown.clone()));
            let started = self.hub.wait_for_head(0, 0, PATIENCE).await;
            started.expect("stream reader started");
        }

        /// Subscribes a live socket to `channel`.
        fn subscribe(&self, channel: &str) -> Arc<Socket> {
            let alice = socket("alice");
            let subscription = Arc::new(Subscription::new(alice.clone(), channel.into(), 0));
            let registration = self.hub.register(&subscription, None).expect("partition started");
            subscription.go_live(registration.head);
            alice
        }

        async fn append(&self, seqs: &[u64]) {
            let events: Vec<Event> = seqs.iter().map(|&seq| event(0, seq, "news")).collect();
            LogWriter::append(&*self.log, 0, &events)
                .await
                .expect("partition exists");
        }
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    /// Waits until the socket received `count` frames and returns their positions.
    async fn positions(socket: &Socket, count: usize) -> Vec<u64> {
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while frames.len() < count && tokio::time::Instant::now() < deadline {
            socket.queue.drain_into(&mut frames);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        socket.queue.drain_into(&mut frames);
        let position = |frame: &tokio_tungstenite::tungstenite::Utf8Bytes| {
            let value: serde_json::Value = serde_json::from_str(frame.as_str()).expect("frame is JSON");
            value["position"].as_u64().expect("frame has a position")
        };
        frames.iter().map(position).collect()
    }

    #[tokio::test]
    async fn events_are_delivered_in_order() {
        let setup = Setup::new(VecHistory::default());
        setup.start(setup.log.clone()).await;
        let alice = setup.subscribe("news");
        setup.append(&[1, 2, 3]).await;
        assert_eq!(positions(&alice, 3).await, [1, 2, 3]);
        assert_eq!(setup.hub.head(0), Some(3));
    }

    #[tokio::test]
    async fn gap_is_filled_from_store() {
        let setup = Setup::new(VecHistory::default());
        setup.start(setup.log.clone()).await;
        let alice = setup.subscribe("news");

        // Events 1 to 4 are committed, but 2 and 3 never reach the stream: another notifier
        // appended 4 first.
        setup.history.push((1..=4).map(|seq| event(0, seq, "news")));
        setup.append(&[1, 4]).await;
        assert_eq!(positions(&alice, 4).await, [1, 2, 3, 4]);
        assert_eq!(setup.history.reads.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn duplicates_are_dropped() {
        let setup = Setup::new(VecHistory::default());
        setup.hub.jump(0, 2);
        let alice = setup.subscribe("news");
        let fanout = setup.fanout(setup.log.clone());
        let mut cursor = Cursor { partition: 0, after: 2 };
        let events = [1, 3, 3, 2, 4].map(|seq| event(0, seq, "news")).to_vec();
        fanout.process_partition(&mut cursor, events, &setup.shutdown).await;
        assert_eq!(cursor.after, 4);
        assert_eq!(positions(&alice, 2).await, [3, 4]);
    }

    #[tokio::test]
    async fn events_gone_from_store_are_skipped() {
        let history = VecHistory::new((1..=6).map(|seq| event(0, seq, "news")).collect());
        history.trim_below(5);
        let setup = Setup::new(history);
        setup.hub.jump(0, 2);
        let alice = setup.subscribe("news");
        let fanout = setup.fanout(setup.log.clone());
        let mut cursor = Cursor { partition: 0, after: 2 };
        fanout
            .process_partition(&mut cursor, vec![event(0, 6, "news")], &setup.shutdown)
            .await;
        assert_eq!(positions(&alice, 2).await, [5, 6]);
        assert_eq!(setup.hub.head(0), Some(6));
    }

    /// A stream that fails its first reads, as Redis does while it is down.
    struct FlakyLog {
        inner: Arc<MemoryLog>,
        failures_left: AtomicUsize,
    }

    #[async_trait]
    impl LogReader for FlakyLog {
        async fn read(&self, cursors: &[Cursor], block: Duration, count: usize) -> Result<Vec<Event>, LogError> {
            let failing = self
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1));
            if failing.is_ok() {
                return Err(LogError::Unavailable("connection refused".into()));
            }
            self.inner.read(cursors, block, count).await
        }

        async fn range(&self, partition: u32, after: u64, limit: usize) -> Result<RangePage, LogError> {
            self.inner.range(partition, after, limit).await
        }

        async fn last_seq(&self, partition: u32) -> Result<u64, LogError> {
            LogReader::last_seq(&*self.inner, partition).await
        }
    }

    #[tokio::test]
    async fn failed_reads_resume_from_cursor() {
        let setup = Setup::new(VecHistory::default());
        let flaky = Arc::new(FlakyLog {
            inner: setup.log.clone(),
            failures_left: AtomicUsize::new(2),
        });
        setup.append(&[1, 2]).await;
        setup.start(flaky.clone()).await;
        let alice = setup.subscribe("news");
        setup.append(&[3]).await;
        // The store's head was 0, so the reader resumes from 0 once the stream responds.
        assert_eq!(positions(&alice, 3).await, [1, 2, 3]);
        assert_eq!(flaky.failures_left.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn invalid_payload_keeps_sequence() {
        let mut bad = event(0, 9, "news");
        bad.data = "{not json".into();
        let delivery = encode(bad);
        assert_eq!(delivery.seq, 9);
        assert!(delivery.channel.is_empty());
    }
}
