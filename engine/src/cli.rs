//! The `ringcast` command line: `serve` and `token`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;

/// ringcast: a real-time delivery engine (WebSocket, SSE, long-poll).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (with no configuration: 127.0.0.1:8080 and development credentials).
    Serve(ServeArgs),
    /// Print a JWT signed with the configured HS256 secret.
    Token(TokenArgs),
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file (also RINGCAST_CONFIG).
    #[arg(long, env = "RINGCAST_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Listen address, e.g. 0.0.0.0:8080 (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Number of shards (0 = one per CPU).
    #[arg(long)]
    shards: Option<usize>,
    /// Log format: human or json.
    #[arg(long)]
    log_format: Option<String>,
    /// Enable the diagnostic /v1/echo endpoint (for Autobahn runs).
    #[arg(long)]
    echo: bool,
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Customer id (the `sub` claim).
    #[arg(long)]
    sub: String,
    /// Roles, comma-separated.
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Topic patterns the customer may subscribe to, comma-separated (`*` is a wildcard).
    #[arg(long, value_delimiter = ',')]
    channels: Vec<String>,
    /// Topic patterns the customer may publish to from its connection.
    #[arg(long, value_delimiter = ',')]
    publish: Vec<String>,
    /// Customer-id patterns the customer may send direct messages to.
    #[arg(long, value_delimiter = ',')]
    message: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

/// Runs the command line; the binary's `main` is just this.
pub fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringcast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
    Config::load(args.config.as_deref(), std::env::vars())
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Token(args) => {
            let config = load(&args.config)?;
            anyhow::ensure!(config.auth.jwt_algorithm == crate::config::JwtAlgorithm::Hs256, "ringcast token signs with the HS256 secret; RS256 tokens come from your identity provider");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
            let claims = proto::auth::Claims {
                sub: args.sub,
                exp: now + args.ttl,
                iat: Some(now),
                iss: opt(&config.auth.issuer),
                aud: opt(&config.auth.audience).map(proto::auth::Audience::One),
                roles: args.roles,
                channels: args.channels,
                publish: args.publish,
                message: args.message,
                nbf: None,
            };
            println!(
                "{}",
                proto::auth::mint_hs256(&claims, config.jwt_secret().as_bytes())
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_logs(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if config.log.format == crate::config::LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = load(&args.config)?;
    if let Some(l) = args.listen {
        config.server.listen = l;
    }
    if let Some(s) = args.shards {
        config.server.shards = s;
    }
    if let Some(f) = args.log_format {
        config.log.format = f.parse()?;
    }
    if args.echo {
        config.diagnostics.echo = true;
    }
    config.validate()?;
    init_logs(&config);
    match crate::io::raise_nofile_limit() {
        Ok(n) => tracing::info!(
            open_files = n,
            connection_capacity = n.saturating_sub(64),
            "raised RLIMIT_NOFILE to its hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "could not raise RLIMIT_NOFILE"),
    }
    if let Ok(memlock) = crate::io::memlock_limit() {
        if memlock < 512 * 1024 {
            tracing::warn!(memlock, "RLIMIT_MEMLOCK is below 512 KiB; io_uring set-up may fail (see docs/operations.md)");
        }
    }
    if config.uses_dev_credentials() {
        tracing::warn!("!!! DEVELOPMENT CREDENTIALS IN USE: the JWT secret and/or API key are the public development defaults. Set RINGCAST_JWT_SECRET and RINGCAST_API_KEY before exposing this server. !!!");
    }
    if config.auth.metrics_key.is_empty()
        && config.listen_addr().is_ok_and(|a| !a.ip().is_loopback())
    {
        tracing::warn!("/metrics and /v1/stats are readable by anyone who reaches the listener; set auth.metrics_key (RINGCAST_AUTH_METRICS_KEY) or keep them from the public");
    }
    if config.diagnostics.echo {
        tracing::warn!("diagnostic /v1/echo endpoint is enabled (unauthenticated)");
    }
    let drain_timeout =
        Duration::from_secs(config.server.drain_timeout_secs + config.server.drain_grace_secs);
    let server = crate::shard::start(config).context("starting shards")?;
    tracing::info!(
        shards = server.shared.n_shards,
        "ringcast listening on http://{}",
        server.shared.listen
    );
    let shared = server.shared.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(
                signal = sig,
                "draining: /readyz is 503, listeners closing, connections get 1001"
            );
            shared
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            // The shards bound their own drain; this is the backstop.
            std::thread::sleep(drain_timeout + Duration::from_secs(3));
            tracing::error!("drain did not finish in time; exiting");
            std::process::exit(1);
        }
    });
    server.join();
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
