//! Real sockets: `serve` on 127.0.0.1:0 over the in-process stream, driven by a tokio-tungstenite
//! client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use notify_proto::channel::partition_of;
use notify_proto::claims::Claims;
use notify_proto::history::{HistoryError, HistoryStore};
use notify_proto::log::{Cursor, LogError, LogReader, LogWriter, RangePage};
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

/// The in-process stream as the edge reads it, with a switch that makes every read fail, as
/// when Redis is down.
struct SwitchedLog {
    log: Arc<MemoryLog>,
    failing: Arc<AtomicBool>,
}

#[async_trait]
impl LogReader for SwitchedLog {
    async fn read(&self, cursors: &[Cursor], block: Duration, count: usize) -> Result<Vec<Event>, LogError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(LogError::Unavailable("the test switched the stream off".into()));
        }
        LogReader::read(&*self.log, cursors, block.min(Duration::from_millis(200)), count).await
    }

    async fn range(&self, partition: u32, after: u64, limit: usize) -> Result<RangePage, LogError> {
        self.log.range(partition, after, limit).await
    }

    async fn last_seq(&self, partition: u32) -> Result<u64, LogError> {
        LogReader::last_seq(&*self.log, partition).await
    }
}

/// A running edge. Dropping it without `stop` leaves the server to the test runtime's end.
struct Edge {
    addr: std::net::SocketAddr,
    log: Arc<MemoryLog>,
    /// Makes the edge's stream reads fail while true.
    reads_fail: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<anyhow::Result<()>>,
}

impl Edge {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        Self::start_on(listener, configure)
    }

    fn start_on(listener: TcpListener, configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::with_secret(SECRET);
        config.partitions = PARTITIONS;
        config.max_sockets = Some(1000);
        configure(&mut config);
        let addr = listener.local_addr().expect("bound address");
        let log = Arc::new(MemoryLog::new(PARTITIONS, 100));
        let history = Arc::new(LogHistory(log.clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        let reads_fail = Arc::new(AtomicBool::new(false));
        let reader: Arc<dyn LogReader> = Arc::new(SwitchedLog {
            log: log.clone(),
            failing: reads_fail.clone(),
        });
        let server = tokio::spawn(async move {
            ws_edge::serve(&config, reader, history, &Default::default(), listener, None, async {
                let _ = stopped.await;
            })
            .await
        });
        Self {
            addr,
            log,
            reads_fail,
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
        reads_fail,
        stop,
        server,
    } = edge;
    let _ = stop.map(|stop| stop.send(()));
    assert_eq!(close_code(&mut client).await, Some(close::SERVICE_RESTART));
    drop(client);
    let edge = Edge {
        addr,
        log,
        reads_fail,
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

/// Polls `/readyz` every 100 ms, at most 150 times, until it returns `status`; returns the last.
async fn wait_for_readyz(addr: std::net::SocketAddr, status: u16) -> u16 {
    let mut last = 0;
    for _ in 0..150 {
        last = http_get(addr, "/readyz").await.0;
        if last == status {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test]
async fn failing_stream_reads_fail_readiness_and_resumes() {
    let edge = Edge::start().await;
    assert_eq!(wait_for_readyz(edge.addr, 200).await, 200);
    let (mut client, _) = edge.connect("alice").await;
    send(&mut client, json!({"type":"subscribe","channel":"news"})).await;
    let position = recv(&mut client).await["position"].clone();

    // While reads fail, a resume cannot know what it missed, and the edge turns not ready after
    // its grace.
    edge.reads_fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(
        &mut client,
        json!({"type":"subscribe","channel":"news","since":position}),
    )
    .await;
    let refused = recv(&mut client).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert_eq!(wait_for_readyz(edge.addr, 503).await, 503);

    // The failed resume left the subscription in place, and reading again restores both.
    edge.reads_fail.store(false, Ordering::SeqCst);
    assert_eq!(wait_for_readyz(edge.addr, 200).await, 200);
    edge.publish("news", 1..=1).await;
    let event = recv(&mut client).await;
    assert_eq!(event["position"], 1, "{event}");
    send(&mut client, json!({"type":"subscribe","channel":"news","since":0})).await;
    let resumed = recv(&mut client).await;
    assert_eq!(resumed["type"], "subscribed", "{resumed}");
    assert_eq!(resumed["recovered"], true, "{resumed}");
    edge.stop().await;
}

#[tokio::test]
async fn rejected_resubscribe_keeps_subscription() {
    let edge = Edge::start().await;
    let (mut client, _) = edge.connect("alice").await;
    send(&mut client, json!({"type":"subscribe","channel":"news"})).await;
    assert_eq!(recv(&mut client).await["type"], "subscribed");
    send(
        &mut client,
        json!({"type":"subscribe","channel":"news","since":999_999}),
    )
    .await;
    let rejected = recv(&mut client).await;
    assert_eq!(rejected["code"], "invalid_position", "{rejected}");

    edge.publish("news", 1..=1).await;
    let event = recv(&mut client).await;
    assert_eq!(event["type"], "post.created", "{event}");
    assert_eq!(event["position"], 1, "{event}");
    send(&mut client, json!({"type":"unsubscribe","channel":"news"})).await;
    assert_eq!(recv(&mut client).await, json!({"type":"unsubscribed","channel":"news"}));
    edge.stop().await;
}

#[tokio::test]
async fn event_larger_than_queue_bytes_is_delivered() {
    let queue_bytes = ws_edge::config::MIN_SOCKET_QUEUE_BYTES;
    let edge = Edge::start_with(|config| config.socket_queue_bytes = queue_bytes).await;
    let (mut client, _) = edge.connect("alice").await;
    send(&mut client, json!({"type":"subscribe","channel":"news"})).await;
    assert_eq!(recv(&mut client).await["type"], "subscribed");

    let text = "x".repeat(2 * queue_bytes);
    let event = Event {
        id: "big".into(),
        partition: partition_of("news", PARTITIONS),
        seq: 1,
        channel: "news".into(),
        r#type: "post.created".into(),
        data: json!({ "text": text }).to_string(),
        ts_ms: 1,
        ..Event::default()
    };
    LogWriter::append(&*edge.log, event.partition, &[event])
        .await
        .expect("partition exists");
    let live = recv(&mut client).await;
    assert_eq!(live["data"]["text"].as_str().map(str::len), Some(2 * queue_bytes));

    // A resume replays it too, instead of closing with 4008.
    send(&mut client, json!({"type":"subscribe","channel":"news","since":0})).await;
    assert_eq!(recv(&mut client).await["recovered"], true);
    let replayed = recv(&mut client).await;
    assert_eq!(replayed["position"], 1);
    assert_eq!(replayed["data"]["text"].as_str().map(str::len), Some(2 * queue_bytes));
    edge.stop().await;
}

#[tokio::test]
async fn refresh_with_fewer_grants_ends_subscriptions() {
    let edge = Edge::start().await;
    let mut client = open(&edge.url(&format!("?token={}", token("alice", &["orders:*"])))).await;
    assert_eq!(recv(&mut client).await["type"], "connected");
    for channel in ["orders:eu", "news"] {
        send(&mut client, json!({"type":"subscribe","channel":channel})).await;
        assert_eq!(recv(&mut client).await["type"], "subscribed");
    }

    send(&mut client, json!({"type":"refresh","token":token("alice", &[])})).await;
    assert_eq!(recv(&mut client).await["type"], "refreshed");
    let ended = recv(&mut client).await;
    assert_eq!(
        ended,
        json!({"type":"unsubscribed","channel":"orders:eu","reason":"forbidden"})
    );

    // Nothing more arrives on the revoked channel; the public one still delivers.
    edge.publish("orders:eu", 1..=1).await;
    edge.publish("news", 1..=1).await;
    let next = recv(&mut client).await;
    assert_eq!(next["channel"], "news", "{next}");
    send(&mut client, json!({"type":"ping"})).await;
    assert_eq!(recv(&mut client).await, json!({"type":"pong"}));
    edge.stop().await;
}

#[tokio::test]
async fn sockets_waiting_for_auth_are_capped() {
    let edge = Edge::start_with(|config| config.max_unauthenticated_sockets = Some(2)).await;
    let _waiting = [open(&edge.url("")).await, open(&edge.url("")).await];
    let third = tokio::time::timeout(PATIENCE, connect_async(edge.url(""))).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(response)) = third.expect("answer in time") else {
        panic!("a third socket without a token was upgraded");
    };
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");

    // A socket with a token in the handshake still gets in.
    let (_client, connected) = edge.connect("alice").await;
    assert_eq!(connected["userId"], "alice");
    edge.stop().await;
}

#[tokio::test]
async fn empty_query_token_falls_back_to_bearer_header() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let edge = Edge::start().await;
    let mut request = edge.url("?token=").into_client_request().expect("valid URL");
    let value = format!("bearer {}", token("alice", &[]));
    request
        .headers_mut()
        .insert("authorization", value.parse().expect("header value"));
    let connected = tokio::time::timeout(PATIENCE, connect_async(request)).await;
    let mut client = connected.expect("handshake in time").expect("handshake succeeds").0;
    let connected = recv(&mut client).await;
    assert_eq!(connected["type"], "connected", "{connected}");
    edge.stop().await;
}

/// Opens a raw TCP connection, upgrades it with a token in the URL and reads `connected`.
async fn raw_socket(edge: &Edge) -> TcpStream {
    let mut stream = TcpStream::connect(edge.addr).await.expect("connect");
    let request = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token("alice", &[]),
        edge.addr
    );
    stream.write_all(request.as_bytes()).await.expect("write request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(PATIENCE, stream.read_u8()).await;
        head.push(byte.expect("response in time").expect("read response"));
        assert!(head.len() < 4096, "response head too long");
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let (opcode, payload) = read_frame(&mut stream).await;
    assert_eq!(opcode, 1, "the connected frame is text");
    assert!(String::from_utf8_lossy(&payload).contains("connected"));
    stream
}

/// Reads one unmasked server frame and returns its opcode and payload.
async fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let read = async {
        let mut header = [0u8; 2];
        stream.read_exact(&mut header).await?;
        let len = match header[1] & 0x7f {
            126 => u64::from(stream.read_u16().await?),
            127 => stream.read_u64().await?,
            len => u64::from(len),
        };
        let mut payload = vec![0; len as usize];
        stream.read_exact(&mut payload).await?;
        Ok::<_, std::io::Error>((header[0] & 0x0f, payload))
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("a frame in time")
        .expect("the server sent a frame before closing")
}

/// Returns a masked client frame with the mask 0 (which leaves the payload as it is).
fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![first_byte];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len => {
            frame.push(0x80 | 126);
            frame.extend((len as u16).to_be_bytes());
        }
    }
    frame.extend([0, 0, 0, 0]);
    frame.extend(payload);
    frame
}

#[tokio::test]
async fn protocol_errors_get_a_close_frame() {
    let edge = Edge::start().await;
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("invalid UTF-8 in a text frame", masked_frame(0x81, &[0xc3, 0x28]), 1007),
        ("unmasked client frame", vec![0x81, 0x02, b'h', b'i'], 1002),
        ("continuation without a first frame", masked_frame(0x80, b"x"), 1002),
        ("reserved opcode 3", masked_frame(0x83, b""), 1002),
        ("ping longer than 125 bytes", masked_frame(0x89, &[0; 200]), 1002),
    ];
    for (case, bytes, expected) in cases {
        let mut stream = raw_socket(&edge).await;
        stream.write_all(&bytes).await.expect("write frame");
        let (opcode, payload) = read_frame(&mut stream).await;
        assert_eq!(opcode, 8, "{case}: expected a close frame");
        let code = payload.get(..2).map(|code| u16::from_be_bytes([code[0], code[1]]));
        assert_eq!(code, Some(expected), "{case}");
    }
    edge.stop().await;
}

#[tokio::test]
async fn unfinished_request_headers_time_out() {
    let edge = Edge::start().await;
    let mut stream = TcpStream::connect(edge.addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write a partial request");
    let patience = ws_edge::http::HEADER_READ_TIMEOUT + Duration::from_secs(5);
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(patience, stream.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the connection is still open after {patience:?}");
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
    edge.stop().await;
}

#[tokio::test]
async fn second_bind_without_reuseport_fails() {
    let first = ws_edge::http::bind("127.0.0.1:0".parse().expect("address"), false).expect("bind a loopback port");
    let addr = first.local_addr().expect("bound address");
    let second = ws_edge::http::bind(addr, false);
    assert_eq!(
        second.map(|_| ()).map_err(|err| err.kind()),
        Err(std::io::ErrorKind::AddrInUse)
    );
}

/// Two edges on one port with `SO_REUSEPORT`: the replacement starts while the old edge still
/// serves. Once the old edge drains, every new connection reaches the replacement, even while
/// the old edge still waits for a socket that does not reply to its close frame.
#[tokio::test]
async fn reuseport_replacement_takes_connections_during_drain() {
    let reuseport = |config: &mut Config| config.listen_reuseport = true;
    let old_listener =
        ws_edge::http::bind("127.0.0.1:0".parse().expect("address"), true).expect("bind a loopback port");
    let addr = old_listener.local_addr().expect("bound address");
    let old = Edge::start_on(old_listener, reuseport);
    let (mut leaving, _) = old.connect("alice").await;
    // This socket reads nothing, so the old edge keeps draining until it gives up on its close
    // handshake (2 s).
    let (_silent, _) = old.connect("bob").await;

    let new_listener = ws_edge::http::bind(addr, true).expect("a second bind with SO_REUSEPORT succeeds");
    let new = Edge::start_on(new_listener, reuseport);
    assert_eq!(wait_for_readyz(addr, 200).await, 200);

    let Edge { stop, server, .. } = old;
    let _ = stop.map(|stop| stop.send(()));
    assert_eq!(close_code(&mut leaving).await, Some(close::SERVICE_RESTART));
    assert!(!server.is_finished(), "the old edge should still be draining");
    for attempt in 0..20 {
        let (mut client, connected) = new.connect(&format!("carol-{attempt}")).await;
        assert_eq!(connected["type"], "connected", "attempt {attempt}");
        client.close(None).await.expect("close the client");
    }
    let drained = tokio::time::timeout(Duration::from_secs(20), server).await;
    drained
        .expect("the old edge drained in time")
        .expect("serve task")
        .expect("serve succeeded");
    new.stop().await;
}

/// While an edge without `SO_REUSEPORT` drains, its listener stays open: `/readyz` and new
/// upgrades get 503, so the load balancer and the clients go elsewhere, until the last socket
/// ends.
#[tokio::test]
async fn draining_edge_answers_503() {
    let edge = Edge::start().await;
    assert_eq!(wait_for_readyz(edge.addr, 200).await, 200);
    let (mut leaving, _) = edge.connect("alice").await;
    // This socket reads nothing, so the drain lasts until the edge gives up on its close
    // handshake (2 s).
    let (_silent, _) = edge.connect("bob").await;

    let Edge { addr, stop, server, .. } = edge;
    let _ = stop.map(|stop| stop.send(()));
    assert_eq!(close_code(&mut leaving).await, Some(close::SERVICE_RESTART));
    assert_eq!(http_get(addr, "/readyz").await.0, 503);
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let upgrade = tokio::time::timeout(
        PATIENCE,
        connect_async(format!("ws://{addr}/ws?token={}", token("carol", &[]))),
    );
    let Err(tokio_tungstenite::tungstenite::Error::Http(response)) = upgrade.await.expect("answer in time") else {
        panic!("a draining edge upgraded a new socket");
    };
    assert_eq!(response.status(), 503);
    assert!(!server.is_finished(), "the edge should still be draining");

    let drained = tokio::time::timeout(Duration::from_secs(20), server).await;
    drained
        .expect("the edge drained in time")
        .expect("serve task")
        .expect("serve succeeded");
}
