//! Frames: what clients send (`Request`) and what the server sends (`ServerFrame`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ErrorCode, ProtocolError};

/// The only protocol version this server speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// First frame on every connection: authenticates the device and agrees the version.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloRequest {
    /// Versions the client speaks; the server picks the highest it shares.
    pub versions: Vec<u32>,
    /// Bearer token minted by `chatproof-server token`.
    pub token: String,
    /// Stable id of this device (phone, desktop, ...).
    pub device: String,
    /// Per-conversation "delivered up to" cursors the device already holds.
    #[serde(default)]
    pub cursors: BTreeMap<String, u64>,
    /// After catch-up, send the current receipts for entries the user sent, read
    /// from the store (those that moved while this device was away).
    #[serde(default)]
    pub receipts: bool,
}

/// Opens (or finds) the one 1:1 conversation with `peer`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenDirectRequest {
    /// The other user.
    pub peer: String,
}

/// Creates a group; the caller becomes its owner and first member.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroupRequest {
    /// Optional client-chosen id (`g:NAME`); a retry with the same id is idempotent.
    #[serde(default)]
    pub conv: Option<String>,
    /// Other initial members (the caller is added implicitly).
    #[serde(default)]
    pub members: Vec<String>,
}

/// Adds users to a group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMembersRequest {
    /// The group.
    pub conv: String,
    /// Users to add.
    pub users: Vec<String>,
}

/// Removes users from a group (owner only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveMembersRequest {
    /// The group.
    pub conv: String,
    /// Users to remove.
    pub users: Vec<String>,
}

/// The caller leaves a group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {
    /// The group.
    pub conv: String,
}

/// Sends a message: a text, or an image (uploaded first) with an optional caption.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// The conversation.
    pub conv: String,
    /// Client-chosen id; a retry with the same id returns the original ack.
    pub message_id: String,
    /// UTF-8 text, at most the server's text limit: the message, or an image's caption.
    #[serde(default)]
    pub text: Option<String>,
    /// Id of an image uploaded to this conversation (`POST /v1/media`).
    #[serde(default)]
    pub media: Option<String>,
}

/// Moves this device's cursors forward.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    /// The conversation.
    pub conv: String,
    /// The device holds every entry up to this seq.
    #[serde(default)]
    pub delivered: Option<u64>,
    /// The user has read up to this seq on this device.
    #[serde(default)]
    pub read: Option<u64>,
}

/// Pulls entries after a cursor (ascending).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// The conversation.
    pub conv: String,
    /// Return entries with seq greater than this.
    pub after: u64,
    /// Page size (capped by the server).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Pages backwards through history.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRequest {
    /// The conversation.
    pub conv: String,
    /// Return entries with seq lower than this (default: newest).
    #[serde(default)]
    pub before: Option<u64>,
    /// Page size (capped by the server).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Current presence of some users, and (with `watch`) a subscription to their changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceRequest {
    /// The users, at most the server's presence limit per request.
    pub users: Vec<String>,
    /// Also push changes of these users to the caller (default true), beyond
    /// those of the people the caller shares a conversation with.
    #[serde(default = "watch_default")]
    pub watch: bool,
}

fn watch_default() -> bool {
    true
}

/// `POST /v1/poll`: entries after the device's cursors, plus receipts and
/// presence changes, waiting up to `timeout_ms` for something to arrive.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollRequest {
    /// Per-conversation "delivered up to" cursors the device holds; for other
    /// conversations the device's acknowledged cursor (or, for a new device,
    /// the most recent entries) is the start.
    #[serde(default)]
    pub cursors: BTreeMap<String, u64>,
    /// How long to hold the request when nothing is new (capped by the server).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Most entries in the response (capped by the server's page limit).
    #[serde(default)]
    pub limit: Option<u32>,
    /// On the poll that opens a mailbox: carry the current receipts for entries
    /// the user sent, read from the store, as `hello` does with `receipts`.
    #[serde(default)]
    pub receipts: bool,
}

/// Lists the caller's conversations.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationsRequest {}

/// One decoded client request.
#[derive(Debug, Clone)]
pub enum Request {
    /// `hello`.
    Hello(HelloRequest),
    /// `open_direct`.
    OpenDirect(OpenDirectRequest),
    /// `create_group`.
    CreateGroup(CreateGroupRequest),
    /// `add_members`.
    AddMembers(AddMembersRequest),
    /// `remove_members`.
    RemoveMembers(RemoveMembersRequest),
    /// `leave`.
    Leave(LeaveRequest),
    /// `send`.
    Send(SendRequest),
    /// `ack`.
    Ack(AckRequest),
    /// `sync`.
    Sync(SyncRequest),
    /// `history`.
    History(HistoryRequest),
    /// `conversations`.
    Conversations(ConversationsRequest),
    /// `presence`.
    Presence(PresenceRequest),
    /// `ping`.
    Ping,
}

impl Request {
    /// Whether the request writes to the store (and then publishes what it wrote):
    /// the ones a server must finish once begun, whoever still waits for the reply.
    pub fn changes_state(&self) -> bool {
        match self {
            Request::OpenDirect(_)
            | Request::CreateGroup(_)
            | Request::AddMembers(_)
            | Request::RemoveMembers(_)
            | Request::Leave(_)
            | Request::Send(_)
            | Request::Ack(_) => true,
            Request::Hello(_)
            | Request::Sync(_)
            | Request::History(_)
            | Request::Conversations(_)
            | Request::Presence(_)
            | Request::Ping => false,
        }
    }
}

fn body<T: serde::de::DeserializeOwned>(op: &str, fields: Value) -> Result<T, ProtocolError> {
    serde_json::from_value(fields)
        .map_err(|e| ProtocolError::new(ErrorCode::BadRequest, format!("{op}: {e}")))
}

/// Decodes one text frame into `(rid, request)`.
///
/// On failure returns the rid when one could be read, so the error reply can echo it.
pub fn decode_request(text: &str) -> Result<(String, Request), (Option<String>, ProtocolError)> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        (
            None,
            ProtocolError::new(ErrorCode::BadFrame, format!("not JSON: {e}")),
        )
    })?;
    let Value::Object(mut fields) = value else {
        return Err((
            None,
            ProtocolError::new(ErrorCode::BadFrame, "a frame must be a JSON object"),
        ));
    };
    let rid = match fields.remove("rid") {
        Some(Value::String(rid)) if !rid.is_empty() && rid.len() <= 64 => rid,
        _ => {
            return Err((
                None,
                ProtocolError::new(
                    ErrorCode::BadRequest,
                    "\"rid\" must be a string of 1-64 bytes",
                ),
            ))
        }
    };
    let op = match fields.remove("op") {
        Some(Value::String(op)) => op,
        _ => {
            return Err((
                Some(rid),
                ProtocolError::new(ErrorCode::BadRequest, "\"op\" must be a string"),
            ))
        }
    };
    let fields = Value::Object(fields);
    let request = match op.as_str() {
        "hello" => body(&op, fields).map(Request::Hello),
        "open_direct" => body(&op, fields).map(Request::OpenDirect),
        "create_group" => body(&op, fields).map(Request::CreateGroup),
        "add_members" => body(&op, fields).map(Request::AddMembers),
        "remove_members" => body(&op, fields).map(Request::RemoveMembers),
        "leave" => body(&op, fields).map(Request::Leave),
        "send" => body(&op, fields).map(Request::Send),
        "ack" => body(&op, fields).map(Request::Ack),
        "sync" => body(&op, fields).map(Request::Sync),
        "history" => body(&op, fields).map(Request::History),
        "conversations" => body(&op, fields).map(Request::Conversations),
        "presence" => body(&op, fields).map(Request::Presence),
        "ping" => body::<ConversationsRequest>(&op, fields).map(|_| Request::Ping),
        _ => Err(ProtocolError::new(
            ErrorCode::UnknownOp,
            format!("unknown op {op:?}"),
        )),
    };
    request
        .map(|r| (rid.clone(), r))
        .map_err(|e| (Some(rid), e))
}

/// What a conversation entry carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// A text message.
    Text {
        /// The text.
        text: String,
    },
    /// An image; the bytes are downloaded from `GET /v1/media/{id}`.
    Image {
        /// What the server recorded of the image at upload.
        media: MediaRef,
        /// Text shown with the image.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caption: Option<String>,
    },
    /// A membership change; it takes a place in the order like any message.
    Members {
        /// `create`, `add`, `remove` or `leave`.
        action: MemberAction,
        /// The users concerned.
        users: Vec<String>,
    },
}

impl Body {
    /// True for messages (text, image): sent by a client under an idempotent
    /// `message_id`; false for membership changes.
    pub fn is_message(&self) -> bool {
        matches!(self, Self::Text { .. } | Self::Image { .. })
    }

    /// Approximate bytes the body adds to an entry (text, caption, thumbnail).
    pub fn payload_len(&self) -> usize {
        match self {
            Self::Text { text } => text.len(),
            Self::Image { media, caption } => {
                media.thumbnail.len() + caption.as_ref().map_or(0, String::len)
            }
            Self::Members { .. } => 0,
        }
    }
}

/// An uploaded image as messages carry it; every field is set by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRef {
    /// Content address: lowercase hex SHA-256 of the bytes.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// `image/jpeg`, `image/png`, `image/webp` or `image/gif`, from the content.
    pub content_type: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// A small preview: a `data:image/jpeg;base64,...` URL at most 64 px on its long side.
    pub thumbnail: String,
}

/// Kinds of membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberAction {
    /// The conversation was created with these members.
    Create,
    /// These users were added.
    Add,
    /// These users were removed by the owner.
    Remove,
    /// This user left.
    Leave,
}

/// One entry of a conversation's order: a message or a membership change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The conversation.
    pub conv: String,
    /// Position in the conversation: 1, 2, 3, ... without holes.
    pub seq: u64,
    /// Client-chosen id (membership entries get `member-SEQ`).
    pub message_id: String,
    /// The sending (or acting) user.
    pub sender: String,
    /// The sending device.
    pub sender_device: String,
    /// Server time when sequenced, milliseconds since the Unix epoch; non-decreasing per conversation.
    pub server_time_ms: u64,
    /// The content.
    pub body: Body,
}

/// Kind of conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvKind {
    /// Exactly two members, one per pair of users.
    Direct,
    /// 1 to the member limit.
    Group,
}

/// A conversation as one member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvSummary {
    /// The id.
    pub conv: String,
    /// Direct or group.
    pub kind: ConvKind,
    /// The group owner (for direct: the user who opened it).
    pub owner: String,
    /// Current members, sorted.
    pub members: Vec<String>,
    /// Highest seq sequenced so far.
    pub last_seq: u64,
    /// The seq of the entry that made the caller a member.
    pub joined_seq: u64,
    /// Set when the caller is no longer a member: the seq of the entry that removed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_seq: Option<u64>,
}

/// Delivery and read state of one user in one conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The conversation.
    pub conv: String,
    /// The user whose devices acknowledged.
    pub user: String,
    /// Every seq up to this reached at least one of the user's devices.
    pub delivered: u64,
    /// The user read up to this seq (never above `delivered`).
    pub read: u64,
    /// Groups only: every current member has delivered up to this seq.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_delivered: Option<u64>,
    /// Groups only: every current member has read up to this seq.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_read: Option<u64>,
}

impl Receipt {
    /// Two views of one user's cursors in one conversation combined, each field the
    /// greater: cursors only grow, so a receipt computed from an older read (on another
    /// server, or by a concurrent ack) never takes back what a newer one showed.
    pub fn merged(&self, other: &Receipt) -> Receipt {
        assert!(
            self.conv == other.conv && self.user == other.user,
            "merging receipts of different cursors"
        );
        Receipt {
            conv: self.conv.clone(),
            user: self.user.clone(),
            delivered: self.delivered.max(other.delivered),
            read: self.read.max(other.read),
            all_delivered: self.all_delivered.max(other.all_delivered),
            all_read: self.all_read.max(other.all_read),
        }
    }
}

/// Whether a user is online, and when they were last seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceState {
    /// The user.
    pub user: String,
    /// At least one of the user's devices is connected (as far as this server knows).
    pub online: bool,
    /// The last time a device of the user connected, disconnected or polled
    /// (ms since the Unix epoch); absent if never seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
}

/// Every frame the server sends.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Success reply to the request with the same `rid`.
    Ok {
        /// Echo of the request id.
        rid: String,
        /// Operation-specific result.
        result: super::Reply,
    },
    /// Error reply (or, with no `rid`, a connection-level error).
    Error {
        /// Echo of the request id, when known.
        rid: Option<String>,
        /// Stable error code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
        /// How long to wait before retrying, when the error says.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// A conversation entry pushed to a member device.
    Msg(Arc<Entry>),
    /// A receipt pushed to the senders of the acknowledged entries.
    Receipt(Receipt),
    /// The initial catch-up after `hello` is complete; what follows is live.
    CaughtUp {},
    /// Presence changes of contacts and watched users, coalesced: at most one
    /// frame per presence interval, one state per user (the latest).
    Presence {
        /// The new states.
        users: Vec<PresenceState>,
    },
}

impl ServerFrame {
    /// An error frame for `err`.
    pub fn error(rid: Option<String>, err: ProtocolError) -> Self {
        Self::Error {
            rid,
            code: err.code,
            message: err.message,
            retry_after_ms: err.retry_after_ms,
        }
    }

    /// Serializes the frame to JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Malformed frames map to distinct codes, and the rid is echoed when readable.
    #[test]
    fn decode_errors_are_classified() {
        assert_eq!(decode_request("{").unwrap_err().1.code, ErrorCode::BadFrame);
        assert_eq!(
            decode_request("[1]").unwrap_err().1.code,
            ErrorCode::BadFrame
        );
        assert_eq!(
            decode_request(r#"{"op":"send"}"#).unwrap_err().1.code,
            ErrorCode::BadRequest
        );
        let (rid, err) = decode_request(r#"{"rid":"r1","op":"fly"}"#).unwrap_err();
        assert_eq!(
            (rid.as_deref(), err.code),
            (Some("r1"), ErrorCode::UnknownOp)
        );
        let (rid, err) = decode_request(r#"{"rid":"r2","op":"send","conv":1}"#).unwrap_err();
        assert_eq!(
            (rid.as_deref(), err.code),
            (Some("r2"), ErrorCode::BadRequest)
        );
        let (rid, req) =
            decode_request(r#"{"rid":"r3","op":"send","conv":"g:a","message_id":"m","text":"hi"}"#)
                .unwrap();
        assert_eq!(rid, "r3");
        assert!(matches!(req, Request::Send(s) if s.text.as_deref() == Some("hi")));
    }

    /// Entries serialize as a flat `msg` frame.
    #[test]
    fn msg_frame_shape() {
        let entry = Entry {
            conv: "g:a".into(),
            seq: 7,
            message_id: "m1".into(),
            sender: "alice".into(),
            sender_device: "phone".into(),
            server_time_ms: 5,
            body: Body::Text { text: "hi".into() },
        };
        let json: Value =
            serde_json::from_str(&ServerFrame::Msg(Arc::new(entry)).to_json()).unwrap();
        assert_eq!(json["type"], "msg");
        assert_eq!(json["seq"], 7);
        assert_eq!(json["body"]["kind"], "text");
    }
}
