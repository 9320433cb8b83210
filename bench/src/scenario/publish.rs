//! The open-loop publisher on its own, against a notifier or ceiling server that is already
//! running, to feed `bench client`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::bail;
use serde::Serialize;

use super::channel_names;
use crate::publisher::{OpenLoop, PublishTarget, run_open_loop};
use crate::report::{Row, number};
use crate::stats::LatencySummary;

/// Options of the standalone publisher.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// gRPC address of a notifier, as IP:PORT.
    #[arg(long, conflicts_with = "trigger")]
    pub grpc: Option<SocketAddr>,
    /// Trigger address of a ceiling server, as IP:PORT.
    #[arg(long)]
    pub trigger: Option<SocketAddr>,
    /// Events per second per channel.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Events per channel.
    #[arg(long, default_value_t = 200)]
    pub events: u64,
    /// Channels `bench-0` to `bench-<n-1>`.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// File to append the result to, one JSON object per line.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Result of the standalone publisher.
#[derive(Debug, Clone, Serialize)]
pub struct PublishResult {
    /// Always `publish`.
    pub scenario: &'static str,
    /// Acknowledged events.
    pub acked: u64,
    /// Failed events.
    pub failures: u64,
    /// The first few failure messages.
    pub errors: Vec<String>,
    /// Acknowledgement latency from the intended send time.
    pub ack_latency: LatencySummary,
}

impl Row for PublishResult {
    fn columns(&self) -> Vec<&'static str> {
        vec!["acked", "failed", "ack p50 ms", "ack p99 ms", "ack max ms"]
    }

    fn cells(&self) -> Vec<String> {
        vec![
            self.acked.to_string(),
            self.failures.to_string(),
            number(Some(self.ack_latency.p50_ms), 2),
            number(Some(self.ack_latency.p99_ms), 2),
            number(Some(self.ack_latency.max_ms), 2),
        ]
    }
}

/// Publishes the configured schedule.
///
/// # Errors
/// Fails when neither target is given or the target cannot be reached.
pub async fn run(args: &PublishArgs) -> anyhow::Result<PublishResult> {
    let target = match (args.grpc, args.trigger) {
        (Some(addr), _) => PublishTarget::Grpc(addr),
        (None, Some(addr)) => PublishTarget::Trigger(addr),
        (None, None) => bail!("give --grpc or --trigger"),
    };
    let plan = OpenLoop {
        rate: args.rate,
        events: args.events,
        channels: channel_names(args.channels),
    };
    let report = run_open_loop(target, &plan, Arc::new(AtomicU64::new(0))).await?;
    Ok(PublishResult {
        scenario: "publish",
        acked: report.acked_count(),
        failures: report.failures,
        errors: report.errors,
        ack_latency: LatencySummary::of(&report.ack_latency),
    })
}
