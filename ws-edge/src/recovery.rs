//! Replay for a subscription resumed with `since` when the recent window no longer reaches back
//! to its position: events of the channel in `(since, head]` from the stream while it contains
//! them without holes, else from the store.
//!
//! Reads are per partition and page, so every subscriber of a partition needs the same pages.
//! Concurrent recoveries therefore share in-flight reads of the same page ([`Coalescer`]), and
//! each page is encoded once for all of them.

use std::sync::Arc;
use std::time::Duration;

use notify_proto::frame::FrameOptions;
use notify_proto::history::{HistoryError, HistoryStore, MAX_PAGE};
use notify_proto::log::LogReader;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::coalesce::Coalescer;
use crate::fanout::encode_with;
use crate::frames::Reply;
use crate::hub::{Delivery, Subscription};
use crate::outbound::QueueLimits;

/// Events read per page, from the stream and from the store.
pub const PAGE_EVENTS: u32 = MAX_PAGE;
/// Recoveries that may read at once. Each keeps at most one page of events in memory. The others
/// wait, while their subscriptions buffer live events (bounded, see [`Subscription`]).
pub const MAX_CONCURRENT_RECOVERIES: usize = 64;
/// How long a replay waits for room in a socket's queue before each frame. A client that reads
/// nothing for this long is closed as a slow consumer (4008), which frees its recovery slot.
pub const ROOM_PATIENCE: Duration = Duration::from_secs(5);

/// Error of a replay.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The stream did not hold the events and the store could not be read.
    #[error("history unavailable: {0}")]
    Store(#[from] HistoryError),
}

/// A page of replayed events, encoded.
struct Page {
    /// Contiguous events after the page's start, up to the head.
    events: Arc<[Delivery]>,
    /// Whether the page starts right after the requested position.
    complete: bool,
}

type SharedEvents = (Arc<[Delivery]>, u64);

/// Replays missed events from the stream and the store.
pub struct Recovery {
    log: Arc<dyn LogReader>,
    history: Arc<dyn HistoryStore>,
    /// In-flight stream reads by (partition, after): the events and the stream's first sequence.
    stream_pages: Coalescer<(u32, u64), SharedEvents>,
    /// In-flight store reads by (partition, after): the events and the store's oldest sequence.
    store_pages: Coalescer<(u32, u64), SharedEvents>,
    permits: Semaphore,
    /// Optional fields of the event frames.
    frame_options: FrameOptions,
}

impl Recovery {
    /// Creates a replayer over the stream and the store.
    pub fn new(log: Arc<dyn LogReader>, history: Arc<dyn HistoryStore>) -> Self {
        Self {
            log,
            history,
            stream_pages: Coalescer::default(),
            store_pages: Coalescer::default(),
            permits: Semaphore::new(MAX_CONCURRENT_RECOVERIES),
            frame_options: FrameOptions::default(),
        }
    }

    /// Sets the optional fields of the event frames.
    #[must_use]
    pub fn with_frame_options(mut self, options: FrameOptions) -> Self {
        self.frame_options = options;
        self
    }

    /// Sends `subscribed`, then the channel's events in `(since, head]`, then switches the
    /// subscription live, which flushes the events buffered meanwhile (all above `head`). Stops
    /// early, without error, when the subscription is removed or the socket closes.
    ///
    /// `recovered` in `subscribed` is false when the first events after `since` are gone from
    /// both the stream and the store.
    ///
    /// # Errors
    /// Fails when the stream lacks the events and the store cannot be read; nothing was sent then.
    pub async fn replay(&self, subscription: &Subscription, since: u64, head: u64) -> Result<(), RecoveryError> {
        // Nothing closes the semaphore, so `acquire` cannot fail; `ok()` avoids an unwrap.
        let _permit = self.permits.acquire().await.ok();

        let mut page = self.page(subscription.partition(), since, head).await?;
        let subscribed = Reply::Subscribed {
            channel: subscription.channel(),
            position: head,
            recovered: Some(page.complete),
        };
        if !subscription.send(subscribed.encode()) {
            return Ok(());
        }
        loop {
            let Some(last) = page.events.last().map(|delivery| delivery.seq) else {
                tracing::warn!(
                    partition = subscription.partition(),
                    since,
                    head,
                    "replay stopped: events are gone from the stream and the store"
                );
                break;
            };
            if !send_page(subscription, &page.events).await {
                return Ok(());
            }
            if last >= head {
                break;
            }
            page = self.page(subscription.partition(), last, head).await?;
        }
        subscription.go_live(head);
        Ok(())
    }

    /// Reads the events after `after`, up to `head`: from the stream when it continues right
    /// after `after`, else from the store.
    async fn page(&self, partition: u32, after: u64, head: u64) -> Result<Page, RecoveryError> {
        match self.stream_page(partition, after).await {
            Ok((events, _)) if events.first().is_some_and(|first| first.seq == after + 1) => {
                return Ok(Page {
                    events: contiguous(&events, after, head),
                    complete: true,
                });
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(partition, after, error = %err, "stream range failed; reading the store"),
        }
        let (events, oldest) = self.store_page(partition, after).await?;
        let starts_after = events.first().is_some_and(|first| first.seq == after + 1);
        Ok(Page {
            events: contiguous(&events, after, head),
            complete: starts_after && oldest <= after + 1,
        })
    }

    async fn stream_page(&self, partition: u32, after: u64) -> Result<SharedEvents, String> {
        let fetch = || async {
            let page = self.log.range(partition, after, PAGE_EVENTS as usize).await;
            let page = page.map_err(|err| err.to_string())?;
            let encode = |event| encode_with(event, self.frame_options);
            Ok((page.events.into_iter().map(encode).collect(), page.first_seq))
        };
        self.stream_pages.get((partition, after), fetch).await
    }

    async fn store_page(&self, partition: u32, after: u64) -> Result<SharedEvents, HistoryError> {
        let fetch = || async {
            let page = self.history.read_partition(partition, after, PAGE_EVENTS).await?;
            let encode = |event| encode_with(event, self.frame_options);
            Ok((page.events.into_iter().map(encode).collect(), page.oldest))
        };
        self.store_pages.get((partition, after), fetch).await
    }
}

/// Returns the run of consecutive events that starts after `after` and ends at `head` or at the
/// first hole.
fn contiguous(events: &Arc<[Delivery]>, after: u64, head: u64) -> Arc<[Delivery]> {
    let start = events.partition_point(|delivery| delivery.seq <= after);
    let mut end = start;
    while end < events.len() && events[end].seq <= head && (end == start || events[end].seq == events[end - 1].seq + 1)
    {
        end += 1;
    }
    if start == 0 && end == events.len() {
        events.clone()
    } else {
        events[start..end].into()
    }
}

/// Sends a page's events of the subscription's channel, each once the socket's queue has room,
/// so a replay longer than the queue does not overflow it. Returns false when delivery stopped.
async fn send_page(subscription: &Subscription, events: &[Delivery]) -> bool {
    let matching = events
        .iter()
        .filter(|delivery| delivery.channel == subscription.channel() && delivery.is_for(subscription.user_id()));
    for delivery in matching {
        if !subscription.send_paced(delivery.frame.clone(), ROOM_PATIENCE).await {
            return false;
        }
    }
    true
}

/// Returns whether replayed frames fit in half of a socket's queue, so that they can be queued
/// at once. Longer replays go through [`Recovery::replay`], which waits for room.
pub fn fits_at_once(frames: &[Utf8Bytes], limits: QueueLimits) -> bool {
    let bytes: usize = frames.iter().map(|frame| frame.len()).sum();
    2 * (frames.len() + 1) <= limits.frames && 2 * bytes <= limits.bytes
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use notify_proto::log::LogWriter;
    use notify_proto::memory::MemoryLog;
    use notify_proto::pb::Event;

    use super::*;
    use crate::hub::tests::{drained, socket};
    use crate::hub::{Hub, Socket};
    use crate::recent::RecentLimits;
    use crate::testing::{VecHistory, event};

    /// Events 1 to 10 of partition 0: all on `news` except 7, which is on `other`.
    fn stored() -> Vec<Event> {
        (1..=10)
            .map(|seq| event(0, seq, if seq == 7 { "other" } else { "news" }))
            .collect()
    }

    struct Setup {
        hub: Hub,
        log: Arc<MemoryLog>,
        history: Arc<VecHistory>,
        recovery: Arc<Recovery>,
    }

    impl Setup {
        /// Creates a partition at head 10 whose recent window is empty, so resumes need a replay.
        fn new(history: VecHistory) -> Self {
            let hub = Hub::new(1, RecentLimits::default());
            hub.jump(0, 10);
            let log = Arc::new(MemoryLog::new(1, 100));
            let history = Arc::new(history);
            let recovery = Arc::new(Recovery::new(log.clone(), history.clone()));
            Self {
                hub,
                log,
                history,
                recovery,
            }
        }

        /// Registers a recovering subscription of a new socket to `news` from `since`.
        fn resume(&self, user: &str, since: u64) -> (Arc<Socket>, Arc<Subscription>) {
            let user = socket(user);
            let subscription = Arc::new(Subscription::new(user.clone(), "news".into(), 0));
            let registration = self
                .hub
                .register(&subscription, Some(since))
                .expect("since is at or below head");
            assert_eq!(registration.head, 10);
            assert!(registration.recent.is_none(), "the recent window is empty");
            (user, subscription)
        }

        fn spawn_replay(&self, subscription: &Arc<Subscription>, since: u64) -> tokio::task::JoinHandle<()> {
            let (recovery, subscription) = (self.recovery.clone(), subscription.clone());
            tokio::spawn(async move {
                recovery
                    .replay(&subscription, since, 10)
                    .await
                    .expect("replay succeeds");
            })
        }
    }

    /// Splits a socket's frames into the `subscribed` frame and the event positions after it.
    fn split(frames: Vec<String>) -> (serde_json::Value, Vec<u64>) {
        let mut values = frames
            .iter()
            .map(|frame| serde_json::from_str::<serde_json::Value>(frame).expect("JSON"));
        let subscribed = values.next().expect("a subscribed frame");
        let positions = values
            .map(|value| value["position"].as_u64().expect("position"))
            .collect();
        (subscribed, positions)
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn replay_seam_has_no_gap_or_duplicate() {
        let gate = Arc::new(Semaphore::new(0));
        let setup = Setup::new(VecHistory::gated(stored(), gate.clone()));
        let (alice, subscription) = setup.resume("alice", 4);
        let replay = setup.spawn_replay(&subscription, 4);
        settle().await;

        // Events 11 to 13 arrive while the store read is held.
        let live =
            [11, 12, 13].map(|seq| crate::fanout::encode(event(0, seq, if seq == 12 { "other" } else { "news" })));
        setup.hub.deliver(0, live.to_vec());
        assert!(drained(&alice).is_empty(), "nothing is sent before subscribed");
        gate.add_permits(10);
        tokio::time::timeout(Duration::from_secs(5), replay)
            .await
            .expect("replay ends")
            .expect("replay task");

        let (subscribed, positions) = split(drained(&alice));
        assert_eq!(subscribed["type"], "subscribed");
        assert_eq!(subscribed["position"], 10);
        assert_eq!(subscribed["recovered"], true);
        assert_eq!(positions, [5, 6, 8, 9, 10, 11, 13]);

        // Later events go straight to the socket.
        setup.hub.deliver(0, vec![crate::fanout::encode(event(0, 14, "news"))]);
        let later: Vec<serde_json::Value> = drained(&alice)
            .iter()
            .map(|frame| serde_json::from_str(frame).expect("JSON"))
            .collect();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0]["position"], 14);
    }

    #[tokio::test]
    async fn stream_serves_replay_when_contiguous() {
        let setup = Setup::new(VecHistory::new(stored()));
        LogWriter::append(&*setup.log, 0, &stored()[5..])
            .await
            .expect("partition exists");
        let (alice, subscription) = setup.resume("alice", 6);
        setup.spawn_replay(&subscription, 6).await.expect("replay task");
        let (subscribed, positions) = split(drained(&alice));
        assert_eq!(subscribed["recovered"], true);
        assert_eq!(positions, [8, 9, 10]);
        assert_eq!(setup.history.reads.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn store_serves_replay_when_stream_was_trimmed() {
        let setup = Setup::new(VecHistory::new(stored()));
        LogWriter::append(&*setup.log, 0, &stored()[5..])
            .await
            .expect("partition exists");
        let (alice, subscription) = setup.resume("alice", 2);
        setup.spawn_replay(&subscription, 2).await.expect("replay task");
        let (subscribed, positions) = split(drained(&alice));
        assert_eq!(subscribed["recovered"], true);
        assert_eq!(positions, [3, 4, 5, 6, 8, 9, 10]);
    }

    #[tokio::test]
    async fn retention_gap_is_reported() {
        let history = VecHistory::new(stored());
        history.trim_below(6);
        let setup = Setup::new(history);
        let (alice, subscription) = setup.resume("alice", 2);
        setup.spawn_replay(&subscription, 2).await.expect("replay task");
        let (subscribed, positions) = split(drained(&alice));
        assert_eq!(subscribed["recovered"], false);
        assert_eq!(positions, [6, 8, 9, 10]);
    }

    #[tokio::test]
    async fn concurrent_replays_share_store_reads() {
        let gate = Arc::new(Semaphore::new(0));
        let setup = Setup::new(VecHistory::gated(stored(), gate.clone()));
        let (alice, first) = setup.resume("alice", 4);
        let (bob, second) = setup.resume("bob", 4);
        let replays = [setup.spawn_replay(&first, 4), setup.spawn_replay(&second, 4)];
        settle().await;
        gate.add_permits(10);
        for replay in replays {
            tokio::time::timeout(Duration::from_secs(5), replay)
                .await
                .expect("replay ends")
                .expect("replay task");
        }
        assert_eq!(setup.history.reads.load(Ordering::SeqCst), 1);
        assert_eq!(split(drained(&alice)).1, [5, 6, 8, 9, 10]);
        assert_eq!(split(drained(&bob)).1, [5, 6, 8, 9, 10]);
    }

    #[tokio::test]
    async fn replay_longer_than_queue_waits_for_room() {
        let setup = Setup::new(VecHistory::new(stored()));
        let alice = crate::hub::tests::socket_with("alice", 4);
        let subscription = Arc::new(Subscription::new(alice.clone(), "news".into(), 0));
        setup
            .hub
            .register(&subscription, Some(0))
            .expect("since is at or below head");
        let replay = setup.spawn_replay(&subscription, 0);

        // The subscribed frame and 9 events pass through a queue of 4 frames as it is drained.
        let mut frames = Vec::new();
        let drain = async {
            while frames.len() < 10 {
                alice.queue.wait().await;
                alice.queue.drain_into(&mut frames);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .expect("every frame arrives");
        replay.await.expect("replay task");
        assert!(!alice.queue.is_ending(), "the socket was closed");
        let frames = frames.iter().map(|frame| frame.as_str().to_owned()).collect();
        let (subscribed, positions) = split(frames);
        assert_eq!(subscribed["recovered"], true);
        assert_eq!(positions, [1, 2, 3, 4, 5, 6, 8, 9, 10]);
    }

    #[tokio::test]
    async fn unsubscribe_stops_replay() {
        let gate = Arc::new(Semaphore::new(0));
        let setup = Setup::new(VecHistory::gated(stored(), gate.clone()));
        let (alice, subscription) = setup.resume("alice", 4);
        let replay = setup.spawn_replay(&subscription, 4);
        settle().await;
        setup.hub.unregister(&subscription);
        gate.add_permits(10);
        tokio::time::timeout(Duration::from_secs(5), replay)
            .await
            .expect("replay ends")
            .expect("replay task");
        assert!(drained(&alice).is_empty());
    }
}
