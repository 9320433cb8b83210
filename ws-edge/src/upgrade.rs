//! The WebSocket upgrade, finished here instead of by `warp::ws`.
//!
//! warp 0.4.3's `Ws` exposes only the message, frame and write-buffer limits of tungstenite's
//! `WebSocketConfig`, so every socket would get tungstenite 0.29's default read buffer of 128 KiB,
//! allocated up front. Its `Message::text` also takes a `String`, so each recipient would need its
//! own copy of an event frame. This filter keeps `warp::ws()` for validating the handshake
//! headers, takes hyper's upgrade handle from the request, and builds the tungstenite socket with
//! our own config.
//!
//! tungstenite only reads. The connection's TCP stream is split: its read half feeds tungstenite,
//! and its write half goes to the socket's [`Outbound`] queue, which writes event frames straight
//! to the socket (see [`crate::outbound`]). The few frames tungstenite writes itself, its replies
//! to pings and to the client's close, enter that queue too, so that every write keeps its place.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use warp::Filter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use crate::outbound::{Outbound, QueueLimits};
use crate::wire::Wire;

/// Bytes tungstenite reads from the socket at a time; its buffer grows only for larger frames.
/// Client frames are small (a subscribe is about 100 bytes, a refresh with its token about
/// 1 KiB), and every idle socket keeps this buffer, so it is small too.
pub const READ_BUFFER_BYTES: usize = 512;
/// Bytes tungstenite collects before handing its own frames (pongs, close replies) over.
pub const WRITE_BUFFER_BYTES: usize = 1024;

/// The client's side of an upgraded connection, read by tungstenite.
pub type WebSocket = WebSocketStream<ClientIo>;

/// An upgraded connection: the client's frames, and the queue of the frames sent to it.
pub struct Connection {
    /// The client's frames.
    pub socket: WebSocket,
    /// The frames for the client, written to the connection's write half.
    pub queue: Arc<Outbound>,
}

/// The I/O tungstenite runs on: reads come from the TCP read half, after any bytes hyper read
/// past the handshake, and writes go to the socket's outbound queue as framed bytes.
pub struct ClientIo {
    read: OwnedReadHalf,
    /// Bytes the client sent right behind its handshake, which hyper had already read.
    early: Bytes,
    queue: Arc<Outbound>,
}

impl AsyncRead for ClientIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.early.is_empty() {
            return Pin::new(&mut this.read).poll_read(cx, buf);
        }
        let len = this.early.len().min(buf.remaining());
        buf.put_slice(&this.early[..len]);
        this.early.advance(len);
        if this.early.is_empty() {
            this.early = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // tungstenite writes whole frames, and the queue takes them without waiting.
        self.queue.push_framed(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A validated upgrade request.
pub struct Upgrade {
    on_upgrade: OnUpgrade,
    accept_key: String,
}

/// Extracts a WebSocket upgrade request: GET with the upgrade headers, version 13 and a key.
pub fn upgrade() -> impl Filter<Extract = (Upgrade,), Error = warp::Rejection> + Clone {
    // `ext::optional` must run before `ws()`, which takes the upgrade handle out of the request.
    warp::ext::optional::<OnUpgrade>()
        .and(warp::ws())
        .and(warp::header::<String>("sec-websocket-key"))
        .and_then(
            |on_upgrade: Option<OnUpgrade>, _validated: warp::ws::Ws, key: String| async move {
                let on_upgrade = on_upgrade.ok_or_else(warp::reject::not_found)?;
                let accept_key = derive_accept_key(key.as_bytes());
                Ok::<_, warp::Rejection>(Upgrade { on_upgrade, accept_key })
            },
        )
}

/// Returns tungstenite's settings for a socket.
///
/// Frames and messages above `max_message_bytes` fail the read with a capacity error, which the
/// session turns into close code 1009. tungstenite writes only control frames, each at most
/// 127 bytes, and hands them to the outbound queue at once, whose limits bound them.
pub fn socket_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

impl Upgrade {
    /// Returns the `101 Switching Protocols` response, and runs `handle` on the connection
    /// (tracked by `tracker`), with an outbound queue of `limits`, once hyper hands it over.
    pub fn respond<F, Fut>(
        self,
        config: WebSocketConfig,
        limits: QueueLimits,
        tracker: &TaskTracker,
        handle: F,
    ) -> Response
    where
        F: FnOnce(Connection) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Ok(accept) = HeaderValue::from_str(&self.accept_key) else {
            // A base64 digest is always a valid header value; this branch only satisfies the type.
            return status(StatusCode::BAD_REQUEST);
        };
        let upgrade = async move {
            let upgraded = match self.on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(err) => return tracing::debug!(error = %err, "websocket upgrade failed"),
            };
            // The accept loop serves every connection as a `TokioIo<TcpStream>`, see
            // `notify_proto::http_server`.
            let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => parts,
                Err(_) => return tracing::error!("websocket upgrade of a connection that is not TCP; dropped"),
            };
            let (read, write) = parts.io.into_inner().into_split();
            let queue = Arc::new(Outbound::with_wire(limits, Wire::new(write)));
            let io = ClientIo {
                read,
                early: detach(parts.read_buf),
                queue: queue.clone(),
            };
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            handle(Connection { socket, queue }).await;
        };
        tracker.spawn(upgrade.in_current_span());

        let mut response = status(StatusCode::SWITCHING_PROTOCOLS);
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        response
    }
}

/// Returns `early` in an allocation of its own. hyper hands over the bytes it read past the
/// handshake as a view of its read buffer, at least 8 KiB, which would otherwise stay allocated
/// for as long as the socket is open, even when the view is empty.
fn detach(early: Bytes) -> Bytes {
    if early.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&early)
    }
}

/// Returns an empty response with a status code.
pub fn status(code: StatusCode) -> Response {
    let mut response = Response::default();
    *response.status_mut() = code;
    response
}
