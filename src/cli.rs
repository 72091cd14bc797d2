//! The command line: every flag, subcommand and help text of the `snapguard` binary.
//!
//! Kept in the library, not in `main.rs`, so that the man page and the shell completions in
//! `docs/` are generated from these very definitions (`tests/docs.rs` fails when they drift).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, UpstreamUrl};

/// EX_USAGE from sysexits.h: the configuration or the command line is wrong.
pub const EXIT_USAGE: u8 = 64;
/// EX_IOERR from sysexits.h: `check` could not read its standard input or write its output.
pub const EXIT_IO: u8 = 74;

const ABOUT: &str =
    "A reverse proxy that polices snapshot naming in front of a Cinder v3 / EVS API.";

const LONG_ABOUT: &str = "\
A reverse proxy that polices snapshot naming in front of a Cinder v3 / EVS API.

Without a subcommand, snapguard runs the proxy: traffic on --listen is forwarded to --upstream,
snapshot names and descriptions on the policed routes are checked on the way, and the admin
endpoints /healthz, /readyz and /metrics answer on --admin. SIGTERM or SIGINT drains and exits 0;
SIGHUP reloads the config file.

Flags override the config file; each also reads the environment variable shown. A bad config
file or command line exits with 64 and names the wrong key, with its line and column.";

/// The whole command line.
#[derive(Debug, Clone, Parser)]
#[command(name = "snapguard", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// TOML config file; without one, built-in defaults are used. `check` takes it too, before
    /// or after the subcommand.
    #[arg(
        long,
        env = "SNAPGUARD_CONFIG",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Address for proxied traffic [default: 127.0.0.1:8080].
    #[arg(
        long,
        env = "SNAPGUARD_LISTEN",
        hide_env_values = true,
        value_name = "ADDR",
        value_parser = crate::config::parse_listen_addr
    )]
    pub listen: Option<std::net::SocketAddr>,
    /// Upstream base URL, http:// or https:// [default: http://127.0.0.1:8776].
    #[arg(
        long,
        env = "SNAPGUARD_UPSTREAM",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub upstream: Option<UpstreamUrl>,
    /// Address of the admin endpoints /healthz, /readyz and /metrics [default: 127.0.0.1:9901].
    #[arg(
        long,
        env = "SNAPGUARD_ADMIN",
        hide_env_values = true,
        value_name = "ADDR",
        value_parser = crate::config::parse_listen_addr
    )]
    pub admin: Option<std::net::SocketAddr>,
    /// Log format: text, or one JSON object a line [default: text].
    #[arg(long, env = "SNAPGUARD_LOG_FORMAT", hide_env_values = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Worker threads serving traffic; 0 means one per CPU [default: 0].
    #[arg(
        long,
        env = "SNAPGUARD_THREADS",
        hide_env_values = true,
        value_name = "N"
    )]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// How `snapguard check` prints its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckFormat {
    /// The forwarded or error body on stdout, a labelled report on stderr.
    Text,
    /// One JSON verdict on stdout: decision, route, rule, field, status, body.
    Json,
}

const CHECK_ABOUT: &str = "Decide on one request offline, body on stdin: exit 0 if it would be \
                           forwarded, 1 if refused";

// Paragraphs, not indented lists: the man page (docs/snapguard-check.1) refills lines.
const CHECK_LONG_ABOUT: &str = "\
Decide on one request offline, as the proxy would (through the same function), the request body
read from stdin. The body is taken as JSON: the request is decided as if sent with no
Content-Type, which snapguard reads as JSON; give -H 'Content-Type: ...' to decide on another.

stdout (--format text, the default): the body the upstream would receive, byte for byte, or when
the request is refused, the error body the client would get, in the upstream's error format.
When stdout is a terminal, a newline is added after a body that lacks one.

stderr: a labelled report, `decision:` and `route:`, and `rule:`, `field:` and `status:` when a
rule was broken.

--format json: one JSON object on stdout (decision, route, rule, field, status, body), nothing on
stderr. --batch: one JSON request per stdin line, one JSON verdict per stdout line, in order.

Exit status: 0 forwarded (decision passthrough, allowed, normalized, audit or exempt); 1 refused;
64 usage error (a bad flag, METHOD, PATH, header, config file or --batch line); 74 stdin could
not be read or stdout written.";

const CHECK_AFTER_HELP: &str = "\
Examples:

echo '{\"snapshot\":{\"display_name\":\"nightly\"}}' | snapguard check PUT /v3/p/snapshots/s

snapguard check --config snapguard.toml --format json POST /v3/p/snapshots < body.json";

/// The subcommands; without one, snapguard runs the proxy.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Validate a config file: prints `FILE: ok` and exits 0, or exits 64 naming the bad key.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    #[command(about = CHECK_ABOUT, long_about = CHECK_LONG_ABOUT, after_help = CHECK_AFTER_HELP)]
    Check {
        /// TOML config file whose policy decides [default: the built-in one]; the same as
        /// `snapguard --config FILE check`, and wins over it when both are given.
        #[arg(
            long,
            env = "SNAPGUARD_CONFIG",
            hide_env_values = true,
            value_name = "FILE"
        )]
        config: Option<PathBuf>,
        /// The request method, e.g. PUT.
        #[arg(required_unless_present = "batch")]
        method: Option<String>,
        /// The request target, e.g. /v3/p1/snapshots/s1 (a query may follow).
        #[arg(required_unless_present = "batch")]
        path: Option<String>,
        /// A request header, `Name: value`; may be repeated.
        #[arg(short = 'H', long = "header", value_name = "HEADER")]
        headers: Vec<String>,
        /// What to print.
        #[arg(long, value_enum, default_value = "text")]
        format: CheckFormat,
        /// Decide on many requests: one JSON object per stdin line ({"method", "target",
        /// "headers": [[name, value]...], "body"}), one JSON verdict per stdout line; exit 0.
        #[arg(long, conflicts_with_all = ["method", "path", "headers", "format"])]
        batch: bool,
    },
}

/// The clap command, for generating the man page and the shell completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}
