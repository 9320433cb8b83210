//! `notifier::serve` over real sockets, on SQLite and the in-process stream: the gRPC API, the
//! health service, the HTTP probes and the drain on shutdown.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::TestSqlite;
use notifier::Config;
use notifier::store::Store;
use notify_proto::http_server::{HEADER_READ_TIMEOUT, MAX_METRICS_CONNECTIONS};
use notify_proto::log::LogReader;
use notify_proto::memory::MemoryLog;
use notify_proto::pb::notifier_client::NotifierClient;
use notify_proto::pb::publish_result::Outcome;
use notify_proto::pb::{
    HeadsRequest, HistoryRequest, PublishBatchRequest, PublishError, PublishRequest, PublishResponse,
    ReadPartitionRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const SERVICE: &str = "notify.v1.Notifier";

struct Running {
    grpc: SocketAddr,
    http: SocketAddr,
    log: Arc<MemoryLog>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
    _db: TestSqlite,
}

async fn start(config: Config) -> Running {
    let db = TestSqlite::create();
    let store = Store::open(&db.url, config.partitions).await.expect("open");
    let log = Arc::new(MemoryLog::new(config.partitions, 1000));
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (grpc_addr, http_addr) = (grpc.local_addr().expect("addr"), http.local_addr().expect("addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    let stream = Arc::clone(&log);
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        notifier::serve(&config, store, stream, &Default::default(), grpc, Some(http), shutdown).await
    });
    Running {
        grpc: grpc_addr,
        http: http_addr,
        log,
        stop,
        task,
        _db: db,
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

fn publish_request(channel: &str, data: &str, key: &str) -> PublishRequest {
    PublishRequest {
        channel: channel.into(),
        r#type: "post.created".into(),
        data: data.into(),
        user_id: String::new(),
        idempotency_key: key.into(),
    }
}

/// Sends `GET path` and returns the status code and body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// Sends `GET /metrics` and returns the body of a 200 response, or `None` when the connection
/// was closed without one.
async fn try_get_metrics(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    stream.write_all(request).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(1), stream.read_to_string(&mut response))
        .await
        .ok()?
        .ok()?;
    response.starts_with("HTTP/1.1 200 OK").then_some(response)
}

async fn stop(running: Running) {
    running.stop.send(()).expect("server running");
    let result = tokio::time::timeout(Duration::from_secs(30), running.task).await;
    result
        .expect("serve returns")
        .expect("serve task")
        .expect("serve succeeds");
}

#[tokio::test]
async fn publish_and_read_over_grpc() {
    let running = start(Config::default()).await;
    let mut client = NotifierClient::new(channel(running.grpc).await);

    let mut request = tonic::Request::new(publish_request("news", r#"{"title":"שלום"}"#, ""));
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ascii"));
    let first = client.publish(request).await.expect("publish").into_inner();
    assert_eq!((first.position, first.duplicate), (1, false));

    let history = first_page(&mut client, "news").await;
    assert_eq!(history.events.len(), 1);
    assert_eq!(history.events[0].id, first.id);
    assert_eq!(history.events[0].data, r#"{"title":"שלום"}"#);
    assert_eq!(history.events[0].traceparent, traceparent);
    assert_eq!((history.head, history.next_since, history.complete), (1, 1, true));

    let partition = history.events[0].partition;
    let page = client
        .read_partition(ReadPartitionRequest {
            partition,
            after: 0,
            limit: 10,
        })
        .await
        .expect("read partition")
        .into_inner();
    assert_eq!(page.events, history.events);
    let heads = client.heads(HeadsRequest {}).await.expect("heads").into_inner().heads;
    assert_eq!(heads.len(), 16);
    assert_eq!(heads[partition as usize], 1);

    // The committer appends the event to the stream.
    let appended = tokio::time::timeout(Duration::from_secs(30), async {
        while running.log.last_seq(partition).await.expect("partition") < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(appended.is_ok(), "event not appended to the stream");

    stop(running).await;
}

#[tokio::test]
async fn errors_map_to_status_codes() {
    let running = start(Config::default()).await;
    let mut client = NotifierClient::new(channel(running.grpc).await);

    let invalid = client
        .publish(publish_request("news", "{oops", ""))
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().starts_with("data is not valid JSON"),
        "{}",
        invalid.message()
    );

    let first = client
        .publish(publish_request("news", "1", "key-1"))
        .await
        .expect("publish")
        .into_inner();
    let retry = client
        .publish(publish_request("news", "1", "key-1"))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!(
        (retry.id.as_str(), retry.position, retry.duplicate),
        (first.id.as_str(), first.position, true)
    );
    let reused = client
        .publish(publish_request("news", "2", "key-1"))
        .await
        .expect_err("reused key");
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert!(reused.message().contains(&first.id), "{}", reused.message());

    let missing = client
        .read_partition(ReadPartitionRequest {
            partition: 16,
            after: 0,
            limit: 0,
        })
        .await
        .expect_err("no such partition");
    assert_eq!(missing.code(), Code::InvalidArgument);
    let bad_channel = client
        .history(HistoryRequest {
            channel: "a b".into(),
            since: 0,
            limit: 0,
        })
        .await
        .expect_err("bad channel");
    assert_eq!(bad_channel.code(), Code::InvalidArgument);

    stop(running).await;
}

#[tokio::test]
async fn probes_report_health_and_drain() {
    let config = Config {
        shutdown_grace: Duration::from_secs(2),
        ..Config::default()
    };
    let running = start(config).await;
    let mut health = HealthClient::new(channel(running.grpc).await);
    for service in [SERVICE, ""] {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let status = health.check(request).await.expect("health check").into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    assert_eq!(http_get(running.http, "/healthz").await, (200, "ok".to_owned()));
    assert_eq!(http_get(running.http, "/readyz").await, (200, "ready".to_owned()));

    // A watch stream stays open through the shutdown, so it receives the status change, and it
    // keeps the drain going until the grace period ends.
    let request = HealthCheckRequest {
        service: SERVICE.into(),
    };
    let mut watch = health.watch(request).await.expect("watch").into_inner();
    let first = watch.message().await.expect("watch message").expect("status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let (http, stop_tx, task) = (running.http, running.stop, running.task);
    stop_tx.send(()).expect("server running");
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message()).await;
    let status = next
        .expect("status change in time")
        .expect("watch message")
        .expect("status");
    assert_eq!(status.status, ServingStatus::NotServing as i32);
    assert_eq!(http_get(http, "/readyz").await, (503, "draining".to_owned()));

    let result = tokio::time::timeout(Duration::from_secs(30), task).await;
    result
        .expect("serve returns")
        .expect("serve task")
        .expect("serve succeeds");
}

#[tokio::test]
async fn unfinished_probe_headers_time_out() {
    let running = start(Config::default()).await;
    let started = tokio::time::Instant::now();
    let mut stream = TcpStream::connect(running.http).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write half a header");

    let patience = HEADER_READ_TIMEOUT + Duration::from_secs(5);
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(patience, stream.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the connection is still open after {patience:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "closed after {elapsed:?}, before the header read timeout"
    );
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
    stop(running).await;
}

#[tokio::test]
async fn probe_connections_over_the_cap_are_closed() {
    let running = start(Config::default()).await;
    let mut idle = Vec::new();
    for _ in 0..MAX_METRICS_CONNECTIONS {
        idle.push(TcpStream::connect(running.http).await.expect("connect"));
    }

    // One more connection is closed at once, while the others stay open.
    let mut extra = TcpStream::connect(running.http).await.expect("connect");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "connection {} is still open",
        MAX_METRICS_CONNECTIONS + 1
    );
    let mut byte = [0; 1];
    let read = tokio::time::timeout(Duration::from_millis(200), idle[0].read(&mut byte)).await;
    assert!(read.is_err(), "an idle connection within the cap was closed: {read:?}");

    // Closing idle connections frees places, and the rejection was counted.
    idle.truncate(MAX_METRICS_CONNECTIONS - 4);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        if let Some(body) = try_get_metrics(running.http).await {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "no place was freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        metrics.contains("notify_notifier_http_connections_rejected_total 1\n"),
        "{metrics}"
    );
    drop(idle);
    stop(running).await;
}

#[tokio::test]
async fn reflection_lists_the_service() {
    let running = start(Config::default()).await;
    let mut reflection = ServerReflectionClient::new(channel(running.grpc).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    let response = responses.message().await.expect("response").expect("one message");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {:?}", response.message_response);
    };
    let names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    assert!(names.contains(&SERVICE.to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");
    drop(responses);

    stop(running).await;
}

#[tokio::test]
async fn positions_beyond_the_store_are_invalid() {
    let running = start(Config::default()).await;
    let mut client = NotifierClient::new(channel(running.grpc).await);
    client.publish(publish_request("news", "1", "")).await.expect("publish");

    let history = client
        .history(HistoryRequest {
            channel: "news".into(),
            since: u64::MAX,
            limit: 0,
        })
        .await
        .expect_err("since beyond any position");
    assert_eq!(history.code(), Code::InvalidArgument);
    assert!(
        history.message().starts_with("since 18446744073709551615 is above"),
        "{}",
        history.message()
    );
    let largest = client
        .history(HistoryRequest {
            channel: "news".into(),
            since: i64::MAX as u64,
            limit: 0,
        })
        .await
        .expect("largest position")
        .into_inner();
    assert_eq!((largest.events.len(), largest.head, largest.complete), (0, 1, true));

    let read = client
        .read_partition(ReadPartitionRequest {
            partition: 0,
            after: u64::MAX,
            limit: 0,
        })
        .await
        .expect_err("after beyond any position");
    assert_eq!(read.code(), Code::InvalidArgument);
    assert!(
        read.message().starts_with("after 18446744073709551615"),
        "{}",
        read.message()
    );

    stop(running).await;
}

/// Sends a publish with `authorization: Bearer <api_key>`.
async fn publish_as(
    client: &mut NotifierClient<Channel>,
    api_key: &str,
    request: PublishRequest,
) -> Result<notify_proto::pb::PublishResponse, tonic::Status> {
    let mut request = tonic::Request::new(request);
    let bearer = format!("Bearer {api_key}").parse().expect("ascii");
    request.metadata_mut().insert("authorization", bearer);
    client.publish(request).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn idempotency_keys_are_per_api_key() {
    use notifier::apikey::{hash_key, hex};

    let config = Config {
        publisher_keys: vec![
            format!("{}:orders:", hex(&hash_key("orders-key"))),
            hex(&hash_key("news-key")),
        ],
        ..Config::default()
    };
    let running = start(config).await;
    let mut client = NotifierClient::new(channel(running.grpc).await);

    let orders = publish_as(&mut client, "orders-key", publish_request("orders:eu", "1", "K"))
        .await
        .expect("first publisher");
    let news = publish_as(&mut client, "news-key", publish_request("news", "2", "K"))
        .await
        .expect("the same key text from another API key is a new event");
    assert!(!news.duplicate);
    assert_ne!(news.id, orders.id);

    let retry = publish_as(&mut client, "orders-key", publish_request("orders:eu", "1", "K"))
        .await
        .expect("retry");
    assert_eq!((retry.id.as_str(), retry.duplicate), (orders.id.as_str(), true));
    let conflict = publish_as(&mut client, "news-key", publish_request("news", "3", "K"))
        .await
        .expect_err("the caller's own key reused for other content");
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert!(conflict.message().contains(&news.id), "{}", conflict.message());
    assert!(!conflict.message().contains(&orders.id), "{}", conflict.message());

    stop(running).await;
}

/// Returns the first page of a channel's history.
async fn first_page(client: &mut NotifierClient<Channel>, channel: &str) -> notify_proto::pb::HistoryResponse {
    let request = HistoryRequest {
        channel: channel.into(),
        since: 0,
        limit: 0,
    };
    client.history(request).await.expect("history").into_inner()
}

/// Returns the outcomes of a `PublishBatch` call, failing the test when the call itself failed.
async fn publish_batch(client: &mut NotifierClient<Channel>, events: Vec<PublishRequest>) -> Vec<Outcome> {
    let response = client
        .publish_batch(PublishBatchRequest { events })
        .await
        .expect("batch call");
    let results = response.into_inner().results;
    results
        .into_iter()
        .map(|result| result.outcome.expect("every result has an outcome"))
        .collect()
}

fn published(outcome: &Outcome) -> &PublishResponse {
    match outcome {
        Outcome::Published(response) => response,
        Outcome::Error(err) => panic!("event failed: {err:?}"),
    }
}

fn failed(outcome: &Outcome) -> &PublishError {
    match outcome {
        Outcome::Error(err) => err,
        Outcome::Published(response) => panic!("event was published: {response:?}"),
    }
}

#[tokio::test]
async fn batch_results_follow_request_order() {
    let running = start(Config::default()).await;
    let mut client = NotifierClient::new(channel(running.grpc).await);
    let first = client
        .publish(publish_request("news", "0", "key-0"))
        .await
        .expect("publish")
        .into_inner();

    let hebrew = r#"{"title":"שלום, עולם"}"#;
    let outcomes = publish_batch(
        &mut client,
        vec![
            publish_request("news", hebrew, ""),
            publish_request("sport", "{oops", ""),
            publish_request("news", "2", "key-0"),
            publish_request("sport", "3", ""),
            publish_request("news", "4", "key-4"),
            publish_request("news", "0", "key-0"),
        ],
    )
    .await;
    assert_eq!(outcomes.len(), 6);

    assert_eq!(published(&outcomes[0]).position, first.position + 1);
    let invalid = failed(&outcomes[1]);
    assert_eq!(invalid.code, Code::InvalidArgument as i32);
    assert!(
        invalid.message.starts_with("data is not valid JSON"),
        "{}",
        invalid.message
    );
    // The key was first used for other content.
    let conflict = failed(&outcomes[2]);
    assert_eq!(conflict.code, Code::AlreadyExists as i32);
    assert!(conflict.message.contains(&first.id), "{}", conflict.message);
    // The channel's earlier event failed before it was queued, so this one is not published.
    let aborted = failed(&outcomes[3]);
    assert_eq!(aborted.code, Code::Aborted as i32);
    assert!(
        aborted
            .message
            .starts_with("event 1 of this batch, on channel \"sport\""),
        "{}",
        aborted.message
    );
    // A conflict is found at commit time, so the channel's later events are still published.
    assert_eq!(published(&outcomes[4]).position, first.position + 2);
    let retry = published(&outcomes[5]);
    assert_eq!((retry.id.as_str(), retry.duplicate), (first.id.as_str(), true));

    let history = first_page(&mut client, "news").await;
    let data: Vec<&str> = history.events.iter().map(|event| event.data.as_str()).collect();
    assert_eq!(data, ["0", hebrew, "4"]);
    let sport = first_page(&mut client, "sport").await;
    assert!(sport.events.is_empty(), "{:?}", sport.events);

    stop(running).await;
}

#[tokio::test]
async fn batch_size_checked_first() {
    let running = start(Config::default()).await;
    let mut client = NotifierClient::new(channel(running.grpc).await);

    let empty = client
        .publish_batch(PublishBatchRequest { events: Vec::new() })
        .await
        .expect_err("empty batch");
    assert_eq!(empty.code(), Code::InvalidArgument);
    let events = (0..101).map(|n| publish_request("news", &n.to_string(), "")).collect();
    let oversized = client
        .publish_batch(PublishBatchRequest { events })
        .await
        .expect_err("101 events");
    assert_eq!(oversized.code(), Code::InvalidArgument);
    assert_eq!(
        oversized.message(),
        "a PublishBatch call holds 1 to 100 events, and this one holds 101; split the events over several calls"
    );
    // Over 1000 events, the request is rejected before it is decoded.
    let events = vec![PublishRequest::default(); 100_000];
    let flood = client
        .publish_batch(PublishBatchRequest { events })
        .await
        .expect_err("100,000 empty events");
    assert_eq!(flood.code(), Code::InvalidArgument);
    assert!(
        flood
            .message()
            .starts_with("field 1 of the message occurs more than 1000 times"),
        "{}",
        flood.message()
    );
    let heads = client.heads(HeadsRequest {}).await.expect("heads").into_inner();
    assert!(heads.heads.iter().all(|head| *head == 0), "{:?}", heads.heads);

    stop(running).await;
}

#[tokio::test]
async fn batch_limits_each_event() {
    use notifier::apikey::{hash_key, hex};

    let config = Config {
        publisher_keys: vec![format!("{}:orders:", hex(&hash_key("orders-key")))],
        publish_rate: std::num::NonZeroU32::new(1).expect("nonzero"),
        publish_burst: std::num::NonZeroU32::new(2).expect("nonzero"),
        ..Config::default()
    };
    let running = start(config).await;
    let mut client = NotifierClient::new(channel(running.grpc).await);
    let events = vec![
        publish_request("orders:eu", "1", ""),
        publish_request("news", "2", ""),
        publish_request("orders:us", "3", ""),
        publish_request("orders:asia", "4", ""),
    ];

    let unauthenticated = client
        .publish_batch(PublishBatchRequest { events: events.clone() })
        .await
        .expect_err("no API key");
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);

    let mut request = tonic::Request::new(PublishBatchRequest { events });
    let bearer = "Bearer orders-key".parse().expect("ascii");
    request.metadata_mut().insert("authorization", bearer);
    let results = client
        .publish_batch(request)
        .await
        .expect("batch call")
        .into_inner()
        .results;
    let outcomes: Vec<Outcome> = results.into_iter().filter_map(|result| result.outcome).collect();
    assert_eq!(outcomes.len(), 4);
    published(&outcomes[0]);
    let denied = failed(&outcomes[1]);
    assert_eq!(denied.code, Code::PermissionDenied as i32);
    assert!(denied.message.contains("news"), "{}", denied.message);
    published(&outcomes[2]);
    let limited = failed(&outcomes[3]);
    assert_eq!(limited.code, Code::ResourceExhausted as i32);
    assert!(limited.retry_after_ms > 0, "{limited:?}");

    stop(running).await;
}
