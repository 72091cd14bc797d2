//! `snapguard check METHOD PATH < body`: the proxy's decision on one request, offline.
//!
//! Runs the same classification and policy functions as the proxy, so a CI pipeline can test
//! its snapshot names before calling the API.

use std::fmt::Write;

use http::{HeaderMap, Method, Uri};

use crate::config::Config;
use crate::error::Error;
use crate::policy::{self, Mode, Target, Verdict, Violation};
use crate::proxy::Decision;
use crate::route::{self, Class, ErrorStyle, Route};

/// What the proxy would do with a request.
#[derive(Debug)]
pub struct Report<'c> {
    pub route: Option<&'c Route>,
    pub decision: Decision,
    pub violation: Option<Violation>,
    /// The body that would be forwarded, when the request would be forwarded.
    pub forwarded: Option<Vec<u8>>,
}

impl Report<'_> {
    /// Whether the request would reach the upstream.
    pub fn allowed(&self) -> bool {
        self.decision != Decision::Rejected
    }

    /// The human- and grep-friendly report printed by `snapguard check`.
    pub fn render(&self, config: &Config) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "decision: {}", self.decision.as_str());
        let _ = writeln!(out, "route: {}", self.route.map_or("none", |r| r.template));
        if let Some(v) = &self.violation {
            let _ = writeln!(out, "rule: {}", v.rule());
            if let Some(field) = v.field() {
                let _ = writeln!(out, "field: {field}");
            }
            let error = Error::Policy(v.clone());
            let style = self.route.map_or(ErrorStyle::Openstack, |r| r.error_style);
            if self.decision == Decision::Rejected {
                let _ = writeln!(out, "status: {}", error.status().as_u16());
                let _ = writeln!(
                    out,
                    "response body: {}",
                    error.document(style, &config.errors)
                );
            } else if self.decision == Decision::Exempt {
                let _ = writeln!(out, "allowed: the project is exempt from this rule");
            } else {
                let _ = writeln!(
                    out,
                    "would be refused in enforce mode with: {}",
                    error.document(style, &config.errors)
                );
            }
        }
        if let Some(body) = &self.forwarded {
            let _ = writeln!(out, "forwarded body: {}", String::from_utf8_lossy(body));
        }
        out
    }
}

/// Decides on a request as the proxy would.
pub fn evaluate<'c>(
    config: &'c Config,
    method: &Method,
    headers: &HeaderMap,
    target: &Uri,
    body: &[u8],
) -> Report<'c> {
    let refuse = |route, v: Violation| Report {
        route,
        decision: match config.policy.mode {
            Mode::Enforce => Decision::Rejected,
            Mode::Audit => Decision::Audit,
        },
        forwarded: (config.policy.mode == Mode::Audit).then(|| body.to_vec()),
        violation: Some(v),
    };
    let (route, project) = match route::classify(&config.routes, method, headers, target) {
        Class::Passthrough => {
            return Report {
                route: None,
                decision: Decision::Passthrough,
                violation: None,
                forwarded: Some(body.to_vec()),
            }
        }
        Class::Ambiguous => return refuse(None, Violation::AmbiguousPath),
        Class::Policed { route, project_id } => (route, project_id),
    };
    let target = Target {
        route,
        project: project.as_deref(),
    };
    let checked = policy::check_headers(headers).and_then(|()| {
        let may_normalize = !policy::is_signed(headers);
        policy::check_body(target, &config.policy, &config.rules, body, may_normalize)
    });
    let allowed = match checked {
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
    }
}
