//! One WebSocket connection of a device: the handshake over any byte stream (a real or
//! a simulated TCP socket), `hello`, requests matched to replies by `rid`, and pushed
//! events kept in arrival order.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::request::Request;

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The WebSocket failed or closed.
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The server closed the connection.
    #[error("connection closed by the server")]
    Closed,
    /// Nothing arrived in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The server sent something that is not a protocol frame.
    #[error("unexpected frame: {0}")]
    Protocol(String),
}

/// An error reply: stable code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// The stable error code.
    pub code: String,
    /// The human-readable message.
    pub message: String,
    /// How long to wait before retrying, when the server says (`rate_limited`).
    pub retry_after_ms: Option<u64>,
}

/// How long a request waits for its reply by default.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The stream a [`Client::connect`]ed client runs over: a real (or, under madsim,
/// simulated) TCP socket.
pub type TcpClientStream = MaybeTlsStream<TcpStream>;

/// One connected device over the byte stream `S`.
pub struct Client<S = TcpClientStream> {
    ws: WebSocketStream<S>,
    next_rid: u64,
    reply_timeout: Duration,
    events: VecDeque<Value>,
    replies: BTreeMap<String, Value>,
}

impl Client<TcpClientStream> {
    /// Opens a WebSocket to `url` (e.g. `ws://127.0.0.1:8080/v1/ws`) without saying hello.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let host = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .ok_or_else(|| ClientError::Protocol(format!("not a ws:// url: {url}")))?;
        let stream = TcpStream::connect(host)
            .await
            .map_err(|e| ClientError::Ws(tokio_tungstenite::tungstenite::Error::Io(e)))?;
        Self::handshake(MaybeTlsStream::Plain(stream), url).await
    }

    /// Connects and completes `hello` with `token` as `device`, presenting `cursors`.
    pub async fn login(
        url: &str,
        token: &str,
        device: &str,
        cursors: Value,
    ) -> Result<(Self, Value), ClientError> {
        let mut client = Self::connect(url).await?;
        let welcome = client.hello_with(token, device, cursors).await?;
        Ok((client, welcome))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// The WebSocket handshake for `url` over an open `stream` (any transport: a real or
    /// simulated socket, a wrapper around one), without saying hello.
    pub async fn handshake(stream: S, url: &str) -> Result<Self, ClientError> {
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
        Ok(Self {
            ws,
            next_rid: 0,
            reply_timeout: REPLY_TIMEOUT,
            events: VecDeque::new(),
            replies: BTreeMap::new(),
        })
    }

    /// How long [`Client::request`] and [`Client::call`] wait for a reply (default
    /// [`REPLY_TIMEOUT`]).
    pub fn with_reply_timeout(mut self, wait: Duration) -> Self {
        self.reply_timeout = wait;
        self
    }

    /// Completes `hello` as `device` of `token`'s user, presenting `cursors` (a JSON
    /// object of conversation to seq; `{}` for none); returns the `hello` result.
    pub async fn hello_with(
        &mut self,
        token: &str,
        device: &str,
        cursors: Value,
    ) -> Result<Value, ClientError> {
        let mut frame = Request::hello(token, device, None, false).to_value("h");
        frame["cursors"] = cursors;
        match self.request(frame).await? {
            Ok(welcome) => Ok(welcome),
            Err(e) => Err(ClientError::Protocol(format!(
                "hello refused: {} {}",
                e.code, e.message
            ))),
        }
    }

    /// Sends `request` with a fresh `rid` and waits for its reply: `Ok(result)` or
    /// `Err(error reply)`.
    pub async fn call(
        &mut self,
        request: &Request<'_>,
    ) -> Result<Result<Value, ErrorReply>, ClientError> {
        let rid = self.fresh_rid();
        self.send_text(request.encode(&rid)).await?;
        self.reply(&rid).await
    }

    /// The next text frame from the server, whatever it is, as received (for callers
    /// that handle replies and events in one arrival-ordered stream). Frames already
    /// filed while [`Client::reply`] or [`Client::next_event`] waited are not returned
    /// again. Cancel-safe: dropping it loses no frame.
    pub async fn next_text(&mut self) -> Result<Utf8Bytes, ClientError> {
        loop {
            match self.ws.next().await {
                None | Some(Ok(Message::Close(_))) => return Err(ClientError::Closed),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(_)) => {}
            }
        }
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), ClientError> {
        self.ws.send(Message::Text(text.into().into())).await?;
        Ok(())
    }

    /// Sends `frame` (raw JSON, for frames a test writes wrong on purpose) with a fresh
    /// `rid` and returns that rid.
    pub async fn send_request(&mut self, mut frame: Value) -> Result<String, ClientError> {
        let rid = self.fresh_rid();
        frame["rid"] = json!(rid);
        self.send_text(frame.to_string()).await?;
        Ok(rid)
    }

    /// Sends a request and waits for its reply: `Ok(result)` or `Err(error reply)`.
    pub async fn request(
        &mut self,
        frame: Value,
    ) -> Result<Result<Value, ErrorReply>, ClientError> {
        let rid = self.send_request(frame).await?;
        self.reply(&rid).await
    }

    /// Waits for the reply to `rid`, keeping any events that arrive first.
    pub async fn reply(&mut self, rid: &str) -> Result<Result<Value, ErrorReply>, ClientError> {
        let deadline = tokio::time::Instant::now() + self.reply_timeout;
        loop {
            if let Some(frame) = self.replies.remove(rid) {
                return Ok(decode_reply(frame));
            }
            let frame = self.next_frame(deadline, rid).await?;
            self.file(frame);
        }
    }

    /// The next pushed event (`msg`, `receipt`, `caught_up`, or an error without rid).
    pub async fn next_event(&mut self, wait: Duration) -> Result<Value, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            let frame = self.next_frame(deadline, "an event").await?;
            self.file(frame);
        }
    }

    /// An event already received (while waiting for replies), without waiting for more.
    pub fn try_next_event(&mut self) -> Option<Value> {
        self.events.pop_front()
    }

    /// Events until one matches `pred` (inclusive); fails after `wait`.
    pub async fn events_until(
        &mut self,
        wait: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Value>, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self.next_event(left).await?;
            let done = pred(&event);
            seen.push(event);
            if done {
                return Ok(seen);
            }
        }
    }

    /// True if an event arrives within `wait` (the event is kept).
    pub async fn has_event_within(&mut self, wait: Duration) -> Result<bool, ClientError> {
        match self.next_event(wait).await {
            Ok(event) => {
                self.events.push_front(event);
                Ok(true)
            }
            Err(ClientError::Timeout(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        // The sink's close: the close frame, a flush, then the stream's shutdown.
        let _ = SinkExt::close(&mut self.ws).await;
    }

    fn fresh_rid(&mut self) -> String {
        self.next_rid += 1;
        format!("r{}", self.next_rid)
    }

    fn file(&mut self, frame: Value) {
        match (frame["type"].as_str(), frame["rid"].as_str()) {
            (Some("ok" | "error"), Some(rid)) => {
                self.replies.insert(rid.to_owned(), frame);
            }
            _ => self.events.push_back(frame),
        }
    }

    async fn next_frame(
        &mut self,
        deadline: tokio::time::Instant,
        what: &str,
    ) -> Result<Value, ClientError> {
        // `timeout` rather than `timeout_at`: madsim's tokio has only the former.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let text = tokio::time::timeout(left, self.next_text())
            .await
            .map_err(|_| ClientError::Timeout(what.to_owned()))??;
        serde_json::from_str(&text).map_err(|e| ClientError::Protocol(format!("{e}: {text}")))
    }
}

fn decode_reply(frame: Value) -> Result<Value, ErrorReply> {
    if frame["type"] == "ok" {
        Ok(frame["result"].clone())
    } else {
        Err(ErrorReply {
            code: frame["code"].as_str().unwrap_or_default().to_owned(),
            message: frame["message"].as_str().unwrap_or_default().to_owned(),
            retry_after_ms: frame["retry_after_ms"].as_u64(),
        })
    }
}
