//! Publish throughput: durable publishes acknowledged per second with a fixed number of calls in
//! flight, the acknowledgement latency, and the CPU time per publish of the notifier, Redis and
//! the PostgreSQL backends.

use std::time::Duration;

use anyhow::bail;
use serde::Serialize;

use super::{Common, CpuUse, CpuWindow, channel_names, with_deployment};
use crate::deploy::{Deployment, Target};
use crate::publisher::{ClosedLoop, PublishTarget, run_closed_loop};
use crate::report::{Row, number};
use crate::stats::LatencySummary;

/// Publish rate and burst per caller given to the notifier, far above what one machine reaches.
const UNLIMITED_RATE: &str = "10000000";

/// Options of the publish-throughput scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct ThroughputArgs {
    /// Publishes in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections to the notifier.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Total publishes.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Time limit in seconds.
    #[arg(long, default_value_t = 20)]
    pub max_secs: u64,
    /// Channels the publishes spread over.
    #[arg(long, default_value_t = 64)]
    pub channels: usize,
    /// Events per call: 1 sends Publish calls, more sends PublishBatch calls of this many events
    /// (at most 100), and `--concurrency` counts calls.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub batch: u16,
    /// Options every scenario takes.
    #[command(flatten)]
    pub common: Common,
}

/// Result of one throughput run.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputResult {
    /// Always `publish-throughput`.
    pub scenario: &'static str,
    /// Calls in flight.
    pub concurrency: usize,
    /// Events per call.
    pub batch: u16,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Acknowledged publishes.
    pub acked: u64,
    /// Failed publishes.
    pub failures: u64,
    /// The first few failure messages.
    pub errors: Vec<String>,
    /// Seconds from the first call to the last response.
    pub elapsed_s: f64,
    /// Acknowledged publishes per second.
    pub acked_per_s: f64,
    /// Acknowledgement latency from the call.
    pub latency: LatencySummary,
    /// CPU time over the run.
    pub cpu: CpuUse,
    /// notifier + redis-server CPU microseconds per acknowledged publish.
    pub cpu_us_per_publish: Option<f64>,
    /// PostgreSQL backend CPU microseconds per acknowledged publish.
    pub database_cpu_us_per_publish: Option<f64>,
}

impl Row for ThroughputResult {
    fn columns(&self) -> Vec<&'static str> {
        vec![
            "concurrency",
            "batch",
            "acked",
            "failed",
            "publishes/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU-µs / publish (notifier + redis)",
            "PostgreSQL CPU-µs / publish",
        ]
    }

    fn cells(&self) -> Vec<String> {
        vec![
            self.concurrency.to_string(),
            self.batch.to_string(),
            self.acked.to_string(),
            self.failures.to_string(),
            number(Some(self.acked_per_s), 0),
            number(Some(self.latency.p50_ms), 2),
            number(Some(self.latency.p99_ms), 2),
            number(Some(self.latency.max_ms), 2),
            number(self.cpu_us_per_publish, 1),
            number(self.database_cpu_us_per_publish, 1),
        ]
    }
}

/// Runs the throughput scenario on a fresh notifier with its own Redis and database.
///
/// # Errors
/// Fails for the ceiling target, or when the deployment does not start or cannot be reached.
pub async fn run(args: &ThroughputArgs) -> anyhow::Result<ThroughputResult> {
    if args.common.target != Target::Edge {
        bail!("publish-throughput measures the notifier, so it needs --target edge");
    }
    let mut options = args.common.deploy_options(false)?;

    // The notifier's per-caller rate limit would cap the measurement, so lift it unless
    // --service-env sets it; later entries win.
    let unlimited = [("PUBLISH_RATE", UNLIMITED_RATE), ("PUBLISH_BURST", UNLIMITED_RATE)];
    let defaults = unlimited.map(|(key, value)| (key.to_owned(), value.to_owned()));
    options.service_env.splice(0..0, defaults);
    with_deployment(options, async |deployment| measure(deployment, args).await).await
}

async fn measure(deployment: &mut Deployment, args: &ThroughputArgs) -> anyhow::Result<ThroughputResult> {
    let PublishTarget::Grpc(addr) = deployment.publish else {
        bail!("the deployment has no gRPC notifier");
    };
    let plan = ClosedLoop {
        concurrency: args.concurrency,
        batch: usize::from(args.batch),
        connections: args.connections,
        events: args.events,
        max_duration: Duration::from_secs(args.max_secs),
        channels: channel_names(args.channels),
    };
    let window = CpuWindow::open(deployment).await;
    let published = run_closed_loop(addr, &plan).await?;
    let cpu = window.close(deployment).await;

    let elapsed_s = published.elapsed.as_secs_f64();
    Ok(ThroughputResult {
        scenario: "publish-throughput",
        concurrency: args.concurrency,
        batch: args.batch,
        connections: args.connections,
        acked: published.acked,
        failures: published.failures,
        errors: published.errors,
        elapsed_s,
        acked_per_s: published.acked as f64 / elapsed_s.max(f64::EPSILON),
        latency: LatencySummary::of(&published.latency),
        cpu_us_per_publish: cpu.servers_us_per(published.acked),
        database_cpu_us_per_publish: cpu.database_us_per(published.acked),
        cpu,
    })
}
