//! A bare WebSocket to the edge, for tests that need control over the TCP socket (a small
//! receive buffer for a client that stops reading) or over the frames, which
//! [`crate::client::Client`] hides.

use anyhow::{Context, bail, ensure};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::env::TestEnv;
use crate::patience;

/// A WebSocket over a plain TCP stream.
pub type RawSocket = WebSocketStream<TcpStream>;

/// Opens a socket authenticated with `token` and reads its `connected` frame. With
/// `receive_buffer`, the kernel's receive buffer is set to that many bytes before connecting.
///
/// # Errors
/// Fails when the connection, the handshake or the `connected` frame fails or times out.
pub async fn open_raw(env: &TestEnv, token: &str, receive_buffer: Option<u32>) -> anyhow::Result<RawSocket> {
    let socket = TcpSocket::new_v4()?;
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let stream = socket.connect(env.edge).await?;
    let url = format!("{}?token={token}", env.ws_url());
    let handshake = tokio_tungstenite::client_async(url, stream);
    let (mut socket, _) = tokio::time::timeout(patience(), handshake)
        .await
        .context("handshake timed out")??;
    let connected = next_json(&mut socket).await?;
    ensure!(connected["type"] == "connected", "expected connected, got {connected}");
    Ok(socket)
}

/// Returns the next text frame as JSON, skipping pings and pongs.
///
/// # Errors
/// Fails when no frame arrives in time, the socket closes, or the frame is not JSON.
pub async fn next_json(socket: &mut RawSocket) -> anyhow::Result<Value> {
    loop {
        let message = tokio::time::timeout(patience(), socket.next())
            .await
            .context("no frame in time")?;
        match message {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(text.as_str())?),
            Some(Ok(Message::Close(frame))) => bail!("connection closed: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => bail!("socket error: {err}"),
            None => bail!("connection ended"),
        }
    }
}
