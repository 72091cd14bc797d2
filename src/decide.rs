//! The one decision on a request, shared by the proxy and `snapguard check`.
//!
//! A proxy must decide in two steps: from the request head, whether the body is to be read at
//! all, and then on the body it read. Both steps live here, as pure functions, and both callers
//! go through them in the same order, so an offline check cannot say yes where the proxy says
//! no (OPA's `opa eval` and its server share one evaluator for the same reason).

use http::{header, HeaderMap, Method, Uri};

use crate::access::Decision;
use crate::config::Config;
use crate::policy::{self, Allowed, Mode, Target, Violation};
use crate::route::{self, Class, Route};

/// What the request head alone decides.
#[derive(Debug)]
pub enum Head<'c> {
    /// Not a policed route: stream it upstream as it is.
    Passthrough,
    /// `CONNECT`: a reverse proxy never tunnels, in any mode.
    Connect,
    /// A violation found before any body is read (an ambiguous path, a Content-Type that cannot
    /// be policed, a declared length over the limit); for an ambiguous path, `route` is the one
    /// a reading of it matched.
    Violation {
        route: &'c Route,
        violation: Violation,
    },
    /// Read at most `max_body_bytes` of the body, then call [`body`].
    Police {
        route: &'c Route,
        /// The `{project_id}` the path names, decoded.
        project: Option<String>,
    },
}

/// Decides on a request head: its method, headers and target.
pub fn head<'c>(config: &'c Config, method: &Method, headers: &HeaderMap, uri: &Uri) -> Head<'c> {
    let (route, project) = match route::classify(&config.routes, method, headers, uri) {
        Class::Passthrough if method == Method::CONNECT => return Head::Connect,
        Class::Passthrough => return Head::Passthrough,
        Class::Ambiguous(route, why) => {
            return Head::Violation {
                route,
                violation: Violation::AmbiguousPath(why),
            }
        }
        Class::Policed { route, project_id } => (route, project_id),
    };
    let limit = config.policy.max_body_bytes;
    let declared_too_large = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > limit as u64);
    let early = match policy::check_headers(headers) {
        Ok(()) if declared_too_large => Err(Violation::BodyTooLarge { limit }),
        checked => checked,
    };
    match early {
        Err(violation) => Head::Violation { route, violation },
        Ok(()) => Head::Police { route, project },
    }
}

/// Decides on the body of a request that [`head`] sent to be policed.
pub fn body(
    config: &Config,
    route: &Route,
    project: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Allowed, Violation> {
    let target = Target { route, project };
    // A caller's signature covers the body's hash: an allowed signed body goes on byte for
    // byte, unless snapguard signs the request itself.
    let may_normalize = config.upstream.signing.is_some() || !policy::is_signed(headers);
    policy::check_body(target, &config.policy, &config.rules, body, may_normalize)
}

/// What becomes of a request with a violation: refused, or forwarded as it is in audit mode.
pub fn on_violation(mode: Mode) -> Decision {
    match mode {
        Mode::Enforce => Decision::Rejected,
        Mode::Audit => Decision::Audit,
    }
}
