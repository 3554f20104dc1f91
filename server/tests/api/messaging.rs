//! Sending, fan-out to every device, idempotent retries, receipts and ordering.

use chatproof_client::Client;
use serde_json::json;

use crate::harness::*;

/// A 1:1 message reaches every device of both users, in order, once; acks carry the seq.
#[tokio::test]
async fn direct_messages_reach_every_device_in_order() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let (mut bob_phone, _) = server.login("bob", "phone").await;
    let (mut bob_desk, _) = server.login("bob", "desktop").await;
    let conv = open_direct(&mut alice, "bob").await;
    assert_eq!(conv, "d:alice:bob");
    let mut acked = Vec::new();
    for i in 0..20 {
        let ack = send(&mut alice, &conv, &format!("m{i}"), &format!("hello {i}")).await;
        assert_eq!(ack["duplicate"], false);
        acked.push(ack["seq"].as_u64().unwrap());
    }
    assert_eq!(
        acked,
        (2..=21).collect::<Vec<_>>(),
        "seqs are gap-free after the create entry"
    );
    for device in [&mut bob_phone, &mut bob_desk, &mut alice] {
        let got = msgs_until(device, &conv, 21).await;
        assert_eq!(seqs(&got, &conv), (1..=21).collect::<Vec<_>>());
        assert_eq!(got[5]["body"], json!({"kind": "text", "text": "hello 4"}));
        assert_eq!(got[5]["sender"], "alice");
        assert_eq!(got[5]["sender_device"], "phone");
        assert!(
            !delivers_within_quiet(device).await,
            "nothing is delivered twice"
        );
    }
}

/// A retry with the same message id returns the original ack and creates nothing.
#[tokio::test]
async fn retry_with_same_id_is_idempotent() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let (mut bob, _) = server.login("bob", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let first = send(&mut alice, &conv, "same-id", "hi").await;
    let retry = send(&mut alice, &conv, "same-id", "hi").await;
    assert_eq!(retry["seq"], first["seq"]);
    assert_eq!(retry["server_time_ms"], first["server_time_ms"]);
    assert_eq!(
        (first["duplicate"].as_bool(), retry["duplicate"].as_bool()),
        (Some(false), Some(true))
    );
    let next = send(&mut alice, &conv, "other-id", "again").await;
    assert_eq!(
        next["seq"].as_u64(),
        first["seq"].as_u64().map(|s| s + 1),
        "no hole after a retry"
    );
    let got = msgs_until(&mut bob, &conv, 3).await;
    assert_eq!(seqs(&got, &conv), vec![1, 2, 3]);
    assert!(!delivers_within_quiet(&mut bob).await);
    // The same id from another sender is a different message.
    let bobs = send(&mut bob, &conv, "same-id", "mine").await;
    assert_eq!(bobs["duplicate"], false);
    assert_eq!(bobs["seq"], 4);
}

/// Two senders racing in one group still give every member one gap-free order.
#[tokio::test]
async fn concurrent_senders_share_one_order() {
    let server = TestServer::start().await;
    let (mut owner, _) = server.login("owner", "d").await;
    let created = ok(owner
        .request(json!({"op": "create_group", "conv": "g:race", "members": ["a", "b", "watcher"]}))
        .await
        .unwrap());
    assert_eq!(created["conversation"]["last_seq"], 1);
    let (mut watcher, backlog) = server.login("watcher", "d").await;
    assert_eq!(seqs(&backlog, "g:race"), vec![1]);
    let mut tasks = Vec::new();
    for user in ["a", "b"] {
        let (mut client, _) = server.login(user, "d").await;
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..50 {
                seqs.push(
                    send(&mut client, "g:race", &format!("{user}-{i}"), "x").await["seq"]
                        .as_u64()
                        .unwrap(),
                );
            }
            seqs
        }));
    }
    let mut all: Vec<u64> = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one sender's acks increase"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (2..=101).collect::<Vec<_>>(),
        "every seq used once, no holes"
    );
    let got = msgs_until(&mut watcher, "g:race", 101).await;
    assert_eq!(seqs(&got, "g:race"), (2..=101).collect::<Vec<_>>());
    let _ = &mut owner;
}

/// Delivered and read receipts reach the sender, never go back, and never overclaim.
#[tokio::test]
async fn receipts_are_truthful_and_monotonic() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let (mut bob, _) = server.login("bob", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for i in 0..3 {
        send(&mut alice, &conv, &format!("m{i}"), "hi").await;
    }
    msgs_until(&mut bob, &conv, 4).await;
    msgs_until(&mut alice, &conv, 4).await;
    let r = ok(bob
        .request(json!({"op": "ack", "conv": conv, "delivered": 4}))
        .await
        .unwrap());
    assert_eq!(
        (r["delivered"].as_u64(), r["read"].as_u64()),
        (Some(4), Some(0))
    );
    let receipt = alice.next_event(WAIT).await.unwrap();
    assert_eq!(receipt["type"], "receipt");
    assert_eq!(
        (
            receipt["user"].as_str(),
            receipt["delivered"].as_u64(),
            receipt["read"].as_u64()
        ),
        (Some("bob"), Some(4), Some(0))
    );
    ok(bob
        .request(json!({"op": "ack", "conv": conv, "read": 3}))
        .await
        .unwrap());
    let receipt = alice.next_event(WAIT).await.unwrap();
    assert_eq!(
        (receipt["delivered"].as_u64(), receipt["read"].as_u64()),
        (Some(4), Some(3))
    );
    let r = ok(bob
        .request(json!({"op": "ack", "conv": conv, "delivered": 2}))
        .await
        .unwrap());
    assert_eq!(r["delivered"], 4, "cursors never go back");
    assert!(
        !delivers_within_quiet(&mut alice).await,
        "no receipt when nothing moved"
    );
    let code = err_code(
        bob.request(json!({"op": "ack", "conv": conv, "delivered": 99}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "cursor_ahead");
    let code = err_code(
        bob.request(json!({"op": "ack", "conv": conv}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "bad_request");
}

/// In a group each member's receipt reaches the sender with the all-members summary.
#[tokio::test]
async fn group_receipts_carry_all_member_summary() {
    let server = TestServer::start().await;
    let (mut owner, _) = server.login("owner", "d").await;
    ok(owner
        .request(json!({"op": "create_group", "conv": "g:r", "members": ["a", "b"]}))
        .await
        .unwrap());
    let (mut a, _) = server.login("a", "d").await;
    let (mut b, _) = server.login("b", "d").await;
    send(&mut owner, "g:r", "m1", "hi").await;
    msgs_until(&mut a, "g:r", 2).await;
    msgs_until(&mut b, "g:r", 2).await;
    ok(
        a.request(json!({"op": "ack", "conv": "g:r", "delivered": 2}))
            .await
            .unwrap(),
    );
    let first = owner
        .events_until(WAIT, |e| e["type"] == "receipt")
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (first["user"].as_str(), first["all_delivered"].as_u64()),
        (Some("a"), Some(0))
    );
    ok(owner
        .request(json!({"op": "ack", "conv": "g:r", "delivered": 2}))
        .await
        .unwrap());
    ok(
        b.request(json!({"op": "ack", "conv": "g:r", "delivered": 2, "read": 2}))
            .await
            .unwrap(),
    );
    let last = owner
        .events_until(WAIT, |e| e["type"] == "receipt" && e["user"] == "b")
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (
            last["all_delivered"].as_u64(),
            last["all_read"].as_u64(),
            last["read"].as_u64()
        ),
        (Some(2), Some(0), Some(2))
    );
}

/// A device offline while its messages were read learns it on its next connection
/// when its `hello` (or the poll that opens its mailbox) asks with `receipts`, read
/// from the store; without asking it is told nothing until the cursors move again.
#[tokio::test]
async fn receipts_that_moved_while_away_come_to_a_hello_that_asks() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let (mut bob, _) = server.login("bob", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for i in 0..2 {
        send(&mut alice, &conv, &format!("m{i}"), "hi").await;
    }
    alice.close().await;
    msgs_until(&mut bob, &conv, 3).await;
    ok(bob
        .request(json!({"op": "ack", "conv": conv, "delivered": 3, "read": 2}))
        .await
        .unwrap());

    // Not asked: nothing.
    let (mut plain, _) = server
        .login_with("alice", "phone", json!({ &conv: 3 }))
        .await;
    assert!(!delivers_within_quiet(&mut plain).await);
    plain.close().await;

    // Asked: bob's cursors, once.
    let mut asking = Client::connect(&server.url).await.unwrap();
    let hello = json!({"op": "hello", "versions": [1], "token": server.token("alice"),
        "device": "phone", "cursors": {&conv: 3}, "receipts": true});
    ok(asking.request(hello).await.unwrap());
    let receipts = asking
        .events_until(WAIT, |e| e["type"] == "receipt")
        .await
        .unwrap();
    let receipt = receipts.last().unwrap();
    assert_eq!(
        (
            receipt["conv"].as_str(),
            receipt["user"].as_str(),
            receipt["delivered"].as_u64(),
            receipt["read"].as_u64()
        ),
        (Some(conv.as_str()), Some("bob"), Some(3), Some(2))
    );
    let more = asking.events_until(QUIET, |e| e["type"] == "receipt").await;
    assert!(more.is_err(), "one receipt, not two: {more:?}");

    // Bob's own device is told nothing: nobody else's cursor passed bob's entries.
    bob.close().await;
    let mut bob_again = Client::connect(&server.url).await.unwrap();
    let hello = json!({"op": "hello", "versions": [1], "token": server.token("bob"),
        "device": "phone", "cursors": {&conv: 3}, "receipts": true});
    ok(bob_again.request(hello).await.unwrap());
    let none = bob_again
        .events_until(QUIET, |e| e["type"] == "receipt")
        .await;
    assert!(none.is_err(), "{none:?}");

    // Long-poll: the poll that opens the mailbox carries it when it asks.
    let first = poll(
        &server,
        "alice",
        "tablet",
        json!({"cursors": {&conv: 3}, "timeout_ms": 0, "receipts": true}),
    )
    .await;
    assert_eq!(first.status, 200);
    let receipts = first.json()["receipts"].clone();
    assert_eq!(
        receipts,
        json!([{"conv": conv, "user": "bob", "delivered": 3, "read": 2}]),
        "{}",
        first.json()
    );
    let unasked = poll(
        &server,
        "alice",
        "laptop",
        json!({"cursors": {&conv: 3}, "timeout_ms": 0}),
    )
    .await;
    assert_eq!(unasked.json()["receipts"], json!([]), "{}", unasked.json());

    // The mailbox stays open, and its next poll does not carry the receipt again
    // unless it asks: a device whose response was lost asks, and gets it again.
    let again = json!({"cursors": {&conv: 3}, "timeout_ms": 0});
    let quiet = poll(&server, "alice", "tablet", again).await;
    assert_eq!(quiet.json()["receipts"], json!([]), "{}", quiet.json());
    let asked = json!({"cursors": {&conv: 3}, "timeout_ms": 0, "receipts": true});
    let after_loss = poll(&server, "alice", "tablet", asked).await;
    assert_eq!(
        after_loss.json()["receipts"],
        json!([{"conv": conv, "user": "bob", "delivered": 3, "read": 2}]),
        "asked again on an open mailbox: {}",
        after_loss.json()
    );
}
