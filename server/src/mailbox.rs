//! Long-poll mailboxes: the server side of a device on the HTTP fallback.
//!
//! A device that polls gets a mailbox: a place in the [`Hub`] like a WebSocket
//! session's, kept between its polls, so live events wake a waiting poll and
//! receipts and presence changes wait for the next one. Entries never depend on
//! the mailbox: every poll reads them from the store after the cursors the
//! device presents, so a lost response or an expired mailbox loses nothing.
//!
//! A mailbox is closed when the same device connects over WebSocket (or polls
//! after being replaced), when its queue overflows, or when no poll came for
//! the idle timeout (the device is then offline for presence).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

use crate::hub::{ConnId, Hub, Push};

/// One polling device's place in the hub.
pub struct Mailbox {
    /// The hub slot (pass to [`Hub::unregister`]).
    pub conn: ConnId,
    /// Live events since the last poll.
    pub queue: tokio::sync::Mutex<mpsc::Receiver<Push>>,
    generation: AtomicU64,
    superseded: Notify,
    polls_in_flight: AtomicUsize,
    last_active_ms: AtomicU64,
    closed: AtomicBool,
}

impl Mailbox {
    /// Starts a poll: an older poll of the same device still waiting returns
    /// at once (its client gave up on it). Returns the poll's generation.
    pub fn begin_poll(&self, now_ms: u64) -> u64 {
        self.polls_in_flight.fetch_add(1, Ordering::SeqCst);
        self.last_active_ms.store(now_ms, Ordering::SeqCst);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.superseded.notify_waiters();
        generation
    }

    /// Ends a poll started with [`Mailbox::begin_poll`].
    pub fn end_poll(&self, now_ms: u64) {
        self.last_active_ms.store(now_ms, Ordering::SeqCst);
        let before = self.polls_in_flight.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "end_poll without begin_poll");
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
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// See [`Mailbox::close`].
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Every open mailbox of this server, by `(user, device)`.
#[derive(Default)]
pub struct Mailboxes {
    open: Mutex<HashMap<(String, String), Arc<Mailbox>>>,
}

/// What [`Mailboxes::get_or_open`] did.
pub enum Opened {
    /// The device's mailbox was open already.
    Existing(Arc<Mailbox>),
    /// A new mailbox, registered in the hub; the caller registers it in the cluster.
    New(Arc<Mailbox>),
}

impl Mailboxes {
    /// The open mailbox of `device`, or a new one registered in `hub` (which
    /// closes a WebSocket connection of the same device).
    pub fn get_or_open(
        &self,
        hub: &Hub,
        user: &str,
        device: &str,
        queue_len: usize,
        now_ms: u64,
    ) -> Opened {
        let key = (user.to_owned(), device.to_owned());
        let mut open = self.open.lock().expect("mailboxes lock");
        if let Some(mailbox) = open.get(&key) {
            // A mailbox whose hub slot was taken (the device connected over
            // WebSocket since) is over, even if no poll has seen its close yet.
            if !mailbox.is_closed() && hub.holds(user, mailbox.conn) {
                return Opened::Existing(Arc::clone(mailbox));
            }
        }
        let (conn, rx) = hub.register(user, device, queue_len);
        let mailbox = Arc::new(Mailbox {
            conn,
            queue: tokio::sync::Mutex::new(rx),
            generation: AtomicU64::new(0),
            superseded: Notify::new(),
            polls_in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(now_ms),
            closed: AtomicBool::new(false),
        });
        if let Some(old) = open.insert(key, Arc::clone(&mailbox)) {
            old.close();
        }
        Opened::New(mailbox)
    }

    /// Forgets `mailbox` of `(user, device)` if it is still the open one; true if it was.
    pub fn remove(&self, user: &str, device: &str, mailbox: &Arc<Mailbox>) -> bool {
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
    pub fn take_expired(&self, idle_before_ms: u64) -> Vec<((String, String), Arc<Mailbox>)> {
        let mut open = self.open.lock().expect("mailboxes lock");
        let expired: Vec<(String, String)> = open
            .iter()
            .filter(|(_, m)| {
                m.is_closed()
                    || (m.polls_in_flight.load(Ordering::SeqCst) == 0
                        && m.last_active_ms.load(Ordering::SeqCst) < idle_before_ms)
            })
            .map(|(k, _)| k.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|k| open.remove(&k).map(|m| (k, m)))
            .collect()
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

    /// A device keeps one mailbox across polls; idle ones expire, busy ones do not.
    #[test]
    fn mailbox_lifecycle() {
        let (hub, boxes) = (Hub::default(), Mailboxes::default());
        let Opened::New(first) = boxes.get_or_open(&hub, "ann", "web", 8, 1_000) else {
            panic!("a new device gets a new mailbox");
        };
        assert!(hub.device_online("ann", "web"));
        let Opened::Existing(again) = boxes.get_or_open(&hub, "ann", "web", 8, 1_100) else {
            panic!("the open mailbox is reused");
        };
        assert!(Arc::ptr_eq(&first, &again));
        let generation = first.begin_poll(2_000);
        assert!(boxes.take_expired(5_000).is_empty(), "a poll is in flight");
        let newer = first.begin_poll(2_500);
        assert!(first.is_superseded(generation) && !first.is_superseded(newer));
        first.end_poll(3_000);
        first.end_poll(3_000);
        assert!(boxes.take_expired(3_000).is_empty(), "active until 3000");
        let expired = boxes.take_expired(3_001);
        assert_eq!(expired.len(), 1);
        assert!(boxes.is_empty());
    }

    /// A closed mailbox is replaced by the next poll.
    #[test]
    fn closed_mailbox_is_replaced() {
        let (hub, boxes) = (Hub::default(), Mailboxes::default());
        let Opened::New(first) = boxes.get_or_open(&hub, "ann", "web", 8, 0) else {
            panic!("new");
        };
        first.close();
        let Opened::New(second) = boxes.get_or_open(&hub, "ann", "web", 8, 0) else {
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
        let (hub, boxes) = (Hub::default(), Mailboxes::default());
        let Opened::New(first) = boxes.get_or_open(&hub, "ann", "web", 8, 0) else {
            panic!("new");
        };
        let (websocket, mut ws_queue) = hub.register("ann", "web", 8);
        assert!(!hub.holds("ann", first.conn) && hub.holds("ann", websocket));
        let Opened::New(second) = boxes.get_or_open(&hub, "ann", "web", 8, 0) else {
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
