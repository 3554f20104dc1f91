//! Creates the population's conversations over the protocol before the load starts.

use std::time::Duration;

use anyhow::{anyhow, bail};
use chatproof_server::auth::TokenKey;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::device::{now_us, open, source_for, Target};
use crate::world::World;

/// Conversations created concurrently.
const SETUP_CONCURRENCY: usize = 32;

async fn request(
    target: &Target,
    source: Option<std::net::IpAddr>,
    token: &str,
    device: &str,
    op: Value,
) -> anyhow::Result<()> {
    let mut ws = tokio::time::timeout(
        Duration::from_secs(30),
        open(&target.url, target.addr, source),
    )
    .await
    .map_err(|_| anyhow!("connecting to {} timed out", target.url))??;
    let hello =
        json!({"rid": "h", "op": "hello", "versions": [1], "token": token, "device": device});
    ws.send(Message::Text(hello.to_string().into())).await?;
    let mut op = op;
    op["rid"] = json!("op");
    ws.send(Message::Text(op.to_string().into())).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow!("setup timed out"))?;
        let Some(Ok(Message::Text(text))) = frame else {
            if frame.is_none() {
                bail!("connection closed during setup");
            }
            continue;
        };
        let v: Value = serde_json::from_str(&text)?;
        if v["type"] == "error" {
            bail!("setup refused: {} {}", v["code"], v["message"]);
        }
        if v["type"] == "ok" && v["rid"] == "op" {
            let _ = ws.close(None).await;
            return Ok(());
        }
    }
}

/// Opens the 1:1 conversations and creates the groups owned by `users` (all users, or
/// one part's whole groups). With several targets (servers
/// of one cluster) the requests are spread over them, each from its own loopback source
/// address, so setting up a large population exhausts no address's ephemeral ports.
pub async fn create_conversations(
    world: &World,
    users: &[u32],
    targets: &[Target],
    key: &TokenKey,
) -> anyhow::Result<()> {
    let owners: std::collections::HashSet<u32> = users.iter().copied().collect();
    anyhow::ensure!(!targets.is_empty(), "no target to set up");
    let exp = now_us() / 1_000_000 + 3600;
    // Each job is its own device: one owner's jobs run concurrently, and a second
    // connection of the same device would replace the first.
    let jobs: Vec<(String, String, Value)> = world
        .convs
        .iter()
        .filter(|c| owners.contains(&c.members[0]))
        .enumerate()
        .map(|(k, c)| {
            let owner = world.user_id(c.members[0]);
            let op = if c.group {
                let others: Vec<String> =
                    c.members[1..].iter().map(|u| world.user_id(*u)).collect();
                json!({"op": "create_group", "conv": c.id, "members": others})
            } else {
                json!({"op": "open_direct", "peer": world.user_id(c.members[1])})
            };
            (key.mint(&owner, exp), format!("setup-{k}"), op)
        })
        .collect();
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(jobs)
        .enumerate()
        .map(|(k, (token, device, op))| async move {
            let target = &targets[k % targets.len()];
            let source = source_for(target.addr, k as u64);
            request(target, source, &token, &device, op).await
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(())
}
