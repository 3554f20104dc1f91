//! The simulated cluster: the real server on one node over a store that survives its
//! crashes, or several servers over the shared store and the router
//! ([`crate::services`]); one node per client device; and the harness that runs
//! the two phases.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatproof_client::Request;
use chatproof_server::auth::TokenKey;
use chatproof_server::clock::{Clock, SystemClock};
use chatproof_server::store::shared::memory::MemTables;
use madsim::runtime::Handle;
use madsim::task::NodeId;

use crate::checker::{ConvSpec, IDLE_TIMEOUT_MS};
use crate::client::{self, DeviceSpec, Progress};
use crate::disk::SimDisk;
use crate::faults::{self, Backends};
use crate::history::{DeviceKey, History, MemberChange};
use crate::options::{ChangeKind, PlannedChange, SeedRng, SimOptions};
use crate::platform::{self, Backend, ROUTER_IP, STORE_IP};
use crate::server_args::{self, CHAT_PORT};
use crate::services::{self, ROUTER_PORT, STORE_PORT, SUBSCRIBE_PORT};
use crate::stage::{self, sim_ms, Directions, Phase, Recorder, ServerClocks};

/// Server `i`'s simulated chat address (virtual: no packet leaves the process).
pub fn server_addr(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1 + i as u8)), CHAT_PORT)
}

/// Users picked to go away in the presence phase: about one in this many (at
/// least one, never all).
const AWAY_ONE_IN: u64 = 3;

/// How long the calm traffic lasts.
const CALM_MS: u64 = 2_000;
/// Devices picked to send in the calm phase, at most (spread over the devices).
const CALM_SENDERS_MAX: u32 = 12;
/// Messages each of them makes then.
const CALM_MESSAGES: u32 = 2;

fn device_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        0,
        1 + (i / 250) as u8,
        (i % 250 + 1) as u8,
    ))
}

/// The conversations of a run: 1:1 between neighbours, then the groups.
pub fn conversations(opts: &SimOptions) -> Vec<ConvSpec> {
    let mut convs: Vec<ConvSpec> = (0..opts.users / 2 * 2)
        .step_by(2)
        .map(|a| ConvSpec {
            id: chatproof_server::domain::direct_conv_id(&format!("u{a}"), &format!("u{}", a + 1)),
            members: vec![a, a + 1],
        })
        .collect();
    convs.extend(opts.groups.iter().enumerate().map(|(k, m)| ConvSpec {
        id: format!("g:s{k}"),
        members: m.clone(),
    }));
    convs
}

/// What the harness concluded.
pub struct Outcome {
    /// The history.
    pub history: History,
    /// The conversations.
    pub convs: Vec<ConvSpec>,
    /// Every device converged before the liveness deadline.
    pub converged: bool,
    /// Why not, if not.
    pub liveness_detail: String,
    /// Simulated time the run took, ms.
    pub sim_ms: u64,
}

/// Runs one simulation inside the madsim runtime.
pub async fn simulate(opts: SimOptions) -> Outcome {
    stage::start_clock();
    let handle = Handle::current();
    let recorder = Arc::new(Recorder::default());
    let directions = Arc::new(Directions::default());
    let clocks = Arc::new(ServerClocks::new(opts.servers));
    let addrs: Arc<[SocketAddr]> = (0..opts.servers).map(server_addr).collect();
    recorder.note(format!("options: {opts}"));
    let disk = SimDisk::new();
    let cluster = opts.servers > 1;
    let mut backends = Backends::default();
    if cluster {
        let tables = Arc::new(MemTables::default());
        let store = handle
            .create_node()
            .name("store")
            .ip(IpAddr::V4(STORE_IP))
            .init(move || {
                services::serve_store(
                    SocketAddr::new(IpAddr::V4(STORE_IP), STORE_PORT),
                    Arc::clone(&tables),
                )
            })
            .build();
        let router = handle
            .create_node()
            .name("router")
            .ip(IpAddr::V4(ROUTER_IP))
            .init(move || {
                services::serve_router(
                    SocketAddr::new(IpAddr::V4(ROUTER_IP), ROUTER_PORT),
                    SocketAddr::new(IpAddr::V4(ROUTER_IP), SUBSCRIBE_PORT),
                )
            })
            .build();
        backends.store = Some(store.id());
        backends.router = Some(router.id());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let servers: Vec<NodeId> = (0..opts.servers)
        .map(|i| {
            let backend = if cluster {
                Backend::Cluster
            } else {
                Backend::Embedded(Arc::clone(&disk))
            };
            let argv = server_args::server_argv(&opts, &server_addr(i).to_string(), cluster);
            let (clocks, recorder) = (Arc::clone(&clocks), Arc::clone(&recorder));
            handle
                .create_node()
                .name(format!("server-{i}"))
                .ip(server_addr(i).ip())
                .init(move || {
                    platform::supervise(
                        i as usize,
                        argv.clone(),
                        backend.clone(),
                        Arc::clone(&clocks),
                        Arc::clone(&recorder),
                    )
                })
                .build()
                .id()
        })
        .collect();
    backends.servers = servers;
    if !cluster {
        backends.disk = Some(Arc::clone(&disk));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let convs = conversations(&opts);
    let key = TokenKey::new(server_args::SECRET.as_bytes()).expect("secret");
    let exp = SystemClock.now_ms() / 1000 + 30 * 24 * 3600;
    let setup = handle
        .create_node()
        .name("setup")
        .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 200, 1)))
        .build();
    {
        let (convs, key, addrs) = (convs.clone(), key.clone(), Arc::clone(&addrs));
        setup
            .spawn(async move {
                for c in &convs {
                    let owner = format!("u{}", c.members[0]);
                    let others: Vec<String> =
                        c.members[1..].iter().map(|u| format!("u{u}")).collect();
                    let op = if c.id.starts_with("g:") {
                        Request::CreateGroup {
                            conv: &c.id,
                            members: &others,
                        }
                    } else {
                        Request::OpenDirect { peer: &others[0] }
                    };
                    let token = key.mint(&owner, exp);
                    let mut attempt = 0;
                    loop {
                        let server = addrs[attempt % addrs.len()];
                        attempt += 1;
                        // Any reply will do: an error means an earlier attempt made it.
                        if client::request_once(server, &token, "setup", &op)
                            .await
                            .is_some()
                        {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            })
            .await
            .expect("setup");
    }
    recorder.note("conversations created".into());

    let presence_judged = judges_presence(&opts);
    let mut devices = Vec::new();
    let mut progress = Vec::new();
    let mut index = 0;
    let device_count: u32 = opts.devices_per_user.iter().sum();
    let calm_every = device_count.div_ceil(CALM_SENDERS_MAX).max(1);
    for user in 0..opts.users {
        for device in 0..opts.devices_per_user[user as usize] {
            let spec = DeviceSpec {
                key: (user, device),
                token: key.mint(&format!("u{user}"), exp),
                convs: convs
                    .iter()
                    .filter(|c| c.members.contains(&user))
                    .map(|c| c.id.clone())
                    .collect(),
                contacts: convs
                    .iter()
                    .filter(|_| presence_judged)
                    .filter(|c| c.members.contains(&user))
                    .flat_map(|c| c.members.iter().copied())
                    .filter(|u| *u != user)
                    .collect::<BTreeSet<u32>>()
                    .into_iter()
                    .map(|u| format!("u{u}"))
                    .collect(),
                to_send: opts.messages[user as usize][device as usize],
                calm_to_send: if index % calm_every == 0 {
                    CALM_MESSAGES
                } else {
                    0
                },
                safety_secs: opts.safety_secs,
            };
            let p = Arc::new(Mutex::new(Progress::default()));
            progress.push(((user, device), Arc::clone(&p)));
            let node = handle
                .create_node()
                .name(format!("device-{user}-{device}"))
                .ip(device_ip(index))
                .build();
            backends.device_ips.insert((user, device), device_ip(index));
            index += 1;
            let run = client::DeviceRun {
                servers: Arc::clone(&addrs),
                recorder: Arc::clone(&recorder),
                directions: Arc::clone(&directions),
                progress: p,
                seed: opts.seed,
            };
            devices.push(node.spawn(client::run_device(spec, run)));
        }
    }
    // Membership changes, made over the protocol like any client would.
    let admin = {
        let (changes, convs) = (opts.member_changes.clone(), convs.clone());
        let admin = Admin {
            servers: Arc::clone(&addrs),
            recorder: Arc::clone(&recorder),
            directions: Arc::clone(&directions),
            key: key.clone(),
            exp,
        };
        let groups: Vec<String> = convs
            .iter()
            .filter(|c| c.id.starts_with("g:"))
            .map(|c| c.id.clone())
            .collect();
        setup.spawn(async move {
            for change in changes {
                let wait = change.at_ms.saturating_sub(sim_ms());
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let conv = &groups[change.group];
                let owner = convs
                    .iter()
                    .find(|c| c.id == *conv)
                    .map(|c| c.members[0])
                    .expect("group");
                admin.make_change(conv, owner, change).await;
            }
        })
    };

    // Safety phase: faults on.
    let injector = faults::Injector::new(
        &opts,
        backends,
        Arc::clone(&recorder),
        Arc::clone(&directions),
        Arc::clone(&clocks),
    );
    injector
        .run_for(Duration::from_secs(opts.safety_secs), &handle)
        .await;
    injector.heal(&handle);
    recorder.note("healed; liveness phase".into());
    directions.enter(Phase::Liveness);

    // Liveness phase: everything must converge by the deadline.
    let liveness = Duration::from_secs(opts.liveness_secs);
    let mut converged = converge(&recorder, &convs, &progress, liveness).await;
    if converged.is_ok() {
        // Calm: once no fault is near, a little healthy traffic, then time for what
        // it causes (deliveries, receipts) to arrive within their bounds.
        tokio::time::sleep(Duration::from_millis(
            crate::checker::FAULT_RECOVERY_GRACE_MS + 500,
        ))
        .await;
        recorder.note("calm traffic".into());
        directions.enter(Phase::Calm);
        tokio::time::sleep(Duration::from_millis(CALM_MS)).await;
        directions.enter(Phase::Settle);
        converged = converge(&recorder, &convs, &progress, liveness).await;
        tokio::time::sleep(Duration::from_millis(
            opts.latency_bound_ms + crate::checker::RECEIPT_GRACE_MS,
        ))
        .await;
        if converged.is_ok() && presence_judged {
            go_away(&recorder, &directions, &opts).await;
        }
    }
    directions.stop();
    let _ = tokio::time::timeout(Duration::from_secs(10), admin).await;
    for d in devices {
        let _ = tokio::time::timeout(Duration::from_secs(10), d).await;
    }
    let history = recorder.snapshot();
    Outcome {
        history,
        convs,
        converged: converged.is_ok(),
        liveness_detail: converged.err().unwrap_or_default(),
        sim_ms: sim_ms(),
    }
}

/// Most users a run may have for presence to be judged (every device watches its
/// contacts: in a 500-member group that is 250,000 subscriptions, too slow to
/// simulate in CI's time).
const PRESENCE_USERS_MAX: usize = 64;

/// Whether the run judges presence (devices watch their contacts, and a presence
/// phase ends it): in worlds of at most [`PRESENCE_USERS_MAX`] users, on one
/// server or several.
fn judges_presence(opts: &SimOptions) -> bool {
    opts.devices_per_user.len() <= PRESENCE_USERS_MAX
}

/// The presence phase: picks the users who go away (from the seed), lets their
/// devices disconnect for good, and waits out the idle timeout and the presence
/// bound while every other device stays connected; records it in the history.
async fn go_away(recorder: &Recorder, directions: &Directions, opts: &SimOptions) {
    let users = opts.devices_per_user.len() as u32;
    let mut rng = SeedRng::new(opts.seed, 8);
    let mut away: BTreeSet<u32> = (0..users)
        .filter(|_| rng.chance(1.0 / AWAY_ONE_IN as f64))
        .collect();
    if away.is_empty() && users > 1 {
        away.insert(rng.range(0, u64::from(users) - 1) as u32);
    }
    if away.len() as u32 == users {
        away.pop_last();
    }
    if away.is_empty() {
        return;
    }
    let start_ms = sim_ms();
    recorder.note(format!("presence phase: users {away:?} go away"));
    directions.send_away(away.clone());
    tokio::time::sleep(Duration::from_millis(
        IDLE_TIMEOUT_MS + crate::checker::PRESENCE_BOUND_MS + 1_000,
    ))
    .await;
    let end_ms = sim_ms();
    recorder.with(|h| {
        h.away = Some(crate::history::Away {
            users: away.into_iter().collect(),
            start_ms,
            end_ms,
        })
    });
}

/// The group owners and leavers making the planned membership changes.
struct Admin {
    servers: Arc<[SocketAddr]>,
    recorder: Arc<Recorder>,
    directions: Arc<Directions>,
    key: TokenKey,
    /// Expiry of the tokens it mints, Unix seconds.
    exp: u64,
}

impl Admin {
    /// Makes one planned membership change over the protocol, retrying through
    /// faults; records it once acknowledged.
    async fn make_change(&self, conv: &str, owner: u32, change: PlannedChange) {
        let Admin {
            servers,
            recorder,
            directions,
            key,
            exp,
        } = self;
        let user = [format!("u{}", change.user)];
        let (actor, op) = match change.kind {
            ChangeKind::Join => (owner, Request::AddMembers { conv, users: &user }),
            ChangeKind::Remove => (owner, Request::RemoveMembers { conv, users: &user }),
            ChangeKind::Leave => (change.user, Request::Leave { conv }),
        };
        let token = key.mint(&format!("u{actor}"), *exp);
        let mut attempt = 0;
        while directions.phase() == Phase::Safety {
            let server = servers[attempt % servers.len()];
            attempt += 1;
            match client::request_once(server, &token, "admin", &op).await {
                Some(Ok(result)) => {
                    let seq = result["seq"].as_u64().unwrap_or(0);
                    let action = match change.kind {
                        ChangeKind::Join => "add",
                        ChangeKind::Remove => "remove",
                        ChangeKind::Leave => "leave",
                    };
                    recorder.note(format!("{action} u{} in {conv} at seq {seq}", change.user));
                    recorder.with(|h| {
                        h.member_changes.push(MemberChange {
                            conv: conv.to_owned(),
                            seq,
                            action: action.to_owned(),
                            users: vec![change.user],
                        })
                    });
                    return;
                }
                // Made by an earlier attempt whose reply was lost: devices show its seq.
                Some(Err(e)) if e.code == "duplicate_member" || e.code == "not_member" => return,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// The first reason a device has not converged yet, if any.
/// Waits until every device has converged (`Err` with why not, after `within`).
async fn converge(
    recorder: &Recorder,
    convs: &[ConvSpec],
    progress: &[(DeviceKey, Arc<Mutex<Progress>>)],
    within: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let why = match lagging(recorder, convs, progress) {
            None => return Ok(()),
            Some(why) => why,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(why);
        }
    }
}

fn lagging(
    recorder: &Recorder,
    convs: &[ConvSpec],
    progress: &[(DeviceKey, Arc<Mutex<Progress>>)],
) -> Option<String> {
    recorder.with(|h| lagging_in(h, convs, progress))
}

fn lagging_in(
    h: &History,
    convs: &[ConvSpec],
    progress: &[(DeviceKey, Arc<Mutex<Progress>>)],
) -> Option<String> {
    let world = crate::checker::World {
        convs,
        devices_per_user: &[],
        latency_bound_ms: 0,
        retention_ms: None,
    };
    let ranges = crate::checker::visible_ranges(h, &world);
    for (device, p) in progress {
        let p = p.lock().expect("progress");
        if p.outstanding > 0 {
            return Some(format!(
                "device {device:?} still has {} unacknowledged sends",
                p.outstanding
            ));
        }
        for ((conv, user), (first, last)) in &ranges {
            if *user != device.0 {
                continue;
            }
            let top = h
                .acked
                .iter()
                .filter(|a| a.conv == *conv)
                .map(|a| a.seq)
                .chain(
                    h.member_changes
                        .iter()
                        .filter(|m| m.conv == *conv)
                        .map(|m| m.seq),
                )
                .max()
                .unwrap_or(1)
                .max(*first)
                .min(*last);
            let held = p.cursors.get(conv).copied().unwrap_or(0);
            if held < top {
                return Some(format!(
                    "device {device:?} holds {conv} up to {held}, acknowledged up to {top}"
                ));
            }
        }
    }
    None
}
