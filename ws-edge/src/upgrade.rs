//! The WebSocket upgrade, finished here instead of by `warp::ws`.
//!
//! warp 0.4.3's `Ws` exposes only the message, frame and write-buffer limits of tungstenite's
//! `WebSocketConfig`, so every socket would get tungstenite 0.29's default read buffer of 128 KiB,
//! allocated up front. Its `Message::text` also takes a `String`, so each recipient would need its
//! own copy of an event frame. This filter keeps `warp::ws()` for validating the handshake
//! headers, takes hyper's upgrade handle from the request, and builds the tungstenite socket with
//! our own config, whose `Message::Text` takes the shared `Utf8Bytes`.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use warp::Filter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

/// Bytes tungstenite reads from the socket at a time; its buffer grows only for larger frames.
/// Client frames are small (a subscribe is about 100 bytes, a refresh with its token about
/// 1 KiB), and every idle socket keeps this buffer, so it is small too.
pub const READ_BUFFER_BYTES: usize = 512;
/// Bytes tungstenite collects before writing to the socket without a flush. The writer flushes
/// after each batch, so this only splits large batches into several writes.
pub const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// An upgraded connection, the type a session runs on.
pub type WebSocket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

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
/// session turns into close code 1009. The write buffer has no cap of its own: the writer feeds
/// at most one batch before a flush, and a batch is bounded by the outbound queue, whose bytes
/// plus one frame of any size (an event may be larger than `SOCKET_QUEUE_BYTES`).
pub fn socket_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

impl Upgrade {
    /// Returns the `101 Switching Protocols` response, and runs `handle` on the socket (tracked
    /// by `tracker`) once hyper hands the connection over.
    pub fn respond<F, Fut>(self, config: WebSocketConfig, tracker: &TaskTracker, handle: F) -> Response
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Ok(accept) = HeaderValue::from_str(&self.accept_key) else {
            // A base64 digest is always a valid header value; this branch only satisfies the type.
            return status(StatusCode::BAD_REQUEST);
        };
        let upgrade = async move {
            match self.on_upgrade.await {
                Ok(upgraded) => {
                    let io = TokioIo::new(upgraded);
                    handle(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await).await;
                }
                Err(err) => tracing::debug!(error = %err, "websocket upgrade failed"),
            }
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

/// Returns an empty response with a status code.
pub fn status(code: StatusCode) -> Response {
    let mut response = Response::default();
    *response.status_mut() = code;
    response
}
