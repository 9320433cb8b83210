//! The auth boundary, end to end against the real binaries. The tests cover forged and malformed
//! client tokens, and the identity provider's key set (rotation, a flood of unknown key ids, an
//! outage). They also cover the subprotocol token, the `Origin` allow-list, token expiry on a
//! live socket, publisher and edge API keys, and check that no token or key reaches a log file.
//!
//! The key set is served by a small HTTP server in this file; its keys are generated per test
//! with the `openssl` command.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use e2e::client::{Client, Ending};
use e2e::env::{JWT_SECRET, Mode, Options, TestEnv};
use e2e::token::{self, KeyPair};
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, Header};
use notify_proto::pb::notifier_client::NotifierClient;
use notify_proto::pb::{HeadsRequest, HistoryRequest, PublishRequest, ReadPartitionRequest};
use notify_proto::protocol::close;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::{self, Message};
use tonic::Code;

/// `iss` the JWKS deployments require.
const ISSUER: &str = "https://idp.test/";
/// `aud` the JWKS deployments require.
const AUDIENCE: &str = "notify";

// === The identity provider's key set ===

/// An HTTP server on 127.0.0.1 that serves one JWK set document and counts the requests.
struct JwksServer {
    addr: std::net::SocketAddr,
    body: Arc<Mutex<String>>,
    failing: Arc<AtomicBool>,
    fetches: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl JwksServer {
    async fn start(keys: &[&KeyPair]) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let body = Arc::new(Mutex::new(token::jwks(keys)?));
        let failing = Arc::new(AtomicBool::new(false));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (document, fail, count) = (body.clone(), failing.clone(), fetches.clone());
        // Runs until the server is dropped, which aborts the task.
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let current = document.lock().map(|body| body.clone()).unwrap_or_default();
                tokio::spawn(respond(stream, current, fail.load(Ordering::SeqCst)));
            }
        });
        Ok(Self {
            addr,
            body,
            failing,
            fetches,
            task,
        })
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn publish(&self, keys: &[&KeyPair]) -> anyhow::Result<()> {
        let document = token::jwks(keys)?;
        *self.body.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = document;
        Ok(())
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Waits until the server has received at least `count` requests.
    async fn wait_for_fetches(&self, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + e2e::patience();
        while self.fetches() < count {
            ensure!(
                Instant::now() < deadline,
                "JWKS fetched {} times, expected {count}",
                self.fetches()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head (at most 16 KiB, for at most 5 s) and responds with the document, or
/// with 500 while failing.
async fn respond(mut stream: tokio::net::TcpStream, document: String, failing: bool) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < 16 * 1024 {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), read_head).await.is_err() {
        return;
    }
    let (status, document) = match failing {
        true => ("500 Internal Server Error", String::new()),
        false => ("200 OK", document),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{document}",
        document.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Starts a single-process deployment whose edge takes HS256, RS256 and ES256 tokens, the latter
/// from `jwks`, and requires [`ISSUER`] and [`AUDIENCE`].
async fn jwks_deployment(jwks: &JwksServer, extra: Options) -> anyhow::Result<TestEnv> {
    let mut options = Options::default()
        .edge("JWKS_URL", jwks.url())
        .edge("JWT_ALGORITHMS", "HS256,RS256,ES256")
        .edge("JWT_ISSUER", ISSUER)
        .edge("JWT_AUDIENCE", AUDIENCE);
    options.edge_env.extend(extra.edge_env);
    options.notifier_env.extend(extra.notifier_env);
    TestEnv::start_with(Mode::Standalone, options).await
}

/// Claims that the JWKS deployments accept.
fn claims(user: &str) -> Value {
    let now = token::now();
    json!({"sub": user, "exp": now + 600, "iat": now, "iss": ISSUER, "aud": AUDIENCE})
}

/// Claims with one field replaced, or removed when `value` is null.
fn claims_with(field: &str, value: Value) -> Value {
    let mut claims = claims("mallory");
    match value {
        Value::Null => {
            claims.as_object_mut().map(|object| object.remove(field));
        }
        value => claims[field] = value,
    }
    claims
}

// === WebSocket helpers ===

/// Opens a socket with `?token=` and returns the close code of the first message. Any other
/// first message fails the call, which shows that nothing was delivered before the rejection.
async fn rejection_code(env: &TestEnv, token: &str) -> anyhow::Result<u16> {
    let url = format!("{}?token={token}", env.ws_url());
    let (mut socket, _) = tokio::time::timeout(e2e::patience(), tokio_tungstenite::connect_async(url))
        .await
        .context("connect timed out")??;
    let first = tokio::time::timeout(e2e::patience(), socket.next())
        .await
        .context("no close in time")?;
    match first {
        Some(Ok(Message::Close(Some(frame)))) => Ok(frame.code.into()),
        other => bail!("expected a close frame first, got {other:?}"),
    }
}

/// Returns the HTTP status of a handshake with the given extra headers and the response's
/// `Sec-WebSocket-Protocol`.
async fn handshake_status(
    env: &TestEnv,
    headers: &[(&'static str, &str)],
) -> anyhow::Result<(StatusCode, Option<String>)> {
    let mut request = format!("{}?token={}", env.ws_url(), token::valid("alice", &[])).into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(*name, HeaderValue::from_str(value)?);
    }
    let connected = tokio::time::timeout(e2e::patience(), tokio_tungstenite::connect_async(request))
        .await
        .context("handshake timed out")?;
    match connected {
        Ok((_, response)) => {
            let protocol = response.headers().get("sec-websocket-protocol");
            let protocol = protocol.and_then(|value| value.to_str().ok()).map(str::to_owned);
            Ok((response.status(), protocol))
        }
        Err(tungstenite::Error::Http(response)) => Ok((response.status(), None)),
        Err(err) => Err(err.into()),
    }
}

/// Returns the next frame that is not `token_expiring`.
async fn next_reply(client: &mut Client) -> anyhow::Result<Value> {
    for _ in 0..4 {
        let frame = client.recv().await?;
        if frame["type"] != "token_expiring" {
            return Ok(frame);
        }
    }
    bail!("only token_expiring frames arrived")
}

// === Forged and malformed tokens ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_close_4002_before_any_frame() -> anyhow::Result<()> {
    let rsa = KeyPair::rsa("rsa-1")?;
    let ec = KeyPair::ec("ec-1")?;
    let attacker = KeyPair::rsa("attacker")?;
    let jwks = JwksServer::start(&[&rsa, &ec]).await?;
    let env = jwks_deployment(&jwks, Options::default()).await?;

    // The genuine tokens of each algorithm connect.
    for genuine in [rsa.sign(&claims("alice"))?, ec.sign(&claims("alice"))?] {
        Client::connect_with_token(&env.ws_url(), &genuine).await?;
    }
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    Client::connect_with_token(
        &env.ws_url(),
        &token::hmac_raw(&hs256, &claims("alice"), JWT_SECRET.as_bytes())?,
    )
    .await?;

    for (case, forged) in forged_tokens(&rsa, &ec, &attacker)? {
        let code = rejection_code(&env, &forged)
            .await
            .with_context(|| format!("case: {case}"))?;
        assert_eq!(code, close::INVALID_TOKEN, "case: {case}");
    }
    Ok(())
}

/// Every forged or malformed token the JWKS deployment must reject, by name.
fn forged_tokens(rsa: &KeyPair, ec: &KeyPair, attacker: &KeyPair) -> anyhow::Result<Vec<(&'static str, String)>> {
    let now = token::now();
    let rs256 = json!({"alg": "RS256", "typ": "JWT", "kid": rsa.kid});
    let hs256_kid = json!({"alg": "HS256", "typ": "JWT", "kid": rsa.kid});
    let payload = token::b64(claims("mallory").to_string().as_bytes());
    let header_with = |field: &str, value: Value| -> anyhow::Result<Header> {
        let mut header = serde_json::to_value(Header::new(Algorithm::RS256))?;
        header["kid"] = attacker.kid.clone().into();
        header[field] = value;
        Ok(serde_json::from_value(header)?)
    };
    let genuine = rsa.sign(&claims("mallory"))?;
    let (signing_input, signature) = genuine.rsplit_once('.').context("three parts")?;
    let mut flipped = signature.as_bytes().to_vec();
    flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };
    let flipped = format!("{signing_input}.{}", String::from_utf8(flipped)?);
    let mut own_jwk_header = Header::new(Algorithm::RS256);
    own_jwk_header.kid = Some(rsa.kid.clone());
    own_jwk_header.jwk = Some(serde_json::from_value(rsa.jwk()?)?);
    let mut other_kid = Header::new(Algorithm::RS256);
    other_kid.kid = Some("not-published".into());
    let mut rs384 = Header::new(Algorithm::RS384);
    rs384.kid = Some(rsa.kid.clone());

    Ok(vec![
        (
            "alg none",
            format!("{}.{payload}.", token::b64(br#"{"alg":"none","typ":"JWT"}"#)),
        ),
        (
            "alg None with kid",
            format!("{}.{payload}.", token::b64(br#"{"alg":"None","kid":"rsa-1"}"#)),
        ),
        (
            "HS256 keyed with the RSA public PEM",
            token::hmac_raw(&hs256_kid, &claims("mallory"), &rsa.public_pem)?,
        ),
        (
            "HS256 keyed with the RSA public DER",
            token::hmac_raw(&hs256_kid, &claims("mallory"), &rsa.public_der)?,
        ),
        (
            "HS256 keyed with the EC public PEM",
            token::hmac_raw(&hs256_kid, &claims("mallory"), &ec.public_pem)?,
        ),
        (
            "embedded jwk of the attacker",
            attacker.sign_with_header(&header_with("jwk", attacker.jwk()?)?, &claims("mallory"))?,
        ),
        (
            "embedded jwk of the real key",
            rsa.sign_with_header(&own_jwk_header, &claims("mallory"))?,
        ),
        (
            "jku",
            attacker.sign_with_header(
                &header_with("jku", json!("http://127.0.0.1:9/jwks"))?,
                &claims("mallory"),
            )?,
        ),
        (
            "x5u",
            attacker.sign_with_header(
                &header_with("x5u", json!("http://127.0.0.1:9/cert"))?,
                &claims("mallory"),
            )?,
        ),
        (
            "x5c",
            attacker.sign_with_header(
                &header_with("x5c", json!(["MIIBszCCAVmgAwIBAgIU"]))?,
                &claims("mallory"),
            )?,
        ),
        ("flipped signature byte", flipped),
        (
            "signature of another key",
            attacker.sign_with_header(&rs256_header(&rsa.kid), &claims("mallory"))?,
        ),
        ("unknown kid", rsa.sign_with_header(&other_kid, &claims("mallory"))?),
        (
            "no kid",
            rsa.sign_with_header(&Header::new(Algorithm::RS256), &claims("mallory"))?,
        ),
        (
            "RS384, not in the list",
            rsa.sign_with_header(&rs384, &claims("mallory"))?,
        ),
        (
            "HS512, not in the list",
            token::hmac_raw(&json!({"alg": "HS512"}), &claims("mallory"), JWT_SECRET.as_bytes())?,
        ),
        ("expired", rsa.sign(&claims_with("exp", json!(now - 60)))?),
        ("exp missing", rsa.sign(&claims_with("exp", Value::Null))?),
        (
            "exp as a string",
            rsa.sign(&claims_with("exp", json!((now + 600).to_string())))?,
        ),
        ("sub as a number", rsa.sign(&claims_with("sub", json!(42)))?),
        ("sub missing", rsa.sign(&claims_with("sub", Value::Null))?),
        ("iat in the future", rsa.sign(&claims_with("iat", json!(now + 120)))?),
        ("nbf in the future", rsa.sign(&claims_with("nbf", json!(now + 120)))?),
        ("iss missing", rsa.sign(&claims_with("iss", Value::Null))?),
        (
            "iss of another issuer",
            rsa.sign(&claims_with("iss", json!("https://evil.test/")))?,
        ),
        ("aud missing", rsa.sign(&claims_with("aud", Value::Null))?),
        (
            "aud of another service",
            rsa.sign(&claims_with("aud", json!("billing")))?,
        ),
        ("not a JWT", "not.a.jwt".to_owned()),
        (
            "unsigned header and payload",
            format!("{}.{payload}", token::b64(rs256.to_string().as_bytes())),
        ),
    ])
}

fn rs256_header(kid: &str) -> Header {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn algorithms_outside_the_list_close_4002() -> anyhow::Result<()> {
    let rsa = KeyPair::rsa("rsa-1")?;
    let ec = KeyPair::ec("ec-1")?;
    let jwks = JwksServer::start(&[&rsa, &ec]).await?;
    let env = jwks_deployment(&jwks, Options::default().edge("JWT_ALGORITHMS", "RS256")).await?;

    Client::connect_with_token(&env.ws_url(), &rsa.sign(&claims("alice"))?).await?;
    let hs256 = token::hmac_raw(&json!({"alg": "HS256"}), &claims("alice"), JWT_SECRET.as_bytes())?;
    assert_eq!(
        rejection_code(&env, &hs256).await?,
        close::INVALID_TOKEN,
        "HS256 with the right secret"
    );
    let es256 = ec.sign(&claims("alice"))?;
    assert_eq!(
        rejection_code(&env, &es256).await?,
        close::INVALID_TOKEN,
        "ES256 with a published key"
    );
    Ok(())
}

// === Key rotation and the refetch cap ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_key_is_accepted_on_first_use() -> anyhow::Result<()> {
    let old = KeyPair::rsa("2026-11")?;
    let new = KeyPair::ec("2026-12")?;
    let jwks = JwksServer::start(&[&old]).await?;
    let env = jwks_deployment(&jwks, Options::default()).await?;
    jwks.wait_for_fetches(1).await?;
    Client::connect_with_token(&env.ws_url(), &old.sign(&claims("alice"))?).await?;

    jwks.publish(&[&old, &new])?;
    let before = jwks.fetches();
    let client = Client::connect_with_token(&env.ws_url(), &new.sign(&claims("bob"))?).await?;
    assert_eq!(client.connected.context("connected frame")?["userId"], "bob");
    assert_eq!(jwks.fetches(), before + 1, "the unknown kid refetches once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kids_refetch_at_most_once() -> anyhow::Result<()> {
    let key = KeyPair::rsa("known")?;
    let jwks = JwksServer::start(&[&key]).await?;
    let env = jwks_deployment(&jwks, Options::default()).await?;
    jwks.wait_for_fetches(1).await?;
    let before = jwks.fetches();

    let tokens: Vec<String> = (0..300)
        .map(|_| key.sign_with_header(&rs256_header(&uuid::Uuid::new_v4().to_string()), &claims("mallory")))
        .collect::<anyhow::Result<_>>()?;
    for batch in tokens.chunks(20) {
        let codes = futures_util::future::join_all(batch.iter().map(|forged| rejection_code(&env, forged))).await;
        for code in codes {
            assert_eq!(code?, close::INVALID_TOKEN);
        }
    }
    let extra = jwks.fetches() - before;
    assert!(extra <= 1, "300 unknown kids caused {extra} fetches");

    // The cached key still verifies.
    Client::connect_with_token(&env.ws_url(), &key.sign(&claims("alice"))?).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_outage_keeps_cached_keys() -> anyhow::Result<()> {
    let key = KeyPair::ec("ec-1")?;
    let jwks = JwksServer::start(&[&key]).await?;
    let options = Options::default().edge("JWKS_REFRESH_INTERVAL", "200ms");
    let env = jwks_deployment(&jwks, options).await?;
    jwks.wait_for_fetches(1).await?;

    jwks.failing.store(true, Ordering::SeqCst);
    let failed_refresh = jwks.fetches() + 2;
    jwks.wait_for_fetches(failed_refresh).await?;
    Client::connect_with_token(&env.ws_url(), &key.sign(&claims("alice"))?).await?;
    Ok(())
}

// === Subprotocol token and Origin ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subprotocol_token_is_not_echoed() -> anyhow::Result<()> {
    let env = TestEnv::start(Mode::Standalone).await?;
    let token = token::valid("alice", &[]);
    let mut request = env.ws_url().into_client_request()?;
    let offered = format!("notify.v1, bearer.{token}");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_str(&offered)?);
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await?;
    let echoed = response.headers().get_all("sec-websocket-protocol").iter();
    let echoed: Vec<&str> = echoed.filter_map(|value| value.to_str().ok()).collect();
    assert_eq!(echoed, ["notify.v1"]);

    let first = tokio::time::timeout(e2e::patience(), socket.next()).await?;
    let Some(Ok(Message::Text(text))) = first else {
        bail!("expected the connected frame, got {first:?}");
    };
    let connected: Value = serde_json::from_str(text.as_str())?;
    assert_eq!(connected["type"], "connected");
    assert_eq!(connected["userId"], "alice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_allow_list_matrix() -> anyhow::Result<()> {
    let allowed = "https://app.example.com, http://localhost:3000";
    let env = TestEnv::start_with(Mode::Standalone, Options::default().edge("ALLOWED_ORIGINS", allowed)).await?;
    let cases = [
        (Some("https://app.example.com"), StatusCode::SWITCHING_PROTOCOLS),
        (Some("https://app.example.com:443"), StatusCode::SWITCHING_PROTOCOLS),
        (Some("http://localhost:3000"), StatusCode::SWITCHING_PROTOCOLS),
        (None, StatusCode::SWITCHING_PROTOCOLS),
        (Some("http://app.example.com"), StatusCode::FORBIDDEN),
        (Some("https://app.example.com.evil.test"), StatusCode::FORBIDDEN),
        (Some("https://app.example.com:8443"), StatusCode::FORBIDDEN),
        (Some("http://localhost:3001"), StatusCode::FORBIDDEN),
        (Some("null"), StatusCode::FORBIDDEN),
    ];
    for (origin, expected) in cases {
        let headers: Vec<(&'static str, &str)> = origin.map(|origin| ("origin", origin)).into_iter().collect();
        let (status, _) = handshake_status(&env, &headers).await?;
        assert_eq!(status, expected, "origin {origin:?}");
    }
    Ok(())
}

// === Token expiry on a live socket ===

/// Starts a deployment without leeway that warns 2 s before expiry.
async fn short_expiry_deployment() -> anyhow::Result<TestEnv> {
    let options = Options::default()
        .edge("JWT_LEEWAY", "0")
        .edge("TOKEN_EXPIRY_WARNING", "2s");
    TestEnv::start_with(Mode::Standalone, options).await
}

fn token_expiring_in(user: &str, secs: u64) -> String {
    let mut claims = token::claims(user, &[]);
    claims.exp = token::now() + secs;
    token::sign(&claims, JWT_SECRET)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_token_warns_then_closes_4003() -> anyhow::Result<()> {
    let env = short_expiry_deployment().await?;
    let token = token_expiring_in("alice", 4);
    let mut client = Client::connect_with_token(&env.ws_url(), &token).await?;
    let expires_at = client.connected.as_ref().context("connected frame")?["expiresAt"].clone();

    let warning = client.expect_type("token_expiring").await?;
    assert_eq!(warning["expiresAt"], expires_at);
    let left = warning["in"].as_u64().context("in is a number")?;
    assert!(left <= 2, "warned {left} s before expiry");
    assert_eq!(client.ending().await?, Ending::Closed(close::TOKEN_EXPIRED));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_moves_the_expiry() -> anyhow::Result<()> {
    let env = short_expiry_deployment().await?;
    let mut client = Client::connect_with_token(&env.ws_url(), &token_expiring_in("alice", 3)).await?;
    let fresh = token_expiring_in("alice", 600);
    client.send(json!({"type": "refresh", "token": fresh})).await?;
    let refreshed = next_reply(&mut client).await?;
    assert_eq!(refreshed["type"], "refreshed", "{refreshed}");

    tokio::time::sleep(Duration::from_secs(4)).await;
    client.send(json!({"type": "ping"})).await?;
    assert_eq!(next_reply(&mut client).await?["type"], "pong");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_refresh_keeps_the_original_expiry() -> anyhow::Result<()> {
    let env = short_expiry_deployment().await?;
    let started = Instant::now();
    let mut client = Client::connect_with_token(&env.ws_url(), &token_expiring_in("alice", 4)).await?;

    let mut expired = token::claims("alice", &[]);
    expired.exp = token::now() - 60;
    let refreshes = [
        ("expired", token::sign(&expired, JWT_SECRET), "invalid_token"),
        ("another user", token_expiring_in("bob", 600), "forbidden"),
        ("forged", token::bad_signature("alice"), "invalid_token"),
        ("alg none", token::alg_none("alice"), "invalid_token"),
    ];
    for (case, token, code) in refreshes {
        client.send(json!({"type": "refresh", "token": token})).await?;
        let reply = next_reply(&mut client).await?;
        assert_eq!(reply["type"], "error", "case {case}: {reply}");
        assert_eq!(reply["code"], code, "case {case}: {reply}");
    }

    assert_eq!(client.ending().await?, Ending::Closed(close::TOKEN_EXPIRED));
    let lived = started.elapsed();
    assert!(
        lived < Duration::from_secs(7),
        "the socket lived {lived:?}, past its original expiry"
    );
    Ok(())
}

// === Publisher and edge API keys ===

const PUBLISHER_KEY: &str = "publisher-key-for-every-channel";
const ORDERS_KEY: &str = "publisher-key-for-orders-only";
const EDGE_KEY: &str = "edge-key-0123456789";

fn hash(key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn keyed_options() -> Options {
    let publishers = format!("{},{}:orders:", hash(PUBLISHER_KEY), hash(ORDERS_KEY));
    Options::default()
        .notifier("PUBLISHER_KEYS", publishers)
        .notifier("EDGE_KEYS", hash(EDGE_KEY))
        .edge("NOTIFIER_API_KEY", EDGE_KEY)
}

fn with_key<T>(message: T, key: Option<&str>) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse()?);
    }
    Ok(request)
}

fn publish_to(channel: &str) -> PublishRequest {
    PublishRequest {
        channel: channel.into(),
        r#type: "note".into(),
        data: "{}".into(),
        ..Default::default()
    }
}

async fn publish_code(env: &TestEnv, channel: &str, key: Option<&str>) -> anyhow::Result<Code> {
    let mut client = env.publisher().await?;
    let result = client.publish(with_key(publish_to(channel), key)?).await;
    Ok(result.map_or_else(|status| status.code(), |_| Code::Ok))
}

async fn check_api_keys(env: &TestEnv) -> anyhow::Result<()> {
    let cases = [
        ("no key", "news", None, Code::Unauthenticated),
        ("wrong key", "news", Some("not-a-configured-key"), Code::Unauthenticated),
        ("outside the prefixes", "news", Some(ORDERS_KEY), Code::PermissionDenied),
        ("inside the prefixes", "orders:eu", Some(ORDERS_KEY), Code::Ok),
        ("unlimited key", "news", Some(PUBLISHER_KEY), Code::Ok),
        ("edge key", "news", Some(EDGE_KEY), Code::PermissionDenied),
    ];
    for (case, channel, key, expected) in cases {
        assert_eq!(publish_code(env, channel, key).await?, expected, "Publish: {case}");
    }

    let mut client: NotifierClient<_> = env.publisher().await?;
    let history = |channel: &str| HistoryRequest {
        channel: channel.into(),
        ..Default::default()
    };
    let denied = client.history(with_key(history("news"), Some(ORDERS_KEY))?).await;
    assert_eq!(
        denied.map(drop).map_err(|status| status.code()),
        Err(Code::PermissionDenied)
    );
    assert!(
        client
            .history(with_key(history("orders:eu"), Some(ORDERS_KEY))?)
            .await
            .is_ok()
    );
    let anonymous = client.history(with_key(history("news"), None)?).await;
    assert_eq!(
        anonymous.map(drop).map_err(|status| status.code()),
        Err(Code::Unauthenticated)
    );

    let partition = || ReadPartitionRequest {
        partition: 0,
        after: 0,
        limit: 10,
    };
    let by_publisher = client.read_partition(with_key(partition(), Some(PUBLISHER_KEY))?).await;
    assert_eq!(
        by_publisher.map(drop).map_err(|status| status.code()),
        Err(Code::PermissionDenied)
    );
    assert!(
        client
            .read_partition(with_key(partition(), Some(EDGE_KEY))?)
            .await
            .is_ok()
    );
    let heads = client.heads(with_key(HeadsRequest {}, None)?).await;
    assert_eq!(
        heads.map(drop).map_err(|status| status.code()),
        Err(Code::Unauthenticated)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_every_call_standalone() -> anyhow::Result<()> {
    let env = TestEnv::start_with(Mode::Standalone, keyed_options()).await?;
    check_api_keys(&env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_every_call_distributed() -> anyhow::Result<()> {
    if let Err(err) = e2e::env::check_services().await {
        if std::env::var_os("E2E_REQUIRE_SERVICES").is_some() {
            return Err(err.context("E2E_REQUIRE_SERVICES is set"));
        }
        eprintln!("skipped: distributed mode needs PostgreSQL and Redis: {err:#}");
        return Ok(());
    }
    let env = TestEnv::start_with(Mode::Distributed, keyed_options()).await?;
    check_api_keys(&env).await?;

    // The edge reads heads and missed events with its own key: a resume recovers.
    let orders_token = token::valid("alice", &["orders:*"]);
    let mut client = Client::connect_with_token(&env.ws_url(), &orders_token).await?;
    let since = client.subscribe("orders:eu").await?["position"].clone();
    drop(client);
    let mut publisher = env.publisher().await?;
    let published = publisher
        .publish(with_key(publish_to("orders:eu"), Some(ORDERS_KEY))?)
        .await?
        .into_inner();
    let mut client = Client::connect_with_token(&env.ws_url(), &orders_token).await?;
    let answer = client.subscribe_since("orders:eu", since).await?;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    assert_eq!(client.recv().await?["id"], published.id);
    Ok(())
}

// === No token in the logs ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_hold_no_token_or_key() -> anyhow::Result<()> {
    let key = KeyPair::rsa("rsa-1")?;
    let jwks = JwksServer::start(&[&key]).await?;
    let options = keyed_options().edge("RUST_LOG", "debug").notifier("RUST_LOG", "debug");
    let env = jwks_deployment(&jwks, options).await?;
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let mut secrets = vec![PUBLISHER_KEY.to_owned(), EDGE_KEY.to_owned(), JWT_SECRET.to_owned()];

    // Tokens that connect, by each route a token can take.
    let by_query = key.sign(&claims("query"))?;
    Client::connect_with_token(&env.ws_url(), &by_query).await?;
    let repeated = key.sign(&claims("repeated"))?;
    let url = format!("{}?token={repeated}&token={by_query}", env.ws_url());
    tokio_tungstenite::connect_async(url).await?;
    secrets.push(repeated);
    let by_header = token::hmac_raw(&hs256, &claims("header"), JWT_SECRET.as_bytes())?;
    let mut request = env.ws_url().into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", HeaderValue::from_str(&format!("Bearer {by_header}"))?);
    tokio_tungstenite::connect_async(request).await?;
    let by_protocol = key.sign(&claims("protocol"))?;
    let mut request = env.ws_url().into_client_request()?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("notify.v1, bearer.{by_protocol}"))?,
    );
    tokio_tungstenite::connect_async(request).await?;
    let by_frame = key.sign(&claims("frame"))?;
    let mut client = Client::open(&env.ws_url()).await?;
    client.send(json!({"type": "auth", "token": by_frame})).await?;
    client.expect_type("connected").await?;
    let refresh = key.sign(&claims("frame"))?;
    client.send(json!({"type": "refresh", "token": refresh})).await?;
    client.expect_type("refreshed").await?;
    let bad_refresh = token::bad_signature("frame");
    client.send(json!({"type": "refresh", "token": bad_refresh})).await?;
    client.expect_type("error").await?;
    secrets.extend([by_query, by_header, by_protocol, by_frame, refresh, bad_refresh]);

    // Tokens that are rejected.
    for (_, forged) in forged_tokens(&key, &KeyPair::ec("ec-1")?, &KeyPair::rsa("attacker")?)? {
        rejection_code(&env, &forged).await?;
        secrets.push(forged);
    }
    assert_eq!(publish_code(&env, "news", Some(PUBLISHER_KEY)).await?, Code::Ok);
    assert_eq!(
        publish_code(&env, "news", Some("wrong-key-in-a-log-test")).await?,
        Code::Unauthenticated
    );
    secrets.push("wrong-key-in-a-log-test".into());

    // Let the log forwarders write the last lines, then search every file of this deployment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = read_logs(&env)?;
    ensure!(
        logs.contains("token rejected"),
        "debug logging is not on; the check would prove nothing"
    );
    for secret in &secrets {
        let parts = secret.split('.').filter(|part| part.len() >= 16);
        for needle in std::iter::once(secret.as_str()).chain(parts.skip(1)) {
            assert!(!logs.contains(needle), "a log line holds a token or key part: {needle}");
        }
    }
    Ok(())
}

/// Returns the text of every log file of the deployment.
fn read_logs(env: &TestEnv) -> anyhow::Result<String> {
    let mut logs = String::new();
    let dir = e2e::env::work_dir().join("logs");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
        if name.starts_with(&env.id) {
            logs.push_str(&std::fs::read_to_string(&path)?);
        }
    }
    ensure!(!logs.is_empty(), "no log file for deployment {}", env.id);
    Ok(logs)
}
