//! [`serve`]: builds the edge's shared state, runs the stream reader and the HTTP server, and
//! drains on shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use notify_proto::history::HistoryStore;
use notify_proto::log::LogReader;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{self, Admission, AdmissionLimits};
use crate::auth::{ChannelPolicy, Verifier};
use crate::config::Config;
use crate::conflate::Conflation;
use crate::demo::DemoConfig;
use crate::fanout::Fanout;
use crate::hub::Hub;
use crate::origin::OriginPolicy;
use crate::outbound::QueueLimits;
use crate::recent::RecentLimits;
use crate::recovery::Recovery;
use crate::stats::Stats;
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
    /// Counters of what the limits rejected, dropped or closed.
    pub(crate) stats: Arc<Stats>,
}

impl Edge {
    /// Builds the shared state.
    ///
    /// # Errors
    /// Fails when a setting is invalid, naming it.
    pub fn new(config: &Config, log: Arc<dyn LogReader>, history: Arc<dyn HistoryStore>) -> anyhow::Result<Self> {
        let stats = Arc::new(Stats::default());
        let conflation = Conflation::new(config.conflate_prefixes.iter().map(String::as_str));
        let hub = Hub::new(config.partitions, RecentLimits::default()).with_conflation(conflation, stats.clone());
        let hub = Arc::new(hub);
        let queue = QueueLimits {
            frames: config.socket_queue_frames,
            bytes: config.socket_queue_bytes,
        };
        Ok(Self {
            verifier: Verifier::with_settings(config.verifier_settings()?)?,
            policy: ChannelPolicy::new(config.public_namespaces()),
            origins: OriginPolicy::new(config.allowed_origins.iter().map(String::as_str))?,
            fanout: Arc::new(Fanout::new(hub.clone(), log.clone(), history.clone())),
            recovery: Arc::new(Recovery::new(log, history)),
            hub,
            limits: Limits {
                queue,
                max_subscriptions: config.max_subscriptions,
                jwt_leeway: config.jwt_leeway,
                token_expiry_warning: config.token_expiry_warning,
            },
            socket_config: upgrade::socket_config(config.max_message_bytes, queue.bytes),
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            demo: DemoConfig {
                publish_command: config.demo_publish_command.clone(),
            },
            admission: Arc::new(Admission::new(admission_limits(config))),
            stats,
        })
    }

    /// Returns the counters of what the limits rejected, dropped or closed.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Returns whether the edge should receive traffic: the stream reader runs and no drain
    /// has started.
    pub fn is_ready(&self) -> bool {
        self.fanout.is_running() && !self.shutdown.is_cancelled()
    }
}

/// Returns the admission limits of a configuration; without `MAX_SOCKETS`, raises the
/// open-files limit and takes a share of it.
fn admission_limits(config: &Config) -> AdmissionLimits {
    AdmissionLimits {
        max_sockets: config.max_sockets.unwrap_or_else(admission::default_max_sockets),
        max_sockets_per_user: config.max_sockets_per_user,
        handshake: (config.handshake_rate, config.handshake_burst),
        socket_messages: (config.socket_message_rate, config.socket_message_burst),
        user_messages: (config.user_message_rate, config.user_message_burst),
        rate_limit_keys: config.rate_limit_keys,
    }
}

/// Serves the edge on `listener` until `shutdown` resolves, then drains.
///
/// Logs `listening` with `service = "http"` and the bound address once it serves. On shutdown it
/// stops accepting, closes every socket with 1012 after the frames already queued, and waits up
/// to `SHUTDOWN_GRACE` for them.
///
/// # Errors
/// Fails when a setting is invalid or the HTTP server stops on its own.
pub async fn serve(
    config: &Config,
    log: Arc<dyn LogReader>,
    history: Arc<dyn HistoryStore>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let edge = Arc::new(Edge::new(config, log, history)?);
    let addr = listener.local_addr().context("read the listener's address")?;

    // Start the stream reader; it loads the partition heads in the background.
    let fanout = tokio::spawn(edge.fanout.clone().run(edge.shutdown.clone()));

    // Load the identity provider's keys in the background; tokens that arrive first refetch them.
    if let Some(jwks) = edge.verifier.jwks() {
        tokio::spawn(jwks.clone().run(edge.shutdown.clone()));
    }

    // Serve until the signal, which cancels the edge's token.
    let stop = edge.shutdown.clone();
    let signal = async move {
        shutdown.await;
        stop.cancel();
    };
    let server = warp::serve(routes::routes(edge.clone()))
        .incoming(listener)
        .graceful(signal);
    tracing::info!(service = "http", addr = %addr, "listening");
    let mut server = tokio::spawn(server.run());
    tokio::select! {
        // The signal cancels the token before the server stops, so a server that stops with the
        // token cancelled is a normal shutdown and takes this branch.
        biased;
        () = edge.shutdown.cancelled() => {}
        result = &mut server => {
            edge.shutdown.cancel();
            let _ = fanout.await;
            anyhow::bail!("the HTTP server stopped without a shutdown signal: {result:?}");
        }
    }

    // Drain: the sockets close with 1012 as soon as the token is cancelled.
    drain(&edge, server, config.shutdown_grace).await;
    let _ = fanout.await;
    Ok(())
}

/// Waits for the HTTP server and every socket to finish, up to `grace`.
async fn drain(edge: &Edge, server: JoinHandle<()>, grace: Duration) {
    let grace_ms = grace.as_millis() as u64;
    tracing::info!(sockets = edge.sessions.len(), grace_ms, "draining");
    edge.sessions.close();
    let finished = async {
        let _ = server.await;
        edge.sessions.wait().await;
    };
    match tokio::time::timeout(grace, finished).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!(
            grace_ms,
            sockets = edge.sessions.len(),
            "drain did not finish within SHUTDOWN_GRACE; dropping the remaining sockets"
        ),
    }
}
