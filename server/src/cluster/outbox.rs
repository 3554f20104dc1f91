//! Events the fabric could not take yet, kept and retried until it does, so that
//! a send is acknowledged once it is durable whether or not the router can be
//! reached at that moment.
//!
//! While anything waits here, new events join the queue without trying the
//! router first (a send never waits on a router that is known to be down), and
//! the retry loop ([`Outbox::retry`], every [`RETRY_EVERY`]) hands them over,
//! the slot changed longest ago first, stopping at the first failure.
//!
//! A later event supersedes an earlier one of the same slot, which keeps the
//! outbox as small as the set of things that changed rather than the number of
//! events:
//! - the newest entry of a conversation: devices fill the seqs before it from the
//!   store (entries whose recipients differ, around a membership change, are kept
//!   apart, so an entry never reaches a user it was not for);
//! - the newest receipt of one reader in one conversation (receipts are state);
//! - the newest presence of one user.
//!
//! The outbox holds at most its capacity in slots; past that, [`Outbox::forward`]
//! fails and the caller answers as it did before there was an outbox (a send:
//! `internal`, retry).
//!
//! What it cannot cover alone: this server dying with events still queued.
//! Other servers cover that by re-reading their sessions when a peer dies
//! (see [`super::Fabric`] implementations: a lapsed peer lease triggers
//! [`super::resync_sessions`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Fabric, FabricError, Forwarded, Routed};
use crate::metrics::FabricCounters;
use crate::protocol::Entry;

/// How often queued events are offered to the router again.
pub const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Slots an outbox holds by default (conversations, readers and users with
/// something unrouted).
pub const CAPACITY_DEFAULT: usize = 100_000;

/// What [`Outbox::forward`] did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// The router took it now.
    Now(Forwarded),
    /// Queued: the retry loop hands it over once the router takes events again.
    Later,
}

/// What an outbox slot is about: a later event of the same slot supersedes an earlier one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Entries { conv: String },
    Receipt { conv: String, reader: String },
    Presence { user: String },
}

impl Slot {
    fn of(event: &Routed) -> Self {
        match event {
            Routed::Entry(e) => Slot::Entries {
                conv: e.conv.clone(),
            },
            Routed::Receipt(r) => Slot::Receipt {
                conv: r.conv.clone(),
                reader: r.user.clone(),
            },
            Routed::Presence(p) => Slot::Presence {
                user: p.user.clone(),
            },
        }
    }
}

/// One event waiting, with the users it is for.
#[derive(Debug, Clone)]
struct Waiting {
    users: Arc<[String]>,
    event: Routed,
}

/// What waits in one slot; `version` changes with every event the slot takes,
/// so a retry removes only what it handed over.
#[derive(Debug, Clone)]
struct Pending {
    version: u64,
    /// Oldest first; more than one only for entries with different recipients.
    waiting: Vec<Waiting>,
}

#[derive(Debug, Default)]
struct Queue {
    slots: BTreeMap<Slot, Pending>,
    /// The version the next queued event gives its slot.
    next_version: u64,
}

/// Events waiting for the router; see the module documentation.
pub struct Outbox {
    fabric: Arc<dyn Fabric>,
    queue: Mutex<Queue>,
    capacity: usize,
    counters: FabricCounters,
}

fn newer(entry: &Entry, than: &Entry) -> bool {
    entry.seq > than.seq
}

impl Outbox {
    /// An empty outbox in front of `fabric`, holding at most `capacity` slots.
    pub fn new(fabric: Arc<dyn Fabric>, capacity: usize, counters: FabricCounters) -> Self {
        assert!(capacity > 0, "an outbox needs room for one slot");
        Self {
            fabric,
            queue: Mutex::new(Queue::default()),
            capacity,
            counters,
        }
    }

    /// Slots waiting now.
    pub fn len(&self) -> usize {
        self.queue.lock().expect("outbox").slots.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands `event` for `users` to the router, or queues it when the router
    /// fails or events already wait. An error only when the outbox is full
    /// (nothing was queued).
    pub async fn forward(
        &self,
        users: Arc<[String]>,
        event: Routed,
    ) -> Result<Routing, FabricError> {
        if self.is_empty() {
            match self.fabric.forward(Arc::clone(&users), event.clone()).await {
                Ok(forwarded) => return Ok(Routing::Now(forwarded)),
                Err(e) => {
                    crate::warn_throttled!(error = %e, "the router did not take an event; queued to retry");
                }
            }
        }
        self.queue(users, event)?;
        Ok(Routing::Later)
    }

    /// Queues `event`, merged into its slot.
    fn queue(&self, users: Arc<[String]>, event: Routed) -> Result<(), FabricError> {
        let slot = Slot::of(&event);
        tracing::debug!(?slot, "queued for the router");
        let mut q = self.queue.lock().expect("outbox");
        if !q.slots.contains_key(&slot) && q.slots.len() >= self.capacity {
            drop(q);
            self.counters.dropped.inc();
            return Err(FabricError(format!(
                "the router is unreachable and {} events already wait for it",
                self.capacity
            )));
        }
        q.next_version += 1;
        let version = q.next_version;
        let pending = q.slots.entry(slot).or_insert_with(|| Pending {
            version,
            waiting: Vec::new(),
        });
        pending.version = version;
        merge(&mut pending.waiting, Waiting { users, event });
        self.counters.queued.inc();
        self.counters.waiting.set(gauge_value(q.slots.len()));
        Ok(())
    }

    /// Offers every waiting event to the router, the slot changed longest ago first, and stops at
    /// the first failure. Calls `routed` for each entry the router took (with what
    /// it learnt, for push notifications). Returns how many slots it emptied.
    pub async fn retry(&self, mut routed: impl FnMut(&Arc<Entry>, &[String], &Forwarded)) -> usize {
        let mut batch: Vec<(Slot, Pending)> = {
            let q = self.queue.lock().expect("outbox");
            q.slots
                .iter()
                .map(|(s, p)| (s.clone(), p.clone()))
                .collect()
        };
        batch.sort_by_key(|(_, p)| p.version);
        let mut emptied = 0;
        for (slot, pending) in batch {
            for waiting in &pending.waiting {
                match self
                    .fabric
                    .forward(Arc::clone(&waiting.users), waiting.event.clone())
                    .await
                {
                    Ok(forwarded) => {
                        if let Routed::Entry(entry) = &waiting.event {
                            routed(entry, &waiting.users, &forwarded);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "the router still takes no events");
                        return emptied;
                    }
                }
            }
            let mut q = self.queue.lock().expect("outbox");
            if q.slots
                .get(&slot)
                .is_some_and(|p| p.version == pending.version)
            {
                q.slots.remove(&slot);
                emptied += 1;
                self.counters.retried.inc_by(pending.waiting.len() as u64);
                self.counters.waiting.set(gauge_value(q.slots.len()));
            }
        }
        emptied
    }
}

fn gauge_value(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

/// Adds `new` to a slot's waiting events: it replaces the newest one when it
/// supersedes it, else it is kept after it.
fn merge(waiting: &mut Vec<Waiting>, new: Waiting) {
    let Some(last) = waiting.last_mut() else {
        waiting.push(new);
        return;
    };
    match (&last.event, &new.event) {
        (Routed::Entry(old), Routed::Entry(entry)) => {
            if !newer(entry, old) {
                // A retry of an entry already waiting (or older): nothing new to route.
                return;
            }
            if last.users == new.users {
                *last = new;
            } else {
                waiting.push(new);
            }
        }
        // State, not history: one event for everyone either was for. A receipt keeps
        // the greater of each cursor (one computed from an older read may come
        // later); presence, the newest.
        (Routed::Receipt(_), Routed::Receipt(_)) | (Routed::Presence(_), Routed::Presence(_)) => {
            let users: BTreeSet<&String> = last.users.iter().chain(new.users.iter()).collect();
            let users: Arc<[String]> = users.into_iter().cloned().collect();
            let event = match (&last.event, new.event) {
                (Routed::Receipt(old), Routed::Receipt(r)) => {
                    Routed::Receipt(Arc::new(old.merged(&r)))
                }
                (_, event) => event,
            };
            *last = Waiting { users, event };
        }
        _ => unreachable!("a slot holds one kind of event"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::protocol::{Body, PresenceState, Receipt};

    /// A router that fails while `down` is set and records what it took.
    #[derive(Default)]
    struct FakeRouter {
        down: AtomicBool,
        took: Mutex<Vec<(Vec<String>, String)>>,
    }

    fn describe(event: &Routed) -> String {
        match event {
            Routed::Entry(e) => format!("entry {} {}", e.conv, e.seq),
            Routed::Receipt(r) => format!("receipt {} {} {}", r.conv, r.user, r.read),
            Routed::Presence(p) => format!("presence {} {}", p.user, p.online),
        }
    }

    #[async_trait]
    impl Fabric for FakeRouter {
        fn server_id(&self) -> &str {
            "s1"
        }
        async fn device_connected(&self, _: &str, _: &str) -> Result<(), FabricError> {
            Ok(())
        }
        async fn device_disconnected(&self, _: &str, _: &str) -> crate::cluster::LateSweep {
            Box::pin(async { false })
        }
        async fn forward(
            &self,
            users: Arc<[String]>,
            event: Routed,
        ) -> Result<Forwarded, FabricError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(FabricError("down".into()));
            }
            self.took
                .lock()
                .unwrap()
                .push((users.to_vec(), describe(&event)));
            Ok(Forwarded::default())
        }
        async fn online_users(&self, users: &[String]) -> Result<Vec<bool>, FabricError> {
            Ok(vec![false; users.len()])
        }
        async fn watch(&self, _: &str, _: &[String]) -> Result<(), FabricError> {
            Ok(())
        }
        async fn watchers(&self, _: &str) -> Result<Vec<String>, FabricError> {
            Ok(Vec::new())
        }
    }

    fn entry(conv: &str, seq: u64) -> Routed {
        Routed::Entry(Arc::new(Entry {
            conv: conv.into(),
            seq,
            sender: "a".into(),
            sender_device: "d".into(),
            message_id: format!("m{seq}"),
            server_time_ms: seq,
            body: Body::Text { text: "x".into() },
        }))
    }

    fn receipt(conv: &str, user: &str, read: u64) -> Routed {
        Routed::Receipt(Arc::new(Receipt {
            conv: conv.into(),
            user: user.into(),
            delivered: read,
            read,
            all_delivered: None,
            all_read: None,
        }))
    }

    fn users(names: &[&str]) -> Arc<[String]> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn outbox(capacity: usize) -> (Arc<FakeRouter>, Outbox, FabricCounters) {
        let router = Arc::new(FakeRouter::default());
        let counters = FabricCounters::default();
        let fabric: Arc<dyn Fabric> = Arc::clone(&router) as Arc<dyn Fabric>;
        (
            router,
            Outbox::new(fabric, capacity, counters.clone()),
            counters,
        )
    }

    fn took(router: &FakeRouter) -> Vec<String> {
        router
            .took
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_healthy_router_takes_events_at_once() {
        let (router, outbox, _) = outbox(4);
        let routing = outbox.forward(users(&["b"]), entry("c", 1)).await.unwrap();
        assert_eq!(routing, Routing::Now(Forwarded::default()));
        assert!(outbox.is_empty());
        assert_eq!(took(&router), ["entry c 1"]);
    }

    #[tokio::test]
    async fn while_the_router_is_down_events_wait_and_the_newest_per_slot_is_handed_over() {
        let (router, outbox, counters) = outbox(8);
        router.down.store(true, Ordering::SeqCst);
        for seq in 1..=3 {
            let routing = outbox
                .forward(users(&["b"]), entry("c", seq))
                .await
                .unwrap();
            assert_eq!(routing, Routing::Later);
        }
        // A retry of seq 2 supersedes nothing.
        outbox.forward(users(&["b"]), entry("c", 2)).await.unwrap();
        outbox
            .forward(users(&["b"]), receipt("c", "b", 1))
            .await
            .unwrap();
        outbox
            .forward(users(&["x"]), receipt("c", "b", 3))
            .await
            .unwrap();
        // A receipt computed from an older read, queued last, takes nothing back.
        outbox
            .forward(users(&["b"]), receipt("c", "b", 2))
            .await
            .unwrap();
        assert_eq!(outbox.len(), 2);
        assert_eq!(outbox.retry(|_, _, _| {}).await, 0, "still down");
        assert!(took(&router).is_empty());

        router.down.store(false, Ordering::SeqCst);
        // Events already waiting: a new one queues behind them, it does not jump ahead.
        assert_eq!(
            outbox.forward(users(&["b"]), entry("d", 1)).await.unwrap(),
            Routing::Later
        );
        let mut entries = Vec::new();
        assert_eq!(outbox.retry(|e, _, _| entries.push(e.seq)).await, 3);
        assert!(outbox.is_empty());
        assert_eq!(took(&router), ["entry c 3", "receipt c b 3", "entry d 1"]);
        assert_eq!(entries, [3, 1]);
        let receipt_users = router.took.lock().unwrap()[1].0.clone();
        assert_eq!(
            receipt_users,
            ["b", "x"],
            "a merged receipt reaches both audiences"
        );
        assert_eq!(counters.queued.get(), 8);
        assert_eq!(counters.waiting.get(), 0);
    }

    #[tokio::test]
    async fn entries_for_different_recipients_are_kept_apart() {
        let (router, outbox, _) = outbox(8);
        router.down.store(true, Ordering::SeqCst);
        outbox
            .forward(users(&["b", "r"]), entry("g", 1))
            .await
            .unwrap();
        outbox.forward(users(&["b"]), entry("g", 2)).await.unwrap();
        outbox.forward(users(&["b"]), entry("g", 3)).await.unwrap();
        router.down.store(false, Ordering::SeqCst);
        outbox.retry(|_, _, _| {}).await;
        let took = router.took.lock().unwrap().clone();
        assert_eq!(
            took,
            [
                (vec!["b".to_owned(), "r".to_owned()], "entry g 1".to_owned()),
                (vec!["b".to_owned()], "entry g 3".to_owned()),
            ],
            "the removed member r never gets the entries after its removal"
        );
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_new_slots_and_counts_them() {
        let (router, outbox, counters) = outbox(2);
        router.down.store(true, Ordering::SeqCst);
        outbox.forward(users(&["b"]), entry("c1", 1)).await.unwrap();
        outbox.forward(users(&["b"]), entry("c2", 1)).await.unwrap();
        // Same slot: still fits.
        outbox.forward(users(&["b"]), entry("c2", 2)).await.unwrap();
        let full = outbox.forward(users(&["b"]), entry("c3", 1)).await;
        assert!(full.is_err(), "{full:?}");
        let presence = Routed::Presence(Arc::new(PresenceState {
            user: "b".into(),
            online: true,
            last_seen_ms: None,
        }));
        assert!(outbox.forward(users(&["a"]), presence).await.is_err());
        assert_eq!(counters.dropped.get(), 2);
        assert_eq!(outbox.len(), 2);
    }

    #[tokio::test]
    async fn an_event_queued_during_a_retry_stays_for_the_next() {
        let (router, outbox, _) = outbox(4);
        router.down.store(true, Ordering::SeqCst);
        outbox.forward(users(&["b"]), entry("c", 1)).await.unwrap();
        router.down.store(false, Ordering::SeqCst);
        let mut queued_meanwhile = false;
        let emptied = outbox
            .retry(|_, _, _| {
                if !queued_meanwhile {
                    queued_meanwhile = true;
                    outbox.queue(users(&["b"]), entry("c", 2)).unwrap();
                }
            })
            .await;
        assert_eq!(emptied, 0, "the slot changed while it was handed over");
        assert_eq!(outbox.retry(|_, _, _| {}).await, 1);
        assert_eq!(took(&router), ["entry c 1", "entry c 2"]);
    }
}
