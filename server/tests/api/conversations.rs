//! Direct and group conversations: one per pair, membership rules, visibility.

use serde_json::json;

use crate::harness::*;

/// Either side opening a direct conversation finds the same one.
#[tokio::test]
async fn one_direct_conversation_per_pair() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let (mut bob, _) = server.login("bob", "phone").await;
    let a = open_direct(&mut alice, "bob").await;
    let b = open_direct(&mut bob, "alice").await;
    assert_eq!(a, b);
    let list = ok(bob.request(json!({"op": "conversations"})).await.unwrap());
    assert_eq!(list["conversations"].as_array().unwrap().len(), 1);
    assert_eq!(list["conversations"][0]["members"], json!(["alice", "bob"]));
    assert_eq!(
        err_code(
            alice
                .request(json!({"op": "open_direct", "peer": "alice"}))
                .await
                .unwrap()
        ),
        "bad_request"
    );
}

/// A 500-member group fans out to every online member; the 501st member is refused.
#[tokio::test]
async fn group_of_500_members() {
    let server = TestServer::start().await;
    let (mut owner, _) = server.login("owner", "d").await;
    let members: Vec<String> = (1..500).map(|i| format!("u{i}")).collect();
    let r = ok(owner
        .request(json!({"op": "create_group", "conv": "g:big", "members": members}))
        .await
        .unwrap());
    assert_eq!(r["conversation"]["members"].as_array().unwrap().len(), 500);
    let mut online = Vec::new();
    for i in (1..500).step_by(10) {
        let (client, backlog) = server.login(&format!("u{i}"), "d").await;
        assert_eq!(seqs(&backlog, "g:big"), vec![1]);
        online.push(client);
    }
    let ack = send(&mut owner, "g:big", "hello-all", "hi everyone").await;
    assert_eq!(ack["seq"], 2);
    for client in &mut online {
        let got = msgs_until(client, "g:big", 2).await;
        assert_eq!(seqs(&got, "g:big"), vec![2]);
    }
    let code = err_code(
        owner
            .request(json!({"op": "add_members", "conv": "g:big", "users": ["one-too-many"]}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "too_many_members");
    let too_many: Vec<String> = (1..=500).map(|i| format!("v{i}")).collect();
    let code = err_code(
        owner
            .request(json!({"op": "create_group", "members": too_many}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "too_many_members");
    let (_late, backlog) = server.login("u2", "d").await;
    assert_eq!(
        seqs(&backlog, "g:big"),
        vec![1, 2],
        "an offline member catches up"
    );
}

/// Added members see from the entry that added them; removed ones see nothing after theirs.
#[tokio::test]
async fn membership_changes_bound_visibility() {
    let server = TestServer::start().await;
    let (mut owner, _) = server.login("owner", "d").await;
    ok(owner
        .request(json!({"op": "create_group", "conv": "g:team", "members": ["a"]}))
        .await
        .unwrap());
    send(&mut owner, "g:team", "before", "x").await;
    let (mut a, _) = server.login("a", "d").await;
    let added = ok(owner
        .request(json!({"op": "add_members", "conv": "g:team", "users": ["c"]}))
        .await
        .unwrap());
    assert_eq!(added["seq"], 3);
    let (mut c, backlog) = server.login("c", "d").await;
    assert_eq!(
        seqs(&backlog, "g:team"),
        vec![3],
        "c starts at the entry that added it"
    );
    let history = ok(c
        .request(json!({"op": "history", "conv": "g:team"}))
        .await
        .unwrap());
    assert_eq!(history["entries"].as_array().unwrap().len(), 1);
    assert_eq!(
        err_code(
            c.request(json!({"op": "remove_members", "conv": "g:team", "users": ["a"]}))
                .await
                .unwrap()
        ),
        "forbidden"
    );
    let removed = ok(owner
        .request(json!({"op": "remove_members", "conv": "g:team", "users": ["a"]}))
        .await
        .unwrap());
    assert_eq!(removed["seq"], 4);
    send(&mut owner, "g:team", "after", "secret").await;
    let got = msgs_until(&mut a, "g:team", 4).await;
    assert_eq!(got.last().unwrap()["body"]["action"], "remove");
    assert!(
        !delivers_within_quiet(&mut a).await,
        "a removed member receives nothing after its removal"
    );
    assert_eq!(
        err_code(
            a.request(json!({"op": "send", "conv": "g:team", "message_id": "x", "text": "x"}))
                .await
                .unwrap()
        ),
        "not_member"
    );
    let page = ok(a
        .request(json!({"op": "history", "conv": "g:team"}))
        .await
        .unwrap());
    let last = page["entries"].as_array().unwrap().last().unwrap()["seq"].clone();
    assert_eq!(last, 4, "history stops at the removal");
    assert_eq!(
        msgs_until(&mut c, "g:team", 5).await.last().unwrap()["seq"],
        5
    );
    ok(c.request(json!({"op": "leave", "conv": "g:team"}))
        .await
        .unwrap());
    let code = err_code(
        owner
            .request(json!({"op": "add_members", "conv": "g:team", "users": ["owner"]}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "duplicate_member");
    let code = err_code(
        owner
            .request(json!({"op": "create_group", "members": ["x", "x"]}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "duplicate_member");
    let code = err_code(
        owner
            .request(json!({"op": "add_members", "conv": "d:a:owner", "users": ["z"]}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "unknown_conversation");
    let dm = open_direct(&mut owner, "a").await;
    let code = err_code(
        owner
            .request(json!({"op": "add_members", "conv": dm, "users": ["z"]}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "not_group");
}

/// A stranger can neither send to, sync, nor read a conversation.
#[tokio::test]
async fn non_members_are_refused() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let (mut eve, _) = server.login("eve", "phone").await;
    for req in [
        json!({"op": "send", "conv": conv, "message_id": "x", "text": "hi"}),
        json!({"op": "sync", "conv": conv, "after": 0}),
        json!({"op": "history", "conv": conv}),
        json!({"op": "ack", "conv": conv, "delivered": 1}),
    ] {
        assert_eq!(err_code(eve.request(req).await.unwrap()), "not_member");
    }
    ok(alice
        .request(json!({"op": "create_group", "conv": "g:taken"}))
        .await
        .unwrap());
    let again = ok(alice
        .request(json!({"op": "create_group", "conv": "g:taken"}))
        .await
        .unwrap());
    assert_eq!(
        again["conversation"]["last_seq"], 1,
        "the owner's retry is idempotent"
    );
    let code = err_code(
        eve.request(json!({"op": "create_group", "conv": "g:taken"}))
            .await
            .unwrap(),
    );
    assert_eq!(code, "conversation_exists");
}
