//! What happened in a run, as the clients saw it: the checker's only input.

use std::fmt::Write as _;

/// A device: `(user index, device index)`.
pub type DeviceKey = (u32, u32);

/// A new message a device decided to send (retries are not new sends).
#[derive(Debug, Clone)]
pub struct Sent {
    /// Sending device.
    pub device: DeviceKey,
    /// Conversation.
    pub conv: String,
    /// Client-chosen id.
    pub message_id: String,
    /// Simulated time of the first attempt, ms.
    pub t_ms: u64,
}

/// An acknowledgement the sender received.
#[derive(Debug, Clone)]
pub struct Acked {
    /// Sending device.
    pub device: DeviceKey,
    /// Conversation.
    pub conv: String,
    /// Client-chosen id.
    pub message_id: String,
    /// The seq the server gave it.
    pub seq: u64,
    /// Simulated time the ack arrived, ms.
    pub t_ms: u64,
}

/// An entry shown to a device.
#[derive(Debug, Clone)]
pub struct Received {
    /// Receiving device.
    pub device: DeviceKey,
    /// Conversation.
    pub conv: String,
    /// Seq.
    pub seq: u64,
    /// Message id (membership entries: `member-SEQ`).
    pub message_id: String,
    /// True for membership entries.
    pub system: bool,
    /// A membership entry: its action (`create`, `add`, `remove`, `leave`) and users.
    pub members: Option<(String, Vec<u32>)>,
    /// The entry's `server_time_ms` (the server's clock, not the simulated one).
    pub server_time_ms: u64,
    /// Simulated time, ms.
    pub t_ms: u64,
}

/// What a device asked a page of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// `sync`: entries after this seq.
    Sync {
        /// The `after` asked for.
        after: u64,
    },
    /// `history`: the newest entries before this seq (none: the newest of all).
    History {
        /// The `before` asked for.
        before: Option<u64>,
    },
}

/// A page of `sync` or `history` returned to a device.
#[derive(Debug, Clone)]
pub struct Page {
    /// Asking device.
    pub device: DeviceKey,
    /// Conversation.
    pub conv: String,
    /// What was asked.
    pub kind: PageKind,
    /// The `limit` asked for.
    pub limit: u64,
    /// The entries returned, in the order returned: seq, message id, and whether it
    /// is a membership entry.
    pub entries: Vec<(u64, String, bool)>,
    /// The reply's `has_more`.
    pub has_more: bool,
    /// Simulated time the request was written, ms.
    pub asked_ms: u64,
    /// Simulated time the reply arrived, ms.
    pub t_ms: u64,
}

/// A receipt shown to a device.
#[derive(Debug, Clone)]
pub struct ReceiptSeen {
    /// Receiving device.
    pub device: DeviceKey,
    /// Conversation.
    pub conv: String,
    /// Whose cursor.
    pub user: u32,
    /// Delivered up to.
    pub delivered: u64,
    /// Read up to.
    pub read: u64,
    /// A group's `all_delivered`, if the receipt carried it.
    pub all_delivered: Option<u64>,
    /// A group's `all_read`, if the receipt carried it.
    pub all_read: Option<u64>,
    /// Simulated time it was shown, ms.
    pub t_ms: u64,
}

/// An `ack` a device wrote, and whether the server accepted it.
#[derive(Debug, Clone)]
pub struct CursorAck {
    /// Acking device.
    pub device: DeviceKey,
    /// Conversation.
    pub conv: String,
    /// The `delivered` asked for.
    pub delivered: u64,
    /// The `read` asked for, if any.
    pub read: Option<u64>,
    /// Simulated time the request was written, ms.
    pub sent_ms: u64,
    /// Simulated time the `ok` reply arrived, ms; `None` if none did.
    pub ok_ms: Option<u64>,
}

/// A stretch during which a device had one working session (from `hello` accepted,
/// or the first poll answered, until the session ended).
#[derive(Debug, Clone)]
pub struct SessionSpan {
    /// The device.
    pub device: DeviceKey,
    /// Start, simulated ms.
    pub start_ms: u64,
    /// End, simulated ms.
    pub end_ms: u64,
}

/// What a [`FaultWindow`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// A fault the injector applied.
    Fault(crate::options::FaultKind),
    /// A device was offline by the workload's choice (not reachable, by design).
    DeviceOffline,
    /// A long-polling device asked for small pages and had more waiting
    /// (`has_more`): what reaches it waits for its own next polls, one round trip
    /// per page, so its latency is the device's choice, not the server's.
    Paging,
}

/// A period during which a fault was active.
#[derive(Debug, Clone)]
pub struct FaultWindow {
    /// What (shown in traces and pictures).
    pub kind: WindowKind,
    /// Start, simulated ms.
    pub start_ms: u64,
    /// End, simulated ms.
    pub end_ms: u64,
    /// The device it concerned, if only one.
    pub device: Option<DeviceKey>,
    /// The server it concerned (index, 0-based), if only one.
    pub server: Option<u32>,
}

/// A membership change, as acknowledged to the client that made it.
#[derive(Debug, Clone)]
pub struct MemberChange {
    /// The group.
    pub conv: String,
    /// Its entry's seq.
    pub seq: u64,
    /// `add`, `remove` or `leave`.
    pub action: String,
    /// The users concerned.
    pub users: Vec<u32>,
}

/// How a device learned a user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceSource {
    /// The reply to its own `presence` request.
    Reply,
    /// A `presence` event on a WebSocket.
    Event,
    /// A poll response's `presence` (which may come with entries more often than
    /// once per interval).
    Poll,
}

/// A user's presence state as shown to a device.
#[derive(Debug, Clone)]
pub struct PresenceSeen {
    /// The device shown it.
    pub device: DeviceKey,
    /// The user it is about.
    pub user: u32,
    /// Whether they were online.
    pub online: bool,
    /// Their last-seen time (server clock), if given.
    pub last_seen_ms: Option<u64>,
    /// Reply or event.
    pub source: PresenceSource,
    /// When it arrived, simulated ms.
    pub t_ms: u64,
}

/// The presence phase: some users' devices all went away at `start_ms` and stayed
/// away until `end_ms`, while every other device stayed.
#[derive(Debug, Clone)]
pub struct Away {
    /// The users who went away.
    pub users: Vec<u32>,
    /// When their devices were told to go, simulated ms.
    pub start_ms: u64,
    /// When the run ended, simulated ms.
    pub end_ms: u64,
}

/// The full history of a run.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// New messages.
    pub sent: Vec<Sent>,
    /// Membership changes acknowledged to the client that made them.
    pub member_changes: Vec<MemberChange>,
    /// Acks.
    pub acked: Vec<Acked>,
    /// Entries shown to devices, in the order each device saw them.
    pub received: Vec<Received>,
    /// Receipts shown to devices.
    pub receipts: Vec<ReceiptSeen>,
    /// Acks devices wrote, in the order written.
    pub cursor_acks: Vec<CursorAck>,
    /// Working sessions, in the order they ended.
    pub sessions: Vec<SessionSpan>,
    /// Pages of `sync` and `history` returned to devices.
    pub pages: Vec<Page>,
    /// Fault windows.
    pub faults: Vec<FaultWindow>,
    /// Presence states shown to devices.
    pub presence: Vec<PresenceSeen>,
    /// The presence phase, if the run got that far.
    pub away: Option<Away>,
    /// Human-readable event trace (`--trace`).
    pub trace: Vec<String>,
}

impl History {
    /// Appends a trace line stamped with the simulated time.
    pub fn note(&mut self, t_ms: u64, line: impl AsRef<str>) {
        self.trace.push(format!("{t_ms:>8} ms  {}", line.as_ref()));
    }

    /// A fingerprint of everything observed, to compare two runs of one seed.
    pub fn fingerprint(&self) -> u64 {
        let mut text = String::new();
        for r in &self.received {
            let _ = write!(
                text,
                "r{:?}{}{}{}{};",
                r.device, r.conv, r.seq, r.message_id, r.t_ms
            );
        }
        for a in &self.acked {
            let _ = write!(text, "a{:?}{}{}{};", a.device, a.conv, a.message_id, a.seq);
        }
        for line in &self.trace {
            text.push_str(line);
        }
        // FNV-1a: stable across processes and builds.
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}
