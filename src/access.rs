//! The access record of one exchange: written to the access log and to the metrics when the
//! exchange ends ([`Exchange::finish`], with how it ended: called by [`crate::body::Logged`]
//! when the response was sent to its end, broke off on the upstream's side, or was abandoned
//! by the downstream; and by the proxy when the client went away before any response), so its
//! byte counts, duration and outcome are whole.

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
    /// The client went away before its response: whatever was decided, nothing was answered.
    Abandoned,
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
            Self::Abandoned => "abandoned",
            Self::Audit => "audit",
            Self::Exempt => "exempt",
        }
    }
}

/// How an exchange ended, once its response head was on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The response was handed on to its end.
    Complete,
    /// The downstream stopped taking the response before its end (it went away, reset its
    /// stream, or its connection was cut).
    Abandoned,
    /// The response body broke off on the upstream's side: stalled past its pace (the
    /// [`crate::lifetime::Stall`]'s reason) or broken (`reset`).
    Upstream(&'static str),
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
    /// The end of the exchange: one access line, the request counted, and a body that broke
    /// off counted once, as the peer's cut (the request body stalled, which also breaks the
    /// response) or as the upstream's error.
    pub fn finish(mut self: Box<Self>, end: End) {
        let duration = self.started.elapsed();
        let route = self.route.unwrap_or("none");
        let end = match (self.bytes_in.broke(), end) {
            (Some(Some(stall)), _) => {
                self.metrics.cut(stall.reason());
                self.error.get_or_insert(stall.reason());
                "request_cut"
            }
            (Some(None), _) => {
                self.error.get_or_insert("downstream_body");
                "request_broke"
            }
            (None, End::Upstream(kind)) => {
                self.metrics.upstream_error(kind);
                self.error.get_or_insert(kind);
                "upstream_broke"
            }
            (None, End::Abandoned) => "abandoned",
            (None, End::Complete) => "complete",
        };
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
            end,
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
