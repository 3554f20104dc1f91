//! A request cut short by its client (the HTTP connection closed while the server
//! works on it) still finishes what it committed: an ack whose cursor was stored
//! sends its receipt, though nobody waits for the reply. And an ack whose store
//! call failed after its write landed (a timeout on a remote store) sends its
//! receipt when the client retries it, though the retry moves nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chatproof_client::Client;
use chatproof_server::domain::{Cursor, GroupChange};
use chatproof_server::limits::Limits;
use chatproof_server::protocol::Entry;
use chatproof_server::store::embedded::EmbeddedStore;
use chatproof_server::store::{Appended, ConvState, CursorUpdate, NewMessage, Store, StoreError};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::harness::{ok, open_direct, send, TestServer, WAIT};

/// How long an ack lingers after its cursor is durable, when asked to.
const LINGER: Duration = Duration::from_millis(500);

/// The embedded store, whose acks can be made to linger after they committed (as
/// a slow disk or a busy machine would), so a client can leave in between.
struct LingeringAcks {
    inner: EmbeddedStore,
    linger: AtomicBool,
    /// The next ack fails after its write landed.
    fail_after_write: AtomicBool,
}

#[async_trait]
impl Store for LingeringAcks {
    async fn open_direct(
        &self,
        opener: &str,
        device: &str,
        peer: &str,
        now_ms: u64,
    ) -> Result<(ConvState, Option<Appended>), StoreError> {
        self.inner.open_direct(opener, device, peer, now_ms).await
    }

    async fn create_group(
        &self,
        conv: &str,
        owner: &str,
        device: &str,
        members: Vec<String>,
        members_max: usize,
        now_ms: u64,
    ) -> Result<(ConvState, Option<Appended>), StoreError> {
        self.inner
            .create_group(conv, owner, device, members, members_max, now_ms)
            .await
    }

    async fn change_members(
        &self,
        conv: &str,
        by: &str,
        device: &str,
        change: GroupChange,
        members_max: usize,
        now_ms: u64,
    ) -> Result<Appended, StoreError> {
        self.inner
            .change_members(conv, by, device, change, members_max, now_ms)
            .await
    }

    async fn append(&self, message: NewMessage, now_ms: u64) -> Result<Appended, StoreError> {
        self.inner.append(message, now_ms).await
    }

    async fn ack(
        &self,
        conv: &str,
        user: &str,
        device: &str,
        delivered: Option<u64>,
        read: Option<u64>,
    ) -> Result<CursorUpdate, StoreError> {
        let update = self.inner.ack(conv, user, device, delivered, read).await?;
        if self.fail_after_write.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Backend(
                "no answer in time (the write landed)".to_owned(),
            ));
        }
        if self.linger.load(Ordering::SeqCst) {
            tokio::time::sleep(LINGER).await;
        }
        Ok(update)
    }

    async fn conversation(&self, conv: &str) -> Result<Option<ConvState>, StoreError> {
        self.inner.conversation(conv).await
    }

    async fn conversations_of(&self, user: &str) -> Result<Vec<ConvState>, StoreError> {
        self.inner.conversations_of(user).await
    }

    async fn conversation_ids_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.inner.conversation_ids_of(user).await
    }

    async fn read_after(
        &self,
        conv: &str,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError> {
        self.inner.read_after(conv, after, until, limit).await
    }

    async fn read_before(
        &self,
        conv: &str,
        before: u64,
        limit: u32,
    ) -> Result<Vec<Entry>, StoreError> {
        self.inner.read_before(conv, before, limit).await
    }

    async fn device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
    ) -> Result<Option<Cursor>, StoreError> {
        self.inner.device_cursor(user, device, conv).await
    }

    async fn user_cursor(&self, conv: &str, user: &str) -> Result<Cursor, StoreError> {
        self.inner.user_cursor(conv, user).await
    }

    async fn user_cursors(&self, conv: &str) -> Result<Vec<(String, Cursor)>, StoreError> {
        self.inner.user_cursors(conv).await
    }

    async fn record_last_seen(&self, user: &str, at_ms: u64) -> Result<(), StoreError> {
        self.inner.record_last_seen(user, at_ms).await
    }

    async fn last_seen(&self, users: &[String]) -> Result<Vec<Option<u64>>, StoreError> {
        self.inner.last_seen(users).await
    }

    async fn expire_before(&self, cutoff_ms: u64, budget: u32) -> Result<u64, StoreError> {
        self.inner.expire_before(cutoff_ms, budget).await
    }
}

/// A server on a [`LingeringAcks`] store (nothing switched on) where alice wrote
/// bob one message: the store, the server, alice's connection, the conversation
/// and the message's seq.
async fn alice_wrote_to_bob() -> (Arc<LingeringAcks>, TestServer, Client, String, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LingeringAcks {
        inner: EmbeddedStore::open(dir.path()).unwrap(),
        linger: AtomicBool::new(false),
        fail_after_write: AtomicBool::new(false),
    });
    let server =
        TestServer::start_on_store(dir, Limits::default(), Arc::clone(&store) as Arc<dyn Store>)
            .await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let seq = send(&mut alice, &conv, "m1", "hello bob").await["seq"]
        .as_u64()
        .unwrap();
    (store, server, alice, conv, seq)
}

/// Bob acks alice's message over `POST /v1/rpc` and closes the connection while
/// the ack lingers after committing: alice still gets the receipt (a retried ack
/// would move no cursor and so send none).
#[tokio::test]
async fn an_ack_whose_client_left_still_sends_its_receipt() {
    let (store, server, mut alice, conv, seq) = alice_wrote_to_bob().await;

    store.linger.store(true, Ordering::SeqCst);
    let body = serde_json::to_vec(
        &json!({"rid": "a1", "op": "ack", "conv": conv, "delivered": seq, "read": seq}),
    )
    .unwrap();
    let addr = server.http_base().replacen("http://", "", 1);
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/rpc HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         x-chatproof-device: web\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        server.token("bob"),
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body).await.unwrap();
    // Leave while the ack lingers: its cursor is stored, its receipt not yet sent.
    tokio::time::sleep(LINGER / 5).await;
    drop(socket);

    let receipts = alice
        .events_until(WAIT, |e| e["type"] == "receipt" && e["read"] == seq)
        .await
        .expect("the receipt of an ack whose client left");
    let receipt = receipts.last().unwrap();
    assert_eq!(
        (receipt["user"].as_str(), receipt["conv"].as_str()),
        (Some("bob"), Some(conv.as_str()))
    );
    let cursor = store.inner.user_cursor(&conv, "bob").await.unwrap();
    assert_eq!((cursor.delivered, cursor.read), (seq, seq));
}

/// Bob's ack lands in the store but its call fails (as a remote store's timeout
/// would): the ack answers an error, and its retry, which moves no cursor, sends
/// alice the receipt the first one never did.
#[tokio::test]
async fn a_retried_ack_whose_first_try_landed_sends_its_receipt() {
    let (store, server, mut alice, conv, seq) = alice_wrote_to_bob().await;
    let (mut bob, _) = server.login("bob", "phone").await;

    store.fail_after_write.store(true, Ordering::SeqCst);
    let ack = json!({"op": "ack", "conv": conv, "delivered": seq, "read": seq});
    let first = bob.request(ack.clone()).await.unwrap();
    assert!(first.is_err(), "the first ack fails: {first:?}");
    let cursor = store.inner.user_cursor(&conv, "bob").await.unwrap();
    assert_eq!((cursor.delivered, cursor.read), (seq, seq), "yet it landed");
    let again = ok(bob.request(ack).await.unwrap());
    assert_eq!(
        (again["delivered"].as_u64(), again["read"].as_u64()),
        (Some(seq), Some(seq))
    );

    let receipts = alice
        .events_until(WAIT, |e| e["type"] == "receipt" && e["read"] == seq)
        .await
        .expect("the receipt of an ack whose first try landed");
    assert_eq!(receipts.last().unwrap()["user"], "bob");
}
