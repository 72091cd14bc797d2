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
    pub listen: SocketAddr,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin: SocketAddr,
    /// Worker threads of the runtime; 0 means one per CPU. Changes need a restart.
    pub workers: usize,
    pub upstream: UpstreamConfig,
    pub policy: PolicyConfig,
    pub forwarding: ForwardingConfig,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log: LogConfig,
    pub errors: ErrorsConfig,
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
            upstream: UpstreamConfig::default(),
            policy: PolicyConfig::default(),
            forwarding: ForwardingConfig::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            errors: ErrorsConfig::default(),
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
    /// Append the peer to X-Forwarded-For and set X-Forwarded-Proto and X-Forwarded-Host.
    pub x_forwarded: bool,
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        Self { x_forwarded: true }
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
    /// A downstream connection with no request in flight for this long is closed.
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
    #[error("invalid config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what no single key can check on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        let p = &self.policy;
        if p.max_body_bytes == 0 {
            return invalid("policy.max_body_bytes", "must be greater than 0");
        }
        if p.max_field_bytes == 0 {
            return invalid("policy.max_field_bytes", "must be greater than 0");
        }
        if p.reserved_prefixes.iter().any(String::is_empty) {
            return invalid(
                "policy.reserved_prefixes",
                "an empty prefix would reserve every name",
            );
        }
        if self.limits.max_connections == 0 {
            return invalid("limits.max_connections", "must be greater than 0");
        }
        if self.limits.max_upstream_connections == 0 {
            return invalid("limits.max_upstream_connections", "must be greater than 0");
        }
        let t = &self.timeouts;
        // Zero would refuse every request, close every connection after one, or panic a
        // timer; only the keepalive may be off.
        for (key, value) in [
            ("timeouts.request_header", t.request_header),
            ("timeouts.request_body", t.request_body),
            ("timeouts.upstream_connect", t.upstream_connect),
            ("timeouts.upstream_response", t.upstream_response),
            ("timeouts.upstream_idle", t.upstream_idle),
            ("timeouts.idle", t.idle),
            ("timeouts.body_idle", t.body_idle),
            ("timeouts.upstream_queue", t.upstream_queue),
        ] {
            if value.is_zero() {
                return invalid(key, "must be greater than 0s");
            }
        }
        if self.limits.buffer_memory < self.limits.buffer_response_body {
            return invalid(
                "limits.buffer_memory",
                "must be at least limits.buffer_response_body",
            );
        }
        // hyper refuses buffers under 8 KiB; say so here rather than panic at start.
        if self.limits.max_header_bytes < 8192 {
            return invalid("limits.max_header_bytes", "must be at least 8192");
        }
        if let Some(signing) = &self.upstream.signing {
            use crate::signing::Downstream;
            // Otherwise anyone who can reach snapguard signs with the cloud's key.
            if signing.downstream == Downstream::None && !self.listen.ip().is_loopback() {
                return invalid(
                    "upstream.signing.downstream",
                    "\"none\" lends the cloud key to anyone who can connect: listen on a loopback \
                     address, or set downstream = \"verify\" with [[upstream.signing.clients]]",
                );
            }
            if signing.downstream == Downstream::Verify && signing.clients.is_empty() {
                return invalid(
                    "upstream.signing.clients",
                    "downstream = \"verify\" needs at least one [[upstream.signing.clients]] key",
                );
            }
            if signing.reload_interval.is_zero() {
                return invalid(
                    "upstream.signing.reload_interval",
                    "must be greater than 0s",
                );
            }
            if self.upstream.preserve_host {
                return invalid(
                    "upstream.preserve_host",
                    "a re-signed request is signed for the upstream's Host",
                );
            }
        }
        if self.upstream.ca_file.is_some() && self.upstream.url.scheme != http::uri::Scheme::HTTPS {
            return invalid("upstream.ca_file", "is only used with an https:// upstream");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid(
                "log.level",
                &format!("{:?} is not a log filter: {e}", self.log.level),
            );
        }
        let mut names: Vec<&str> = Vec::new();
        for rule in &self.rules {
            if names.contains(&&*rule.name) || rule.name.as_ref() == "reserved_prefix" {
                return Err(ConfigError::Invalid {
                    key: "rules",
                    reason: format!(
                        "rule name '{}' is used twice (reserved_prefix is built in)",
                        rule.name
                    ),
                });
            }
            names.push(&rule.name);
            let policed = |field: &String| {
                self.routes
                    .iter()
                    .any(|r| r.name_fields.contains(field) || r.description_fields.contains(field))
            };
            if let Some(field) = rule.listed_fields().iter().find(|f| !policed(f)) {
                return Err(ConfigError::Invalid {
                    key: "rules",
                    reason: format!("rule '{}': no route polices the field {field:?}", rule.name),
                });
            }
            for template in rule.routes.iter().flatten() {
                if !self.routes.iter().any(|r| *r.template == **template) {
                    return Err(ConfigError::Invalid {
                        key: "rules",
                        reason: format!(
                            "rule '{}': {template} is not a route of the table",
                            rule.name
                        ),
                    });
                }
            }
        }
        if self.listen == self.admin {
            return invalid("admin", "must differ from listen");
        }
        Ok(())
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
}
