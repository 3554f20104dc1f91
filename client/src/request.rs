//! Typed protocol-v1 requests (`docs/PROTOCOL.md`, "Requests"), written to the wire in
//! one place, [`Request::encode`], so no caller spells a frame by hand.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// The protocol versions this client speaks (sent in `hello`).
pub const VERSIONS: &[u32] = &[1];

/// One request: its `op` and the fields that op takes. Optional fields left `None` are
/// not written, so the server applies its documented default.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request<'a> {
    /// Authenticates the connection as `device` of the token's user, presenting the
    /// highest seq the device holds per conversation.
    Hello {
        /// Always [`VERSIONS`].
        versions: &'static [u32],
        /// Bearer token.
        token: &'a str,
        /// The device's stable id.
        device: &'a str,
        /// Per conversation, the highest seq held; not written when `None`.
        #[serde(skip_serializing_if = "Option::is_none")]
        cursors: Option<&'a BTreeMap<String, u64>>,
        /// Ask for the receipts that moved while the device was away; not written
        /// when `false`.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        receipts: bool,
    },
    /// Asks for the server's time.
    Ping,
    /// Opens (or finds) the direct conversation with `peer`.
    OpenDirect {
        /// The other user.
        peer: &'a str,
    },
    /// Creates group `conv` owned by the caller, with `members` besides the caller.
    CreateGroup {
        /// `g:NAME`.
        conv: &'a str,
        /// The other members.
        members: &'a [String],
    },
    /// Adds `users` to group `conv` (owner only).
    AddMembers {
        /// The group.
        conv: &'a str,
        /// Users to add.
        users: &'a [String],
    },
    /// Removes `users` from group `conv` (owner only).
    RemoveMembers {
        /// The group.
        conv: &'a str,
        /// Users to remove.
        users: &'a [String],
    },
    /// The caller leaves group `conv`.
    Leave {
        /// The group.
        conv: &'a str,
    },
    /// Lists the caller's conversations.
    Conversations,
    /// Sends a message: a text, or an uploaded image (`media`) with `text` as caption.
    Send {
        /// The conversation.
        conv: &'a str,
        /// The client's id of the message; a retry reuses it.
        message_id: &'a str,
        /// The text, or the image's caption.
        #[serde(skip_serializing_if = "Option::is_none")]
        text: Option<&'a str>,
        /// The id of an image uploaded to `conv`.
        #[serde(skip_serializing_if = "Option::is_none")]
        media: Option<&'a str>,
    },
    /// Moves this device's delivered and read cursors (at least one of them).
    Ack {
        /// The conversation.
        conv: &'a str,
        /// Every entry up to this seq is held.
        #[serde(skip_serializing_if = "Option::is_none")]
        delivered: Option<u64>,
        /// The user has read up to this seq.
        #[serde(skip_serializing_if = "Option::is_none")]
        read: Option<u64>,
    },
    /// Entries after seq `after`, ascending.
    Sync {
        /// The conversation.
        conv: &'a str,
        /// Entries with a larger seq are returned.
        after: u64,
        /// Most entries to return (server default when `None`).
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
    },
    /// The newest entries before seq `before` (or the newest at all), ascending.
    History {
        /// The conversation.
        conv: &'a str,
        /// Entries with a smaller seq are returned.
        #[serde(skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// Most entries to return (server default when `None`).
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
    },
    /// Asks `users`' presence, and with `watch` subscribes to their changes.
    Presence {
        /// The users asked about.
        users: &'a [String],
        /// Subscribe to changes too.
        watch: bool,
    },
}

/// A request with its `rid` in front, as written on the wire.
#[derive(Serialize)]
struct Framed<'r, 'a> {
    rid: &'r str,
    #[serde(flatten)]
    request: &'r Request<'a>,
}

impl<'a> Request<'a> {
    /// `hello` for `device` with `token`, presenting `cursors` when given, asking
    /// for the receipts that moved while it was away when `receipts`.
    pub fn hello(
        token: &'a str,
        device: &'a str,
        cursors: Option<&'a BTreeMap<String, u64>>,
        receipts: bool,
    ) -> Self {
        Request::Hello {
            versions: VERSIONS,
            token,
            device,
            cursors,
            receipts,
        }
    }

    /// A text message.
    pub fn send_text(conv: &'a str, message_id: &'a str, text: &'a str) -> Self {
        Request::Send {
            conv,
            message_id,
            text: Some(text),
            media: None,
        }
    }

    /// The `op` this request is written with.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Ping => "ping",
            Request::OpenDirect { .. } => "open_direct",
            Request::CreateGroup { .. } => "create_group",
            Request::AddMembers { .. } => "add_members",
            Request::RemoveMembers { .. } => "remove_members",
            Request::Leave { .. } => "leave",
            Request::Conversations => "conversations",
            Request::Send { .. } => "send",
            Request::Ack { .. } => "ack",
            Request::Sync { .. } => "sync",
            Request::History { .. } => "history",
            Request::Presence { .. } => "presence",
        }
    }

    /// The frame as written on the wire: `{"rid": rid, "op": ..., fields...}`.
    pub fn encode(&self, rid: &str) -> String {
        debug_assert!(!rid.is_empty() && rid.len() <= 64, "a rid is 1-64 bytes");
        serde_json::to_string(&Framed { rid, request: self }).expect("a request serializes")
    }

    /// The same frame as a JSON value (for callers that post it as an HTTP body).
    pub fn to_value(&self, rid: &str) -> Value {
        serde_json::to_value(Framed { rid, request: self }).expect("a request serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every request is written with its rid and op and exactly the documented fields.
    #[test]
    fn requests_are_written_as_the_protocol_documents_them() {
        let cursors = BTreeMap::from([("d:a:b".to_owned(), 17)]);
        let users = vec!["bob".to_owned()];
        let cases = [
            (
                Request::hello("t", "phone", Some(&cursors), false),
                json!({"rid": "r", "op": "hello", "versions": [1], "token": "t", "device": "phone", "cursors": {"d:a:b": 17}}),
            ),
            (
                Request::hello("t", "phone", None, true),
                json!({"rid": "r", "op": "hello", "versions": [1], "token": "t", "device": "phone", "receipts": true}),
            ),
            (
                Request::hello("t", "phone", None, false),
                json!({"rid": "r", "op": "hello", "versions": [1], "token": "t", "device": "phone"}),
            ),
            (Request::Ping, json!({"rid": "r", "op": "ping"})),
            (
                Request::OpenDirect { peer: "bob" },
                json!({"rid": "r", "op": "open_direct", "peer": "bob"}),
            ),
            (
                Request::CreateGroup {
                    conv: "g:t",
                    members: &users,
                },
                json!({"rid": "r", "op": "create_group", "conv": "g:t", "members": ["bob"]}),
            ),
            (
                Request::AddMembers {
                    conv: "g:t",
                    users: &users,
                },
                json!({"rid": "r", "op": "add_members", "conv": "g:t", "users": ["bob"]}),
            ),
            (
                Request::RemoveMembers {
                    conv: "g:t",
                    users: &users,
                },
                json!({"rid": "r", "op": "remove_members", "conv": "g:t", "users": ["bob"]}),
            ),
            (
                Request::Leave { conv: "g:t" },
                json!({"rid": "r", "op": "leave", "conv": "g:t"}),
            ),
            (
                Request::Conversations,
                json!({"rid": "r", "op": "conversations"}),
            ),
            (
                Request::send_text("g:t", "m1", "hi"),
                json!({"rid": "r", "op": "send", "conv": "g:t", "message_id": "m1", "text": "hi"}),
            ),
            (
                Request::Send {
                    conv: "g:t",
                    message_id: "m1",
                    text: None,
                    media: Some("ab"),
                },
                json!({"rid": "r", "op": "send", "conv": "g:t", "message_id": "m1", "media": "ab"}),
            ),
            (
                Request::Ack {
                    conv: "g:t",
                    delivered: Some(3),
                    read: None,
                },
                json!({"rid": "r", "op": "ack", "conv": "g:t", "delivered": 3}),
            ),
            (
                Request::Sync {
                    conv: "g:t",
                    after: 2,
                    limit: Some(5),
                },
                json!({"rid": "r", "op": "sync", "conv": "g:t", "after": 2, "limit": 5}),
            ),
            (
                Request::History {
                    conv: "g:t",
                    before: None,
                    limit: Some(5),
                },
                json!({"rid": "r", "op": "history", "conv": "g:t", "limit": 5}),
            ),
            (
                Request::Presence {
                    users: &users,
                    watch: true,
                },
                json!({"rid": "r", "op": "presence", "users": ["bob"], "watch": true}),
            ),
        ];
        for (request, expected) in cases {
            let written: Value = serde_json::from_str(&request.encode("r")).unwrap();
            assert_eq!(written, expected, "{}", request.op());
            assert_eq!(request.to_value("r"), expected, "{}", request.op());
            assert_eq!(written["op"], request.op());
        }
    }

    /// The rid comes first on the wire, then the op, as in PROTOCOL.md's examples.
    #[test]
    fn the_rid_and_op_lead_the_frame() {
        let text = Request::send_text("g:t", "m1", "hi").encode("s7");
        assert!(text.starts_with(r#"{"rid":"s7","op":"send","#), "{text}");
    }
}
