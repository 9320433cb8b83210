//! Traces and log lines of one event. The spans of the notifier and the edge reach an OTLP
//! collector in the caller's trace, with an intact parent chain. The JSON log lines of a publish
//! call carry its trace id. Each test runs in both deployment modes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use e2e::env::{Mode, Options, TestEnv};
use notify_proto::pb::{PublishBatchRequest, PublishRequest};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use rand::Rng;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, ServerTlsConfig};

// === A collector on loopback ===

/// A span as the collector received it, with the `service.name` of its resource.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP trace service that keeps every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| text(attribute.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                spans.extend(scope_spans.spans.into_iter().map(|span| Received {
                    service: service.clone(),
                    span,
                }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts the collector on a loopback port and returns it with its address.
    async fn start() -> anyhow::Result<(Collector, SocketAddr)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let collector = Collector::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        Ok((collector, addr))
    }

    /// Starts the collector with TLS on a loopback port, with a certificate for `127.0.0.1`
    /// signed by a new CA. Returns it with its address and the path of the CA's PEM file.
    async fn start_tls(name: &str) -> anyhow::Result<(Collector, SocketAddr, PathBuf)> {
        let (ca_pem, cert_pem, key_pem) = certificates()?;
        let ca_path = e2e::env::work_dir().join("certs").join(format!("{name}-ca.pem"));
        std::fs::create_dir_all(ca_path.parent().context("the CA path has a parent")?)?;
        std::fs::write(&ca_path, ca_pem)?;

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let collector = Collector::default();
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
        let server = tonic::transport::Server::builder()
            .tls_config(tls)?
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        Ok((collector, addr, ca_path))
    }

    /// Waits until the collector has received spans of `trace_id` with every name in `names`, and
    /// returns the spans of that trace.
    async fn wait_for(&self, trace_id: &[u8], names: &[&str]) -> anyhow::Result<Vec<Received>> {
        self.wait_until(trace_id, &format!("the spans {names:?}"), |spans| {
            names
                .iter()
                .all(|name| spans.iter().any(|received| received.span.name == *name))
        })
        .await
    }

    /// Waits until the collector has received `count` spans named `name` of `trace_id`, and
    /// returns the spans of that trace.
    async fn wait_for_count(&self, trace_id: &[u8], name: &str, count: usize) -> anyhow::Result<Vec<Received>> {
        self.wait_until(trace_id, &format!("{count} {name} spans"), |spans| {
            spans.iter().filter(|received| received.span.name == name).count() >= count
        })
        .await
    }

    /// Waits until the spans of `trace_id` satisfy `complete`, and returns them. `expected`
    /// describes the condition for the error message.
    async fn wait_until(
        &self,
        trace_id: &[u8],
        expected: &str,
        complete: impl Fn(&[Received]) -> bool,
    ) -> anyhow::Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + e2e::patience();
        loop {
            let spans: Vec<Received> = self
                .spans
                .lock()
                .expect("collector lock")
                .iter()
                .filter(|received| received.span.trace_id == trace_id)
                .cloned()
                .collect();
            if complete(&spans) {
                return Ok(spans);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the collector did not receive {expected} of the trace; it has {:?}",
                spans
                    .iter()
                    .map(|received| (&received.service, &received.span.name))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Returns a new CA's certificate, and a certificate for `127.0.0.1` that it signed with its key,
/// all as PEM.
fn certificates() -> anyhow::Result<(String, String, String)> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "e2e collector CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &ca)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

fn text(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(text) => Some(text.clone()),
        _ => None,
    }
}

fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    let value = span.attributes.iter().find(|attribute| attribute.key == key)?;
    match value.value.as_ref()?.value.as_ref()? {
        AnyValue::IntValue(number) => Some(*number),
        _ => None,
    }
}

fn string_attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|attribute| attribute.key == key)?;
    match value.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(text) => Some(text.clone()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A caller's W3C trace context: random trace and span ids, sampled.
struct CallerTrace {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

impl CallerTrace {
    fn random() -> Self {
        let mut rng = rand::rng();
        Self {
            trace_id: rng.random(),
            span_id: rng.random(),
        }
    }

    fn traceparent(&self) -> String {
        format!("00-{}-{}-01", hex(&self.trace_id), hex(&self.span_id))
    }
}

/// Publishes one event to `news` with the caller's `traceparent` in the metadata.
async fn publish_traced(env: &TestEnv, caller: &CallerTrace) -> anyhow::Result<()> {
    let mut client = env.publisher().await?;
    let mut request = tonic::Request::new(PublishRequest {
        channel: "news".into(),
        r#type: "post.created".into(),
        data: r#"{"title":"traced"}"#.into(),
        ..PublishRequest::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", caller.traceparent().parse()?);
    request.metadata_mut().insert("tracestate", "e2e=1".parse()?);
    client.publish(request).await?;
    Ok(())
}

/// Starts a deployment in `mode`, or returns `None` when the distributed mode's services are
/// missing and not required.
async fn deployment(mode: Mode, options: Options) -> anyhow::Result<Option<TestEnv>> {
    match mode {
        Mode::Distributed => TestEnv::start_with_or_skip(mode, options).await,
        Mode::Standalone => TestEnv::start_with(mode, options).await.map(Some),
    }
}

// === One trace from the caller through the notifier to the edge ===

/// Starts a deployment in `mode` whose services export their spans to a new collector, or
/// returns `None` when the distributed mode's services are missing and not required.
async fn traced_deployment(mode: Mode) -> anyhow::Result<Option<(Collector, TestEnv)>> {
    let (collector, collector_addr) = Collector::start().await?;
    let endpoint = format!("http://{collector_addr}");
    let options = Options::default()
        .notifier("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone())
        .notifier("OTEL_BSP_SCHEDULE_DELAY", "100")
        .edge("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .edge("OTEL_BSP_SCHEDULE_DELAY", "100");
    Ok(deployment(mode, options).await?.map(|env| (collector, env)))
}

async fn spans_share_the_callers_trace(mode: Mode) -> anyhow::Result<()> {
    let Some((collector, env)) = traced_deployment(mode).await? else {
        return Ok(());
    };
    let mut alice = env.connect("alice").await?;
    alice.subscribe("news").await?;

    let caller = CallerTrace::random();
    publish_traced(&env, &caller).await?;
    let frame = alice.expect_type("post.created").await?;
    assert_eq!(frame["data"]["title"], "traced");

    let spans = collector
        .wait_for(
            &caller.trace_id,
            &["publish", "validate", "commit", "append", "deliver"],
        )
        .await?;
    let named = |name: &str| -> anyhow::Result<&Received> {
        let mut matching = spans.iter().filter(|received| received.span.name == name);
        let first = matching.next().with_context(|| format!("no {name} span"))?;
        ensure!(matching.next().is_none(), "more than one {name} span in the trace");
        Ok(first)
    };

    // `publish` is the caller's child; the notifier's other spans and the edge's `deliver` are
    // children of `publish`.
    let publish = named("publish")?;
    assert_eq!(publish.span.parent_span_id, caller.span_id);
    for child in ["validate", "commit", "append", "deliver"] {
        assert_eq!(
            named(child)?.span.parent_span_id,
            publish.span.span_id,
            "{child} is not a child of publish"
        );
    }

    // The spans come from both services (one process in standalone mode).
    let (notifier_service, edge_service) = match mode {
        Mode::Distributed => ("notifier", "ws-edge"),
        Mode::Standalone => ("notify-standalone", "notify-standalone"),
    };
    assert_eq!(publish.service, notifier_service);
    let deliver = named("deliver")?;
    assert_eq!(deliver.service, edge_service);

    // The delivery span counts the one local recipient and the time to its write.
    assert_eq!(
        int_attribute(&deliver.span, "delivery.recipients"),
        Some(1),
        "{:?}",
        deliver.span.attributes
    );
    assert_eq!(int_attribute(&deliver.span, "delivery.dropped"), Some(0));
    let latency = int_attribute(&deliver.span, "delivery.commit_to_last_write_ms").context("no latency attribute")?;
    assert!((0..60_000).contains(&latency), "commit to last write took {latency} ms");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_chain_distributed() -> anyhow::Result<()> {
    spans_share_the_callers_trace(Mode::Distributed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_chain_standalone() -> anyhow::Result<()> {
    spans_share_the_callers_trace(Mode::Standalone).await
}

// === A PublishBatch call: one publish span per event ===

async fn batch_spans_share_the_callers_trace(mode: Mode) -> anyhow::Result<()> {
    let Some((collector, env)) = traced_deployment(mode).await? else {
        return Ok(());
    };
    let mut alice = env.connect("alice").await?;
    alice.subscribe("news").await?;

    let caller = CallerTrace::random();
    let events = ["first", "second"]
        .map(|title| PublishRequest {
            channel: "news".into(),
            r#type: "post.created".into(),
            data: format!(r#"{{"title":"{title}"}}"#),
            ..PublishRequest::default()
        })
        .to_vec();
    let mut request = tonic::Request::new(PublishBatchRequest { events });
    request
        .metadata_mut()
        .insert("traceparent", caller.traceparent().parse()?);
    env.publisher().await?.publish_batch(request).await?;
    assert_eq!(alice.expect_type("post.created").await?["data"]["title"], "first");
    assert_eq!(alice.expect_type("post.created").await?["data"]["title"], "second");

    let spans = collector.wait_for_count(&caller.trace_id, "deliver", 2).await?;
    let named = |name: &str| -> Vec<&Span> {
        spans
            .iter()
            .filter(|received| received.span.name == name)
            .map(|received| &received.span)
            .collect()
    };
    let publishes = named("publish");
    assert_eq!(publishes.len(), 2, "one publish span per event");
    for publish in &publishes {
        assert_eq!(publish.parent_span_id, caller.span_id);
        assert_eq!(string_attribute(publish, "rpc.method").as_deref(), Some("PublishBatch"));
    }
    let mut parents: Vec<&[u8]> = named("deliver")
        .iter()
        .map(|deliver| deliver.parent_span_id.as_slice())
        .collect();
    let mut publish_ids: Vec<&[u8]> = publishes.iter().map(|publish| publish.span_id.as_slice()).collect();
    parents.sort_unstable();
    publish_ids.sort_unstable();
    assert_eq!(
        parents, publish_ids,
        "each deliver span is the child of its event's publish span"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_trace_distributed() -> anyhow::Result<()> {
    batch_spans_share_the_callers_trace(Mode::Distributed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_trace_standalone() -> anyhow::Result<()> {
    batch_spans_share_the_callers_trace(Mode::Standalone).await
}

// === Export to an https endpoint ===

/// Spans reach a collector that listens with TLS, verified with the CA of
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`.
async fn spans_reach_an_https_collector(mode: Mode) -> anyhow::Result<()> {
    let name = format!("{mode:?}-{}", hex(&rand::rng().random::<[u8; 8]>()));
    let (collector, collector_addr, ca_path) = Collector::start_tls(&name).await?;
    let endpoint = format!("https://{collector_addr}");
    let ca_path = ca_path.display().to_string();
    let options = Options::default()
        .notifier("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone())
        .notifier("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_path.clone())
        .notifier("OTEL_BSP_SCHEDULE_DELAY", "100")
        .edge("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .edge("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_path)
        .edge("OTEL_BSP_SCHEDULE_DELAY", "100");
    let Some(env) = deployment(mode, options).await? else {
        return Ok(());
    };
    let mut alice = env.connect("alice").await?;
    alice.subscribe("news").await?;

    let caller = CallerTrace::random();
    publish_traced(&env, &caller).await?;
    alice.expect_type("post.created").await?;
    collector.wait_for(&caller.trace_id, &["publish", "deliver"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_export_distributed() -> anyhow::Result<()> {
    spans_reach_an_https_collector(Mode::Distributed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_export_standalone() -> anyhow::Result<()> {
    spans_reach_an_https_collector(Mode::Standalone).await
}

// === JSON log lines carry the trace id ===

async fn json_logs_carry_trace_id(mode: Mode) -> anyhow::Result<()> {
    // No exporter: the ids in the log lines must not depend on one.
    let options = Options::default()
        .notifier("LOG_FORMAT", "json")
        .notifier("RUST_LOG", "info,notifier=debug")
        .edge("LOG_FORMAT", "json");
    let Some(env) = deployment(mode, options).await? else {
        return Ok(());
    };
    let caller = CallerTrace::random();
    publish_traced(&env, &caller).await?;

    // Let the log forwarder write the last lines, then read the notifier's (or the single
    // process's) log file.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let name = match mode {
        Mode::Distributed => "notifier",
        Mode::Standalone => "standalone",
    };
    let path = e2e::env::work_dir().join("logs").join(format!("{}-{name}.log", env.id));
    let log = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a log line starting with { is not JSON")?;
    ensure!(!lines.is_empty(), "no JSON log line in {}", path.display());

    // The request's line carries the caller's trace id and the `publish` span's id.
    let published: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line["message"] == "event published")
        .collect();
    assert_eq!(published.len(), 1, "{log}");
    let line = published[0];
    assert_eq!(line["trace_id"], hex(&caller.trace_id));
    assert_eq!(line["span"], "publish");
    let span_id = line["span_id"].as_str().context("no span_id")?;
    assert_eq!(span_id.len(), 16);
    assert_ne!(span_id, hex(&caller.span_id));

    // Lifecycle lines are outside any request and carry no trace id.
    let listening = lines
        .iter()
        .find(|line| line["message"] == "listening")
        .context("no listening line")?;
    assert!(listening.get("trace_id").is_none(), "{listening}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_distributed() -> anyhow::Result<()> {
    json_logs_carry_trace_id(Mode::Distributed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_standalone() -> anyhow::Result<()> {
    json_logs_carry_trace_id(Mode::Standalone).await
}

// === The trace id in the event frame ===

/// With `EVENT_TRACE_ID`, the event frame carries the caller's trace id; without it, no trace id.
async fn frames_carry_trace_id(mode: Mode) -> anyhow::Result<()> {
    for enabled in [true, false] {
        let options = Options::default().edge("EVENT_TRACE_ID", enabled.to_string());
        let Some(env) = deployment(mode, options).await? else {
            return Ok(());
        };
        let mut alice = env.connect("alice").await?;
        alice.subscribe("news").await?;

        let caller = CallerTrace::random();
        publish_traced(&env, &caller).await?;
        let frame = alice.expect_type("post.created").await?;
        if enabled {
            assert_eq!(frame["traceId"], hex(&caller.trace_id), "{frame}");
        } else {
            assert!(frame.get("traceId").is_none(), "{frame}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_trace_id_distributed() -> anyhow::Result<()> {
    frames_carry_trace_id(Mode::Distributed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_trace_id_standalone() -> anyhow::Result<()> {
    frames_carry_trace_id(Mode::Standalone).await
}
