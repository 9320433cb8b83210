//! Reconnect storm: N subscribed sockets and events published at a steady rate, while the edge
//! restarts under them: SIGTERM, then a new edge on the same address, or with `--rolling` a new
//! edge on the same port (`SO_REUSEPORT`) that is ready before the old one gets SIGTERM. Each
//! socket reconnects with backoff and resumes with `since`. Reports how long until 99% of the
//! sockets had every event published up to the end of the restart, and what was lost or
//! duplicated.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::{Common, minter, with_deployment};
use crate::client::{
    Backoff, Fleet, FleetReport, RECONNECT_FIRST_STEP, RECONNECT_MAX_STEP, RESTART_RECONNECT_WINDOW, SocketReport,
};
use crate::deploy::{Deployment, Restart, Target};
use crate::publisher::{OpenLoop, run_open_loop};
use crate::report::{Row, number};

/// Options of the reconnect-storm scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct StormArgs {
    /// Subscribed sockets.
    #[arg(long, default_value_t = 10_000)]
    pub sockets: usize,
    /// Events per second, published throughout.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Seconds of publishing before the restart.
    #[arg(long, default_value_t = 3)]
    pub before_secs: u64,
    /// Seconds of publishing after the restart starts.
    #[arg(long, default_value_t = 10)]
    pub after_secs: u64,
    /// Seconds the old edge may take to drain before it is killed.
    #[arg(long, default_value_t = 15)]
    pub grace_secs: u64,
    /// Seconds to wait for late deliveries after the last acknowledgement.
    #[arg(long, default_value_t = 10)]
    pub drain_secs: u64,
    /// First reconnect backoff step of the clients, in milliseconds.
    #[arg(long, default_value_t = RECONNECT_FIRST_STEP.as_millis() as u64)]
    pub backoff_first_ms: u64,
    /// Largest reconnect backoff step of the clients, in milliseconds.
    #[arg(long, default_value_t = RECONNECT_MAX_STEP.as_millis() as u64)]
    pub backoff_max_ms: u64,
    /// Window of the clients' first reconnect after a 1012 close, in milliseconds: its delay is
    /// drawn between zero and this window (0: at once).
    #[arg(long, default_value_t = RESTART_RECONNECT_WINDOW.as_millis() as u64)]
    pub restart_window_ms: u64,
    /// Rolling restart: start the new edge on the same port first (both bind it with
    /// SO_REUSEPORT), wait until it is ready, then send SIGTERM to the old one.
    #[arg(long)]
    pub rolling: bool,
    /// Options every scenario takes.
    #[command(flatten)]
    pub common: Common,
}

/// Result of one reconnect storm.
#[derive(Debug, Clone, Serialize)]
pub struct StormResult {
    /// Always `reconnect-storm`.
    pub scenario: &'static str,
    /// System under test.
    pub target: Target,
    /// Sockets subscribed before the restart.
    pub sockets: usize,
    /// Sockets whose first connect failed.
    pub connect_failures: usize,
    /// The first few errors of sockets that never connected.
    pub connect_errors: Vec<String>,
    /// Failed first-connect attempts that were retried, such as handshakes rejected with 429.
    pub connect_retries: u64,
    /// Events per second.
    pub rate: f64,
    /// First reconnect backoff step of the clients, in milliseconds.
    pub backoff_first_ms: u64,
    /// Largest reconnect backoff step of the clients, in milliseconds.
    pub backoff_max_ms: u64,
    /// Window of the clients' first reconnect after a 1012 close, in milliseconds.
    pub restart_window_ms: u64,
    /// Restart timings.
    pub restart: Restart,
    /// Sockets that had every event up to the catch-up target by the end.
    pub caught_up: usize,
    /// Time from SIGTERM until 50% of the sockets were caught up, in milliseconds.
    pub caught_up_50_ms: Option<f64>,
    /// Time from SIGTERM until 99% of the sockets were caught up, in milliseconds.
    pub caught_up_99_ms: Option<f64>,
    /// Time from SIGTERM until every socket was caught up, in milliseconds.
    pub caught_up_all_ms: Option<f64>,
    /// Time from SIGTERM until 50% of the sockets had resubscribed, in milliseconds.
    pub resubscribed_50_ms: Option<f64>,
    /// Time from SIGTERM until 99% of the sockets had resubscribed, in milliseconds.
    pub resubscribed_99_ms: Option<f64>,
    /// Publishes that failed or were not acknowledged.
    pub publish_failures: u64,
    /// Deliveries expected.
    pub expected: u64,
    /// Distinct deliveries.
    pub delivered: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Deliveries of an event id the socket already had.
    pub duplicates: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Failed reconnect attempts.
    pub failed_reconnects: u64,
    /// Sockets that gave up reconnecting.
    pub gave_up: u64,
    /// Close codes the sockets received (0: ended without a close frame).
    pub closes: BTreeMap<u16, u64>,
}

impl Row for StormResult {
    fn columns(&self) -> Vec<&'static str> {
        vec![
            "target",
            "sockets",
            "rate/s",
            "old edge exited ms",
            "new edge listening ms",
            "50% caught up ms",
            "99% caught up ms",
            "all caught up ms",
            "lost",
            "dup",
            "failed reconnects",
        ]
    }

    fn cells(&self) -> Vec<String> {
        vec![
            self.target.name().to_owned(),
            self.sockets.to_string(),
            self.rate.to_string(),
            number(Some(self.restart.stopped_after_ms), 0),
            number(Some(self.restart.listening_after_ms), 0),
            number(self.caught_up_50_ms, 0),
            number(self.caught_up_99_ms, 0),
            number(self.caught_up_all_ms, 0),
            self.lost.to_string(),
            self.duplicates.to_string(),
            self.failed_reconnects.to_string(),
        ]
    }
}

/// Runs the reconnect storm on a fresh deployment of the edge.
///
/// # Errors
/// Fails for the ceiling target, when the deployment does not start, no socket connects, or the
/// edge does not come back.
pub async fn run(args: &StormArgs) -> anyhow::Result<StormResult> {
    if args.common.target != Target::Edge {
        bail!("the reconnect storm restarts the edge, so it needs --target edge");
    }
    let mut options = args.common.deploy_options(true)?;
    options.edge_reuseport = args.rolling;
    with_deployment(options, async |deployment| measure(deployment, args).await).await
}

async fn measure(deployment: &mut Deployment, args: &StormArgs) -> anyhow::Result<StormResult> {
    // Connect every socket with reconnects on, and start publishing.
    let mut config = args.common.fleet_config(deployment, args.sockets, 1, true)?;
    config.backoff = Backoff {
        first_step: Duration::from_millis(args.backoff_first_ms),
        max_step: Duration::from_millis(args.backoff_max_ms),
        restart_window: Duration::from_millis(args.restart_window_ms),
    };
    let fleet = Fleet::connect(config.clone(), minter()?).await?;
    let plan = OpenLoop {
        rate: args.rate,
        events: (args.rate * (args.before_secs + args.after_secs) as f64).ceil() as u64,
        channels: config.channels,
    };
    let next_tick = Arc::new(AtomicU64::new(0));
    let target = deployment.publish;
    let publisher = tokio::spawn({
        let next_tick = next_tick.clone();
        async move { run_open_loop(target, &plan, next_tick).await }
    });

    // Restart the edge; sockets count as caught up once they hold every event published up to
    // the end of the restart: the new edge listens, and in a rolling restart the old one exited.
    tokio::time::sleep(Duration::from_secs(args.before_secs)).await;
    let grace = Duration::from_secs(args.grace_secs);
    let restart = if args.rolling {
        deployment.roll_edge(grace).await?
    } else {
        deployment.restart_edge(grace).await?
    };
    fleet.set_catch_up_target(next_tick.load(Ordering::Relaxed));
    let sigterm_at = restart.sigterm_at;

    // Finish publishing, wait for the deliveries, and account for every socket.
    let published = publisher.await.context("the publisher task panicked")??;
    let expected = fleet.expected_deliveries(&published.acked);
    fleet
        .wait_for_deliveries(expected, Duration::from_secs(args.drain_secs))
        .await;
    let (connect_failures, connect_errors) = (fleet.connect_failures, fleet.connect_errors.clone());
    let sockets = args.sockets - connect_failures;
    let report = fleet.finish().await;
    let (expected, lost) = report.expected_and_lost(&published.acked);
    let catch_up = CatchUp::of(&report, sigterm_at, sockets, |socket| socket.caught_up_at);
    let resubscribed = CatchUp::of(&report, sigterm_at, sockets, |socket| socket.resubscribed_at);
    Ok(StormResult {
        scenario: "reconnect-storm",
        target: deployment.target,
        sockets,
        connect_failures,
        connect_errors,
        connect_retries: report.connect_retries(),
        rate: args.rate,
        backoff_first_ms: args.backoff_first_ms,
        backoff_max_ms: args.backoff_max_ms,
        restart_window_ms: args.restart_window_ms,
        restart,
        caught_up: catch_up.count,
        caught_up_50_ms: catch_up.quantile(0.50),
        caught_up_99_ms: catch_up.quantile(0.99),
        caught_up_all_ms: catch_up.quantile(1.0),
        resubscribed_50_ms: resubscribed.quantile(0.50),
        resubscribed_99_ms: resubscribed.quantile(0.99),
        publish_failures: published.failures,
        expected,
        delivered: report.delivered,
        lost,
        duplicates: report.duplicates,
        reconnects: report.sockets.iter().map(|socket| socket.reconnects).sum(),
        failed_reconnects: report.sockets.iter().map(|socket| socket.failed_reconnects).sum(),
        gave_up: report.sockets.iter().filter(|socket| socket.gave_up).count() as u64,
        closes: report.closes(),
    })
}

/// Times at which the sockets reached a state (caught up, resubscribed), in milliseconds from
/// SIGTERM, sorted.
struct CatchUp {
    times_ms: Vec<f64>,
    count: usize,
    sockets: usize,
}

impl CatchUp {
    fn of(
        report: &FleetReport,
        sigterm_at: Instant,
        sockets: usize,
        reached_at: impl Fn(&SocketReport) -> Option<Instant>,
    ) -> Self {
        let mut times_ms: Vec<f64> = report
            .sockets
            .iter()
            .filter_map(reached_at)
            .map(|at| at.saturating_duration_since(sigterm_at).as_secs_f64() * 1000.0)
            .collect();
        times_ms.sort_by(f64::total_cmp);
        Self {
            count: times_ms.len(),
            times_ms,
            sockets,
        }
    }

    /// Returns when the given fraction of all sockets was caught up, or `None` when fewer
    /// sockets ever caught up.
    fn quantile(&self, fraction: f64) -> Option<f64> {
        let needed = ((self.sockets as f64) * fraction).ceil() as usize;
        if needed == 0 {
            return Some(0.0);
        }
        self.times_ms.get(needed - 1).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_counts_lagging_sockets() {
        let catch_up = CatchUp {
            times_ms: vec![10.0, 20.0, 30.0],
            count: 3,
            sockets: 4,
        };
        assert_eq!(catch_up.quantile(0.5), Some(20.0));
        assert_eq!(catch_up.quantile(0.75), Some(30.0));
        assert_eq!(catch_up.quantile(1.0), None);
    }
}
