//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Every series has a bounded label set: routes come from the config, decisions, rules and
//! error kinds are fixed names, methods outside the standard ones are counted as `OTHER`.
//!
//! Nothing here takes a lock on the request path. prometheus-client's label families sit behind
//! a read-write lock and its histograms behind a mutex, so requests update counters through a
//! per-thread cache of their atomic handles (the family's lock is taken once per thread and
//! label set), and durations go to [`Durations`], a histogram made of atomics.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Labels of `snapguard_requests_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template (interned), or `none` for passthrough traffic.
    pub route: &'static str,
    pub method: &'static str,
    pub decision: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViolationLabels {
    rule: String,
    field: String,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// A per-thread cache key: the metrics' id and the addresses of the request labels.
type CacheKey = (usize, usize, usize, usize, u16);

/// Hashes a [`CacheKey`]: addresses and a status, from snapguard itself, so the flooding that
/// SipHash guards against cannot happen, and a multiply per word is all it takes (FxHash's way).
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
}

type KeyCache = HashMap<CacheKey, Counter, std::hash::BuildHasherDefault<KeyHasher>>;

/// All of snapguard's metrics, shared by the proxy, the server and the admin endpoint.
#[derive(Debug)]
pub struct Metrics {
    /// Tells apart the metrics of servers in one process, in the per-thread caches.
    id: usize,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    violations: Family<ViolationLabels, Counter>,
    request_duration: Durations,
    upstream_duration: Durations,
    upstream_errors: Family<KindLabels, Counter>,
    connections: Gauge,
    /// The most connections open at once since [`Metrics::connections_since`] last looked.
    connections_peak: AtomicI64,
    upstream_waiting: Gauge,
    reloads: Family<ResultLabels, Counter>,
    cuts: Family<ReasonLabels, Counter>,
    signed: Counter,
    auth_failures: Family<ReasonLabels, Counter>,
    credential_reloads: Family<ResultLabels, Counter>,
    tls_handshake_failures: Family<ReasonLabels, Counter>,
    tls_reloads: Family<ResultLabels, Counter>,
    tls_expiry: Gauge,
}

/// Every reason a TLS handshake fails for, exported at 0 from start-up.
pub const TLS_HANDSHAKE_FAILURES: [&str; 9] = [
    "timeout",
    "no_client_certificate",
    "bad_client_certificate",
    "not_tls",
    "incompatible",
    "alert_received",
    "protocol",
    "eof",
    "io",
];

/// Every upstream error kind, exported at 0 from start-up so that `increase()` sees the first.
pub const UPSTREAM_ERROR_KINDS: [&str; 8] = [
    "connect",
    "reset",
    "timeout",
    "queue_full",
    "queue_timeout",
    "connect_pace",
    "body_idle",
    "body_too_slow",
];

/// Every reason a peer is cut for, exported at 0 from start-up.
pub const CUT_REASONS: [&str; 7] = [
    "request_body_timeout",
    "body_idle",
    "body_too_slow",
    "body_fragmented",
    "send_idle",
    "send_too_slow",
    "reset_flood",
];

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry: Registry::default(),
            requests: Family::default(),
            violations: Family::default(),
            request_duration: Durations::default(),
            upstream_duration: Durations::default(),
            upstream_errors: Family::default(),
            connections: Gauge::default(),
            connections_peak: AtomicI64::new(0),
            upstream_waiting: Gauge::default(),
            reloads: Family::default(),
            cuts: Family::default(),
            signed: Counter::default(),
            auth_failures: Family::default(),
            credential_reloads: Family::default(),
            tls_handshake_failures: Family::default(),
            tls_reloads: Family::default(),
            tls_expiry: Gauge::default(),
        };
        let mut m = metrics;
        let r = &mut m.registry;
        r.register(
            "snapguard_requests",
            "Requests handled, by route, method, decision and status",
            m.requests.clone(),
        );
        r.register(
            "snapguard_policy_violations",
            "Policy violations found (refused, or forwarded in audit mode), by rule and field",
            m.violations.clone(),
        );
        r.register(
            "snapguard_request_duration_seconds",
            "Time from request to the end of the response",
            m.request_duration.clone(),
        );
        r.register(
            "snapguard_upstream_duration_seconds",
            "Time from sending a request upstream to its response head",
            m.upstream_duration.clone(),
        );
        r.register(
            "snapguard_upstream_errors",
            "Upstream failures, by kind: connect, reset, timeout, queue_full, queue_timeout, \
             body_idle, body_too_slow",
            m.upstream_errors.clone(),
        );
        r.register(
            "snapguard_peers_cut",
            "Exchanges and connections cut for breaking a deadline, by reason",
            m.cuts.clone(),
        );
        r.register(
            "snapguard_connections_active",
            "Downstream connections open now",
            m.connections.clone(),
        );
        r.register(
            "snapguard_upstream_waiting",
            "Requests waiting for an upstream slot (limits.max_upstream_connections reached)",
            m.upstream_waiting.clone(),
        );
        r.register(
            "snapguard_config_reloads",
            "Configuration reloads, by result: success or failure",
            m.reloads.clone(),
        );
        r.register(
            "snapguard_signed_requests",
            "Requests signed with the cloud key on their way upstream ([upstream.signing])",
            m.signed.clone(),
        );
        r.register(
            "snapguard_signature_failures",
            "Callers' signatures refused with 401, by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "snapguard_credential_reloads",
            "Signing keys re-read from their files, by result: success (changed) or failure",
            m.credential_reloads.clone(),
        );
        r.register(
            "snapguard_tls_handshake_failures",
            "Downstream TLS handshakes that failed, by reason",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "snapguard_tls_reloads",
            "TLS certificate files re-read, by result: success (changed and in force) or failure",
            m.tls_reloads.clone(),
        );
        r.register(
            "snapguard_tls_certificate_expiry_timestamp_seconds",
            "When the served TLS certificate expires, in Unix seconds (0 without TLS)",
            m.tls_expiry.clone(),
        );
        r.register(
            "snapguard_build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Every series an alert reads exists from the start, at 0.
        for kind in UPSTREAM_ERROR_KINDS {
            let _ = m.upstream_errors.get_or_create(&KindLabels { kind });
        }
        for reason in CUT_REASONS {
            let _ = m.cuts.get_or_create(&ReasonLabels { reason });
        }
        for result in ["success", "failure"] {
            let _ = m.reloads.get_or_create(&ResultLabels { result });
            let _ = m.credential_reloads.get_or_create(&ResultLabels { result });
        }
        for reason in crate::signing::AUTH_FAILURE_REASONS {
            let _ = m.auth_failures.get_or_create(&ReasonLabels { reason });
        }
        for reason in TLS_HANDSHAKE_FAILURES {
            let _ = m
                .tls_handshake_failures
                .get_or_create(&ReasonLabels { reason });
        }
        for result in ["success", "failure"] {
            let _ = m.tls_reloads.get_or_create(&ResultLabels { result });
        }
        m
    }
}

impl Metrics {
    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn request(&self, labels: RequestLabels, duration: Duration) {
        thread_local! {
            static REQUESTS: RefCell<KeyCache> = RefCell::default();
        }
        // Keyed by where the label strings live, not what they say: hashing four addresses
        // costs a fraction of hashing the text. The labels are static (interned routes, fixed
        // names), so the key is stable; were one string ever at two addresses, both entries
        // would hold the same family counter, and the count would still be right.
        let key = (
            self.id,
            labels.route.as_ptr() as usize,
            labels.method.as_ptr() as usize,
            labels.decision.as_ptr() as usize,
            labels.status,
        );
        REQUESTS.with_borrow_mut(|cache| {
            cache
                .entry(key)
                .or_insert_with(|| self.requests.get_or_create_owned(&labels))
                .inc();
        });
        self.request_duration.observe(duration);
    }

    pub fn violation(&self, rule: &str, field: Option<&str>) {
        let labels = ViolationLabels {
            rule: rule.to_owned(),
            field: field.unwrap_or("").to_owned(),
        };
        self.violations.get_or_create(&labels).inc();
    }

    pub fn upstream(&self, duration: Duration) {
        self.upstream_duration.observe(duration);
    }

    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// The gauge of requests waiting for an upstream connection, kept by the upstream pool.
    /// A TLS handshake that failed.
    pub fn tls_handshake_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// TLS files re-read: `true` when the new ones are in force, `false` when they failed.
    pub fn tls_reload(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.tls_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The served certificate's expiry, in Unix seconds.
    pub fn tls_expiry(&self, not_after: i64) {
        self.tls_expiry.set(not_after);
    }

    /// A request signed with the cloud key.
    pub fn signed(&self) {
        self.signed.inc();
    }

    /// A caller's signature refused.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Signing keys re-read: `true` when they changed, `false` when they could not be read.
    pub fn credential_reload(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.credential_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// A peer cut for breaking a deadline.
    pub fn cut(&self, reason: &'static str) {
        self.cuts.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn upstream_waiting(&self) -> Gauge {
        self.upstream_waiting.clone()
    }

    /// Counts a connection as active until the returned guard is dropped.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        let open = self.connections.inc() + 1;
        self.connections_peak.fetch_max(open, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    /// Connections open now, and the most that were open at once since the last call.
    pub fn connections_since(&self) -> (u64, u64) {
        let open = self.connections.get();
        let peak = self
            .connections_peak
            .swap(open, Ordering::Relaxed)
            .max(open);
        (open.max(0).unsigned_abs(), peak.max(0).unsigned_abs())
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// Upper bounds of the duration buckets, in seconds: 0.5 ms to ~16 s, a proxy hop at the
/// bottom, a slow storage call at the top.
const BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096, 8.192, 16.384,
];

/// A histogram of durations made of atomics: observing one takes no lock.
#[derive(Debug, Clone, Default)]
pub struct Durations(Arc<DurationCounts>);

#[derive(Debug, Default)]
struct DurationCounts {
    /// Observations per bucket (not cumulative); the last is above every bound.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Durations {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let bucket = BOUNDS.partition_point(|bound| *bound < secs);
        let counts = &self.0;
        counts.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        counts.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl EncodeMetric for Durations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = &self.0;
        // Per bucket, not cumulative: the encoder adds them up.
        let buckets: Vec<(f64, u64)> = BOUNDS
            .iter()
            .chain([f64::INFINITY].iter())
            .zip(&counts.buckets)
            .map(|(bound, n)| (*bound, n.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' total, so the two always agree in one scrape.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = counts.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Decrements `snapguard_connections_active` when the connection ends.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

/// The method as a bounded label value.
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_its_labels() {
        let m = Arc::new(Metrics::default());
        m.request(
            RequestLabels {
                route: "/v3/{project_id}/snapshots/{snapshot_id}",
                method: "PUT",
                decision: "rejected",
                status: 400,
            },
            Duration::from_millis(2),
        );
        m.violation("reserved_prefix", Some("name"));
        m.upstream(Duration::from_millis(1));
        m.upstream_error("timeout");
        let _conn = m.connection();
        m.reload(false);
        let text = m.encode();
        for line in [
            r#"snapguard_requests_total{route="/v3/{project_id}/snapshots/{snapshot_id}",method="PUT",decision="rejected",status="400"} 1"#,
            r#"snapguard_policy_violations_total{rule="reserved_prefix",field="name"} 1"#,
            "snapguard_request_duration_seconds_count 1",
            r#"snapguard_request_duration_seconds_bucket{le="0.001"} 0"#,
            r#"snapguard_request_duration_seconds_bucket{le="0.002"} 1"#,
            r#"snapguard_request_duration_seconds_bucket{le="+Inf"} 1"#,
            "snapguard_upstream_duration_seconds_count 1",
            r#"snapguard_upstream_errors_total{kind="timeout"} 1"#,
            "snapguard_connections_active 1",
            r#"snapguard_config_reloads_total{result="failure"} 1"#,
            r#"snapguard_build_info{version=""#,
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
    }
}
