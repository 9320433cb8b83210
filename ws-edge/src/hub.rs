//! The local subscribers of each channel, grouped by stream partition.
//!
//! Each partition has one shard: its head (the last sequence number the edge delivered), its
//! channels' subscribers and its [`Recent`] window, behind one mutex. Delivering an event,
//! registering a subscription and reading the head all take that mutex, so a new subscription
//! receives exactly the events after the head sent in its `subscribed` frame. The lock is never
//! held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use notify_proto::channel::partition_of;
use notify_proto::protocol::close;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::conflate::Conflation;
use crate::delivery_trace::DeliveryTrace;
use crate::metrics::Metrics;
use crate::outbound::{Ending, Outbound, Pushed, QueueLimits};
use crate::recent::{Recent, RecentLimits};

/// An event encoded once for every recipient.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Sequence number in the partition, which is the event's position.
    pub seq: u64,
    /// Channel name.
    pub channel: String,
    /// Target user; empty when every subscriber receives it.
    pub user_id: String,
    /// The event frame, shared by every socket that receives it.
    pub frame: Utf8Bytes,
    /// The event's `deliver` span, while spans are exported. The hub takes it before the
    /// delivery goes into the recent window, so a replay never holds the span open.
    pub trace: Option<Arc<DeliveryTrace>>,
    /// When the event was committed, in milliseconds since the Unix epoch (the event's `ts_ms`).
    pub committed_ms: i64,
}

/// Outcome of [`Subscription::offer`] for an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offered {
    /// Queued to the socket, or buffered while the subscription recovers.
    Queued,
    /// Queued to a socket whose queue was empty, which the caller writes after its lock.
    ToWrite,
    /// Queued, replacing an older frame with the same conflation key.
    Replaced,
    /// Not for this socket, or dropped.
    Skipped,
}

impl Delivery {
    /// Returns whether a socket of `user_id` may receive the event.
    pub fn is_for(&self, user_id: &str) -> bool {
        self.user_id.is_empty() || self.user_id == user_id
    }

    /// Returns the bytes the delivery holds, for the [`Recent`] byte limit.
    pub fn size(&self) -> usize {
        self.frame.len() + self.channel.len() + self.user_id.len()
    }
}

/// The hub's handle of one authenticated socket: its ids and its outbound queue.
pub struct Socket {
    /// Connection id, as sent in the `connected` frame.
    pub conn_id: String,
    /// The token's `sub`.
    pub user_id: String,
    /// The socket's outbound queue, which writes to it.
    pub queue: Arc<Outbound>,
}

/// One socket's subscription to one channel.
///
/// It starts recovering: live events are buffered while the session sends `subscribed` and any
/// replay, then [`Subscription::go_live`] flushes the buffer and later events go straight to the
/// socket's queue. The buffer has the capacity of the socket's queue; overflow closes the socket
/// with 4008, and the client resumes with `since`.
pub struct Subscription {
    socket: Arc<Socket>,
    channel: String,
    partition: u32,
    buffer_limits: QueueLimits,
    state: Mutex<State>,
}

enum State {
    Recovering(Buffer),
    Live,
    Removed,
}

#[derive(Default)]
struct Buffer {
    events: VecDeque<(u64, Utf8Bytes)>,
    bytes: usize,
}

impl Subscription {
    /// Creates a recovering subscription of `socket` to `channel` in `partition`.
    pub fn new(socket: Arc<Socket>, channel: String, partition: u32) -> Self {
        let buffer_limits = socket.queue.limits();
        Self {
            socket,
            channel,
            partition,
            buffer_limits,
            state: Mutex::new(State::Recovering(Buffer::default())),
        }
    }

    /// Returns the channel name.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Returns the channel's partition.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Returns the socket's user id.
    pub fn user_id(&self) -> &str {
        &self.socket.user_id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame for the socket while the subscription recovers, such as `subscribed` or a
    /// replayed event. Returns false when the subscription was removed or the socket is closing.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        if matches!(*self.lock(), State::Removed) {
            return false;
        }
        self.socket.queue.push(frame).is_ok()
    }

    /// Queues a replayed frame once the socket's queue has room for it (see
    /// [`Outbound::wait_for_room`]), waiting at most `patience`. A client that reads nothing for
    /// that long is a slow consumer: the push may then overflow and close the socket with 4008.
    /// Returns false when the subscription was removed or the socket is closing.
    pub async fn send_paced(&self, frame: Utf8Bytes, patience: Duration) -> bool {
        let room = self.socket.queue.wait_for_room(frame.len());
        // On timeout the push below decides: it fits, or it overflows as for any slow consumer.
        let _ = tokio::time::timeout(patience, room).await;
        self.send(frame)
    }

    /// Flushes the events buffered during recovery whose sequence number is above `replayed`
    /// (the last position the replay covered), then sends later events straight to the socket.
    pub fn go_live(&self, replayed: u64) {
        let mut state = self.lock();
        let State::Recovering(buffer) = std::mem::replace(&mut *state, State::Live) else {
            return;
        };
        for (seq, frame) in buffer.events {
            if seq > replayed && self.socket.queue.push(frame).is_err() {
                *state = State::Removed;
                return;
            }
        }
    }

    /// Stops all delivery to this subscription.
    pub fn remove(&self) {
        *self.lock() = State::Removed;
    }

    /// Offers a delivered event: queues, buffers or drops it according to the state. A live
    /// subscription passes the event's conflation key to the socket's queue, and counts itself
    /// in the event's delivery span when it has one. The frame is not written yet: for
    /// [`Offered::ToWrite`], the caller calls the queue's `write_now`.
    fn offer(&self, delivery: &Delivery, key: Option<&Arc<str>>, trace: Option<&Arc<DeliveryTrace>>) -> Offered {
        if !delivery.is_for(&self.socket.user_id) {
            return Offered::Skipped;
        }
        let mut state = self.lock();
        match &mut *state {
            State::Live => match self.socket.queue.push_deferred(
                delivery.frame.clone(),
                key.cloned(),
                trace.map(DeliveryTrace::frame),
            ) {
                Ok((Pushed::Queued, true)) => Offered::ToWrite,
                Ok((Pushed::Queued, false)) => Offered::Queued,
                Ok((Pushed::Replaced, _)) => Offered::Replaced,
                Err(_) => {
                    *state = State::Removed;
                    Offered::Skipped
                }
            },
            State::Recovering(buffer) => {
                if let Some(trace) = trace {
                    trace.count_buffered();
                }
                if self.buffer(buffer, delivery) {
                    Offered::Queued
                } else {
                    *state = State::Removed;
                    Offered::Skipped
                }
            }
            State::Removed => Offered::Skipped,
        }
    }

    fn buffer(&self, buffer: &mut Buffer, delivery: &Delivery) -> bool {
        let size = delivery.frame.len();
        // As in the socket's queue, one frame larger than the byte limit fits in an empty buffer.
        let bytes_fit = buffer.bytes + size <= self.buffer_limits.bytes || buffer.events.is_empty();
        let fits = buffer.events.len() < self.buffer_limits.frames && bytes_fit;
        if !fits {
            // The buffered frames and this one are lost; the session counts them at its end.
            self.socket.queue.add_dropped(buffer.events.len() + 1);
            buffer.events.clear();
            self.socket
                .queue
                .end(Ending::Close(close::SLOW_CONSUMER, "recovery buffer full"));
            return false;
        }
        buffer.bytes += size;
        buffer.events.push_back((delivery.seq, delivery.frame.clone()));
        true
    }
}

/// Error of a head lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The stream reader has not loaded the partition's head yet.
    #[error("the stream reader is not running yet")]
    NotReady,
    /// The requested position is above the head.
    #[error("position is ahead of the stream, whose head is {head}")]
    Behind {
        /// The partition's head.
        head: u64,
    },
}

/// A registered subscription's starting point.
#[derive(Debug)]
pub struct Registration {
    /// The partition's head at registration; later events reach the subscription.
    pub head: u64,
    /// When `since` was given and the recent window covers it: the channel's frames in
    /// `(since, head]`. `None` means the replay needs the stream or the store.
    pub recent: Option<Vec<Utf8Bytes>>,
}

/// The local subscribers of every channel, one shard per partition.
pub struct Hub {
    shards: Vec<Shard>,
    conflation: Conflation,
    metrics: Arc<Metrics>,
}

struct Shard {
    state: Mutex<ShardState>,
    /// The head after each delivered batch, for subscribers waiting for the reader to catch up.
    head_tx: watch::Sender<Option<u64>>,
}

struct ShardState {
    head: Option<u64>,
    /// Subscribers per channel. Capacity: bounded by the sockets times their subscription limit;
    /// a channel's entry is removed with its last subscriber.
    channels: HashMap<String, Vec<Arc<Subscription>>>,
    recent: Recent,
}

impl Hub {
    /// Creates a hub for `partitions` partitions, none started.
    pub fn new(partitions: u32, recent: RecentLimits) -> Self {
        let shards = (0..partitions.max(1))
            .map(|_| Shard {
                state: Mutex::new(ShardState {
                    head: None,
                    channels: HashMap::new(),
                    recent: Recent::new(recent),
                }),
                head_tx: watch::Sender::new(None),
            })
            .collect();
        Self {
            shards,
            conflation: Conflation::default(),
            metrics: Arc::new(Metrics::new(partitions.max(1))),
        }
    }

    /// Sets which channels are conflated.
    #[must_use]
    pub fn with_conflation(mut self, conflation: Conflation) -> Self {
        self.conflation = conflation;
        self
    }

    /// Records deliveries, subscriptions and drops in `metrics`; without this call they go to
    /// metrics no registry reads.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Returns the metrics the hub records in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Returns the number of partitions.
    pub fn partitions(&self) -> u32 {
        self.shards.len() as u32
    }

    /// Returns the partition of a channel.
    pub fn partition_of(&self, channel: &str) -> u32 {
        partition_of(channel, self.partitions())
    }

    fn shard(&self, partition: u32) -> &Shard {
        // Partitions come from `partition_of` or from the reader's cursors, both below `partitions`.
        &self.shards[partition as usize % self.shards.len()]
    }

    fn lock(&self, partition: u32) -> MutexGuard<'_, ShardState> {
        // Every critical section leaves the state consistent, so a poisoned lock is still usable.
        self.shard(partition)
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns the partition's head, or `None` before the reader started it.
    pub fn head(&self, partition: u32) -> Option<u64> {
        self.lock(partition).head
    }

    /// Moves the partition's head to `seq` without delivering anything: when the reader starts,
    /// and when events are lost for good. The recent window starts over.
    pub fn jump(&self, partition: u32, seq: u64) {
        let mut state = self.lock(partition);
        state.head = Some(seq);
        state.recent.clear();
        drop(state);
        self.shard(partition).head_tx.send_replace(Some(seq));
    }

    /// Delivers consecutive events of one partition, in sequence order, to the subscribers of
    /// their channels and to the recent window, and advances the head.
    ///
    /// The frames are queued under the shard's lock and written after it, so that the writes do
    /// not hold up subscribes. A socket that gets several events of the batch gets them in one
    /// write.
    pub fn deliver(&self, partition: u32, batch: Vec<Delivery>) {
        let Some(last) = batch.last().map(|delivery| delivery.seq) else {
            return;
        };
        // Spans of events that no socket queued end when dropped, so they wait for the unlock.
        let mut traces = Vec::new();
        self.metrics
            .delivered(partition, batch.iter().map(|delivery| delivery.committed_ms));
        // Counted here and added once per batch, so that the fan-out takes no lock per frame.
        let (mut queued, mut replaced) = (0, 0);
        let mut to_write = Vec::new();
        let mut state = self.lock(partition);
        for mut delivery in batch {
            let trace = delivery.trace.take();
            if let Some(subscribers) = state.channels.get(&delivery.channel) {
                let key = self.conflation.key_of(&delivery.channel, &delivery.frame);
                for subscriber in subscribers {
                    match subscriber.offer(&delivery, key.as_ref(), trace.as_ref()) {
                        Offered::Queued => queued += 1,
                        Offered::ToWrite => {
                            queued += 1;
                            to_write.push(subscriber.socket.clone());
                        }
                        Offered::Replaced => replaced += 1,
                        Offered::Skipped => {}
                    }
                }
            }
            state.recent.push(delivery);
            traces.extend(trace);
        }
        state.head = Some(last);
        drop(state);
        for socket in to_write {
            socket.queue.write_now();
        }
        drop(traces);
        self.metrics.events_delivered.inc_by(queued + replaced);
        if replaced > 0 {
            self.metrics.frames_dropped_conflated.inc_by(replaced);
        }
        self.shard(partition).head_tx.send_replace(Some(last));
    }

    /// Waits up to `timeout` until the partition's head is at least `position`, and returns it.
    ///
    /// # Errors
    /// Fails when the partition has not started or its head stayed below `position`.
    pub async fn wait_for_head(&self, partition: u32, position: u64, timeout: Duration) -> Result<u64, HeadError> {
        let mut head_rx = self.shard(partition).head_tx.subscribe();
        let reached = head_rx.wait_for(|head| head.is_some_and(|head| head >= position));
        if let Ok(Ok(head)) = tokio::time::timeout(timeout, reached).await {
            return head.ok_or(HeadError::NotReady);
        }
        match *head_rx.borrow() {
            None => Err(HeadError::NotReady),
            Some(head) => Err(HeadError::Behind { head }),
        }
    }

    /// Adds a subscription, which receives every event after the returned head. With `since`,
    /// also returns the recent frames in `(since, head]` when the window contains them.
    ///
    /// # Errors
    /// Fails when the partition has not started, or when `since` is above its head.
    pub fn register(&self, subscription: &Arc<Subscription>, since: Option<u64>) -> Result<Registration, HeadError> {
        self.replace(None, subscription, since)
    }

    /// Adds a subscription like [`Hub::register`], and removes `previous` (a subscription of the
    /// same socket and channel) in the same step, so that no event reaches both. When the checks
    /// fail, `previous` stays registered.
    ///
    /// # Errors
    /// Fails when the partition has not started, or when `since` is above its head.
    pub fn replace(
        &self,
        previous: Option<&Arc<Subscription>>,
        subscription: &Arc<Subscription>,
        since: Option<u64>,
    ) -> Result<Registration, HeadError> {
        let mut state = self.lock(subscription.partition);
        let head = state.head.ok_or(HeadError::NotReady)?;
        if since.is_some_and(|since| since > head) {
            return Err(HeadError::Behind { head });
        }
        if let Some(previous) = previous {
            previous.remove();
            self.remove_locked(&mut state, previous);
        }
        let recent = since.and_then(|since| {
            let (channel, user_id) = (subscription.channel(), subscription.user_id());
            state.recent.replay(channel, user_id, since, head)
        });
        let subscribers = state.channels.entry(subscription.channel.clone()).or_default();
        subscribers.push(subscription.clone());
        self.metrics.subscriptions.inc();
        Ok(Registration { head, recent })
    }

    /// Removes a subscription and stops its delivery.
    pub fn unregister(&self, subscription: &Arc<Subscription>) {
        subscription.remove();
        let mut state = self.lock(subscription.partition);
        self.remove_locked(&mut state, subscription);
    }

    fn remove_locked(&self, state: &mut ShardState, subscription: &Arc<Subscription>) {
        if let Some(subscribers) = state.channels.get_mut(&subscription.channel) {
            let before = subscribers.len();
            subscribers.retain(|other| !Arc::ptr_eq(other, subscription));
            self.metrics.subscriptions.dec_by((before - subscribers.len()) as i64);
            if subscribers.is_empty() {
                state.channels.remove(&subscription.channel);
            }
        }
    }

    /// Returns the number of channels with local subscribers in a partition.
    pub fn channel_count(&self, partition: u32) -> usize {
        self.lock(partition).channels.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Creates a socket handle with a large queue.
    pub(crate) fn socket(user_id: &str) -> Arc<Socket> {
        socket_with(user_id, 64)
    }

    pub(crate) fn socket_with(user_id: &str, frames: usize) -> Arc<Socket> {
        Arc::new(Socket {
            conn_id: format!("conn-{user_id}"),
            user_id: user_id.into(),
            queue: Arc::new(Outbound::new(QueueLimits { frames, bytes: 1 << 20 })),
        })
    }

    pub(crate) fn delivery(seq: u64, channel: &str) -> Delivery {
        Delivery {
            seq,
            channel: channel.into(),
            user_id: String::new(),
            frame: format!("{channel}:{seq}").into(),
            trace: None,
            committed_ms: 0,
        }
    }

    /// Drains a socket's queue into strings.
    pub(crate) fn drained(socket: &Socket) -> Vec<String> {
        let mut batch = Vec::new();
        socket.queue.drain_into(&mut batch);
        batch.iter().map(|frame| frame.as_str().to_owned()).collect()
    }

    fn started_hub(head: u64) -> Hub {
        let hub = Hub::new(1, RecentLimits::default());
        hub.jump(0, head);
        hub
    }

    #[test]
    fn live_subscription_gets_later_events() {
        let hub = started_hub(5);
        let alice = socket("alice");
        let subscription = Arc::new(Subscription::new(alice.clone(), "news".into(), 0));
        let registration = hub.register(&subscription, None).expect("partition started");
        assert_eq!(registration.head, 5);
        subscription.go_live(registration.head);
        hub.deliver(0, vec![delivery(6, "news"), delivery(7, "other"), delivery(8, "news")]);
        assert_eq!(drained(&alice), ["news:6", "news:8"]);
        assert_eq!(hub.head(0), Some(8));
    }

    #[test]
    fn recovering_subscription_buffers_until_live() {
        let hub = started_hub(5);
        let alice = socket("alice");
        let subscription = Arc::new(Subscription::new(alice.clone(), "news".into(), 0));
        hub.register(&subscription, None).expect("partition started");
        hub.deliver(0, vec![delivery(6, "news")]);
        assert!(drained(&alice).is_empty());
        subscription.send("subscribed".into());
        subscription.go_live(5);
        assert_eq!(drained(&alice), ["subscribed", "news:6"]);
    }

    #[test]
    fn targeted_event_skips_other_users() {
        let hub = started_hub(0);
        let (alice, bob) = (socket("alice"), socket("bob"));
        for user in [&alice, &bob] {
            let subscription = Arc::new(Subscription::new(user.clone(), "team".into(), 0));
            hub.register(&subscription, None).expect("partition started");
            subscription.go_live(0);
        }
        let targeted = Delivery {
            user_id: "bob".into(),
            ..delivery(1, "team")
        };
        hub.deliver(0, vec![targeted]);
        assert!(drained(&alice).is_empty());
        assert_eq!(drained(&bob), ["team:1"]);
    }

    #[test]
    fn since_above_head_is_rejected() {
        let hub = started_hub(5);
        let subscription = Arc::new(Subscription::new(socket("a"), "news".into(), 0));
        assert_eq!(
            hub.register(&subscription, Some(6)).err(),
            Some(HeadError::Behind { head: 5 })
        );
    }

    #[test]
    fn rejected_replacement_keeps_previous() {
        let hub = started_hub(5);
        let alice = socket("alice");
        let previous = Arc::new(Subscription::new(alice.clone(), "news".into(), 0));
        hub.register(&previous, None).expect("partition started");
        previous.go_live(5);
        let next = Arc::new(Subscription::new(alice.clone(), "news".into(), 0));
        assert_eq!(
            hub.replace(Some(&previous), &next, Some(9)).err(),
            Some(HeadError::Behind { head: 5 })
        );
        hub.deliver(0, vec![delivery(6, "news")]);
        assert_eq!(drained(&alice), ["news:6"]);

        // An accepted replacement delivers each later event once, through the new subscription.
        let registration = hub.replace(Some(&previous), &next, Some(6)).expect("since is the head");
        next.go_live(registration.head);
        hub.deliver(0, vec![delivery(7, "news")]);
        assert_eq!(drained(&alice), ["news:7"]);
        assert_eq!(hub.channel_count(0), 1);
    }

    #[test]
    fn unstarted_partition_is_not_ready() {
        let hub = Hub::new(1, RecentLimits::default());
        let subscription = Arc::new(Subscription::new(socket("a"), "news".into(), 0));
        assert_eq!(hub.register(&subscription, None).err(), Some(HeadError::NotReady));
    }

    #[test]
    fn unregister_stops_delivery_and_drops_channel() {
        let hub = started_hub(0);
        let alice = socket("alice");
        let subscription = Arc::new(Subscription::new(alice.clone(), "news".into(), 0));
        hub.register(&subscription, None).expect("partition started");
        subscription.go_live(0);
        hub.unregister(&subscription);
        hub.deliver(0, vec![delivery(1, "news")]);
        assert!(drained(&alice).is_empty());
        assert_eq!(hub.channel_count(0), 0);
    }

    #[test]
    fn full_recovery_buffer_closes_socket() {
        let hub = started_hub(0);
        let alice = socket_with("alice", 2);
        let subscription = Arc::new(Subscription::new(alice.clone(), "news".into(), 0));
        hub.register(&subscription, None).expect("partition started");
        hub.deliver(0, (1..=3).map(|seq| delivery(seq, "news")).collect());
        let mut batch = Vec::new();
        let ending = alice.queue.drain_into(&mut batch);
        assert_eq!(
            ending,
            Some(Ending::Close(close::SLOW_CONSUMER, "recovery buffer full"))
        );
        assert!(!subscription.send("late".into()));
    }

    #[tokio::test]
    async fn wait_for_head_sees_later_delivery() {
        let hub = Arc::new(started_hub(1));
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_for_head(0, 2, Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        hub.deliver(0, vec![delivery(2, "news")]);
        assert_eq!(waiter.await.expect("waiter task"), Ok(2));
        let behind = hub.wait_for_head(0, 9, Duration::from_millis(10)).await;
        assert_eq!(behind, Err(HeadError::Behind { head: 2 }));
    }
}
