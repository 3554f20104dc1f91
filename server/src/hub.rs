//! The local hub: which devices are connected to this server, and fan-out to them.
//!
//! A pushed frame is serialized once and shared by every receiving device
//! (`Utf8Bytes` is reference-counted). Each device has a bounded queue; a
//! device whose queue is full is dropped (its session closes with
//! `slow_consumer`) rather than letting one slow reader hold memory without bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::protocol::{Entry, PresenceState, ProtocolError, Receipt};

/// Something for one device's session to write.
#[derive(Debug, Clone)]
pub enum Push {
    /// A conversation entry and its pre-serialized `msg` frame.
    Entry(Arc<Entry>, Utf8Bytes),
    /// A receipt and its pre-serialized frame.
    Receipt(Arc<Receipt>, Utf8Bytes),
    /// Presence changes (one or more users); sessions coalesce these into `presence` frames.
    Presence(Arc<[Arc<PresenceState>]>),
    /// Any other pre-serialized frame.
    Frame(Utf8Bytes),
    /// Close the session with this error.
    Close(ProtocolError),
    /// Live events may have been lost (the cluster fabric was interrupted):
    /// re-read every conversation and deliver what is missing.
    Resync,
}

struct DeviceSlot {
    conn_id: u64,
    device: String,
    queue: mpsc::Sender<Push>,
}

/// Registry of connected devices by user, with fan-out.
#[derive(Default)]
pub struct Hub {
    users: Mutex<HashMap<String, Vec<DeviceSlot>>>,
    next_conn_id: AtomicU64,
}

/// A device's place in the hub; pass it back to [`Hub::unregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId(u64);

impl Hub {
    /// Registers `device` of `user`; an older connection of the same device is told
    /// to close. Refused with `too_many_devices` when `user` already has
    /// `devices_max` other devices here.
    pub fn register(
        &self,
        user: &str,
        device: &str,
        queue_len: usize,
        devices_max: usize,
    ) -> Result<(ConnId, mpsc::Receiver<Push>), ProtocolError> {
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
        let (tx, rx) = mpsc::channel(queue_len);
        let conn_id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = again {
            let old = slots.swap_remove(i);
            let _ = old.queue.try_send(Push::Close(ProtocolError::new(
                crate::protocol::ErrorCode::Replaced,
                "this device connected again; this connection is closed",
            )));
        }
        slots.push(DeviceSlot {
            conn_id,
            device: device.to_owned(),
            queue: tx,
        });
        debug_assert!(slots.len() <= devices_max);
        Ok((ConnId(conn_id), rx))
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
    /// are dropped from the hub.
    pub fn publish(&self, users: &[String], push: &Push) -> usize {
        let mut queued = 0;
        let mut users_map = self.users.lock().expect("hub lock");
        for user in users {
            let Some(slots) = users_map.get_mut(user) else {
                continue;
            };
            slots.retain(|slot| match slot.queue.try_send(push.clone()) {
                Ok(()) => {
                    queued += 1;
                    true
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

    /// Every connected `(user, device)`.
    pub fn devices(&self) -> Vec<(String, String)> {
        let users = self.users.lock().expect("hub lock");
        users
            .iter()
            .flat_map(|(user, slots)| slots.iter().map(|s| (user.clone(), s.device.clone())))
            .collect()
    }

    /// Queues `push` for every connected device; returns how many got it.
    pub fn publish_everyone(&self, push: &Push) -> usize {
        let users: Vec<String> = self
            .users
            .lock()
            .expect("hub lock")
            .keys()
            .cloned()
            .collect();
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
