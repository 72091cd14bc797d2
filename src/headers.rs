//! Header surgery on the way through: hop-by-hop stripping, X-Forwarded-*, request ids.
//!
//! Pure functions on `HeaderMap`, applied by the proxy in both directions.

use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes the hop-by-hop headers of RFC 9110 section 7.6.1:
///
/// > Intermediaries MUST parse a received Connection header field before a message is
/// > forwarded and, for each connection-option in this field, remove any header or trailer
/// > field(s) from the message with the same name as the connection-option, and then remove
/// > the Connection header field itself (or replace it with the intermediary's own control
/// > options for the forwarded message).
///
/// plus the fields the RFC names as hop-by-hop even when Connection does not list them:
/// Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding and Upgrade. Names compare
/// case-insensitively (`HeaderName` is lowercase by construction).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|option| HeaderName::from_bytes(option.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Appends the downstream peer to X-Forwarded-For, and sets X-Forwarded-Proto and
/// X-Forwarded-Host to what this hop saw (client-sent values of those two are not trusted).
/// Headers for which `untouchable` holds (covered by a request signature) are left alone.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    proto: &'static str,
    host: Option<HeaderValue>,
    untouchable: impl Fn(&HeaderName) -> bool,
) {
    if !untouchable(&X_FORWARDED_FOR) {
        // The peer's address, formatted on the stack: this runs on every request.
        let mut buf = [0u8; 64];
        let len = {
            let mut rest = &mut buf[..];
            let _ = write!(rest, "{peer}");
            64 - rest.len()
        };
        let peer = &buf[..len];
        let prior: Vec<&[u8]> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let value = if prior.is_empty() {
            HeaderValue::from_bytes(peer)
        } else {
            let mut chain = prior.join(&b", "[..]);
            chain.extend_from_slice(b", ");
            chain.extend_from_slice(peer);
            HeaderValue::from_bytes(&chain)
        };
        if let Ok(value) = value {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    if !untouchable(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !untouchable(&X_FORWARDED_HOST) {
        match host {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }
}

/// Hands out request ids: the downstream's own when it is sane, else a fresh one.
#[derive(Debug)]
pub struct RequestIds {
    /// Random per process, so replicas do not hand out the same ids.
    process: u64,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self {
            process: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    /// The id for a request: its X-Request-Id if that is 1..=200 visible ASCII characters.
    pub fn for_request(&self, headers: &HeaderMap) -> HeaderValue {
        let theirs = headers.get(&X_REQUEST_ID).filter(|v| {
            let b = v.as_bytes();
            (1..=200).contains(&b.len()) && b.iter().all(|c| c.is_ascii_graphic())
        });
        match theirs {
            Some(id) => id.clone(),
            None => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let id = format!("req-{:016x}{:08x}", self.process, n);
                // Hex digits and a dash are always a valid header value; no copy is made.
                HeaderValue::from_maybe_shared(bytes::Bytes::from(id))
                    .unwrap_or(HeaderValue::from_static("req-unknown"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = map(&[
            ("Connection", "Keep-Alive, X-Secret"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("X-SECRET", "1"),
            ("x-other", "2"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "x-t"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Content-Type", "application/json"),
            ("X-Auth-Token", "t"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type", "x-auth-token"]);
    }

    #[test]
    fn forwarded_for_is_appended_and_proto_host_are_set() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
        ]);
        add_forwarded(
            &mut h,
            "127.0.0.1".parse().unwrap(),
            "http",
            Some(HeaderValue::from_static("api:8080")),
            |_| false,
        );
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api:8080");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "::1".parse().unwrap(), "http", None, |_| false);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert!(h.get("x-forwarded-host").is_none());

        // Signed headers stay as they came.
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-host", "signed"),
        ]);
        add_forwarded(&mut h, "::1".parse().unwrap(), "http", None, |n| {
            n != X_FORWARDED_PROTO
        });
        assert_eq!(h["x-forwarded-for"], "1.1.1.1");
        assert_eq!(h["x-forwarded-host"], "signed");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        let ids = RequestIds::default();
        assert_eq!(
            ids.for_request(&map(&[("x-request-id", "abc-123")])),
            "abc-123"
        );
        let made = ids.for_request(&map(&[("x-request-id", "has space")]));
        assert!(made.to_str().unwrap().starts_with("req-"));
        let a = ids.for_request(&HeaderMap::new());
        let b = ids.for_request(&HeaderMap::new());
        assert_ne!(a, b);
    }
}
