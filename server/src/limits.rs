//! Limits on everything a client can make the server hold, with units in their names.

use std::time::Duration;

/// Configurable limits; [`Limits::default`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest text body, in bytes.
    pub text_len_max_bytes: usize,
    /// Largest WebSocket message; larger ones close the connection with `frame_too_large`.
    pub frame_len_max_bytes: usize,
    /// Most members of one group, the owner included.
    pub group_members_max: usize,
    /// Largest page of `sync` and `history`, and of each catch-up read.
    pub page_len_max: u32,
    /// Concurrent connections; more are refused with `overloaded` (but see
    /// `health_connections_max`).
    pub connections_max: usize,
    /// Connections beyond `connections_max` that may still reach `/healthz` and
    /// `/metrics` (anything else on them is refused with `overloaded`), so a
    /// full server can still be probed.
    pub health_connections_max: usize,
    /// Longest an HTTP connection may take to send a request's head, from when
    /// the server starts waiting for it (on connect, or after the previous response).
    pub header_read_timeout: Duration,
    /// Longest an HTTP connection may stay open with no request in flight and no
    /// byte arriving (keep-alive idle, or connected and silent).
    pub keep_alive_timeout: Duration,
    /// Longest a WebSocket may stay open without a successful `hello`.
    pub hello_timeout: Duration,
    /// Live events queued for one device before it is dropped as `slow_consumer`.
    pub device_queue_len_max: usize,
    /// Entries a brand-new device receives per conversation before it pages `history`.
    pub new_device_recent_len: u64,
    /// How long a message is kept.
    pub retention: Duration,
    /// How often expired messages are swept.
    pub expiry_sweep_interval: Duration,
    /// How long a connection may stay silent before the server closes it.
    pub idle_timeout: Duration,
    /// How long shutdown waits for sessions to close.
    pub drain_timeout: Duration,
    /// Presence changes are published (and written to each connection) at most once per this.
    pub presence_interval: Duration,
    /// Most users in one `presence` request.
    pub presence_users_max: usize,
    /// Longest a long-poll request is held when nothing is new.
    pub poll_timeout_max: Duration,
    /// Largest image upload, in bytes.
    pub media_len_max_bytes: u64,
    /// Cluster mode: events waiting for the router at most (outbox slots).
    pub unrouted_slots_max: usize,
    /// Sends per user (over all their devices, on this server).
    pub send_rate: crate::rate::Rate,
    /// Group creations and membership changes per user (on this server).
    pub group_change_rate: crate::rate::Rate,
    /// Bytes of live events queued for one device (beyond it, `slow_consumer`).
    pub device_queue_bytes_max: usize,
    /// Connections open at once from one source address.
    pub connections_per_address_max: usize,
    /// Devices of one user connected to this server at once (WebSocket or long-poll).
    pub devices_per_user_max: usize,
    /// Long-poll mailboxes open at once.
    pub poll_mailboxes_max: usize,
    /// Image uploads in progress at once.
    pub uploads_max: usize,
}

/// Default largest page of `sync` and `history`, in entries.
pub const PAGE_LEN_MAX_DEFAULT: u32 = 500;
/// Default most live events queued for one device.
pub const DEVICE_QUEUE_LEN_MAX_DEFAULT: u64 = 4096;
/// Connections per source address by default: a load generator spreading a million
/// connections over 250 loopback addresses stays under it.
pub const CONNECTIONS_PER_ADDRESS_DEFAULT: usize = 4_096;

/// Sends per user per second by default: far above any person, and above the
/// per-user rates of the load scenarios (the design point's busiest is 50/s).
pub const SEND_RATE_DEFAULT: crate::rate::Rate = crate::rate::Rate {
    per_sec: 200.0,
    burst: 400,
};

/// Group changes per user per second by default.
pub const GROUP_CHANGE_RATE_DEFAULT: crate::rate::Rate = crate::rate::Rate {
    per_sec: 20.0,
    burst: 100,
};

/// Default text limit: 64 KiB.
pub const TEXT_LEN_MAX_BYTES_DEFAULT: usize = 64 * 1024;
/// Default frame limit: text limit plus room for JSON framing and escaping.
pub const FRAME_LEN_MAX_BYTES_DEFAULT: usize = 2 * TEXT_LEN_MAX_BYTES_DEFAULT + 4096;
/// Default group size.
pub const GROUP_MEMBERS_MAX_DEFAULT: usize = 500;
/// Default accept queue of the listening socket: room for a reconnect storm of thousands
/// of devices (Linux caps it at net.core.somaxconn, 4096 by default since 5.4).
pub const LISTEN_BACKLOG_DEFAULT: u32 = 4096;
/// Default retention: 366 days, so "one year" holds in leap years too.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(366 * 24 * 3600);

const _: () = assert!(FRAME_LEN_MAX_BYTES_DEFAULT > TEXT_LEN_MAX_BYTES_DEFAULT);

impl Default for Limits {
    fn default() -> Self {
        Self {
            text_len_max_bytes: TEXT_LEN_MAX_BYTES_DEFAULT,
            frame_len_max_bytes: FRAME_LEN_MAX_BYTES_DEFAULT,
            group_members_max: GROUP_MEMBERS_MAX_DEFAULT,
            page_len_max: PAGE_LEN_MAX_DEFAULT,
            connections_max: 100_000,
            health_connections_max: 16,
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(20),
            hello_timeout: Duration::from_secs(10),
            device_queue_len_max: DEVICE_QUEUE_LEN_MAX_DEFAULT as usize,
            new_device_recent_len: 100,
            retention: RETENTION_DEFAULT,
            expiry_sweep_interval: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(90),
            drain_timeout: Duration::from_secs(5),
            presence_interval: Duration::from_millis(1000),
            presence_users_max: 500,
            poll_timeout_max: Duration::from_secs(30),
            media_len_max_bytes: crate::media::MEDIA_LEN_MAX_BYTES_DEFAULT,
            unrouted_slots_max: crate::cluster::outbox::CAPACITY_DEFAULT,
            send_rate: SEND_RATE_DEFAULT,
            group_change_rate: GROUP_CHANGE_RATE_DEFAULT,
            device_queue_bytes_max: 8 * 1024 * 1024,
            connections_per_address_max: CONNECTIONS_PER_ADDRESS_DEFAULT,
            devices_per_user_max: 32,
            poll_mailboxes_max: 100_000,
            uploads_max: 64,
        }
    }
}

impl Limits {
    /// The page length a request's `limit` asks for: absent means the page limit,
    /// above it is clamped to it, and 0 is refused with `bad_request` (a page of
    /// nothing cannot make progress).
    pub fn page_len(&self, requested: Option<u32>) -> Result<u32, crate::protocol::ProtocolError> {
        match requested {
            None => Ok(self.page_len_max),
            Some(0) => Err(crate::protocol::ProtocolError::new(
                crate::protocol::ErrorCode::BadRequest,
                format!(
                    "limit must be at least 1 (at most {} is served; larger asks are clamped)",
                    self.page_len_max
                ),
            )),
            Some(n) => Ok(n.min(self.page_len_max)),
        }
    }

    /// Checks the relations between limits; the server refuses to start otherwise.
    pub fn validate(&self) -> Result<(), String> {
        if self.frame_len_max_bytes <= self.text_len_max_bytes {
            return Err("frame limit must exceed the text limit".into());
        }
        if self.group_members_max < 2 {
            return Err("groups must allow at least 2 members".into());
        }
        if self.media_len_max_bytes < 64 {
            return Err("the image limit must be at least 64 bytes".into());
        }
        if self.presence_interval.is_zero() || self.presence_users_max == 0 {
            return Err("the presence interval and request size must be positive".into());
        }
        if self.header_read_timeout.is_zero()
            || self.keep_alive_timeout.is_zero()
            || self.hello_timeout.is_zero()
        {
            return Err("the header-read, keep-alive and hello timeouts must be positive".into());
        }
        self.send_rate.validate("send")?;
        self.group_change_rate.validate("group change")?;
        if self.devices_per_user_max == 0 || self.poll_mailboxes_max == 0 || self.uploads_max == 0 {
            return Err("the device, long-poll mailbox and upload limits must be positive".into());
        }
        if self.device_queue_bytes_max < self.frame_len_max_bytes {
            return Err(
                "a device queue must hold at least one frame (--device-queue-max-bytes)".into(),
            );
        }
        if self.connections_per_address_max == 0 {
            return Err("the per-address connection limit must be positive".into());
        }
        if self.unrouted_slots_max == 0 {
            return Err("the unrouted-event limit must be positive".into());
        }
        if self.page_len_max == 0 || self.device_queue_len_max == 0 || self.connections_max == 0 {
            return Err("page, queue and connection limits must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Absent asks for the page limit, larger asks are clamped, and 0 is refused.
    #[test]
    fn page_len_bounds() {
        let limits = Limits::default();
        assert_eq!(limits.page_len(None).unwrap(), 500);
        assert_eq!(limits.page_len(Some(7)).unwrap(), 7);
        assert_eq!(limits.page_len(Some(10_000)).unwrap(), 500);
        let refused = limits.page_len(Some(0)).unwrap_err();
        assert_eq!(refused.code, crate::protocol::ErrorCode::BadRequest);
    }
}
