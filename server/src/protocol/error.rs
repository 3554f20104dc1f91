//! Stable error codes: the `code` field of every error frame.

use serde::Serialize;

/// Every error the server reports, with a stable snake_case wire name.
///
/// Codes are part of protocol v1: they are never renamed, only added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON, or not a JSON object.
    BadFrame,
    /// The `op` field names no known operation.
    UnknownOp,
    /// A field is missing or has the wrong type or value.
    BadRequest,
    /// The WebSocket message exceeds the frame size limit; the connection closes.
    FrameTooLarge,
    /// The text body exceeds the text size limit.
    TextTooLarge,
    /// Missing, malformed or forged token; the connection closes.
    Unauthorized,
    /// The token's expiry has passed; the connection closes.
    TokenExpired,
    /// An operation other than `hello` arrived before a successful `hello`.
    HelloRequired,
    /// A second `hello` on an authenticated connection.
    AlreadyAuthenticated,
    /// No protocol version offered by the client is spoken by this server.
    UnsupportedVersion,
    /// An id does not follow the id rules (length, characters, prefix).
    InvalidId,
    /// The conversation does not exist.
    UnknownConversation,
    /// The user is not a member of the conversation.
    NotMember,
    /// The operation needs a group conversation.
    NotGroup,
    /// Only the group's owner may do this.
    Forbidden,
    /// The group would exceed its member limit.
    TooManyMembers,
    /// A user is listed twice, or is already (or not) a member.
    DuplicateMember,
    /// A group with this id already exists and was created by someone else.
    ConversationExists,
    /// A cursor names a sequence number that does not exist yet.
    CursorAhead,
    /// The device fell too far behind on live events; reconnect and catch up.
    SlowConsumer,
    /// The same device connected again; this older connection closes.
    Replaced,
    /// The server is shutting down; reconnect elsewhere or later.
    ShuttingDown,
    /// The server is at its connection limit.
    Overloaded,
    /// No image with this id was uploaded to this conversation.
    UnknownMedia,
    /// The upload exceeds the image size limit (HTTP 413); nothing was kept.
    MediaTooLarge,
    /// The upload is not a JPEG, PNG, WebP or GIF image, or cannot be decoded (HTTP 415).
    UnsupportedMedia,
    /// HTTP only: the method is not allowed on this path (HTTP 405).
    MethodNotAllowed,
    /// HTTP only: `/v1/ws` was requested without a WebSocket upgrade (HTTP 400).
    WebsocketRequired,
    /// HTTP only: no such endpoint (HTTP 404).
    NotFound,
    /// An unexpected server-side failure; nothing was acknowledged.
    Internal,
    /// WebSocket only: no successful `hello` within the hello timeout; the connection closes.
    HelloTimeout,
    /// Too many sends or group changes by this user just now (HTTP 429); nothing was
    /// done: retry after `retry_after_ms`.
    RateLimited,
    /// The user has as many devices connected to this server as allowed; this one
    /// is refused (HTTP 409) and, over WebSocket, closed.
    TooManyDevices,
}

impl ErrorCode {
    /// True when the server closes the connection after reporting this code.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            Self::FrameTooLarge
                | Self::Unauthorized
                | Self::TokenExpired
                | Self::UnsupportedVersion
                | Self::SlowConsumer
                | Self::Replaced
                | Self::ShuttingDown
                | Self::Overloaded
                | Self::HelloTimeout
                | Self::TooManyDevices
        )
    }
}

/// An error to report to one client: a stable code plus a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ProtocolError {
    /// The stable code.
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub message: String,
    /// When retrying makes sense, how long to wait first (rate limits, overload).
    pub retry_after_ms: Option<u64>,
}

impl ProtocolError {
    /// Builds an error with a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// The same error, telling the client to retry after `ms` milliseconds.
    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}
