//! `chatproof-loadgen`: the load generator (issue #4). Not built yet: this binary
//! only says so, so nobody mistakes it for a passing load run.

fn main() {
    eprintln!(
        "chatproof-loadgen: the load generator is not implemented yet (issue #4); nothing was run"
    );
    std::process::exit(2);
}
