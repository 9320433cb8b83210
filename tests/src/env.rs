//! One isolated deployment per test: its own PostgreSQL database and Redis key prefix in
//! distributed mode, or its own data directory in single-process mode.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use notify_proto::pb::notifier_client::NotifierClient;
use notify_proto::pb::{Event, HistoryRequest, PublishRequest, PublishResponse};
use sqlx::Connection;
use tonic::transport::Channel;

use crate::binaries::{self, Process};
use crate::client::Client;
use crate::token;

/// Default database used to create the per-test databases.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Default shared Redis.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Secret the test deployments verify client tokens with.
pub const JWT_SECRET: &str = "e2e-secret-with-enough-entropy-0123456789";
/// Number of stream partitions of the test deployments.
pub const PARTITIONS: u32 = 16;

/// How the system under test is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `notifier` and `ws-edge` processes on PostgreSQL and Redis.
    Distributed,
    /// One `notify-standalone` process on SQLite and the in-process stream.
    Standalone,
}

/// Extra settings of a deployment, as environment variables of its processes.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Variables for the notifier (and for the single process in standalone mode).
    pub notifier_env: Vec<(&'static str, String)>,
    /// Variables for the edge (and for the single process in standalone mode).
    pub edge_env: Vec<(&'static str, String)>,
    /// Redis of the distributed mode, in place of the shared one.
    pub redis_url: Option<String>,
}

impl Options {
    /// Adds a variable for the notifier.
    pub fn notifier(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.notifier_env.push((name, value.into()));
        self
    }

    /// Adds a variable for the edge.
    pub fn edge(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.edge_env.push((name, value.into()));
        self
    }
}

/// A running deployment. Dropping it stops the processes and removes the database, keys and
/// data directory it created.
pub struct TestEnv {
    /// Deployment mode.
    pub mode: Mode,
    /// Unique id of this deployment, used in database names, key prefixes and log files.
    pub id: String,
    /// The processes: `[notifier, ws-edge]` or `[notify-standalone]`.
    pub processes: Vec<Process>,
    /// gRPC address of the notifier.
    pub grpc: SocketAddr,
    /// HTTP address of the edge.
    pub edge: SocketAddr,
    /// Address of the notifier's `/metrics`: its HTTP listener, or the one process's metrics
    /// listener in standalone mode.
    pub notifier_metrics: SocketAddr,
    /// Address of the edge's `/metrics`; the same as `notifier_metrics` in standalone mode.
    pub edge_metrics: SocketAddr,
    /// Environment of the notifier process, for [`TestEnv::start_extra_notifier`]; empty in
    /// standalone mode.
    notifier_vars: Vec<(&'static str, String)>,
    database: Option<String>,
    data_dir: Option<PathBuf>,
}

fn var_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// URL of the database used to create per-test databases.
pub fn admin_database_url() -> String {
    var_or("TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
}

/// URL of the shared Redis.
pub fn redis_url() -> String {
    var_or("TEST_REDIS_URL", DEFAULT_REDIS_URL)
}

/// Directory for test logs and data: `target/e2e`.
pub fn work_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e")
}

impl TestEnv {
    /// Starts a deployment in the given mode.
    ///
    /// # Errors
    /// Fails when the database cannot be created or a process does not start.
    pub async fn start(mode: Mode) -> anyhow::Result<Self> {
        Self::start_with(mode, Options::default()).await
    }

    /// Starts a deployment in the given mode with extra settings.
    ///
    /// # Errors
    /// Fails when the database cannot be created or a process does not start.
    pub async fn start_with(mode: Mode, options: Options) -> anyhow::Result<Self> {
        let id = format!("e2e_{}", uuid::Uuid::new_v4().simple());
        match mode {
            Mode::Distributed => Self::start_distributed(id, options).await,
            Mode::Standalone => Self::start_standalone(id, options).await,
        }
    }

    /// Starts a deployment, or returns `None` after printing why when the distributed mode's
    /// PostgreSQL or Redis is unreachable and `E2E_REQUIRE_SERVICES` is not set.
    ///
    /// # Errors
    /// Fails when a service is unreachable and required, or when the deployment does not start.
    pub async fn start_or_skip(mode: Mode) -> anyhow::Result<Option<Self>> {
        Self::start_with_or_skip(mode, Options::default()).await
    }

    /// Starts a deployment with extra settings, or returns `None` as [`TestEnv::start_or_skip`]
    /// does.
    ///
    /// # Errors
    /// Fails when a service is unreachable and required, or when the deployment does not start.
    pub async fn start_with_or_skip(mode: Mode, options: Options) -> anyhow::Result<Option<Self>> {
        let unreachable = match mode {
            Mode::Distributed => check_services().await.err(),
            Mode::Standalone => None,
        };
        if let Some(err) = unreachable {
            if std::env::var_os("E2E_REQUIRE_SERVICES").is_some() {
                return Err(err.context("E2E_REQUIRE_SERVICES is set"));
            }
            eprintln!("skipped: distributed mode needs PostgreSQL and Redis: {err:#}");
            return Ok(None);
        }
        Self::start_with(mode, options).await.map(Some)
    }

    async fn start_distributed(id: String, options: Options) -> anyhow::Result<Self> {
        let database_url = create_database(&id).await?;
        let common = vec![
            ("REDIS_URL", options.redis_url.clone().unwrap_or_else(redis_url)),
            ("STREAM_PREFIX", id.clone()),
            ("STREAM_PARTITIONS", PARTITIONS.to_string()),
        ];
        let mut notifier_vars = common.clone();
        notifier_vars.push(("DATABASE_URL", database_url));
        notifier_vars.push(("NOTIFIER_LISTEN", "127.0.0.1:0".into()));
        notifier_vars.push(("NOTIFIER_HTTP_LISTEN", "127.0.0.1:0".into()));
        notifier_vars.extend(options.notifier_env.iter().cloned());
        let log = |name: &str| work_dir().join("logs").join(format!("{id}-{name}.log"));
        let notifier = binaries::start("notifier", &[], &notifier_vars, &["grpc", "http"], log("notifier")).await?;
        let grpc = notifier.addr("grpc")?;

        let mut edge_vars = common;
        edge_vars.push(("JWT_SECRET", JWT_SECRET.into()));
        edge_vars.push(("EDGE_LISTEN", "127.0.0.1:0".into()));
        edge_vars.push(("EDGE_METRICS_LISTEN", "127.0.0.1:0".into()));
        edge_vars.push(("NOTIFIER_URL", format!("http://{grpc}")));
        edge_vars.extend(options.edge_env.iter().cloned());
        let edge_process = binaries::start("ws-edge", &[], &edge_vars, &["http", "metrics"], log("ws-edge")).await?;
        let edge = edge_process.addr("http")?;
        let (notifier_metrics, edge_metrics) = (notifier.addr("http")?, edge_process.addr("metrics")?);
        let processes = vec![notifier, edge_process];
        Ok(Self {
            mode: Mode::Distributed,
            id: id.clone(),
            processes,
            grpc,
            edge,
            notifier_metrics,
            edge_metrics,
            notifier_vars,
            database: Some(id),
            data_dir: None,
        })
    }

    async fn start_standalone(id: String, options: Options) -> anyhow::Result<Self> {
        let data_dir = work_dir().join("data").join(&id);
        let mut vars = vec![
            ("NOTIFY_DATA_DIR", data_dir.display().to_string()),
            ("NOTIFIER_LISTEN", "127.0.0.1:0".into()),
            ("EDGE_LISTEN", "127.0.0.1:0".into()),
            ("EDGE_METRICS_LISTEN", "127.0.0.1:0".into()),
            ("JWT_SECRET", JWT_SECRET.into()),
            ("STREAM_PARTITIONS", PARTITIONS.to_string()),
        ];
        vars.extend(options.notifier_env.into_iter().chain(options.edge_env));
        let log = work_dir().join("logs").join(format!("{id}-standalone.log"));
        let process = binaries::start("notify-standalone", &[], &vars, &["grpc", "http", "metrics"], log).await?;
        let (grpc, edge, metrics) = (process.addr("grpc")?, process.addr("http")?, process.addr("metrics")?);
        let processes = vec![process];
        Ok(Self {
            mode: Mode::Standalone,
            id,
            processes,
            grpc,
            edge,
            notifier_metrics: metrics,
            edge_metrics: metrics,
            notifier_vars: Vec::new(),
            database: None,
            data_dir: Some(data_dir),
        })
    }

    /// Returns a gRPC client of the notifier.
    ///
    /// # Errors
    /// Fails when the notifier does not accept the connection.
    pub async fn publisher(&self) -> anyhow::Result<NotifierClient<Channel>> {
        publisher_at(self.grpc).await
    }

    /// Starts another `notifier` process on the same database and stream keys, with its own
    /// listeners. Dropping the returned process stops it.
    ///
    /// # Errors
    /// Fails in standalone mode, or when the process does not start.
    pub async fn start_extra_notifier(&self, name: &str) -> anyhow::Result<Process> {
        anyhow::ensure!(
            self.mode == Mode::Distributed,
            "only the distributed mode runs separate notifiers"
        );
        let log = work_dir().join("logs").join(format!("{}-{name}.log", self.id));
        binaries::start("notifier", &[], &self.notifier_vars, &["grpc", "http"], log).await
    }

    /// Kills the notifier (SIGKILL) and starts it again on the same addresses, so the edge and
    /// [`TestEnv::publisher`] reach the new process. In standalone mode this restarts the one
    /// process, edge included.
    ///
    /// # Errors
    /// Fails when the new process does not start.
    pub async fn restart_notifier(&mut self) -> anyhow::Result<()> {
        let listen_vars: &[(&str, &str)] = match self.mode {
            Mode::Distributed => &[("NOTIFIER_LISTEN", "grpc"), ("NOTIFIER_HTTP_LISTEN", "http")],
            Mode::Standalone => &[
                ("NOTIFIER_LISTEN", "grpc"),
                ("EDGE_LISTEN", "http"),
                ("EDGE_METRICS_LISTEN", "metrics"),
            ],
        };
        self.process_mut(0)?.restart(listen_vars).await
    }

    /// Kills the edge (SIGKILL) and starts it again on the same address. Its recent-event window
    /// starts empty, so resumes after the restart read the stream or the store. In standalone
    /// mode this restarts the one process, which also empties the in-process stream.
    ///
    /// # Errors
    /// Fails when the new process does not start.
    pub async fn restart_edge(&mut self) -> anyhow::Result<()> {
        match self.mode {
            Mode::Distributed => {
                let listen_vars = [("EDGE_LISTEN", "http"), ("EDGE_METRICS_LISTEN", "metrics")];
                self.process_mut(1)?.restart(&listen_vars).await
            }
            Mode::Standalone => self.restart_notifier().await,
        }
    }

    fn process_mut(&mut self, index: usize) -> anyhow::Result<&mut Process> {
        self.processes
            .get_mut(index)
            .with_context(|| format!("the deployment has no process {index}"))
    }

    /// Returns every stored event of a channel after position `since`, in order, reading the
    /// History call page by page.
    ///
    /// # Errors
    /// Fails when a call fails.
    pub async fn history(&self, channel: &str, since: u64) -> anyhow::Result<Vec<Event>> {
        let mut client = self.publisher().await?;
        let mut events = Vec::new();
        let mut since = since;
        loop {
            let request = HistoryRequest {
                channel: channel.into(),
                since,
                limit: notify_proto::history::MAX_PAGE,
            };
            let page = client.history(request).await?.into_inner();
            events.extend(page.events);
            if page.next_since <= since || page.next_since >= page.head {
                return Ok(events);
            }
            since = page.next_since;
        }
    }

    /// Publishes an event and returns the response.
    ///
    /// # Errors
    /// Fails when the call fails.
    pub async fn publish(&self, channel: &str, event_type: &str, data: &str) -> anyhow::Result<PublishResponse> {
        let request = PublishRequest {
            channel: channel.into(),
            r#type: event_type.into(),
            data: data.into(),
            ..Default::default()
        };
        self.publish_request(request).await.map_err(Into::into)
    }

    /// Sends a publish request and returns the gRPC result, for tests that expect a failure.
    ///
    /// # Errors
    /// Returns the call's status.
    pub async fn publish_request(&self, request: PublishRequest) -> Result<PublishResponse, tonic::Status> {
        let mut client = self
            .publisher()
            .await
            .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
        client.publish(request).await.map(tonic::Response::into_inner)
    }

    /// Returns the WebSocket URL of the edge, without a token.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.edge)
    }

    /// Connects a client with a fresh valid token for `user` and waits for `connected`.
    ///
    /// # Errors
    /// Fails when the connection or the handshake fails.
    pub async fn connect(&self, user: &str) -> anyhow::Result<Client> {
        let token = token::valid(user, &[]);
        Client::connect_with_token(&self.ws_url(), &token).await
    }
}

/// Returns a gRPC client of the notifier at `addr`.
///
/// # Errors
/// Fails when the notifier does not accept the connection.
pub async fn publisher_at(addr: SocketAddr) -> anyhow::Result<NotifierClient<Channel>> {
    Ok(NotifierClient::connect(format!("http://{addr}")).await?)
}

/// Checks that the shared PostgreSQL and Redis are reachable.
///
/// # Errors
/// Fails when either is unreachable, naming its URL.
pub async fn check_services() -> anyhow::Result<()> {
    let admin_url = admin_database_url();
    let connect = sqlx::PgConnection::connect(&admin_url);
    let connection = tokio::time::timeout(std::time::Duration::from_secs(3), connect).await;
    connection
        .with_context(|| format!("{admin_url} timed out"))?
        .with_context(|| format!("connect to {admin_url}"))?;
    let client = redis::Client::open(redis_url())?;
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connect to {}", redis_url()))?;
    redis::cmd("PING").query_async::<String>(&mut connection).await?;
    Ok(())
}

/// Creates a database named `name` and returns its URL.
async fn create_database(name: &str) -> anyhow::Result<String> {
    let admin_url = admin_database_url();
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .with_context(|| format!("connect to {admin_url}"))?;
    // The name is generated by the harness (e2e_ and a UUID), never taken from input.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(base, _)| base);
    Ok(format!("{base}/{name}"))
}

async fn cleanup(database: Option<String>, prefix: String, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(name) = database {
        let mut admin = sqlx::PgConnection::connect(&admin_database_url()).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
        let client = redis::Client::open(redis_url())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = (0..PARTITIONS)
            .map(|partition| notify_proto::channel::stream_key(&prefix, partition))
            .collect();
        redis::cmd("DEL").arg(&keys).query_async::<()>(&mut connection).await?;
    }
    if let Some(dir) = data_dir {
        let _ = tokio::fs::remove_dir_all(dir).await;
    }
    Ok(())
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.processes.clear();
        let (database, prefix, data_dir) = (self.database.take(), self.id.clone(), self.data_dir.take());
        // Drop cannot await, and the test's runtime may be shutting down: clean up on a thread
        // with a runtime of its own.
        let cleaner = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(cleanup(database, prefix, data_dir))
        });
        if let Ok(Err(err)) = cleaner.join() {
            eprintln!("cleanup of test deployment failed: {err:#}");
        }
    }
}
