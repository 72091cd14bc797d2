//! The Grafana dashboard (`deploy/grafana/snapguard.json`) and the alert rules
//! (`deploy/prometheus/alerts.yaml`) against the metrics the real binary exports.
//!
//! Every PromQL expression of both is parsed (promql-parser; and by Prometheus' own parser too,
//! through `promtool check rules`, where promtool is installed, as .ci/run installs it), and every
//! metric it selects must be one snapguard exports on its admin port, every label it matches on
//! or groups by one that metric's series carry (or `job` and `instance`, which Prometheus adds
//! when it scrapes). A counter with labels is not in the exposition at all until its first
//! event, so the test makes one of each (a refused request, a request to a dead upstream, a
//! SIGHUP) before it reads the names and labels, and prints which had no series at start-up.
//! What the alerts read must be there at start-up, at 0, so that their first event counts.

// Tests fail by panicking; the no-unwrap rule is for the request path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use http::Version;
use promql_parser::label::Matchers;
use promql_parser::parser::{self, AggregateExpr, Expr, LabelModifier, VectorSelector};
use promql_parser::util::{walk_expr, ExprVisitor};
use support::{admin_get, free_addr, send, Binary};

const BIN: &str = env!("CARGO_BIN_EXE_snapguard");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/snapguard.json");
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yaml");

/// Labels every scraped series gets from Prometheus itself.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// One expression, and where it comes from.
struct Query {
    origin: String,
    expr: String,
}

/// Every PromQL expression of the dashboard: each target's `expr`, and the selector of each
/// `label_values(SELECTOR, label)` variable query. Grafana's variables are replaced by what
/// they stand for (a regex for `$job`, a duration for `$__rate_interval`).
fn dashboard_queries() -> Vec<Query> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut queries = Vec::new();
    let mut panels: Vec<&serde_json::Value> =
        dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        // Collapsed rows hold their panels.
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {:?} has a target without expr", panel["title"]));
            queries.push(Query {
                origin: format!(
                    "dashboard panel {:?}",
                    panel["title"].as_str().unwrap_or("")
                ),
                expr: grafana_to_promql(expr),
            });
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap();
        let selector = query
            .strip_prefix("label_values(")
            .and_then(|rest| rest.rsplit_once(','))
            .map(|(selector, _label)| selector)
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: not label_values(SELECTOR, label)",
                    var["name"]
                )
            });
        queries.push(Query {
            origin: format!("dashboard variable {}", var["name"]),
            expr: grafana_to_promql(selector),
        });
    }
    assert!(queries.len() >= 10, "the dashboard has too few queries");
    queries
}

fn grafana_to_promql(expr: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    for var in ["job", "instance"] {
        out = out
            .replace(&format!("${{{var}}}"), ".+")
            .replace(&format!("${var}"), ".+");
    }
    assert!(!out.contains('$'), "an unknown Grafana variable in {expr}");
    out
}

/// Every `expr` of every rule of the alert rules file.
fn alert_queries() -> Vec<Query> {
    let docs =
        yaml_rust2::YamlLoader::load_from_str(&std::fs::read_to_string(ALERTS).unwrap()).unwrap();
    let mut queries = Vec::new();
    for doc in &docs {
        for group in doc["groups"].as_vec().unwrap() {
            for rule in group["rules"].as_vec().unwrap() {
                let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap();
                queries.push(Query {
                    origin: format!("alert {name}"),
                    expr: rule["expr"].as_str().unwrap().to_owned(),
                });
            }
        }
    }
    assert!(!queries.is_empty(), "no rules in {ALERTS}");
    queries
}

/// The metric names and label names a parsed expression uses.
#[derive(Default)]
struct Used {
    /// Metric name -> the label names its selectors match on.
    selectors: BTreeMap<String, BTreeSet<String>>,
    /// Label names of `by (...)` / `without (...)` clauses.
    grouping: BTreeSet<String>,
}

impl Used {
    fn selector(&mut self, vs: &VectorSelector) {
        let name = vs.name.clone().unwrap_or_else(|| {
            matcher_names(&vs.matchers)
                .into_iter()
                .find(|(label, _)| label == "__name__")
                .map(|(_, value)| value)
                .expect("a selector without a metric name")
        });
        let labels = self.selectors.entry(name).or_default();
        for (label, _) in matcher_names(&vs.matchers) {
            if label != "__name__" {
                labels.insert(label);
            }
        }
    }
}

fn matcher_names(m: &Matchers) -> Vec<(String, String)> {
    m.matchers
        .iter()
        .chain(m.or_matchers.iter().flatten())
        .map(|m| (m.name.clone(), m.value.clone()))
        .collect()
}

impl ExprVisitor for Used {
    type Error = String;
    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        match expr {
            Expr::VectorSelector(vs) => self.selector(vs),
            Expr::MatrixSelector(ms) => self.selector(&ms.vs),
            Expr::Aggregate(AggregateExpr {
                modifier: Some(LabelModifier::Include(l) | LabelModifier::Exclude(l)),
                ..
            }) => self.grouping.extend(l.labels.iter().cloned()),
            _ => {}
        }
        Ok(true)
    }
}

/// What a scrape says: each sample name with the label names of its series, and the sample
/// names each `# TYPE` line declares (a counter `x` is sampled as `x_total`, a histogram as
/// `x_bucket`, `x_sum` and `x_count`, an info metric as `x_info`).
#[derive(Debug, Default)]
struct Exposition {
    declared: BTreeSet<String>,
    series: BTreeMap<String, BTreeSet<String>>,
}

fn read_exposition(text: &str) -> Exposition {
    let mut e = Exposition::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let samples: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            e.declared
                .extend(samples.iter().map(|suffix| format!("{name}{suffix}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap();
            let labels = e.series.entry(line[..name_end].to_owned()).or_default();
            if let Some(set) = line[name_end..].strip_prefix('{') {
                let set = &set[..set.rfind('}').unwrap()];
                // Label values here are route templates and fixed words: no `,` or `=` in them
                // but inside quotes, so splitting on `",` is enough.
                for pair in set.split("\",") {
                    labels.insert(pair.split_once('=').unwrap().0.to_owned());
                }
            }
        }
    }
    e
}

async fn scrape(admin: std::net::SocketAddr) -> String {
    let got = admin_get(admin, "/metrics").await;
    assert_eq!(got.status, 200);
    String::from_utf8(got.body.to_vec()).unwrap()
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_metrics_snapguard_exports() {
    // An upstream nobody listens on: a passthrough request then counts an upstream error.
    let dead = format!("http://{}", free_addr());
    let bin = Binary::start(BIN, &dead, "", &[]).await;
    let at_start_text = scrape(bin.admin).await;
    let at_start = read_exposition(&at_start_text);

    // One event of each kind that creates labelled series.
    let refused = send(
        Version::HTTP_11,
        "PUT",
        &bin.url("/v3/p/snapshots/s"),
        &[("content-type", "application/json")],
        r#"{"snapshot":{"name":"autobk_snapshot_x"}}"#,
    )
    .await;
    assert_eq!(refused.status, 400);
    let failed = send(Version::HTTP_11, "GET", &bin.url("/"), &[], "").await;
    assert_eq!(failed.status, 502);
    bin.signal("HUP");
    support::await_sample(
        bin.admin,
        r#"snapguard_config_reloads_total{result="success"}"#,
        1.0,
    )
    .await;
    support::await_sample(
        bin.admin,
        r#"snapguard_upstream_errors_total{kind="connect"}"#,
        1.0,
    )
    .await;
    let after = read_exposition(&scrape(bin.admin).await);

    // A label family with no series yet is not in the exposition at all, not even its # TYPE.
    let silent: Vec<&String> = after
        .series
        .keys()
        .filter(|name| !at_start.series.contains_key(*name))
        .collect();
    eprintln!(
        "metrics with no series at start-up (they appear with their first event): {silent:?}"
    );

    // Every series an alert reads with `increase()` is there at 0 from start-up: a series
    // born at its first event has no earlier sample, so `increase(...) > 0` would never see
    // that first event. Violations are the exception: their series are by rule and field
    // (configured rules included), and their alert is a rate spike, which one event cannot be.
    let mut problems = Vec::new();
    for q in alert_queries() {
        let mut used = Used::default();
        walk_expr(&mut used, &parser::parse(&q.expr).unwrap()).unwrap();
        for metric in used.selectors.keys() {
            if metric != "snapguard_policy_violations_total"
                && !at_start.series.contains_key(metric)
            {
                problems.push(format!("{}: {metric} has no series at start-up", q.origin));
            }
        }
    }
    for series in [
        r#"snapguard_config_reloads_total{result="failure"} 0"#,
        r#"snapguard_tls_reloads_total{result="failure"} 0"#,
        r#"snapguard_upstream_errors_total{kind="queue_full"} 0"#,
        r#"snapguard_upstream_errors_total{kind="queue_timeout"} 0"#,
    ] {
        if !at_start_text.lines().any(|line| line == series) {
            problems.push(format!("not exported at start-up: {series}"));
        }
    }

    let queries: Vec<Query> = dashboard_queries()
        .into_iter()
        .chain(alert_queries())
        .collect();
    let mut used_metrics = BTreeSet::new();
    for q in &queries {
        let expr = match parser::parse(&q.expr) {
            Ok(expr) => expr,
            Err(e) => {
                problems.push(format!("{}: does not parse: {e}\n  {}", q.origin, q.expr));
                continue;
            }
        };
        let mut used = Used::default();
        walk_expr(&mut used, &expr).unwrap();
        let mut labels_in_scope: BTreeSet<String> =
            TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for (metric, matched) in &used.selectors {
            used_metrics.insert(metric.clone());
            if !after.declared.contains(metric) && !after.series.contains_key(metric) {
                problems.push(format!("{}: snapguard does not export {metric}", q.origin));
                continue;
            }
            let carried = after.series.get(metric).cloned().unwrap_or_default();
            labels_in_scope.extend(carried.iter().cloned());
            for label in matched {
                if !carried.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!(
                        "{}: {metric} has no label {label} (it has {carried:?})",
                        q.origin
                    ));
                }
            }
        }
        for label in &used.grouping {
            if !labels_in_scope.contains(label) {
                problems.push(format!(
                    "{}: groups by {label}, which none of its metrics carries",
                    q.origin
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let unused: Vec<&String> = after
        .declared
        .iter()
        .filter(|name| !used_metrics.contains(*name) && !name.ends_with("_sum"))
        .collect();
    eprintln!("exported metrics no dashboard panel or alert reads: {unused:?}");

    promtool_check(&queries);
}

/// Prometheus' own parser on every expression, as recording rules, where promtool is installed.
fn promtool_check(queries: &[Query]) {
    let Ok(version) = std::process::Command::new("promtool")
        .arg("--version")
        .output()
    else {
        eprintln!("promtool is not installed: expressions checked with promql-parser alone");
        return;
    };
    assert!(version.status.success());
    let mut rules = String::from("groups:\n  - name: snapguard-dashboard-check\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        // A JSON string is a YAML double-quoted scalar.
        let expr = serde_json::to_string(&q.expr).unwrap();
        rules.push_str(&format!(
            "      - record: snapguard:check_{i}\n        expr: {expr}\n"
        ));
    }
    let file = std::env::temp_dir().join(format!("snapguard-promql-{}.yaml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
