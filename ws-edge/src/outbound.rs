//! The bounded outbound queue of one socket, and the writes that empty it.
//!
//! A frame is written straight from the task that pushes it when the queue was empty and the
//! socket's send buffer has room, so a socket that keeps up costs one `writev` per frame and no
//! task wake-up. When a write would block, the frames wait here, and the socket's writer task
//! ([`crate::writer`]) writes them once the socket takes bytes again. Every write, from a pushing
//! task or from the writer, happens under the queue's lock and in queue order, so frames never
//! interleave.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use notify_proto::protocol::close;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::delivery_trace::{self, FrameTrace};
use crate::wire::{self, Header, Wire};

/// Most frames one `writev` takes; each frame needs two slices, its header and its payload.
const FRAMES_PER_WRITE: usize = 32;

/// Capacity of a queue. A push that would exceed either limit overflows, except that a frame
/// larger than `bytes` enters an empty queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Maximum number of frames waiting.
    pub frames: usize,
    /// Maximum total size of the frames waiting, in bytes.
    pub bytes: usize,
}

/// The way the socket ends, after the frames queued before the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Send a close frame with this code and reason.
    Close(u16, &'static str),
    /// Write what is queued (such as tungstenite's reply to a client's close) and stop.
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

/// The writer task's next step, returned by [`Outbound::write_pending`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Everything queued is written; wait for the next push.
    Nothing,
    /// The socket's send buffer is full; wait until it is writable.
    Blocked,
    /// The ending and everything before it are written.
    Ended(Ending),
    /// A write failed; the socket is gone.
    Failed(String),
}

/// A bounded queue of frames for one socket, with the socket's write half.
///
/// Capacity: [`QueueLimits`]. Overflow: the queued frames are dropped and the socket is closed
/// with [`close::SLOW_CONSUMER`]; the client reconnects and resumes with `since`. A frame pushed
/// with a conflation key while the queue is at least half full (in frames or bytes) first
/// removes the oldest queued frame with the same key. A busy queue then stops growing from a
/// conflated channel whose keys are already queued. Frames are shared (`Utf8Bytes` is
/// reference-counted), so a queue holds references, and its byte count is the size of the frames
/// it would write, not memory owned by this socket alone.
pub struct Outbound {
    state: Mutex<State>,
    /// The socket's write half; `None` in unit tests, where frames only queue.
    wire: Option<Wire>,
    /// Wakes the writer: a write blocked, the socket is ending, or (without a wire) any push.
    /// `notify_one` keeps a permit when the writer is busy, so no wake-up is missed.
    ready: Notify,
    /// Wakes replays waiting in [`Outbound::wait_for_room`] after frames were written.
    drained: Notify,
    limits: QueueLimits,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Queued>,
    /// Payload bytes of the queued frames.
    bytes: usize,
    /// Bytes of the front frame, header included, that are already written.
    written: usize,
    /// The last write would have blocked; only the writer task writes until the socket is
    /// writable again.
    blocked: bool,
    ending: Option<Ending>,
    /// The close frame of the ending is queued.
    close_queued: bool,
    /// The error of a failed write; nothing is written after it.
    failed: Option<String>,
    /// A replay waits in [`Outbound::wait_for_room`].
    waiting_for_room: bool,
    /// Frames discarded by an overflow of this queue or of a recovery buffer, for the metrics.
    dropped: usize,
}

struct Queued {
    /// The frame header; empty for bytes that are already framed, such as a close frame.
    header: Header,
    payload: Bytes,
    /// Conflation key (see [`crate::conflate`]); `None` for frames that are never replaced.
    key: Option<Arc<str>>,
    /// The event's delivery span counters, while spans are exported.
    trace: Option<FrameTrace>,
}

impl Queued {
    fn text(frame: Utf8Bytes, key: Option<Arc<str>>, trace: Option<FrameTrace>) -> Self {
        let payload = Bytes::from(frame);
        Self {
            header: Header::text(payload.len()),
            payload,
            key,
            trace,
        }
    }

    fn framed(bytes: Bytes) -> Self {
        Self {
            header: Header::default(),
            payload: bytes,
            key: None,
            trace: None,
        }
    }

    fn is_text(&self) -> bool {
        !self.header.as_bytes().is_empty()
    }

    fn wire_len(&self) -> usize {
        self.header.as_bytes().len() + self.payload.len()
    }
}

/// Result of writing the queue.
enum Written {
    All,
    Blocked,
    Failed(io::Error),
}

impl State {
    /// Removes the queued frame with `key`, if any, unless it is partly written. Returns whether
    /// one was removed.
    fn remove_key(&mut self, key: &str) -> bool {
        let first = usize::from(self.written > 0);
        let found = self
            .frames
            .iter()
            .skip(first)
            .position(|queued| queued.key.as_deref() == Some(key));
        let Some(index) = found else {
            return false;
        };
        if let Some(removed) = self.frames.remove(index + first) {
            self.bytes -= removed.payload.len();
        }
        true
    }

    /// Drops every queued frame except a partly written one, which must be finished before any
    /// other frame. Returns the number dropped.
    fn clear(&mut self) -> usize {
        let keep = usize::from(self.written > 0);
        let dropped = self.frames.len() - keep;
        self.frames.truncate(keep);
        self.bytes = self.frames.iter().map(|queued| queued.payload.len()).sum();
        dropped
    }

    /// Queues the ending's close frame, once. Returns whether it queued it.
    fn queue_close(&mut self) -> bool {
        let (Some(Ending::Close(code, reason)), false) = (self.ending, self.close_queued) else {
            return false;
        };
        self.close_queued = true;
        let frame = wire::close_frame(code, reason);
        self.bytes += frame.len();
        self.frames.push_back(Queued::framed(frame));
        true
    }

    /// Records the outcome of a write.
    fn record(&mut self, written: Written) {
        match written {
            Written::All => {}
            Written::Blocked => self.blocked = true,
            Written::Failed(err) => {
                self.failed = Some(err.to_string());
                self.frames.clear();
                self.bytes = 0;
                self.written = 0;
                self.ending.get_or_insert(Ending::Stop);
            }
        }
    }

    /// Writes queued frames until the queue is empty or the socket's send buffer is full.
    /// Frames written whole move their delivery span counters to `traces`.
    fn write_to(&mut self, wire: &Wire, traces: &mut Vec<FrameTrace>) -> Written {
        while !self.frames.is_empty() {
            let result = {
                let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
                let mut count = 0;
                let mut skip = self.written;
                for queued in self.frames.iter().take(FRAMES_PER_WRITE) {
                    for part in [queued.header.as_bytes(), &queued.payload[..]] {
                        if skip >= part.len() {
                            skip -= part.len();
                            continue;
                        }
                        slices[count] = IoSlice::new(&part[skip..]);
                        skip = 0;
                        count += 1;
                    }
                }
                wire.try_write(&slices[..count])
            };
            match result {
                Ok(0) => return Written::Failed(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.advance(written, traces),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Written::Blocked,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Written::Failed(err),
            }
        }
        Written::All
    }

    /// Removes the frames that `written` more bytes completed.
    fn advance(&mut self, written: usize, traces: &mut Vec<FrameTrace>) {
        let mut done = self.written + written;
        while let Some(front) = self.frames.front() {
            let len = front.wire_len();
            if done < len {
                break;
            }
            done -= len;
            if let Some(front) = self.frames.pop_front() {
                self.bytes -= front.payload.len();
                traces.extend(front.trace);
            }
        }
        self.written = done;
    }
}

impl Outbound {
    /// Creates an empty queue that only queues, for tests of the code that pushes.
    pub fn new(limits: QueueLimits) -> Self {
        Self::build(limits, None)
    }

    /// Creates an empty queue that writes to `wire`.
    pub fn with_wire(limits: QueueLimits, wire: Wire) -> Self {
        Self::build(limits, Some(wire))
    }

    fn build(limits: QueueLimits, wire: Option<Wire>) -> Self {
        Self {
            state: Mutex::default(),
            wire,
            ready: Notify::new(),
            drained: Notify::new(),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame and writes it at once when nothing waits before it.
    ///
    /// # Errors
    /// Fails when the queue is full, which also starts closing the socket, or already closing.
    pub fn push(&self, frame: Utf8Bytes) -> Result<(), PushError> {
        self.push_traced(frame, None, None).map(drop)
    }

    /// Queues a frame like [`Outbound::push`]; with a conflation key, replaces the queued frame
    /// with the same key when the queue is at least half full.
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
        let (pushed, first) = self.push_deferred(frame, key, trace)?;
        if first {
            self.write_now();
        }
        Ok(pushed)
    }

    /// Queues a frame like [`Outbound::push_traced`] without writing it. Returns whether the
    /// queue was empty before; the caller must then call [`Outbound::write_now`], which the
    /// fan-out does after releasing its own lock.
    ///
    /// # Errors
    /// Fails when the queue is full, which also starts closing the socket, or already closing.
    pub fn push_deferred(
        &self,
        frame: Utf8Bytes,
        key: Option<Arc<str>>,
        trace: Option<FrameTrace>,
    ) -> Result<(Pushed, bool), PushError> {
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
            state.dropped += state.clear() + 1;
            state.ending = Some(Ending::Close(close::SLOW_CONSUMER, "outbound queue full"));
            drop(state);
            self.ready.notify_one();
            return Err(PushError::Overflow);
        }
        let first = state.frames.is_empty();
        state.bytes += frame.len();
        state.frames.push_back(Queued::text(frame, key, trace));
        drop(state);
        let pushed = if replaced { Pushed::Replaced } else { Pushed::Queued };
        Ok((pushed, first))
    }

    /// Queues bytes that are already framed, such as tungstenite's reply to a ping, and writes
    /// them at once when nothing waits before them. Dropped when the socket is ending.
    pub fn push_framed(&self, bytes: Bytes) {
        let mut state = self.lock();
        if state.ending.is_some() {
            return;
        }
        if state.frames.len() >= self.limits.frames {
            state.dropped += state.clear();
            state.ending = Some(Ending::Close(close::SLOW_CONSUMER, "outbound queue full"));
            drop(state);
            self.ready.notify_one();
            return;
        }
        let first = state.frames.is_empty();
        state.bytes += bytes.len();
        state.frames.push_back(Queued::framed(bytes));
        drop(state);
        if first {
            self.write_now();
        }
    }

    /// Writes what is queued, unless a write is blocked; a write that would block hands the rest
    /// to the writer task.
    pub fn write_now(&self) {
        let Some(wire) = &self.wire else {
            self.ready.notify_one();
            return;
        };
        let mut traces = Vec::new();
        let mut state = self.lock();
        if state.blocked || state.failed.is_some() {
            return;
        }
        let written = state.write_to(wire, &mut traces);
        let wake_writer = !matches!(written, Written::All);
        state.record(written);
        self.release(state, traces);
        if wake_writer {
            self.ready.notify_one();
        }
    }

    /// Unlocks the state after a write, marks the frames it finished as written, and wakes the
    /// replays waiting for room.
    fn release(&self, mut state: MutexGuard<'_, State>, mut traces: Vec<FrameTrace>) {
        let waiting_for_room = std::mem::take(&mut state.waiting_for_room);
        drop(state);
        delivery_trace::mark_written(&mut traces);
        if waiting_for_room {
            self.drained.notify_waiters();
        }
    }

    /// Writes what is queued for the writer task, including the ending's close frame, and
    /// returns the writer's next step.
    pub fn write_pending(&self) -> Pending {
        let mut traces = Vec::new();
        let mut state = self.lock();
        let pending = loop {
            if let Some(err) = &state.failed {
                break Pending::Failed(err.clone());
            }
            if state.blocked {
                break Pending::Blocked;
            }
            if state.frames.is_empty() {
                // The frames before the ending are written; its close frame goes next.
                if state.queue_close() {
                    continue;
                }
                break state.ending.map_or(Pending::Nothing, Pending::Ended);
            }
            let written = match &self.wire {
                Some(wire) => state.write_to(wire, &mut traces),
                None => Written::Failed(io::Error::other("the queue has no socket to write to")),
            };
            state.record(written);
        };
        self.release(state, traces);
        pending
    }

    /// Waits until the socket takes bytes again after a blocked write.
    ///
    /// # Errors
    /// Fails when the socket's readiness cannot be polled.
    pub async fn writable(&self) -> io::Result<()> {
        if let Some(wire) = &self.wire {
            wire.writable().await?;
        }
        self.lock().blocked = false;
        Ok(())
    }

    /// Asks the writer to end the socket after the frames already queued. The first ending wins.
    pub fn end(&self, ending: Ending) {
        let mut state = self.lock();
        if state.ending.is_none() {
            state.ending = Some(ending);
        }
        drop(state);
        self.ready.notify_one();
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

    /// Moves every queued text frame into `batch` as if written, and returns the ending, if one
    /// was requested. For tests of the code that pushes, on a queue without a wire.
    pub fn drain_into(&self, batch: &mut Vec<Utf8Bytes>) -> Option<Ending> {
        let mut traces = Vec::new();
        let mut state = self.lock();
        for queued in state.frames.drain(..) {
            if queued.is_text()
                && let Ok(frame) = Utf8Bytes::try_from(queued.payload)
            {
                batch.push(frame);
            }
            traces.extend(queued.trace);
        }
        state.bytes = 0;
        let ending = state.ending;
        drop(state);
        delivery_trace::mark_written(&mut traces);
        self.drained.notify_waiters();
        ending
    }

    /// Waits until the queue with a frame of `bytes` added would be at most half full, in frames
    /// and in bytes, or until the socket is ending. A replay waits here before each frame, so it
    /// cannot overflow the queue of a client that reads, and leaves half of it to live frames.
    pub async fn wait_for_room(&self, bytes: usize) {
        loop {
            // Register before looking, so a write between the look and the wait is not missed.
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let mut state = self.lock();
                let frames_fit = 2 * (state.frames.len() + 1) <= self.limits.frames;
                let bytes_fit = 2 * (state.bytes + bytes) <= self.limits.bytes;
                if state.ending.is_some() || state.frames.is_empty() || (frames_fit && bytes_fit) {
                    return;
                }
                state.waiting_for_room = true;
            }
            drained.await;
        }
    }

    /// Waits until the writer has something to do: a blocked write, an ending, or (on a queue
    /// without a wire) a push.
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
