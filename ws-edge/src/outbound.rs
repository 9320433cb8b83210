//! The bounded outbound queue of one socket. The fan-out and the session push frames without
//! waiting; the socket's writer task takes everything queued at once and writes it with one flush.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use notify_proto::protocol::close;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::delivery_trace::{self, FrameTrace};

/// Capacity of a queue. A push that would exceed either limit overflows, except that a frame
/// larger than `bytes` enters an empty queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Maximum number of frames waiting.
    pub frames: usize,
    /// Maximum total size of the frames waiting, in bytes.
    pub bytes: usize,
}

/// The way the writer ends the socket, after the frames queued before the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Send a close frame with this code and reason.
    Close(u16, &'static str),
    /// Flush what tungstenite still buffers (such as the reply to a client's close) and stop.
    Stop,
}

/// Error of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The queue was full: it dropped its frames and now ends the socket with 4008.
    #[error("outbound queue full")]
    Overflow,
    /// The queue is already ending; the frame was dropped.
    #[error("socket is closing")]
    Closing,
}

/// Outcome of a successful push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The frame was appended.
    Queued,
    /// The frame was appended, and an older queued frame with its conflation key was removed.
    Replaced,
}

/// A bounded queue of text frames for one socket.
///
/// Capacity: [`QueueLimits`]. Overflow: the queued frames are dropped and the socket is closed
/// with [`close::SLOW_CONSUMER`]; the client reconnects and resumes with `since`. A frame pushed
/// with a conflation key while the queue is at least half full (in frames or bytes) first
/// removes the oldest queued frame with the same key. A busy queue then stops growing from a
/// conflated channel whose keys are already queued. Frames are
/// shared (`Utf8Bytes` is reference-counted), so a queue holds references, and its byte count is
/// the size of the frames it would write, not memory owned by this socket alone.
pub struct Outbound {
    state: Mutex<State>,
    /// Wakes the writer. `notify_one` keeps a permit when the writer is busy, so no push is missed.
    ready: Notify,
    /// Wakes replays waiting in [`Outbound::wait_for_room`] after the writer drained the queue.
    drained: Notify,
    /// Wakes a writer blocked in a write when the queue starts ending, such as on overflow.
    ending: Notify,
    limits: QueueLimits,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Queued>,
    bytes: usize,
    ending: Option<Ending>,
    /// Frames discarded by an overflow of this queue or of a recovery buffer, for the metrics.
    dropped: usize,
}

struct Queued {
    frame: Utf8Bytes,
    /// Conflation key (see [`crate::conflate`]); `None` for frames that are never replaced.
    key: Option<Arc<str>>,
    /// The event's delivery span counters, while spans are exported.
    trace: Option<FrameTrace>,
}

impl State {
    /// Removes the queued frame with `key`, if any. Returns whether one was removed.
    fn remove_key(&mut self, key: &str) -> bool {
        let Some(index) = self.frames.iter().position(|queued| queued.key.as_deref() == Some(key)) else {
            return false;
        };
        if let Some(removed) = self.frames.remove(index) {
            self.bytes -= removed.frame.len();
        }
        true
    }
}

impl Outbound {
    /// Creates an empty queue.
    pub fn new(limits: QueueLimits) -> Self {
        Self {
            state: Mutex::default(),
            ready: Notify::new(),
            drained: Notify::new(),
            ending: Notify::new(),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame without waiting.
    ///
    /// # Errors
    /// Fails when the queue is full, which also starts closing the socket, or already closing.
    pub fn push(&self, frame: Utf8Bytes) -> Result<(), PushError> {
        self.push_keyed(frame, None).map(drop)
    }

    /// Queues a frame without waiting; with a conflation key, replaces the queued frame with the
    /// same key when the queue is at least half full.
    ///
    /// # Errors
    /// Fails when the queue is full, which also starts closing the socket, or already closing.
    pub fn push_keyed(&self, frame: Utf8Bytes, key: Option<Arc<str>>) -> Result<Pushed, PushError> {
        self.push_traced(frame, key, None)
    }

    /// Queues a frame like [`Outbound::push_keyed`], with its event's delivery span counters.
    /// A frame that is dropped instead of written counts as dropped there.
    ///
    /// # Errors
    /// Fails when the queue is full, which also starts closing the socket, or already closing.
    pub fn push_traced(
        &self,
        frame: Utf8Bytes,
        key: Option<Arc<str>>,
        trace: Option<FrameTrace>,
    ) -> Result<Pushed, PushError> {
        let mut state = self.lock();
        if state.ending.is_some() {
            return Err(PushError::Closing);
        }
        let busy = 2 * state.frames.len() >= self.limits.frames || 2 * state.bytes >= self.limits.bytes;
        let replaced = busy && key.as_deref().is_some_and(|key| state.remove_key(key));
        // A frame larger than the byte limit still enters an empty queue, so that one large event
        // cannot close every subscriber forever. A queue holds at most its bytes plus one frame.
        let bytes_fit = state.bytes + frame.len() <= self.limits.bytes || state.frames.is_empty();
        let fits = state.frames.len() < self.limits.frames && bytes_fit;
        if !fits {
            state.dropped += state.frames.len() + 1;
            state.frames.clear();
            state.bytes = 0;
            state.ending = Some(Ending::Close(close::SLOW_CONSUMER, "outbound queue full"));
            drop(state);
            self.ready.notify_one();
            self.ending.notify_waiters();
            return Err(PushError::Overflow);
        }
        state.bytes += frame.len();
        state.frames.push_back(Queued { frame, key, trace });
        drop(state);
        self.ready.notify_one();
        Ok(if replaced { Pushed::Replaced } else { Pushed::Queued })
    }

    /// Asks the writer to end the socket after the frames already queued. The first ending wins.
    pub fn end(&self, ending: Ending) {
        let mut state = self.lock();
        if state.ending.is_none() {
            state.ending = Some(ending);
        }
        drop(state);
        self.ready.notify_one();
        self.ending.notify_waiters();
    }

    /// Returns the queue's capacity.
    pub fn limits(&self) -> QueueLimits {
        self.limits
    }

    /// Returns whether the socket is ending.
    pub fn is_ending(&self) -> bool {
        self.lock().ending.is_some()
    }

    /// Counts frames meant for this socket that an overflow discarded elsewhere, such as in a
    /// subscription's recovery buffer.
    pub fn add_dropped(&self, frames: usize) {
        self.lock().dropped += frames;
    }

    /// Returns the number of frames that overflows discarded, queued ones and the one that
    /// did not fit.
    pub fn dropped(&self) -> usize {
        self.lock().dropped
    }

    /// Returns whether the socket is ending because its client read too slowly.
    pub fn is_slow_consumer(&self) -> bool {
        matches!(self.lock().ending, Some(Ending::Close(close::SLOW_CONSUMER, _)))
    }

    /// Waits until the socket is ending because its client read too slowly.
    pub async fn slow_consumer(&self) {
        loop {
            let ending = self.ending.notified();
            tokio::pin!(ending);
            // Registered before the check, so an ending set in between still wakes this wait.
            ending.as_mut().enable();
            if self.is_slow_consumer() {
                return;
            }
            ending.await;
        }
    }

    /// Moves every queued frame into `batch` and returns the ending, if one was requested. The
    /// frames count as written for their delivery spans; a writer uses
    /// [`Outbound::drain_traced_into`] instead.
    pub fn drain_into(&self, batch: &mut Vec<Utf8Bytes>) -> Option<Ending> {
        let mut traces = Vec::new();
        let ending = self.drain_traced_into(batch, &mut traces);
        delivery_trace::mark_written(&mut traces);
        ending
    }

    /// Moves every queued frame into `batch` and the delivery span counters of those that have
    /// them into `traces`, and returns the ending, if one was requested.
    pub fn drain_traced_into(&self, batch: &mut Vec<Utf8Bytes>, traces: &mut Vec<FrameTrace>) -> Option<Ending> {
        let mut state = self.lock();
        for queued in state.frames.drain(..) {
            batch.push(queued.frame);
            traces.extend(queued.trace);
        }
        state.bytes = 0;
        let ending = state.ending;
        drop(state);
        self.drained.notify_waiters();
        ending
    }

    /// Waits until the queue with a frame of `bytes` added would be at most half full, in frames
    /// and in bytes, or until the socket is ending. A replay waits here before each frame, so it
    /// cannot overflow the queue of a client that reads, and leaves half of it to live frames.
    pub async fn wait_for_room(&self, bytes: usize) {
        loop {
            // Register before looking, so a drain between the look and the wait is not missed.
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let state = self.lock();
                let frames_fit = 2 * (state.frames.len() + 1) <= self.limits.frames;
                let bytes_fit = 2 * (state.bytes + bytes) <= self.limits.bytes;
                if state.ending.is_some() || state.frames.is_empty() || (frames_fit && bytes_fit) {
                    return;
                }
            }
            drained.await;
        }
    }

    /// Waits until a frame or an ending is pushed after the last wait returned.
    pub async fn wait(&self) {
        self.ready.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(frames: usize, bytes: usize) -> Outbound {
        Outbound::new(QueueLimits { frames, bytes })
    }

    fn drain(queue: &Outbound) -> (Vec<String>, Option<Ending>) {
        let mut batch = Vec::new();
        let ending = queue.drain_into(&mut batch);
        (batch.iter().map(|frame| frame.as_str().to_owned()).collect(), ending)
    }

    #[test]
    fn frames_drain_in_order() {
        let queue = queue(4, 100);
        queue.push("a".into()).expect("fits");
        queue.push("b".into()).expect("fits");
        assert_eq!(drain(&queue), (vec!["a".into(), "b".into()], None));
        assert_eq!(drain(&queue), (vec![], None));
    }

    #[test]
    fn frame_limit_overflows() {
        let queue = queue(2, 100);
        queue.push("a".into()).expect("fits");
        queue.push("b".into()).expect("fits");
        assert_eq!(queue.push("c".into()), Err(PushError::Overflow));
        let slow = Ending::Close(close::SLOW_CONSUMER, "outbound queue full");
        assert_eq!(drain(&queue), (vec![], Some(slow)));
    }

    #[test]
    fn byte_limit_overflows() {
        let queue = queue(100, 5);
        queue.push("abc".into()).expect("fits");
        queue.push("de".into()).expect("exactly fits");
        assert_eq!(queue.push("f".into()), Err(PushError::Overflow));
        assert!(queue.is_ending());
    }

    #[test]
    fn frame_larger_than_byte_limit_enters_empty_queue() {
        let queue = queue(100, 5);
        assert_eq!(queue.push("abcdefgh".into()), Ok(()));
        assert_eq!(queue.push("i".into()), Err(PushError::Overflow));
        let queue = self::queue(100, 5);
        queue.push("a".into()).expect("fits");
        assert_eq!(queue.push("abcdefgh".into()), Err(PushError::Overflow));
    }

    #[test]
    fn draining_frees_capacity() {
        let queue = queue(1, 100);
        queue.push("a".into()).expect("fits");
        drain(&queue);
        assert_eq!(queue.push("b".into()), Ok(()));
    }

    #[test]
    fn push_after_overflow_is_dropped() {
        let queue = queue(1, 100);
        queue.push("a".into()).expect("fits");
        assert_eq!(queue.push("b".into()), Err(PushError::Overflow));
        assert_eq!(queue.push("c".into()), Err(PushError::Closing));
    }

    #[test]
    fn first_ending_wins_and_keeps_frames() {
        let queue = queue(4, 100);
        queue.push("a".into()).expect("fits");
        queue.end(Ending::Close(close::SERVICE_RESTART, "restart"));
        queue.end(Ending::Stop);
        assert_eq!(
            drain(&queue),
            (vec!["a".into()], Some(Ending::Close(close::SERVICE_RESTART, "restart")))
        );
    }

    #[test]
    fn busy_queue_replaces_frame_with_same_key() {
        let queue = queue(4, 100);
        let key = |name: &str| Some(Arc::<str>::from(name));
        assert_eq!(queue.push_keyed("a1".into(), key("a")), Ok(Pushed::Queued));
        assert_eq!(queue.push_keyed("b1".into(), key("b")), Ok(Pushed::Queued));
        assert_eq!(queue.push_keyed("a2".into(), key("a")), Ok(Pushed::Replaced));
        assert_eq!(queue.push_keyed("b2".into(), key("b")), Ok(Pushed::Replaced));
        assert_eq!(queue.push("x".into()), Ok(()));
        assert_eq!(queue.push_keyed("a3".into(), key("a")), Ok(Pushed::Replaced));
        assert_eq!(drain(&queue), (vec!["b2".into(), "x".into(), "a3".into()], None));
    }

    #[test]
    fn idle_queue_keeps_every_keyed_frame() {
        let queue = queue(8, 100);
        let key = Some(Arc::<str>::from("a"));
        assert_eq!(queue.push_keyed("a1".into(), key.clone()), Ok(Pushed::Queued));
        assert_eq!(queue.push_keyed("a2".into(), key), Ok(Pushed::Queued));
        assert_eq!(drain(&queue).0, ["a1", "a2"]);
    }

    #[test]
    fn full_queue_without_a_match_still_overflows() {
        let queue = queue(2, 100);
        let key = |name: &str| Some(Arc::<str>::from(name));
        queue.push_keyed("a1".into(), key("a")).expect("fits");
        queue.push_keyed("b1".into(), key("b")).expect("fits");
        assert_eq!(queue.push_keyed("c1".into(), key("c")), Err(PushError::Overflow));
        assert!(queue.is_slow_consumer());
    }

    #[tokio::test]
    async fn push_wakes_waiting_writer() {
        let queue = std::sync::Arc::new(queue(4, 100));
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.wait().await }
        });
        tokio::task::yield_now().await;
        queue.push("a".into()).expect("fits");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("writer woke up")
            .expect("waiter task");
    }
}
