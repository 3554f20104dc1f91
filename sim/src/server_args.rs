//! The command line a simulated server starts with: the binary's `serve` flags,
//! with the simulator's timings and the preset's limits, parsed by the binary's
//! own parser ([`parse`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use chatproof_server::config::ServeArgs;
use clap::Parser;

use crate::options::SimOptions;

/// Chat port of every simulated server.
pub const CHAT_PORT: u16 = 8080;
/// The token secret every simulated server shares.
pub const SECRET: &str = "chatproof-sim-secret-0123";
/// How long a silent server stays routable, seconds (the router's calls time out
/// after 1 s, so it may be shorter than production's least of 3 s).
const REGISTRY_TTL_SECS: f64 = 1.5;
/// How often a server with a short retention sweeps expired entries, seconds.
const RETENTION_SWEEP_SECS: u64 = 1;

/// The command line of server `server_id` of a run with `opts` (`cluster`: over
/// the shared store and the router): the binary's flags, with the simulator's
/// timings and the preset's limits.
pub fn server_argv(opts: &SimOptions, server_id: &str, cluster: bool) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "chatproof-server".into(),
        "--listen".into(),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), CHAT_PORT).to_string(),
        "--secret".into(),
        SECRET.into(),
        "--idle-timeout-secs".into(),
        (crate::checker::IDLE_TIMEOUT_MS / 1_000).to_string(),
        "--presence-interval-ms".into(),
        crate::checker::PRESENCE_INTERVAL_MS.to_string(),
    ];
    if cluster {
        argv.extend([
            "--backend".into(),
            "cluster".into(),
            "--server-id".into(),
            server_id.into(),
            "--registry-ttl-secs".into(),
            REGISTRY_TTL_SECS.to_string(),
        ]);
    } else {
        argv.extend(["--backend".into(), "embedded".into()]);
    }
    if let Some(secs) = opts.retention_secs {
        argv.extend([
            "--retention-secs".into(),
            secs.to_string(),
            "--expiry-sweep-secs".into(),
            RETENTION_SWEEP_SECS.to_string(),
        ]);
    }
    if let Some(n) = opts.limits.page_len_max {
        argv.extend(["--page-max-entries".into(), n.to_string()]);
    }
    if let Some(n) = opts.limits.device_queue_len_max {
        argv.extend(["--device-queue-max-events".into(), n.to_string()]);
    }
    argv
}

/// The binary's `serve` flags, parsed as the binary parses them.
#[derive(Parser)]
struct ServeCommand {
    #[command(flatten)]
    args: ServeArgs,
}

/// Parses `argv` as `chatproof-server serve` does.
pub fn parse(argv: &[String]) -> Result<ServeArgs, clap::Error> {
    ServeCommand::try_parse_from(argv).map(|command| command.args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every preset's server command line is one the binary accepts, and gives the
    /// limits the preset asks for.
    #[test]
    fn every_presets_command_line_parses_to_its_limits() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/sim");
        let mut checked = 0;
        for file in std::fs::read_dir(&dir).expect("scenarios/sim") {
            let path = file.expect("entry").path();
            let preset = crate::options::Preset::load(&path).expect("preset");
            for seed in 1..4 {
                let opts = SimOptions::derive(seed, &preset);
                let argv = server_argv(&opts, "10.0.0.1:8080", opts.servers > 1);
                let args = parse(&argv).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let limits = args.limits().expect("limits");
                let name = path.display();
                assert_eq!(
                    limits.idle_timeout,
                    Duration::from_millis(crate::checker::IDLE_TIMEOUT_MS),
                    "{name}"
                );
                if let Some(n) = opts.limits.page_len_max {
                    assert_eq!(limits.page_len_max, n, "{name}");
                }
                if let Some(n) = opts.limits.device_queue_len_max {
                    assert_eq!(limits.device_queue_len_max, n, "{name}");
                }
                if let Some(secs) = opts.retention_secs {
                    assert_eq!(limits.retention, Duration::from_secs(secs), "{name}");
                }
                if opts.servers > 1 {
                    assert_eq!(args.cluster.registry_ttl_secs, REGISTRY_TTL_SECS);
                }
                checked += 1;
            }
        }
        assert!(checked >= 30, "{checked} command lines checked");
    }
}
