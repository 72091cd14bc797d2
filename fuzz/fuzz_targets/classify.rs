//! Fuzzes the spellings of the snapshot update route (SPEC section 1, "match generously").
//!
//! The input is decoded with `arbitrary` into a [`Case`]: the four segments `v3`, X,
//! `snapshots`, Y, each spelled with fuzzed letter case and percent-encoding and an optional
//! `;params`, with fuzzed noise between them (`//`, `./`, `name/../`, with dots plain or
//! encoded), a trailing slash, a query, and PUT as the method, the override header, or in
//! lowercase. Raw bytes would almost never make such a path; `arbitrary` lets libFuzzer mutate
//! the *spelling choices*, which is what this target is about. It starts from an empty corpus.
//!
//! Oracle: the path is read by a reference reading written here (query cut, split on `/`, each
//! segment's `;params` cut at the first raw `;`, every `%XX` decoded, empty and `.` segments
//! dropped, `..` popping), independently of snapguard. When that reading gives exactly
//! `["v3", X, "snapshots", Y]` (literals in any case, X and Y anything), `classify` must not say
//! `Passthrough`: `Policed` or `Ambiguous` (refused with 400) are both safe. The premise is
//! checked on the path actually built, so a generator slip cannot make a false alarm.

#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use snapguard::route::{classify, default_routes, Class, Route, METHOD_OVERRIDE_HEADERS};

#[derive(Arbitrary, Debug)]
struct Case {
    lead: Vec<Noise>,
    v3: Seg,
    after_v3: Vec<Noise>,
    x: Seg,
    after_x: Vec<Noise>,
    snapshots: Seg,
    after_snapshots: Vec<Noise>,
    y: Seg,
    trail: Vec<Noise>,
    trailing_slash: bool,
    query: Option<Vec<u8>>,
    method: MethodIn,
}

/// One segment. For the literals `bytes` is ignored.
#[derive(Arbitrary, Debug)]
struct Seg {
    bytes: Vec<u8>,
    /// Bit `i % 64`: uppercase letter `i` (literals only).
    case_bits: u64,
    /// Bit `i % 64`: percent-encode byte `i` even if it need not be.
    encode_bits: u64,
    lower_hex: bool,
    params: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
enum Noise {
    /// An empty segment: `//`.
    Slash,
    /// `.` (spelled by `enc`: `.`, `%2e`, `%2E`).
    Dot(u8),
    /// `name/..` (the dots spelled by `enc`).
    Up(Seg, u8),
}

#[derive(Arbitrary, Debug)]
enum MethodIn {
    Put,
    PutLower,
    /// POST with one of the three override headers naming PUT.
    PostOverride {
        header: u8,
        value: u8,
    },
}

/// Bytes that may stand unencoded in a path segment (RFC 3986 pchar less `;`, which starts
/// params, and less `%`).
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b)
}

fn encode_into(out: &mut String, bytes: &[u8], encode_bits: u64, lower_hex: bool) {
    use std::fmt::Write;
    for (i, &b) in bytes.iter().enumerate() {
        if plain(b) && encode_bits & (1 << (i % 64)) == 0 {
            out.push(char::from(b));
        } else if lower_hex {
            let _ = write!(out, "%{b:02x}");
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn segment(seg: &Seg, literal: Option<&str>) -> String {
    let bytes: Vec<u8> = match literal {
        Some(lit) => lit
            .bytes()
            .enumerate()
            .map(|(i, b)| {
                if seg.case_bits & (1 << (i % 64)) != 0 {
                    b.to_ascii_uppercase()
                } else {
                    b
                }
            })
            .collect(),
        None => seg.bytes.clone(),
    };
    let mut out = String::new();
    encode_into(&mut out, &bytes, seg.encode_bits, seg.lower_hex);
    if let Some(params) = &seg.params {
        out.push(';');
        // Inside params `;` and `=` may stand as they are.
        for &b in params {
            if plain(b) || b == b';' {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

fn dots(n: usize, enc: u8) -> String {
    (0..n)
        .map(|i| match (enc >> (2 * i)) & 3 {
            0 | 3 => ".",
            1 => "%2e",
            _ => "%2E",
        })
        .collect()
}

fn noise(out: &mut Vec<String>, items: &[Noise]) {
    for n in items {
        match n {
            Noise::Slash => out.push(String::new()),
            Noise::Dot(enc) => out.push(dots(1, *enc)),
            Noise::Up(seg, enc) => {
                out.push(segment(seg, None));
                out.push(dots(2, *enc));
            }
        }
    }
}

fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push(u8::try_from(h * 16 + l).expect("two hex digits"));
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

/// The reference reading of a path (see the module doc).
fn reference_segments(path: &str) -> Vec<Vec<u8>> {
    let path = path.split('?').next().unwrap_or_default();
    let mut out: Vec<Vec<u8>> = Vec::new();
    for raw in path.split('/') {
        let raw = raw.split(';').next().unwrap_or_default();
        let seg = percent_decode(raw.as_bytes());
        match &seg[..] {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            _ => out.push(seg),
        }
    }
    out
}

fn premise(path: &str) -> bool {
    let segs = reference_segments(path);
    segs.len() == 4
        && segs[0].eq_ignore_ascii_case(b"v3")
        && segs[2].eq_ignore_ascii_case(b"snapshots")
}

/// Known finding 1 (see fuzz/README.md): snapguard cuts `;params` *after* percent-decoding, so
/// an encoded `%3B` (data, by SPEC: only unreserved characters are decoded) ends a segment; a
/// segment like `%3Bx` vanishes and `/v3/p1/snapshots/%3Bx` passes through unpoliced. True when
/// some segment of `path` reads differently under the two orders.
fn known_encoded_semicolon(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    path.split('/').any(|raw| {
        let decoded = percent_decode(raw.as_bytes());
        let snapguard = decoded.split(|b| *b == b';').next().unwrap_or_default();
        let reference = percent_decode(raw.split(';').next().unwrap_or_default().as_bytes());
        snapguard != &reference[..]
    })
}

/// `SNAPGUARD_FUZZ_SKIP_KNOWN=1` skips inputs that only re-find the known findings, so that a
/// run can look for new ones; by default every finding fails the run.
fn skip_known() -> bool {
    thread_local! {
        static SKIP: bool = std::env::var_os("SNAPGUARD_FUZZ_SKIP_KNOWN").is_some_and(|v| v == "1");
    }
    SKIP.with(|s| *s)
}

fn run(routes: &[Route], case: &Case) {
    let mut segs = Vec::new();
    noise(&mut segs, &case.lead);
    segs.push(segment(&case.v3, Some("v3")));
    noise(&mut segs, &case.after_v3);
    segs.push(segment(&case.x, None));
    noise(&mut segs, &case.after_x);
    segs.push(segment(&case.snapshots, Some("snapshots")));
    noise(&mut segs, &case.after_snapshots);
    segs.push(segment(&case.y, None));
    noise(&mut segs, &case.trail);
    let mut path = String::new();
    for s in &segs {
        path.push('/');
        path.push_str(s);
    }
    if case.trailing_slash {
        path.push('/');
    }
    if let Some(q) = &case.query {
        path.push('?');
        for &b in q {
            if plain(b) || b"/?;".contains(&b) {
                path.push(char::from(b));
            } else {
                path.push_str(&format!("%{b:02X}"));
            }
        }
    }
    if !premise(&path) || (skip_known() && known_encoded_semicolon(&path)) {
        return;
    }
    let mut headers = HeaderMap::new();
    let method = match case.method {
        MethodIn::Put => Method::PUT,
        MethodIn::PutLower => Method::from_bytes(b"put").expect("a token"),
        MethodIn::PostOverride { header, value } => {
            let name = METHOD_OVERRIDE_HEADERS[usize::from(header) % METHOD_OVERRIDE_HEADERS.len()];
            let value = ["PUT", "put", " Put ", "GET, PUT", "PUT,PATCH"][usize::from(value) % 5];
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            Method::POST
        }
    };
    let uri = match Uri::try_from(path.as_str()) {
        Ok(uri) => uri,
        // Every byte outside pchar is encoded, so this would be a generator bug.
        Err(e) => panic!("generated path {path:?} is not a URI: {e}"),
    };
    let class = classify(routes, &method, &headers, &uri);
    assert!(
        !matches!(class, Class::Passthrough),
        "{method} {path} ({headers:?}) reads as {:?} but passes through unpoliced",
        reference_segments(&path)
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
    );
}

fuzz_target!(|case: Case| {
    thread_local! {
        static ROUTES: Vec<Route> = default_routes();
    }
    ROUTES.with(|routes| run(routes, &case));
});
