//! Devices: one life cycle on every transport (connect, hold a lease, disconnect),
//! where a connecting or polling device starts in each conversation, and long-poll
//! mailboxes.

use super::*;
use crate::hub::{ConnId, DeviceQueue};

/// A device's place on this server, from connect to disconnect, the same on every
/// transport: [`ChatService::lease_device`] takes its place in the hub (ending its
/// connection over any transport), [`DeviceLease::route`] makes other servers route
/// to it, [`DeviceLease::up`] counts it online for presence. Dropping the lease
/// undoes exactly what was done, in reverse.
pub struct DeviceLease {
    service: Arc<ChatService>,
    caller: Caller,
    conn: ConnId,
    /// A registration in the cluster was asked for (it may have landed even if
    /// [`DeviceLease::route`] failed).
    registering: bool,
    routed: bool,
    up: bool,
}

impl DeviceLease {
    /// The device holding the lease.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Its slot in the hub.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Registers the device in the cluster (no-op on one node), so that what other
    /// servers sequence from now on reaches it: call before reading where it starts.
    pub async fn route(&mut self) -> Result<(), ProtocolError> {
        assert!(!self.routed, "a lease is routed once");
        if let Some(fabric) = self.service.fabric() {
            self.registering = true;
            fabric
                .device_connected(&self.caller.user, &self.caller.device)
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "cannot register the device in the cluster");
                    registry_unavailable()
                })?;
        }
        self.routed = true;
        Ok(())
    }

    /// Whether [`DeviceLease::route`] succeeded.
    pub fn is_routed(&self) -> bool {
        self.routed
    }

    /// Whether [`DeviceLease::up`] was called.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Counts the device online (its user's presence, last seen).
    pub fn up(&mut self) {
        assert!(self.routed, "a device is routed before it is up");
        assert!(!self.up, "a lease is up once");
        self.up = true;
        self.service.device_up(&self.caller.user);
    }
}

impl Drop for DeviceLease {
    fn drop(&mut self) {
        let (svc, user, device) = (&self.service, &self.caller.user, &self.caller.device);
        svc.hub.unregister(user, self.conn);
        let forget = match &svc.fabric {
            Some(fabric) if self.registering && !svc.hub.device_online(user, device) => {
                Some(Arc::clone(fabric))
            }
            _ => None,
        };
        match forget {
            // Other servers read the registry for presence: the change is
            // published once this connection is out of it, so that whichever
            // server of a user's last devices forgets last sees them all gone.
            Some(fabric) => {
                if self.up {
                    svc.record_last_seen(user);
                }
                let (svc, up) = (Arc::clone(svc), self.up);
                let (user, device) = (user.clone(), device.clone());
                tokio::spawn(async move {
                    let late = fabric.device_disconnected(&user, &device).await;
                    if up {
                        svc.mark_if_last_down(&user);
                    }
                    if late.await && up {
                        svc.mark_if_last_down(&user);
                    }
                });
            }
            None => {
                if self.up {
                    svc.device_down(user);
                }
            }
        }
    }
}

impl ChatService {
    /// Connects `caller`'s device: takes its place in the hub, which tells its
    /// other connection (WebSocket or long-poll mailbox) to close. The lease is
    /// neither routed nor up yet. Refused with `too_many_devices` when the user has
    /// the most devices allowed here.
    pub fn lease_device(
        self: &Arc<Self>,
        caller: &Caller,
    ) -> Result<(DeviceLease, DeviceQueue), ProtocolError> {
        let (conn, queue) = self
            .hub
            .register(&caller.user, &caller.device, &self.limits)
            .inspect_err(|_| self.metrics.count_limit_hit(LimitHit::DevicesPerUser))?;
        let lease = DeviceLease {
            service: Arc::clone(self),
            caller: caller.clone(),
            conn,
            registering: false,
            routed: false,
            up: false,
        };
        Ok((lease, queue))
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
        self.mark_if_last_down(user);
    }

    /// Marks a presence change for `user` if no device of theirs is left here.
    fn mark_if_last_down(&self, user: &str) {
        let none_left = if crate::mutants::active(crate::mutants::Mutant::OfflineOffByOne) {
            1
        } else {
            0
        };
        if self.hub.devices_online(user) == none_left {
            self.presence.mark_changed(user);
        }
    }

    /// The long-poll mailbox of `caller`'s device: the open one, or a new one whose
    /// feed is leased (ending the device's WebSocket); the poll that holds its feed
    /// next routes it and counts it up ([`DeviceFeed::connect`]) before reading
    /// anything. Refused with `overloaded` when `--poll-mailboxes-max` are open and
    /// `too_many_devices` past the user's devices.
    pub async fn mailbox(
        self: &Arc<Self>,
        caller: &Caller,
    ) -> Result<Arc<crate::mailbox::Mailbox<DeviceFeed>>, ProtocolError> {
        let now = self.monotonic_ms();
        let opened = self
            .mailboxes
            .get_or_open(
                &self.hub,
                &caller.user,
                &caller.device,
                &self.limits,
                now,
                || {
                    let (lease, queue) = self.lease_device(caller)?;
                    let conn = lease.conn();
                    Ok((conn, DeviceFeed::new(Arc::clone(self), lease, queue)))
                },
            )
            .inspect_err(|e| {
                if e.code == ErrorCode::Overloaded {
                    self.metrics.count_limit_hit(LimitHit::PollMailboxes);
                }
            })?;
        match opened {
            crate::mailbox::Opened::Existing(mailbox) => {
                self.record_last_seen(&caller.user);
                Ok(mailbox)
            }
            crate::mailbox::Opened::New(mailbox) => {
                self.metrics.polls_open.set(self.mailboxes.len() as i64);
                Ok(mailbox)
            }
        }
    }

    /// Closes long-poll mailboxes that were replaced or not polled for the idle
    /// timeout: their devices go offline (their leases end with the last poll).
    pub fn expire_mailboxes(&self) {
        let idle_ms = u64::try_from(self.limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle_before = self.monotonic_ms().saturating_sub(idle_ms);
        drop(self.mailboxes.take_expired(idle_before));
        self.metrics.polls_open.set(self.mailboxes.len() as i64);
    }

    /// Closes every long-poll mailbox (shutdown): their devices go offline once
    /// their polls in flight end.
    pub fn close_mailboxes(&self) {
        for mailbox in self.mailboxes.take_all() {
            mailbox.close();
        }
        self.metrics.polls_open.set(0);
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
