//! Parsing what the server sends (`docs/PROTOCOL.md`, "Replies" and "Events") into
//! typed frames that borrow from the text they were read from, so reading a frame
//! allocates only for what it holds (a presence event's states, a body's user list).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// What a server frame is (its `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameKind {
    /// A successful reply (`result`).
    Ok,
    /// An error reply, or a connection-level error when `rid` is null.
    Error,
    /// A conversation entry.
    Msg,
    /// Another user's cursors moved past entries this user sent.
    Receipt,
    /// The catch-up after `hello` is complete.
    CaughtUp,
    /// Presence changes of contacts or watched users.
    Presence,
    /// A type this client does not know (a newer server); callers skip it.
    #[serde(other)]
    Unknown,
}

/// One frame from the server. Which fields are present depends on [`FrameKind`]; every
/// field the protocol documents for that kind is read, anything else is skipped.
#[derive(Debug, Deserialize)]
pub struct ServerFrame<'a> {
    /// The frame's `type`.
    #[serde(rename = "type")]
    pub kind: FrameKind,
    /// Replies: the request's rid (`None` for connection-level errors).
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub rid: Option<Cow<'a, str>>,
    /// `ok`: the result, unparsed (read it with [`ServerFrame::result`]).
    #[serde(default, borrow)]
    pub result: Option<&'a RawValue>,
    /// `error`: the stable code.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub code: Option<Cow<'a, str>>,
    /// `error`: the human-readable message.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub message: Option<Cow<'a, str>>,
    /// `error`: how long to wait before retrying, when the server says.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    /// `msg`, `receipt`: the conversation.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub conv: Option<Cow<'a, str>>,
    /// `msg`: the entry's seq.
    #[serde(default)]
    pub seq: Option<u64>,
    /// `msg`: the client's id of the message (`member-N` for membership entries).
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub message_id: Option<Cow<'a, str>>,
    /// `msg`: who sent it.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub sender: Option<Cow<'a, str>>,
    /// `msg`: from which device.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub sender_device: Option<Cow<'a, str>>,
    /// `msg`: when the server stored it (never decreases within a conversation).
    #[serde(default)]
    pub server_time_ms: Option<u64>,
    /// `msg`: what it says.
    #[serde(default, borrow)]
    pub body: Option<Body<'a>>,
    /// `receipt`: whose cursors moved.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub user: Option<Cow<'a, str>>,
    /// `receipt`: that user's delivered cursor.
    #[serde(default)]
    pub delivered: Option<u64>,
    /// `receipt`: that user's read cursor.
    #[serde(default)]
    pub read: Option<u64>,
    /// `receipt`, groups: the minimum delivered cursor over current members.
    #[serde(default)]
    pub all_delivered: Option<u64>,
    /// `receipt`, groups: the minimum read cursor over current members.
    #[serde(default)]
    pub all_read: Option<u64>,
    /// `presence`: the states carried.
    #[serde(default, borrow)]
    pub users: Option<Vec<PresenceState<'a>>>,
}

/// An entry's `body`.
#[derive(Debug, Clone, Deserialize)]
pub struct Body<'a> {
    /// `text`, `image` or `members`.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub kind: Option<Cow<'a, str>>,
    /// `text`: the text.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub text: Option<Cow<'a, str>>,
    /// `image`: the caption, if any.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub caption: Option<Cow<'a, str>>,
    /// `image`: what the server recorded at upload.
    #[serde(default, borrow)]
    pub media: Option<MediaRef<'a>>,
    /// `members`: `create`, `add`, `remove` or `leave`.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub action: Option<Cow<'a, str>>,
    /// `members`: the users concerned.
    #[serde(default, borrow)]
    pub users: Option<Vec<Cow<'a, str>>>,
}

/// The image an entry carries.
#[derive(Debug, Clone, Deserialize)]
pub struct MediaRef<'a> {
    /// Its content address.
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// Its size in bytes.
    pub size: u64,
}

/// One user's presence.
#[derive(Debug, Clone, Deserialize)]
pub struct PresenceState<'a> {
    /// The user.
    #[serde(borrow)]
    pub user: Cow<'a, str>,
    /// Whether a device of theirs is connected.
    pub online: bool,
    /// When a device of theirs last connected, disconnected or polled (absent: never seen).
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
}

/// The result of a `send`.
#[derive(Debug, Clone, Deserialize)]
pub struct SendResult<'a> {
    /// The conversation.
    #[serde(borrow)]
    pub conv: Cow<'a, str>,
    /// The seq the message was stored at.
    pub seq: u64,
    /// The message's id.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub message_id: Option<Cow<'a, str>>,
    /// When it was stored.
    #[serde(default)]
    pub server_time_ms: Option<u64>,
    /// True when a retry found the message already stored.
    #[serde(default)]
    pub duplicate: bool,
}

/// The result of `sync` and `history`: a page of entries, ascending.
#[derive(Debug, Clone, Deserialize)]
pub struct EntryPage<'a> {
    /// The entries.
    #[serde(borrow)]
    pub entries: Vec<Entry<'a>>,
    /// `sync`: the last entry the caller may see.
    #[serde(default)]
    pub last_seq: Option<u64>,
    /// More entries lie beyond this page.
    #[serde(default)]
    pub has_more: bool,
}

/// One entry of a page, shaped like a `msg` event without its `type`.
#[derive(Debug, Clone, Deserialize)]
pub struct Entry<'a> {
    /// Its seq.
    pub seq: u64,
    /// The client's id of the message.
    #[serde(borrow)]
    pub message_id: Cow<'a, str>,
    /// Who sent it.
    #[serde(default, borrow, deserialize_with = "borrowed_text")]
    pub sender: Option<Cow<'a, str>>,
    /// When the server stored it.
    #[serde(default)]
    pub server_time_ms: Option<u64>,
    /// What it says.
    #[serde(default, borrow)]
    pub body: Option<Body<'a>>,
}

/// The result of a `presence` request.
#[derive(Debug, Clone, Deserialize)]
pub struct PresenceReply<'a> {
    /// One state per distinct user asked.
    #[serde(borrow)]
    pub users: Vec<PresenceState<'a>>,
}

/// Reads an optional string borrowing it from the input when it has no escapes (serde
/// copies an `Option<Cow<str>>` otherwise).
fn borrowed_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Text<'b>(#[serde(borrow)] Cow<'b, str>);
    Ok(Option::<Text<'de>>::deserialize(deserializer)?.map(|text| text.0))
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not a protocol frame: {0}")]
pub struct ParseError(#[from] serde_json::Error);

impl<'a> ServerFrame<'a> {
    /// Reads one frame from the text of a WebSocket message or an HTTP body.
    pub fn parse(text: &'a str) -> Result<Self, ParseError> {
        Ok(serde_json::from_str(text)?)
    }

    /// The rid, if this is a reply to a request.
    pub fn rid(&self) -> Option<&str> {
        self.rid.as_deref()
    }

    /// An `ok` frame's result read as `T`; `None` for other frames or another shape.
    pub fn result<T: Deserialize<'a>>(&self) -> Option<T> {
        let raw: &'a RawValue = self.result?;
        serde_json::from_str(raw.get()).ok()
    }

    /// The error code of an `error` frame.
    pub fn error_code(&self) -> Option<&str> {
        match self.kind {
            FrameKind::Error => self.code.as_deref(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every documented frame kind is read with its fields; an unknown type is kept as such.
    #[test]
    fn documented_frames_are_read_with_their_fields() {
        let ok = r#"{"type":"ok","rid":"s1","result":{"conv":"g:t","seq":8,"message_id":"m","server_time_ms":5,"duplicate":false}}"#;
        let frame = ServerFrame::parse(ok).unwrap();
        assert_eq!((frame.kind, frame.rid()), (FrameKind::Ok, Some("s1")));
        let sent: SendResult = frame.result().unwrap();
        assert_eq!(
            (sent.conv.as_ref(), sent.seq, sent.duplicate),
            ("g:t", 8, false)
        );

        let error = r#"{"type":"error","rid":null,"code":"slow_consumer","message":"m","retry_after_ms":7}"#;
        let frame = ServerFrame::parse(error).unwrap();
        assert_eq!(frame.error_code(), Some("slow_consumer"));
        assert_eq!((frame.rid(), frame.retry_after_ms), (None, Some(7)));

        let msg = r#"{"type":"msg","conv":"g:t","seq":7,"message_id":"member-7","sender":"a","sender_device":"p","server_time_ms":9,"body":{"kind":"members","action":"add","users":["d"]}}"#;
        let frame = ServerFrame::parse(msg).unwrap();
        let body = frame.body.as_ref().unwrap();
        assert_eq!(
            (frame.kind, frame.seq, frame.server_time_ms),
            (FrameKind::Msg, Some(7), Some(9))
        );
        assert_eq!(body.action.as_deref(), Some("add"));
        assert_eq!(body.users.as_ref().unwrap()[0], "d");

        let image = r#"{"type":"msg","conv":"g:t","seq":9,"message_id":"m","body":{"kind":"image","media":{"id":"ab","size":3,"width":1}}}"#;
        let frame = ServerFrame::parse(image).unwrap();
        let media = frame.body.unwrap().media.unwrap();
        assert_eq!((media.id.as_ref(), media.size), ("ab", 3));

        let receipt = r#"{"type":"receipt","conv":"g:t","user":"b","delivered":31,"read":29,"all_delivered":12,"all_read":10}"#;
        let frame = ServerFrame::parse(receipt).unwrap();
        assert_eq!(
            (
                frame.delivered,
                frame.read,
                frame.all_delivered,
                frame.all_read
            ),
            (Some(31), Some(29), Some(12), Some(10))
        );

        let page = r#"{"type":"ok","rid":"q","result":{"conv":"g:t","entries":[{"conv":"g:t","seq":3,"message_id":"m","sender":"a","body":{"kind":"text","text":"x"}}],"last_seq":4,"has_more":true}}"#;
        let page: EntryPage = ServerFrame::parse(page).unwrap().result().unwrap();
        assert_eq!(
            (page.entries[0].seq, page.last_seq, page.has_more),
            (3, Some(4), true)
        );

        let presence = r#"{"type":"presence","users":[{"user":"b","online":false,"last_seen_ms":1},{"user":"c","online":true}]}"#;
        let users = ServerFrame::parse(presence).unwrap().users.unwrap();
        assert_eq!(
            (
                users[0].online,
                users[0].last_seen_ms,
                users[1].last_seen_ms
            ),
            (false, Some(1), None)
        );

        assert_eq!(
            ServerFrame::parse(r#"{"type":"caught_up"}"#).unwrap().kind,
            FrameKind::CaughtUp
        );
        assert_eq!(
            ServerFrame::parse(r#"{"type":"later","x":1}"#)
                .unwrap()
                .kind,
            FrameKind::Unknown
        );
        assert!(
            ServerFrame::parse(r#"{"rid":"x"}"#).is_err(),
            "a frame needs a type"
        );
        assert!(ServerFrame::parse("not json").is_err());
    }

    /// Text without escapes is borrowed, not copied.
    #[test]
    fn plain_text_is_borrowed() {
        let msg =
            r#"{"type":"msg","conv":"d:a:b","seq":1,"body":{"kind":"text","text":"lg:12:x"}}"#;
        let frame = ServerFrame::parse(msg).unwrap();
        assert!(matches!(frame.conv, Some(Cow::Borrowed(_))));
        assert!(matches!(
            frame.body.unwrap().text,
            Some(Cow::Borrowed("lg:12:x"))
        ));
    }
}
