//! Push notifications to a webhook for users with no connected device.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatproof_server::limits::Limits;
use chatproof_server::push::webhook::{WebhookConfig, WebhookSink};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::harness::{http, ok, open_direct, send, TestServer, WAIT};

/// A local webhook receiver: answers the first `failures` posts with 503, then
/// 200, and hands every body it accepted to the test.
struct Receiver {
    url: String,
    accepted: mpsc::UnboundedReceiver<Value>,
    posts: Arc<AtomicUsize>,
}

async fn receiver(failures: usize) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/push", listener.local_addr().unwrap());
    let (tx, accepted) = mpsc::unbounded_channel();
    let posts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&posts);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (tx, counter) = (tx.clone(), Arc::clone(&counter));
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (tx, counter) = (tx.clone(), Arc::clone(&counter));
                    async move {
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let status = if n < failures {
                            StatusCode::SERVICE_UNAVAILABLE
                        } else {
                            let _ = tx.send(serde_json::from_slice::<Value>(&body).unwrap());
                            StatusCode::OK
                        };
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Receiver {
        url,
        accepted,
        posts,
    }
}

async fn start_with_webhook(url: &str, attempts: u32, queue_len: usize) -> TestServer {
    let url = url.to_owned();
    TestServer::start_configured(
        tempfile::tempdir().unwrap(),
        Limits::default(),
        move |svc| {
            let config = WebhookConfig {
                url,
                queue_len,
                attempts,
                backoff: Duration::from_millis(20),
            };
            let sink = WebhookSink::start(config, Arc::clone(svc.metrics())).unwrap();
            svc.push(sink)
        },
    )
    .await
}

async fn metric(server: &TestServer, name: &str) -> f64 {
    let body =
        String::from_utf8(http(server, "GET", "/metrics", None, Vec::new()).await.body).unwrap();
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

/// Offline recipients are notified (after retries through failures); online ones are not.
#[tokio::test]
async fn offline_members_are_notified() {
    let mut hook = receiver(2).await;
    let server = start_with_webhook(&hook.url, 5, 100).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    ok(alice
        .request(json!({"op": "create_group", "conv": "g:trip", "members": ["bob", "carol"]}))
        .await
        .unwrap());
    let (_carol, _) = server.login("carol", "phone").await;
    let sent = send(&mut alice, "g:trip", "m1", "are we there yet?").await;
    let note = tokio::time::timeout(WAIT, hook.accepted.recv())
        .await
        .expect("a notification within the wait")
        .unwrap();
    assert_eq!(note["user"], "bob", "only the offline member: {note}");
    assert_eq!(note["conv"], "g:trip");
    assert_eq!(note["seq"], sent["seq"]);
    assert_eq!(note["sender"], "alice");
    assert_eq!(note["kind"], "text");
    assert_eq!(note["preview"], "are we there yet?");
    assert!(
        hook.posts.load(Ordering::SeqCst) >= 3,
        "two failures, then success"
    );
    // A retry of the same send notifies nobody again; an online bob is not notified.
    send(&mut alice, "g:trip", "m1", "are we there yet?").await;
    let (_bob, _) = server.login("bob", "phone").await;
    send(&mut alice, "g:trip", "m2", "now?").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(hook.accepted.try_recv().is_err(), "no further notification");
    assert_eq!(metric(&server, "chatproof_push_sent_total").await, 1.0);
    assert!(metric(&server, "chatproof_push_retries_total").await >= 2.0);
}

/// A webhook that is down: notifications are retried, then dropped and counted;
/// the message itself waits in the store and reaches the device when it connects.
#[tokio::test]
async fn webhook_down_drops_and_counts() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/push", dead.local_addr().unwrap());
    drop(dead);
    let server = start_with_webhook(&url, 2, 1).await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for i in 0..5 {
        send(&mut alice, &conv, &format!("m{i}"), "hello?").await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let failed = metric(&server, "chatproof_push_dropped_total{reason=\"failed\"}").await;
        let full = metric(
            &server,
            "chatproof_push_dropped_total{reason=\"queue_full\"}",
        )
        .await;
        if failed + full >= 5.0 {
            assert!(failed >= 1.0, "at least one was tried and given up");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "drops not counted: failed {failed}, full {full}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_bob, caught_up) = server.login("bob", "phone").await;
    let texts = caught_up
        .iter()
        .filter(|e| e["type"] == "msg" && e["body"]["kind"] == "text")
        .count();
    assert_eq!(texts, 5, "every message waits for the device");
}
