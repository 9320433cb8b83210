//! Encoding of an event as a Redis stream entry, and back.
//!
//! The entry id is `0-<seq>`: the sequence number the store assigned in the commit. Redis only
//! accepts ids above the stream's last, so an event can never be appended twice or out of order,
//! and a reader resumes after a sequence number by reading after `0-<seq>`.

use std::borrow::Cow;

use crate::log::LogError;
use crate::pb::Event;

/// Field names of a stream entry.
pub mod field {
    /// Event id.
    pub const ID: &str = "id";
    /// Channel name.
    pub const CHANNEL: &str = "ch";
    /// Event type.
    pub const TYPE: &str = "type";
    /// JSON payload.
    pub const DATA: &str = "data";
    /// Target user, empty for every subscriber.
    pub const USER_ID: &str = "uid";
    /// Commit time in milliseconds since the Unix epoch.
    pub const TS_MS: &str = "ts";
    /// W3C `traceparent` of the publish call.
    pub const TRACEPARENT: &str = "tp";
    /// W3C `tracestate` of the publish call.
    pub const TRACESTATE: &str = "tst";
}

/// Why a stream entry could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The entry id is not of the form `0-<seq>`.
    #[error("entry id {0:?} is not of the form 0-<seq>")]
    BadId(String),
    /// A required field is missing.
    #[error("entry {entry} has no field {field:?}")]
    MissingField {
        /// Entry id.
        entry: String,
        /// Name of the missing field.
        field: &'static str,
    },
    /// A field holds a value that does not parse.
    #[error("entry {entry} has an invalid {field:?} field")]
    InvalidField {
        /// Entry id.
        entry: String,
        /// Name of the invalid field.
        field: &'static str,
    },
}

/// Returns the stream entry id of a sequence number.
pub fn entry_id(seq: u64) -> String {
    format!("0-{seq}")
}

/// Parses the sequence number out of a stream entry id.
///
/// # Errors
/// Fails when the id is not of the form `0-<seq>`.
pub fn seq_of(entry_id: &str) -> Result<u64, DecodeError> {
    entry_id
        .strip_prefix("0-")
        .and_then(|seq| seq.parse().ok())
        .ok_or_else(|| DecodeError::BadId(entry_id.to_owned()))
}

/// Returns the sequence number of a stream's last entry, from the id that
/// `XREVRANGE <key> + - COUNT 1` returned, or 0 when the stream is empty (`last_id` is `None`).
///
/// # Errors
/// Fails with [`LogError::Unavailable`] naming `stream_key` and the id when the id is not of the
/// form `0-<seq>`: the stream contains an entry that no notifier wrote, so neither an append nor a
/// read can trust it as the partition's head.
pub fn last_seq(stream_key: &str, last_id: Option<&str>) -> Result<u64, LogError> {
    let Some(id) = last_id else {
        return Ok(0);
    };
    seq_of(id).map_err(|_| {
        LogError::Unavailable(format!(
            "the last entry of stream {stream_key} has the id {id:?}, which is not of the form 0-<seq>; \
             check that no other program writes under STREAM_PREFIX"
        ))
    })
}

/// Returns the fields of an event's stream entry. Empty optional fields are left out.
pub fn encode_fields(event: &Event) -> Vec<(&'static str, Cow<'_, str>)> {
    let mut fields = vec![
        (field::ID, Cow::Borrowed(event.id.as_str())),
        (field::CHANNEL, Cow::Borrowed(event.channel.as_str())),
        (field::TYPE, Cow::Borrowed(event.r#type.as_str())),
        (field::DATA, Cow::Borrowed(event.data.as_str())),
        (field::TS_MS, Cow::Owned(event.ts_ms.to_string())),
    ];
    let optional = [
        (field::USER_ID, event.user_id.as_str()),
        (field::TRACEPARENT, &event.traceparent),
        (field::TRACESTATE, &event.tracestate),
    ];
    fields.extend(
        optional
            .into_iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| (name, Cow::Borrowed(value))),
    );
    fields
}

/// Decodes a stream entry of a partition from its id and fields.
///
/// # Errors
/// Fails on a malformed id, a missing required field or a field that is not UTF-8.
pub fn decode<'a, I>(partition: u32, entry: &str, fields: I) -> Result<Event, DecodeError>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
{
    let mut event = Event {
        partition,
        seq: seq_of(entry)?,
        ..Event::default()
    };
    let mut seen_ts = false;
    for (name, value) in fields {
        let text = || {
            String::from_utf8(value.to_vec()).map_err(|_| DecodeError::InvalidField {
                entry: entry.to_owned(),
                field: known_name(name),
            })
        };
        match name {
            b"id" => event.id = text()?,
            b"ch" => event.channel = text()?,
            b"type" => event.r#type = text()?,
            b"data" => event.data = text()?,
            b"uid" => event.user_id = text()?,
            b"tp" => event.traceparent = text()?,
            b"tst" => event.tracestate = text()?,
            b"ts" => {
                event.ts_ms = text()?.parse().map_err(|_| DecodeError::InvalidField {
                    entry: entry.to_owned(),
                    field: field::TS_MS,
                })?;
                seen_ts = true;
            }
            _ => {}
        }
    }
    require(entry, field::ID, !event.id.is_empty())?;
    require(entry, field::CHANNEL, !event.channel.is_empty())?;
    require(entry, field::TYPE, !event.r#type.is_empty())?;
    require(entry, field::TS_MS, seen_ts)?;
    Ok(event)
}

fn require(entry: &str, field: &'static str, present: bool) -> Result<(), DecodeError> {
    if present {
        Ok(())
    } else {
        Err(DecodeError::MissingField {
            entry: entry.to_owned(),
            field,
        })
    }
}

fn known_name(name: &[u8]) -> &'static str {
    [
        field::ID,
        field::CHANNEL,
        field::TYPE,
        field::DATA,
        field::USER_ID,
        field::TS_MS,
        field::TRACEPARENT,
        field::TRACESTATE,
    ]
    .into_iter()
    .find(|known| known.as_bytes() == name)
    .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips() {
        let event = Event {
            id: "0193".into(),
            partition: 3,
            seq: 42,
            channel: "news".into(),
            r#type: "post.created".into(),
            data: r#"{"t":"שלום"}"#.into(),
            user_id: "u1".into(),
            ts_ms: 1_700_000_000_000,
            traceparent: "00-abc-def-01".into(),
            tracestate: String::new(),
        };
        let encoded = encode_fields(&event);
        let fields = encoded.iter().map(|(name, value)| (name.as_bytes(), value.as_bytes()));
        assert_eq!(decode(3, &entry_id(42), fields), Ok(event));
    }

    #[test]
    fn bad_entries_are_rejected() {
        assert_eq!(seq_of("1700-0"), Err(DecodeError::BadId("1700-0".into())));
        let fields: Vec<(&[u8], &[u8])> = vec![(b"id", b"x")];
        assert_eq!(
            decode(0, "0-1", fields),
            Err(DecodeError::MissingField {
                entry: "0-1".into(),
                field: field::CHANNEL
            })
        );
    }

    #[test]
    fn last_seq_reads_the_last_id() {
        assert_eq!(last_seq("notify:{p0}", None).ok(), Some(0));
        assert_eq!(last_seq("notify:{p0}", Some("0-42")).ok(), Some(42));
    }

    #[test]
    fn last_seq_rejects_a_foreign_id() {
        for id in ["1700000000000-0", "0-", "0-x", ""] {
            let Err(LogError::Unavailable(message)) = last_seq("notify:{p3}", Some(id)) else {
                panic!("id {id:?} was accepted");
            };
            assert!(message.contains("notify:{p3}"), "{message}");
            assert!(message.contains(&format!("{id:?}")), "{message}");
        }
    }
}
