//! The writer task of one socket. Frames are written straight from the tasks that push them (see
//! [`crate::outbound`]). This task writes the frames a full socket held back, pings idle peers and
//! ends the socket with the requested close code.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use notify_proto::protocol::close;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::hub::Socket;
use crate::outbound::{Ending, Outbound, Pending};
use crate::wire;

/// Time a socket may take no bytes while frames wait for it, before it is dropped. The time starts
/// again when the socket is asked to close, such as on overflow.
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
    /// The socket took no bytes for [`WRITE_TIMEOUT`] while frames waited.
    #[error("write timed out after {WRITE_TIMEOUT:?}")]
    TimedOut,
    /// The socket failed.
    #[error("write failed: {0}")]
    Failed(String),
}

/// Writes what the pushes could not, until the queue's ending is written or a write fails. When
/// `shutdown` is cancelled, the socket closes with 1012 after the frames already queued.
///
/// # Errors
/// Fails when a write fails or times out; the socket is then dropped without a close frame.
pub async fn run(
    socket: Arc<Socket>,
    activity: Arc<Activity>,
    shutdown: CancellationToken,
) -> Result<Ending, WriteError> {
    let mut idle_check = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    idle_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        if let Some(ending) = step(&socket.queue).await? {
            return Ok(ending);
        }
        tokio::select! {
            () = socket.queue.wait() => {}
            _ = idle_check.tick() => check_idle(&socket, &activity),
            () = shutdown.cancelled(), if !socket.queue.is_ending() => {
                socket.queue.end(Ending::Close(close::SERVICE_RESTART, "server restarting"));
            }
        }
    }
}

/// Writes what waits in `queue`, waiting for the socket whenever it is full. Returns the ending
/// once it is written, or `None` when the queue is empty and not ending.
///
/// # Errors
/// Fails when a write fails, or when the socket took no bytes for [`WRITE_TIMEOUT`].
pub async fn step(queue: &Outbound) -> Result<Option<Ending>, WriteError> {
    loop {
        match queue.write_pending() {
            Pending::Nothing => return Ok(None),
            Pending::Ended(ending) => return Ok(Some(ending)),
            Pending::Failed(err) => return Err(WriteError::Failed(err)),
            // Boxed, so that an idle writer's task holds only its small wait state.
            Pending::Blocked => match Box::pin(wait_writable(queue)).await {
                Some(Ok(())) => {}
                Some(Err(err)) => return Err(WriteError::Failed(err.to_string())),
                None => return Err(WriteError::TimedOut),
            },
        }
    }
}

/// Waits up to [`WRITE_TIMEOUT`] until the blocked socket takes bytes again. A request to end
/// the socket during the wait, such as an overflow, starts the timeout again, so that a client
/// that reads again within it still gets its close frame. Returns `None` on timeout.
async fn wait_writable(queue: &Outbound) -> Option<std::io::Result<()>> {
    let ending = queue.is_ending();
    tokio::select! {
        result = tokio::time::timeout(WRITE_TIMEOUT, queue.writable()) => result.ok(),
        () = queue.wait(), if !ending => {
            tokio::time::timeout(WRITE_TIMEOUT, queue.writable()).await.ok()
        }
    }
}

/// Writes `queue`'s close frame for `ending` and what waits before it.
///
/// # Errors
/// Fails when a write fails, or when the socket took no bytes for [`WRITE_TIMEOUT`].
pub async fn close(queue: &Outbound, ending: Ending) -> Result<(), WriteError> {
    queue.end(ending);
    step(queue).await.map(drop)
}

/// Pings a silent peer, and ends a peer silent for [`IDLE_TIMEOUT`].
fn check_idle(socket: &Socket, activity: &Activity) {
    let idle = activity.idle();
    if idle >= IDLE_TIMEOUT {
        tracing::debug!(idle_ms = idle.as_millis() as u64, "closing idle socket");
        socket.queue.end(Ending::Close(IDLE_CLOSE_CODE, "idle timeout"));
    } else if idle >= PING_INTERVAL {
        socket.queue.push_framed(wire::ping_frame());
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use tokio::net::tcp::OwnedReadHalf;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use crate::outbound::{Outbound, QueueLimits};
    use crate::wire::Wire;

    use super::*;

    /// A socket whose queue writes to a loopback connection, the client's end of it as a
    /// WebSocket, and the server's read half, which must stay open.
    async fn connected(limits: QueueLimits) -> (Arc<Socket>, WebSocketStream<TcpStream>, OwnedReadHalf) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (read, write) = server.into_split();
        let socket = Arc::new(Socket {
            conn_id: "c".into(),
            user_id: "u".into(),
            queue: Arc::new(Outbound::with_wire(limits, Wire::new(write))),
        });
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        (socket, client, read)
    }

    fn spawn_writer(socket: &Arc<Socket>) -> tokio::task::JoinHandle<Result<Ending, WriteError>> {
        let activity = Arc::new(Activity::default());
        tokio::spawn(run(socket.clone(), activity, CancellationToken::new()))
    }

    async fn read_all(client: &mut WebSocketStream<TcpStream>) -> Vec<Message> {
        let mut messages = Vec::new();
        while let Some(Ok(message)) = client.next().await {
            let closed = matches!(message, Message::Close(_));
            messages.push(message);
            if closed {
                break;
            }
        }
        messages
    }

    fn close_code(message: Option<&Message>) -> Option<u16> {
        match message {
            Some(Message::Close(Some(frame))) => Some(frame.code.into()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn every_header_size_arrives_in_order() {
        let limits = QueueLimits {
            frames: 16,
            bytes: 1 << 20,
        };
        let (socket, mut client, _read) = connected(limits).await;
        let medium = "m".repeat(300);
        let large = "ל".repeat(40_000);
        for frame in ["a", "שלום עולם", &medium, &large] {
            socket.queue.push(frame.into()).expect("fits");
        }
        socket
            .queue
            .end(Ending::Close(close::SERVICE_RESTART, "server restarting"));
        let writer = spawn_writer(&socket);

        let messages = read_all(&mut client).await;
        let texts: Vec<&str> = messages.iter().filter_map(|message| message.to_text().ok()).collect();
        assert_eq!(texts[..4], ["a", "שלום עולם", medium.as_str(), large.as_str()]);
        assert_eq!(close_code(messages.last()), Some(close::SERVICE_RESTART));
        let ending = writer.await.expect("writer task");
        assert_eq!(ending, Ok(Ending::Close(close::SERVICE_RESTART, "server restarting")));
    }

    /// Pushes large frames to a client that reads nothing until a write would block.
    fn fill_until_blocked(socket: &Socket) -> usize {
        let frame = "x".repeat(256 * 1024);
        for pushed in 1..=64 {
            socket.queue.push(frame.as_str().into()).expect("fits");
            if socket.queue.write_pending() == Pending::Blocked {
                return pushed;
            }
        }
        panic!("64 frames of 256 KiB never filled the socket's buffers");
    }

    #[tokio::test]
    async fn overflow_behind_a_blocked_write_closes_with_4008() {
        let limits = QueueLimits {
            frames: 4,
            bytes: 64 << 20,
        };
        let (socket, mut client, _read) = connected(limits).await;
        let pushed = fill_until_blocked(&socket);
        let overflow = (0..8).find_map(|_| socket.queue.push("late".into()).err());
        assert_eq!(overflow, Some(crate::outbound::PushError::Overflow));
        let writer = spawn_writer(&socket);

        let messages = read_all(&mut client).await;
        assert_eq!(close_code(messages.last()), Some(close::SLOW_CONSUMER));
        let texts = messages.len() - 1;
        assert!(
            texts <= pushed,
            "{texts} frames arrived, {pushed} were pushed before the overflow"
        );
        assert!(
            messages
                .iter()
                .all(|message| message.to_text().is_ok_and(|text| text != "late"))
        );
        assert!(socket.queue.dropped() > 0);
        assert!(writer.await.expect("writer task").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn peer_that_never_reads_times_out() {
        let limits = QueueLimits {
            frames: 4,
            bytes: 64 << 20,
        };
        let (socket, _client, _read) = connected(limits).await;
        fill_until_blocked(&socket);
        let writer = spawn_writer(&socket);
        assert_eq!(writer.await.expect("writer task"), Err(WriteError::TimedOut));
    }
}
