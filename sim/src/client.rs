//! A simulated device speaking protocol v1 over simulated TCP, and the shared
//! progress the harness reads to decide convergence.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::cluster::{sim_ms, Shared};
use crate::history::{
    Acked, DeviceKey, FaultWindow, Page, PageKind, ReceiptSeen, Received, Sent, WindowKind,
};
use crate::options::SeedRng;

/// Messages in flight per device.
const OUTSTANDING_MAX: usize = 3;
/// A send without an ack after this is retried with the same id.
const RETRY_AFTER_MS: u64 = 1_500;
/// A connection silent for this long is dropped and re-made.
const SILENCE_MAX_MS: u64 = 6_000;

/// What the harness reads to decide whether a device has converged.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    /// Highest contiguous seq held per conversation.
    pub cursors: BTreeMap<String, u64>,
    /// Sends not yet acknowledged.
    pub outstanding: usize,
}

/// One device's fixed description.
pub struct DeviceSpec {
    /// `(user, device)`.
    pub key: DeviceKey,
    /// Token for its user.
    pub token: String,
    /// Conversations its user is in.
    pub convs: Vec<String>,
    /// New messages to make in the safety phase.
    pub to_send: u32,
    /// Length of the safety phase, so new messages spread over all of it.
    pub safety_secs: u64,
}

type Ws = WebSocketStream<TcpStream>;

/// Connects to the server at `addr` and upgrades to WebSocket over simulated TCP.
pub async fn connect(addr: std::net::SocketAddr) -> Option<Ws> {
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let url = format!("ws://{addr}/v1/ws");
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .ok()?
    .ok()?;
    Some(ws)
}

/// Sends `frame` and waits for the reply with the same rid (ignoring events).
pub async fn roundtrip(ws: &mut Ws, frame: Value) -> Option<Value> {
    let rid = frame["rid"].as_str()?.to_owned();
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .ok()?;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(3), ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(text) = next {
            let v: Value = serde_json::from_str(&text).ok()?;
            if v["rid"] == rid.as_str() {
                return Some(v);
            }
        }
    }
}

struct Pending {
    conv: String,
    /// When it was last written to a connection; `None`: due now.
    last_attempt_ms: Option<u64>,
}

/// Runs a device until the harness says stop.
pub async fn run_device(
    spec: DeviceSpec,
    shared: Arc<Shared>,
    progress: Arc<Mutex<Progress>>,
    seed: u64,
) {
    let (user, device) = spec.key;
    let mut rng = SeedRng::new(seed, 1000 + u64::from(user) * 16 + u64::from(device));
    let mut cursors: BTreeMap<String, u64> = spec.convs.iter().map(|c| (c.clone(), 0)).collect();
    // Conversations the user may send to: grows when added to a group, shrinks on leaving.
    let mut sendable: Vec<String> = spec.convs.clone();
    let me = format!("u{user}");
    // Send rids in flight, so a refusal can be matched to its message.
    let mut send_rids: BTreeMap<String, String> = BTreeMap::new();
    let mut acked_cursor: BTreeMap<String, u64> = BTreeMap::new();
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    let mut made = 0u32;
    let mut last_written: Option<(String, String)> = None;
    // `sync` and `history` requests in flight: rid -> (conv, kind, limit, asked at).
    let mut queries: BTreeMap<String, (String, PageKind, u64, u64)> = BTreeMap::new();
    // Set while the device has no working connection (a fault window for the checker).
    let mut offline_since: Option<u64> = Some(0);
    let mut rid = 0u64;
    let ticks = (spec.safety_secs * 1000 / 50).max(1) as f64;
    let send_chance = (f64::from(spec.to_send) * 1.5 / ticks).min(1.0);
    // With several servers a device starts on one and moves when it cannot get through.
    let servers = shared.servers.clone();
    let mut server = user as usize % servers.len();
    while !shared.stop_all.load(Ordering::SeqCst) {
        let Some(mut ws) = connect(servers[server]).await else {
            server = (server + 1) % servers.len();
            tokio::time::sleep(Duration::from_millis(rng.range(100, 600))).await;
            continue;
        };
        let hello = json!({"rid": "h", "op": "hello", "versions": [1], "token": spec.token,
                           "device": format!("d{device}"), "cursors": cursors});
        if ws
            .send(Message::Text(hello.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        shared.note(format!(
            "device {:?} connected, cursors {cursors:?}",
            spec.key
        ));
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut last_heard = sim_ms();
        'session: loop {
            tokio::select! {
                biased;
                frame = ws.next() => {
                    let Some(Ok(frame)) = frame else { break 'session };
                    last_heard = sim_ms();
                    let Message::Text(text) = frame else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                    match (v["type"].as_str(), v["rid"].as_str()) {
                        // Sent to a group the user has left: it will never be accepted.
                        (Some("error"), Some(r)) if r.starts_with('s') && v["code"] == "not_member" => {
                            if let Some(id) = send_rids.remove(r) {
                                shared.note(format!("device {:?} dropped {id}: not a member", spec.key));
                                pending.remove(&id);
                            }
                        }
                        (Some("ok"), Some(r)) if r.starts_with('s') => {
                            send_rids.remove(r);
                            let res = &v["result"];
                            let (Some(conv), Some(id), Some(seq)) = (res["conv"].as_str(), res["message_id"].as_str(), res["seq"].as_u64()) else { continue };
                            pending.remove(id);
                            shared.note(format!("device {:?} acked {id} seq {seq}", spec.key));
                            shared.with(|h| h.acked.push(Acked { device: spec.key, conv: conv.into(), message_id: id.into(), seq, t_ms: sim_ms() }));
                        }
                        (Some("ok"), Some(r)) if r.starts_with('q') => {
                            let Some((conv, kind, limit, asked_ms)) = queries.remove(r) else { continue };
                            let res = &v["result"];
                            let entries: Vec<(u64, String, bool)> = res["entries"].as_array().map(|a| a.iter().filter_map(|e| {
                                Some((e["seq"].as_u64()?, e["message_id"].as_str()?.to_owned(), e["body"]["kind"] == "members"))
                            }).collect()).unwrap_or_default();
                            let has_more = res["has_more"].as_bool().unwrap_or(false);
                            let seqs: Vec<u64> = entries.iter().map(|e| e.0).collect();
                            shared.note(format!("device {:?} got {kind:?} limit {limit} of {conv}: seqs {seqs:?}, has_more {has_more}", spec.key));
                            shared.with(|h| h.pages.push(Page { device: spec.key, conv, kind, limit, entries, has_more, asked_ms, t_ms: sim_ms() }));
                        }
                        // A page refused (a group the user left, a cursor past the end): nothing to judge.
                        (Some("error"), Some(r)) if r.starts_with('q') => {
                            queries.remove(r);
                        }
                        (Some("ok"), Some("h")) => {
                            if let Some(since) = offline_since.take() {
                                shared.with(|h| h.faults.push(FaultWindow { kind: WindowKind::DeviceOffline, start_ms: since, end_ms: sim_ms(), device: Some(spec.key), server: None }));
                            }
                            shared.note(format!("device {:?} hello accepted", spec.key));
                        }
                        (Some("caught_up"), _) => shared.note(format!("device {:?} caught up", spec.key)),
                        (Some("error"), Some("h")) => {
                            shared.note(format!("device {:?} hello refused: {}", spec.key, v["code"]));
                            break 'session;
                        }
                        (Some("error"), None) => break 'session,
                        (Some("msg"), _) => {
                            let (Some(conv), Some(seq)) = (v["conv"].as_str(), v["seq"].as_u64()) else { continue };
                            let id = v["message_id"].as_str().unwrap_or_default().to_owned();
                            let system = v["body"]["kind"] == "members";
                            let members = system.then(|| {
                                let action = v["body"]["action"].as_str().unwrap_or_default().to_owned();
                                let users: Vec<String> = v["body"]["users"].as_array().map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect()).unwrap_or_default();
                                (action, users)
                            });
                            if let Some((action, users)) = &members {
                                if users.contains(&me) && action == "add" && !cursors.contains_key(conv) {
                                    // Added to a group: its stream starts at this entry.
                                    cursors.insert(conv.to_owned(), seq - 1);
                                    sendable.push(conv.to_owned());
                                }
                                if users.contains(&me) && (action == "remove" || action == "leave") {
                                    sendable.retain(|c| c != conv);
                                }
                            }
                            let members = members.map(|(action, users)| (action, users.iter().filter_map(|u| u.trim_start_matches('u').parse().ok()).collect()));
                            let server_time_ms = v["server_time_ms"].as_u64().unwrap_or(0);
                            shared.with(|h| h.received.push(Received { device: spec.key, conv: conv.into(), seq, message_id: id, system, members, server_time_ms, t_ms: sim_ms() }));
                            if let Some(c) = cursors.get_mut(conv) {
                                if seq == *c + 1 {
                                    *c = seq;
                                }
                            }
                        }
                        (Some("receipt"), _) => {
                            let (Some(conv), Some(u), Some(d), Some(r)) = (v["conv"].as_str(), v["user"].as_str(), v["delivered"].as_u64(), v["read"].as_u64()) else { continue };
                            let user = u.trim_start_matches('u').parse().unwrap_or(u32::MAX);
                            shared.with(|h| h.receipts.push(ReceiptSeen { device: spec.key, conv: conv.into(), user, delivered: d, read: r }));
                        }
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    let now = sim_ms();
                    if shared.stop_all.load(Ordering::SeqCst) || now - last_heard > SILENCE_MAX_MS {
                        break 'session;
                    }
                    if shared.take_disconnect(spec.key) {
                        // Drop the connection in the middle of a send: write every
                        // unacknowledged message once more, then go without waiting.
                        for (id, p) in &pending {
                            rid += 1;
                            let frame = json!({"rid": format!("s{rid}"), "op": "send", "conv": p.conv, "message_id": id, "text": format!("hello from {user}/{device}")});
                            let _ = ws.send(Message::Text(frame.to_string().into())).await;
                        }
                        // Its ack may have been lost with the connection: retry it after reconnecting.
                        if let Some((id, conv)) = last_written.take() {
                            pending.entry(id).or_insert(Pending { conv, last_attempt_ms: None });
                        }
                        shared.note(format!("device {:?} dropped its connection mid-send", spec.key));
                        break 'session;
                    }
                    if !shared.stop_sending.load(Ordering::SeqCst) && !sendable.is_empty() && rng.chance(send_chance) {
                        // Sometimes a burst, as a user typing fast does.
                        let burst = if rng.chance(0.3) { OUTSTANDING_MAX } else { 1 };
                        let conv = sendable[rng.range(0, sendable.len() as u64 - 1) as usize].clone();
                        for _ in 0..burst {
                            if made >= spec.to_send || pending.len() >= OUTSTANDING_MAX {
                                break;
                            }
                            let id = format!("m-{user}-{device}-{made}");
                            shared.note(format!("device {:?} sends {id}", spec.key));
                            made += 1;
                            shared.with(|h| h.sent.push(Sent { device: spec.key, conv: conv.clone(), message_id: id.clone(), t_ms: now }));
                            pending.insert(id, Pending { conv: conv.clone(), last_attempt_ms: None });
                        }
                    }
                    let mut frames = Vec::new();
                    for (id, p) in pending.iter_mut().filter(|(_, p)| p.last_attempt_ms.is_none_or(|t| now - t >= RETRY_AFTER_MS)) {
                        p.last_attempt_ms = Some(now);
                        last_written = Some((id.clone(), p.conv.clone()));
                        rid += 1;
                        send_rids.insert(format!("s{rid}"), id.clone());
                        frames.push(json!({"rid": format!("s{rid}"), "op": "send", "conv": p.conv, "message_id": id, "text": format!("hello from {user}/{device}")}));
                    }
                    // Now and then a small page of `sync` or `history`, judged against what
                    // was acknowledged before it was asked.
                    if !cursors.is_empty() && rng.chance(0.01) {
                        let (conv, &c) = cursors.iter().nth(rng.range(0, cursors.len() as u64 - 1) as usize).expect("a conversation");
                        let limit = rng.range(1, 4);
                        rid += 1;
                        let (kind, frame) = if rng.chance(0.5) {
                            let after = rng.range(0, c);
                            (PageKind::Sync { after }, json!({"rid": format!("q{rid}"), "op": "sync", "conv": conv, "after": after, "limit": limit}))
                        } else if rng.chance(0.5) {
                            (PageKind::History { before: None }, json!({"rid": format!("q{rid}"), "op": "history", "conv": conv, "limit": limit}))
                        } else {
                            let before = rng.range(1, c + 1);
                            (PageKind::History { before: Some(before) }, json!({"rid": format!("q{rid}"), "op": "history", "conv": conv, "before": before, "limit": limit}))
                        };
                        queries.insert(format!("q{rid}"), (conv.clone(), kind, limit, now));
                        frames.push(frame);
                    }
                    for (conv, &c) in &cursors {
                        let last = acked_cursor.get(conv).copied().unwrap_or(0);
                        if c > last {
                            rid += 1;
                            let read = if rng.chance(0.5) { c } else { last };
                            frames.push(json!({"rid": format!("a{rid}"), "op": "ack", "conv": conv, "delivered": c, "read": read}));
                            acked_cursor.insert(conv.clone(), c);
                        } else if c > 1 && rng.chance(0.01) {
                            // A stale ack, as a client replaying an old one after a reconnect would send.
                            rid += 1;
                            frames.push(json!({"rid": format!("a{rid}"), "op": "ack", "conv": conv, "delivered": c / 2}));
                        }
                    }
                    for frame in frames {
                        if ws.send(Message::Text(frame.to_string().into())).await.is_err() {
                            break 'session;
                        }
                    }
                    *progress.lock().expect("progress") = Progress { cursors: cursors.clone(), outstanding: pending.len() };
                }
            }
        }
        offline_since.get_or_insert(last_heard);
        // Retry everything unacknowledged after the reconnect.
        for p in pending.values_mut() {
            p.last_attempt_ms = None;
        }
        acked_cursor.clear();
        send_rids.clear(); // Replies to them will not come on the next connection.
        queries.clear();
        if servers.len() > 1 && rng.chance(0.5) {
            server = (server + 1) % servers.len();
        }
        tokio::time::sleep(Duration::from_millis(rng.range(50, 400))).await;
    }
    *progress.lock().expect("progress") = Progress {
        cursors,
        outstanding: pending.len(),
    };
}
