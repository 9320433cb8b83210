//! Limits over real sockets: slow consumers, oversized frames, message and handshake rates,
//! socket counts, publish back-pressure and conflation. `docs/limits.md` lists every limit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use e2e::env::{Mode, Options, TestEnv};
use e2e::raw_socket::{RawSocket, next_json, open_raw};
use e2e::{patience, token};
use futures_util::{SinkExt, StreamExt};
use notify_proto::pb::PublishRequest;
use notify_proto::protocol::close;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};

/// Defines the tests `$body::distributed` and `$body::standalone`, which run `$body(mode)`.
macro_rules! in_both_modes {
    ($body:ident) => {
        mod $body {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn distributed() -> anyhow::Result<()> {
                super::$body(e2e::env::Mode::Distributed).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standalone() -> anyhow::Result<()> {
                super::$body(e2e::env::Mode::Standalone).await
            }
        }
    };
}

/// Receive buffer of the clients that stop reading, so that the kernel buffers little for them.
const SMALL_RECEIVE_BUFFER: u32 = 4096;

/// Starts a deployment with `options`, or returns `None` when distributed mode's services are
/// missing and not required.
async fn start(mode: Mode, options: Options) -> anyhow::Result<Option<TestEnv>> {
    TestEnv::start_with_or_skip(mode, options).await
}

/// Opens a socket for `token` with an optional receive buffer size and waits for `connected`.
/// Reads until the server's close frame and returns its code; frames before it are passed to
/// `on_frame`. Fails when the connection ends without a close frame or stays open too long.
async fn close_code(socket: &mut RawSocket, mut on_frame: impl FnMut(Value)) -> anyhow::Result<u16> {
    let deadline = Instant::now() + patience();
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .context("connection stayed open")?;
        match message {
            Some(Ok(Message::Text(text))) => on_frame(serde_json::from_str(text.as_str())?),
            Some(Ok(Message::Close(Some(frame)))) => return Ok(frame.code.into()),
            Some(Ok(Message::Close(None))) => bail!("close frame without a code"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => bail!("connection failed before a close frame: {err}"),
            None => bail!("connection ended without a close frame"),
        }
    }
}

async fn subscribe(socket: &mut RawSocket, channel: &str) -> anyhow::Result<()> {
    let frame = json!({"type": "subscribe", "channel": channel}).to_string();
    socket.send(Message::text(frame)).await?;
    let reply = next_json(socket).await?;
    ensure!(reply["type"] == "subscribed", "expected subscribed, got {reply}");
    Ok(())
}

/// Returns the resident set size of a process in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib = line.split_whitespace().nth(1).context("VmRSS has no value")?;
    Ok(kib.parse()?)
}

/// Builds a client frame with the mask bit set and a zero mask key, so the payload goes unchanged.
/// `declared_len` is the length the header announces; only `payload` follows it.
fn client_frame(first_byte: u8, declared_len: u64, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![first_byte];
    match declared_len {
        0..=125 => frame.push(0x80 | declared_len as u8),
        126..=0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(declared_len as u16).to_be_bytes());
        }
        _ => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&declared_len.to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// The edge's default `MAX_MESSAGE_BYTES`.
const MAX_MESSAGE_BYTES: u64 = 64 * 1024;

const TEXT_FIN: u8 = 0x81;
const TEXT_MORE: u8 = 0x01;
const CONTINUATION_MORE: u8 = 0x00;

// === slow consumer ===

/// One client stops reading while 10,000 events of 1 KiB go out at 1,000 per second to it and
/// to a healthy client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_others_get_everything() -> anyhow::Result<()> {
    const EVENTS: usize = 10_000;
    let options = Options::default()
        .notifier("PUBLISH_RATE", "100000")
        .notifier("PUBLISH_BURST", "100000");
    let Some(env) = start(Mode::Distributed, options).await? else {
        return Ok(());
    };
    let edge_pid = env
        .processes
        .last()
        .and_then(|process| process.pid())
        .context("edge pid")?;

    // The slow client subscribes, then never reads again until the publishing is well under way.
    let mut slow = open_raw(&env, &token::valid("slow", &[]), Some(SMALL_RECEIVE_BUFFER)).await?;
    subscribe(&mut slow, "feed").await?;
    let mut healthy = open_raw(&env, &token::valid("healthy", &[]), None).await?;
    subscribe(&mut healthy, "feed").await?;
    let baseline_kib = rss_kib(edge_pid)?;

    // The healthy client reads everything as it comes.
    let received = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn(read_events(healthy, EVENTS, received.clone()));
    let publisher = tokio::spawn(publish_paced(env.grpc, EVENTS));

    // Sample the edge's memory while the events flow, and let the slow client read again once
    // 5,000 events went out. Its queue of 256 frames overflowed before: with at most 4 MiB of
    // kernel send buffer (`tcp_wmem` max) the socket buffers fewer than 4,500 events. It must
    // read again within the edge's 10 s write timeout, or it is dropped without a close frame.
    let mut max_kib = baseline_kib;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < 5_000 {
        ensure!(
            Instant::now() < deadline,
            "the healthy client got too few events in 60 s"
        );
        max_kib = max_kib.max(rss_kib(edge_pid)?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut slow_events = 0;
    let code = close_code(&mut slow, |_| slow_events += 1).await?;
    assert_eq!(code, close::SLOW_CONSUMER, "the slow client's close code");
    assert!(slow_events < EVENTS, "the slow client got {slow_events} events");

    while !reader.is_finished() {
        ensure!(
            Instant::now() < deadline,
            "the healthy client did not get every event in 60 s"
        );
        max_kib = max_kib.max(rss_kib(edge_pid)?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let positions = reader.await??;
    let published = publisher.await??;
    assert_eq!(
        positions, published,
        "the healthy client got every event in commit order"
    );

    // The edge shares one encoded frame among its recipients and bounds every queue, so it
    // needs a few MiB here: the recent window (at most 4 MiB), two sockets' queues (1 MiB each)
    // and tungstenite's buffers. 64 MiB leaves room for allocator slack. NOTE: an unbounded
    // queue would hold only 10 MiB in this run, so the 4008 close is what proves the queue bound.
    let grown_mib = max_kib.saturating_sub(baseline_kib) / 1024;
    eprintln!("edge RSS: baseline {baseline_kib} KiB, max {max_kib} KiB, slow client got {slow_events} events");
    assert!(grown_mib < 64, "edge RSS grew by {grown_mib} MiB");
    Ok(())
}

/// Publishes `count` events of 1 KiB to `feed` at 1,000 per second, up to 64 at a time, and
/// returns their positions in commit order.
async fn publish_paced(grpc: std::net::SocketAddr, count: usize) -> anyhow::Result<Vec<u64>> {
    let client = e2e::env::publisher_at(grpc).await?;
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut calls = JoinSet::new();
    for n in 0..count {
        ticker.tick().await;
        let permit = permits.clone().acquire_owned().await?;
        let mut client = client.clone();
        let request = PublishRequest {
            channel: "feed".into(),
            r#type: "tick".into(),
            data: json!({"n": n, "pad": "x".repeat(1000)}).to_string(),
            ..Default::default()
        };
        calls.spawn(async move {
            let response = client.publish(request).await;
            drop(permit);
            response.map(|response| response.into_inner().position)
        });
    }
    let mut positions = Vec::with_capacity(count);
    while let Some(joined) = calls.join_next().await {
        positions.push(joined??);
    }
    positions.sort_unstable();
    Ok(positions)
}

/// Reads `count` events and returns their positions as received.
async fn read_events(mut socket: RawSocket, count: usize, received: Arc<AtomicUsize>) -> anyhow::Result<Vec<u64>> {
    let mut positions = Vec::with_capacity(count);
    while positions.len() < count {
        let event = next_json(&mut socket)
            .await
            .with_context(|| format!("healthy client after {} events", positions.len()))?;
        let position = event["position"]
            .as_u64()
            .with_context(|| format!("not an event: {event}"))?;
        positions.push(position);
        received.fetch_add(1, Ordering::Relaxed);
    }
    Ok(positions)
}

// === oversized frames ===

/// Sends raw bytes after the handshake and returns the close code the edge replies with.
async fn close_code_after(env: &TestEnv, bytes: &[Vec<u8>]) -> anyhow::Result<u16> {
    let mut socket = open_raw(env, &token::valid("big", &[]), None).await?;
    for chunk in bytes {
        socket.get_mut().write_all(chunk).await?;
    }
    close_code(&mut socket, |_| {}).await
}

async fn oversized_frames_close_1009(mode: Mode) -> anyhow::Result<()> {
    let Some(env) = start(mode, Options::default()).await? else {
        return Ok(());
    };
    let limit = MAX_MESSAGE_BYTES;

    // A header that declares 1 GiB, followed by 1 KiB of it.
    let huge = client_frame(TEXT_FIN, 1 << 30, &[b'x'; 1024]);
    assert_eq!(
        close_code_after(&env, &[huge]).await?,
        close::MESSAGE_TOO_BIG,
        "1 GiB header"
    );

    // A frame one byte over the limit; the header alone decides, so only 1 KiB follows it.
    let over = client_frame(TEXT_FIN, limit + 1, &[b'x'; 1024]);
    assert_eq!(
        close_code_after(&env, &[over]).await?,
        close::MESSAGE_TOO_BIG,
        "limit + 1 frame"
    );

    // Small fragments whose message outgrows the limit: 17 × 4 KiB = 68 KiB.
    let fragment = [b'x'; 4096];
    let mut fragments = vec![client_frame(TEXT_MORE, 4096, &fragment)];
    fragments.extend((1..17).map(|_| client_frame(CONTINUATION_MORE, 4096, &fragment)));
    assert_eq!(
        close_code_after(&env, &fragments).await?,
        close::MESSAGE_TOO_BIG,
        "fragments"
    );

    // A message of exactly the limit is served, and so are other clients.
    let mut exact = open_raw(&env, &token::valid("exact", &[]), None).await?;
    let filler = "x".repeat(limit as usize - r#"{"type":"ping","pad":""}"#.len());
    let ping = format!(r#"{{"type":"ping","pad":"{filler}"}}"#);
    assert_eq!(ping.len() as u64, limit);
    exact.send(Message::text(ping)).await?;
    assert_eq!(next_json(&mut exact).await?["type"], "pong");
    let mut other = env.connect("other").await?;
    other.subscribe("news").await?;
    Ok(())
}

in_both_modes!(oversized_frames_close_1009);

// === message rates ===

/// How one flooding socket ended.
#[derive(Debug, Default)]
struct FloodOutcome {
    subscribed: usize,
    rate_limited: usize,
    close: Option<u16>,
}

async fn flood(mut socket: RawSocket, messages: usize) -> anyhow::Result<FloodOutcome> {
    for n in 0..messages {
        let frame = json!({"type": "subscribe", "channel": format!("flood-{n}")}).to_string();
        if socket.send(Message::text(frame)).await.is_err() {
            break;
        }
    }
    let mut outcome = FloodOutcome::default();
    let mut unexpected = None;
    let code = close_code(&mut socket, |frame| {
        match (frame["type"].as_str(), frame["code"].as_str()) {
            (Some("subscribed"), _) => outcome.subscribed += 1,
            (Some("error"), Some("rate_limited")) => outcome.rate_limited += 1,
            _ => unexpected = Some(frame),
        }
    })
    .await?;
    ensure!(unexpected.is_none(), "unexpected frame {unexpected:?}");
    outcome.close = Some(code);
    Ok(outcome)
}

async fn user_flood_gets_one_allowance(mode: Mode) -> anyhow::Result<()> {
    const SOCKETS: usize = 5;
    const MESSAGES: usize = 50;
    const BURST: usize = 20;
    // Only the user's bucket (1 per second, burst 20) can reject: a socket's own is far larger.
    let options = Options::default()
        .edge("USER_MESSAGE_RATE", "1")
        .edge("USER_MESSAGE_BURST", BURST.to_string())
        .edge("SOCKET_MESSAGE_BURST", "1000");
    let Some(env) = start(mode, options).await? else {
        return Ok(());
    };
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        sockets.push(open_raw(&env, &token::valid("flooder", &[]), None).await?);
    }

    let started = Instant::now();
    let mut floods = JoinSet::new();
    for socket in sockets {
        floods.spawn(flood(socket, MESSAGES));
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = floods.join_next().await {
        outcomes.push(joined??);
    }
    let elapsed_secs = started.elapsed().as_secs() as usize + 1;

    let accepted: usize = outcomes.iter().map(|outcome| outcome.subscribed).sum();
    assert!(accepted >= BURST, "accepted {accepted}, below the burst: {outcomes:?}");
    assert!(
        accepted <= BURST + elapsed_secs,
        "accepted {accepted} in {elapsed_secs} s: {outcomes:?}"
    );
    for outcome in &outcomes {
        assert_eq!(outcome.rate_limited, 1, "one warning per socket: {outcome:?}");
        assert_eq!(outcome.close, Some(close::RATE_LIMITED), "{outcome:?}");
    }

    // Another user keeps its own allowance.
    let mut other = env.connect("bystander").await?;
    other.subscribe("news").await?;
    Ok(())
}

in_both_modes!(user_flood_gets_one_allowance);

// === handshakes and socket counts ===

/// Opens a WebSocket and returns the HTTP status of a rejected handshake, or 101.
async fn handshake_status(env: &TestEnv, user: &str) -> anyhow::Result<(u16, Option<String>, Option<RawSocket>)> {
    let url = format!("{}?token={}", env.ws_url(), token::valid(user, &[]));
    let stream = TcpStream::connect(env.edge).await?;
    match tokio_tungstenite::client_async(url, stream).await {
        Ok((socket, response)) => Ok((response.status().as_u16(), None, Some(socket))),
        Err(tungstenite::Error::Http(response)) => {
            let retry_after = response.headers().get("retry-after");
            let retry_after = retry_after.and_then(|value| value.to_str().ok()).map(str::to_owned);
            Ok((response.status().as_u16(), retry_after, None))
        }
        Err(err) => Err(err.into()),
    }
}

async fn handshake_burst_gets_429(mode: Mode) -> anyhow::Result<()> {
    let options = Options::default()
        .edge("HANDSHAKE_RATE", "1")
        .edge("HANDSHAKE_BURST", "3");
    let Some(env) = start(mode, options).await? else {
        return Ok(());
    };
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for n in 0..6 {
        let (status, retry_after, socket) = handshake_status(&env, &format!("user{n}")).await?;
        statuses.push((status, retry_after));
        open.extend(socket);
    }
    let admitted = statuses.iter().filter(|(status, _)| *status == 101).count();
    // One more token may have been refilled while the six handshakes ran.
    assert!((3..=4).contains(&admitted), "{statuses:?}");
    for (status, retry_after) in statuses.iter().filter(|(status, _)| *status != 101) {
        assert_eq!(*status, 429, "{statuses:?}");
        let seconds: u64 = retry_after.as_deref().context("429 without Retry-After")?.parse()?;
        assert!((1..=2).contains(&seconds), "Retry-After {seconds}");
    }
    Ok(())
}

in_both_modes!(handshake_burst_gets_429);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_counts_are_capped() -> anyhow::Result<()> {
    let options = Options::default()
        .edge("MAX_SOCKETS", "3")
        .edge("MAX_SOCKETS_PER_USER", "2");
    let Some(env) = start(Mode::Standalone, options).await? else {
        return Ok(());
    };
    let _first = open_raw(&env, &token::valid("alice", &[]), None).await?;
    let _second = open_raw(&env, &token::valid("alice", &[]), None).await?;

    // The user's third socket upgrades, then closes with 4029 after authentication.
    let (status, _, third) = handshake_status(&env, "alice").await?;
    assert_eq!(status, 101);
    let mut third = third.context("upgraded socket")?;
    assert_eq!(close_code(&mut third, |_| {}).await?, close::RATE_LIMITED);
    let _ = tokio::time::timeout(patience(), third.next()).await;
    drop(third);

    // Another user gets the slot the closed socket freed, and the socket after it gets 503.
    let mut bob = None;
    for _ in 0..50 {
        let (status, _, socket) = handshake_status(&env, "bob").await?;
        if status == 101 {
            bob = socket;
            break;
        }
        assert_eq!(status, 503, "a rejected handshake while the slot is still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _bob = bob.context("the closed socket's slot was never freed")?;
    let (status, _, _) = handshake_status(&env, "carol").await?;
    assert_eq!(status, 503);
    Ok(())
}

/// Connections that have not upgraded are capped by `MAX_HTTP_CONNECTIONS`, from the accept to
/// the upgrade: idle raw TCP connections fill the cap, and upgraded sockets do not count.
async fn idle_http_connections_are_capped(mode: Mode) -> anyhow::Result<()> {
    const CAP: usize = 4;
    let options = Options::default().edge("MAX_HTTP_CONNECTIONS", CAP.to_string());
    let Some(env) = start(mode, options).await? else {
        return Ok(());
    };

    // Upgraded sockets leave the count, so more of them than the cap open one after another.
    let mut sockets = Vec::new();
    for _ in 0..CAP + 2 {
        sockets.push(open_raw(&env, &token::valid("alice", &[]), None).await?);
    }

    // Idle connections take every place, and one more is closed at once.
    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(TcpStream::connect(env.edge).await?);
    }
    let mut extra = TcpStream::connect(env.edge).await?;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(patience(), extra.read_to_end(&mut rest)).await;
    ensure!(
        closed.is_ok(),
        "connection {} over MAX_HTTP_CONNECTIONS is still open",
        CAP + 1
    );
    assert!(rest.is_empty(), "the rejected connection got a response: {rest:?}");
    let mut byte = [0; 1];
    let read = tokio::time::timeout(Duration::from_millis(200), idle[0].read(&mut byte)).await;
    assert!(read.is_err(), "an idle connection within the cap was closed: {read:?}");

    // A handshake needs a place too, until an idle connection goes away.
    let handshake = TcpStream::connect(env.edge).await?;
    let refused = tokio_tungstenite::client_async(env.ws_url(), handshake).await;
    assert!(refused.is_err(), "a handshake over the cap was served");

    // The rejected connection and the rejected handshake were counted.
    let metrics = scrape_metrics(&env).await?;
    let counted = "notify_edge_http_connections_rejected_total{listener=\"http\"} 2\n";
    assert!(metrics.contains(counted), "no {counted:?} in {metrics}");

    // Handshakes get through again once the idle connections are gone.
    drop(idle);
    let mut upgraded = None;
    for _ in 0..50 {
        if let Ok(socket) = open_raw(&env, &token::valid("bob", &[]), None).await {
            upgraded = Some(socket);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    upgraded.context("the closed idle connections never freed their places")?;
    drop(sockets);
    Ok(())
}

/// Returns the text of the edge's `/metrics`.
async fn scrape_metrics(env: &TestEnv) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(env.edge_metrics).await?;
    let request = "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(patience(), stream.read_to_string(&mut response))
        .await
        .context("the metrics response timed out")??;
    Ok(response)
}

in_both_modes!(idle_http_connections_are_capped);

// === publish back-pressure ===

async fn saturated_publish_loses_nothing_acknowledged(mode: Mode) -> anyhow::Result<()> {
    const CALLS: usize = 200;
    let options = Options::default().notifier("PUBLISH_QUEUE", "1");
    let Some(env) = start(mode, options).await? else {
        return Ok(());
    };
    let mut subscriber = open_raw(&env, &token::valid("reader", &[]), None).await?;
    subscribe(&mut subscriber, "saturated").await?;

    // All calls at once over one HTTP/2 connection, against a queue of one request.
    let client = env.publisher().await?;
    let mut calls = JoinSet::new();
    for n in 0..CALLS {
        let mut client = client.clone();
        let request = PublishRequest {
            channel: "saturated".into(),
            r#type: "burst".into(),
            data: json!({ "n": n }).to_string(),
            ..Default::default()
        };
        calls.spawn(async move { client.publish(request).await });
    }
    let mut acknowledged = HashSet::new();
    let mut exhausted = 0;
    while let Some(joined) = calls.join_next().await {
        match joined? {
            Ok(response) => {
                acknowledged.insert(response.into_inner().id);
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                let pushback = status.metadata().get("grpc-retry-pushback-ms");
                let pushback = pushback.and_then(|value| value.to_str().ok()).unwrap_or_default();
                assert!(pushback.parse::<u32>().is_ok_and(|ms| ms > 0), "pushback {pushback:?}");
                exhausted += 1;
            }
            Err(status) => bail!("unexpected status {status:?}"),
        }
    }
    eprintln!("{} acknowledged, {exhausted} RESOURCE_EXHAUSTED", acknowledged.len());
    assert!(exhausted > 0, "no call was rejected");
    assert!(!acknowledged.is_empty(), "no call was acknowledged");
    assert_eq!(acknowledged.len() + exhausted, CALLS);

    // Every acknowledged event is stored, and reaches the subscriber.
    let stored: HashSet<String> = env
        .history("saturated", 0)
        .await?
        .into_iter()
        .map(|event| event.id)
        .collect();
    assert_eq!(stored, acknowledged, "History holds exactly the acknowledged events");
    let mut delivered = HashSet::new();
    while delivered.len() < acknowledged.len() {
        let event = next_json(&mut subscriber).await?;
        delivered.insert(event["id"].as_str().context("event id")?.to_owned());
    }
    assert_eq!(delivered, acknowledged);
    Ok(())
}

in_both_modes!(saturated_publish_loses_nothing_acknowledged);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_limit_gives_pushback() -> anyhow::Result<()> {
    let options = Options::default()
        .notifier("PUBLISH_RATE", "1")
        .notifier("PUBLISH_BURST", "5");
    let Some(env) = start(Mode::Standalone, options).await? else {
        return Ok(());
    };
    let mut results = Vec::new();
    for n in 0..8 {
        let request = PublishRequest {
            channel: "limited".into(),
            r#type: "call".into(),
            data: json!({ "n": n }).to_string(),
            ..Default::default()
        };
        results.push(env.publish_request(request).await);
    }
    let accepted = results.iter().filter(|result| result.is_ok()).count();
    assert!((5..=6).contains(&accepted), "{results:?}");
    let rejected = results.iter().filter_map(|result| result.as_ref().err());
    for status in rejected {
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        let pushback = status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .context("pushback trailer")?;
        let ms: u32 = pushback.to_str()?.parse()?;
        assert!((1..=1000).contains(&ms), "pushback {ms} ms");
    }
    Ok(())
}

// === conflation ===

async fn conflated_slow_socket_ends_with_latest(mode: Mode) -> anyhow::Result<()> {
    const EVENTS: usize = 600;
    const KEYS: usize = 10;
    // 600 events of 16 KiB (9.4 MiB) are far more than the socket's queue (1 MiB), tungstenite's
    // write buffer and the kernel's buffers (at most 4 MiB by `tcp_wmem`) hold.
    let options = Options::default()
        .edge("CONFLATE_PREFIXES", "scores:")
        .notifier("PUBLISH_RATE", "100000")
        .notifier("PUBLISH_BURST", "100000");
    let Some(env) = start(mode, options).await? else {
        return Ok(());
    };
    let token = token::valid("fan", &["scores:*"]);
    let mut slow = open_raw(&env, &token, Some(SMALL_RECEIVE_BUFFER)).await?;
    subscribe(&mut slow, "scores:cup").await?;

    // The client reads nothing while the events go out, then everything.
    let (latest_tx, latest_rx) = tokio::sync::watch::channel(None);
    let reader = tokio::spawn(read_until_latest(slow, latest_rx));

    let client = env.publisher().await?;
    let mut latest: HashMap<String, (u64, String)> = HashMap::new();
    let mut calls = JoinSet::new();
    for n in 0..EVENTS {
        let mut client = client.clone();
        let key = format!("match-{}", n % KEYS);
        let request = PublishRequest {
            channel: "scores:cup".into(),
            r#type: "score".into(),
            data: json!({"key": key, "n": n, "pad": "x".repeat(16_000)}).to_string(),
            ..Default::default()
        };
        calls.spawn(async move {
            client
                .publish(request)
                .await
                .map(|response| (key, response.into_inner()))
        });
        if calls.len() >= 32 {
            let (key, response) = calls.join_next().await.context("a call")???;
            record_latest(&mut latest, key, response.position, response.id);
        }
    }
    while let Some(joined) = calls.join_next().await {
        let (key, response) = joined??;
        record_latest(&mut latest, key, response.position, response.id);
    }
    assert_eq!(latest.len(), KEYS);
    let latest_ids: HashMap<String, String> = latest.into_iter().map(|(key, (_, id))| (key, id)).collect();
    latest_tx.send_replace(Some(latest_ids));

    let (received, mut slow) = reader.await??;
    eprintln!("conflated socket received {received} of {EVENTS} events");
    assert!(received < EVENTS, "nothing was conflated");
    slow.send(Message::text(json!({"type": "ping"}).to_string())).await?;
    assert_eq!(next_json(&mut slow).await?["type"], "pong", "the socket stays open");
    Ok(())
}

/// Waits until `latest_rx` contains the latest event id of every key, then reads event frames
/// until the last frame of every key is that event. Returns the number of events read.
async fn read_until_latest(
    mut socket: RawSocket,
    mut latest_rx: tokio::sync::watch::Receiver<Option<HashMap<String, String>>>,
) -> anyhow::Result<(usize, RawSocket)> {
    let latest = latest_rx.wait_for(Option::is_some).await?.clone().unwrap_or_default();
    let mut last_seen: HashMap<String, String> = HashMap::new();
    let mut received = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while latest != last_seen {
        ensure!(
            Instant::now() < deadline,
            "latest values missing after {received} events"
        );
        let event = next_json(&mut socket)
            .await
            .with_context(|| format!("after {received} events, seen {last_seen:?}, latest {latest:?}"))?;
        ensure!(event["channel"] == "scores:cup", "unexpected frame {event}");
        let key = event["data"]["key"].as_str().context("key")?.to_owned();
        last_seen.insert(key, event["id"].as_str().context("id")?.to_owned());
        received += 1;
    }
    Ok((received, socket))
}

fn record_latest(latest: &mut HashMap<String, (u64, String)>, key: String, position: u64, id: String) {
    let entry = latest.entry(key).or_insert((0, String::new()));
    if position > entry.0 {
        *entry = (position, id);
    }
}

in_both_modes!(conflated_slow_socket_ends_with_latest);
