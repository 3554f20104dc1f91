//! Devices: where a connecting or polling device starts in each conversation, and its coming and going for presence and long-poll mailboxes.

use super::*;

impl ChatService {
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
