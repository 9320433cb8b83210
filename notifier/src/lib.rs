//! The notifier: a gRPC service that validates events, commits them to the store of record and
//! appends them to the event stream the edges read.
//!
//! An event's path: [`service`] validates the request ([`validate`]) and queues it for its
//! partition's committer ([`committer`]), which commits a batch in one transaction ([`store`]),
//! replies to the callers, and appends the batch to the stream ([`stream`] for Redis). When an
//! append fails, the [`relay`] appends the stored events once the stream is back.
//!
//! Layout:
//! - [`config`]: settings from flags and environment variables, with their defaults.
//! - [`apikey`]: the callers' API keys and what each may call.
//! - [`error`]: the errors a call can end with, mapped to gRPC status codes in one place.
//! - [`validate`]: checks of a publish request and its trace context.
//! - [`store`]: the store of record on PostgreSQL or SQLite.
//! - [`committer`]: per partition, one task that commits batches and one that appends them.
//! - [`relay`]: catches the stream up from the store after failed appends and crashes.
//! - [`stream`]: the Redis stream writer.
//! - [`retention`]: deletes expired events and idempotency keys.
//! - [`service`]: the `notify.v1.Notifier` gRPC service.
//! - [`spans`]: the trace spans of a publish call.
//! - [`http`]: `/healthz`, `/readyz` and `/metrics`.
//! - [`limits`]: the per-caller publish rate limit.
//! - [`metrics`]: the Prometheus metrics.
//! - [`cli`]: the `publish`, `token` and `hash-key` developer commands.

pub mod apikey;
pub mod cli;
pub mod committer;
pub mod config;
pub mod error;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod relay;
pub mod retention;
pub mod service;
pub mod spans;
pub mod store;
pub mod stream;
pub mod validate;

use std::future::Future;
use std::sync::Arc;

use notify_proto::log::LogWriter;
use notify_proto::metrics::MetricsRegistry;
use notify_proto::pb::notifier_server::NotifierServer;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::apikey::ApiKeys;
use crate::committer::{Committers, Publisher};
pub use crate::config::Config;
use crate::limits::PublishLimiter;
use crate::metrics::Metrics;
use crate::relay::{Lanes, Relay};
use crate::service::NotifierService;
use crate::store::Store;

/// Smallest gRPC request size limit: tonic's default of 4 MiB. Every notifier accepts encoded
/// requests of this size, whatever its `MAX_PAYLOAD_BYTES`.
pub const MIN_REQUEST_LIMIT: usize = 4 * 1024 * 1024;

/// Room for the request's fields other than `data`: channel, type, user_id and key are at most
/// 255 + 64 + 255 + 255 bytes, plus protobuf framing.
const REQUEST_OVERHEAD: usize = 16 * 1024;

/// Serves the gRPC API on `grpc`, and `/healthz`, `/readyz` and `/metrics` on `http` if given,
/// until `shutdown` resolves, then drains within `config.shutdown_grace`. The notifier's metrics
/// are registered in `registry`, which `/metrics` encodes whole.
///
/// Logs `listening` with `service` and `addr` fields once per listener. On shutdown it reports
/// NOT_SERVING to gRPC health checks and 503 on `/readyz`, stops accepting connections, lets
/// running calls finish, commits every queued request and replies to it, and appends what
/// was committed. Requests still queued when the grace period runs out fail with UNAVAILABLE.
///
/// # Errors
/// Fails when the store was opened with another number of partitions than `config.partitions`,
/// or when a listener or the gRPC server fails.
pub async fn serve(
    config: &Config,
    store: Store,
    log: Arc<dyn LogWriter>,
    registry: &MetricsRegistry,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        store.partitions() == config.partitions,
        "the store was opened with {} partitions but the configuration has {}",
        store.partitions(),
        config.partitions
    );

    tracing::info!(version = env!("CARGO_PKG_VERSION"), "notifier starting");

    // Read the API keys first, so that a bad entry stops the start before anything runs.
    let api_keys = ApiKeys::parse(&config.publisher_keys, &config.edge_keys)?;
    if !api_keys.is_enabled() {
        tracing::warn!(
            "PUBLISHER_KEYS and EDGE_KEYS are unset; any gRPC caller may publish and read without an API key"
        );
    }

    // Start the committers, the relay and the retention sweeper.
    let metrics = Metrics::register(registry);
    let (workers, publisher) = Workers::start(config, &store, log, &metrics);
    metrics.watch_queues(publisher.watch());

    // Serve the probes, then the gRPC API until shutdown, then let its calls finish.
    let draining = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let http_task = spawn_http(http, &store, registry, &metrics, &draining, &http_stop)?;
    let limiter = PublishLimiter::new(config.publish_rate, config.publish_burst, config.publish_rate_keys);
    let service = NotifierService::new(publisher, store, config.max_payload_bytes, limiter)
        .with_api_keys(api_keys)
        .with_metrics(metrics);
    let served = serve_grpc(config, service, grpc, &draining, shutdown).await;
    let deadline = match &served {
        Ok(deadline) => *deadline,
        Err(_) => Instant::now() + config.shutdown_grace,
    };

    // Drain the queues and the relay, then close the probes.
    workers.drain(deadline).await;
    tracing::info!("drained");
    http_stop.cancel();
    if let Some(task) = http_task {
        let _ = tokio::time::timeout_at(deadline, task).await;
    }
    tracing::info!("stopped");
    served.map(drop)
}

fn spawn_http(
    listener: Option<TcpListener>,
    store: &Store,
    registry: &MetricsRegistry,
    metrics: &Metrics,
    draining: &CancellationToken,
    stop: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(listener) = listener else {
        return Ok(None);
    };
    let addr = listener.local_addr()?;
    let readiness = http::Readiness {
        store: store.clone(),
        draining: draining.clone(),
    };
    let task = tokio::spawn(http::run(
        listener,
        readiness,
        registry.clone(),
        metrics.http_connections_rejected.clone(),
        stop.clone().cancelled_owned(),
    ));
    tracing::info!(service = "http", addr = %addr, "listening");
    Ok(Some(task))
}

/// Serves until `shutdown` resolves, then drains the connections until the grace period ends.
/// Returns the end of the grace period.
async fn serve_grpc(
    config: &Config,
    service: NotifierService,
    listener: TcpListener,
    draining: &CancellationToken,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Instant> {
    let addr = listener.local_addr()?;
    let (health, routes) = grpc_routes(config, service)?;
    set_health(&health, ServingStatus::Serving).await;
    // Without TCP_NODELAY, a response written in several segments waits for the caller's delayed
    // acknowledgement: a PublishBatch reply took 40 ms more.
    // NOTE: connections are neither capped nor timed out before their first request; the
    // Kubernetes NetworkPolicy in deploy/k8s limits who may connect.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = routes.serve_with_incoming_shutdown(incoming, draining.clone().cancelled_owned());
    tracing::info!(service = "grpc", addr = %addr, "listening");
    tokio::pin!(server);

    tokio::select! {
        result = &mut server => {
            result?;
            anyhow::bail!("the gRPC server stopped before shutdown was requested");
        }
        () = shutdown => {}
    }

    let deadline = Instant::now() + config.shutdown_grace;
    tracing::info!(
        grace_ms = config.shutdown_grace.as_millis() as u64,
        "shutdown started; draining"
    );
    set_health(&health, ServingStatus::NotServing).await;
    draining.cancel();
    match tokio::time::timeout_at(deadline, server).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("gRPC calls were still running when the grace period ran out"),
    }
    Ok(deadline)
}

/// Builds the gRPC routes: health, reflection and the notifier service. Returns them with the
/// handle that sets the health status.
fn grpc_routes(config: &Config, service: NotifierService) -> anyhow::Result<(HealthReporter, Router)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(notify_proto::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let request_limit = MIN_REQUEST_LIMIT.max(config.max_payload_bytes.saturating_add(REQUEST_OVERHEAD));
    let notifier = NotifierServer::new(service).max_decoding_message_size(request_limit);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls_config(config)? {
        builder = builder.tls_config(tls)?;
    }
    let routes = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(notifier);
    Ok((health, routes))
}

/// Reads `GRPC_TLS_CERT`, `GRPC_TLS_KEY` and `GRPC_TLS_CLIENT_CA` into tonic's TLS settings, or
/// returns `None` when the listener speaks plain HTTP/2.
fn tls_config(config: &Config) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    use anyhow::Context;
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};

    let read = |path: &std::path::Path, variable: &str| {
        std::fs::read(path).with_context(|| format!("read {variable} {}", path.display()))
    };
    let (Some(cert), Some(key)) = (&config.grpc_tls_cert, &config.grpc_tls_key) else {
        anyhow::ensure!(
            config.grpc_tls_client_ca.is_none(),
            "GRPC_TLS_CLIENT_CA needs GRPC_TLS_CERT and GRPC_TLS_KEY"
        );
        return Ok(None);
    };
    let identity = Identity::from_pem(read(cert, "GRPC_TLS_CERT")?, read(key, "GRPC_TLS_KEY")?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.grpc_tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "GRPC_TLS_CLIENT_CA")?));
    }
    Ok(Some(tls))
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health
        .set_service_status(notify_proto::pb::notifier_server::SERVICE_NAME, status)
        .await;
    health.set_service_status("", status).await;
}

/// The background tasks and the handles that stop them.
struct Workers {
    /// The committers; they stop when every [`Publisher`] is gone and their queues are empty.
    committers: TaskTracker,
    /// Makes the committers drop their queues and stop, when the grace period runs out.
    abort: CancellationToken,
    /// The relay and the retention sweeper.
    background: TaskTracker,
    stop_background: CancellationToken,
}

impl Workers {
    fn start(config: &Config, store: &Store, log: Arc<dyn LogWriter>, metrics: &Metrics) -> (Workers, Publisher) {
        let workers = Workers {
            committers: TaskTracker::new(),
            abort: CancellationToken::new(),
            background: TaskTracker::new(),
            stop_background: CancellationToken::new(),
        };
        let lanes = Arc::new(Lanes::new(config.partitions));
        let committers = Committers {
            store: store.clone(),
            log: Arc::clone(&log),
            lanes: Arc::clone(&lanes),
            publish_queue: config.publish_queue,
            committers: config.commit_concurrency,
            idempotency_window: config.idempotency_window,
            metrics: metrics.clone(),
        };
        let publisher = committers.spawn(&workers.committers, &workers.abort);
        let relay = Relay::new(store.clone(), log, lanes, config.stream_max_len).with_metrics(metrics.clone());
        workers.background.spawn(relay.run(workers.stop_background.clone()));
        workers.background.spawn(retention::run(
            store.clone(),
            config.store_retention,
            config.idempotency_window,
            metrics.clone(),
            workers.stop_background.clone(),
        ));
        (workers, publisher)
    }

    /// Waits for the committers to empty their queues, then stops the relay after its last
    /// sweep, both bounded by `deadline`. Call it after the gRPC server, which owns the
    /// publishers, has stopped.
    async fn drain(self, deadline: Instant) {
        self.committers.close();
        if tokio::time::timeout_at(deadline, self.committers.wait()).await.is_err() {
            tracing::warn!("publish requests were still queued when the grace period ran out; failing them");
            self.abort.cancel();
        }
        self.stop_background.cancel();
        self.background.close();
        if tokio::time::timeout_at(deadline, self.background.wait()).await.is_err() {
            tracing::warn!("the relay was still appending when the grace period ran out");
        }
    }
}
