//! The chat service: every operation a transport offers, on top of the store and
//! the hub. Transports parse frames and call this; it knows no socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::TokenKey;
use crate::clock::Clock;
use crate::cluster::{Fabric, Routed};
use crate::domain::{Cursor, GroupChange};
use crate::hub::{Hub, Push};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::protocol::{
    validate_conv_id, validate_message_id, AckRequest, Body, ErrorCode, HistoryRequest,
    ProtocolError, Receipt, SendRequest, ServerFrame, SyncRequest,
};
use crate::store::{Appended, ConvState, NewMessage, Store, StoreError};

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
    pub metrics: Metrics,
    /// Token verification.
    pub tokens: TokenKey,
    /// Registry and routing to other servers (cluster mode); `None` on one node.
    pub fabric: Option<Arc<dyn Fabric>>,
    group_ids_minted: AtomicU64,
    boot_ms: u64,
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
        Self {
            store,
            hub: Arc::new(Hub::default()),
            clock,
            limits,
            metrics: Metrics::default(),
            tokens,
            fabric: None,
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
            }
            None => Ok(()),
        };
        if let Err(e) = &routed {
            self.metrics.fabric.dropped.inc();
            tracing::warn!(error = %e, seq = appended.entry.seq, conv = appended.entry.conv, "not routed to other servers");
        }
        self.publish_here(appended);
        routed.map_err(|_| {
            ProtocolError::new(
                ErrorCode::Internal,
                "stored, but not yet routed to other servers; retry with the same message_id",
            )
        })
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
        if req.text.len() > self.limits.text_len_max_bytes {
            return Err(ProtocolError::new(
                ErrorCode::TextTooLarge,
                format!(
                    "text is {} bytes; the limit is {}",
                    req.text.len(),
                    self.limits.text_len_max_bytes
                ),
            ));
        }
        let message = NewMessage {
            conv: req.conv,
            sender: caller.user.clone(),
            sender_device: caller.device.clone(),
            message_id: req.message_id,
            body: Body::Text { text: req.text },
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

    fn page_len(&self, limit: Option<u32>) -> u32 {
        limit
            .unwrap_or(self.limits.page_len_max)
            .clamp(1, self.limits.page_len_max)
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
        let limit = self.page_len(req.limit);
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
        let limit = self.page_len(req.limit);
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

    /// Summaries of `states` as `caller` sees them.
    pub fn summaries(caller: &Caller, states: &[ConvState]) -> Value {
        Value::Array(states.iter().map(|s| Self::summary(caller, s)).collect())
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
