//! The client protocol's frame types and WebSocket close codes, shared by the edge, the tests and
//! the clients. `docs/protocol.md` describes every frame.

/// Frame types the protocol itself uses. A published event may not use one as its type, so a
/// client can always tell an event from a control frame.
pub const RESERVED_TYPES: &[&str] = &[
    "auth",
    "connected",
    "error",
    "ping",
    "pong",
    "reconnect",
    "refresh",
    "refreshed",
    "subscribe",
    "subscribed",
    "token_expiring",
    "unsubscribe",
    "unsubscribed",
];

/// WebSocket close codes the edge sends.
pub mod close {
    /// The server restarts or drains; reconnect, to another edge if there is one.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The client broke the WebSocket protocol: an unmasked frame, a reserved opcode, an orphan
    /// continuation frame, a control frame over 125 bytes.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame or message exceeded the size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// An unexpected server error.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// No token arrived: none in the query, header or subprotocol, and no `auth` frame in time.
    pub const NO_TOKEN: u16 = 4001;
    /// The token is invalid: bad signature, wrong algorithm, malformed or expired at connect.
    pub const INVALID_TOKEN: u16 = 4002;
    /// The token expired on a live socket and was not refreshed; fetch a new token and reconnect.
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// The client read too slowly and its outbound queue filled; reconnect and resume.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The client kept sending messages faster than its rate limit allows, or its user has too
    /// many sockets open (the close reason names which).
    pub const RATE_LIMITED: u16 = 4029;
}

/// `code` values of `error` frames.
pub mod error_code {
    /// The frame is not valid JSON or lacks a required field.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The channel name breaks the grammar.
    pub const INVALID_CHANNEL: &str = "invalid_channel";
    /// The token does not allow this channel.
    pub const FORBIDDEN: &str = "forbidden";
    /// A `refresh` token is invalid: forged, expired, or not a token at all. The socket keeps
    /// its current token and closes at that token's expiry.
    pub const INVALID_TOKEN: &str = "invalid_token";
    /// The `since` position is malformed or ahead of the stream.
    pub const INVALID_POSITION: &str = "invalid_position";
    /// The socket already has the maximum number of subscriptions.
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "too_many_subscriptions";
    /// The channel is not subscribed on this socket.
    pub const NOT_SUBSCRIBED: &str = "not_subscribed";
    /// The frame type is unknown.
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    /// The server could not complete the request; retry later.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The message was dropped because the socket or its user sent too many; another one over
    /// the limit soon after closes the socket with 4029.
    pub const RATE_LIMITED: &str = "rate_limited";
}
