//! Idle sockets: the socket server's resident memory before and after N sockets connected,
//! authenticated and subscribed, divided by N.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::{Common, CpuUse, CpuWindow, minter, with_deployment};
use crate::client::Fleet;
use crate::deploy::{Deployment, Target};
use crate::process::resident_bytes;
use crate::report::{Row, number};

/// Options of the idle scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// Idle subscribed sockets.
    #[arg(long, default_value_t = 1000)]
    pub sockets: usize,
    /// Seconds to wait before the first and after the last connect, before reading memory.
    #[arg(long, default_value_t = 3)]
    pub settle_secs: u64,
    /// Options every scenario takes.
    #[command(flatten)]
    pub common: Common,
}

/// Result of one idle run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    /// Always `idle`.
    pub scenario: &'static str,
    /// System under test.
    pub target: Target,
    /// Sockets requested.
    pub sockets: usize,
    /// Sockets whose connect or subscribe failed.
    pub connect_failures: usize,
    /// Seconds to connect and subscribe every socket.
    pub connect_s: f64,
    /// Failed first-connect attempts that were retried, such as handshakes rejected with 429.
    pub connect_retries: u64,
    /// The first few errors of sockets that never connected.
    pub connect_errors: Vec<String>,
    /// CPU time of the servers and of the load client while the sockets connected.
    pub connect_cpu: CpuUse,
    /// Server CPU microseconds per connected socket: TCP accept, upgrade, token check,
    /// `connected`, subscribe and `subscribed`.
    pub server_us_per_connect: Option<f64>,
    /// Sockets subscribed when memory was read the second time.
    pub subscribed: usize,
    /// Resident memory of the socket server before connecting, in bytes.
    pub rss_before: u64,
    /// Resident memory with every socket subscribed, in bytes.
    pub rss_after: u64,
    /// `(rss_after - rss_before) / subscribed`, in bytes.
    pub rss_per_socket: Option<f64>,
}

impl Row for IdleResult {
    fn columns(&self) -> Vec<&'static str> {
        vec![
            "target",
            "sockets",
            "connect s",
            "RSS before MiB",
            "RSS after MiB",
            "KiB / socket",
        ]
    }

    fn cells(&self) -> Vec<String> {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        vec![
            self.target.name().to_owned(),
            self.subscribed.to_string(),
            number(Some(self.connect_s), 1),
            number(Some(mib(self.rss_before)), 1),
            number(Some(mib(self.rss_after)), 1),
            number(self.rss_per_socket.map(|bytes| bytes / 1024.0), 2),
        ]
    }
}

/// Runs the idle scenario on a fresh deployment.
///
/// # Errors
/// Fails when the deployment does not start, no socket connects, or memory cannot be read.
pub async fn run(args: &IdleArgs) -> anyhow::Result<IdleResult> {
    let options = args.common.deploy_options(true)?;
    with_deployment(options, async |deployment| measure(deployment, args).await).await
}

async fn measure(deployment: &mut Deployment, args: &IdleArgs) -> anyhow::Result<IdleResult> {
    let pid = deployment
        .socket_server_pid()
        .context("the deployment has no socket server")?;
    let settle = Duration::from_secs(args.settle_secs);

    // Memory of the started, unused server.
    tokio::time::sleep(settle).await;
    let rss_before = resident_bytes(pid)?;

    // Connect every socket, let the server settle, and read memory again.
    let config = args.common.fleet_config(deployment, args.sockets, 1, false)?;
    let minter = minter()?;
    let cpu = CpuWindow::open(deployment).await;
    let fleet = Fleet::connect(config, minter).await?;
    let connect_cpu = cpu.close(deployment).await;
    tokio::time::sleep(settle).await;
    let rss_after = resident_bytes(pid)?;
    let subscribed = fleet.subscribed();

    let (connect_failures, connect_s) = (fleet.connect_failures, fleet.connect_elapsed.as_secs_f64());
    let connect_errors = fleet.connect_errors.clone();
    let report = fleet.finish().await;
    Ok(IdleResult {
        scenario: "idle",
        target: deployment.target,
        sockets: args.sockets,
        connect_failures,
        connect_s,
        connect_retries: report.connect_retries(),
        connect_errors,
        server_us_per_connect: connect_cpu.servers_us_per((args.sockets - connect_failures) as u64),
        connect_cpu,
        subscribed,
        rss_before,
        rss_after,
        rss_per_socket: (subscribed > 0).then(|| rss_after.saturating_sub(rss_before) as f64 / subscribed as f64),
    })
}
