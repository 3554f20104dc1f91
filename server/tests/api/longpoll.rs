//! The HTTP long-polling fallback: everything the WebSocket does, with the same
//! guarantees, and a device may switch between the two without losing anything.

use std::time::{Duration, Instant};

use chatproof_server::limits::Limits;
use serde_json::{json, Value};

use crate::harness::{http, msgs_until, ok, open_direct, poll, rpc, send, seqs, TestServer, WAIT};

/// Polls with `cursors` until `conv` reaches `seq`; returns every entry received
/// and the cursors advanced from them.
async fn poll_until(
    server: &TestServer,
    user: &str,
    device: &str,
    cursors: &mut Value,
    conv: &str,
    seq: u64,
) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while cursors[conv].as_u64().unwrap_or(0) < seq {
        assert!(
            Instant::now() < deadline,
            "no seq {seq} of {conv} within {WAIT:?}"
        );
        let reply = poll(
            server,
            user,
            device,
            json!({"cursors": cursors, "timeout_ms": 2000}),
        )
        .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        for entry in reply.json()["entries"].as_array().unwrap() {
            let c = entry["conv"].as_str().unwrap();
            let s = entry["seq"].as_u64().unwrap();
            let held = cursors[c].as_u64().unwrap_or(0);
            assert!(s > held, "duplicate {c}#{s} (held {held})");
            cursors[c] = json!(s);
            got.push(entry.clone());
        }
    }
    got
}

fn entry_seqs(entries: &[Value], conv: &str) -> Vec<u64> {
    entries
        .iter()
        .filter(|e| e["conv"] == conv)
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

/// A polling device receives in order, sends idempotently, acknowledges, and
/// gets receipts; the WebSocket peer sees its messages and receipts.
#[tokio::test]
async fn polling_device_does_everything() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let mut cursors = json!({});
    for i in 1..=3 {
        send(&mut alice, &conv, &format!("m{i}"), &format!("hello {i}")).await;
    }
    let got = poll_until(&server, "bob", "web", &mut cursors, &conv, 4).await;
    assert_eq!(entry_seqs(&got, &conv), vec![1, 2, 3, 4]);

    let frame =
        json!({"rid": "s1", "op": "send", "conv": conv, "message_id": "b1", "text": "hi alice"});
    let first = rpc(&server, "bob", "web", frame.clone()).await;
    assert_eq!(first.status, 200);
    let first = first.json();
    assert_eq!(
        (first["type"].as_str(), first["rid"].as_str()),
        (Some("ok"), Some("s1"))
    );
    let again = rpc(&server, "bob", "web", frame).await.json();
    assert_eq!(again["result"]["seq"], first["result"]["seq"]);
    assert_eq!(again["result"]["duplicate"], true);
    let seq = first["result"]["seq"].as_u64().unwrap();
    let at_alice = seqs(&msgs_until(&mut alice, &conv, seq).await, &conv);
    assert_eq!(
        at_alice,
        (1..=seq).collect::<Vec<_>>(),
        "alice's devices get every entry once"
    );

    let ack = json!({"rid": "a1", "op": "ack", "conv": conv, "delivered": 4, "read": 4});
    assert_eq!(rpc(&server, "bob", "web", ack).await.status, 200);
    let receipts = alice
        .events_until(WAIT, |e| e["type"] == "receipt" && e["read"] == 4)
        .await
        .unwrap();
    assert_eq!(receipts.last().unwrap()["user"], "bob");

    // Alice acks bob's message: the receipt waits in bob's mailbox for his next poll.
    ok(alice
        .request(json!({"op": "ack", "conv": conv, "delivered": seq, "read": seq}))
        .await
        .unwrap());
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = poll(
            &server,
            "bob",
            "web",
            json!({"cursors": cursors, "timeout_ms": 1000}),
        )
        .await;
        let body = reply.json();
        let expected = if cursors[&conv] == json!(seq) {
            vec![]
        } else {
            vec![seq]
        };
        assert_eq!(
            entry_seqs(body["entries"].as_array().unwrap(), &conv),
            expected,
            "own message, once"
        );
        cursors[&conv] = json!(seq);
        if body["receipts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["user"] == "alice" && r["read"] == seq)
        {
            break;
        }
        assert!(Instant::now() < deadline, "no receipt for bob");
    }
}

/// A held poll returns as soon as a message arrives, and at the timeout otherwise.
#[tokio::test]
async fn held_poll_wakes_on_a_message() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let idle_started = Instant::now();
    let idle = poll(
        &server,
        "bob",
        "web",
        json!({"cursors": {&conv: 1}, "timeout_ms": 300}),
    )
    .await;
    assert!(
        idle_started.elapsed() >= Duration::from_millis(250),
        "held until the timeout"
    );
    assert!(idle.json()["entries"].as_array().unwrap().is_empty());
    let held = async {
        poll(
            &server,
            "bob",
            "web",
            json!({"cursors": {&conv: 1}, "timeout_ms": 20000}),
        )
        .await
    };
    let sending = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(&mut alice, &conv, "m1", "wake up").await;
    };
    let started = Instant::now();
    let (reply, ()) = tokio::join!(held, sending);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "woken, not timed out"
    );
    assert_eq!(
        entry_seqs(reply.json()["entries"].as_array().unwrap(), &conv),
        vec![2]
    );
}

/// A device reads some messages over WebSocket, the rest by polling from its
/// cursor, then more over WebSocket again: each exactly once, in order.
#[tokio::test]
async fn switching_transports_loses_nothing() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let (mut bob, _) = server.login("bob", "tablet").await;
    for i in 1..=3 {
        send(&mut alice, &conv, &format!("a{i}"), "x").await;
    }
    let over_ws = seqs(&msgs_until(&mut bob, &conv, 4).await, &conv);
    assert_eq!(over_ws, vec![2, 3, 4]);
    bob.close().await;
    for i in 4..=6 {
        send(&mut alice, &conv, &format!("a{i}"), "y").await;
    }
    let mut cursors = json!({ &conv: 4 });
    let polled = poll_until(&server, "bob", "tablet", &mut cursors, &conv, 7).await;
    assert_eq!(entry_seqs(&polled, &conv), vec![5, 6, 7]);
    for i in 7..=8 {
        send(&mut alice, &conv, &format!("a{i}"), "z").await;
    }
    let (mut bob, caught_up) = server
        .login_with("bob", "tablet", json!({ &conv: 7 }))
        .await;
    let mut after = seqs(&caught_up, &conv);
    if after.last() != Some(&9) {
        after.extend(seqs(&msgs_until(&mut bob, &conv, 9).await, &conv));
    }
    assert_eq!(after, vec![8, 9]);
}

/// One device goes WebSocket → HTTP → WebSocket → HTTP while its peer keeps
/// sending: every poll with nothing new is held to its timeout (not answered at
/// once by a stale close), every poll ends the device's WebSocket, and every
/// message reaches the device exactly once, in order.
#[tokio::test]
async fn switching_back_and_forth_holds_polls_and_ends_the_other_transport() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let mut received: Vec<u64> = Vec::new();
    let mut sent = 0;
    for round in 0..2 {
        let cursors = match received.last() {
            Some(held) => json!({ &conv: held }),
            None => json!({}),
        };
        let (mut bob, caught_up) = server.login_with("bob", "tablet", cursors).await;
        received.extend(seqs(&caught_up, &conv));
        for _ in 0..2 {
            sent += 1;
            send(&mut alice, &conv, &format!("m{sent}"), "over ws").await;
        }
        let last = sent + 1;
        if received.last() != Some(&last) {
            received.extend(seqs(&msgs_until(&mut bob, &conv, last).await, &conv));
        }
        let mut cursors = json!({ &conv: last });
        let started = Instant::now();
        let idle = poll(
            &server,
            "bob",
            "tablet",
            json!({"cursors": cursors, "timeout_ms": 600}),
        )
        .await;
        assert_eq!(idle.status, 200, "{}", String::from_utf8_lossy(&idle.body));
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "round {round}: a poll with nothing new returned after {:?} instead of being held",
            started.elapsed()
        );
        assert!(idle.json()["entries"].as_array().unwrap().is_empty());
        let ended = bob.events_until(WAIT, |e| e["type"] == "error").await;
        match ended {
            Ok(events) => assert_eq!(
                events.last().unwrap()["code"],
                "replaced",
                "round {round}: {events:?}"
            ),
            Err(chatproof_client::ClientError::Closed) => {}
            Err(e) => panic!("round {round}: the WebSocket was not ended by the poll: {e}"),
        }
        for _ in 0..2 {
            sent += 1;
            send(&mut alice, &conv, &format!("m{sent}"), "over http").await;
        }
        let polled = poll_until(&server, "bob", "tablet", &mut cursors, &conv, sent + 1).await;
        received.extend(entry_seqs(&polled, &conv));
    }
    assert_eq!(received, (1..=sent + 1).collect::<Vec<_>>());
}

/// A future cursor is refused; a stale one delivers again from where it says;
/// unknown conversations and bad fields are refused; nothing is lost meanwhile.
#[tokio::test]
async fn stale_and_future_cursors() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    send(&mut alice, &conv, "m1", "x").await;
    let future = poll(
        &server,
        "bob",
        "web",
        json!({"cursors": {&conv: 99}, "timeout_ms": 10}),
    )
    .await;
    assert_eq!(
        (future.status, future.code().as_str()),
        (409, "cursor_ahead")
    );
    let unknown = poll(
        &server,
        "bob",
        "web",
        json!({"cursors": {"g:nope": 1}, "timeout_ms": 10}),
    )
    .await;
    assert_eq!(
        (unknown.status, unknown.code().as_str()),
        (404, "unknown_conversation")
    );
    let foreign = poll(
        &server,
        "carol",
        "web",
        json!({"cursors": {&conv: 1}, "timeout_ms": 10}),
    )
    .await;
    assert_eq!(
        (foreign.status, foreign.code().as_str()),
        (403, "not_member")
    );
    let bad = poll(
        &server,
        "bob",
        "web",
        json!({"cursor": {}, "timeout_ms": 10}),
    )
    .await;
    assert_eq!((bad.status, bad.code().as_str()), (400, "bad_request"));
    let fresh = poll(
        &server,
        "bob",
        "web",
        json!({"cursors": {&conv: 2}, "timeout_ms": 10}),
    )
    .await;
    assert!(fresh.json()["entries"].as_array().unwrap().is_empty());
    let stale = poll(
        &server,
        "bob",
        "web",
        json!({"cursors": {&conv: 0}, "timeout_ms": 10}),
    )
    .await;
    assert_eq!(
        entry_seqs(stale.json()["entries"].as_array().unwrap(), &conv),
        vec![1, 2]
    );
}

/// HTTP requests without a valid token or device, or with bad frames, get clear errors.
#[tokio::test]
async fn bad_http_requests() {
    let server = TestServer::start().await;
    let none = http(&server, "POST", "/v1/rpc", None, b"{}".to_vec()).await;
    assert_eq!((none.status, none.code().as_str()), (401, "unauthorized"));
    let no_device = http(
        &server,
        "POST",
        "/v1/poll",
        Some(("bob", "")),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (no_device.status, no_device.code().as_str()),
        (400, "bad_request")
    );
    let garbage = http(
        &server,
        "POST",
        "/v1/rpc",
        Some(("bob", "web")),
        b"{nope".to_vec(),
    )
    .await;
    assert_eq!(garbage.status, 400);
    assert_eq!(garbage.json()["code"], "bad_frame");
    let hello = rpc(
        &server,
        "bob",
        "web",
        json!({"rid": "h", "op": "hello", "versions": [1], "token": "t", "device": "d"}),
    )
    .await;
    assert_eq!(
        (hello.status, hello.json()["code"].as_str()),
        (400, Some("bad_request"))
    );
    let unknown_conv = rpc(
        &server,
        "bob",
        "web",
        json!({"rid": "s", "op": "send", "conv": "g:none", "message_id": "m", "text": "x"}),
    )
    .await;
    assert_eq!(
        (unknown_conv.status, unknown_conv.json()["rid"].as_str()),
        (404, Some("s"))
    );
    let huge = vec![b' '; Limits::default().frame_len_max_bytes + 1];
    let too_big = http(&server, "POST", "/v1/rpc", Some(("bob", "web")), huge).await;
    assert_eq!(
        (too_big.status, too_big.code().as_str()),
        (413, "frame_too_large")
    );
    let wrong_method = http(&server, "GET", "/v1/poll", None, Vec::new()).await;
    assert_eq!(
        (wrong_method.status, wrong_method.code().as_str()),
        (405, "method_not_allowed")
    );
    let mut forged = server.token("bob");
    forged.push('x');
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let request = hyper::Request::post(format!("{}/v1/poll", server.http_base()))
        .header("authorization", format!("Bearer {forged}"))
        .header("x-chatproof-device", "web")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(client.request(request).await.unwrap().status(), 401);
}

/// A polling device counts as online for presence, and its contacts' changes
/// reach it in poll responses.
#[tokio::test]
async fn presence_over_polling() {
    let server = TestServer::start_with(Limits {
        presence_interval: Duration::from_millis(100),
        ..Limits::default()
    })
    .await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let first = poll(
        &server,
        "bob",
        "web",
        json!({"cursors": {&conv: 1}, "timeout_ms": 10}),
    )
    .await;
    assert_eq!(first.status, 200);
    let online = ok(alice
        .request(json!({"op": "presence", "users": ["bob"], "watch": false}))
        .await
        .unwrap());
    assert_eq!(online["users"][0]["online"], true);
    let (carl, _) = server.login("carl", "phone").await;
    drop(carl);
    alice.close().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = poll(
            &server,
            "bob",
            "web",
            json!({"cursors": {&conv: 1}, "timeout_ms": 2000}),
        )
        .await;
        let presence = reply.json()["presence"].clone();
        if presence
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["user"] == "alice" && s["online"] == false)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's departure never reached bob"
        );
    }
}

/// A mailbox keeps a presence change between polls; when the device was shown a
/// newer last-seen time meanwhile (here a `presence` reply: alice's polls moved
/// it on without a change to publish), the next poll never shows the older one.
#[tokio::test]
async fn a_poll_never_shows_an_older_last_seen_than_a_reply_did() {
    let server = TestServer::start_with(Limits {
        presence_interval: Duration::from_millis(100),
        ..Limits::default()
    })
    .await;
    let settle = Duration::from_millis(400);
    let quick = |conv: &str| json!({"cursors": {conv: 0}, "timeout_ms": 10});
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    assert_eq!(poll(&server, "bob", "web", quick(&conv)).await.status, 200);
    // Alice goes offline, then online over polling: a change waits in bob's mailbox.
    alice.close().await;
    tokio::time::sleep(settle).await;
    assert_eq!(
        poll(&server, "alice", "web", quick(&conv)).await.status,
        200
    );
    tokio::time::sleep(settle).await;
    // Alice polls again: last seen moves on, online all along, so nothing is published.
    assert_eq!(
        poll(&server, "alice", "web", quick(&conv)).await.status,
        200
    );
    tokio::time::sleep(settle).await;
    let asked = rpc(
        &server,
        "bob",
        "web",
        json!({"rid": "p", "op": "presence", "users": ["alice"]}),
    )
    .await
    .json();
    let shown = &asked["result"]["users"][0];
    assert_eq!(shown["online"], true, "{asked}");
    let shown_ms = shown["last_seen_ms"].as_u64().unwrap();
    let polled = poll(&server, "bob", "web", quick(&conv)).await.json();
    let changes = polled["presence"].as_array().unwrap();
    let alice_now = changes
        .iter()
        .find(|s| s["user"] == "alice")
        .unwrap_or_else(|| panic!("alice's change was not delivered: {polled}"));
    assert!(
        alice_now["last_seen_ms"].as_u64().unwrap() >= shown_ms,
        "the reply showed last seen {shown_ms}, the poll after it {alice_now}"
    );
}

/// A polling device whose mailbox overflowed between polls (the hub dropped its
/// queue, receipts included, without the device knowing) still gets the receipt of
/// its message: the next poll opens a new mailbox, which reads the receipts again
/// from the store, and every entry once.
#[tokio::test]
async fn a_receipt_survives_a_mailbox_that_overflowed_between_polls() {
    let limits = Limits {
        device_queue_len_max: 2,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let mut cursors = json!({});
    poll_until(&server, "bob", "web", &mut cursors, &conv, 1).await;
    let frame = json!({"rid": "s1", "op": "send", "conv": conv, "message_id": "b1", "text": "hi"});
    let sent = rpc(&server, "bob", "web", frame).await.json();
    let seq = sent["result"]["seq"].as_u64().unwrap();
    // Between bob's polls: his own entry, alice's receipt, then three of her
    // messages, more than his mailbox holds.
    ok(alice
        .request(json!({"op": "ack", "conv": conv, "delivered": seq, "read": seq}))
        .await
        .unwrap());
    for i in 0..3 {
        send(&mut alice, &conv, &format!("a{i}"), "more").await;
    }
    let last = seq + 3;
    let (mut entries, mut receipt) = (Vec::new(), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while receipt.is_none() || cursors[&conv].as_u64() < Some(last) {
        assert!(
            Instant::now() < deadline,
            "bob got entries {:?} and receipt {receipt:?} by the deadline",
            entry_seqs(&entries, &conv)
        );
        let reply = poll(
            &server,
            "bob",
            "web",
            json!({"cursors": cursors, "timeout_ms": 500}),
        )
        .await;
        let body = reply.json();
        for entry in body["entries"].as_array().unwrap() {
            cursors[&conv] = entry["seq"].clone();
            entries.push(entry.clone());
        }
        receipt = receipt.or_else(|| {
            body["receipts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["user"] == "alice" && r["read"] == seq)
                .cloned()
        });
    }
    let want: Vec<u64> = (seq..=last).collect();
    assert_eq!(
        entry_seqs(&entries, &conv),
        want,
        "every entry once, in order"
    );
}
