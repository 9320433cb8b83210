//! The JSON frame a client receives for an event. The edge encodes it once per event and shares
//! the bytes with every recipient.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::pb::Event;

#[derive(Serialize)]
struct EventFrame<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    channel: &'a str,
    id: &'a str,
    position: u64,
    data: &'a RawValue,
    ts: i64,
}

/// Encodes an event as the frame clients receive:
/// `{"type":..,"channel":..,"id":..,"position":..,"data":<payload>,"ts":..}`.
/// The payload is copied verbatim, so its bytes reach the client unchanged.
///
/// # Errors
/// Fails when the payload is not valid JSON, which the notifier's validation rules out.
pub fn encode_event(event: &Event) -> Result<String, serde_json::Error> {
    let data: &RawValue = serde_json::from_str(&event.data)?;
    serde_json::to_string(&EventFrame {
        event_type: &event.r#type,
        channel: &event.channel,
        id: &event.id,
        position: event.seq,
        data,
        ts: event.ts_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_bytes_survive_encoding() {
        let data = r#"{"title":"שלום עולם 🎉","n":1.50,"s":"\u05e9"}"#;
        let event = Event {
            id: "e1".into(),
            seq: 7,
            channel: "news".into(),
            r#type: "post.created".into(),
            data: data.into(),
            ts_ms: 1,
            ..Event::default()
        };
        let frame = encode_event(&event).expect("payload is valid JSON");
        assert_eq!(
            frame,
            format!(r#"{{"type":"post.created","channel":"news","id":"e1","position":7,"data":{data},"ts":1}}"#)
        );
    }
}
