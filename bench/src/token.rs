//! HS256 client tokens, signed with the secret the edge verifies.

use std::time::Duration;

use anyhow::Context;
use jsonwebtoken::{EncodingKey, Header, encode};
use notify_proto::claims::Claims;

/// Signs client tokens for benchmark users.
pub struct TokenMinter {
    key: EncodingKey,
    lifetime: Duration,
}

impl TokenMinter {
    /// Creates a minter whose tokens expire `lifetime` after they are minted.
    ///
    /// # Errors
    /// Fails when the secret is empty.
    pub fn new(secret: &str, lifetime: Duration) -> anyhow::Result<Self> {
        let key = EncodingKey::from_secret(secret.as_bytes()).context("invalid JWT secret")?;
        Ok(Self { key, lifetime })
    }

    /// Mints a token for `user` that grants no channels beyond the public ones.
    ///
    /// # Errors
    /// Fails when the claims cannot be signed.
    pub fn mint(&self, user: &str) -> anyhow::Result<String> {
        let now = crate::unix_micros() / 1_000_000;
        let claims = Claims {
            sub: user.to_owned(),
            exp: now + self.lifetime.as_secs(),
            iat: Some(now),
            channels: Vec::new(),
        };
        encode(&Header::default(), &claims, &self.key).context("sign a client token")
    }
}
