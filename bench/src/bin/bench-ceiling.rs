//! `bench-ceiling`: the bare fan-out server that sets the ceiling for the load client. It logs
//! `listening service="http" addr=..` for WebSocket clients and `listening service="trigger"
//! addr=..` for the trigger port, like the service binaries, so the runner can bind port 0.

use clap::Parser;
use tokio::net::TcpListener;

/// Bare tokio-tungstenite fan-out server, no auth and no store.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address for WebSocket clients.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Address of the trigger port: one JSON event `{"channel":..,"type":..,"data":..}` per line.
    #[arg(long, default_value = "127.0.0.1:0")]
    trigger_listen: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = notify_proto::telemetry::init("bench");
    let open_files = bench::limits::raise_open_files_limit()?;
    tracing::info!(open_files, "open-files limit raised");

    let ws_listener = TcpListener::bind(args.listen).await?;
    let trigger_listener = TcpListener::bind(args.trigger_listen).await?;
    tracing::info!(service = "http", addr = %ws_listener.local_addr()?, "listening");
    tracing::info!(service = "trigger", addr = %trigger_listener.local_addr()?, "listening");

    let slow_consumers = bench::ceiling::run(ws_listener, trigger_listener, notify_proto::shutdown::signal()).await?;
    tracing::info!(slow_consumers, "stopped");
    Ok(())
}
