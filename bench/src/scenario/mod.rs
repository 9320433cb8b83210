//! The benchmark scenarios and what they share: the command-line options common to all, the
//! fleet and deployment set-up, and the CPU-time window over the server processes.
//!
//! - [`client`]: the load client alone, against a server that already runs.
//! - [`fanout`]: N subscribed sockets, events published at a fixed rate; deliveries, latency and
//!   CPU time per delivery.
//! - [`idle`]: resident memory of the socket server per idle subscribed socket.
//! - [`publish`]: the open-loop publisher alone, to feed [`client`].
//! - [`storm`]: the edge restarts under subscribed sockets that resume with `since`.
//! - [`throughput`]: durable publishes per second with a fixed concurrency.

pub mod client;
pub mod fanout;
pub mod idle;
pub mod publish;
pub mod storm;
pub mod throughput;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::client::{Backoff, DEFAULT_CONNECT_CONCURRENCY, FleetConfig};
use crate::deploy::{DEFAULT_ADMIN_DATABASE_URL, DEFAULT_PARTITIONS, DeployOptions, Deployment, JWT_SECRET, Target};
use crate::process::cpu_time;
use crate::token::TokenMinter;

/// Lifetime of the client tokens; longer than any run.
const TOKEN_LIFETIME: Duration = Duration::from_secs(4 * 3600);

/// Options every scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// System under test.
    #[arg(long, value_enum, default_value = "edge")]
    pub target: Target,
    /// Directory with the notifier, ws-edge and bench-ceiling binaries [default: the directory
    /// of this executable].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Directory with the Node peers.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/peers"))]
    pub peers_dir: PathBuf,
    /// PostgreSQL database used to create and drop the run's own database.
    #[arg(long, env = "BENCH_ADMIN_DATABASE_URL", default_value = DEFAULT_ADMIN_DATABASE_URL)]
    pub admin_database_url: String,
    /// Directory for the server processes' log files.
    #[arg(long, default_value = "target/bench/logs")]
    pub log_dir: PathBuf,
    /// Loopback source addresses the client sockets spread over: 127.0.0.1 to 127.0.0.N.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_addrs: u8,
    /// Maximum client connects in progress at once, reconnects included.
    #[arg(long, default_value_t = DEFAULT_CONNECT_CONCURRENCY)]
    pub connect_concurrency: usize,
    /// Stream partitions of the notifier and the edge.
    #[arg(long, default_value_t = DEFAULT_PARTITIONS)]
    pub partitions: u32,
    /// Extra environment variable for the service processes, as KEY=VALUE; repeatable.
    #[arg(long = "service-env", value_parser = parse_key_value)]
    pub service_env: Vec<(String, String)>,
    /// RUST_LOG of the service processes.
    #[arg(long, default_value = "info")]
    pub service_log: String,
    /// File to append the result to, one JSON object per line.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

impl Common {
    /// Returns the deployment options, with or without the edge.
    ///
    /// # Errors
    /// Fails when the binary directory cannot be found.
    pub fn deploy_options(&self, with_edge: bool) -> anyhow::Result<DeployOptions> {
        let bin_dir = match &self.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()
                .context("find this executable")?
                .parent()
                .context("this executable has no directory")?
                .to_path_buf(),
        };
        Ok(DeployOptions {
            target: self.target,
            bin_dir,
            peers_dir: self.peers_dir.clone(),
            admin_database_url: self.admin_database_url.clone(),
            log_dir: self.log_dir.clone(),
            partitions: self.partitions,
            with_edge,
            service_env: self.service_env.clone(),
            rust_log: self.service_log.clone(),
            edge_reuseport: false,
        })
    }

    /// Returns the fleet configuration for a deployment's socket server.
    ///
    /// # Errors
    /// Fails when the deployment has no socket server.
    pub fn fleet_config(
        &self,
        deployment: &Deployment,
        sockets: usize,
        channels: usize,
        reconnect: bool,
    ) -> anyhow::Result<FleetConfig> {
        Ok(FleetConfig {
            server: deployment.ws_addr.context("the deployment has no WebSocket server")?,
            path: "/ws".to_owned(),
            sockets,
            channels: channel_names(channels),
            source_addrs: self.source_addrs,
            connect_concurrency: self.connect_concurrency,
            reconnect,
            protocol: self.target.protocol(),
            backoff: Backoff::default(),
        })
    }
}

/// Returns the benchmark channel names `bench-0` to `bench-<n-1>`: public channels, since they
/// have no namespace.
pub fn channel_names(count: usize) -> Vec<String> {
    (0..count.max(1)).map(|index| format!("bench-{index}")).collect()
}

/// Returns a token minter with the deployment's secret.
///
/// # Errors
/// Fails only when the secret constant is empty.
pub fn minter() -> anyhow::Result<TokenMinter> {
    TokenMinter::new(JWT_SECRET, TOKEN_LIFETIME)
}

/// Starts a deployment, runs `body` against it and stops it, also when `body` failed.
///
/// # Errors
/// Fails when the deployment does not start, `body` fails, or the cleanup fails.
pub async fn with_deployment<T>(
    options: DeployOptions,
    body: impl AsyncFnOnce(&mut Deployment) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut deployment = Deployment::start(&options).await?;
    let result = body(&mut deployment).await;
    let stopped = deployment.stop().await;
    let value = result?;
    stopped?;
    Ok(value)
}

/// CPU time used by the server processes, the run's database backends and this process over a
/// window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUse {
    /// Length of the window, in seconds.
    pub window_s: f64,
    /// notifier + ws-edge + redis-server, or the ceiling server, in milliseconds.
    pub servers_ms: f64,
    /// PostgreSQL backends connected to the run's database, in milliseconds.
    pub database_ms: f64,
    /// This process (load client and publisher), in milliseconds.
    pub client_ms: f64,
    /// Each server process, in milliseconds.
    pub by_process_ms: BTreeMap<String, f64>,
}

impl CpuUse {
    /// Returns the server processes' CPU microseconds per unit of work.
    pub fn servers_us_per(&self, units: u64) -> Option<f64> {
        (units > 0).then(|| self.servers_ms * 1000.0 / units as f64)
    }

    /// Returns the database backends' CPU microseconds per unit of work.
    pub fn database_us_per(&self, units: u64) -> Option<f64> {
        (units > 0).then(|| self.database_ms * 1000.0 / units as f64)
    }
}

/// Start of a CPU-time window.
pub struct CpuWindow {
    started: Instant,
    processes: Vec<(String, u32)>,
    database: HashMap<u32, Duration>,
    servers: HashMap<u32, Duration>,
    own: Duration,
}

impl CpuWindow {
    /// Samples the CPU time of the deployment's processes now.
    pub async fn open(deployment: &Deployment) -> Self {
        let processes = deployment.server_pids();
        let servers = sample(processes.iter().map(|(_, pid)| *pid));
        let database = sample(deployment.database_backend_pids().await.unwrap_or_default());
        Self {
            started: Instant::now(),
            processes,
            database,
            servers,
            own: cpu_time(std::process::id()).unwrap_or_default(),
        }
    }

    /// Samples again and returns the CPU time used since [`CpuWindow::open`]. A database backend
    /// that connected during the window counts with its whole CPU time.
    pub async fn close(self, deployment: &Deployment) -> CpuUse {
        let window = self.started.elapsed();
        let own = cpu_time(std::process::id()).unwrap_or_default();
        let database_now = sample(deployment.database_backend_pids().await.unwrap_or_default());
        let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
        let mut usage = CpuUse {
            window_s: window.as_secs_f64(),
            client_ms: ms(own.saturating_sub(self.own)),
            database_ms: ms(used_since(&self.database, &database_now)),
            ..CpuUse::default()
        };
        for (name, pid) in &self.processes {
            let before = self.servers.get(pid).copied().unwrap_or_default();
            // A process that exited during the window (an edge restart) counts up to its last
            // sample; its successor is not in this window's list.
            let used = cpu_time(*pid).map_or(Duration::ZERO, |now| now.saturating_sub(before));
            usage.servers_ms += ms(used);
            *usage.by_process_ms.entry(name.clone()).or_default() += ms(used);
        }
        usage
    }
}

fn sample(pids: impl IntoIterator<Item = u32>) -> HashMap<u32, Duration> {
    pids.into_iter()
        .filter_map(|pid| cpu_time(pid).ok().map(|time| (pid, time)))
        .collect()
}

fn used_since(before: &HashMap<u32, Duration>, now: &HashMap<u32, Duration>) -> Duration {
    now.iter()
        .map(|(pid, time)| time.saturating_sub(before.get(pid).copied().unwrap_or_default()))
        .sum()
}
