//! The `Origin` allow-list of the WebSocket upgrade (`ALLOWED_ORIGINS`).
//!
//! Browsers send `Origin` on every WebSocket handshake, and a page on another site can open a
//! socket to the edge just as the real app can. With an allow-list, the edge rejects a handshake
//! from any other origin with 403 before upgrading. Origins match by scheme, host and port, after
//! the default port of the scheme is filled in: `https://app.example.com:443` is
//! `https://app.example.com`, while `http://app.example.com` is another origin.
//!
//! A request without `Origin` comes from a client that is not a browser, which no page can
//! steer, so it is allowed; such a client still needs a valid token.

use std::collections::HashSet;

use anyhow::Context;
use warp::http::Uri;

/// One origin: lowercase scheme and host, and the port with the scheme's default filled in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// Parses `scheme://host[:port]`; a path, query, user info or unknown scheme makes it invalid.
    fn parse(value: &str) -> Option<Self> {
        let uri: Uri = value.trim().parse().ok()?;
        let authority = uri.authority()?;
        if authority.as_str().contains('@') || uri.query().is_some() || !matches!(uri.path(), "" | "/") {
            return None;
        }
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        Some(Self {
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(default_port),
            scheme,
        })
    }
}

/// The allowed origins, or every origin.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// `None` allows every origin.
    allowed: Option<HashSet<Origin>>,
}

impl OriginPolicy {
    /// Builds the policy from `ALLOWED_ORIGINS` entries. No entries, or an entry `*`, allow every
    /// origin.
    ///
    /// # Errors
    /// Fails on an entry that is not `http(s)://host[:port]`, naming it.
    pub fn new<'a>(entries: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Self> {
        let mut allowed = HashSet::new();
        for entry in entries.into_iter().map(str::trim).filter(|entry| !entry.is_empty()) {
            if entry == "*" {
                return Ok(Self { allowed: None });
            }
            let origin = Origin::parse(entry).with_context(|| {
                format!("ALLOWED_ORIGINS entry {entry:?} is not an origin like https://app.example.com")
            })?;
            allowed.insert(origin);
        }
        Ok(Self {
            allowed: (!allowed.is_empty()).then_some(allowed),
        })
    }

    /// Returns whether a handshake with this `Origin` header (or none) may upgrade.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let (Some(allowed), Some(origin)) = (&self.allowed, origin) else {
            return true;
        };
        Origin::parse(origin).is_some_and(|origin| allowed.contains(&origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> OriginPolicy {
        OriginPolicy::new(entries.iter().copied()).expect("valid entries")
    }

    #[test]
    fn origins_match_scheme_host_and_port() {
        let policy = policy(&["https://app.example.com", "http://localhost:3000"]);
        let cases = [
            ("https://app.example.com", true),
            ("https://app.example.com:443", true),
            ("HTTPS://App.Example.com", true),
            ("http://app.example.com", false),
            ("https://app.example.com:8443", false),
            ("https://app.example.com.evil.test", false),
            ("https://evil.test", false),
            ("https://sub.app.example.com", false),
            ("http://localhost:3000", true),
            ("http://localhost", false),
            ("null", false),
            ("", false),
            ("https://app.example.com/path", false),
        ];
        for (origin, expected) in cases {
            assert_eq!(policy.allows(Some(origin)), expected, "origin {origin:?}");
        }
    }

    #[test]
    fn missing_origin_is_allowed() {
        assert!(policy(&["https://app.example.com"]).allows(None));
    }

    #[test]
    fn empty_list_and_star_allow_all() {
        assert!(policy(&[]).allows(Some("https://anything.test")));
        assert!(policy(&["", " "]).allows(Some("https://anything.test")));
        assert!(policy(&["https://app.example.com", "*"]).allows(Some("https://anything.test")));
    }

    #[test]
    fn configured_default_port_matches_bare_origin() {
        assert!(policy(&["https://app.example.com:443"]).allows(Some("https://app.example.com")));
        assert!(policy(&["http://app.example.com:80"]).allows(Some("http://app.example.com")));
    }

    #[test]
    fn invalid_entries_are_rejected() {
        for entry in [
            "app.example.com",
            "ftp://files.example.com",
            "https://app.example.com/login",
        ] {
            let err = OriginPolicy::new([entry])
                .err()
                .map(|err| err.to_string())
                .unwrap_or_default();
            assert!(err.contains("ALLOWED_ORIGINS"), "{entry}: {err}");
        }
    }
}
