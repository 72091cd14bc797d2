//! Configuration: parsed from TOML text, validated, and only then used.
//!
//! `Config::load(path)` is a thin wrapper over `Config::from_toml(&str)`, so tests and the `check`
//! subcommand build configurations without touching the filesystem. Every section has built-in
//! defaults, so snapguard runs with no file at all. Values that can be wrong on their own (an
//! upstream URL, a route template, a duration) are checked while deserializing, so the error
//! carries the line and column of the offending key; unknown keys are rejected the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::policy::{Mode, Rule};
use crate::route::Route;

/// The whole configuration, as written in `config/snapguard.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Downstream listener for proxied traffic.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`).
    #[serde(deserialize_with = "socket_addr")]
    pub admin: SocketAddr,
    /// Worker threads of the runtime; 0 means one per CPU. Changes need a restart.
    pub workers: usize,
    /// How often the config file is checked for changes, and reloaded when it changed; 0s for
    /// never (SIGHUP still reloads it).
    #[serde(deserialize_with = "duration")]
    pub reload_interval: Duration,
    pub upstream: UpstreamConfig,
    pub policy: PolicyConfig,
    pub forwarding: ForwardingConfig,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log: LogConfig,
    pub errors: ErrorsConfig,
    /// TLS termination downstream; plain HTTP without it.
    pub tls: Option<crate::tls::TlsConfig>,
    /// The policed routes. When present in a file it replaces the built-in table whole.
    #[serde(default = "crate::route::default_routes")]
    pub routes: Vec<Route>,
    /// Naming rules of the organisation's own, checked after the built-in ones.
    pub rules: Vec<Rule>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9901)),
            workers: 0,
            reload_interval: Duration::from_secs(10),
            upstream: UpstreamConfig::default(),
            policy: PolicyConfig::default(),
            forwarding: ForwardingConfig::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            errors: ErrorsConfig::default(),
            tls: None,
            routes: crate::route::default_routes(),
            rules: Vec::new(),
        }
    }
}

/// Where requests go, and how to trust it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    /// Extra PEM CA bundle trusted for an `https://` upstream, on top of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Send the downstream Host upstream instead of the upstream's authority (signed requests).
    pub preserve_host: bool,
    /// Re-sign every forwarded request with the cloud's AK/SK (`[upstream.signing]`).
    pub signing: Option<crate::signing::SigningConfig>,
}

/// An upstream base URL: `http://` or `https://`, an authority, and no path, query or userinfo.
///
/// A path prefix is refused rather than silently dropped: snapguard forwards the original path
/// bytes and never rewrites them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct UpstreamUrl {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
}

impl Default for UpstreamUrl {
    fn default() -> Self {
        Self {
            scheme: http::uri::Scheme::HTTP,
            authority: http::uri::Authority::from_static("127.0.0.1:8776"),
        }
    }
}

impl std::str::FromStr for UpstreamUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s
            .parse()
            .map_err(|e| format!("upstream URL {s:?} is not a URL: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => http::uri::Scheme::HTTP,
            Some("https") => http::uri::Scheme::HTTPS,
            _ => {
                return Err(format!(
                    "upstream URL {s:?} must start with http:// or https://"
                ))
            }
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream URL {s:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("upstream URL {s:?} must not carry credentials"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "upstream URL {s:?} must have no path or query: snapguard forwards request paths unchanged"
            ));
        }
        Ok(Self { scheme, authority })
    }
}

impl TryFrom<String> for UpstreamUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// The naming policy (SPEC section 2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub mode: Mode,
    pub max_body_bytes: usize,
    pub max_field_bytes: usize,
    pub reserved_prefixes: Vec<String>,
    pub case_insensitive_prefixes: bool,
    /// Projects allowed to use the reserved prefixes (a backup service); logged and counted as
    /// `decision="exempt"`.
    pub reserved_prefix_exempt_projects: Vec<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Enforce,
            max_body_bytes: 64 * 1024,
            max_field_bytes: 255,
            reserved_prefixes: vec!["autobk_snapshot_".to_owned()],
            case_insensitive_prefixes: false,
            reserved_prefix_exempt_projects: Vec::new(),
        }
    }
}

/// Headers snapguard adds on the way upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardingConfig {
    /// Set X-Forwarded-For, -Proto and -Host for the upstream, and remove an untrusted peer's
    /// Forwarded or append to a trusted one's ([`crate::headers::add_forwarded`]).
    pub x_forwarded: bool,
    /// Peers (CIDRs) whose forwarding headers are kept and appended to; anyone else's
    /// X-Forwarded-* are overwritten and its Forwarded removed.
    pub trusted_proxies: Vec<Cidr>,
}

/// An address range, `10.0.0.0/8`, or one address, `10.0.0.7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr(pub ipnet::IpNet);

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(Cidr)
            .map_err(|_| format!("{text:?} is not an address or an address range like 10.0.0.0/8"))
    }
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        Self {
            x_forwarded: true,
            trusted_proxies: Vec::new(),
        }
    }
}

impl ForwardingConfig {
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.trusted_proxies.iter().any(|net| net.0.contains(&ip))
    }
}

/// Every timeout, as a human duration ("10s", "500ms", "1m").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Downstream HTTP/1 request head must arrive within this.
    #[serde(deserialize_with = "duration")]
    pub request_header: Duration,
    /// A policed request body must arrive whole within this.
    #[serde(deserialize_with = "duration")]
    pub request_body: Duration,
    #[serde(deserialize_with = "duration")]
    pub upstream_connect: Duration,
    /// The upstream must send its response head within this, or the downstream gets 504.
    #[serde(deserialize_with = "duration")]
    pub upstream_response: Duration,
    /// Idle pooled upstream connections are closed after this.
    #[serde(deserialize_with = "duration")]
    pub upstream_idle: Duration,
    /// An HTTP/2 downstream connection with no request in flight for this long is closed (an
    /// HTTP/1 one is waiting for a request head: `request_header`).
    #[serde(deserialize_with = "duration")]
    pub idle: Duration,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// A streamed body, either way, may not stand still longer than this; nor may a response
    /// the downstream does not take.
    #[serde(deserialize_with = "duration")]
    pub body_idle: Duration,
    /// After this long, a streamed body must have averaged `limits.min_body_rate`.
    #[serde(deserialize_with = "duration")]
    pub min_rate_grace: Duration,
    /// A request may wait this long for an upstream slot, then gets 503.
    #[serde(deserialize_with = "duration")]
    pub upstream_queue: Duration,
    /// TCP keepalive probes on idle sockets, both sides, after this long ("0s": off).
    #[serde(deserialize_with = "duration")]
    pub tcp_keepalive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request_header: Duration::from_secs(10),
            request_body: Duration::from_secs(30),
            upstream_connect: Duration::from_secs(5),
            upstream_response: Duration::from_secs(60),
            upstream_idle: Duration::from_secs(90),
            idle: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            body_idle: Duration::from_secs(30),
            min_rate_grace: Duration::from_secs(10),
            upstream_queue: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
        }
    }
}

/// Resource limits on the downstream side.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest HTTP/1 request head (request line and headers) accepted.
    pub max_header_bytes: usize,
    /// Connections served at once; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Requests in the upstream's hands at once (from sending one to its response head);
    /// further requests wait for a slot, first come first served.
    pub max_upstream_connections: usize,
    /// Requests that may wait for an upstream slot; one more gets 503 at once.
    pub max_upstream_waiting: usize,
    /// Request bodies up to this size are read whole before an upstream slot is taken.
    pub buffer_request_body: usize,
    /// Response bodies up to this size are read whole before they are relayed, so their
    /// upstream connection is free whatever the downstream does.
    pub buffer_response_body: usize,
    /// All response bodies buffered at once may hold at most this much; past it they stream.
    pub buffer_memory: usize,
    /// Bytes per second a streamed body must average after `timeouts.min_rate_grace` ("0": no
    /// minimum).
    pub min_body_rate: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            max_upstream_connections: 64,
            max_upstream_waiting: 1024,
            buffer_request_body: 64 * 1024,
            buffer_response_body: 64 * 1024,
            buffer_memory: 64 * 1024 * 1024,
            min_body_rate: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter, e.g. "info" or "info,snapguard::access=warn". `RUST_LOG`, when
    /// set, takes precedence. Reloaded on SIGHUP.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// How errors are rendered. Only the huawei style has tunable codes; openstack names are Cinder's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorsConfig {
    /// HTTP status -> EVS error code, e.g. `"400" = "EVS.5400"`. Unlisted statuses use `EVS.5<status>`.
    #[serde(deserialize_with = "status_map")]
    pub huawei_codes: BTreeMap<u16, String>,
}

impl ErrorsConfig {
    pub fn huawei_code(&self, status: http::StatusCode) -> String {
        self.huawei_codes
            .get(&status.as_u16())
            .cloned()
            .unwrap_or_else(|| format!("EVS.5{}", status.as_u16()))
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(#[from] toml::de::Error),
    /// Every problem found, not only the first, each with where it is when it is in a file.
    #[error("{}", Problems(.0))]
    Invalid(Vec<Problem>),
    /// A file the configuration points at (a TLS certificate, a signing key) does not load.
    #[error("{0}")]
    Files(String),
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key, as a path: `policy.max_body_bytes`, `rules[1].routes[0]`; empty when unknown.
    pub key: String,
    pub reason: String,
    /// Line and column (from 1) in the file, when the key is written in it.
    pub at: Option<(usize, usize)>,
}

impl Problem {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
            at: None,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.key.is_empty(), self.at) {
            (false, Some((line, column))) => {
                write!(f, "{} (line {line}, column {column})", self.key)?
            }
            (false, None) => f.write_str(&self.key)?,
            (true, Some((line, column))) => write!(f, "line {line}, column {column}")?,
            (true, None) => return f.write_str(&self.reason),
        }
        write!(f, ": {}", self.reason)
    }
}

/// A duration, a count or a size in bytes, as a key's value and its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd)]
enum Amount {
    Time(Duration),
    Count(u64),
    Bytes(u64),
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Time(d) => write!(f, "{}", humantime::format_duration(d)),
            Self::Count(n) => write!(f, "{n}"),
            Self::Bytes(n) => match [(30, "GiB"), (20, "MiB"), (10, "KiB")]
                .into_iter()
                .find(|(shift, _)| n >> shift > 0 && n % (1 << shift) == 0)
            {
                Some((shift, unit)) => write!(f, "{n} ({} {unit})", n >> shift),
                None => write!(f, "{n}"),
            },
        }
    }
}

/// The values one key may take: `min..=max`, and 0 too when the key reads 0 as "off".
#[derive(Debug, Clone, Copy)]
struct Bound {
    key: &'static str,
    value: Amount,
    min: Amount,
    max: Amount,
    /// What 0 means, when it is allowed below `min`.
    zero: Option<&'static str>,
}

impl Bound {
    fn time(key: &'static str, value: Duration, min: Duration, max: Duration) -> Self {
        Self::new(
            key,
            Amount::Time(value),
            Amount::Time(min),
            Amount::Time(max),
        )
    }

    fn count(key: &'static str, value: impl TryInto<u64>, min: u64, max: u64) -> Self {
        // A value past u64 (none on 64-bit hosts) is past every ceiling.
        let value = value.try_into().unwrap_or(u64::MAX);
        Self::new(
            key,
            Amount::Count(value),
            Amount::Count(min),
            Amount::Count(max),
        )
    }

    fn bytes(key: &'static str, value: usize, min: usize, max: usize) -> Self {
        let wide = |n: usize| Amount::Bytes(u64::try_from(n).unwrap_or(u64::MAX));
        Self::new(key, wide(value), wide(min), wide(max))
    }

    fn new(key: &'static str, value: Amount, min: Amount, max: Amount) -> Self {
        Self {
            key,
            value,
            min,
            max,
            zero: None,
        }
    }

    fn or_zero(self, meaning: &'static str) -> Self {
        Self {
            zero: Some(meaning),
            ..self
        }
    }

    fn check(&self) -> Result<(), String> {
        let zero = match self.value {
            Amount::Time(d) => d.is_zero(),
            Amount::Count(n) | Amount::Bytes(n) => n == 0,
        };
        if (self.min..=self.max).contains(&self.value) || (zero && self.zero.is_some()) {
            return Ok(());
        }
        let (min, max, value) = (self.min, self.max, self.value);
        Err(match self.zero {
            Some(meaning) => {
                let zero = if let Amount::Time(_) = value {
                    "0s"
                } else {
                    "0"
                };
                format!("must be {zero} ({meaning}) or from {min} to {max}, not {value}")
            }
            None => format!("must be from {min} to {max}, not {value}"),
        })
    }
}

/// The problems of a config, one a line when there are several.
struct Problems<'a>(&'a [Problem]);

impl std::fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            [one] => write!(f, "invalid config: {one}"),
            many => {
                write!(f, "invalid config, {} errors:", many.len())?;
                for problem in many {
                    // A reason may span lines (a regex error draws a caret): keep them indented.
                    write!(f, "\n  {}", problem.to_string().replace('\n', "\n    "))?;
                }
                Ok(())
            }
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, |_| {})
    }

    /// Reads and parses a config file, applies `overrides` (command-line flags), then
    /// validates the result: a flag may settle what the file alone would leave invalid (an
    /// `upstream.ca_file` with `--upstream https://...`).
    pub fn load_with(
        path: &Path,
        overrides: impl FnOnce(&mut Config),
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_with(&text, overrides)
    }

    /// Loads the files the configuration points at, as start-up will: the TLS certificate, key
    /// and client CA, and the signing keys. `check-config` runs it too, so that a key that does
    /// not match its certificate fails there, not at the first restart.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        if let Some(tls) = &self.tls {
            crate::tls::load(tls).map_err(|e| ConfigError::Files(format!("[tls]: {e}")))?;
        }
        if let Some(signing) = &self.upstream.signing {
            crate::signing::Signer::new(signing.clone())
                .map_err(|e| ConfigError::Files(format!("[upstream.signing]: {e}")))?;
        }
        Ok(())
    }

    /// Parses and validates TOML text. Errors carry the line and column of their key.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with(text, |_| {})
    }

    /// Parses TOML text, applies `overrides`, validates. Errors carry the line and column of
    /// their key where the text has it.
    pub fn from_toml_with(
        text: &str,
        overrides: impl FnOnce(&mut Config),
    ) -> Result<Self, ConfigError> {
        let mut config: Config = match toml::from_str(text) {
            Ok(config) => config,
            Err(e) => return Err(position::table_errors(text, &e).unwrap_or(e.into())),
        };
        overrides(&mut config);
        config.validate().map_err(|e| match e {
            ConfigError::Invalid(problems) => {
                ConfigError::Invalid(position::locate(text, problems))
            }
            other => other,
        })?;
        Ok(config)
    }

    /// Checks every duration and limit against its bounds ([`Config::bounds`]), and what no
    /// single key can check on its own, and reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut invalid = |key: &str, reason: &str| problems.push(Problem::new(key, reason));
        for bound in self.bounds() {
            if let Err(reason) = bound.check() {
                invalid(bound.key, &reason);
            }
        }
        if self.policy.reserved_prefixes.iter().any(String::is_empty) {
            invalid(
                "policy.reserved_prefixes",
                "an empty prefix would reserve every name",
            );
        }
        if self.limits.buffer_memory < self.limits.buffer_response_body {
            invalid(
                "limits.buffer_memory",
                "must be at least limits.buffer_response_body",
            );
        }
        if let Some(signing) = &self.upstream.signing {
            use crate::signing::Downstream;
            // Otherwise anyone who can reach snapguard signs with the cloud's key.
            if signing.downstream == Downstream::None && !self.listen.ip().is_loopback() {
                invalid(
                    "upstream.signing.downstream",
                    "\"none\" lends the cloud key to anyone who can connect: listen on a loopback \
                     address, or set downstream = \"verify\" with [[upstream.signing.clients]]",
                );
            }
            if signing.downstream == Downstream::Verify && signing.clients.is_empty() {
                invalid(
                    "upstream.signing.clients",
                    "downstream = \"verify\" needs at least one [[upstream.signing.clients]] key",
                );
            }
            if self.upstream.preserve_host {
                invalid(
                    "upstream.preserve_host",
                    "a re-signed request is signed for the upstream's Host",
                );
            }
        }
        if self.upstream.ca_file.is_some() && self.upstream.url.scheme != http::uri::Scheme::HTTPS {
            invalid("upstream.ca_file", "is only used with an https:// upstream");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            invalid(
                "log.level",
                &format!("{:?} is not a log filter: {e}", self.log.level),
            );
        }
        let mut names: Vec<&str> = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.name.as_ref() == "reserved_prefix" {
                invalid(
                    &format!("rules[{i}].name"),
                    "'reserved_prefix' is the built-in rule's name: give this rule another",
                );
            } else if names.contains(&&*rule.name) {
                invalid(
                    &format!("rules[{i}].name"),
                    &format!(
                        "rule name '{}' is used twice: a name labels the rule's refusals and \
                         metrics, so each must differ",
                        rule.name
                    ),
                );
            }
            names.push(&rule.name);
            let policed = |field: &String| {
                self.routes
                    .iter()
                    .any(|r| r.name_fields.contains(field) || r.description_fields.contains(field))
            };
            for field in rule.listed_fields().iter().filter(|f| !policed(f)) {
                invalid(
                    &format!("rules[{i}].fields"),
                    &format!("rule '{}': no route polices the field {field:?}", rule.name),
                );
            }
            for (k, template) in rule.routes.iter().flatten().enumerate() {
                if !self.routes.iter().any(|r| *r.template == **template) {
                    invalid(
                        &format!("rules[{i}].routes[{k}]"),
                        &format!(
                            "rule '{}': {template} is not a route of the table{}",
                            rule.name,
                            self.valid_templates(template)
                        ),
                    );
                }
            }
        }
        if self.listen == self.admin {
            invalid("admin", "must differ from listen");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every duration and numeric limit with the values it may take, in one table: the floor
    /// keeps a timer from spinning or a limit from refusing everything, the ceiling keeps
    /// `Instant + Duration` from overflowing and a size from allocating more than any host has.
    /// Each row's reason is the comment above it; `config/snapguard.toml` says the same.
    #[rustfmt::skip] // A table: one row a key.
    fn bounds(&self) -> Vec<Bound> {
        const MS: Duration = Duration::from_millis(1);
        const SECOND: Duration = Duration::from_secs(1);
        const HOUR: Duration = Duration::from_secs(3600);
        const DAY: Duration = Duration::from_secs(24 * 3600);
        const KIB: usize = 1024;
        const MIB: usize = 1024 * KIB;
        use Bound as B;
        let (t, l, p) = (&self.timeouts, &self.limits, &self.policy);
        let mut bounds = vec![
            // tokio builds a runtime of any size; more threads than this is a typo.
            B::count("workers", self.workers, 1, 1024).or_zero("one per CPU"),
            // Each tick reads the file and compares it: 10 a second at most costs nothing.
            B::time("reload_interval", self.reload_interval, 100 * MS, DAY)
                .or_zero("reload on SIGHUP only"),
            // Waits on the downstream: under 100 ms cuts honest peers a round trip away (and
            // closes keep-alive connections between requests). A request head, a standing
            // body or the grace before the rate counts taking an hour is no client's.
            B::time("timeouts.request_header", t.request_header, 100 * MS, HOUR),
            B::time("timeouts.request_body", t.request_body, 100 * MS, DAY),
            B::time("timeouts.idle", t.idle, 100 * MS, DAY),
            B::time("timeouts.body_idle", t.body_idle, 100 * MS, HOUR),
            B::time("timeouts.min_rate_grace", t.min_rate_grace, 100 * MS, HOUR),
            // Waits on the upstream: a local one answers within a millisecond.
            B::time("timeouts.upstream_connect", t.upstream_connect, MS, HOUR),
            B::time("timeouts.upstream_response", t.upstream_response, MS, DAY),
            B::time("timeouts.upstream_queue", t.upstream_queue, MS, HOUR),
            // The pool is reaped every upstream_idle: 10 a second at most.
            B::time("timeouts.upstream_idle", t.upstream_idle, 100 * MS, DAY),
            // 0s is a legitimate choice: close what is left at once.
            B::time("timeouts.shutdown_grace", t.shutdown_grace, Duration::ZERO, HOUR),
            // The kernel counts TCP_KEEPIDLE in whole seconds, at most 32767 on Linux.
            B::time("timeouts.tcp_keepalive", t.tcp_keepalive, SECOND, 32767 * SECOND)
                .or_zero("off"),
            // hyper refuses a read buffer under 8 KiB; a request head over 1 MiB is an attack.
            B::bytes("limits.max_header_bytes", l.max_header_bytes, 8 * KIB, MIB),
            // A semaphore of this many permits (tokio panics above usize::MAX >> 3); more than
            // the file descriptors any host gives one process.
            B::count("limits.max_connections", l.max_connections, 1, 1_000_000),
            // A pool slot each is allocated at start; one upstream address has ~64K ports.
            B::count("limits.max_upstream_connections", l.max_upstream_connections, 1, 65_536),
            // 0: no queue, 503 when every slot is taken. Each waiter holds a request.
            B::count("limits.max_upstream_waiting", l.max_upstream_waiting, 0, 1_000_000),
            // Buffered bodies are held whole in memory, each (0: every body streams).
            B::bytes("limits.buffer_request_body", l.buffer_request_body, 0, 64 * MIB),
            B::bytes("limits.buffer_response_body", l.buffer_response_body, 0, 64 * MIB),
            // Past any host's memory (0: no response is buffered).
            B::bytes("limits.buffer_memory", l.buffer_memory, 0, 64 * 1024 * MIB),
            // Bytes per second (0: no minimum); faster than this cuts bodies on any real link.
            B::count("limits.min_body_rate", l.min_body_rate, 0, 1 << 30),
            // A policed body is held whole in memory and parsed; 0 would refuse every body.
            B::bytes("policy.max_body_bytes", p.max_body_bytes, 1, 64 * MIB),
            // No field is longer than the largest body.
            B::bytes("policy.max_field_bytes", p.max_field_bytes, 1, 64 * MIB),
        ];
        if let Some(tls) = &self.tls {
            bounds.extend([
                B::time("tls.handshake_timeout", tls.handshake_timeout, 100 * MS, HOUR),
                // Each tick re-reads and parses the certificate and key files.
                B::time("tls.reload_interval", tls.reload_interval, SECOND, DAY),
            ]);
        }
        if let Some(signing) = &self.upstream.signing {
            // Each tick re-reads the key files.
            let every = signing.reload_interval;
            bounds.push(B::time("upstream.signing.reload_interval", every, SECOND, DAY));
        }
        bounds
    }

    /// What a rule's `routes` may name instead of `unknown`: the nearest template when one has
    /// the same shape (parameters named otherwise, a slash more or less), and all of them.
    fn valid_templates(&self, unknown: &str) -> String {
        let shape = |template: &str| -> Vec<String> {
            template
                .split('/')
                .filter(|s| !s.is_empty())
                .map(|s| match s.starts_with('{') && s.ends_with('}') {
                    true => "{}".to_owned(),
                    false => s.to_ascii_lowercase(),
                })
                .collect()
        };
        let templates: Vec<&str> = self.routes.iter().map(|r| r.template).collect();
        let near = templates
            .iter()
            .find(|t| shape(t) == shape(unknown))
            .map(|t| format!(" (did you mean {t}?)"))
            .unwrap_or_default();
        format!(
            "{near}; a rule names routes by their path as written in [[routes]] (or in the \
             built-in table): {}",
            templates.join(", ")
        )
    }
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration ({e}); write e.g. \"10s\" or \"500ms\""
        ))
    })
}

fn status_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u16, String>, D::Error> {
    let raw = BTreeMap::<String, String>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| match k.parse::<u16>() {
            Ok(code) if (400..=599).contains(&code) => Ok((code, v)),
            _ => Err(serde::de::Error::custom(format!(
                "{k:?} is not an HTTP error status (400-599)"
            ))),
        })
        .collect()
}

/// `listen` and `admin` (and their flags): an IP address and a port. A host name is refused
/// rather than resolved, since which of its addresses to bind would be a guess.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let example = "e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080";
    Err(if text.parse::<std::net::Ipv4Addr>().is_ok() {
        format!("{text:?} has no port: listen and admin take an IP:port, {example}")
    } else if text.matches(':').count() > 1 && !text.starts_with('[') {
        format!(
            "{text:?}: an IPv6 address goes in brackets, then its port: listen and admin take \
             an IP:port, {example}"
        )
    } else {
        format!(
            "{text:?} is not an IP address and port: listen and admin take an IP:port, {example}, \
             not a host name"
        )
    })
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen_addr(&text).map_err(serde::de::Error::custom)
}

/// Where in the file a problem is: the line and column of its key, found in the parsed
/// document (whose every key and value keeps its byte span).
mod position {
    use toml::de::{DeTable, DeValue};
    use toml::Spanned;

    use super::Problem;
    use crate::policy::Rule;
    use crate::route::Route;

    /// Gives each problem whose key is written in `text` its line and column.
    pub fn locate(text: &str, mut problems: Vec<Problem>) -> Vec<Problem> {
        if let Ok(doc) = DeTable::parse(text) {
            for problem in &mut problems {
                problem.at = find(doc.get_ref(), &problem.key).map(|span| line_column(text, span));
            }
        }
        problems
    }

    /// toml stops at the first bad `[[rules]]` or `[[routes]]` table, and points at the first
    /// table's header whichever one it was. Deserialized alone, each table says whether it is
    /// bad and where: every bad one is reported, at its key when the message names one.
    /// `None` when the error is not in one of those tables.
    pub fn table_errors(text: &str, error: &toml::de::Error) -> Option<super::ConfigError> {
        let doc = DeTable::parse(text).ok()?;
        let mut problems = Vec::new();
        for name in ["routes", "rules"] {
            let Some(DeValue::Array(items)) = doc.get_ref().get(name).map(Spanned::get_ref) else {
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                let de = || toml::de::ValueDeserializer::from(item.clone());
                let failed = match name {
                    "routes" => <Route as serde::Deserialize>::deserialize(de()).err(),
                    _ => <Rule as serde::Deserialize>::deserialize(de()).err(),
                };
                if let Some(e) = failed {
                    let (key, span) = key_of(item, &e);
                    let key = match key {
                        Some(key) => format!("{name}[{i}].{key}"),
                        None => format!("{name}[{i}]"),
                    };
                    let mut problem = Problem::new(key, e.message());
                    problem.at = Some(line_column(text, span));
                    problems.push(problem);
                }
            }
        }
        if problems.is_empty() {
            return None;
        }
        // The error toml stopped at, when it is not one of these.
        if !problems.iter().any(|p| p.reason == error.message()) {
            let mut first = Problem::new("", error.message());
            first.at = error.span().map(|span| line_column(text, span));
            problems.insert(0, first);
        }
        Some(super::ConfigError::Invalid(problems))
    }

    /// The key of a bad table that an error is about, and where to point: the key toml
    /// pointed at, else the first key the message names after its "rule 'x': " or
    /// "route /path: " prefix, else the table's header.
    fn key_of(
        item: &Spanned<DeValue<'_>>,
        error: &toml::de::Error,
    ) -> (Option<String>, std::ops::Range<usize>) {
        let DeValue::Table(table) = item.get_ref() else {
            return (None, error.span().unwrap_or(item.span()));
        };
        if let Some(span) = error.span() {
            let key = table.iter().find(|(k, v)| {
                k.span().start <= span.start && span.end <= v.span().end.max(k.span().end)
            });
            return (key.map(|(k, _)| k.get_ref().to_string()), span);
        }
        let message = error.message();
        let reason = message.split_once(": ").map_or(message, |(_, r)| r);
        let named = reason
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .find_map(|word| {
                table.iter().find(|(k, _)| {
                    let k: &str = k.get_ref();
                    word == k || Some(word) == k.strip_suffix('s')
                })
            });
        match named {
            Some((k, v)) => (Some(k.get_ref().to_string()), v.span()),
            None => (None, item.span()),
        }
    }

    /// The span of the value at `key` (`a.b`, `rules[2].routes[0]`), if the file writes it.
    fn find(doc: &DeTable<'_>, key: &str) -> Option<std::ops::Range<usize>> {
        let mut parts = key.split('.');
        let (name, indexes) = split_indexes(parts.next()?)?;
        let mut value = doc.get(name)?;
        for i in indexes {
            value = index(value, i)?;
        }
        for part in parts {
            let (name, indexes) = split_indexes(part)?;
            let DeValue::Table(table) = value.get_ref() else {
                return None;
            };
            value = table.get(name)?;
            for i in indexes {
                value = index(value, i)?;
            }
        }
        Some(value.span())
    }

    fn index<'v, 'i>(
        value: &'v Spanned<DeValue<'i>>,
        i: usize,
    ) -> Option<&'v Spanned<DeValue<'i>>> {
        match value.get_ref() {
            DeValue::Array(items) => items.get(i),
            _ => None,
        }
    }

    /// `routes[0][1]` -> `routes`, [0, 1].
    fn split_indexes(part: &str) -> Option<(&str, Vec<usize>)> {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        let indexes = rest
            .split('[')
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches(']').parse().ok())
            .collect::<Option<Vec<_>>>()?;
        Some((name, indexes))
    }

    /// Line and column, from 1, of a byte offset; columns count characters, as toml's do.
    fn line_column(text: &str, span: std::ops::Range<usize>) -> (usize, usize) {
        let before = &text[..span.start.min(text.len())];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (
            before.matches('\n').count() + 1,
            before[line_start..].chars().count() + 1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_gives_the_built_in_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.admin, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.upstream.url.to_string(), "http://127.0.0.1:8776");
        assert_eq!(c.policy.max_body_bytes, 65536);
        assert_eq!(c.policy.max_field_bytes, 255);
        assert_eq!(c.policy.reserved_prefixes, ["autobk_snapshot_"]);
        assert!(!c.routes.is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected_with_line_and_column() {
        let err = Config::from_toml("[policy]\nmax_body_bytes = 10\nmax_feild_bytes = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_feild_bytes"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("column 1"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, needle) in [
            ("[upstream]\nurl = \"ftp://x\"\n", "url"),
            ("[upstream]\nurl = \"http://x/prefix\"\n", "no path"),
            (
                "[timeouts]\nupstream_connect = \"soon\"\n",
                "upstream_connect",
            ),
            ("[policy]\nmode = \"loud\"\n", "mode"),
            ("[policy]\nmax_body_bytes = 0\n", "policy.max_body_bytes"),
            (
                "[policy]\nreserved_prefixes = [\"\"]\n",
                "policy.reserved_prefixes",
            ),
            (
                "[errors.huawei_codes]\n\"200\" = \"EVS.1\"\n",
                "huawei_codes",
            ),
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn huawei_codes_default_to_the_status_and_can_be_overridden() {
        let c = Config::from_toml("[errors.huawei_codes]\n\"400\" = \"EVS.2024\"\n").unwrap();
        assert_eq!(
            c.errors.huawei_code(http::StatusCode::BAD_REQUEST),
            "EVS.2024"
        );
        assert_eq!(
            c.errors.huawei_code(http::StatusCode::PAYLOAD_TOO_LARGE),
            "EVS.5413"
        );
    }

    #[test]
    fn the_shipped_example_config_is_valid_and_matches_the_defaults() {
        let text = include_str!("../config/snapguard.toml");
        let c = Config::from_toml(text).unwrap();
        let d = Config::default();
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.upstream.url, d.upstream.url);
        assert_eq!(c.policy.max_body_bytes, d.policy.max_body_bytes);
        assert_eq!(c.timeouts.upstream_response, d.timeouts.upstream_response);
        assert_eq!(c.routes, d.routes);
    }

    fn problems(text: &str) -> Vec<Problem> {
        match Config::from_toml(text) {
            Err(ConfigError::Invalid(problems)) => problems,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn every_validation_problem_is_reported_at_its_key() {
        let got = problems("[limits]\nmax_connections = 0\nmax_header_bytes = 100\n");
        let at: Vec<_> = got.iter().map(|p| (p.key.as_str(), p.at)).collect();
        assert_eq!(
            at,
            [
                ("limits.max_header_bytes", Some((3, 20))),
                ("limits.max_connections", Some((2, 19)))
            ]
        );
        // A key the file does not write has no position: here, a default.
        let mut c = Config::default();
        c.admin = c.listen;
        let Err(ConfigError::Invalid(got)) = c.validate() else {
            panic!("listen = admin passed");
        };
        assert_eq!(got, [Problem::new("admin", "must differ from listen")]);
        assert_eq!(
            ConfigError::Invalid(got).to_string(),
            "invalid config: admin: must differ from listen"
        );
    }

    #[test]
    fn every_duration_and_limit_is_held_to_its_bounds() {
        for (text, key, says) in [
            (
                "workers = 1025",
                "workers",
                "must be 0 (one per CPU) or from 1 to 1024, not 1025",
            ),
            (
                "reload_interval = \"1ns\"",
                "reload_interval",
                "or from 100ms to 1day, not 1ns",
            ),
            (
                "[timeouts]\nupstream_idle = \"0s\"",
                "timeouts.upstream_idle",
                "not 0s",
            ),
            (
                "[timeouts]\nidle = \"99ms\"",
                "timeouts.idle",
                "from 100ms to 1day, not 99ms",
            ),
            (
                "[timeouts]\nupstream_response = \"25h\"",
                "timeouts.upstream_response",
                "1day",
            ),
            (
                "[timeouts]\nshutdown_grace = \"61m\"",
                "timeouts.shutdown_grace",
                "to 1h",
            ),
            (
                "[timeouts]\ntcp_keepalive = \"500ms\"",
                "timeouts.tcp_keepalive",
                "0s (off)",
            ),
            (
                "[limits]\nmin_body_rate = 1073741825",
                "limits.min_body_rate",
                "to 1073741824",
            ),
            (
                "[limits]\nbuffer_request_body = 67108865",
                "limits.buffer_request_body",
                "MiB",
            ),
            (
                "[policy]\nmax_field_bytes = 0",
                "policy.max_field_bytes",
                "from 1 to",
            ),
            (
                "[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nreload_interval = \"999ms\"",
                "tls.reload_interval",
                "from 1s to 1day",
            ),
            (
                "[upstream.signing]\nscheme = \"sdk-hmac-sha256\"\nreload_interval = \"0s\"",
                "upstream.signing.reload_interval",
                "from 1s to 1day",
            ),
        ] {
            let got = problems(text);
            assert!(
                got.iter().any(|p| p.key == key && p.reason.contains(says)),
                "{text:?}: {got:?}"
            );
        }
        // 0 where it means "off", and each bound itself, are accepted.
        let ok = "workers = 0\nreload_interval = \"0s\"\n[timeouts]\nshutdown_grace = \"0s\"\n\
                  tcp_keepalive = \"0s\"\nupstream_idle = \"100ms\"\n[limits]\n\
                  max_upstream_waiting = 0\nbuffer_request_body = 0\nbuffer_response_body = 0\n\
                  buffer_memory = 0\nmin_body_rate = 0\nmax_header_bytes = 1048576\n";
        Config::from_toml(ok).unwrap();
    }

    #[test]
    fn each_bad_rules_table_is_reported_not_only_the_first() {
        let rule = |name: &str, extra: &str| {
            format!("[[rules]]\nname = \"{name}\"\n{extra}\nmessage = \"m\"\n")
        };
        let text = [
            rule("ok", "max_chars = 1"),
            rule("none", ""),
            rule(
                "both",
                "max_chars = 1\nprojects = [\"a\"]\nexcept_projects = [\"b\"]",
            ),
        ]
        .concat();
        let got = problems(&text);
        let at: Vec<_> = got.iter().map(|p| (p.key.as_str(), p.at)).collect();
        // The table's header when the message names none of its keys.
        assert_eq!(
            at,
            [
                ("rules[1]", Some((5, 1))),
                ("rules[2].projects", Some((12, 12)))
            ]
        );
    }

    #[test]
    fn listen_addresses_are_an_ip_and_a_port() {
        assert!(parse_listen_addr("[::1]:8080").is_ok());
        for (text, says) in [
            ("localhost:8080", "not a host name"),
            ("10.0.0.1", "has no port"),
            ("::1:8080", "an IPv6 address goes in brackets"),
        ] {
            let err = parse_listen_addr(text).unwrap_err();
            assert!(
                err.contains(says) && err.contains("127.0.0.1:8080"),
                "{err}"
            );
        }
    }
}
