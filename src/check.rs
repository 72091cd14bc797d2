//! `snapguard check`: the proxy's decision on requests, offline.
//!
//! Goes through the proxy's own decision ([`crate::decide`]), so a CI pipeline can test its
//! snapshot names before calling the API, and a test can compare snapguard's reading of many
//! requests with another system's (`check --batch`, one JSON line in and one out per request).

use std::fmt::Write;
use std::io::BufRead;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde::Deserialize;

use crate::config::Config;
use crate::decide::{self, Head};
use crate::error::Error;
use crate::policy::{Mode, Verdict, Violation};
use crate::proxy::Decision;
use crate::route::{ErrorStyle, Route};

/// What the proxy would do with a request.
#[derive(Debug)]
pub struct Report<'c> {
    pub route: Option<&'c Route>,
    pub decision: Decision,
    pub violation: Option<Violation>,
    /// The body that would be forwarded, when the request would be forwarded.
    pub forwarded: Option<Vec<u8>>,
    /// Set when the request would be refused for something other than a policy violation.
    pub refused_method: Option<Method>,
}

impl Report<'_> {
    /// Whether the request would reach the upstream.
    pub fn allowed(&self) -> bool {
        self.decision != Decision::Rejected
    }

    /// The error the downstream would get (or, in audit mode, would get when enforcing).
    fn error(&self) -> Option<Error> {
        match (&self.refused_method, &self.violation) {
            (Some(m), _) => Some(Error::Method(m.clone())),
            (None, Some(v)) => Some(Error::Policy(v.clone())),
            (None, None) => None,
        }
    }

    fn style(&self) -> ErrorStyle {
        self.route.map_or(ErrorStyle::Openstack, |r| r.error_style)
    }

    /// The labelled, grep-friendly report `snapguard check` prints on stderr: decision, route,
    /// and the rule, field and status of a violation. The body itself is [`Report::body`].
    pub fn render(&self, config: &Config) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "decision: {}", self.decision.as_str());
        let _ = writeln!(out, "route: {}", self.route.map_or("none", |r| r.template));
        if let Some(v) = &self.violation {
            let _ = writeln!(out, "rule: {}", v.rule());
            if let Some(field) = v.field() {
                let _ = writeln!(out, "field: {field}");
            }
        }
        if let Some(error) = self.error() {
            if self.decision == Decision::Rejected {
                let _ = writeln!(out, "status: {}", error.status().as_u16());
            } else if self.decision == Decision::Exempt {
                let _ = writeln!(out, "allowed: the project is exempt from this rule");
            } else {
                let document = error.document(self.style(), &config.errors);
                let _ = writeln!(
                    out,
                    "would be refused in enforce mode with: {} {document}",
                    error.status().as_u16()
                );
            }
        }
        out
    }

    /// What `snapguard check` prints on stdout: the body the upstream would receive, byte for
    /// byte, or, when refused, the error body the downstream would get.
    pub fn body(&self, config: &Config) -> Vec<u8> {
        match (self.refusal(), &self.forwarded) {
            (Some(error), _) => error.document(self.style(), &config.errors).into_bytes(),
            (None, Some(body)) => body.clone(),
            (None, None) => Vec::new(),
        }
    }

    /// The error the downstream gets, when the request is refused.
    fn refusal(&self) -> Option<Error> {
        (self.decision == Decision::Rejected)
            .then(|| self.error())
            .flatten()
    }

    /// The verdict as one JSON object: decision, route, rule, field, status (when refused) and
    /// body (the forwarded body, or the error body when refused).
    pub fn to_json(&self, config: &Config) -> serde_json::Value {
        let refused = self.refusal();
        let body = match (&refused, &self.forwarded) {
            (Some(error), _) => Some(error.document(self.style(), &config.errors)),
            (None, Some(body)) => Some(String::from_utf8_lossy(body).into_owned()),
            (None, None) => None,
        };
        serde_json::json!({
            "decision": self.decision.as_str(),
            "route": self.route.map(|r| r.template),
            "rule": self.violation.as_ref().map(|v| v.rule()),
            "field": self.violation.as_ref().and_then(|v| v.field()),
            "status": refused.map(|e| e.status().as_u16()),
            "body": body,
        })
    }
}

/// One request of `check --batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    method: String,
    /// The request target exactly as it would be on the request line.
    target: String,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: String,
}

/// A request as hyper would hand it over, or why hyper would refuse it with 400 first.
fn parse_request(r: &BatchRequest) -> Result<(Method, Uri, HeaderMap), String> {
    // Exactly as sent: hyper takes the method token as it is, in any case.
    let method = Method::from_bytes(r.method.as_bytes())
        .map_err(|_| format!("{:?} is not an HTTP method token", r.method))?;
    let uri = r
        .target
        .parse::<Uri>()
        .map_err(|e| format!("{:?} is not a request target: {e}", r.target))?;
    let mut headers = HeaderMap::new();
    for (name, value) in &r.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))?;
        let value =
            HeaderValue::from_str(value).map_err(|_| format!("{value:?} is not a header value"))?;
        headers.append(name, value);
    }
    Ok((method, uri, headers))
}

/// `check --batch`: one JSON request per input line, one JSON verdict per output line, in order.
/// A request hyper would refuse before snapguard sees it gets `"decision": "invalid"`.
pub fn batch(
    config: &Config,
    input: impl BufRead,
    mut output: impl std::io::Write,
) -> Result<(), String> {
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read line {}: {e}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let request: BatchRequest = serde_json::from_str(&line)
            .map_err(|e| format!("line {}: not a batch request: {e}", n + 1))?;
        let verdict = match parse_request(&request) {
            Ok((method, uri, headers)) => {
                evaluate(config, &method, &headers, &uri, request.body.as_bytes()).to_json(config)
            }
            Err(error) => serde_json::json!({
                "decision": "invalid",
                "route": null,
                "rule": null,
                "field": null,
                "status": 400,
                "body": null,
                "error": error,
            }),
        };
        writeln!(output, "{verdict}").map_err(|e| format!("cannot write: {e}"))?;
    }
    output.flush().map_err(|e| format!("cannot write: {e}"))
}

/// Decides on a request as the proxy would, through the proxy's own two steps.
pub fn evaluate<'c>(
    config: &'c Config,
    method: &Method,
    headers: &HeaderMap,
    target: &Uri,
    body: &[u8],
) -> Report<'c> {
    let refuse = |route, v: Violation| Report {
        route,
        decision: decide::on_violation(config.policy.mode),
        forwarded: (config.policy.mode == Mode::Audit).then(|| body.to_vec()),
        violation: Some(v),
        refused_method: None,
    };
    let (route, project) = match decide::head(config, method, headers, target) {
        Head::Passthrough => {
            return Report {
                route: None,
                decision: Decision::Passthrough,
                violation: None,
                forwarded: Some(body.to_vec()),
                refused_method: None,
            }
        }
        // Refused in every mode, as the proxy refuses it; not a policy violation.
        Head::Connect => {
            return Report {
                route: None,
                decision: Decision::Rejected,
                violation: None,
                forwarded: None,
                refused_method: Some(Method::CONNECT),
            }
        }
        Head::Violation { route, violation } => return refuse(Some(route), violation),
        Head::Police { route, project } => (route, project),
    };
    let allowed = match decide::body(config, route, project.as_deref(), headers, body) {
        Ok(allowed) => allowed,
        Err(v) => return refuse(Some(route), v),
    };
    let (decision, forwarded) = match allowed.body {
        Verdict::Unchanged => (Decision::Allowed, body.to_vec()),
        Verdict::Normalized(normalized) => (Decision::Normalized, normalized),
    };
    Report {
        route: Some(route),
        decision: if allowed.exempted.is_some() {
            Decision::Exempt
        } else {
            decision
        },
        violation: allowed.exempted,
        forwarded: Some(forwarded),
        refused_method: None,
    }
}
