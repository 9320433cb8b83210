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

/// Reads the W3C trace context from request metadata. A value that is too long or not of the
/// expected form is dropped rather than failing the call, because tracing is best effort.
pub fn trace_context(metadata: &MetadataMap) -> TraceContext {
    let header = |name| metadata.get(name).and_then(|value| value.to_str().ok()).unwrap_or("");
    let traceparent = header("traceparent");
    let tracestate = header("tracestate");
    let mut trace = TraceContext::default();
    if is_traceparent(traceparent) {
        trace.traceparent = traceparent.to_owned();
        if is_tracestate(tracestate) {
            trace.tracestate = tracestate.to_owned();
        }
    }
    trace
}

/// Loose check of `version-traceid-parentid-flags`: lowercase hex fields of 2, 32 and 16
/// characters, then at least the flags.
fn is_traceparent(value: &str) -> bool {
    let lowercase_hex = |field: &str| field.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let fields: Vec<&str> = value.split('-').collect();
    value.len() <= MAX_TRACEPARENT_LEN
        && fields.len() >= 4
        && fields.iter().all(|field| lowercase_hex(field))
        && fields[0].len() == 2
        && fields[1].len() == 32
        && fields[2].len() == 16
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
}
