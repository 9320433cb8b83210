//! The load client on its own, against a server that is already running: connect N sockets,
//! read for a while, and report deliveries and latency. Events must carry the benchmark payload
//! `{"sent_at_us":..,"seq":..}`, as `bench publish` sends it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::channel_names;
use crate::client::{Backoff, DEFAULT_CONNECT_CONCURRENCY, Fleet, FleetConfig};
use crate::deploy::JWT_SECRET;
use crate::report::{Row, number};
use crate::stats::LatencySummary;
use crate::token::TokenMinter;
use crate::wire::Protocol;

/// Options of the standalone load client.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// WebSocket URL of the server, with an IP address: ws://127.0.0.1:8080/ws.
    #[arg(long)]
    pub url: String,
    /// HS256 secret the server verifies tokens with.
    #[arg(long, env = "BENCH_JWT_SECRET", default_value = JWT_SECRET)]
    pub secret: String,
    /// Sockets.
    #[arg(long, default_value_t = 100)]
    pub sockets: usize,
    /// Channels `bench-0` to `bench-<n-1>`; socket i subscribes to channel i mod n.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Seconds to read after every socket subscribed.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Reconnect and resume with `since` after a disconnect.
    #[arg(long)]
    pub reconnect: bool,
    /// Speak Socket.IO (Engine.IO v4) instead of the edge's protocol; the URL's path is then
    /// ignored.
    #[arg(long)]
    pub socket_io: bool,
    /// Loopback source addresses the sockets spread over: 127.0.0.1 to 127.0.0.N.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_addrs: u8,
    /// Maximum connects in progress at once, reconnects included.
    #[arg(long, default_value_t = DEFAULT_CONNECT_CONCURRENCY)]
    pub connect_concurrency: usize,
    /// File to append the result to, one JSON object per line.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Result of the standalone client.
#[derive(Debug, Clone, Serialize)]
pub struct ClientResult {
    /// Always `client`.
    pub scenario: &'static str,
    /// Sockets subscribed.
    pub sockets: usize,
    /// Sockets whose first connect or subscribe failed.
    pub connect_failures: usize,
    /// Seconds to connect and subscribe every socket.
    pub connect_s: f64,
    /// Distinct deliveries.
    pub delivered: u64,
    /// Deliveries of an event id the socket already had.
    pub duplicates: u64,
    /// Arrivals with unreceived sequence numbers before them.
    pub gaps: u64,
    /// Delivery latency from the intended send time.
    pub latency: LatencySummary,
    /// Close codes the sockets received (0: ended without a close frame).
    pub closes: BTreeMap<u16, u64>,
}

impl Row for ClientResult {
    fn columns(&self) -> Vec<&'static str> {
        vec!["sockets", "delivered", "dup", "gaps", "p50 ms", "p99 ms", "max ms"]
    }

    fn cells(&self) -> Vec<String> {
        vec![
            (self.sockets - self.connect_failures).to_string(),
            self.delivered.to_string(),
            self.duplicates.to_string(),
            self.gaps.to_string(),
            number(Some(self.latency.p50_ms), 2),
            number(Some(self.latency.p99_ms), 2),
            number(Some(self.latency.max_ms), 2),
        ]
    }
}

/// Splits `ws://<ip>:<port><path>` into the address and the path.
fn parse_ws_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("ws://")
        .with_context(|| format!("the URL must start with ws://, got {url}"))?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |slash| rest.split_at(slash));
    let addr = authority
        .parse()
        .with_context(|| format!("the URL's host must be an IP address and port, got {authority}"))?;
    Ok((addr, path.to_owned()))
}

/// Runs the load client for the configured time.
///
/// # Errors
/// Fails when the URL is invalid or not loopback, or no socket connects.
pub async fn run(args: &ClientArgs) -> anyhow::Result<ClientResult> {
    let (server, path) = parse_ws_url(&args.url)?;
    let config = FleetConfig {
        server,
        path,
        sockets: args.sockets,
        channels: channel_names(args.channels),
        source_addrs: args.source_addrs,
        connect_concurrency: args.connect_concurrency,
        reconnect: args.reconnect,
        protocol: if args.socket_io {
            Protocol::SocketIo
        } else {
            Protocol::Native
        },
        backoff: Backoff::default(),
    };
    let minter = TokenMinter::new(&args.secret, Duration::from_secs(4 * 3600))?;
    let fleet = Fleet::connect(config, minter).await?;
    tokio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    let (connect_s, connect_failures) = (fleet.connect_elapsed.as_secs_f64(), fleet.connect_failures);
    let report = fleet.finish().await;
    Ok(ClientResult {
        scenario: "client",
        sockets: args.sockets,
        connect_failures,
        connect_s,
        delivered: report.delivered,
        duplicates: report.duplicates,
        gaps: report.gaps(),
        latency: LatencySummary::of(&report.latency),
        closes: report.closes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url_splits_into_address_and_path() {
        let (addr, path) = parse_ws_url("ws://127.0.0.1:8080/ws").expect("valid URL");
        assert_eq!(addr, "127.0.0.1:8080".parse().expect("valid address"));
        assert_eq!(path, "/ws");
        assert!(parse_ws_url("ws://localhost:8080/ws").is_err());
        assert!(parse_ws_url("http://127.0.0.1:8080/ws").is_err());
    }
}
