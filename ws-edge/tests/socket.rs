//! Real sockets: `serve` on 127.0.0.1:0 over the in-process stream, driven by a tokio-tungstenite
//! client.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use notify_proto::channel::partition_of;
use notify_proto::claims::Claims;
use notify_proto::history::{HistoryError, HistoryStore};
use notify_proto::log::{LogReader, LogWriter};
use notify_proto::memory::MemoryLog;
use notify_proto::pb::{Event, ReadPartitionResponse};
use notify_proto::protocol::close;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use ws_edge::Config;

const SECRET: &str = "socket-test-secret-0123456789abcdef";
const PARTITIONS: u32 = 4;
const PATIENCE: Duration = Duration::from_secs(5);

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The store of record served by the in-process stream itself, enough for tests without gaps.
struct LogHistory(Arc<MemoryLog>);

#[async_trait]
impl HistoryStore for LogHistory {
    async fn read_partition(
        &self,
        partition: u32,
        after: u64,
        limit: u32,
    ) -> Result<ReadPartitionResponse, HistoryError> {
        let unavailable = |err: notify_proto::log::LogError| HistoryError::Unavailable(err.to_string());
        let page = self
            .0
            .range(partition, after, limit as usize)
            .await
            .map_err(unavailable)?;
        let head = LogReader::last_seq(&*self.0, partition).await.map_err(unavailable)?;
        Ok(ReadPartitionResponse {
            events: page.events,
            head,
            oldest: page.first_seq,
        })
    }

    async fn heads(&self) -> Result<Vec<u64>, HistoryError> {
        let mut heads = Vec::new();
        for partition in 0..PARTITIONS {
            let head = LogReader::last_seq(&*self.0, partition).await;
            heads.push(head.map_err(|err| HistoryError::Unavailable(err.to_string()))?);
        }
        Ok(heads)
    }
}

/// A running edge. Dropping it without `stop` leaves the server to the test runtime's end.
struct Edge {
    addr: std::net::SocketAddr,
    log: Arc<MemoryLog>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<anyhow::Result<()>>,
}

impl Edge {
    async fn start() -> Self {
        let mut config = Config::with_secret(SECRET);
        config.partitions = PARTITIONS;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound address");
        let log = Arc::new(MemoryLog::new(PARTITIONS, 100));
        let history = Arc::new(LogHistory(log.clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        let reader: Arc<dyn LogReader> = log.clone();
        let server = tokio::spawn(async move {
            ws_edge::serve(&config, reader, history, listener, async {
                let _ = stopped.await;
            })
            .await
        });
        Self {
            addr,
            log,
            stop: Some(stop),
            server,
        }
    }

    fn url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.addr)
    }

    /// Connects with `?token=` and returns the client and its `connected` frame.
    async fn connect(&self, user: &str) -> (Client, Value) {
        let mut client = open(&self.url(&format!("?token={}", token(user, &[])))).await;
        let connected = recv(&mut client).await;
        assert_eq!(connected["type"], "connected", "{connected}");
        (client, connected)
    }

    /// Appends events of `channel` with the given sequence numbers to its partition.
    async fn publish(&self, channel: &str, seqs: std::ops::RangeInclusive<u64>) {
        let partition = partition_of(channel, PARTITIONS);
        let events: Vec<Event> = seqs
            .map(|seq| Event {
                id: format!("e{seq}"),
                partition,
                seq,
                channel: channel.into(),
                r#type: "post.created".into(),
                data: format!(r#"{{"n":{seq},"t":"שלום"}}"#),
                ts_ms: 1,
                ..Event::default()
            })
            .collect();
        LogWriter::append(&*self.log, partition, &events)
            .await
            .expect("partition exists");
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(20), self.server).await;
        result
            .expect("serve returned in time")
            .expect("serve task")
            .expect("serve succeeded");
    }
}

fn token(user: &str, channels: &[&str]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = Claims {
        sub: user.into(),
        exp: now + 600,
        iat: Some(now),
        channels: channels.iter().map(|&channel| channel.to_owned()).collect(),
    };
    let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("secret is not empty");
    jsonwebtoken::encode(&Header::default(), &claims, &key).expect("claims serialize")
}

async fn open(url: &str) -> Client {
    let connected = tokio::time::timeout(PATIENCE, connect_async(url)).await;
    connected.expect("handshake in time").expect("handshake succeeds").0
}

async fn send(client: &mut Client, frame: Value) {
    client
        .send(Message::text(frame.to_string()))
        .await
        .expect("send succeeds");
}

/// Returns the next text frame, parsed, skipping up to 100 pings and pongs.
async fn recv(client: &mut Client) -> Value {
    for _ in 0..100 {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("a frame in time");
        match message.expect("socket open").expect("frame reads") {
            Message::Text(text) => return serde_json::from_str(&text).expect("frame is JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
    panic!("no text frame among 100 control frames");
}

/// Reads until the server closes and returns the close code; `None` when it closed without one.
async fn close_code(client: &mut Client) -> Option<u16> {
    for _ in 0..100 {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("the socket ends in time");
        match message {
            Some(Ok(Message::Close(frame))) => return frame.map(|frame| frame.code.into()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
    None
}

#[tokio::test]
async fn subscriber_receives_published_event() {
    let edge = Edge::start().await;
    let (mut client, connected) = edge.connect("alice").await;
    assert_eq!(connected["userId"], "alice");
    assert!(connected["connId"].as_str().is_some_and(|id| !id.is_empty()));

    send(&mut client, json!({"type": "subscribe", "channel": "news"})).await;
    let subscribed = recv(&mut client).await;
    assert_eq!(
        subscribed,
        json!({"type": "subscribed", "channel": "news", "position": 0})
    );

    edge.publish("news", 1..=1).await;
    let event = recv(&mut client).await;
    assert_eq!(event["type"], "post.created");
    assert_eq!(event["channel"], "news");
    assert_eq!(event["id"], "e1");
    assert_eq!(event["position"], 1);
    assert_eq!(event["data"], json!({"n": 1, "t": "שלום"}));
    edge.stop().await;
}

#[tokio::test]
async fn control_frames_are_answered() {
    let edge = Edge::start().await;
    let (mut client, _) = edge.connect("alice").await;
    send(&mut client, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut client).await, json!({"type": "pong"}));

    client.send(Message::text("not json")).await.expect("send succeeds");
    assert_eq!(recv(&mut client).await["code"], "bad_request");
    send(&mut client, json!({"type": "dance"})).await;
    assert_eq!(recv(&mut client).await["code"], "unknown_type");

    send(&mut client, json!({"type": "subscribe", "channel": "user:bob"})).await;
    let forbidden = recv(&mut client).await;
    assert_eq!(forbidden["code"], "forbidden");
    assert_eq!(forbidden["channel"], "user:bob");
    send(&mut client, json!({"type": "subscribe", "channel": "news", "since": 5})).await;
    assert_eq!(recv(&mut client).await["code"], "invalid_position");
    send(&mut client, json!({"type": "unsubscribe", "channel": "news"})).await;
    assert_eq!(recv(&mut client).await["code"], "not_subscribed");
    edge.stop().await;
}

#[tokio::test]
async fn auth_frame_and_resume_replay_missed_events() {
    let edge = Edge::start().await;
    edge.publish("feed", 1..=3).await;
    let mut client = open(&edge.url("")).await;
    send(&mut client, json!({"type": "auth", "token": token("alice", &[])})).await;
    assert_eq!(recv(&mut client).await["type"], "connected");

    // The reader may still be catching up with the three events. `subscribed` carries the head it
    // had reached, and the replay covers everything up to that head.
    send(&mut client, json!({"type": "subscribe", "channel": "feed", "since": 1})).await;
    let subscribed = recv(&mut client).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["recovered"], true);
    edge.publish("feed", 4..=4).await;
    let positions: Vec<Value> = [
        recv(&mut client).await,
        recv(&mut client).await,
        recv(&mut client).await,
    ]
    .iter()
    .map(|event| event["position"].clone())
    .collect();
    assert_eq!(positions, [json!(2), json!(3), json!(4)]);
    edge.stop().await;
}

#[tokio::test]
async fn oversized_message_closes_1009() {
    let edge = Edge::start().await;
    let (mut client, _) = edge.connect("alice").await;
    let oversized = "x".repeat(ws_edge::config::DEFAULT_MAX_MESSAGE_BYTES + 1);
    client.send(Message::text(oversized)).await.expect("send succeeds");
    assert_eq!(close_code(&mut client).await, Some(close::MESSAGE_TOO_BIG));
    edge.stop().await;
}

#[tokio::test]
async fn bad_tokens_close_before_anything_is_sent() {
    let edge = Edge::start().await;
    let mut without = open(&edge.url("")).await;
    send(&mut without, json!({"type": "subscribe", "channel": "news"})).await;
    assert_eq!(close_code(&mut without).await, Some(close::NO_TOKEN));

    let mut invalid = open(&edge.url("?token=not.a.jwt")).await;
    assert_eq!(close_code(&mut invalid).await, Some(close::INVALID_TOKEN));
    edge.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1012() {
    let edge = Edge::start().await;
    let (mut client, _) = edge.connect("alice").await;
    let Edge {
        addr,
        log,
        stop,
        server,
    } = edge;
    let _ = stop.map(|stop| stop.send(()));
    assert_eq!(close_code(&mut client).await, Some(close::SERVICE_RESTART));
    drop(client);
    let edge = Edge {
        addr,
        log,
        stop: None,
        server,
    };
    edge.stop().await;
}

/// Sends a plain HTTP GET and returns the status code and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write request");
    let mut response = String::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response)).await;
    read.expect("response in time").expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn http_endpoints_answer() {
    let edge = Edge::start().await;
    assert_eq!(http_get(edge.addr, "/healthz").await, (200, "ok".to_owned()));
    let mut ready = http_get(edge.addr, "/readyz").await.0;
    for _ in 0..50 {
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        ready = http_get(edge.addr, "/readyz").await.0;
    }
    assert_eq!(ready, 200);
    let (status, page) = http_get(edge.addr, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>Notifications demo</title>"));
    let (status, config) = http_get(edge.addr, "/demo/config").await;
    assert_eq!(status, 200);
    let config: Value = serde_json::from_str(&config).expect("config is JSON");
    assert_eq!(config["publishCommand"], ws_edge::config::DEFAULT_DEMO_PUBLISH_COMMAND);
    edge.stop().await;
}
