//! Client token verification and channel authorization.
//!
//! A token is checked in this order, and each step fails closed:
//! 1. Its header parses, names an algorithm from `JWT_ALGORITHMS`, and carries no key of its own
//!    (`jwk`, `jku`, `x5u`, `x5c`): keys come from the configuration only.
//! 2. HMAC algorithms verify with `JWT_SECRET` only; the others with the JWKS key named by `kid`.
//! 3. jsonwebtoken checks the signature, `exp` and `nbf` (with the leeway), `iss` and `aud`.
//! 4. This module checks what jsonwebtoken 12.0.0 does not: `iat` in the future beyond the
//!    leeway, and an empty `sub`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Header, Validation};
use notify_proto::channel::{self, USER_NAMESPACE};
use notify_proto::claims::Claims;

use crate::jwks::Jwks;

/// Secrets shorter than this are accepted with a warning, because RFC 7518 (section 3.2) requires
/// an HS256 key at least as long as the hash output, 32 bytes.
const MIN_SECRET_BYTES: usize = 32;
/// Maximum token length in bytes; longer tokens are rejected before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Maximum `JWT_LEEWAY`.
pub const MAX_LEEWAY: Duration = Duration::from_secs(3600);
/// Maximum time between now and a token's `exp`, 365 days. A token whose `exp` lies further
/// ahead is rejected, which also keeps `expiresAt` far below 2^53, the largest integer a
/// JavaScript client represents exactly.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Reason a token was rejected. The message is for logs; the client only gets close code 4002.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// `exp` is in the past, beyond the leeway.
    #[error("token expired")]
    Expired,
    /// The signature does not match, or the algorithm is not one of `JWT_ALGORITHMS`.
    #[error("invalid signature or algorithm")]
    BadSignature,
    /// The token's `kid` is not in the key set, even after a refetch.
    #[error("unknown key id")]
    UnknownKey,
    /// A claim has the wrong value: `iss`, `aud`, or a `nbf` or `iat` in the future.
    #[error("invalid claim: {0}")]
    InvalidClaim(&'static str),
    /// The token is not a JWT, its header carries a key, or its claims are missing or malformed.
    #[error("malformed token: {0}")]
    Malformed(String),
}

/// Sources of the verification keys, and the claim values required.
#[derive(Clone, Default)]
pub struct VerifierSettings {
    /// HMAC secret (`JWT_SECRET`).
    pub secret: Option<String>,
    /// The identity provider's key set (`JWKS_URL`).
    pub jwks: Option<Arc<Jwks>>,
    /// Accepted algorithms; empty picks the default for the configured keys.
    pub algorithms: Vec<Algorithm>,
    /// Accepted `iss` values; when not empty, `iss` is required.
    pub issuers: Vec<String>,
    /// Accepted `aud` values; when not empty, `aud` is required. When empty, a token that
    /// carries `aud` is rejected, because no audience is known to match it.
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

/// Returns the algorithms accepted when `JWT_ALGORITHMS` is empty: HS256 with a secret, RS256
/// and ES256 with a key set.
pub fn default_algorithms(has_secret: bool, has_jwks: bool) -> Vec<Algorithm> {
    let mut algorithms = Vec::new();
    if has_secret {
        algorithms.push(Algorithm::HS256);
    }
    if has_jwks {
        algorithms.extend([Algorithm::RS256, Algorithm::ES256]);
    }
    algorithms
}

/// Verifies client tokens with the configured keys and algorithms.
pub struct Verifier {
    secret: Option<DecodingKey>,
    jwks: Option<Arc<Jwks>>,
    /// One validation per accepted algorithm: jsonwebtoken requires every algorithm of a
    /// validation to match the key's family.
    validations: HashMap<Algorithm, Validation>,
    leeway: u64,
}

impl Verifier {
    /// Builds an HS256-only verifier from the shared secret and the clock skew allowed.
    ///
    /// # Errors
    /// Fails when the secret is empty.
    pub fn new(secret: &str, leeway: Duration) -> anyhow::Result<Self> {
        Self::with_settings(VerifierSettings {
            secret: Some(secret.to_owned()),
            leeway,
            ..VerifierSettings::default()
        })
    }

    /// Builds a verifier from its settings.
    ///
    /// # Errors
    /// Fails when neither a secret nor a key set is configured, when an algorithm has no key of
    /// its family, or when the secret is empty. The message names the variable.
    pub fn with_settings(settings: VerifierSettings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            settings.secret.is_some() || settings.jwks.is_some(),
            "no token verification key: set JWT_SECRET, JWKS_URL or both"
        );
        anyhow::ensure!(
            settings.leeway <= MAX_LEEWAY,
            "JWT_LEEWAY must be at most {}s",
            MAX_LEEWAY.as_secs()
        );
        let secret = settings.secret.as_deref().map(secret_key).transpose()?;
        let mut algorithms = settings.algorithms.clone();
        if algorithms.is_empty() {
            algorithms = default_algorithms(secret.is_some(), settings.jwks.is_some());
        }
        for algorithm in &algorithms {
            let is_hmac = algorithm.family() == AlgorithmFamily::Hmac;
            if is_hmac && secret.is_none() {
                anyhow::bail!("JWT_ALGORITHMS lists {algorithm:?}, which needs JWT_SECRET");
            }
            if !is_hmac && settings.jwks.is_none() {
                anyhow::bail!("JWT_ALGORITHMS lists {algorithm:?}, which needs JWKS_URL");
            }
        }
        let validations = algorithms
            .iter()
            .map(|&algorithm| (algorithm, validation(algorithm, &settings)))
            .collect();
        Ok(Self {
            secret,
            jwks: settings.jwks,
            validations,
            leeway: settings.leeway.as_secs(),
        })
    }

    /// Returns the key set, when one is configured.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Verifies a token and returns its claims. May fetch the key set once for an unknown `kid`.
    ///
    /// # Errors
    /// Fails when the header, key, signature, algorithm, times or claims are invalid.
    pub async fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!("longer than {MAX_TOKEN_BYTES} bytes")));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|err| TokenError::Malformed(err.to_string()))?;
        check_header(&header)?;
        let validation = self.validations.get(&header.alg).ok_or(TokenError::BadSignature)?;
        let key = self.key_for(&header).await?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, validation).map_err(classify)?;
        self.check_claims(&data.claims)?;
        Ok(data.claims)
    }

    /// Returns the key that verifies a token with this header.
    async fn key_for(&self, header: &Header) -> Result<DecodingKey, TokenError> {
        if header.alg.family() == AlgorithmFamily::Hmac {
            return self.secret.clone().ok_or(TokenError::BadSignature);
        }
        let jwks = self.jwks.as_ref().ok_or(TokenError::BadSignature)?;
        let kid = header
            .kid
            .as_deref()
            .ok_or_else(|| TokenError::Malformed("no kid in the header".into()))?;
        let found = jwks.key(kid).await.ok_or(TokenError::UnknownKey)?;
        // A key verifies only the algorithm the set assigned to it.
        if found.algorithm != header.alg {
            return Err(TokenError::BadSignature);
        }
        Ok(found.key)
    }

    /// Checks what jsonwebtoken leaves out: an `iat` in the future, an `exp` more than
    /// [`MAX_TOKEN_LIFETIME`] ahead and an empty `sub`.
    fn check_claims(&self, claims: &Claims) -> Result<(), TokenError> {
        if claims.sub.is_empty() {
            return Err(TokenError::Malformed("sub is empty".into()));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if claims.iat.is_some_and(|iat| iat > now.saturating_add(self.leeway)) {
            return Err(TokenError::InvalidClaim("iat is in the future"));
        }
        if claims.exp > now.saturating_add(MAX_TOKEN_LIFETIME.as_secs()) {
            return Err(TokenError::InvalidClaim("exp is more than 365 days ahead"));
        }
        Ok(())
    }
}

fn secret_key(secret: &str) -> anyhow::Result<DecodingKey> {
    let key = DecodingKey::from_secret(secret.as_bytes())
        .map_err(|err| anyhow::anyhow!("invalid JWT_SECRET: {err}; set it to a non-empty secret"))?;
    if secret.len() < MIN_SECRET_BYTES {
        tracing::warn!(
            bytes = secret.len(),
            min_bytes = MIN_SECRET_BYTES,
            "JWT_SECRET is shorter than recommended for HS256"
        );
    }
    Ok(key)
}

fn validation(algorithm: Algorithm, settings: &VerifierSettings) -> Validation {
    let mut validation = Validation::new(algorithm);
    let mut required = vec!["exp", "sub"];
    validation.leeway = settings.leeway.as_secs();
    validation.validate_nbf = true;
    if !settings.issuers.is_empty() {
        validation.set_issuer(&settings.issuers);
        required.push("iss");
    }
    if !settings.audiences.is_empty() {
        validation.set_audience(&settings.audiences);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Rejects a header that carries or points to a key: only configured keys verify tokens.
fn check_header(header: &Header) -> Result<(), TokenError> {
    let embedded = [
        ("jwk", header.jwk.is_some()),
        ("jku", header.jku.is_some()),
        ("x5u", header.x5u.is_some()),
        ("x5c", header.x5c.is_some()),
    ];
    match embedded.iter().find(|(_, present)| *present) {
        Some((name, _)) => Err(TokenError::Malformed(format!("the header carries a key ({name})"))),
        None => Ok(()),
    }
}

fn classify(err: jsonwebtoken::errors::Error) -> TokenError {
    match err.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
            TokenError::BadSignature
        }
        ErrorKind::ImmatureSignature => TokenError::InvalidClaim("nbf is in the future"),
        ErrorKind::InvalidIssuer => TokenError::InvalidClaim("iss"),
        ErrorKind::InvalidAudience => TokenError::InvalidClaim("aud"),
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

    #[tokio::test]
    async fn valid_token_returns_claims() {
        let expected = claims("alice", &["orders:*"]);
        assert_eq!(verifier().verify(&sign(&expected)).await, Ok(expected));
    }

    #[tokio::test]
    async fn expired_token_is_rejected() {
        let mut expired = claims("alice", &[]);
        expired.exp = now() - 60;
        assert_eq!(verifier().verify(&sign(&expired)).await, Err(TokenError::Expired));
    }

    #[tokio::test]
    async fn leeway_accepts_recent_expiry() {
        let mut recent = claims("alice", &[]);
        recent.exp = now() - 1;
        assert!(verifier().verify(&sign(&recent)).await.is_ok());
    }

    #[tokio::test]
    async fn far_expiry_is_rejected() {
        let lifetime = MAX_TOKEN_LIFETIME.as_secs();
        let mut within = claims("alice", &[]);
        within.exp = now() + lifetime - 60;
        assert_eq!(verifier().verify(&sign(&within)).await, Ok(within.clone()));
        for exp in [now() + lifetime + 60, 1 << 53, u64::MAX] {
            let far = Claims { exp, ..within.clone() };
            assert_eq!(
                verifier().verify(&sign(&far)).await,
                Err(TokenError::InvalidClaim("exp is more than 365 days ahead")),
                "exp {exp}"
            );
        }
    }

    #[tokio::test]
    async fn bad_signature_is_rejected() {
        let value = serde_json::to_value(claims("alice", &[])).expect("claims serialize");
        let token = sign_json(&Header::default(), &value, "another-secret-0123456789abcdefghij");
        assert_eq!(verifier().verify(&token).await, Err(TokenError::BadSignature));
    }

    #[tokio::test]
    async fn alg_none_is_rejected() {
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64(&serde_json::to_vec(&claims("alice", &[])).expect("claims serialize"));
        let result = verifier().verify(&format!("{header}.{payload}.")).await;
        assert!(matches!(result, Err(TokenError::Malformed(_))), "{result:?}");
    }

    #[tokio::test]
    async fn wrong_algorithm_is_rejected() {
        let value = serde_json::to_value(claims("alice", &[])).expect("claims serialize");
        let token = sign_json(&Header::new(Algorithm::HS512), &value, SECRET);
        assert_eq!(verifier().verify(&token).await, Err(TokenError::BadSignature));
    }

    #[tokio::test]
    async fn missing_sub_is_rejected() {
        let token = sign_json(&Header::default(), &serde_json::json!({ "exp": now() + 600 }), SECRET);
        assert!(matches!(verifier().verify(&token).await, Err(TokenError::Malformed(_))));
    }

    #[tokio::test]
    async fn empty_sub_is_rejected() {
        let token = sign(&claims("", &[]));
        assert!(matches!(verifier().verify(&token).await, Err(TokenError::Malformed(_))));
    }

    #[tokio::test]
    async fn missing_exp_is_rejected() {
        let token = sign_json(&Header::default(), &serde_json::json!({ "sub": "alice" }), SECRET);
        assert!(matches!(verifier().verify(&token).await, Err(TokenError::Malformed(_))));
    }

    #[tokio::test]
    async fn malformed_token_is_rejected() {
        assert!(matches!(
            verifier().verify("not.a.jwt").await,
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(verifier().verify("").await, Err(TokenError::Malformed(_))));
    }

    fn sign_value(claims: serde_json::Value) -> String {
        sign_json(&Header::default(), &claims, SECRET)
    }

    fn verifier_with(issuers: &[&str], audiences: &[&str]) -> Verifier {
        Verifier::with_settings(VerifierSettings {
            secret: Some(SECRET.into()),
            issuers: issuers.iter().map(|&issuer| issuer.to_owned()).collect(),
            audiences: audiences.iter().map(|&audience| audience.to_owned()).collect(),
            leeway: Duration::from_secs(5),
            ..VerifierSettings::default()
        })
        .expect("valid settings")
    }

    #[tokio::test]
    async fn header_keys_are_rejected() {
        let value = serde_json::to_value(claims("alice", &[])).expect("claims serialize");
        let jwk = serde_json::json!({"kty": "oct", "k": b64(SECRET.as_bytes())});
        let fields = [
            ("jwk", jwk),
            ("jku", serde_json::json!("https://attacker.test/jwks")),
            ("x5u", serde_json::json!("https://attacker.test/cert")),
            ("x5c", serde_json::json!(["MIIB"])),
        ];
        for (field, field_value) in fields {
            let mut header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
            header[field] = field_value;
            let header = b64(header.to_string().as_bytes());
            let payload = b64(value.to_string().as_bytes());
            let signing_input = format!("{header}.{payload}");
            let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("secret is not empty");
            let signature =
                jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, Algorithm::HS256).expect("signs");
            let result = verifier().verify(&format!("{signing_input}.{signature}")).await;
            assert!(matches!(result, Err(TokenError::Malformed(_))), "{field}: {result:?}");
        }
    }

    #[tokio::test]
    async fn flipped_signature_byte_is_rejected() {
        let token = sign(&claims("alice", &[]));
        let (signing_input, signature) = token.rsplit_once('.').expect("three parts");
        let mut bytes = signature.as_bytes().to_vec();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        let forged = format!("{signing_input}.{}", String::from_utf8(bytes).expect("ascii"));
        assert_eq!(verifier().verify(&forged).await, Err(TokenError::BadSignature));
    }

    #[tokio::test]
    async fn future_iat_and_nbf_are_rejected() {
        let late = now() + 60;
        let iat = sign_value(serde_json::json!({"sub": "a", "exp": now() + 600, "iat": late}));
        assert_eq!(
            verifier().verify(&iat).await,
            Err(TokenError::InvalidClaim("iat is in the future"))
        );
        let nbf = sign_value(serde_json::json!({"sub": "a", "exp": now() + 600, "nbf": late}));
        assert_eq!(
            verifier().verify(&nbf).await,
            Err(TokenError::InvalidClaim("nbf is in the future"))
        );
        let within_leeway =
            sign_value(serde_json::json!({"sub": "a", "exp": now() + 600, "iat": now() + 2, "nbf": now() + 2}));
        assert!(verifier().verify(&within_leeway).await.is_ok());
    }

    #[tokio::test]
    async fn claims_of_the_wrong_type_are_rejected() {
        let cases = [
            serde_json::json!({"sub": "a", "exp": (now() + 600).to_string()}),
            serde_json::json!({"sub": 42, "exp": now() + 600}),
            serde_json::json!({"sub": "a", "exp": now() + 600, "iat": "yesterday"}),
            serde_json::json!({"sub": "a", "exp": now() + 600, "nbf": "now"}),
            serde_json::json!({"sub": "a", "exp": now() + 600, "channels": "news"}),
        ];
        for case in cases {
            let result = verifier().verify(&sign_value(case.clone())).await;
            assert!(matches!(result, Err(TokenError::Malformed(_))), "{case}: {result:?}");
        }
    }

    #[tokio::test]
    async fn configured_issuer_is_required() {
        let verifier = verifier_with(&["https://idp.example.com/"], &[]);
        let exp = now() + 600;
        let right = sign_value(serde_json::json!({"sub": "a", "exp": exp, "iss": "https://idp.example.com/"}));
        assert!(verifier.verify(&right).await.is_ok());
        let wrong = sign_value(serde_json::json!({"sub": "a", "exp": exp, "iss": "https://evil.test/"}));
        assert_eq!(verifier.verify(&wrong).await, Err(TokenError::InvalidClaim("iss")));
        let missing = sign_value(serde_json::json!({"sub": "a", "exp": exp}));
        assert!(matches!(verifier.verify(&missing).await, Err(TokenError::Malformed(_))));
    }

    #[tokio::test]
    async fn configured_audience_is_required() {
        let verifier = verifier_with(&[], &["notify"]);
        let exp = now() + 600;
        let single = sign_value(serde_json::json!({"sub": "a", "exp": exp, "aud": "notify"}));
        assert!(verifier.verify(&single).await.is_ok());
        let list = sign_value(serde_json::json!({"sub": "a", "exp": exp, "aud": ["other", "notify"]}));
        assert!(verifier.verify(&list).await.is_ok());
        let wrong = sign_value(serde_json::json!({"sub": "a", "exp": exp, "aud": "billing"}));
        assert_eq!(verifier.verify(&wrong).await, Err(TokenError::InvalidClaim("aud")));
        let missing = sign_value(serde_json::json!({"sub": "a", "exp": exp}));
        assert!(matches!(verifier.verify(&missing).await, Err(TokenError::Malformed(_))));
    }

    #[tokio::test]
    async fn audience_without_configuration_is_rejected() {
        let token = sign_value(serde_json::json!({"sub": "a", "exp": now() + 600, "aud": "notify"}));
        assert_eq!(verifier().verify(&token).await, Err(TokenError::InvalidClaim("aud")));
    }

    #[tokio::test]
    async fn oversized_token_is_rejected() {
        let token = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(verifier().verify(&token).await, Err(TokenError::Malformed(_))));
    }

    #[test]
    fn algorithms_need_their_keys() {
        let settings = |algorithms: Vec<Algorithm>| VerifierSettings {
            secret: Some(SECRET.into()),
            algorithms,
            ..VerifierSettings::default()
        };
        let err = Verifier::with_settings(settings(vec![Algorithm::RS256]))
            .err()
            .map(|err| err.to_string());
        assert!(err.is_some_and(|err| err.contains("JWKS_URL")));
        assert!(Verifier::with_settings(settings(vec![Algorithm::HS256, Algorithm::HS512])).is_ok());
        let none = Verifier::with_settings(VerifierSettings::default())
            .err()
            .map(|err| err.to_string());
        assert!(none.is_some_and(|err| err.contains("JWT_SECRET")));
    }

    #[test]
    fn large_leeway_is_rejected() {
        assert!(Verifier::new(SECRET, MAX_LEEWAY + Duration::from_secs(1)).is_err());
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
