//! One device's delivery, whatever its transport: the ordered stream of entries
//! (catch-up after connecting, live pushes, gap fills from the store, resync after
//! lost events), receipts merged so they never go back, and presence coalesced.
//!
//! A transport owns a [`DeviceFeed`] for as long as the device is connected (a
//! WebSocket session, or a long-poll mailbox between polls) and only frames what
//! the feed gives it: it waits on [`DeviceFeed::recv`] and the feed's due times,
//! hands each push to [`DeviceFeed::on_push`], and writes what
//! [`DeviceFeed::drain_out`], [`DeviceFeed::take_receipts`] and
//! [`DeviceFeed::take_presence`] return. Every entry goes through one
//! [`DeviceStream`], so the device sees each conversation in seq order, without
//! gaps or duplicates, however the entry arrived.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::devices::DeviceLease;
use super::*;
use crate::domain::{DeviceStream, ReceiptView, ReceiptsShown, StreamStep};
use crate::hub::DeviceQueue;
use crate::protocol::{ConvKind, MemberAction};

/// Receipts wait this long for others to leave with them (a group's members
/// acknowledging one message within moments of each other).
pub const RECEIPT_BATCH_WINDOW: Duration = Duration::from_millis(50);

/// How long after a failed resync, catch-up read or gap fill the feed tries again.
const RESYNC_RETRY_AFTER: Duration = Duration::from_millis(500);

/// How long the feed waits for the store's cursor before showing a receipt unraised.
const RECEIPT_FLOOR_WAIT: Duration = Duration::from_millis(250);

/// Pending presence changes are compacted to one per user beyond this many (or
/// twice what the last compaction left).
const PRESENCE_PENDING_COMPACT_LEN: usize = 4096;

/// How long a `presence` reply's last-seen times hold back strictly older changes
/// that arrive after it (changes read before the reply, routed slower than it):
/// longer than any routing delay a live cluster has.
const PRESENCE_FLOOR_KEEP: Duration = Duration::from_secs(30);

/// Most users a device keeps a presence floor for; past it, the floors closest to
/// lapsing go first (a device asking about ever more users holds no more).
const PRESENCE_FLOORS_MAX: usize = 4096;

/// The last state per user of `states` (given in arrival order), in user order.
fn latest_per_user(mut states: Vec<Arc<PresenceState>>) -> Vec<Arc<PresenceState>> {
    states.sort_by(|a, b| a.user.cmp(&b.user)); // Stable: arrival order within a user.
    let mut latest: Vec<Arc<PresenceState>> = Vec::with_capacity(states.len());
    for state in states {
        match latest.last_mut() {
            Some(last) if last.user == state.user => *last = state,
            _ => latest.push(state),
        }
    }
    latest
}

/// Per user shown by a `presence` reply: its last-seen time, and until when a
/// change strictly older than it is not shown (see [`PRESENCE_FLOOR_KEEP`]).
#[derive(Debug, Default)]
struct PresenceFloors(BTreeMap<String, (Option<u64>, tokio::time::Instant)>);

impl PresenceFloors {
    /// Notes the last-seen times of a reply shown at `now`.
    fn raise(&mut self, shown: &[PresenceState], now: tokio::time::Instant) {
        self.current(now);
        let until = now + PRESENCE_FLOOR_KEEP;
        for state in shown {
            self.0
                .insert(state.user.clone(), (state.last_seen_ms, until));
        }
        if self.0.len() > PRESENCE_FLOORS_MAX {
            let mut lapsing: Vec<(tokio::time::Instant, String)> = self
                .0
                .iter()
                .map(|(user, (_, until))| (*until, user.clone()))
                .collect();
            lapsing.sort();
            let excess = self.0.len() - PRESENCE_FLOORS_MAX;
            for (_, user) in lapsing.into_iter().take(excess) {
                self.0.remove(&user);
            }
        }
        debug_assert!(self.0.len() <= PRESENCE_FLOORS_MAX);
    }

    /// Forgets the floors that lapsed by `now`; the rest.
    fn current(&mut self, now: tokio::time::Instant) -> &Self {
        self.0.retain(|_, (_, until)| *until > now);
        self
    }

    /// Whether `state` may be shown: not strictly older than its user's floor.
    fn admit(&self, state: &PresenceState) -> bool {
        self.0
            .get(&state.user)
            .is_none_or(|(floor, _)| state.last_seen_ms >= *floor)
    }
}

/// When a device's presence batches go out: at its own phase of the presence
/// interval (from a hash of the device), so that when thousands of contacts come
/// online together, their devices' batches spread over the interval instead of
/// all being written, and read, in the same instant (a burst of CPU on both ends
/// that messages would wait behind). Batches stay at least an interval apart.
#[derive(Debug)]
struct PresenceSlots {
    /// A slot; the others are whole intervals before and after it.
    origin: tokio::time::Instant,
    interval: Duration,
}

impl PresenceSlots {
    fn new(device_key: &str, interval: Duration) -> Self {
        assert!(!interval.is_zero(), "a presence interval is never zero");
        // FNV-1a: the same phase on every run (the simulator replays it).
        let hash = device_key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let interval_ns = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let phase = Duration::from_nanos(hash % interval_ns);
        PresenceSlots {
            origin: tokio::time::Instant::now() + phase,
            interval,
        }
    }

    /// The first slot at or after `now` that is at least an interval after the
    /// last batch (`taken`).
    fn next(
        &self,
        now: tokio::time::Instant,
        taken: Option<tokio::time::Instant>,
    ) -> tokio::time::Instant {
        let earliest = taken.map_or(now, |t| (t + self.interval).max(now));
        let since = earliest.saturating_duration_since(self.origin).as_nanos();
        let interval = self.interval.as_nanos();
        // In u64 nanoseconds: 584 years of slots.
        let offset = u64::try_from(since.div_ceil(interval) * interval).unwrap_or(u64::MAX);
        let due = self.origin + Duration::from_nanos(offset);
        debug_assert!(due >= earliest, "a slot before the earliest allowed");
        due
    }
}

/// Whether receipts read from the store are shown again when they add nothing to
/// what the feed showed (the device may have lost what it was shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShowAgain {
    Yes,
    No,
}

/// What the feed gives its transport to write, in order.
#[derive(Debug)]
pub enum Out {
    /// The next entry of its conversation for this device, with its `msg` frame.
    Entry(Arc<Entry>, Utf8Bytes),
    /// Catch-up after connecting is over (once per feed).
    CaughtUp,
    /// Any other frame pushed to the device.
    Frame(Utf8Bytes),
}

/// One connected device's delivery state; see the module doc.
pub struct DeviceFeed {
    service: Arc<ChatService>,
    lease: DeviceLease,
    queue: DeviceQueue,
    stream: DeviceStream,
    /// Conversations the store holds more of than the device has, each with the
    /// last seq to read up to, in the order they are caught up.
    behind: VecDeque<(String, u64)>,
    caught_up_said: bool,
    /// Entries the transport may still take before the next start (a poll's limit).
    room: usize,
    out: Vec<Out>,
    receipts_shown: ReceiptsShown,
    /// Receipts not yet taken (the latest per conversation and user) and their frames.
    receipts_pending: BTreeMap<(String, String), (Receipt, Utf8Bytes)>,
    receipts_due: Option<tokio::time::Instant>,
    /// Presence changes not yet taken, in arrival order (the last per user wins;
    /// see [`latest_per_user`]). Kept as the hub's shared states, so a burst of
    /// contacts coming online costs each device a pointer per change.
    presence_pending: Vec<Arc<PresenceState>>,
    presence_due: Option<tokio::time::Instant>,
    presence_slots: PresenceSlots,
    /// Pending presence changes are compacted beyond this many.
    presence_compact_at: usize,
    /// When the last presence batch was taken.
    presence_taken: Option<tokio::time::Instant>,
    presence_floors: PresenceFloors,
    resync_due: Option<tokio::time::Instant>,
    /// Receipts waiting for the store's cursor before they may be shown (its read
    /// failed or took too long), merged per (conversation, user), and when to retry.
    receipts_unfloored: BTreeMap<(String, String), Receipt>,
    floors_due: Option<tokio::time::Instant>,
    ended: Option<ProtocolError>,
}

impl DeviceFeed {
    /// A feed for the device holding `lease`, fed by the hub through `queue`.
    /// Nothing is delivered before [`DeviceFeed::start`].
    pub fn new(service: Arc<ChatService>, lease: DeviceLease, queue: DeviceQueue) -> Self {
        let caller = lease.caller();
        let presence_slots = PresenceSlots::new(
            &format!("{}/{}", caller.user, caller.device),
            service.limits().presence_interval,
        );
        DeviceFeed {
            service,
            lease,
            queue,
            stream: DeviceStream::default(),
            behind: VecDeque::new(),
            caught_up_said: false,
            room: 0,
            out: Vec::new(),
            receipts_shown: ReceiptsShown::default(),
            receipts_pending: BTreeMap::new(),
            receipts_due: None,
            presence_pending: Vec::new(),
            presence_due: None,
            presence_slots,
            presence_compact_at: PRESENCE_PENDING_COMPACT_LEN,
            presence_taken: None,
            presence_floors: PresenceFloors::default(),
            resync_due: None,
            receipts_unfloored: BTreeMap::new(),
            floors_due: None,
            ended: None,
        }
    }

    /// The device.
    pub fn caller(&self) -> &Caller {
        self.lease.caller()
    }

    /// The device's lease (route it, count it up).
    pub fn lease_mut(&mut self) -> &mut DeviceLease {
        &mut self.lease
    }

    /// Routes the lease and counts it up unless done already (a long-poll
    /// mailbox's first poll; a poll cancelled half-way leaves it to the next).
    pub async fn connect(&mut self) -> Result<(), ProtocolError> {
        if self.lease.is_up() {
            return Ok(());
        }
        if !self.lease.is_routed() {
            self.lease.route().await?;
        }
        self.lease.up();
        Ok(())
    }

    /// (Re)starts every conversation of the device after the cursors it presents
    /// (its stored cursors, or the most recent entries for a new device, where it
    /// presents none) and queues catch-up where it is behind. Returns the
    /// conversations. At most `room` entries are given out until the next start.
    /// What was given out but not taken is dropped: the device presents cursors
    /// again.
    pub async fn start(
        &mut self,
        cursors: &BTreeMap<String, u64>,
        room: usize,
    ) -> Result<Vec<ConvState>, ProtocolError> {
        let svc = Arc::clone(&self.service);
        let caller = self.lease.caller().clone();
        let states = svc.conversations(&caller).await?;
        svc.check_cursors(&caller, &states, cursors).await?;
        let mut stream = DeviceStream::default();
        let mut behind = VecDeque::new();
        for state in &states {
            let conv = &state.record.id;
            let m = state.record.require_reader(&caller.user)?;
            let start = svc
                .stream_start(&caller, state, cursors.get(conv).copied(), true)
                .await?;
            stream.start(conv, start, m.visible_until());
            let until = state.last_seq.min(m.visible_until());
            if start <= until {
                behind.push_back((conv.clone(), until));
            }
        }
        self.stream = stream;
        self.behind = behind;
        self.room = room;
        self.out.clear();
        if self.service.fabric().is_some() {
            // In a cluster the device may have been connected to another server
            // since this feed last started (a long-poll mailbox outlives that), and
            // shown newer receipts there: what this feed showed or holds is no
            // floor any more, so every receipt goes through the store's cursor again.
            self.receipts_shown = ReceiptsShown::default();
            self.receipts_due = None;
            for (_, (receipt, frame)) in std::mem::take(&mut self.receipts_pending) {
                self.on_receipt_floored(Arc::new(receipt), Some(frame))
                    .await;
            }
        }
        self.say_caught_up_if_done();
        Ok(states)
    }

    /// Gives out up to `room` more entries from where the feed is, without a
    /// restart at presented cursors: only the `poll-resumes-where-it-left`
    /// mutant's path ([`crate::mutants::Mutant::PollResumesWhereItLeft`]).
    pub fn resume_without_cursors(&mut self, room: usize) {
        self.room = room;
    }

    /// The next push from the hub; `None` once the hub dropped the device and
    /// everything queued was taken. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Push> {
        self.queue.recv().await
    }

    /// Handles the pushes already queued, at most `len_max`, until the feed ends.
    pub async fn take_queued(&mut self, len_max: usize) {
        for _ in 0..len_max {
            if self.ended.is_some() {
                break;
            }
            match self.queue.try_recv() {
                Ok(push) => self.on_push(Some(push)).await,
                // Empty, or closed (the next `recv` reports it).
                Err(_) => break,
            }
        }
    }

    /// Handles what [`DeviceFeed::recv`] returned.
    pub async fn on_push(&mut self, push: Option<Push>) {
        match push {
            None => self.end(ProtocolError::new(
                ErrorCode::SlowConsumer,
                "too far behind on live events; reconnect to catch up",
            )),
            Some(Push::Close(err)) => self.end(*err),
            Some(Push::Frame(frame)) => self.out.push(Out::Frame(*frame)),
            Some(Push::Receipt(framed)) => {
                let Framed { item, frame } = &*framed;
                self.on_receipt(Arc::clone(item), frame.clone()).await;
            }
            Some(Push::Entry(framed)) => self.on_entry(&framed.item, framed.frame.clone()).await,
            Some(Push::Resync) => self.resync().await,
            Some(Push::Presence(states)) => self.on_presence(&states),
        }
    }

    /// Why the device must be disconnected (replaced, too slow), once it must.
    pub fn ended(&self) -> Option<&ProtocolError> {
        self.ended.as_ref()
    }

    /// Whether some conversation still has entries the device lacks (after a
    /// poll's limit, or while catching up).
    pub fn is_behind(&self) -> bool {
        self.behind.iter().any(|(conv, until)| {
            let visible = self.stream.visible_until(conv).unwrap_or(0);
            self.stream
                .next_seq(conv)
                .is_some_and(|next| next <= (*until).min(visible))
        })
    }

    /// Whether [`DeviceFeed::catch_up_step`] has something to do now.
    pub fn catch_up_ready(&self) -> bool {
        !self.behind.is_empty() && self.room > 0 && self.ended.is_none()
    }

    /// Gives out the next page of the first conversation still behind; it stays
    /// first until it is caught up.
    pub async fn catch_up_step(&mut self) {
        let Some((conv, until)) = self.behind.pop_front() else {
            return;
        };
        let page = self.room.min(self.service.limits().page_len_max as usize);
        match self.give_stored(&conv, until, page).await {
            Ok(None) => {}
            Ok(Some(left_until)) => self.behind.push_front((conv, left_until)),
            Err(e) => {
                tracing::error!(conv, error = %e, "catch-up read failed; retrying");
                self.retry_resync();
            }
        }
        self.say_caught_up_if_done();
    }

    /// Takes what the feed gave out since the last call, in order.
    pub fn drain_out(&mut self) -> std::vec::Drain<'_, Out> {
        self.out.drain(..)
    }

    /// When pending receipts are due to be written (a batch window after the first).
    pub fn receipts_due(&self) -> Option<tokio::time::Instant> {
        self.receipts_due
    }

    /// Takes the pending receipts, each the latest for its conversation and user.
    pub fn take_receipts(&mut self) -> Vec<(Receipt, Utf8Bytes)> {
        self.receipts_due = None;
        std::mem::take(&mut self.receipts_pending)
            .into_values()
            .collect()
    }

    /// When pending presence changes are due (at most one batch per presence interval).
    pub fn presence_due(&self) -> Option<tokio::time::Instant> {
        self.presence_due
    }

    /// Takes the pending presence changes, the latest per user, in user order;
    /// never one older than a recent `presence` reply showed (see
    /// [`DeviceFeed::presence_shown`]).
    pub fn take_presence(&mut self) -> Vec<PresenceState> {
        self.presence_due = None;
        let now = tokio::time::Instant::now();
        let floors = self.presence_floors.current(now);
        let batch: Vec<PresenceState> = latest_per_user(std::mem::take(&mut self.presence_pending))
            .into_iter()
            .filter(|state| floors.admit(state))
            .map(|state| PresenceState::clone(&state))
            .collect();
        self.presence_compact_at = PRESENCE_PENDING_COMPACT_LEN;
        if !batch.is_empty() {
            self.presence_taken = Some(now);
        }
        batch
    }

    /// Notes that the device was just shown `states` (a `presence` reply, read after
    /// every pending change arrived): a pending change that is not newer is dropped,
    /// and for [`PRESENCE_FLOOR_KEEP`] a change arriving later that is strictly
    /// older (read before the reply, routed slower) is dropped too, so no batch
    /// shows a last-seen time older than the reply did. (One as old may be the
    /// user going offline at that time, and is shown.)
    pub fn presence_shown(&mut self, states: &[PresenceState]) {
        self.presence_floors
            .raise(states, tokio::time::Instant::now());
        let pending = latest_per_user(std::mem::take(&mut self.presence_pending));
        let shown: std::collections::HashMap<&str, Option<u64>> = states
            .iter()
            .map(|s| (s.user.as_str(), s.last_seen_ms))
            .collect();
        self.presence_pending = pending
            .into_iter()
            .filter(|p| {
                shown
                    .get(p.user.as_str())
                    .is_none_or(|seen| p.last_seen_ms > *seen)
            })
            .collect();
        if self.presence_pending.is_empty() {
            self.presence_due = None;
        }
    }

    /// When work that failed on a store error (a resync, a receipt's floor) is
    /// tried again: call [`DeviceFeed::work`] then.
    pub fn work_due(&self) -> Option<tokio::time::Instant> {
        match (self.resync_due, self.floors_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Does the work that is due (see [`DeviceFeed::work_due`]).
    pub async fn work(&mut self) {
        let now = tokio::time::Instant::now();
        if self.resync_due.is_some_and(|due| due <= now) {
            self.resync().await;
        }
        if self.floors_due.is_some_and(|due| due <= now) {
            self.floors_due = None;
            self.retry_floors().await;
        }
        self.say_caught_up_if_done();
    }

    /// Reads the store's cursor for every receipt waiting for it, all at once
    /// (so a store outage costs one bounded wait, not one per receipt), and shows
    /// those it got; the rest wait for the next retry.
    async fn retry_floors(&mut self) {
        let waiting: Vec<Receipt> = std::mem::take(&mut self.receipts_unfloored)
            .into_values()
            .collect();
        let service = Arc::clone(&self.service);
        let floors =
            futures_util::future::join_all(waiting.iter().map(|r| with_stored_floor(&service, r)))
                .await;
        for (receipt, floor) in waiting.into_iter().zip(floors) {
            let key = (receipt.conv.clone(), receipt.user.clone());
            match floor {
                Some(Floored::AsIs) => self.show_receipt(Arc::new(receipt), None),
                Some(Floored::Raised(raised)) => self.show_receipt(Arc::new(raised), None),
                None => {
                    self.receipts_unfloored.insert(key, receipt);
                }
            }
        }
        if !self.receipts_unfloored.is_empty() {
            self.floors_due = Some(tokio::time::Instant::now() + RESYNC_RETRY_AFTER);
        }
    }

    /// Live events may have been lost: queue catch-up for every conversation the
    /// store holds more of than this device received, new ones included.
    pub async fn resync(&mut self) {
        let svc = Arc::clone(&self.service);
        let caller = self.lease.caller().clone();
        self.resync_due = None;
        let states = match svc.conversations(&caller).await {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(error = %e, "resync failed; retrying");
                return self.retry_resync();
            }
        };
        for state in &states {
            let conv = &state.record.id;
            if self.stream.next_seq(conv).is_none() {
                let Ok(m) = state.record.require_reader(&caller.user) else {
                    continue;
                };
                match svc.stream_start(&caller, state, None, false).await {
                    Ok(start) => self.stream.start(conv, start, m.visible_until()),
                    Err(e) => {
                        tracing::warn!(conv, error = %e, "cannot start a stream on resync; retrying");
                        self.retry_resync();
                        continue;
                    }
                }
            }
        }
        let last_seqs: Vec<(String, u64)> = states
            .iter()
            .map(|s| (s.record.id.clone(), s.last_seq))
            .collect();
        let behind: Vec<String> = self.stream.behind(&last_seqs).map(str::to_owned).collect();
        for conv in behind {
            let last = last_seqs
                .iter()
                .find(|(c, _)| *c == conv)
                .map_or(0, |(_, last)| *last);
            self.mark_behind(&conv, last);
        }
        self.show_stored_receipts(&states).await;
        self.say_caught_up_if_done();
    }

    /// Like [`DeviceFeed::show_stored_receipts`] for a device that may not have seen
    /// what this feed showed it (a long-poll response lost on the way, the mailbox
    /// still open): every current receipt of `states`' conversations is shown again,
    /// the store's cursor merged with what was shown, so it never goes back.
    pub async fn show_stored_receipts_again(&mut self, states: &[ConvState]) {
        self.show_receipts_from_store(states, ShowAgain::Yes).await;
    }

    /// Shows, from the store, the receipts for entries the device's user sent in
    /// `states`' conversations that are ahead of what this feed showed: on a new
    /// connection, every receipt that moved while the device was away. A store
    /// error is retried as a resync.
    pub async fn show_stored_receipts(&mut self, states: &[ConvState]) {
        self.show_receipts_from_store(states, ShowAgain::No).await;
    }

    async fn show_receipts_from_store(&mut self, states: &[ConvState], again: ShowAgain) {
        for state in states {
            if let Err(e) = self.resync_receipts(state, again).await {
                tracing::warn!(conv = state.record.id, error = %e, "cannot read receipts for a new connection; retrying");
                self.retry_resync();
            }
        }
    }

    /// Receipts may have been lost with the live events: shows, from the store,
    /// every member's cursor in `state`'s conversation that is ahead of what this
    /// feed showed, if the device's user sent an entry in the range they moved
    /// past (the receipts it would have been sent).
    async fn resync_receipts(
        &mut self,
        state: &ConvState,
        again: ShowAgain,
    ) -> Result<(), StoreError> {
        let me = self.lease.caller().user.clone();
        let members = state.record.current_members();
        if !members.contains(&me) {
            return Ok(());
        }
        let conv = state.record.id.as_str();
        let svc = Arc::clone(&self.service);
        let cursors: BTreeMap<String, Cursor> =
            svc.store().user_cursors(conv).await?.into_iter().collect();
        let ahead: Vec<(&String, Cursor, u64)> = members
            .iter()
            .filter(|m| **m != me)
            .filter_map(|m| {
                let c = cursors.get(m).copied()?;
                let shown = self.receipts_shown.shown(conv, m);
                let (d, r) = match again {
                    // Everything shown may be lost: all of it is "ahead".
                    ShowAgain::Yes => (0, 0),
                    ShowAgain::No => shown.map_or((0, 0), |s| (s.delivered, s.read)),
                };
                (c.delivered > d || c.read > r).then_some((m, c, r))
            })
            .collect();
        let (Some(from), Some(until)) = (
            ahead.iter().map(|(_, _, shown_read)| *shown_read).min(),
            ahead.iter().map(|(_, c, _)| c.delivered).max(),
        ) else {
            return Ok(());
        };
        if until > from && until - from <= RECEIPT_SCAN_LEN_MAX {
            let limit = u32::try_from(until - from).expect("bounded by RECEIPT_SCAN_LEN_MAX");
            let senders = svc
                .store()
                .senders_between(conv, from, until, limit)
                .await?;
            if !senders.contains(&me) {
                return Ok(());
            }
        }
        let all = (state.record.kind == ConvKind::Group).then(|| {
            let of = |m: &String| cursors.get(m).copied().unwrap_or_default();
            Cursor {
                delivered: members.iter().map(|m| of(m).delivered).min().unwrap_or(0),
                read: members.iter().map(|m| of(m).read).min().unwrap_or(0),
            }
        });
        for (member, cursor, _) in ahead {
            let receipt = Receipt {
                conv: conv.to_owned(),
                user: member.clone(),
                delivered: cursor.delivered,
                read: cursor.read,
                all_delivered: all.map(|c| c.delivered),
                all_read: all.map(|c| c.read),
            };
            match again {
                ShowAgain::Yes => self.show_receipt_again(&receipt),
                ShowAgain::No => self.show_receipt(Arc::new(receipt), None),
            }
        }
        Ok(())
    }

    /// Shows `receipt` merged with what was shown, even if that adds nothing.
    fn show_receipt_again(&mut self, receipt: &Receipt) {
        let shown = self.receipts_shown.show_again(receipt);
        let frame = Utf8Bytes::from(ServerFrame::Receipt(shown.clone()).to_json());
        let key = (shown.conv.clone(), shown.user.clone());
        self.receipts_pending.insert(key, (shown, frame));
        if self.receipts_due.is_none() {
            self.receipts_due = Some(tokio::time::Instant::now() + RECEIPT_BATCH_WINDOW);
        }
    }

    fn end(&mut self, err: ProtocolError) {
        if self.ended.is_none() {
            self.ended = Some(err);
        }
    }

    /// Queues catch-up of `conv` up to `until` (or raises what is queued).
    fn mark_behind(&mut self, conv: &str, until: u64) {
        match self.behind.iter_mut().find(|(c, _)| c == conv) {
            Some((_, queued)) => *queued = (*queued).max(until),
            None => self.behind.push_back((conv.to_owned(), until)),
        }
    }

    /// Once nothing is behind (and no resync is pending), says so, once per feed.
    fn say_caught_up_if_done(&mut self) {
        if !self.caught_up_said && self.behind.is_empty() && self.resync_due.is_none() {
            self.caught_up_said = true;
            self.out.push(Out::CaughtUp);
        }
    }

    /// Gives out `conv`'s entries from the next one the device lacks up to
    /// `until`, at most `len_max` of them (and the room). Returns the `until` still
    /// to do when they did not all fit. An error leaves the stream where it was.
    async fn give_stored(
        &mut self,
        conv: &str,
        until: u64,
        len_max: usize,
    ) -> Result<Option<u64>, StoreError> {
        let mut left = len_max;
        loop {
            let Some(next) = self.stream.next_seq(conv) else {
                return Ok(None); // Not started (any more): nothing of it to give.
            };
            let until = until.min(self.stream.visible_until(conv).unwrap_or(0));
            if next > until {
                return Ok(None);
            }
            if left == 0 || self.room == 0 {
                return Ok(Some(until));
            }
            let page = u32::try_from(left.min(self.room))
                .unwrap_or(u32::MAX)
                .min(self.service.limits().page_len_max);
            let entries = self
                .service
                .store()
                .read_after(conv, next - 1, until, page)
                .await?;
            let Some(last) = entries.last().map(|e| e.seq) else {
                return Ok(None); // Expired meanwhile: nothing left to give.
            };
            assert!(
                last >= next,
                "{conv}: read after {} returned {last}",
                next - 1
            );
            debug_assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
            left = left.saturating_sub(entries.len());
            for entry in entries {
                self.give_read(entry);
            }
            if last >= until {
                return Ok(None);
            }
        }
    }

    /// Gives out an entry read from the store, if the device does not have it yet.
    fn give_read(&mut self, entry: Entry) {
        let next = self
            .stream
            .next_seq(&entry.conv)
            .expect("started conversation");
        if entry.seq < next || entry.seq > self.stream.visible_until(&entry.conv).unwrap_or(0) {
            return;
        }
        let entry = Arc::new(entry);
        let frame = Utf8Bytes::from(ServerFrame::Msg(Arc::clone(&entry)).to_json());
        self.give(entry, frame);
    }

    /// Gives out the next entry of its conversation.
    fn give(&mut self, entry: Arc<Entry>, frame: Utf8Bytes) {
        assert!(self.room > 0, "an entry given out past the room");
        self.room -= 1;
        self.stream.delivered(&entry.conv, entry.seq);
        let svc = &self.service;
        svc.metrics().messages_out.inc();
        let lag_ms = svc.clock().now_ms().saturating_sub(entry.server_time_ms);

        svc.metrics()
            .delivery_latency
            .observe(lag_ms as f64 / 1000.0);
        if self.concerns_me(&entry, &[MemberAction::Remove, MemberAction::Leave]) {
            self.stream.close_at(&entry.conv, entry.seq);
        }
        self.out.push(Out::Entry(entry, frame));
    }

    fn concerns_me(&self, entry: &Entry, actions: &[MemberAction]) -> bool {
        let Body::Members { action, users } = &entry.body else {
            return false;
        };
        actions.contains(action) && users.contains(&self.lease.caller().user)
    }

    /// A live entry: give it out, drop it, or fill the gap before it from the store.
    async fn on_entry(&mut self, entry: &Arc<Entry>, frame: Utf8Bytes) {
        // Added to a group: the stream starts at the add entry, unless it already
        // covers it (the start may have read it and given it out).
        let covered = self
            .stream
            .visible_until(&entry.conv)
            .is_some_and(|until| until >= entry.seq);
        if self.concerns_me(entry, &[MemberAction::Add]) && !covered {
            self.stream.start(&entry.conv, entry.seq, u64::MAX);
        }
        let mut step = self.stream.on_push(&entry.conv, entry.seq);
        if step == StreamStep::Unknown {
            let caller = self.lease.caller().clone();
            let svc = Arc::clone(&self.service);
            let started = match svc.readable(&caller, &entry.conv).await {
                Ok((state, m)) => svc
                    .stream_start(&caller, &state, None, false)
                    .await
                    .map(|start| (start, m.visible_until())),
                Err(e) => Err(e),
            };
            match started {
                Ok((start, visible)) => self.stream.start(&entry.conv, start, visible),
                Err(e) => {
                    tracing::warn!(conv = entry.conv, error = %e, "cannot start stream for a push; resyncing");
                    return self.retry_resync();
                }
            }
            step = self.stream.on_push(&entry.conv, entry.seq);
        }
        if crate::mutants::active(crate::mutants::Mutant::FanoutOutOfOrder)
            && matches!(step, StreamStep::Fill { .. })
            && self.room > 0
        {
            let visible = self.stream.visible_until(&entry.conv).unwrap_or(u64::MAX);
            self.stream.start(&entry.conv, entry.seq, visible);
            return self.give(Arc::clone(entry), frame);
        }
        match step {
            StreamStep::Deliver if self.room > 0 => self.give(Arc::clone(entry), frame),
            StreamStep::Deliver => self.mark_behind(&entry.conv, entry.seq),
            StreamStep::Duplicate | StreamStep::NotVisible => {}
            StreamStep::Fill { to, .. } => {
                match self.give_stored(&entry.conv, to, usize::MAX).await {
                    Ok(None) => {}
                    Ok(Some(left_until)) => self.mark_behind(&entry.conv, left_until),
                    Err(e) => {
                        tracing::warn!(conv = entry.conv, error = %e, "gap fill failed; resyncing");
                        self.retry_resync();
                    }
                }
            }
            StreamStep::Unknown => unreachable!("stream was just started"),
        }
    }

    /// Queues a receipt merged (field by field, by maximum) with those already
    /// shown, or nothing when it adds nothing; due within the batch window.
    async fn on_receipt(&mut self, receipt: Arc<Receipt>, frame: Utf8Bytes) {
        self.on_receipt_floored(receipt, Some(frame)).await;
    }

    /// See [`DeviceFeed::on_receipt`]; `frame` is the receipt's, if at hand.
    ///
    /// Only receipts routed between servers can be stale across a reconnect (one
    /// server publishes its receipts in order), so in a cluster the first receipt
    /// of a (conversation, user) in this feed is first raised to the user's cursor
    /// in the store; until that read succeeds it is not shown (later ones merge
    /// into it), and the read is retried.
    async fn on_receipt_floored(&mut self, receipt: Arc<Receipt>, frame: Option<Utf8Bytes>) {
        let key = (receipt.conv.clone(), receipt.user.clone());
        let (receipt, frame) = if self.service.fabric().is_some()
            && !self.receipts_shown.knows(&receipt.conv, &receipt.user)
        {
            if let Some(waiting) = self.receipts_unfloored.get_mut(&key) {
                *waiting = waiting.merged(&receipt);
                return;
            }
            match with_stored_floor(&self.service, &receipt).await {
                Some(Floored::AsIs) => (receipt, frame),
                Some(Floored::Raised(raised)) => (Arc::new(raised), None),
                None => {
                    self.receipts_unfloored
                        .insert(key, Receipt::clone(&receipt));
                    let at = tokio::time::Instant::now() + RESYNC_RETRY_AFTER;
                    self.floors_due.get_or_insert(at);
                    return;
                }
            }
        } else {
            (receipt, frame)
        };
        self.show_receipt(receipt, frame);
    }

    /// Queues `receipt` merged with what was shown (nothing if it adds nothing).
    fn show_receipt(&mut self, receipt: Arc<Receipt>, frame: Option<Utf8Bytes>) {
        let key = (receipt.conv.clone(), receipt.user.clone());
        let (shown, frame) = match self.receipts_shown.show(&receipt) {
            ReceiptView::Nothing => return,
            ReceiptView::AsArrived => {
                let frame = frame.unwrap_or_else(|| {
                    Utf8Bytes::from(ServerFrame::Receipt(Receipt::clone(&receipt)).to_json())
                });
                (Receipt::clone(&receipt), frame)
            }
            ReceiptView::Merged(merged) => {
                let frame = Utf8Bytes::from(ServerFrame::Receipt(merged.clone()).to_json());
                (merged, frame)
            }
        };
        self.receipts_pending.insert(key, (shown, frame));
        if self.receipts_due.is_none() {
            self.receipts_due = Some(tokio::time::Instant::now() + RECEIPT_BATCH_WINDOW);
        }
    }

    /// Keeps the latest state per user until the next presence batch is due.
    fn on_presence(&mut self, states: &[Arc<PresenceState>]) {
        self.presence_pending.extend(states.iter().cloned());
        if self.presence_pending.len() > self.presence_compact_at {
            // Bounded: however many rounds arrive before the batch is due, a device
            // holds at most twice one state per user it hears of, or this much; and
            // compacting at twice the size left each time keeps it linear.
            self.presence_pending = latest_per_user(std::mem::take(&mut self.presence_pending));
            self.presence_compact_at =
                PRESENCE_PENDING_COMPACT_LEN.max(2 * self.presence_pending.len());
        }
        if self.presence_due.is_none() {
            let now = tokio::time::Instant::now();
            self.presence_due = Some(self.presence_slots.next(now, self.presence_taken));
        }
    }

    /// Schedules another resync soon (after a store error lost a fill, a catch-up
    /// page or a resync).
    fn retry_resync(&mut self) {
        let at = tokio::time::Instant::now() + RESYNC_RETRY_AFTER;
        self.resync_due = Some(self.resync_due.map_or(at, |t| t.min(at)));
    }
}

/// A receipt against the user's cursor in the store.
enum Floored {
    /// The store holds nothing newer.
    AsIs,
    /// Raised to the store's cursor.
    Raised(Receipt),
}

/// `receipt` raised to the user's cursor in the store: a receipt computed from an
/// older read on another server, delayed (say in an outbox while the router was
/// away) past this device's reconnect, must not take back what its previous
/// connection showed. The store's cursor is at least every receipt published
/// before this read. `None` on a store error or after [`RECEIPT_FLOOR_WAIT`].
async fn with_stored_floor(service: &ChatService, receipt: &Receipt) -> Option<Floored> {
    // Bounded: the feed reads nothing else meanwhile.
    let read = service.store().user_cursor(&receipt.conv, &receipt.user);
    let Ok(Ok(stored)) = tokio::time::timeout(RECEIPT_FLOOR_WAIT, read).await else {
        return None;
    };
    if stored.delivered <= receipt.delivered && stored.read <= receipt.read {
        return Some(Floored::AsIs);
    }
    Some(Floored::Raised(Receipt {
        delivered: receipt.delivered.max(stored.delivered),
        read: receipt.read.max(stored.read),
        ..receipt.clone()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(user: &str, online: bool, last_seen_ms: u64) -> Arc<PresenceState> {
        Arc::new(PresenceState {
            user: user.into(),
            online,
            last_seen_ms: Some(last_seen_ms),
        })
    }

    /// A reply's last-seen time holds back a strictly older change that arrives
    /// after it, for a while; one as old (the user going offline then) and newer
    /// ones are shown.
    #[test]
    fn a_presence_reply_holds_back_older_changes_for_a_while() {
        let now = tokio::time::Instant::now();
        let mut floors = PresenceFloors::default();
        floors.raise(&[PresenceState::clone(&state("ann", true, 50))], now);
        let later = now + PRESENCE_FLOOR_KEEP / 2;
        let floors_then = floors.current(later);
        assert!(
            !floors_then.admit(&state("ann", true, 40)),
            "older: held back"
        );
        assert!(floors_then.admit(&state("ann", false, 50)), "as old: shown");
        assert!(floors_then.admit(&state("ann", true, 60)), "newer: shown");
        assert!(floors_then.admit(&state("bob", true, 1)), "another user");
        let lapsed = now + PRESENCE_FLOOR_KEEP;
        assert!(
            floors.current(lapsed).admit(&state("ann", true, 40)),
            "the floor lapsed"
        );
    }

    /// Batches go out at the device's phase of the interval, never closer than
    /// an interval to the last, and as soon as that allows.
    #[test]
    fn presence_batches_keep_to_their_slots() {
        let interval = Duration::from_millis(1000);
        let slots = PresenceSlots::new("ann/phone", interval);
        let origin = slots.origin;
        let start = tokio::time::Instant::now();
        assert!(
            origin >= start && origin < start + interval,
            "a phase within one interval"
        );
        assert_eq!(slots.next(start, None), origin, "the first slot");
        let ms = Duration::from_millis;
        assert_eq!(
            slots.next(origin + ms(1), None),
            origin + interval,
            "the next slot"
        );
        assert_eq!(
            slots.next(origin + interval, None),
            origin + interval,
            "a slot now"
        );
        // Taken late (at origin + 300 ms): the slot at origin + 1 s is too close.
        let taken = origin + ms(300);
        assert_eq!(
            slots.next(taken + ms(10), Some(taken)),
            origin + interval * 2
        );
        assert_eq!(
            slots.next(origin + ms(5_500), Some(taken)),
            origin + interval * 6
        );
        let other = PresenceSlots::new("bob/phone", interval);
        assert_ne!(other.origin, origin, "devices differ in phase");
    }

    /// The last change to arrive for each user is the one kept, users in order.
    #[test]
    fn the_last_presence_change_per_user_wins() {
        let arrived = vec![
            state("bob", true, 5),
            state("alice", true, 1),
            state("bob", false, 9),
            state("carol", true, 3),
            state("alice", false, 2),
        ];
        let latest: Vec<(String, bool)> = latest_per_user(arrived)
            .iter()
            .map(|s| (s.user.clone(), s.online))
            .collect();
        let expected = [("alice", false), ("bob", false), ("carol", true)];
        assert_eq!(
            latest,
            expected.map(|(u, o)| (u.to_owned(), o)).to_vec(),
            "one per user, the last to arrive"
        );
    }
}
