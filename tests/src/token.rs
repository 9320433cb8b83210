//! Client tokens for the tests: valid ones signed with the deployment's secret, and forged ones.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header, encode};
use notify_proto::claims::Claims;

use crate::env::JWT_SECRET;

/// Current time in seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Signs claims with HS256 and `secret`.
///
/// # Panics
/// Panics when the secret is empty, which no test does.
pub fn sign(claims: &Claims, secret: &str) -> String {
    #[allow(clippy::expect_used)]
    let key = EncodingKey::from_secret(secret.as_bytes()).expect("secret is not empty");
    #[allow(clippy::expect_used)]
    encode(&Header::default(), claims, &key).expect("claims serialize")
}

/// Returns claims for `user` that expire in an hour and grant `channels`.
pub fn claims(user: &str, channels: &[&str]) -> Claims {
    Claims {
        sub: user.into(),
        exp: now() + 3600,
        iat: Some(now()),
        channels: channels.iter().map(|&channel| channel.to_owned()).collect(),
    }
}

/// A valid token for `user` granting `channels`.
pub fn valid(user: &str, channels: &[&str]) -> String {
    sign(&claims(user, channels), JWT_SECRET)
}

/// A token signed with another secret.
pub fn bad_signature(user: &str) -> String {
    sign(&claims(user, &[]), "not-the-deployment-secret-0123456789")
}

/// A token that expired a minute ago, beyond any reasonable leeway.
pub fn expired(user: &str) -> String {
    let mut claims = claims(user, &[]);
    claims.exp = now() - 60;
    sign(&claims, JWT_SECRET)
}

/// An unsigned token with header `{"alg":"none"}`.
pub fn alg_none(user: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64.encode(serde_json::to_vec(&claims(user, &[])).unwrap_or_default());
    format!("{header}.{payload}.")
}
