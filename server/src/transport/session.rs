//! One WebSocket session: `hello`, then requests, pushes and catch-up on one socket.
//!
//! Every entry reaches the device through its [`DeviceStream`], so the device
//! sees each conversation in seq order, without gaps or duplicates, whether an
//! entry arrives by catch-up, by a live push, or by a fill after a missed push.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::domain::{DeviceStream, StreamStep};
use crate::hub::{ConnId, DeviceQueue, Push};
use crate::metrics::LimitHit;
use crate::protocol::{
    decode_request, validate_device_id, Body, Entry, ErrorCode, HelloRequest, MemberAction,
    PresenceState, ProtocolError, Receipt, Request, ServerFrame, PROTOCOL_VERSION,
};
use crate::service::{Caller, ChatService};

type WsResult<T> = Result<T, WsError>;

/// Why the session loop ended, for logs.
#[derive(Debug)]
enum End {
    ClientClosed,
    /// Closes after an error frame that was already sent.
    Replied(ProtocolError),
    Error(ProtocolError),
    Transport(#[allow(dead_code, reason = "read through Debug in logs")] WsError),
    Idle,
}

struct Session<S> {
    ws: WebSocketStream<S>,
    service: Arc<ChatService>,
    caller: Option<Caller>,
    stream: DeviceStream,
    catch_up: VecDeque<String>,
    caught_up_sent: bool,
    hub_rx: Option<(ConnId, DeviceQueue)>,
    /// Highest receipt written per (conv, user): receipts computed on different
    /// servers may arrive out of order, and a device never sees one go back.
    receipts_shown: HashMap<(String, String), Receipt>,
    /// When to retry a resync (or a gap fill) that failed on a store error.
    resync_retry_at: Option<tokio::time::Instant>,
    /// Receipts not yet written (the latest per conversation and user), and when
    /// to write them: receipts of a burst of acks leave together.
    receipts_pending: BTreeMap<(String, String), Utf8Bytes>,
    /// See `receipts_pending`.
    receipts_flush_at: Option<tokio::time::Instant>,
    /// Frames were fed to the socket but not flushed yet.
    unflushed: bool,
    /// Presence changes not yet written, the latest per user.
    presence_pending: BTreeMap<String, PresenceState>,
    /// When to write them: at most one `presence` frame per presence interval.
    presence_flush_at: Option<tokio::time::Instant>,
}

/// Live events handled before the socket is flushed: a burst goes out in few writes.
const PUSH_BATCH_LEN_MAX: usize = 64;
/// Receipts wait this long for others to leave with them (a group's members
/// acknowledging one message within moments of each other).
const RECEIPT_BATCH_WINDOW: Duration = Duration::from_millis(50);

/// How long after a failed resync or gap fill the session tries again.
const RESYNC_RETRY_AFTER: Duration = Duration::from_millis(500);

/// Runs one session until the client leaves, an error closes it, or shutdown.
pub async fn run<S>(
    ws: WebSocketStream<S>,
    service: Arc<ChatService>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    service.metrics().connections.inc();
    let mut session = Session {
        ws,
        service: Arc::clone(&service),
        caller: None,
        stream: DeviceStream::default(),
        catch_up: VecDeque::new(),
        caught_up_sent: false,
        hub_rx: None,
        receipts_shown: HashMap::new(),
        resync_retry_at: None,
        presence_pending: BTreeMap::new(),
        presence_flush_at: None,
        receipts_pending: BTreeMap::new(),
        receipts_flush_at: None,
        unflushed: false,
    };
    let end = session.drive(&mut shutdown).await;
    if let Some(caller) = &session.caller {
        tracing::debug!(
            user = caller.user,
            device = caller.device,
            ?end,
            "session ended"
        );
    }
    if let End::Error(e) = &end {
        let _ = tokio::time::timeout(Duration::from_secs(1), session.reply_error(None, e.clone()))
            .await;
    }
    let close = match &end {
        End::Error(e) | End::Replied(e) => Some(CloseFrame {
            code: if e.code == ErrorCode::FrameTooLarge {
                CloseCode::Size
            } else if e.code == ErrorCode::ShuttingDown {
                CloseCode::Away
            } else {
                CloseCode::Policy
            },
            reason: Utf8Bytes::from(e.message.clone()),
        }),
        End::Idle => Some(CloseFrame {
            code: CloseCode::Away,
            reason: Utf8Bytes::from_static("idle timeout"),
        }),
        End::ClientClosed | End::Transport(_) => None,
    };
    if let Some(frame) = close {
        let _ = tokio::time::timeout(Duration::from_secs(1), session.ws.close(Some(frame))).await;
    }
    service.metrics().connections.dec();
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn drive(&mut self, shutdown: &mut watch::Receiver<bool>) -> End {
        let idle = self.service.limits().idle_timeout;
        let mut ping_every = tokio::time::interval(idle / 3);
        let mut last_heard = tokio::time::Instant::now();
        let hello_by = last_heard + self.service.limits().hello_timeout;
        let end = loop {
            let catching_up = !self.catch_up.is_empty();
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    break End::Error(ProtocolError::new(ErrorCode::ShuttingDown, "server shutting down"));
                }
                incoming = self.ws.next() => {
                    last_heard = tokio::time::Instant::now();
                    match incoming {
                        None => break End::ClientClosed,
                        Some(Err(WsError::Capacity(e))) => {
                            break End::Error(ProtocolError::new(ErrorCode::FrameTooLarge, format!("frame too large: {e}")));
                        }
                        Some(Err(e)) => break End::Transport(e),
                        Some(Ok(Message::Text(text))) => {
                            match self.on_text(&text).await {
                                Ok(None) => {}
                                Ok(Some(end)) => break end,
                                Err(e) => break End::Transport(e),
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let err = ProtocolError::new(ErrorCode::BadFrame, "binary frames are not part of protocol v1; send JSON text");
                            if let Err(e) = self.reply_error(None, err).await { break End::Transport(e) }
                        }
                        Some(Ok(Message::Close(_))) => break End::ClientClosed,
                        Some(Ok(_)) => {} // Ping (answered by tungstenite), Pong, raw frames.
                    }
                }
                push = recv(&mut self.hub_rx) => {
                    match self.on_pushes(push).await {
                        Ok(None) => {}
                        Ok(Some(end)) => break end,
                        Err(e) => break End::Transport(e),
                    }
                }
                _ = sleep_until_some(self.receipts_flush_at), if self.receipts_flush_at.is_some() => {
                    if let Err(e) = self.flush_receipts().await { break End::Transport(e) }
                }
                _ = sleep_until_some(self.presence_flush_at), if self.presence_flush_at.is_some() => {
                    if let Err(e) = self.flush_presence().await { break End::Transport(e) }
                }
                _ = sleep_until_some(self.resync_retry_at), if self.resync_retry_at.is_some() => {
                    self.resync().await;
                }
                () = tokio::time::sleep_until(hello_by), if self.caller.is_none() => {
                    self.service.metrics().count_closed_for(crate::metrics::ClosedFor::HelloTimeout);
                    let secs = self.service.limits().hello_timeout.as_secs_f64();
                    break End::Error(ProtocolError::new(
                        ErrorCode::HelloTimeout,
                        format!("no successful hello within {secs} s of connecting; closing"),
                    ));
                }
                _ = std::future::ready(()), if catching_up => {
                    if let Err(e) = self.catch_up_one_page().await { break End::Transport(e) }
                }
                _ = ping_every.tick() => {
                    if last_heard.elapsed() > idle { break End::Idle }
                    if let Err(e) = self.ws.send(Message::Ping(Default::default())).await { break End::Transport(e) }
                }
            }
        };
        if let (Some(caller), Some((conn, _))) = (&self.caller, &self.hub_rx) {
            let hub = self.service.hub();
            hub.unregister(&caller.user, *conn);
            if let Some(fabric) = self.service.fabric() {
                if !hub.device_online(&caller.user, &caller.device) {
                    fabric.device_disconnected(&caller.user, &caller.device);
                }
            }
            self.service.device_down(&caller.user);
        }
        end
    }

    /// Handles `first` and whatever else is already queued (up to a batch), then
    /// flushes the socket once; `Some(end)` closes the session.
    async fn on_pushes(&mut self, first: Option<Push>) -> WsResult<Option<End>> {
        let mut next = first;
        for _ in 0..PUSH_BATCH_LEN_MAX {
            match next.take() {
                None => {
                    return Ok(Some(End::Error(ProtocolError::new(
                        ErrorCode::SlowConsumer,
                        "too far behind on live events; reconnect to catch up",
                    ))))
                }
                Some(Push::Close(err)) => return Ok(Some(End::Error(err))),
                Some(Push::Frame(frame)) => self.feed(Message::Text(frame)).await?,
                Some(Push::Receipt(receipt, frame)) => {
                    let key = (receipt.conv.clone(), receipt.user.clone());
                    // Only receipts routed between servers can be stale across a
                    // reconnect: one server publishes its receipts in order.
                    let (receipt, frame) = if self.receipts_shown.contains_key(&key)
                        || self.service.fabric().is_none()
                    {
                        (receipt, frame)
                    } else {
                        with_stored_floor(Arc::clone(&self.service), receipt, frame).await
                    };
                    self.on_receipt(&receipt, frame);
                }
                Some(Push::Entry(entry, frame)) => self.on_push(&entry, frame).await?,
                Some(Push::Resync) => self.resync().await,
                Some(Push::Presence(states)) => self.on_presence(&states),
            }
            match self.hub_rx.as_mut().map(|(_, rx)| rx.try_recv()) {
                Some(Ok(push)) => next = Some(push),
                // Empty, or closed (the next receive reports it).
                _ => break,
            }
        }
        self.flush_fed().await?;
        Ok(None)
    }

    /// Queues a frame on the socket without flushing it.
    async fn feed(&mut self, message: Message) -> WsResult<()> {
        self.unflushed = true;
        self.ws.feed(message).await
    }

    /// Flushes what was fed, if anything (an empty flush would still cost a write).
    async fn flush_fed(&mut self) -> WsResult<()> {
        if std::mem::take(&mut self.unflushed) {
            self.ws.flush().await?;
        }
        Ok(())
    }

    /// Keeps the latest state per user until the next presence frame is due.
    fn on_presence(&mut self, states: &[Arc<PresenceState>]) {
        for state in states {
            self.presence_pending
                .insert(state.user.clone(), PresenceState::clone(state));
        }
        if self.presence_flush_at.is_none() {
            let interval = self.service.limits().presence_interval;
            self.presence_flush_at = Some(tokio::time::Instant::now() + interval);
        }
    }

    /// Writes the pending presence changes as one frame.
    async fn flush_presence(&mut self) -> WsResult<()> {
        self.presence_flush_at = None;
        let users: Vec<PresenceState> = std::mem::take(&mut self.presence_pending)
            .into_values()
            .collect();
        if users.is_empty() {
            return Ok(());
        }
        let frame = ServerFrame::Presence { users }.to_json();
        self.ws.send(Message::Text(frame.into())).await
    }

    async fn reply_ok(&mut self, rid: String, result: serde_json::Value) -> WsResult<()> {
        let frame = ServerFrame::Ok { rid, result };
        self.ws.send(Message::Text(frame.to_json().into())).await
    }

    async fn reply_error(&mut self, rid: Option<String>, err: ProtocolError) -> WsResult<()> {
        self.service.metrics().count_error(err.code);
        self.ws
            .send(Message::Text(ServerFrame::error(rid, err).to_json().into()))
            .await
    }

    /// Handles one text frame; `Some(end)` closes the session.
    async fn on_text(&mut self, text: &str) -> WsResult<Option<End>> {
        let (rid, request) = match decode_request(text) {
            Ok(decoded) => decoded,
            Err((rid, err)) => {
                self.reply_error(rid, err).await?;
                return Ok(None);
            }
        };
        let Some(caller) = self.caller.clone() else {
            return match request {
                Request::Hello(hello) => self.hello(rid, hello).await,
                _ => {
                    let err = ProtocolError::new(ErrorCode::HelloRequired, "send hello first");
                    self.reply_error(Some(rid), err).await.map(|()| None)
                }
            };
        };
        match self.dispatch(&caller, request).await {
            Ok(result) => self.reply_ok(rid, result).await?,
            Err(err) => self.reply_error(Some(rid), err).await?,
        }
        Ok(None)
    }

    async fn dispatch(
        &mut self,
        caller: &Caller,
        request: Request,
    ) -> Result<serde_json::Value, ProtocolError> {
        if matches!(request, Request::Hello(_)) {
            return Err(ProtocolError::new(
                ErrorCode::AlreadyAuthenticated,
                "hello was already accepted",
            ));
        }
        Arc::clone(&self.service).dispatch(caller, request).await
    }

    /// Authenticates, registers the device, and starts catch-up.
    async fn hello(&mut self, rid: String, hello: HelloRequest) -> WsResult<Option<End>> {
        let svc = Arc::clone(&self.service);
        if !hello.versions.contains(&PROTOCOL_VERSION) {
            let err = ProtocolError::new(
                ErrorCode::UnsupportedVersion,
                format!("this server speaks protocol versions [{PROTOCOL_VERSION}]"),
            );
            self.reply_error(Some(rid), err.clone()).await?;
            return Ok(Some(End::Replied(err)));
        }
        let claims = match svc
            .tokens()
            .verify(&hello.token, svc.clock().now_ms() / 1000)
        {
            Ok(claims) => claims,
            Err(err) => {
                self.reply_error(Some(rid), err.clone()).await?;
                return Ok(Some(End::Replied(err)));
            }
        };
        if let Err(err) = validate_device_id(&hello.device) {
            return self.reply_error(Some(rid), err).await.map(|()| None);
        }
        let caller = Caller {
            user: claims.sub,
            device: hello.device,
        };
        // Register before reading state: anything sequenced later is pushed,
        // anything earlier is in the store, so nothing falls between.
        let registered = svc
            .hub()
            .register(&caller.user, &caller.device, svc.limits());
        let (conn, rx) = match registered {
            Ok(registered) => registered,
            Err(err) => {
                svc.metrics().count_limit_hit(LimitHit::DevicesPerUser);
                self.reply_error(Some(rid), err.clone()).await?;
                return Ok(Some(End::Replied(err)));
            }
        };
        if let Some(fabric) = svc.fabric() {
            // Other servers must route to this device before its catch-up reads the store.
            if let Err(e) = fabric.device_connected(&caller.user, &caller.device).await {
                tracing::error!(error = %e, "cannot register the device in the cluster");
                svc.hub().unregister(&caller.user, conn);
                let err = ProtocolError::new(
                    ErrorCode::Internal,
                    "the cluster registry is unavailable; retry hello",
                );
                return self.reply_error(Some(rid), err).await.map(|()| None);
            }
        }
        let started = self.start_streams(&caller, &hello.cursors).await;
        let states = match started {
            Ok(states) => states,
            Err(err) => {
                svc.hub().unregister(&caller.user, conn);
                self.stream = DeviceStream::default();
                self.catch_up.clear();
                return self.reply_error(Some(rid), err).await.map(|()| None);
            }
        };
        self.hub_rx = Some((conn, rx));
        let result = json!({
            "version": PROTOCOL_VERSION,
            "user": caller.user,
            "device": caller.device,
            "server_time_ms": svc.clock().now_ms(),
            "conversations": ChatService::summaries(&caller, &states),
        });
        svc.device_up(&caller.user);
        self.caller = Some(caller);
        self.reply_ok(rid, result).await?;
        if self.catch_up.is_empty() {
            self.send_caught_up().await?;
        }
        Ok(None)
    }

    async fn start_streams(
        &mut self,
        caller: &Caller,
        cursors: &BTreeMap<String, u64>,
    ) -> Result<Vec<crate::store::ConvState>, ProtocolError> {
        let svc = Arc::clone(&self.service);
        let states = svc.conversations(caller).await?;
        svc.check_cursors(caller, &states, cursors).await?;
        for state in &states {
            let conv = &state.record.id;
            let m = state.record.require_reader(&caller.user)?;
            let start = svc
                .stream_start(caller, state, cursors.get(conv).copied(), true)
                .await?;
            self.stream.start(conv, start, m.visible_until());
            if start <= state.last_seq.min(m.visible_until()) {
                self.catch_up.push_back(conv.clone());
            }
        }
        Ok(states)
    }

    async fn send_caught_up(&mut self) -> WsResult<()> {
        self.caught_up_sent = true;
        let frame = ServerFrame::CaughtUp {}.to_json();
        self.ws.send(Message::Text(frame.into())).await
    }

    /// Sends the next page of the first conversation still behind.
    async fn catch_up_one_page(&mut self) -> WsResult<()> {
        let conv = self
            .catch_up
            .front()
            .expect("catch-up queue is not empty")
            .clone();
        let svc = Arc::clone(&self.service);
        let page = svc.limits().page_len_max;
        let (Some(next), Some(until)) = (
            self.stream.next_seq(&conv),
            self.stream.visible_until(&conv),
        ) else {
            self.catch_up.pop_front();
            return Ok(());
        };
        match svc.store().read_after(&conv, next - 1, until, page).await {
            Ok(entries) => {
                let full_page = entries.len() == page as usize;
                for entry in entries {
                    self.write_stored(entry, false).await?;
                }
                self.flush_fed().await?;
                if !full_page {
                    self.catch_up.pop_front();
                }
            }
            Err(e) => {
                tracing::error!(conv, error = %e, "catch-up read failed; retrying on the next turn");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if self.catch_up.is_empty() && !self.caught_up_sent {
            self.send_caught_up().await?;
        }
        Ok(())
    }

    /// Writes an entry read from the store, if the device does not have it yet.
    async fn write_stored(&mut self, entry: Entry, flush: bool) -> WsResult<()> {
        let next = self
            .stream
            .next_seq(&entry.conv)
            .expect("started conversation");
        if entry.seq < next || entry.seq > self.stream.visible_until(&entry.conv).unwrap_or(0) {
            return Ok(());
        }
        let entry = Arc::new(entry);
        let frame = Utf8Bytes::from(ServerFrame::Msg(Arc::clone(&entry)).to_json());
        self.write_entry(&entry, frame, flush).await
    }

    async fn write_entry(&mut self, entry: &Entry, frame: Utf8Bytes, flush: bool) -> WsResult<()> {
        if flush {
            self.ws.send(Message::Text(frame)).await?;
        } else {
            self.feed(Message::Text(frame)).await?;
        }
        self.stream.delivered(&entry.conv, entry.seq);
        let svc = &self.service;
        svc.metrics().messages_out.inc();
        let lag_ms = svc.clock().now_ms().saturating_sub(entry.server_time_ms);
        svc.metrics()
            .delivery_latency
            .observe(lag_ms as f64 / 1000.0);
        if self.concerns_me(entry, &[MemberAction::Remove, MemberAction::Leave]) {
            self.stream.close_at(&entry.conv, entry.seq);
        }
        Ok(())
    }

    fn concerns_me(&self, entry: &Entry, actions: &[MemberAction]) -> bool {
        let Body::Members { action, users } = &entry.body else {
            return false;
        };
        let me = &self.caller.as_ref().expect("authenticated").user;
        actions.contains(action) && users.contains(me)
    }

    /// A live push: deliver, drop, or fill the gap before it from the store.
    async fn on_push(&mut self, entry: &Arc<Entry>, frame: Utf8Bytes) -> WsResult<()> {
        // Added to a group: the stream starts at the add entry, unless it already
        // covers it (catch-up after hello may have started it and delivered it).
        let covered = self
            .stream
            .visible_until(&entry.conv)
            .is_some_and(|until| until >= entry.seq);
        if self.concerns_me(entry, &[MemberAction::Add]) && !covered {
            self.stream.start(&entry.conv, entry.seq, u64::MAX);
        }
        let mut step = self.stream.on_push(&entry.conv, entry.seq);
        if step == StreamStep::Unknown {
            let caller = self.caller.clone().expect("authenticated");
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
                    self.retry_resync();
                    return Ok(());
                }
            }
            step = self.stream.on_push(&entry.conv, entry.seq);
        }
        if crate::mutants::active(crate::mutants::Mutant::FanoutOutOfOrder)
            && matches!(step, StreamStep::Fill { .. })
        {
            self.ws.send(Message::Text(frame)).await?;
            self.stream.start(
                &entry.conv,
                entry.seq + 1,
                self.stream.visible_until(&entry.conv).unwrap_or(u64::MAX),
            );
            return Ok(());
        }
        match step {
            StreamStep::Deliver => self.write_entry(entry, frame, false).await,
            StreamStep::Duplicate | StreamStep::NotVisible => Ok(()),
            StreamStep::Fill { from, to } => self.fill(&entry.conv, from, to).await,
            StreamStep::Unknown => unreachable!("stream was just started"),
        }
    }

    /// Queues a receipt merged (field by field, by maximum) with those already
    /// shown, or nothing when it adds nothing; written within the batch window.
    fn on_receipt(&mut self, receipt: &Receipt, frame: Utf8Bytes) {
        let key = (receipt.conv.clone(), receipt.user.clone());
        let (merged, frame) = match self.receipts_shown.get(&key) {
            None => (receipt.clone(), frame),
            Some(shown) => {
                let merged = shown.merged(receipt);
                if merged == *shown {
                    return;
                }
                let frame = if merged == *receipt {
                    frame
                } else {
                    Utf8Bytes::from(ServerFrame::Receipt(merged.clone()).to_json())
                };
                (merged, frame)
            }
        };
        self.receipts_shown.insert(key.clone(), merged);
        self.receipts_pending.insert(key, frame);
        if self.receipts_flush_at.is_none() {
            self.receipts_flush_at = Some(tokio::time::Instant::now() + RECEIPT_BATCH_WINDOW);
        }
    }

    /// Writes the queued receipts (each the latest for its conversation and user) at once.
    async fn flush_receipts(&mut self) -> WsResult<()> {
        self.receipts_flush_at = None;
        for frame in std::mem::take(&mut self.receipts_pending).into_values() {
            self.feed(Message::Text(frame)).await?;
        }
        self.flush_fed().await
    }

    /// Schedules another resync soon (after a store error lost a fill or a resync).
    fn retry_resync(&mut self) {
        let at = tokio::time::Instant::now() + RESYNC_RETRY_AFTER;
        self.resync_retry_at = Some(self.resync_retry_at.map_or(at, |t| t.min(at)));
    }

    /// Live events may have been lost: queue catch-up for every conversation the
    /// store holds more of than this device received, new ones included.
    async fn resync(&mut self) {
        let Some(caller) = self.caller.clone() else {
            return;
        };
        let svc = Arc::clone(&self.service);
        self.resync_retry_at = None;
        let states = match svc.conversations(&caller).await {
            Ok(states) => states,
            Err(e) => {
                tracing::warn!(error = %e, "resync failed; retrying");
                self.retry_resync();
                return;
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
            if !self.catch_up.contains(&conv) {
                self.catch_up.push_back(conv);
            }
        }
    }

    /// Delivers `from..=to` of `conv` from the store, page by page.
    async fn fill(&mut self, conv: &str, from: u64, to: u64) -> WsResult<()> {
        let svc = Arc::clone(&self.service);
        let mut after = from - 1;
        while after < to {
            let entries = match svc
                .store()
                .read_after(conv, after, to, svc.limits().page_len_max)
                .await
            {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::warn!(conv, error = %e, "gap fill failed; resyncing");
                    self.retry_resync();
                    return Ok(());
                }
            };
            let Some(last) = entries.last().map(|e| e.seq) else {
                break; // Expired meanwhile: nothing left to deliver.
            };
            for entry in entries {
                self.write_stored(entry, false).await?;
            }
            after = last;
        }
        self.flush_fed().await
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn recv(rx: &mut Option<(ConnId, DeviceQueue)>) -> Option<Push> {
    match rx {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// How long a session waits for the store's cursor before showing a receipt unraised.
const RECEIPT_FLOOR_WAIT: Duration = Duration::from_millis(250);

/// The first receipt of a (conversation, user) in this session, raised to the
/// user's cursor in the store: a receipt computed from an older read on another
/// server, delayed (say in an outbox while the router was away) past this device's
/// reconnect, must not take back what its previous session showed. The store's
/// cursor is at least every receipt published before this read. Later receipts
/// merge with what this session showed (`Session::on_receipt`). On a store error or
/// after [`RECEIPT_FLOOR_WAIT`] the receipt goes as it came. One server publishes its
/// receipts in order, so only cluster sessions (with a fabric) read the floor.
async fn with_stored_floor(
    service: Arc<ChatService>,
    receipt: Arc<Receipt>,
    frame: Utf8Bytes,
) -> (Arc<Receipt>, Utf8Bytes) {
    // Bounded: the session reads nothing else meanwhile.
    let read = service.store().user_cursor(&receipt.conv, &receipt.user);
    let Ok(Ok(stored)) = tokio::time::timeout(RECEIPT_FLOOR_WAIT, read).await else {
        return (receipt, frame);
    };
    if stored.delivered <= receipt.delivered && stored.read <= receipt.read {
        return (receipt, frame);
    }
    let raised = Receipt {
        delivered: receipt.delivered.max(stored.delivered),
        read: receipt.read.max(stored.read),
        ..Receipt::clone(&receipt)
    };
    let frame = Utf8Bytes::from(ServerFrame::Receipt(raised.clone()).to_json());
    (Arc::new(raised), frame)
}
