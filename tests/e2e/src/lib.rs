//! Helpers for end-to-end tests: build and start the real `chatproof-server`
//! binary as a child process on a loopback port, and stop it (politely or with SIGKILL).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// The secret every test server uses.
pub const SECRET: &str = "e2e-secret-0123456789abcdef";

/// Path of the server binary, built once per test run with the same profile as the tests.
pub fn server_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| build_binary("chatproof-server"))
        .clone()
}

/// Path of the load generator's binary, built once per test run like the server's.
pub fn loadgen_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| build_binary("chatproof-loadgen"))
        .clone()
}

/// Builds binary `name` of package `name` with the tests' profile; returns its path.
fn build_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/PROFILE/deps/test");
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "-p", name, "--bin", name]);
    if release {
        build.arg("--release");
    }
    let status = build.status().expect("running cargo build");
    assert!(status.success(), "building {name} failed");
    let binary = profile_dir.join(name);
    assert!(binary.exists(), "{} missing after build", binary.display());
    binary
}

/// A running server process.
pub struct ServerProcess {
    child: Child,
    /// `ws://ADDR/v1/ws`.
    pub url: String,
    /// `ADDR`.
    pub addr: String,
}

impl ServerProcess {
    /// Starts `chatproof-server serve` on 127.0.0.1:0 with `data_dir`, waiting until it listens.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> Self {
        let mut child = Command::new(server_binary())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--secret",
                SECRET,
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting chatproof-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the listen line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self {
            child,
            url: format!("ws://{addr}/v1/ws"),
            addr,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping");
    }

    /// SIGTERM and wait for a clean exit; returns its success.
    pub fn terminate(mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// A token for `user`, minted by `chatproof-server token`.
    pub fn token(user: &str) -> String {
        let out = Command::new(server_binary())
            .args(["token", "--user", user, "--secret", SECRET])
            .output()
            .expect("running chatproof-server token");
        assert!(
            out.status.success(),
            "token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8 token")
            .trim()
            .to_owned()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Holds what the tests' devices received to the delivery contract
/// (`docs/GUARANTEES.md`) under the contract's violation names; a test feeds it
/// and ends with [`DeliveryCheck::assert_clean`].
#[derive(Default)]
pub struct DeliveryCheck {
    tally: chatproof_contract::Tally,
}

impl DeliveryCheck {
    /// One device's entries of `conv` in arrival order, which should be exactly
    /// `1..=last_seq`: out of order is `reorder`, twice is `duplicate`, a hole
    /// below a received seq is `gap`, a missing tail is `lost`, and a seq past
    /// `last_seq` is `phantom`.
    pub fn device_stream(&mut self, device: &str, conv: &str, seqs: &[u64], last_seq: u64) {
        use chatproof_contract::{OrderCheck, Violation};
        let mut order = OrderCheck::default();
        for &seq in seqs {
            if seq > last_seq {
                self.tally.record(Violation::Phantom, || {
                    format!("{device} received {conv} seq {seq}, past its last seq {last_seq}")
                });
            } else if let Err(fault) = order.observe(conv, seq) {
                self.tally
                    .record(fault.violation, || fault.describe(device, conv, seq));
            }
        }
        let highest = seqs.iter().copied().max().unwrap_or(0);
        for seq in (1..=last_seq).filter(|s| !order.holds(conv, *s)) {
            let violation = if seq < highest {
                Violation::Gap
            } else {
                Violation::Lost
            };
            self.tally.record(violation, || {
                format!("{device} never received {conv} seq {seq} of 1..={last_seq}")
            });
        }
    }

    /// A message acknowledged as `id` at `seq` of `conv`; `shown` is the message
    /// id `device` holds at that seq: none is `lost`, another is `conflict`.
    pub fn acknowledged(
        &mut self,
        device: &str,
        conv: &str,
        id: &str,
        seq: u64,
        shown: Option<&str>,
    ) {
        use chatproof_contract::Violation;
        match shown {
            Some(shown) if shown == id => {}
            Some(shown) => self.tally.record(Violation::Conflict, || {
                format!("{conv}: {id} was acknowledged at seq {seq}, {device} holds {shown} there")
            }),
            None => self.tally.record(Violation::Lost, || {
                format!("{conv}: acknowledged {id} at seq {seq} never reached {device}")
            }),
        }
    }

    /// Every `(seq, message_id)` stored in `conv`: one id under two seqs is `duplicate`.
    pub fn stored_once<'a>(
        &mut self,
        conv: &str,
        entries: impl IntoIterator<Item = (u64, &'a str)>,
    ) {
        let mut seen = std::collections::BTreeMap::new();
        for (seq, id) in entries {
            if let Some(first) = seen.insert(id, seq) {
                self.tally
                    .record(chatproof_contract::Violation::Duplicate, || {
                        format!("{conv}: {id} stored at seq {first} and seq {seq}")
                    });
            }
        }
    }

    /// Everything fed so far, counted.
    pub fn tally(&self) -> &chatproof_contract::Tally {
        &self.tally
    }

    /// Fails the test with every count and example unless nothing was violated.
    #[track_caller]
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.tally.is_clean(),
            "{what}: delivery contract violated: {}\n{}",
            self.tally.line(),
            self.tally.examples().join("\n")
        );
    }
}
