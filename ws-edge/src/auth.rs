//! Client token verification and channel authorization.

use std::collections::HashSet;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use notify_proto::channel::{self, USER_NAMESPACE};
use notify_proto::claims::Claims;

/// Secrets shorter than this are accepted with a warning, because RFC 7518 (section 3.2) requires
/// an HS256 key at least as long as the hash output, 32 bytes.
const MIN_SECRET_BYTES: usize = 32;

/// Reason a token was rejected. The message is for logs; the client only gets close code 4002.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// `exp` is in the past, beyond the leeway.
    #[error("token expired")]
    Expired,
    /// The signature does not match, or the token is signed with another algorithm.
    #[error("invalid signature or algorithm")]
    BadSignature,
    /// The token is not a JWT, or its claims are missing or malformed.
    #[error("malformed token: {0}")]
    Malformed(String),
}

/// Verifies client tokens: HS256 only, with `exp` and a non-empty `sub` required.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// Builds a verifier from the shared secret and the clock skew allowed on `exp`.
    ///
    /// # Errors
    /// Fails when the secret is empty.
    pub fn new(secret: &str, leeway: Duration) -> anyhow::Result<Self> {
        let key = DecodingKey::from_secret(secret.as_bytes())
            .map_err(|err| anyhow::anyhow!("invalid JWT_SECRET: {err}; set it to a non-empty secret"))?;
        if secret.len() < MIN_SECRET_BYTES {
            tracing::warn!(
                bytes = secret.len(),
                min_bytes = MIN_SECRET_BYTES,
                "JWT_SECRET is shorter than recommended for HS256"
            );
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = leeway.as_secs();
        Ok(Self { key, validation })
    }

    /// Verifies a token and returns its claims.
    ///
    /// # Errors
    /// Fails when the signature, algorithm, expiry or claims are invalid.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(classify)?;
        if data.claims.sub.is_empty() {
            return Err(TokenError::Malformed("sub is empty".into()));
        }
        Ok(data.claims)
    }
}

fn classify(err: jsonwebtoken::errors::Error) -> TokenError {
    match err.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => TokenError::BadSignature,
        _ => TokenError::Malformed(err.to_string()),
    }
}

/// Reason a subscription was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The name breaks the channel grammar.
    #[error("invalid channel name: {0}")]
    Invalid(channel::NameError),
    /// The token does not allow the channel.
    #[error("the token does not allow channel {0:?}")]
    Forbidden(String),
}

/// Decides which channels a token may subscribe to. The rules, in order:
///
/// 1. `user:<id>` is allowed only when `<id>` is the token's `sub`, whatever else it grants.
/// 2. A channel without a namespace (no `:`) is public.
/// 3. A channel whose namespace is listed in `PUBLIC_NAMESPACES` is public.
/// 4. Any other channel needs a grant in the token's `channels` claim, by exact name or by a
///    prefix ending in `*` (see [`Claims::grants`]).
#[derive(Debug, Clone, Default)]
pub struct ChannelPolicy {
    public_namespaces: HashSet<String>,
}

impl ChannelPolicy {
    /// Builds a policy with the given public namespaces.
    pub fn new<'a>(public_namespaces: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            public_namespaces: public_namespaces.into_iter().map(str::to_owned).collect(),
        }
    }

    /// Checks that the channel is well formed and that `claims` allow it.
    ///
    /// # Errors
    /// Fails with [`ChannelError::Invalid`] or [`ChannelError::Forbidden`].
    pub fn authorize(&self, claims: &Claims, channel: &str) -> Result<(), ChannelError> {
        channel::validate_channel(channel).map_err(ChannelError::Invalid)?;
        let allowed = match channel::namespace(channel) {
            Some(USER_NAMESPACE) => channel[USER_NAMESPACE.len() + 1..] == claims.sub,
            None => true,
            Some(namespace) => self.public_namespaces.contains(namespace) || claims.grants(channel),
        };
        if allowed {
            Ok(())
        } else {
            Err(ChannelError::Forbidden(channel.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};

    use super::*;

    const SECRET: &str = "unit-test-secret-0123456789abcdefghij";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs())
    }

    fn claims(sub: &str, channels: &[&str]) -> Claims {
        Claims {
            sub: sub.into(),
            exp: now() + 600,
            iat: None,
            channels: channels.iter().map(|&grant| grant.to_owned()).collect(),
        }
    }

    fn sign_json(header: &Header, claims: &serde_json::Value, secret: &str) -> String {
        let key = EncodingKey::from_secret(secret.as_bytes()).expect("secret is not empty");
        jsonwebtoken::encode(header, claims, &key).expect("claims serialize")
    }

    fn sign(claims: &Claims) -> String {
        let value = serde_json::to_value(claims).expect("claims serialize");
        sign_json(&Header::default(), &value, SECRET)
    }

    fn verifier() -> Verifier {
        Verifier::new(SECRET, Duration::from_secs(5)).expect("secret is not empty")
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn valid_token_returns_claims() {
        let expected = claims("alice", &["orders:*"]);
        assert_eq!(verifier().verify(&sign(&expected)), Ok(expected));
    }

    #[test]
    fn expired_token_is_rejected() {
        let mut expired = claims("alice", &[]);
        expired.exp = now() - 60;
        assert_eq!(verifier().verify(&sign(&expired)), Err(TokenError::Expired));
    }

    #[test]
    fn leeway_accepts_recent_expiry() {
        let mut recent = claims("alice", &[]);
        recent.exp = now() - 1;
        assert!(verifier().verify(&sign(&recent)).is_ok());
    }

    #[test]
    fn bad_signature_is_rejected() {
        let value = serde_json::to_value(claims("alice", &[])).expect("claims serialize");
        let token = sign_json(&Header::default(), &value, "another-secret-0123456789abcdefghij");
        assert_eq!(verifier().verify(&token), Err(TokenError::BadSignature));
    }

    #[test]
    fn alg_none_is_rejected() {
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64(&serde_json::to_vec(&claims("alice", &[])).expect("claims serialize"));
        let result = verifier().verify(&format!("{header}.{payload}."));
        assert!(matches!(result, Err(TokenError::Malformed(_))), "{result:?}");
    }

    #[test]
    fn wrong_algorithm_is_rejected() {
        let value = serde_json::to_value(claims("alice", &[])).expect("claims serialize");
        let token = sign_json(&Header::new(Algorithm::HS512), &value, SECRET);
        assert_eq!(verifier().verify(&token), Err(TokenError::BadSignature));
    }

    #[test]
    fn missing_sub_is_rejected() {
        let token = sign_json(&Header::default(), &serde_json::json!({ "exp": now() + 600 }), SECRET);
        assert!(matches!(verifier().verify(&token), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn empty_sub_is_rejected() {
        let token = sign(&claims("", &[]));
        assert!(matches!(verifier().verify(&token), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn missing_exp_is_rejected() {
        let token = sign_json(&Header::default(), &serde_json::json!({ "sub": "alice" }), SECRET);
        assert!(matches!(verifier().verify(&token), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn malformed_token_is_rejected() {
        assert!(matches!(verifier().verify("not.a.jwt"), Err(TokenError::Malformed(_))));
        assert!(matches!(verifier().verify(""), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn empty_secret_is_rejected() {
        assert!(Verifier::new("", Duration::ZERO).is_err());
    }

    #[test]
    fn user_channel_only_for_its_user() {
        let policy = ChannelPolicy::default();
        let alice = claims("alice", &["user:*"]);
        assert_eq!(policy.authorize(&alice, "user:alice"), Ok(()));
        assert_eq!(
            policy.authorize(&alice, "user:bob"),
            Err(ChannelError::Forbidden("user:bob".into()))
        );
        assert!(policy.authorize(&alice, "user:alice2").is_err());
        assert!(policy.authorize(&alice, "user:").is_err());
    }

    #[test]
    fn channel_without_namespace_is_public() {
        assert_eq!(ChannelPolicy::default().authorize(&claims("a", &[]), "news"), Ok(()));
    }

    #[test]
    fn public_namespace_needs_no_grant() {
        let policy = ChannelPolicy::new(["sports"]);
        assert_eq!(policy.authorize(&claims("a", &[]), "sports:eu"), Ok(()));
        assert!(policy.authorize(&claims("a", &[]), "orders:eu").is_err());
    }

    #[test]
    fn other_namespaces_need_a_grant() {
        let policy = ChannelPolicy::default();
        assert_eq!(policy.authorize(&claims("a", &["orders:*"]), "orders:eu"), Ok(()));
        assert_eq!(policy.authorize(&claims("a", &["team:1"]), "team:1"), Ok(()));
        assert!(policy.authorize(&claims("a", &["team:1"]), "team:2").is_err());
    }

    #[test]
    fn invalid_channel_is_rejected() {
        let result = ChannelPolicy::default().authorize(&claims("a", &[]), "a b");
        assert!(matches!(result, Err(ChannelError::Invalid(_))), "{result:?}");
    }
}
