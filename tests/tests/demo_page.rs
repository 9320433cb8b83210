//! The demo page in a real browser: headless Chromium, driven by playwright-core, opens the page
//! served by the edge, subscribes, and shows an event published with the command-line client,
//! Hebrew included.
//!
//! Needs `node`, Chromium at `/usr/bin/chromium` (or `CHROMIUM_PATH`) and `npm ci` in
//! `tests/browser`. Without them the test prints why and passes, unless `E2E_REQUIRE_BROWSER` is
//! set, as CI does.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail, ensure};
use e2e::binaries;
use e2e::env::{Mode, TestEnv, work_dir};
use e2e::token;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const PAYLOAD: &str = r#"{"text":"שלום, world"}"#;

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Returns why the browser test cannot run here, if it cannot.
fn missing_browser() -> Option<String> {
    let chromium = std::env::var("CHROMIUM_PATH").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!("no Chromium at {chromium}"));
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some("playwright-core is not installed; run `npm ci` in tests/browser".into());
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(output) if output.status.success() => None,
        _ => Some("node is not on the PATH".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_shows_published_event() -> anyhow::Result<()> {
    if let Some(reason) = missing_browser() {
        ensure!(
            std::env::var_os("E2E_REQUIRE_BROWSER").is_none(),
            "E2E_REQUIRE_BROWSER is set, but {reason}"
        );
        eprintln!("skipped: {reason}");
        return Ok(());
    }
    let env = TestEnv::start(Mode::Standalone).await?;
    let url = format!("http://{}/#token={}", env.edge, token::valid("alice", &[]));
    let screenshot = work_dir().join(format!("{}-demo.png", env.id));

    // Open the page and subscribe to `news`.
    let mut browser = Command::new("node")
        .current_dir(browser_dir())
        .args(["demo-page.mjs", &url, "news", "שלום, world"])
        .arg(&screenshot)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start node")?;
    let stdout = browser.stdout.take().context("node stdout is piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = next_line(&mut lines).await?;
    let command = ready
        .strip_prefix("ready ")
        .with_context(|| format!("expected `ready`, got {ready:?}"))?;
    let expected = format!("publish --addr http://{} --channel news --type demo.message", env.grpc);
    assert!(
        command.contains(&expected),
        "page shows {command:?}, expected it to contain {expected:?}"
    );

    // Publish with the command-line client, as the page shows a user.
    let cli = binaries::path("notify-standalone").await?;
    let grpc = format!("http://{}", env.grpc);
    let args = [
        "publish",
        "--addr",
        &grpc,
        "--channel",
        "news",
        "--type",
        "demo.message",
        "--data",
        PAYLOAD,
    ];
    let output = Command::new(cli).args(args).output().await?;
    assert!(
        output.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The page shows the event, with the Hebrew text intact.
    let seen = next_line(&mut lines).await?;
    assert!(seen.starts_with("seen "), "expected `seen`, got {seen:?}");
    assert!(seen.contains("שלום, world"), "page shows {seen:?}");
    let status = browser.wait().await?;
    assert!(status.success(), "browser script failed: {status}");
    Ok(())
}

async fn next_line<R>(lines: &mut tokio::io::Lines<BufReader<R>>) -> anyhow::Result<String>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let line = tokio::time::timeout(e2e::patience() * 3, lines.next_line())
        .await
        .context("browser script timed out")?;
    match line? {
        Some(line) => Ok(line),
        None => bail!("browser script ended early; its error is above"),
    }
}
