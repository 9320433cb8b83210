//! API keys of the gRPC callers: publishers (`PUBLISHER_KEYS`) and edges (`EDGE_KEYS`).
//!
//! A caller sends its key as `authorization: Bearer <key>` metadata. The configuration holds
//! only SHA-256 hashes of the keys, so a leaked configuration does not leak a key; `notifier
//! hash-key` prints the hash of a key. A publisher key may be limited to channel prefixes.
//!
//! | call | publisher key | edge key |
//! |---|---|---|
//! | `Publish` | within its prefixes | no |
//! | `History` | within its prefixes | yes |
//! | `ReadPartition`, `Heads` | no | yes |
//!
//! With neither variable set, every call is allowed without a key, and the notifier logs a
//! warning at start. With either set, every call needs a key.

use notify_proto::auth_header::bearer_credentials;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// A key hash: SHA-256 of the key's UTF-8 bytes.
pub type KeyHash = [u8; 32];

/// Returns the SHA-256 hash of a key, as configured in `PUBLISHER_KEYS` and `EDGE_KEYS`.
pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Returns a hash as lowercase hex, the form the configuration takes.
pub fn hex(hash: &KeyHash) -> String {
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A configured publisher key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PublisherKey {
    hash: KeyHash,
    /// Channel prefixes the key may publish to and read; empty allows every channel.
    prefixes: Vec<String>,
}

/// The identity of a caller, once its key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No keys are configured: every call is allowed.
    Open,
    /// A publisher, with the hash of its key and the prefixes it may use (empty: all).
    Publisher {
        /// Hash of the key, for rate limits and logs.
        hash: KeyHash,
        /// Allowed channel prefixes; empty allows every channel.
        prefixes: Vec<String>,
    },
    /// An edge, with the hash of its key.
    Edge {
        /// Hash of the key, for rate limits and logs.
        hash: KeyHash,
    },
}

impl Caller {
    /// Returns the hash of the caller's key, or `None` when keys are off.
    pub fn key_hash(&self) -> Option<&KeyHash> {
        match self {
            Caller::Open => None,
            Caller::Publisher { hash, .. } | Caller::Edge { hash } => Some(hash),
        }
    }

    /// Returns the scope of the caller's idempotency keys: the hex hash of its API key, or an
    /// empty string, one scope shared by every caller, when keys are off.
    pub fn idempotency_scope(&self) -> String {
        self.key_hash().map(hex).unwrap_or_default()
    }

    /// Checks that the caller may publish to `channel`.
    ///
    /// # Errors
    /// `PERMISSION_DENIED` for an edge key or a channel outside the key's prefixes.
    pub fn may_publish(&self, channel: &str) -> Result<(), Status> {
        match self {
            Caller::Open => Ok(()),
            Caller::Publisher { prefixes, .. } => check_prefixes(prefixes, channel),
            Caller::Edge { .. } => Err(Status::permission_denied(
                "an edge key may not publish; publish with a key whose hash is in PUBLISHER_KEYS",
            )),
        }
    }

    /// Checks that the caller may read the history of `channel`.
    ///
    /// # Errors
    /// `PERMISSION_DENIED` for a channel outside a publisher key's prefixes.
    pub fn may_read_channel(&self, channel: &str) -> Result<(), Status> {
        match self {
            Caller::Open | Caller::Edge { .. } => Ok(()),
            Caller::Publisher { prefixes, .. } => check_prefixes(prefixes, channel),
        }
    }

    /// Checks that the caller may read whole partitions (`ReadPartition`, `Heads`).
    ///
    /// # Errors
    /// `PERMISSION_DENIED` for a publisher key.
    pub fn may_read_partitions(&self) -> Result<(), Status> {
        match self {
            Caller::Open | Caller::Edge { .. } => Ok(()),
            Caller::Publisher { .. } => Err(Status::permission_denied(
                "ReadPartition and Heads need an edge key (EDGE_KEYS)",
            )),
        }
    }
}

fn check_prefixes(prefixes: &[String], channel: &str) -> Result<(), Status> {
    if prefixes.is_empty() || prefixes.iter().any(|prefix| channel.starts_with(prefix.as_str())) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "the API key may not use channel {channel:?}; it is limited to the prefixes {prefixes:?}"
        )))
    }
}

/// The configured keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiKeys {
    publishers: Vec<PublisherKey>,
    edges: Vec<KeyHash>,
}

impl ApiKeys {
    /// Parses `PUBLISHER_KEYS` entries (`<sha256 hex>` or `<sha256 hex>:<prefix>|<prefix>`) and
    /// `EDGE_KEYS` entries (`<sha256 hex>`). A trailing `*` on a prefix is ignored, so
    /// `orders:*` and `orders:` both allow `orders:eu`.
    ///
    /// # Errors
    /// Fails on an entry that is not a 64-digit hex hash, naming the variable and the entry's
    /// position (never its text, which might be a key pasted by mistake).
    pub fn parse(publisher_keys: &[String], edge_keys: &[String]) -> anyhow::Result<Self> {
        let mut keys = Self::default();
        for (index, entry) in non_empty(publisher_keys).enumerate() {
            let (hash, prefixes) = entry.split_once(':').unwrap_or((entry, ""));
            let prefixes = prefixes
                .split('|')
                .map(|prefix| prefix.trim().trim_end_matches('*').to_owned())
                .filter(|prefix| !prefix.is_empty())
                .collect();
            let hash = parse_hash(hash).ok_or_else(|| invalid_entry("PUBLISHER_KEYS", index))?;
            keys.publishers.push(PublisherKey { hash, prefixes });
        }
        for (index, entry) in non_empty(edge_keys).enumerate() {
            keys.edges
                .push(parse_hash(entry).ok_or_else(|| invalid_entry("EDGE_KEYS", index))?);
        }
        Ok(keys)
    }

    /// Returns whether any key is configured, so that calls need one.
    pub fn is_enabled(&self) -> bool {
        !self.publishers.is_empty() || !self.edges.is_empty()
    }

    /// Identifies the caller by the key in its `authorization` metadata.
    ///
    /// The presented key's hash is compared with every configured hash in constant time, and
    /// all of them are compared, so the time taken does not tell which hash matched.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` when keys are configured and the metadata has no key or an unknown one.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        if !self.is_enabled() {
            return Ok(Caller::Open);
        }
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "missing API key; send the metadata authorization: Bearer <key>",
            ));
        };
        let key = value.to_str().ok().and_then(bearer_credentials).ok_or_else(|| {
            Status::unauthenticated(
                "the authorization metadata is not Bearer and a key of printable ASCII; send authorization: Bearer \
                 <key>",
            )
        })?;
        let presented = hash_key(key.trim());

        let mut caller = None;
        for publisher in &self.publishers {
            if bool::from(publisher.hash.ct_eq(&presented)) {
                caller = Some(Caller::Publisher {
                    hash: presented,
                    prefixes: publisher.prefixes.clone(),
                });
            }
        }
        for edge in &self.edges {
            if bool::from(edge.ct_eq(&presented)) && caller.is_none() {
                caller = Some(Caller::Edge { hash: presented });
            }
        }
        caller.ok_or_else(|| {
            Status::unauthenticated(
                "invalid API key: its SHA-256 hash is in neither PUBLISHER_KEYS nor EDGE_KEYS; send a configured key",
            )
        })
    }
}

fn non_empty(entries: &[String]) -> impl Iterator<Item = &str> {
    entries
        .iter()
        .map(|entry| entry.trim())
        .filter(|entry| !entry.is_empty())
}

fn parse_hash(text: &str) -> Option<KeyHash> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(text.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(hash)
}

fn invalid_entry(variable: &str, index: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "{variable} entry {} is not a SHA-256 hash of 64 hex digits; configure hashes, not keys \
         (`notifier hash-key` prints the hash of a key)",
        index + 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(key: Option<&str>) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        if let Some(key) = key {
            let value = format!("Bearer {key}").parse().expect("ASCII metadata");
            metadata.insert("authorization", value);
        }
        metadata
    }

    fn keys() -> ApiKeys {
        let publishers = [
            hex(&hash_key("all-channels")),
            format!("{}:orders:|billing:*", hex(&hash_key("orders-only"))),
        ];
        ApiKeys::parse(&publishers, &[hex(&hash_key("edge-key"))]).expect("valid entries")
    }

    #[test]
    fn hash_matches_sha256() {
        // SHA-256 of "abc", from FIPS 180-2 appendix B.1.
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hex(&hash_key("abc")), expected);
    }

    #[test]
    fn no_keys_allow_every_call() {
        let open = ApiKeys::parse(&[], &[" ".into()]).expect("empty entries");
        assert!(!open.is_enabled());
        assert!(matches!(open.authenticate(&metadata(None)), Ok(Caller::Open)));
    }

    #[test]
    fn missing_and_unknown_keys_are_unauthenticated() {
        let keys = keys();
        for presented in [None, Some("wrong"), Some("")] {
            let status = keys.authenticate(&metadata(presented)).expect_err("rejected");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{presented:?}");
        }
    }

    #[test]
    fn unauthenticated_message_names_the_fix() {
        let keys = keys();
        let missing = keys.authenticate(&metadata(None)).expect_err("no key");
        assert!(
            missing.message().starts_with("missing API key"),
            "{}",
            missing.message()
        );

        let mut basic = MetadataMap::new();
        basic.insert("authorization", "Basic edge-key".parse().expect("ASCII metadata"));
        let status = keys.authenticate(&basic).expect_err("not Bearer");
        assert!(status.message().contains("is not Bearer"), "{}", status.message());

        let mut not_ascii = MetadataMap::new();
        let value = tonic::metadata::MetadataValue::try_from("Bearer k\u{e9}y".as_bytes()).expect("obs-text value");
        not_ascii.insert("authorization", value);
        let status = keys.authenticate(&not_ascii).expect_err("not ASCII");
        assert!(status.message().contains("printable ASCII"), "{}", status.message());

        let unknown = keys.authenticate(&metadata(Some("wrong"))).expect_err("unknown key");
        assert!(unknown.message().contains("PUBLISHER_KEYS"), "{}", unknown.message());
    }

    #[test]
    fn bearer_scheme_ignores_case() {
        let keys = keys();
        for scheme in ["bearer", "BEARER", "Bearer"] {
            let mut metadata = MetadataMap::new();
            let value = format!("{scheme} edge-key").parse().expect("ASCII metadata");
            metadata.insert("authorization", value);
            let caller = keys.authenticate(&metadata);
            assert!(matches!(caller, Ok(Caller::Edge { .. })), "{scheme}");
        }
    }

    #[test]
    fn prefixes_limit_publishing_and_history() {
        let caller = keys().authenticate(&metadata(Some("orders-only"))).expect("known key");
        assert!(caller.may_publish("orders:eu").is_ok());
        assert!(caller.may_publish("billing:1").is_ok());
        let denied = caller.may_publish("news").expect_err("outside the prefixes");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(caller.may_read_channel("news").is_err());
        assert!(caller.may_read_partitions().is_err());

        let unlimited = keys().authenticate(&metadata(Some("all-channels"))).expect("known key");
        assert!(unlimited.may_publish("news").is_ok());
    }

    #[test]
    fn idempotency_scope_is_per_key() {
        let orders = keys().authenticate(&metadata(Some("orders-only"))).expect("known key");
        let all = keys().authenticate(&metadata(Some("all-channels"))).expect("known key");
        assert_eq!(orders.idempotency_scope(), hex(&hash_key("orders-only")));
        assert_ne!(orders.idempotency_scope(), all.idempotency_scope());
        assert_eq!(Caller::Open.idempotency_scope(), "");
    }

    #[test]
    fn edge_key_reads_but_does_not_publish() {
        let edge = keys().authenticate(&metadata(Some("edge-key"))).expect("known key");
        assert!(matches!(edge, Caller::Edge { .. }));
        assert!(edge.may_read_partitions().is_ok());
        assert!(edge.may_read_channel("anything").is_ok());
        assert_eq!(
            edge.may_publish("news").map_err(|status| status.code()),
            Err(tonic::Code::PermissionDenied)
        );
    }

    #[test]
    fn plain_keys_in_configuration_are_rejected() {
        let err = ApiKeys::parse(&["my-secret-key".into()], &[]).expect_err("not a hash");
        let message = err.to_string();
        assert!(message.contains("PUBLISHER_KEYS entry 1"), "{message}");
        assert!(!message.contains("my-secret-key"), "{message}");
        assert!(ApiKeys::parse(&[], &["zz".repeat(32)]).is_err());
    }
}
