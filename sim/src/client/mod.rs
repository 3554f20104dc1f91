//! A simulated device speaking protocol v1 over simulated TCP, on WebSocket or on
//! the HTTP long-poll fallback (`/v1/rpc` + `/v1/poll`), and the shared progress the
//! harness reads to decide convergence.
//!
//! Each device draws from its seed how it connects: WebSocket only, long-poll only,
//! or switching between the two (at reconnects and, now and then, by choice in the
//! middle of a session), always carrying its cursors over. The same [`Device`] state
//! handles every frame whatever the transport, so the checker judges both alike.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatproof_client::{Client, ErrorReply, Request, ServerFrame};
use chatproof_server::transport::quiet::QuietIo;
use tokio::net::TcpStream;

mod device;
mod http;

use self::device::{Device, Flow};
use crate::history::DeviceKey;
use crate::options::SeedRng;
use crate::stage::{sim_ms, Directions, Recorder};

/// Messages in flight per device.
const OUTSTANDING_MAX: usize = 3;
/// A send without an ack after this is retried with the same id.
const RETRY_AFTER_MS: u64 = 1_500;
/// A connection silent for this long is dropped and re-made.
const SILENCE_MAX_MS: u64 = 6_000;
/// How long a poll asks the server to hold it (well under [`SILENCE_MAX_MS`]).
const POLL_HOLD_MS: u64 = 2_000;
/// Chance per 50 ms tick that a switching device changes transport mid-session.
const SWITCH_CHANCE_PER_TICK: f64 = 0.004;

/// How a device connects, drawn from its seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transports {
    WebSocketOnly,
    LongPollOnly,
    /// Alternates, starting on WebSocket.
    Switching,
}

/// The transport of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    WebSocket,
    LongPoll,
}

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
    /// The users it shares a conversation with at the start: it asks their
    /// presence (and watches it) at the start of every session.
    pub contacts: Vec<String>,
    /// New messages to make in the safety phase.
    pub to_send: u32,
    /// New messages to make in the calm phase (most devices make none).
    pub calm_to_send: u32,
    /// Length of the safety phase, so new messages spread over all of it.
    pub safety_secs: u64,
}

/// A protocol client over simulated TCP.
pub type SimClient = Client<QuietIo<TcpStream>>;

/// How long connecting, and then each reply of a set-up request, may take.
const CONNECT_WAIT: Duration = Duration::from_secs(2);
/// How long a set-up request waits for its reply.
const REPLY_WAIT: Duration = Duration::from_secs(3);

/// Connects to the server at `addr` and upgrades to WebSocket over simulated TCP.
pub async fn connect(addr: std::net::SocketAddr) -> Option<SimClient> {
    let stream = tokio::time::timeout(CONNECT_WAIT, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let url = format!("ws://{addr}/v1/ws");
    let client = tokio::time::timeout(CONNECT_WAIT, Client::handshake(QuietIo::new(stream), &url))
        .await
        .ok()?
        .ok()?;
    Some(client.with_reply_timeout(REPLY_WAIT))
}

/// Connects to `addr`, says hello as `device` of `token`'s user and makes `request`:
/// its reply (`Err` for an error reply), or `None` when no reply came (the
/// connection failed, the hello was refused or a reply was late).
pub async fn request_once(
    addr: std::net::SocketAddr,
    token: &str,
    device: &str,
    request: &Request<'_>,
) -> Option<Result<serde_json::Value, ErrorReply>> {
    let mut client = connect(addr).await?;
    client
        .hello_with(token, device, serde_json::json!({}))
        .await
        .ok()?;
    let reply = client.call(request).await.ok()?;
    client.close().await;
    Some(reply)
}

/// What a device runs with besides its spec: the servers it may connect to, the
/// history it records into, the directions it obeys, where it publishes its progress.
pub struct DeviceRun {
    /// Chat addresses of the servers.
    pub servers: Arc<[std::net::SocketAddr]>,
    /// The run's history.
    pub recorder: Arc<Recorder>,
    /// What the harness and the fault injector tell it.
    pub directions: Arc<Directions>,
    /// Where the harness reads its progress.
    pub progress: Arc<Mutex<Progress>>,
    /// The run's seed.
    pub seed: u64,
}

/// Runs a device until the harness says stop.
pub async fn run_device(spec: DeviceSpec, run: DeviceRun) {
    let DeviceRun {
        servers,
        recorder,
        directions,
        progress,
        seed,
    } = run;
    let mut dev = Device::new(spec, recorder, Arc::clone(&directions), progress, seed);
    dev.note(format_args!("connects by {:?}", dev.transports));
    // With several servers a device starts on one and moves when it cannot get through.
    let mut server = dev.spec.key.0 as usize % servers.len();
    let mut transport = match dev.transports {
        Transports::LongPollOnly => Transport::LongPoll,
        _ => Transport::WebSocket,
    };
    while !directions.stopped() && !directions.is_away(dev.spec.key.0) {
        let last_heard = match transport {
            Transport::WebSocket => websocket_session(&mut dev, servers[server]).await,
            Transport::LongPoll => long_poll_session(&mut dev, servers[server]).await,
        };
        let Some(last_heard) = last_heard else {
            server = (server + 1) % servers.len();
            tokio::time::sleep(Duration::from_millis(dev.rng.range(100, 600))).await;
            continue;
        };
        dev.session_ended(last_heard);
        if let Some(until) = dev.away_until.take() {
            tokio::time::sleep(Duration::from_millis(until.saturating_sub(sim_ms()))).await;
        }
        if servers.len() > 1 && dev.rng.chance(0.5) {
            server = (server + 1) % servers.len();
        }
        if dev.transports == Transports::Switching {
            transport = match transport {
                Transport::WebSocket => Transport::LongPoll,
                Transport::LongPoll => Transport::WebSocket,
            };
        }
        tokio::time::sleep(Duration::from_millis(dev.rng.range(50, 400))).await;
    }
    dev.publish_progress();
}

/// One WebSocket session; `None` if it could not connect, else when it last heard
/// from the server.
async fn websocket_session(dev: &mut Device, addr: std::net::SocketAddr) -> Option<u64> {
    let mut ws = connect(addr).await?;
    if ws.send_text(dev.hello()).await.is_err() {
        return Some(sim_ms());
    }
    dev.note(format_args!("connected, cursors {:?}", dev.cursors));
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut last_heard = sim_ms();
    'session: loop {
        tokio::select! {
            biased;
            text = ws.next_text() => {
                let Ok(text) = text else { break 'session };
                last_heard = sim_ms();
                let Ok(frame) = ServerFrame::parse(&text) else { continue };
                if let Flow::End = dev.on_frame(&frame, Transport::WebSocket) { break 'session }
            }
            _ = tick.tick() => {
                let now = sim_ms();
                if dev.session_over(now, last_heard) { break 'session }
                if dev.directions.take_disconnect(dev.spec.key) {
                    for frame in dev.drop_mid_send() {
                        let _ = ws.send_text(frame).await;
                    }
                    break 'session;
                }
                for frame in dev.tick_frames(now) {
                    if ws.send_text(frame).await.is_err() {
                        break 'session;
                    }
                }
                dev.publish_progress();
            }
        }
    }
    Some(last_heard)
}

/// One long-poll session: requests over `/v1/rpc` on one connection (in order),
/// polls over `/v1/poll` on another, each with the cursors the device holds after
/// the previous one. `None` if it could not connect, else when it last heard from
/// the server.
async fn long_poll_session(dev: &mut Device, addr: std::net::SocketAddr) -> Option<u64> {
    let auth = http::Auth {
        token: dev.spec.token.clone(),
        device: format!("d{}", dev.spec.key.1),
    };
    let mut rpc = Vec::new();
    for _ in 0..http::RPC_CONNECTIONS {
        rpc.push(http::Connection::open(addr).await?);
    }
    dev.note(format_args!(
        "connected over HTTP, cursors {:?}",
        dev.cursors
    ));
    let (requests, mut replies, workers) = http::spawn_rpc(addr, rpc, auth.clone());
    let mut poll = Box::pin(http::poll(
        addr,
        auth.clone(),
        dev.cursors.clone(),
        poll_limit(&mut dev.rng),
        true,
    ));
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut last_heard = sim_ms();
    'session: loop {
        tokio::select! {
            biased;
            answer = &mut poll => {
                let Some((200, body)) = answer else {
                    if let Some((status, body)) = answer { dev.note(format_args!("poll refused: {status} {body}")) }
                    break 'session;
                };
                last_heard = sim_ms();
                dev.online();
                let got: Vec<String> = body["entries"].as_array().into_iter().flatten().map(|e| format!("{}#{}", e["conv"].as_str().unwrap_or("?"), e["seq"])).collect();
                dev.note(format_args!("polled {got:?}, has_more {}", body["has_more"]));
                dev.paging(Some(body["has_more"].as_bool().unwrap_or(false)));
                // A poll's entries, receipts and presence are the events a WebSocket carries.
                for (field, kind) in [("entries", "msg"), ("receipts", "receipt")] {
                    for item in body[field].as_array().into_iter().flatten() {
                        let mut event = item.clone();
                        event["type"] = kind.into();
                        let text = event.to_string();
                        let Ok(frame) = ServerFrame::parse(&text) else { continue };
                        if let Flow::End = dev.on_frame(&frame, Transport::LongPoll) { break 'session }
                    }
                }
                if body["presence"].as_array().is_some_and(|states| !states.is_empty()) {
                    let text = serde_json::json!({"type": "presence", "users": body["presence"]}).to_string();
                    if let Ok(frame) = ServerFrame::parse(&text) {
                        dev.on_frame(&frame, Transport::LongPoll);
                    }
                }
                poll = Box::pin(http::poll(addr, auth.clone(), dev.cursors.clone(), poll_limit(&mut dev.rng), false));
            }
            reply = replies.recv() => {
                let Some(reply) = reply else { break 'session };
                last_heard = sim_ms();
                let Ok(frame) = ServerFrame::parse(&reply) else { continue };
                if let Flow::End = dev.on_frame(&frame, Transport::LongPoll) { break 'session }
            }
            _ = tick.tick() => {
                let now = sim_ms();
                if dev.session_over(now, last_heard) { break 'session }
                if dev.directions.take_disconnect(dev.spec.key) {
                    for frame in dev.drop_mid_send() {
                        let _ = requests.send(frame);
                    }
                    break 'session;
                }
                for frame in dev.tick_frames(now) {
                    if requests.send(frame).is_err() {
                        break 'session;
                    }
                }
                dev.publish_progress();
            }
        }
    }
    dev.paging(None);
    for worker in workers {
        worker.abort();
    }
    Some(last_heard)
}

/// Most entries a poll asks for: usually the most, sometimes a small page.
fn poll_limit(rng: &mut SeedRng) -> u64 {
    if rng.chance(0.3) {
        rng.range(1, 3)
    } else {
        500
    }
}
