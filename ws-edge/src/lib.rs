//! The WebSocket edge: authenticates browser clients, reads every stream partition once, and fans
//! each event out to the local sockets subscribed to its channel, encoded once and shared.
//!
//! Layout:
//! - [`config`]: settings, each a flag and an environment variable.
//! - [`server`]: [`serve`], the shared [`server::Edge`] state, readiness and the drain.
//! - [`http`]: the HTTP accept loop, with a timeout on request headers.
//! - [`routes`]: the warp filters for `/ws`, `/healthz`, `/readyz` and the demo page.
//! - [`upgrade`]: the WebSocket handshake, with small per-socket buffers.
//! - [`session`]: one socket's life: authentication, the reader loop, subscriptions, the end.
//! - [`writer`]: one socket's writer task: writes a full socket held back, pings, close codes.
//! - [`wire`]: server frame headers and the socket's write half.
//! - [`admission`]: handshake rate, socket counts and client message rates.
//! - [`conflate`]: replacement of queued events by newer ones with the same key, per channel prefix.
//! - [`metrics`]: the Prometheus metrics: sockets, deliveries, drops, closes, lag, errors.
//! - [`outbound`]: the bounded per-socket queue, written straight to the socket while it keeps up.
//! - [`frames`]: the client protocol's requests and control replies.
//! - [`auth`]: token verification and channel authorization.
//! - [`jwks`]: the identity provider's key set: cache, refresh, rate-limited refetch.
//! - [`origin`]: the `Origin` allow-list of the upgrade.
//! - [`hub`]: channel to local subscribers, one shard per partition.
//! - [`recent`]: each partition's window of recent events, which serves most resumes.
//! - [`fanout`]: the stream reader: per-partition cursors, duplicate drop, gap fill.
//! - [`delivery_trace`]: the `deliver` span of each event, closed after its last socket write.
//! - [`recovery`]: replay from `since` out of the stream or the store.
//! - [`coalesce`]: sharing of identical in-flight reads among recoveries.
//! - [`backoff`]: retry delays.
//! - [`stream`]: the Redis Streams [`notify_proto::log::LogReader`].
//! - [`history_client`]: the notifier's gRPC API as a [`notify_proto::history::HistoryStore`].
//! - [`demo`]: the embedded demo page and its settings.

pub mod admission;
pub mod auth;
pub mod backoff;
pub mod coalesce;
pub mod config;
pub mod conflate;
pub mod delivery_trace;
pub mod demo;
pub mod fanout;
pub mod frames;
pub mod history_client;
pub mod http;
pub mod hub;
pub mod jwks;
pub mod metrics;
pub mod origin;
pub mod outbound;
pub mod recent;
pub mod recovery;
pub mod routes;
pub mod server;
pub mod session;
pub mod stream;
#[cfg(test)]
mod testing;
pub mod upgrade;
pub mod wire;
pub mod writer;

pub use config::Config;
pub use server::serve;
