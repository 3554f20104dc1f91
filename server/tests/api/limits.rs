//! Per-user rate limits: past the burst, a send or group change is refused with
//! `rate_limited` and `retry_after_ms`, nothing is done, and the retry after that
//! wait succeeds; counted in `/metrics`.

use std::time::Duration;

use chatproof_server::limits::Limits;
use chatproof_server::rate::Rate;
use serde_json::json;

use crate::harness::*;

fn limits(send: Rate, group_change: Rate) -> Limits {
    Limits {
        send_rate: send,
        group_change_rate: group_change,
        ..Limits::default()
    }
}

async fn metric(server: &TestServer, line_start: &str) -> f64 {
    let reply = http(server, "GET", "/metrics", None, Vec::new()).await;
    let text = String::from_utf8(reply.body).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A burst of 3 at 4 per second: the 4th send is refused with how long to wait;
/// it was not stored; after the wait the same message id goes through once.
#[tokio::test]
async fn sends_past_the_burst_are_refused_until_a_token_returns() {
    let server = TestServer::start_with(limits(
        Rate {
            per_sec: 4.0,
            burst: 3,
        },
        Limits::default().group_change_rate,
    ))
    .await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let mut last_seq = 0;
    for i in 0..3 {
        let ack = send(&mut alice, &conv, &format!("m{i}"), "hi").await;
        last_seq = ack["seq"].as_u64().unwrap();
    }
    let refused = alice
        .request(json!({"op": "send", "conv": conv, "message_id": "m3", "text": "one too many"}))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code, "rate_limited", "{}", refused.message);
    let wait = refused.retry_after_ms.expect("retry_after_ms");
    assert!(
        (1..=250).contains(&wait),
        "a token returns every 250 ms: {wait}"
    );
    assert!(refused.message.contains("retry in"), "{}", refused.message);
    // Nothing was stored: the history ends at the last accepted send.
    let history = ok(alice
        .request(json!({"op": "sync", "conv": conv, "after": 0}))
        .await
        .unwrap());
    let seqs: Vec<u64> = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.last(), Some(&last_seq), "{history}");
    assert!(!history.to_string().contains("one too many"));
    // Over HTTP too: 429, Retry-After in seconds, retry_after_ms in the body.
    let reply = rpc(
        &server,
        "alice",
        "laptop",
        json!({"rid": "r", "op": "send", "conv": conv, "message_id": "h1", "text": "x"}),
    )
    .await;
    assert_eq!(
        reply.status,
        429,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.headers["retry-after"], "1");
    let body = reply.json();
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert!(
        body["retry_after_ms"].as_u64().is_some_and(|ms| ms >= 1),
        "{body}"
    );
    // After the wait, the same message id goes through, once.
    tokio::time::sleep(Duration::from_millis(wait + 20)).await;
    let ack = send(&mut alice, &conv, "m3", "one too many").await;
    assert_eq!(ack["seq"].as_u64(), Some(last_seq + 1), "{ack}");
    assert_eq!(ack["duplicate"], false);
    let hits = metric(&server, "chatproof_limit_hits_total{limit=\"send_rate\"}").await;
    assert!(hits >= 2.0, "counted in /metrics: {hits}");
    // Other users have their own budget.
    let (mut bob, _) = server.login("bob", "phone").await;
    send(&mut bob, &conv, "b0", "hello").await;
}

/// Group creations and membership changes share one budget per user.
#[tokio::test]
async fn group_changes_past_the_burst_are_refused() {
    let server = TestServer::start_with(limits(
        Limits::default().send_rate,
        Rate {
            per_sec: 0.5,
            burst: 2,
        },
    ))
    .await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let created = ok(alice
        .request(json!({"op": "create_group", "members": ["bob"]}))
        .await
        .unwrap());
    let conv = created["conversation"]["conv"].as_str().unwrap().to_owned();
    ok(alice
        .request(json!({"op": "add_members", "conv": conv, "users": ["carol"]}))
        .await
        .unwrap());
    let refused = alice
        .request(json!({"op": "add_members", "conv": conv, "users": ["dave"]}))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code, "rate_limited", "{}", refused.message);
    assert!(refused
        .retry_after_ms
        .is_some_and(|ms| ms > 1000 && ms <= 2000));
    // dave was not added.
    let members = ok(alice.request(json!({"op": "conversations"})).await.unwrap());
    assert!(!members.to_string().contains("dave"), "{members}");
    // Sends are not affected by the group-change budget.
    send(&mut alice, &conv, "m0", "still talking").await;
}

/// With two devices connected, a user's third is refused `too_many_devices` and
/// closed; a device connecting again still replaces itself, and once one leaves
/// the third gets in. Long-poll devices count too.
#[tokio::test]
async fn devices_past_the_limit_are_refused() {
    let server = TestServer::start_with(Limits {
        devices_per_user_max: 2,
        ..Limits::default()
    })
    .await;
    let (phone, _) = server.login("alice", "phone").await;
    let (_laptop, _) = server.login("alice", "laptop").await;
    let refused =
        chatproof_client::Client::login(&server.url, &server.token("alice"), "tablet", json!({}))
            .await
            .err()
            .expect("a third device is refused");
    assert!(
        refused.to_string().contains("too_many_devices"),
        "{refused}"
    );
    let reply = poll(
        &server,
        "alice",
        "web",
        json!({"cursors": {}, "timeout_ms": 0}),
    )
    .await;
    assert_eq!(
        reply.status,
        409,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.code(), "too_many_devices");
    // The same device again replaces itself: not a third device.
    let (_phone_again, _) = server.login("alice", "phone").await;
    drop(phone);
    // Another user is not affected.
    server.login("bob", "tablet").await;
    let hits = metric(
        &server,
        "chatproof_limit_hits_total{limit=\"devices_per_user\"}",
    )
    .await;
    assert_eq!(hits, 2.0);
}

/// With one upload in progress and a limit of one, a second is refused with
/// `overloaded` and a wait, and keeps nothing; once the first ends, uploads are taken again.
#[tokio::test]
async fn uploads_past_the_limit_are_refused() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start_with(Limits {
        uploads_max: 1,
        ..Limits::default()
    })
    .await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let path = format!("/v1/media?conv={}", conv.replace(':', "%3A"));
    // A slow upload: headers and a few bytes of a promised 100,000.
    let addr = server.http_base().trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: image/png\r\nContent-Length: 100000\r\n\r\nPNG-",
        server.token("alice")
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut refused = None;
    for _ in 0..50 {
        // The slow upload takes its place once its head is read.
        let reply = http(&server, "POST", &path, Some(("alice", "")), vec![0u8; 64]).await;
        if reply.status == 503 {
            refused = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("a second upload is refused while the first holds the place");
    assert_eq!(refused.code(), "overloaded");
    assert!(refused.json()["retry_after_ms"].as_u64().is_some());
    assert_eq!(refused.headers["retry-after"], "1");
    // The slow upload goes away: its place is free again (this one is refused for
    // its content, not for want of a place).
    drop(slow);
    let mut status = 503;
    for _ in 0..50 {
        status = http(&server, "POST", &path, Some(("alice", "")), vec![0u8; 64])
            .await
            .status;
        if status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        status, 415,
        "junk is refused as unsupported once a place is free"
    );
    assert!(metric(&server, "chatproof_limit_hits_total{limit=\"uploads\"}").await >= 1.0);
}

/// `GET path` on a new connection from `source`: the status (0 if the connection
/// was refused before any reply) and the whole response.
async fn get_from(server: &TestServer, source: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: std::net::SocketAddr = server
        .http_base()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// With two connections open from 127.0.0.1 and a limit of two per address, a
/// third from there gets 503 `overloaded` and is closed; another address is served,
/// and a closed connection frees its place.
#[tokio::test]
async fn connections_past_the_per_address_limit_are_refused() {
    let server = TestServer::start_with(Limits {
        connections_per_address_max: 2,
        ..Limits::default()
    })
    .await;
    let (first, _) = server.login("alice", "phone").await;
    let (_second, _) = server.login("bob", "phone").await;
    let (status, text) = get_from(&server, "127.0.0.1", "/healthz").await;
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("overloaded") && text.contains("per address"),
        "{text}"
    );
    assert_eq!(get_from(&server, "127.0.0.2", "/healthz").await.0, 200);
    let (_, metrics) = get_from(&server, "127.0.0.3", "/metrics").await;
    assert!(
        metrics.contains("chatproof_connections_closed_for_total{reason=\"address_limit\"} 1"),
        "counted in /metrics"
    );
    drop(first);
    let mut status = 0;
    for _ in 0..50 {
        status = get_from(&server, "127.0.0.1", "/healthz").await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "the closed connection's place is free again");
}
