//! Developer commands: `publish` sends one event to a running notifier, `publish-batch` sends the
//! events of a JSON Lines file in `PublishBatch` calls, `token` mints a client JWT for the edge.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::{EncodingKey, Header};
use notify_proto::claims::Claims;
use notify_proto::pb::notifier_client::NotifierClient;
use notify_proto::pb::{PublishBatchRequest, PublishRequest, publish_result};
use serde_json::value::RawValue;
use tonic::transport::Channel;

/// Default address of the notifier the `publish` command calls.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// Default lifetime of a minted token, in seconds.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;

/// Arguments of `notifier publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// gRPC address of the notifier.
    #[arg(long, env = "NOTIFIER_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Channel to publish to.
    #[arg(long)]
    pub channel: String,
    /// Event type.
    #[arg(long = "type")]
    pub event_type: String,
    /// JSON payload.
    #[arg(long)]
    pub data: String,
    /// Deliver only to this user's sockets.
    #[arg(long)]
    pub user_id: Option<String>,
    /// Idempotency key: a retry with the same key returns the first event.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// API key, sent as `authorization: Bearer <key>`; needed when the notifier has
    /// `PUBLISHER_KEYS`.
    #[arg(long, env = "NOTIFY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Calls Publish and prints the response as `{"id":…,"position":…,"duplicate":…}`.
///
/// # Errors
/// Fails when the notifier is unreachable or rejects the event; the message carries the gRPC
/// status code and the notifier's explanation.
pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.addr).await?;
    let mut request = tonic::Request::new(PublishRequest {
        channel: args.channel,
        r#type: args.event_type,
        data: args.data,
        user_id: args.user_id.unwrap_or_default(),
        idempotency_key: args.idempotency_key.unwrap_or_default(),
    });
    authorize(&mut request, args.api_key.as_deref())?;
    let response = match client.publish(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => anyhow::bail!("publish failed: {:?}: {}", status.code(), status.message()),
    };
    let output = serde_json::json!({
        "id": response.id,
        "position": response.position,
        "duplicate": response.duplicate,
    });
    println!("{output}");
    Ok(())
}

async fn connect(addr: &str) -> anyhow::Result<NotifierClient<Channel>> {
    NotifierClient::connect(addr.to_owned())
        .await
        .with_context(|| format!("connect to the notifier at {addr}"))
}

/// Adds `authorization: Bearer <key>` to a request when an API key is given.
fn authorize<T>(request: &mut tonic::Request<T>, api_key: Option<&str>) -> anyhow::Result<()> {
    if let Some(key) = api_key {
        let value = format!("Bearer {key}")
            .parse()
            .context("the API key must be printable ASCII (NOTIFY_API_KEY)")?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(())
}

/// Arguments of `notifier publish-batch`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishBatchArgs {
    /// gRPC address of the notifier.
    #[arg(long, env = "NOTIFIER_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// JSON Lines file of events, one object per line with `channel`, `type`, `data` (any JSON
    /// value, sent byte for byte) and optionally `user_id` and `idempotency_key`. `-` reads
    /// standard input.
    #[arg(long, default_value = "-")]
    pub file: String,
    /// API key, sent as `authorization: Bearer <key>`; needed when the notifier has
    /// `PUBLISHER_KEYS`.
    #[arg(long, env = "NOTIFY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// One line of a `publish-batch` input file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine<'a> {
    channel: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    idempotency_key: String,
}

/// Reads every event of a JSON Lines text, skipping blank lines, and returns each with its line
/// number.
///
/// # Errors
/// Names the first line that is not an event object, and why.
pub fn parse_event_lines(text: &str) -> anyhow::Result<Vec<(usize, PublishRequest)>> {
    let mut events = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let number = index + 1;
        let event: EventLine<'_> = serde_json::from_str(line).with_context(|| {
            format!(
                "line {number} is not an event: write one JSON object per line with channel, type, data and \
                 optionally user_id and idempotency_key"
            )
        })?;
        let request = PublishRequest {
            channel: event.channel,
            r#type: event.event_type,
            data: event.data.get().to_owned(),
            user_id: event.user_id,
            idempotency_key: event.idempotency_key,
        };
        events.push((number, request));
    }
    Ok(events)
}

/// Reads the events of `args.file`, sends them in `PublishBatch` calls of at most
/// `MAX_BATCH_EVENTS`, in file order, and prints one line per event:
/// `{"line":…,"id":…,"position":…,"duplicate":…}`, or `{"line":…,"code":…,"message":…}` for an
/// event that was not published.
///
/// # Errors
/// Fails before sending anything when a line is not an event, and after sending everything when
/// a call failed or an event was not published.
pub async fn publish_batch(args: PublishBatchArgs) -> anyhow::Result<()> {
    let text = if args.file == "-" {
        std::io::read_to_string(std::io::stdin()).context("read the events from standard input")?
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("read the events from {}", args.file))?
    };
    let events = parse_event_lines(&text)?;
    anyhow::ensure!(
        !events.is_empty(),
        "{} contains no events; write one JSON object per line",
        args.file
    );
    let mut client = connect(&args.addr).await?;
    let mut failed = 0;
    for chunk in events.chunks(crate::service::MAX_BATCH_EVENTS) {
        let lines: Vec<usize> = chunk.iter().map(|(line, _)| *line).collect();
        let batch = chunk.iter().map(|(_, event)| event.clone()).collect();
        let mut request = tonic::Request::new(PublishBatchRequest { events: batch });
        authorize(&mut request, args.api_key.as_deref())?;
        let results = match client.publish_batch(request).await {
            Ok(response) => response.into_inner().results,
            Err(status) => anyhow::bail!(
                "publish-batch failed at line {}: {:?}: {}; the events before that line were sent",
                lines[0],
                status.code(),
                status.message()
            ),
        };
        for (line, result) in lines.into_iter().zip(results) {
            let output = match result.outcome {
                Some(publish_result::Outcome::Published(response)) => serde_json::json!({
                    "line": line,
                    "id": response.id,
                    "position": response.position,
                    "duplicate": response.duplicate,
                }),
                Some(publish_result::Outcome::Error(error)) => {
                    failed += 1;
                    let code = tonic::Code::from_i32(error.code);
                    serde_json::json!({"line": line, "code": format!("{code:?}"), "message": error.message})
                }
                None => {
                    failed += 1;
                    serde_json::json!({"line": line, "code": "Unknown", "message": "the notifier returned no outcome"})
                }
            };
            println!("{output}");
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} events were not published", events.len());
    Ok(())
}

/// Arguments of `notifier hash-key`.
#[derive(Debug, Clone, clap::Args)]
pub struct HashKeyArgs {
    /// The API key. Without it, the first line of standard input is read, which keeps the key
    /// out of the shell history.
    pub key: Option<String>,
}

/// Returns the SHA-256 hash (hex) of an API key, the form `PUBLISHER_KEYS` and `EDGE_KEYS` take.
///
/// # Errors
/// Fails when standard input cannot be read or the key is empty.
pub fn hash_key(args: HashKeyArgs) -> anyhow::Result<String> {
    let key = match args.key {
        Some(key) => key,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("read the key from standard input")?;
            line
        }
    };
    let key = key.trim();
    anyhow::ensure!(!key.is_empty(), "the API key is empty");
    Ok(crate::apikey::hex(&crate::apikey::hash_key(key)))
}

/// Arguments of `notifier token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// User id, the token's `sub` claim.
    #[arg(long)]
    pub user: String,
    /// Lifetime of the token in seconds.
    #[arg(long, default_value_t = DEFAULT_TOKEN_TTL_SECS)]
    pub ttl: u64,
    /// Channel or `prefix*` the token grants; repeat for several.
    #[arg(long = "channel")]
    pub channels: Vec<String>,
    /// HS256 secret shared with the edge.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = notify_proto::settings::parse_non_empty)]
    pub secret: String,
}

/// Mints an HS256 client token with the given claims, issued now.
///
/// # Errors
/// Fails when the secret is empty or the system clock is before 1970.
pub fn token(args: TokenArgs) -> anyhow::Result<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs();
    let claims = Claims {
        sub: args.user,
        exp: now.saturating_add(args.ttl),
        iat: Some(now),
        channels: args.channels,
    };
    let key = EncodingKey::from_secret(args.secret.as_bytes()).context("invalid JWT_SECRET; set a non-empty secret")?;
    jsonwebtoken::encode(&Header::default(), &claims, &key).context("sign the token")
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation};

    use super::*;

    #[test]
    fn token_carries_claims() {
        let args = TokenArgs {
            user: "u42".into(),
            ttl: 60,
            channels: vec!["news".into(), "orders:*".into()],
            secret: "s3cret".into(),
        };
        let token = token(args).expect("minted");
        let key = DecodingKey::from_secret(b"s3cret").expect("key");
        let claims = jsonwebtoken::decode::<Claims>(&token, &key, &Validation::default())
            .expect("valid token")
            .claims;
        assert_eq!(claims.sub, "u42");
        assert_eq!(claims.channels, vec!["news".to_owned(), "orders:*".to_owned()]);
        let iat = claims.iat.expect("iat set");
        assert_eq!(claims.exp, iat + 60);
    }

    #[test]
    fn hash_key_prints_sha256_hex() {
        let hash = hash_key(HashKeyArgs {
            key: Some(" abc\n".into()),
        })
        .expect("hashed");
        assert_eq!(hash, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(hash_key(HashKeyArgs { key: Some(" ".into()) }).is_err());
    }

    #[test]
    fn empty_secret_is_rejected() {
        let args = TokenArgs {
            user: "u".into(),
            ttl: 60,
            channels: Vec::new(),
            secret: String::new(),
        };
        let err = token(args).expect_err("empty secret");
        assert!(err.to_string().contains("JWT_SECRET"), "{err}");
    }

    #[test]
    fn event_lines_keep_data_bytes() {
        let text = concat!(
            r#"{"channel":"news","type":"post.created","data":{ "title" : "שלום, עולם" }}"#,
            "\n\n",
            r#"{"channel":"user:7","type":"notice","data":[1, 2],"user_id":"7","idempotency_key":"k-2"}"#,
            "\n",
        );
        let events = parse_event_lines(text).expect("valid lines");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].0, 1);
        assert_eq!(events[0].1.data, r#"{ "title" : "שלום, עולם" }"#);
        assert_eq!(events[1].0, 3);
        assert_eq!(events[1].1.data, "[1, 2]");
        assert_eq!(events[1].1.user_id, "7");
        assert_eq!(events[1].1.idempotency_key, "k-2");
    }

    #[test]
    fn bad_event_line_is_named() {
        let text = "{\"channel\":\"news\",\"type\":\"a\",\"data\":1}\n{\"channel\":\"news\",\"data\":1}\n";
        let err = parse_event_lines(text).expect_err("second line has no type");
        let message = format!("{err:#}");
        assert!(message.starts_with("line 2 is not an event"), "{message}");
        assert!(message.contains("missing field `type`"), "{message}");
    }
}
