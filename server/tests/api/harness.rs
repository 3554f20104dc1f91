//! Starts a server on a loopback port with a temporary store, and logs clients in.

use std::sync::Arc;
use std::time::Duration;

use chatproof_client::{Client, ErrorReply, Request};
use chatproof_server::auth::TokenKey;
use chatproof_server::clock::{Clock, SystemClock};
use chatproof_server::limits::Limits;
use chatproof_server::media::disk::DiskBlobStore;
use chatproof_server::service::ServiceBuilder;
use chatproof_server::store::embedded::EmbeddedStore;
use chatproof_server::store::Store;
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub const SECRET: &[u8] = b"test-secret-0123456789";
pub const WAIT: Duration = Duration::from_secs(10);
pub const QUIET: Duration = Duration::from_millis(300);

pub struct TestServer {
    pub url: String,
    pub key: TokenKey,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, limits).await
    }

    pub async fn start_in(dir: tempfile::TempDir, limits: Limits) -> Self {
        Self::start_configured(dir, limits, |service| service).await
    }

    /// Starts on the embedded store with images stored under the data
    /// directory, after `setup` added to the service.
    pub async fn start_configured(
        dir: tempfile::TempDir,
        limits: Limits,
        setup: impl FnOnce(ServiceBuilder) -> ServiceBuilder,
    ) -> Self {
        let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        Self::start_on(dir, limits, store, setup).await
    }

    /// Starts on `store`, with images stored under the data directory.
    pub async fn start_on_store(
        dir: tempfile::TempDir,
        limits: Limits,
        store: Arc<dyn Store>,
    ) -> Self {
        Self::start_on(dir, limits, store, |service| service).await
    }

    async fn start_on(
        dir: tempfile::TempDir,
        limits: Limits,
        store: Arc<dyn Store>,
        setup: impl FnOnce(ServiceBuilder) -> ServiceBuilder,
    ) -> Self {
        let key = TokenKey::new(SECRET).unwrap();
        let blobs = DiskBlobStore::open(&dir.path().join("media")).unwrap();
        let service = ServiceBuilder::new(store, Arc::new(SystemClock), limits, key.clone())
            .media(Arc::new(blobs));
        let service = Arc::new(setup(service).build());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(chatproof_server::run(listener, service, async {
            let _ = stopped.await;
        }));
        Self {
            url,
            key,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    /// Graceful shutdown; returns the data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
        self.dir
    }

    pub fn http_base(&self) -> String {
        self.url
            .trim_end_matches("/v1/ws")
            .replacen("ws://", "http://", 1)
    }

    pub fn token(&self, user: &str) -> String {
        self.key.mint(user, SystemClock.now_ms() / 1000 + 3600)
    }

    /// Logs in and consumes events up to `caught_up`; returns them too.
    pub async fn login(&self, user: &str, device: &str) -> (Client, Vec<Value>) {
        self.login_with(user, device, json!({})).await
    }

    pub async fn login_with(
        &self,
        user: &str,
        device: &str,
        cursors: Value,
    ) -> (Client, Vec<Value>) {
        let (mut client, _welcome) = Client::login(&self.url, &self.token(user), device, cursors)
            .await
            .unwrap();
        let mut events = client
            .events_until(WAIT, |e| e["type"] == "caught_up")
            .await
            .unwrap();
        events.pop();
        (client, events)
    }
}

/// An HTTP response as the tests see it.
pub struct HttpReply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `code` of an error body.
    pub fn code(&self) -> String {
        let json = self.json();
        assert!(
            json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {json}"
        );
        json["code"].as_str().unwrap().to_owned()
    }
}

/// One HTTP request to the server; `auth` is `(user, device)` (device may be empty).
pub async fn http(
    server: &TestServer,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: Vec<u8>,
) -> HttpReply {
    let token = auth.map(|(user, device)| (server.token(user), device));
    let auth = token
        .as_ref()
        .map(|(token, device)| (token.as_str(), *device));
    http_with_token(server, method, path, auth, body).await
}

/// One HTTP request to the server; `auth` is `(bearer token, device)` (device may be empty).
pub async fn http_with_token(
    server: &TestServer,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: Vec<u8>,
) -> HttpReply {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", server.http_base()));
    if let Some((token, device)) = auth {
        request = request.header("authorization", format!("Bearer {token}"));
        if !device.is_empty() {
            request = request.header("x-chatproof-device", device);
        }
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(60), client.request(request))
        .await
        .expect("HTTP reply within 60 s")
        .expect("HTTP request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    HttpReply {
        status,
        headers,
        body,
    }
}

/// `POST /v1/rpc` with one request frame.
pub async fn rpc(server: &TestServer, user: &str, device: &str, frame: Value) -> HttpReply {
    let body = serde_json::to_vec(&frame).unwrap();
    http(server, "POST", "/v1/rpc", Some((user, device)), body).await
}

/// `POST /v1/poll`.
pub async fn poll(server: &TestServer, user: &str, device: &str, request: Value) -> HttpReply {
    let body = serde_json::to_vec(&request).unwrap();
    http(server, "POST", "/v1/poll", Some((user, device)), body).await
}

#[track_caller]
pub fn ok(reply: Result<Value, ErrorReply>) -> Value {
    match reply {
        Ok(v) => v,
        Err(e) => panic!("expected ok, got error {} ({})", e.code, e.message),
    }
}

#[track_caller]
pub fn err_code(reply: Result<Value, ErrorReply>) -> String {
    match reply {
        Ok(v) => panic!("expected an error, got ok {v}"),
        Err(e) => {
            assert!(!e.message.is_empty(), "error {} has no message", e.code);
            e.code
        }
    }
}

pub async fn send(client: &mut Client, conv: &str, message_id: &str, text: &str) -> Value {
    ok(client
        .call(&Request::send_text(conv, message_id, text))
        .await
        .unwrap())
}

pub async fn open_direct(client: &mut Client, peer: &str) -> String {
    let r = ok(client.call(&Request::OpenDirect { peer }).await.unwrap());
    r["conversation"]["conv"].as_str().unwrap().to_owned()
}

/// Collects `msg` events until one with `seq` in `conv` arrives.
pub async fn msgs_until(client: &mut Client, conv: &str, seq: u64) -> Vec<Value> {
    let events = client
        .events_until(WAIT, |e| {
            e["type"] == "msg" && e["conv"] == conv && e["seq"] == seq
        })
        .await
        .unwrap();
    events.into_iter().filter(|e| e["type"] == "msg").collect()
}

/// Seqs of the `msg` events of `conv`.
pub fn seqs(events: &[Value], conv: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["type"] == "msg" && e["conv"] == conv)
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

/// True if an event other than `presence` arrives within [`QUIET`]. Presence
/// events come at each connection's own phase of the presence interval whenever
/// contacts connect, so "nothing more arrives" means nothing but presence.
pub async fn delivers_within_quiet(client: &mut Client) -> bool {
    client
        .events_until(QUIET, |e| e["type"] != "presence")
        .await
        .is_ok()
}
