//! Single-process mode: the notifier and the WebSocket edge in one process, on an SQLite file and
//! an in-process stream, so that a machine with nothing but cargo runs the whole service.
//!
//! Layout:
//! - `main.rs`: the command line and the composition of the two services.
//! - [`dev_secret`]: the per-data-directory development secret and the loopback check.
//!
//! The settings of both services come from the same environment variables as in the distributed
//! mode (see the README); this command adds `--data-dir` and the development secret.

mod dev_secret;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use notify_proto::memory::MemoryLog;
use notify_proto::metrics::MetricsRegistry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Default directory of the SQLite file and the development secret.
const DEFAULT_DATA_DIR: &str = "./data";
/// Default gRPC address: loopback only, because the development secret is not a real secret.
const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:50051";
/// Default HTTP and WebSocket address.
const DEFAULT_EDGE_LISTEN: &str = "127.0.0.1:8080";
/// Default address of `/metrics`, with both services' metrics: loopback, like the others.
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9090";
/// Lifetime of the development token printed at start, in seconds.
const DEV_TOKEN_TTL_SECS: u64 = 24 * 3600;

#[derive(Parser)]
#[command(
    name = "notify-standalone",
    version,
    about = "Notifier and WebSocket edge in one process, on SQLite"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the notifier and the edge (the default).
    Serve,
    /// Publish one event to a running notifier.
    Publish(notifier::cli::PublishArgs),
    /// Publish the events of a JSON Lines file in PublishBatch calls and print each result.
    PublishBatch(notifier::cli::PublishBatchArgs),
    /// Mint a client token.
    Token(notifier::cli::TokenArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory of the SQLite store and the development secret.
    #[arg(long, env = "NOTIFY_DATA_DIR", default_value = DEFAULT_DATA_DIR, global = true)]
    data_dir: PathBuf,

    /// Address of the gRPC listener.
    #[arg(long = "listen", env = "NOTIFIER_LISTEN", default_value = DEFAULT_GRPC_LISTEN)]
    grpc_listen: SocketAddr,

    /// Address of the HTTP and WebSocket listener.
    #[arg(long, env = "EDGE_LISTEN", default_value = DEFAULT_EDGE_LISTEN)]
    edge_listen: SocketAddr,

    /// Address of the listener that serves both services' Prometheus metrics at `/metrics`.
    #[arg(long, env = "EDGE_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    metrics_listen: SocketAddr,

    /// HS256 secret for client tokens. Without it, a development secret is generated once per
    /// data directory and kept in `<data-dir>/dev-secret`.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = notify_proto::settings::parse_non_empty)]
    jwt_secret: Option<String>,

    /// Allow a non-loopback listen address while the development secret is in use.
    #[arg(long)]
    allow_remote_dev_secret: bool,

    /// Service settings shared with the distributed notifier.
    #[command(flatten)]
    notifier: notifier::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::try_parse()
        .map_err(|err| notify_proto::settings::name_variable(err, &Cli::command()))
        .unwrap_or_else(|err| err.exit());
    // Logs go to stderr, so that stdout carries only the start banner and command output.
    let telemetry = notify_proto::telemetry::init_to("notify-standalone", notify_proto::telemetry::LogOutput::Stderr);
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.serve).await,
        Command::Publish(args) => notifier::cli::publish(args).await,
        Command::PublishBatch(args) => notifier::cli::publish_batch(args).await,
        Command::Token(args) => notifier::cli::token(args).map(|token| println!("{token}")),
    };
    telemetry.shutdown();
    result
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Decide the token secret, and refuse to expose a development secret by accident.
    let secret = match &args.jwt_secret {
        Some(secret) => dev_secret::Secret::Configured(secret.clone()),
        None => dev_secret::Secret::Development(dev_secret::load_or_create(&args.data_dir)?),
    };
    if matches!(secret, dev_secret::Secret::Development(_)) && !args.allow_remote_dev_secret {
        dev_secret::require_loopback(&[("--listen", args.grpc_listen), ("--edge-listen", args.edge_listen)])?;
    }

    // Open the store and the in-process stream, then bind both listeners.
    let store = notifier::store::Store::open(&sqlite_url(&args.data_dir)?, args.notifier.partitions).await?;
    let log = Arc::new(MemoryLog::new(args.notifier.partitions, args.notifier.stream_max_len));
    let grpc = bind(args.grpc_listen, "--listen").await?;
    let http = bind(args.edge_listen, "--edge-listen").await?;
    let metrics = bind(args.metrics_listen, "--metrics-listen").await?;
    let edge_config = edge_config(&args, secret.value(), grpc.local_addr()?, http.local_addr()?)?;
    let addrs = BannerAddrs {
        grpc: grpc.local_addr()?,
        http: http.local_addr()?,
        metrics: metrics.local_addr()?,
    };
    print_banner(&args, &secret, addrs)?;

    // Run both services until a signal, then drain both.
    let stop = CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        notify_proto::shutdown::signal().await;
        signal_stop.cancel();
    });
    // One registry holds both services' metrics (`notify_notifier_*` and `notify_edge_*`), and
    // the edge's metrics listener serves it.
    let registry = MetricsRegistry::new();
    let notifier_run = notifier::serve(
        &args.notifier,
        store.clone(),
        log.clone(),
        &registry,
        grpc,
        None,
        stop.clone().cancelled_owned(),
    );
    let edge_run = ws_edge::serve(
        &edge_config,
        log,
        Arc::new(store),
        &registry,
        http,
        Some(metrics),
        stop.clone().cancelled_owned(),
    );
    let (notifier_result, edge_result) = tokio::join!(notifier_run, edge_run);
    notifier_result.context("notifier")?;
    edge_result.context("edge")
}

fn sqlite_url(data_dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("create the data directory {}", data_dir.display()))?;
    Ok(format!("sqlite://{}?mode=rwc", data_dir.join("notify.db").display()))
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {flag} {addr}; is another process using it?"))
}

/// Builds the edge's settings from the environment, like the `ws-edge` binary, with this
/// command's listener, secret and partition count on top.
fn edge_config(args: &ServeArgs, secret: &str, grpc: SocketAddr, http: SocketAddr) -> anyhow::Result<ws_edge::Config> {
    #[derive(Parser)]
    struct EdgeCommand {
        #[command(flatten)]
        config: ws_edge::Config,
    }
    let partitions = args.notifier.partitions.to_string();
    let listen = http.to_string();
    let command = EdgeCommand::try_parse_from([
        "ws-edge",
        "--jwt-secret",
        secret,
        "--edge-listen",
        &listen,
        "--stream-partitions",
        &partitions,
    ])
    .map_err(|err| notify_proto::settings::name_variable(err, &EdgeCommand::command()))
    .context("read the edge settings from the environment")?;
    let mut config = command.config;
    config.demo_publish_command = publish_command(grpc);
    // This process bound the listener itself, without SO_REUSEPORT: a second single-process
    // server would have a store of its own, so it cannot take over this one's sockets.
    config.listen_reuseport = false;
    Ok(config)
}

/// Returns the shell command that publishes to a channel of this process, `{channel}` left as a
/// placeholder for the demo page.
fn publish_command(grpc: SocketAddr) -> String {
    format!(
        r#"cargo run --release -- publish --addr http://{grpc} --channel {{channel}} --type demo.message --data '{{"text":"שלום, world"}}'"#
    )
}

/// The bound addresses the start banner shows.
struct BannerAddrs {
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
}

fn print_banner(args: &ServeArgs, secret: &dev_secret::Secret, addrs: BannerAddrs) -> anyhow::Result<()> {
    let BannerAddrs { grpc, http, metrics } = addrs;
    let token = notifier::cli::token(notifier::cli::TokenArgs {
        user: "dev".into(),
        ttl: DEV_TOKEN_TTL_SECS,
        channels: Vec::new(),
        secret: secret.value().to_owned(),
    })?;
    let host = loopback_if_unspecified(http);
    println!();
    println!(
        "  notify is running in single-process mode (data in {})",
        args.data_dir.display()
    );
    println!();
    println!("  gRPC API        http://{grpc}");
    println!("  WebSocket       ws://{host}/ws");
    println!("  Metrics         http://{}/metrics", loopback_if_unspecified(metrics));
    // A token signed with a configured secret is a real credential, and stdout often ends up in
    // a log collector, so only the development secret's token is printed.
    if let dev_secret::Secret::Development(_) = secret {
        println!("  Demo page       http://{host}/#token={token}");
        println!("  Dev token       {token}   (user \"dev\", valid 24 h)");
    } else {
        println!("  Demo page       http://{host}/   (paste a token; JWT_SECRET is configured)");
    }
    println!();
    println!("  Publish to the channel \"news\":");
    println!("    {}", publish_command(grpc).replace("{channel}", "news"));
    println!();
    Ok(())
}

/// Returns the address a local browser or `curl` reaches a listener on: 127.0.0.1 in place of
/// an unspecified address such as 0.0.0.0.
fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}
