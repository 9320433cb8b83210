//! Measures the `ws-edge` process's resident memory per authenticated socket. Ignored by default
//! because it opens thousands of sockets and needs Redis at 127.0.0.1:6379; run it with
//! `cargo test -p ws-edge --release --test socket_memory -- --ignored --nocapture`.
//!
//! The edge runs as its own process so that the client sockets' memory is not counted. Its
//! notifier URL points at a closed port, so subscriptions are refused; the figure covers the
//! socket, its buffers and its two tasks, not subscriptions.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use notify_proto::claims::Claims;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const SECRET: &str = "memory-test-secret-0123456789abcdef";
const SOCKETS: usize = 2000;

/// Returns a token for user `load-<index>`: one socket per user, like a browser tab each.
fn token(index: usize) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = Claims {
        sub: format!("load-{index}"),
        exp: now + 3600,
        iat: None,
        channels: Vec::new(),
    };
    let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("secret is not empty");
    jsonwebtoken::encode(&Header::default(), &claims, &key).expect("claims serialize")
}

/// Returns the resident set size of a process in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the process status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("status has VmRSS");
    line.split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS is a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "opens thousands of sockets; run by hand to measure"]
async fn memory_per_socket() {
    let prefix = format!("ws-edge-memory-{}", std::process::id());
    let mut edge = Command::new(env!("CARGO_BIN_EXE_ws-edge"))
        .env("JWT_SECRET", SECRET)
        .env("EDGE_LISTEN", "127.0.0.1:0")
        .env("EDGE_METRICS_LISTEN", "127.0.0.1:0")
        .env("REDIS_URL", "redis://127.0.0.1:6379")
        .env("STREAM_PREFIX", &prefix)
        .env("NOTIFIER_URL", "http://127.0.0.1:1")
        .env("LOG_FORMAT", "text")
        .env("RUST_LOG", "info,ws_edge::fanout=error")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ws-edge");
    let pid = edge.id().expect("ws-edge is running");
    let mut lines = BufReader::new(edge.stdout.take().expect("stdout is piped")).lines();
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
        let line = line
            .expect("ws-edge logs in time")
            .expect("read the log")
            .expect("ws-edge is running");
        if let Some(addr) = line.split_whitespace().find_map(|token| token.strip_prefix("addr=")) {
            break addr.to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    // Warm up the allocator and the runtime with a few sockets, then measure many.
    let url = |index| format!("ws://{addr}/ws?token={}", token(index));
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let mut clients = Vec::new();
    for index in 0..20 {
        clients.push(connect(&url(index), config).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    for index in 20..20 + SOCKETS {
        clients.push(connect(&url(index), config).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    let per_socket = (after - before) as f64 / SOCKETS as f64;
    println!("ws-edge RSS: {before} KiB before, {after} KiB after {SOCKETS} sockets: {per_socket:.1} KiB per socket");

    for client in &mut clients {
        let _ = client.send(Message::text(r#"{"type":"ping"}"#)).await;
    }
    drop(clients);
    edge.kill().await.expect("stop ws-edge");
}

async fn connect(
    url: &str,
    config: WebSocketConfig,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (mut client, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false)
        .await
        .expect("handshake succeeds");
    let connected = tokio::time::timeout(Duration::from_secs(10), client.next()).await;
    let connected = connected
        .expect("connected in time")
        .expect("socket open")
        .expect("frame reads");
    assert!(
        connected.to_text().is_ok_and(|text| text.contains("connected")),
        "{connected:?}"
    );
    client
}
