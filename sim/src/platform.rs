//! A simulated server starts as the binary does: its command line
//! ([`crate::server_args`]) is parsed into the binary's flags and handed to the server's own launch path
//! ([`chatproof_server::launch::serve_on`]), which asks [`SimPlatform`] for the
//! clock, the store, the registry and the rest instead of the host.
//!
//! What the platform gives under the simulator:
//! - the clock: the simulated wall clock with this server's skew and jumps;
//! - the embedded store: redb on the [`SimDisk`] that outlives crashes;
//! - the shared store and the registry: clients of the store and router nodes
//!   ([`crate::services`]), the stand-ins for Scylla and Redis;
//! - an incarnation drawn from the seed;
//! - no image store and the logging push sink (the workload uploads no images).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chatproof_server::clock::Clock;
use chatproof_server::config::ServeArgs;
use chatproof_server::launch::{self, LaunchError, Platform, RegistryLink};
use chatproof_server::limits::Limits;
use chatproof_server::store::embedded::{EmbeddedStore, Opener};
use chatproof_server::store::shared::SharedStore;
use chatproof_server::store::{Store, StoreError};

use crate::disk::SimDisk;
use crate::services::{self, SimRegistry, SimTables};
use crate::stage::{Recorder, ServerClocks};

/// The shared store's node address (several servers only).
pub const STORE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// The router's node address (several servers only).
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
/// How long a supervisor waits before starting a server that failed to start.
const RESTART_AFTER: Duration = Duration::from_millis(200);

/// What a server node stores to.
#[derive(Clone)]
pub enum Backend {
    /// One server: the embedded store on a simulated disk that outlives crashes.
    Embedded(Arc<SimDisk>),
    /// Several servers: the shared store on the store node, the router between servers.
    Cluster,
}

/// Server `index`, from its (re)start until its node is killed: parses `argv` and
/// launches it through the server's launch path. A start that fails (a faulty
/// disk, an unreachable store or router) is tried again after a pause, as a
/// supervisor restarting the process would.
pub async fn supervise(
    index: usize,
    argv: Vec<String>,
    backend: Backend,
    clocks: Arc<ServerClocks>,
    recorder: Arc<Recorder>,
) {
    let args = match crate::server_args::parse(&argv) {
        Ok(args) => args,
        Err(e) => panic!("the simulator's server command line {argv:?} is refused: {e}"),
    };
    let platform = SimPlatform {
        index,
        backend,
        clocks,
    };
    loop {
        match launch::serve_on(&platform, &args, |_| {}, std::future::pending()).await {
            Ok(()) => return,
            Err(e) => {
                recorder.note(format!("server {index} did not start ({e}); restarting"));
                tokio::time::sleep(RESTART_AFTER).await;
            }
        }
    }
}

/// The simulated world one server runs on.
struct SimPlatform {
    index: usize,
    backend: Backend,
    clocks: Arc<ServerClocks>,
}

/// Opens the embedded store's files on `disk` (again after an I/O error or a
/// restart): file 0 holds the tables, file 1 the journal.
fn disk_opener(disk: &Arc<SimDisk>) -> Opener {
    let (main, journal) = (Arc::clone(disk), Arc::clone(disk));
    Opener {
        main: Box::new(move || {
            redb::Builder::new()
                .create_with_backend(main.file(0))
                .map_err(|e| StoreError::Backend(format!("opening the simulated disk: {e}")))
        }),
        journal: Box::new(move || Ok(Box::new(journal.file(1)))),
    }
}

#[async_trait]
impl Platform for SimPlatform {
    fn clock(&self) -> Arc<dyn Clock> {
        Arc::new(self.clocks.start(self.index))
    }

    fn open_embedded(&self, _args: &ServeArgs) -> Result<EmbeddedStore, LaunchError> {
        let Backend::Embedded(disk) = &self.backend else {
            return Err(LaunchError::Config(
                "this simulated server has no disk".into(),
            ));
        };
        EmbeddedStore::with_opener(disk_opener(disk)).map_err(|e| LaunchError::Store {
            dir: "the simulated disk".into(),
            why: e.to_string(),
        })
    }

    async fn connect_shared_store(
        &self,
        _args: &ServeArgs,
        _limits: &Limits,
    ) -> Result<Arc<dyn Store>, LaunchError> {
        let tables =
            SimTables::connect(SocketAddr::new(IpAddr::V4(STORE_IP), services::STORE_PORT)).await;
        Ok(Arc::new(SharedStore::new(Arc::new(tables))))
    }

    async fn connect_registry(&self, _args: &ServeArgs) -> Result<RegistryLink, LaunchError> {
        let registry = SimRegistry::connect(
            SocketAddr::new(IpAddr::V4(ROUTER_IP), services::ROUTER_PORT),
            SocketAddr::new(IpAddr::V4(ROUTER_IP), services::SUBSCRIBE_PORT),
        )
        .await;
        Ok(RegistryLink {
            registry: Arc::new(registry),
            command_timeout: services::CALL_TIMEOUT,
            // Router calls time out after 1 s and are not retried.
            late_write_max: Duration::from_secs(3),
        })
    }

    fn incarnation(&self) -> String {
        format!("{:016x}", madsim::rand::random::<u64>())
    }
}
