//! Bad input: each gets its documented code; the connection survives where the protocol allows.

use chatproof_client::{Client, ClientError};
use chatproof_server::clock::{Clock, SystemClock};
use chatproof_server::limits::Limits;
use serde_json::{json, Value};

use crate::harness::*;

/// Sends raw text and returns the error frame it caused (matched by rid when the text has one).
async fn raw_error(client: &mut Client, text: &str) -> Value {
    client.send_text(text).await.unwrap();
    let rid = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["rid"].as_str().map(str::to_owned));
    match rid {
        Some(rid) => {
            let e = client.reply(&rid).await.unwrap().unwrap_err();
            json!({"type": "error", "rid": rid, "code": e.code, "message": e.message})
        }
        None => {
            let frame = client.next_event(WAIT).await.unwrap();
            assert_eq!(frame["type"], "error", "{frame}");
            assert!(frame["rid"].is_null());
            frame
        }
    }
}

async fn still_alive(client: &mut Client) {
    let pong = ok(client.request(json!({"op": "ping"})).await.unwrap());
    assert!(pong["server_time_ms"].as_u64().unwrap() > 0);
}

async fn closed(client: &mut Client) -> bool {
    loop {
        match client.next_event(WAIT).await {
            Err(ClientError::Closed | ClientError::Ws(_)) => return true,
            Err(e) => panic!("connection still open: {e}"),
            Ok(_) => continue,
        }
    }
}

/// Malformed frames, unknown ops and wrong types get errors; the connection lives on.
#[tokio::test]
async fn malformed_frames_are_answered_and_survived() {
    let server = TestServer::start().await;
    let (mut c, _) = server.login("alice", "phone").await;
    assert_eq!(raw_error(&mut c, "{not json").await["code"], "bad_frame");
    assert_eq!(raw_error(&mut c, "[1,2]").await["code"], "bad_frame");
    let e = raw_error(&mut c, r#"{"op":"ping"}"#).await;
    assert_eq!(
        (e["code"].as_str(), e["rid"].is_null()),
        (Some("bad_request"), true)
    );
    let e = raw_error(&mut c, r#"{"rid":"x1","op":"teleport"}"#).await;
    assert_eq!(
        (e["code"].as_str(), e["rid"].as_str()),
        (Some("unknown_op"), Some("x1"))
    );
    let e = raw_error(
        &mut c,
        r#"{"rid":"x2","op":"send","conv":5,"message_id":"m","text":"t"}"#,
    )
    .await;
    assert_eq!(
        (e["code"].as_str(), e["rid"].as_str()),
        (Some("bad_request"), Some("x2"))
    );
    let e = raw_error(
        &mut c,
        r#"{"rid":"x3","op":"send","conv":"g:a","message_id":"m","text":"t","extra":1}"#,
    )
    .await;
    assert_eq!(e["code"], "bad_request", "unknown fields are refused");
    still_alive(&mut c).await;
    for (req, code) in [
        (
            json!({"op": "send", "conv": "g:nope", "message_id": "m", "text": "t"}),
            "unknown_conversation",
        ),
        (
            json!({"op": "send", "conv": "bad id", "message_id": "m", "text": "t"}),
            "invalid_id",
        ),
        (
            json!({"op": "send", "conv": "g:nope", "message_id": "", "text": "t"}),
            "invalid_id",
        ),
        (
            json!({"op": "open_direct", "peer": "no spaces"}),
            "invalid_id",
        ),
        (
            json!({"op": "hello", "versions": [1], "token": "t", "device": "d"}),
            "already_authenticated",
        ),
        (
            json!({"op": "history", "conv": "g:nope"}),
            "unknown_conversation",
        ),
    ] {
        assert_eq!(err_code(c.request(req).await.unwrap()), code);
    }
    let conv = open_direct(&mut c, "bob").await;
    let big = "x".repeat(64 * 1024 + 1);
    let code = err_code(
        c.request(json!({"op": "send", "conv": conv, "message_id": "big", "text": big}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "text_too_large");
    still_alive(&mut c).await;
    let page = ok(c
        .request(json!({"op": "history", "conv": conv}))
        .await
        .unwrap());
    assert_eq!(
        page["entries"].as_array().unwrap().len(),
        1,
        "nothing stored was harmed"
    );
}

/// Requests before hello are refused without closing; a good hello then works.
#[tokio::test]
async fn hello_is_required_first() {
    let server = TestServer::start().await;
    let mut c = Client::connect(&server.url).await.unwrap();
    assert_eq!(
        err_code(c.request(json!({"op": "ping"})).await.unwrap()),
        "hello_required"
    );
    let code = err_code(c.request(json!({"op": "hello", "versions": [1], "token": server.token("a"), "device": "bad device"})).await.unwrap());
    assert_eq!(code, "invalid_id");
    ok(c.request(
        json!({"op": "hello", "versions": [1], "token": server.token("a"), "device": "ok"}),
    )
    .await
    .unwrap());
    still_alive(&mut c).await;
}

/// Forged, expired and missing tokens and unknown versions get an error, then the connection closes.
#[tokio::test]
async fn bad_tokens_and_versions_close_the_connection() {
    let server = TestServer::start().await;
    let now_s = SystemClock.now_ms() / 1000;
    let forged = chatproof_server::auth::TokenKey::new(b"not-the-server-secret")
        .unwrap()
        .mint("alice", now_s + 60);
    let expired = server.key.mint("alice", now_s - 1);
    for (hello, code) in [
        (
            json!({"op": "hello", "versions": [1], "token": forged, "device": "d"}),
            "unauthorized",
        ),
        (
            json!({"op": "hello", "versions": [1], "token": expired, "device": "d"}),
            "token_expired",
        ),
        (
            json!({"op": "hello", "versions": [1], "token": "", "device": "d"}),
            "unauthorized",
        ),
        (
            json!({"op": "hello", "versions": [2, 3], "token": server.token("a"), "device": "d"}),
            "unsupported_version",
        ),
    ] {
        let mut c = Client::connect(&server.url).await.unwrap();
        assert_eq!(err_code(c.request(hello).await.unwrap()), code);
        assert!(closed(&mut c).await);
    }
    let mut c = Client::connect(&server.url).await.unwrap();
    let code = err_code(
        c.request(json!({"op": "hello", "versions": [1], "device": "d"}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "bad_request", "a missing token is a malformed hello");
}

/// A frame over the limit gets `frame_too_large` and the connection closes; others are unharmed.
#[tokio::test]
async fn oversized_frame_closes_only_that_connection() {
    let limits = Limits {
        frame_len_max_bytes: 200_000,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let (mut a, _) = server.login("alice", "phone").await;
    let (mut b, _) = server.login("bob", "phone").await;
    a.send_text("x".repeat(300_000)).await.unwrap();
    let e = a.next_event(WAIT).await.unwrap();
    assert_eq!(e["code"], "frame_too_large");
    assert!(closed(&mut a).await);
    still_alive(&mut b).await;
}

/// Cursors naming unknown, foreign or future positions are refused at hello.
#[tokio::test]
async fn hello_cursors_are_validated() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for (cursors, code) in [
        (json!({ conv.clone(): 9 }), "cursor_ahead"),
        (json!({"g:nowhere": 0}), "unknown_conversation"),
    ] {
        let mut c = Client::connect(&server.url).await.unwrap();
        let hello = json!({"op": "hello", "versions": [1], "token": server.token("bob"), "device": "d", "cursors": cursors});
        assert_eq!(err_code(c.request(hello).await.unwrap()), code);
    }
    let mut eve = Client::connect(&server.url).await.unwrap();
    let hello = json!({"op": "hello", "versions": [1], "token": server.token("eve"), "device": "d", "cursors": { conv.clone(): 0 }});
    assert_eq!(err_code(eve.request(hello).await.unwrap()), "not_member");
}

/// `/metrics` serves Prometheus text; unknown paths get 404; shutdown tells clients and closes.
#[tokio::test]
async fn metrics_and_graceful_shutdown() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    send(&mut alice, &conv, "m", "x").await;
    let body = http_get(&server.http_base(), "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("chatproof_messages_in_total 1"), "{body}");
    assert!(body.contains("chatproof_connections 1"), "{body}");
    assert!(http_get(&server.http_base(), "/nope")
        .await
        .starts_with("HTTP/1.1 404"));
    let plain = http_get(&server.http_base(), "/v1/ws").await;
    assert!(
        plain.starts_with("HTTP/1.1 400") && plain.contains("websocket_required"),
        "{plain}"
    );
    let stopping = tokio::spawn(server.stop());
    let events = alice
        .events_until(WAIT, |e| e["type"] == "error")
        .await
        .unwrap();
    assert_eq!(events.last().unwrap()["code"], "shutting_down");
    assert!(closed(&mut alice).await);
    stopping.await.unwrap();
}

async fn http_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The same device connecting again replaces the older connection, which is told why.
#[tokio::test]
async fn same_device_again_replaces_the_old_connection() {
    let server = TestServer::start().await;
    let (mut first, _) = server.login("alice", "phone").await;
    let (mut second, _) = server.login("alice", "phone").await;
    let events = first
        .events_until(WAIT, |e| e["type"] == "error")
        .await
        .unwrap();
    assert_eq!(events.last().unwrap()["code"], "replaced");
    assert!(closed(&mut first).await);
    still_alive(&mut second).await;
}

/// Past the connection limit (and with no spare health connections) the server
/// answers 503 `overloaded` and serves the others.
#[tokio::test]
async fn connection_limit_refuses_with_overloaded() {
    let limits = Limits {
        connections_max: 1,
        health_connections_max: 0,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let refused = http_get(&server.http_base(), "/healthz").await;
    assert!(
        refused.starts_with("HTTP/1.1 503") && refused.contains("overloaded"),
        "{refused}"
    );
    still_alive(&mut alice).await;
}

/// A device that stops reading is dropped once its bounded queue fills (told
/// `slow_consumer` when its socket still takes the frame); the sender is unaffected,
/// and a reconnect catches the slow device up with nothing lost.
#[tokio::test]
async fn stalled_reader_is_dropped_as_slow_consumer() {
    let limits = Limits {
        device_queue_len_max: 4,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let (mut bob, _) = server.login("bob", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let big = "x".repeat(60 * 1024);
    for i in 0..200 {
        send(&mut alice, &conv, &format!("m{i}"), &big).await;
    }
    let ended = loop {
        match bob.next_event(WAIT).await {
            Ok(e) if e["type"] == "error" => {
                assert_eq!(e["code"], "slow_consumer");
                assert!(closed(&mut bob).await);
                break true;
            }
            Ok(_) => continue,
            Err(ClientError::Closed | ClientError::Ws(_)) => break true,
            Err(ClientError::Timeout(_) | ClientError::Protocol(_)) => break false,
        }
    };
    assert!(
        ended,
        "the stalled device's connection was dropped, not left open"
    );
    still_alive(&mut alice).await;
    let (_bob, backlog) = server
        .login_with("bob", "laptop", json!({ conv.clone(): 0 }))
        .await;
    assert_eq!(
        seqs(&backlog, &conv),
        (1..=201).collect::<Vec<_>>(),
        "nothing was lost"
    );
}
