//! Long-poll mailboxes: the server side of a device on the HTTP fallback.
//!
//! A device that polls gets a mailbox: its device feed (a place in the [`Hub`]
//! like a WebSocket session's), kept between its polls, so live events wake a
//! waiting poll and receipts and presence changes wait for the next one. Entries
//! never depend on the mailbox: every poll restarts the feed at the cursors the
//! device presents, so a lost response or an expired mailbox loses nothing.
//!
//! A mailbox is closed when the same device connects over WebSocket (or polls
//! after being replaced), when its queue overflows, or when no poll came for
//! the idle timeout (the device is then offline for presence). Times here are
//! milliseconds on the monotonic clock ([`crate::service::ChatService::monotonic_ms`]),
//! never wall time, so a clock step never keeps a mailbox open longer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::hub::{ConnId, Hub};
use crate::limits::Limits;
use crate::protocol::{ErrorCode, ProtocolError};

/// How long a device refused a mailbox (the server holds the most) is told to wait.
pub const MAILBOX_FULL_RETRY_MS: u64 = 1_000;

/// One polling device's place in the hub, holding `T` (its device feed) between polls.
pub struct Mailbox<T> {
    /// The hub slot `content` holds.
    pub conn: ConnId,
    /// What a poll works on (one poll at a time).
    pub content: tokio::sync::Mutex<T>,
    generation: AtomicU64,
    superseded: Notify,
    polls_in_flight: AtomicUsize,
    last_active_ms: AtomicU64,
    closed: AtomicBool,
    reopened: bool,
}

/// A poll in flight on a mailbox, from [`Mailbox::begin_poll`] until
/// [`PollInFlight::end`] or until dropped: a poll whose future is dropped (its
/// client went away, so the HTTP server cancelled it) ends too, with the device
/// last active when that poll began. Either way the mailbox can idle out.
#[must_use = "the poll is in flight until ended or dropped"]
pub struct PollInFlight<'m, T> {
    mailbox: &'m Mailbox<T>,
    generation: u64,
    ended: bool,
}

impl<T> PollInFlight<'_, T> {
    /// The poll's generation (see [`Mailbox::is_superseded`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Ends the poll, the device last active at `now_ms`.
    pub fn end(mut self, now_ms: u64) {
        self.mailbox.last_active_ms.store(now_ms, Ordering::SeqCst);
        self.ended = true;
        self.mailbox.poll_ended();
    }
}

impl<T> Drop for PollInFlight<'_, T> {
    fn drop(&mut self) {
        if !self.ended {
            self.mailbox.poll_ended();
        }
    }
}

impl<T> Mailbox<T> {
    /// Starts a poll: an older poll of the same device still waiting returns
    /// at once (its client gave up on it). The poll is in flight (the mailbox
    /// does not idle out) until the returned value is ended or dropped.
    pub fn begin_poll(&self, now_ms: u64) -> PollInFlight<'_, T> {
        self.polls_in_flight.fetch_add(1, Ordering::SeqCst);
        self.last_active_ms.store(now_ms, Ordering::SeqCst);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.superseded.notify_waiters();
        PollInFlight {
            mailbox: self,
            generation,
            ended: false,
        }
    }

    fn poll_ended(&self) {
        let before = self.polls_in_flight.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "a poll ended that never began");
    }

    /// Whether a newer poll than `generation` has started.
    pub fn is_superseded(&self, generation: u64) -> bool {
        self.generation.load(Ordering::SeqCst) != generation
    }

    /// Resolves when a newer poll starts (check [`Mailbox::is_superseded`] after
    /// creating the future, to not miss one that started just before).
    pub fn superseded(&self) -> tokio::sync::futures::Notified<'_> {
        self.superseded.notified()
    }

    /// Marks the mailbox unusable (replaced or overflowed); the next poll opens another.
    /// A poll held on it returns at once.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.superseded.notify_waiters();
    }

    /// See [`Mailbox::close`].
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// True when this mailbox replaced one of the same device that ended while the
    /// device went on polling (its queue overflowed, or a WebSocket took its slot):
    /// what that one had queued, receipts included, may be lost.
    pub fn reopened(&self) -> bool {
        self.reopened
    }
}

/// A device: `(user, device)`.
type DeviceKey = (String, String);

/// Every open mailbox of this server, by device.
pub struct Mailboxes<T> {
    open: Mutex<HashMap<DeviceKey, Arc<Mailbox<T>>>>,
}

impl<T> Default for Mailboxes<T> {
    fn default() -> Self {
        Mailboxes {
            open: Mutex::new(HashMap::new()),
        }
    }
}

/// What [`Mailboxes::get_or_open`] did.
pub enum Opened<T> {
    /// The device's mailbox was open already.
    Existing(Arc<Mailbox<T>>),
    /// A new mailbox around what `open` returned.
    New(Arc<Mailbox<T>>),
}

impl<T> Mailboxes<T> {
    /// The open mailbox of `device`, or a new one around what `open` returns: the
    /// device's new slot in `hub` (which closes a WebSocket connection of the same
    /// device) and what holds it.
    ///
    /// Refused with `overloaded` (and a wait) when `limits.poll_mailboxes_max`
    /// mailboxes are open already, and with `open`'s error (say `too_many_devices`);
    /// `open` is not called then, or registered nothing.
    pub fn get_or_open(
        &self,
        hub: &Hub,
        user: &str,
        device: &str,
        limits: &Limits,
        now_ms: u64,
        open_slot: impl FnOnce() -> Result<(ConnId, T), ProtocolError>,
    ) -> Result<Opened<T>, ProtocolError> {
        let key = (user.to_owned(), device.to_owned());
        let mut open = self.open.lock().expect("mailboxes lock");
        let reopening = match open.get(&key) {
            // A mailbox whose hub slot was taken (the device connected over
            // WebSocket since) is over, even if no poll has seen its close yet.
            Some(mailbox) if !mailbox.is_closed() && hub.holds(user, mailbox.conn) => {
                return Ok(Opened::Existing(Arc::clone(mailbox)));
            }
            Some(_) => true,
            None => false,
        };
        if !reopening && open.len() >= limits.poll_mailboxes_max {
            return Err(ProtocolError::new(
                ErrorCode::Overloaded,
                format!(
                    "{} long-poll mailboxes are open, the most this server keeps \
                     (--poll-mailboxes-max); retry later or use WebSocket",
                    open.len()
                ),
            )
            .retry_after(MAILBOX_FULL_RETRY_MS));
        }
        let (conn, content) = open_slot()?;
        let mailbox = Arc::new(Mailbox {
            conn,
            content: tokio::sync::Mutex::new(content),
            generation: AtomicU64::new(0),
            superseded: Notify::new(),
            polls_in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(now_ms),
            closed: AtomicBool::new(false),
            reopened: reopening,
        });
        if let Some(old) = open.insert(key, Arc::clone(&mailbox)) {
            old.close();
        }
        debug_assert!(open.len() <= limits.poll_mailboxes_max);
        Ok(Opened::New(mailbox))
    }

    /// Forgets `mailbox` of `(user, device)` if it is still the open one; true if it was.
    pub fn remove(&self, user: &str, device: &str, mailbox: &Arc<Mailbox<T>>) -> bool {
        let key = (user.to_owned(), device.to_owned());
        let mut open = self.open.lock().expect("mailboxes lock");
        if open.get(&key).is_some_and(|m| Arc::ptr_eq(m, mailbox)) {
            open.remove(&key);
            return true;
        }
        false
    }

    /// Removes and returns the mailboxes closed, or idle (no poll in flight, the
    /// last one ended before `idle_before_ms`).
    pub fn take_expired(&self, idle_before_ms: u64) -> Vec<Arc<Mailbox<T>>> {
        let mut open = self.open.lock().expect("mailboxes lock");
        let mut expired: Vec<(String, String)> = open
            .iter()
            .filter(|(_, m)| {
                m.is_closed()
                    || (m.polls_in_flight.load(Ordering::SeqCst) == 0
                        && m.last_active_ms.load(Ordering::SeqCst) < idle_before_ms)
            })
            .map(|(k, _)| k.clone())
            .collect();
        // In order: the hash map's order differs from one process (or simulated run)
        // to the next, and each mailbox's end publishes presence.
        expired.sort_unstable();
        expired
            .into_iter()
            .filter_map(|k| open.remove(&k))
            .collect()
    }

    /// Removes and returns every mailbox (shutdown).
    pub fn take_all(&self) -> Vec<Arc<Mailbox<T>>> {
        let mut open = self.open.lock().expect("mailboxes lock");
        let mut all: Vec<_> = open.drain().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all.into_iter().map(|(_, m)| m).collect()
    }

    /// Number of open mailboxes.
    pub fn len(&self) -> usize {
        self.open.lock().expect("mailboxes lock").len()
    }

    /// Whether no mailbox is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{DeviceQueue, Push};

    type Boxes = Mailboxes<DeviceQueue>;

    /// Opens (or reuses) `user`'s `device` mailbox around a plain hub slot.
    fn open(
        boxes: &Boxes,
        hub: &Hub,
        user: &str,
        device: &str,
        limits: &Limits,
        now_ms: u64,
    ) -> Result<Opened<DeviceQueue>, ProtocolError> {
        boxes.get_or_open(hub, user, device, limits, now_ms, || {
            hub.register(user, device, limits)
        })
    }

    fn small() -> Limits {
        Limits {
            device_queue_len_max: 8,
            ..Limits::default()
        }
    }

    /// Past the mailbox limit a new device is refused with `overloaded` and a
    /// wait; an open mailbox is still served, and a freed place is taken again.
    #[test]
    fn mailboxes_past_the_limit_are_refused() {
        let (hub, boxes) = (Hub::default(), Boxes::default());
        let limits = Limits {
            poll_mailboxes_max: 2,
            ..small()
        };
        let Ok(Opened::New(ann)) = open(&boxes, &hub, "ann", "web", &limits, 0) else {
            panic!("first");
        };
        assert!(open(&boxes, &hub, "bob", "web", &limits, 0).is_ok());
        let refused = open(&boxes, &hub, "cat", "web", &limits, 0).err().unwrap();
        assert_eq!(refused.code, ErrorCode::Overloaded);
        assert!(refused.retry_after_ms.is_some());
        assert!(!hub.device_online("cat", "web"), "nothing registered");
        assert!(matches!(
            open(&boxes, &hub, "ann", "web", &limits, 0),
            Ok(Opened::Existing(_))
        ));
        assert!(boxes.remove("ann", "web", &ann));
        assert!(open(&boxes, &hub, "cat", "web", &limits, 0).is_ok());
    }

    /// A user with the most devices allowed gets no mailbox for another one.
    #[test]
    fn devices_past_the_limit_get_no_mailbox() {
        let (hub, boxes) = (Hub::default(), Boxes::default());
        let limits = Limits {
            devices_per_user_max: 1,
            ..small()
        };
        assert!(open(&boxes, &hub, "ann", "phone", &limits, 0).is_ok());
        let refused = open(&boxes, &hub, "ann", "web", &limits, 0).err().unwrap();
        assert_eq!(refused.code, ErrorCode::TooManyDevices);
        assert_eq!(boxes.len(), 1);
    }

    /// A device keeps one mailbox across polls; idle ones expire, busy ones do not.
    #[test]
    fn mailbox_lifecycle() {
        let (hub, boxes) = (Hub::default(), Boxes::default());
        let Opened::New(first) = open(&boxes, &hub, "ann", "web", &small(), 1_000).unwrap() else {
            panic!("a new device gets a new mailbox");
        };
        assert!(hub.device_online("ann", "web"));
        let Opened::Existing(again) = open(&boxes, &hub, "ann", "web", &small(), 1_100).unwrap()
        else {
            panic!("the open mailbox is reused");
        };
        assert!(Arc::ptr_eq(&first, &again));
        let older = first.begin_poll(2_000);
        assert!(boxes.take_expired(5_000).is_empty(), "a poll is in flight");
        let newer = first.begin_poll(2_500);
        assert!(
            first.is_superseded(older.generation()) && !first.is_superseded(newer.generation())
        );
        older.end(3_000);
        newer.end(3_000);
        assert!(boxes.take_expired(3_000).is_empty(), "active until 3000");
        let expired = boxes.take_expired(3_001);
        assert_eq!(expired.len(), 1);
        assert!(boxes.is_empty());
    }

    /// A poll dropped half-way (its client went away) is no longer in flight: the
    /// mailbox idles out counting from when that poll began.
    #[test]
    fn a_cancelled_poll_lets_the_mailbox_idle_out() {
        let (hub, boxes) = (Hub::default(), Boxes::default());
        let Opened::New(mailbox) = open(&boxes, &hub, "ann", "web", &small(), 1_000).unwrap()
        else {
            panic!("a new device gets a new mailbox");
        };
        let poll = mailbox.begin_poll(2_000);
        assert!(boxes.take_expired(9_000).is_empty(), "a poll is in flight");
        drop(poll);
        assert!(boxes.take_expired(2_000).is_empty(), "active until 2000");
        assert_eq!(boxes.take_expired(2_001).len(), 1);
    }

    /// A closed mailbox is replaced by the next poll.
    #[test]
    fn closed_mailbox_is_replaced() {
        let (hub, boxes) = (Hub::default(), Boxes::default());
        let Opened::New(first) = open(&boxes, &hub, "ann", "web", &small(), 0).unwrap() else {
            panic!("new");
        };
        first.close();
        let Opened::New(second) = open(&boxes, &hub, "ann", "web", &small(), 0).unwrap() else {
            panic!("a closed mailbox is not reused");
        };
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(
            !boxes.remove("ann", "web", &first),
            "no longer the open one"
        );
        assert!(boxes.remove("ann", "web", &second));
    }

    /// A mailbox whose hub slot another connection of the device took is not
    /// reused, though no poll has read its close yet; the next poll takes the slot back.
    #[test]
    fn mailbox_replaced_in_the_hub_is_not_reused() {
        let (hub, boxes) = (Hub::default(), Boxes::default());
        let Opened::New(first) = open(&boxes, &hub, "ann", "web", &small(), 0).unwrap() else {
            panic!("new");
        };
        let (websocket, mut ws_queue) = hub.register("ann", "web", &small()).unwrap();
        assert!(!hub.holds("ann", first.conn) && hub.holds("ann", websocket));
        let Opened::New(second) = open(&boxes, &hub, "ann", "web", &small(), 0).unwrap() else {
            panic!("a mailbox that lost its hub slot is not reused");
        };
        assert!(first.is_closed() && !Arc::ptr_eq(&first, &second));
        assert!(hub.holds("ann", second.conn) && !hub.holds("ann", websocket));
        assert!(
            matches!(ws_queue.try_recv(), Ok(Push::Close(_))),
            "the WebSocket is told to close"
        );
    }
}
