//! Route classification: is a request policed, and by which route?
//!
//! A pure function of the method, the method-override headers and the path. It matches
//! *generously* (SPEC section 1): it undoes every spelling trick an upstream router or a gateway
//! in front of it might undo, so that no spelling of a snapshot route slips through unpoliced.
//! The request itself is never rewritten; the normalized path exists only to decide.

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, Method};
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RouteSpec")]
pub struct Route {
    /// The path template as configured; used as the route's label in logs and errors.
    pub template: Arc<str>,
    pub methods: Vec<Method>,
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
            template: Arc::from(spec.path.as_str()),
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

/// The default route table of SPEC section 1.
pub fn default_routes() -> Vec<Route> {
    const CINDER_NAMES: &[&str] = &["name", "display_name"];
    const CINDER_DESCRIPTIONS: &[&str] = &["description", "display_description"];
    const NAME: &[&str] = &["name"];
    const DESCRIPTION: &[&str] = &["description"];
    use ErrorStyle::{Huawei, Openstack};
    type Row = (
        &'static [&'static str],
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
        ErrorStyle,
    );
    let table: [Row; 10] = [
        (
            &["PUT"],
            "/v3/{project_id}/snapshots/{snapshot_id}",
            CINDER_NAMES,
            CINDER_DESCRIPTIONS,
            Openstack,
        ),
        (
            &["PUT"],
            "/v2/{project_id}/snapshots/{snapshot_id}",
            CINDER_NAMES,
            CINDER_DESCRIPTIONS,
            Openstack,
        ),
        (
            &["POST"],
            "/v3/{project_id}/snapshots",
            CINDER_NAMES,
            CINDER_DESCRIPTIONS,
            Openstack,
        ),
        (
            &["POST"],
            "/v2/{project_id}/snapshots",
            CINDER_NAMES,
            CINDER_DESCRIPTIONS,
            Openstack,
        ),
        (
            &["PUT", "POST"],
            "/v3/snapshots",
            CINDER_NAMES,
            CINDER_DESCRIPTIONS,
            Openstack,
        ),
        (
            &["PUT", "POST"],
            "/v3/snapshots/{snapshot_id}",
            CINDER_NAMES,
            CINDER_DESCRIPTIONS,
            Openstack,
        ),
        (
            &["POST"],
            "/v3/{project_id}/manageable_snapshots",
            NAME,
            DESCRIPTION,
            Openstack,
        ),
        (
            &["PUT", "POST"],
            "/v2/{project_id}/cloudsnapshots",
            NAME,
            DESCRIPTION,
            Huawei,
        ),
        (
            &["PUT", "POST"],
            "/v2/{project_id}/cloudsnapshots/{snapshot_id}",
            NAME,
            DESCRIPTION,
            Huawei,
        ),
        (
            &["PUT"],
            "/v5/{project_id}/snapshots/{snapshot_id}",
            NAME,
            DESCRIPTION,
            Huawei,
        ),
    ];
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    table
        .into_iter()
        .filter_map(|(methods, path, names, descriptions, style)| {
            Route::try_from(RouteSpec {
                methods: strings(methods),
                path: path.to_owned(),
                body_root: default_body_root(),
                name_fields: strings(names),
                description_fields: strings(descriptions),
                error_style: style,
            })
            .ok()
        })
        .collect()
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
    /// An encoded `/` or `\` in what would be a policed route: how the upstream splits it is
    /// unknowable here, so the request is refused rather than forwarded unpoliced.
    Ambiguous,
}

/// Classifies a request. `path` is the URI path without the query (`Uri::path`).
pub fn classify<'a>(
    routes: &'a [Route],
    method: &Method,
    headers: &HeaderMap,
    path: &str,
) -> Class<'a> {
    let wanted = |m: &Method| m == method || overridden_to(headers, m);
    // Most traffic (GET, DELETE) is decided here, without looking at the path.
    let candidates = || routes.iter().filter(|r| r.methods.iter().any(wanted));
    if candidates().next().is_none() {
        return Class::Passthrough;
    }

    let mut ambiguous = false;
    let segments = resolve(path.split(['/']).map(|raw| {
        let decoded = percent_decode(raw.as_bytes());
        ambiguous |= decoded.iter().any(|b| matches!(b, b'/' | b'\\'));
        decoded
    }));
    let policed = candidates().find_map(|route| route.matches(&segments).map(|p| (route, p)));

    if ambiguous {
        // Read the path the other way, as a server that decodes before splitting would.
        let resplit = resolve(path.split('/').flat_map(|raw| {
            percent_decode(raw.as_bytes())
                .split(|b| matches!(b, b'/' | b'\\'))
                .map(|s| Cow::Owned(s.to_vec()))
                .collect::<Vec<_>>()
        }));
        if policed.is_some() || candidates().any(|r| r.matches(&resplit).is_some()) {
            return Class::Ambiguous;
        }
    }
    match policed {
        Some((route, project_id)) => Class::Policed { route, project_id },
        None => Class::Passthrough,
    }
}

/// Whether a method-override header names `m` (any case, comma lists allowed).
fn overridden_to(headers: &HeaderMap, m: &Method) -> bool {
    METHOD_OVERRIDE_HEADERS.iter().any(|name| {
        headers.get_all(*name).iter().any(|value| {
            value
                .as_bytes()
                .split(|b| *b == b',')
                .any(|v| v.trim_ascii().eq_ignore_ascii_case(m.as_str().as_bytes()))
        })
    })
}

/// Decodes every valid `%XX` escape, as a WSGI server does before routing. Invalid escapes stay.
fn percent_decode(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.contains(&b'%') {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let escaped = raw
            .get(i + 1..i + 3)
            .filter(|_| raw[i] == b'%')
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

/// Drops `;params`, empty segments (`//`, a trailing `/`) and resolves `.` and `..`.
///
/// Params are cut before dot segments are looked at, so `..;x` counts as `..`, as it does in
/// servlet containers.
fn resolve<'p>(segments: impl Iterator<Item = Cow<'p, [u8]>>) -> Vec<Cow<'p, [u8]>> {
    let mut out: Vec<Cow<'p, [u8]>> = Vec::new();
    for mut segment in segments {
        if let Some(cut) = segment.iter().position(|b| *b == b';') {
            match &mut segment {
                Cow::Borrowed(s) => *s = &s[..cut],
                Cow::Owned(s) => s.truncate(cut),
            }
        }
        match &*segment {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            _ => out.push(segment),
        }
    }
    out
}

impl Route {
    /// The decoded `{project_id}` (or `Some(None)` for a template without one) if the path fits.
    fn matches(&self, segments: &[Cow<'_, [u8]>]) -> Option<Option<String>> {
        if segments.len() != self.segments.len() {
            return None;
        }
        let mut project_id = None;
        let last = self.segments.len().saturating_sub(1);
        for (i, (template, actual)) in self.segments.iter().zip(segments).enumerate() {
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
        match classify(&routes, &method, &headers, path) {
            Class::Passthrough => None,
            Class::Policed { route, .. } => Some(route.template.to_string()),
            Class::Ambiguous => Some("ambiguous".to_owned()),
        }
    }

    const UPDATE: &str = "/v3/{project_id}/snapshots/{snapshot_id}";

    #[test]
    fn the_default_table_has_every_spec_route() {
        assert_eq!(default_routes().len(), 10);
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
            ("POST", "/v3/snapshots", "/v3/snapshots"),
            ("PUT", "/v3/snapshots/s1", "/v3/snapshots/{snapshot_id}"),
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
    fn the_project_id_is_taken_from_the_path() {
        let routes = default_routes();
        let class = classify(
            &routes,
            &Method::PUT,
            &HeaderMap::new(),
            "/v3/%70roj/snapshots/s1",
        );
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
        assert!(routes[9].renames.is_empty());
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
