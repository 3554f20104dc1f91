//! One simulated device's state across sessions and transports: what it holds,
//! sends and acknowledges, and how it handles every server frame.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chatproof_client::{
    Body, EntryPage, FrameKind, PresenceReply, PresenceState, Request, SendResult, ServerFrame,
};

use super::{
    DeviceSpec, Progress, Transport, Transports, OUTSTANDING_MAX, RETRY_AFTER_MS, SILENCE_MAX_MS,
    SWITCH_CHANCE_PER_TICK,
};
use crate::history::{
    Acked, CursorAck, FaultWindow, Page, PageKind, PresenceSeen, PresenceSource, ReceiptSeen,
    Received, Sent, SessionSpan, WindowKind,
};
use crate::options::SeedRng;
use crate::stage::{sim_ms, Directions, Phase, Recorder};

/// The rid of every session's `hello`.
const HELLO_RID: &str = "h";

/// An entry body's kind (`text`, `image`, `members`).
fn body_kind<'b>(body: Option<&'b Body<'_>>) -> Option<&'b str> {
    body?.kind.as_deref()
}

/// Chance per 50 ms tick that a device with calm messages left makes one.
const CALM_SEND_CHANCE: f64 = 0.1;
/// Chance that a calm sender steps away once its calm messages are acknowledged,
/// so that they are read while it is away: its next `hello` must bring the receipts.
const CALM_STEP_AWAY_CHANCE: f64 = 0.5;
/// How long such a device stays away: long enough for the others to read.
const CALM_AWAY_MS: u64 = 1_500;
/// A `presence` request unanswered (or refused) this long is asked again.
const PRESENCE_ASK_AGAIN_MS: u64 = 1_000;

/// Where a session's `presence` request (its contacts, watched) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PresenceAsk {
    /// Not asked in this session yet (or refused: ask again).
    Due,
    /// Asked at this time, no answer yet.
    Asked(u64),
    /// Answered: events keep it current.
    Answered,
}

pub(super) struct Pending {
    conv: String,
    /// When it was last written to a connection; `None`: due now.
    last_attempt_ms: Option<u64>,
}

/// One device's state across sessions and transports.
pub(super) struct Device {
    pub(super) spec: DeviceSpec,
    pub(super) recorder: Arc<Recorder>,
    pub(super) directions: Arc<Directions>,
    pub(super) progress: Arc<Mutex<Progress>>,
    pub(super) rng: SeedRng,
    pub(super) cursors: BTreeMap<String, u64>,
    /// Conversations the user may send to: grows when added to a group, shrinks on leaving.
    pub(super) sendable: Vec<String>,
    pub(super) me: String,
    /// Send rids in flight, so a refusal can be matched to its message.
    pub(super) send_rids: BTreeMap<String, String>,
    pub(super) acked_cursor: BTreeMap<String, u64>,
    pub(super) pending: BTreeMap<String, Pending>,
    pub(super) made: u32,
    /// The calm phase's budget (`made` when it began plus the calm messages).
    pub(super) calm_budget: Option<u32>,
    /// Whether it decided yet to step away after its calm messages.
    calm_away_decided: bool,
    /// Until when it stays away before connecting again.
    pub(super) away_until: Option<u64>,
    pub(super) last_written: Option<(String, String)>,
    /// `sync` and `history` requests in flight: rid -> (conv, kind, limit, asked at).
    pub(super) queries: BTreeMap<String, (String, PageKind, u64, u64)>,
    /// Set while the device has no working connection (a fault window for the checker).
    pub(super) offline_since: Option<u64>,
    /// Since when its polls answer `has_more` (see [`Device::paging`]).
    pub(super) paging_since: Option<u64>,
    /// When the current session started working (`hello` accepted, or a poll answered).
    pub(super) session_since: Option<u64>,
    /// `ack` requests in flight: rid -> index in the history's `cursor_acks`.
    pub(super) ack_rids: BTreeMap<String, usize>,
    pub(super) rid: u64,
    pub(super) presence_ask: PresenceAsk,
    pub(super) send_chance: f64,
    pub(super) transports: Transports,
}

/// What a session does after a frame or a tick.
pub(super) enum Flow {
    Go,
    /// End the session (the server refused or closed it, or the device switches).
    End,
}

impl Device {
    pub(super) fn new(
        spec: DeviceSpec,
        recorder: Arc<Recorder>,
        directions: Arc<Directions>,
        progress: Arc<Mutex<Progress>>,
        seed: u64,
    ) -> Self {
        let (user, device) = spec.key;
        let mut rng = SeedRng::new(seed, 1000 + u64::from(user) * 16 + u64::from(device));
        let transports = match rng.weighted(&[60, 15, 25]) {
            0 => Transports::WebSocketOnly,
            1 => Transports::LongPollOnly,
            _ => Transports::Switching,
        };
        let ticks = (spec.safety_secs * 1000 / 50).max(1) as f64;
        Device {
            cursors: spec.convs.iter().map(|c| (c.clone(), 0)).collect(),
            sendable: spec.convs.clone(),
            me: format!("u{user}"),
            send_chance: (f64::from(spec.to_send) * 1.5 / ticks).min(1.0),
            spec,
            recorder,
            directions,
            progress,
            rng,
            send_rids: BTreeMap::new(),
            acked_cursor: BTreeMap::new(),
            pending: BTreeMap::new(),
            made: 0,
            calm_budget: None,
            calm_away_decided: false,
            away_until: None,
            last_written: None,
            queries: BTreeMap::new(),
            offline_since: Some(0),
            paging_since: None,
            session_since: None,
            ack_rids: BTreeMap::new(),
            rid: 0,
            presence_ask: PresenceAsk::Due,
            transports,
        }
    }

    pub(super) fn note(&self, what: impl std::fmt::Display) {
        self.recorder
            .note(format!("device {:?} {what}", self.spec.key));
    }

    /// The session works: close the offline window.
    pub(super) fn online(&mut self) {
        self.session_since.get_or_insert_with(sim_ms);
        if let Some(since) = self.offline_since.take() {
            let key = self.spec.key;
            self.recorder.with(|h| {
                h.faults.push(FaultWindow {
                    kind: WindowKind::DeviceOffline,
                    start_ms: since,
                    end_ms: sim_ms(),
                    device: Some(key),
                    server: None,
                })
            });
        }
    }

    /// A poll answered `has_more` (`paging`): opens a paging window, or closes
    /// the open one when the device caught up (or its session ends, `None`).
    pub(super) fn paging(&mut self, has_more: Option<bool>) {
        match (has_more, self.paging_since) {
            (Some(true), None) => self.paging_since = Some(sim_ms()),
            (Some(false) | None, Some(since)) => {
                self.paging_since = None;
                let key = self.spec.key;
                self.recorder.with(|h| {
                    h.faults.push(FaultWindow {
                        kind: WindowKind::Paging,
                        start_ms: since,
                        end_ms: sim_ms(),
                        device: Some(key),
                        server: None,
                    })
                });
            }
            _ => {}
        }
    }

    /// Handles one server frame (a reply or an event) that `carrier` brought.
    pub(super) fn on_frame(&mut self, v: &ServerFrame<'_>, carrier: Transport) -> Flow {
        let key = self.spec.key;
        match (v.kind, v.rid()) {
            // Sent to a group the user has left: it will never be accepted.
            (FrameKind::Error, Some(r))
                if r.starts_with('s') && v.error_code() == Some("not_member") =>
            {
                if let Some(id) = self.send_rids.remove(r) {
                    self.note(format_args!("dropped {id}: not a member"));
                    self.pending.remove(&id);
                }
            }
            (FrameKind::Ok, Some(r)) if r.starts_with('s') => {
                self.send_rids.remove(r);
                let Some(SendResult {
                    conv,
                    message_id: Some(id),
                    seq,
                    ..
                }) = v.result()
                else {
                    return Flow::Go;
                };
                self.pending.remove(id.as_ref());
                self.note(format_args!("acked {id} seq {seq}"));
                self.recorder.with(|h| {
                    h.acked.push(Acked {
                        device: key,
                        conv: conv.into_owned(),
                        message_id: id.into_owned(),
                        seq,
                        t_ms: sim_ms(),
                    })
                });
            }
            (FrameKind::Ok, Some(r)) if r.starts_with('a') => {
                if let Some(i) = self.ack_rids.remove(r) {
                    self.recorder
                        .with(|h| h.cursor_acks[i].ok_ms = Some(sim_ms()));
                }
            }
            (FrameKind::Error, Some(r)) if r.starts_with('a') => {
                self.ack_rids.remove(r);
            }
            (FrameKind::Ok, Some(r)) if r.starts_with('q') => {
                let Some((conv, kind, limit, asked_ms)) = self.queries.remove(r) else {
                    return Flow::Go;
                };
                let Some(page) = v.result::<EntryPage>() else {
                    self.note(format_args!("unreadable {kind:?} page of {conv}"));
                    return Flow::Go;
                };
                let entries: Vec<(u64, String, bool)> = page
                    .entries
                    .iter()
                    .map(|e| {
                        (
                            e.seq,
                            e.message_id.clone().into_owned(),
                            body_kind(e.body.as_ref()) == Some("members"),
                        )
                    })
                    .collect();
                let has_more = page.has_more;
                let seqs: Vec<u64> = entries.iter().map(|e| e.0).collect();
                self.note(format_args!(
                    "got {kind:?} limit {limit} of {conv}: seqs {seqs:?}, has_more {has_more}"
                ));
                self.recorder.with(|h| {
                    h.pages.push(Page {
                        device: key,
                        conv,
                        kind,
                        limit,
                        entries,
                        has_more,
                        asked_ms,
                        t_ms: sim_ms(),
                    })
                });
            }
            // A page refused (a group the user left, a cursor past the end): nothing to judge.
            (FrameKind::Error, Some(r)) if r.starts_with('q') => {
                self.queries.remove(r);
            }
            (FrameKind::Ok, Some(r)) if r.starts_with('p') => {
                self.presence_ask = PresenceAsk::Answered;
                let states = v
                    .result::<PresenceReply>()
                    .map(|reply| reply.users)
                    .unwrap_or_default();
                self.record_presence(&states, PresenceSource::Reply);
            }
            (FrameKind::Error, Some(r)) if r.starts_with('p') => {
                self.presence_ask = PresenceAsk::Due;
            }
            (FrameKind::Presence, _) => {
                let source = match carrier {
                    Transport::LongPoll => PresenceSource::Poll,
                    Transport::WebSocket => PresenceSource::Event,
                };
                self.record_presence(v.users.as_deref().unwrap_or_default(), source);
            }
            (FrameKind::Ok, Some(HELLO_RID)) => {
                self.online();
                self.note("hello accepted");
            }
            (FrameKind::CaughtUp, _) => self.note("caught up"),
            (FrameKind::Error, Some(HELLO_RID)) => {
                self.note(format_args!("hello refused: {:?}", v.error_code()));
                return Flow::End;
            }
            (FrameKind::Error, None) => {
                self.note(format_args!("closed by the server: {:?}", v.error_code()));
                return Flow::End;
            }
            (FrameKind::Msg, _) => {
                let (Some(conv), Some(seq)) = (v.conv.as_deref(), v.seq) else {
                    return Flow::Go;
                };
                let id = v.message_id.as_deref().unwrap_or_default().to_owned();
                let system = body_kind(v.body.as_ref()) == Some("members");
                let members = system.then(|| {
                    let body = v.body.as_ref().expect("a members entry has a body");
                    let action = body.action.as_deref().unwrap_or_default().to_owned();
                    let users: Vec<String> = body
                        .users
                        .iter()
                        .flatten()
                        .map(|u| u.clone().into_owned())
                        .collect();
                    (action, users)
                });
                if let Some((action, users)) = &members {
                    if users.contains(&self.me)
                        && action == "add"
                        && !self.cursors.contains_key(conv)
                    {
                        // Added to a group: its stream starts at this entry.
                        self.cursors.insert(conv.to_owned(), seq - 1);
                        self.sendable.push(conv.to_owned());
                    }
                    if users.contains(&self.me) && (action == "remove" || action == "leave") {
                        self.sendable.retain(|c| c != conv);
                    }
                }
                let members = members.map(|(action, users)| {
                    (
                        action,
                        users
                            .iter()
                            .filter_map(|u| u.trim_start_matches('u').parse().ok())
                            .collect(),
                    )
                });
                let server_time_ms = v.server_time_ms.unwrap_or(0);
                self.recorder.with(|h| {
                    h.received.push(Received {
                        device: key,
                        conv: conv.into(),
                        seq,
                        message_id: id,
                        system,
                        members,
                        server_time_ms,
                        t_ms: sim_ms(),
                    })
                });
                if let Some(c) = self.cursors.get_mut(conv) {
                    if seq == *c + 1 {
                        *c = seq;
                    }
                }
            }
            (FrameKind::Receipt, _) => {
                let (all_delivered, all_read) = (v.all_delivered, v.all_read);
                let (Some(conv), Some(u), Some(d), Some(r)) =
                    (v.conv.as_deref(), v.user.as_deref(), v.delivered, v.read)
                else {
                    return Flow::Go;
                };
                let user = u.trim_start_matches('u').parse().unwrap_or(u32::MAX);
                self.note(format_args!("sees receipt of {u} in {conv}: ({d}, {r})"));
                self.recorder.with(|h| {
                    h.receipts.push(ReceiptSeen {
                        device: key,
                        conv: conv.into(),
                        user,
                        delivered: d,
                        read: r,
                        all_delivered,
                        all_read,
                        t_ms: sim_ms(),
                    })
                });
            }
            _ => {}
        }
        Flow::Go
    }

    /// Records the presence states in `states`.
    fn record_presence(&mut self, states: &[PresenceState<'_>], source: PresenceSource) {
        let device = self.spec.key;
        let t_ms = sim_ms();
        let seen: Vec<PresenceSeen> = states
            .iter()
            .filter_map(|state| {
                let user = state.user.strip_prefix('u')?.parse().ok()?;
                Some(PresenceSeen {
                    device,
                    user,
                    online: state.online,
                    last_seen_ms: state.last_seen_ms,
                    source,
                    t_ms,
                })
            })
            .collect();
        for s in &seen {
            self.note(format_args!(
                "sees u{} {} (last seen {:?}) by {source:?}",
                s.user,
                if s.online { "online" } else { "offline" },
                s.last_seen_ms
            ));
        }
        self.recorder.with(|h| h.presence.extend(seen));
    }

    pub(super) fn next_rid(&mut self, prefix: char) -> String {
        self.rid += 1;
        format!("{prefix}{}", self.rid)
    }

    /// The frames of one 50 ms tick: new sends, retries, now and then a page of
    /// `sync` or `history`, and acks.
    pub(super) fn tick_frames(&mut self, now: u64) -> Vec<String> {
        let (user, device) = self.spec.key;
        // How many messages the device may have made by now, and the chance per tick.
        let (budget, chance) = match self.directions.phase() {
            Phase::Safety => (self.spec.to_send, self.send_chance),
            Phase::Calm => {
                let made = self.made;
                let budget = *self
                    .calm_budget
                    .get_or_insert(made + self.spec.calm_to_send);
                (budget, CALM_SEND_CHANCE)
            }
            Phase::Liveness | Phase::Settle | Phase::Away => (0, 0.0),
        };
        if self.made < budget && !self.sendable.is_empty() && self.rng.chance(chance) {
            // Sometimes a burst, as a user typing fast does.
            let burst = if self.rng.chance(0.3) {
                OUTSTANDING_MAX
            } else {
                1
            };
            let conv =
                self.sendable[self.rng.range(0, self.sendable.len() as u64 - 1) as usize].clone();
            for _ in 0..burst {
                if self.made >= budget || self.pending.len() >= OUTSTANDING_MAX {
                    break;
                }
                let id = format!("m-{user}-{device}-{}", self.made);
                self.note(format_args!("sends {id}"));
                self.made += 1;
                let key = self.spec.key;
                self.recorder.with(|h| {
                    h.sent.push(Sent {
                        device: key,
                        conv: conv.clone(),
                        message_id: id.clone(),
                        t_ms: now,
                    })
                });
                self.pending.insert(
                    id,
                    Pending {
                        conv: conv.clone(),
                        last_attempt_ms: None,
                    },
                );
            }
        }
        let mut frames = Vec::new();
        // Once the session works: its contacts' presence, watched.
        let ask = match self.presence_ask {
            PresenceAsk::Due => true,
            PresenceAsk::Asked(at) => now.saturating_sub(at) >= PRESENCE_ASK_AGAIN_MS,
            PresenceAsk::Answered => false,
        };
        if ask && self.session_since.is_some() && !self.spec.contacts.is_empty() {
            let rid = self.next_rid('p');
            self.presence_ask = PresenceAsk::Asked(now);
            let ask = Request::Presence {
                users: &self.spec.contacts,
                watch: true,
            };
            frames.push(ask.encode(&rid));
        }
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.last_attempt_ms.is_none_or(|t| now - t >= RETRY_AFTER_MS))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let rid = self.next_rid('s');
            let p = self.pending.get_mut(&id).expect("due send");
            p.last_attempt_ms = Some(now);
            let conv = p.conv.clone();
            self.last_written = Some((id.clone(), conv.clone()));
            self.send_rids.insert(rid.clone(), id.clone());
            let text = format!("hello from {user}/{device}");
            frames.push(Request::send_text(&conv, &id, &text).encode(&rid));
        }
        // Now and then a small page of `sync` or `history`, judged against what
        // was acknowledged before it was asked.
        if !self.cursors.is_empty() && self.rng.chance(0.01) {
            let i = self.rng.range(0, self.cursors.len() as u64 - 1) as usize;
            let (conv, c) = self
                .cursors
                .iter()
                .nth(i)
                .map(|(k, &c)| (k.clone(), c))
                .expect("a conversation");
            let limit = self.rng.range(1, 4);
            let rid = self.next_rid('q');
            let kind = if self.rng.chance(0.5) {
                PageKind::Sync {
                    after: self.rng.range(0, c),
                }
            } else if self.rng.chance(0.5) {
                PageKind::History { before: None }
            } else {
                PageKind::History {
                    before: Some(self.rng.range(1, c + 1)),
                }
            };
            let (conv_ref, limit_asked) = (conv.as_str(), Some(limit));
            let frame = match kind {
                PageKind::Sync { after } => Request::Sync {
                    conv: conv_ref,
                    after,
                    limit: limit_asked,
                },
                PageKind::History { before } => Request::History {
                    conv: conv_ref,
                    before,
                    limit: limit_asked,
                },
            }
            .encode(&rid);
            self.queries.insert(rid, (conv, kind, limit, now));
            frames.push(frame);
        }
        let cursors: Vec<(String, u64)> =
            self.cursors.iter().map(|(k, &c)| (k.clone(), c)).collect();
        for (conv, c) in cursors {
            let last = self.acked_cursor.get(&conv).copied().unwrap_or(0);
            if c > last {
                let rid = self.next_rid('a');
                let read = if self.rng.chance(0.5) { c } else { last };
                let ack = Request::Ack {
                    conv: &conv,
                    delivered: Some(c),
                    read: Some(read),
                };
                frames.push(ack.encode(&rid));
                self.record_ack(rid, &conv, c, Some(read), now);
                self.acked_cursor.insert(conv, c);
            } else if c > 1 && self.rng.chance(0.01) {
                // A stale ack, as a client replaying an old one after a reconnect would send.
                let rid = self.next_rid('a');
                let ack = Request::Ack {
                    conv: &conv,
                    delivered: Some(c / 2),
                    read: None,
                };
                frames.push(ack.encode(&rid));
                self.record_ack(rid, &conv, c / 2, None, now);
            }
        }
        frames
    }

    /// A connection dropped in the middle of a send: every unacknowledged message
    /// is written once more, and the last one's ack may be lost with it.
    pub(super) fn drop_mid_send(&mut self) -> Vec<String> {
        let (user, device) = self.spec.key;
        let mut frames = Vec::new();
        let pending: Vec<(String, String)> = self
            .pending
            .iter()
            .map(|(id, p)| (id.clone(), p.conv.clone()))
            .collect();
        for (id, conv) in pending {
            let rid = self.next_rid('s');
            let text = format!("hello from {user}/{device}");
            frames.push(Request::send_text(&conv, &id, &text).encode(&rid));
        }
        if let Some((id, conv)) = self.last_written.take() {
            self.pending.entry(id).or_insert(Pending {
                conv,
                last_attempt_ms: None,
            });
        }
        self.note("dropped its connection mid-send");
        frames
    }

    /// What every tick checks first: stop, silence, a disconnect fault, a switch.
    pub(super) fn session_over(&mut self, now: u64, last_heard: u64) -> bool {
        if self.directions.stopped() || now - last_heard > SILENCE_MAX_MS {
            return true;
        }
        if self.directions.is_away(self.spec.key.0) {
            self.note("goes away");
            return true;
        }
        if self.steps_away_after_calm(now) {
            self.note("steps away after its calm messages");
            return true;
        }
        if self.transports == Transports::Switching && self.rng.chance(SWITCH_CHANCE_PER_TICK) {
            self.note("switches transport");
            return true;
        }
        false
    }

    /// Once its calm messages are all acknowledged, a calm sender may step away
    /// for [`CALM_AWAY_MS`] (decided once, by chance).
    fn steps_away_after_calm(&mut self, now: u64) -> bool {
        let sent_all = self
            .calm_budget
            .is_some_and(|budget| self.made >= budget && self.pending.is_empty());
        if self.calm_away_decided || self.spec.calm_to_send == 0 || !sent_all {
            return false;
        }
        self.calm_away_decided = true;
        if !self.rng.chance(CALM_STEP_AWAY_CHANCE) {
            return false;
        }
        self.away_until = Some(now + CALM_AWAY_MS);
        true
    }

    pub(super) fn publish_progress(&self) {
        *self.progress.lock().expect("progress") = Progress {
            cursors: self.cursors.clone(),
            outstanding: self.pending.len(),
        };
    }

    /// After a session, whatever ended it.
    /// Records an `ack` written now, to match its reply.
    fn record_ack(&mut self, rid: String, conv: &str, delivered: u64, read: Option<u64>, now: u64) {
        let ack = CursorAck {
            device: self.spec.key,
            conv: conv.to_owned(),
            delivered,
            read,
            sent_ms: now,
            ok_ms: None,
        };
        let i = self.recorder.with(|h| {
            h.cursor_acks.push(ack);
            h.cursor_acks.len() - 1
        });
        self.ack_rids.insert(rid, i);
    }

    pub(super) fn session_ended(&mut self, last_heard: u64) {
        if let Some(start_ms) = self.session_since.take() {
            let device = self.spec.key;
            let end_ms = sim_ms();
            self.recorder.with(|h| {
                h.sessions.push(SessionSpan {
                    device,
                    start_ms,
                    end_ms,
                })
            });
        }
        self.ack_rids.clear(); // Replies to them will not come on the next connection.
        self.offline_since.get_or_insert(last_heard);
        // Retry everything unacknowledged after the reconnect.
        for p in self.pending.values_mut() {
            p.last_attempt_ms = None;
        }
        self.acked_cursor.clear();
        self.send_rids.clear(); // Replies to them will not come on the next connection.
        self.queries.clear();
        self.presence_ask = PresenceAsk::Due;
    }

    /// The `hello` of a session, presenting the cursors the device holds.
    pub(super) fn hello(&self) -> String {
        let device = format!("d{}", self.spec.key.1);
        Request::hello(&self.spec.token, &device, Some(&self.cursors), true).encode(HELLO_RID)
    }
}
