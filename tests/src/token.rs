//! Client tokens for the tests: valid ones signed with the deployment's secret, and forged ones.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
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

/// Returns a valid token for `user` that grants `channels`.
pub fn valid(user: &str, channels: &[&str]) -> String {
    sign(&claims(user, channels), JWT_SECRET)
}

/// Returns a token signed with another secret.
pub fn bad_signature(user: &str) -> String {
    sign(&claims(user, &[]), "not-the-deployment-secret-0123456789")
}

/// Returns a token that expired a minute ago, beyond any reasonable leeway.
pub fn expired(user: &str) -> String {
    let mut claims = claims(user, &[]);
    claims.exp = now() - 60;
    sign(&claims, JWT_SECRET)
}

/// Returns an unsigned token with header `{"alg":"none"}`.
pub fn alg_none(user: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64.encode(serde_json::to_vec(&claims(user, &[])).unwrap_or_default());
    format!("{header}.{payload}.")
}

/// Encodes bytes as unpadded base64url, the encoding of a JWT's parts.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs any JSON header and claims with an HMAC secret, without checking the header: for tokens
/// that carry fields a well-behaved issuer would not set.
///
/// # Errors
/// Fails when the secret is empty or the header names an algorithm that is not HMAC.
pub fn hmac_raw(header: &serde_json::Value, claims: &serde_json::Value, secret: &[u8]) -> anyhow::Result<String> {
    let algorithm: Algorithm = serde_json::from_value(header["alg"].clone())?;
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = EncodingKey::from_secret(secret)?;
    let signature = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, algorithm)?;
    Ok(format!("{signing_input}.{signature}"))
}

/// An RSA or P-256 key pair generated for one test by the `openssl` command, with the public
/// key in the forms an attacker could use as an HMAC secret.
pub struct KeyPair {
    /// The key id published in the JWKS and set in the token header.
    pub kid: String,
    /// RS256 or ES256.
    pub algorithm: Algorithm,
    encoding: EncodingKey,
    /// The public key as PEM (SubjectPublicKeyInfo).
    pub public_pem: Vec<u8>,
    /// The public key as DER (SubjectPublicKeyInfo).
    pub public_der: Vec<u8>,
}

impl KeyPair {
    /// Generates a 2048-bit RSA key for RS256.
    ///
    /// # Errors
    /// Fails when `openssl` is missing or fails.
    pub fn rsa(kid: &str) -> anyhow::Result<Self> {
        let private = openssl(
            &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            b"",
        )?;
        Self::from_private_pem(kid, Algorithm::RS256, &private, EncodingKey::from_rsa_pem(&private)?)
    }

    /// Generates a P-256 key for ES256.
    ///
    /// # Errors
    /// Fails when `openssl` is missing or fails.
    pub fn ec(kid: &str) -> anyhow::Result<Self> {
        let private = openssl(
            &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            b"",
        )?;
        Self::from_private_pem(kid, Algorithm::ES256, &private, EncodingKey::from_ec_pem(&private)?)
    }

    fn from_private_pem(
        kid: &str,
        algorithm: Algorithm,
        private: &[u8],
        encoding: EncodingKey,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            kid: kid.to_owned(),
            algorithm,
            encoding,
            public_pem: openssl(&["pkey", "-pubout"], private)?,
            public_der: openssl(&["pkey", "-pubout", "-outform", "DER"], private)?,
        })
    }

    /// Returns the public key as a JWK with `kid`, `alg` and `use: sig`.
    ///
    /// # Errors
    /// Fails when jsonwebtoken cannot derive the public key.
    pub fn jwk(&self) -> anyhow::Result<serde_json::Value> {
        let mut jwk = serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(
            &self.encoding,
            self.algorithm,
        )?)?;
        jwk["kid"] = self.kid.clone().into();
        jwk["use"] = "sig".into();
        Ok(jwk)
    }

    /// Signs claims with this key, naming it in the header's `kid`.
    ///
    /// # Errors
    /// Fails when the claims do not serialize.
    pub fn sign(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        self.sign_with_header(&header, claims)
    }

    /// Signs claims with this key under any header.
    ///
    /// # Errors
    /// Fails when the claims do not serialize or the header's algorithm does not fit the key.
    pub fn sign_with_header(&self, header: &Header, claims: &serde_json::Value) -> anyhow::Result<String> {
        Ok(encode(header, claims, &self.encoding)?)
    }
}

/// Returns a JWK set document holding the keys' public halves.
///
/// # Errors
/// Fails when a key's JWK cannot be derived.
pub fn jwks(keys: &[&KeyPair]) -> anyhow::Result<String> {
    let keys = keys.iter().map(|key| key.jwk()).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(serde_json::json!({ "keys": keys }).to_string())
}

fn openssl(args: &[&str], input: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| anyhow::anyhow!("run openssl {args:?}: {err}; the key tests need the openssl command"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input)?;
    }
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output.stdout)
}
