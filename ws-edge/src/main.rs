//! The `ws-edge` binary: reads the stream from Redis and recovers from the notifier.

use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use notify_proto::metrics::MetricsRegistry;
use tokio::net::TcpListener;
use ws_edge::Config;
use ws_edge::history_client::GrpcHistory;
use ws_edge::stream::RedisLog;

/// WebSocket edge of the notification service.
#[derive(Parser)]
#[command(name = "ws-edge", version)]
struct Args {
    #[command(flatten)]
    config: Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { config } = Args::try_parse()
        .map_err(|err| notify_proto::settings::name_variable(err, &Args::command()))
        .unwrap_or_else(|err| err.exit());
    let telemetry = notify_proto::telemetry::init("ws-edge");
    let result = run(config).await;
    telemetry.shutdown();
    result
}

async fn run(config: Config) -> anyhow::Result<()> {
    let redis_url = config
        .redis_url
        .as_deref()
        .context("REDIS_URL is not set; the ws-edge binary reads the event stream from Redis (flag --redis-url)")?;
    let log = Arc::new(RedisLog::connect(redis_url, &config.stream_prefix)?);
    let mut history = GrpcHistory::new(&config.notifier_url)?;
    if let Some(api_key) = &config.notifier_api_key {
        history = history.with_api_key(api_key)?;
    }
    let history = Arc::new(history);
    let listener = ws_edge::http::bind(config.listen, config.listen_reuseport).with_context(|| {
        format!(
            "bind EDGE_LISTEN {} (EDGE_LISTEN_REUSEPORT={})",
            config.listen, config.listen_reuseport
        )
    })?;
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("bind EDGE_METRICS_LISTEN {}", config.metrics_listen))?;

    let registry = MetricsRegistry::new();
    let shutdown = notify_proto::shutdown::signal();
    ws_edge::serve(
        &config,
        log,
        history,
        &registry,
        listener,
        Some(metrics_listener),
        shutdown,
    )
    .await
}
