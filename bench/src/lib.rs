//! Benchmarks of the notification service: a WebSocket load client, open-loop publishers, a
//! scenario runner that starts the system under test with its own Redis and PostgreSQL database,
//! and a bare fan-out server that sets the ceiling for the same client.
//!
//! Layout:
//! - [`client`]: the load client: many sockets over several loopback source addresses, delivery
//!   accounting (lost, duplicates, gaps) and latency histograms.
//! - [`publisher`]: the open-loop publisher (fixed schedule, intended send time in each payload)
//!   and the closed-loop throughput publisher, over gRPC or the ceiling's trigger port.
//! - [`ceiling`]: the bare tokio-tungstenite fan-out server behind `bench-ceiling`.
//! - [`deploy`]: the system under test: its own redis-server, its own database, and the
//!   `notifier` and `ws-edge` binaries or `bench-ceiling`.
//! - [`process`]: child processes, their `listening` log lines, and their CPU time and resident
//!   memory from `/proc`.
//! - [`scenario`]: fanout, idle, reconnect-storm and publish-throughput.
//! - [`report`]: result rows as a markdown table and as JSON.
//! - [`stats`]: latency histograms.
//! - [`token`]: HS256 client tokens.
//! - [`limits`]: raising the open-files limit.
//! - [`wire`]: the edge's JSON frames and Socket.IO, for the Socket.IO peer.

pub mod ceiling;
pub mod client;
pub mod deploy;
pub mod limits;
pub mod process;
pub mod publisher;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod token;
pub mod wire;

/// Returns the wall-clock time in microseconds since the Unix epoch, the unit of the
/// `sent_at_us` field that publishers put in each payload.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
}
