//! The local hub: which devices are connected to this server, and fan-out to them.
//!
//! A pushed frame is serialized once and shared by every receiving device
//! (`Utf8Bytes` is reference-counted). Each device has a queue bounded in events
//! and in bytes; a device whose queue is full is dropped (its session closes with
//! `slow_consumer`) rather than letting one slow reader hold memory without bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::protocol::{Entry, PresenceState, ProtocolError, Receipt};

/// An event and its frame, serialized once for every device it is pushed to:
/// queuing it for one more device costs one reference count.
#[derive(Debug)]
pub struct Framed<T> {
    /// The event.
    pub item: Arc<T>,
    /// Its pre-serialized frame.
    pub frame: Utf8Bytes,
}

impl<T> Framed<T> {
    /// `item` with its `frame`, ready to be pushed.
    pub fn new(item: Arc<T>, frame: Utf8Bytes) -> Arc<Self> {
        Arc::new(Self { item, frame })
    }
}

/// Something for one device's session to write. Kept small (a pointer and its
/// kind): every device queue allocates its slots ahead, whatever it holds.
#[derive(Debug, Clone)]
pub enum Push {
    /// A conversation entry and its pre-serialized `msg` frame.
    Entry(Arc<Framed<Entry>>),
    /// A receipt and its pre-serialized frame.
    Receipt(Arc<Framed<Receipt>>),
    /// Presence changes (one or more users); sessions coalesce these into `presence` frames.
    Presence(Arc<[Arc<PresenceState>]>),
    /// Any other pre-serialized frame.
    Frame(Box<Utf8Bytes>),
    /// Close the session with this error.
    Close(Box<ProtocolError>),
    /// Live events may have been lost (the cluster fabric was interrupted):
    /// re-read every conversation and deliver what is missing.
    Resync,
}

/// Bytes a presence state is counted as in a device's queue (it is written as
/// about this much JSON).
const PRESENCE_STATE_BYTES: usize = 64;

// A queue's slots are allocated 32 at a time when it is made: one per connection.
const _: () = assert!(
    std::mem::size_of::<Push>() <= 24,
    "a Push is a pointer and its kind"
);

impl Push {
    /// The bytes this push is counted as in a device's queue: its frame, or what
    /// it will be written as.
    pub fn queued_len(&self) -> usize {
        match self {
            Push::Entry(framed) => framed.frame.len(),
            Push::Receipt(framed) => framed.frame.len(),
            Push::Frame(frame) => frame.len(),
            Push::Presence(states) => states.len() * PRESENCE_STATE_BYTES,
            Push::Close(_) | Push::Resync => 0,
        }
    }
}

/// The receiving end of one device's queue: what its session writes.
pub struct DeviceQueue {
    rx: mpsc::Receiver<Push>,
    bytes: Arc<AtomicUsize>,
}

impl DeviceQueue {
    /// The next push; `None` once the hub dropped the device (replaced, or its
    /// queue overflowed) and everything queued was taken.
    pub async fn recv(&mut self) -> Option<Push> {
        let push = self.rx.recv().await?;
        self.taken(&push);
        Some(push)
    }

    /// The next push if one is queued.
    pub fn try_recv(&mut self) -> Result<Push, mpsc::error::TryRecvError> {
        let push = self.rx.try_recv()?;
        self.taken(&push);
        Ok(push)
    }

    fn taken(&self, push: &Push) {
        let len = push.queued_len();
        let before = self.bytes.fetch_sub(len, Ordering::Relaxed);
        debug_assert!(before >= len, "queued bytes went negative");
    }
}

struct DeviceSlot {
    conn_id: u64,
    device: String,
    queue: mpsc::Sender<Push>,
    /// Bytes queued and not yet taken by the session.
    bytes: Arc<AtomicUsize>,
    bytes_max: usize,
}

/// Registry of connected devices by user, with fan-out.
#[derive(Default)]
pub struct Hub {
    users: Mutex<HashMap<String, Vec<DeviceSlot>>>,
    next_conn_id: AtomicU64,
    /// The newest last-seen time among presence states delivered here, by user.
    presence_newest: Mutex<HashMap<String, u64>>,
}

/// Most users whose newest delivered last-seen time the hub remembers; past it
/// the memory starts over (an older state could then slip through once).
const PRESENCE_NEWEST_MAX: usize = 1 << 20;

/// A device's place in the hub; pass it back to [`Hub::unregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId(u64);

impl Hub {
    /// Keeps the presence states newer than any delivered here before: a state
    /// whose last-seen time is older than one already delivered for its user was
    /// read earlier (the store only raises last-seen times) and reached this
    /// server late, by another server's route, so it is dropped; the newest
    /// delivered is remembered.
    pub fn admit_presence(&self, states: &[Arc<PresenceState>]) -> Vec<Arc<PresenceState>> {
        let mut newest = self.presence_newest.lock().expect("presence order lock");
        if newest.len() >= PRESENCE_NEWEST_MAX {
            newest.clear();
        }
        states
            .iter()
            .filter(|state| {
                let Some(seen) = state.last_seen_ms else {
                    return true;
                };
                match newest.get_mut(&state.user) {
                    Some(known) if seen < *known => false,
                    Some(known) => {
                        *known = seen;
                        true
                    }
                    None => {
                        newest.insert(state.user.clone(), seen);
                        true
                    }
                }
            })
            .cloned()
            .collect()
    }

    /// Registers `device` of `user` with a queue of at most
    /// `limits.device_queue_len_max` events and `limits.device_queue_bytes_max`
    /// bytes; an older connection of the same device is told to close. Refused with
    /// `too_many_devices` when `user` already has `limits.devices_per_user_max`
    /// other devices here.
    pub fn register(
        &self,
        user: &str,
        device: &str,
        limits: &crate::limits::Limits,
    ) -> Result<(ConnId, DeviceQueue), ProtocolError> {
        let devices_max = limits.devices_per_user_max;
        let mut users = self.users.lock().expect("hub lock");
        let slots = users.entry(user.to_owned()).or_default();
        let again = slots.iter().position(|s| s.device == device);
        if again.is_none() && slots.len() >= devices_max {
            let held = slots.len();
            if held == 0 {
                users.remove(user);
            }
            return Err(ProtocolError::new(
                crate::protocol::ErrorCode::TooManyDevices,
                format!(
                    "{user} has {held} devices connected to this server, the most allowed \
                     (--devices-per-user-max); disconnect one first"
                ),
            ));
        }
        let (tx, rx) = mpsc::channel(limits.device_queue_len_max);
        let bytes = Arc::new(AtomicUsize::new(0));
        let conn_id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = again {
            let old = slots.swap_remove(i);
            let _ = old.queue.try_send(Push::Close(Box::new(ProtocolError::new(
                crate::protocol::ErrorCode::Replaced,
                "this device connected again; this connection is closed",
            ))));
        }
        slots.push(DeviceSlot {
            conn_id,
            device: device.to_owned(),
            queue: tx,
            bytes: Arc::clone(&bytes),
            bytes_max: limits.device_queue_bytes_max,
        });
        debug_assert!(slots.len() <= devices_max);
        Ok((ConnId(conn_id), DeviceQueue { rx, bytes }))
    }

    /// Removes a connection (no-op if it was already replaced or dropped).
    pub fn unregister(&self, user: &str, conn: ConnId) {
        let mut users = self.users.lock().expect("hub lock");
        if let Some(slots) = users.get_mut(user) {
            slots.retain(|s| s.conn_id != conn.0);
            if slots.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Queues `push` for every connected device of every user in `users`.
    ///
    /// Returns how many devices it was queued for. Devices whose queue is full
    /// (in events or in bytes) are dropped from the hub.
    pub fn publish(&self, users: &[String], push: &Push) -> usize {
        let mut queued = 0;
        let len = push.queued_len();
        let mut users_map = self.users.lock().expect("hub lock");
        for user in users {
            let Some(slots) = users_map.get_mut(user) else {
                continue;
            };
            slots.retain(|slot| {
                let held = slot.bytes.load(Ordering::Relaxed);
                if len > 0 && held > 0 && held + len > slot.bytes_max {
                    tracing::warn!(
                        user,
                        device = slot.device,
                        held,
                        "device queue holds too many bytes; dropping the connection"
                    );
                    return false;
                }
                // Counted before it is queued, so the session never takes more than was added.
                slot.bytes.fetch_add(len, Ordering::Relaxed);
                match slot.queue.try_send(push.clone()) {
                    Ok(()) => {
                        queued += 1;
                        true
                    }
                    Err(mpsc::error::TrySendError::Full(_))
                        if crate::mutants::active(crate::mutants::Mutant::SlowConsumerLeftOpen) =>
                    {
                        // The queue's sender outlives the slot, so the session never
                        // learns it was dropped (simulation builds only).
                        std::mem::forget(slot.queue.clone());
                        false
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(
                            user,
                            device = slot.device,
                            "device queue full; dropping the connection"
                        );
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
            if slots.is_empty() {
                users_map.remove(user);
            }
        }
        queued
    }

    /// Whether `conn` of `user` still holds its slot (not replaced, not dropped).
    pub fn holds(&self, user: &str, conn: ConnId) -> bool {
        self.users
            .lock()
            .expect("hub lock")
            .get(user)
            .is_some_and(|slots| slots.iter().any(|s| s.conn_id == conn.0))
    }

    /// Every connected `(user, device)`, in order (never the hash map's order, which
    /// differs from one process, or simulated run, to the next).
    pub fn devices(&self) -> Vec<(String, String)> {
        let users = self.users.lock().expect("hub lock");
        let mut devices: Vec<(String, String)> = users
            .iter()
            .flat_map(|(user, slots)| slots.iter().map(|s| (user.clone(), s.device.clone())))
            .collect();
        devices.sort_unstable();
        devices
    }

    /// Queues `push` for every connected device, user by user in order; returns how
    /// many got it.
    pub fn publish_everyone(&self, push: &Push) -> usize {
        let mut users: Vec<String> = self
            .users
            .lock()
            .expect("hub lock")
            .keys()
            .cloned()
            .collect();
        users.sort_unstable();
        self.publish(&users, push)
    }

    /// Whether `device` of `user` is connected here.
    pub fn device_online(&self, user: &str, device: &str) -> bool {
        self.users
            .lock()
            .expect("hub lock")
            .get(user)
            .is_some_and(|slots| slots.iter().any(|s| s.device == device))
    }

    /// Number of connected devices of `user`.
    pub fn devices_online(&self, user: &str) -> usize {
        self.users
            .lock()
            .expect("hub lock")
            .get(user)
            .map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;

    fn frame(len: usize) -> Push {
        Push::Frame(Box::new(Utf8Bytes::from("x".repeat(len))))
    }

    fn state(user: &str, online: bool, last_seen_ms: Option<u64>) -> Arc<PresenceState> {
        Arc::new(PresenceState {
            user: user.into(),
            online,
            last_seen_ms,
        })
    }

    /// A state read before one already delivered (older last-seen time) is dropped;
    /// one as new or newer, or another user's, passes.
    #[test]
    fn presence_states_older_than_one_delivered_are_dropped() {
        let hub = Hub::default();
        assert_eq!(
            hub.admit_presence(&[state("ann", false, Some(200))]).len(),
            1
        );
        assert!(hub
            .admit_presence(&[state("ann", true, Some(150))])
            .is_empty());
        let admitted = hub.admit_presence(&[
            state("ann", true, Some(200)),
            state("bob", true, Some(10)),
            state("cy", true, None),
        ]);
        assert_eq!(admitted.len(), 3);
        assert!(hub
            .admit_presence(&[state("ann", false, Some(199))])
            .is_empty());
    }

    /// A device that does not read is dropped once its queue would hold more than
    /// its byte limit; what it takes frees room; one big frame alone always fits.
    #[tokio::test]
    async fn a_queue_is_bounded_in_bytes() {
        let hub = Hub::default();
        let limits = Limits {
            device_queue_bytes_max: 1_000,
            ..Limits::default()
        };
        let users = ["ann".to_owned()];
        let (_, mut queue) = hub.register("ann", "phone", &limits).unwrap();
        assert_eq!(hub.publish(&users, &frame(400)), 1);
        assert_eq!(hub.publish(&users, &frame(400)), 1);
        assert!(matches!(queue.recv().await, Some(Push::Frame(_))));
        // 400 held: another 400 fits again.
        assert_eq!(hub.publish(&users, &frame(400)), 1);
        assert_eq!(
            hub.publish(&users, &frame(400)),
            0,
            "1,200 bytes would be held"
        );
        assert!(!hub.device_online("ann", "phone"), "dropped from the hub");
        // The session drains what was queued, then learns it was dropped.
        assert!(queue.try_recv().is_ok() && queue.try_recv().is_ok());
        assert!(queue.recv().await.is_none());
        // One frame larger than the limit reaches an empty queue.
        let (_, mut queue) = hub.register("ann", "phone", &limits).unwrap();
        assert_eq!(hub.publish(&users, &frame(5_000)), 1);
        assert!(queue.try_recv().is_ok());
        assert_eq!(
            queue.bytes.load(Ordering::Relaxed),
            0,
            "taking frees the bytes"
        );
    }

    /// A user's devices are bounded; the same device again replaces itself.
    #[test]
    fn devices_per_user_are_bounded() {
        let hub = Hub::default();
        let limits = Limits {
            devices_per_user_max: 2,
            ..Limits::default()
        };
        assert!(hub.register("ann", "a", &limits).is_ok());
        assert!(hub.register("ann", "b", &limits).is_ok());
        let refused = hub.register("ann", "c", &limits).err().unwrap();
        assert_eq!(refused.code, crate::protocol::ErrorCode::TooManyDevices);
        assert!(
            hub.register("ann", "a", &limits).is_ok(),
            "a replaces itself"
        );
        assert_eq!(hub.devices_online("ann"), 2);
        assert!(hub.register("bob", "c", &limits).is_ok());
    }
}
