//! The `notifier` binary: `serve` (the default), `migrate`, and the developer commands `publish`,
//! `publish-batch`, `token` and `hash-key`.

use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use notifier::cli::{HashKeyArgs, PublishArgs, PublishBatchArgs, TokenArgs};
use notifier::config::{MigrateArgs, ServeArgs};
use notifier::store::Store;
use notifier::stream::RedisLog;
use notify_proto::metrics::MetricsRegistry;
use notify_proto::settings::name_variable;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "notifier",
    version,
    about = "gRPC publish service: commits events to the store of record and appends them to Redis Streams",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Settings of `serve`, which runs when no command is given. Clap leaves this `None` when
    /// none of its flags is on the command line, even if the environment sets them all.
    #[command(flatten)]
    serve: Option<ServeArgs>,
}

/// `serve`'s settings alone, read when no command is given and no flag either.
#[derive(Parser)]
#[command(name = "notifier")]
struct ServeOnly {
    #[command(flatten)]
    args: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
    /// Publish one event to a running notifier and print the response.
    Publish(PublishArgs),
    /// Publish the events of a JSON Lines file in PublishBatch calls and print each result.
    PublishBatch(PublishBatchArgs),
    /// Print an HS256 client token for the edge.
    Token(TokenArgs),
    /// Print the SHA-256 hash of an API key, for PUBLISHER_KEYS and EDGE_KEYS.
    HashKey(HashKeyArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::try_parse()
        .map_err(|err| name_variable(err, &Cli::command()))
        .unwrap_or_else(|err| exit_on_parse_error(&err));
    let telemetry = notify_proto::telemetry::init("notifier");
    let result = match cli.command {
        None => {
            let args = cli.serve.unwrap_or_else(|| {
                ServeOnly::try_parse()
                    .map_err(|err| name_variable(err, &ServeOnly::command()))
                    .unwrap_or_else(|err| exit_on_parse_error(&err))
                    .args
            });
            serve(args).await
        }
        Some(Command::Serve(args)) => serve(args).await,
        Some(Command::Migrate(args)) => migrate(args).await,
        Some(Command::Publish(args)) => notifier::cli::publish(args).await,
        Some(Command::PublishBatch(args)) => notifier::cli::publish_batch(args).await,
        Some(Command::Token(args)) => notifier::cli::token(args).map(|token| println!("{token}")),
        Some(Command::HashKey(args)) => notifier::cli::hash_key(args).map(|hash| println!("{hash}")),
    };
    telemetry.shutdown();
    result
}

/// Prints clap's message and exits. A missing setting also gets a hint that every flag has an
/// environment variable, which is how a container sets them.
fn exit_on_parse_error(err: &clap::Error) -> ! {
    if err.kind() == clap::error::ErrorKind::MissingRequiredArgument {
        eprintln!("{err}");
        eprintln!("Each option can also be set through its environment variable, such as DATABASE_URL and REDIS_URL.");
        std::process::exit(2);
    }
    err.exit()
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let store = Store::open(&args.database.database_url, args.config.partitions).await?;
    let log = RedisLog::connect(&args.redis_url, &args.stream_prefix, args.config.stream_max_len).await?;
    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind the gRPC listener to {} (NOTIFIER_LISTEN)", args.listen))?;
    let http = TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("bind the HTTP listener to {} (NOTIFIER_HTTP_LISTEN)", args.http_listen))?;
    let shutdown = notify_proto::shutdown::signal();
    let registry = MetricsRegistry::new();
    notifier::serve(
        &args.config,
        store,
        Arc::new(log),
        &registry,
        grpc,
        Some(http),
        shutdown,
    )
    .await
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    Store::open(&args.database.database_url, args.config.partitions).await?;
    tracing::info!(partitions = args.config.partitions, "migrations applied");
    Ok(())
}
