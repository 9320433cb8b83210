//! Child processes of a benchmark run: start them with their output copied to a log file, wait
//! until they are ready, read back the addresses they logged, and read their CPU time and
//! resident memory from `/proc`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, mpsc};

/// How long a process may take to become ready.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Readiness condition: the output a started process must print before it counts as ready.
#[derive(Debug, Clone)]
pub enum Ready {
    /// A `listening service="<name>" addr=<ip:port>` line for each of these services.
    Listening(Vec<&'static str>),
    /// A line that contains this text.
    LineContains(&'static str),
}

/// How to start a process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Name for messages and the log file.
    pub name: String,
    /// Executable path.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment variables added to the runner's own.
    pub env: Vec<(String, String)>,
    /// File that receives stdout and stderr.
    pub log_path: PathBuf,
    /// Readiness condition.
    pub ready: Ready,
}

/// A running child process. Dropping it kills the process.
pub struct Process {
    /// Name for messages.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// Addresses the process logged as listening, by service name.
    pub addrs: HashMap<String, SocketAddr>,
    /// File that receives the process's output.
    pub log_path: PathBuf,
    child: Child,
}

impl Process {
    /// Starts a process and waits until it is ready.
    ///
    /// # Errors
    /// Fails when the process cannot start, exits first, or is not ready within
    /// [`STARTUP_TIMEOUT`]; the message names the log file.
    pub async fn start(launch: Launch) -> anyhow::Result<Self> {
        let mut command = Command::new(&launch.program);
        command
            .args(&launch.args)
            .envs(launch.env.iter().map(|(key, value)| (key.as_str(), value.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("start {} ({})", launch.name, launch.program.display()))?;
        let pid = child.id().context("a just-started child has a pid")?;

        let (lines_tx, lines_rx) = mpsc::channel::<String>(1024);
        copy_output(&mut child, &launch.log_path, lines_tx).await?;
        let addrs = wait_ready(&launch, lines_rx).await?;
        Ok(Self {
            name: launch.name,
            pid,
            addrs,
            log_path: launch.log_path,
            child,
        })
    }

    /// Returns the address of a service the process logged.
    ///
    /// # Errors
    /// Fails when the process logged no such service.
    pub fn addr(&self, service: &str) -> anyhow::Result<SocketAddr> {
        self.addrs
            .get(service)
            .copied()
            .with_context(|| format!("{} logged no {service:?} listener", self.name))
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit, then kills it. Returns
    /// whether it exited within the grace period.
    ///
    /// # Errors
    /// Fails when neither signal can be sent.
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<bool> {
        // NOTE: the workspace forbids unsafe code, so SIGTERM goes through the `kill` command.
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .context("run kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} ({}) failed: {status}", self.pid, self.name);
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            return Ok(true);
        }
        self.kill().await?;
        Ok(false)
    }

    /// Sends SIGKILL and waits for the process to end.
    ///
    /// # Errors
    /// Fails when the signal cannot be sent.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.with_context(|| format!("kill {}", self.name))
    }
}

/// Copies the child's stdout and stderr into the log file, and each line into `lines_tx` while
/// a receiver listens.
async fn copy_output(child: &mut Child, log_path: &Path, lines_tx: mpsc::Sender<String>) -> anyhow::Result<()> {
    if let Some(dir) = log_path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("create {}", dir.display()))?;
    }
    let file = tokio::fs::File::create(log_path)
        .await
        .with_context(|| format!("create {}", log_path.display()))?;
    let file = Arc::new(Mutex::new(file));
    let stdout = child.stdout.take().context("stdout is piped")?;
    let stderr = child.stderr.take().context("stderr is piped")?;
    tokio::spawn(copy_lines(stdout, file.clone(), lines_tx.clone()));
    tokio::spawn(copy_lines(stderr, file, lines_tx));
    Ok(())
}

async fn copy_lines<R: AsyncRead + Unpin>(
    reader: R,
    file: Arc<Mutex<tokio::fs::File>>,
    lines_tx: mpsc::Sender<String>,
) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = file.lock().await.write_all(format!("{line}\n").as_bytes()).await;
        // Once the process is ready no receiver reads these lines, so a closed or full channel is
        // expected and the line only goes to the file.
        let _ = lines_tx.try_send(line);
    }
}

/// Reads output lines until the readiness condition holds, and returns the logged listeners.
async fn wait_ready(
    launch: &Launch,
    mut lines_rx: mpsc::Receiver<String>,
) -> anyhow::Result<HashMap<String, SocketAddr>> {
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    let mut addrs = HashMap::new();
    loop {
        let done = match &launch.ready {
            Ready::Listening(services) => services.iter().all(|service| addrs.contains_key(*service)),
            Ready::LineContains(_) => false,
        };
        if done {
            return Ok(addrs);
        }
        let line = match tokio::time::timeout_at(deadline, lines_rx.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => bail!(
                "{} exited before it was ready; see {}",
                launch.name,
                launch.log_path.display()
            ),
            Err(_) => bail!(
                "{} was not ready within {STARTUP_TIMEOUT:?}; see {}",
                launch.name,
                launch.log_path.display()
            ),
        };
        if let Ready::LineContains(text) = &launch.ready
            && line.contains(text)
        {
            return Ok(addrs);
        }
        if let Some((service, addr)) = parse_listening(&line) {
            addrs.insert(service, addr);
        }
    }
}

/// Parses `listening service="grpc" addr=127.0.0.1:1234` out of a text log line.
pub fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    if !line.contains("listening") {
        return None;
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|token| token.strip_prefix(name))
            .map(|value| value.trim_matches('"').to_owned())
    };
    let service = field("service=")?;
    let addr = field("addr=")?.parse().ok()?;
    Some((service, addr))
}

/// Clock ticks per second of `/proc/<pid>/stat`, from `getconf CLK_TCK`.
fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            // NOTE: Linux reports 100 on every common architecture; used when getconf is missing.
            .unwrap_or(100)
    })
}

/// Returns the user plus system CPU time a process has used, summed over its threads. The
/// resolution is one clock tick (10 ms on Linux), so measure windows of seconds.
///
/// # Errors
/// Fails when `/proc/<pid>/stat` cannot be read or parsed, for example after the process exited.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let ticks = parse_stat_cpu_ticks(&stat).with_context(|| format!("parse {path}"))?;
    Ok(Duration::from_micros(ticks * 1_000_000 / clock_ticks_per_second()))
}

/// Returns utime + stime in clock ticks from the text of `/proc/<pid>/stat`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces, so count fields after its closing parenthesis:
    // there field 3 (state) is index 0, utime (field 14) index 11 and stime (field 15) index 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Returns the resident set size of a process in bytes (`VmRSS` of `/proc/<pid>/status`).
///
/// # Errors
/// Fails when the file cannot be read or has no `VmRSS` line.
pub fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no VmRSS line in {path}"))?;
    Ok(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_parses() {
        let line = r#"2026-12-04T20:00:00Z  INFO ws_edge: listening service="http" addr=127.0.0.1:4321"#;
        let (service, addr) = parse_listening(line).expect("line has both fields");
        assert_eq!(service, "http");
        assert_eq!(addr, "127.0.0.1:4321".parse().expect("valid address"));
    }

    #[test]
    fn stat_cpu_ticks_skip_command_with_spaces() {
        let stat = "42 (tokio runtime) S 1 42 42 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 4 0 10 1000 50";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(280));
    }

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(cpu_time(pid).is_ok());
        assert!(resident_bytes(pid).expect("own VmRSS") > 0);
    }
}
