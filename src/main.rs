//! The `snapguard` binary: arguments -> config -> tracing -> server, and the offline subcommands.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use snapguard::config::{Config, LogConfig, LogFormat, UpstreamUrl};
use snapguard::server::Handle;
use snapguard::{check, server, Server};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// EX_USAGE from sysexits.h: the configuration (or the command line) is wrong.
const EXIT_CONFIG: u8 = 64;

/// A reverse proxy that polices snapshot naming in front of a Cinder v3 / EVS API.
#[derive(Debug, Clone, Parser)]
#[command(name = "snapguard", version, about)]
struct Cli {
    /// TOML config file; without one, built-in defaults are used.
    #[arg(long, global = true, env = "SNAPGUARD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address for proxied traffic [default: 127.0.0.1:8080].
    #[arg(long, env = "SNAPGUARD_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Upstream base URL [default: http://127.0.0.1:8776].
    #[arg(long, env = "SNAPGUARD_UPSTREAM", value_name = "URL")]
    upstream: Option<UpstreamUrl>,
    /// Address of the admin endpoints /healthz and /readyz [default: 127.0.0.1:9901].
    #[arg(long, env = "SNAPGUARD_ADMIN", value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Log format [default: text].
    #[arg(long, env = "SNAPGUARD_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Worker threads serving traffic; 0 means one per CPU [default: 0].
    #[arg(long, env = "SNAPGUARD_THREADS", value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// How `snapguard check` prints its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CheckFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// Validate a config file: exit 0 when valid, 64 with the reason when not.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Decide on one request offline, body on stdin: exit 0 if it would be forwarded, 1 if refused.
    Check {
        /// The request method, e.g. PUT.
        #[arg(required_unless_present = "batch")]
        method: Option<String>,
        /// The request path, e.g. /v3/p1/snapshots/s1.
        #[arg(required_unless_present = "batch")]
        path: Option<String>,
        /// A request header, `Name: value`; may be repeated.
        #[arg(short = 'H', long = "header", value_name = "HEADER")]
        headers: Vec<String>,
        /// Output: a labelled report, or one JSON object (decision, route, rule, field, status,
        /// body).
        #[arg(long, value_enum, default_value = "text")]
        format: CheckFormat,
        /// Decide on many requests: one JSON object per stdin line ({"method", "target",
        /// "headers": [[name, value]...], "body"}), one JSON verdict per stdout line; exit 0.
        #[arg(long, conflicts_with_all = ["method", "path", "headers", "format"])]
        batch: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print to stdout and succeed; every other parse error is a usage
        // error, reported like a bad config file.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Some(Command::CheckConfig { ref file }) => match Config::load(file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Some(Command::Check { batch: true, .. }) => run_batch(&cli),
        Some(Command::Check {
            method: Some(ref method),
            path: Some(ref path),
            ref headers,
            format,
            ..
        }) => run_check(&cli, method, path, headers, format),
        // clap requires both unless --batch.
        Some(Command::Check { .. }) => config_error(&"check needs METHOD and PATH"),
        None => run_proxy(&cli),
    }
}

fn config_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("snapguard: {e}");
    ExitCode::from(EXIT_CONFIG)
}

/// The config file (or the defaults), with command-line overrides applied.
fn load(cli: &Cli) -> Result<Config, snapguard::config::ConfigError> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(admin) = cli.admin {
        config.admin = admin;
    }
    if let Some(upstream) = &cli.upstream {
        config.upstream.url = upstream.clone();
    }
    if let Some(format) = cli.log_format {
        config.log.format = format;
    }
    if let Some(threads) = cli.threads {
        config.workers = threads;
    }
    config.validate()?;
    Ok(config)
}

fn run_proxy(cli: &Cli) -> ExitCode {
    let config = match load(cli) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    let filter = init_tracing(&config.log);
    // One worker per CPU unless told otherwise: a sidecar usually wants 1, a gateway all it has.
    // One worker means the current-thread scheduler, which serves on the main thread and skips
    // the work-stealing machinery that a single worker cannot use. Reloads cannot change it.
    let mut builder = match config.workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                builder.worker_threads(n);
            }
            builder
        }
    };
    let runtime = match builder.thread_name("snapguard-worker").enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("snapguard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let server = match Server::bind(config).await {
            Ok(server) => server,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let reloads = tokio::spawn(reload_on_sighup(cli.clone(), server.handle(), filter));
        server.run(server::shutdown_signal()).await;
        reloads.abort();
        ExitCode::SUCCESS
    })
}

type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// Sets up logging: the level from `RUST_LOG` if set, else from the config (and its reloads).
fn init_tracing(log: &LogConfig) -> FilterHandle {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only for a person at a terminal, never in files or collectors.
    let ansi = std::io::stderr().is_terminal();
    let (text, json) = match log.format {
        LogFormat::Text => (
            Some(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    handle
}

/// Reloads the config file on every SIGHUP: routes, policy, limits, timeouts, log level.
async fn reload_on_sighup(cli: Cli, handle: Handle, filter: FilterHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading is off");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!(file = ?cli.config, "SIGHUP: reloading the config");
        let loaded = load(&cli);
        let level = loaded.as_ref().ok().map(|c| c.log.level.clone());
        if handle.reload(loaded).is_ok() && std::env::var_os("RUST_LOG").is_none() {
            if let Some(level) = level {
                if let Err(e) = filter.reload(EnvFilter::new(level)) {
                    tracing::warn!(error = %e, "could not apply the new log level");
                }
            }
        }
    }
}

fn run_batch(cli: &Cli) -> ExitCode {
    let config = match load(cli) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    let stdout = std::io::stdout().lock();
    match check::batch(
        &config,
        std::io::stdin().lock(),
        std::io::BufWriter::new(stdout),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => config_error(&e),
    }
}

fn run_check(
    cli: &Cli,
    method: &str,
    path: &str,
    header_args: &[String],
    format: CheckFormat,
) -> ExitCode {
    let config = match load(cli) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    let Ok(method) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
        return config_error(&format!("{method:?} is not an HTTP method"));
    };
    let Ok(target) = path.parse::<http::Uri>() else {
        return config_error(&format!("{path:?} is not a request target"));
    };
    let mut headers = HeaderMap::new();
    for arg in header_args {
        let parsed = arg.split_once(':').and_then(|(name, value)| {
            Some((
                HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                HeaderValue::from_str(value.trim()).ok()?,
            ))
        });
        match parsed {
            Some((name, value)) => {
                headers.append(name, value);
            }
            None => return config_error(&format!("{arg:?} is not a `Name: value` header")),
        }
    }
    // One byte over the limit is enough to know the body is too large.
    let mut body = Vec::new();
    let limit = config.policy.max_body_bytes as u64 + 1;
    if let Err(e) = std::io::stdin().lock().take(limit).read_to_end(&mut body) {
        eprintln!("snapguard: cannot read the body from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let report = check::evaluate(&config, &method, &headers, &target, &body);
    match format {
        CheckFormat::Text => print!("{}", report.render(&config)),
        CheckFormat::Json => println!("{}", report.to_json(&config)),
    }
    if report.allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
