//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Every series has a bounded label set: routes come from the config, decisions, rules and
//! error kinds are fixed names, methods outside the standard ones are counted as `OTHER`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Labels of `snapguard_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template, or `none` for passthrough traffic.
    pub route: Arc<str>,
    pub method: &'static str,
    pub decision: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViolationLabels {
    rule: String,
    field: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// All of snapguard's metrics, shared by the proxy, the server and the admin endpoint.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    violations: Family<ViolationLabels, Counter>,
    request_duration: Histogram,
    upstream_duration: Histogram,
    upstream_errors: Family<KindLabels, Counter>,
    connections: Gauge,
    reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        // 0.5 ms to ~16 s: a proxy hop at the bottom, a slow storage call at the top.
        let buckets = || exponential_buckets(0.0005, 2.0, 16);
        let metrics = Self {
            registry: Registry::default(),
            requests: Family::default(),
            violations: Family::default(),
            request_duration: Histogram::new(buckets()),
            upstream_duration: Histogram::new(buckets()),
            upstream_errors: Family::default(),
            connections: Gauge::default(),
            reloads: Family::default(),
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
            "Upstream failures, by kind: connect, reset, timeout",
            m.upstream_errors.clone(),
        );
        r.register(
            "snapguard_connections_active",
            "Downstream connections open now",
            m.connections.clone(),
        );
        r.register(
            "snapguard_config_reloads",
            "Configuration reloads, by result: success or failure",
            m.reloads.clone(),
        );
        r.register(
            "snapguard_build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
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

    pub fn request(&self, labels: &RequestLabels, duration: Duration) {
        self.requests.get_or_create(labels).inc();
        self.request_duration.observe(duration.as_secs_f64());
    }

    pub fn violation(&self, rule: &str, field: Option<&str>) {
        let labels = ViolationLabels {
            rule: rule.to_owned(),
            field: field.unwrap_or("").to_owned(),
        };
        self.violations.get_or_create(&labels).inc();
    }

    pub fn upstream(&self, duration: Duration) {
        self.upstream_duration.observe(duration.as_secs_f64());
    }

    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Counts a connection as active until the returned guard is dropped.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.inc();
        ConnectionGuard(self.clone())
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
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
            &RequestLabels {
                route: Arc::from("/v3/{project_id}/snapshots/{snapshot_id}"),
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
