//! Fuzzes route classification plus the body policy (SPEC sections 1 and 2), with an oracle
//! written independently of snapguard's own JSON code.
//!
//! # Input format, and why
//!
//! The input has two modes, chosen by its first byte:
//!
//! * **text mode** (first byte is an ASCII letter): a tiny HTTP request,
//!   `METHOD PATH\n` + optional `Name: value\n` header lines + `\n` + body bytes. The SPEC
//!   section 5 vectors are seeds verbatim (`fuzz/corpus/police/seed-*`), and libFuzzer's
//!   byte-level mutations of them (with `police.dict`) reach the JSON parser's corners: broken
//!   escapes, BOMs, trailing data, lone surrogates, deep nesting. `may_normalize` is what the
//!   proxy uses: false when `snapguard::policy::is_signed` sees an AK/SK signature.
//! * **structured mode** (any other first byte): the rest is decoded with `arbitrary` into a
//!   [`Case`]: a method from a small set or any string, a path that is either any string or a
//!   route template with fuzzed parameters, an optional method-override header, `may_normalize`,
//!   and a body that is either raw bytes or a *generated* JSON document. Random bytes almost
//!   never form a JSON object whose `snapshot` member holds `name`/`display_name` strings with
//!   Python whitespace, escapes, the reserved prefix and lengths around 255 bytes; the generator
//!   makes such documents (including duplicate and escaped-duplicate keys and lone surrogates)
//!   the common case, so the fuzzer spends its time on the policy rather than on parse errors.
//!
//! # Oracle (panics on a real bug)
//!
//! 1. Every allowed body (the original for `Unchanged`, `b` for `Normalized(b)`) is valid UTF-8,
//!    parses with serde_json, has no duplicate key at any depth, its root is an object whose
//!    body-root member is an object, and in *every occurrence* of the body root (walked
//!    member by member, so duplicates that slipped through are still seen), every name and
//!    description field is a string or null of at most 255 UTF-8 bytes, and no name field,
//!    stripped of leading `is_python_space` characters, starts with `autobk_snapshot_`.
//! 2. For `Normalized(b)`: normalizing was allowed; the root keeps its members in order with
//!    equal values (and, as snapguard documents, the same raw text) except the body root; in the
//!    body root every field that is not renamed keeps its value and raw text and relative order,
//!    no legacy field of `route.renames` is left, and each current field holds the current
//!    value if the original had one, else the legacy one's. Policing `b` again gives
//!    `Ok(Unchanged)`. For `Ok(Unchanged)` with `may_normalize`, no legacy field was present.
//! 3. The converse (no false rejections): a body this oracle finds fine (strict JSON as above,
//!    within `max_body_bytes`, fields of the right type, length and prefix) must be allowed.
//! 4. For a route template filled with plain parameters and called with one of the route's
//!    methods, `classify` must say `Policed` (and give back the project id when it picked that
//!    very template).
//! 5. `check_body` is called as the proxy calls it (`Target` with the classified project id,
//!    the default `PolicyConfig`, no configured naming rules): with no exempt project, nothing
//!    may come back `exempted`.
//! 6. Nothing panics (libFuzzer reports panics as crashes).

#![no_main]

use std::collections::HashSet;
use std::fmt;

use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;
use snapguard::config::PolicyConfig;
use snapguard::policy::{check_body, is_python_space, Target, Verdict, Violation};
use snapguard::route::{classify, default_routes, Class, Route};

const PREFIX: &str = "autobk_snapshot_";
const MAX_FIELD_BYTES: usize = 255;

// ---------------------------------------------------------------------------------------------
// Structured input
// ---------------------------------------------------------------------------------------------

#[derive(Arbitrary, Debug)]
struct Case {
    method: MethodIn,
    path: PathIn,
    /// (which of the three override headers, its value).
    override_header: Option<(u8, String)>,
    may_normalize: bool,
    /// The route policed when the path does not classify as policed.
    route: u8,
    body: BodyIn,
}

#[derive(Arbitrary, Debug)]
enum MethodIn {
    Get,
    Put,
    Post,
    Delete,
    Patch,
    PutLower,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum PathIn {
    /// A route template of the default table with its `{params}` filled in.
    Template {
        route: u8,
        project: String,
        id: String,
        json_suffix: bool,
        trailing_slash: bool,
        upper: bool,
    },
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum BodyIn {
    Doc(Doc),
    Raw(Vec<u8>),
}

/// `{before..., <root key>: {fields...}, after...}`.
#[derive(Arbitrary, Debug)]
struct Doc {
    before: Vec<(KeyIn, Val)>,
    root_key: KeyIn,
    fields: Vec<(KeyIn, Val)>,
    after: Vec<(KeyIn, Val)>,
    space: u8,
}

#[derive(Arbitrary, Debug)]
struct KeyIn {
    which: KeyWhich,
    /// Bit `i % 16` set: character `i` written as a `\uXXXX` escape.
    escape: u16,
}

#[derive(Arbitrary, Debug)]
enum KeyWhich {
    BodyRoot,
    Name,
    DisplayName,
    Description,
    DisplayDescription,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Val {
    Null,
    True,
    False,
    Int(i64),
    Number(u8),
    Str(StrIn),
    Array(Vec<Val>),
    Object(Vec<(KeyIn, Val)>),
    /// Any text, spliced in as is: mostly invalid JSON.
    Raw(String),
}

#[derive(Arbitrary, Debug)]
struct StrIn {
    /// Leading characters, each an index into [`LEADS`] (Python spaces and look-alikes).
    lead: Vec<u8>,
    prefix: PrefixIn,
    body: String,
    /// `body` is written `repeat` times: lengths cross 255 bytes.
    repeat: u8,
    escape: EscapeIn,
    /// A `\uD8xx`/`\uDCxx` escape with no partner, appended.
    lone_surrogate: Option<u16>,
}

#[derive(Arbitrary, Debug)]
enum PrefixIn {
    None,
    Reserved,
    Upper,
    /// The first `n % 16` characters of the prefix.
    Cut(u8),
}

#[derive(Arbitrary, Debug)]
enum EscapeIn {
    Never,
    NonAscii,
    Always,
    Bits(u64),
}

/// Python's `str.isspace()` set, then characters that are *not* stripped but look like it.
const LEADS: &[char] = &[
    '\t',
    '\n',
    '\u{b}',
    '\u{c}',
    '\r',
    '\u{1c}',
    '\u{1d}',
    '\u{1e}',
    '\u{1f}',
    ' ',
    '\u{85}',
    '\u{a0}',
    '\u{1680}',
    '\u{2000}',
    '\u{2001}',
    '\u{2002}',
    '\u{2003}',
    '\u{2004}',
    '\u{2005}',
    '\u{2006}',
    '\u{2007}',
    '\u{2008}',
    '\u{2009}',
    '\u{200a}',
    '\u{2028}',
    '\u{2029}',
    '\u{202f}',
    '\u{205f}',
    '\u{3000}',
    '\u{200b}',
    '\u{feff}',
    '\u{180e}',
    '\u{0}',
    'x',
    '\u{1f600}',
];

const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1.50",
    "1e5",
    "1E+2",
    "0.1e-2",
    "12345678901234567890123",
    "-9223372036854775809",
    "18446744073709551616",
    "1e400",
    "1.7976931348623157e308",
    "5e-324",
];

const SPACES: &[&str] = &["", " ", "\n", "\t", "\r\n  "];

struct Writer<'a> {
    out: String,
    space: &'static str,
    route: &'a Route,
}

impl Writer<'_> {
    fn ws(&mut self) {
        self.out.push_str(self.space);
    }

    fn object(&mut self, members: &[(KeyIn, Val)]) {
        self.out.push('{');
        for (i, (k, v)) in members.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.ws();
            self.key(k);
            self.ws();
            self.out.push(':');
            self.ws();
            self.val(v);
        }
        self.ws();
        self.out.push('}');
    }

    fn key(&mut self, k: &KeyIn) {
        let text = match &k.which {
            KeyWhich::BodyRoot => self.route.body_root.clone(),
            KeyWhich::Name => "name".to_owned(),
            KeyWhich::DisplayName => "display_name".to_owned(),
            KeyWhich::Description => "description".to_owned(),
            KeyWhich::DisplayDescription => "display_description".to_owned(),
            KeyWhich::Other(s) => s.clone(),
        };
        let escape = k.escape;
        write_string(
            &mut self.out,
            text.chars(),
            |i, _| escape & (1 << (i % 16)) != 0,
            None,
        );
    }

    fn val(&mut self, v: &Val) {
        match v {
            Val::Null => self.out.push_str("null"),
            Val::True => self.out.push_str("true"),
            Val::False => self.out.push_str("false"),
            Val::Int(n) => self.out.push_str(&n.to_string()),
            Val::Number(n) => self.out.push_str(NUMBERS[usize::from(*n) % NUMBERS.len()]),
            Val::Str(s) => self.string(s),
            Val::Array(items) => {
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.ws();
                    self.val(item);
                }
                self.out.push(']');
            }
            Val::Object(members) => self.object(members),
            Val::Raw(text) => self.out.push_str(text),
        }
    }

    fn string(&mut self, s: &StrIn) {
        let mut text: String = s
            .lead
            .iter()
            .map(|i| LEADS[usize::from(*i) % LEADS.len()])
            .collect();
        match s.prefix {
            PrefixIn::None => {}
            PrefixIn::Reserved => text.push_str(PREFIX),
            PrefixIn::Upper => text.push_str(&PREFIX.to_ascii_uppercase()),
            PrefixIn::Cut(n) => text.push_str(&PREFIX[..usize::from(n) % 16]),
        }
        for _ in 0..s.repeat.max(1) {
            text.push_str(&s.body);
        }
        let lone = s.lone_surrogate.map(|v| 0xd800 + (v % 0x800));
        match s.escape {
            EscapeIn::Never => write_string(&mut self.out, text.chars(), |_, _| false, lone),
            EscapeIn::NonAscii => {
                write_string(&mut self.out, text.chars(), |_, c| !c.is_ascii(), lone)
            }
            EscapeIn::Always => write_string(&mut self.out, text.chars(), |_, _| true, lone),
            EscapeIn::Bits(bits) => write_string(
                &mut self.out,
                text.chars(),
                |i, _| bits & (1 << (i % 64)) != 0,
                lone,
            ),
        }
    }
}

/// Writes a JSON string; characters for which `escape` holds become `\uXXXX` (pairs above the
/// BMP); the ones JSON requires escaped always are.
fn write_string(
    out: &mut String,
    chars: impl Iterator<Item = char>,
    escape: impl Fn(usize, char) -> bool,
    lone_surrogate: Option<u16>,
) {
    use std::fmt::Write;
    out.push('"');
    for (i, c) in chars.enumerate() {
        if escape(i, c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                c if u32::from(c) < 0x20 => {
                    let _ = write!(out, "\\u{:04X}", u32::from(c));
                }
                c => out.push(c),
            }
        }
    }
    if let Some(unit) = lone_surrogate {
        let _ = write!(out, "\\u{unit:04x}");
    }
    out.push('"');
}

fn percent_encode_param(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A parameter that any reading of the path keeps as one plain segment.
fn plain_param(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

// ---------------------------------------------------------------------------------------------
// The oracle's own JSON reading (independent of snapguard::policy::json)
// ---------------------------------------------------------------------------------------------

/// Every member of one object level, duplicates included, values as raw text.
struct AllMembers(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for AllMembers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AllMembers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AllMembers, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    out.push((k, map.next_value::<Box<RawValue>>()?));
                }
                Ok(AllMembers(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn members_of(text: &str) -> Option<Vec<(String, Box<RawValue>)>> {
    serde_json::from_str::<AllMembers>(text).ok().map(|m| m.0)
}

/// Visits a whole document; `Err` on a duplicate key (after unescaping) at any depth.
struct NoDup;

impl<'de> Deserialize<'de> for NoDup {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDupV)
    }
}

struct NoDupV;

impl<'de> Visitor<'de> for NoDupV {
    type Value = NoDup;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_i64<E>(self, _: i64) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_u64<E>(self, _: u64) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_f64<E>(self, _: f64) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_str<E>(self, _: &str) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_unit<E>(self) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NoDup, A::Error> {
        while seq.next_element::<NoDup>()?.is_some() {}
        Ok(NoDup)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NoDup, A::Error> {
        let mut seen = HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            map.next_value::<NoDup>()?;
            if !seen.insert(k) {
                return Err(de::Error::custom("duplicate key"));
            }
        }
        Ok(NoDup)
    }
}

/// Strict JSON as SPEC section 2 wants it: parses as a `Value` (UTF-8, one value, no lone
/// surrogates, no trailing data) and has no duplicate key anywhere.
fn strict_json(body: &[u8]) -> Result<&str, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
    serde_json::from_str::<Value>(text).map_err(|e| format!("serde_json: {e}"))?;
    serde_json::from_str::<NoDup>(text).map_err(|e| format!("duplicates: {e}"))?;
    Ok(text)
}

fn is_policed_field(route: &Route, key: &str) -> bool {
    route.name_fields.iter().any(|f| f == key) || route.description_fields.iter().any(|f| f == key)
}

/// Why the policy must refuse `text` (already strict JSON), walking every occurrence of the
/// body root and of each field; `None` if it must allow it.
fn policy_problem(route: &Route, text: &str) -> Option<String> {
    let Some(root) = members_of(text) else {
        return Some("root is not an object".into());
    };
    let roots: Vec<_> = root.iter().filter(|(k, _)| *k == route.body_root).collect();
    if roots.is_empty() {
        return Some(format!("no {:?} member", route.body_root));
    }
    for (_, raw) in roots {
        let Some(fields) = members_of(raw.get()) else {
            return Some(format!("{:?} is not an object", route.body_root));
        };
        for (key, raw) in &fields {
            if !is_policed_field(route, key) {
                continue;
            }
            let Ok(value) = serde_json::from_str::<Option<String>>(raw.get()) else {
                return Some(format!("{key} is {}, not a string or null", raw.get()));
            };
            let Some(value) = value else { continue };
            if value.len() > MAX_FIELD_BYTES {
                return Some(format!("{key} is {} bytes long", value.len()));
            }
            if route.name_fields.iter().any(|f| f == key)
                && value
                    .trim_start_matches(is_python_space)
                    .starts_with(PREFIX)
            {
                return Some(format!("{key} = {value:?} is reserved"));
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The oracle
// ---------------------------------------------------------------------------------------------

/// `check_body` under the default policy and no configured naming rules. With no exempt
/// project configured, nothing may ever be exempted.
fn check(
    route: &Route,
    project: Option<&str>,
    policy: &PolicyConfig,
    body: &[u8],
    may_normalize: bool,
) -> Result<Verdict, Violation> {
    let allowed = check_body(Target { route, project }, policy, &[], body, may_normalize)?;
    assert_eq!(
        allowed.exempted, None,
        "exempted with no exempt project configured"
    );
    Ok(allowed.body)
}

fn police(route: &Route, project: Option<&str>, body: &[u8], may_normalize: bool) {
    let policy = PolicyConfig::default();
    let verdict = check(route, project, &policy, body, may_normalize);

    // 3. No false rejection.
    let expected_problem = if body.len() > policy.max_body_bytes {
        Some("too large".to_owned())
    } else {
        match strict_json(body) {
            Ok(text) => policy_problem(route, text),
            Err(e) => Some(e),
        }
    };
    if expected_problem.is_none() {
        assert!(
            verdict.is_ok(),
            "a valid body was refused: {verdict:?}\nroute {}\nbody {:?}",
            route.template,
            String::from_utf8_lossy(body)
        );
    }

    let forwarded: &[u8] = match &verdict {
        Err(_) => return,
        Ok(Verdict::Unchanged) => body,
        Ok(Verdict::Normalized(b)) => b,
    };

    // 1. Whatever goes upstream is strict JSON that satisfies the policy.
    let text = match strict_json(forwarded) {
        Ok(text) => text,
        Err(e) => panic!(
            "allowed body is not strict JSON ({e}): {verdict:?}\nroute {}\nbody {:?}\nforwarded {:?}",
            route.template,
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(forwarded)
        ),
    };
    if let Some(problem) = policy_problem(route, text) {
        panic!(
            "allowed body breaks the policy ({problem}): {verdict:?}\nroute {}\nbody {:?}\nforwarded {:?}",
            route.template,
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(forwarded)
        );
    }
    if forwarded.len() > policy.max_body_bytes {
        panic!("forwarded body over max_body_bytes");
    }

    // The original was allowed, so it is strict JSON with exactly one body-root object.
    let Some(orig_root) = std::str::from_utf8(body).ok().and_then(members_of) else {
        panic!(
            "allowed original is not a JSON object: {:?}",
            String::from_utf8_lossy(body)
        );
    };
    let find_root = |members: &[(String, Box<RawValue>)]| {
        members
            .iter()
            .find(|(k, _)| *k == route.body_root)
            .and_then(|(_, raw)| members_of(raw.get()))
            .expect("allowed body has a body-root object")
    };
    let orig_fields = find_root(&orig_root);
    let has = |fields: &[(String, Box<RawValue>)], key: &str| fields.iter().any(|(k, _)| k == key);

    let b = match &verdict {
        Ok(Verdict::Unchanged) => {
            if may_normalize {
                for (legacy, _) in &route.renames {
                    assert!(
                        !has(&orig_fields, legacy),
                        "{legacy} forwarded without normalizing: {:?}",
                        String::from_utf8_lossy(body)
                    );
                }
            }
            return;
        }
        Ok(Verdict::Normalized(b)) => b,
        Err(_) => unreachable!(),
    };

    // 2. Normalization changes the legacy fields and nothing else.
    assert!(may_normalize, "normalized although may_normalize is false");
    let new_root = members_of(text).expect("checked above");
    let keys = |m: &[(String, Box<RawValue>)]| m.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&new_root), keys(&orig_root), "root members changed");
    for ((key, old), (_, new)) in orig_root.iter().zip(&new_root) {
        if *key == route.body_root {
            continue;
        }
        let (old_v, new_v): (Value, Value) = (
            serde_json::from_str(old.get()).expect("valid"),
            serde_json::from_str(new.get()).expect("valid"),
        );
        assert_eq!(old_v, new_v, "root member {key} changed value");
        assert_eq!(
            old.get(),
            new.get(),
            "root member {key} changed its raw text"
        );
    }
    let new_fields = find_root(&new_root);
    for (legacy, current) in &route.renames {
        assert!(
            !has(&new_fields, legacy),
            "legacy field {legacy} left in {text}"
        );
        let want = orig_fields
            .iter()
            .find(|(k, _)| k == current)
            .or_else(|| orig_fields.iter().find(|(k, _)| k == legacy))
            .map(|(_, v)| v.get());
        let got = new_fields
            .iter()
            .find(|(k, _)| k == current)
            .map(|(_, v)| v.get());
        let value =
            |raw: Option<&str>| raw.map(|r| serde_json::from_str::<Value>(r).expect("valid"));
        assert_eq!(
            value(got),
            value(want),
            "{current} holds the wrong value in {text}"
        );
        assert_eq!(got, want, "{current} changed its raw text in {text}");
    }
    let is_renamed = |k: &str| route.renames.iter().any(|(l, c)| k == l || k == c);
    let untouched = |fields: &[(String, Box<RawValue>)]| {
        fields
            .iter()
            .filter(|(k, _)| !is_renamed(k))
            .map(|(k, v)| (k.clone(), v.get().to_owned()))
            .collect::<Vec<_>>()
    };
    let (old_untouched, new_untouched) = (untouched(&orig_fields), untouched(&new_fields));
    assert_eq!(
        old_untouched.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        new_untouched.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "untouched fields of the body root changed or moved in {text}"
    );
    for ((key, old), (_, new)) in old_untouched.iter().zip(&new_untouched) {
        let (old_v, new_v): (Value, Value) = (
            serde_json::from_str(old).expect("valid"),
            serde_json::from_str(new).expect("valid"),
        );
        assert_eq!(old_v, new_v, "field {key} changed value");
        assert_eq!(old, new, "field {key} changed its raw text");
    }
    // Idempotent: the normalized body needs no more normalizing.
    let again = check(route, project, &policy, b, true);
    assert_eq!(
        again,
        Ok(Verdict::Unchanged),
        "normalized body {text} policed again"
    );
}

// ---------------------------------------------------------------------------------------------
// Driving
// ---------------------------------------------------------------------------------------------

/// The route whose body is policed: the classified one, else `fallback` (so that the policy is
/// fuzzed whatever the path).
fn route_for<'c, 'r>(
    routes: &'r [Route],
    class: &'c Class<'r>,
    fallback: usize,
) -> (&'r Route, Option<&'c str>) {
    match class {
        Class::Policed { route, project_id } => (route, project_id.as_deref()),
        Class::Passthrough | Class::Ambiguous(..) => (&routes[fallback % routes.len()], Some("p1")),
    }
}

fn text_mode(routes: &[Route], data: &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => match data.iter().position(|b| *b == b'\n') {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (data, &[][..]),
        },
    };
    let mut lines = head.split(|b| *b == b'\n');
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.splitn(2, |b| *b == b' ');
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return;
    };
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = Uri::try_from(path) else { return };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let class = classify(routes, &method, &headers, &uri);
    let may_normalize = !snapguard::policy::is_signed(&headers);
    let (route, project) = route_for(routes, &class, 0);
    police(route, project, body, may_normalize);
}

fn structured_mode(routes: &[Route], data: &[u8]) {
    let Ok(case) = Case::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let method = match &case.method {
        MethodIn::Get => Method::GET,
        MethodIn::Put => Method::PUT,
        MethodIn::Post => Method::POST,
        MethodIn::Delete => Method::DELETE,
        MethodIn::Patch => Method::PATCH,
        MethodIn::PutLower => Method::from_bytes(b"put").expect("valid token"),
        MethodIn::Other(m) => match Method::from_bytes(m.as_bytes()) {
            Ok(m) => m,
            Err(_) => return,
        },
    };
    let mut headers = HeaderMap::new();
    if let Some((which, value)) = &case.override_header {
        let name = snapguard::route::METHOD_OVERRIDE_HEADERS[usize::from(*which) % 3];
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    // For a template filled with plain parameters: (its route, the project id it should yield).
    let mut expect = None;
    let path = match &case.path {
        PathIn::Template {
            route,
            project,
            id,
            json_suffix,
            trailing_slash,
            upper,
        } => {
            let r = &routes[usize::from(*route) % routes.len()];
            let mut p = r.template.to_string();
            if *upper {
                p = p.to_ascii_uppercase();
            }
            let p = p
                .replace("{PROJECT_ID}", "{project_id}")
                .replace("{SNAPSHOT_ID}", "{snapshot_id}")
                .replace("{project_id}", &percent_encode_param(project))
                .replace("{snapshot_id}", &percent_encode_param(id));
            let mut p = p;
            if *json_suffix {
                p.push_str(".json");
            }
            if *trailing_slash {
                p.push('/');
            }
            let method_fits = r
                .methods
                .iter()
                .any(|m| m.as_str().eq_ignore_ascii_case(method.as_str()));
            let last_is_id = r.template.ends_with("{snapshot_id}");
            let id_after_suffix = if *json_suffix && last_is_id {
                format!("{id}.json")
            } else {
                id.clone()
            };
            let params_plain = (!r.template.contains("{project_id}") || plain_param(project))
                && (!last_is_id || plain_param(&id_after_suffix));
            if method_fits && params_plain {
                expect = Some((r, project.clone()));
            }
            p
        }
        PathIn::Raw(s) => s.clone(),
    };
    let Ok(uri) = Uri::try_from(path.as_str()) else {
        return;
    };
    let class = classify(routes, &method, &headers, &uri);

    // 4. Every route is reached by its own spelling.
    if let Some((r, project)) = expect {
        match &class {
            Class::Policed { route, project_id } => {
                if route.template == r.template && r.template.contains("{project_id}") {
                    assert_eq!(project_id.as_deref(), Some(project.as_str()), "{path}");
                }
            }
            other => panic!(
                "{method} {path} (route {}) classified {other:?}",
                r.template
            ),
        }
    }

    let (route, project) = route_for(routes, &class, usize::from(case.route));
    let body = match &case.body {
        BodyIn::Raw(bytes) => bytes.clone(),
        BodyIn::Doc(doc) => {
            let mut w = Writer {
                out: String::new(),
                space: SPACES[usize::from(doc.space) % SPACES.len()],
                route,
            };
            // Build `{before..., root: {fields}, after...}` without cloning the inputs.
            w.out.push('{');
            let mut first = true;
            let mut member =
                |w: &mut Writer<'_>, k: &KeyIn, v: Option<&Val>, fields: &[(KeyIn, Val)]| {
                    if !first {
                        w.out.push(',');
                    }
                    first = false;
                    w.ws();
                    w.key(k);
                    w.out.push(':');
                    w.ws();
                    match v {
                        Some(v) => w.val(v),
                        None => w.object(fields),
                    }
                };
            for (k, v) in &doc.before {
                member(&mut w, k, Some(v), &[]);
            }
            member(&mut w, &doc.root_key, None, &doc.fields);
            for (k, v) in &doc.after {
                member(&mut w, k, Some(v), &[]);
            }
            w.ws();
            w.out.push('}');
            w.out.into_bytes()
        }
    };
    police(route, project, &body, case.may_normalize);
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static ROUTES: Vec<Route> = default_routes();
    }
    ROUTES.with(|routes| match data.first() {
        Some(b) if b.is_ascii_alphabetic() => text_mode(routes, data),
        Some(_) => structured_mode(routes, &data[1..]),
        None => {}
    });
});
