//! Settings of the edge. Every setting is a flag and an environment variable of the same name;
//! `CONFIG.md` in this crate lists them all.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

pub use notify_proto::settings::{parse_duration, parse_positive};

use notify_proto::channel::DEFAULT_PARTITIONS;
use notify_proto::ratelimit::nonzero;

/// Default address of the HTTP and WebSocket listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default address of the listener that serves `/metrics`, apart from the public WebSocket port.
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9090";
/// Default clock skew allowed when checking a token's `exp`, `nbf` and `iat`.
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(5);
/// Default minimum time between two JWKS fetches caused by an unknown key id.
pub const DEFAULT_JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Default time between two background JWKS refreshes.
pub const DEFAULT_JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(600);
/// Default time before a token's expiry at which the socket gets a `token_expiring` frame.
pub const DEFAULT_TOKEN_EXPIRY_WARNING: Duration = Duration::from_secs(60);
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
/// Minimum of `SOCKET_QUEUE_FRAMES`: a subscribe burst's replies and a paced replay, which keeps
/// half of the queue for live frames, need a few frames of room.
pub const MIN_SOCKET_QUEUE_FRAMES: usize = 8;
/// Minimum of `SOCKET_QUEUE_BYTES`, 64 KiB, so that ordinary event and control frames fit.
pub const MIN_SOCKET_QUEUE_BYTES: usize = 64 * 1024;
/// Share of `MAX_SOCKETS` that sockets still waiting for their `auth` frame may take by default,
/// in percent.
pub const DEFAULT_UNAUTHENTICATED_SHARE_PERCENT: usize = 10;
/// Share of `MAX_SOCKETS` that connections still speaking HTTP (not yet upgraded) may take by
/// default on the HTTP and WebSocket port, in percent.
pub const DEFAULT_HTTP_CONNECTIONS_SHARE_PERCENT: usize = 10;
/// Smallest default of `MAX_HTTP_CONNECTIONS`, so that a small `MAX_SOCKETS` still leaves room
/// for handshakes next to the load balancer's health checks.
pub const MIN_DEFAULT_HTTP_CONNECTIONS: usize = 64;
/// Default maximum number of subscriptions per socket.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 100;
/// Default maximum number of open sockets of one user; more close with 4029 after authentication.
pub const DEFAULT_MAX_SOCKETS_PER_USER: usize = 20;
/// Default upgrades per second. An estimate, to be checked with the benchmark: at 2,000 per
/// second a storm of 10,000 reconnects is admitted within about 4 s, while each handshake (HTTP
/// parse, token check, `connected` frame) costs well under a millisecond of CPU.
pub const DEFAULT_HANDSHAKE_RATE: NonZeroU32 = nonzero(2000);
/// Default burst of upgrades above [`DEFAULT_HANDSHAKE_RATE`].
pub const DEFAULT_HANDSHAKE_BURST: NonZeroU32 = nonzero(2000);
/// Default client messages per second on one socket. A client sends subscribes, pings and token
/// refreshes, so this is far above normal use.
pub const DEFAULT_SOCKET_MESSAGE_RATE: NonZeroU32 = nonzero(20);
/// Default burst of one socket's messages, enough to subscribe to many channels after a reconnect.
pub const DEFAULT_SOCKET_MESSAGE_BURST: NonZeroU32 = nonzero(100);
/// Default client messages per second of one user over all its sockets.
pub const DEFAULT_USER_MESSAGE_RATE: NonZeroU32 = nonzero(50);
/// Default burst of one user's messages over all its sockets.
pub const DEFAULT_USER_MESSAGE_BURST: NonZeroU32 = nonzero(200);
/// Default maximum number of users with their own message bucket (about 100 bytes each).
pub const DEFAULT_RATE_LIMIT_KEYS: usize = 100_000;
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

    /// Address of the listener that serves the Prometheus metrics at `/metrics`.
    #[arg(long = "edge-metrics-listen", env = "EDGE_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,

    /// HMAC secret that client tokens are signed with. `JWT_SECRET`, `JWKS_URL` or both are
    /// required.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = notify_proto::settings::parse_non_empty)]
    pub jwt_secret: Option<String>,

    /// URL of the identity provider's JSON Web Key Set, for RS256 and ES256 tokens. Must be https,
    /// except for loopback hosts.
    #[arg(long, env = "JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Comma-separated token algorithms accepted (`HS256`, `RS256`, `ES256`, ...). Default: HS256
    /// with `JWT_SECRET`, RS256 and ES256 with `JWKS_URL`.
    #[arg(long, env = "JWT_ALGORITHMS", value_delimiter = ',', value_parser = parse_algorithm)]
    pub jwt_algorithms: Vec<jsonwebtoken::Algorithm>,

    /// Comma-separated accepted `iss` values. When set, tokens without a matching `iss` are rejected.
    #[arg(long, env = "JWT_ISSUER", value_delimiter = ',')]
    pub jwt_issuer: Vec<String>,

    /// Comma-separated accepted `aud` values. When set, tokens without a matching `aud` are
    /// rejected; when unset, tokens that carry `aud` are rejected.
    #[arg(long, env = "JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,

    /// Clock skew allowed on a token's `exp`, `nbf` and `iat`, as seconds or with a unit (`5s`).
    #[arg(long, env = "JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// Minimum time between two JWKS fetches caused by tokens with an unknown key id.
    #[arg(long, env = "JWKS_REFETCH_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub jwks_refetch_interval: Duration,

    /// Time between two background JWKS refreshes.
    #[arg(long, env = "JWKS_REFRESH_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub jwks_refresh_interval: Duration,

    /// Time before a token's expiry at which the socket gets a `token_expiring` frame.
    #[arg(long, env = "TOKEN_EXPIRY_WARNING", default_value = "60s", value_parser = parse_duration)]
    pub token_expiry_warning: Duration,

    /// Comma-separated origins (`https://app.example.com`) allowed to open a socket; `*` or
    /// empty allows every origin. Requests without an `Origin` header are always allowed.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Redis URL of the event stream. Required by the `ws-edge` binary; the single-process mode
    /// uses an in-process stream instead.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// URL of the notifier's gRPC API, used to fill stream gaps and recover clients.
    #[arg(long, env = "NOTIFIER_URL", default_value = DEFAULT_NOTIFIER_URL)]
    pub notifier_url: String,

    /// API key the edge presents to the notifier; its hash must be in the notifier's `EDGE_KEYS`.
    #[arg(long, env = "NOTIFIER_API_KEY", hide_env_values = true)]
    pub notifier_api_key: Option<String>,

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
    #[arg(long, env = "SOCKET_QUEUE_FRAMES", default_value_t = DEFAULT_SOCKET_QUEUE_FRAMES, value_parser = parse_queue_frames)]
    pub socket_queue_frames: usize,

    /// Capacity of each socket's outbound queue, in bytes; a full queue closes the socket with 4008.
    #[arg(long, env = "SOCKET_QUEUE_BYTES", default_value_t = DEFAULT_SOCKET_QUEUE_BYTES, value_parser = parse_queue_bytes)]
    pub socket_queue_bytes: usize,

    /// Maximum number of subscriptions per socket.
    #[arg(long, env = "MAX_SUBSCRIPTIONS", default_value_t = DEFAULT_MAX_SUBSCRIPTIONS, value_parser = parse_positive)]
    pub max_subscriptions: usize,

    /// Maximum number of open sockets; more upgrades get HTTP 503. Default: 90% of the open-files
    /// limit, after raising its soft value to the hard one.
    #[arg(long, env = "MAX_SOCKETS", value_parser = parse_positive)]
    pub max_sockets: Option<usize>,

    /// Maximum number of open sockets that wait for their `auth` frame (no token in the
    /// handshake); more such upgrades get HTTP 503. Default: 10% of `MAX_SOCKETS`, at least 1.
    #[arg(long, env = "MAX_UNAUTHENTICATED_SOCKETS", value_parser = parse_positive)]
    pub max_unauthenticated_sockets: Option<usize>,

    /// Maximum open connections on the HTTP and WebSocket port that are not WebSocket sockets
    /// yet: handshakes in progress and plain HTTP requests. More are closed at once, without a
    /// response. Default: 10% of `MAX_SOCKETS`, at least 64.
    #[arg(long, env = "MAX_HTTP_CONNECTIONS", value_parser = parse_positive)]
    pub max_http_connections: Option<usize>,

    /// Maximum number of open sockets of one user; more close with 4029 after authentication.
    #[arg(long, env = "MAX_SOCKETS_PER_USER", default_value_t = DEFAULT_MAX_SOCKETS_PER_USER, value_parser = parse_positive)]
    pub max_sockets_per_user: usize,

    /// WebSocket upgrades per second over the whole edge; more get HTTP 429 with `Retry-After`.
    #[arg(long, env = "HANDSHAKE_RATE", default_value_t = DEFAULT_HANDSHAKE_RATE)]
    pub handshake_rate: NonZeroU32,

    /// Upgrades admitted at once above `HANDSHAKE_RATE`.
    #[arg(long, env = "HANDSHAKE_BURST", default_value_t = DEFAULT_HANDSHAKE_BURST)]
    pub handshake_burst: NonZeroU32,

    /// Client messages per second on one socket; see `docs/limits.md` for what happens above it.
    #[arg(long, env = "SOCKET_MESSAGE_RATE", default_value_t = DEFAULT_SOCKET_MESSAGE_RATE)]
    pub socket_message_rate: NonZeroU32,

    /// Client messages one socket may send at once above `SOCKET_MESSAGE_RATE`.
    #[arg(long, env = "SOCKET_MESSAGE_BURST", default_value_t = DEFAULT_SOCKET_MESSAGE_BURST)]
    pub socket_message_burst: NonZeroU32,

    /// Client messages per second of one user (token `sub`) over all its sockets.
    #[arg(long, env = "USER_MESSAGE_RATE", default_value_t = DEFAULT_USER_MESSAGE_RATE)]
    pub user_message_rate: NonZeroU32,

    /// Client messages one user may send at once above `USER_MESSAGE_RATE`.
    #[arg(long, env = "USER_MESSAGE_BURST", default_value_t = DEFAULT_USER_MESSAGE_BURST)]
    pub user_message_burst: NonZeroU32,

    /// Maximum number of users with their own message bucket; past it, new users share one.
    #[arg(long, env = "RATE_LIMIT_KEYS", default_value_t = DEFAULT_RATE_LIMIT_KEYS, value_parser = parse_positive)]
    pub rate_limit_keys: usize,

    /// Comma-separated channel prefixes whose events are conflated by their data's `key` field
    /// in a busy socket's queue.
    #[arg(long, env = "CONFLATE_PREFIXES", value_delimiter = ',')]
    pub conflate_prefixes: Vec<String>,

    /// Adds the publish call's W3C trace id to event frames as `traceId`, so that a browser can
    /// report its receive latency in the publisher's trace.
    #[arg(long, env = "EVENT_TRACE_ID", default_value_t = false, action = clap::ArgAction::Set)]
    pub event_trace_id: bool,

    /// Maximum time the drain may take after a shutdown signal, as seconds or with a unit (`10s`).
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Shell command the demo page shows for publishing; `{channel}` is replaced with the channel.
    #[arg(long, env = "DEMO_PUBLISH_COMMAND", default_value = DEFAULT_DEMO_PUBLISH_COMMAND)]
    pub demo_publish_command: String,
}

/// Parses one algorithm name of `JWT_ALGORITHMS`. `none` is not an algorithm jsonwebtoken knows.
///
/// # Errors
/// Fails on an unknown name, listing the accepted ones.
pub fn parse_algorithm(value: &str) -> Result<jsonwebtoken::Algorithm, String> {
    value.trim().parse().map_err(|_| {
        format!("unknown algorithm {value:?}; use HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA")
    })
}

/// Parses `SOCKET_QUEUE_FRAMES`: a whole number of at least [`MIN_SOCKET_QUEUE_FRAMES`].
///
/// # Errors
/// Fails on a smaller number or text, naming the variable and the minimum.
pub fn parse_queue_frames(text: &str) -> Result<usize, String> {
    parse_at_least(text, "SOCKET_QUEUE_FRAMES", MIN_SOCKET_QUEUE_FRAMES)
}

/// Parses `SOCKET_QUEUE_BYTES`: a whole number of at least [`MIN_SOCKET_QUEUE_BYTES`].
///
/// # Errors
/// Fails on a smaller number or text, naming the variable and the minimum.
pub fn parse_queue_bytes(text: &str) -> Result<usize, String> {
    parse_at_least(text, "SOCKET_QUEUE_BYTES", MIN_SOCKET_QUEUE_BYTES)
}

fn parse_at_least(text: &str, variable: &str, min: usize) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(value) if value >= min => Ok(value),
        Ok(_) => Err(format!("{variable} must be at least {min}")),
        Err(err) => Err(format!("{err}; {variable} must be a whole number of at least {min}")),
    }
}

impl Config {
    /// Returns a configuration with every default and the given token secret, for tests and
    /// embedding.
    pub fn with_secret(jwt_secret: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            jwt_secret: Some(jwt_secret.into()),
            jwks_url: None,
            jwt_algorithms: Vec::new(),
            jwt_issuer: Vec::new(),
            jwt_audience: Vec::new(),
            jwt_leeway: DEFAULT_JWT_LEEWAY,
            jwks_refetch_interval: DEFAULT_JWKS_REFETCH_INTERVAL,
            jwks_refresh_interval: DEFAULT_JWKS_REFRESH_INTERVAL,
            token_expiry_warning: DEFAULT_TOKEN_EXPIRY_WARNING,
            allowed_origins: Vec::new(),
            redis_url: None,
            notifier_url: DEFAULT_NOTIFIER_URL.to_owned(),
            notifier_api_key: None,
            partitions: DEFAULT_PARTITIONS,
            stream_prefix: DEFAULT_STREAM_PREFIX.to_owned(),
            public_namespaces: Vec::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            socket_queue_frames: DEFAULT_SOCKET_QUEUE_FRAMES,
            socket_queue_bytes: DEFAULT_SOCKET_QUEUE_BYTES,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_sockets: None,
            max_unauthenticated_sockets: None,
            max_http_connections: None,
            max_sockets_per_user: DEFAULT_MAX_SOCKETS_PER_USER,
            handshake_rate: DEFAULT_HANDSHAKE_RATE,
            handshake_burst: DEFAULT_HANDSHAKE_BURST,
            socket_message_rate: DEFAULT_SOCKET_MESSAGE_RATE,
            socket_message_burst: DEFAULT_SOCKET_MESSAGE_BURST,
            user_message_rate: DEFAULT_USER_MESSAGE_RATE,
            user_message_burst: DEFAULT_USER_MESSAGE_BURST,
            rate_limit_keys: DEFAULT_RATE_LIMIT_KEYS,
            conflate_prefixes: Vec::new(),
            event_trace_id: false,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            demo_publish_command: DEFAULT_DEMO_PUBLISH_COMMAND.to_owned(),
        }
    }

    /// Builds the token verifier's settings, with the key set when `JWKS_URL` is set.
    ///
    /// # Errors
    /// Fails when `JWKS_URL` is invalid.
    pub fn verifier_settings(&self) -> anyhow::Result<crate::auth::VerifierSettings> {
        let trimmed = |values: &[String]| -> Vec<String> {
            values
                .iter()
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
                .collect()
        };
        let has_secret = self.jwt_secret.is_some();
        let has_jwks = self.jwks_url.is_some();
        let algorithms = match self.jwt_algorithms.is_empty() {
            true => crate::auth::default_algorithms(has_secret, has_jwks),
            false => self.jwt_algorithms.clone(),
        };
        let jwks = self.jwks_url.as_deref().map(|url| {
            let algorithms = algorithms.clone();
            crate::jwks::Jwks::new(url, algorithms, self.jwks_refetch_interval, self.jwks_refresh_interval)
        });
        Ok(crate::auth::VerifierSettings {
            secret: self.jwt_secret.clone(),
            jwks: jwks.transpose()?.map(std::sync::Arc::new),
            algorithms,
            issuers: trimmed(&self.jwt_issuer),
            audiences: trimmed(&self.jwt_audience),
            leeway: self.jwt_leeway,
        })
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
    fn missing_keys_name_both_variables() {
        let parsed = parse(&[]).expect("keys are checked when the verifier is built");
        let settings = parsed.verifier_settings().expect("no JWKS_URL to parse");
        let err = crate::auth::Verifier::with_settings(settings)
            .err()
            .map(|err| err.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("JWT_SECRET") && err.contains("JWKS_URL"), "{err}");
    }

    #[test]
    fn algorithms_parse_by_name() {
        let parsed = parse(&[
            "--jwks-url",
            "https://idp.example.com/jwks",
            "--jwt-algorithms",
            "RS256, ES256",
        ]);
        let parsed = parsed.expect("valid arguments");
        assert_eq!(
            parsed.jwt_algorithms,
            [jsonwebtoken::Algorithm::RS256, jsonwebtoken::Algorithm::ES256]
        );
        assert!(parse(&["--jwt-algorithms", "none"]).is_err());
        assert!(parse(&["--jwt-algorithms", "HS257"]).is_err());
    }

    #[test]
    fn small_queue_is_rejected() {
        let err = parse(&["--jwt-secret", "s", "--socket-queue-frames", "0"]).err();
        let message = err.map(|err| err.to_string()).unwrap_or_default();
        assert!(message.contains("SOCKET_QUEUE_FRAMES must be at least 8"), "{message}");
        let err = parse(&["--jwt-secret", "s", "--socket-queue-bytes", "10"]).err();
        let message = err.map(|err| err.to_string()).unwrap_or_default();
        assert!(
            message.contains("SOCKET_QUEUE_BYTES must be at least 65536"),
            "{message}"
        );
        let parsed = parse(&[
            "--jwt-secret",
            "s",
            "--socket-queue-frames",
            "8",
            "--socket-queue-bytes",
            "65536",
        ]);
        let parsed = parsed.expect("the minimums are accepted");
        assert_eq!((parsed.socket_queue_frames, parsed.socket_queue_bytes), (8, 65536));
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
