//! Presence: contacts and watchers hear of online/offline changes, coalesced;
//! last seen survives a restart; bad requests are refused.

use std::time::{Duration, Instant};

use chatproof_client::Client;
use chatproof_server::limits::Limits;
use serde_json::{json, Value};

use crate::harness::{err_code, ok, open_direct, TestServer, WAIT};

fn fast_presence() -> Limits {
    Limits {
        presence_interval: Duration::from_millis(100),
        ..Limits::default()
    }
}

/// Waits for a presence state of `user` matching `online`; returns it.
async fn presence_of(client: &mut Client, user: &str, online: bool) -> Value {
    let events = client
        .events_until(WAIT, |e| {
            e["type"] == "presence"
                && e["users"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["user"] == user && s["online"] == online)
        })
        .await
        .unwrap();
    let frame = events.last().unwrap();
    frame["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["user"] == user)
        .unwrap()
        .clone()
}

/// A contact going online and offline reaches the other member; a watcher who
/// shares no conversation hears of it after asking; last seen is set on the way out.
#[tokio::test]
async fn contacts_and_watchers_see_changes() {
    let server = TestServer::start_with(fast_presence()).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    open_direct(&mut alice, "bob").await;
    let (mut carol, _) = server.login("carol", "phone").await;
    let before = ok(carol
        .request(json!({"op": "presence", "users": ["bob", "alice"]}))
        .await
        .unwrap());
    let states = before["users"].as_array().unwrap();
    assert_eq!(states.len(), 2);
    let bob_state = states.iter().find(|s| s["user"] == "bob").unwrap();
    assert_eq!(bob_state["online"], false);
    assert!(
        bob_state.get("last_seen_ms").is_none(),
        "never seen: {bob_state}"
    );
    assert_eq!(
        states.iter().find(|s| s["user"] == "alice").unwrap()["online"],
        true
    );

    let (bob, _) = server.login("bob", "laptop").await;
    presence_of(&mut alice, "bob", true).await;
    presence_of(&mut carol, "bob", true).await;
    bob.close().await;
    let gone = presence_of(&mut alice, "bob", false).await;
    let seen = gone["last_seen_ms"]
        .as_u64()
        .expect("last seen after leaving");
    let watched = presence_of(&mut carol, "bob", false).await;
    assert_eq!(watched["last_seen_ms"].as_u64(), Some(seen));
    let now = ok(alice
        .request(json!({"op": "presence", "users": ["bob"], "watch": false}))
        .await
        .unwrap());
    assert_eq!(now["users"][0]["online"], false);
    assert_eq!(now["users"][0]["last_seen_ms"].as_u64(), Some(seen));
}

/// A user flapping many times produces few presence frames (at most one per
/// interval, plus edges), and the last one says how it ended.
#[tokio::test]
async fn flapping_is_coalesced() {
    let interval = Duration::from_millis(200);
    let server = TestServer::start_with(Limits {
        presence_interval: interval,
        ..Limits::default()
    })
    .await;
    let (mut alice, _) = server.login("alice", "phone").await;
    open_direct(&mut alice, "bob").await;
    let started = Instant::now();
    let flaps = 30;
    for _ in 0..flaps {
        let (bob, _) = server.login("bob", "phone").await;
        bob.close().await;
    }
    let elapsed = started.elapsed();
    // Let the last change through, then count what alice was sent.
    let mut frames = Vec::new();
    let until = tokio::time::Instant::now() + interval * 5;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match alice.next_event(left).await {
            Ok(event) if event["type"] == "presence" => frames.push(event),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let bound = (elapsed.as_millis() / interval.as_millis()) as usize + 3;
    assert!(
        !frames.is_empty() && frames.len() <= bound,
        "{} presence frames for {flaps} flaps in {elapsed:?} (bound {bound})",
        frames.len()
    );
    for frame in &frames {
        let bobs = frame["users"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["user"] == "bob")
            .count();
        assert_eq!(bobs, 1, "one state per user per frame: {frame}");
    }
    let last = frames.last().unwrap();
    assert_eq!(last["users"][0]["online"], false, "{last}");
}

/// Last seen is kept in the store: a restarted server still knows it.
#[tokio::test]
async fn last_seen_survives_restart() {
    let server = TestServer::start_with(fast_presence()).await;
    let (bob, _) = server.login("bob", "phone").await;
    bob.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let before = ok(alice
        .request(json!({"op": "presence", "users": ["bob"]}))
        .await
        .unwrap());
    let seen = before["users"][0]["last_seen_ms"].as_u64().expect("seen");
    alice.close().await;
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, fast_presence()).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let after = ok(alice
        .request(json!({"op": "presence", "users": ["bob"]}))
        .await
        .unwrap());
    assert_eq!(after["users"][0]["online"], false);
    assert_eq!(after["users"][0]["last_seen_ms"].as_u64(), Some(seen));
}

/// Empty, oversized and malformed presence requests are refused.
#[tokio::test]
async fn bad_presence_requests() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let empty = alice
        .request(json!({"op": "presence", "users": []}))
        .await
        .unwrap();
    assert_eq!(err_code(empty), "bad_request");
    let many: Vec<String> = (0..501).map(|i| format!("u{i}")).collect();
    let too_many = alice
        .request(json!({"op": "presence", "users": many}))
        .await
        .unwrap();
    assert_eq!(err_code(too_many), "bad_request");
    let invalid = alice
        .request(json!({"op": "presence", "users": ["no spaces"]}))
        .await
        .unwrap();
    assert_eq!(err_code(invalid), "invalid_id");
    let unknown_field = alice
        .request(json!({"op": "presence", "users": ["bob"], "color": 1}))
        .await
        .unwrap();
    assert_eq!(err_code(unknown_field), "bad_request");
}
