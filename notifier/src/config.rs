//! Settings, read from command-line flags or the matching environment variables, and their
//! defaults. `CONFIG.md` in this crate lists every variable.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

pub use notify_proto::settings::{parse_duration, parse_positive};

pub use notify_proto::channel::DEFAULT_PARTITIONS;
use notify_proto::ratelimit::nonzero;

/// Default address of the gRPC listener.
pub const DEFAULT_GRPC_LISTEN: &str = "0.0.0.0:50051";
/// Default address of the HTTP listener that serves `/healthz` and `/readyz`.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:8081";
/// Default prefix of the Redis stream keys.
pub const DEFAULT_STREAM_PREFIX: &str = "notify";
/// Default approximate maximum number of entries per stream partition (`XADD MAXLEN ~`).
pub const DEFAULT_STREAM_MAXLEN: usize = 10_000;
/// Default maximum size of an event's JSON payload in bytes.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 65_536;
/// Default capacity of each partition's publish queue. With the default payload limit, 16
/// partitions hold at most 16 × 256 × 64 KiB = 256 MiB of queued payloads.
pub const DEFAULT_PUBLISH_QUEUE: usize = 256;
/// Default number of publish transactions a notifier runs at once.
pub const DEFAULT_COMMIT_CONCURRENCY: usize = 1;
/// Default publish rate of one caller, per second. Generous: it stops a runaway client, not
/// normal traffic.
pub const DEFAULT_PUBLISH_RATE: NonZeroU32 = nonzero(1000);
/// Default burst of one caller's publishes above [`DEFAULT_PUBLISH_RATE`].
pub const DEFAULT_PUBLISH_BURST: NonZeroU32 = nonzero(2000);
/// Default maximum number of callers with their own rate-limit bucket. A bucket takes about
/// 100 bytes, so the store stays below a few MiB.
pub const DEFAULT_PUBLISH_RATE_KEYS: usize = 10_000;
/// Default time a stored event is kept before the retention sweeper deletes it: 7 days.
pub const DEFAULT_STORE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default time an idempotency key is remembered: 24 hours.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Default time the drain may take after a shutdown signal. Keep it below the pod's
/// `terminationGracePeriodSeconds`, which is 30 s by default on Kubernetes.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Settings of the service itself, the part the single-process mode shares. Flatten it into a
/// command line with `#[command(flatten)]`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Config {
    /// Number of stream partitions. Notifiers and edges must use the same number, and it cannot
    /// change once events are stored.
    #[arg(
        long = "stream-partitions",
        env = "STREAM_PARTITIONS",
        value_name = "STREAM_PARTITIONS",
        default_value_t = DEFAULT_PARTITIONS,
        value_parser = clap::value_parser!(u32).range(1..=4096),
    )]
    pub partitions: u32,

    /// Approximate maximum number of entries kept in each partition's stream.
    #[arg(long = "stream-maxlen", env = "STREAM_MAXLEN", value_name = "STREAM_MAXLEN", default_value_t = DEFAULT_STREAM_MAXLEN, value_parser = parse_positive)]
    pub stream_max_len: usize,

    /// Maximum size of an event's JSON payload, in bytes.
    #[arg(long, env = "MAX_PAYLOAD_BYTES", default_value_t = DEFAULT_MAX_PAYLOAD_BYTES, value_parser = parse_positive)]
    pub max_payload_bytes: usize,

    /// Capacity of each partition's publish queue. When it is full, Publish fails with
    /// RESOURCE_EXHAUSTED and a retry hint.
    #[arg(long, env = "PUBLISH_QUEUE", default_value_t = DEFAULT_PUBLISH_QUEUE, value_parser = parse_positive)]
    pub publish_queue: usize,

    /// Publish transactions run at once, each over its own share of the partitions. One commits
    /// the waiting requests of every partition together, which costs the least per event. More
    /// may help when each transaction waits on a distant database rather than on the CPU (an
    /// estimate: on a local database two were slower than one).
    #[arg(long, env = "COMMIT_CONCURRENCY", default_value_t = DEFAULT_COMMIT_CONCURRENCY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16))]
    pub commit_concurrency: usize,

    /// Publishes per second allowed to one caller (keyed by API key, else by IP address); more fail with
    /// RESOURCE_EXHAUSTED and a retry hint.
    #[arg(long, env = "PUBLISH_RATE", default_value_t = DEFAULT_PUBLISH_RATE)]
    pub publish_rate: NonZeroU32,

    /// Publishes one caller may send at once above `PUBLISH_RATE`.
    #[arg(long, env = "PUBLISH_BURST", default_value_t = DEFAULT_PUBLISH_BURST)]
    pub publish_burst: NonZeroU32,

    /// Maximum number of callers with their own rate-limit bucket; past it, new callers share one.
    #[arg(long, env = "PUBLISH_RATE_KEYS", default_value_t = DEFAULT_PUBLISH_RATE_KEYS, value_parser = parse_positive)]
    pub publish_rate_keys: usize,

    /// How long stored events are kept, as seconds or with a unit (`7d`, `36h`).
    #[arg(long, env = "STORE_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub store_retention: Duration,

    /// How long an idempotency key is remembered, as seconds or with a unit (`24h`).
    #[arg(long, env = "IDEMPOTENCY_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_window: Duration,

    /// Maximum time the drain may take after a shutdown signal, as seconds or with a unit (`20s`).
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Comma-separated SHA-256 hashes (hex) of the publishers' API keys, each optionally limited
    /// to channel prefixes: `<hash>:<prefix>|<prefix>`. When this or `EDGE_KEYS` is set, every
    /// call needs `authorization: Bearer <key>`.
    #[arg(long, env = "PUBLISHER_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub publisher_keys: Vec<String>,

    /// Comma-separated SHA-256 hashes (hex) of the edges' API keys, which may call History,
    /// ReadPartition and Heads but not Publish.
    #[arg(long, env = "EDGE_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub edge_keys: Vec<String>,

    /// PEM certificate chain of the gRPC listener; with `GRPC_TLS_KEY`, the listener speaks TLS.
    #[arg(long, env = "GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of the gRPC listener's certificate.
    #[arg(long, env = "GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<std::path::PathBuf>,

    /// PEM CA certificates that client certificates must chain to; when set, the gRPC listener
    /// requires a client certificate (mutual TLS). Needs `GRPC_TLS_CERT`.
    #[arg(long, env = "GRPC_TLS_CLIENT_CA", requires = "grpc_tls_cert")]
    pub grpc_tls_client_ca: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
            stream_max_len: DEFAULT_STREAM_MAXLEN,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            publish_queue: DEFAULT_PUBLISH_QUEUE,
            commit_concurrency: DEFAULT_COMMIT_CONCURRENCY,
            publish_rate: DEFAULT_PUBLISH_RATE,
            publish_burst: DEFAULT_PUBLISH_BURST,
            publish_rate_keys: DEFAULT_PUBLISH_RATE_KEYS,
            store_retention: DEFAULT_STORE_RETENTION,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            publisher_keys: Vec::new(),
            edge_keys: Vec::new(),
            grpc_tls_cert: None,
            grpc_tls_key: None,
            grpc_tls_client_ca: None,
        }
    }
}

/// The store of record's address.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// Store of record: `postgres://user:password@host/db` or `sqlite://path/to/file.db`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// Settings of the `notifier serve` command: the service settings plus its listeners, store and
/// Redis.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Store of record.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Redis holding the event streams, for example `redis://127.0.0.1:6379`.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: String,

    /// Prefix of the Redis stream keys; partition 3 is `<prefix>:{p3}`.
    #[arg(long, env = "STREAM_PREFIX", default_value = DEFAULT_STREAM_PREFIX)]
    pub stream_prefix: String,

    /// Address of the gRPC listener.
    #[arg(long = "listen", env = "NOTIFIER_LISTEN", value_name = "NOTIFIER_LISTEN", default_value = DEFAULT_GRPC_LISTEN)]
    pub listen: SocketAddr,

    /// Address of the HTTP listener for `/healthz` and `/readyz`.
    #[arg(long = "http-listen", env = "NOTIFIER_HTTP_LISTEN", value_name = "NOTIFIER_HTTP_LISTEN", default_value = DEFAULT_HTTP_LISTEN)]
    pub http_listen: SocketAddr,

    /// Service settings.
    #[command(flatten)]
    pub config: Config,
}

/// Settings of the `notifier migrate` command.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// Store of record.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Service settings; `migrate` uses the number of partitions.
    #[command(flatten)]
    pub config: Config,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn flag_defaults_match_constants() {
        let parsed = Command::try_parse_from(["notifier"]).expect("defaults parse");
        assert_eq!(parsed.config, Config::default());
    }

    #[test]
    fn durations_accept_seconds_and_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("7d"), Ok(DEFAULT_STORE_RETENTION));
        let err = parse_duration("soon").expect_err("no number");
        assert!(err.contains("write whole seconds"), "{err}");
    }

    #[test]
    fn zero_queue_is_rejected() {
        let err = Command::try_parse_from(["notifier", "--publish-queue", "0"])
            .err()
            .expect("zero is rejected")
            .to_string();
        assert!(err.contains("--publish-queue"), "{err}");
        assert!(err.contains("must be at least 1"), "{err}");
    }

    #[test]
    fn commit_concurrency_is_bounded() {
        for value in ["0", "17"] {
            let parsed = Command::try_parse_from(["notifier", "--commit-concurrency", value]);
            assert!(parsed.is_err(), "{value} was accepted");
        }
        let parsed = Command::try_parse_from(["notifier", "--commit-concurrency", "4"]).expect("4 parses");
        assert_eq!(parsed.config.commit_concurrency, 4);
    }
}
