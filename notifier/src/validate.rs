//! Checks of a publish request and of the trace context in its metadata. Every rejection is an
//! [`Error::InvalidArgument`] whose message names the field, the rule and what to do.

use notify_proto::channel::{NameError, validate_channel, validate_event_type};
use notify_proto::pb::PublishRequest;
use serde_json::value::RawValue;
use tonic::metadata::MetadataMap;

use crate::error::Error;
use crate::store::NewEvent;

/// Maximum length of `user_id` in bytes.
pub const MAX_USER_ID_LEN: usize = 255;
/// Maximum length of `idempotency_key` in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Maximum length of a `traceparent` value kept with an event. Version 00 is 55 bytes; later
/// versions may append fields.
pub const MAX_TRACEPARENT_LEN: usize = 128;
/// Maximum length of a `tracestate` value kept with an event, in bytes. A longer value is
/// dropped.
pub const MAX_TRACESTATE_LEN: usize = 512;

/// W3C trace context of a publish call, empty where the caller sent none or an invalid value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// The `traceparent` header.
    pub traceparent: String,
    /// The `tracestate` header.
    pub tracestate: String,
}

/// Checks a publish request and returns the event to commit.
///
/// # Errors
/// Returns [`Error::InvalidArgument`] for the first field that breaks a rule.
pub fn publish_request(
    request: PublishRequest,
    trace: TraceContext,
    max_payload_bytes: usize,
) -> Result<NewEvent, Error> {
    validate_channel(&request.channel).map_err(|err| name_error("channel", &err))?;
    validate_event_type(&request.r#type).map_err(|err| name_error("type", &err))?;
    check_data(&request.data, max_payload_bytes)?;
    check_text("user_id", &request.user_id, MAX_USER_ID_LEN)?;
    check_text("idempotency_key", &request.idempotency_key, MAX_IDEMPOTENCY_KEY_LEN)?;
    Ok(NewEvent {
        channel: request.channel,
        event_type: request.r#type,
        data: request.data,
        user_id: request.user_id,
        idempotency_key: Some(request.idempotency_key).filter(|key| !key.is_empty()),
        // The service sets the caller's scope; validation does not know the caller.
        idempotency_scope: String::new(),
        traceparent: trace.traceparent,
        tracestate: trace.tracestate,
    })
}

fn name_error(field: &str, err: &NameError) -> Error {
    let fix = match err {
        NameError::Empty => format!("; set {field}"),
        NameError::TooLong { .. } => format!("; shorten {field}"),
        NameError::InvalidChar { .. } | NameError::Reserved(_) => String::new(),
    };
    Error::InvalidArgument(format!("{field} {err}{fix}"))
}

fn check_data(data: &str, max_payload_bytes: usize) -> Result<(), Error> {
    if data.len() > max_payload_bytes {
        return Err(Error::InvalidArgument(format!(
            "data is {} bytes long, the maximum is {max_payload_bytes} bytes; send a smaller payload, for example \
             an id the client fetches the rest with",
            data.len()
        )));
    }
    if data.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "data must not be empty; send a JSON text, for example {} or null".to_owned(),
        ));
    }
    // The edge embeds the payload in client frames as a `RawValue`, so check with the same type.
    match serde_json::from_str::<&RawValue>(data) {
        Ok(_) => Ok(()),
        Err(err) => Err(Error::InvalidArgument(format!(
            "data is not valid JSON ({err}); send a JSON text, for example {{\"id\":42}}"
        ))),
    }
}

/// Largest position a store can hold: sequence numbers are stored as signed 64-bit integers.
pub const MAX_POSITION: u64 = i64::MAX as u64;

/// Checks a position a caller sent (`History.since`, `ReadPartition.after`). A value above
/// [`MAX_POSITION`] can never be reached, so it is rejected instead of being read as "nothing
/// newer".
///
/// # Errors
/// Returns [`Error::InvalidArgument`] naming the field and the value.
pub fn position(field: &str, value: u64) -> Result<u64, Error> {
    if value > MAX_POSITION {
        return Err(Error::InvalidArgument(format!(
            "{field} {value} is above the largest position a store can hold ({MAX_POSITION}); send the \
             position of the last event you received, or 0 for the oldest retained event"
        )));
    }
    Ok(value)
}

/// Checks an optional free-text field: at most `max` bytes and no control characters, which
/// PostgreSQL rejects (NUL) or which would break log lines.
fn check_text(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::InvalidArgument(format!(
            "{field} is {} bytes long, the maximum is {max} bytes; shorten {field}",
            value.len()
        )));
    }
    match value.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, found)) => Err(Error::InvalidArgument(format!(
            "{field} contains the control character {found:?} at byte {at}; use printable characters only"
        ))),
        None => Ok(()),
    }
}

/// Reads the W3C trace context from request metadata. A `traceparent` that breaks a rule of
/// [`traceparent_error`] is dropped with its `tracestate`, and the call starts a new trace
/// instead of failing, because tracing is best effort. A `tracestate` that is too long or not
/// printable ASCII is dropped alone.
pub fn trace_context(metadata: &MetadataMap) -> TraceContext {
    let header = |name| metadata.get(name).and_then(|value| value.to_str().ok()).unwrap_or("");
    let traceparent = header("traceparent");
    let tracestate = header("tracestate");
    let mut trace = TraceContext::default();
    if traceparent.is_empty() {
        return trace;
    }
    if let Some(reason) = traceparent_error(traceparent) {
        let shown = traceparent.get(..MAX_TRACEPARENT_LEN).unwrap_or(traceparent);
        tracing::debug!(
            traceparent = shown,
            reason,
            "ignoring an invalid traceparent; starting a new trace"
        );
        return trace;
    }
    trace.traceparent = traceparent.to_owned();
    if is_tracestate(tracestate) {
        trace.tracestate = tracestate.to_owned();
    }
    trace
}

/// Length of a version `00` `traceparent`: `00-<trace id>-<parent id>-<flags>`, with 2, 32, 16
/// and 2 hex digits.
const TRACEPARENT_V00_LEN: usize = 55;

/// Returns the rule of W3C Trace Context (level 1, section 3.2) that `value` breaks as a
/// `traceparent`, or `None` when it is valid:
/// - every field is lowercase hex, separated by `-` at bytes 2, 35 and 52;
/// - version `ff` is invalid, and version `00` is exactly 55 bytes long;
/// - a higher version may append fields after a `-` at byte 55, within [`MAX_TRACEPARENT_LEN`];
/// - the trace id and the parent id are not all zeros.
pub fn traceparent_error(value: &str) -> Option<&'static str> {
    let bytes = value.as_bytes();
    if bytes.len() < TRACEPARENT_V00_LEN {
        return Some("shorter than 55 bytes");
    }
    if bytes.len() > MAX_TRACEPARENT_LEN {
        return Some("longer than 128 bytes");
    }

    if [2, 35, 52].iter().any(|&at| bytes[at] != b'-') {
        return Some("fields not separated by '-' at bytes 2, 35 and 52");
    }
    let (version, trace_id, parent_id, flags) = (&bytes[..2], &bytes[3..35], &bytes[36..52], &bytes[53..55]);
    if ![version, trace_id, parent_id, flags]
        .iter()
        .all(|field| is_lowercase_hex(field))
    {
        return Some("a field is not lowercase hex");
    }

    if version == b"ff" {
        return Some("version ff is invalid");
    }
    if version == b"00" && bytes.len() != TRACEPARENT_V00_LEN {
        return Some("version 00 has data after the flags");
    }
    if bytes.len() > TRACEPARENT_V00_LEN && bytes[TRACEPARENT_V00_LEN] != b'-' {
        return Some("the flags are not followed by '-'");
    }

    if trace_id.iter().all(|&digit| digit == b'0') {
        return Some("the trace id is all zeros");
    }
    if parent_id.iter().all(|&digit| digit == b'0') {
        return Some("the parent id is all zeros");
    }
    None
}

fn is_lowercase_hex(field: &[u8]) -> bool {
    field.iter().all(|&b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Loose check of `tracestate`: printable ASCII within the length cap.
fn is_tracestate(value: &str) -> bool {
    value.len() <= MAX_TRACESTATE_LEN && value.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64;

    fn request() -> PublishRequest {
        PublishRequest {
            channel: "news".into(),
            r#type: "post.created".into(),
            data: r#"{"id":1}"#.into(),
            user_id: String::new(),
            idempotency_key: String::new(),
        }
    }

    fn rejection(request: PublishRequest) -> String {
        match publish_request(request, TraceContext::default(), LIMIT) {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn valid_request_becomes_event() {
        let trace = TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: "congo=t61rcWkgMzE".into(),
        };
        let mut req = request();
        req.idempotency_key = "order-7".into();
        let event = publish_request(req, trace.clone(), LIMIT).expect("valid");
        assert_eq!(event.channel, "news");
        assert_eq!(event.event_type, "post.created");
        assert_eq!(event.data, r#"{"id":1}"#);
        assert_eq!(event.idempotency_key.as_deref(), Some("order-7"));
        assert_eq!(event.traceparent, trace.traceparent);
        assert_eq!(event.tracestate, trace.tracestate);
    }

    #[test]
    fn empty_key_means_none() {
        let event = publish_request(request(), TraceContext::default(), LIMIT).expect("valid");
        assert_eq!(event.idempotency_key, None);
    }

    #[test]
    fn channel_rules() {
        let mut req = request();
        req.channel = String::new();
        assert_eq!(rejection(req), "channel must not be empty; set channel");
        let mut req = request();
        req.channel = "a b".into();
        assert_eq!(
            rejection(req),
            "channel contains ' ' at byte 1; allowed are ASCII letters, digits and _ - : . @"
        );
        let mut req = request();
        req.channel = "c".repeat(256);
        assert_eq!(
            rejection(req),
            "channel is 256 bytes long, the maximum is 255 bytes; shorten channel"
        );
    }

    #[test]
    fn type_rules() {
        let mut req = request();
        req.r#type = "ping".into();
        assert_eq!(
            rejection(req),
            "type \"ping\" is a reserved frame type of the client protocol; choose another name"
        );
        let mut req = request();
        req.r#type = String::new();
        assert_eq!(rejection(req), "type must not be empty; set type");
        let mut req = request();
        req.r#type = "t".repeat(65);
        assert_eq!(
            rejection(req),
            "type is 65 bytes long, the maximum is 64 bytes; shorten type"
        );
    }

    #[test]
    fn data_must_be_json() {
        let mut req = request();
        req.data = "{not json".into();
        let message = rejection(req);
        assert!(message.starts_with("data is not valid JSON ("), "{message}");
        assert!(
            message.ends_with("send a JSON text, for example {\"id\":42}"),
            "{message}"
        );
        let mut req = request();
        req.data = "  ".into();
        assert_eq!(
            rejection(req),
            "data must not be empty; send a JSON text, for example {} or null"
        );
    }

    #[test]
    fn data_size_limit() {
        let mut req = request();
        req.data = format!("\"{}\"", "x".repeat(LIMIT - 2));
        assert!(publish_request(req, TraceContext::default(), LIMIT).is_ok());
        let mut req = request();
        req.data = format!("\"{}\"", "x".repeat(LIMIT - 1));
        assert_eq!(
            rejection(req),
            "data is 65 bytes long, the maximum is 64 bytes; send a smaller payload, for example an id the \
             client fetches the rest with"
        );
    }

    #[test]
    fn deep_json_is_checked_without_overflow() {
        // serde_json checks a RawValue without recursing, so nesting is bounded only by size.
        let mut req = request();
        req.data = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(publish_request(req, TraceContext::default(), 100_000).is_ok());
        let mut req = request();
        req.data = "[".repeat(10_000) + &"]".repeat(9_999);
        assert!(publish_request(req, TraceContext::default(), 100_000).is_err());
    }

    #[test]
    fn user_id_and_key_rules() {
        let mut req = request();
        req.user_id = "u".repeat(256);
        assert_eq!(
            rejection(req),
            "user_id is 256 bytes long, the maximum is 255 bytes; shorten user_id"
        );
        let mut req = request();
        req.idempotency_key = "k".repeat(256);
        assert_eq!(
            rejection(req),
            "idempotency_key is 256 bytes long, the maximum is 255 bytes; shorten idempotency_key"
        );
        let mut req = request();
        req.idempotency_key = "a\0b".into();
        assert_eq!(
            rejection(req),
            "idempotency_key contains the control character '\\0' at byte 1; use printable characters only"
        );
    }

    #[test]
    fn positions_above_store_range_are_rejected() {
        assert_eq!(position("since", 0).ok(), Some(0));
        assert_eq!(position("since", MAX_POSITION).ok(), Some(MAX_POSITION));
        let Err(Error::InvalidArgument(message)) = position("since", u64::MAX) else {
            panic!("u64::MAX was accepted as a position");
        };
        assert!(message.starts_with("since 18446744073709551615 is above"), "{message}");
        assert!(position("after", MAX_POSITION + 1).is_err());
    }

    #[test]
    fn trace_context_is_read_loosely() {
        let mut metadata = MetadataMap::new();
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        metadata.insert("traceparent", parent.parse().expect("ascii"));
        metadata.insert("tracestate", "rojo=00f067aa0ba902b7".parse().expect("ascii"));
        let trace = trace_context(&metadata);
        assert_eq!(trace.traceparent, parent);
        assert_eq!(trace.tracestate, "rojo=00f067aa0ba902b7");
    }

    #[test]
    fn bad_trace_context_is_dropped() {
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", "00-XYZ-1-01".parse().expect("ascii"));
        metadata.insert("tracestate", "a=b".parse().expect("ascii"));
        assert_eq!(trace_context(&metadata), TraceContext::default());
        let mut metadata = MetadataMap::new();
        let long = format!("00-{}-{}-01{}", "a".repeat(32), "b".repeat(16), "-0".repeat(60));
        metadata.insert("traceparent", long.parse().expect("ascii"));
        assert_eq!(trace_context(&metadata), TraceContext::default());
    }

    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT_ID: &str = "b7ad6b7169203331";

    #[test]
    fn traceparent_follows_w3c_rules() {
        let valid = [
            format!("00-{TRACE_ID}-{PARENT_ID}-01"),
            format!("00-{TRACE_ID}-{PARENT_ID}-00"),
            // A higher version may append fields after a dash.
            format!("01-{TRACE_ID}-{PARENT_ID}-01"),
            format!("cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-will-be"),
        ];
        for value in &valid {
            assert_eq!(traceparent_error(value), None, "{value}");
        }
    }

    #[test]
    fn traceparent_breaking_a_rule_is_invalid() {
        let zeros_trace = "0".repeat(32);
        let zeros_parent = "0".repeat(16);
        let cases = [
            (format!("ff-{TRACE_ID}-{PARENT_ID}-01"), "version ff is invalid"),
            (format!("00-{zeros_trace}-{PARENT_ID}-01"), "the trace id is all zeros"),
            (format!("00-{TRACE_ID}-{zeros_parent}-01"), "the parent id is all zeros"),
            (
                format!("00-{}-{PARENT_ID}-01", TRACE_ID.to_uppercase()),
                "a field is not lowercase hex",
            ),
            (
                format!("00-{TRACE_ID}-{}-01", PARENT_ID.to_uppercase()),
                "a field is not lowercase hex",
            ),
            (format!("0A-{TRACE_ID}-{PARENT_ID}-01"), "a field is not lowercase hex"),
            (format!("00-{TRACE_ID}-{PARENT_ID}-0g"), "a field is not lowercase hex"),
            (format!("00-{TRACE_ID}-{PARENT_ID}-1"), "shorter than 55 bytes"),
            (
                format!("00-{TRACE_ID}a-{PARENT_ID}-01"),
                "fields not separated by '-' at bytes 2, 35 and 52",
            ),
            (
                format!("00-{TRACE_ID}-{PARENT_ID}a-01"),
                "fields not separated by '-' at bytes 2, 35 and 52",
            ),
            (
                format!("00-{TRACE_ID}-{PARENT_ID}-01-00"),
                "version 00 has data after the flags",
            ),
            (
                format!("01-{TRACE_ID}-{PARENT_ID}-01x"),
                "the flags are not followed by '-'",
            ),
            (
                format!("01-{TRACE_ID}-{PARENT_ID}-01-{}", "0".repeat(80)),
                "longer than 128 bytes",
            ),
            (String::from("00"), "shorter than 55 bytes"),
        ];
        for (value, expected) in &cases {
            assert_eq!(traceparent_error(value), Some(*expected), "{value}");
        }
    }

    #[test]
    fn invalid_traceparent_starts_a_new_trace() {
        let mut metadata = MetadataMap::new();
        let version_ff = format!("ff-{TRACE_ID}-{PARENT_ID}-01");
        metadata.insert("traceparent", version_ff.parse().expect("ascii"));
        metadata.insert("tracestate", "rojo=00f067aa0ba902b7".parse().expect("ascii"));
        assert_eq!(trace_context(&metadata), TraceContext::default());
    }
}
