//! Creates the population's conversations over the protocol before the load starts.

use std::time::Duration;

use anyhow::{anyhow, bail};
use chatproof_client::{Client, Request};
use chatproof_server::auth::TokenKey;
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::MaybeTlsStream;

use crate::device::{now_us, open_tcp, source_for, Target};
use crate::world::World;

/// Conversations created concurrently.
const SETUP_CONCURRENCY: usize = 32;
/// How long connecting, and then each reply, may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A conversation to set up, as its owner's request.
enum Setup {
    Direct { peer: String },
    Group { conv: String, members: Vec<String> },
}

impl Setup {
    fn request(&self) -> Request<'_> {
        match self {
            Setup::Direct { peer } => Request::OpenDirect { peer },
            Setup::Group { conv, members } => Request::CreateGroup { conv, members },
        }
    }
}

/// Makes one conversation as `device` of the token's user, on its own connection.
async fn request(
    target: &Target,
    source: Option<std::net::IpAddr>,
    token: &str,
    device: &str,
    setup: Setup,
) -> anyhow::Result<()> {
    let connect = async {
        let stream = open_tcp(target.addr, source).await?;
        Ok::<_, anyhow::Error>(Client::handshake(MaybeTlsStream::Plain(stream), &target.url).await?)
    };
    let client = tokio::time::timeout(SETUP_TIMEOUT, connect)
        .await
        .map_err(|_| anyhow!("connecting to {} timed out", target.url))??;
    let mut client = client.with_reply_timeout(SETUP_TIMEOUT);
    client.hello_with(token, device, json!({})).await?;
    let reply = client.call(&setup.request()).await?;
    client.close().await;
    match reply {
        Ok(_) => Ok(()),
        Err(e) => bail!("setup refused: {} {}", e.code, e.message),
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
    let jobs: Vec<(String, String, Setup)> = world
        .convs
        .iter()
        .filter(|c| owners.contains(&c.members[0]))
        .enumerate()
        .map(|(k, c)| {
            let owner = world.user_id(c.members[0]);
            let op = if c.group {
                Setup::Group {
                    conv: c.id.clone(),
                    members: c.members[1..].iter().map(|u| world.user_id(*u)).collect(),
                }
            } else {
                Setup::Direct {
                    peer: world.user_id(c.members[1]),
                }
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
