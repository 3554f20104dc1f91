//! Conversations and membership: opening direct chats, creating groups, adding and removing members, and reading what a caller may see.

use super::*;

impl ChatService {
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

    /// The caller's view of `state`; an internal error if the caller is not a member
    /// (the store just made them one).
    pub(super) fn summary(
        caller: &Caller,
        state: &ConvState,
    ) -> Result<ConvSummary, ProtocolError> {
        state
            .record
            .summary_for(&caller.user, state.last_seq)
            .ok_or_else(|| {
                ProtocolError::new(
                    ErrorCode::Internal,
                    format!(
                        "{} is not a member of {} it just joined",
                        caller.user, state.record.id
                    ),
                )
            })
    }

    /// `open_direct`.
    pub async fn open_direct(&self, caller: &Caller, peer: &str) -> Result<Reply, ProtocolError> {
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
        Ok(Reply::Conversation {
            conversation: Self::summary(caller, &state)?,
        })
    }

    pub(super) fn mint_group_id(&self, owner: &str) -> String {
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
    ) -> Result<Reply, ProtocolError> {
        self.within_rate(Rated::GroupChange, &caller.user)?;
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
        Ok(Reply::Conversation {
            conversation: Self::summary(caller, &state)?,
        })
    }

    /// `add_members`, `remove_members` and `leave`.
    pub async fn change_members(
        &self,
        caller: &Caller,
        conv: &str,
        change: GroupChange,
    ) -> Result<Reply, ProtocolError> {
        validate_conv_id(conv)?;
        self.within_rate(Rated::GroupChange, &caller.user)?;
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
        // Acknowledged even if the outbox is full: members learn of it at their
        // next resync, reconnect or message (a retry would be a second change).
        let _ = self.publish(&appended).await;
        Ok(Reply::MembershipChanged {
            conv: conv.to_owned(),
            seq: appended.entry.seq,
        })
    }

    /// Publishes again the entries that last changed the membership of `users`
    /// in `conv` (best effort; device streams drop what they already have).
    pub(super) async fn republish_membership(&self, conv: &str, users: &[String]) {
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

    /// `conversations`: every conversation the caller is or was in.
    pub async fn conversations(&self, caller: &Caller) -> Result<Vec<ConvState>, ProtocolError> {
        self.store
            .conversations_of(&caller.user)
            .await
            .map_err(reject)
    }

    /// Summaries of `states` as `caller` sees them.
    pub fn summaries(caller: &Caller, states: &[ConvState]) -> Vec<ConvSummary> {
        states
            .iter()
            .filter_map(|s| s.record.summary_for(&caller.user, s.last_seq))
            .collect()
    }
}
