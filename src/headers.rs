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
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The fields RFC 9110 names as hop-by-hop even when Connection does not list them, and
/// Connection itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ]
    .contains(name)
}

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
    // Most messages carry none: one look at each name costs less than seven removals.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|option| HeaderName::from_bytes(option.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let hop_by_hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in hop_by_hop {
        headers.remove(name);
    }
}

/// A downstream peer's address as an X-Forwarded-For element, made once per connection.
pub fn forwarded_for(ip: IpAddr) -> HeaderValue {
    let mut buf = [0u8; 64];
    let len = {
        let mut rest = &mut buf[..];
        let _ = write!(rest, "{ip}");
        64 - rest.len()
    };
    // An address's text is digits, hex, dots and colons: always a valid value.
    HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Who is on the other end of a downstream connection, as the forwarding headers tell it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's address as an X-Forwarded-For element ([`forwarded_for`]).
    pub forwarded_for: HeaderValue,
    /// Its `for=` element of `Forwarded` (RFC 7239: IPv6 quoted and bracketed).
    pub forwarded_node: String,
    /// Whether snapguard terminated TLS on this connection: the proto is then `https`.
    pub tls: bool,
    /// Whether the peer is one of `forwarding.trusted_proxies`, whose forwarding headers are
    /// kept and appended to; anyone else's `X-Forwarded-*` are overwritten and its `Forwarded`
    /// removed ([`add_forwarded`]).
    pub trusted: bool,
    /// The subject of the client certificate, with mutual TLS.
    pub client: Option<std::sync::Arc<str>>,
}

impl Peer {
    pub fn new(ip: IpAddr, tls: bool, trusted: bool) -> Self {
        Self {
            forwarded_for: forwarded_for(ip),
            forwarded_node: match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("\"[{v6}]\""),
            },
            tls,
            trusted,
            client: None,
        }
    }

    fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// `Forwarded` (RFC 7239).
pub const FORWARDED: HeaderName = header::FORWARDED;

/// What is wrong with a request's Host, if anything (RFC 9112 section 3.2): an HTTP/1.1 request
/// must carry exactly one, and it must be a plain `host[:port]`, unless its target is in
/// absolute form, whose authority then stands for it. Anything else would reach the upstream as
/// the upstream's own Host, and its links would name the upstream's internal address.
pub fn host_problem(
    version: http::Version,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Option<&'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Some("more than one Host header"),
        (Some(host), None) if !is_host(host.as_bytes()) => Some("a Host that is not host[:port]"),
        (None, _) if version == http::Version::HTTP_11 && uri.authority().is_none() => {
            Some("no Host header")
        }
        _ => None,
    }
}

/// Forwarding headers some frameworks read that snapguard does not set: from anyone but a
/// trusted proxy they are removed (oslo.middleware puts `X-Forwarded-Prefix` in front of every
/// link Cinder writes).
const OTHER_FORWARDING: [HeaderName; 3] = [
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-real-ip"),
];

/// Whether `name` is a header that tells the upstream where a request came from: only a
/// trusted proxy's are kept, whatever else covers them.
pub fn is_forwarding(name: &HeaderName) -> bool {
    [
        X_FORWARDED_FOR,
        X_FORWARDED_PROTO,
        X_FORWARDED_HOST,
        FORWARDED,
    ]
    .contains(name)
        || OTHER_FORWARDING.contains(name)
}

/// Whether `value` is a plain `host[:port]`: a name, an IPv4 address or a bracketed IPv6 one,
/// and digits after a colon.
pub fn is_host(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 255 && value.iter().all(|b| HOST_BYTE[usize::from(*b)])
}

/// The bytes of a plain `host[:port]`, one lookup each (checked on every request).
const HOST_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] =
            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b':' | b'[' | b']');
        b += 1;
    }
    table
};

/// Sets the forwarding headers. From a trusted proxy, its `X-Forwarded-For` is appended to, its
/// `X-Forwarded-Proto` and `X-Forwarded-Host` are kept, and its `Forwarded`, if it sent one, is
/// kept and appended to. From anyone else, the three `X-Forwarded-*` are overwritten with what
/// this hop saw and `Forwarded` is removed, so a client cannot make the upstream believe it came
/// from elsewhere or over TLS. A `Forwarded` chain is never started (see below). Headers for
/// which `untouchable` holds (covered by a request signature) are left alone.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    peer: &Peer,
    host: Option<HeaderValue>,
    untouchable: impl Fn(&HeaderName) -> bool,
) {
    // A trusted proxy's chain, continued with this hop's element.
    let appended = |headers: &HeaderMap, name: &HeaderName, element: &[u8]| {
        let mut chain: Vec<u8> = Vec::new();
        for prior in headers.get_all(name) {
            chain.extend_from_slice(prior.as_bytes());
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(element);
        HeaderValue::from_bytes(&chain).ok()
    };
    if !untouchable(&X_FORWARDED_FOR) {
        let value = match peer.trusted {
            true => appended(headers, &X_FORWARDED_FOR, peer.forwarded_for.as_bytes()),
            false => None,
        };
        headers.insert(
            X_FORWARDED_FOR,
            value.unwrap_or_else(|| peer.forwarded_for.clone()),
        );
    }
    // Most requests carry none of the other forwarding headers: one look at each name costs
    // less than a removal of each.
    if !peer.trusted && headers.keys().any(|n| OTHER_FORWARDING.contains(n)) {
        for name in &OTHER_FORWARDING {
            if !untouchable(name) {
                headers.remove(name);
            }
        }
    }
    // Only a well-formed host[:port] is passed on: the Host header is the client's to write,
    // and `Host: x";for=6.6.6.6` must not become a parameter or element of anyone's header.
    let host = host.filter(|h| is_host(h.as_bytes()));
    if !untouchable(&FORWARDED) {
        // A chain is continued, never started: whenever `Forwarded` is present, Cinder's
        // oslo.middleware reads it instead of X-Forwarded-*, takes only its first element and
        // its values literally, so the quoted host RFC 7239 requires with a port would make
        // its links `https://"api:8443"/`. Without it, Cinder reads the X-Forwarded-* set
        // below. From an untrusted peer the header is removed, so no forged element reaches
        // the upstream.
        if peer.trusted && headers.contains_key(&FORWARDED) {
            let mut element = format!("for={};proto={}", peer.forwarded_node, peer.proto());
            if let Some(host) = host.as_ref().and_then(|h| h.to_str().ok()) {
                element.push_str(";host=\"");
                element.push_str(host);
                element.push('"');
            }
            match appended(headers, &FORWARDED, element.as_bytes()) {
                Some(value) => headers.insert(FORWARDED, value),
                None => headers.remove(FORWARDED),
            };
        } else {
            headers.remove(FORWARDED);
        }
    }
    let keep_proto = peer.trusted && headers.contains_key(&X_FORWARDED_PROTO);
    let keep_host = peer.trusted && headers.contains_key(&X_FORWARDED_HOST);
    if !untouchable(&X_FORWARDED_PROTO) && !keep_proto {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(peer.proto()));
    }
    if !untouchable(&X_FORWARDED_HOST) && !keep_host {
        match host {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }
}

/// Hands out request ids: the downstream's own when it is sane, else a fresh one,
/// `req-` and 16 hex digits random per process (so replicas do not hand out the same ids),
/// then a counter in at least 8 hex digits.
#[derive(Debug)]
pub struct RequestIds {
    prefix: [u8; PREFIX],
    next: AtomicU64,
}

const PREFIX: usize = 4 + 16;

impl Default for RequestIds {
    fn default() -> Self {
        let process = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let mut prefix = *b"req-0000000000000000";
        hex(process, &mut prefix[4..]);
        Self {
            prefix,
            next: AtomicU64::new(1),
        }
    }
}

/// Writes `n` in lowercase hex, right-aligned and zero-padded, over all of `out`.
fn hex(mut n: u64, out: &mut [u8]) {
    for digit in out.iter_mut().rev() {
        *digit = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
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
            // Copied, not shared: a shared value would keep the buffer the request's whole
            // head was read into (8 KiB) for as long as the exchange's record lives.
            Some(id) => HeaderValue::from_bytes(id.as_bytes()).unwrap_or_else(|_| id.clone()),
            None => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let digits = (16 - n.leading_zeros() as usize / 4).max(8);
                let mut id = [0u8; PREFIX + 16];
                id[..PREFIX].copy_from_slice(&self.prefix);
                hex(n, &mut id[PREFIX..PREFIX + digits]);
                // Hex digits and a dash are always a valid header value.
                HeaderValue::from_bytes(&id[..PREFIX + digits])
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

        // Each one alone is found, not only in company.
        for name in [
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            let mut h = map(&[(name, "x"), ("content-type", "application/json")]);
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} was kept");
        }
        let mut h = map(&[("connection", "x-secret"), ("x-secret", "1")]);
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    fn peer(ip: &str, tls: bool, trusted: bool) -> Peer {
        Peer::new(ip.parse().unwrap(), tls, trusted)
    }

    #[test]
    fn a_trusted_proxy_s_forwarding_headers_are_kept_and_appended_to() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "api.example.com"),
            ("forwarded", "for=1.1.1.1;proto=https"),
        ]);
        let host = Some(HeaderValue::from_static("snapguard:8080"));
        add_forwarded(&mut h, &peer("10.0.0.7", false, true), host, |_| false);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(
            h["forwarded"],
            "for=1.1.1.1;proto=https, for=10.0.0.7;proto=http;host=\"snapguard:8080\""
        );
    }

    #[test]
    fn anyone_else_s_forwarding_headers_are_overwritten() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        let host = Some(HeaderValue::from_static("api:8443"));
        add_forwarded(&mut h, &peer("::1", true, false), host, |_| false);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https", "snapguard terminated TLS");
        assert_eq!(h["x-forwarded-host"], "api:8443");
        assert!(h.get("forwarded").is_none(), "removed, not started");
        // A Host that is not a plain host[:port] is passed on nowhere.
        let mut h = map(&[("forwarded", "for=1.1.1.1")]);
        let evil = Some(HeaderValue::from_static("x\";for=6.6.6.6, for=7.7.7.7"));
        add_forwarded(&mut h, &peer("10.0.0.7", false, true), evil, |_| false);
        assert!(h.get("x-forwarded-host").is_none());
        assert_eq!(h["forwarded"], "for=1.1.1.1, for=10.0.0.7;proto=http");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, &peer("127.0.0.1", false, false), None, |_| false);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(h.get("x-forwarded-host").is_none());

        // Signed headers stay as they came.
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-host", "signed"),
        ]);
        add_forwarded(&mut h, &peer("::1", false, false), None, |n| {
            n != X_FORWARDED_PROTO && n != FORWARDED
        });
        assert_eq!(h["x-forwarded-for"], "1.1.1.1");
        assert_eq!(h["x-forwarded-host"], "signed");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn an_http11_request_needs_one_plain_host() {
        let uri = http::Uri::from_static("/v3/p1/volumes");
        let v11 = http::Version::HTTP_11;
        assert_eq!(host_problem(v11, &uri, &map(&[("host", "api:8080")])), None);
        assert_eq!(
            host_problem(v11, &uri, &HeaderMap::new()),
            Some("no Host header")
        );
        assert!(host_problem(v11, &uri, &map(&[("host", "a b")])).is_some());
        assert!(host_problem(v11, &uri, &map(&[("host", "a"), ("host", "b")])).is_some());
        assert_eq!(
            host_problem(http::Version::HTTP_10, &uri, &HeaderMap::new()),
            None
        );
        let absolute = http::Uri::from_static("http://api:8080/v3/p1/volumes");
        assert_eq!(host_problem(v11, &absolute, &HeaderMap::new()), None);
        // HTTP/2 carries :authority in the URI.
        assert_eq!(
            host_problem(http::Version::HTTP_2, &uri, &HeaderMap::new()),
            None
        );
    }

    #[test]
    fn host_bytes_are_letters_digits_and_the_few_punctuation_marks_of_host_port() {
        for b in 0..=255u8 {
            let plain = b.is_ascii_alphanumeric() || b"-._:[]".contains(&b);
            assert_eq!(is_host(&[b]), plain, "byte {b:#04x}");
        }
        assert!(is_host(b"[::1]:8776") && is_host(b"api.example.com"));
        assert!(!is_host(b"") && !is_host(&[b'a'; 256]) && !is_host(b"a/b"));
    }

    #[test]
    fn other_forwarding_headers_are_removed_from_untrusted_peers() {
        let mut h = map(&[("x-forwarded-prefix", "/evil"), ("x-real-ip", "6.6.6.6")]);
        add_forwarded(&mut h, &peer("127.0.0.1", false, false), None, |_| false);
        assert!(h.get("x-forwarded-prefix").is_none() && h.get("x-real-ip").is_none());
        let mut h = map(&[("x-forwarded-prefix", "/api")]);
        add_forwarded(&mut h, &peer("10.0.0.7", false, true), None, |_| false);
        assert_eq!(h["x-forwarded-prefix"], "/api");
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        let ids = RequestIds::default();
        assert_eq!(
            ids.for_request(&map(&[("x-request-id", "abc-123")])),
            "abc-123"
        );
        let made = ids.for_request(&map(&[("x-request-id", "has space")]));
        let made = made.to_str().unwrap();
        assert!(made.starts_with("req-"), "{made}");
        assert_eq!(made.len(), 4 + 16 + 8, "{made}");
        assert!(made[4..].bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
        assert!(made.ends_with("00000001"), "the first id: {made}");
        let a = ids.for_request(&HeaderMap::new());
        let b = ids.for_request(&HeaderMap::new());
        assert_ne!(a, b);
        assert_eq!(
            &a.as_bytes()[..20],
            &b.as_bytes()[..20],
            "one process prefix"
        );
        ids.next.store(0x1_2345_6789, Ordering::Relaxed);
        let long = ids.for_request(&HeaderMap::new());
        assert!(long.to_str().unwrap().ends_with("123456789"), "{long:?}");
    }
}
