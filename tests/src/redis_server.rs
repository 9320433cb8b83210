//! A Redis server of one test's own, for faults the shared Redis must never see: stop and start,
//! `FLUSHALL`, `CLIENT PAUSE`.
//!
//! Redis cannot listen on an ephemeral port and report it (`--port 0` disables TCP), so the
//! server is started on a random port in [`PORTS`] and started again on another one when the
//! bind fails. The server's own "ready" log line confirms that the port is its own.

use std::ops::Range;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use crate::env::work_dir;
use crate::patience;

/// Ports tried for a server.
pub const PORTS: Range<u16> = 20_000..60_000;
/// Maximum number of ports tried before giving up.
const MAX_ATTEMPTS: usize = 20;
/// The line `redis-server` logs once it accepts connections (Redis 7.0 and later).
const READY_LINE: &str = "Ready to accept connections";

/// A `redis-server` child process on 127.0.0.1, without persistence, killed on drop.
pub struct RedisServer {
    port: u16,
    log_path: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port in [`PORTS`].
    ///
    /// # Errors
    /// Fails when `redis-server` cannot be started, or no port was free in [`MAX_ATTEMPTS`] tries.
    pub async fn start_new(name: &str) -> anyhow::Result<Self> {
        let log_path = work_dir().join("logs").join(format!("{name}-redis.log"));
        if let Some(parent) = log_path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let mut last_error = None;
        for _ in 0..MAX_ATTEMPTS {
            let port = rand::rng().random_range(PORTS);
            let mut server = Self {
                port,
                log_path: log_path.clone(),
                child: None,
            };
            match server.start().await {
                Ok(()) => return Ok(server),
                Err(err) => last_error = Some(err),
            }
        }
        let last_error = last_error.map_or_else(String::new, |err| format!("{err:#}"));
        bail!(
            "redis-server did not start in {MAX_ATTEMPTS} tries, the last failed with: {last_error}; see {}",
            log_path.display()
        )
    }

    /// Returns the URL of the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server on its port, empty. Does nothing when it is running.
    ///
    /// # Errors
    /// Fails when the server exits before it is ready (the port is taken), or is not ready within
    /// the patience.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // Small stream nodes make `XADD MAXLEN ~ n` trim close to n entries, so a test with a
            // small STREAM_MAXLEN really loses old entries.
            .args(["--stream-node-max-entries", "4"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start redis-server")?;
        let stdout = child.stdout.take().context("redis-server stdout is piped")?;
        let ready = tokio::time::timeout(patience(), self.wait_ready(stdout)).await;
        match ready {
            Ok(Ok(())) => {
                self.child = Some(child);
                Ok(())
            }
            Ok(Err(err)) => Err(err),
            Err(_) => bail!("redis-server on port {} was not ready in time", self.port),
        }
    }

    /// Reads the server's output into the log until the ready line, then copies the rest in the
    /// background.
    async fn wait_ready(&self, stdout: ChildStdout) -> anyhow::Result<()> {
        let mut log = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .await?;
        let mut lines = BufReader::new(stdout).lines();
        while let Some(line) = lines.next_line().await? {
            log.write_all(format!("{line}\n").as_bytes()).await?;
            if line.contains(READY_LINE) {
                tokio::spawn(async move {
                    while let Ok(Some(line)) = lines.next_line().await {
                        let _ = log.write_all(format!("{line}\n").as_bytes()).await;
                    }
                });
                return Ok(());
            }
        }
        bail!("redis-server on port {} exited before it was ready", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit. Its data is lost.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops the server's process with SIGSTOP: connections stay open and every command hangs
    /// until [`RedisServer::thaw`]. Dropping a frozen server still kills it.
    ///
    /// # Errors
    /// Fails when the server is not running or `kill` fails.
    pub async fn freeze(&self) -> anyhow::Result<()> {
        self.signal("-STOP").await
    }

    /// Resumes a server stopped by [`RedisServer::freeze`] with SIGCONT.
    ///
    /// # Errors
    /// Fails when the server is not running or `kill` fails.
    pub async fn thaw(&self) -> anyhow::Result<()> {
        self.signal("-CONT").await
    }

    async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("redis-server is not running")?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await
            .with_context(|| format!("run kill {signal} {pid}"))?;
        if !status.success() {
            bail!("kill {signal} {pid} failed with {status}");
        }
        Ok(())
    }

    async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }

    /// Deletes every key of the server.
    ///
    /// # Errors
    /// Fails when the server is unreachable or rejects the command.
    pub async fn flushall(&self) -> anyhow::Result<()> {
        let mut connection = self.connection().await?;
        redis::cmd("FLUSHALL").query_async::<()>(&mut connection).await?;
        Ok(())
    }

    /// Suspends every client of the server for `duration` (`CLIENT PAUSE <ms> ALL`).
    ///
    /// # Errors
    /// Fails when the server is unreachable or rejects the command.
    pub async fn pause(&self, duration: Duration) -> anyhow::Result<()> {
        let mut connection = self.connection().await?;
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(duration.as_millis() as u64)
            .arg("ALL")
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    }
}
