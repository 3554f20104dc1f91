//! Offline catch-up, stored cursors, new devices, history paging, expiry and restart.

use std::time::Duration;

use chatproof_server::limits::Limits;
use serde_json::json;

use crate::harness::*;

/// A device that was offline gets everything after its cursor, in order, once, then goes live.
#[tokio::test]
async fn offline_device_catches_up_from_its_cursor() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for i in 0..30 {
        send(&mut alice, &conv, &format!("m{i}"), "offline").await;
    }
    let (mut bob, backlog) = server
        .login_with("bob", "phone", json!({ conv.clone(): 5 }))
        .await;
    assert_eq!(seqs(&backlog, &conv), (6..=31).collect::<Vec<_>>());
    send(&mut alice, &conv, "live", "now").await;
    let live = msgs_until(&mut bob, &conv, 32).await;
    assert_eq!(seqs(&live, &conv), vec![32]);
    assert!(!delivers_within_quiet(&mut bob).await);
}

/// Catch-up larger than a page arrives complete while live traffic interleaves.
#[tokio::test]
async fn large_backlog_interleaved_with_live_traffic() {
    let limits = Limits {
        page_len_max: 16,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for i in 0..100 {
        send(&mut alice, &conv, &format!("m{i}"), "backlog").await;
    }
    let (mut bob, _) = chatproof_client::Client::login(
        &server.url,
        &server.token("bob"),
        "phone",
        json!({ conv.clone(): 0 }),
    )
    .await
    .unwrap();
    for i in 0..20 {
        send(&mut alice, &conv, &format!("live{i}"), "live").await;
    }
    let got = msgs_until(&mut bob, &conv, 121).await;
    assert_eq!(seqs(&got, &conv), (1..=121).collect::<Vec<_>>());
}

/// Without presented cursors a device resumes after what it last acknowledged.
#[tokio::test]
async fn reconnect_resumes_after_stored_cursor() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let (mut bob, _) = server.login("bob", "phone").await;
    for i in 0..10 {
        send(&mut alice, &conv, &format!("m{i}"), "x").await;
    }
    msgs_until(&mut bob, &conv, 11).await;
    ok(bob
        .request(json!({"op": "ack", "conv": conv, "delivered": 7}))
        .await
        .unwrap());
    bob.close().await;
    let (_bob, backlog) = server.login("bob", "phone").await;
    assert_eq!(seqs(&backlog, &conv), (8..=11).collect::<Vec<_>>());
}

/// A brand-new device gets its conversation list and the most recent entries.
#[tokio::test]
async fn new_device_gets_conversations_and_recent_history() {
    let limits = Limits {
        new_device_recent_len: 10,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for i in 0..30 {
        send(&mut alice, &conv, &format!("m{i}"), "x").await;
    }
    let (mut tablet, welcome) =
        chatproof_client::Client::login(&server.url, &server.token("bob"), "tablet", json!({}))
            .await
            .unwrap();
    assert_eq!(welcome["conversations"][0]["conv"], conv);
    assert_eq!(welcome["conversations"][0]["last_seq"], 31);
    let events = tablet
        .events_until(WAIT, |e| e["type"] == "caught_up")
        .await
        .unwrap();
    assert_eq!(seqs(&events, &conv), (22..=31).collect::<Vec<_>>());
}

/// History pages backwards without gaps or overlaps down to the first entry.
#[tokio::test]
async fn history_pages_backwards() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for i in 0..25 {
        send(&mut alice, &conv, &format!("m{i}"), "x").await;
    }
    let mut before = None;
    let mut pages = Vec::new();
    loop {
        let mut req = json!({"op": "history", "conv": conv, "limit": 10});
        if let Some(b) = before {
            req["before"] = json!(b);
        }
        let page = ok(alice.request(req).await.unwrap());
        let entries = page["entries"].as_array().unwrap().clone();
        let page_seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert!(
            page_seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "a page is ascending and contiguous"
        );
        before = page_seqs.first().copied();
        pages.push(page_seqs);
        if page["has_more"] == false {
            break;
        }
    }
    assert_eq!(pages.len(), 3);
    let all: Vec<u64> = pages.into_iter().rev().flatten().collect();
    assert_eq!(all, (1..=26).collect::<Vec<_>>());
    let page = ok(alice
        .request(json!({"op": "sync", "conv": conv, "after": 20, "limit": 3}))
        .await
        .unwrap());
    let got: Vec<u64> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        (got, page["has_more"].as_bool()),
        (vec![21, 22, 23], Some(true))
    );
    let code = err_code(
        alice
            .request(json!({"op": "sync", "conv": conv, "after": 27}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "cursor_ahead");
}

/// Entries older than the retention are deleted; sequencing continues without reuse.
#[tokio::test]
async fn entries_expire_after_retention() {
    let limits = Limits {
        retention: Duration::from_millis(800),
        expiry_sweep_interval: Duration::from_millis(100),
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    send(&mut alice, &conv, "old", "x").await;
    let page = ok(alice
        .request(json!({"op": "history", "conv": conv}))
        .await
        .unwrap());
    assert_eq!(page["entries"].as_array().unwrap().len(), 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let page = ok(alice
        .request(json!({"op": "history", "conv": conv}))
        .await
        .unwrap());
    assert_eq!(page["entries"], json!([]), "expired entries are gone");
    let ack = send(&mut alice, &conv, "new", "x").await;
    assert_eq!(ack["seq"], 3, "seqs are never reused after expiry");
}

/// After a restart every acknowledged entry is still there and seqs continue.
#[tokio::test]
async fn restart_keeps_entries_and_sequence() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for i in 0..5 {
        send(&mut alice, &conv, &format!("m{i}"), "x").await;
    }
    drop(alice);
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, Limits::default()).await;
    let (mut alice, _) = server.login("alice", "laptop").await;
    let retry = send(&mut alice, &conv, "m4", "x").await;
    assert_eq!(
        (retry["seq"].as_u64(), retry["duplicate"].as_bool()),
        (Some(6), Some(true))
    );
    let next = send(&mut alice, &conv, "m5", "x").await;
    assert_eq!(next["seq"], 7);
    let (_bob, backlog) = server
        .login_with("bob", "phone", json!({ conv.clone(): 0 }))
        .await;
    assert_eq!(seqs(&backlog, &conv), (1..=7).collect::<Vec<_>>());
}

/// `limit: 0` in `sync`, `history` and `/v1/poll` is refused with `bad_request`
/// (it used to return one entry with `has_more`); a limit above the page limit is
/// clamped to it.
#[tokio::test]
async fn zero_limit_is_refused_and_large_limits_are_clamped() {
    let limits = Limits {
        page_len_max: 4,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for i in 0..6 {
        send(&mut alice, &conv, &format!("m{i}"), "paged").await;
    }
    let sync = json!({"op": "sync", "conv": &conv, "after": 0});
    let history = json!({"op": "history", "conv": &conv});
    for (op, frame) in [("sync", sync), ("history", history)] {
        let with_limit = |limit: u32| {
            let mut frame = frame.clone();
            frame["limit"] = json!(limit);
            frame
        };
        match alice.request(with_limit(0)).await.unwrap() {
            Ok(v) => panic!("{op} with limit 0 answered {v}"),
            Err(e) => {
                assert_eq!(e.code, "bad_request", "{op}: {}", e.message);
                assert!(e.message.contains("limit"), "{op}: {}", e.message);
            }
        }
        let big = ok(alice.request(with_limit(1000)).await.unwrap());
        assert_eq!(big["entries"].as_array().unwrap().len(), 4, "{op}: clamped");
        assert_eq!(big["has_more"], true, "{op}");
    }
    let zero = poll(
        &server,
        "bob",
        "web",
        json!({"cursors": {&conv: 0}, "limit": 0, "timeout_ms": 100}),
    )
    .await;
    assert_eq!((zero.status, zero.code().as_str()), (400, "bad_request"));
}
