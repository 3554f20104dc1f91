//! Push notifications for users with no connected device.
//!
//! When a new message is sequenced, every recipient other than the sender that
//! has no device connected to any server (nor a live long-poll mailbox) gets a
//! [`Notification`] handed to the configured [`PushSink`]. A sink never blocks
//! the send path: it queues, and what it cannot queue or deliver it drops and
//! counts (`chatproof_push_dropped{reason}`). Notifications are a courtesy, not
//! a delivery channel: the message itself waits in the store for the device.

use std::sync::Arc;

use serde::Serialize;

use crate::metrics::Metrics;
use crate::protocol::{Body, Entry};

#[cfg(not(madsim))]
pub mod webhook;

/// What an offline user's phone is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notification {
    /// The user to notify.
    pub user: String,
    /// The conversation.
    pub conv: String,
    /// The entry's seq.
    pub seq: u64,
    /// Who sent it.
    pub sender: String,
    /// The sender's message id.
    pub message_id: String,
    /// `text` or `image`.
    pub kind: &'static str,
    /// The first characters of a text, or an image's caption.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// When the entry was sequenced (ms since the Unix epoch).
    pub server_time_ms: u64,
}

/// Characters of text a notification previews.
pub const PREVIEW_CHARS_MAX: usize = 100;

impl Notification {
    /// The notification of `entry` for `user`, or `None` for entries that notify
    /// nobody (membership changes).
    pub fn of(entry: &Entry, user: &str) -> Option<Self> {
        let (kind, preview) = match &entry.body {
            Body::Text { text } => ("text", Some(text.as_str())),
            Body::Image { caption, .. } => ("image", caption.as_deref()),
            Body::Members { .. } => return None,
        };
        Some(Self {
            user: user.to_owned(),
            conv: entry.conv.clone(),
            seq: entry.seq,
            sender: entry.sender.clone(),
            message_id: entry.message_id.clone(),
            kind,
            preview: preview.map(|p| p.chars().take(PREVIEW_CHARS_MAX).collect()),
            server_time_ms: entry.server_time_ms,
        })
    }
}

/// Where notifications go. `notify` must return at once (queue, never wait).
pub trait PushSink: Send + Sync + 'static {
    /// Hands over one notification; drops and counts it if it cannot be queued.
    fn notify(&self, notification: Notification);
}

/// The default sink: one log line per notification (target `chatproof::push`).
pub struct LogSink {
    metrics: Arc<Metrics>,
}

impl LogSink {
    /// A sink counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { metrics })
    }
}

impl PushSink for LogSink {
    fn notify(&self, n: Notification) {
        tracing::info!(
            target: "chatproof::push",
            user = n.user,
            conv = n.conv,
            seq = n.seq,
            sender = n.sender,
            kind = n.kind,
            "push notification"
        );
        self.metrics.push_sent.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: Body) -> Entry {
        Entry {
            conv: "g:a".into(),
            seq: 3,
            message_id: "m1".into(),
            sender: "ann".into(),
            sender_device: "phone".into(),
            server_time_ms: 9,
            body,
        }
    }

    /// Texts preview their first characters; membership changes notify nobody.
    #[test]
    fn notification_content() {
        let long = "é".repeat(PREVIEW_CHARS_MAX + 50);
        let n = Notification::of(&entry(Body::Text { text: long }), "bob").unwrap();
        assert_eq!((n.kind, n.user.as_str(), n.seq), ("text", "bob", 3));
        assert_eq!(n.preview.unwrap().chars().count(), PREVIEW_CHARS_MAX);
        let members = Body::Members {
            action: crate::protocol::MemberAction::Add,
            users: vec!["bob".into()],
        };
        assert!(Notification::of(&entry(members), "bob").is_none());
    }
}
