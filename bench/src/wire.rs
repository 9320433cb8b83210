//! The two wire protocols the load client speaks: the edge's JSON frames, and Socket.IO (Engine.IO
//! v4 over a raw WebSocket) for the Socket.IO peer. Socket.IO messages are unwrapped into the
//! same JSON frames, so the rest of the client handles both alike.
//!
//! The Socket.IO packets used: the server opens with `0{"sid":..}`. The client connects to the
//! main namespace with `40{"token":..}`, and the server replies `40{"sid":..}`, or `44{..}` when
//! it rejects the token. Events are `42["name",<argument>]` in both directions. The server pings
//! with `2` and the client replies `3`.

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde_json::json;
use serde_json::value::RawValue;

/// Wire protocol of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// The edge's JSON frames at `/ws?token=JWT`.
    #[default]
    Native,
    /// Socket.IO 4 over a raw WebSocket at `/socket.io/?EIO=4&transport=websocket`.
    SocketIo,
}

/// A received text message, translated.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A JSON frame of the edge's protocol.
    Frame(Cow<'a, str>),
    /// The Engine.IO open packet; the client must now send [`Protocol::connect_message`].
    Open,
    /// An Engine.IO ping; the client must reply [`PONG`].
    Ping,
    /// Anything else, ignored.
    Other,
}

/// Engine.IO pong packet.
pub const PONG: &str = "3";

impl Protocol {
    /// Returns the URL path and query to connect to, with the token where the protocol takes it.
    pub fn path_and_query(self, path: &str, token: &str) -> String {
        match self {
            Self::Native => format!("{path}?token={token}"),
            Self::SocketIo => "/socket.io/?EIO=4&transport=websocket".to_owned(),
        }
    }

    /// Returns the message that authenticates after the open packet (Socket.IO only).
    pub fn connect_message(self, token: &str) -> Option<String> {
        match self {
            Self::Native => None,
            Self::SocketIo => Some(format!("40{}", json!({ "token": token }))),
        }
    }

    /// Returns the subscribe message for a channel, resuming after `since` when given.
    pub fn subscribe_message(self, channel: &str, since: Option<u64>) -> String {
        let mut request = json!({"type": "subscribe", "channel": channel});
        if let Some(position) = since {
            request["since"] = position.into();
        }
        match self {
            Self::Native => request.to_string(),
            Self::SocketIo => format!("42{}", json!(["subscribe", request])),
        }
    }

    /// Translates a received text message.
    pub fn decode(self, text: &str) -> Incoming<'_> {
        match self {
            Self::Native => Incoming::Frame(Cow::Borrowed(text)),
            Self::SocketIo => decode_socket_io(text),
        }
    }
}

fn decode_socket_io(text: &str) -> Incoming<'_> {
    if text == "2" {
        return Incoming::Ping;
    }
    if text.starts_with("0{") {
        return Incoming::Open;
    }
    if let Some(event) = text.strip_prefix("42") {
        // `["name", argument]`: the argument is already a frame of the edge's protocol.
        return match serde_json::from_str::<(IgnoredAny, &RawValue)>(event) {
            Ok((_, argument)) => Incoming::Frame(Cow::Borrowed(argument.get())),
            Err(_) => Incoming::Other,
        };
    }
    if text.starts_with("40") {
        return Incoming::Frame(Cow::Borrowed(r#"{"type":"connected"}"#));
    }
    if let Some(error) = text.strip_prefix("44") {
        return Incoming::Frame(Cow::Owned(
            json!({"type": "error", "code": "connect_error", "message": error}).to_string(),
        ));
    }
    Incoming::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_io_event_unwraps_to_its_argument() {
        let text = r#"42["event",{"type":"bench","id":"a","position":1}]"#;
        assert_eq!(
            Protocol::SocketIo.decode(text),
            Incoming::Frame(Cow::Borrowed(r#"{"type":"bench","id":"a","position":1}"#))
        );
    }

    #[test]
    fn socket_io_control_packets_decode() {
        assert_eq!(Protocol::SocketIo.decode("2"), Incoming::Ping);
        assert_eq!(Protocol::SocketIo.decode(r#"0{"sid":"x"}"#), Incoming::Open);
        let connected = Protocol::SocketIo.decode(r#"40{"sid":"y"}"#);
        assert_eq!(connected, Incoming::Frame(Cow::Borrowed(r#"{"type":"connected"}"#)));
        let Incoming::Frame(error) = Protocol::SocketIo.decode(r#"44{"message":"invalid token"}"#) else {
            panic!("a connect error becomes an error frame");
        };
        assert!(error.contains(r#""type":"error""#));
    }

    #[test]
    fn subscribe_messages_carry_since() {
        let native = Protocol::Native.subscribe_message("c", Some(7));
        assert_eq!(native, r#"{"channel":"c","since":7,"type":"subscribe"}"#);
        let socket_io = Protocol::SocketIo.subscribe_message("c", None);
        assert_eq!(socket_io, r#"42["subscribe",{"channel":"c","type":"subscribe"}]"#);
    }
}
