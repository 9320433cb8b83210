//! Fan-out: N subscribed sockets, events published open-loop at a fixed rate. Reports
//! deliveries against expected, latency from the intended send time, and the server processes'
//! CPU time per delivery over the publishing window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::Serialize;

use super::{Common, CpuUse, CpuWindow, minter, with_deployment};
use crate::client::Fleet;
use crate::deploy::{Deployment, Target};
use crate::publisher::{OpenLoop, run_open_loop};
use crate::report::{Row, number};
use crate::stats::LatencySummary;

/// Options of the fan-out scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Subscribed sockets.
    #[arg(long, default_value_t = 1000)]
    pub sockets: usize,
    /// Events per channel.
    #[arg(long, default_value_t = 200)]
    pub events: u64,
    /// Events per second per channel.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Channels; socket i subscribes to channel i mod this.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Seconds to wait for late deliveries after the last acknowledgement.
    #[arg(long, default_value_t = 10)]
    pub drain_secs: u64,
    /// Seconds to let the servers settle after the sockets subscribed.
    #[arg(long, default_value_t = 1)]
    pub settle_secs: u64,
    /// Options every scenario takes.
    #[command(flatten)]
    pub common: Common,
}

/// Result of one fan-out run.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    /// Always `fanout`.
    pub scenario: &'static str,
    /// System under test.
    pub target: Target,
    /// Sockets requested.
    pub sockets: usize,
    /// Sockets whose first connect or subscribe failed.
    pub connect_failures: usize,
    /// Seconds to connect and subscribe every socket.
    pub connect_s: f64,
    /// Failed first-connect attempts that were retried, such as handshakes rejected with 429.
    pub connect_retries: u64,
    /// The first few errors of sockets that never connected.
    pub connect_errors: Vec<String>,
    /// Channels.
    pub channels: usize,
    /// Events per second per channel.
    pub rate: f64,
    /// Events per channel.
    pub events: u64,
    /// Publishes that failed or were not acknowledged.
    pub publish_failures: u64,
    /// Deliveries expected: acknowledged events times subscribed sockets of their channel.
    pub expected: u64,
    /// Distinct deliveries.
    pub delivered: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Deliveries of an event id the socket already had.
    pub duplicates: u64,
    /// Arrivals with unreceived sequence numbers before them.
    pub gaps: u64,
    /// Delivery latency from the intended send time.
    pub latency: LatencySummary,
    /// Publish acknowledgement latency from the intended send time.
    pub ack_latency: LatencySummary,
    /// CPU time over the window from the first publish to the last delivery.
    pub cpu: CpuUse,
    /// Server CPU microseconds per delivery.
    pub cpu_us_per_delivery: Option<f64>,
    /// Close codes the sockets received (0: ended without a close frame).
    pub closes: BTreeMap<u16, u64>,
}

impl Row for FanoutResult {
    fn columns(&self) -> Vec<&'static str> {
        vec![
            "target",
            "sockets",
            "rate/s",
            "events",
            "delivered / expected",
            "lost",
            "dup",
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU-µs / delivery",
            "client CPU-µs / delivery",
        ]
    }

    fn cells(&self) -> Vec<String> {
        let client = (self.delivered > 0).then(|| self.cpu.client_ms * 1000.0 / self.delivered as f64);
        vec![
            self.target.name().to_owned(),
            (self.sockets - self.connect_failures).to_string(),
            self.rate.to_string(),
            self.events.to_string(),
            format!("{} / {}", self.delivered, self.expected),
            self.lost.to_string(),
            self.duplicates.to_string(),
            number(Some(self.latency.p50_ms), 2),
            number(Some(self.latency.p99_ms), 2),
            number(Some(self.latency.max_ms), 2),
            number(self.cpu_us_per_delivery, 2),
            number(client, 2),
        ]
    }
}

/// Runs the fan-out scenario on a fresh deployment.
///
/// # Errors
/// Fails when the deployment does not start, no socket connects, or the publisher cannot reach
/// its target.
pub async fn run(args: &FanoutArgs) -> anyhow::Result<FanoutResult> {
    let options = args.common.deploy_options(true)?;
    with_deployment(options, async |deployment| measure(deployment, args).await).await
}

async fn measure(deployment: &mut Deployment, args: &FanoutArgs) -> anyhow::Result<FanoutResult> {
    // Connect and subscribe every socket, then let the servers settle.
    let config = args
        .common
        .fleet_config(deployment, args.sockets, args.channels, false)?;
    let fleet = Fleet::connect(config.clone(), minter()?).await?;
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;

    // Publish open-loop and wait for the deliveries; CPU time counts over this window only.
    let window = CpuWindow::open(deployment).await;
    let plan = OpenLoop {
        rate: args.rate,
        events: args.events,
        channels: config.channels,
    };
    let published = run_open_loop(deployment.publish, &plan, Arc::new(AtomicU64::new(0))).await?;
    let expected = fleet.expected_deliveries(&published.acked);
    fleet
        .wait_for_deliveries(expected, Duration::from_secs(args.drain_secs))
        .await;
    let cpu = window.close(deployment).await;

    // Account for every socket.
    let (connect_s, connect_failures) = (fleet.connect_elapsed.as_secs_f64(), fleet.connect_failures);
    let connect_errors = fleet.connect_errors.clone();
    let report = fleet.finish().await;
    let (expected, lost) = report.expected_and_lost(&published.acked);
    Ok(FanoutResult {
        scenario: "fanout",
        target: deployment.target,
        sockets: args.sockets,
        connect_failures,
        connect_s,
        connect_retries: report.connect_retries(),
        connect_errors,
        channels: plan.channels.len(),
        rate: args.rate,
        events: args.events,
        publish_failures: published.failures,
        expected,
        delivered: report.delivered,
        lost,
        duplicates: report.duplicates,
        gaps: report.gaps(),
        latency: LatencySummary::of(&report.latency),
        ack_latency: LatencySummary::of(&published.ack_latency),
        cpu_us_per_delivery: cpu.servers_us_per(report.delivered),
        cpu,
        closes: report.closes(),
    })
}
