//! `chatproof-server`: parses the command line, wires the services, serves until Ctrl-C.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use chatproof_server::config::{LogFormat, ServeArgs, StorageArgs};
use clap::{Parser, Subcommand};

/// chatproof reference chat server: ordered, durable delivery over WebSocket (protocol v1, see docs/PROTOCOL.md).
#[derive(Debug, Parser)]
#[command(
    name = "chatproof-server",
    version,
    after_help = "Output: `serve` writes its log to standard error (--log-format text or json; colour only on a terminal), prints nothing on standard output, and keeps its data under --data-dir (embedded backend); metrics and health are served over HTTP (/metrics, /healthz, /readyz). `token` prints the token on standard output."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve clients (embedded storage, or the cluster backends) until Ctrl-C or SIGTERM, then drain connections.
    Serve(Box<ServeArgs>),
    /// Print a bearer token for a user (for tests and load runs).
    Token {
        /// The user id the token asserts.
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
        #[command(flatten)]
        storage: StorageArgs,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            user,
            ttl_secs,
            storage,
        } => {
            chatproof_server::protocol::validate_user_id(&user).map_err(|e| anyhow!(e.message))?;
            let key = storage.token_key().map_err(|e| anyhow!(e))?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            println!("{}", key.mint(&user, now + ttl_secs));
            Ok(())
        }
        Command::Serve(args) => serve(*args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logs(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Installed before the server says it listens: a SIGTERM sent as soon as
        // it is ready must be a clean shutdown, not the default kill.
        let shutdown = shutdown_signal()?;
        chatproof_server::launch::serve(&args, |local| println!("listening on {local}"), shutdown)
            .await?;
        anyhow::Ok(())
    })
}

/// Installs the SIGINT and SIGTERM handlers now; the future resolves on either.
#[cfg(all(unix, not(madsim)))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Ctrl-C only where there are no Unix signals.
#[cfg(not(all(unix, not(madsim))))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
