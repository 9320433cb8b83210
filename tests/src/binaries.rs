//! Builds the workspace binaries once per test process and starts them as child processes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Binaries the tests start.
pub const BINARIES: &[&str] = &["notifier", "ws-edge", "notify-standalone"];

/// A running binary. Dropping it kills the process.
pub struct Process {
    /// Name of the binary, for messages.
    pub name: String,
    /// Addresses the process logged as listening, by service name (`grpc`, `http`).
    pub addrs: HashMap<String, SocketAddr>,
    /// File that receives the process's log output.
    pub log_path: PathBuf,
    child: Child,
    /// How the process was started, for [`Process::restart`].
    launch: Launch,
    /// Number of restarts so far, which names the log file of the next one.
    restarts: usize,
}

/// Arguments, environment and listening services of a started binary.
#[derive(Debug, Clone)]
struct Launch {
    args: Vec<String>,
    vars: Vec<(String, String)>,
    services: Vec<String>,
}

impl Process {
    /// Returns the address of a listening service, as the process logged it.
    ///
    /// # Errors
    /// Fails when the process did not log that service.
    pub fn addr(&self, service: &str) -> anyhow::Result<SocketAddr> {
        self.addrs
            .get(service)
            .copied()
            .with_context(|| format!("{} logged no {service:?} listener", self.name))
    }

    /// Sends SIGKILL and waits for the process to end.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Returns whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Returns the process id, or `None` once the process has been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and starts it again with the same arguments and environment,
    /// except that each `(variable, service)` in `listen_vars` is set to the address the service
    /// listened on, so clients configured with the old addresses reach the new process. The
    /// new process logs to `<log>.restart<n>.log`.
    ///
    /// # Errors
    /// Fails when a service in `listen_vars` was not listening, or the new process does not start.
    pub async fn restart(&mut self, listen_vars: &[(&str, &str)]) -> anyhow::Result<()> {
        self.kill().await;
        let mut vars = self.launch.vars.clone();
        for (var, service) in listen_vars {
            let addr = self.addr(service)?;
            vars.retain(|(name, _)| name != var);
            vars.push(((*var).to_owned(), addr.to_string()));
        }
        self.restarts += 1;
        let log_path = self.log_path.with_extension(format!("restart{}.log", self.restarts));
        let launch = Launch {
            vars,
            ..self.launch.clone()
        };
        let restarted = spawn(&self.name, launch, log_path).await?;
        let restarts = self.restarts;
        *self = Self { restarts, ..restarted };
        Ok(())
    }
}

/// Directory holding the binaries: the profile directory of the running test executable.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("find the test executable")?;
    // target/<profile>/deps/<test binary>
    let deps = exe.parent().context("test executable has no parent directory")?;
    Ok(deps.parent().context("deps directory has no parent")?.to_path_buf())
}

/// Builds the binaries once per test process with the cargo that runs the tests.
fn ensure_built() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = BUILT.get_or_init(|| build().map_err(|err| format!("{err:#}")));
    result.clone().map_err(|err| anyhow::anyhow!(err))
}

fn build() -> anyhow::Result<PathBuf> {
    let dir = bin_dir()?;
    let target_dir = dir.parent().context("profile directory has no parent")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command
        .args(["build", "--workspace", "--bins", "--target-dir"])
        .arg(target_dir);
    if dir.file_name().is_some_and(|name| name == "release") {
        command.arg("--release");
    }
    let status = command.status().context("run cargo build for the binaries")?;
    if !status.success() {
        bail!("cargo build of the binaries failed: {status}");
    }
    Ok(dir)
}

/// Returns the path of a workspace binary, building the binaries first if needed.
///
/// # Errors
/// Fails when the build fails.
pub async fn path(name: &str) -> anyhow::Result<PathBuf> {
    Ok(tokio::task::spawn_blocking(ensure_built).await??.join(name))
}

/// Starts a binary with arguments and environment, and waits until it has logged a listening
/// line for each service in `services`.
///
/// # Errors
/// Fails when the build fails, the process exits early, or a service is not listening in time.
pub async fn start(
    name: &str,
    args: &[&str],
    vars: &[(&str, String)],
    services: &[&str],
    log_path: PathBuf,
) -> anyhow::Result<Process> {
    let launch = Launch {
        args: args.iter().map(|arg| (*arg).to_owned()).collect(),
        vars: vars
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect(),
        services: services.iter().map(|service| (*service).to_owned()).collect(),
    };
    spawn(name, launch, log_path).await
}

async fn spawn(name: &str, launch: Launch, log_path: PathBuf) -> anyhow::Result<Process> {
    let mut command = Command::new(path(name).await?);
    command
        .args(&launch.args)
        .envs(launch.vars.iter().map(|(key, value)| (key, value)));
    command.env("NO_COLOR", "1");
    // A test's own `LOG_FORMAT` wins over the text format the address parsing starts with.
    if !launch.vars.iter().any(|(key, _)| key == "LOG_FORMAT") {
        command.env("LOG_FORMAT", "text");
    }
    // A test's own `RUST_LOG` (set through its options) wins over `E2E_RUST_LOG`.
    if !launch.vars.iter().any(|(key, _)| key == "RUST_LOG") {
        command.env(
            "RUST_LOG",
            std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    }
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().with_context(|| format!("start {name}"))?;

    let (lines_tx, mut lines_rx) = mpsc::channel::<String>(256);
    forward_output(&mut child, lines_tx, log_path.clone()).await?;
    let mut addrs = HashMap::new();
    let deadline = tokio::time::Instant::now() + crate::patience() * 3;
    let services = &launch.services;
    while !services.iter().all(|service| addrs.contains_key(service)) {
        let line = tokio::time::timeout_at(deadline, lines_rx.recv()).await;
        match line {
            Ok(Some(line)) => record_listener(&line, &mut addrs),
            Ok(None) => bail!("{name} exited before listening; see {}", log_path.display()),
            Err(_) => bail!(
                "{name} did not log listeners {services:?} in time; see {}",
                log_path.display()
            ),
        }
    }
    Ok(Process {
        name: name.to_owned(),
        addrs,
        log_path,
        child,
        launch,
        restarts: 0,
    })
}

/// Copies the child's stdout and stderr into its log file, and the lines of both into `lines_tx`
/// until the receiver is gone: the services log to stdout, the single-process binary to stderr.
async fn forward_output(child: &mut Child, lines_tx: mpsc::Sender<String>, log_path: PathBuf) -> anyhow::Result<()> {
    if let Some(parent) = log_path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let file = tokio::fs::File::create(&log_path).await?;
    let file = std::sync::Arc::new(tokio::sync::Mutex::new(file));
    let stdout = child.stdout.take().context("child stdout is piped")?;
    let stderr = child.stderr.take().context("child stderr is piped")?;
    tokio::spawn(copy_lines(BufReader::new(stdout), file.clone(), Some(lines_tx.clone())));
    tokio::spawn(copy_lines(BufReader::new(stderr), file, Some(lines_tx)));
    Ok(())
}

async fn copy_lines<R>(
    reader: BufReader<R>,
    file: std::sync::Arc<tokio::sync::Mutex<tokio::fs::File>>,
    lines_tx: Option<mpsc::Sender<String>>,
) where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = file.lock().await.write_all(format!("{line}\n").as_bytes()).await;
        if let Some(tx) = &lines_tx {
            // After start-up no receiver reads these lines, so a full or closed channel is expected.
            let _ = tx.try_send(line);
        }
    }
}

/// Parses `listening service="grpc" addr=127.0.0.1:1234` out of a text log line, or the same
/// fields out of a JSON line (`LOG_FORMAT=json`).
fn record_listener(line: &str, addrs: &mut HashMap<String, SocketAddr>) {
    if !line.contains("listening") {
        return;
    }
    if let Ok(serde_json::Value::Object(object)) = serde_json::from_str(line) {
        let text = |name: &str| object.get(name).and_then(serde_json::Value::as_str);
        if let (Some("listening"), Some(service), Some(Ok(addr))) =
            (text("message"), text("service"), text("addr").map(str::parse))
        {
            addrs.insert(service.to_owned(), addr);
        }
        return;
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|token| token.strip_prefix(name))
            .map(|value| value.trim_matches('"').to_owned())
    };
    if let (Some(service), Some(Ok(addr))) = (field("service="), field("addr=").map(|addr| addr.parse())) {
        addrs.insert(service, addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_line_parses() {
        let mut addrs = HashMap::new();
        record_listener(
            r#"2026-12-04T20:00:00Z  INFO notifier: listening service="grpc" addr=127.0.0.1:4321"#,
            &mut addrs,
        );
        assert_eq!(
            addrs.get("grpc"),
            Some(&"127.0.0.1:4321".parse().expect("valid address"))
        );
    }
}
