//! `chatproof-sim`: the deterministic fault simulator (issue #3). Not built yet: this
//! binary only says so, so nobody mistakes it for a passing simulation.

fn main() {
    eprintln!(
        "chatproof-sim: the simulator is not implemented yet (issue #3); nothing was simulated"
    );
    std::process::exit(2);
}
