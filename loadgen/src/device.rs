//! One simulated device: a WebSocket connection that sends on schedule (pipelined,
//! never waiting for acks) and checks and times everything it receives.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use chatproof_server::auth::TokenKey;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::acked::Acked;
use crate::run::state::RunHistograms;
use crate::wire::{Incoming, WireReader, WireWriter};
use crate::world::World;
use chatproof_client::{FrameKind, Request, SendResult, ServerFrame};
use chatproof_contract::{OrderCheck, Tally, Violation};

/// The writing half of a device's current connection, shared by its sends and its
/// reader (which answers pings).
type Writer = Arc<tokio::sync::Mutex<WireWriter>>;

/// Sends in flight per device before new sends are refused locally.
pub const PENDING_SENDS_MAX: usize = 10_000;
/// How long connecting plus catch-up may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a device's token is valid from its connect.
const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// Microseconds since the Unix epoch: the stamp carried in every message, comparable across processes.
pub fn now_us() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
}

struct Pending {
    scheduled_us: u64,
    /// The send frame, written again (same rid and message id) after a reconnect.
    frame: Arc<str>,
}

/// The rid of a device's `hello`.
const HELLO_RID: &str = "hello";

/// The request id of the `n`-th send of a device.
fn send_rid(n: u64) -> String {
    format!("s{n}")
}

/// `n` back from a send's request id.
fn parse_send_rid(rid: &str) -> Option<u64> {
    rid.strip_prefix('s')?.parse().ok()
}

/// What every device of a run shares, held once rather than per device: the
/// population (which names users and conversations), the key that mints tokens,
/// the servers, and where devices record what they observe.
pub struct DeviceContext {
    /// The run's population.
    pub world: Arc<World>,
    key: TokenKey,
    /// Never empty: user `u`'s devices connect to `targets[u % len]`.
    targets: Vec<Target>,
    stats: Arc<RunHistograms>,
    acked: Arc<Acked>,
}

impl DeviceContext {
    /// The context of a run's devices; `targets` must not be empty.
    pub fn new(
        world: Arc<World>,
        key: TokenKey,
        targets: Vec<Target>,
        (stats, acked): (Arc<RunHistograms>, Arc<Acked>),
    ) -> Self {
        assert!(!targets.is_empty(), "devices need a server");
        Self {
            world,
            key,
            targets,
            stats,
            acked,
        }
    }

    /// The server user `u`'s devices connect to.
    pub fn target_of(&self, u: u32) -> &Target {
        &self.targets[u as usize % self.targets.len()]
    }

    /// A fresh bearer token of user `u`.
    pub fn token(&self, u: u32) -> String {
        self.key.mint(
            &self.world.user_id(u),
            now_us() / 1_000_000 + TOKEN_LIFETIME_SECS,
        )
    }

    /// `user/device`, as reports name a device.
    pub fn device_name(&self, (user, device): (u32, u32)) -> String {
        format!("{}/{}", self.world.user_id(user), World::device_id(device))
    }
}

/// What a device observed; read after the run.
pub struct DeviceState {
    /// Sends waiting for their ack, by send number, ascending (a send takes its
    /// number under this state's lock, so they are pushed in order).
    pending: VecDeque<(u64, Pending)>,
    /// The number of the device's next send (its request id is `s<n>`).
    next_send: u64,
    /// The conversations the device's user is a member of, by their index in the
    /// run's world.
    convs: Box<[u32]>,
    /// Per conversation, by its index in the run's world.
    order: OrderCheck<u32>,
    /// Contract violations seen by this device.
    pub violations: Tally,
    /// Sends refused by the server or locally.
    pub send_errors: u64,
    /// Entries received.
    pub received: u64,
    /// False once the connection ended.
    pub connected: bool,
    /// `presence` frames received, and the user states they carried.
    pub presence_frames: u64,
    /// See `presence_frames`.
    pub presence_states: u64,
    /// Shortest time between two `presence` frames on one connection, µs.
    pub presence_gap_min_us: Option<u64>,
    last_presence_us: Option<u64>,
    /// Live image deliveries not yet considered for download: `(media id, size, arrival µs)`.
    pub images_received: Vec<(String, u64, u64)>,
}

impl DeviceState {
    /// Nothing observed yet by a device whose user is a member of the world's
    /// conversations `convs`.
    fn new(convs: Box<[u32]>) -> Self {
        Self {
            pending: VecDeque::new(),
            next_send: 0,
            convs,
            order: OrderCheck::default(),
            violations: Tally::default(),
            send_errors: 0,
            received: 0,
            connected: false,
            presence_frames: 0,
            presence_states: 0,
            presence_gap_min_us: None,
            last_presence_us: None,
            images_received: Vec::new(),
        }
    }

    /// True if the device holds `seq` of the world's conversation `conv`.
    pub fn holds(&self, conv: u32, seq: u64) -> bool {
        self.order.holds(&conv, seq)
    }

    /// The world index of `conv` when the device's user is a member of it.
    fn member_of(&self, world: &World, conv: &str) -> Option<u32> {
        self.convs
            .iter()
            .copied()
            .find(|&k| world.convs[k as usize].id == conv)
    }

    /// Removes and returns pending send `n`.
    fn take_pending(&mut self, n: u64) -> Option<Pending> {
        let i = self.pending.binary_search_by_key(&n, |(m, _)| *m).ok()?;
        let (_, pending) = self.pending.remove(i)?;
        if self.pending.is_empty() {
            // Most devices are idle between sends: give the buffer back.
            self.pending = VecDeque::new();
        }
        Some(pending)
    }
}

/// A connected device.
pub struct Device {
    ctx: Arc<DeviceContext>,
    /// Its user's index in the run's world.
    pub user: u32,
    /// Its index among its user's devices.
    pub device: u32,
    /// The source address its connections are made from.
    source: Option<std::net::IpAddr>,
    /// The current connection's writer (replaced by a reconnect).
    writer: Mutex<Writer>,
    /// What it observed.
    pub state: Arc<Mutex<DeviceState>>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    offline: AtomicBool,
}

/// A server the generator loads.
#[derive(Debug, Clone)]
pub struct Target {
    /// `ws://HOST:PORT/v1/ws`.
    pub url: String,
    /// Its socket address.
    pub addr: std::net::SocketAddr,
}

impl Target {
    /// `HOST:PORT` and the path of its URL.
    fn host_and_path(&self) -> anyhow::Result<(&str, &str)> {
        self.url
            .strip_prefix("ws://")
            .and_then(|rest| rest.find('/').map(|slash| rest.split_at(slash)))
            .ok_or_else(|| anyhow!("{}: not a ws://HOST:PORT/PATH URL", self.url))
    }
}

/// Why a send was not made.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The device is offline (churn); a user cannot send then.
    #[error("device offline")]
    Offline,
    /// Anything else.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Opens a session of device `who` from `source`: connect, hello with `cursors`,
/// read loop, wait for the end of catch-up.
async fn session(
    ctx: &Arc<DeviceContext>,
    who: (u32, u32),
    source: Option<std::net::IpAddr>,
    state: &Arc<Mutex<DeviceState>>,
    cursors: &BTreeMap<String, u64>,
) -> anyhow::Result<(Writer, tokio::task::JoinHandle<()>)> {
    let target = ctx.target_of(who.0);
    let (host, path) = target.host_and_path()?;
    let connect = async {
        let stream = open_tcp(target.addr, source).await?;
        crate::wire::handshake(stream, host, path)
            .await
            .with_context(|| format!("WebSocket handshake with {}", target.url))
    };
    let (reader, writer) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let token = ctx.token(who.0);
    let device = World::device_id(who.1);
    let hello = Request::hello(&token, &device, Some(cursors), false).encode(HELLO_RID);
    writer.lock().await.send_text(&hello).await?;
    let (ready_tx, ready_rx) = oneshot::channel();
    {
        let mut s = state.lock().expect("device state");
        s.connected = true;
        s.last_presence_us = None; // Gaps are per connection.
    }
    let reader = tokio::spawn(read_loop(
        reader,
        Arc::clone(&writer),
        Arc::clone(state),
        (Arc::clone(ctx), who),
        ready_tx,
    ));
    let name = || ctx.device_name(who);
    match tokio::time::timeout(CONNECT_TIMEOUT, ready_rx).await {
        Ok(Ok(Ok(()))) => Ok((writer, reader)),
        Ok(Ok(Err(why))) => bail!("{}: {why}", name()),
        Ok(Err(_)) => bail!("{}: connection closed during hello", name()),
        Err(_) => bail!("{}: catch-up did not finish in {CONNECT_TIMEOUT:?}", name()),
    }
}

/// Source addresses used on loopback, so that one generator is not limited to one
/// address's ephemeral ports: 127.0.0.2 to 127.0.0.251.
pub const LOOPBACK_SOURCES: u32 = 250;

/// The source address for the `k`-th connection to `target`: spread over
/// [`LOOPBACK_SOURCES`] loopback addresses when the target is on IPv4 loopback.
pub fn source_for(target: std::net::SocketAddr, k: u64) -> Option<std::net::IpAddr> {
    match target.ip() {
        std::net::IpAddr::V4(v4) if v4.is_loopback() => {
            let last = 2 + (k % u64::from(LOOPBACK_SOURCES)) as u8;
            Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                127, 0, 0, last,
            )))
        }
        _ => None,
    }
}

/// TCP connect to `target` from `source` when given, without Nagle's delay.
pub async fn open_tcp(
    target: std::net::SocketAddr,
    source: Option<std::net::IpAddr>,
) -> anyhow::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket
            .bind(std::net::SocketAddr::new(ip, 0))
            .with_context(|| format!("binding source address {ip}"))?;
    }
    let stream = socket
        .connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Device {
    /// Connects device `device` of user `user` (both indexes in the run's world),
    /// member of the world's conversations `convs`, from `source`; says hello and
    /// waits for the end of catch-up.
    pub async fn connect(
        ctx: &Arc<DeviceContext>,
        (user, device): (u32, u32),
        convs: Box<[u32]>,
        source: Option<std::net::IpAddr>,
    ) -> anyhow::Result<Arc<Self>> {
        let state = Arc::new(Mutex::new(DeviceState::new(convs)));
        let (writer, reader) =
            session(ctx, (user, device), source, &state, &BTreeMap::new()).await?;
        Ok(Arc::new(Self {
            ctx: Arc::clone(ctx),
            user,
            device,
            source,
            writer: Mutex::new(writer),
            state,
            reader: Mutex::new(Some(reader)),
            offline: AtomicBool::new(false),
        }))
    }

    /// `user/device`, for reports and logs.
    pub fn name(&self) -> String {
        self.ctx.device_name((self.user, self.device))
    }

    /// The current connection's writer.
    fn writer(&self) -> Writer {
        Arc::clone(&self.writer.lock().expect("writer"))
    }

    /// Goes offline: closes the connection and waits until its reader has stopped.
    pub async fn go_offline(&self) {
        self.offline.store(true, Ordering::SeqCst);
        let _ = self.writer().lock().await.close().await;
        let reader = self.reader.lock().expect("reader").take();
        if let Some(reader) = reader {
            if tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .is_err()
            {
                tracing::warn!(device = self.name(), "reader did not stop after close");
            }
        }
        self.state.lock().expect("device state").connected = false;
    }

    /// Comes back: reconnects presenting the cursors it holds, waits for the end of
    /// catch-up (returning how long that took), then retries every unacknowledged send
    /// with its original id.
    pub async fn reconnect(&self) -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        let cursors: BTreeMap<String, u64> = self
            .state
            .lock()
            .expect("device state")
            .order
            .cursors()
            .into_iter()
            .map(|(k, seq)| (self.ctx.world.convs[k as usize].id.clone(), seq))
            .collect();
        let who = (self.user, self.device);
        let (writer, reader) = session(&self.ctx, who, self.source, &self.state, &cursors).await?;
        let took = started.elapsed();
        *self.writer.lock().expect("writer") = Arc::clone(&writer);
        *self.reader.lock().expect("reader") = Some(reader);
        self.offline.store(false, Ordering::SeqCst);
        let frames: Vec<Arc<str>> = self
            .state
            .lock()
            .expect("device state")
            .pending
            .iter()
            .map(|(_, p)| p.frame.clone())
            .collect();
        let mut writer = writer.lock().await;
        for frame in frames {
            writer.send_text(&frame).await?;
        }
        Ok(took)
    }

    /// A fresh bearer token of this device's user.
    pub fn token(&self) -> String {
        self.ctx.token(self.user)
    }

    /// Whether the device is offline (churn).
    pub fn is_offline(&self) -> bool {
        self.offline.load(Ordering::SeqCst)
    }

    /// Sends a message scheduled at `scheduled_us` without waiting for its ack: a
    /// text, or (with `media`) an uploaded image with `text` as its caption.
    pub async fn send(
        &self,
        conv: &str,
        message_id: &str,
        text: &str,
        media: Option<&str>,
        scheduled_us: u64,
    ) -> Result<(), SendError> {
        if self.offline.load(Ordering::SeqCst) {
            return Err(SendError::Offline);
        }
        let (n, frame) = {
            let mut state = self.state.lock().expect("device state");
            if state.pending.len() >= PENDING_SENDS_MAX {
                state.send_errors += 1;
                return Err(anyhow!(
                    "{}: {PENDING_SENDS_MAX} sends already waiting for acks",
                    self.name()
                )
                .into());
            }
            let n = state.next_send;
            state.next_send += 1;
            let frame = Request::Send {
                conv,
                message_id,
                text: Some(text),
                media,
            };
            let frame = Arc::<str>::from(frame.encode(&send_rid(n)));
            let pending = Pending {
                scheduled_us,
                frame: frame.clone(),
            };
            state.pending.push_back((n, pending));
            (n, frame)
        };
        let sent = self.writer().lock().await.send_text(&frame).await;
        if let Err(e) = sent {
            let mut state = self.state.lock().expect("device state");
            state.take_pending(n);
            state.send_errors += 1;
            return Err(anyhow!("{}: {e}", self.name()).into());
        }
        Ok(())
    }

    /// Sends still waiting for an ack.
    pub fn pending(&self) -> usize {
        self.state.lock().expect("device state").pending.len()
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self.writer().lock().await.close().await;
    }
}

/// Reads the connection of device `who` until it ends: answers pings, and checks
/// and times every frame ([`observe`]); says on `ready` when catch-up ended (or why
/// it failed).
///
/// This is the one task every connected device keeps, so its future is kept small:
/// reads are polled in place ([`WireReader::poll_read`]), pongs are boxed.
async fn read_loop(
    mut reader: WireReader,
    writer: Writer,
    state: Arc<Mutex<DeviceState>>,
    (ctx, who): (Arc<DeviceContext>, (u32, u32)),
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    let mut pings: Vec<Vec<u8>> = Vec::new();
    loop {
        let read = std::future::poll_fn(|cx| {
            reader.poll_read(cx, &mut |incoming| match incoming {
                Incoming::Text(text) => observe(text, &state, (&ctx, who), &mut ready),
                Incoming::Ping(payload) => pings.push(payload.to_vec()),
            })
        })
        .await;
        if !pings.is_empty() {
            Box::pin(answer_pings(&writer, &mut pings)).await;
        }
        match read {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::debug!(device = ctx.device_name(who), error = %e, "connection ended");
                break;
            }
        }
    }
    state.lock().expect("device state").connected = false;
    if let Some(r) = ready.take() {
        let _ = r.send(Err("connection closed".into()));
    }
}

/// Answers each ping in `pings` (emptied) with its pong.
async fn answer_pings(writer: &Writer, pings: &mut Vec<Vec<u8>>) {
    let mut writer = writer.lock().await;
    for payload in pings.drain(..) {
        // A failed pong shows as the end of the stream on the next read.
        let _ = writer.pong(&payload).await;
    }
}

/// Checks and times one frame from the server (acks into `acked`, latencies into
/// `stats`) by device `who`. `ready` is taken when catch-up ends.
fn observe(
    text: &str,
    state: &Mutex<DeviceState>,
    (ctx, who): (&DeviceContext, (u32, u32)),
    ready: &mut Option<oneshot::Sender<Result<(), String>>>,
) {
    let (stats, acked, world) = (&*ctx.stats, &*ctx.acked, &*ctx.world);
    let name = || ctx.device_name(who);
    let Ok(event) = ServerFrame::parse(text) else {
        return;
    };
    let now = now_us();
    let mut s = state.lock().expect("device state");
    match (event.kind, event.rid()) {
        (FrameKind::Error, Some(HELLO_RID)) => {
            let why = format!(
                "hello refused: {} {}",
                event.code.as_deref().unwrap_or("?"),
                event.message.as_deref().unwrap_or("")
            );
            if let Some(r) = ready.take() {
                let _ = r.send(Err(why));
            }
        }
        (_, Some(HELLO_RID)) => {}
        (FrameKind::Ok, Some(rid)) => {
            if let Some(p) = parse_send_rid(rid).and_then(|n| s.take_pending(n)) {
                stats
                    .shard()
                    .lock()
                    .expect("stats")
                    .record_ack(p.scheduled_us, now);
                match event.result::<SendResult>() {
                    Some(sent) => match s.member_of(world, &sent.conv) {
                        Some(index) => {
                            acked.record(index, sent.seq);
                        }
                        // It sends only to its conversations: an ack naming another
                        // is the server's mistake, and nothing can be expected of it.
                        None => s.violations.record(Violation::Phantom, || {
                            format!(
                                "{} got an ack for {} seq {}, a conversation it is not in",
                                name(),
                                sent.conv,
                                sent.seq
                            )
                        }),
                    },
                    None => s.send_errors += 1,
                }
            }
        }
        (FrameKind::Error, Some(rid))
            if parse_send_rid(rid).is_some_and(|n| s.take_pending(n).is_some()) =>
        {
            s.send_errors += 1;
            tracing::debug!(device = name(), code = ?event.code, "send refused");
        }
        (FrameKind::Msg, _) => {
            s.received += 1;
            let conv = event.conv.as_deref().unwrap_or_default();
            let seq = event.seq.unwrap_or(0);
            let member = s.member_of(world, conv);
            let DeviceState {
                order, violations, ..
            } = &mut *s;
            match member {
                None => violations.record(Violation::Phantom, || {
                    format!(
                        "{} received {conv} seq {seq} without being a member",
                        name()
                    )
                }),
                Some(index) => {
                    if let Err(fault) = order.observe(&index, seq) {
                        violations.record(fault.violation, || fault.describe(&name(), conv, seq));
                    }
                }
            }
            let Some(body) = event.body else { return };
            if body.kind.as_deref() == Some("image") && ready.is_none() {
                if let Some(media) = &body.media {
                    s.images_received
                        .push((media.id.clone().into_owned(), media.size, now));
                }
            }
            let stamp = body
                .text
                .as_deref()
                .or(body.caption.as_deref())
                .and_then(|t| t.strip_prefix("lg:"))
                .and_then(|t| t.split(':').next());
            if let Some(scheduled_us) = stamp.and_then(|t| t.parse::<u64>().ok()) {
                // Entries streamed before `caught_up` waited for this device to come back.
                stats.shard().lock().expect("stats").record_delivery(
                    scheduled_us,
                    now,
                    ready.is_some(),
                );
            }
        }
        (FrameKind::Presence, _) => {
            s.presence_frames += 1;
            s.presence_states += event.users.map_or(0, |u| u.len() as u64);
            if let Some(last) = s.last_presence_us.replace(now) {
                let gap = now.saturating_sub(last);
                s.presence_gap_min_us = Some(s.presence_gap_min_us.map_or(gap, |g| g.min(gap)));
            }
        }
        (FrameKind::CaughtUp, _) => {
            if let Some(r) = ready.take() {
                let _ = r.send(Ok(()));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(n: u64) -> (u64, Pending) {
        let frame = Arc::from(format!("frame {n}"));
        (
            n,
            Pending {
                scheduled_us: n,
                frame,
            },
        )
    }

    /// Acks arrive in any order: each takes its own send, a second ack of the same
    /// send takes nothing, and an idle device gives its queue's buffer back.
    #[test]
    fn pending_sends_are_taken_by_number_in_any_order() {
        let mut state = DeviceState::new(Box::new([0]));
        state.pending.extend((0..5).map(pending));
        for n in [3, 0, 4] {
            assert_eq!(state.take_pending(n).map(|p| p.scheduled_us), Some(n));
            assert!(state.take_pending(n).is_none(), "send {n} taken twice");
        }
        assert_eq!(
            state.pending.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(state.take_pending(7).is_none());
        state.take_pending(1);
        state.take_pending(2);
        assert!(state.pending.is_empty());
        assert_eq!(
            state.pending.capacity(),
            0,
            "the buffer is returned when idle"
        );
    }
}
