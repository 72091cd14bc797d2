//! The `snapguard` binary: arguments -> config -> tracing -> server, and the offline subcommands.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use snapguard::cli::{CheckFormat, Cli, Command, EXIT_IO, EXIT_USAGE};
use snapguard::config::{Config, LogConfig, LogFormat};
use snapguard::server::Handle;
use snapguard::{check, server, Server};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print to stdout and succeed; every other parse error is a usage
        // error, reported like a bad config file.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Some(Command::CheckConfig { ref file }) => {
            match Config::load(file).and_then(|config| config.check_files()) {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(&e),
            }
        }
        // `check --config F` and `snapguard --config F check`: the nearer one wins.
        Some(Command::Check {
            batch: true,
            ref config,
            ..
        }) => run_batch(&cli, config.as_ref().or(cli.config.as_ref())),
        Some(Command::Check {
            method: Some(ref method),
            path: Some(ref path),
            ref headers,
            format,
            ref config,
            ..
        }) => run_check(
            &cli,
            config.as_ref().or(cli.config.as_ref()),
            method,
            path,
            headers,
            format,
        ),
        // clap requires both unless --batch.
        Some(Command::Check { .. }) => config_error(&"check needs METHOD and PATH"),
        None => run_proxy(&cli),
    }
}

fn config_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("snapguard: {e}");
    ExitCode::from(EXIT_USAGE)
}

/// The config file (or the defaults), with command-line overrides applied.
/// The config of `file` (or the built-in defaults) with the command line's flags applied, then
/// validated.
fn load(cli: &Cli, file: Option<&PathBuf>) -> Result<Config, snapguard::config::ConfigError> {
    match file {
        Some(path) => Config::load_with(path, |config| apply_flags(cli, config)),
        None => {
            let mut config = Config::default();
            apply_flags(cli, &mut config);
            config.validate()?;
            Ok(config)
        }
    }
}

fn apply_flags(cli: &Cli, config: &mut Config) {
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
}

fn run_proxy(cli: &Cli) -> ExitCode {
    // A certificate or key that does not load is a config error too (exit 64), not a crash.
    let config = match load(cli, cli.config.as_ref()).and_then(|c| c.check_files().map(|()| c)) {
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
        let reloads = tokio::spawn(reload_on_sighup(
            cli.clone(),
            server.handle(),
            filter.clone(),
        ));
        let watch = tokio::spawn(reload_on_change(cli.clone(), server.handle(), filter));
        server.run(server::shutdown_signal()).await;
        reloads.abort();
        watch.abort();
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
    // The defaults and flags alone are reloaded too, when there is no file.
    let file = cli
        .config
        .as_ref()
        .map_or_else(|| "-".to_owned(), |path| path.display().to_string());
    while hangups.recv().await.is_some() {
        tracing::info!(file = %file, "SIGHUP: reloading the config");
        reload(&cli, &handle, &filter).await;
    }
}

/// Reloads the config file whenever its contents change, seen by a watch on its directory and
/// checked every `reload_interval` as well: Kubernetes updates a mounted ConfigMap by swapping a
/// `..data` symlink, and sends no signal.
async fn reload_on_change(cli: Cli, handle: Handle, filter: FilterHandle) {
    let Some(path) = cli.config.clone() else {
        return;
    };
    let changes = snapguard::watch::Changes::watch("config", [path.as_path()]);
    let read = |path: PathBuf| async move {
        tokio::task::spawn_blocking(move || std::fs::read(path).ok())
            .await
            .ok()
            .flatten()
    };
    let mut last = read(path.clone()).await;
    loop {
        let every = handle.runtime().config.reload_interval;
        if every.is_zero() {
            return;
        }
        changes.next(every).await;
        let now = read(path.clone()).await;
        // A file that vanished for a moment (mid-swap) is not a change to act on.
        if now.is_some() && now != last {
            tracing::info!(file = %path.display(), "config file changed: reloading");
            reload(&cli, &handle, &filter).await;
            last = now;
        }
    }
}

/// Reloads the config (read and built off the runtime: with one worker, traffic would wait
/// for it), and the log level with it unless `RUST_LOG` rules.
async fn reload(cli: &Cli, handle: &Handle, filter: &FilterHandle) {
    let cli = cli.clone();
    let reloaded = handle.reload_with(move || load(&cli, cli.config.as_ref()));
    if let Ok(runtime) = reloaded.await {
        if std::env::var_os("RUST_LOG").is_none() {
            if let Err(e) = filter.reload(EnvFilter::new(&runtime.config.log.level)) {
                tracing::warn!(error = %e, "could not apply the new log level");
            }
        }
    }
}

fn run_batch(cli: &Cli, file: Option<&PathBuf>) -> ExitCode {
    let config = match load(cli, file) {
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

/// `snapguard check`: the body on stdout and the labelled report on stderr (or one JSON
/// verdict on stdout); exit 0 when forwarded, 1 when refused.
fn run_check(
    cli: &Cli,
    file: Option<&PathBuf>,
    method: &str,
    path: &str,
    header_args: &[String],
    format: CheckFormat,
) -> ExitCode {
    let config = match load(cli, file) {
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
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("snapguard: reading the request body from stdin (end it with Ctrl-D)");
    }
    // One byte over the limit is enough to know the body is too large.
    let mut body = Vec::new();
    let limit = config.policy.max_body_bytes as u64 + 1;
    if let Err(e) = stdin.lock().take(limit).read_to_end(&mut body) {
        eprintln!("snapguard: cannot read the body from stdin: {e}");
        return ExitCode::from(EXIT_IO);
    }
    let report = check::evaluate(&config, &method, &headers, &target, &body);
    let written = match format {
        CheckFormat::Text => {
            // The report first, so that a terminal shows it above the body.
            eprint!("{}", report.render(&config));
            let mut out = report.body(&config);
            if std::io::stdout().is_terminal() && !out.ends_with(b"\n") {
                out.push(b'\n');
            }
            write_stdout(&out)
        }
        CheckFormat::Json => write_stdout(format!("{}\n", report.to_json(&config)).as_bytes()),
    };
    if let Err(e) = written {
        eprintln!("snapguard: cannot write to stdout: {e}");
        return ExitCode::from(EXIT_IO);
    }
    if report.allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()
}
