//! What the server answers: the `result` of each request's `ok` frame, the
//! long-poll answer, the image upload answer and the body of an HTTP error.
//!
//! Every shape here is the one `docs/PROTOCOL.md` documents; the service builds
//! these values and the transports only encode them ([`super::ServerFrame::to_json`]
//! for frames, [`encode`] for HTTP bodies).

use std::sync::Arc;

use serde::Serialize;

use super::{ConvSummary, Entry, ErrorCode, MediaRef, PresenceState, ProtocolError, Receipt};

/// The `result` of an `ok` frame: one variant per request kind, each encoded as
/// its fields alone (the frame's `rid` says which request it answers).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `hello`: the session is open.
    Hello {
        /// The protocol version the server speaks.
        version: u32,
        /// The authenticated user.
        user: String,
        /// The device, as named in `hello`.
        device: String,
        /// The server's clock (ms since the Unix epoch).
        server_time_ms: u64,
        /// Every conversation the user is a member of.
        conversations: Vec<ConvSummary>,
    },
    /// `open_direct` and `create_group`: the conversation as the caller sees it.
    Conversation {
        /// The conversation.
        conversation: ConvSummary,
    },
    /// `add_members`, `remove_members` and `leave`: the membership entry's seq.
    MembershipChanged {
        /// The conversation.
        conv: String,
        /// The seq of the entry that records the change.
        seq: u64,
    },
    /// `send`: the message is durable under `seq`.
    Sent {
        /// The conversation.
        conv: String,
        /// The message's seq (its first one, for a retry).
        seq: u64,
        /// The client's message id.
        message_id: String,
        /// When the server sequenced it (ms since the Unix epoch).
        server_time_ms: u64,
        /// True when this was a retry of a message already sequenced.
        duplicate: bool,
    },
    /// `ack`: the device's cursor after the ack.
    Acked {
        /// The conversation.
        conv: String,
        /// Everything up to this seq has reached the device.
        delivered: u64,
        /// Everything up to this seq has been read on the device.
        read: u64,
    },
    /// `sync`: entries after a cursor, ascending.
    SyncPage {
        /// The conversation.
        conv: String,
        /// The page.
        entries: Vec<Entry>,
        /// The newest seq the caller may see.
        last_seq: u64,
        /// True when entries after the page remain.
        has_more: bool,
    },
    /// `history`: the newest entries before a seq, ascending.
    HistoryPage {
        /// The conversation.
        conv: String,
        /// The page.
        entries: Vec<Entry>,
        /// True when older entries the caller may see remain.
        has_more: bool,
    },
    /// `presence`: the states of the users asked about.
    Presence {
        /// One state per user asked about.
        users: Vec<PresenceState>,
    },
    /// `conversations`: every conversation the user is a member of.
    Conversations {
        /// The conversations.
        conversations: Vec<ConvSummary>,
    },
    /// `ping`: the server's clock.
    Pong {
        /// The server's clock (ms since the Unix epoch).
        server_time_ms: u64,
    },
}

/// The answer to one `POST /v1/poll`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PollReply {
    /// Entries in each conversation's order, each after the device's cursor.
    pub entries: Vec<Arc<Entry>>,
    /// True when more entries wait (poll again at once).
    pub has_more: bool,
    /// Receipts for the device's user, the latest per conversation and user.
    pub receipts: Vec<Receipt>,
    /// Presence changes of contacts and watched users, the latest per user.
    pub presence: Vec<PresenceState>,
    /// The server's clock when the poll returned (ms since the Unix epoch).
    pub server_time_ms: u64,
}

/// The answer to an image upload (`201 Created`).
#[derive(Debug, Clone, Serialize)]
pub struct MediaStored {
    /// The stored image, as a message carries it.
    pub media: MediaRef,
}

/// The body of every HTTP error response: the same code and message a WebSocket
/// `error` frame carries.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// Stable error code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
    /// How long to wait before retrying, when the error says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl From<&ProtocolError> for ErrorBody {
    fn from(err: &ProtocolError) -> Self {
        Self {
            code: err.code,
            message: err.message.clone(),
            retry_after_ms: err.retry_after_ms,
        }
    }
}

/// Encodes an HTTP body of the protocol as JSON text.
pub fn encode(body: &impl Serialize) -> String {
    serde_json::to_string(body).expect("protocol bodies always serialize")
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::protocol::ServerFrame;

    fn result_of(reply: Reply) -> Value {
        let frame = ServerFrame::Ok {
            rid: "r".into(),
            result: reply,
        };
        let mut json: Value = serde_json::from_str(&frame.to_json()).unwrap();
        assert_eq!((&json["type"], &json["rid"]), (&json!("ok"), &json!("r")));
        json["result"].take()
    }

    /// Each reply is encoded as exactly the fields PROTOCOL.md lists for it.
    #[test]
    fn reply_wire_shapes() {
        let sent = Reply::Sent {
            conv: "d:a:b".into(),
            seq: 3,
            message_id: "m1".into(),
            server_time_ms: 9,
            duplicate: false,
        };
        assert_eq!(
            result_of(sent),
            json!({"conv": "d:a:b", "seq": 3, "message_id": "m1", "server_time_ms": 9, "duplicate": false})
        );
        let acked = Reply::Acked {
            conv: "g:x".into(),
            delivered: 5,
            read: 4,
        };
        assert_eq!(
            result_of(acked),
            json!({"conv": "g:x", "delivered": 5, "read": 4})
        );
        let page = Reply::SyncPage {
            conv: "g:x".into(),
            entries: Vec::new(),
            last_seq: 7,
            has_more: true,
        };
        assert_eq!(
            result_of(page),
            json!({"conv": "g:x", "entries": [], "last_seq": 7, "has_more": true})
        );
        let history = Reply::HistoryPage {
            conv: "g:x".into(),
            entries: Vec::new(),
            has_more: false,
        };
        assert_eq!(
            result_of(history),
            json!({"conv": "g:x", "entries": [], "has_more": false})
        );
        let changed = Reply::MembershipChanged {
            conv: "g:x".into(),
            seq: 2,
        };
        assert_eq!(result_of(changed), json!({"conv": "g:x", "seq": 2}));
        assert_eq!(
            result_of(Reply::Pong { server_time_ms: 1 }),
            json!({"server_time_ms": 1})
        );
        assert_eq!(
            result_of(Reply::Presence { users: Vec::new() }),
            json!({"users": []})
        );
        assert_eq!(
            result_of(Reply::Conversations {
                conversations: Vec::new()
            }),
            json!({"conversations": []})
        );
        let hello = Reply::Hello {
            version: 1,
            user: "a".into(),
            device: "p".into(),
            server_time_ms: 2,
            conversations: Vec::new(),
        };
        assert_eq!(
            result_of(hello),
            json!({"version": 1, "user": "a", "device": "p", "server_time_ms": 2, "conversations": []})
        );
    }

    /// Poll answers and error bodies carry every documented field, and an error's
    /// `retry_after_ms` only when it has one.
    #[test]
    fn body_wire_shapes() {
        let poll: Value = serde_json::from_str(&encode(&PollReply {
            server_time_ms: 4,
            ..PollReply::default()
        }))
        .unwrap();
        assert_eq!(
            poll,
            json!({"entries": [], "has_more": false, "receipts": [], "presence": [], "server_time_ms": 4})
        );
        let plain = ProtocolError::new(ErrorCode::NotMember, "no");
        let body: Value = serde_json::from_str(&encode(&ErrorBody::from(&plain))).unwrap();
        assert_eq!(body, json!({"code": "not_member", "message": "no"}));
        let mut limited = ProtocolError::new(ErrorCode::RateLimited, "slow down");
        limited.retry_after_ms = Some(250);
        let body: Value = serde_json::from_str(&encode(&ErrorBody::from(&limited))).unwrap();
        assert_eq!(body["retry_after_ms"], 250);
    }
}
