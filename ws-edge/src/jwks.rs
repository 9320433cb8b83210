//! The identity provider's JSON Web Key Set: fetched from `JWKS_URL`, cached, refreshed in the
//! background, and refetched when a token names an unknown key id, at most once per interval.
//!
//! A key rotated in at the provider is picked up by the first token that uses it, while tokens
//! with made-up key ids cannot make the edge flood the provider: a miss refetches only when no
//! other miss refetched within `JWKS_REFETCH_INTERVAL`, and concurrent misses wait for one shared
//! fetch. A failed fetch keeps the cached keys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// Maximum JWKS response body size in bytes; a larger body fails the fetch.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Time a whole fetch may take, from connecting to the last body byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys read from one response; the rest are ignored. Providers publish two or three.
pub const MAX_KEYS: usize = 64;

/// A public key from the set, with the one algorithm it verifies.
#[derive(Clone)]
pub struct VerificationKey {
    /// The algorithm a token must name in its `alg` header to be checked with this key.
    pub algorithm: Algorithm,
    /// The public key.
    pub key: DecodingKey,
}

/// Reason a fetch failed. The cached keys stay in use.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request failed or timed out.
    #[error("request failed: {0}")]
    Request(String),
    /// The provider responded with a status other than 200.
    #[error("unexpected status {0}")]
    Status(StatusCode),
    /// The body is larger than [`MAX_JWKS_BYTES`] or is not a JWK set.
    #[error("invalid key set: {0}")]
    Body(String),
}

type KeyMap = HashMap<String, VerificationKey>;

/// The cached key set and the client that refreshes it.
pub struct Jwks {
    url: Uri,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    algorithms: Vec<Algorithm>,
    refetch_interval: Duration,
    refresh_interval: Duration,
    keys: RwLock<Arc<KeyMap>>,
    /// Single-flight gate: held for the duration of a fetch, so concurrent misses wait for one
    /// fetch instead of starting their own. Holds the time of the last refetch caused by a miss.
    /// NOTE: an async mutex held across the fetch on purpose; nothing else is locked meanwhile.
    fetch_gate: tokio::sync::Mutex<Option<Instant>>,
    fetches: AtomicU64,
    /// Finished fetches that stored a key set, and those that failed, for the metrics.
    fetches_ok: AtomicU64,
    fetches_failed: AtomicU64,
}

impl Jwks {
    /// Creates the cache for the set at `url`. Only keys for one of `algorithms` are kept.
    ///
    /// # Errors
    /// Fails when the URL is invalid, or uses `http` for a host other than loopback.
    pub fn new(
        url: &str,
        algorithms: Vec<Algorithm>,
        refetch_interval: Duration,
        refresh_interval: Duration,
    ) -> anyhow::Result<Self> {
        let url: Uri = url.parse().context("JWKS_URL is not a valid URL")?;
        let host = url.host().unwrap_or_default();
        match url.scheme_str() {
            Some("https") => {}
            Some("http") if is_loopback(host) => {}
            _ => anyhow::bail!("JWKS_URL must be an https URL (http is accepted only for loopback hosts)"),
        }
        // NOTE: rustls 0.23.48 deprecates the ring provider because it lacks post-quantum key
        // exchange; the aws-lc-rs provider has it but needs cmake and a C build.
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .context("set up TLS for JWKS_URL")?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            url,
            client: Client::builder(TokioExecutor::new()).build(connector),
            algorithms,
            refetch_interval,
            refresh_interval,
            keys: RwLock::new(Arc::new(KeyMap::new())),
            fetch_gate: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
            fetches_ok: AtomicU64::new(0),
            fetches_failed: AtomicU64::new(0),
        })
    }

    /// Returns the key with id `kid`, refetching the set once when it is unknown and no miss
    /// refetched it within the refetch interval.
    pub async fn key(&self, kid: &str) -> Option<VerificationKey> {
        if let Some(key) = self.cached(kid) {
            return Some(key);
        }
        let mut last_miss = self.fetch_gate.lock().await;
        // A fetch that finished while this call waited may have brought the key.
        if let Some(key) = self.cached(kid) {
            return Some(key);
        }
        if last_miss.is_some_and(|at| at.elapsed() < self.refetch_interval) {
            return None;
        }
        *last_miss = Some(Instant::now());
        let _ = self.fetch_and_store().await;
        self.cached(kid)
    }

    /// Fetches the set now and replaces the cached keys when the fetch succeeds. Returns the
    /// number of usable keys.
    ///
    /// # Errors
    /// Fails when the fetch fails; the cached keys stay.
    pub async fn refresh(&self) -> Result<usize, FetchError> {
        let _gate = self.fetch_gate.lock().await;
        self.fetch_and_store().await
    }

    /// Refreshes the set every refresh interval until `shutdown`, and retries a failed fetch
    /// with a backoff of at most [`crate::backoff::RETRY_CAP`].
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            let delay = match self.refresh().await {
                Ok(_) => {
                    backoff = Backoff::default();
                    self.refresh_interval
                }
                Err(_) => backoff.next_delay().min(self.refresh_interval),
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Returns the number of fetches started so far.
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Returns the number of finished fetches that succeeded and that failed.
    pub fn fetch_results(&self) -> (u64, u64) {
        (
            self.fetches_ok.load(Ordering::Relaxed),
            self.fetches_failed.load(Ordering::Relaxed),
        )
    }

    fn cached(&self, kid: &str) -> Option<VerificationKey> {
        let keys = self.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        keys.get(kid).cloned()
    }

    async fn fetch_and_store(&self) -> Result<usize, FetchError> {
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await;
        let result = fetched.unwrap_or_else(|_| Err(FetchError::Request("timed out".into())));
        match result {
            Ok(keys) => {
                let count = keys.len();
                if count == 0 {
                    tracing::warn!("the JWKS has no usable key; tokens signed by the identity provider are rejected");
                }
                tracing::debug!(keys = count, "jwks fetched");
                *self.keys.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
                self.fetches_ok.fetch_add(1, Ordering::Relaxed);
                Ok(count)
            }
            Err(err) => {
                tracing::warn!(error = %err, "jwks fetch failed; keeping the cached keys");
                self.fetches_failed.fetch_add(1, Ordering::Relaxed);
                Err(err)
            }
        }
    }

    async fn fetch(&self) -> Result<KeyMap, FetchError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let request = Request::get(self.url.clone())
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|err| FetchError::Request(err.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| FetchError::Request(err.to_string()))?;
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status(response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|err| FetchError::Body(err.to_string()))?
            .to_bytes();
        parse_key_set(&body, &self.algorithms)
    }
}

/// Parses a JWK set and keeps the signing keys for one of `algorithms`. Keys without a `kid`,
/// for encryption, symmetric, or of an unknown type are skipped.
///
/// # Errors
/// Fails when the body is not a JSON object with a `keys` array.
pub fn parse_key_set(body: &[u8], algorithms: &[Algorithm]) -> Result<KeyMap, FetchError> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(body).map_err(|err| FetchError::Body(err.to_string()))?;
    let mut keys = KeyMap::new();
    for value in raw.keys.into_iter().take(MAX_KEYS) {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if let Some((kid, key)) = usable_key(&jwk, algorithms) {
            keys.insert(kid, key);
        }
    }
    Ok(keys)
}

fn usable_key(jwk: &Jwk, algorithms: &[Algorithm]) -> Option<(String, VerificationKey)> {
    let kid = jwk.common.key_id.clone()?;
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|key_use| *key_use != PublicKeyUse::Signature)
    {
        return None;
    }
    let algorithm = match jwk.common.key_algorithm {
        // `KeyAlgorithm::to_algorithm` is private in jsonwebtoken 12.0.0; both enums share names.
        Some(declared) => serde_json::to_value(declared).ok()?.as_str()?.parse().ok()?,
        None => default_algorithm(&jwk.algorithm)?,
    };
    // A key set never supplies HMAC secrets: those would let anyone holding the set sign tokens.
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) || !algorithms.contains(&algorithm) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    (key.family() == algorithm.family()).then_some((kid, VerificationKey { algorithm, key }))
}

/// Returns the algorithm of a key that names none: RS256 for RSA, ES256 or ES384 by curve.
fn default_algorithm(parameters: &AlgorithmParameters) -> Option<Algorithm> {
    match parameters {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        _ => None,
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_KEY: &str = r#"{"kty":"RSA","kid":"r1","use":"sig","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"}"#;
    const EC_KEY: &str = r#"{"kty":"EC","kid":"e1","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;

    fn set(keys: &[&str]) -> Vec<u8> {
        format!(r#"{{"keys":[{}]}}"#, keys.join(",")).into_bytes()
    }

    #[test]
    fn keys_get_their_default_algorithm() {
        let keys = parse_key_set(&set(&[RSA_KEY, EC_KEY]), &[Algorithm::RS256, Algorithm::ES256]).expect("valid set");
        assert_eq!(keys.get("r1").map(|key| key.algorithm), Some(Algorithm::RS256));
        assert_eq!(keys.get("e1").map(|key| key.algorithm), Some(Algorithm::ES256));
    }

    #[test]
    fn keys_for_other_algorithms_are_skipped() {
        let keys = parse_key_set(&set(&[RSA_KEY, EC_KEY]), &[Algorithm::ES256]).expect("valid set");
        assert!(!keys.contains_key("r1"));
        assert!(keys.contains_key("e1"));
    }

    #[test]
    fn symmetric_and_encryption_keys_are_skipped() {
        let oct = r#"{"kty":"oct","kid":"h1","alg":"HS256","k":"c2VjcmV0"}"#;
        let encryption = RSA_KEY.replace(r#""use":"sig""#, r#""use":"enc""#).replace("r1", "r2");
        let keys = parse_key_set(&set(&[oct, &encryption]), &[Algorithm::HS256, Algorithm::RS256]).expect("valid set");
        assert!(keys.is_empty(), "{:?}", keys.keys().collect::<Vec<_>>());
    }

    #[test]
    fn unknown_key_types_do_not_spoil_the_set() {
        let odd = r#"{"kty":"XYZ","kid":"x1"}"#;
        let no_kid = r#"{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;
        let keys = parse_key_set(&set(&[odd, no_kid, EC_KEY]), &[Algorithm::ES256]).expect("valid set");
        assert_eq!(keys.len(), 1);
    }

    #[test]
    fn body_without_keys_is_an_error() {
        assert!(parse_key_set(b"{}", &[Algorithm::RS256]).is_err());
        assert!(parse_key_set(b"<html>", &[Algorithm::RS256]).is_err());
    }

    /// Serves one HTTP response with a body of `body_bytes` spaces to each connection.
    async fn serve_body(body_bytes: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {body_bytes}\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&vec![b' '; body_bytes]).await;
            }
        });
        format!("http://{addr}/jwks")
    }

    #[tokio::test]
    async fn oversized_key_set_fails_the_fetch() {
        let url = serve_body(MAX_JWKS_BYTES + 1).await;
        let jwks = Jwks::new(&url, vec![Algorithm::RS256], Duration::ZERO, Duration::ZERO).expect("valid URL");
        let result = jwks.refresh().await;
        assert!(matches!(result, Err(FetchError::Body(_))), "{result:?}");
        assert_eq!(jwks.fetch_count(), 1);
    }

    #[test]
    fn plain_http_only_for_loopback() {
        let new = |url: &str| Jwks::new(url, vec![Algorithm::RS256], Duration::ZERO, Duration::ZERO);
        assert!(new("http://127.0.0.1:9/jwks").is_ok());
        assert!(new("http://[::1]:9/jwks").is_ok());
        assert!(new("http://localhost/jwks").is_ok());
        assert!(new("https://idp.example.com/.well-known/jwks.json").is_ok());
        assert!(new("http://idp.example.com/jwks").is_err());
        assert!(new("ftp://idp.example.com/jwks").is_err());
    }
}
