//! Durability across `kill -9`: every acknowledged message survives, in order, once;
//! and start-up refuses a damaged store or a full disk with a message saying so.

use std::collections::BTreeMap;
use std::time::Duration;

use chatproof_client::{Client, Request};
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
            .call(&Request::send_text(&conv, &id, "durable?"))
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
            .call(&Request::Sync {
                conv,
                after,
                limit: Some(500),
            })
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
    let group = Request::CreateGroup {
        conv: "g:durable",
        members: &members,
    };
    owner.call(&group).await.unwrap().unwrap();
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
            .call(&Request::send_text(conv, id, "durable?"))
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
        .call(&Request::OpenDirect { peer: "owner" })
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

/// Runs `chatproof-server serve` on `data_dir` with `extra` flags and expects it
/// to refuse to start: returns its stderr (it must exit non-zero within 60 s).
fn refused_start(data_dir: &std::path::Path, extra: &[&str]) -> String {
    use std::process::{Command, Stdio};
    let mut child = Command::new(chatproof_e2e::server_binary())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chatproof-server");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("chatproof-server started on a store it should refuse");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    stderr
}

/// A corrupted store file stops start-up with a message naming the file and what
/// to do; the file is left untouched.
#[test]
fn a_corrupted_store_file_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chatproof.redb");
    let garbage = vec![0x5A_u8; 128 * 1024];
    std::fs::write(&file, &garbage).unwrap();
    let stderr = refused_start(dir.path(), &["--secret", chatproof_e2e::SECRET]);
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("corrupted"), "{stderr}");
    assert!(stderr.contains("move it aside"), "{stderr}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        garbage,
        "the file is left as it was"
    );
}

/// A tmpfs of `size` mounted on a new directory, unmounted on drop; `None` where
/// mounting is not allowed (not root, or no CAP_SYS_ADMIN in a container).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self { dir })
    }

    /// Fills the disk to the last byte.
    fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.dir.path().join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while filler.write_all(&block).is_ok() {}
        let _ = filler.write_all(&[0u8]);
        while filler.write_all(&[0u8]).is_ok() {}
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Start-up on a full disk says the disk is full, whether it fails at the secret
/// file or at the store file, and leaves no empty secret behind.
#[test]
fn start_up_on_a_full_disk_says_so() {
    let Some(disk) = SmallDisk::mount("1m") else {
        eprintln!("SKIPPED durability::start_up_on_a_full_disk_says_so: cannot mount a tmpfs here (needs root)");
        return;
    };
    disk.fill();
    let data = disk.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // The secret file is the first thing written.
    let stderr = refused_start(&data, &[]);
    assert!(stderr.contains("the disk is full"), "{stderr}");
    assert!(
        !data.join("secret").exists(),
        "no empty secret file left behind"
    );
    // With the secret given, the store file is.
    let stderr = refused_start(&data, &["--secret", chatproof_e2e::SECRET]);
    assert!(stderr.contains("the disk is full"), "{stderr}");
    assert!(stderr.contains("chatproof.redb"), "{stderr}");
}
