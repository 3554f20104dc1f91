//! The long-polling fallback: `POST /v1/poll` holds a request until something
//! arrives for the device, or the timeout.
//!
//! Entries are always read from the store after the cursors the device presents
//! (or its acknowledged cursors for conversations it does not list), in seq order
//! per conversation; the device's mailbox only wakes the poll and keeps receipts
//! and presence changes between polls. So a response lost on the way is simply
//! asked for again with the same cursors: nothing is lost, and a device that
//! advances its cursors from what it received sees nothing twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::hub::Push;
use crate::mailbox::{Mailbox, Opened};
use crate::metrics::LimitHit;
use crate::protocol::{Entry, ErrorCode, PollRequest, PresenceState, ProtocolError, Receipt};
use crate::service::{Caller, ChatService};

/// How long a poll waits when the request names no timeout.
pub const POLL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(25);

/// Where the device is in one conversation.
struct Position {
    /// First seq it does not have.
    next: u64,
    /// Last seq it may see (membership).
    visible_until: u64,
    /// Last seq known to exist.
    last_seq: u64,
}

impl Position {
    fn behind(&self) -> bool {
        self.next <= self.last_seq.min(self.visible_until)
    }
}

/// What one poll collected.
#[derive(Default)]
struct Collected {
    entries: Vec<Entry>,
    has_more: bool,
    receipts: BTreeMap<(String, String), Receipt>,
    presence: BTreeMap<String, PresenceState>,
    /// Conversations may exist that the positions do not know: re-read them.
    rescan: bool,
    /// The mailbox ended (replaced by a WebSocket, or overflowed).
    closed: bool,
}

impl Collected {
    fn absorb(&mut self, push: Push, positions: &mut BTreeMap<String, Position>) {
        match push {
            Push::Entry(entry, _) => match positions.get_mut(&entry.conv) {
                Some(pos) => pos.last_seq = pos.last_seq.max(entry.seq),
                None => self.rescan = true,
            },
            Push::Receipt(receipt, _) => {
                let key = (receipt.conv.clone(), receipt.user.clone());
                let merged = match self.receipts.remove(&key) {
                    Some(shown) => shown.merged(&receipt),
                    None => Receipt::clone(&receipt),
                };
                self.receipts.insert(key, merged);
            }
            Push::Presence(states) => {
                for state in states.iter() {
                    self.presence
                        .insert(state.user.clone(), PresenceState::clone(state));
                }
            }
            Push::Resync => self.rescan = true,
            Push::Close(_) => self.closed = true,
            Push::Frame(_) => {}
        }
    }

    fn response(self, server_time_ms: u64) -> Value {
        json!({
            "entries": self.entries,
            "has_more": self.has_more,
            "receipts": self.receipts.into_values().collect::<Vec<_>>(),
            "presence": self.presence.into_values().collect::<Vec<_>>(),
            "server_time_ms": server_time_ms,
        })
    }
}

/// Serves one poll of `caller`'s device.
pub async fn poll(
    svc: &Arc<ChatService>,
    caller: &Caller,
    req: PollRequest,
) -> Result<Value, ProtocolError> {
    let timeout = req
        .timeout_ms
        .map_or(POLL_TIMEOUT_DEFAULT, Duration::from_millis)
        .min(svc.limits().poll_timeout_max);
    let limit = svc.limits().page_len(req.limit)? as usize;
    let mailbox = open_mailbox(svc, caller).await?;
    let generation = mailbox.begin_poll(svc.clock().now_ms());
    let result = poll_in(
        svc,
        caller,
        &mailbox,
        generation,
        &req.cursors,
        timeout,
        limit,
    )
    .await;
    mailbox.end_poll(svc.clock().now_ms());
    result.map(|c| c.response(svc.clock().now_ms()))
}

/// The device's mailbox; a new one is registered here and in the cluster
/// before anything is read, so nothing sequenced afterwards goes unnoticed.
async fn open_mailbox(
    svc: &Arc<ChatService>,
    caller: &Caller,
) -> Result<Arc<Mailbox>, ProtocolError> {
    let now = svc.clock().now_ms();
    let opened = svc
        .mailboxes()
        .get_or_open(svc.hub(), &caller.user, &caller.device, svc.limits(), now)
        .inspect_err(|e| {
            let limit = match e.code {
                ErrorCode::TooManyDevices => LimitHit::DevicesPerUser,
                _ => LimitHit::PollMailboxes,
            };
            svc.metrics().count_limit_hit(limit);
        })?;
    match opened {
        Opened::Existing(mailbox) => {
            svc.record_last_seen(&caller.user);
            Ok(mailbox)
        }
        Opened::New(mailbox) => {
            svc.metrics().polls_open.set(svc.mailboxes().len() as i64);
            if let Some(fabric) = svc.fabric() {
                if let Err(e) = fabric.device_connected(&caller.user, &caller.device).await {
                    tracing::error!(error = %e, "cannot register a polling device in the cluster");
                    mailbox.close();
                    return Err(crate::service::registry_unavailable());
                }
            }
            svc.device_up(&caller.user);
            Ok(mailbox)
        }
    }
}

async fn poll_in(
    svc: &Arc<ChatService>,
    caller: &Caller,
    mailbox: &Mailbox,
    generation: u64,
    cursors: &BTreeMap<String, u64>,
    timeout: Duration,
    limit: usize,
) -> Result<Collected, ProtocolError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut queue = mailbox.queue.lock().await;
    let mut got = Collected::default();
    if mailbox.is_superseded(generation) {
        return Ok(got);
    }
    let states = svc.conversations(caller).await?;
    svc.check_cursors(caller, &states, cursors).await?;
    let mut positions = BTreeMap::new();
    add_positions(svc, caller, &states, cursors, &mut positions).await?;
    // Presence alone is answered at most once per presence interval.
    let mut presence_due: Option<tokio::time::Instant> = None;
    loop {
        while let Ok(push) = queue.try_recv() {
            got.absorb(push, &mut positions);
        }
        if std::mem::take(&mut got.rescan) {
            let states = svc.conversations(caller).await?;
            add_positions(svc, caller, &states, cursors, &mut positions).await?;
        }
        read_behind(svc, &positions, limit, &mut got).await?;
        let now = tokio::time::Instant::now();
        if got.closed {
            mailbox.close();
        }
        if !got.entries.is_empty() || !got.receipts.is_empty() || got.closed || now >= deadline {
            return Ok(got);
        }
        if !got.presence.is_empty() {
            let due = *presence_due.get_or_insert(now + svc.limits().presence_interval);
            if now >= due {
                return Ok(got);
            }
        }
        let wake_at = presence_due.map_or(deadline, |due| due.min(deadline));
        let superseded = mailbox.superseded();
        if mailbox.is_superseded(generation) {
            return Ok(got);
        }
        tokio::select! {
            biased;
            () = superseded => return Ok(got),
            push = queue.recv() => match push {
                Some(push) => got.absorb(push, &mut positions),
                None => got.closed = true,
            },
            () = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

/// Adds a position for each conversation of `states` not yet known, and raises
/// the last seq of the known ones.
async fn add_positions(
    svc: &ChatService,
    caller: &Caller,
    states: &[crate::store::ConvState],
    cursors: &BTreeMap<String, u64>,
    positions: &mut BTreeMap<String, Position>,
) -> Result<(), ProtocolError> {
    for state in states {
        let conv = &state.record.id;
        if let Some(pos) = positions.get_mut(conv) {
            pos.last_seq = pos.last_seq.max(state.last_seq);
            continue;
        }
        let Ok(m) = state.record.require_reader(&caller.user) else {
            continue;
        };
        let next = svc
            .stream_start(caller, state, cursors.get(conv).copied(), true)
            .await?;
        positions.insert(
            conv.clone(),
            Position {
                next,
                visible_until: m.visible_until(),
                last_seq: state.last_seq,
            },
        );
    }
    Ok(())
}

/// Reads what the device lacks, conversation by conversation, up to `limit` entries.
async fn read_behind(
    svc: &ChatService,
    positions: &BTreeMap<String, Position>,
    limit: usize,
    got: &mut Collected,
) -> Result<(), ProtocolError> {
    for (conv, pos) in positions.iter().filter(|(_, p)| p.behind()) {
        let room = limit.saturating_sub(got.entries.len());
        if room == 0 {
            got.has_more = true;
            break;
        }
        let until = pos.last_seq.min(pos.visible_until);
        let room = u32::try_from(room).unwrap_or(u32::MAX);
        let entries = svc
            .store()
            .read_after(conv, pos.next - 1, until, room)
            .await
            .map_err(|e| {
                tracing::error!(conv, error = %e, "poll read failed");
                ProtocolError::new(ErrorCode::Internal, "storage failure; poll again")
            })?;
        if entries.len() == room as usize && entries.last().is_some_and(|e| e.seq < until) {
            got.has_more = true;
        }
        debug_assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
        got.entries.extend(entries);
    }
    Ok(())
}
