//! Durability across `kill -9`: every acknowledged message survives, in order, once.

use std::collections::BTreeMap;
use std::time::Duration;

use chatproof_client::Client;
use chatproof_e2e::ServerProcess;
use serde_json::{json, Value};

const SENDERS: usize = 4;

async fn login(url: &str, user: &str, device: &str) -> Client {
    let (client, _) = Client::login(url, &ServerProcess::token(user), device, json!({}))
        .await
        .unwrap();
    client
}

/// Sends until the connection breaks; returns (message_id → acked seq) and the ids left unacknowledged.
async fn send_until_killed(
    mut client: Client,
    conv: String,
    prefix: String,
) -> (BTreeMap<String, u64>, Vec<String>) {
    let mut acked = BTreeMap::new();
    let mut unacked = Vec::new();
    for i in 0..1_000_000u64 {
        let id = format!("{prefix}-{i}");
        match client
            .request(json!({"op": "send", "conv": conv, "message_id": id, "text": "durable?"}))
            .await
        {
            Ok(Ok(ack)) => {
                acked.insert(id, ack["seq"].as_u64().unwrap());
            }
            Ok(Err(e)) => panic!("send refused: {} {}", e.code, e.message),
            Err(_) => {
                unacked.push(id);
                break;
            }
        }
    }
    (acked, unacked)
}

async fn read_all(client: &mut Client, conv: &str) -> Vec<Value> {
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let page = client
            .request(json!({"op": "sync", "conv": conv, "after": after, "limit": 500}))
            .await
            .unwrap()
            .unwrap();
        let batch = page["entries"].as_array().unwrap().clone();
        after = batch.last().map_or(after, |e| e["seq"].as_u64().unwrap());
        entries.extend(batch);
        if page["has_more"] == false {
            return entries;
        }
    }
}

/// A server killed with SIGKILL mid-traffic loses no acknowledged message; a retry of an
/// unacknowledged one never creates a second copy; seqs stay gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let mut owner = login(&server.url, "owner", "d").await;
    let members: Vec<String> = (0..SENDERS).map(|i| format!("s{i}")).collect();
    let group = json!({"op": "create_group", "conv": "g:durable", "members": members});
    owner.request(group).await.unwrap().unwrap();
    let mut tasks = Vec::new();
    for (i, user) in members.iter().enumerate() {
        let client = login(&server.url, user, "d").await;
        let conv = if i % 2 == 0 {
            "g:durable".to_owned()
        } else {
            client_open_direct(&server.url, user).await
        };
        tasks.push(tokio::spawn(send_until_killed(client, conv, user.clone())));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill_9();
    let mut acked: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let mut unacked = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let conv = if i % 2 == 0 {
            "g:durable".to_owned()
        } else {
            format!("d:owner:s{i}")
        };
        let (ok, lost_in_flight) = task.await.unwrap();
        assert!(!ok.is_empty(), "sender {i} got no ack before the kill");
        for (id, seq) in ok {
            acked.insert(id, (conv.clone(), seq));
        }
        unacked.extend(lost_in_flight.into_iter().map(|id| (conv.clone(), id)));
    }

    let server = ServerProcess::start(dir.path(), &[]);
    // Retrying what was in flight: at most one entry per message id, whatever the kill did.
    for (conv, id) in &unacked {
        let user = id.split('-').next().unwrap();
        let mut c = login(&server.url, user, "retry").await;
        let ack = c
            .request(json!({"op": "send", "conv": conv, "message_id": id, "text": "durable?"}))
            .await
            .unwrap()
            .unwrap();
        assert!(ack["seq"].as_u64().unwrap() > 0);
    }
    let mut reader = login(&server.url, "owner", "reader").await;
    let mut contract = chatproof_e2e::DeliveryCheck::default();
    for conv in [
        "g:durable".to_owned(),
        "d:owner:s1".to_owned(),
        "d:owner:s3".to_owned(),
    ] {
        let entries = read_all(&mut reader, &conv).await;
        let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        let stored: BTreeMap<u64, &str> = entries
            .iter()
            .map(|e| {
                (
                    e["seq"].as_u64().unwrap(),
                    e["message_id"].as_str().unwrap(),
                )
            })
            .collect();
        let last_seq = seqs.iter().copied().max().unwrap_or(0);
        contract.device_stream("history", &conv, &seqs, last_seq);
        contract.stored_once(&conv, stored.iter().map(|(seq, id)| (*seq, *id)));
        for (id, (_, seq)) in acked.iter().filter(|(_, (c, _))| *c == conv) {
            let shown = stored.get(seq).copied();
            contract.acknowledged("history", &conv, id, *seq, shown);
        }
    }
    contract.assert_clean("history after kill -9");
    eprintln!(
        "kill -9: {} acknowledged messages all survived; {} in-flight retried once",
        acked.len(),
        unacked.len()
    );
    assert!(server.terminate(), "SIGTERM gives a clean exit");
}

async fn client_open_direct(url: &str, user: &str) -> String {
    let mut c = login(url, user, "setup").await;
    let r = c
        .request(json!({"op": "open_direct", "peer": "owner"}))
        .await
        .unwrap()
        .unwrap();
    r["conversation"]["conv"].as_str().unwrap().to_owned()
}

/// Logs written to a pipe or file are plain text: no ANSI colour codes.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(chatproof_e2e::server_binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--secret",
            chatproof_e2e::SECRET,
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chatproof-server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on "), "{line:?}");
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(logs.lines().count() > 0, "info logs expected");
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in piped logs:\n{logs}"
    );
}
