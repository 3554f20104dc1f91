//! The checks every [`Store`] must pass. Each takes one or more handles on the
//! same storage (for a shared backend: one per simulated chat server) and uses
//! fresh ids, so backends may keep data between cases.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chatproof_server::domain::GroupChange;
use chatproof_server::protocol::{Body, ErrorCode, MemberAction};
use chatproof_server::store::shared::{SharedStore, Tables};
use chatproof_server::store::{NewMessage, Store, StoreError};

/// Base server time of every case (2026-11-28).
pub const NOW_MS: u64 = 1_795_000_000_000;

/// A prefix no other case or run used.
pub fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "{tag}{}x{}x{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A text message.
pub fn text(conv: &str, sender: &str, message_id: &str) -> NewMessage {
    NewMessage {
        conv: conv.to_owned(),
        sender: sender.to_owned(),
        sender_device: "d1".to_owned(),
        message_id: message_id.to_owned(),
        body: Body::Text {
            text: format!("hello from {sender}: {message_id}"),
        },
    }
}

fn code(err: StoreError) -> ErrorCode {
    match err {
        StoreError::Rejected(e) => e.code,
        StoreError::Backend(why) => panic!("backend failure: {why}"),
    }
}

/// A group `g:<unique>` owned by `<p>a` with members `<p>b`, `<p>c`; returns (conv, users).
pub async fn group(store: &dyn Store, tag: &str) -> (String, [String; 3]) {
    let p = unique(tag);
    let conv = format!("g:{p}");
    let users = [format!("{p}a"), format!("{p}b"), format!("{p}c")];
    let (state, created) = store
        .create_group(&conv, &users[0], "d1", users[1..].to_vec(), 500, NOW_MS)
        .await
        .expect("create group");
    assert_eq!(state.last_seq, 1);
    let created = created.expect("a new group sequences its create entry");
    assert_eq!(created.entry.seq, 1);
    assert!(matches!(
        created.entry.body,
        Body::Members {
            action: MemberAction::Create,
            ..
        }
    ));
    (conv, users)
}

/// Seqs are 1, 2, 3, ... with times that never decrease; reads in both
/// directions, with limits and across time buckets, return them in order.
pub async fn sequences_without_holes_and_reads_both_ways(stores: &[Arc<dyn Store>]) {
    let store = &*stores[0];
    let (conv, users) = group(store, "seq").await;
    // Times jump by 5 days and once go back: buckets are crossed, times never decrease.
    let mut times = Vec::new();
    for i in 0..12u64 {
        let now = if i == 6 {
            NOW_MS
        } else {
            NOW_MS + i * 5 * 24 * 3600 * 1000
        };
        let sender = &users[(i % 3) as usize];
        let a = store
            .append(text(&conv, sender, &format!("m{i}")), now)
            .await
            .expect("append");
        assert!(!a.duplicate);
        assert_eq!(
            a.entry.seq,
            i + 2,
            "seqs follow the create entry without holes"
        );
        times.push(a.entry.server_time_ms);
        assert_eq!(a.recipients.len(), 3);
    }
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "times {times:?}");
    let all = store.read_after(&conv, 0, 13, 100).await.expect("read");
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=13).collect::<Vec<_>>());
    let page = store.read_after(&conv, 3, 13, 4).await.expect("page");
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5, 6, 7]);
    let capped = store.read_after(&conv, 10, 12, 100).await.expect("until");
    assert_eq!(capped.iter().map(|e| e.seq).collect::<Vec<_>>(), [11, 12]);
    let open_ended = store.read_after(&conv, 10, u64::MAX, 100).await;
    let open_ended = open_ended.expect("streams read until u64::MAX");
    assert_eq!(
        open_ended.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [11, 12, 13]
    );
    let from_top = store.read_before(&conv, u64::MAX, 2).await.expect("top");
    assert_eq!(from_top.iter().map(|e| e.seq).collect::<Vec<_>>(), [12, 13]);
    let newest = store.read_before(&conv, 14, 3).await.expect("before");
    assert_eq!(
        newest.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [11, 12, 13]
    );
    let older = store.read_before(&conv, 9, 5).await.expect("older");
    assert_eq!(
        older.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [4, 5, 6, 7, 8]
    );
    let oldest = store.read_before(&conv, 3, 10).await.expect("oldest");
    assert_eq!(oldest.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(store.read_before(&conv, 1, 10).await.unwrap().is_empty());
    let senders = store
        .senders_between(&conv, 1, 4, 10)
        .await
        .expect("senders");
    assert_eq!(senders.len(), 3, "three distinct senders in 2..=4");
    let state = store.conversation(&conv).await.unwrap().expect("exists");
    assert_eq!(state.last_seq, 13);
    assert!(store.conversation("g:nope-never").await.unwrap().is_none());
}

/// A repeated (conv, sender, message_id) returns the original; nothing new is written.
pub async fn retries_return_the_original(stores: &[Arc<dyn Store>]) {
    let (conv, users) = group(&*stores[0], "retry").await;
    let first = stores[0]
        .append(text(&conv, &users[1], "same"), NOW_MS)
        .await
        .unwrap();
    stores[0]
        .append(text(&conv, &users[2], "other"), NOW_MS)
        .await
        .unwrap();
    for store in stores {
        let again = store
            .append(text(&conv, &users[1], "same"), NOW_MS + 1000)
            .await
            .unwrap();
        assert!(again.duplicate);
        assert_eq!(again.entry, first.entry, "the original, unchanged");
    }
    // The same id from another sender is another message.
    let theirs = stores[0]
        .append(text(&conv, &users[2], "same"), NOW_MS)
        .await
        .unwrap();
    assert!(!theirs.duplicate);
    assert_eq!(theirs.entry.seq, 4);
    let outsider = stores[0]
        .append(text(&conv, "stranger", "x"), NOW_MS)
        .await
        .unwrap_err();
    assert_eq!(code(outsider), ErrorCode::NotMember);
    let unknown = stores[0]
        .append(text("g:does-not-exist", &users[0], "x"), NOW_MS)
        .await
        .unwrap_err();
    assert_eq!(code(unknown), ErrorCode::UnknownConversation);
    let state = stores[0].conversation(&conv).await.unwrap().unwrap();
    assert_eq!(state.last_seq, 4, "rejections and duplicates write nothing");
}

/// Many writers (on every handle at once) get distinct seqs without holes.
pub async fn concurrent_appends_get_distinct_gap_free_seqs(stores: &[Arc<dyn Store>]) {
    const PER_WRITER: usize = 15;
    let (conv, users) = group(&*stores[0], "race").await;
    let mut tasks = Vec::new();
    for (w, store) in stores.iter().cycle().take(4).enumerate() {
        let (store, conv, sender) = (Arc::clone(store), conv.clone(), users[w % 3].clone());
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..PER_WRITER {
                let a = store
                    .append(text(&conv, &sender, &format!("w{w}-{i}")), NOW_MS)
                    .await
                    .expect("append");
                seqs.push(a.entry.seq);
            }
            seqs
        }));
    }
    let mut seen = BTreeSet::new();
    for task in tasks {
        let seqs = task.await.expect("writer");
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one writer's order");
        for seq in seqs {
            assert!(seen.insert(seq), "seq {seq} given twice");
        }
    }
    let total = 4 * PER_WRITER as u64;
    assert_eq!(seen, (2..=total + 1).collect::<BTreeSet<_>>());
    let entries = stores[0]
        .read_after(&conv, 0, total + 1, 1000)
        .await
        .unwrap();
    assert_eq!(entries.len() as u64, total + 1);
    let ids: BTreeSet<&str> = entries.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids.len() as u64, total + 1, "every message once");
}

/// The same message sent at once through every handle is sequenced once.
pub async fn concurrent_retries_create_one_message(stores: &[Arc<dyn Store>]) {
    let (conv, users) = group(&*stores[0], "dup").await;
    for round in 0..5 {
        let mut tasks = Vec::new();
        for store in stores.iter().cycle().take(4) {
            let (store, conv, sender) = (Arc::clone(store), conv.clone(), users[1].clone());
            tasks.push(tokio::spawn(async move {
                store
                    .append(text(&conv, &sender, &format!("r{round}")), NOW_MS)
                    .await
                    .expect("append")
            }));
        }
        let mut seqs = BTreeSet::new();
        let mut originals = 0;
        for task in tasks {
            let a = task.await.unwrap();
            seqs.insert(a.entry.seq);
            originals += usize::from(!a.duplicate);
        }
        assert_eq!(seqs.len(), 1, "round {round}: one seq, got {seqs:?}");
        assert_eq!(originals, 1, "round {round}: exactly one original");
    }
    let state = stores[0].conversation(&conv).await.unwrap().unwrap();
    assert_eq!(state.last_seq, 6);
}

/// Membership changes take a place in the order and change who may write and read.
pub async fn membership_changes_are_entries(stores: &[Arc<dyn Store>]) {
    let store = &*stores[0];
    let (conv, users) = group(store, "members").await;
    let newcomer = format!("{}d", &users[0]);
    let added = stores[stores.len() - 1]
        .change_members(
            &conv,
            &users[1],
            "d1",
            GroupChange::Add(vec![newcomer.clone()]),
            500,
            NOW_MS,
        )
        .await
        .expect("add");
    assert_eq!(added.entry.seq, 2);
    assert!(added.recipients.contains(&newcomer));
    store
        .append(text(&conv, &newcomer, "hi"), NOW_MS)
        .await
        .expect("a new member may send");
    let removed = store
        .change_members(
            &conv,
            &users[0],
            "d1",
            GroupChange::Remove(vec![users[2].clone()]),
            500,
            NOW_MS,
        )
        .await
        .expect("owner removes");
    assert_eq!(removed.entry.seq, 4);
    assert!(
        removed.recipients.contains(&users[2]),
        "the removed member hears of it"
    );
    let refused = store
        .append(text(&conv, &users[2], "late"), NOW_MS)
        .await
        .unwrap_err();
    assert_eq!(code(refused), ErrorCode::NotMember);
    let not_owner = store
        .change_members(
            &conv,
            &users[1],
            "d1",
            GroupChange::Remove(vec![users[0].clone()]),
            500,
            NOW_MS,
        )
        .await
        .unwrap_err();
    assert_eq!(code(not_owner), ErrorCode::Forbidden);
    for user in [&users[2], &newcomer] {
        let convs = store.conversations_of(user).await.unwrap();
        assert!(
            convs.iter().any(|c| c.record.id == conv && c.last_seq == 4),
            "{user} sees the group (current or former member)"
        );
    }
    let direct = store
        .open_direct(&users[0], "d1", &users[1], NOW_MS)
        .await
        .expect("direct");
    assert!(direct.1.is_some(), "created");
    let again = stores[stores.len() - 1]
        .open_direct(&users[1], "d1", &users[0], NOW_MS)
        .await
        .expect("direct again");
    assert!(again.1.is_none(), "found, not created twice");
    assert_eq!(again.0.record.id, direct.0.record.id);
    let exists = store
        .create_group(&conv, &users[1], "d1", vec![], 500, NOW_MS)
        .await
        .unwrap_err();
    assert_eq!(code(exists), ErrorCode::ConversationExists);
}

/// Acks move cursors forward only, never past the last entry, and user and
/// all-member cursors follow.
pub async fn cursors_never_move_back(stores: &[Arc<dyn Store>]) {
    let store = &*stores[0];
    let (conv, users) = group(store, "cursor").await;
    for i in 0..5 {
        store
            .append(text(&conv, &users[0], &format!("m{i}")), NOW_MS)
            .await
            .unwrap();
    }
    let last = &*stores[stores.len() - 1];
    let u = &users[1];
    let up = store.ack(&conv, u, "phone", Some(4), None).await.unwrap();
    assert_eq!((up.device.delivered, up.device.read), (4, 0));
    assert_eq!((up.user_before.delivered, up.user_after.delivered), (0, 4));
    assert_eq!(
        up.all_members.unwrap().delivered,
        0,
        "others have not acked"
    );
    let stale = last.ack(&conv, u, "phone", Some(2), None).await.unwrap();
    assert_eq!(stale.device.delivered, 4, "a stale ack does not regress");
    let read = last.ack(&conv, u, "laptop", None, Some(6)).await.unwrap();
    assert_eq!((read.device.delivered, read.device.read), (6, 6));
    assert_eq!((read.user_after.delivered, read.user_after.read), (6, 6));
    let phone = store.ack(&conv, u, "phone", Some(5), None).await.unwrap();
    assert_eq!(phone.device.delivered, 5);
    assert_eq!(
        (phone.user_before, phone.user_after),
        (read.user_after, read.user_after),
        "the user cursor is the maximum over devices"
    );
    // Every store (every server) reads the user cursor as the last ack left it, and
    // a user who never acknowledged reads as zero.
    for s in stores {
        let cursor = s.user_cursor(&conv, u).await.unwrap();
        assert_eq!((cursor.delivered, cursor.read), (6, 6));
        let none = s.user_cursor(&conv, &users[2]).await.unwrap();
        assert_eq!((none.delivered, none.read), (0, 0));
        // All of the conversation's cursors at once: only users who acknowledged.
        let all = s.user_cursors(&conv).await.unwrap();
        let listed: Vec<(&str, u64, u64)> = all
            .iter()
            .map(|(user, c)| (user.as_str(), c.delivered, c.read))
            .collect();
        assert_eq!(listed, [(u.as_str(), 6, 6)], "{all:?}");
    }
    let ahead = store
        .ack(&conv, u, "phone", Some(7), None)
        .await
        .unwrap_err();
    assert_eq!(code(ahead), ErrorCode::CursorAhead);
    for other in [&users[0], &users[2]] {
        store
            .ack(&conv, other, "d1", Some(6), Some(3))
            .await
            .unwrap();
    }
    let all = store
        .ack(&conv, &users[0], "d1", Some(6), Some(3))
        .await
        .unwrap();
    let all = all.all_members.expect("groups report all members");
    assert_eq!((all.delivered, all.read), (6, 3));
    let stored = last
        .device_cursor(u, "phone", &conv)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!((stored.delivered, stored.read), (5, 0));
    assert!(last
        .device_cursor(u, "never", &conv)
        .await
        .unwrap()
        .is_none());
    let stranger = store
        .ack(&conv, "stranger", "d1", Some(1), None)
        .await
        .unwrap_err();
    assert_eq!(code(stranger), ErrorCode::NotMember);
}

/// A server that dies between the conditional write and the roll-forward leaves
/// its entry only in the head row: readers still see it, a retry finds it, and
/// the next writer (on another server) rolls it forward before moving on.
pub async fn crash_between_sequencing_and_roll_forward<T: Tables + ?Sized>(
    crashing: &SharedStore<T>,
    survivor: &SharedStore<T>,
) {
    let (conv, users) = group(survivor, "crash").await;
    crashing.inject_crash_after_sequencing();
    let died = crashing
        .append(text(&conv, &users[1], "in-flight"), NOW_MS)
        .await
        .unwrap_err();
    assert!(matches!(died, StoreError::Backend(_)), "{died:?}");
    // The entry is durable (seq 2) though never rolled forward.
    let state = survivor.conversation(&conv).await.unwrap().unwrap();
    assert_eq!(state.last_seq, 2);
    let seen = survivor.read_after(&conv, 0, 2, 10).await.unwrap();
    assert_eq!(seen.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(seen[1].message_id, "in-flight");
    let newest = survivor.read_before(&conv, 3, 10).await.unwrap();
    assert_eq!(newest.len(), 2);
    // The client retries on the other server: the original comes back.
    let retry = survivor
        .append(text(&conv, &users[1], "in-flight"), NOW_MS)
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.entry.seq, 2);
    // Crash again, then another message moves past the un-rolled head.
    crashing.inject_crash_after_sequencing();
    crashing
        .append(text(&conv, &users[2], "second"), NOW_MS)
        .await
        .unwrap_err();
    let next = survivor
        .append(text(&conv, &users[0], "third"), NOW_MS)
        .await
        .unwrap();
    assert_eq!(next.entry.seq, 4);
    let again = survivor
        .append(text(&conv, &users[2], "second"), NOW_MS)
        .await
        .unwrap();
    assert!(
        again.duplicate,
        "found through the index after roll-forward"
    );
    assert_eq!(again.entry.seq, 3);
    let all = crashing.read_after(&conv, 0, 4, 10).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
}

/// Last seen is a max-register per user, readable from every handle; unknown users read as never seen.
pub async fn last_seen_only_rises(stores: &[Arc<dyn Store>]) {
    let first = &*stores[0];
    let last = &*stores[stores.len() - 1];
    let (ann, bob, nobody) = (
        format!("ann{}", NOW_MS % 997),
        format!("bob{}", NOW_MS % 991),
        "never-seen-user".to_owned(),
    );
    first.record_last_seen(&ann, NOW_MS + 5).await.unwrap();
    last.record_last_seen(&ann, NOW_MS + 3).await.unwrap();
    first.record_last_seen(&bob, NOW_MS).await.unwrap();
    last.record_last_seen(&bob, NOW_MS + 9).await.unwrap();
    let users = [ann, bob, nobody];
    for store in stores {
        let seen = store.last_seen(&users).await.unwrap();
        assert_eq!(seen, vec![Some(NOW_MS + 5), Some(NOW_MS + 9), None]);
    }
}
