//! The server the generator starts when no `--target` is given: this same executable,
//! re-run in a child process (`serve-reference` or `serve-floor`) on a free loopback
//! port, the reference server with a temporary data directory.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

/// Which server the generator starts itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalKind {
    /// The reference server on embedded storage (durable: acks after fsync).
    Reference,
    /// The protocol floor (`floor.rs`): in memory, the least a server of the protocol does.
    Floor,
}

impl LocalKind {
    /// How reports name it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Reference => "reference server (embedded storage)",
            Self::Floor => "protocol floor (in memory)",
        }
    }
}

/// A server child process; killed (and its data removed) on drop.
pub struct LocalServer {
    child: Child,
    _data: Option<tempfile::TempDir>,
    /// What it is.
    pub kind: LocalKind,
    /// `HOST:PORT`.
    pub addr: String,
}

impl LocalServer {
    /// Starts the child and waits until it listens.
    pub fn start(kind: LocalKind, secret: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut command = Command::new(exe);
        let data = match kind {
            LocalKind::Reference => {
                let data = tempfile::tempdir().context("creating a temporary data directory")?;
                command
                    .args([
                        "serve-reference",
                        "--listen",
                        "127.0.0.1:0",
                        "--log-format",
                        "text",
                        "--data-dir",
                    ])
                    .arg(data.path());
                Some(data)
            }
            LocalKind::Floor => {
                command.args(["serve-floor", "--listen", "127.0.0.1:0"]);
                None
            }
        };
        let mut child = command
            .env("CHATPROOF_SECRET", secret)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {}", kind.label()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the server's address")?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("the {} did not start (it printed {line:?})", kind.label());
        };
        Ok(Self {
            addr: addr.to_owned(),
            child,
            kind,
            _data: data,
        })
    }
}

/// CPU time and memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ProcUsage {
    /// User + system CPU time so far, seconds.
    pub cpu_secs: f64,
    /// Resident memory now, KiB.
    pub rss_kib: u64,
    /// Peak resident memory, KiB.
    pub rss_peak_kib: u64,
    /// Processes these figures add up (1 for one process).
    #[serde(default)]
    pub processes: u32,
    /// Anonymous resident memory now (heap, stacks: `RssAnon`), KiB; 0 when unknown.
    /// What connections cost is measured on it: `rss_kib` also counts the program's
    /// code, paged in once by the first connections and shared by all.
    #[serde(default)]
    pub anon_kib: u64,
}

/// Resident memory grown from `before` to `after`, KiB: the anonymous memory when
/// both have it, else all resident memory.
pub fn grown_kib(
    (rss_before, anon_before): (u64, u64),
    (rss_after, anon_after): (u64, u64),
) -> u64 {
    if anon_before > 0 && anon_after > 0 {
        anon_after.saturating_sub(anon_before)
    } else {
        rss_after.saturating_sub(rss_before)
    }
}

impl ProcUsage {
    /// Reads the usage of process `pid` (Linux).
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may contain spaces) start after ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| -> Option<u64> {
            status
                .lines()
                .find(|l| l.starts_with(key))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        // The kernel reports CPU time in clock ticks of 1/100 s on Linux.
        Some(Self {
            cpu_secs: ticks / 100.0,
            rss_kib: kib("VmRSS:")?,
            rss_peak_kib: kib("VmHWM:")?,
            processes: 1,
            anon_kib: kib("RssAnon:").unwrap_or(0),
        })
    }

    /// The summed usage of `pids`; `None` when any of them cannot be read (a server
    /// that exited mid-run has no meaningful figures).
    pub fn of_all(pids: &[u32]) -> Option<Self> {
        if pids.is_empty() {
            return None;
        }
        pids.iter().try_fold(Self::default(), |sum, &pid| {
            let one = Self::of(pid)?;
            Some(Self {
                cpu_secs: sum.cpu_secs + one.cpu_secs,
                rss_kib: sum.rss_kib + one.rss_kib,
                rss_peak_kib: sum.rss_peak_kib + one.rss_peak_kib,
                processes: sum.processes + 1,
                anon_kib: sum.anon_kib + one.anon_kib,
            })
        })
    }
}

impl LocalServer {
    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve-reference`: serves the reference server in this process until Ctrl-C (what
/// [`LocalServer::start`] runs in its child); returns the exit status.
pub fn serve_reference(args: &chatproof_server::config::ServeArgs) -> i32 {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(chatproof_server::launch::serve_embedded(
        args,
        |addr| println!("listening on {addr}"),
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    ));
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("reference server: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Usage of several processes adds up; an unreadable one spoils the sum.
    #[test]
    fn usage_of_several_processes_is_summed() {
        let me = std::process::id();
        let one = ProcUsage::of(me).expect("own /proc entry");
        assert_eq!(one.processes, 1);
        assert!(one.rss_kib > 0 && one.rss_peak_kib >= one.rss_kib);
        assert!(one.anon_kib > 0 && one.anon_kib <= one.rss_kib);
        let two = ProcUsage::of_all(&[me, me]).expect("own /proc entry twice");
        assert_eq!(two.processes, 2);
        assert!(two.rss_peak_kib >= 2 * one.rss_peak_kib);
        assert!(two.cpu_secs >= 2.0 * one.cpu_secs);
        assert_eq!(ProcUsage::of_all(&[]), None);
        // Linux pids stay below 2^22, so this one cannot exist.
        assert_eq!(ProcUsage::of_all(&[me, u32::MAX]), None);
    }
}
