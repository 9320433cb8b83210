//! The JSON frame a client receives for an event. The edge encodes it once per event and shares
//! the bytes with every recipient.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::pb::Event;

/// The frame's fields before `data`, in frame order.
#[derive(Serialize)]
struct EventHeader<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    channel: &'a str,
    id: &'a str,
    position: u64,
    #[serde(rename = "traceId", skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
}

/// Optional fields of event frames, chosen by the edge's configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameOptions {
    /// Adds `"traceId"`, the W3C trace id of the publish call, to events that carry trace
    /// context, so that a browser can report its receive latency in the publisher's trace.
    pub trace_id: bool,
}

/// Encodes an event as the frame clients receive:
/// `{"type":..,"channel":..,"id":..,"position":..,"data":<payload>,"ts":..}`.
///
/// The payload is copied verbatim, whitespace around the JSON value included, so its bytes reach
/// the client unchanged and equal what `History` returns. JSON allows that whitespace between
/// tokens, so the frame stays valid JSON.
///
/// # Errors
/// Fails when the payload is not valid JSON, which the notifier's validation rules out.
pub fn encode_event(event: &Event) -> Result<String, serde_json::Error> {
    encode_event_with(event, FrameOptions::default())
}

/// Encodes an event like [`encode_event`], with the optional fields of `options`:
/// `{"type":..,"channel":..,"id":..,"position":..,"traceId":..,"data":<payload>,"ts":..}`.
///
/// # Errors
/// Fails when the payload is not valid JSON, which the notifier's validation rules out.
pub fn encode_event_with(event: &Event, options: FrameOptions) -> Result<String, serde_json::Error> {
    // Parsing into a RawValue only checks the payload. Its text is not used because serde_json
    // leaves out the whitespace around the value.
    serde_json::from_str::<&RawValue>(&event.data)?;
    let header = serde_json::to_string(&EventHeader {
        event_type: &event.r#type,
        channel: &event.channel,
        id: &event.id,
        position: event.seq,
        trace_id: options.trace_id.then(|| trace_id(&event.traceparent)).flatten(),
    })?;
    // The header ends with the object's closing brace, which moves to the end of the frame.
    let header = header.strip_suffix('}').unwrap_or(&header);
    let mut frame = String::with_capacity(header.len() + event.data.len() + 32);
    frame.push_str(header);
    frame.push_str(",\"data\":");
    frame.push_str(&event.data);
    let _ = write!(frame, ",\"ts\":{}}}", event.ts_ms);
    Ok(frame)
}

/// Returns the trace id of a W3C `traceparent` (`version-traceid-parentid-flags`): 32 lowercase
/// hex digits, not all zero. Anything else gives `None`.
fn trace_id(traceparent: &str) -> Option<&str> {
    let id = traceparent.split('-').nth(1)?;
    let hex = id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex && id.bytes().any(|b| b != b'0')).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> Event {
        Event {
            id: "e1".into(),
            seq: 7,
            channel: "news".into(),
            r#type: "post.created".into(),
            data: data.into(),
            ts_ms: 1,
            ..Event::default()
        }
    }

    #[test]
    fn payload_bytes_survive_encoding() {
        let data = r#"{"title":"שלום עולם 🎉","n":1.50,"s":"\u05e9"}"#;
        let frame = encode_event(&event(data)).expect("payload is valid JSON");
        assert_eq!(
            frame,
            format!(r#"{{"type":"post.created","channel":"news","id":"e1","position":7,"data":{data},"ts":1}}"#)
        );
    }

    #[test]
    fn surrounding_whitespace_is_kept() {
        for data in [
            " {\"ws\" :  [1 , 2]}\n",
            "\n\t\"שלום, עולם\"\r\n ",
            "  {\"title\":\"מה נשמע\"}  ",
            "\n42\n",
        ] {
            let frame = encode_event(&event(data)).expect("payload is valid JSON");
            let expected =
                format!(r#"{{"type":"post.created","channel":"news","id":"e1","position":7,"data":{data},"ts":1}}"#);
            assert_eq!(frame, expected, "payload {data:?}");
            let parsed: serde_json::Value = serde_json::from_str(&frame).expect("the frame is JSON");
            let payload: serde_json::Value = serde_json::from_str(data).expect("the payload is JSON");
            assert_eq!(parsed["data"], payload, "payload {data:?}");
            assert_eq!(parsed["ts"], 1, "payload {data:?}");
        }
    }

    #[test]
    fn header_fields_are_escaped() {
        let mut quoted = event("null");
        quoted.id = "a\"b".into();
        let frame = encode_event(&quoted).expect("payload is valid JSON");
        let parsed: serde_json::Value = serde_json::from_str(&frame).expect("the frame is JSON");
        assert_eq!(parsed["id"], "a\"b");
        assert_eq!(parsed["data"], serde_json::Value::Null);
    }

    #[test]
    fn invalid_payload_is_an_error() {
        assert!(encode_event(&event("{oops")).is_err());
        assert!(encode_event(&event("1 2")).is_err());
    }

    #[test]
    fn trace_id_is_added_when_configured() {
        let traced = Event {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            ..event(r#"{"a":1}"#)
        };
        let options = FrameOptions { trace_id: true };
        let frame = encode_event_with(&traced, options).expect("payload is valid JSON");
        assert_eq!(
            frame,
            r#"{"type":"post.created","channel":"news","id":"e1","position":7,"traceId":"0af7651916cd43dd8448eb211c80319c","data":{"a":1},"ts":1}"#
        );
        let without = encode_event(&traced).expect("payload is valid JSON");
        assert!(!without.contains("traceId"), "{without}");
    }

    #[test]
    fn malformed_traceparent_adds_no_trace_id() {
        let options = FrameOptions { trace_id: true };
        for traceparent in [
            "",
            "00",
            "00-XYZ-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c\"-x-01",
        ] {
            let traced = Event {
                traceparent: traceparent.into(),
                ..event("1")
            };
            let frame = encode_event_with(&traced, options).expect("payload is valid JSON");
            assert!(!frame.contains("traceId"), "{traceparent:?} gave {frame}");
        }
    }
}
