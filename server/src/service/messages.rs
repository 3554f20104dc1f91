//! Messages and receipts: sending (text and images), acknowledging with the receipts it causes, and reading with `sync` and `history`.

use super::*;

/// The first wait before an ack retries sending its receipts after a store error.
const RECEIPT_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
/// The last wait (doubling from the first: 100 ms to 3.2 s, about 6 s in all).
const RECEIPT_RETRY_LAST: std::time::Duration = std::time::Duration::from_millis(3_200);

impl ChatService {
    /// `send`: the ack is returned only once the message is durable.
    pub async fn send(&self, caller: &Caller, req: SendRequest) -> Result<Reply, ProtocolError> {
        validate_conv_id(&req.conv)?;
        validate_message_id(&req.message_id)?;
        self.within_rate(Rated::Send, &caller.user)?;
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
        Ok(Reply::Sent {
            conv: e.conv.clone(),
            seq: e.seq,
            message_id: e.message_id.clone(),
            server_time_ms: e.server_time_ms,
            duplicate: appended.duplicate,
        })
    }

    /// The reference of image `id`, if it was uploaded to `conv`.
    pub(super) async fn uploaded_to(
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
            Some(meta) if meta.convs.contains_key(conv) => Ok(meta.media),
            _ => Err(ProtocolError::new(
                ErrorCode::UnknownMedia,
                format!("no image {id:?} was uploaded to {conv}; upload it there first"),
            )),
        }
    }

    /// `ack`: advances cursors and sends receipts to the senders concerned.
    pub async fn ack(&self, caller: &Caller, req: AckRequest) -> Result<Reply, ProtocolError> {
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
        // A repeat of an ack that already landed moves nothing, and what the first
        // one sent is unknown (its reply may have been lost after the store took it:
        // a store timeout, a dropped connection), so the user's receipt goes again,
        // to the senders of everything up to it; a sender that has it sees nothing.
        let receipt_from = if update.user_after != update.user_before {
            Some(update.user_before)
        } else if update.device == update.device_before {
            Some(Cursor::default())
        } else {
            None
        };
        if let Some(before) = receipt_from {
            self.send_receipts_retrying(caller, &req.conv, before, &update)
                .await?;
        }
        Ok(Reply::Acked {
            conv: req.conv,
            delivered: update.device.delivered,
            read: update.device.read,
        })
    }

    /// [`ChatService::send_receipts`] for an ack whose cursor is durable: a retry
    /// of the ack may move nothing, so the receipt is best sent now, and a store
    /// error finding its senders is retried (100 ms doubling to 3.2 s, about 6 s in
    /// all) before the ack fails.
    async fn send_receipts_retrying(
        &self,
        caller: &Caller,
        conv: &str,
        before: Cursor,
        update: &CursorUpdate,
    ) -> Result<(), ProtocolError> {
        let mut backoff = RECEIPT_RETRY_FIRST;
        loop {
            let sent = self
                .send_receipts(caller, conv, before, update.user_after, update.all_members)
                .await;
            match sent {
                Ok(()) => return Ok(()),
                Err(e) if backoff > RECEIPT_RETRY_LAST => {
                    tracing::error!(conv, error = %e.message, "receipts of an ack not sent");
                    return Err(e);
                }
                Err(e) => {
                    crate::warn_throttled!(conv, error = %e.message, "receipts of an ack not sent yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }

    pub(super) async fn send_receipts(
        &self,
        caller: &Caller,
        conv: &str,
        before: Cursor,
        after: Cursor,
        all: Option<Cursor>,
    ) -> Result<(), ProtocolError> {
        let from = before.read;
        let until = if crate::mutants::active(crate::mutants::Mutant::ReceiptWaitsForRead) {
            after.read
        } else {
            after.delivered
        };
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
        let all = all.map(|floor| {
            if crate::mutants::active(crate::mutants::Mutant::SummaryFromAcker) {
                after
            } else {
                floor
            }
        });
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
        if let Some(outbox) = &self.outbox {
            // In the background: the acking session must not wait on the router.
            // Receipts are state, not history: one the outbox cannot hold is
            // superseded by the next or by the cursors a reconnecting device reads.
            let outbox = Arc::clone(outbox);
            let (users, event) = (
                targets.clone().into(),
                Routed::Receipt(Arc::clone(&receipt)),
            );
            tokio::spawn(async move {
                if let Err(e) = outbox.forward(users, event).await {
                    crate::warn_throttled!(error = %e, "receipt not routed to other servers");
                }
            });
        }
        self.hub
            .publish(&targets, &Push::Receipt(Framed::new(receipt, frame)));
        Ok(())
    }

    /// `sync`: entries after a cursor, within what the caller may see.
    pub async fn sync(&self, caller: &Caller, req: SyncRequest) -> Result<Reply, ProtocolError> {
        let (state, m) = self.readable(caller, &req.conv).await?;
        let mut visible_max = state.last_seq.min(m.visible_until());
        if crate::mutants::active(crate::mutants::Mutant::SyncStopsShort) {
            visible_max = visible_max.saturating_sub(1).max(req.after);
        }
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
        Ok(Reply::SyncPage {
            conv: req.conv,
            entries,
            last_seq: visible_max,
            has_more: next_after < visible_max,
        })
    }

    /// `history`: the newest entries before a seq, ascending, within what the caller may see.
    pub async fn history(
        &self,
        caller: &Caller,
        req: HistoryRequest,
    ) -> Result<Reply, ProtocolError> {
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
        Ok(Reply::HistoryPage {
            conv: req.conv,
            entries,
            has_more,
        })
    }
}
