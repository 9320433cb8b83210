//! The claims of a client token. The edge verifies them; the `token` command mints them for
//! development.

use serde::{Deserialize, Serialize};

/// Claims of a client JWT.
///
/// `sub` and `exp` are required. `channels` grants channels beyond the public ones: an entry is
/// either an exact channel name or a prefix ending in `*` (`orders:*` grants `orders:eu`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id. The user's own channel is `user:<sub>`.
    pub sub: String,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Channel names and prefixes (ending in `*`) the token grants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
}

impl Claims {
    /// Returns whether the `channels` claim grants a channel, by exact name or `*` prefix.
    pub fn grants(&self, channel: &str) -> bool {
        self.channels.iter().any(|grant| match grant.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => grant == channel,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_match_exact_names_and_prefixes() {
        let claims = Claims {
            sub: "u".into(),
            exp: 0,
            iat: None,
            channels: vec!["news".into(), "orders:*".into()],
        };
        assert!(claims.grants("news"));
        assert!(!claims.grants("news2"));
        assert!(claims.grants("orders:eu"));
        assert!(!claims.grants("order"));
    }
}
