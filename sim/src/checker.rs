//! The checker: holds a run's history to the delivery contract
//! (`docs/GUARANTEES.md`), naming each violation as the contract does
//! ([`chatproof_contract::Violation`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use chatproof_contract::{OrderCheck, Violation};

use crate::history::{CursorAck, DeviceKey, History, PageKind};

/// A conversation of the simulated world: id and member user indexes.
#[derive(Debug, Clone)]
pub struct ConvSpec {
    /// Id.
    pub id: String,
    /// Members.
    pub members: Vec<u32>,
}

/// One broken promise, where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Which promise, named as the contract names it.
    pub violation: Violation,
    /// Conversation.
    pub conv: String,
    /// What exactly (seq, message id, device).
    pub detail: String,
    /// Where it showed: the device it concerns, when one does.
    pub device: Option<DeviceKey>,
    /// When it showed, simulated ms, when one moment does.
    pub t_ms: Option<u64>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}: {}", self.violation, self.conv, self.detail)
    }
}

/// What the checker needs besides the history.
pub struct World<'a> {
    /// Conversations.
    pub convs: &'a [ConvSpec],
    /// Devices of each user.
    pub devices_per_user: &'a [u32],
    /// A delivery slower than this outside fault windows is `slow`.
    pub latency_bound_ms: u64,
    /// How long the servers keep entries (simulated ms; `None`: nothing expires in a
    /// run). An entry may be gone from pages from its retention on, never before.
    pub retention_ms: Option<u64>,
}

/// After a fault ends, the network needs a moment to recover (TCP retransmission
/// backoff, reconnects); deliveries that start within this grace are not `slow`.
pub const FAULT_RECOVERY_GRACE_MS: u64 = 3_000;

/// Beyond the latency bound, how long a receipt may take to reach a sender's device:
/// the server holds receipts up to 50 ms, retries a group floor it could not read
/// every 500 ms, and a long-poll device may be between polls.
pub const RECEIPT_GRACE_MS: u64 = 2_500;

/// How long after the last fault healed the servers may take to notice what it
/// cost them and recover (a lapsed registry lease, a resubscription, a resync).
pub const RECOVERY_MS: u64 = 5_000;

/// The simulated servers' idle timeout (a stalled socket or an unpolled long-poll
/// mailbox counts as gone after it).
pub const IDLE_TIMEOUT_MS: u64 = 10_000;

/// The simulated servers' presence interval (the default).
pub const PRESENCE_INTERVAL_MS: u64 = 1_000;

/// Beyond the idle timeout, how long a user gone away may still be shown online to
/// a connected contact: the mailbox expiry and the presence publication each run
/// once per presence interval, the change is routed, the contact's connection takes
/// presence at most once per interval, and a long-poll contact may be holding a poll
/// (2 s) or asking again after a refusal.
pub const PRESENCE_BOUND_MS: u64 = 6_000;

/// How long after a session starts its `presence` request must have been answered
/// (it is asked on the first tick that the session works, again after a second).
const PRESENCE_ASK_MS: u64 = 3_000;

fn overlaps<'w>(
    faults: impl IntoIterator<Item = &'w crate::history::FaultWindow>,
    devices: &[DeviceKey],
    start: u64,
    end: u64,
) -> bool {
    faults.into_iter().any(|w| {
        w.start_ms <= end
            && start <= w.end_ms + FAULT_RECOVERY_GRACE_MS
            && w.device.is_none_or(|d| devices.contains(&d))
    })
}

/// Each user's visible range `(first seq, last seq)` per conversation: initial
/// members from seq 1; users added from their add entry; anyone removed or gone
/// up to (and including) the entry that removed them. Built from the membership
/// changes acknowledged to their makers and those devices were shown.
pub fn visible_ranges(h: &History, world: &World<'_>) -> HashMap<(String, u32), (u64, u64)> {
    let mut ranges = HashMap::new();
    for c in world.convs {
        for &u in &c.members {
            ranges.insert((c.id.clone(), u), (1, u64::MAX));
        }
    }
    let mut changes: BTreeMap<(String, u64), (String, Vec<u32>)> = BTreeMap::new();
    for m in &h.member_changes {
        changes.insert((m.conv.clone(), m.seq), (m.action.clone(), m.users.clone()));
    }
    for r in &h.received {
        if let Some((action, users)) = &r.members {
            changes.insert((r.conv.clone(), r.seq), (action.clone(), users.clone()));
        }
    }
    let mut by_seq: Vec<_> = changes.into_iter().collect();
    by_seq.sort_by_key(|((_, seq), _)| *seq);
    for ((conv, seq), (action, users)) in by_seq {
        for u in users {
            match action.as_str() {
                "add" => {
                    ranges.insert((conv.clone(), u), (seq, u64::MAX));
                }
                "remove" | "leave" => {
                    if let Some(range) = ranges.get_mut(&(conv.clone(), u)) {
                        range.1 = range.1.min(seq);
                    }
                }
                _ => {}
            }
        }
    }
    ranges
}

/// Checks everything; returns every violation found, sorted by violation,
/// conversation and detail.
pub fn check(h: &History, world: &World<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    // `at`: the device and moment the violation showed, where there is one.
    let mut v =
        |violation: Violation, conv: &str, at: (Option<DeviceKey>, Option<u64>), detail: String| {
            out.push(Finding {
                violation,
                conv: conv.to_owned(),
                detail,
                device: at.0,
                t_ms: at.1,
            })
        };
    let ranges = visible_ranges(h, world);
    let range_of = |conv: &str, user: u32| ranges.get(&(conv.to_owned(), user)).copied();
    let sent: HashMap<(&str, &str), &crate::history::Sent> = h
        .sent
        .iter()
        .map(|s| ((s.conv.as_str(), s.message_id.as_str()), s))
        .collect();

    // Order per device: gap-free, once, in seq order.
    let mut orders: HashMap<DeviceKey, OrderCheck> = HashMap::new();
    let mut held: HashMap<(DeviceKey, &str), BTreeSet<u64>> = HashMap::new();
    let mut at_seq: HashMap<(&str, u64), &str> = HashMap::new();
    let mut seqs_of_id: HashMap<(&str, &str), BTreeSet<u64>> = HashMap::new();
    for r in &h.received {
        let key = (r.device, r.conv.as_str());
        let Some((start, end)) =
            range_of(&r.conv, r.device.0).filter(|(s, e)| (*s..=*e).contains(&r.seq))
        else {
            v(
                Violation::Phantom,
                &r.conv,
                (Some(r.device), Some(r.t_ms)),
                format!(
                    "device {:?} got seq {} of a conversation it was not in at that seq",
                    r.device, r.seq
                ),
            );
            continue;
        };
        debug_assert!(start <= end);
        if !r.system && !sent.contains_key(&(r.conv.as_str(), r.message_id.as_str())) {
            v(
                Violation::Phantom,
                &r.conv,
                (Some(r.device), Some(r.t_ms)),
                format!(
                    "device {:?} got seq {} ({}) that no client sent",
                    r.device, r.seq, r.message_id
                ),
            );
        }
        match at_seq.get(&(r.conv.as_str(), r.seq)) {
            Some(other) if *other != r.message_id => {
                v(
                    Violation::Conflict,
                    &r.conv,
                    (Some(r.device), Some(r.t_ms)),
                    format!(
                        "seq {} is {} on one device and {} on {:?}",
                        r.seq, other, r.message_id, r.device
                    ),
                );
            }
            _ => {
                at_seq.insert((r.conv.as_str(), r.seq), &r.message_id);
            }
        }
        if !r.system {
            seqs_of_id
                .entry((r.conv.as_str(), r.message_id.as_str()))
                .or_default()
                .insert(r.seq);
        }
        let order = orders.entry(r.device).or_default();
        if let Err(fault) = order.observe_from(&r.conv, r.seq, start) {
            let device = format!("device {:?}", r.device);
            v(
                fault.violation,
                &r.conv,
                (Some(r.device), Some(r.t_ms)),
                fault.describe(&device, &r.conv, r.seq),
            );
        }
        held.entry(key).or_default().insert(r.seq);
    }

    // Server times never go back along a conversation's seqs (checked over the first
    // showing of each seq, whichever device saw it).
    let mut times: BTreeMap<(&str, u64), (u64, DeviceKey, u64)> = BTreeMap::new();
    for r in &h.received {
        times
            .entry((r.conv.as_str(), r.seq))
            .or_insert((r.server_time_ms, r.device, r.t_ms));
    }
    // (conv, seq, time) of the conversation's latest entry so far.
    let mut latest: Option<(&str, u64, u64)> = None;
    for ((conv, seq), (time, device, t_ms)) in &times {
        match latest {
            Some((c, before_seq, before)) if c == *conv => {
                if *time < before {
                    v(
                        Violation::TimeRegress,
                        conv,
                        (Some(*device), Some(*t_ms)),
                        format!(
                            "seq {seq} has server_time_ms {time}, below seq {before_seq}'s {before}"
                        ),
                    );
                } else {
                    latest = Some((conv, *seq, *time));
                }
            }
            _ => latest = Some((conv, *seq, *time)),
        }
    }

    // Idempotency and acks agree with what devices were shown.
    for a in &h.acked {
        match at_seq.get(&(a.conv.as_str(), a.seq)) {
            Some(shown) if *shown != a.message_id => {
                v(
                    Violation::Conflict,
                    &a.conv,
                    (Some(a.device), Some(a.t_ms)),
                    format!(
                        "{} was acked at seq {} but devices were shown {} there",
                        a.message_id, a.seq, shown
                    ),
                );
            }
            _ => {}
        }
        seqs_of_id
            .entry((a.conv.as_str(), a.message_id.as_str()))
            .or_default()
            .insert(a.seq);
    }
    // Where each seq was first shown, to place a duplicate at its second seq.
    let mut first_shown: HashMap<(&str, u64), (DeviceKey, u64)> = HashMap::new();
    for r in &h.received {
        first_shown
            .entry((r.conv.as_str(), r.seq))
            .or_insert((r.device, r.t_ms));
    }
    for ((conv, id), seqs) in &seqs_of_id {
        if seqs.len() > 1 {
            let second = seqs.iter().nth(1).copied().unwrap_or_default();
            let at = first_shown.get(&(*conv, second)).copied();
            v(
                Violation::Duplicate,
                conv,
                (at.map(|a| a.0), at.map(|a| a.1)),
                format!("message {id} exists under seqs {seqs:?}"),
            );
        }
    }

    // Nothing acknowledged is lost: every device of every member holds it.
    let mut acked_seqs: BTreeMap<(&str, u64), (&str, u64)> = BTreeMap::new();
    for a in &h.acked {
        acked_seqs.insert((a.conv.as_str(), a.seq), (&a.message_id, a.t_ms));
    }
    for ((conv, seq), (id, acked_ms)) in &acked_seqs {
        let holders = ranges
            .iter()
            .filter(|((c, _), (start, end))| c == conv && (*start..=*end).contains(seq))
            .map(|((_, user), _)| *user);
        for user in holders {
            for d in 0..world.devices_per_user[user as usize] {
                if !held
                    .get(&((user, d), *conv))
                    .is_some_and(|s| s.contains(seq))
                {
                    // Drawn on the device that lacks it, where the sender got the ack.
                    v(
                        Violation::Lost,
                        conv,
                        (Some((user, d)), Some(*acked_ms)),
                        format!(
                            "acknowledged {id} (seq {seq}) never reached device {:?}",
                            (user, d)
                        ),
                    );
                }
            }
        }
    }

    // Pages of `sync` and `history`: consecutive, inside what the user may see, the
    // same entries devices were shown and acks named, and holding every message
    // acknowledged before the page was asked that falls in its range.
    let expiry = Expiry::new(world, &acked_seqs, &sent);
    for p in &h.pages {
        let at = (Some(p.device), Some(p.t_ms));
        // What the server may have expired by the time it answered.
        let kept = |seq: u64| !expiry.may_be_gone(&p.conv, seq, p.t_ms);
        let user = p.device.0;
        let what = match p.kind {
            PageKind::Sync { after } => format!("sync after {after} limit {}", p.limit),
            PageKind::History { before: Some(b) } => {
                format!("history before {b} limit {}", p.limit)
            }
            PageKind::History { before: None } => format!("history limit {}", p.limit),
        };
        let seqs: Vec<u64> = p.entries.iter().map(|e| e.0).collect();
        let Some((start, end)) = range_of(&p.conv, user) else {
            if !seqs.is_empty() {
                v(
                    Violation::Phantom,
                    &p.conv,
                    at,
                    format!("{what} for user {user}, never a member, returned seqs {seqs:?}"),
                );
            }
            continue;
        };
        if seqs.windows(2).any(|w| w[1] != w[0] + 1) {
            v(
                Violation::Gap,
                &p.conv,
                at,
                format!("{what} returned seqs {seqs:?}, not consecutive"),
            );
        }
        for (seq, id, system) in &p.entries {
            if !(start..=end).contains(seq) {
                v(
                    Violation::Phantom,
                    &p.conv,
                    at,
                    format!("{what} gave user {user} seq {seq}, outside its seqs {start}..={end}"),
                );
            }
            if !system && !sent.contains_key(&(p.conv.as_str(), id.as_str())) {
                v(
                    Violation::Phantom,
                    &p.conv,
                    at,
                    format!("{what} returned seq {seq} ({id}) that no client sent"),
                );
            }
            let shown = at_seq.get(&(p.conv.as_str(), *seq)).copied();
            let acked = acked_seqs.get(&(p.conv.as_str(), *seq)).map(|a| a.0);
            for other in [shown, acked].into_iter().flatten() {
                if other != id {
                    v(
                        Violation::Conflict,
                        &p.conv,
                        at,
                        format!("{what} returned {id} at seq {seq}, where {other} is"),
                    );
                }
            }
        }
        // Acknowledged before the page was asked, and visible to the user.
        let acked_before: Vec<u64> = acked_seqs
            .range((p.conv.as_str(), start)..=(p.conv.as_str(), end))
            .filter(|(_, (_, acked_ms))| *acked_ms <= p.asked_ms)
            .map(|((_, seq), _)| *seq)
            .filter(|seq| kept(*seq))
            .collect();
        match p.kind {
            PageKind::Sync { after } => {
                let first = (after + 1).max(start);
                // Expired entries at the start are skipped: the page begins at the oldest kept.
                if seqs
                    .first()
                    .is_some_and(|f| *f < first || (first..*f).any(kept))
                {
                    v(
                        Violation::Gap,
                        &p.conv,
                        at,
                        format!("{what} began at seq {}, not {first}", seqs[0]),
                    );
                }
                let reached = seqs.last().copied().unwrap_or(after);
                if !p.has_more {
                    if let Some(missing) = acked_before.iter().find(|s| **s > reached) {
                        v(Violation::Lost, &p.conv, at, format!("{what} ended at seq {reached} without more, but seq {missing} was acknowledged before it was asked"));
                    }
                }
            }
            PageKind::History { before } => {
                let upper = before.map_or(end, |b| b.saturating_sub(1).min(end));
                let newest = acked_before.iter().rev().find(|s| **s <= upper);
                match (seqs.last(), newest) {
                    (Some(last), Some(n)) if n > last => v(Violation::Lost, &p.conv, at, format!("{what} ended at seq {last}, but seq {n} was acknowledged before it was asked")),
                    (None, Some(n)) => v(Violation::Lost, &p.conv, at, format!("{what} returned nothing, but seq {n} was acknowledged before it was asked")),
                    _ => {}
                }
                if !p.has_more && seqs.first().is_some_and(|f| (start..*f).any(kept)) {
                    v(Violation::Gap, &p.conv, at, format!("{what} said nothing older than seq {} but the user sees from seq {start}", seqs[0]));
                }
            }
        }
    }

    // Receipts never go back and never claim more than the user's devices held, or
    // read, by the time the receipt was shown.
    let holdings = Holdings::new(h, &range_of);
    let mut last_receipt: HashMap<(DeviceKey, &str, u32), (u64, u64)> = HashMap::new();
    for r in &h.receipts {
        let key = (r.device, r.conv.as_str(), r.user);
        if let Some((d, rd)) = last_receipt.get(&key) {
            if r.delivered < *d || r.read < *rd {
                v(
                    Violation::ReceiptRegress,
                    &r.conv,
                    (Some(r.device), None),
                    format!(
                        "user {} went from ({d}, {rd}) to ({}, {}) as seen by {:?}",
                        r.user, r.delivered, r.read, r.device
                    ),
                );
            }
        }
        last_receipt.insert(key, (r.delivered, r.read));
        let held_max = holdings.held_by(r.user, &r.conv, r.t_ms);
        let read_max = holdings.read_by(r.user, &r.conv, r.t_ms);
        if r.delivered > held_max || r.read > r.delivered || r.read > read_max {
            v(
                Violation::ReceiptOverclaim,
                &r.conv,
                (Some(r.device), Some(r.t_ms)),
                format!(
                    "user {} claimed delivered {} read {} but by then held {held_max} and read {read_max}",
                    r.user, r.delivered, r.read
                ),
            );
        }
    }

    // A group's summaries never claim more than a member holds or read. Judged
    // over the members who were in the group from its first entry to the end, since
    // a summary is computed over the members at one moment that the history does
    // not pin down.
    for r in &h.receipts {
        let Some(c) = world.convs.iter().find(|c| c.id == r.conv) else {
            continue;
        };
        let whole_run = c
            .members
            .iter()
            .filter(|m| range_of(&c.id, **m) == Some((1, u64::MAX)));
        for &m in whole_run {
            let held = holdings.held_by(m, &c.id, r.t_ms);
            let read = holdings.read_by(m, &c.id, r.t_ms);
            let over = [
                ("all_delivered", r.all_delivered, held),
                ("all_read", r.all_read, read),
            ];
            for (field, claimed, truth) in over {
                if let Some(claimed) = claimed.filter(|claimed| *claimed > truth) {
                    v(
                        Violation::ReceiptOverclaim,
                        &r.conv,
                        (Some(r.device), Some(r.t_ms)),
                        format!(
                            "{field} {claimed} shown to {:?}, but member {m} has only {truth}",
                            r.device
                        ),
                    );
                }
            }
        }
    }

    // Receipts reach the senders: once an accepted ack moved a user's cursor past an
    // entry another member sent, that sender's devices with a working session over
    // the whole while, and no fault near, are shown a receipt at least that far.
    for missing in missing_receipts(h, world, &range_of) {
        v(
            Violation::ReceiptMissing,
            &missing.conv,
            (Some(missing.device), Some(missing.due_ms)),
            missing.describe(),
        );
    }

    // Fast when healthy: outside fault windows, deliveries stay under the bound.
    for r in h.received.iter().filter(|r| !r.system) {
        let Some(s) = sent.get(&(r.conv.as_str(), r.message_id.as_str())) else {
            continue;
        };
        let latency = r.t_ms.saturating_sub(s.t_ms);
        if latency <= world.latency_bound_ms {
            continue;
        }
        // With faults near, once they healed and the servers recovered.
        let due_ms = due_after_faults(
            h.faults.iter(),
            &[s.device, r.device],
            s.t_ms,
            s.t_ms,
            world.latency_bound_ms,
            Paging::Waits,
        );
        if r.t_ms > due_ms {
            let why = if due_ms == s.t_ms + world.latency_bound_ms {
                "with no fault active".to_owned()
            } else {
                format!("though every fault near it had healed by {due_ms} ms, recovery included")
            };
            v(
                Violation::Slow,
                &r.conv,
                (Some(r.device), Some(r.t_ms)),
                format!(
                    "{} took {latency} ms to reach {:?} {why}",
                    r.message_id, r.device
                ),
            );
        }
    }
    // Presence ends up right, and comes coalesced.
    out.extend(stale_presence(h, world));
    out.extend(presence_floods(h));
    out.sort_by(|a, b| (a.violation, &a.conv, &a.detail).cmp(&(b.violation, &b.conv, &b.detail)));
    out
}

/// `(t_ms, value)` steps of a value that only grows, in time order.
type Steps = Vec<(u64, u64)>;

/// A member's visible seq range in a conversation: `(conversation, user) → (first, last)`.
type RangeOf<'f> = &'f dyn Fn(&str, u32) -> Option<(u64, u64)>;

/// Guarantee 8 over the presence phase: once a user's devices have all gone away,
/// every device of a user who shares a conversation with them and has one session
/// over the moment judged (the idle timeout plus [`PRESENCE_BOUND_MS`] after they
/// went, and at least [`PRESENCE_ASK_MS`] into the session) shows them offline,
/// with a last-seen time: the latest state it got in that session (its `presence`
/// reply or a later event) says so. Over the phase, the last-seen times a device is
/// shown for a user never go back.
/// When entries may have expired: an entry is stamped no earlier than its message
/// was made (and no earlier than any lower seq's, as server times never decrease
/// along seqs), so it may be gone from pages only from then plus the retention.
struct Expiry<'a> {
    retention_ms: Option<u64>,
    /// Per conversation and acknowledged seq: the latest time any message up to it
    /// was made, a lower bound of its server time.
    made_by: BTreeMap<(&'a str, u64), u64>,
}

impl<'a> Expiry<'a> {
    fn new(
        world: &World<'_>,
        acked_seqs: &BTreeMap<(&'a str, u64), (&'a str, u64)>,
        sent: &HashMap<(&'a str, &'a str), &'a crate::history::Sent>,
    ) -> Self {
        let mut made_by = BTreeMap::new();
        let mut running: Option<(&str, u64)> = None;
        for ((conv, seq), (id, _)) in acked_seqs {
            let made = sent.get(&(*conv, *id)).map_or(0, |s| s.t_ms);
            let floor = match running {
                Some((c, m)) if c == *conv => m.max(made),
                _ => made,
            };
            running = Some((conv, floor));
            made_by.insert((*conv, *seq), floor);
        }
        Self {
            retention_ms: world.retention_ms,
            made_by,
        }
    }

    /// Whether `seq` of `conv` may have expired by `t_ms`.
    fn may_be_gone(&self, conv: &str, seq: u64, t_ms: u64) -> bool {
        let Some(retention_ms) = self.retention_ms else {
            return false;
        };
        let made = self
            .made_by
            .range((conv, 0)..=(conv, seq))
            .next_back()
            .map_or(0, |(_, made)| *made);
        made + retention_ms <= t_ms
    }
}

fn stale_presence(h: &History, world: &World<'_>) -> Vec<Finding> {
    let Some(away) = &h.away else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let label = |user: u32| format!("presence of u{user}");
    for &gone in &away.users {
        let went_ms = h
            .sessions
            .iter()
            .filter(|s| s.device.0 == gone)
            .map(|s| s.end_ms)
            .max()
            .unwrap_or(away.start_ms)
            .max(away.start_ms);
        let due_ms = went_ms + IDLE_TIMEOUT_MS + PRESENCE_BOUND_MS;
        let contacts: BTreeSet<u32> = world
            .convs
            .iter()
            .filter(|c| c.members.contains(&gone))
            .flat_map(|c| c.members.iter().copied())
            .filter(|u| *u != gone && !away.users.contains(u))
            .collect();
        for s in h.sessions.iter().filter(|s| contacts.contains(&s.device.0)) {
            let judged_ms = due_ms.max(s.start_ms + PRESENCE_ASK_MS);
            if judged_ms > away.end_ms || s.end_ms < judged_ms {
                continue;
            }
            let states: Vec<&crate::history::PresenceSeen> = h
                .presence
                .iter()
                .filter(|p| p.device == s.device && p.user == gone)
                .collect();
            let latest = states
                .iter()
                .filter(|p| (s.start_ms..=judged_ms).contains(&p.t_ms))
                .max_by_key(|p| p.t_ms);
            let wrong = match latest {
                None => Some("was never shown their presence in its session".to_owned()),
                Some(p) if p.online => {
                    Some(format!("still shows them online (since {} ms)", p.t_ms))
                }
                Some(p) if p.last_seen_ms.is_none() => {
                    Some("shows them offline with no last-seen time".to_owned())
                }
                Some(_) => None,
            };
            if let Some(wrong) = wrong {
                out.push(Finding {
                    violation: Violation::PresenceStale,
                    conv: label(gone),
                    detail: format!(
                        "u{gone}'s devices went away by {went_ms} ms; at {judged_ms} ms device {:?} {wrong}",
                        s.device
                    ),
                    device: Some(s.device),
                    t_ms: Some(judged_ms),
                });
            }
        }
    }
    // Last seen is a max-register: within the phase (no faults), never back.
    let mut last: HashMap<(DeviceKey, u32), (u64, u64)> = HashMap::new();
    for p in h.presence.iter().filter(|p| p.t_ms >= away.start_ms) {
        let Some(seen) = p.last_seen_ms else { continue };
        if let Some((before, t)) = last.insert((p.device, p.user), (seen, p.t_ms)) {
            if seen < before {
                out.push(Finding {
                    violation: Violation::PresenceStale,
                    conv: label(p.user),
                    detail: format!(
                        "device {:?} was shown last seen {before} at {t} ms, then {seen} at {} ms",
                        p.device, p.t_ms
                    ),
                    device: Some(p.device),
                    t_ms: Some(p.t_ms),
                });
                last.insert((p.device, p.user), (before, t));
            }
        }
    }
    out
}

/// Coalescing: within one WebSocket session, two `presence` events reach a device
/// at least a presence interval apart (half of one, for network jitter), unless a
/// fault was near (a delayed frame lands next to the following one). Poll responses
/// carry waiting changes along with entries, so they are not held to it.
fn presence_floods(h: &History) -> Vec<Finding> {
    let mut out = Vec::new();
    let min_gap = PRESENCE_INTERVAL_MS / 2;
    // Each device's event arrival times, in order (one event's states arrive at
    // one moment), read once rather than once per session.
    let mut arrivals: HashMap<DeviceKey, Vec<u64>> = HashMap::new();
    for p in &h.presence {
        if p.source == crate::history::PresenceSource::Event {
            let times = arrivals.entry(p.device).or_default();
            if times.last() != Some(&p.t_ms) {
                times.push(p.t_ms);
            }
        }
    }
    for s in &h.sessions {
        let Some(all) = arrivals.get(&s.device) else {
            continue;
        };
        let times: Vec<u64> = all
            .iter()
            .copied()
            .filter(|t| (s.start_ms..=s.end_ms).contains(t))
            .collect();
        for pair in times.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if b - a < min_gap && !overlaps(&h.faults, &[s.device], a, b) {
                out.push(Finding {
                    violation: Violation::PresenceFlood,
                    conv: "presence".into(),
                    detail: format!(
                        "device {:?} got presence events at {a} ms and {b} ms in one session",
                        s.device
                    ),
                    device: Some(s.device),
                    t_ms: Some(b),
                });
                break;
            }
        }
    }
    out
}

/// What each user's devices held and reported read, over time: the truth a
/// receipt shown at some moment is held to.
struct Holdings<'h> {
    /// Per (user, conversation), per device: when its gap-free prefix (from the
    /// user's first visible seq) grew, and to what: `(t_ms, last seq)`.
    held: HashMap<(u32, &'h str), BTreeMap<u32, Steps>>,
    /// Per (user, conversation): when the most any device reported read grew.
    read: HashMap<(u32, &'h str), Steps>,
    /// Each user's first visible seq per conversation.
    start: HashMap<(u32, &'h str), u64>,
}

impl<'h> Holdings<'h> {
    fn new(h: &'h History, range_of: RangeOf<'_>) -> Self {
        let mut held: HashMap<(u32, &str), BTreeMap<u32, Steps>> = HashMap::new();
        let mut start = HashMap::new();
        let mut seen: HashMap<(DeviceKey, &str), (BTreeSet<u64>, u64)> = HashMap::new();
        for r in &h.received {
            let first = *start
                .entry((r.device.0, r.conv.as_str()))
                .or_insert_with(|| range_of(&r.conv, r.device.0).map_or(1, |(s, _)| s));
            let (seqs, prefix) = seen
                .entry((r.device, r.conv.as_str()))
                .or_insert_with(|| (BTreeSet::new(), first - 1));
            seqs.insert(r.seq);
            let before = *prefix;
            while seqs.contains(&(*prefix + 1)) {
                *prefix += 1;
            }
            if *prefix > before {
                held.entry((r.device.0, r.conv.as_str()))
                    .or_default()
                    .entry(r.device.1)
                    .or_default()
                    .push((r.t_ms, *prefix));
            }
        }
        let mut read: HashMap<(u32, &str), Steps> = HashMap::new();
        for a in &h.cursor_acks {
            let Some(value) = a.read else { continue };
            let steps = read.entry((a.device.0, a.conv.as_str())).or_default();
            if steps.last().is_none_or(|(_, most)| value > *most) {
                steps.push((a.sent_ms, value));
            }
        }
        Holdings { held, read, start }
    }

    /// The value of a step function at `t_ms` (`before` ahead of its first step).
    fn at(steps: &[(u64, u64)], t_ms: u64, before: u64) -> u64 {
        match steps.partition_point(|(t, _)| *t <= t_ms) {
            0 => before,
            i => steps[i - 1].1,
        }
    }

    /// The furthest any of `user`'s devices held `conv` without a gap at `t_ms`.
    fn held_by(&self, user: u32, conv: &str, t_ms: u64) -> u64 {
        let before = self.start.get(&(user, conv)).map_or(0, |s| s - 1);
        self.held
            .get(&(user, conv))
            .into_iter()
            .flat_map(|devices| devices.values())
            .map(|steps| Self::at(steps, t_ms, before))
            .max()
            .unwrap_or(before)
    }

    /// The most any of `user`'s devices had reported read of `conv` by `t_ms`.
    fn read_by(&self, user: u32, conv: &str, t_ms: u64) -> u64 {
        self.read
            .get(&(user, conv))
            .map_or(0, |steps| Self::at(steps, t_ms, 0))
    }
}

/// Which cursor of a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Delivered,
    Read,
}

impl Field {
    /// How far `ack` moves this cursor (reading implies delivery).
    fn moved_by(self, ack: &CursorAck) -> u64 {
        match self {
            Field::Delivered => ack.delivered.max(ack.read.unwrap_or(0)),
            Field::Read => ack.read.unwrap_or(0),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Field::Delivered => "delivered",
            Field::Read => "read",
        }
    }
}

/// A receipt a sender's device was due and not shown.
struct MissingReceipt {
    conv: String,
    /// The sender's device.
    device: DeviceKey,
    /// Whose cursor.
    user: u32,
    field: Field,
    /// The sender's entry the cursor moved past.
    seq: u64,
    /// The first accepted ack that moved past it arrived then.
    accepted_ms: u64,
    /// The receipt was due by then.
    due_ms: u64,
    /// The most the device was shown by then.
    shown: u64,
}

impl MissingReceipt {
    fn describe(&self) -> String {
        format!(
            "user {}'s {} passed seq {} (accepted at {} ms); by {} ms sender device {:?} was shown {} {}",
            self.user,
            self.field.name(),
            self.seq,
            self.accepted_ms,
            self.due_ms,
            self.device,
            self.field.name(),
            self.shown
        )
    }
}

/// Whether what is due waits for a device paging through its backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Paging {
    /// Deliveries: the device takes its pages at its own pace.
    Waits,
    /// Receipts: they ride on every response, pages or not.
    Ignored,
}

/// When a receipt whose ack was written at `since_ms` and took effect at `from_ms`
/// is due at a device: `bound` after it, or, with fault windows of `devices` (or
/// global ones) near that while, `bound` plus the servers' recovery after the last
/// of them healed; faults near the longer while count too, until none is left. A
/// fault that ended up to the recovery time before the write counts as near (its
/// damage may be found only then). A device paging through its backlog waits for
/// its pages or not, as `paging` says.
fn due_after_faults<'w>(
    near: impl Iterator<Item = &'w crate::history::FaultWindow> + Clone,
    devices: &[DeviceKey],
    since_ms: u64,
    from_ms: u64,
    bound: u64,
    paging: Paging,
) -> u64 {
    let mut due_ms = from_ms + bound;
    loop {
        let mut any = false;
        let mut healed_ms = from_ms;
        for w in near.clone() {
            if overlaps(
                std::iter::once(w),
                devices,
                since_ms.saturating_sub(RECOVERY_MS),
                due_ms,
            ) {
                any = true;
                if w.kind != crate::history::WindowKind::Paging || paging == Paging::Waits {
                    healed_ms = healed_ms.max(w.end_ms);
                }
            }
        }
        if !any {
            return due_ms;
        }
        let next = healed_ms + bound + RECOVERY_MS;
        if next <= due_ms {
            return due_ms;
        }
        due_ms = next;
    }
}

/// Receipts due and never shown (see the check in [`check`]).
///
/// For each user and conversation, and each cursor, take the furthest accepted ack
/// and, per other sender, the sender's newest acknowledged entry at or below it.
/// The ack that first moved the cursor past that entry was written no earlier than
/// the first ack reaching it was, and was processed before the first such ack was
/// accepted; the receipt it caused is due by then plus the bound. A sender's device
/// is held to it by a working session that covers that whole while, or that began
/// later and lasted the bound past its start (its `hello` or first poll asks for the
/// receipts that moved meanwhile); with a fault window (its own, the acking user's
/// devices', or a global one) near, only once those faults healed and the servers
/// recovered ([`due_after_faults`]). Every accepted cursor is judged, not only the
/// furthest: a receipt lost on the way counts unless a later one covers it in time.
fn missing_receipts(h: &History, world: &World<'_>, range_of: RangeOf<'_>) -> Vec<MissingReceipt> {
    let bound = world.latency_bound_ms + RECEIPT_GRACE_MS;
    // conv -> seq -> sending user, of acknowledged entries.
    let mut sender_of: HashMap<&str, BTreeMap<u64, u32>> = HashMap::new();
    for a in &h.acked {
        sender_of
            .entry(a.conv.as_str())
            .or_default()
            .insert(a.seq, a.device.0);
    }
    let mut acks_of: BTreeMap<(&str, u32), Vec<&CursorAck>> = BTreeMap::new();
    for a in &h.cursor_acks {
        acks_of
            .entry((a.conv.as_str(), a.device.0))
            .or_default()
            .push(a);
    }
    let mut out = Vec::new();
    for ((conv, user), acks) in &acks_of {
        let Some(senders) = sender_of.get(conv) else {
            continue;
        };
        let Some((user_start, u64::MAX)) = range_of(conv, *user) else {
            continue;
        };
        let user_devices: Vec<DeviceKey> = (0..world.devices_per_user[*user as usize])
            .map(|d| (*user, d))
            .collect();
        for field in [Field::Delivered, Field::Read] {
            // At every accepted cursor, each other sender's newest entry at or
            // below it: the receipt for each is due, unless a later one covers it
            // in time.
            let mut newest: BTreeSet<(u32, u64)> = BTreeSet::new();
            let accepted: BTreeSet<u64> = acks
                .iter()
                .filter(|a| a.ok_ms.is_some())
                .map(|a| field.moved_by(a))
                .filter(|&c| c >= user_start)
                .collect();
            for &cursor in &accepted {
                let mut at: BTreeMap<u32, u64> = BTreeMap::new();
                for (&seq, &sender) in senders.range(user_start..=cursor) {
                    if sender != *user {
                        at.insert(sender, seq);
                    }
                }
                newest.extend(at);
            }
            for (sender, seq) in newest {
                match range_of(conv, sender) {
                    Some((start, u64::MAX)) if start <= seq => {}
                    _ => continue,
                }
                let reaching = acks.iter().filter(|a| field.moved_by(a) >= seq);
                let written_ms = reaching.clone().map(|a| a.sent_ms).min();
                let accepted_ms = reaching.filter_map(|a| a.ok_ms).min();
                let (Some(written_ms), Some(accepted_ms)) = (written_ms, accepted_ms) else {
                    continue;
                };
                for d in 0..world.devices_per_user[sender as usize] {
                    let device = (sender, d);
                    let mut concerned = user_devices.clone();
                    concerned.push(device);
                    // The session held to it: one that lived from the ack's write
                    // until the receipt was due, or one that began later (a new
                    // connection asks for the receipts that moved while the device
                    // was away) and lived a bound past its start. With a fault near,
                    // the receipt is due once every fault healed and the servers
                    // recovered (a session that lived through it re-reads what it
                    // may have missed). The device's own time away before the
                    // session is no fault of it.
                    let due_in = |s: &crate::history::SessionSpan| {
                        if s.device != device {
                            return None;
                        }
                        let near = h.faults.iter().filter(|w| {
                            !(w.kind == crate::history::WindowKind::DeviceOffline
                                && w.device == Some(device)
                                && w.end_ms <= s.start_ms)
                        });
                        let due_ms = due_after_faults(
                            near,
                            &concerned,
                            written_ms.max(s.start_ms),
                            accepted_ms.max(s.start_ms),
                            bound,
                            Paging::Ignored,
                        );
                        (s.end_ms >= due_ms).then_some(due_ms)
                    };
                    let Some(due_ms) = h.sessions.iter().filter_map(due_in).min() else {
                        continue;
                    };
                    let shown = h
                        .receipts
                        .iter()
                        .filter(|r| {
                            r.device == device
                                && r.conv == *conv
                                && r.user == *user
                                && r.t_ms <= due_ms
                        })
                        .map(|r| match field {
                            Field::Delivered => r.delivered,
                            Field::Read => r.read,
                        })
                        .max()
                        .unwrap_or(0);
                    if shown < seq {
                        out.push(MissingReceipt {
                            conv: (*conv).to_owned(),
                            device,
                            user: *user,
                            field,
                            seq,
                            accepted_ms,
                            due_ms,
                            shown,
                        });
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Acked, CursorAck, MemberChange, Page, ReceiptSeen, Received, Sent};

    fn recv(device: DeviceKey, seq: u64, id: &str) -> Received {
        Received {
            device,
            conv: "c".into(),
            seq,
            message_id: id.into(),
            system: id.starts_with("member"),
            members: None,
            server_time_ms: 1_000 + seq,
            t_ms: 10,
        }
    }

    fn world_check(h: &History) -> Vec<Violation> {
        check_with_retention(h, None)
    }

    fn check_with_retention(h: &History, retention_ms: Option<u64>) -> Vec<Violation> {
        let convs = [ConvSpec {
            id: "c".into(),
            members: vec![0, 1],
        }];
        let world = World {
            convs: &convs,
            devices_per_user: &[1, 1],
            latency_bound_ms: 1000,
            retention_ms,
        };
        check(h, &world).into_iter().map(|v| v.violation).collect()
    }

    /// With a retention, a page may leave out entries from their retention on (made
    /// at 0 ms, kept 100 ms), never before; without one, never.
    #[test]
    fn pages_may_leave_out_only_expired_entries() {
        let mut h = both_hold_two();
        made_and_acked(&mut h, "m2", 3, 50);
        for d in [(0, 0), (1, 0)] {
            h.received.push(recv(d, 3, "m2"));
        }
        let only_newest = |kind: PageKind, t_ms: u64| {
            let mut with = h.clone();
            with.pages.push(Page {
                device: (1, 0),
                conv: "c".into(),
                kind,
                limit: 3,
                entries: vec![(3, "m2".into(), false)],
                has_more: false,
                asked_ms: t_ms - 5,
                t_ms,
            });
            with
        };
        let sync = PageKind::Sync { after: 0 };
        let history = PageKind::History { before: None };
        for kind in [sync, history] {
            let late = only_newest(kind, 120);
            assert!(
                check_with_retention(&late, Some(100)).is_empty(),
                "{kind:?}"
            );
            assert_eq!(
                check_with_retention(&late, None),
                vec![Violation::Gap],
                "{kind:?}"
            );
            let early = only_newest(kind, 80);
            assert_eq!(
                check_with_retention(&early, Some(100)),
                vec![Violation::Gap],
                "{kind:?}: seq 2 was made at 0 ms and cannot have expired by 80 ms"
            );
        }
        // A page that lost the newest entry, young, is `lost` whatever the retention.
        let mut lost = h.clone();
        lost.pages.push(Page {
            device: (1, 0),
            conv: "c".into(),
            kind: PageKind::Sync { after: 2 },
            limit: 3,
            entries: Vec::new(),
            has_more: false,
            asked_ms: 115,
            t_ms: 120,
        });
        assert_eq!(
            check_with_retention(&lost, Some(100)),
            vec![Violation::Lost]
        );
    }

    fn base() -> History {
        let mut h = History::default();
        made_and_acked(&mut h, "m1", 2, 0);
        h
    }

    /// Device (0, 0) makes message `id` of conversation `c` at `made_ms`; it is
    /// acknowledged at `seq` 5 ms later.
    fn made_and_acked(h: &mut History, id: &str, seq: u64, made_ms: u64) {
        h.sent.push(Sent {
            device: (0, 0),
            conv: "c".into(),
            message_id: id.into(),
            t_ms: made_ms,
        });
        h.acked.push(Acked {
            device: (0, 0),
            conv: "c".into(),
            message_id: id.into(),
            seq,
            t_ms: made_ms + 5,
        });
    }

    /// [`base`] with both devices holding the conversation's entries 1 and 2.
    fn both_hold_two() -> History {
        let mut h = base();
        for d in [(0, 0), (1, 0)] {
            h.received.push(recv(d, 1, "member-1"));
            h.received.push(recv(d, 2, "m1"));
        }
        h
    }

    /// User 1's receipt `(delivered, read)` shown to device (0, 0) at `t_ms`.
    fn receipt_of_user_1(delivered: u64, read: u64, t_ms: u64) -> ReceiptSeen {
        ReceiptSeen {
            device: (0, 0),
            conv: "c".into(),
            user: 1,
            delivered,
            read,
            all_delivered: None,
            all_read: None,
            t_ms,
        }
    }

    /// Device (1, 0)'s cursor ack, sent at `sent_ms` and accepted at `ok_ms`.
    fn ack_of_user_1(delivered: u64, read: Option<u64>, sent_ms: u64, ok_ms: u64) -> CursorAck {
        CursorAck {
            device: (1, 0),
            conv: "c".into(),
            delivered,
            read,
            sent_ms,
            ok_ms: Some(ok_ms),
        }
    }

    /// Members added later hold entries from their add entry on; members who left
    /// hold them up to the entry that removed them, and nothing after.
    #[test]
    fn membership_changes_bound_what_each_user_holds() {
        let convs = [ConvSpec {
            id: "c".into(),
            members: vec![0, 1],
        }];
        let world = World {
            convs: &convs,
            devices_per_user: &[1, 1, 1],
            latency_bound_ms: 1000,
            retention_ms: None,
        };
        let mut h = base();
        made_and_acked(&mut h, "m2", 5, 20);
        let change = |seq: u64, action: &str, user: u32| MemberChange {
            conv: "c".into(),
            seq,
            action: action.into(),
            users: vec![user],
        };
        h.member_changes.push(change(3, "add", 2));
        h.member_changes.push(change(4, "leave", 1));
        let ids = ["member-1", "m1", "member-3", "member-4", "m2"];
        let shown = |device: DeviceKey, seqs: std::ops::RangeInclusive<u64>| {
            seqs.map(move |s| recv(device, s, ids[s as usize - 1]))
        };
        let mut clean = h.clone();
        clean.received.extend(shown((0, 0), 1..=5));
        clean.received.extend(shown((1, 0), 1..=4));
        clean.received.extend(shown((2, 0), 3..=5));
        let kinds = |h: &History| -> Vec<Violation> {
            check(h, &world).into_iter().map(|v| v.violation).collect()
        };
        assert!(kinds(&clean).is_empty(), "{:?}", check(&clean, &world));

        let mut after_leaving = clean.clone();
        after_leaving.received.push(recv((1, 0), 5, "m2"));
        assert_eq!(kinds(&after_leaving), vec![Violation::Phantom]);

        let mut joiner_missed = h.clone();
        joiner_missed.received.extend(shown((0, 0), 1..=5));
        joiner_missed.received.extend(shown((1, 0), 1..=4));
        joiner_missed.received.extend(shown((2, 0), 3..=4));
        assert_eq!(kinds(&joiner_missed), vec![Violation::Lost]);

        let mut before_joining = clean;
        before_joining.received.push(recv((2, 0), 2, "m1"));
        assert!(kinds(&before_joining).contains(&Violation::Phantom));
    }

    /// A clean history passes; each kind of broken history is named by the contract.
    #[test]
    fn names_each_violation() {
        let mut h = both_hold_two();
        h.receipts.push(receipt_of_user_1(2, 1, 100));
        h.cursor_acks.push(ack_of_user_1(2, Some(1), 50, 60));
        assert!(world_check(&h).is_empty(), "{:?}", world_check(&h));
        // Claimed read before any device reported it, or delivered before it was held.
        let mut early = h.clone();
        early.receipts[0].t_ms = 40;
        assert_eq!(world_check(&early), vec![Violation::ReceiptOverclaim]);
        let mut unread = h.clone();
        unread.cursor_acks[0].read = None;
        assert_eq!(world_check(&unread), vec![Violation::ReceiptOverclaim]);
        let mut before_held = h.clone();
        before_held.receipts[0].t_ms = 5;
        before_held.cursor_acks[0].sent_ms = 1;
        assert_eq!(world_check(&before_held), vec![Violation::ReceiptOverclaim]);

        let mut lost = base();
        lost.received.push(recv((0, 0), 1, "member-1"));
        lost.received.push(recv((0, 0), 2, "m1"));
        lost.received.push(recv((1, 0), 1, "member-1"));
        assert_eq!(world_check(&lost), vec![Violation::Lost]);

        let mut dup = both_hold_two();
        dup.received.push(recv((1, 0), 2, "m1"));
        assert_eq!(world_check(&dup), vec![Violation::Duplicate]);

        let mut gap = base();
        for d in [(0, 0), (1, 0)] {
            gap.received.push(recv(d, 2, "m1"));
        }
        gap.received.push(recv((0, 0), 1, "member-1"));
        assert_eq!(
            world_check(&gap),
            vec![Violation::Reorder, Violation::Gap, Violation::Gap]
        );

        // Server time going back between seqs; equal times are fine.
        let mut time = base();
        for d in [(0, 0), (1, 0)] {
            time.received.push(recv(d, 1, "member-1"));
            let mut second = recv(d, 2, "m1");
            second.server_time_ms = 999;
            time.received.push(second);
        }
        assert_eq!(world_check(&time), vec![Violation::TimeRegress]);
        let found = check(
            &time,
            &World {
                convs: &[ConvSpec {
                    id: "c".into(),
                    members: vec![0, 1],
                }],
                devices_per_user: &[1, 1],
                latency_bound_ms: 1000,
                retention_ms: None,
            },
        );
        assert!(
            found[0]
                .detail
                .contains("seq 2 has server_time_ms 999, below seq 1's 1001"),
            "{}",
            found[0]
        );
        let mut same = base();
        for d in [(0, 0), (1, 0)] {
            let mut first = recv(d, 1, "member-1");
            first.server_time_ms = 5;
            same.received.push(first);
            let mut second = recv(d, 2, "m1");
            second.server_time_ms = 5;
            same.received.push(second);
        }
        assert!(world_check(&same).is_empty());

        // Pages: a sync page that ends early without more, one that skips, and a
        // history page of the right entries.
        let page = |kind: PageKind, entries: &[(u64, &str)], has_more: bool| Page {
            device: (1, 0),
            conv: "c".into(),
            kind,
            limit: 3,
            entries: entries
                .iter()
                .map(|(s, id)| (*s, (*id).to_owned(), id.starts_with("member")))
                .collect(),
            has_more,
            asked_ms: 100,
            t_ms: 110,
        };
        let mut pages = h.clone();
        pages.pages.push(page(
            PageKind::History { before: None },
            &[(1, "member-1"), (2, "m1")],
            false,
        ));
        pages
            .pages
            .push(page(PageKind::Sync { after: 1 }, &[(2, "m1")], false));
        assert!(world_check(&pages).is_empty(), "{:?}", world_check(&pages));
        let mut short = h.clone();
        short
            .pages
            .push(page(PageKind::Sync { after: 0 }, &[(1, "member-1")], false));
        assert_eq!(world_check(&short), vec![Violation::Lost]);
        let mut skips = h.clone();
        skips
            .pages
            .push(page(PageKind::Sync { after: 0 }, &[(2, "m1")], false));
        assert_eq!(world_check(&skips), vec![Violation::Gap]);
        let mut wrong = h.clone();
        wrong
            .pages
            .push(page(PageKind::Sync { after: 1 }, &[(2, "m9")], false));
        assert!(world_check(&wrong).contains(&Violation::Conflict));

        let mut phantom = base();
        phantom.received.push(recv((0, 0), 3, "never-sent"));
        assert!(world_check(&phantom).contains(&Violation::Phantom));

        let mut regress = both_hold_two();
        regress.receipts.push(receipt_of_user_1(2, 0, 100));
        regress.receipts.push(receipt_of_user_1(1, 0, 100));
        regress.receipts.push(receipt_of_user_1(5, 0, 100));
        assert_eq!(
            world_check(&regress),
            vec![Violation::ReceiptRegress, Violation::ReceiptOverclaim]
        );

        let mut twice = base();
        twice.acked.push(Acked {
            device: (0, 0),
            conv: "c".into(),
            message_id: "m1".into(),
            seq: 3,
            t_ms: 5,
        });
        assert!(world_check(&twice).contains(&Violation::Duplicate));
    }

    /// A receipt an accepted ack made due reaches the sender's connected device, or
    /// its next connection; one that never does is `receipt-missing`, unless no session
    /// lasted till it was due or a fault was near. A group summary above a member's cursor is an
    /// overclaim.
    #[test]
    fn receipts_reach_connected_senders() {
        use crate::history::{FaultWindow, SessionSpan, WindowKind};
        let mut h = both_hold_two();
        // User 1 acks delivered 2 at 100 ms, accepted at 110 ms.
        h.cursor_acks.push(ack_of_user_1(2, None, 100, 110));
        h.sessions.push(SessionSpan {
            device: (0, 0),
            start_ms: 50,
            end_ms: 20_000,
        });
        assert_eq!(world_check(&h), vec![Violation::ReceiptMissing]);

        let mut shown = h.clone();
        shown.receipts.push(receipt_of_user_1(2, 0, 200));
        assert!(world_check(&shown).is_empty(), "{:?}", world_check(&shown));

        // Shown too late: after the bound (1,000 ms) and the grace.
        let mut late = shown.clone();
        late.receipts[0].t_ms = 110 + 1_000 + RECEIPT_GRACE_MS + 1;
        assert_eq!(world_check(&late), vec![Violation::ReceiptMissing]);

        // The sender connected after the ack was written: its new connection reads
        // the receipt, due a bound after it began, unless it ended before.
        let mut joined_later = h.clone();
        joined_later.sessions[0].start_ms = 3_000;
        assert_eq!(world_check(&joined_later), vec![Violation::ReceiptMissing]);
        joined_later
            .receipts
            .push(receipt_of_user_1(2, 0, 3_000 + 1_000 + RECEIPT_GRACE_MS));
        assert!(world_check(&joined_later).is_empty());
        joined_later.receipts[0].t_ms += 1;
        assert_eq!(world_check(&joined_later), vec![Violation::ReceiptMissing]);
        joined_later.sessions[0].end_ms = 3_000 + 1_000 + RECEIPT_GRACE_MS - 1;
        assert!(world_check(&joined_later).is_empty());
        // The device was away before the session: that is no fault that delays it.
        let mut back = h.clone();
        back.sessions[0].start_ms = 3_000;
        back.faults.push(FaultWindow {
            kind: WindowKind::DeviceOffline,
            start_ms: 20,
            end_ms: 3_000,
            device: Some((0, 0)),
            server: None,
        });
        assert_eq!(world_check(&back), vec![Violation::ReceiptMissing]);

        // A fault near the ack: due only once it healed (at 4,000 ms) and the
        // servers had time to recover, and only from a session lasting till then.
        let mut faulty = h.clone();
        faulty.faults.push(FaultWindow {
            kind: WindowKind::DeviceOffline,
            start_ms: 0,
            end_ms: 4_000,
            device: Some((1, 0)),
            server: None,
        });
        let due_ms = 4_000 + 1_000 + RECEIPT_GRACE_MS + RECOVERY_MS;
        assert_eq!(world_check(&faulty), vec![Violation::ReceiptMissing]);
        let mut recovered = faulty.clone();
        recovered.receipts.push(receipt_of_user_1(2, 0, due_ms));
        assert!(world_check(&recovered).is_empty());
        recovered.receipts[0].t_ms = due_ms + 1;
        assert_eq!(world_check(&recovered), vec![Violation::ReceiptMissing]);
        let mut left = faulty.clone();
        left.sessions[0].end_ms = due_ms - 1;
        assert!(world_check(&left).is_empty());
        // A fault far later, elsewhere, does not postpone it.
        let mut far = recovered.clone();
        far.sessions[0].end_ms = 60_000;
        far.faults.push(FaultWindow {
            kind: WindowKind::DeviceOffline,
            start_ms: 40_000,
            end_ms: 50_000,
            device: None,
            server: None,
        });
        assert_eq!(world_check(&far), vec![Violation::ReceiptMissing]);
        // An earlier cursor's receipt counts too, unless a later one covers it in
        // time: user 0 sent seqs 2 and 3; user 1 acks 2 at 100 ms and 3 only at
        // 10,000 ms.
        let mut two = both_hold_two();
        made_and_acked(&mut two, "m2", 3, 50);
        for d in [(0, 0), (1, 0)] {
            two.received.push(recv(d, 3, "m2"));
        }
        two.sessions.push(SessionSpan {
            device: (0, 0),
            start_ms: 50,
            end_ms: 20_000,
        });
        two.cursor_acks.push(ack_of_user_1(2, None, 100, 110));
        two.cursor_acks.push(ack_of_user_1(3, None, 10_000, 10_010));
        two.receipts.push(receipt_of_user_1(3, 0, 10_100));
        assert_eq!(world_check(&two), vec![Violation::ReceiptMissing]);
        two.receipts.insert(0, receipt_of_user_1(2, 0, 200));
        assert!(world_check(&two).is_empty(), "{:?}", world_check(&two));
        // A device paging through its backlog is no fault to wait for.
        let mut paging = h.clone();
        paging.faults.push(FaultWindow {
            kind: WindowKind::Paging,
            start_ms: 0,
            end_ms: 4_000,
            device: Some((1, 0)),
            server: None,
        });
        paging.receipts.push(receipt_of_user_1(2, 0, due_ms));
        assert_eq!(world_check(&paging), vec![Violation::ReceiptMissing]);

        // An ack never accepted makes nothing due.
        let mut refused = h.clone();
        refused.cursor_acks[0].ok_ms = None;
        assert!(world_check(&refused).is_empty());

        // Read: accepted read 2, shown delivered 2 but read 0.
        let mut read = shown.clone();
        read.cursor_acks[0].read = Some(2);
        assert_eq!(world_check(&read), vec![Violation::ReceiptMissing]);
        read.receipts[0].read = 2;
        assert!(world_check(&read).is_empty());

        // A group summary above what member 0 holds (2) or read (nothing).
        let mut summary = shown.clone();
        summary.receipts[0].all_delivered = Some(2);
        summary.receipts[0].all_read = Some(0);
        assert!(world_check(&summary).is_empty());
        summary.receipts[0].all_delivered = Some(3);
        summary.receipts[0].all_read = Some(1);
        assert_eq!(
            world_check(&summary),
            vec![Violation::ReceiptOverclaim; 4],
            "both fields, over both members"
        );
    }

    /// A user whose devices all went away is shown offline, with a last-seen time
    /// that never goes back, to a contact's device connected over the while; and
    /// presence events come at most about one per interval.
    #[test]
    fn presence_ends_up_offline_and_coalesced() {
        use crate::history::{Away, PresenceSeen, PresenceSource, SessionSpan};
        let seen = |t_ms, online, last_seen_ms, source| PresenceSeen {
            device: (0, 0),
            user: 1,
            online,
            last_seen_ms,
            source,
            t_ms,
        };
        let mut h = both_hold_two();
        h.away = Some(Away {
            users: vec![1],
            start_ms: 1_000,
            end_ms: 1_000 + IDLE_TIMEOUT_MS + PRESENCE_BOUND_MS + 1_000,
        });
        for (device, end_ms) in [((1, 0), 1_000), ((0, 0), 30_000)] {
            h.sessions.push(SessionSpan {
                device,
                start_ms: 0,
                end_ms,
            });
        }
        assert_eq!(
            world_check(&h),
            vec![Violation::PresenceStale],
            "never shown"
        );

        let mut online = h.clone();
        online
            .presence
            .push(seen(500, true, Some(1), PresenceSource::Reply));
        assert_eq!(world_check(&online), vec![Violation::PresenceStale]);

        let mut offline = online.clone();
        offline
            .presence
            .push(seen(12_000, false, Some(5), PresenceSource::Event));
        assert!(
            world_check(&offline).is_empty(),
            "{:?}",
            world_check(&offline)
        );

        // Too late: after the idle timeout plus the bound.
        let mut late = online.clone();
        let judged = 1_000 + IDLE_TIMEOUT_MS + PRESENCE_BOUND_MS;
        late.presence
            .push(seen(judged + 1, false, Some(5), PresenceSource::Event));
        assert_eq!(world_check(&late), vec![Violation::PresenceStale]);

        let mut no_last_seen = online.clone();
        no_last_seen
            .presence
            .push(seen(12_000, false, None, PresenceSource::Event));
        assert_eq!(world_check(&no_last_seen), vec![Violation::PresenceStale]);

        let mut back = offline.clone();
        back.presence
            .push(seen(13_500, false, Some(4), PresenceSource::Event));
        assert_eq!(world_check(&back), vec![Violation::PresenceStale]);

        // Two events 100 ms apart in one session; a reply or a poll response does not count.
        let mut flood = offline.clone();
        flood
            .presence
            .push(seen(12_100, false, Some(5), PresenceSource::Event));
        assert_eq!(world_check(&flood), vec![Violation::PresenceFlood]);
        let mut polled = offline.clone();
        polled
            .presence
            .push(seen(12_100, false, Some(5), PresenceSource::Poll));
        assert!(world_check(&polled).is_empty());
        let mut replied = offline;
        replied
            .presence
            .push(seen(12_100, false, Some(5), PresenceSource::Reply));
        assert!(world_check(&replied).is_empty());

        // A contact that reconnected after the user went: judged a while into its
        // session, by its own `presence` reply.
        let mut rejoined = h.clone();
        rejoined.sessions[1].start_ms = 14_000;
        assert_eq!(world_check(&rejoined), vec![Violation::PresenceStale]);
        rejoined
            .presence
            .push(seen(16_600, false, Some(5), PresenceSource::Reply));
        assert!(world_check(&rejoined).is_empty());
    }
}
