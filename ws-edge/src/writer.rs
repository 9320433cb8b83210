//! The writer task of one socket: drains the outbound queue into the socket, pings idle peers and
//! ends the socket with the requested close code.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{Sink, SinkExt};
use notify_proto::protocol::close;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::delivery_trace;
use crate::hub::Socket;
use crate::outbound::Ending;

/// Time one write (a batch of frames and its flush, a ping or a close) may take before the
/// socket is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Period of the idle check: a peer that sent nothing for this long gets a WebSocket ping.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A peer that sent nothing, not even a pong, for this long is closed with [`IDLE_CLOSE_CODE`].
/// The check runs every [`PING_INTERVAL`], so the close comes within `IDLE_TIMEOUT + PING_INTERVAL`
/// of the last frame.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Close code for an idle peer: 1001, going away.
pub const IDLE_CLOSE_CODE: u16 = 1001;

/// When the peer last sent anything, shared by the reader (which records it) and the writer
/// (which pings and closes idle peers).
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Records that the peer sent a frame.
    pub fn touch(&self) {
        let elapsed = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(elapsed, Ordering::Relaxed);
    }

    /// Returns how long the peer has been silent.
    pub fn idle(&self) -> Duration {
        let elapsed = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(elapsed.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Error that stopped the writer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// A write did not finish within [`WRITE_TIMEOUT`].
    #[error("write timed out after {WRITE_TIMEOUT:?}")]
    TimedOut,
    /// The socket failed.
    #[error("write failed: {0}")]
    Failed(String),
}

/// Writes queued frames until the queue ends the socket or a write fails. When `shutdown` is
/// cancelled, the socket closes with 1012 after the frames already queued.
///
/// # Errors
/// Fails when a write fails or times out; the socket is then dropped without a close frame.
pub async fn run<S>(
    mut sink: S,
    socket: Arc<Socket>,
    activity: Arc<Activity>,
    shutdown: CancellationToken,
) -> Result<Ending, WriteError>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let mut batch = Vec::new();
    let mut traces = Vec::new();
    let mut idle_check = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    idle_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // The writes are boxed so that an idle writer's task holds only the small wait state
        // below, not the larger state of a write in progress.
        let ending = socket.queue.drain_traced_into(&mut batch, &mut traces);
        if !batch.is_empty() {
            Box::pin(write_batch(&mut sink, &mut batch, &socket)).await?;
        }
        delivery_trace::mark_written(&mut traces);
        if let Some(ending) = ending {
            Box::pin(finish(&mut sink, ending)).await?;
            return Ok(ending);
        }
        tokio::select! {
            () = socket.queue.wait() => {}
            _ = idle_check.tick() => Box::pin(check_idle(&mut sink, &socket, &activity)).await?,
            () = shutdown.cancelled(), if !socket.queue.is_ending() => {
                socket.queue.end(Ending::Close(close::SERVICE_RESTART, "server restarting"));
            }
        }
    }
}

/// Writes every frame in `batch`, then flushes once, so frames that piled up share syscalls.
///
/// A write blocked on a peer that stopped reading is abandoned as soon as the queue overflows,
/// so the writer goes on to the 4008 close at once. The frames of the abandoned batch are
/// dropped like the queued ones; tungstenite keeps what it buffered and writes it before
/// the close frame.
async fn write_batch<S>(sink: &mut S, batch: &mut Vec<Utf8Bytes>, socket: &Socket) -> Result<(), WriteError>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    if batch.is_empty() {
        return Ok(());
    }
    let write = async {
        for frame in batch.drain(..) {
            sink.feed(Message::Text(frame)).await?;
        }
        sink.flush().await
    };
    let result = tokio::select! {
        result = with_timeout(write) => result,
        () = socket.queue.slow_consumer() => Ok(()),
    };
    batch.clear();
    result
}

/// Pings a silent peer, and ends a peer silent for [`IDLE_TIMEOUT`].
async fn check_idle<S>(sink: &mut S, socket: &Socket, activity: &Activity) -> Result<(), WriteError>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let idle = activity.idle();
    if idle >= IDLE_TIMEOUT {
        tracing::debug!(idle_ms = idle.as_millis() as u64, "closing idle socket");
        socket.queue.end(Ending::Close(IDLE_CLOSE_CODE, "idle timeout"));
    } else if idle >= PING_INTERVAL {
        with_timeout(sink.send(Message::Ping(Default::default()))).await?;
    }
    Ok(())
}

/// Sends the close frame, or flushes what tungstenite still buffers (such as its reply to the peer's
/// close).
async fn finish<S>(sink: &mut S, ending: Ending) -> Result<(), WriteError>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    match ending {
        Ending::Close(code, reason) => {
            let frame = CloseFrame {
                code: code.into(),
                reason: reason.into(),
            };
            with_timeout(sink.send(Message::Close(Some(frame)))).await
        }
        Ending::Stop => with_timeout(sink.flush()).await,
    }
}

async fn with_timeout(write: impl Future<Output = Result<(), tungstenite::Error>>) -> Result<(), WriteError> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) | Ok(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => Ok(()),
        Ok(Err(err)) => Err(WriteError::Failed(err.to_string())),
        Err(_) => Err(WriteError::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    use crate::outbound::{Outbound, QueueLimits};

    use super::*;

    /// A sink that accepts every message but whose flush never completes, like a socket whose
    /// peer stopped reading.
    #[derive(Clone, Default)]
    struct StuckSink {
        accepted: Arc<Mutex<Vec<Message>>>,
    }

    impl Sink<Message> for StuckSink {
        type Error = tungstenite::Error;

        fn poll_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Self::Error> {
            self.accepted.lock().expect("lock").push(message);
            Ok(())
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }

        fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn overflow_closes_while_write_is_stuck() {
        let socket = Arc::new(Socket {
            conn_id: "c".into(),
            user_id: "u".into(),
            queue: Outbound::new(QueueLimits { frames: 2, bytes: 1024 }),
        });
        let sink = StuckSink::default();
        let activity = Arc::new(Activity::default());
        let writer = tokio::spawn(run(sink.clone(), socket.clone(), activity, CancellationToken::new()));
        socket.queue.push("first".into()).expect("fits");
        tokio::time::sleep(Duration::from_millis(10)).await;

        // The writer is stuck flushing "first"; the queue fills and overflows behind it.
        for frame in ["a", "b", "c"] {
            let _ = socket.queue.push(frame.into());
        }
        let overflowed = Instant::now();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let last = sink.accepted.lock().expect("lock").last().cloned();
        let Some(Message::Close(Some(frame))) = last else {
            panic!("no close frame was sent; the last message was {last:?}");
        };
        assert_eq!(u16::from(frame.code), close::SLOW_CONSUMER);
        assert!(overflowed.elapsed() < WRITE_TIMEOUT, "{:?}", overflowed.elapsed());

        // The close frame cannot be flushed either, so the writer gives up after the timeout.
        let result = writer.await.expect("writer task");
        assert_eq!(result, Err(WriteError::TimedOut));
    }
}
