//! A WebSocket client that speaks the client protocol, with timeouts on every wait.

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::patience;

/// A connected client socket.
pub struct Client {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `connected` frame the server sent, when the client has authenticated.
    pub connected: Option<Value>,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The server sent a close frame with this code.
    Closed(u16),
    /// The connection ended without a close frame.
    Dropped,
}

impl Client {
    /// Opens a socket to `url` without authenticating.
    ///
    /// # Errors
    /// Fails when the WebSocket handshake fails.
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        let (socket, _) = tokio::time::timeout(patience(), connect_async(url))
            .await
            .context("connect timed out")??;
        Ok(Self {
            socket,
            connected: None,
        })
    }

    /// Connects with `?token=` and waits for the `connected` frame.
    ///
    /// # Errors
    /// Fails when the handshake fails or the first frame is not `connected`.
    pub async fn connect_with_token(ws_url: &str, token: &str) -> anyhow::Result<Self> {
        let mut client = Self::open(&format!("{ws_url}?token={token}")).await?;
        let frame = client.recv().await?;
        if frame["type"] != "connected" {
            bail!("expected a connected frame, got {frame}");
        }
        client.connected = Some(frame);
        Ok(client)
    }

    /// Sends a JSON frame.
    ///
    /// # Errors
    /// Fails when the socket is closed.
    pub async fn send(&mut self, frame: Value) -> anyhow::Result<()> {
        self.socket.send(Message::text(frame.to_string())).await?;
        Ok(())
    }

    /// Sends raw text, which need not be JSON.
    ///
    /// # Errors
    /// Fails when the socket is closed.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.socket.send(Message::text(text.to_owned())).await?;
        Ok(())
    }

    /// Waits for the next text frame and returns it unparsed.
    ///
    /// # Errors
    /// Fails on timeout, or when the connection ends first.
    pub async fn recv_text(&mut self) -> anyhow::Result<String> {
        loop {
            let message = tokio::time::timeout(patience(), self.socket.next())
                .await
                .context("no frame in time")?;
            match message {
                Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
                Some(Ok(Message::Close(frame))) => bail!("connection closed: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(err)) => bail!("socket error: {err}"),
                None => bail!("connection ended"),
            }
        }
    }

    /// Waits for the next text frame and parses it as JSON.
    ///
    /// # Errors
    /// Fails on timeout, when the connection ends, or when the frame is not JSON.
    pub async fn recv(&mut self) -> anyhow::Result<Value> {
        let text = self.recv_text().await?;
        serde_json::from_str(&text).with_context(|| format!("frame is not JSON: {text}"))
    }

    /// Subscribes to a channel and returns the `subscribed` frame.
    ///
    /// # Errors
    /// Fails when the server replies with any other frame.
    pub async fn subscribe(&mut self, channel: &str) -> anyhow::Result<Value> {
        self.send(json!({"type": "subscribe", "channel": channel})).await?;
        self.expect_type("subscribed").await
    }

    /// Subscribes with a resume position and returns the reply, whatever its type.
    ///
    /// # Errors
    /// Fails when no reply arrives.
    pub async fn subscribe_since(&mut self, channel: &str, since: Value) -> anyhow::Result<Value> {
        self.send(json!({"type": "subscribe", "channel": channel, "since": since}))
            .await?;
        self.recv().await
    }

    /// Waits for the next frame and checks its type.
    ///
    /// # Errors
    /// Fails when the next frame has another type.
    pub async fn expect_type(&mut self, expected: &str) -> anyhow::Result<Value> {
        let frame = self.recv().await?;
        if frame["type"] != expected {
            bail!("expected a {expected} frame, got {frame}");
        }
        Ok(frame)
    }

    /// Checks that nothing but the reply to a ping is waiting: sends a ping and requires the
    /// next frame to be `pong`.
    ///
    /// # Errors
    /// Fails when another frame arrives first.
    pub async fn expect_nothing_pending(&mut self) -> anyhow::Result<()> {
        self.send(json!({"type": "ping"})).await?;
        self.expect_type("pong").await.map(drop)
    }

    /// Reads until the connection ends and returns how it ended; frames before the end are
    /// skipped.
    ///
    /// # Errors
    /// Fails when the connection stays open longer than the patience.
    pub async fn ending(&mut self) -> anyhow::Result<Ending> {
        let deadline = tokio::time::Instant::now() + patience();
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .context("connection stayed open")?;
            match message {
                Some(Ok(Message::Close(Some(frame)))) => return Ok(Ending::Closed(frame.code.into())),
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return Ok(Ending::Dropped),
                Some(Ok(_)) => continue,
            }
        }
    }
}
