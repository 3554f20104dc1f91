//! The protocol floor: the least any server of protocol v1 must do for the generator's
//! traffic, so that every figure of the reference server can stand beside it.
//!
//! It serves `hello` (token checked), `open_direct`, `create_group` and `send`, answered
//! with `ok` and one `msg` to every member device, the sender's included. Everything is
//! in memory: no persistence, no history (so no catch-up), no receipts, presence,
//! idempotency or media. Each send's `msg` frame is serialized once and shared by every
//! recipient; each connection writes its queued frames in batches (one flush per burst).
//! Per conversation, seqs are assigned and queued to every member under one lock, so each
//! device receives them in order without gaps.
//!
//! `chatproof-loadgen run --floor` starts it (as the hidden `serve-floor` command) in
//! place of the reference server; scenarios that need what it leaves out (churn, media)
//! are refused before the run.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chatproof_server::auth::TokenKey;
use chatproof_server::protocol::ErrorCode;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Events queued for one device before it counts as a slow consumer (as the reference
/// server's limit in PROTOCOL.md).
pub const QUEUE_FRAMES_MAX: usize = 4096;
/// Frames written before one flush.
const BATCH_FRAMES_MAX: usize = 64;
/// Members of a group, the creator included (as PROTOCOL.md's limit).
const GROUP_MEMBERS_MAX: usize = 500;
/// Longest text accepted (as PROTOCOL.md's default limit).
const TEXT_MAX_BYTES: usize = 65_536;

/// Options of `serve-floor`.
#[derive(Debug, clap::Args)]
pub struct FloorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Token secret (the same as the generator mints with).
    #[arg(long, env = "CHATPROOF_SECRET", hide_env_values = true)]
    pub secret: String,
}

/// Serves the floor until the process is ended; prints `listening on ADDR` once bound.
pub fn serve(args: &FloorArgs) -> anyhow::Result<()> {
    let key = TokenKey::new(args.secret.as_bytes()).map_err(|e| anyhow::anyhow!(e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(args.listen).await?;
        println!("listening on {}", listener.local_addr()?);
        serve_on(listener, key).await
    })
}

/// Serves connections accepted on `listener` until the task is dropped.
async fn serve_on(listener: TcpListener, key: TokenKey) -> anyhow::Result<()> {
    let floor = Arc::new(Floor::new(key));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or similar: keep serving those connected.
                eprintln!("floor: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(Arc::clone(&floor).connection(stream));
    }
}

/// One conversation: its members and the last seq assigned.
struct Conv {
    id: String,
    group: bool,
    owner: String,
    created_ms: u64,
    /// In the order given at creation (owner first).
    members: Vec<String>,
    member_set: HashSet<String>,
    /// Held while a seq is assigned and its frame queued to every member device.
    last_seq: Mutex<u64>,
}

impl Conv {
    /// Seq 1: the entry that created the conversation.
    fn create_entry(&self) -> String {
        json!({
            "type": "msg", "conv": self.id, "seq": 1, "message_id": "members-1",
            "sender": self.owner, "sender_device": "floor", "server_time_ms": self.created_ms,
            "body": {"kind": "members", "action": "create", "users": self.members},
        })
        .to_string()
    }

    fn summary(&self, last_seq: u64) -> serde_json::Value {
        json!({
            "conv": self.id, "kind": if self.group { "group" } else { "direct" },
            "owner": self.owner, "members": self.members, "last_seq": last_seq, "joined_seq": 1,
        })
    }
}

/// A connected device, as the senders see it.
struct Slot {
    device: String,
    connection: u64,
    frames: mpsc::Sender<Utf8Bytes>,
    control: Arc<Control>,
}

/// Why a connection is being ended from outside.
#[derive(Default)]
struct Control {
    notify: Notify,
    reason: Mutex<Option<(ErrorCode, &'static str)>>,
}

impl Control {
    fn end(&self, code: ErrorCode, why: &'static str) {
        self.reason
            .lock()
            .expect("control")
            .get_or_insert((code, why));
        self.notify.notify_one();
    }
}

struct Floor {
    key: TokenKey,
    convs: RwLock<HashMap<String, Arc<Conv>>>,
    /// Conversation ids per user.
    joined: RwLock<HashMap<String, Vec<String>>>,
    /// Connected devices per user.
    devices: RwLock<HashMap<String, Vec<Slot>>>,
    connections: AtomicU64,
}

/// A request frame; unknown fields are ignored.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow)]
    rid: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    op: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    versions: Option<Vec<u32>>,
    #[serde(default)]
    cursors: Option<HashMap<String, u64>>,
    #[serde(default)]
    peer: Option<String>,
    #[serde(default, borrow)]
    conv: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    members: Option<Vec<String>>,
    #[serde(default, borrow)]
    message_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

/// The `msg` event of a text message, serialized once per send.
#[derive(Serialize)]
struct MsgEvent<'a> {
    r#type: &'static str,
    conv: &'a str,
    seq: u64,
    message_id: &'a str,
    sender: &'a str,
    sender_device: &'a str,
    server_time_ms: u64,
    body: TextBody<'a>,
}

/// The `ok` reply to a send.
#[derive(Serialize)]
struct SendOk<'a> {
    r#type: &'static str,
    rid: Option<&'a str>,
    result: SendResult<'a>,
}

#[derive(Serialize)]
struct SendResult<'a> {
    conv: &'a str,
    seq: u64,
    message_id: &'a str,
    server_time_ms: u64,
    duplicate: bool,
}

#[derive(Serialize)]
struct TextBody<'a> {
    kind: &'static str,
    text: &'a str,
}

type Reply = Result<serde_json::Value, (ErrorCode, String)>;

fn error_frame(rid: Option<&str>, code: ErrorCode, message: &str) -> String {
    json!({"type": "error", "rid": rid, "code": code, "message": message}).to_string()
}

fn now_ms() -> u64 {
    crate::device::now_us() / 1000
}

/// Who a connection is once its `hello` succeeded.
struct Identity {
    user: String,
    device: String,
}

impl Floor {
    fn new(key: TokenKey) -> Self {
        Self {
            key,
            convs: RwLock::default(),
            joined: RwLock::default(),
            devices: RwLock::default(),
            connections: AtomicU64::new(0),
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(4096)
            .max_message_size(Some(1 << 20));
        let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
        else {
            return;
        };
        let connection = self.connections.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(Control::default());
        let (frames_tx, mut frames) = mpsc::channel::<Utf8Bytes>(QUEUE_FRAMES_MAX);
        let mut me: Option<Identity> = None;
        loop {
            tokio::select! {
                inbound = ws.next() => {
                    let text = match inbound {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                        Some(Ok(_)) => continue,
                    };
                    let replies = self.request(&text, &mut me, connection, &frames_tx, &control);
                    let mut failed = false;
                    for reply in replies {
                        failed |= ws.feed(Message::Text(reply.into())).await.is_err();
                    }
                    // The sender's own copy of its message is queued by now: it leaves
                    // in the same write as the ack.
                    for _ in 0..BATCH_FRAMES_MAX {
                        let Ok(next) = frames.try_recv() else { break };
                        failed |= ws.feed(Message::Text(next)).await.is_err();
                    }
                    if failed || ws.flush().await.is_err() {
                        break;
                    }
                }
                Some(first) = frames.recv() => {
                    let mut failed = ws.feed(Message::Text(first)).await.is_err();
                    for _ in 1..BATCH_FRAMES_MAX {
                        let Ok(next) = frames.try_recv() else { break };
                        failed |= ws.feed(Message::Text(next)).await.is_err();
                    }
                    if failed || ws.flush().await.is_err() {
                        break;
                    }
                }
                () = control.notify.notified() => {
                    let (code, why) = control.reason.lock().expect("control").unwrap_or((ErrorCode::Internal, "ended"));
                    let _ = ws.send(Message::Text(error_frame(None, code, why).into())).await;
                    let _ = ws.close(None).await;
                    break;
                }
            }
        }
        if let Some(me) = me {
            self.unregister(&me.user, connection);
        }
    }

    /// Handles one request; returns the frames to write back to this connection.
    fn request(
        &self,
        text: &str,
        me: &mut Option<Identity>,
        connection: u64,
        frames: &mpsc::Sender<Utf8Bytes>,
        control: &Arc<Control>,
    ) -> Vec<String> {
        // A derived struct would also accept a JSON array (as its fields in order).
        if !text.trim_start().starts_with('{') {
            return vec![error_frame(
                None,
                ErrorCode::BadFrame,
                "a request is a JSON object",
            )];
        }
        let request = match serde_json::from_str::<Request<'_>>(text) {
            Ok(r) => r,
            Err(e) => {
                return vec![error_frame(
                    None,
                    ErrorCode::BadFrame,
                    &format!("not a request: {e}"),
                )]
            }
        };
        let rid = request.rid.as_deref();
        let reply = match (request.op.as_deref(), me.as_ref()) {
            (Some("hello"), None) => {
                match self.hello(&request, connection, frames, control) {
                    Ok((identity, result, catch_up)) => {
                        *me = Some(identity);
                        let mut frames = Vec::with_capacity(catch_up.len() + 1);
                        frames.push(json!({"type": "ok", "rid": rid, "result": result}).to_string());
                        frames.extend(catch_up);
                        return frames;
                    }
                    Err(e) => Err(e),
                }
            }
            (Some("hello"), Some(_)) => Err((
                ErrorCode::AlreadyAuthenticated,
                "hello was already accepted".into(),
            )),
            (Some(_), None) => Err((ErrorCode::HelloRequired, "send hello first".into())),
            (Some("open_direct"), Some(me)) => self.open_direct(me, &request),
            (Some("create_group"), Some(me)) => self.create_group(me, &request),
            (Some("send"), Some(me)) => match self.send(me, &request) {
                // The hot path: the reply is serialized without building a JSON value.
                Ok((seq, server_time_ms)) => {
                    let ok = SendOk {
                        r#type: "ok",
                        rid,
                        result: SendResult {
                            conv: request.conv.as_deref().unwrap_or_default(),
                            seq,
                            message_id: request.message_id.as_deref().unwrap_or_default(),
                            server_time_ms,
                            duplicate: false,
                        },
                    };
                    return vec![serde_json::to_string(&ok).expect("a reply serializes")];
                }
                Err(e) => Err(e),
            },
            (Some(op), Some(_)) => Err((
                ErrorCode::UnknownOp,
                format!("the protocol floor serves hello, open_direct, create_group and send, not {op:?}"),
            )),
            (None, _) => Err((ErrorCode::BadRequest, "missing op".into())),
        };
        vec![match reply {
            Ok(result) => json!({"type": "ok", "rid": rid, "result": result}).to_string(),
            Err((code, message)) => error_frame(rid, code, &message),
        }]
    }

    fn hello(
        &self,
        request: &Request<'_>,
        connection: u64,
        frames: &mpsc::Sender<Utf8Bytes>,
        control: &Arc<Control>,
    ) -> Result<(Identity, serde_json::Value, Vec<String>), (ErrorCode, String)> {
        if !request.versions.as_ref().is_some_and(|v| v.contains(&1)) {
            return Err((
                ErrorCode::UnsupportedVersion,
                "this server speaks version 1".into(),
            ));
        }
        let (Some(token), Some(device)) = (&request.token, &request.device) else {
            return Err((ErrorCode::BadRequest, "hello needs token and device".into()));
        };
        let claims = self
            .key
            .verify(token, now_ms() / 1000)
            .map_err(|e| (e.code, e.message))?;
        let user = claims.sub;
        let conv_ids = self
            .joined
            .read()
            .expect("joined")
            .get(&user)
            .cloned()
            .unwrap_or_default();
        let convs = self.convs.read().expect("convs");
        let mut summaries = Vec::with_capacity(conv_ids.len());
        for id in &conv_ids {
            let conv = &convs[id];
            summaries.push(conv.summary(*conv.last_seq.lock().expect("conv")));
        }
        for id in request.cursors.iter().flatten().map(|(id, _)| id) {
            let Some(conv) = convs.get(id) else {
                return Err((
                    ErrorCode::UnknownConversation,
                    format!("no conversation {id}"),
                ));
            };
            if !conv.member_set.contains(&user) {
                return Err((
                    ErrorCode::NotMember,
                    format!("{user} is not a member of {id}"),
                ));
            }
        }
        drop(convs);
        self.register(&user, device, connection, frames, control);
        // Checked after registering: any send from here on reaches this device live,
        // after the catch-up below (replies are written before queued frames).
        let catch_up = self.catch_up(&user, &conv_ids, request.cursors.as_ref());
        let catch_up = match catch_up {
            Ok(frames) => frames,
            Err(e) => {
                self.unregister(&user, connection);
                return Err(e);
            }
        };
        let result = json!({
            "version": 1, "user": user, "device": device, "server_time_ms": now_ms(),
            "conversations": summaries,
        });
        let identity = Identity {
            user,
            device: device.clone(),
        };
        Ok((identity, result, catch_up))
    }

    fn register(
        &self,
        user: &str,
        device: &str,
        connection: u64,
        frames: &mpsc::Sender<Utf8Bytes>,
        control: &Arc<Control>,
    ) {
        let mut devices = self.devices.write().expect("devices");
        let slots = devices.entry(user.to_owned()).or_default();
        if let Some(old) = slots.iter().position(|s| s.device == device) {
            slots.swap_remove(old).control.end(
                ErrorCode::Replaced,
                "another connection of this device took over",
            );
        }
        slots.push(Slot {
            device: device.to_owned(),
            connection,
            frames: frames.clone(),
            control: Arc::clone(control),
        });
    }

    fn unregister(&self, user: &str, connection: u64) {
        let mut devices = self.devices.write().expect("devices");
        if let Some(slots) = devices.get_mut(user) {
            slots.retain(|s| s.connection != connection);
        }
    }

    /// The catch-up of a device: the `members`/`create` entry (seq 1) of each of its
    /// conversations it does not hold, then `caught_up`. The floor keeps no other entry,
    /// so a device that is behind in a conversation with messages is refused.
    fn catch_up(
        &self,
        user: &str,
        conv_ids: &[String],
        cursors: Option<&HashMap<String, u64>>,
    ) -> Result<Vec<String>, (ErrorCode, String)> {
        let convs = self.convs.read().expect("convs");
        let mut frames = Vec::new();
        for id in conv_ids {
            let conv = &convs[id];
            let last = *conv.last_seq.lock().expect("conv");
            let cursor = cursors.and_then(|c| c.get(id)).copied().unwrap_or(0);
            if cursor > last {
                return Err((ErrorCode::CursorAhead, format!("{id} ends at seq {last}")));
            }
            match (cursor, last) {
                (0, 1) => frames.push(conv.create_entry()),
                (c, l) if c == l => {}
                _ => {
                    return Err((
                        ErrorCode::Internal,
                        format!("{user} is behind in {id}, and the protocol floor keeps no history to catch up from: connect every device before the first send"),
                    ))
                }
            }
        }
        frames.push(json!({"type": "caught_up"}).to_string());
        Ok(frames)
    }

    /// Registers a new conversation; `members` start with the owner.
    fn create(
        &self,
        id: String,
        group: bool,
        members: Vec<String>,
    ) -> Result<Arc<Conv>, Arc<Conv>> {
        let mut convs = self.convs.write().expect("convs");
        if let Some(existing) = convs.get(&id) {
            return Err(Arc::clone(existing));
        }
        let conv = Arc::new(Conv {
            id: id.clone(),
            group,
            owner: members[0].clone(),
            created_ms: now_ms(),
            member_set: members.iter().cloned().collect(),
            members,
            // Seq 1 is the members/create entry (not kept: the floor has no history).
            last_seq: Mutex::new(1),
        });
        convs.insert(id.clone(), Arc::clone(&conv));
        let mut joined = self.joined.write().expect("joined");
        for member in &conv.members {
            joined.entry(member.clone()).or_default().push(id.clone());
        }
        Ok(conv)
    }

    fn open_direct(&self, me: &Identity, request: &Request<'_>) -> Reply {
        let Some(peer) = &request.peer else {
            return Err((ErrorCode::BadRequest, "open_direct needs peer".into()));
        };
        if *peer == me.user {
            return Err((
                ErrorCode::BadRequest,
                "a direct conversation needs two users".into(),
            ));
        }
        let (a, b) = if me.user < *peer {
            (&me.user, peer)
        } else {
            (peer, &me.user)
        };
        let conv = self
            .create(
                format!("d:{a}:{b}"),
                false,
                vec![me.user.clone(), peer.clone()],
            )
            .unwrap_or_else(|existing| existing);
        let last = *conv.last_seq.lock().expect("conv");
        Ok(json!({"conversation": conv.summary(last)}))
    }

    fn create_group(&self, me: &Identity, request: &Request<'_>) -> Reply {
        let (Some(id), Some(others)) = (&request.conv, &request.members) else {
            return Err((
                ErrorCode::BadRequest,
                "create_group needs conv and members".into(),
            ));
        };
        let mut members = Vec::with_capacity(others.len() + 1);
        members.push(me.user.clone());
        members.extend(others.iter().filter(|m| **m != me.user).cloned());
        if members.len() > GROUP_MEMBERS_MAX {
            return Err((
                ErrorCode::TooManyMembers,
                format!("at most {GROUP_MEMBERS_MAX} members"),
            ));
        }
        match self.create(id.clone().into_owned(), true, members) {
            Ok(conv) => Ok(json!({"conversation": conv.summary(1)})),
            Err(_) => Err((ErrorCode::ConversationExists, format!("{id} exists"))),
        }
    }

    /// Assigns the next seq and queues the entry to every member device; returns the
    /// seq and the server time.
    fn send(
        &self,
        me: &Identity,
        request: &Request<'_>,
    ) -> Result<(u64, u64), (ErrorCode, String)> {
        let (Some(id), Some(message_id), Some(text)) =
            (&request.conv, &request.message_id, &request.text)
        else {
            return Err((
                ErrorCode::BadRequest,
                "send needs conv, message_id and text".into(),
            ));
        };
        if text.len() > TEXT_MAX_BYTES {
            return Err((
                ErrorCode::TextTooLarge,
                format!("at most {TEXT_MAX_BYTES} bytes"),
            ));
        }
        let Some(conv) = self.convs.read().expect("convs").get(id.as_ref()).cloned() else {
            return Err((
                ErrorCode::UnknownConversation,
                format!("no conversation {id}"),
            ));
        };
        if !conv.member_set.contains(&me.user) {
            return Err((
                ErrorCode::NotMember,
                format!("{} is not a member of {id}", me.user),
            ));
        }
        let server_time_ms = now_ms();
        let mut last_seq = conv.last_seq.lock().expect("conv");
        let seq = *last_seq + 1;
        *last_seq = seq;
        let event = MsgEvent {
            r#type: "msg",
            conv: id,
            seq,
            message_id,
            sender: &me.user,
            sender_device: &me.device,
            server_time_ms,
            body: TextBody { kind: "text", text },
        };
        let frame = Utf8Bytes::from(serde_json::to_string(&event).expect("msg serializes"));
        let devices = self.devices.read().expect("devices");
        for member in &conv.members {
            for slot in devices.get(member).into_iter().flatten() {
                if slot.frames.try_send(frame.clone()).is_err() {
                    slot.control.end(
                        ErrorCode::SlowConsumer,
                        "too many events queued for this device",
                    );
                }
            }
        }
        drop(devices);
        drop(last_seq);
        Ok((seq, server_time_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatproof_client::{Client, Request};
    use serde_json::Value;
    use std::time::Duration;

    async fn connect(addr: SocketAddr) -> Client {
        Client::connect(&format!("ws://{addr}/v1/ws"))
            .await
            .expect("connects")
    }

    async fn next(ws: &mut Client) -> Value {
        ws.next_event(Duration::from_secs(5))
            .await
            .expect("an event within 5 s")
    }

    /// The reply to `request`: its result, or the error reply as `{"code": ...}`.
    async fn request(ws: &mut Client, request: Request<'_>) -> Value {
        match ws.call(&request).await.expect("a reply") {
            Ok(result) => json!({"result": result}),
            Err(e) => json!({"code": e.code, "message": e.message}),
        }
    }

    async fn hello(addr: SocketAddr, key: &TokenKey, user: &str, device: &str) -> Client {
        let mut ws = connect(addr).await;
        let token = key.mint(user, now_ms() / 1000 + 60);
        let ok = request(&mut ws, Request::hello(&token, device, None, false)).await;
        assert!(ok.get("result").is_some(), "{ok}");
        ws
    }

    /// Reads events until `caught_up`, returning the `msg` events before it.
    async fn catch_up(ws: &mut Client) -> Vec<Value> {
        let mut entries = Vec::new();
        loop {
            let event = next(ws).await;
            match event["type"].as_str() {
                Some("caught_up") => return entries,
                Some("msg") => entries.push(event),
                _ => panic!("unexpected during catch-up: {event}"),
            }
        }
    }

    async fn start() -> (SocketAddr, TokenKey) {
        let key = TokenKey::new(b"floor-test-secret-0123456789").expect("key");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve_on(listener, key.clone()));
        (addr, key)
    }

    /// Sends are acknowledged with consecutive seqs and reach every member device, the
    /// sender's included, in order; what the floor does not serve gets a clear error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_in_order_to_every_member_device() {
        let (addr, key) = start().await;
        let mut alice = hello(addr, &key, "alice", "phone").await;
        assert!(catch_up(&mut alice).await.is_empty());
        let opened = request(&mut alice, Request::OpenDirect { peer: "bob" }).await;
        assert_eq!(
            opened["result"]["conversation"]["conv"], "d:alice:bob",
            "{opened}"
        );
        let mut bob = hello(addr, &key, "bob", "laptop").await;
        let created = catch_up(&mut bob).await;
        assert_eq!(created.len(), 1);
        assert_eq!(created[0]["seq"], 1);
        assert_eq!(created[0]["body"]["kind"], "members");
        for k in 0..50 {
            let (id, text) = (format!("m{k}"), format!("hi \"{k}\""));
            let frame = Request::send_text("d:alice:bob", &id, &text).encode(&format!("s{k}"));
            alice.send_text(frame).await.expect("sent");
        }
        let (mut acks, mut own) = (Vec::new(), Vec::new());
        for k in 0..50 {
            let ack = alice.reply(&format!("s{k}")).await.expect("a reply");
            acks.push(ack.expect("acknowledged")["seq"].as_u64().expect("seq"));
        }
        while own.len() < 50 {
            let event = next(&mut alice).await;
            assert_eq!(event["type"], "msg", "{event}");
            own.push(event["seq"].as_u64().expect("seq"));
        }
        let expected: Vec<u64> = (2..52).collect();
        assert_eq!(acks, expected);
        assert_eq!(own, expected);
        for (k, seq) in expected.iter().enumerate() {
            let event = next(&mut bob).await;
            assert_eq!(event["seq"], *seq, "{event}");
            assert_eq!(event["sender"], "alice");
            assert_eq!(event["body"]["text"], format!("hi \"{k}\""));
        }
        let foreign = request(&mut bob, Request::send_text("d:carol:dave", "m", "t")).await;
        assert_eq!(foreign["code"], "unknown_conversation", "{foreign}");
        let history = Request::History {
            conv: "d:alice:bob",
            before: None,
            limit: None,
        };
        let unserved = request(&mut bob, history).await;
        assert_eq!(unserved["code"], "unknown_op", "{unserved}");
        bob.send_text(r#"["not", "a", "request"]"#)
            .await
            .expect("sent");
        let garbage = next(&mut bob).await;
        assert_eq!(garbage["code"], "bad_frame", "{garbage}");
        // A device behind in a conversation with messages cannot be caught up.
        let mut late = connect(addr).await;
        let token = key.mint("bob", now_ms() / 1000 + 60);
        let refused = request(&mut late, Request::hello(&token, "tablet", None, false)).await;
        assert_eq!(refused["code"], "internal", "{refused}");
        let early = request(&mut late, Request::send_text("d:alice:bob", "m", "t")).await;
        assert_eq!(early["code"], "hello_required", "{early}");
        let forged = request(&mut late, Request::hello("e30.AAAA", "tablet", None, false)).await;
        assert_eq!(forged["code"], "unauthorized", "{forged}");
    }
}
