//! One WebSocket session: `hello`, then requests, pushes and catch-up on one socket.
//!
//! The session only frames: the device's [`DeviceFeed`] decides what it is given
//! (catch-up, live entries in order, fills, resyncs, merged receipts, coalesced
//! presence) and the session writes it, batching a burst into few socket writes.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::hub::Push;
use crate::protocol::{
    decode_request, validate_device_id, ErrorCode, HelloRequest, ProtocolError, Reply, Request,
    ServerFrame, PROTOCOL_VERSION,
};
use crate::service::{Caller, ChatService, DeviceFeed, Out};

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
    /// The device's feed, from a successful `hello` on.
    feed: Option<DeviceFeed>,
    /// Frames were fed to the socket but not flushed yet.
    unflushed: bool,
}

/// Live events handled before the socket is flushed: a burst goes out in few writes.
const PUSH_BATCH_LEN_MAX: usize = 64;

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
        feed: None,
        unflushed: false,
    };
    let end = session.drive(&mut shutdown).await;
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
            let feed = self.feed.as_ref();
            let catching_up = feed.is_some_and(DeviceFeed::catch_up_ready);
            let receipts_due = feed.and_then(DeviceFeed::receipts_due);
            let presence_due = feed.and_then(DeviceFeed::presence_due);
            let work_due = feed.and_then(DeviceFeed::work_due);
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
                            // Boxed: a request's future (every handler's) would
                            // otherwise sit in every idle session's task.
                            match Box::pin(self.on_text(&text)).await {
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
                push = recv(&mut self.feed) => {
                    match self.on_pushes(push).await {
                        Ok(None) => {}
                        Ok(Some(end)) => break end,
                        Err(e) => break End::Transport(e),
                    }
                }
                () = sleep_until_some(receipts_due), if receipts_due.is_some() => {
                    if let Err(e) = self.write_receipts().await { break End::Transport(e) }
                }
                () = sleep_until_some(presence_due), if presence_due.is_some() => {
                    if let Err(e) = self.write_presence().await { break End::Transport(e) }
                }
                () = sleep_until_some(work_due), if work_due.is_some() => {
                    let feed = self.feed.as_mut().expect("a feed has work due");
                    feed.work().await;
                    if let Err(e) = self.write_out().await { break End::Transport(e) }
                }
                () = tokio::time::sleep_until(hello_by), if self.feed.is_none() => {
                    self.service.metrics().count_closed_for(crate::metrics::ClosedFor::HelloTimeout);
                    let secs = self.service.limits().hello_timeout.as_secs_f64();
                    break End::Error(ProtocolError::new(
                        ErrorCode::HelloTimeout,
                        format!("no successful hello within {secs} s of connecting; closing"),
                    ));
                }
                () = std::future::ready(()), if catching_up => {
                    self.feed.as_mut().expect("catching up").catch_up_step().await;
                    if let Err(e) = self.write_out().await { break End::Transport(e) }
                }
                _ = ping_every.tick() => {
                    if last_heard.elapsed() > idle { break End::Idle }
                    if let Err(e) = self.ws.send(Message::Ping(Default::default())).await { break End::Transport(e) }
                }
            }
        };
        if let Some(feed) = self.feed.take() {
            let caller = feed.caller();
            tracing::debug!(
                user = caller.user,
                device = caller.device,
                ?end,
                "session ended"
            );
            // Dropping the feed ends the device's lease.
        }
        end
    }

    /// Handles `first` and whatever else is already queued (up to a batch), then
    /// writes what the feed gave out and flushes the socket once; `Some(end)`
    /// closes the session.
    async fn on_pushes(&mut self, first: Option<Push>) -> WsResult<Option<End>> {
        let feed = self.feed.as_mut().expect("pushes come to a feed");
        feed.on_push(first).await;
        feed.take_queued(PUSH_BATCH_LEN_MAX - 1).await;
        let ended = feed.ended().cloned();
        self.write_out().await?;
        Ok(ended.map(End::Error))
    }

    /// Writes what the feed gave out, then flushes.
    async fn write_out(&mut self) -> WsResult<()> {
        // The socket and the feed are separate fields: frames go out as they are drained.
        let feed = self.feed.as_mut().expect("output comes from a feed");
        for out in feed.drain_out() {
            let frame = match out {
                Out::Entry(_, frame) | Out::Frame(frame) => frame,
                Out::CaughtUp => Utf8Bytes::from(ServerFrame::CaughtUp {}.to_json()),
            };
            self.unflushed = true;
            self.ws.feed(Message::Text(frame)).await?;
        }
        self.flush_fed().await
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

    /// Writes the pending presence changes as one frame.
    async fn write_presence(&mut self) -> WsResult<()> {
        let feed = self.feed.as_mut().expect("presence comes to a feed");
        let users = feed.take_presence();
        if users.is_empty() {
            return Ok(());
        }
        let frame = ServerFrame::Presence { users }.to_json();
        self.ws.send(Message::Text(frame.into())).await
    }

    /// Writes the pending receipts (each the latest for its conversation and user) at once.
    async fn write_receipts(&mut self) -> WsResult<()> {
        let feed = self.feed.as_mut().expect("receipts come to a feed");
        for (_, frame) in feed.take_receipts() {
            self.feed(Message::Text(frame)).await?;
        }
        self.flush_fed().await
    }

    async fn reply_ok(&mut self, rid: String, result: Reply) -> WsResult<()> {
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
        let Some(caller) = self.feed.as_ref().map(|f| f.caller().clone()) else {
            return match request {
                Request::Hello(hello) => self.hello(rid, hello).await,
                _ => {
                    let err = ProtocolError::new(ErrorCode::HelloRequired, "send hello first");
                    self.reply_error(Some(rid), err).await.map(|()| None)
                }
            };
        };
        match self.dispatch(&caller, request).await {
            Ok(result) => {
                if let Reply::Presence { users } = &result {
                    let feed = self.feed.as_mut().expect("a caller has a feed");
                    feed.presence_shown(users);
                }
                self.reply_ok(rid, result).await?;
            }
            Err(err) => self.reply_error(Some(rid), err).await?,
        }
        Ok(None)
    }

    async fn dispatch(
        &mut self,
        caller: &Caller,
        request: Request,
    ) -> Result<Reply, ProtocolError> {
        if matches!(request, Request::Hello(_)) {
            return Err(ProtocolError::new(
                ErrorCode::AlreadyAuthenticated,
                "hello was already accepted",
            ));
        }
        Arc::clone(&self.service).dispatch(caller, request).await
    }

    /// Authenticates, connects the device, and starts its feed (catch-up first).
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
        // Lease and route before reading state: anything sequenced later is
        // pushed, anything earlier is in the store, so nothing falls between.
        let (lease, queue) = match svc.lease_device(&caller) {
            Ok(leased) => leased,
            Err(err) => {
                self.reply_error(Some(rid), err.clone()).await?;
                return Ok(Some(End::Replied(err)));
            }
        };
        let mut feed = DeviceFeed::new(Arc::clone(&svc), lease, queue);
        if let Err(err) = feed.lease_mut().route().await {
            return self.reply_error(Some(rid), err).await.map(|()| None);
        }
        let states = match feed.start(&hello.cursors, usize::MAX).await {
            Ok(states) => states,
            Err(err) => return self.reply_error(Some(rid), err).await.map(|()| None),
        };
        if hello.receipts
            && !crate::mutants::active(crate::mutants::Mutant::ReconnectForgetsReceipts)
        {
            feed.show_stored_receipts(&states).await;
        }
        let result = Reply::Hello {
            version: PROTOCOL_VERSION,
            conversations: ChatService::summaries(&caller, &states),
            user: caller.user,
            device: caller.device,
            server_time_ms: svc.clock().now_ms(),
        };
        feed.lease_mut().up();
        self.feed = Some(feed);
        self.reply_ok(rid, result).await?;
        // `caught_up` when nothing was behind; otherwise catch-up says it later.
        self.write_out().await?;
        Ok(None)
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn recv(feed: &mut Option<DeviceFeed>) -> Option<Push> {
    match feed {
        Some(feed) => feed.recv().await,
        None => std::future::pending().await,
    }
}
