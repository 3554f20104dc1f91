//! HTTP/1.1 over simulated TCP, for the long-poll fallback: request workers for
//! `/v1/rpc` and one held `/v1/poll`.
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::POLL_HOLD_MS;

/// How long a request waits for its answer beyond what it asks the server to hold.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

/// The headers every request authenticates with.
#[derive(Clone)]
pub struct Auth {
    pub token: String,
    pub device: String,
}

/// One keep-alive connection.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> Option<Connection> {
        let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        let handshake = hyper::client::conn::http1::handshake(TokioIo::new(stream));
        let (sender, conn) = tokio::time::timeout(Duration::from_secs(2), handshake)
            .await
            .ok()?
            .ok()?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Some(Connection { sender, driver })
    }

    /// POSTs `body` to `path`; the status and the answer's text, or `None` when the
    /// connection failed or the answer did not come within `wait`.
    async fn post(
        &mut self,
        path: &str,
        auth: &Auth,
        body: String,
        wait: Duration,
    ) -> Option<(u16, String)> {
        let exchange = async {
            self.sender.ready().await.ok()?;
            let request = hyper::Request::post(path)
                .header("host", "server")
                .header("authorization", format!("Bearer {}", auth.token))
                .header("x-chatproof-device", &auth.device)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .ok()?;
            let answer = self.sender.send_request(request).await.ok()?;
            let status = answer.status().as_u16();
            let bytes = answer.into_body().collect().await.ok()?.to_bytes();
            Some((status, String::from_utf8(bytes.to_vec()).ok()?))
        };
        tokio::time::timeout(wait, exchange).await.ok()?
    }
}

/// Connections a long-poll device sends requests over at once, as a browser does.
pub const RPC_CONNECTIONS: usize = 4;

/// A request worker whose connection sat idle longer than this opens a new one.
const RPC_IDLE_REOPEN: Duration = Duration::from_millis(250);

/// Workers, one per connection, that POST the request frames to `/v1/rpc` (each
/// takes the next waiting frame) and hand back each reply frame; a worker whose
/// connection fails stops, and the replies close once all have. A worker whose
/// connection sat idle for a while opens a fresh one to `addr` first.
pub fn spawn_rpc(
    addr: SocketAddr,
    conns: Vec<Connection>,
    auth: Auth,
) -> (
    mpsc::UnboundedSender<String>,
    mpsc::UnboundedReceiver<String>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (requests, to_send) = mpsc::unbounded_channel::<String>();
    let to_send = std::sync::Arc::new(tokio::sync::Mutex::new(to_send));
    let (answers, replies) = mpsc::unbounded_channel::<String>();
    let workers = conns
        .into_iter()
        .map(|mut conn| {
            let (to_send, answers, auth) = (
                std::sync::Arc::clone(&to_send),
                answers.clone(),
                auth.clone(),
            );
            tokio::spawn(async move {
                let mut last_used = tokio::time::Instant::now();
                loop {
                    let Some(frame) = to_send.lock().await.recv().await else {
                        break;
                    };
                    if last_used.elapsed() > RPC_IDLE_REOPEN {
                        // See [`poll`]: an idle kept-alive connection stalls under madsim.
                        let Some(fresh) = Connection::open(addr).await else {
                            break;
                        };
                        conn = fresh;
                    }
                    let Some((_, reply)) = conn.post("/v1/rpc", &auth, frame, ANSWER_WAIT).await
                    else {
                        break;
                    };
                    last_used = tokio::time::Instant::now();
                    if answers.send(reply).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    (requests, replies, workers)
}

/// One poll with `cursors` on a connection of its own; the status and answer.
/// `receipts` on a session's first poll (each session follows a failed one), as
/// the protocol asks.
///
/// A new connection per poll: under madsim, a second request on a kept-alive
/// connection whose server side sat waiting for it arrived up to seconds late
/// (partition-heavy seed 13 before this), which the real server does not do
/// (`curl` reusing one connection for three held polls: each held for its 300 ms).
pub async fn poll(
    addr: SocketAddr,
    auth: Auth,
    cursors: std::collections::BTreeMap<String, u64>,
    limit: u64,
    receipts: bool,
) -> Option<(u16, Value)> {
    let mut conn = Connection::open(addr).await?;
    let body = json!({"cursors": cursors, "timeout_ms": POLL_HOLD_MS, "limit": limit, "receipts": receipts})
        .to_string();
    let wait = Duration::from_millis(POLL_HOLD_MS) + ANSWER_WAIT;
    let (status, text) = conn.post("/v1/poll", &auth, body, wait).await?;
    Some((status, serde_json::from_str(&text).ok()?))
}
