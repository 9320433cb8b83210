//! The system under test, started for one run and removed at its end. For the edge that is its
//! own redis-server, its own PostgreSQL database, and the `notifier` and `ws-edge` binaries. The
//! ceiling is the `bench-ceiling` server alone, and a Node peer runs on its own redis-server.
//! Dropping a [`Deployment`] kills its processes and drops its database, also when
//! the run failed half-way.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use crate::process::{Launch, Process, Ready};
use crate::publisher::PublishTarget;
use crate::wire::Protocol;

/// Default database used to create and drop the per-run databases.
pub const DEFAULT_ADMIN_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Secret the edge verifies client tokens with.
pub const JWT_SECRET: &str = "bench-secret-with-enough-entropy-0123456789";
/// Default number of stream partitions.
pub const DEFAULT_PARTITIONS: u32 = 16;
/// Line the edge logs when its stream reader runs, from which on its `/readyz` returns 200.
const STREAM_READER_RUNNING: &str = "stream reader running";
/// Attempts at starting redis-server on a free port, or the edge again on its old port.
const START_ATTEMPTS: u32 = 5;

/// System under test: the server the clients connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// `notifier` + `ws-edge` on their own redis-server and PostgreSQL database.
    Edge,
    /// `bench-ceiling`, the bare fan-out server.
    Ceiling,
    /// The Socket.IO 4.8 peer in `peers/socketio`, on its own redis-server.
    SocketIo,
    /// The Node `ws` + Redis pub/sub peer in `peers/node-ws`, on its own redis-server.
    NodeWs,
}

impl Target {
    /// Returns the peer's directory name under the peers directory, for the Node peers.
    pub fn peer_dir(self) -> Option<&'static str> {
        match self {
            Self::SocketIo => Some("socketio"),
            Self::NodeWs => Some("node-ws"),
            Self::Edge | Self::Ceiling => None,
        }
    }

    /// Returns the name the command line uses for this target.
    pub fn name(self) -> &'static str {
        match self {
            Self::Edge => "edge",
            Self::Ceiling => "ceiling",
            Self::SocketIo => "socket-io",
            Self::NodeWs => "node-ws",
        }
    }

    /// Returns the wire protocol the load client speaks with this target.
    pub fn protocol(self) -> Protocol {
        match self {
            Self::SocketIo => Protocol::SocketIo,
            Self::Edge | Self::Ceiling | Self::NodeWs => Protocol::Native,
        }
    }
}

/// How to start a deployment.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// System under test.
    pub target: Target,
    /// Directory with the `notifier`, `ws-edge` and `bench-ceiling` binaries.
    pub bin_dir: PathBuf,
    /// Directory with the Node peers, each with its `node_modules` installed.
    pub peers_dir: PathBuf,
    /// Database used to create and drop the run's database; must be on a loopback address or a
    /// Unix socket.
    pub admin_database_url: String,
    /// Directory for the processes' log files.
    pub log_dir: PathBuf,
    /// Stream partitions.
    pub partitions: u32,
    /// Whether to start `ws-edge` (publish-throughput needs only the notifier).
    pub with_edge: bool,
    /// Extra environment variables for the service processes.
    pub service_env: Vec<(String, String)>,
    /// `RUST_LOG` of the service processes.
    pub rust_log: String,
    /// Whether the edge binds its port with `SO_REUSEPORT`, which a rolling restart needs.
    pub edge_reuseport: bool,
}

/// Timings of an edge restart.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Restart {
    /// Whether the new edge started and became ready before the old one got SIGTERM.
    pub rolling: bool,
    /// Time from SIGTERM to the old edge's exit, in milliseconds.
    pub stopped_after_ms: f64,
    /// Time from SIGTERM until the new edge was ready, in milliseconds. After a stop and start
    /// this is its `listening` line. In a rolling restart it is its `stream reader running` line
    /// (when `/readyz` turns 200), which came before SIGTERM, so the value is negative.
    pub listening_after_ms: f64,
    /// Whether the old edge exited by itself within the grace period.
    pub graceful: bool,
    /// When the old edge got SIGTERM.
    #[serde(skip)]
    pub sigterm_at: Instant,
}

/// A running system under test.
pub struct Deployment {
    /// Unique id of the run, used in the database name and log file names.
    pub run_id: String,
    /// System under test.
    pub target: Target,
    /// Address of the WebSocket server, when one runs.
    pub ws_addr: Option<SocketAddr>,
    /// Publish target: the notifier's gRPC address or a trigger port.
    pub publish: PublishTarget,
    edge: Option<Process>,
    edge_launch: Option<Launch>,
    edge_reuseport: bool,
    others: Vec<Process>,
    redis: Option<Process>,
    database: Option<Database>,
}

impl Deployment {
    /// Starts the processes of `options.target` and waits until they listen.
    ///
    /// # Errors
    /// Fails when a binary is missing, the database cannot be created, or a process does not
    /// become ready; whatever was started is stopped again.
    pub async fn start(options: &DeployOptions) -> anyhow::Result<Self> {
        let run_id = format!("bench_{:016x}", rand::random::<u64>());
        match options.target {
            Target::Ceiling => start_ceiling(options, run_id).await,
            Target::Edge => start_services(options, run_id).await,
            Target::SocketIo | Target::NodeWs => start_peer(options, run_id).await,
        }
    }

    /// Returns the pid of the process that accepts the client sockets: `ws-edge`, the ceiling or
    /// the peer.
    pub fn socket_server_pid(&self) -> Option<u32> {
        match self.target {
            Target::Edge => self.edge.as_ref().map(|edge| edge.pid),
            Target::Ceiling | Target::SocketIo | Target::NodeWs => self.others.first().map(|server| server.pid),
        }
    }

    /// Returns the name and pid of every server process, redis-server included.
    pub fn server_pids(&self) -> Vec<(String, u32)> {
        self.others
            .iter()
            .chain(&self.edge)
            .chain(&self.redis)
            .map(|process| (process.name.clone(), process.pid))
            .collect()
    }

    /// Returns the pids of the PostgreSQL backends connected to the run's database.
    ///
    /// # Errors
    /// Fails when PostgreSQL cannot be queried.
    pub async fn database_backend_pids(&self) -> anyhow::Result<Vec<u32>> {
        match &self.database {
            Some(database) => database.backend_pids().await,
            None => Ok(Vec::new()),
        }
    }

    /// Stops the edge with SIGTERM (SIGKILL after `grace`) and starts a new one on the same
    /// address, under clients that stay connected to that address.
    ///
    /// # Errors
    /// Fails when no edge runs or the new edge does not start.
    pub async fn restart_edge(&mut self, grace: Duration) -> anyhow::Result<Restart> {
        let (Some(mut edge), Some(launch)) = (self.edge.take(), self.replacement_launch()) else {
            bail!("no edge runs in this deployment");
        };
        let started = Instant::now();
        let graceful = edge.terminate(grace).await?;
        let stopped_after = started.elapsed();
        drop(edge);

        let mut attempt = 0;
        let edge = loop {
            attempt += 1;
            match Process::start(launch.clone()).await {
                Ok(edge) => break edge,
                // The old port may be briefly unavailable; try again a few times.
                Err(error) if attempt < START_ATTEMPTS => {
                    tracing::warn!(attempt, error = format!("{error:#}"), "edge restart failed, retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => return Err(error.context("restart the edge")),
            }
        };
        self.edge = Some(edge);
        Ok(Restart {
            rolling: false,
            stopped_after_ms: stopped_after.as_secs_f64() * 1000.0,
            listening_after_ms: started.elapsed().as_secs_f64() * 1000.0,
            graceful,
            sigterm_at: started,
        })
    }

    /// Restarts the edge the way a Kubernetes rolling update with `maxSurge` does: starts a new
    /// edge on the same port (both bind it with `SO_REUSEPORT`), waits until it is ready, then
    /// stops the old one with SIGTERM (SIGKILL after `grace`).
    ///
    /// # Errors
    /// Fails when no edge runs, the deployment's edge does not bind with `SO_REUSEPORT`, or the
    /// new edge does not start.
    pub async fn roll_edge(&mut self, grace: Duration) -> anyhow::Result<Restart> {
        if !self.edge_reuseport {
            bail!("a rolling restart needs the edge started with SO_REUSEPORT (DeployOptions::edge_reuseport)");
        }
        let (Some(mut old), Some(mut launch)) = (self.edge.take(), self.replacement_launch()) else {
            bail!("no edge runs in this deployment");
        };
        // `/readyz` on the shared port may reach either edge, so readiness is the new edge's
        // own log line that marks the moment its `/readyz` turns 200.
        launch.ready = Ready::LineContains(STREAM_READER_RUNNING);
        let new = match Process::start(launch).await {
            Ok(new) => new,
            Err(error) => {
                self.edge = Some(old);
                return Err(error.context("start the replacement edge"));
            }
        };
        let ready_at = Instant::now();
        self.edge = Some(new);

        let sigterm_at = Instant::now();
        let graceful = old.terminate(grace).await?;
        let stopped_after = sigterm_at.elapsed();
        Ok(Restart {
            rolling: true,
            stopped_after_ms: stopped_after.as_secs_f64() * 1000.0,
            listening_after_ms: -(sigterm_at.duration_since(ready_at).as_secs_f64() * 1000.0),
            graceful,
            sigterm_at,
        })
    }

    /// Returns the launch of a new edge on the address of the current one. It logs to a file of
    /// its own, so the old edge's log is kept.
    fn replacement_launch(&self) -> Option<Launch> {
        let mut launch = self.edge_launch.clone()?;
        launch.log_path.set_extension("restarted.log");
        Some(launch)
    }

    /// Stops every process and drops the run's database.
    ///
    /// # Errors
    /// Fails when the database cannot be dropped.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.edge = None;
        self.others.clear();
        self.redis = None;
        if let Some(mut database) = self.database.take() {
            database.drop_now().await?;
        }
        Ok(())
    }
}

async fn start_ceiling(options: &DeployOptions, run_id: String) -> anyhow::Result<Deployment> {
    let launch = launch(options, &run_id, "bench-ceiling", Vec::new(), vec!["http", "trigger"])?;
    let ceiling = Process::start(launch).await?;
    Ok(Deployment {
        ws_addr: Some(ceiling.addr("http")?),
        publish: PublishTarget::Trigger(ceiling.addr("trigger")?),
        run_id,
        target: Target::Ceiling,
        edge: None,
        edge_launch: None,
        edge_reuseport: false,
        others: vec![ceiling],
        redis: None,
        database: None,
    })
}

async fn start_peer(options: &DeployOptions, run_id: String) -> anyhow::Result<Deployment> {
    let name = options.target.peer_dir().context("the target is not a Node peer")?;
    let dir = options.peers_dir.join(name);
    if !dir.join("node_modules").is_dir() {
        bail!("{} has no node_modules; run `npm ci` there first", dir.display());
    }
    let redis = start_redis(options, &run_id).await?;
    let mut env = vec![
        ("REDIS_URL".to_owned(), format!("redis://{}", redis.addr("redis")?)),
        ("JWT_SECRET".to_owned(), JWT_SECRET.to_owned()),
        ("LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("TRIGGER_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
    ];

    env.extend(options.service_env.iter().cloned());
    let launch = Launch {
        name: format!("node {name}"),
        program: PathBuf::from("node"),
        args: vec![dir.join("server.js").display().to_string()],
        env,
        log_path: options.log_dir.join(format!("{run_id}-{name}.log")),
        ready: Ready::Listening(vec!["http", "trigger"]),
    };

    // Redis goes into the deployment first, so an error below stops it too.
    let mut deployment = Deployment {
        run_id,
        target: options.target,
        ws_addr: None,
        publish: PublishTarget::Trigger(SocketAddr::from(([127, 0, 0, 1], 0))),
        edge: None,
        edge_launch: None,
        edge_reuseport: false,
        others: Vec::new(),
        redis: Some(redis),
        database: None,
    };
    let server = Process::start(launch).await?;
    deployment.ws_addr = Some(server.addr("http")?);
    deployment.publish = PublishTarget::Trigger(server.addr("trigger")?);
    deployment.others.push(server);
    Ok(deployment)
}

async fn start_services(options: &DeployOptions, run_id: String) -> anyhow::Result<Deployment> {
    // Own Redis and database first; dropping `deployment` on an error below removes them.
    let redis = start_redis(options, &run_id).await?;
    let redis_url = format!("redis://{}", redis.addr("redis")?);
    let database = Database::create(&options.admin_database_url, &run_id).await?;
    let database_url = database.url.clone();
    let mut deployment = Deployment {
        run_id: run_id.clone(),
        target: Target::Edge,
        ws_addr: None,
        publish: PublishTarget::Grpc(SocketAddr::from(([127, 0, 0, 1], 0))),
        edge: None,
        edge_launch: None,
        edge_reuseport: false,
        others: Vec::new(),
        redis: Some(redis),
        database: Some(database),
    };
    let stream = vec![
        ("REDIS_URL".to_owned(), redis_url),
        ("STREAM_PREFIX".to_owned(), run_id.clone()),
        ("STREAM_PARTITIONS".to_owned(), options.partitions.to_string()),
    ];

    // The notifier.
    let mut env = stream.clone();
    env.push(("DATABASE_URL".to_owned(), database_url));
    env.push(("NOTIFIER_LISTEN".to_owned(), "127.0.0.1:0".to_owned()));
    env.push(("NOTIFIER_HTTP_LISTEN".to_owned(), "127.0.0.1:0".to_owned()));
    let notifier = Process::start(launch(options, &run_id, "notifier", env, vec!["grpc"])?).await?;
    let grpc = notifier.addr("grpc")?;
    deployment.publish = PublishTarget::Grpc(grpc);
    deployment.others.push(notifier);

    // The edge; a restart binds the address it got the first time.
    if options.with_edge {
        let mut env = stream;
        env.push(("JWT_SECRET".to_owned(), JWT_SECRET.to_owned()));
        env.push(("NOTIFIER_URL".to_owned(), format!("http://{grpc}")));
        env.push(("EDGE_LISTEN".to_owned(), "127.0.0.1:0".to_owned()));
        env.push(("EDGE_METRICS_LISTEN".to_owned(), "127.0.0.1:0".to_owned()));
        if options.edge_reuseport {
            env.push(("EDGE_LISTEN_REUSEPORT".to_owned(), "true".to_owned()));
        }
        let mut edge_launch = launch(options, &run_id, "ws-edge", env, vec!["http"])?;
        let edge = Process::start(edge_launch.clone()).await?;
        let addr = edge.addr("http")?;
        edge_launch.env.push(("EDGE_LISTEN".to_owned(), addr.to_string()));
        deployment.ws_addr = Some(addr);
        deployment.edge = Some(edge);
        deployment.edge_launch = Some(edge_launch);
        deployment.edge_reuseport = options.edge_reuseport;
    }
    Ok(deployment)
}

/// Builds the launch of one of our binaries, with the log settings the `listening` lines need.
fn launch(
    options: &DeployOptions,
    run_id: &str,
    name: &str,
    mut env: Vec<(String, String)>,
    services: Vec<&'static str>,
) -> anyhow::Result<Launch> {
    let program = options.bin_dir.join(name);
    if !program.is_file() {
        bail!(
            "{} not found; build it with `cargo build --release -p notifier -p ws-edge -p bench` or pass --bin-dir",
            program.display()
        );
    }
    env.push(("LOG_FORMAT".to_owned(), "text".to_owned()));
    env.push(("NO_COLOR".to_owned(), "1".to_owned()));
    env.push(("RUST_LOG".to_owned(), options.rust_log.clone()));
    env.extend(options.service_env.iter().cloned());
    Ok(Launch {
        name: name.to_owned(),
        program,
        args: Vec::new(),
        env,
        log_path: options.log_dir.join(format!("{run_id}-{name}.log")),
        ready: Ready::Listening(services),
    })
}

/// Starts a redis-server of our own on a free loopback port, without persistence. Its `addrs`
/// hold the address under the service name `redis`.
async fn start_redis(options: &DeployOptions, run_id: &str) -> anyhow::Result<Process> {
    let mut last_error = None;
    for _ in 0..START_ATTEMPTS {
        // redis-server cannot report a port it picked, so take a free one and hand it over.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let launch = Launch {
            name: "redis-server".to_owned(),
            program: PathBuf::from("redis-server"),
            args: [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ]
            .map(str::to_owned)
            .to_vec(),
            env: Vec::new(),
            log_path: options.log_dir.join(format!("{run_id}-redis-server.log")),
            ready: Ready::LineContains("Ready to accept connections"),
        };
        match Process::start(launch).await {
            Ok(mut redis) => {
                redis
                    .addrs
                    .insert("redis".to_owned(), SocketAddr::from(([127, 0, 0, 1], port)));
                return Ok(redis);
            }
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("no attempt was made"))
        .context("start redis-server"))
}

/// A database created for one run. Dropping it drops the database unless [`Database::drop_now`]
/// already did.
struct Database {
    admin_url: String,
    name: String,
    url: String,
    dropped: bool,
}

impl Database {
    /// Creates database `name` next to the admin database.
    async fn create(admin_url: &str, name: &str) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(admin_url).context("invalid admin database URL")?;
        let host = options.get_host();
        let local = host.starts_with('/')
            || host == "localhost"
            || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !local {
            bail!("the admin database must be on this machine (loopback or a Unix socket), not {host}");
        }
        let mut admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("connect to {admin_url}"))?;
        check_database_name(name)?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("create database {name}"))?;
        let url = sibling_database_url(admin_url, name)?;
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name: name.to_owned(),
            url,
            dropped: false,
        })
    }

    async fn backend_pids(&self) -> anyhow::Result<Vec<u32>> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        let pids: Vec<(i32,)> = sqlx::query_as("SELECT pid FROM pg_stat_activity WHERE datname = $1")
            .bind(&self.name)
            .fetch_all(&mut admin)
            .await?;
        Ok(pids.into_iter().filter_map(|(pid,)| u32::try_from(pid).ok()).collect())
    }

    async fn drop_now(&mut self) -> anyhow::Result<()> {
        if !self.dropped {
            drop_database(&self.admin_url, &self.name).await?;
            self.dropped = true;
        }
        Ok(())
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop cannot await, and the caller's runtime may be shutting down, so drop the
        // database on a thread with a runtime of its own.
        let cleaner = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(drop_database(&admin_url, &name))
        });
        if let Ok(Err(error)) = cleaner.join() {
            eprintln!("dropping the benchmark database failed: {error:#}");
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    check_database_name(name)?;
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .with_context(|| format!("drop database {name}"))?;
    Ok(())
}

/// Returns the URL of database `name` on the server of `admin_url`, with the same user and
/// without the admin URL's query parameters.
fn sibling_database_url(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let base = admin_url.split('?').next().unwrap_or(admin_url);
    match base.rsplit_once('/') {
        Some((prefix, _)) if !prefix.ends_with(":/") => Ok(format!("{prefix}/{name}")),
        _ => bail!("the admin database URL must name a database, as in {DEFAULT_ADMIN_DATABASE_URL}"),
    }
}

/// Checks that a database name is a plain identifier (lowercase letters, digits, `_`), so it can
/// go into `CREATE DATABASE` and `DROP DATABASE` unquoted.
fn check_database_name(name: &str) -> anyhow::Result<()> {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_');
    if !plain {
        bail!("invalid benchmark database name {name:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_url_replaces_the_database() {
        let url = sibling_database_url("postgres://postgres@127.0.0.1:5432/test?sslmode=disable", "bench_1");
        assert_eq!(url.expect("valid URL"), "postgres://postgres@127.0.0.1:5432/bench_1");
        assert!(sibling_database_url("postgres://127.0.0.1:5432", "bench_1").is_err());
    }

    #[test]
    fn database_names_must_be_plain() {
        assert!(check_database_name("bench_00ff").is_ok());
        assert!(check_database_name("bench; DROP").is_err());
        assert!(check_database_name("").is_err());
    }
}
