//! Presence: who is online, when each user was last seen, and who hears of changes.
//!
//! **Sources.** A user's first device connecting to this server (or polling) and
//! its last one going away mark the user *changed*. The last-seen time is noted at
//! both moments (and on every long-poll) and written to the store with the next
//! publication and at shutdown, so it survives restarts; a crash loses at most
//! one presence interval of it.
//! A connection that stops answering the server's heartbeat pings is closed after
//! the idle timeout, which counts as going away.
//!
//! **Audience.** A change goes to the user's contacts (the current members of the
//! conversations the user is a current member of) and to the users who asked to
//! watch them (the `presence` request), on every server.
//!
//! **Coalescing (the bound on events).** Changed users are collected in a set and
//! published once per presence interval, with their state read at that moment. So
//! however often a user's devices flap, this server publishes at most one event
//! per user per interval. Each session coalesces again: it writes at most one
//! `presence` frame per interval, holding at most one state (the latest) per user.
//! In a 500-member group whose members all churn continuously, a server publishes
//! at most 500 events per interval (instead of 500 × 499 frames per round of
//! churn), and each member's connection receives at most one frame per interval.
//! A connection's frames go out at its own phase of the interval
//! (`PresenceSlots` in `service/feed.rs`): when 2,000 members come online together,
//! their frames are spread over the interval rather than written (and read) at
//! once, so the messages sent meanwhile do not wait behind that burst.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

/// What this server knows of presence that is not in the store or the fabric.
#[derive(Default)]
pub struct Presence {
    /// Users whose state may have changed since the last publication.
    changed: Mutex<BTreeSet<String>>,
    /// One node only (no fabric): target → watcher → subscription expiry (ms).
    local_watchers: Mutex<HashMap<String, BTreeMap<String, u64>>>,
    /// Last-seen times not yet written to the store, the latest per user.
    seen: Mutex<BTreeMap<String, u64>>,
}

/// Local subscriptions beyond this many (target, watcher) pairs are refused
/// until expired ones are pruned.
pub const LOCAL_WATCHES_MAX: usize = 1_000_000;

impl Presence {
    /// Marks `user` for the next publication.
    pub fn mark_changed(&self, user: &str) {
        self.changed
            .lock()
            .expect("presence lock")
            .insert(user.to_owned());
    }

    /// Takes every user marked since the last call.
    pub fn take_changed(&self) -> Vec<String> {
        let mut changed = self.changed.lock().expect("presence lock");
        std::mem::take(&mut *changed).into_iter().collect()
    }

    /// Notes that `user` was seen at `at_ms` (written with the next publication).
    pub fn seen(&self, user: &str, at_ms: u64) {
        let mut seen = self.seen.lock().expect("presence lock");
        let at = seen.entry(user.to_owned()).or_default();
        *at = (*at).max(at_ms);
    }

    /// Takes the last-seen times noted since the last call.
    pub fn take_seen(&self) -> Vec<(String, u64)> {
        let mut seen = self.seen.lock().expect("presence lock");
        std::mem::take(&mut *seen).into_iter().collect()
    }

    /// Subscribes `watcher` to `targets` until `expires_ms` (one node only).
    /// False, and nothing changed, when the subscriptions would exceed
    /// [`LOCAL_WATCHES_MAX`] even after dropping the expired ones.
    pub fn watch_locally(
        &self,
        watcher: &str,
        targets: &[String],
        now_ms: u64,
        expires_ms: u64,
    ) -> bool {
        let mut watchers = self.local_watchers.lock().expect("presence lock");
        let count = |w: &HashMap<String, BTreeMap<String, u64>>| {
            w.values().map(BTreeMap::len).sum::<usize>()
        };
        if count(&watchers) + targets.len() > LOCAL_WATCHES_MAX {
            watchers.retain(|_, of_target| {
                of_target.retain(|_, expires| *expires > now_ms);
                !of_target.is_empty()
            });
            if count(&watchers) + targets.len() > LOCAL_WATCHES_MAX {
                return false;
            }
        }
        for target in targets {
            watchers
                .entry(target.clone())
                .or_default()
                .insert(watcher.to_owned(), expires_ms);
        }
        true
    }

    /// The unexpired watchers of `target` (one node only); forgets expired ones.
    pub fn local_watchers(&self, target: &str, now_ms: u64) -> Vec<String> {
        let mut watchers = self.local_watchers.lock().expect("presence lock");
        let Some(of_target) = watchers.get_mut(target) else {
            return Vec::new();
        };
        of_target.retain(|_, expires_ms| *expires_ms > now_ms);
        let found = of_target.keys().cloned().collect();
        if of_target.is_empty() {
            watchers.remove(target);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many marks of one user between two publications make one change.
    #[test]
    fn marks_coalesce_per_user() {
        let presence = Presence::default();
        for _ in 0..100 {
            presence.mark_changed("bob");
            presence.mark_changed("ann");
        }
        assert_eq!(presence.take_changed(), vec!["ann", "bob"]);
        assert!(presence.take_changed().is_empty());
    }

    /// Local subscriptions expire, and expired ones are forgotten.
    #[test]
    fn local_watches_expire() {
        let presence = Presence::default();
        assert!(presence.watch_locally("ann", &["bob".into(), "cid".into()], 0, 1_000));
        assert!(presence.watch_locally("dan", &["bob".into()], 0, 5_000));
        assert_eq!(presence.local_watchers("bob", 500), vec!["ann", "dan"]);
        assert_eq!(presence.local_watchers("bob", 2_000), vec!["dan"]);
        assert!(presence.local_watchers("cid", 2_000).is_empty());
        assert!(
            presence.local_watchers("cid", 0).is_empty(),
            "forgotten once expired"
        );
    }
}
