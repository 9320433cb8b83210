//! [`serve`]: builds the edge's shared state, runs the stream reader and the HTTP server, and
//! drains on shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use notify_proto::frame::FrameOptions;
use notify_proto::history::HistoryStore;
use notify_proto::http_server::{self, ConnectionLimits};
use notify_proto::log::LogReader;
use notify_proto::metrics::MetricsRegistry;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::{Filter, Reply};

use crate::admission::{self, Admission, AdmissionLimits};
use crate::auth::{ChannelPolicy, Verifier};
use crate::config::{
    Config, DEFAULT_HTTP_CONNECTIONS_SHARE_PERCENT, DEFAULT_UNAUTHENTICATED_SHARE_PERCENT, MIN_DEFAULT_HTTP_CONNECTIONS,
};
use crate::conflate::Conflation;
use crate::demo::DemoConfig;
use crate::fanout::Fanout;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::metrics::listener;
use crate::origin::OriginPolicy;
use crate::outbound::QueueLimits;
use crate::recent::RecentLimits;
use crate::recovery::Recovery;
use crate::{routes, upgrade};

/// Per-socket limits taken from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Capacity of each socket's outbound queue.
    pub queue: QueueLimits,
    /// Maximum subscriptions per socket.
    pub max_subscriptions: usize,
    /// Clock skew allowed on a token's `exp`, also when the expiry timer closes a socket.
    pub jwt_leeway: Duration,
    /// Time before a token's expiry at which the socket gets a `token_expiring` frame.
    pub token_expiry_warning: Duration,
}

/// The state every route and session shares.
pub struct Edge {
    pub(crate) verifier: Verifier,
    pub(crate) policy: ChannelPolicy,
    pub(crate) origins: OriginPolicy,
    pub(crate) hub: Arc<Hub>,
    pub(crate) recovery: Arc<Recovery>,
    pub(crate) fanout: Arc<Fanout>,
    pub(crate) limits: Limits,
    pub(crate) socket_config: WebSocketConfig,
    /// Cancelled when shutdown starts: sockets close with 1012, upgrades are refused, the stream
    /// reader stops, and `/readyz` returns 503.
    pub(crate) shutdown: CancellationToken,
    /// Every socket task, so that the drain can wait for them.
    pub(crate) sessions: TaskTracker,
    pub(crate) demo: DemoConfig,
    /// Handshake rate, socket counts and message rates.
    pub(crate) admission: Arc<Admission>,
    /// The edge's metrics, shared with the hub.
    pub(crate) metrics: Arc<Metrics>,
}

impl Edge {
    /// Builds the shared state, with its metrics registered in `registry`.
    ///
    /// # Errors
    /// Fails when a setting is invalid, naming it.
    pub fn new(
        config: &Config,
        log: Arc<dyn LogReader>,
        history: Arc<dyn HistoryStore>,
        registry: &MetricsRegistry,
    ) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::register(registry, config.partitions));
        let conflation = Conflation::new(config.conflate_prefixes.iter().map(String::as_str));
        let hub = Hub::new(config.partitions, RecentLimits::default())
            .with_conflation(conflation)
            .with_metrics(metrics.clone());
        let hub = Arc::new(hub);
        let verifier = Verifier::with_settings(config.verifier_settings()?)?;
        let admission = Arc::new(Admission::new(admission_limits(config)));
        metrics.watch(admission.clone(), verifier.jwks().cloned());
        let frame_options = FrameOptions {
            trace_id: config.event_trace_id,
        };
        let queue = QueueLimits {
            frames: config.socket_queue_frames,
            bytes: config.socket_queue_bytes,
        };
        Ok(Self {
            verifier,
            policy: ChannelPolicy::new(config.public_namespaces()),
            origins: OriginPolicy::new(config.allowed_origins.iter().map(String::as_str))?,
            fanout: Arc::new(Fanout::new(hub.clone(), log.clone(), history.clone()).with_frame_options(frame_options)),
            recovery: Arc::new(Recovery::new(log, history).with_frame_options(frame_options)),
            hub,
            limits: Limits {
                queue,
                max_subscriptions: config.max_subscriptions,
                jwt_leeway: config.jwt_leeway,
                token_expiry_warning: config.token_expiry_warning,
            },
            socket_config: upgrade::socket_config(config.max_message_bytes),
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            demo: DemoConfig {
                publish_command: config.demo_publish_command.clone(),
            },
            admission,
            metrics,
        })
    }

    /// Returns the edge's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Returns whether the edge should receive traffic: the stream reader runs and reads (see
    /// [`Fanout::is_healthy`]), and no drain has started.
    pub fn is_ready(&self) -> bool {
        self.fanout.is_healthy() && !self.shutdown.is_cancelled()
    }
}

/// Returns the admission limits of a configuration; without `MAX_SOCKETS`, raises the
/// open-files limit and takes a share of it.
fn admission_limits(config: &Config) -> AdmissionLimits {
    let max_sockets = config.max_sockets.unwrap_or_else(admission::default_max_sockets);
    let unauthenticated_share = percent_of(max_sockets, DEFAULT_UNAUTHENTICATED_SHARE_PERCENT);
    let http_share = percent_of(max_sockets, DEFAULT_HTTP_CONNECTIONS_SHARE_PERCENT);
    AdmissionLimits {
        max_sockets,
        max_unauthenticated: config
            .max_unauthenticated_sockets
            .unwrap_or(unauthenticated_share.max(1)),
        max_http_connections: config
            .max_http_connections
            .unwrap_or(http_share.max(MIN_DEFAULT_HTTP_CONNECTIONS)),
        max_sockets_per_user: config.max_sockets_per_user,
        handshake: (config.handshake_rate, config.handshake_burst),
        socket_messages: (config.socket_message_rate, config.socket_message_burst),
        user_messages: (config.user_message_rate, config.user_message_burst),
        rate_limit_keys: config.rate_limit_keys,
    }
}

/// Returns `percent` percent of `total`, rounded down, without overflowing.
fn percent_of(total: usize, percent: usize) -> usize {
    total / 100 * percent + total % 100 * percent / 100
}

/// Serves the edge on `listener`, and `registry`'s metrics at `/metrics` on `metrics_listener`
/// if given, until `shutdown` resolves, then drains.
///
/// Logs `listening` with `service = "http"` (and `service = "metrics"`) and the bound address
/// once it serves. On shutdown it closes every socket with 1012 after the frames already queued
/// and waits up to `SHUTDOWN_GRACE` for them, while the listener returns 503 to new upgrades
/// and to `/readyz`; then it closes the listener. The metrics listener stops when the drain
/// starts.
///
/// # Errors
/// Fails when a setting is invalid or the HTTP server stops on its own.
pub async fn serve(
    config: &Config,
    log: Arc<dyn LogReader>,
    history: Arc<dyn HistoryStore>,
    registry: &MetricsRegistry,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "edge starting");
    let edge = Arc::new(Edge::new(config, log, history, registry)?);
    let addr = listener.local_addr().context("read the listener's address")?;
    if let Some(metrics_listener) = metrics_listener {
        let metrics_addr = metrics_listener
            .local_addr()
            .context("read the metrics listener's address")?;
        let stop = edge.shutdown.clone().cancelled_owned();
        let rejected = edge.metrics.http_connections_rejected(listener::METRICS);
        tokio::spawn(routes::serve_metrics(
            metrics_listener,
            registry.clone(),
            rejected,
            stop,
        ));
        tracing::info!(service = "metrics", addr = %metrics_addr, "listening");
    }

    // Start the stream reader; it loads the partition heads in the background.
    let fanout = tokio::spawn(edge.fanout.clone().run(edge.shutdown.clone()));

    // Load the identity provider's keys in the background; tokens that arrive first refetch them.
    if let Some(jwks) = edge.verifier.jwks() {
        tokio::spawn(jwks.clone().run(edge.shutdown.clone()));
    }

    // Serve until the signal. The listener stays open during the drain and returns 503 to
    // upgrades and to `/readyz`, then closes when the drain ends.
    let server_stop = CancellationToken::new();
    let routes = warp::service(routes::routes(edge.clone()).map(Reply::into_response).boxed());
    // The accept loop counts each connection until it upgrades or closes, so it also bounds
    // handshakes in progress, which MAX_SOCKETS does not count yet.
    let rejected = edge.metrics.http_connections_rejected(listener::HTTP);
    let limits = ConnectionLimits::new(edge.admission.max_http_connections(), rejected);
    tracing::info!(service = "http", addr = %addr, "listening");
    let stop = server_stop.clone().cancelled_owned();
    let mut server = tokio::spawn(http_server::serve(listener, routes, limits, stop));
    tokio::select! {
        () = shutdown => {}
        result = &mut server => {
            edge.shutdown.cancel();
            let _ = fanout.await;
            anyhow::bail!("the HTTP server stopped without a shutdown signal: {result:?}");
        }
    }

    // Drain: the sockets close with 1012 as soon as the token is cancelled.
    drain(&edge, config.shutdown_grace).await;
    server_stop.cancel();
    if tokio::time::timeout(HTTP_STOP_TIMEOUT, server).await.is_err() {
        tracing::warn!("HTTP requests still in progress after the drain; dropping them");
    }
    let _ = fanout.await;
    tracing::info!("stopped");
    Ok(())
}

/// Time the HTTP requests still in progress (not upgraded sockets) get after the drain.
const HTTP_STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// Cancels the edge's token, which closes every socket with 1012, and waits up to `grace` for
/// them to end.
async fn drain(edge: &Edge, grace: Duration) {
    let grace_ms = grace.as_millis() as u64;
    tracing::info!(sockets = edge.admission.sockets(), grace_ms, "draining");
    edge.shutdown.cancel();
    edge.sessions.close();
    match tokio::time::timeout(grace, edge.sessions.wait()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!(
            grace_ms,
            sockets = edge.admission.sockets(),
            "drain did not finish within SHUTDOWN_GRACE; dropping the remaining sockets"
        ),
    }
}
