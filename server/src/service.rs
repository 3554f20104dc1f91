//! The chat service: every operation a transport offers, on top of the store and
//! the hub. Transports parse frames and call this; it knows no socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::TokenKey;
use crate::clock::Clock;
use crate::cluster::{Fabric, Forwarded, Routed};
use crate::domain::{Cursor, GroupChange};
use crate::hub::{Hub, Push};
use crate::limits::Limits;
use crate::media::BlobStore;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::protocol::{
    validate_conv_id, validate_message_id, validate_user_id, AckRequest, Body, ErrorCode,
    HistoryRequest, PresenceRequest, PresenceState, ProtocolError, Receipt, Request, SendRequest,
    ServerFrame, SyncRequest,
};
use crate::push::{LogSink, Notification, PushSink};
use crate::store::{Appended, ConvState, NewMessage, Store, StoreError};

/// Presence changes published at once (each reads the store, and Redis in a cluster).
const PRESENCE_PUBLISH_CONCURRENCY: usize = 32;

/// Last-seen writes in flight at once (every user of a server is due at shutdown).
const LAST_SEEN_WRITES_CONCURRENCY: usize = 64;

/// Acks wider than this notify every member instead of scanning for senders.
const RECEIPT_SCAN_LEN_MAX: u64 = 1000;

/// An authenticated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user id from the token.
    pub user: String,
    /// The device id from `hello`.
    pub device: String,
}

/// Shared services of one server process.
pub struct ChatService {
    /// Durable storage.
    pub store: Arc<dyn Store>,
    /// Connected devices.
    pub hub: Arc<Hub>,
    /// Wall time.
    pub clock: Arc<dyn Clock>,
    /// Limits.
    pub limits: Limits,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Token verification.
    pub tokens: TokenKey,
    /// Registry and routing to other servers (cluster mode); `None` on one node.
    pub fabric: Option<Arc<dyn Fabric>>,
    /// Presence changes waiting for publication, and local presence subscriptions.
    pub presence: Presence,
    /// Devices on the long-polling fallback.
    pub mailboxes: crate::mailbox::Mailboxes,
    /// Where notifications for users with no connected device go.
    pub push: Arc<dyn PushSink>,
    /// Image storage; `None` where images are not served (the simulator).
    pub media: Option<Arc<dyn BlobStore>>,
    group_ids_minted: AtomicU64,
    boot_ms: u64,
}

/// The answer when the cluster registry (Redis) could not be reached.
pub fn registry_unavailable() -> ProtocolError {
    ProtocolError::new(
        ErrorCode::Internal,
        "the cluster registry is unavailable; retry",
    )
}

fn reject(err: StoreError) -> ProtocolError {
    match err {
        StoreError::Rejected(e) => e,
        StoreError::Backend(why) => {
            tracing::error!(%why, "store failure");
            ProtocolError::new(
                ErrorCode::Internal,
                "storage failure; nothing was acknowledged, retry",
            )
        }
    }
}

impl ChatService {
    /// Wires the services together.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        limits: Limits,
        tokens: TokenKey,
    ) -> Self {
        let boot_ms = clock.now_ms();
        let metrics = Arc::new(Metrics::default());
        Self {
            push: LogSink::new(Arc::clone(&metrics)),
            media: None,
            store,
            hub: Arc::new(Hub::default()),
            clock,
            limits,
            metrics,
            tokens,
            fabric: None,
            presence: Presence::default(),
            mailboxes: crate::mailbox::Mailboxes::default(),
            group_ids_minted: AtomicU64::new(0),
            boot_ms,
        }
    }

    /// Fans an entry out to its recipients' connected devices (serialized once),
    /// here and, in a cluster, on other servers.
    ///
    /// Retries are published again: the first attempt may have been sequenced by a
    /// server that died before publishing. Device streams drop what they already have.
    /// In a cluster this returns once the router accepted the event, so an
    /// acknowledged message has been routed even if this server dies next; an
    /// error means it was not (the entry is durable; a retry publishes it again).
    pub async fn publish(&self, appended: &Appended) -> Result<(), ProtocolError> {
        let routed = match &self.fabric {
            Some(fabric) => {
                let event = Routed::Entry(Arc::clone(&appended.entry));
                fabric
                    .forward(Arc::clone(&appended.recipients), event)
                    .await
                    .map(Some)
            }
            None => Ok(None),
        };
        if let Err(e) = &routed {
            self.metrics.fabric.dropped.inc();
            tracing::warn!(error = %e, seq = appended.entry.seq, conv = appended.entry.conv, "not routed to other servers");
        }
        self.publish_here(appended);
        if !appended.duplicate {
            match &routed {
                Ok(forwarded) => self.notify_offline(appended, forwarded.as_ref()),
                Err(_) => tracing::debug!("recipients' whereabouts unknown; no push notifications"),
            }
        }
        routed.map(|_| ()).map_err(|_| {
            ProtocolError::new(
                ErrorCode::Internal,
                "stored, but not yet routed to other servers; retry with the same message_id",
            )
        })
    }

    /// Hands a push notification for each recipient of a new message (sender
    /// excepted) with no device connected anywhere to the push sink.
    fn notify_offline(&self, appended: &Appended, forwarded: Option<&Forwarded>) {
        let entry = &appended.entry;
        if !entry.body.is_message() {
            return;
        }
        let offline = |user: &&String| match forwarded {
            Some(f) => f.unplaced.contains(user),
            None => self.hub.devices_online(user) == 0,
        };
        for user in appended.recipients.iter().filter(|u| **u != entry.sender) {
            if offline(&user) {
                if let Some(notification) = Notification::of(entry, user) {
                    self.push.notify(notification);
                }
            }
        }
    }

    /// Fans an entry out to the devices connected to this server.
    fn publish_here(&self, appended: &Appended) {
        let frame = Utf8Bytes::from(ServerFrame::Msg(Arc::clone(&appended.entry)).to_json());
        let push = Push::Entry(Arc::clone(&appended.entry), frame);
        // Under the simulator, model what a multi-threaded runtime does for free: two
        // sends that commit in one order may fan out in the other.
        #[cfg(madsim)]
        if madsim::rand::random::<u8>() < 128 {
            let (hub, recipients) = (Arc::clone(&self.hub), Arc::clone(&appended.recipients));
            let delay = std::time::Duration::from_millis(u64::from(madsim::rand::random::<u8>()));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                hub.publish(&recipients, &push);
            });
            return;
        }
        self.hub.publish(&appended.recipients, &push);
    }

    /// The conversation, if `caller` is or was a member; errors otherwise.
    pub async fn readable(
        &self,
        caller: &Caller,
        conv: &str,
    ) -> Result<(ConvState, crate::domain::Membership), ProtocolError> {
        validate_conv_id(conv)?;
        let state = self
            .store
            .conversation(conv)
            .await
            .map_err(reject)?
            .ok_or_else(|| {
                ProtocolError::new(
                    ErrorCode::UnknownConversation,
                    format!("no conversation {conv:?}"),
                )
            })?;
        let membership = state.record.require_reader(&caller.user)?;
        Ok((state, membership))
    }

    fn summary(caller: &Caller, state: &ConvState) -> Value {
        json!(state.record.summary_for(&caller.user, state.last_seq))
    }

    /// `open_direct`.
    pub async fn open_direct(&self, caller: &Caller, peer: &str) -> Result<Value, ProtocolError> {
        let now = self.clock.now_ms();
        let (state, created) = self
            .store
            .open_direct(&caller.user, &caller.device, peer, now)
            .await
            .map_err(reject)?;
        if let Some(created) = &created {
            // Creation is acknowledged even if not routed: members learn of it at
            // their next resync, reconnect or message.
            let _ = self.publish(created).await;
        }
        Ok(json!({ "conversation": Self::summary(caller, &state) }))
    }

    fn mint_group_id(&self, owner: &str) -> String {
        let n = self.group_ids_minted.fetch_add(1, Ordering::Relaxed);
        let digest = Sha256::digest(format!(
            "{owner}\0{}\0{}\0{n}",
            self.boot_ms,
            self.clock.now_ms()
        ));
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        format!("g:{hex}")
    }

    /// `create_group`.
    pub async fn create_group(
        &self,
        caller: &Caller,
        conv: Option<String>,
        members: Vec<String>,
    ) -> Result<Value, ProtocolError> {
        let conv = match conv {
            Some(conv) => {
                validate_conv_id(&conv)?;
                if !conv.starts_with("g:") {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidId,
                        "group ids start with \"g:\"",
                    ));
                }
                conv
            }
            None => self.mint_group_id(&caller.user),
        };
        let now = self.clock.now_ms();
        let (state, created) = self
            .store
            .create_group(
                &conv,
                &caller.user,
                &caller.device,
                members,
                self.limits.group_members_max,
                now,
            )
            .await
            .map_err(reject)?;
        if let Some(created) = &created {
            // Creation is acknowledged even if not routed: members learn of it at
            // their next resync, reconnect or message.
            let _ = self.publish(created).await;
        }
        Ok(json!({ "conversation": Self::summary(caller, &state) }))
    }

    /// `add_members`, `remove_members` and `leave`.
    pub async fn change_members(
        &self,
        caller: &Caller,
        conv: &str,
        change: GroupChange,
    ) -> Result<Value, ProtocolError> {
        validate_conv_id(conv)?;
        let now = self.clock.now_ms();
        let concerned: Vec<String> = match &change {
            GroupChange::Add(users) | GroupChange::Remove(users) => users.clone(),
            GroupChange::Leave => vec![caller.user.clone()],
        };
        let changed = self
            .store
            .change_members(
                conv,
                &caller.user,
                &caller.device,
                change,
                self.limits.group_members_max,
                now,
            )
            .await;
        let appended = match changed {
            Ok(appended) => appended,
            Err(StoreError::Rejected(e))
                if matches!(e.code, ErrorCode::DuplicateMember | ErrorCode::NotMember) =>
            {
                // Perhaps a retry of a change that was made but whose reply (and
                // fan-out) was lost: publish the entry that made it, then refuse.
                self.republish_membership(conv, &concerned).await;
                return Err(e);
            }
            Err(e) => return Err(reject(e)),
        };
        // Acknowledged even if not routed: members learn of it at their next
        // resync, reconnect or message (a retry would be a second change).
        let _ = self.publish(&appended).await;
        Ok(json!({ "conv": conv, "seq": appended.entry.seq }))
    }

    /// Publishes again the entries that last changed the membership of `users`
    /// in `conv` (best effort; device streams drop what they already have).
    async fn republish_membership(&self, conv: &str, users: &[String]) {
        let Ok(Some(state)) = self.store.conversation(conv).await else {
            return;
        };
        let mut seqs: Vec<u64> = users
            .iter()
            .filter_map(|u| state.record.membership(u))
            .map(|m| m.left_seq.unwrap_or(m.joined_seq))
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        let mut recipients = state.record.current_members();
        recipients.extend(users.iter().cloned());
        recipients.sort();
        recipients.dedup();
        let recipients: Arc<[String]> = recipients.into();
        for seq in seqs {
            let Ok(found) = self.store.read_after(conv, seq - 1, seq, 1).await else {
                continue;
            };
            for entry in found.into_iter().filter(|e| e.seq == seq) {
                let appended = Appended {
                    entry: Arc::new(entry),
                    duplicate: true,
                    recipients: Arc::clone(&recipients),
                };
                let _ = self.publish(&appended).await;
            }
        }
    }

    /// `send`: the ack is returned only once the message is durable.
    pub async fn send(&self, caller: &Caller, req: SendRequest) -> Result<Value, ProtocolError> {
        validate_conv_id(&req.conv)?;
        validate_message_id(&req.message_id)?;
        if let Some(text) = &req.text {
            if text.len() > self.limits.text_len_max_bytes {
                return Err(ProtocolError::new(
                    ErrorCode::TextTooLarge,
                    format!(
                        "text is {} bytes; the limit is {}",
                        text.len(),
                        self.limits.text_len_max_bytes
                    ),
                ));
            }
        }
        let body = match (req.media, req.text) {
            (None, None) => {
                return Err(ProtocolError::new(
                    ErrorCode::BadRequest,
                    "send needs \"text\", \"media\" or both",
                ))
            }
            (None, Some(text)) => Body::Text { text },
            (Some(id), caption) => Body::Image {
                media: self.uploaded_to(&req.conv, &id).await?,
                caption,
            },
        };
        let message = NewMessage {
            conv: req.conv,
            sender: caller.user.clone(),
            sender_device: caller.device.clone(),
            message_id: req.message_id,
            body,
        };
        let started = tokio::time::Instant::now();
        let appended = self
            .store
            .append(message, self.clock.now_ms())
            .await
            .map_err(reject)?;
        self.metrics
            .store_append_latency
            .observe(started.elapsed().as_secs_f64());
        if appended.duplicate {
            self.metrics.messages_duplicate.inc();
        } else {
            self.metrics.messages_in.inc();
        }
        self.publish(&appended).await?;
        let e = &appended.entry;
        Ok(json!({
            "conv": e.conv, "seq": e.seq, "message_id": e.message_id,
            "server_time_ms": e.server_time_ms, "duplicate": appended.duplicate,
        }))
    }

    /// The reference of image `id`, if it was uploaded to `conv`.
    async fn uploaded_to(
        &self,
        conv: &str,
        id: &str,
    ) -> Result<crate::protocol::MediaRef, ProtocolError> {
        let Some(media) = &self.media else {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "this server does not store images",
            ));
        };
        let meta = media.meta(id).await.map_err(|e| {
            tracing::error!(error = %e, "media storage failure");
            ProtocolError::new(ErrorCode::Internal, "media storage failure; retry")
        })?;
        match meta {
            Some(meta) if meta.convs.contains(conv) => Ok(meta.media),
            _ => Err(ProtocolError::new(
                ErrorCode::UnknownMedia,
                format!("no image {id:?} was uploaded to {conv}; upload it there first"),
            )),
        }
    }

    /// `ack`: advances cursors and sends receipts to the senders concerned.
    pub async fn ack(&self, caller: &Caller, req: AckRequest) -> Result<Value, ProtocolError> {
        validate_conv_id(&req.conv)?;
        if req.delivered.is_none() && req.read.is_none() {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "ack needs \"delivered\" or \"read\"",
            ));
        }
        let update = self
            .store
            .ack(
                &req.conv,
                &caller.user,
                &caller.device,
                req.delivered,
                req.read,
            )
            .await
            .map_err(reject)?;
        if update.user_after != update.user_before {
            self.send_receipts(
                caller,
                &req.conv,
                update.user_before,
                update.user_after,
                update.all_members,
            )
            .await?;
        }
        Ok(
            json!({ "conv": req.conv, "delivered": update.device.delivered, "read": update.device.read }),
        )
    }

    async fn send_receipts(
        &self,
        caller: &Caller,
        conv: &str,
        before: Cursor,
        after: Cursor,
        all: Option<Cursor>,
    ) -> Result<(), ProtocolError> {
        let from = before.read;
        let until = after.delivered;
        let mut targets = if until - from > RECEIPT_SCAN_LEN_MAX {
            let state = self.store.conversation(conv).await.map_err(reject)?;
            state
                .map(|s| s.record.current_members())
                .unwrap_or_default()
        } else {
            let limit = u32::try_from(until - from).expect("bounded by RECEIPT_SCAN_LEN_MAX");
            self.store
                .senders_between(conv, from, until, limit)
                .await
                .map_err(reject)?
        };
        targets.retain(|u| *u != caller.user);
        if targets.is_empty() {
            return Ok(());
        }
        let receipt = Receipt {
            conv: conv.to_owned(),
            user: caller.user.clone(),
            delivered: after.delivered,
            read: after.read,
            all_delivered: all.map(|c| c.delivered),
            all_read: all.map(|c| c.read),
        };
        let receipt = Arc::new(receipt);
        let frame = Utf8Bytes::from(ServerFrame::Receipt(Receipt::clone(&receipt)).to_json());
        if let Some(fabric) = &self.fabric {
            // In the background: the acking session must not wait on the router.
            // Receipts are state, not history: a lost one is superseded by the next
            // or by the cursors a reconnecting device reads.
            let (fabric, dropped) = (Arc::clone(fabric), self.metrics.fabric.dropped.clone());
            let (users, event) = (
                targets.clone().into(),
                Routed::Receipt(Arc::clone(&receipt)),
            );
            tokio::spawn(async move {
                if let Err(e) = fabric.forward(users, event).await {
                    dropped.inc();
                    tracing::warn!(error = %e, "receipt not routed to other servers");
                }
            });
        }
        self.hub.publish(&targets, &Push::Receipt(receipt, frame));
        Ok(())
    }

    /// `sync`: entries after a cursor, within what the caller may see.
    pub async fn sync(&self, caller: &Caller, req: SyncRequest) -> Result<Value, ProtocolError> {
        let (state, m) = self.readable(caller, &req.conv).await?;
        let visible_max = state.last_seq.min(m.visible_until());
        if req.after > visible_max {
            return Err(ProtocolError::new(
                ErrorCode::CursorAhead,
                format!(
                    "after {} is beyond the last entry you may see ({visible_max})",
                    req.after
                ),
            ));
        }
        let limit = self.limits.page_len(req.limit)?;
        let after = req.after.max(m.joined_seq - 1);
        let entries = self
            .store
            .read_after(&req.conv, after, visible_max, limit)
            .await
            .map_err(reject)?;
        let next_after = entries.last().map_or(visible_max, |e| e.seq);
        Ok(json!({
            "conv": req.conv, "entries": entries, "last_seq": visible_max,
            "has_more": next_after < visible_max,
        }))
    }

    /// `history`: the newest entries before a seq, ascending, within what the caller may see.
    pub async fn history(
        &self,
        caller: &Caller,
        req: HistoryRequest,
    ) -> Result<Value, ProtocolError> {
        let (state, m) = self.readable(caller, &req.conv).await?;
        let visible_max = state.last_seq.min(m.visible_until());
        let before = req
            .before
            .unwrap_or(u64::MAX)
            .min(visible_max.saturating_add(1));
        let limit = self.limits.page_len(req.limit)?;
        let mut entries = self
            .store
            .read_before(&req.conv, before, limit)
            .await
            .map_err(reject)?;
        entries.retain(|e| e.seq >= m.joined_seq);
        let has_more = entries.first().is_some_and(|e| e.seq > m.joined_seq);
        Ok(json!({ "conv": req.conv, "entries": entries, "has_more": has_more }))
    }

    /// `conversations`: every conversation the caller is or was in.
    pub async fn conversations(&self, caller: &Caller) -> Result<Vec<ConvState>, ProtocolError> {
        self.store
            .conversations_of(&caller.user)
            .await
            .map_err(reject)
    }

    /// Runs one request of an authenticated device (any but `hello`), for every transport.
    pub async fn dispatch(
        self: Arc<Self>,
        caller: &Caller,
        request: Request,
    ) -> Result<Value, ProtocolError> {
        match request {
            Request::Hello(_) => Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "hello opens a WebSocket session; HTTP requests authenticate with a bearer token",
            )),
            Request::OpenDirect(r) => self.open_direct(caller, &r.peer).await,
            Request::CreateGroup(r) => self.create_group(caller, r.conv, r.members).await,
            Request::AddMembers(r) => {
                self.change_members(caller, &r.conv, GroupChange::Add(r.users))
                    .await
            }
            Request::RemoveMembers(r) => {
                self.change_members(caller, &r.conv, GroupChange::Remove(r.users))
                    .await
            }
            Request::Leave(r) => {
                self.change_members(caller, &r.conv, GroupChange::Leave)
                    .await
            }
            Request::Send(r) => self.send(caller, r).await,
            Request::Ack(r) => self.ack(caller, r).await,
            Request::Sync(r) => self.sync(caller, r).await,
            Request::History(r) => self.history(caller, r).await,
            Request::Presence(r) => self.presence_request(caller, r).await,
            Request::Conversations(_) => {
                let states = self.conversations(caller).await?;
                Ok(json!({ "conversations": Self::summaries(caller, &states) }))
            }
            Request::Ping => Ok(json!({ "server_time_ms": self.clock.now_ms() })),
        }
    }

    /// Checks cursors a device presents (hello, poll): each names a conversation
    /// among `states` (the caller's) and no seq beyond what the caller may see.
    pub async fn check_cursors(
        &self,
        caller: &Caller,
        states: &[ConvState],
        cursors: &std::collections::BTreeMap<String, u64>,
    ) -> Result<(), ProtocolError> {
        for (conv, cursor) in cursors {
            let state = states.iter().find(|s| &s.record.id == conv);
            let Some(state) = state else {
                // Distinguish unknown from foreign conversations.
                self.readable(caller, conv).await?;
                return Err(ProtocolError::new(
                    ErrorCode::NotMember,
                    format!("not a member of {conv}"),
                ));
            };
            let m = state.record.require_reader(&caller.user)?;
            let visible_max = state.last_seq.min(m.visible_until());
            if *cursor > visible_max {
                return Err(ProtocolError::new(
                    ErrorCode::CursorAhead,
                    format!("cursor {cursor} for {conv} is beyond its last entry you may see ({visible_max})"),
                ));
            }
        }
        Ok(())
    }

    /// Summaries of `states` as `caller` sees them.
    pub fn summaries(caller: &Caller, states: &[ConvState]) -> Value {
        Value::Array(states.iter().map(|s| Self::summary(caller, s)).collect())
    }

    /// A device of `user` connected (or polled) here: records the last-seen time
    /// (in the background) and, for its first local device, marks a presence change.
    pub fn device_up(&self, user: &str) {
        self.record_last_seen(user);
        if self.hub.devices_online(user) == 1 {
            self.presence.mark_changed(user);
        }
    }

    /// A device of `user` went away from this server: records the last-seen time
    /// and, if it was the last local one, marks a presence change.
    pub fn device_down(&self, user: &str) {
        self.record_last_seen(user);
        if self.hub.devices_online(user) == 0 {
            self.presence.mark_changed(user);
        }
    }

    /// Notes that `user` is seen now; written to the store with the next presence publication.
    pub fn record_last_seen(&self, user: &str) {
        self.presence.seen(user, self.clock.now_ms());
    }

    /// Writes the last-seen times noted since the last call; what fails is kept for the next.
    pub async fn write_last_seen(&self) {
        use futures_util::StreamExt as _;
        let seen = self.presence.take_seen();
        // Bounded: at shutdown every user of the server is due at once, and an unbounded
        // burst (16 K writes per server in the 200 K-device load run) times out in the store.
        // (Collected first: a lazy map closure over `&self` in the stream makes the
        // spawned presence task's future not `Send`.)
        let writes: Vec<_> = seen
            .iter()
            .map(|(user, at_ms)| self.store.record_last_seen(user, *at_ms))
            .collect();
        let results: Vec<_> = futures_util::stream::iter(writes)
            .buffered(LAST_SEEN_WRITES_CONCURRENCY)
            .collect()
            .await;
        for ((user, at_ms), result) in seen.iter().zip(results) {
            if let Err(e) = result {
                tracing::warn!(user, error = %e, "last seen not written; retrying");
                self.presence.seen(user, *at_ms);
            }
        }
    }

    /// The presence of `users` now: online if a device is connected here or (in a
    /// cluster) on a live server; last seen from the store.
    pub async fn presence_of(&self, users: &[String]) -> Result<Vec<PresenceState>, ProtocolError> {
        let mut online: Vec<bool> = users
            .iter()
            .map(|u| self.hub.devices_online(u) > 0)
            .collect();
        if let Some(fabric) = &self.fabric {
            let elsewhere: Vec<String> = users
                .iter()
                .zip(&online)
                .filter(|(_, here)| !**here)
                .map(|(u, _)| u.clone())
                .collect();
            if !elsewhere.is_empty() {
                let found = fabric.online_users(&elsewhere).await.map_err(|e| {
                    tracing::warn!(error = %e, "presence lookup failed");
                    registry_unavailable()
                })?;
                let mut found = found.into_iter();
                for here in online.iter_mut().filter(|here| !**here) {
                    *here = found.next().unwrap_or(false);
                }
            }
        }
        let seen = self.store.last_seen(users).await.map_err(reject)?;
        Ok(users
            .iter()
            .zip(online)
            .zip(seen)
            .map(|((user, online), last_seen_ms)| PresenceState {
                user: user.clone(),
                online,
                last_seen_ms,
            })
            .collect())
    }

    /// `presence`: the current state of some users, and a subscription to their changes.
    pub async fn presence_request(
        &self,
        caller: &Caller,
        req: PresenceRequest,
    ) -> Result<Value, ProtocolError> {
        if req.users.is_empty() || req.users.len() > self.limits.presence_users_max {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                format!(
                    "\"users\" must list 1-{} users",
                    self.limits.presence_users_max
                ),
            ));
        }
        let mut users = req.users;
        for user in &users {
            validate_user_id(user)?;
        }
        users.sort();
        users.dedup();
        if req.watch {
            match &self.fabric {
                Some(fabric) => fabric.watch(&caller.user, &users).await.map_err(|e| {
                    tracing::warn!(error = %e, "presence subscription failed");
                    registry_unavailable()
                })?,
                None => {
                    let ttl_ms =
                        u64::try_from(crate::cluster::WATCH_TTL.as_millis()).unwrap_or(u64::MAX);
                    let now = self.clock.now_ms();
                    if !self.presence.watch_locally(
                        &caller.user,
                        &users,
                        now,
                        now.saturating_add(ttl_ms),
                    ) {
                        return Err(ProtocolError::new(
                            ErrorCode::Overloaded,
                            "too many presence subscriptions on this server; ask again without \"watch\" or later",
                        ));
                    }
                }
            }
        }
        let states = self.presence_of(&users).await?;
        Ok(json!({ "users": states }))
    }

    /// Closes long-poll mailboxes that were replaced or not polled for the idle
    /// timeout: their devices go offline.
    pub fn expire_mailboxes(&self) {
        let idle_ms = u64::try_from(self.limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle_before = self.clock.now_ms().saturating_sub(idle_ms);
        for ((user, device), mailbox) in self.mailboxes.take_expired(idle_before) {
            self.hub.unregister(&user, mailbox.conn);
            if let Some(fabric) = &self.fabric {
                if !self.hub.device_online(&user, &device) {
                    fabric.device_disconnected(&user, &device);
                }
            }
            self.device_down(&user);
        }
        self.metrics.polls_open.set(self.mailboxes.len() as i64);
    }

    /// Who hears of `user`'s presence changes: contacts and watchers, not `user`.
    async fn presence_audience(&self, user: &str) -> Result<Vec<String>, String> {
        let mut audience = std::collections::BTreeSet::new();
        let states = self
            .store
            .conversations_of(user)
            .await
            .map_err(|e| e.to_string())?;
        for state in &states {
            let members = state.record.current_members();
            if members.iter().any(|m| m == user) {
                audience.extend(members);
            }
        }
        match &self.fabric {
            Some(fabric) => {
                audience.extend(fabric.watchers(user).await.map_err(|e| e.to_string())?)
            }
            None => audience.extend(self.presence.local_watchers(user, self.clock.now_ms())),
        }
        audience.remove(user);
        Ok(audience.into_iter().collect())
    }

    /// Publishes the users marked changed since the last call, each once, with
    /// its state read now. What cannot be published now is kept for the next call.
    pub async fn publish_presence(&self) {
        self.write_last_seen().await;
        let users = self.presence.take_changed();
        if users.is_empty() {
            return;
        }
        let states = match self.presence_of(&users).await {
            Ok(states) => states,
            Err(_) => {
                users.iter().for_each(|u| self.presence.mark_changed(u));
                return;
            }
        };
        let audience_of = |state: PresenceState| async move {
            match self.presence_audience(&state.user).await {
                Ok(audience) => Some((Arc::new(state), audience)),
                Err(e) => {
                    tracing::warn!(user = state.user, error = %e, "presence audience unknown; retrying");
                    self.presence.mark_changed(&state.user);
                    None
                }
            }
        };
        // Each audience reads the store (and Redis in a cluster): overlap a bounded number.
        use futures_util::StreamExt as _;
        let found: Vec<Option<(Arc<PresenceState>, Vec<String>)>> =
            futures_util::stream::iter(states)
                .map(audience_of)
                .buffer_unordered(PRESENCE_PUBLISH_CONCURRENCY)
                .collect()
                .await;
        let published: Vec<(Arc<PresenceState>, Vec<String>)> = found
            .into_iter()
            .flatten()
            .filter(|(_, audience)| !audience.is_empty())
            .collect();
        // Here: one push per recipient holding every change it hears of this round,
        // so a round costs each device one queue slot, however many contacts changed.
        let mut batches: std::collections::BTreeMap<&str, Vec<Arc<PresenceState>>> =
            std::collections::BTreeMap::new();
        for (state, audience) in &published {
            for user in audience {
                batches.entry(user).or_default().push(Arc::clone(state));
            }
        }
        for (user, batch) in batches {
            let push = Push::Presence(batch.into());
            self.hub.publish(&[user.to_owned()], &push);
        }
        self.metrics
            .presence_published
            .inc_by(published.len() as u64);
        // Elsewhere: through the fabric, one event per changed user.
        if let Some(fabric) = &self.fabric {
            let forwards = published.into_iter().map(|(state, audience)| async move {
                let routed = fabric
                    .forward(audience.into(), Routed::Presence(state))
                    .await;
                if let Err(e) = routed {
                    self.metrics.fabric.dropped.inc();
                    tracing::warn!(error = %e, "presence change not routed to other servers");
                }
            });
            futures_util::stream::iter(forwards)
                .for_each_concurrent(PRESENCE_PUBLISH_CONCURRENCY, |forward| forward)
                .await;
        }
    }

    /// Where a device's stream of `state` starts: after its presented or stored
    /// cursor, or (brand-new device) at the most recent entries.
    pub async fn stream_start(
        &self,
        caller: &Caller,
        state: &ConvState,
        presented: Option<u64>,
        new_device_window: bool,
    ) -> Result<u64, ProtocolError> {
        let m = state.record.require_reader(&caller.user)?;
        if crate::mutants::active(crate::mutants::Mutant::ForgetCursorOnReconnect)
            && presented.is_some()
        {
            return Ok((state.last_seq + 1).max(m.joined_seq));
        }
        let stored = match presented {
            Some(c) => Some(c),
            None => self
                .store
                .device_cursor(&caller.user, &caller.device, &state.record.id)
                .await
                .map_err(reject)?
                .map(|c| c.delivered),
        };
        let start = match stored {
            Some(delivered) => delivered + 1,
            None if new_device_window => {
                (state.last_seq + 1).saturating_sub(self.limits.new_device_recent_len)
            }
            None => m.joined_seq,
        };
        Ok(start.max(m.joined_seq).max(1))
    }
}
