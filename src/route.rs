//! Route classification: is a request policed, and by which route?
//!
//! A pure function of the method, the method-override headers and the path. It matches
//! *generously* (SPEC section 1): it undoes every spelling trick an upstream router or a gateway
//! in front of it might undo, so that no spelling of a snapshot route slips through unpoliced.
//! The request itself is never rewritten; the normalized path exists only to decide.

use std::borrow::Cow;
use std::sync::Mutex;

use http::{HeaderMap, Method, Uri};
use serde::Deserialize;

/// Headers whose value some frameworks take as the real method of a POST.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// How errors on a route are rendered: Cinder's `Fault` or Huawei's `{"error": ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorStyle {
    #[default]
    Openstack,
    Huawei,
}

/// A route as written in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub methods: Vec<String>,
    pub path: String,
    #[serde(default = "default_body_root")]
    pub body_root: String,
    pub name_fields: Vec<String>,
    #[serde(default)]
    pub description_fields: Vec<String>,
    #[serde(default)]
    pub error_style: ErrorStyle,
}

fn default_body_root() -> String {
    "snapshot".to_owned()
}

/// A validated route, ready to match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The path template as configured, interned: the route's label in logs and metrics.
    pub template: &'static str,
    pub methods: Vec<Method>,
    /// `methods` as [`method_bit`]s, for the one test most requests get: is their method
    /// policed at all?
    method_bits: u16,
    segments: Vec<Segment>,
    pub body_root: String,
    pub name_fields: Vec<String>,
    pub description_fields: Vec<String>,
    /// `(legacy, current)` field pairs normalized on the way upstream, e.g. display_name -> name.
    pub renames: Vec<(String, String)>,
    pub error_style: ErrorStyle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Compared ASCII case-insensitively; stored lowercase.
    Literal(Vec<u8>),
    Param(String),
}

impl TryFrom<RouteSpec> for Route {
    type Error = String;

    fn try_from(spec: RouteSpec) -> Result<Self, String> {
        if spec.methods.is_empty() {
            return Err(format!("route {}: methods must not be empty", spec.path));
        }
        let methods = spec
            .methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("route {}: {m:?} is not an HTTP method", spec.path))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Some(rest) = spec.path.strip_prefix('/') else {
            return Err(format!("route {:?}: the path must start with /", spec.path));
        };
        let segments = rest
            .split('/')
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) if !name.is_empty() => Ok(Segment::Param(name.to_owned())),
                    _ if s.is_empty()
                        || matches!(s, "." | "..")
                        || s.contains(['{', '}', ';', '%']) =>
                    {
                        Err(format!(
                            "route {:?}: segment {s:?} is not a literal or a {{param}}",
                            spec.path
                        ))
                    }
                    _ => Ok(Segment::Literal(s.to_ascii_lowercase().into_bytes())),
                },
            )
            .collect::<Result<Vec<_>, _>>()?;
        if spec.name_fields.is_empty() && spec.description_fields.is_empty() {
            return Err(format!("route {}: it polices no field", spec.path));
        }
        if spec.body_root.is_empty() {
            return Err(format!("route {}: body_root must not be empty", spec.path));
        }
        // Cinder's legacy spelling `display_X` stands for `X`: normalize it when the route
        // polices both, in the same kind of field.
        let renames = [&spec.name_fields, &spec.description_fields]
            .into_iter()
            .flat_map(|fields| {
                fields.iter().filter_map(|f| {
                    let current = f.strip_prefix("display_")?;
                    fields
                        .iter()
                        .any(|g| g == current)
                        .then(|| (f.clone(), current.to_owned()))
                })
            })
            .collect();
        Ok(Self {
            template: intern(&spec.path),
            method_bits: methods.iter().fold(0, |bits, m| bits | method_bit(m)),
            methods,
            segments,
            body_root: spec.body_root,
            name_fields: spec.name_fields,
            description_fields: spec.description_fields,
            renames,
            error_style: spec.error_style,
        })
    }
}

// Written out rather than derived with `try_from`: serde's derive will not produce a `'static`
// template from borrowed input, and the template is interned anyway.
impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Route::try_from(RouteSpec::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The one `&'static` copy of a route template. Templates are few and reloads rare, so the
/// table only ever holds the distinct templates configured since start; a `&'static str` label
/// lets metrics count requests without reference counting or locks.
fn intern(template: &str) -> &'static str {
    static TABLE: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut table = TABLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = table.iter().find(|t| **t == template) {
        return known;
    }
    let leaked: &'static str = Box::leak(template.to_owned().into_boxed_str());
    table.push(leaked);
    leaked
}

/// The built-in route table (SPEC section 1, and the other requests that name snapshots).
const DEFAULT_ROUTES: &str = include_str!("../config/default-routes.toml");

/// The built-in route table, parsed from `config/default-routes.toml`, which documents it.
pub fn default_routes() -> Vec<Route> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Table {
        routes: Vec<Route>,
    }
    // Constant text, compiled in and parsed by the unit tests: it cannot fail at run time.
    #[allow(clippy::expect_used)]
    let table: Table = toml::from_str(DEFAULT_ROUTES).expect("config/default-routes.toml is valid");
    table.routes
}

/// What to do with a request, before its body is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class<'a> {
    /// No route matches: stream it upstream untouched.
    Passthrough,
    /// The body must be policed under this route.
    Policed {
        route: &'a Route,
        /// The `{project_id}` segment, decoded, when the template has one.
        project_id: Option<String>,
    },
    /// A path or method that some reading makes this policed route and that cannot be classified
    /// with certainty: refused rather than forwarded unpoliced, in the route's error style.
    Ambiguous(&'a Route, Ambiguity),
}

/// Why a request could not be classified with certainty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    /// An encoded `/` or `\\`: servers disagree on whether it separates segments.
    EncodedSeparator,
    /// An escape that a second decoding would change (`%2573`).
    DoubleEncoding,
    /// A decoded control character, space or non-ASCII byte that a loose reader drops, trims or
    /// stops at (`/snapshots%0A`).
    LooseBytes,
    /// A method override that is not plain printable ASCII (`?_method=po%C5%BFt`).
    MethodOverride,
}

/// Classifies a request from its method, headers and request target.
pub fn classify<'a>(
    routes: &'a [Route],
    method: &Method,
    headers: &HeaderMap,
    uri: &Uri,
) -> Class<'a> {
    // Read once per request: most carry no override, and then this allocates nothing.
    let overrides = overrides(headers, uri.query().unwrap_or(""));
    // Methods compare case-insensitively: a gateway on the way may uppercase them. Route
    // methods are uppercase, so a request with no override and no lowercase letter in its
    // method (nearly all of them) is decided by plain equality.
    let exact = overrides.is_empty() && !method.as_str().bytes().any(|b| b.is_ascii_lowercase());
    let wanted = |m: &Method| {
        if exact {
            return m == method;
        }
        let named = |value: &[u8]| value.eq_ignore_ascii_case(m.as_str().as_bytes());
        named(method.as_str().as_bytes()) || overrides.iter().any(|o| named(o))
    };
    // An override that is not a plain ASCII token is read loosely by someone: Cinder's router
    // upper-cases `_method` with Python's Unicode-aware `str.upper()` (`poſt` is POST) after
    // dropping invalid UTF-8. Such a request is ambiguous on any path a route could match.
    let loose_override = overrides
        .iter()
        .any(|o| !o.iter().all(|b| b.is_ascii_graphic()));
    // Most traffic (GET, DELETE) is decided here, without looking at the path: by one bit per
    // route when the method is a standard one, spelled as routes spell it. Kept apart from
    // `candidates` below, which decides the same: through its filter closure it costs a GET
    // about 450 instructions more (bench/instructions.py).
    let bit = method_bit(method);
    if exact && bit != 0 && routes.iter().all(|r| r.method_bits & bit == 0) {
        return Class::Passthrough;
    }
    let candidates = || {
        routes.iter().filter(move |r| match exact && bit != 0 {
            true => r.method_bits & bit != 0,
            false => r.methods.iter().any(wanted),
        })
    };
    if !loose_override && candidates().next().is_none() {
        return Class::Passthrough;
    }
    let find = |segments: &[Cow<'_, [u8]>]| {
        candidates().find_map(|route| {
            route
                .matches(segments)
                .map(|project_id| (route, project_id))
        })
    };

    let path = uri.path();
    let facts = Facts::of(path);
    // As the upstream most likely reads it; failing that, without resolving dot segments, as
    // a router that takes `..` for a project id would.
    let once = match facts.plain {
        true => read_plain(path),
        false => read(path, Reading::ONCE),
    };
    let mut policed = find(&once);
    if policed.is_none() && facts.dot_segments {
        policed = find(&read(path, Reading::ONCE_KEEP_DOTS));
    }
    // And with `;` cut only where it is raw (RFC 3986: `%3B` is data), or never cut, as
    // Cinder's router takes it: `/snapshots/;x` updates snapshot `;x`.
    if policed.is_none() && facts.semicolons {
        policed = find(&read(path, Reading::ONCE_RAW_PARAMS))
            .or_else(|| find(&read(path, Reading::ONCE_KEEP_PARAMS)));
    }
    // Readings that other servers and routers would make of a suspicious path: if any of them
    // is a policed route, the request cannot be classified with certainty.
    let by = |how: Reading| find(&read(path, how)).map(|(route, _)| route);
    let mut ambiguous = None;
    if facts.encoded_separator {
        // Even when one reading polices it: another may split it into a different route.
        ambiguous = policed
            .as_ref()
            .map(|(route, _)| (*route, Ambiguity::EncodedSeparator));
    }
    if ambiguous.is_none() && policed.is_none() {
        if facts.suspicious() {
            ambiguous = Reading::suspicious(&facts)
                .find_map(by)
                .map(|route| (route, facts.ambiguity()));
        }
        if ambiguous.is_none() && loose_override {
            ambiguous =
                route_on_path(routes, path, &facts).map(|route| (route, Ambiguity::MethodOverride));
        }
    }
    match (ambiguous, policed) {
        (Some((route, why)), _) => Class::Ambiguous(route, why),
        (None, Some((route, project_id))) => Class::Policed { route, project_id },
        (None, None) => Class::Passthrough,
    }
}

/// A bit for each standard method (uppercase, as routes store them); 0 for any other.
fn method_bit(method: &Method) -> u16 {
    let bit = match method.as_str() {
        "GET" => 0,
        "HEAD" => 1,
        "POST" => 2,
        "PUT" => 3,
        "DELETE" => 4,
        "PATCH" => 5,
        "OPTIONS" => 6,
        "CONNECT" => 7,
        "TRACE" => 8,
        _ => return 0,
    };
    1 << bit
}

/// The first route that any reading of `path` matches, whatever the method.
fn route_on_path<'a>(routes: &'a [Route], path: &str, facts: &Facts) -> Option<&'a Route> {
    let plain = [
        Reading::ONCE,
        Reading::ONCE_KEEP_DOTS,
        Reading::ONCE_RAW_PARAMS,
        Reading::ONCE_KEEP_PARAMS,
    ];
    let suspicious = facts
        .suspicious()
        .then(|| Reading::suspicious(facts))
        .into_iter()
        .flatten();
    plain.into_iter().chain(suspicious).find_map(|how| {
        let segments = read(path, how);
        routes.iter().find(|r| r.matches(&segments).is_some())
    })
}

/// The methods named by method-override headers and by Routes' `_method` query parameter
/// (Cinder's router takes `?_method=PUT` as the method of the request), trimmed.
fn overrides<'h>(headers: &'h HeaderMap, query: &str) -> Vec<Cow<'h, [u8]>> {
    // One look at each name present costs less than three lookups by name (each of which
    // parses the name it looks for).
    let mut methods: Vec<Cow<'h, [u8]>> = headers
        .keys()
        .filter(|name| METHOD_OVERRIDE_HEADERS.contains(&name.as_str()))
        .flat_map(|name| headers.get_all(name))
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .map(|m| Cow::Borrowed(m.trim_ascii()))
        .collect();
    if query.contains("_method") || query.contains('%') {
        // Pairs split at `&` (form_urlencoded) and also at `;` (older form parsers).
        for piece in query.split(';') {
            for (key, value) in form_urlencoded::parse(piece.as_bytes()) {
                // WebOb decodes the key with errors ignored: `_meth%FFod` is `_method` to it.
                // Invalid UTF-8 comes out of the parser as U+FFFD, which is dropped here.
                let key: Vec<u8> = key.bytes().filter(u8::is_ascii_graphic).collect();
                if key.eq_ignore_ascii_case(b"_method") {
                    methods.extend(
                        value
                            .split(',')
                            .map(|m| Cow::Owned(m.as_bytes().trim_ascii().to_vec())),
                    );
                }
            }
        }
    }
    methods
}

/// What a path holds that calls for more than one reading.
struct Facts {
    /// An encoded `/` or `\` (or a raw `\`): servers disagree on whether it separates.
    encoded_separator: bool,
    /// A `.` or `..` segment, plain or encoded.
    dot_segments: bool,
    /// A `%` left after one round of decoding (`%2573`): a second decoding would change it.
    escape_after_decoding: bool,
    /// A `;`, plain or encoded: a servlet container cuts a parameter there, Cinder does not.
    semicolons: bool,
    /// A decoded control character (`%00`-`%1F`, `%7F`), space or non-ASCII byte: loose
    /// readers drop, trim or stop at them.
    loose_bytes: bool,
    /// A `\`, raw or encoded: a separator to some servers, data to Cinder.
    backslash: bool,
    /// Nothing but [`is_plain`] bytes: only dot segments can make readings differ.
    plain: bool,
}

impl Facts {
    fn of(path: &str) -> Self {
        let mut facts = Facts {
            encoded_separator: false,
            dot_segments: false,
            escape_after_decoding: false,
            semicolons: false,
            loose_bytes: false,
            backslash: false,
            plain: path.bytes().all(is_plain),
        };
        // Nearly every path is plain: visible ASCII with no escape, parameter or backslash.
        // Only dot segments are then left to find, without decoding anything.
        if facts.plain {
            facts.dot_segments = path
                .as_bytes()
                .split(|b| *b == b'/')
                .any(|s| matches!(s, b"." | b".."));
            return facts;
        }
        for raw in path.split('/') {
            let decoded = percent_decode(raw.as_bytes());
            facts.encoded_separator |= decoded.iter().any(is_separator);
            facts.escape_after_decoding |= raw.contains('%') && decoded.contains(&b'%');
            facts.semicolons |= decoded.contains(&b';');
            facts.loose_bytes |= decoded.iter().copied().any(is_loose);
            facts.backslash |= decoded.contains(&b'\\');
            let cut = decoded.split(|b| *b == b';').next().unwrap_or_default();
            facts.dot_segments |= matches!(cut, b"." | b"..");
        }
        facts
    }

    /// Whether the path holds anything that some reader reads differently from another.
    fn suspicious(&self) -> bool {
        self.encoded_separator || self.escape_after_decoding || self.loose_bytes
    }

    /// The first of the reasons a suspicious path is refused.
    fn ambiguity(&self) -> Ambiguity {
        if self.encoded_separator {
            Ambiguity::EncodedSeparator
        } else if self.escape_after_decoding {
            Ambiguity::DoubleEncoding
        } else {
            Ambiguity::LooseBytes
        }
    }
}

/// A byte that means the same to every reader of a path: visible ASCII, except `%` (an
/// escape), `;` (a parameter to some) and `\` (a separator to some).
fn is_plain(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'%' | b';' | b'\\')
}

fn is_separator(b: &u8) -> bool {
    matches!(b, b'/' | b'\\')
}

/// A byte a loose reader may drop, trim or stop at: an ASCII control character, a space, or
/// any byte of a non-ASCII character (Unicode whitespace such as U+3000, or `%85` and `%A0`,
/// which are whitespace to Python once a WSGI server has decoded the path as Latin-1).
fn is_loose(b: u8) -> bool {
    b.is_ascii_control() || b == b' ' || !b.is_ascii()
}

/// One way of turning a path into segments.
#[derive(Clone, Copy)]
struct Reading {
    decode_twice: bool,
    split: Split,
    resolve_dots: bool,
    params: Params,
    loose: Loose,
}

/// What a reading splits a decoded segment at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Split {
    /// Nothing: an encoded separator is data (Cinder behind a strict server).
    No,
    /// A decoded `/` (a server that decodes before splitting, or collapses `//` after it).
    Slash,
    /// A decoded `/` or `\` (servers that take `\` for `/`).
    SlashOrBackslash,
}

/// What a reading does with control characters and spaces once decoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loose {
    /// They are data, as in any strict reader.
    Keep,
    /// Dropped wherever they are (what trims, strips or skips them reads at least this).
    Drop,
    /// The path ends at the first NUL, as a C string does.
    CutAtNul,
}

/// Where a segment's `;params` are cut, if at all.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Params {
    /// At the first `;` once decoded: `%3B` cuts too.
    CutDecoded,
    /// At the first raw `;`, before decoding (RFC 3986): `%3B` is data.
    CutRaw,
    /// Never: `;` is data, as Cinder's router reads it.
    Keep,
}

impl Reading {
    const ONCE: Self = Self {
        decode_twice: false,
        split: Split::No,
        resolve_dots: true,
        params: Params::CutDecoded,
        loose: Loose::Keep,
    };
    const ONCE_RAW_PARAMS: Self = Self {
        params: Params::CutRaw,
        ..Self::ONCE
    };
    const ONCE_KEEP_PARAMS: Self = Self {
        params: Params::Keep,
        ..Self::ONCE
    };
    const ONCE_KEEP_DOTS: Self = Self {
        resolve_dots: false,
        ..Self::ONCE
    };

    /// Every combination of the readings that the facts of a suspicious path make differ:
    /// decoded once or twice, split at encoded separators or not, loose bytes kept, dropped or
    /// cut at, params cut or kept, dot segments resolved or kept. Combined, because readers
    /// combine them: a server that collapses the `//` of a decoded `%2F` in front of a router
    /// whose `$` ignores a final newline reads `/v3%2Fsnapshots%0A` as `/v3/snapshots`. At most
    /// 108 readings, each linear in the path, and only for paths that hold such bytes.
    fn suspicious(facts: &Facts) -> impl Iterator<Item = Reading> {
        let twice: &[bool] = if facts.escape_after_decoding {
            &[false, true]
        } else {
            &[false]
        };
        let split: &[Split] = match (
            facts.encoded_separator || facts.escape_after_decoding,
            facts.backslash,
        ) {
            (false, _) => &[Split::No],
            (true, false) => &[Split::No, Split::Slash],
            (true, true) => &[Split::No, Split::Slash, Split::SlashOrBackslash],
        };
        let loose: &[Loose] = if facts.loose_bytes {
            &[Loose::Keep, Loose::Drop, Loose::CutAtNul]
        } else {
            &[Loose::Keep]
        };
        let params: &[Params] = if facts.semicolons {
            &[Params::CutDecoded, Params::CutRaw, Params::Keep]
        } else {
            &[Params::CutDecoded]
        };
        twice.iter().flat_map(move |&decode_twice| {
            split.iter().flat_map(move |&split| {
                loose.iter().flat_map(move |&loose| {
                    params.iter().flat_map(move |&params| {
                        [true, false].map(|resolve_dots| Reading {
                            decode_twice,
                            split,
                            resolve_dots,
                            params,
                            loose,
                        })
                    })
                })
            })
        })
    }
}

/// The segments of `path` under `how`: percent-decoded, `;params` cut, empty segments (`//`,
/// a trailing `/`) dropped, and `.` and `..` resolved unless told not to. Params are cut before
/// dot segments are looked at, so `..;x` counts as `..`, as it does in servlet containers.
fn read(path: &str, how: Reading) -> Vec<Cow<'_, [u8]>> {
    let mut out: Vec<Cow<'_, [u8]>> = Vec::new();
    for raw in path.split('/') {
        let raw = match how.params {
            Params::CutRaw => raw.split(';').next().unwrap_or_default(),
            Params::CutDecoded | Params::Keep => raw,
        };
        let mut segment = percent_decode(raw.as_bytes());
        if how.decode_twice {
            segment = Cow::Owned(percent_decode(&segment).into_owned());
        }
        match how.loose {
            Loose::Keep => {}
            Loose::Drop if segment.iter().copied().any(is_loose) => {
                segment = Cow::Owned(segment.iter().copied().filter(|b| !is_loose(*b)).collect());
            }
            Loose::Drop => {}
            Loose::CutAtNul => {
                if let Some(nul) = segment.iter().position(|b| *b == 0) {
                    push_segment(&mut out, Cow::Owned(segment[..nul].to_vec()), how);
                    break;
                }
            }
        }
        let splits_at = |b: &u8| match how.split {
            Split::No => false,
            Split::Slash => *b == b'/',
            Split::SlashOrBackslash => is_separator(b),
        };
        if segment.iter().any(splits_at) {
            for piece in segment.split(splits_at) {
                push_segment(&mut out, Cow::Owned(piece.to_vec()), how);
            }
        } else {
            push_segment(&mut out, segment, how);
        }
    }
    out
}

/// [`Reading::ONCE`] of a plain path ([`Facts::plain`]), which has nothing to decode or cut.
fn read_plain(path: &str) -> Vec<Cow<'_, [u8]>> {
    let mut out = Vec::with_capacity(8);
    for segment in path.as_bytes().split(|b| *b == b'/') {
        match segment {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            segment => out.push(Cow::Borrowed(segment)),
        }
    }
    out
}

fn push_segment<'p>(out: &mut Vec<Cow<'p, [u8]>>, segment: Cow<'p, [u8]>, how: Reading) {
    let end = segment
        .iter()
        .position(|b| how.params == Params::CutDecoded && *b == b';')
        .unwrap_or(segment.len());
    let cut = match segment {
        Cow::Borrowed(s) => Cow::Borrowed(&s[..end]),
        Cow::Owned(mut s) => {
            s.truncate(end);
            Cow::Owned(s)
        }
    };
    match &*cut {
        b"" => {}
        b"." if how.resolve_dots => {}
        b".." if how.resolve_dots => {
            out.pop();
        }
        _ => out.push(cut),
    }
}

/// Decodes every valid `%XX` escape, as a WSGI server does before routing. Invalid escapes stay.
fn percent_decode(raw: &[u8]) -> Cow<'_, [u8]> {
    percent_encoding::percent_decode(raw).into()
}

impl Route {
    /// The decoded `{project_id}` (or `Some(None)` when the path names none) if the path fits.
    /// `{project_id}` may also be left out: from microversion 3.67 Cinder's router adds a twin
    /// without it to every resource route (`/v3/os-snapshot-manage`, `/v3/cgsnapshots`, ...).
    fn matches(&self, segments: &[Cow<'_, [u8]>]) -> Option<Option<String>> {
        if segments.len() == self.segments.len() {
            return self.fits(self.segments.iter(), segments);
        }
        let project = self
            .segments
            .iter()
            .position(|s| matches!(s, Segment::Param(name) if name == "project_id"))?;
        if segments.len() + 1 != self.segments.len() {
            return None;
        }
        let without = self
            .segments
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != project)
            .map(|(_, s)| s);
        self.fits(without, segments).map(|_| None)
    }

    fn fits<'t>(
        &self,
        template: impl Iterator<Item = &'t Segment>,
        segments: &[Cow<'_, [u8]>],
    ) -> Option<Option<String>> {
        let mut project_id = None;
        let last = segments.len().saturating_sub(1);
        for (i, (template, actual)) in template.zip(segments).enumerate() {
            match template {
                Segment::Literal(lit) => {
                    // Routes (Cinder's router) also accepts a `.json`-style format suffix on the
                    // last segment: `POST /v3/p1/snapshots.json` creates a snapshot.
                    let without_format = || {
                        actual
                            .iter()
                            .rposition(|b| *b == b'.')
                            .map(|dot| &actual[..dot])
                    };
                    let fits = lit.eq_ignore_ascii_case(actual)
                        || (i == last
                            && without_format().is_some_and(|a| lit.eq_ignore_ascii_case(a)));
                    if !fits {
                        return None;
                    }
                }
                Segment::Param(name) if name == "project_id" => {
                    project_id = Some(String::from_utf8_lossy(actual).into_owned());
                }
                Segment::Param(_) => {}
            }
        }
        Some(project_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class_of(method: &str, path: &str, overrides: &[(&str, &str)]) -> Option<String> {
        let routes = default_routes();
        let mut headers = HeaderMap::new();
        for (k, v) in overrides {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let uri: Uri = path.parse().unwrap();
        match classify(&routes, &method, &headers, &uri) {
            Class::Passthrough => None,
            Class::Policed { route, .. } => Some(route.template.to_string()),
            Class::Ambiguous(..) => Some("ambiguous".to_owned()),
        }
    }

    const UPDATE: &str = "/v3/{project_id}/snapshots/{snapshot_id}";

    #[test]
    fn a_plain_path_is_read_as_the_general_reading_reads_it() {
        for path in [
            "/",
            "/v3/p1/snapshots/s1",
            "//v3//p1/snapshots/s1/",
            "/v3/p1/x/../snapshots/./s1",
            "/../../v3/p1/snapshots/s1",
            "/v3/p1/snapshots/s1/..",
            "/V3/p-1/Snapshots/{s1}",
        ] {
            let facts = Facts::of(path);
            assert!(facts.plain, "{path}");
            assert_eq!(read_plain(path), read(path, Reading::ONCE), "{path}");
        }
        for not_plain in ["/v3/p%31", "/v3/p;x", "/v3\\p", "/v3/p 1", "/v3/\u{e9}"] {
            assert!(!Facts::of(not_plain).plain, "{not_plain}");
        }
    }

    #[test]
    fn the_default_table_has_every_route() {
        let routes = default_routes();
        assert_eq!(routes.len(), 16);
        assert_eq!(
            routes[0].template,
            "/v3/{project_id}/snapshots/{snapshot_id}"
        );
        assert_eq!(routes[0].methods, [Method::PUT]);
        assert_eq!(routes[0].error_style, ErrorStyle::Openstack);
        assert_eq!(routes[15].error_style, ErrorStyle::Huawei);
    }

    #[test]
    fn every_spelling_of_the_update_route_is_policed() {
        for path in [
            "/v3/p1/snapshots/s1",
            "/v3/p1/snapshots/s1/",
            "//v3/p1/snapshots/s1",
            "/v3//p1///snapshots/s1",
            "/V3/p1/Snapshots/s1",
            "/v3/p1/SNAPSHOTS/s1",
            "/v3/p1/x/../snapshots/s1",
            "/v3/p1/./snapshots/s1",
            "/v3/p1/snapshots/s1;jsessionid=1",
            "/v3;v=1/p1/snapshots;x/s1",
            "/v3/p1/%73napshots/s1",
            "/%76%33/p1/snapshots/s1",
            "/v3/p1/x/%2e%2e/snapshots/s1",
            "/v3/p1/x/%2E./snapshots/s1",
            "/v3/p1/x/..;/snapshots/s1",
            "/v3/p1/snapshots%3bx/s1",
            "/v3/p1/snapshots/;x",
            "/v3/p1/snapshots/%3Bx",
            "/v3/p1/snapshots/%3bs1;y",
            "/%76%33;ns/%00;%00/SNAPShOTs;/%3B",
            "/a/b/../../v3/p1/snapshots/s1",
            "/../v3/p1/snapshots/s1",
        ] {
            assert_eq!(
                class_of("PUT", path, &[]).as_deref(),
                Some(UPDATE),
                "{path}"
            );
        }
    }

    #[test]
    fn encoded_separators_inside_a_snapshot_route_are_refused() {
        for path in [
            "/v3/p1%2Fsnapshots/s1",
            "/v3/p1/snapshots%2fs1",
            "/v3%5Cp1/snapshots/s1",
            "/v3/p1/snapshots/s%2F1",
            "/v3/p1/snapshots/a%2F..",
        ] {
            assert_eq!(
                class_of("PUT", path, &[]).as_deref(),
                Some("ambiguous"),
                "{path}"
            );
        }
        // Not a snapshot route whichever way it is split: forwarded as is.
        assert_eq!(class_of("PUT", "/v3/p1/volumes/a%2Fb", &[]), None);
    }

    #[test]
    fn other_routes_and_methods_pass_through() {
        for (method, path) in [
            ("GET", "/v3/p1/snapshots/s1"),
            ("DELETE", "/v3/p1/snapshots/s1"),
            ("PUT", "/v3/p1/snapshots/s1/metadata"),
            ("PUT", "/v3/p1/volumes/v1"),
            ("PUT", "/v3/p1/snapshots"),
            ("POST", "/v3/p1/snapshots/s1/action"),
            ("PUT", "/v4/p1/snapshots/s1"),
            ("PUT", "/v3/p1/snapshotsx/s1"),
            ("PUT", "/v3/p1/snapshots.json/s1"),
            ("POST", "/v3/p1/snapshotsjson"),
            ("OPTIONS", "*"),
        ] {
            assert_eq!(class_of(method, path, &[]), None, "{method} {path}");
        }
    }

    #[test]
    fn every_default_route_matches_its_own_spelling() {
        for (method, path, want) in [
            ("POST", "/v3/p1/snapshots", "/v3/{project_id}/snapshots"),
            (
                "POST",
                "/v3/p1/snapshots.json",
                "/v3/{project_id}/snapshots",
            ),
            ("POST", "/v3/p1/Snapshots.xml", "/v3/{project_id}/snapshots"),
            (
                "POST",
                "/v3/p1/manageable_snapshots.json",
                "/v3/{project_id}/manageable_snapshots",
            ),
            (
                "PUT",
                "/v3/p1/snapshots/s1.json",
                "/v3/{project_id}/snapshots/{snapshot_id}",
            ),
            ("POST", "/v2/p1/snapshots", "/v2/{project_id}/snapshots"),
            (
                "PUT",
                "/v2/p1/snapshots/s1",
                "/v2/{project_id}/snapshots/{snapshot_id}",
            ),
            ("POST", "/v3/snapshots", "/v3/{project_id}/snapshots"),
            ("PUT", "/v3/snapshots/s1", UPDATE),
            (
                "POST",
                "/v3/os-snapshot-manage.json",
                "/v3/{project_id}/os-snapshot-manage",
            ),
            ("POST", "/v3/cgsnapshots", "/v3/{project_id}/cgsnapshots"),
            ("POST", "/v5/p1/snapshots", "/v5/{project_id}/snapshots"),
            (
                "POST",
                "/v5/p1/snapshot-groups",
                "/v5/{project_id}/snapshot-groups",
            ),
            (
                "PUT",
                "/v5/p1/snapshot-groups/g1",
                "/v5/{project_id}/snapshot-groups/{snapshot_group_id}",
            ),
            (
                "POST",
                "/v3/p1/manageable_snapshots",
                "/v3/{project_id}/manageable_snapshots",
            ),
            (
                "POST",
                "/v2/p1/cloudsnapshots",
                "/v2/{project_id}/cloudsnapshots",
            ),
            (
                "PUT",
                "/v2/p1/cloudsnapshots/s1",
                "/v2/{project_id}/cloudsnapshots/{snapshot_id}",
            ),
            (
                "PUT",
                "/v5/p1/snapshots/s1",
                "/v5/{project_id}/snapshots/{snapshot_id}",
            ),
        ] {
            assert_eq!(
                class_of(method, path, &[]).as_deref(),
                Some(want),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn method_override_headers_are_honoured_in_any_case() {
        for (name, value) in [
            ("X-HTTP-Method-Override", "PUT"),
            ("x-http-method-override", "put"),
            ("X-HTTP-Method", " Put "),
            ("X-Method-Override", "GET, PUT"),
        ] {
            assert_eq!(
                class_of("POST", "/v3/p1/snapshots/s1", &[(name, value)]).as_deref(),
                Some(UPDATE),
                "{name}: {value}"
            );
        }
        assert_eq!(
            class_of(
                "POST",
                "/v3/p1/snapshots/s1",
                &[("X-HTTP-Method-Override", "PATCH")]
            ),
            None
        );
    }

    #[test]
    fn routes_query_method_override_is_honoured() {
        for path in [
            "/v3/p1/snapshots/s1?_method=PUT",
            "/v3/p1/snapshots/s1?_method=put",
            "/v3/p1/snapshots/s1?x=1&_method=PUT",
            "/v3/p1/snapshots/s1?x=1;_method=PUT",
            "/v3/p1/snapshots/s1?%5Fmethod=P%55T",
            "/v3/p1/snapshots/s1?_method=+PUT+",
        ] {
            assert_eq!(
                class_of("POST", path, &[]).as_deref(),
                Some(UPDATE),
                "{path}"
            );
            assert_eq!(
                class_of("GET", path, &[]).as_deref(),
                Some(UPDATE),
                "{path}"
            );
        }
        assert_eq!(
            class_of("POST", "/v3/p1/snapshots/s1?_method=PATCH", &[]),
            None
        );
        assert_eq!(
            class_of("POST", "/v3/p1/snapshots/s1?x_method=PUT", &[]),
            None
        );
    }

    #[test]
    fn methods_compare_case_insensitively() {
        assert_eq!(
            class_of("put", "/v3/p1/snapshots/s1", &[]).as_deref(),
            Some(UPDATE)
        );
        assert_eq!(
            class_of("Post", "/v3/p1/snapshots", &[]).as_deref(),
            Some("/v3/{project_id}/snapshots")
        );
    }

    #[test]
    fn dot_segments_are_also_read_unresolved() {
        // A router that does not resolve them takes `..` for the project id.
        assert_eq!(
            class_of("PUT", "/v3/../snapshots/s1", &[]).as_deref(),
            Some(UPDATE)
        );
        assert_eq!(
            class_of("PUT", "/v3/./snapshots/s1", &[]).as_deref(),
            Some(UPDATE)
        );
    }

    #[test]
    fn what_a_second_decoding_would_make_a_route_is_refused() {
        for path in [
            "/v3/p1/%2573napshots/s1",
            "/v3/p1%252Fsnapshots/s1",
            "/v3/p1/%252e%252e/x/snapshots/s1",
        ] {
            assert_eq!(
                class_of("PUT", path, &[]).as_deref(),
                Some("ambiguous"),
                "{path}"
            );
        }
        // A stray percent that decodes to nothing routable is just a name.
        assert_eq!(
            class_of("PUT", "/v3/p1/snapshots/100%25", &[]).as_deref(),
            Some(UPDATE)
        );
        assert_eq!(class_of("PUT", "/v3/p1/volumes/%2573", &[]), None);
    }

    #[test]
    fn suspicious_bytes_on_a_route_are_refused() {
        // Python's `$` matches before a final newline: Cinder routes these to the actions.
        for (method, path) in [
            ("POST", "/v3/ab12/snapshots%0A"),
            ("POST", "/v3/ab12/snapshots%0a"),
            ("POST", "/v3/snapshots%0A"),
            ("POST", "/v3/ab12/manageable_snapshots%0A"),
            ("POST", "/v3/ab12/os-snapshot-manage%0A"),
            ("POST", "/v3/ab12/group_snapshots%0A"),
            ("POST", "/v3/ab12/cgsnapshots%0A"),
            // What a looser reader might make of them: dropped, trimmed, cut at NUL.
            ("POST", "/v2/p1/cloudsnapshots%09"),
            ("PUT", "/v5/p1/snapshots%00/s1"),
            ("PUT", "/v5%1F/p1/snapshots/s1"),
            ("POST", "/v2/p1/%0Bcloudsnapshots"),
            ("POST", "/v3/p1/snapshots%00.html"),
            ("POST", "/v3/p1/snap%7Fshots"),
            ("POST", "/v3/p1/snapshots%20"),
            ("POST", "/v2/p1/cloudsnapshots%A0"),
            ("POST", "/v2/p1/%E3%80%80cloudsnapshots"),
            ("PUT", "/v5/p1/snapshots%C2%85/s1"),
            // Combined with an encoded slash (found by the differential test against Cinder's
            // router: its URL map collapses the `//` a decoded `%2F` makes).
            ("POST", "/v3%2Fsnapshots%0a"),
            ("POST", "/v3%2F--/group_snapshots%0A"),
            ("POST", "/v3/ab12%2Fsnapshots%0A"),
            // A backslash is data to Cinder, so a `%2F` reading must keep it in the id.
            ("PUT", "/v3%2fsnapshots/a%5Cb.json"),
            ("PUT", "/v3/snapshots%2Fa%5Cb"),
            ("PUT", "/v3%2Fsnapshots/a\\b"),
        ] {
            assert_eq!(
                class_of(method, path, &[]).as_deref(),
                Some("ambiguous"),
                "{method} {path}"
            );
        }
        // The format suffix is cut at the last dot, so this one is simply policed.
        assert_eq!(
            class_of("POST", "/v3/ab12/snapshots.json%0A", &[]).as_deref(),
            Some("/v3/{project_id}/snapshots")
        );
        // A control character inside an id is only data: the route is still policed.
        assert_eq!(
            class_of("PUT", "/v3/p1/snapshots/s1%0A", &[]).as_deref(),
            Some(UPDATE)
        );
        // Nothing a loose reading makes a route: forwarded.
        assert_eq!(class_of("POST", "/v3/p1/volumes%0A", &[]), None);
        assert_eq!(class_of("GET", "/v3/p1/snapshots%0A", &[]), None);
    }

    #[test]
    fn method_overrides_that_are_not_plain_ascii_are_refused_on_a_route() {
        for path in [
            // U+017F, which Python's str.upper() makes S: `poſt` is POST to Cinder's router.
            "/v3/ab12/snapshots?_method=po%C5%BFt",
            // U+FB05 is `ST` upper-cased.
            "/v3/ab12/snapshots?_method=po%EF%AC%85",
            // WebOb drops invalid UTF-8.
            "/v3/ab12/snapshots?_method=PO%FFST",
            "/v3/ab12/snapshots/s1?_method=p%C5%BFt",
            "/v3/ab12/snapshots?_method=PO%00ST",
        ] {
            assert_eq!(
                class_of("GET", path, &[]).as_deref(),
                Some("ambiguous"),
                "{path}"
            );
        }
        // The same on a path no route matches is nobody's business.
        assert_eq!(
            class_of("GET", "/v3/ab12/volumes?_method=po%C5%BFt", &[]),
            None
        );
        // A key WebOb reads as `_method` once invalid UTF-8 is dropped.
        assert_eq!(
            class_of("GET", "/v3/ab12/snapshots?_meth%FFod=POST", &[]).as_deref(),
            Some("/v3/{project_id}/snapshots")
        );
    }

    #[test]
    fn every_route_is_also_matched_without_its_project_id() {
        for (method, path, want) in [
            (
                "POST",
                "/v3/os-snapshot-manage",
                "/v3/{project_id}/os-snapshot-manage",
            ),
            (
                "POST",
                "/v3/cgsnapshots.json",
                "/v3/{project_id}/cgsnapshots",
            ),
            (
                "POST",
                "/v3/group_snapshots",
                "/v3/{project_id}/group_snapshots",
            ),
            (
                "POST",
                "/v3/manageable_snapshots",
                "/v3/{project_id}/manageable_snapshots",
            ),
            ("PUT", "/V3/Snapshots/s1", UPDATE),
        ] {
            assert_eq!(
                class_of(method, path, &[]).as_deref(),
                Some(want),
                "{method} {path}"
            );
        }
        let routes = default_routes();
        let uri = Uri::from_static("/v3/snapshots/s1");
        let class = classify(&routes, &Method::PUT, &HeaderMap::new(), &uri);
        assert!(matches!(
            class,
            Class::Policed {
                project_id: None,
                ..
            }
        ));
    }

    #[test]
    fn group_and_manage_routes_are_policed() {
        for (path, root) in [
            ("/v3/p1/group_snapshots", "group_snapshot"),
            ("/v3/group_snapshots", "group_snapshot"),
            ("/v3/p1/cgsnapshots", "cgsnapshot"),
            ("/v2/p1/cgsnapshots", "cgsnapshot"),
            ("/v3/p1/os-snapshot-manage", "snapshot"),
            ("/v2/p1/os-snapshot-manage", "snapshot"),
            ("/v3/manageable_snapshots", "snapshot"),
        ] {
            let routes = default_routes();
            let uri: Uri = path.parse().unwrap();
            match classify(&routes, &Method::POST, &HeaderMap::new(), &uri) {
                Class::Policed { route, .. } => assert_eq!(route.body_root, root, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_project_id_is_taken_from_the_path() {
        let routes = default_routes();
        let uri = Uri::from_static("/v3/%70roj/snapshots/s1");
        let class = classify(&routes, &Method::PUT, &HeaderMap::new(), &uri);
        assert!(matches!(class, Class::Policed { project_id: Some(ref p), .. } if p == "proj"));
    }

    #[test]
    fn display_fields_are_renamed_only_when_the_route_polices_both() {
        let routes = default_routes();
        assert_eq!(
            routes[0].renames,
            [
                ("display_name".to_owned(), "name".to_owned()),
                ("display_description".to_owned(), "description".to_owned())
            ]
        );
        assert!(routes[15].renames.is_empty());
    }

    #[test]
    fn bad_templates_are_refused() {
        for path in ["v3/x", "/v3//x", "/v3/{}/x", "/v3/../x", "/v3/a%2Fb"] {
            let spec = RouteSpec {
                methods: vec!["PUT".into()],
                path: path.into(),
                body_root: "snapshot".into(),
                name_fields: vec!["name".into()],
                description_fields: vec![],
                error_style: ErrorStyle::Openstack,
            };
            assert!(Route::try_from(spec).is_err(), "{path}");
        }
    }
}
