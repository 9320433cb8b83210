//! Developer commands: `publish` sends one event to a running notifier, `publish-batch` sends the
//! events of a JSON Lines file in `PublishBatch` calls, `token` mints a client JWT for the edge.

mod batch;

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::{EncodingKey, Header};
use notify_proto::claims::Claims;
use notify_proto::pb::PublishRequest;
use notify_proto::pb::notifier_client::NotifierClient;
use tonic::transport::Channel;

pub use self::batch::{PublishBatchArgs, parse_event_lines, publish_batch, utf8_text};

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
        // A metadata value may carry bytes above 0x7f, which the notifier cannot read as a key
        // and reports as a missing key, so they are rejected here.
        anyhow::ensure!(
            key.bytes().all(|byte| (b' '..=b'~').contains(&byte)),
            "the API key must be printable ASCII (NOTIFY_API_KEY); check that it was copied whole"
        );
        let value = format!("Bearer {key}")
            .parse()
            .context("the API key must be printable ASCII (NOTIFY_API_KEY)")?;
        request.metadata_mut().insert("authorization", value);
    }
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
    fn api_key_outside_ascii_is_rejected() {
        let mut request = tonic::Request::new(());
        let err = authorize(&mut request, Some("kéy")).expect_err("not ASCII");
        assert!(err.to_string().contains("printable ASCII"), "{err}");
        assert!(request.metadata().get("authorization").is_none());
        authorize(&mut request, Some("key-1")).expect("ASCII key");
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .and_then(|value| value.to_str().ok()),
            Some("Bearer key-1")
        );
    }
}
