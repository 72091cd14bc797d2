//! The naming policy of SPEC section 2, as pure functions on bytes and strings.
//!
//! [`check_body`] decides on a whole (already size-bounded) policed body: it returns the body to
//! forward or the [`Violation`] to report. It knows nothing of hyper or sockets; the proxy and the
//! offline `snapguard check` both call it, so they cannot disagree.

pub mod json;
pub mod media;
pub mod rules;

use std::borrow::Cow;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::config::PolicyConfig;
use crate::route::{Ambiguity, Route};

pub use rules::Rule;

pub use media::{check_content_encoding, check_content_type};

/// What the downstream is told about a request that could not be classified with certainty.
fn ambiguity_message(why: Ambiguity) -> &'static str {
    match why {
        Ambiguity::EncodedSeparator => {
            "Invalid request path: an encoded '/' or '\\' inside a snapshot route cannot be policed."
        }
        Ambiguity::DoubleEncoding => {
            "Invalid request path: a percent-escape that decodes to another escape inside a snapshot route cannot be policed."
        }
        Ambiguity::LooseBytes => {
            "Invalid request path: a control character, space or non-ASCII byte inside a snapshot route cannot be policed."
        }
        Ambiguity::MethodOverride => {
            "Invalid request method: a method override that is not plain ASCII cannot be policed on a snapshot route."
        }
    }
}

/// Whether violations are refused, or only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    /// Log and count violations, forward the request unchanged: for rolling a policy out.
    Audit,
}

/// An allowed body: what it becomes on its way upstream, and a reserved-prefix violation
/// waived for its project, if any (to be logged and counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub body: Verdict,
    pub exempted: Option<Violation>,
}

/// Where a policed request goes: its route, and the project id its path names.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub route: &'a Route,
    pub project: Option<&'a str>,
}

/// What an allowed body becomes on its way upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the bytes exactly as received.
    Unchanged,
    /// Forward this re-serialized body instead (legacy `display_*` fields renamed or dropped).
    Normalized(Vec<u8>),
}

/// Why a request is refused. The messages follow Cinder's wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("Request body is larger than {limit} bytes.")]
    BodyTooLarge { limit: usize },
    #[error(
        "Unsupported Content-Encoding {shown:?}: a policed body must not be encoded.",
        shown = abbreviate(.0)
    )]
    ContentEncoding(String),
    #[error(
        "Unsupported Content-Type {shown:?}: a policed body must be JSON in UTF-8.",
        shown = abbreviate(.0)
    )]
    ContentType(String),
    #[error("Malformed request body: {0}.")]
    Malformed(String),
    #[error("Missing required element '{0}' in request body.")]
    MissingRoot(String),
    #[error(
        "Invalid input for field/attribute {root}. Value: {shown}. {shown} is not of type 'object'",
        shown = abbreviate(raw)
    )]
    RootNotObject { root: String, raw: String },
    #[error(
        "Invalid input for field/attribute {field}. Value: {shown}. {shown} is not of type 'string', 'null'",
        shown = abbreviate(raw)
    )]
    FieldType { field: String, raw: String },
    #[error(
        "Invalid input for field/attribute {field}. Value: {shown}. '{shown}' is too long: {bytes} bytes of UTF-8, at most {max} allowed.",
        shown = abbreviate(value)
    )]
    TooLong {
        field: String,
        value: String,
        bytes: usize,
        max: usize,
    },
    #[error(
        "Invalid input for field/attribute {field}. Value: {shown}. Names starting with '{prefix}' are reserved for automatic backup snapshots.",
        shown = abbreviate(value)
    )]
    ReservedPrefix {
        field: String,
        value: String,
        prefix: String,
    },
    #[error(
        "Invalid input for field/attribute {field}. Value: {shown}. Rule '{rule}': {message}",
        shown = abbreviate(value)
    )]
    Rule {
        rule: Arc<str>,
        field: String,
        value: String,
        message: String,
    },
    #[error("{}", ambiguity_message(*.0))]
    AmbiguousPath(Ambiguity),
}

impl Violation {
    /// The rule's name for logs and metrics: a fixed name, or a configured rule's.
    pub fn rule(&self) -> Cow<'static, str> {
        match self {
            Self::Rule { rule, .. } => Cow::Owned(rule.to_string()),
            other => Cow::Borrowed(other.kind()),
        }
    }

    /// A fixed name for the kind of violation (every configured rule is `rule`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Rule { .. } => "rule",
            Self::BodyTooLarge { .. } => "max_body_bytes",
            Self::ContentEncoding(_) => "content_encoding",
            Self::ContentType(_) => "content_type",
            Self::Malformed(_) => "malformed_json",
            Self::MissingRoot(_) | Self::RootNotObject { .. } => "body_root",
            Self::FieldType { .. } => "field_type",
            Self::TooLong { .. } => "max_field_bytes",
            Self::ReservedPrefix { .. } => "reserved_prefix",
            Self::AmbiguousPath(_) => "ambiguous_path",
        }
    }

    /// The body field the violation is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::FieldType { field, .. }
            | Self::TooLong { field, .. }
            | Self::ReservedPrefix { field, .. }
            | Self::Rule { field, .. } => Some(field),
            Self::MissingRoot(root) | Self::RootNotObject { root, .. } => Some(root),
            _ => None,
        }
    }
}

/// Long values are echoed in errors only in part: the message stays readable and bounded.
/// Every value a refusal (or an error's log line) quotes from the request goes through here,
/// from the body, a header or the request line: a refusal must not cost more than the request
/// (a 64 KiB value echoed twice would make a 128 KiB answer).
pub(crate) fn abbreviate(value: &str) -> Cow<'_, str> {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        Some((cut, _)) => Cow::Owned(format!("{}...", &value[..cut])),
        None => Cow::Borrowed(value),
    }
}

/// Characters Python's `str.isspace()` holds true, which `str.strip()` removes. Wider than
/// `char::is_whitespace`: it includes the separators U+001C..U+001F.
pub fn is_python_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\u{1c}'..='\u{1f}'
            | ' '
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// The reserved prefix `name` would be stored under, if any. Cinder strips names before storing
/// them, so leading whitespace does not hide a prefix.
pub fn reserved_prefix<'p>(
    name: &str,
    prefixes: &'p [String],
    case_insensitive: bool,
) -> Option<&'p str> {
    let stored = name.trim_start_matches(is_python_space);
    prefixes
        .iter()
        .find(|p| {
            if case_insensitive {
                let mut chars = stored.chars().flat_map(char::to_lowercase);
                p.chars()
                    .flat_map(char::to_lowercase)
                    .all(|c| chars.next() == Some(c))
            } else {
                stored.starts_with(p.as_str())
            }
        })
        .map(String::as_str)
}

/// Checks what can be decided from a policed request's headers alone, before its body is read.
pub fn check_headers(headers: &HeaderMap) -> Result<(), Violation> {
    let values = |name| headers.get_all(name).into_iter().map(HeaderValue::as_bytes);
    check_content_encoding(values(header::CONTENT_ENCODING))?;
    check_content_type(values(header::CONTENT_TYPE))
}

/// The scheme of Huawei's AK/SK request signatures.
const SIGNATURE_SCHEME: &[u8] = b"SDK-HMAC-SHA256";

/// Whether the request carries a Huawei AK/SK signature (`Authorization: SDK-HMAC-SHA256 ...`),
/// which covers the body's hash: such a body must reach the upstream byte for byte.
pub fn is_signed(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().get(..SIGNATURE_SCHEME.len()))
        .is_some_and(|s| s.eq_ignore_ascii_case(SIGNATURE_SCHEME))
}

/// The headers an AK/SK signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignedHeaders {
    /// As listed in its `SignedHeaders=a;b;c`.
    Listed(Vec<HeaderName>),
    /// A signature whose list cannot be read: every header counts as signed.
    All,
}

impl SignedHeaders {
    pub fn covers(&self, name: &HeaderName) -> bool {
        match self {
            Self::Listed(names) => names.contains(name),
            Self::All => true,
        }
    }
}

/// The headers covered by the request's AK/SK signature, `None` for an unsigned request.
pub fn signed_headers(headers: &HeaderMap) -> Option<SignedHeaders> {
    if !is_signed(headers) {
        return None;
    }
    let listed = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v[SIGNATURE_SCHEME.len()..].split(',').find_map(|param| {
                let (key, value) = param.split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("SignedHeaders")
                    .then_some(value)
            })
        })
        .map(|list| {
            list.split(';')
                .map(|name| HeaderName::from_bytes(name.trim().as_bytes()))
                .collect::<Result<Vec<_>, _>>()
        });
    Some(match listed {
        Some(Ok(names)) => SignedHeaders::Listed(names),
        _ => SignedHeaders::All,
    })
}

/// Polices a whole body sent to `target`: the built-in checks, then the configured `rules`.
/// With `may_normalize` false (signed requests) an allowed body is always forwarded unchanged.
pub fn check_body(
    target: Target<'_>,
    policy: &PolicyConfig,
    rules: &[Rule],
    body: &[u8],
    may_normalize: bool,
) -> Result<Allowed, Violation> {
    let route = target.route;
    if body.len() > policy.max_body_bytes {
        return Err(Violation::BodyTooLarge {
            limit: policy.max_body_bytes,
        });
    }
    let text =
        std::str::from_utf8(body).map_err(|e| Violation::Malformed(format!("not UTF-8: {e}")))?;
    let policed = |key: &str| {
        route.name_fields.iter().any(|f| f == key)
            || route.description_fields.iter().any(|f| f == key)
    };
    let fields = json::police(text, &route.body_root, &policed)
        .map_err(|e| Violation::Malformed(e.to_string()))?
        .ok_or_else(|| shape_violation(route, text))?;

    let exempt = policy
        .reserved_prefix_exempt_projects
        .iter()
        .any(|p| Some(p.as_str()) == target.project);
    let rules: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.applies(route, target.project))
        .collect();
    let mut exempted = None;
    for (key, value) in &fields {
        let is_name = route.name_fields.iter().any(|f| f == key);
        let value = match value {
            json::Field::Text(value) => value,
            json::Field::Null => continue,
            json::Field::Other => {
                return Err(Violation::FieldType {
                    field: key.to_string(),
                    raw: raw_field(route, text, key),
                })
            }
        };
        if value.len() > policy.max_field_bytes {
            return Err(Violation::TooLong {
                field: key.to_string(),
                bytes: value.len(),
                value: value.to_string(),
                max: policy.max_field_bytes,
            });
        }
        let reserved = is_name
            .then(|| {
                reserved_prefix(
                    value,
                    &policy.reserved_prefixes,
                    policy.case_insensitive_prefixes,
                )
            })
            .flatten();
        if let Some(prefix) = reserved {
            let v = Violation::ReservedPrefix {
                field: key.to_string(),
                value: value.to_string(),
                prefix: prefix.to_owned(),
            };
            if !exempt {
                return Err(v);
            }
            exempted.get_or_insert(v);
        }
        if let Some(rule) = rules
            .iter()
            .find(|r| r.covers(route, key) && !r.allows(value))
        {
            return Err(Violation::Rule {
                rule: rule.name.clone(),
                field: key.to_string(),
                value: value.to_string(),
                message: rule.message().to_owned(),
            });
        }
    }

    let legacy_present = route
        .renames
        .iter()
        .any(|(legacy, _)| fields.iter().any(|(k, _)| k == legacy));
    let body = match may_normalize && legacy_present {
        true => normalize(route, text).map_or(Verdict::Unchanged, Verdict::Normalized),
        false => Verdict::Unchanged,
    };
    Ok(Allowed { body, exempted })
}

/// The root object and its `body_root` member, each as members with their raw text: for the
/// rarer work of saying what is wrong with a body, or normalizing it. `Err` says why they are
/// not there. The body has passed [`json::police`].
fn root_members<'t>(
    route: &Route,
    text: &'t str,
) -> Result<(json::Members<'t>, json::Members<'t>), Violation> {
    let root = &route.body_root;
    let members = json::members(text).ok_or_else(|| Violation::MissingRoot(root.clone()))?;
    let (_, raw) = members
        .iter()
        .find(|(k, _)| k == root)
        .ok_or_else(|| Violation::MissingRoot(root.clone()))?;
    let fields = json::members(raw.get()).ok_or_else(|| Violation::RootNotObject {
        root: root.clone(),
        raw: raw.get().to_owned(),
    })?;
    Ok((members, fields))
}

/// Why a body that [`json::police`] found no fields in has not the shape the route wants.
fn shape_violation(route: &Route, text: &str) -> Violation {
    match root_members(route, text) {
        Err(v) => v,
        // Not reached: what `police` finds no root object in, neither does this.
        Ok(_) => Violation::MissingRoot(route.body_root.clone()),
    }
}

/// The raw text of the policed field `key`, to quote a value of the wrong type.
fn raw_field(route: &Route, text: &str, key: &str) -> String {
    root_members(route, text)
        .ok()
        .and_then(|(_, fields)| {
            let (_, raw) = fields.into_iter().find(|(k, _)| k == key)?;
            Some(raw.get().to_owned())
        })
        .unwrap_or_default()
}

/// Re-serializes the body with `display_X` renamed to `X` (or dropped when `X` is present too),
/// every other member in its original order and with its original raw text. `None` only if
/// the body has not the shape [`json::police`] found in it.
fn normalize(route: &Route, text: &str) -> Option<Vec<u8>> {
    let (members, fields) = root_members(route, text).ok()?;
    let mut snapshot =
        Vec::with_capacity(members.iter().map(|(_, v)| v.get().len()).sum::<usize>() + 16);
    let kept = fields.iter().filter_map(|(key, raw)| {
        match route.renames.iter().find(|(legacy, _)| legacy == key) {
            Some((_, current)) if fields.iter().any(|(k, _)| k == current) => None,
            Some((_, current)) => Some((current.as_str(), raw.get().as_bytes())),
            None => Some((key.as_ref(), raw.get().as_bytes())),
        }
    });
    json::write_object(&mut snapshot, kept);

    let mut out = Vec::with_capacity(snapshot.len() + 32);
    let root = members.iter().map(|(key, raw)| {
        let raw = if *key == route.body_root {
            snapshot.as_slice()
        } else {
            raw.get().as_bytes()
        };
        (key.as_ref(), raw)
    });
    json::write_object(&mut out, root);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::default_routes;

    /// `Ok("")` means forwarded unchanged, `Ok(body)` normalized to body, `Err(rule)` refused.
    fn police(body: &str) -> Result<String, &'static str> {
        police_with(&PolicyConfig::default(), body, true)
    }

    fn police_with(
        policy: &PolicyConfig,
        body: &str,
        may_normalize: bool,
    ) -> Result<String, &'static str> {
        let route = &default_routes()[0];
        let target = Target {
            route,
            project: Some("p1"),
        };
        match check_body(target, policy, &[], body.as_bytes(), may_normalize) {
            Ok(Allowed {
                body: Verdict::Unchanged,
                ..
            }) => Ok(String::new()),
            Ok(Allowed {
                body: Verdict::Normalized(b),
                ..
            }) => Ok(String::from_utf8(b).unwrap()),
            Err(v) => Err(v.kind()),
        }
    }

    #[test]
    fn spec_vectors() {
        let name = |n: &str| format!("{{\"snapshot\":{{\"name\":\"{n}\"}}}}");
        let cases: Vec<(String, Result<&str, &str>)> = vec![
            (r#"{"snapshot":{"name":"snap-001","description":"Daily backup"}}"#.into(), Ok("")),
            (name("autobk_snapshot_x"), Err("reserved_prefix")),
            (name("  autobk_snapshot_x"), Err("reserved_prefix")),
            (name("\\u3000autobk_snapshot_x"), Err("reserved_prefix")),
            (name("\\u001cautobk_snapshot_x"), Err("reserved_prefix")),
            (name("\\u0061utobk_snapshot_x"), Err("reserved_prefix")),
            (r#"{"snapshot":{"display_name":"autobk_snapshot_1"}}"#.into(), Err("reserved_prefix")),
            (r#"{"snapshot":{"name":"ok","display_name":"autobk_snapshot_1"}}"#.into(), Err("reserved_prefix")),
            (r#"{"snapshot":{"display_name":"new"}}"#.into(), Ok(r#"{"snapshot":{"name":"new"}}"#)),
            (r#"{"snapshot":{"name":"a","display_name":"b"}}"#.into(), Ok(r#"{"snapshot":{"name":"a"}}"#)),
            (name(&"a".repeat(255)), Ok("")),
            (name(&"a".repeat(256)), Err("max_field_bytes")),
            (name(&"快".repeat(85)), Ok("")),
            (name(&"快".repeat(86)), Err("max_field_bytes")),
            (name(&"é".repeat(128)), Err("max_field_bytes")),
            (name(&"\\u00e9".repeat(128)), Err("max_field_bytes")),
            (format!("{{\"snapshot\":{{\"display_description\":\"{}\"}}}}", "d".repeat(256)), Err("max_field_bytes")),
            (r#"{"snapshot":{"name":null,"description":null}}"#.into(), Ok("")),
            (r#"{"snapshot":{"name":5}}"#.into(), Err("field_type")),
            ("not json".into(), Err("malformed_json")),
            (r#"{"snapshot":{"name":"a","name":"autobk_snapshot_x"}}"#.into(), Err("malformed_json")),
            (
                r#"{"snapshot":{"volume_id":"5aa119a8-d25b-45a7-8d1b-88e127885635","force":false,"name":"autobk_snapshot_a","description":null,"metadata":{}}}"#.into(),
                Err("reserved_prefix"),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                police(&body).as_deref(),
                want.map(str::to_owned).as_deref(),
                "{body}"
            );
        }
    }

    #[test]
    fn the_root_must_hold_a_snapshot_object() {
        for body in ["{}", "[]", "\"x\"", "null", r#"{"snapshots":{}}"#] {
            assert_eq!(police(body), Err("body_root"), "{body}");
        }
        for body in [
            r#"{"snapshot":[]}"#,
            r#"{"snapshot":"x"}"#,
            r#"{"snapshot":null}"#,
        ] {
            assert_eq!(police(body), Err("body_root"), "{body}");
        }
    }

    #[test]
    fn normalization_keeps_order_and_raw_text_of_everything_else() {
        let body = r#" {"a": 1.50, "snapshot": {"display_description": "d", "force": true, "display_name": "n", "metadata": {"k": [1, 2]}}, "z": 12345678901234567890123} "#;
        assert_eq!(
            police(body).unwrap(),
            r#"{"a":1.50,"snapshot":{"description":"d","force":true,"name":"n","metadata":{"k": [1, 2]}},"z":12345678901234567890123}"#
        );
        let both = r#"{"snapshot":{"display_name":"old","name":"new","description":"x","display_description":"y"}}"#;
        assert_eq!(
            police(both).unwrap(),
            r#"{"snapshot":{"name":"new","description":"x"}}"#
        );
    }

    #[test]
    fn signed_bodies_are_policed_but_never_normalized() {
        let p = PolicyConfig::default();
        assert_eq!(
            police_with(&p, r#"{"snapshot":{"display_name":"new"}}"#, false),
            Ok(String::new())
        );
        assert_eq!(
            police_with(
                &p,
                r#"{"snapshot":{"display_name":"autobk_snapshot_1"}}"#,
                false
            ),
            Err("reserved_prefix")
        );
    }

    #[test]
    fn signed_headers_are_read_from_the_authorization() {
        let with = |auth: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, auth.parse().unwrap());
            signed_headers(&h)
        };
        let listed = with(
            "SDK-HMAC-SHA256 Access=AK, SignedHeaders=content-type;Host;x-sdk-date, Signature=ab",
        );
        assert_eq!(
            listed,
            Some(SignedHeaders::Listed(vec![
                header::CONTENT_TYPE,
                header::HOST,
                HeaderName::from_static("x-sdk-date")
            ]))
        );
        assert_eq!(
            with("sdk-hmac-sha256 Access=AK, Signature=ab"),
            Some(SignedHeaders::All)
        );
        assert_eq!(
            with("SDK-HMAC-SHA256 SignedHeaders=host;bad header"),
            Some(SignedHeaders::All)
        );
        assert_eq!(with("Bearer token"), None);
        assert!(SignedHeaders::All.covers(&header::HOST));
    }

    #[test]
    fn every_python_strip_character_is_removed_before_the_prefix_check() {
        // The exact set `[c for c in map(chr, range(0x110000)) if c.isspace()]` in CPython 3.11.
        let python: Vec<u32> = vec![
            0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680, 0x2000,
            0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a, 0x2028,
            0x2029, 0x202f, 0x205f, 0x3000,
        ];
        let ours: Vec<u32> = (0..=0x10ffff_u32)
            .filter_map(char::from_u32)
            .filter(|c| is_python_space(*c))
            .map(u32::from)
            .collect();
        assert_eq!(ours, python);
        for c in python.iter().filter_map(|c| char::from_u32(*c)) {
            let body = format!(
                "{{\"snapshot\":{{\"name\":\"\\u{:04x}autobk_snapshot_x\"}}}}",
                u32::from(c)
            );
            assert_eq!(police(&body), Err("reserved_prefix"), "{body}");
        }
        // Not stripped by Python, so not stored under the prefix.
        for c in ["\\u200b", "\\ufeff", "\\u180e", "x"] {
            let body = format!("{{\"snapshot\":{{\"name\":\"{c}autobk_snapshot_x\"}}}}");
            assert_eq!(police(&body), Ok(String::new()), "{body}");
        }
    }

    #[test]
    fn prefixes_are_case_sensitive_unless_configured() {
        let body = r#"{"snapshot":{"name":"AutoBk_Snapshot_x"}}"#;
        assert_eq!(police(body), Ok(String::new()));
        let p = PolicyConfig {
            case_insensitive_prefixes: true,
            ..PolicyConfig::default()
        };
        assert_eq!(police_with(&p, body, true), Err("reserved_prefix"));
        assert_eq!(
            police_with(&p, r#"{"snapshot":{"name":"autobk_snap"}}"#, true),
            Ok(String::new())
        );
    }

    #[test]
    fn description_fields_may_use_the_prefix() {
        let body =
            r#"{"snapshot":{"name":"n","description":"autobk_snapshot_ is what backups use"}}"#;
        assert_eq!(police(body), Ok(String::new()));
    }

    #[test]
    fn the_body_limit_is_enforced_on_the_bytes() {
        let p = PolicyConfig {
            max_body_bytes: 10,
            ..PolicyConfig::default()
        };
        assert_eq!(
            police_with(&p, r#"{"snapshot":{}}"#, true),
            Err("max_body_bytes")
        );
    }

    fn rules(text: &str) -> Vec<Rule> {
        #[derive(serde::Deserialize)]
        struct Rules {
            rules: Vec<Rule>,
        }
        toml::from_str::<Rules>(text).unwrap().rules
    }

    #[test]
    fn configured_rules_are_checked_after_the_built_in_ones() {
        let rules = rules(
            "[[rules]]\nname = \"team-prefix\"\nrequire = '^(web|db|ml)-[a-z0-9-]+$'\nmessage = \"names must match ^(web|db|ml)-[a-z0-9-]+$\"\n",
        );
        let route = &default_routes()[0];
        let target = Target {
            route,
            project: Some("p1"),
        };
        let check = |body: &str| {
            check_body(
                target,
                &PolicyConfig::default(),
                &rules,
                body.as_bytes(),
                true,
            )
        };
        assert!(check(r#"{"snapshot":{"name":"db-orders"}}"#).is_ok());
        let err = check(r#"{"snapshot":{"name":"Prod_DB"}}"#).unwrap_err();
        assert_eq!(err.rule(), "team-prefix");
        assert_eq!(
            err.to_string(),
            "Invalid input for field/attribute name. Value: Prod_DB. Rule 'team-prefix': names must match ^(web|db|ml)-[a-z0-9-]+$"
        );
        // The legacy spelling is a name field too; descriptions are not names.
        assert!(check(r#"{"snapshot":{"display_name":"Prod_DB"}}"#).is_err());
        assert!(check(r#"{"snapshot":{"name":"db-a","description":"Prod_DB"}}"#).is_ok());
        // The reserved prefix is still checked first.
        assert_eq!(
            check(r#"{"snapshot":{"name":"autobk_snapshot_db"}}"#)
                .unwrap_err()
                .rule(),
            "reserved_prefix"
        );
    }

    #[test]
    fn exempt_projects_may_use_the_reserved_prefix_and_say_so() {
        let policy = PolicyConfig {
            reserved_prefix_exempt_projects: vec!["backup".to_owned()],
            ..PolicyConfig::default()
        };
        let route = &default_routes()[0];
        let body = br#"{"snapshot":{"name":"autobk_snapshot_1"}}"#;
        let for_project = |project| check_body(Target { route, project }, &policy, &[], body, true);
        let allowed = for_project(Some("backup")).unwrap();
        assert_eq!(allowed.body, Verdict::Unchanged);
        assert_eq!(
            allowed.exempted.map(|v| v.rule()),
            Some("reserved_prefix".into())
        );
        assert!(for_project(Some("other")).is_err());
        assert!(for_project(None).is_err(), "no project id, no exemption");
    }

    #[test]
    fn refusals_quote_at_most_an_abbreviated_value() {
        let target = Target {
            route: &default_routes()[0],
            project: None,
        };
        let policy = PolicyConfig {
            max_field_bytes: 1 << 20,
            ..PolicyConfig::default()
        };
        let list = format!("[{}1]", "1,".repeat(32_000));
        let long_name = format!("autobk_snapshot_{}", "x".repeat(60_000));
        let cases = [
            ("root not an object", format!(r#"{{"snapshot":{list}}}"#)),
            (
                "name not a string",
                format!(r#"{{"snapshot":{{"name":{list}}}}}"#),
            ),
            (
                "long reserved name",
                format!(r#"{{"snapshot":{{"name":"{long_name}"}}}}"#),
            ),
        ];
        for (what, body) in cases {
            assert!(body.len() <= 65536, "{what}: {} bytes", body.len());
            let err = check_body(target, &policy, &[], body.as_bytes(), true).unwrap_err();
            let message = err.to_string();
            assert!(message.len() < 512, "{what}: {} bytes", message.len());
            assert!(message.contains("..."), "{what}: {message}");
        }
        // A short value is quoted whole, as Cinder quotes it.
        let err =
            check_body(target, &policy, &[], br#"{"snapshot":{"name":5}}"#, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid input for field/attribute name. Value: 5. 5 is not of type 'string', 'null'"
        );
    }

    #[test]
    fn messages_follow_cinder() {
        let route = &default_routes()[0];
        let target = Target {
            route,
            project: None,
        };
        let err = check_body(
            target,
            &PolicyConfig::default(),
            &[],
            br#"{"snapshot":{"name":"autobk_snapshot_x"}}"#,
            true,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid input for field/attribute name. Value: autobk_snapshot_x. Names starting with 'autobk_snapshot_' are reserved for automatic backup snapshots."
        );
        let long = format!(r#"{{"snapshot":{{"description":"{}"}}}}"#, "x".repeat(300));
        let err =
            check_body(target, &PolicyConfig::default(), &[], long.as_bytes(), true).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "Invalid input for field/attribute description. Value: {x}.... '{x}...' is too long: 300 bytes of UTF-8, at most 255 allowed.",
                x = "x".repeat(64)
            )
        );
    }
}
