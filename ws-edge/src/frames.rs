//! Control frames of the client protocol: the requests a client sends and the replies the edge
//! sends back. Event frames come from [`notify_proto::frame::encode_event`].

use notify_proto::protocol::error_code;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A request from a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `{"type":"auth","token":..}`: the first frame, when the token is not in the URL.
    Auth {
        /// The JWT.
        token: String,
    },
    /// `{"type":"refresh","token":..}`: replaces the socket's token before it expires.
    Refresh {
        /// The new JWT, for the same `sub`.
        token: String,
    },
    /// `{"type":"ping"}`.
    Ping,
    /// `{"type":"subscribe","channel":..,"since":..}`.
    Subscribe {
        /// Channel name, not yet validated.
        channel: String,
        /// Resume position as sent; [`parse_since`] validates it.
        since: Option<serde_json::Value>,
    },
    /// `{"type":"unsubscribe","channel":..}`.
    Unsubscribe {
        /// Channel name.
        channel: String,
    },
}

/// Error in a client frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The frame is not a JSON object with the fields its type requires.
    #[error("{0}")]
    BadRequest(String),
    /// The frame's `type` is not one the edge accepts.
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
}

impl RequestError {
    /// Returns the `code` of the error frame for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => error_code::BAD_REQUEST,
            Self::UnknownType(_) => error_code::UNKNOWN_TYPE,
        }
    }
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct TokenBody {
    token: String,
}

#[derive(Deserialize)]
struct SubscribeBody {
    channel: String,
    #[serde(default)]
    since: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChannelBody {
    channel: String,
}

/// Parses a client text frame.
///
/// # Errors
/// Fails when the frame is not JSON, lacks a field, or has an unknown type.
pub fn parse_request(text: &str) -> Result<Request, RequestError> {
    let head: Head = parse(text)?;
    let request = match head.kind.as_str() {
        "auth" => Request::Auth {
            token: parse::<TokenBody>(text)?.token,
        },
        "refresh" => Request::Refresh {
            token: parse::<TokenBody>(text)?.token,
        },
        "ping" => Request::Ping,
        "subscribe" => {
            let body: SubscribeBody = parse(text)?;
            Request::Subscribe {
                channel: body.channel,
                since: body.since.filter(|since| !since.is_null()),
            }
        }
        "unsubscribe" => Request::Unsubscribe {
            channel: parse::<ChannelBody>(text)?.channel,
        },
        _ => return Err(RequestError::UnknownType(head.kind)),
    };
    Ok(request)
}

fn parse<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, RequestError> {
    serde_json::from_str(text).map_err(|err| RequestError::BadRequest(format!("invalid frame: {err}")))
}

/// Parses a `since` position: a non-negative JSON integer.
///
/// # Errors
/// Returns a message for the error frame when the value is anything else.
pub fn parse_since(since: &serde_json::Value) -> Result<u64, String> {
    since
        .as_u64()
        .ok_or_else(|| format!("since must be a non-negative integer position, got {since}"))
}

/// A frame the edge sends to a client, other than an event.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", rename_all_fields = "camelCase")]
pub enum Reply<'a> {
    /// The token was accepted.
    Connected {
        /// The token's `sub`.
        user_id: &'a str,
        /// Id of this connection, for support requests and logs.
        conn_id: &'a str,
        /// The token's `exp`, in seconds since the Unix epoch.
        expires_at: u64,
    },
    /// A refreshed token was accepted.
    Refreshed {
        /// The new token's `exp`, in seconds since the Unix epoch.
        expires_at: u64,
    },
    /// The token expires soon; send `refresh` with a new one to keep the socket.
    #[serde(rename = "token_expiring")]
    TokenExpiring {
        /// The token's `exp`, in seconds since the Unix epoch.
        expires_at: u64,
        /// Seconds until `exp`.
        #[serde(rename = "in")]
        in_secs: u64,
    },
    /// Reply to `ping`.
    Pong,
    /// The subscription is active.
    Subscribed {
        /// Channel name.
        channel: &'a str,
        /// The channel's current position: the head of its partition, as far as the edge has read.
        position: u64,
        /// Present when the client sent `since`: false when retention removed some of the
        /// events after it.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// The subscription ended.
    Unsubscribed {
        /// Channel name.
        channel: &'a str,
        /// Why the edge ended it on its own: `forbidden` when a refreshed token no longer grants
        /// the channel. Absent in the reply to the client's `unsubscribe`.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    /// A request failed; the socket stays open.
    Error {
        /// One of [`error_code`].
        code: &'a str,
        /// A readable explanation.
        message: &'a str,
        /// The channel the request named, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
    },
}

impl Reply<'_> {
    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> Utf8Bytes {
        // Serializing these plain structs cannot fail: every field is a string or a number.
        serde_json::to_string(self).unwrap_or_default().into()
    }
}

/// Encodes an error frame.
pub fn error(code: &str, message: &str, channel: Option<&str>) -> Utf8Bytes {
    Reply::Error { code, message, channel }.encode()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request(r#"{"type":"ping"}"#), Ok(Request::Ping));
        assert_eq!(
            parse_request(r#"{"type":"subscribe","channel":"news","since":5}"#),
            Ok(Request::Subscribe {
                channel: "news".into(),
                since: Some(json!(5))
            })
        );
        assert_eq!(
            parse_request(r#"{"type":"subscribe","channel":"news","since":null}"#),
            Ok(Request::Subscribe {
                channel: "news".into(),
                since: None
            })
        );
        assert_eq!(
            parse_request(r#"{"type":"auth","token":"t"}"#),
            Ok(Request::Auth { token: "t".into() })
        );
    }

    #[test]
    fn bad_requests_are_classified() {
        assert!(matches!(parse_request("not json"), Err(RequestError::BadRequest(_))));
        assert!(matches!(
            parse_request(r#"{"type":"subscribe"}"#),
            Err(RequestError::BadRequest(_))
        ));
        assert!(matches!(parse_request("[1]"), Err(RequestError::BadRequest(_))));
        assert_eq!(
            parse_request(r#"{"type":"dance"}"#),
            Err(RequestError::UnknownType("dance".into()))
        );
    }

    #[test]
    fn since_must_be_non_negative_integer() {
        assert_eq!(parse_since(&json!(0)), Ok(0));
        assert_eq!(parse_since(&json!(42)), Ok(42));
        for bad in [json!(-1), json!(1.5), json!("7"), json!({})] {
            assert!(parse_since(&bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn replies_use_protocol_field_names() {
        let connected = Reply::Connected {
            user_id: "u",
            conn_id: "c",
            expires_at: 9,
        };
        assert_eq!(
            connected.encode().as_str(),
            r#"{"type":"connected","userId":"u","connId":"c","expiresAt":9}"#
        );
        let subscribed = Reply::Subscribed {
            channel: "news",
            position: 3,
            recovered: None,
        };
        assert_eq!(
            subscribed.encode().as_str(),
            r#"{"type":"subscribed","channel":"news","position":3}"#
        );
        let revoked = Reply::Unsubscribed {
            channel: "orders:eu",
            reason: Some("forbidden"),
        };
        assert_eq!(
            revoked.encode().as_str(),
            r#"{"type":"unsubscribed","channel":"orders:eu","reason":"forbidden"}"#
        );
        let unsubscribed = Reply::Unsubscribed {
            channel: "news",
            reason: None,
        };
        assert_eq!(
            unsubscribed.encode().as_str(),
            r#"{"type":"unsubscribed","channel":"news"}"#
        );
        assert_eq!(
            error("forbidden", "no", Some("user:b")).as_str(),
            r#"{"type":"error","code":"forbidden","message":"no","channel":"user:b"}"#
        );
    }
}
