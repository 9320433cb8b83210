//! `/metrics` over real processes: the counters move by the right amounts for a publish, a
//! rejected publish, a delivery and a slow-consumer close. `docs/operations.md` lists every
//! metric.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use e2e::env::{Mode, Options, TestEnv};
use e2e::raw_socket::{RawSocket, next_json, open_raw};
use e2e::{patience, token};
use futures_util::{SinkExt, StreamExt};
use notify_proto::protocol::close;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Capacity of each socket's queue in frames (`SOCKET_QUEUE_FRAMES`), small so that it overflows soon.
const QUEUE_FRAMES: usize = 8;
/// Receive buffer of the client that stops reading.
const SMALL_RECEIVE_BUFFER: u32 = 4096;
/// Events published to the slow client: at 60 KiB each, 12 MB, more than the kernel's socket
/// buffers (at most 4 MiB with the default `tcp_wmem`) and the queue can hold.
const BULK_EVENTS: usize = 200;

/// One scrape: every sample by metric name and sorted label pairs.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
}

impl Scrape {
    /// Returns the sample with exactly these labels, or 0 when the series does not exist yet.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        labels.sort();
        self.samples.get(&(name.to_owned(), labels)).copied().unwrap_or(0.0)
    }

    /// Returns whether a series of this name exists.
    fn has(&self, name: &str) -> bool {
        self.samples.keys().any(|(sample, _)| sample == name)
    }
}

/// Parses the text exposition format: `name{label="value",...} value` lines and `#` comments.
fn parse_exposition(text: &str) -> anyhow::Result<Scrape> {
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|line| !line.is_empty() && !line.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').with_context(|| format!("no value in {line:?}"))?;
        let value: f64 = value.parse().with_context(|| format!("bad value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .with_context(|| format!("unclosed labels in {line:?}"))?;
                (
                    name.to_owned(),
                    parse_labels(body).with_context(|| format!("bad labels in {line:?}"))?,
                )
            }
        };
        ensure!(
            samples.insert((name, labels), value).is_none(),
            "duplicate series {line:?}"
        );
    }
    Ok(Scrape { samples })
}

/// Parses `key="value",key="value"` with the format's escapes (`\\`, `\"`, `\n`), sorted by key.
fn parse_labels(body: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        ensure!(chars.next() == Some('"'), "label {key} has no quoted value");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => bail!("escape at the end"),
                },
                Some(c) => value.push(c),
                None => bail!("unterminated value of {key}"),
            }
        }
        labels.push((key, value));
        match chars.next() {
            None | Some(',') => {}
            Some(c) => bail!("unexpected {c:?} after a label"),
        }
    }
    labels.sort();
    Ok(labels)
}

/// Fetches and parses `GET /metrics` with a plain HTTP/1.1 request.
async fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(patience(), stream.read_to_string(&mut response))
        .await
        .context("the metrics response timed out")??;
    let (head, body) = response.split_once("\r\n\r\n").context("no end of headers")?;
    let head = head.to_ascii_lowercase();
    ensure!(head.starts_with("http/1.1 200"), "metrics status: {head}");
    ensure!(
        head.contains("content-type: application/openmetrics-text"),
        "metrics content type: {head}"
    );
    ensure!(!head.contains("chunked"), "unexpected chunked body: {head}");
    ensure!(body.ends_with("# EOF\n"), "the exposition does not end with # EOF");
    parse_exposition(body)
}

/// Scrapes until `done` returns true for a scrape, or fails after the patience.
async fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&Scrape) -> bool) -> anyhow::Result<Scrape> {
    let deadline = Instant::now() + patience();
    loop {
        let scraped = scrape(addr).await?;
        if done(&scraped) {
            return Ok(scraped);
        }
        ensure!(Instant::now() < deadline, "{what} did not happen in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a socket with an optional receive buffer size and waits for `connected`.
async fn subscribe(socket: &mut RawSocket, channel: &str) -> anyhow::Result<()> {
    let frame = json!({"type": "subscribe", "channel": channel}).to_string();
    socket.send(Message::text(frame)).await?;
    let reply = next_json(socket).await?;
    ensure!(reply["type"] == "subscribed", "expected subscribed, got {reply}");
    Ok(())
}

/// Reads until the close frame. Returns its code and the number of events before it.
async fn read_to_close(socket: &mut RawSocket) -> anyhow::Result<(u16, usize)> {
    let deadline = Instant::now() + patience();
    let mut events = 0;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .context("connection stayed open")?;
        match message {
            Some(Ok(Message::Text(_))) => events += 1,
            Some(Ok(Message::Close(Some(frame)))) => return Ok((frame.code.into(), events)),
            Some(Ok(_)) => continue,
            other => bail!("connection ended without a close frame: {other:?}"),
        }
    }
}

fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value(name, labels) - before.value(name, labels)
}

async fn metrics_follow_publish_and_slow_consumer(mode: Mode) -> anyhow::Result<()> {
    let options = Options::default().edge("SOCKET_QUEUE_FRAMES", QUEUE_FRAMES.to_string());
    let Some(env) = TestEnv::start_with_or_skip(mode, options).await? else {
        return Ok(());
    };
    let (notifier_metrics, edge_metrics) = (env.notifier_metrics, env.edge_metrics);

    // One reader on `news`.
    let mut reader = open_raw(&env, &token::valid("reader", &[]), None).await?;
    subscribe(&mut reader, "news").await?;
    let edge_before = scrape_until(edge_metrics, "the edge counting the subscription", |scraped| {
        scraped.value("notify_edge_subscriptions", &[]) == 1.0
    })
    .await?;
    let notifier_before = scrape(notifier_metrics).await?;
    assert_eq!(edge_before.value("notify_edge_sockets_open", &[]), 1.0, "open sockets");

    // Three events and one invalid request.
    for n in 0..3 {
        env.publish("news", "post.created", &json!({"n": n}).to_string())
            .await?;
    }
    let invalid = env.publish("news", "post.created", "not json").await;
    ensure!(invalid.is_err(), "a payload that is not JSON was accepted");
    for n in 0..3 {
        let event = next_json(&mut reader).await?;
        ensure!(event["data"]["n"] == n, "expected event {n}, got {event}");
    }

    let notifier_after = scrape(notifier_metrics).await?;
    let ok = [("result", "ok")];
    let invalid = [("result", "invalid_argument")];
    let published = "notify_notifier_publish_requests_total";
    assert_eq!(
        delta(&notifier_before, &notifier_after, published, &ok),
        3.0,
        "ok publishes"
    );
    assert_eq!(
        delta(&notifier_before, &notifier_after, published, &invalid),
        1.0,
        "invalid publishes"
    );
    let observed = "notify_notifier_publish_duration_seconds_count";
    assert_eq!(
        delta(&notifier_before, &notifier_after, observed, &[]),
        3.0,
        "publish latencies"
    );
    let under_ten_seconds = [("le", "10.0")];
    let bucket = "notify_notifier_publish_duration_seconds_bucket";
    assert_eq!(
        delta(&notifier_before, &notifier_after, bucket, &under_ten_seconds),
        3.0,
        "publishes under 10 s"
    );
    assert!(
        notifier_after.has("notify_notifier_publish_queue_depth"),
        "queue depth is exported"
    );
    assert_eq!(
        notifier_after.value("notify_notifier_store_errors_total", &[("operation", "commit")]),
        0.0
    );

    let edge_after = scrape(edge_metrics).await?;
    let delivered = "notify_edge_events_delivered_total";
    assert_eq!(
        delta(&edge_before, &edge_after, delivered, &[]),
        3.0,
        "delivered frames"
    );
    let latencies = "notify_edge_commit_to_delivery_seconds_count";
    assert_eq!(
        delta(&edge_before, &edge_after, latencies, &[]),
        3.0,
        "commit-to-delivery observations"
    );
    let partitions = edge_after
        .samples
        .keys()
        .filter(|(name, _)| name == "notify_edge_stream_read_lag_seconds")
        .count();
    assert_eq!(
        partitions,
        e2e::env::PARTITIONS as usize,
        "one lag series per partition"
    );

    // A slow client on `bulk` stops reading while 200 events of 60 KiB go out.
    let mut slow = open_raw(&env, &token::valid("slow", &[]), Some(SMALL_RECEIVE_BUFFER)).await?;
    subscribe(&mut slow, "bulk").await?;
    let edge_before = scrape_until(edge_metrics, "the edge counting the second subscription", |scraped| {
        scraped.value("notify_edge_subscriptions", &[]) == 2.0
    })
    .await?;
    let padding = "x".repeat(60 * 1024);
    for n in 0..BULK_EVENTS {
        env.publish("bulk", "tick", &json!({"n": n, "pad": padding}).to_string())
            .await?;
    }
    let (code, received) = read_to_close(&mut slow).await?;
    assert_eq!(code, close::SLOW_CONSUMER, "the slow client's close code");
    ensure!(received < BULK_EVENTS, "the slow client got all {received} events");

    let slow_close = [("reason", "slow_consumer"), ("code", "4008")];
    let closed = "notify_edge_sockets_closed_total";
    // The close can come before the stream reader has handed the last events to the hub.
    let reached_hub = "notify_edge_commit_to_delivery_seconds_count";
    let edge_after = scrape_until(edge_metrics, "the edge counting the close and every event", |scraped| {
        scraped.value(closed, &slow_close) > edge_before.value(closed, &slow_close)
            && scraped.value(reached_hub, &[]) >= edge_before.value(reached_hub, &[]) + BULK_EVENTS as f64
    })
    .await?;
    assert_eq!(
        delta(&edge_before, &edge_after, closed, &slow_close),
        1.0,
        "slow-consumer closes"
    );
    let other_closes: f64 = edge_after
        .samples
        .iter()
        .filter(|((name, _), _)| name == closed)
        .map(|((_, labels), value)| {
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            value - edge_before.value(closed, &labels)
        })
        .sum();
    assert_eq!(other_closes, 1.0, "no socket closed for another reason");
    assert_eq!(
        edge_after.value("notify_edge_sockets_open", &[]),
        1.0,
        "the reader stays open"
    );
    assert_eq!(
        edge_after.value("notify_edge_subscriptions", &[]),
        1.0,
        "the reader's subscription stays"
    );

    // Every frame queued to the slow socket was written to it or dropped by the overflow, and
    // the frame that overflowed the queue counts as dropped, not delivered. Frames of a write
    // that the overflow abandoned are neither, so the sum is a bound, not an equality.
    let dropped_slow = [("reason", "slow_consumer")];
    let dropped = delta(
        &edge_before,
        &edge_after,
        "notify_edge_frames_dropped_total",
        &dropped_slow,
    );
    let queued = delta(&edge_before, &edge_after, delivered, &[]);
    assert!(dropped >= 1.0, "dropped frames: {dropped}");
    assert!(queued >= received as f64, "queued {queued} < received {received}");
    assert!(
        received as f64 + dropped <= queued + 1.0,
        "received {received} + dropped {dropped} > queued {queued} + 1"
    );
    assert!(queued < BULK_EVENTS as f64, "queued {queued} after the overflow");
    assert_eq!(
        delta(&edge_before, &edge_after, reached_hub, &[]),
        BULK_EVENTS as f64,
        "every bulk event reached the hub once"
    );

    // The reader still works.
    env.publish("news", "post.created", r#"{"n":3}"#).await?;
    let event = next_json(&mut reader).await?;
    assert_eq!(event["data"]["n"], 3, "the reader's next event");
    Ok(())
}

mod metrics_follow_publish_and_slow_consumer {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn distributed() -> anyhow::Result<()> {
        super::metrics_follow_publish_and_slow_consumer(e2e::env::Mode::Distributed).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn standalone() -> anyhow::Result<()> {
        super::metrics_follow_publish_and_slow_consumer(e2e::env::Mode::Standalone).await
    }
}

#[test]
fn parser_reads_labels_and_escapes() {
    let text = "# TYPE a counter\na_total{x=\"1\",y=\"q\\\"uote\"} 2\nb 0.5\n# EOF\n";
    let scraped = parse_exposition(text).expect("valid exposition");
    assert_eq!(scraped.value("a_total", &[("y", "q\"uote"), ("x", "1")]), 2.0);
    assert_eq!(scraped.value("b", &[]), 0.5);
    assert_eq!(scraped.value("missing", &[]), 0.0);
    assert!(parse_exposition("a{x=\"1} 2\n").is_err(), "unterminated value");
    assert!(parse_exposition("a 1\na 2\n").is_err(), "duplicate series");
}
