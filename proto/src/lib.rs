//! The contract between the notifier and the edges: the `notify.v1` gRPC API, the stream entry
//! codec, channel rules and partitioning, the client protocol's frames and close codes, and the
//! log and history interfaces that both the Redis and the in-process deployments implement.
//!
//! Layout:
//! - [`pb`]: generated tonic and prost code for `notify.v1`.
//! - [`codec`]: the generated code's gRPC codec, which bounds repeated fields before decoding.
//! - [`channel`]: channel grammar, event type rules and the channel-to-partition hash.
//! - [`entry`]: encoding of an [`pb::Event`] as Redis stream fields, and back.
//! - [`frame`]: the JSON frame a client receives for an event, encoded once per event.
//! - [`protocol`]: client frame types and WebSocket close codes.
//! - [`log`]: the append and read interfaces of the event stream.
//! - [`memory`]: the in-process stream used by the single-process mode.
//! - [`history`]: the interface to the store of record used by the edges' recovery path.
//! - [`claims`]: the JWT claims a client token carries.
//! - [`telemetry`]: logging set-up shared by the binaries.
//! - [`metrics`]: the Prometheus registry of a process and its `/metrics` encoding.
//! - [`http_server`]: the HTTP accept loop, with a header read timeout and a connection cap.
//! - [`shutdown`]: the signal that starts a graceful stop.
//! - [`settings`]: parsers for setting values that both services share.
//! - [`ratelimit`]: token-bucket rate limiters with a bounded keyed store.

pub mod auth_header;
pub mod channel;
pub mod claims;
pub mod codec;
pub mod entry;
pub mod frame;
pub mod history;
pub mod http_server;
pub mod log;
pub mod memory;
pub mod metrics;
pub mod protocol;
pub mod ratelimit;
pub mod settings;
pub mod shutdown;
pub mod telemetry;

/// Generated code for the `notify.v1` package.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("notify.v1");

    /// Encoded file descriptor set, for the gRPC reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("notify_descriptor");
}
