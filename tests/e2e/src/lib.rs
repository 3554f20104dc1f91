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
