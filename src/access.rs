//! The access record of one exchange: written to the access log and to the metrics when the
//! exchange ends ([`Exchange::finish`], called by [`crate::body::Logged`] once the response
//! body has been sent, or abandoned), so its byte counts and duration are whole.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method};

use crate::body::Progress;
use crate::metrics::{method_label, Metrics, RequestLabels};

/// What snapguard did with a request; the `decision` of the access log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not a policed route: streamed as is.
    Passthrough,
    /// Policed and forwarded byte for byte.
    Allowed,
    /// Policed and forwarded with legacy fields renamed.
    Normalized,
    /// Refused by the policy (or unreadable), never sent upstream.
    Rejected,
    /// A violation forwarded anyway, in audit mode.
    Audit,
    /// A reserved name allowed for an exempt project.
    Exempt,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passthrough => "passthrough",
            Self::Allowed => "allowed",
            Self::Normalized => "normalized",
            Self::Rejected => "rejected",
            Self::Audit => "audit",
            Self::Exempt => "exempt",
        }
    }
}

/// One request's record, filled in on the way; [`Exchange::finish`] writes it.
#[derive(Debug)]
pub struct Exchange {
    pub started: Instant,
    pub method: Method,
    /// The request path, without the query (which may carry tokens). A copy: the request's
    /// own `Uri` shares the buffer its whole head was read into (8 KiB), which the record
    /// would keep for as long as the response is being sent.
    pub path: String,
    pub route: Option<&'static str>,
    pub decision: Decision,
    /// The policy rule violated, if any.
    pub rule: Option<Cow<'static, str>>,
    /// Why no upstream response was relayed, if so (`Error::kind`).
    pub error: Option<&'static str>,
    pub status: u16,
    pub request_id: HeaderValue,
    /// The caller's access key, when its signature was verified.
    pub caller: Option<String>,
    /// The subject of the client certificate, with mutual TLS.
    pub client: Option<Arc<str>>,
    pub upstream: Option<Duration>,
    /// Request body bytes received, counted as the request body streams or is read.
    pub bytes_in: Arc<Progress>,
    /// Response body bytes sent, counted by the response body.
    pub bytes_out: u64,
    pub metrics: Arc<Metrics>,
}

impl Exchange {
    /// The end of the exchange: one access line, and the request counted.
    pub fn finish(self: Box<Self>) {
        let duration = self.started.elapsed();
        let route = self.route.unwrap_or("none");
        self.metrics.request(
            RequestLabels {
                route,
                method: method_label(&self.method),
                decision: self.decision.as_str(),
                status: self.status,
            },
            duration,
        );
        tracing::info!(
            target: "snapguard::access",
            method = %self.method,
            path = %self.path,
            status = self.status,
            route = %route,
            decision = self.decision.as_str(),
            rule = self.rule.as_deref().unwrap_or("-"),
            error = self.error.unwrap_or("-"),
            bytes_in = self.bytes_in.received(),
            bytes_out = self.bytes_out,
            duration_ms = duration.as_secs_f64() * 1000.0,
            upstream_ms = self.upstream.map_or(-1.0, |d| d.as_secs_f64() * 1000.0),
            request_id = self.request_id.to_str().unwrap_or("-"),
            caller = self.caller.as_deref().unwrap_or("-"),
            client = self.client.as_deref().unwrap_or("-"),
        );
    }
}
