//! Scale-out over real processes: three `chatproof-server --backend cluster`
//! processes sharing Redis and a Cassandra node on loopback, devices spread
//! across them, 1:1 and group traffic; one server is killed with SIGKILL
//! mid-run, its devices reconnect to the others with their cursors and retry
//! what was unacknowledged. Afterwards every device holds every entry of each
//! of its conversations exactly once, in order, and every acknowledged
//! message sits at its acknowledged seq. The same traffic runs through a
//! SIGKILL and restart of Redis and of the (only) Cassandra node, the latter
//! a node of the test's own started by `scripts/services/cassandra.sh`.
//!
//! Needs `CHATPROOF_TEST_CQL` and `CHATPROOF_TEST_REDIS` (scripts/test.sh sets
//! them); without them it prints SKIPPED, or fails when
//! `CHATPROOF_REQUIRE_SERVICES=1`.

use std::collections::BTreeMap;
use std::time::Duration;

use chatproof_client::{Client, ClientError, Request};
use chatproof_e2e::ServerProcess;
use serde_json::{json, Value};
use tokio::time::Instant;

const USERS: usize = 6;
const SERVERS: usize = 3;

/// The services, or why the test is skipped.
fn services() -> Result<(String, String), String> {
    let cql = std::env::var("CHATPROOF_TEST_CQL").unwrap_or_default();
    let redis = std::env::var("CHATPROOF_TEST_REDIS").unwrap_or_default();
    if let Some(why) = cql.strip_prefix("unavailable:") {
        return Err(format!("Cassandra unavailable: {why}"));
    }
    if cql.is_empty() || redis.is_empty() {
        let why = "CHATPROOF_TEST_CQL / CHATPROOF_TEST_REDIS not set (scripts/test.sh sets them)";
        assert!(
            std::env::var("CHATPROOF_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "{why}, and CHATPROOF_REQUIRE_SERVICES=1 requires them"
        );
        return Err(why.to_owned());
    }
    Ok((cql, redis))
}

/// Starts `n` server processes on the cluster backend (data under `dir`, ids
/// `e2e-RUN-I`, keyspace, CQL node and Redis URL as given), with `extra` flags.
fn start_cluster(
    n: usize,
    dir: &std::path::Path,
    (run, keyspace): (&str, &str),
    (cql, redis): (&str, &str),
    extra: &[&str],
) -> Vec<ServerProcess> {
    (0..n)
        .map(|i| {
            let id = format!("e2e-{run}-{i}");
            let mut args = vec![
                "--backend",
                "cluster",
                "--scylla-nodes",
                cql,
                "--scylla-keyspace",
                keyspace,
                "--redis-url",
                redis,
                "--server-id",
                &id,
            ];
            args.extend_from_slice(extra);
            ServerProcess::start(&dir.join(format!("s{i}")), &args)
        })
        .collect()
}

/// One user's device: sends, receives, reconnects elsewhere when its server dies.
struct Device {
    user: String,
    token: String,
    urls: Vec<String>,
    server: usize,
    client: Option<Client>,
    /// conv → seqs received, in arrival order.
    received: BTreeMap<String, Vec<u64>>,
    /// conv → (seq → message_id) received.
    ids: BTreeMap<String, BTreeMap<u64, String>>,
    /// (conv, message_id) → acknowledged seq.
    acked: BTreeMap<(String, String), u64>,
    /// The send in flight when the connection broke; retried with the same id.
    unacked: Option<(String, String)>,
    reconnects: usize,
    /// Sends answered `internal` (to be retried).
    refused: usize,
}

impl Device {
    async fn connect(&mut self, dead: &[bool]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                Instant::now() < deadline,
                "{}: no server accepted",
                self.user
            );
            if dead[self.server] {
                self.server = (self.server + 1) % self.urls.len();
                continue;
            }
            let cursors: BTreeMap<&String, u64> = self
                .received
                .iter()
                .filter_map(|(c, seqs)| seqs.last().map(|s| (c, *s)))
                .collect();
            match Client::login(&self.urls[self.server], &self.token, "d1", json!(cursors)).await {
                Ok((client, _)) => {
                    self.client = Some(client);
                    return;
                }
                Err(e) => {
                    eprintln!("{}: login on server {} failed: {e}", self.user, self.server);
                    self.server = (self.server + 1) % self.urls.len();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Files every event already received.
    fn drain(&mut self, client: &mut Client) {
        loop {
            let event = match client.try_next_event() {
                Some(event) => event,
                None => return,
            };
            self.file(&event);
        }
    }

    fn file(&mut self, event: &Value) {
        if event["type"] != "msg" {
            return;
        }
        let entry = event;
        let conv = entry["conv"].as_str().unwrap().to_owned();
        let seq = entry["seq"].as_u64().unwrap();
        let id = entry["message_id"].as_str().unwrap().to_owned();
        self.received.entry(conv.clone()).or_default().push(seq);
        self.ids.entry(conv).or_default().insert(seq, id);
    }

    /// Sends one message (or retries the unacknowledged one); false if the connection broke.
    async fn send(&mut self, conv: &str, id: String) -> bool {
        let (conv, id) = self.unacked.take().unwrap_or((conv.to_owned(), id));
        let mut client = self.client.take().expect("connected");
        let reply = client
            .call(&Request::send_text(&conv, &id, "across servers"))
            .await;
        self.drain(&mut client);
        match reply {
            Ok(Ok(ack)) => {
                let seq = ack["seq"].as_u64().unwrap();
                if let Some(before) = self.acked.insert((conv.clone(), id.clone()), seq) {
                    assert_eq!(before, seq, "{conv}/{id}: a retry moved the message");
                }
                self.client = Some(client);
                true
            }
            Ok(Err(e)) if e.code == "internal" || e.code == "shutting_down" => {
                self.refused += usize::from(e.code == "internal");
                self.unacked = Some((conv, id));
                self.client = Some(client);
                true
            }
            Ok(Err(e)) => panic!("{}: send refused: {} {}", self.user, e.code, e.message),
            Err(_) => {
                self.unacked = Some((conv, id));
                self.reconnects += 1;
                false
            }
        }
    }
}

async fn setup_conversations(url: &str, users: &[String]) -> (String, Vec<String>) {
    let token = ServerProcess::token(&users[0]);
    let (mut owner, _) = Client::login(url, &token, "setup", json!({}))
        .await
        .unwrap();
    let group = format!("g:{}", users[0]);
    owner
        .call(&Request::CreateGroup {
            conv: &group,
            members: &users[1..],
        })
        .await
        .unwrap()
        .unwrap();
    let mut directs = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let token = ServerProcess::token(user);
        let (mut c, _) = Client::login(url, &token, "setup", json!({}))
            .await
            .unwrap();
        let peer = &users[(i + 1) % users.len()];
        let r = c
            .call(&Request::OpenDirect { peer })
            .await
            .unwrap()
            .unwrap();
        directs.push(r["conversation"]["conv"].as_str().unwrap().to_owned());
    }
    (group, directs)
}

/// Drives 1:1 and group traffic from one device per user, spread over the servers
/// at `urls`, for 5 s, calling `disrupt` (with the time elapsed and which servers are
/// dead) before each round; then waits until every device holds every entry of its
/// conversations and checks them: each once, in order, every acknowledged message at
/// its seq. Returns how many messages were acknowledged and how many devices moved.
async fn traffic(
    urls: &[String],
    run: &str,
    disrupt: &mut dyn FnMut(Duration, &mut [bool]),
) -> Traffic {
    let users: Vec<String> = (0..USERS).map(|i| format!("c{run}u{i}")).collect();
    let mut devices: Vec<Device> = users
        .iter()
        .enumerate()
        .map(|(i, user)| Device {
            user: user.clone(),
            token: ServerProcess::token(user),
            urls: urls.to_vec(),
            server: i % urls.len(),
            client: None,
            received: BTreeMap::new(),
            ids: BTreeMap::new(),
            acked: BTreeMap::new(),
            unacked: None,
            reconnects: 0,
            refused: 0,
        })
        .collect();
    let mut dead = vec![false; urls.len()];
    for device in &mut devices {
        device.connect(&dead).await;
    }
    // Conversations are created after every device is online, through server 1:
    // devices on the others learn of them over the fabric.
    let (group, directs) = setup_conversations(&urls[1], &users).await;

    let started = Instant::now();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(5) {
        disrupt(started.elapsed(), &mut dead);
        for (i, device) in devices.iter_mut().enumerate() {
            if device.client.is_none() {
                device.connect(&dead).await;
            }
            let conv = if round.is_multiple_of(2) {
                group.clone()
            } else {
                directs[i].clone()
            };
            let id = format!("{}-{round}", device.user);
            if !device.send(&conv, id).await {
                device.connect(&dead).await;
                device.send("", String::new()).await; // The retry of what was in flight.
            }
        }
        round += 1;
    }
    let retry_deadline = Instant::now() + Duration::from_secs(90);
    for device in &mut devices {
        while device.unacked.is_some() {
            assert!(
                Instant::now() < retry_deadline,
                "{}: a send was still refused 90 s after the traffic ended",
                device.user
            );
            if device.client.is_none() {
                device.connect(&dead).await;
            }
            if device.send("", String::new()).await && device.unacked.is_some() {
                // Refused (the store is down): retry with the same id, not in a hot loop.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    // Every device converges to the last seq of each of its conversations.
    let (mut probe, _) = Client::login(
        &urls[1],
        &ServerProcess::token(&users[0]),
        "probe",
        json!({}),
    )
    .await
    .unwrap();
    let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
    for conv in std::iter::once(&group).chain(&directs) {
        let page = probe
            .call(&Request::Sync {
                conv,
                after: 0,
                limit: Some(1),
            })
            .await
            .unwrap();
        if let Ok(page) = page {
            last_seq.insert(conv.clone(), page["last_seq"].as_u64().unwrap());
        }
    }
    // users[0] is in the group and in directs[0] and directs[USERS-1]; read the others' heads via their owners.
    for (i, conv) in directs.iter().enumerate() {
        if last_seq.contains_key(conv) {
            continue;
        }
        let client = devices[i].client.as_mut().expect("connected");
        let page = client
            .call(&Request::Sync {
                conv,
                after: 0,
                limit: Some(1),
            })
            .await
            .unwrap()
            .unwrap();
        last_seq.insert(conv.clone(), page["last_seq"].as_u64().unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, device) in devices.iter_mut().enumerate() {
        let mine = [&group, &directs[i], &directs[(i + USERS - 1) % USERS]];
        loop {
            let behind: Vec<&&String> = mine
                .iter()
                .filter(|c| {
                    device.received.get(**c).and_then(|s| s.last()).copied() < Some(last_seq[**c])
                })
                .collect();
            if behind.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: never caught up on {behind:?}",
                device.user
            );
            let mut client = device.client.take().expect("connected");
            match client.next_event(Duration::from_millis(500)).await {
                Ok(event) => device.file(&event),
                Err(ClientError::Timeout(_)) => {}
                Err(e) => panic!("{}: {e}", device.user),
            }
            device.client = Some(client);
        }
    }

    let mut acked_total = 0;
    let mut contract = chatproof_e2e::DeliveryCheck::default();
    for (i, device) in devices.iter().enumerate() {
        for conv in [&group, &directs[i], &directs[(i + USERS - 1) % USERS]] {
            contract.device_stream(&device.user, conv, &device.received[conv], last_seq[conv]);
        }
    }
    for sender in &devices {
        for ((conv, id), seq) in &sender.acked {
            acked_total += 1;
            for (i, device) in devices.iter().enumerate() {
                let member = *conv == group
                    || *conv == directs[i]
                    || *conv == directs[(i + USERS - 1) % USERS];
                if member {
                    let shown = device.ids[conv].get(seq).map(String::as_str);
                    contract.acknowledged(&device.user, conv, id, *seq, shown);
                }
            }
        }
    }
    contract.assert_clean("cluster traffic");
    Traffic {
        acked: acked_total,
        reconnects: devices.iter().map(|d| d.reconnects).sum(),
        refused: devices.iter().map(|d| d.refused).sum(),
    }
}

/// What a run of [`traffic`] did.
struct Traffic {
    /// Messages acknowledged (each checked on every member device).
    acked: usize,
    /// Times a device reconnected after its connection broke.
    reconnects: usize,
    /// Sends answered `internal` (retried with the same id).
    refused: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_of_three_servers_loses_nothing() {
    let (cql, redis) = match services() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED cluster::kill_9_one_of_three_servers_loses_nothing: {why}");
            return;
        }
    };
    let run = format!("k{}", std::process::id());
    let keyspace = format!("chatproof_e2e_{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let mut servers: Vec<Option<ServerProcess>> = start_cluster(
        SERVERS,
        dir.path(),
        (&run, &keyspace),
        (&cql, &redis),
        &["--registry-ttl-secs", "3"],
    )
    .into_iter()
    .map(Some)
    .collect();
    let urls: Vec<String> = servers
        .iter()
        .map(|s| s.as_ref().unwrap().url.clone())
        .collect();
    let mut kill = |elapsed: Duration, dead: &mut [bool]| {
        if !dead[0] && elapsed > Duration::from_millis(2000) {
            servers[0].take().unwrap().kill_9();
            dead[0] = true;
            eprintln!("killed server 0");
        }
    };
    let Traffic {
        acked,
        reconnects: moved,
        ..
    } = traffic(&urls, &run, &mut kill).await;
    eprintln!(
        "cluster kill -9: {acked} acknowledged messages, {moved} devices moved, all delivered once in order to {USERS} devices"
    );
    assert!(
        moved >= 2,
        "the devices of the killed server reconnected elsewhere"
    );
    for server in servers.into_iter().flatten() {
        assert!(server.terminate(), "SIGTERM gives a clean exit");
    }
}

/// Runs `chatproof-server serve --backend cluster ARGS` and returns (exit success, stderr).
fn serve_cluster(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(chatproof_e2e::server_binary())
        .args(["serve", "--backend", "cluster", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "error")
        .env("RUST_BACKTRACE", "0")
        .env_remove("CHATPROOF_SCYLLA_NODES")
        .env_remove("CHATPROOF_REDIS_URL")
        .env_remove("CHATPROOF_SECRET")
        .output()
        .expect("running chatproof-server");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A missing flag or an unreachable backend stops start-up with a message naming it.
#[test]
fn misconfigured_cluster_backends_stop_start_up() {
    let secret = ["--secret", chatproof_e2e::SECRET];
    let (ok, err) = serve_cluster(&["--scylla-nodes", "127.0.0.1:1"]);
    assert!(!ok && err.contains("needs --secret"), "{err}");
    let (ok, err) = serve_cluster(&secret);
    assert!(!ok && err.contains("needs --scylla-nodes"), "{err}");
    let (ok, err) = serve_cluster(&[&secret[..], &["--scylla-nodes", "127.0.0.1:1"]].concat());
    assert!(
        !ok && err.contains("cannot connect to Scylla/Cassandra at 127.0.0.1:1"),
        "{err}"
    );
    let Ok((cql, _)) = services() else {
        eprintln!("SKIPPED the unreachable-Redis case: no CQL server");
        return;
    };
    let args = [&secret[..], &["--scylla-nodes", &cql]].concat();
    let (ok, err) = serve_cluster(&args);
    assert!(!ok && err.contains("needs --redis-url"), "{err}");
    let args = [&args[..], &["--redis-url", "redis://127.0.0.1:1/"]].concat();
    let (ok, err) = serve_cluster(&args);
    assert!(
        !ok && err.contains("cannot connect to Redis at redis://127.0.0.1:1/"),
        "{err}"
    );
}

/// A Redis server of the test's own, on a free loopback port.
struct OwnRedis {
    child: Option<std::process::Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut redis = Self {
            child: None,
            port,
            dir: tempfile::tempdir().ok()?,
        };
        redis.restart().then_some(redis)
    }

    /// Starts redis-server (empty: no persistence) and waits until it answers.
    fn restart(&mut self) -> bool {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--port", &self.port.to_string()])
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else { return false };
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// SIGKILL: the registry and every subscription are gone.
    fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// `GET path` on the server at `addr`: status and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// The value of a Prometheus counter on the server at `addr`.
fn metric(addr: &str, name: &str) -> f64 {
    let (_, text) = http_get(addr, "/metrics");
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Redis is killed mid-traffic and comes back empty: servers resubscribe, register
/// their devices again and resync their sessions; sends in between are acknowledged
/// once durable and their events wait in each server's outbox until Redis is back.
/// Nothing acknowledged is lost, nothing shown twice, no send refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_nothing() {
    let (cql, _) = match services() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED cluster::redis_restart_loses_nothing: {why}");
            return;
        }
    };
    let Some(mut redis) = OwnRedis::start() else {
        panic!(
            "redis-server is not on PATH or did not start (scripts/services/redis.sh installs it)"
        );
    };
    let run = format!("r{}", std::process::id());
    let keyspace = format!("chatproof_e2e_{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let servers = start_cluster(
        2,
        dir.path(),
        (&run, &keyspace),
        (&cql, &url),
        &["--registry-ttl-secs", "3"],
    );
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let mut phase = 0;
    let health_addr = servers[0].addr.clone();
    let mut outage = |elapsed: Duration, _: &mut [bool]| {
        if phase == 0 && elapsed > Duration::from_millis(1500) {
            redis.kill_9();
            eprintln!("killed redis");
            phase = 1;
        } else if phase == 1 && elapsed > Duration::from_millis(1800) {
            // Health names Redis; readiness does not depend on it.
            let (status, body) = http_get(&health_addr, "/healthz");
            assert_eq!(status, 503, "/healthz while Redis is down: {body}");
            assert!(body.contains("router unhealthy"), "{body}");
            let (status, body) = http_get(&health_addr, "/readyz");
            assert_eq!(status, 200, "/readyz while Redis is down: {body}");
            phase = 2;
        } else if phase == 2 && elapsed > Duration::from_millis(2500) {
            assert!(redis.restart(), "redis restarts");
            eprintln!("restarted redis (empty)");
            phase = 3;
        }
    };
    let Traffic { acked, refused, .. } = traffic(&urls, &run, &mut outage).await;
    let sum = |name: &str| -> f64 { servers.iter().map(|s| metric(&s.addr, name)).sum() };
    let resyncs = sum("chatproof_fabric_resyncs_total");
    let (queued, retried) = (
        sum("chatproof_fabric_queued_total"),
        sum("chatproof_fabric_retried_total"),
    );
    eprintln!(
        "redis restart: {acked} acknowledged messages delivered; {refused} sends refused; \
         {queued} events queued for the router, {retried} handed over later; {resyncs} server resyncs"
    );
    assert!(
        resyncs >= 2.0,
        "both servers recovered from the restart ({resyncs})"
    );
    // Availability without the router: sends during the outage were acknowledged
    // once durable (none refused), and what waited was routed once Redis was back.
    assert_eq!(refused, 0, "no send was refused while Redis was down");
    assert!(
        queued > 0.0,
        "events waited for the router during the outage"
    );
    assert!(
        retried > 0.0,
        "waiting events were handed over once Redis was back"
    );
    assert_eq!(sum("chatproof_fabric_waiting"), 0.0, "nothing still waits");
    for server in &servers {
        let (status, body) = http_get(&server.addr, "/healthz");
        assert_eq!(status, 200, "/healthz once Redis is back: {body}");
    }
    for server in servers {
        assert!(server.terminate(), "SIGTERM gives a clean exit");
    }
}

/// A minimal webhook receiver on loopback: answers every POST with 200 and
/// hands each JSON body to the test.
async fn webhook_receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/push", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let _ = tx.send(serde_json::from_slice::<Value>(&body).unwrap());
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

/// Waits for a presence state of `user` with `online` on `client`.
async fn presence_event(client: &mut Client, user: &str, online: bool) -> Value {
    let events = client
        .events_until(Duration::from_secs(15), |e| {
            e["type"] == "presence"
                && e["users"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["user"] == user && s["online"] == online)
        })
        .await
        .unwrap_or_else(|e| panic!("no presence {user} online={online}: {e:?}"));
    let frame = events.last().unwrap().clone();
    frame["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["user"] == user)
        .unwrap()
        .clone()
}

/// Presence and push notifications cross servers: alice on one server sees bob
/// come and go on another, and a message to bob while he has no device anywhere
/// notifies the webhook once, while one sent while he is online elsewhere does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_push_cross_servers() {
    let (cql, redis) = match services() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED cluster::presence_and_push_cross_servers: {why}");
            return;
        }
    };
    let (hook, mut notes) = webhook_receiver().await;
    let run = format!("p{}", std::process::id());
    let keyspace = format!("chatproof_e2e_{run}");
    let dir = tempfile::tempdir().unwrap();
    let servers = start_cluster(
        2,
        dir.path(),
        (&run, &keyspace),
        (&cql, &redis),
        &["--presence-interval-ms", "100", "--push-webhook", &hook],
    );
    let (alice_user, bob_user) = (format!("alice{run}"), format!("bob{run}"));
    let alice_token = ServerProcess::token(&alice_user);
    let bob_token = ServerProcess::token(&bob_user);
    let (mut alice, _) = Client::login(&servers[0].url, &alice_token, "phone", json!({}))
        .await
        .unwrap();
    let opened = alice
        .call(&Request::OpenDirect { peer: &bob_user })
        .await
        .unwrap()
        .unwrap();
    let conv = opened["conversation"]["conv"].as_str().unwrap().to_owned();
    let never = alice
        .call(&Request::Presence {
            users: std::slice::from_ref(&bob_user),
            watch: true,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(never["users"][0]["online"], false);

    let (bob, _) = Client::login(&servers[1].url, &bob_token, "phone", json!({}))
        .await
        .unwrap();
    presence_event(&mut alice, &bob_user, true).await;
    let asked = alice
        .call(&Request::Presence {
            users: std::slice::from_ref(&bob_user),
            watch: false,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        asked["users"][0]["online"], true,
        "the registry knows bob's server"
    );
    bob.close().await;
    let gone = presence_event(&mut alice, &bob_user, false).await;
    assert!(gone["last_seen_ms"].as_u64().is_some(), "{gone}");

    let first = alice
        .call(&Request::send_text(&conv, "m1", "ping"))
        .await
        .unwrap()
        .unwrap();
    let note = tokio::time::timeout(Duration::from_secs(15), notes.recv())
        .await
        .expect("a notification for offline bob")
        .unwrap();
    assert_eq!(note["user"], bob_user.as_str());
    assert_eq!(note["seq"], first["seq"]);
    let (_bob, _) = Client::login(&servers[1].url, &bob_token, "phone", json!({}))
        .await
        .unwrap();
    alice
        .call(&Request::send_text(&conv, "m2", "ping"))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        notes.try_recv().is_err(),
        "bob is online on the other server"
    );
    for server in servers {
        assert!(server.terminate(), "SIGTERM gives a clean exit");
    }
}

/// The load generator against a cluster: `--target` twice spreads the users over both
/// servers (so 1:1 chats and groups cross servers), two worker processes share the
/// schedule, every delivery is checked, and `--server-pid` makes the report sum both
/// servers' CPU and memory.
#[test]
fn loadgen_spreads_devices_over_a_cluster() {
    let (cql, redis) = match services() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED cluster::loadgen_spreads_devices_over_a_cluster: {why}");
            return;
        }
    };
    let run = format!("l{}", std::process::id());
    let keyspace = format!("chatproof_e2e_lg_{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let servers = start_cluster(2, dir.path(), (&run, &keyspace), (&cql, &redis), &[]);
    let scenario = dir.path().join("spread.toml");
    std::fs::write(
        &scenario,
        "name = \"spread\"\n[population]\nusers = 8\ndevices_per_user = 1\ngroup_size = 4\n\
         [load]\nwarmup_secs = 0\nduration_secs = 2\nmessages_per_sec = 20\ngroup_share = 0.5\ndrivers = 2\ndrain_secs = 3\n\
         [slo]\ngenerator_lag_p99_ms = 1000\n",
    )
    .unwrap();
    let out = dir.path().join("reports");
    let pids = format!("{},{}", servers[0].pid(), servers[1].pid());
    let status = std::process::Command::new(chatproof_e2e::loadgen_binary())
        .arg("run")
        .arg(&scenario)
        .args(["--target", &servers[0].url, "--target", &servers[1].url])
        .args(["--server-pid", &pids, "--workers", "2", "--out-dir"])
        .arg(&out)
        .env("CHATPROOF_SECRET", chatproof_e2e::SECRET)
        .status()
        .unwrap();
    let report = std::fs::read_dir(out.join("spread"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(status.code(), Some(0), "{s:#}");
    let counts = &s["counts"];
    assert_eq!(counts["devices_connected"], 8);
    assert_eq!(counts["acked"], 40);
    assert!(counts["deliveries_expected"].as_u64().unwrap() >= 40);
    assert_eq!(counts["deliveries_received"], counts["deliveries_expected"]);
    for server in &servers {
        assert!(
            s["target"].as_str().unwrap().contains(&server.url),
            "{} is among the targets: {}",
            server.url,
            s["target"]
        );
    }
    assert_eq!(s["reference_server"], false);
    assert_eq!(s["server_usage"]["processes"], 2, "{:#}", s["server_usage"]);
    assert!(s["server_usage"]["cpu_secs"].as_f64().unwrap() > 0.0);
    assert_eq!(s["generator_usage"]["processes"], 2);
    let report_md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(
        report_md.contains("Servers (2 processes"),
        "report.md names the measured servers"
    );
    // Each server carried its share of the devices.
    for server in &servers {
        assert!(
            metric(&server.addr, "chatproof_messages_out_total") > 0.0,
            "{} delivered something",
            server.addr
        );
    }
}

/// A Cassandra node of the test's own (scripts/services/cassandra.sh on free
/// loopback ports, data in a temporary directory), so it can be killed without
/// touching the node the other tests share.
struct OwnCassandra {
    dir: tempfile::TempDir,
    ports: [u16; 3],
}

impl OwnCassandra {
    /// Starts a fresh node; `None` (with the script's output) when it cannot.
    fn start() -> Option<Self> {
        // Below the ephemeral range (32768 and up): a port from it could be taken, while
        // the node is down, by a connection the servers open (or by a TCP self-connect
        // to it), and the node could not bind it again on restart.
        let mut free = (21_000 + (std::process::id() % 3_000) as u16 * 3..32_000)
            .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok());
        let node = Self {
            dir: tempfile::tempdir().ok()?,
            ports: [free.next()?, free.next()?, free.next()?],
        };
        node.script("start").then_some(node)
    }

    /// Runs `cassandra.sh COMMAND` for this node; true when it succeeded.
    fn script(&self, command: &str) -> bool {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/services/cassandra.sh"
        );
        std::process::Command::new("bash")
            .arg(script)
            .arg(command)
            .env("CHATPROOF_SERVICES_DIR", self.dir.path())
            .env("CHATPROOF_CASSANDRA_PORT", self.ports[0].to_string())
            .env(
                "CHATPROOF_CASSANDRA_STORAGE_PORT",
                self.ports[1].to_string(),
            )
            .env("CHATPROOF_CASSANDRA_JMX_PORT", self.ports[2].to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.ports[0])
    }
}

impl Drop for OwnCassandra {
    fn drop(&mut self) {
        self.script("stop");
    }
}

/// The only Cassandra node is killed with SIGKILL mid-traffic and started again on
/// its data: sends in between are refused (`internal`, nothing acknowledged) and
/// retried with the same id, `/healthz` names the store, and afterwards every
/// acknowledged message is on every member device once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_kill_9_loses_nothing() {
    let (_, redis) = match services() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED cluster::cassandra_kill_9_loses_nothing: {why}");
            return;
        }
    };
    let cassandra = std::sync::Arc::new(
        OwnCassandra::start()
            .expect("a second Cassandra node starts (scripts/services/cassandra.sh)"),
    );
    let run = format!("q{}", std::process::id());
    let keyspace = format!("chatproof_e2e_{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let cql = cassandra.address();
    let servers = start_cluster(
        SERVERS,
        dir.path(),
        (&run, &keyspace),
        (&cql, &redis),
        &["--registry-ttl-secs", "3"],
    );
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let health_addr = servers[0].addr.clone();
    let mut phase = 0;
    let mut resumed: Option<std::thread::JoinHandle<bool>> = None;
    let mut outage = |elapsed: Duration, _: &mut [bool]| {
        if phase == 0 && elapsed > Duration::from_millis(1500) {
            assert!(cassandra.script("kill"), "cassandra.sh kill");
            eprintln!("killed cassandra");
            phase = 1;
        } else if phase == 1 && elapsed > Duration::from_millis(2500) {
            let (status, body) = http_get(&health_addr, "/healthz");
            assert_eq!(status, 503, "/healthz while Cassandra is down: {body}");
            assert!(body.contains("store unhealthy"), "{body}");
            // The restart takes seconds: traffic goes on (refused) meanwhile.
            let node = std::sync::Arc::clone(&cassandra);
            resumed = Some(std::thread::spawn(move || node.script("resume")));
            phase = 2;
        }
    };
    let Traffic { acked, refused, .. } = traffic(&urls, &run, &mut outage).await;
    let resumed = resumed.expect("the outage happened").join().unwrap();
    assert!(
        resumed,
        "cassandra.sh resume started the node again on its data"
    );
    eprintln!(
        "cassandra kill -9: {acked} acknowledged messages delivered once in order to {USERS} devices; \
         {refused} sends refused while the store was down (retried with the same id)"
    );
    assert!(refused > 0, "sends were refused while Cassandra was down");
    for server in &servers {
        let (status, body) = http_get(&server.addr, "/healthz");
        assert_eq!(status, 200, "/healthz once Cassandra is back: {body}");
    }
    for server in servers {
        assert!(server.terminate(), "SIGTERM gives a clean exit");
    }
}
