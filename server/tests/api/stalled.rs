//! Stalled and silent connections: each is closed after its documented bound,
//! counted in `/metrics`, and while they hold every slot `/healthz` still answers.

use std::time::{Duration, Instant};

use chatproof_client::{Client, ClientError};
use chatproof_server::limits::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// Short bounds, so the tests see them pass.
fn short_bounds() -> Limits {
    Limits {
        header_read_timeout: Duration::from_millis(1200),
        keep_alive_timeout: Duration::from_millis(800),
        hello_timeout: Duration::from_millis(500),
        ..Limits::default()
    }
}

fn addr(server: &TestServer) -> String {
    server.http_base().trim_start_matches("http://").to_owned()
}

/// Reads until the server closes `stream` (or resets it); returns what arrived
/// and how long it took. Fails after `WAIT`.
async fn until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Err(_) => panic!("still open after {WAIT:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

async fn get(server: &TestServer, path: &str) -> HttpReply {
    http(server, "GET", path, None, Vec::new()).await
}

fn closed_for(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("chatproof_connections_closed_for_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A connection that never sends a byte is closed after the keep-alive timeout.
#[tokio::test]
async fn silent_connection_is_closed_after_the_keep_alive_timeout() {
    let server = TestServer::start_with(short_bounds()).await;
    let mut silent = TcpStream::connect(addr(&server)).await.unwrap();
    let (got, after) = until_closed(&mut silent).await;
    assert!(got.is_empty(), "{got}");
    assert!(
        after >= Duration::from_millis(400),
        "closed after {after:?}"
    );
    let metrics = get(&server, "/metrics").await;
    assert_eq!(
        closed_for(&String::from_utf8_lossy(&metrics.body), "keep_alive_idle"),
        1
    );
}

/// A request head dripped a line at a time (each within the keep-alive timeout)
/// is cut off at the header-read timeout.
#[tokio::test]
async fn dripping_request_head_is_closed_after_the_header_read_timeout() {
    let server = TestServer::start_with(short_bounds()).await;
    let mut slow = TcpStream::connect(addr(&server)).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let mut closed = false;
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if slow
            .write_all(format!("x-drip-{i}: 1\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    let after = started.elapsed();
    assert!(closed, "still open after {after:?} of dripping");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(6),
        "closed after {after:?}"
    );
}

/// A WebSocket that never says `hello` is told `hello_timeout` and closed.
#[tokio::test]
async fn websocket_without_hello_is_closed() {
    let server = TestServer::start_with(short_bounds()).await;
    let mut quiet = Client::connect(&server.url).await.unwrap();
    let started = Instant::now();
    match quiet.next_event(WAIT).await {
        Ok(event) => {
            assert_eq!(event["type"], "error");
            assert_eq!(event["code"], "hello_timeout", "{event}");
            assert!(!event["message"].as_str().unwrap().is_empty());
        }
        Err(ClientError::Closed) => panic!("closed without saying why"),
        Err(e) => panic!("not closed: {e}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(matches!(
        quiet.next_event(WAIT).await,
        Err(ClientError::Closed | ClientError::Ws(_))
    ));
    let (mut alice, _) = server.login("alice", "phone").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pong = ok(alice
        .request(serde_json::json!({"op": "ping"}))
        .await
        .unwrap());
    assert!(
        pong["server_time_ms"].as_u64().is_some(),
        "a device that said hello stays"
    );
}

/// Stalled connections holding every slot leave `/healthz` and `/metrics`
/// reachable through the spare health connections (other paths there get 503
/// `overloaded`), and free their slots at their bound, so devices connect again.
#[tokio::test]
async fn healthz_answers_while_stalled_connections_hold_every_slot() {
    let limits = Limits {
        connections_max: 3,
        health_connections_max: 2,
        ..short_bounds()
    };
    let server = TestServer::start_with(limits).await;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr(&server)).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let health = get(&server, "/healthz").await;
    assert_eq!(
        health.status,
        200,
        "{}",
        String::from_utf8_lossy(&health.body)
    );
    let other = http(
        &server,
        "POST",
        "/v1/rpc",
        Some(("alice", "web")),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!((other.status, other.code().as_str()), (503, "overloaded"));
    for s in &mut stalled {
        let (_, after) = until_closed(s).await;
        assert!(after < Duration::from_secs(5), "stalled for {after:?}");
    }
    let (mut alice, _) = server.login("alice", "phone").await;
    let pong = ok(alice
        .request(serde_json::json!({"op": "ping"}))
        .await
        .unwrap());
    assert!(pong["server_time_ms"].as_u64().is_some());
}

/// Writes one HTTP/1.1 request on `stream` and reads its response (status and body).
async fn exchange(stream: &mut TcpStream, head: &str, body: &str) -> (u16, String) {
    let request = format!("{head}content-length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if rest.len() >= len {
                let status = head[9..12].parse().unwrap();
                return (status, rest[..len].to_owned());
            }
        }
    }
}

/// A poll held longer than the keep-alive timeout does not cost its connection:
/// the idle time counts from the end of the response, so the next poll on the same
/// connection is served.
#[tokio::test]
async fn held_poll_longer_than_the_keep_alive_timeout_keeps_its_connection() {
    let limits = Limits {
        keep_alive_timeout: Duration::from_millis(1500),
        ..short_bounds()
    };
    let server = TestServer::start_with(limits).await;
    // Over HTTP, so no device of alice comes online and no presence change ends bob's poll early.
    let opened = rpc(
        &server,
        "alice",
        "web",
        serde_json::json!({"rid": "o", "op": "open_direct", "peer": "bob"}),
    )
    .await;
    let conv = opened.json()["result"]["conversation"]["conv"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut conn = TcpStream::connect(addr(&server)).await.unwrap();
    let head = format!(
        "POST /v1/poll HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nx-chatproof-device: web\r\ncontent-type: application/json\r\n",
        server.token("bob")
    );
    let body = format!(r#"{{"cursors": {{"{conv}": 1}}, "timeout_ms": 2500}}"#);
    let started = Instant::now();
    let (status, first) = exchange(&mut conn, &head, &body).await;
    assert_eq!(status, 200, "{first}");
    assert!(started.elapsed() >= Duration::from_millis(2300), "held");
    // Idle for well under the keep-alive timeout since the response, but longer
    // than it since the request's last byte.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, second) = exchange(&mut conn, &head, &body.replace("2500", "100")).await;
    assert_eq!(status, 200, "{second}");
}
