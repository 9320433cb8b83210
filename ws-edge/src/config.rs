//! Settings of the edge. Every setting is a flag and an environment variable of the same name;
//! `CONFIG.md` in this crate lists them all.

use std::net::SocketAddr;
use std::time::Duration;

pub use notify_proto::settings::{parse_duration, parse_positive};

use notify_proto::channel::DEFAULT_PARTITIONS;

/// Default address of the HTTP and WebSocket listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default clock skew allowed when checking a token's `exp`.
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(5);
/// Default address of the notifier's gRPC API, used for gap fill and recovery.
pub const DEFAULT_NOTIFIER_URL: &str = "http://127.0.0.1:50051";
/// Default prefix of the Redis stream keys.
pub const DEFAULT_STREAM_PREFIX: &str = "notify";
/// Default maximum size of a client frame and message, in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Default capacity of a socket's outbound queue, in frames.
pub const DEFAULT_SOCKET_QUEUE_FRAMES: usize = 256;
/// Default capacity of a socket's outbound queue, in bytes.
pub const DEFAULT_SOCKET_QUEUE_BYTES: usize = 1024 * 1024;
/// Default maximum number of subscriptions per socket.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 100;
/// Default time the edge waits for sockets to close on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default shell command the demo page shows for publishing to a channel. `{channel}` is
/// replaced with the channel name.
pub const DEFAULT_DEMO_PUBLISH_COMMAND: &str =
    r#"notifier publish --channel {channel} --type demo.message --data '{"text":"שלום, world"}'"#;

/// Settings of the edge, as clap arguments that another command can flatten into its own.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address the HTTP and WebSocket listener binds.
    #[arg(long = "edge-listen", env = "EDGE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// HS256 secret that client tokens are signed with.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,

    /// Clock skew allowed when checking a token's `exp`, as seconds or with a unit (`5s`).
    #[arg(long, env = "JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// Redis URL of the event stream. Required by the `ws-edge` binary; the single-process mode
    /// uses an in-process stream instead.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// URL of the notifier's gRPC API, used to fill stream gaps and recover clients.
    #[arg(long, env = "NOTIFIER_URL", default_value = DEFAULT_NOTIFIER_URL)]
    pub notifier_url: String,

    /// Number of stream partitions; must match the notifier's.
    #[arg(
        long = "stream-partitions",
        env = "STREAM_PARTITIONS",
        default_value_t = DEFAULT_PARTITIONS,
        value_parser = clap::value_parser!(u32).range(1..=4096),
    )]
    pub partitions: u32,

    /// Prefix of the Redis stream keys; must match the notifier's.
    #[arg(long, env = "STREAM_PREFIX", default_value = DEFAULT_STREAM_PREFIX)]
    pub stream_prefix: String,

    /// Comma-separated channel namespaces that any authenticated user may subscribe to.
    #[arg(long, env = "PUBLIC_NAMESPACES", value_delimiter = ',')]
    pub public_namespaces: Vec<String>,

    /// Maximum size of a client frame and message, in bytes; larger ones close the socket with 1009.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES, value_parser = parse_positive)]
    pub max_message_bytes: usize,

    /// Capacity of each socket's outbound queue, in frames; a full queue closes the socket with 4008.
    #[arg(long, env = "SOCKET_QUEUE_FRAMES", default_value_t = DEFAULT_SOCKET_QUEUE_FRAMES, value_parser = parse_positive)]
    pub socket_queue_frames: usize,

    /// Capacity of each socket's outbound queue, in bytes; a full queue closes the socket with 4008.
    #[arg(long, env = "SOCKET_QUEUE_BYTES", default_value_t = DEFAULT_SOCKET_QUEUE_BYTES, value_parser = parse_positive)]
    pub socket_queue_bytes: usize,

    /// Maximum number of subscriptions per socket.
    #[arg(long, env = "MAX_SUBSCRIPTIONS", default_value_t = DEFAULT_MAX_SUBSCRIPTIONS, value_parser = parse_positive)]
    pub max_subscriptions: usize,

    /// Maximum time the drain may take after a shutdown signal, as seconds or with a unit (`10s`).
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Shell command the demo page shows for publishing; `{channel}` is replaced with the channel.
    #[arg(long, env = "DEMO_PUBLISH_COMMAND", default_value = DEFAULT_DEMO_PUBLISH_COMMAND)]
    pub demo_publish_command: String,
}

impl Config {
    /// Returns a configuration with every default and the given token secret, for tests and
    /// embedding.
    pub fn with_secret(jwt_secret: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            jwt_secret: jwt_secret.into(),
            jwt_leeway: DEFAULT_JWT_LEEWAY,
            redis_url: None,
            notifier_url: DEFAULT_NOTIFIER_URL.to_owned(),
            partitions: DEFAULT_PARTITIONS,
            stream_prefix: DEFAULT_STREAM_PREFIX.to_owned(),
            public_namespaces: Vec::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            socket_queue_frames: DEFAULT_SOCKET_QUEUE_FRAMES,
            socket_queue_bytes: DEFAULT_SOCKET_QUEUE_BYTES,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            demo_publish_command: DEFAULT_DEMO_PUBLISH_COMMAND.to_owned(),
        }
    }

    /// Returns the public namespaces without surrounding spaces and empty entries.
    pub fn public_namespaces(&self) -> impl Iterator<Item = &str> {
        self.public_namespaces
            .iter()
            .map(|ns| ns.trim())
            .filter(|ns| !ns.is_empty())
    }
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

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let args = ["ws-edge"].iter().chain(args);
        Command::try_parse_from(args).map(|command| command.config)
    }

    #[test]
    fn defaults_match_with_secret() {
        let parsed = parse(&["--jwt-secret", "s"]).expect("valid arguments");
        let built = Config::with_secret("s");
        assert_eq!(format!("{parsed:?}"), format!("{built:?}"));
    }

    #[test]
    fn missing_secret_names_variable() {
        let err = parse(&[]).err().map(|err| err.to_string()).unwrap_or_default();
        assert!(err.contains("JWT_SECRET"), "{err}");
    }

    #[test]
    fn zero_queue_is_rejected() {
        let err = parse(&["--jwt-secret", "s", "--socket-queue-frames", "0"]).err();
        let message = err.map(|err| err.to_string()).unwrap_or_default();
        assert!(message.contains("SOCKET_QUEUE_FRAMES"), "{message}");
        assert!(message.contains("at least 1"), "{message}");
    }

    #[test]
    fn durations_take_seconds_or_units() {
        let parsed = parse(&["--jwt-secret", "s", "--jwt-leeway", "30", "--shutdown-grace", "1500ms"]);
        let parsed = parsed.expect("valid arguments");
        assert_eq!(parsed.jwt_leeway, Duration::from_secs(30));
        assert_eq!(parsed.shutdown_grace, Duration::from_millis(1500));
        assert!(parse(&["--jwt-secret", "s", "--jwt-leeway", "soon"]).is_err());
    }

    #[test]
    fn public_namespaces_split_on_commas() {
        let parsed = parse(&["--jwt-secret", "s", "--public-namespaces", "news, sports,"]).expect("valid arguments");
        assert_eq!(parsed.public_namespaces().collect::<Vec<_>>(), ["news", "sports"]);
    }
}
