//! The authorization matrix: every operation that touches a conversation or its media,
//! attempted by a user who never was a member, a removed member, an expired token and a
//! forged token, over HTTP (`/v1/rpc`, `/v1/poll`, `/v1/media`). Each is refused with the
//! code PROTOCOL.md documents, and no refusal carries an entry, a member list or a media
//! byte.

use std::io::Cursor;

use chatproof_server::auth::TokenKey;
use chatproof_server::clock::{Clock, SystemClock};
use image::{ImageFormat, Rgba, RgbaImage};
use serde_json::{json, Value};

use crate::harness::{http_with_token, msgs_until, ok, HttpReply, TestServer};

const GROUP: &str = "g:vault";
/// Text of the message sent after carol's removal: she must never see it.
const AFTER_REMOVAL: &str = "sent after carol left";

fn png(seed: u8) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    RgbaImage::from_fn(8, 8, |x, y| Rgba([x as u8, y as u8, seed, 255]))
        .write_to(&mut out, ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn upload_path() -> String {
    format!("/v1/media?conv={}", GROUP.replace(':', "%3A"))
}

/// The group, as the matrix finds it: alice (owner), bob and carol joined; a message and
/// an image before carol's removal, then her removal, then a message and an image after.
struct World {
    server: TestServer,
    /// Uploaded after carol's removal.
    late_media: String,
    /// Uploaded while carol was a member.
    early_media: String,
    removal_seq: u64,
}

async fn world() -> World {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    ok(alice
        .request(json!({"op": "create_group", "conv": GROUP, "members": ["bob", "carol"]}))
        .await
        .unwrap());
    let early = http_with_token(
        &server,
        "POST",
        &upload_path(),
        Some((&server.token("alice"), "")),
        png(1),
    )
    .await;
    assert_eq!(early.status, 201);
    let early_media = early.json()["media"]["id"].as_str().unwrap().to_owned();
    ok(alice
        .request(json!({"op": "send", "conv": GROUP, "message_id": "m1", "text": "before"}))
        .await
        .unwrap());
    let removed = ok(alice
        .request(json!({"op": "remove_members", "conv": GROUP, "users": ["carol"]}))
        .await
        .unwrap());
    let removal_seq = removed["seq"].as_u64().unwrap();
    ok(alice
        .request(json!({"op": "send", "conv": GROUP, "message_id": "m2", "text": AFTER_REMOVAL}))
        .await
        .unwrap());
    let late = http_with_token(
        &server,
        "POST",
        &upload_path(),
        Some((&server.token("alice"), "")),
        png(2),
    )
    .await;
    assert_eq!(late.status, 201);
    let late_media = late.json()["media"]["id"].as_str().unwrap().to_owned();
    World {
        server,
        late_media,
        early_media,
        removal_seq,
    }
}

/// One operation of the matrix, as an HTTP request.
struct Op {
    name: &'static str,
    method: &'static str,
    path: String,
    body: Vec<u8>,
}

fn rpc_op(name: &'static str, frame: Value) -> Op {
    Op {
        name,
        method: "POST",
        path: "/v1/rpc".into(),
        body: serde_json::to_vec(&frame).unwrap(),
    }
}

/// Every operation that reads or changes the group or its media.
fn ops(w: &World) -> Vec<Op> {
    vec![
        rpc_op(
            "send",
            json!({"rid": "r", "op": "send", "conv": GROUP, "message_id": "x1", "text": "intruder"}),
        ),
        rpc_op(
            "send image",
            json!({"rid": "r", "op": "send", "conv": GROUP, "message_id": "x2", "media": w.late_media}),
        ),
        rpc_op(
            "sync",
            json!({"rid": "r", "op": "sync", "conv": GROUP, "after": 0}),
        ),
        rpc_op(
            "history",
            json!({"rid": "r", "op": "history", "conv": GROUP}),
        ),
        rpc_op(
            "ack",
            json!({"rid": "r", "op": "ack", "conv": GROUP, "delivered": 1, "read": 1}),
        ),
        rpc_op(
            "add_members",
            json!({"rid": "r", "op": "add_members", "conv": GROUP, "users": ["mallory"]}),
        ),
        rpc_op(
            "remove_members",
            json!({"rid": "r", "op": "remove_members", "conv": GROUP, "users": ["bob"]}),
        ),
        rpc_op("leave", json!({"rid": "r", "op": "leave", "conv": GROUP})),
        Op {
            name: "poll",
            method: "POST",
            path: "/v1/poll".into(),
            body: serde_json::to_vec(&json!({"cursors": {GROUP: 0}, "timeout_ms": 0})).unwrap(),
        },
        Op {
            name: "upload",
            method: "POST",
            path: upload_path(),
            body: png(3),
        },
        Op {
            name: "download (uploaded after the removal)",
            method: "GET",
            path: format!("/v1/media/{}", w.late_media),
            body: Vec::new(),
        },
    ]
}

/// A refusal carries its code and a message, nothing of the conversation.
#[track_caller]
fn assert_refused(reply: &HttpReply, who: &str, op: &str, status: u16, code: &str) {
    let body = String::from_utf8_lossy(&reply.body);
    assert_eq!(
        (reply.status, reply.code().as_str()),
        (status, code),
        "{who}: {op}: {body}"
    );
    let json = reply.json();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        keys.iter()
            .all(|k| ["type", "rid", "code", "message"].contains(k)),
        "{who}: {op}: a refusal carries more than its error: {body}"
    );
    for secret in [AFTER_REMOVAL, "before", "\"members\""] {
        assert!(
            !body.contains(secret),
            "{who}: {op}: leaks {secret:?}: {body}"
        );
    }
}

async fn attempt(w: &World, token: &str, op: &Op) -> HttpReply {
    http_with_token(
        &w.server,
        op.method,
        &op.path,
        Some((token, "tablet")),
        op.body.clone(),
    )
    .await
}

/// A user who never was a member is refused everything with `not_member`.
#[tokio::test]
async fn outsiders_are_refused_everything() {
    let w = world().await;
    let eve = w.server.token("eve");
    for op in ops(&w) {
        let reply = attempt(&w, &eve, &op).await;
        assert_refused(&reply, "eve", op.name, 403, "not_member");
    }
    let early = Op {
        name: "download (uploaded before)",
        method: "GET",
        path: format!("/v1/media/{}", w.early_media),
        body: Vec::new(),
    };
    assert_refused(
        &attempt(&w, &eve, &early).await,
        "eve",
        early.name,
        403,
        "not_member",
    );
}

/// An expired token and a forged one are refused before anything is looked at.
#[tokio::test]
async fn bad_tokens_are_refused_everything() {
    let w = world().await;
    let now_s = SystemClock.now_ms() / 1000;
    let expired = w.server.key.mint("bob", now_s.saturating_sub(10));
    let forged = TokenKey::new(b"not-the-server-secret-0123")
        .unwrap()
        .mint("bob", now_s + 3600);
    let mut all = ops(&w);
    all.push(rpc_op(
        "presence",
        json!({"rid": "r", "op": "presence", "users": ["alice"]}),
    ));
    all.push(rpc_op(
        "conversations",
        json!({"rid": "r", "op": "conversations"}),
    ));
    for op in &all {
        let reply = attempt(&w, &expired, op).await;
        assert_refused(&reply, "expired token", op.name, 401, "token_expired");
        let reply = attempt(&w, &forged, op).await;
        assert_refused(&reply, "forged token", op.name, 401, "unauthorized");
    }
}

/// A removed member may still read up to the entry that removed them (as PROTOCOL.md
/// says of former members) and nothing after it; every change, every upload and every
/// image posted after the removal is refused.
#[tokio::test]
async fn removed_members_read_up_to_their_removal_only() {
    let w = world().await;
    let carol = w.server.token("carol");
    let mut refused_ops = Vec::new();
    for op in ops(&w) {
        match op.name {
            "sync" | "history" => {
                let reply = attempt(&w, &carol, &op).await;
                assert_eq!(reply.status, 200, "carol: {}: {:?}", op.name, reply.json());
                let entries = reply.json()["result"]["entries"].clone();
                let seqs: Vec<u64> = entries
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["seq"].as_u64().unwrap())
                    .collect();
                assert_eq!(
                    seqs,
                    (1..=w.removal_seq).collect::<Vec<_>>(),
                    "carol: {}",
                    op.name
                );
                assert!(!String::from_utf8_lossy(&reply.body).contains(AFTER_REMOVAL));
            }
            _ => refused_ops.push(op),
        }
    }
    for op in refused_ops {
        let reply = attempt(&w, &carol, &op).await;
        let body = String::from_utf8_lossy(&reply.body).into_owned();
        match op.name {
            // Her cursors up to the removal still move; her poll streams her past only.
            "ack" => {
                assert_eq!(reply.status, 200, "carol: ack: {body}");
                continue;
            }
            "poll" => {
                assert_eq!(reply.status, 200, "carol: poll: {body}");
                let seqs: Vec<u64> = reply.json()["entries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["seq"].as_u64().unwrap())
                    .collect();
                assert_eq!(seqs, (1..=w.removal_seq).collect::<Vec<_>>(), "carol: poll");
                assert!(!body.contains(AFTER_REMOVAL), "carol: poll: {body}");
                continue;
            }
            _ => {}
        }
        assert_refused(&reply, "carol", op.name, 403, "not_member");
    }
    // What she could read once stays readable.
    let early = Op {
        name: "download (uploaded before)",
        method: "GET",
        path: format!("/v1/media/{}", w.early_media),
        body: Vec::new(),
    };
    assert_eq!(attempt(&w, &carol, &early).await.status, 200);
}

/// The sender of an entry is always the token's user and device: a frame naming
/// another sender is refused (unknown fields are), and an entry shows who sent it.
#[tokio::test]
async fn the_sender_is_the_tokens_user() {
    let w = world().await;
    let (mut bob, _) = w.server.login("bob", "laptop").await;
    let forged = as_bob(
        &w,
        json!({"rid": "r", "op": "send", "conv": GROUP, "message_id": "forged-sender",
                               "text": "who am I", "sender": "alice", "sender_device": "phone"}),
    )
    .await;
    assert_eq!(
        (forged.status, forged.code().as_str()),
        (400, "bad_request")
    );
    assert!(String::from_utf8_lossy(&forged.body).contains("sender"));
    let sent = as_bob(
        &w,
        json!({"rid": "r", "op": "send", "conv": GROUP, "message_id": "real-sender", "text": "me"}),
    )
    .await;
    assert_eq!(sent.status, 200, "{:?}", sent.json());
    let seq = sent.json()["result"]["seq"].as_u64().unwrap();
    let msgs = msgs_until(&mut bob, GROUP, seq).await;
    let entry = msgs.last().unwrap();
    assert_eq!(
        (entry["sender"].as_str(), entry["sender_device"].as_str()),
        (Some("bob"), Some("tablet")),
        "{entry}"
    );
}

/// `POST /v1/rpc` with `frame` as bob's tablet.
async fn as_bob(w: &World, frame: Value) -> HttpReply {
    let token = w.server.token("bob");
    let body = serde_json::to_vec(&frame).unwrap();
    http_with_token(&w.server, "POST", "/v1/rpc", Some((&token, "tablet")), body).await
}
