//! `chatproof-sim`: runs the real chat server under madsim with seeded workloads and
//! faults, and checks the delivery contract. Build with `RUSTFLAGS="--cfg madsim"`
//! into its own target directory (`scripts/sim.sh` does both).
//!
//! Exit status ([`exit::Exit`]): 0 all seeds passed; 1 a correctness violation; 2 a
//! liveness failure (no convergence by the deadline); 3 a crash (panic); 4 usage error;
//! 5 a mutant escaped; 6 a seed was not deterministic.

// Outside simulation builds only the pure modules compile (for their unit tests).
#![cfg_attr(not(madsim), allow(dead_code))]

mod checker;
#[cfg(madsim)]
mod client;
#[cfg(madsim)]
mod cluster;
mod disk;
mod exit;
#[cfg(madsim)]
mod faults;
mod history;
mod options;
#[cfg(madsim)]
mod platform;
#[cfg(madsim)]
mod runner;
mod server_args;
#[cfg(madsim)]
mod services;
#[cfg(madsim)]
mod stage;
mod swimlanes;

#[cfg(not(madsim))]
fn main() {
    eprintln!("chatproof-sim runs only in a simulation build: use scripts/sim.sh (RUSTFLAGS=\"--cfg madsim\", own target dir)");
    std::process::exit(exit::Exit::Usage.code());
}

#[cfg(madsim)]
fn main() {
    std::process::exit(runner::main().code());
}
