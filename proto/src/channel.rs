//! Channel names, event types and the mapping of a channel to its stream partition.
//!
//! A channel name is 1 to 255 bytes of ASCII letters, digits and `_ - : . @`. The part before the
//! first `:` is the channel's namespace (`user:42` is in namespace `user`; `news` has none).

use crate::protocol::RESERVED_TYPES;

/// Maximum length of a channel name in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Maximum length of an event type in bytes.
pub const MAX_TYPE_LEN: usize = 64;

/// Default number of stream partitions. Notifier and edges must use the same number.
pub const DEFAULT_PARTITIONS: u32 = 16;

/// Namespace of the per-user channels `user:<sub>`.
pub const USER_NAMESPACE: &str = "user";

/// Why a channel name or event type was rejected. The message names the value's rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The value is empty.
    #[error("must not be empty")]
    Empty,
    /// The value is longer than allowed.
    #[error("is {len} bytes long, the maximum is {max} bytes")]
    TooLong {
        /// Length of the value in bytes.
        len: usize,
        /// Maximum length in bytes.
        max: usize,
    },
    /// The value contains a character outside the grammar.
    #[error("contains {found:?} at byte {at}; allowed are ASCII letters, digits and _ - : . @")]
    InvalidChar {
        /// The first character outside the grammar.
        found: char,
        /// Its byte offset.
        at: usize,
    },
    /// The event type is one of the client protocol's own frame types.
    #[error("{0:?} is a reserved frame type of the client protocol; choose another name")]
    Reserved(String),
}

/// Checks a channel name against the grammar.
///
/// # Errors
/// Returns the first rule the name breaks.
pub fn validate_channel(name: &str) -> Result<(), NameError> {
    check_length(name, MAX_CHANNEL_LEN)?;
    check_chars(name)
}

/// Checks an event type: the channel grammar, at most 64 bytes, and not a reserved frame type.
///
/// # Errors
/// Returns the first rule the type breaks.
pub fn validate_event_type(event_type: &str) -> Result<(), NameError> {
    check_length(event_type, MAX_TYPE_LEN)?;
    check_chars(event_type)?;
    if RESERVED_TYPES.contains(&event_type) {
        return Err(NameError::Reserved(event_type.to_owned()));
    }
    Ok(())
}

fn check_length(value: &str, max: usize) -> Result<(), NameError> {
    match value.len() {
        0 => Err(NameError::Empty),
        len if len > max => Err(NameError::TooLong { len, max }),
        _ => Ok(()),
    }
}

fn check_chars(value: &str) -> Result<(), NameError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '@');
    match value.char_indices().find(|&(_, c)| !allowed(c)) {
        Some((at, found)) => Err(NameError::InvalidChar { found, at }),
        None => Ok(()),
    }
}

/// Returns the namespace of a channel: the part before the first `:`, if there is one.
pub fn namespace(channel: &str) -> Option<&str> {
    channel.split_once(':').map(|(ns, _)| ns)
}

/// Maps a channel to its partition with 64-bit FNV-1a, which is stable across builds and
/// platforms, so that every notifier and edge agrees.
pub fn partition_of(channel: &str, partitions: u32) -> u32 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = channel
        .bytes()
        .fold(OFFSET_BASIS, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME));
    (hash % u64::from(partitions.max(1))) as u32
}

/// Returns the Redis key of a partition's stream. The braces are a Redis Cluster hash tag, so
/// each partition maps to one slot.
pub fn stream_key(prefix: &str, partition: u32) -> String {
    format!("{prefix}:{{p{partition}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_grammar_accepts_allowed_characters() {
        assert_eq!(validate_channel("news"), Ok(()));
        assert_eq!(validate_channel("user:42"), Ok(()));
        assert_eq!(validate_channel("orders:eu-1.a_b@x"), Ok(()));
        assert_eq!(validate_channel(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn channel_grammar_rejects_bad_names() {
        assert_eq!(validate_channel(""), Err(NameError::Empty));
        assert_eq!(
            validate_channel(&"a".repeat(256)),
            Err(NameError::TooLong { len: 256, max: 255 })
        );
        assert_eq!(
            validate_channel("a b"),
            Err(NameError::InvalidChar { found: ' ', at: 1 })
        );
        assert_eq!(
            validate_channel("חדשות"),
            Err(NameError::InvalidChar { found: 'ח', at: 0 })
        );
    }

    #[test]
    fn event_type_rejects_reserved_frames() {
        assert_eq!(validate_event_type("post.created"), Ok(()));
        assert_eq!(
            validate_event_type("subscribed"),
            Err(NameError::Reserved("subscribed".into()))
        );
        assert_eq!(
            validate_event_type(&"t".repeat(65)),
            Err(NameError::TooLong { len: 65, max: 64 })
        );
    }

    #[test]
    fn partition_is_stable() {
        assert_eq!(partition_of("news", 16), partition_of("news", 16));
        assert!(partition_of("news", 16) < 16);
        let spread: std::collections::HashSet<u32> = (0..200).map(|i| partition_of(&format!("c{i}"), 16)).collect();
        assert_eq!(spread.len(), 16);
    }

    #[test]
    fn namespace_is_prefix_before_colon() {
        assert_eq!(namespace("user:42"), Some("user"));
        assert_eq!(namespace("news"), None);
    }
}
