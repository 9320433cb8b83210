//! `bench`: runs one benchmark scenario against a fresh deployment and prints its result as a
//! markdown table row and as JSON. `bench --help` lists the scenarios; bench/README.md explains
//! each.

use clap::{Parser, Subcommand};

use bench::limits::{check_socket_budget, raise_open_files_limit};
use bench::report::emit;
use bench::scenario::{client, fanout, idle, publish, storm, throughput};

/// Benchmarks of the notification service.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N subscribed sockets, events at a fixed rate: deliveries, latency, CPU per delivery.
    Fanout(fanout::FanoutArgs),
    /// Resident memory of the socket server per idle subscribed socket.
    Idle(idle::IdleArgs),
    /// Restart the edge under subscribed sockets that resume with `since`.
    ReconnectStorm(storm::StormArgs),
    /// Durable publishes per second with a fixed concurrency.
    PublishThroughput(throughput::ThroughputArgs),
    /// The load client alone, against a server that already runs.
    Client(client::ClientArgs),
    /// The open-loop publisher alone, against a server that already runs.
    Publish(publish::PublishArgs),
}

impl Scenario {
    fn sockets(&self) -> usize {
        match self {
            Self::Fanout(args) => args.sockets,
            Self::Idle(args) => args.sockets,
            Self::ReconnectStorm(args) => args.sockets,
            Self::Client(args) => args.sockets,
            Self::PublishThroughput(_) | Self::Publish(_) => 0,
        }
    }

    async fn run(&self) -> anyhow::Result<()> {
        match self {
            Self::Fanout(args) => emit(&fanout::run(args).await?, args.common.json.as_deref()),
            Self::Idle(args) => emit(&idle::run(args).await?, args.common.json.as_deref()),
            Self::ReconnectStorm(args) => emit(&storm::run(args).await?, args.common.json.as_deref()),
            Self::PublishThroughput(args) => emit(&throughput::run(args).await?, args.common.json.as_deref()),
            Self::Client(args) => emit(&client::run(args).await?, args.json.as_deref()),
            Self::Publish(args) => emit(&publish::run(args).await?, args.json.as_deref()),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = notify_proto::telemetry::init("bench");
    let open_files = raise_open_files_limit()?;
    check_socket_budget(args.scenario.sockets(), open_files)?;

    // Ctrl-C drops the scenario, which kills the servers it started and drops its database.
    tokio::select! {
        result = args.scenario.run() => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    }
}
