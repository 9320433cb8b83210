//! The `ws-edge` binary: reads the stream from Redis and recovers from the notifier.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
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
    let Args { config } = Args::parse();
    notify_proto::telemetry::init();

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
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind EDGE_LISTEN {}", config.listen))?;

    ws_edge::serve(&config, log, history, listener, notify_proto::shutdown::signal()).await
}
