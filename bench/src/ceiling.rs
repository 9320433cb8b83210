//! A bare fan-out server that sets the ceiling for the same load client: tokio and
//! tokio-tungstenite with no authentication, no store and no Redis.
//!
//! It speaks the part of the client protocol the benchmarks use: `connected` after the upgrade
//! (any token is accepted), `subscribed` with the channel's position in reply to `subscribe`,
//! `pong` in reply to `ping`, and event frames encoded like the edge's. Events come in on a
//! trigger port, one JSON object `{"channel":..,"type":..,"data":..}` per line. Each event is
//! encoded once and its bytes are shared by every subscriber's bounded queue. One writer task
//! per socket drains its queue, several frames per flush when they are waiting. A socket whose
//! queue is full is closed, like a slow consumer on the edge.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::{SinkExt, StreamExt};
use notify_proto::pb::Event;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::accept_async_with_config;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Outbound queue of each socket, in frames. When it is full the socket is closed.
pub const QUEUE_CAPACITY: usize = 1024;
/// Read buffer of each server socket.
pub const READ_BUFFER_SIZE: usize = 4 * 1024;
/// Maximum trigger line length, in bytes; a longer line closes the trigger connection.
pub const MAX_TRIGGER_LINE: u64 = 64 * 1024;

/// One subscriber's queue and the token that closes its socket.
struct Subscriber {
    queue_tx: mpsc::Sender<Message>,
    close: CancellationToken,
}

#[derive(Default)]
struct ChannelState {
    position: u64,
    subscribers: HashMap<u64, Subscriber>,
}

/// Channels with their subscribers.
#[derive(Default)]
struct Hub {
    channels: Mutex<HashMap<String, ChannelState>>,
    next_connection: AtomicU64,
    slow_consumers: AtomicU64,
}

impl Hub {
    fn channels(&self) -> MutexGuard<'_, HashMap<String, ChannelState>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a subscriber and queues its `subscribed` frame under the same lock, so no event
    /// can overtake it.
    fn subscribe(&self, channel: &str, connection: u64, subscriber: Subscriber) {
        let mut channels = self.channels();
        let state = channels.entry(channel.to_owned()).or_default();
        let frame = json!({"type": "subscribed", "channel": channel, "position": state.position});
        if subscriber.queue_tx.try_send(Message::text(frame.to_string())).is_err() {
            subscriber.close.cancel();
            return;
        }
        state.subscribers.insert(connection, subscriber);
    }

    fn unsubscribe(&self, channel: &str, connection: u64) -> bool {
        let mut channels = self.channels();
        channels
            .get_mut(channel)
            .is_some_and(|state| state.subscribers.remove(&connection).is_some())
    }

    /// Encodes an event once and queues it for every subscriber of its channel.
    fn publish(&self, line: &TriggerLine) -> anyhow::Result<()> {
        let mut channels = self.channels();
        let state = channels.entry(line.channel.clone()).or_default();
        state.position += 1;
        let event = Event {
            id: uuid::Uuid::now_v7().to_string(),
            seq: state.position,
            channel: line.channel.clone(),
            r#type: line.event_type.clone(),
            data: line.data.get().to_owned(),
            ts_ms: (crate::unix_micros() / 1000) as i64,
            ..Event::default()
        };
        let frame = Message::text(notify_proto::frame::encode_event(&event)?);
        state.subscribers.retain(|_, subscriber| {
            if subscriber.queue_tx.try_send(frame.clone()).is_ok() {
                return true;
            }
            self.slow_consumers.fetch_add(1, Ordering::Relaxed);
            subscriber.close.cancel();
            false
        });
        Ok(())
    }
}

/// One trigger line.
#[derive(Deserialize)]
struct TriggerLine {
    channel: String,
    #[serde(rename = "type")]
    event_type: String,
    data: Box<RawValue>,
}

/// Frames a client sends.
#[derive(Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    channel: Option<String>,
}

/// Serves WebSocket clients on `ws_listener` and trigger connections on `trigger_listener`
/// until `shutdown` resolves, then closes every connection and returns the number of sockets
/// closed as slow consumers.
///
/// # Errors
/// Fails when accepting on a listener fails.
pub async fn run(
    ws_listener: TcpListener,
    trigger_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<u64> {
    let hub = Arc::new(Hub::default());
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = ws_listener.accept() => {
                let (stream, _) = accepted?;
                tracker.spawn(session(hub.clone(), stream, cancel.child_token()));
            }
            accepted = trigger_listener.accept() => {
                let (stream, _) = accepted?;
                tracker.spawn(trigger(hub.clone(), stream, cancel.child_token()));
            }
        }
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(hub.slow_consumers.load(Ordering::Relaxed))
}

/// Reads trigger lines and publishes each, until the connection ends or `cancel` fires.
async fn trigger(hub: Arc<Hub>, stream: TcpStream, cancel: CancellationToken) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_TRIGGER_LINE + 1);
        let read = tokio::select! {
            () = cancel.cancelled() => return,
            read = limited.read_line(&mut line) => read,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(length) if length as u64 > MAX_TRIGGER_LINE => {
                tracing::warn!(
                    max = MAX_TRIGGER_LINE,
                    "trigger line too long, closing the trigger connection"
                );
                return;
            }
            Ok(_) => {}
        }
        let published = serde_json::from_str::<TriggerLine>(&line)
            .map_err(anyhow::Error::from)
            .and_then(|event| hub.publish(&event));
        if let Err(error) = published {
            tracing::warn!(%error, "invalid trigger line, skipped");
        }
    }
}

/// Serves one WebSocket: upgrades, sends `connected`, then runs a reader loop here and a writer
/// task that drains the queue. Either side ending, or the close token, ends both and unsubscribes.
async fn session(hub: Arc<Hub>, stream: TcpStream, cancel: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_SIZE);
    let Ok(socket) = accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let connection = hub.next_connection.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut source) = socket.split();
    let (queue_tx, mut queue_rx) = mpsc::channel::<Message>(QUEUE_CAPACITY);
    let connected = json!({"type": "connected", "userId": "anonymous", "connId": connection.to_string()});
    let _ = queue_tx.try_send(Message::text(connected.to_string()));

    let writer_cancel = cancel.clone();
    let writer = tokio::spawn(async move {
        while let Some(message) = queue_rx.recv().await {
            if sink.feed(message).await.is_err() {
                break;
            }
            while let Ok(more) = queue_rx.try_recv() {
                if sink.feed(more).await.is_err() {
                    break;
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        writer_cancel.cancel();
    });

    let mut subscriptions: Vec<String> = Vec::new();
    loop {
        let message = tokio::select! {
            () = cancel.cancelled() => break,
            message = source.next() => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => continue,
        };
        let Ok(frame) = serde_json::from_str::<ClientFrame>(text.as_str()) else {
            let _ = queue_tx.try_send(error_frame("bad_request", None));
            continue;
        };
        handle_frame(&hub, connection, frame, &queue_tx, &cancel, &mut subscriptions);
    }

    for channel in &subscriptions {
        hub.unsubscribe(channel, connection);
    }
    writer.abort();
}

fn handle_frame(
    hub: &Hub,
    connection: u64,
    frame: ClientFrame,
    queue_tx: &mpsc::Sender<Message>,
    cancel: &CancellationToken,
    subscriptions: &mut Vec<String>,
) {
    match (frame.kind.as_str(), frame.channel) {
        ("ping", _) => {
            let _ = queue_tx.try_send(Message::text(r#"{"type":"pong"}"#));
        }
        ("subscribe", Some(channel)) => {
            if subscriptions.contains(&channel) {
                // A repeated subscribe (a resume) only gets the current position in reply.
                hub.unsubscribe(&channel, connection);
            } else {
                subscriptions.push(channel.clone());
            }
            let subscriber = Subscriber {
                queue_tx: queue_tx.clone(),
                close: cancel.clone(),
            };
            hub.subscribe(&channel, connection, subscriber);
        }
        ("unsubscribe", Some(channel)) => {
            subscriptions.retain(|subscribed| subscribed != &channel);
            let frame = if hub.unsubscribe(&channel, connection) {
                Message::text(json!({"type": "unsubscribed", "channel": channel}).to_string())
            } else {
                error_frame("not_subscribed", Some(&channel))
            };
            let _ = queue_tx.try_send(frame);
        }
        ("subscribe" | "unsubscribe", None) => {
            let _ = queue_tx.try_send(error_frame("bad_request", None));
        }
        _ => {
            let _ = queue_tx.try_send(error_frame("unknown_type", None));
        }
    }
}

fn error_frame(code: &str, channel: Option<&str>) -> Message {
    let mut frame = json!({"type": "error", "code": code, "message": "request not supported by the ceiling server"});
    if let Some(channel) = channel {
        frame["channel"] = channel.into();
    }
    Message::text(frame.to_string())
}
