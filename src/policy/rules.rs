//! Naming conventions as configuration: an organisation's own rules beside the reserved
//! prefixes (a team prefix, an environment tag, a tighter length, characters tooling chokes on).
//!
//! Rules are compiled when the config loads (and reloads), never per request. Patterns use the
//! regex crate, which matches in linear time: no pattern can stall a request. Rules see the value
//! Cinder will store, stripped as Python's `str.strip()` strips it.

use std::sync::Arc;

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

use super::is_python_space;
use crate::route::Route;

/// Which fields of a route a rule checks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Fields {
    /// `"names"`, `"descriptions"` or `"all"`: the route's fields of that kind.
    Kind(FieldKind),
    /// Named fields, e.g. `["name", "display_name"]`.
    List(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldKind {
    Names,
    Descriptions,
    All,
}

/// A rule as written in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default = "names")]
    pub fields: Fields,
    /// The stored value must match this pattern.
    pub require: Option<String>,
    /// The stored value must not match this pattern.
    pub deny: Option<String>,
    /// The stored value may hold at most this many characters (Unicode scalar values).
    pub max_chars: Option<usize>,
    /// Route templates the rule applies to; all policed routes when absent.
    pub routes: Option<Vec<String>>,
    /// Only these project ids.
    pub projects: Option<Vec<String>>,
    /// Every project but these.
    #[serde(default)]
    pub except_projects: Vec<String>,
    /// What the user is told, after "Rule 'NAME': ".
    pub message: String,
}

fn names() -> Fields {
    Fields::Kind(FieldKind::Names)
}

/// Which projects a rule applies to. The project id comes from the `{project_id}` segment of
/// the route. Scopes fail closed: on a route without a project id (Cinder 3.67+ URLs) every
/// rule applies, since the project cannot be known there and a URL spelling must not be a way
/// around a rule; and `Only` compares ids ignoring ASCII case, as a gateway might.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Only(Vec<String>),
    Except(Vec<String>),
}

impl Scope {
    pub fn includes(&self, project: Option<&str>) -> bool {
        match self {
            Scope::All => true,
            Scope::Only(ids) => {
                project.is_none_or(|p| ids.iter().any(|id| id.eq_ignore_ascii_case(p)))
            }
            Scope::Except(ids) => !project.is_some_and(|p| ids.iter().any(|id| id == p)),
        }
    }
}

/// A compiled rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RuleSpec")]
pub struct Rule {
    pub name: Arc<str>,
    fields: Fields,
    require: Option<Regex>,
    deny: Option<Regex>,
    max_chars: Option<usize>,
    pub routes: Option<Vec<String>>,
    scope: Scope,
    message: String,
}

/// Compiled patterns are bounded, so a config cannot make one huge (the regex crate's own
/// default: Unicode classes such as `\w{1,63}` need several MiB).
const PATTERN_SIZE_LIMIT: usize = 10 << 20;

impl Rule {
    /// The fields a rule names explicitly, for the config to check they are policed somewhere.
    pub fn listed_fields(&self) -> &[String] {
        match &self.fields {
            Fields::List(list) => list,
            Fields::Kind(_) => &[],
        }
    }
}

impl TryFrom<RuleSpec> for Rule {
    type Error = String;

    fn try_from(spec: RuleSpec) -> Result<Self, String> {
        let name = spec.name.trim();
        if name.is_empty() {
            return Err("a rule needs a name".to_owned());
        }
        let compile = |pattern: &Option<String>, key: &str| {
            pattern
                .as_deref()
                .map(|p| {
                    RegexBuilder::new(p)
                        .size_limit(PATTERN_SIZE_LIMIT)
                        .build()
                        .map_err(|e| format!("rule '{name}': {key} is not a valid pattern: {e}"))
                })
                .transpose()
        };
        let require = compile(&spec.require, "require")?;
        let deny = compile(&spec.deny, "deny")?;
        if require.is_none() && deny.is_none() && spec.max_chars.is_none() {
            return Err(format!(
                "rule '{name}': give at least one of require, deny, max_chars"
            ));
        }
        let scope = match (spec.projects, spec.except_projects.is_empty()) {
            (Some(_), false) => {
                return Err(format!(
                    "rule '{name}': projects and except_projects exclude each other"
                ))
            }
            (Some(ids), true) => Scope::Only(ids),
            (None, false) => Scope::Except(spec.except_projects),
            (None, true) => Scope::All,
        };
        if matches!(&spec.fields, Fields::List(list) if list.is_empty()) {
            return Err(format!("rule '{name}': fields must not be empty"));
        }
        Ok(Self {
            name: Arc::from(name),
            fields: spec.fields,
            require,
            deny,
            max_chars: spec.max_chars,
            routes: spec.routes,
            scope,
            message: spec.message,
        })
    }
}

impl Rule {
    /// Whether the rule applies to requests on `route` for `project`.
    pub fn applies(&self, route: &Route, project: Option<&str>) -> bool {
        self.routes
            .as_ref()
            .is_none_or(|templates| templates.iter().any(|t| **t == *route.template))
            && self.scope.includes(project)
    }

    /// Whether the rule checks `field` on `route`.
    pub fn covers(&self, route: &Route, field: &str) -> bool {
        // A legacy spelling (`display_name`) is covered wherever the field it stands for is:
        // Cinder stores it under that name.
        let current = route
            .renames
            .iter()
            .find(|(legacy, _)| legacy == field)
            .map(|(_, current)| current.as_str());
        let named = |list: &[String]| {
            list.iter()
                .any(|f| f == field || Some(f.as_str()) == current)
        };
        match &self.fields {
            Fields::Kind(FieldKind::Names) => named(&route.name_fields),
            Fields::Kind(FieldKind::Descriptions) => named(&route.description_fields),
            Fields::Kind(FieldKind::All) => {
                named(&route.name_fields) || named(&route.description_fields)
            }
            Fields::List(list) => named(list),
        }
    }

    /// Checks a value as given; the rule sees it as Cinder will store it (stripped).
    pub fn allows(&self, value: &str) -> bool {
        let stored = value.trim_matches(is_python_space);
        self.require.as_ref().is_none_or(|r| r.is_match(stored))
            && !self.deny.as_ref().is_some_and(|d| d.is_match(stored))
            && self
                .max_chars
                .is_none_or(|max| stored.chars().count() <= max)
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::default_routes;

    fn rule(toml_text: &str) -> Result<Rule, String> {
        #[derive(Deserialize)]
        struct One {
            rule: Rule,
        }
        toml::from_str::<One>(toml_text)
            .map(|o| o.rule)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn require_deny_and_max_chars_see_the_stored_value() {
        let r = rule(
            "[rule]\nname = \"team\"\nrequire = '^(web|db|ml)-[a-z0-9-]+$'\nmessage = \"m\"\n",
        )
        .unwrap();
        assert!(r.allows("db-orders-1"));
        assert!(
            r.allows("  db-orders-1\u{3000}"),
            "stripped as Cinder stores it"
        );
        assert!(!r.allows("Prod_DB"));
        assert!(!r.allows("db-"));

        let r = rule("[rule]\nname = \"no-spaces\"\ndeny = '\\s'\nmessage = \"m\"\n").unwrap();
        assert!(r.allows(" trimmed "));
        assert!(!r.allows("in side"));

        let r = rule("[rule]\nname = \"short\"\nmax_chars = 3\nmessage = \"m\"\n").unwrap();
        assert!(r.allows("快快快"));
        assert!(!r.allows("快快快快"));
    }

    #[test]
    fn fields_select_by_kind_or_name() {
        let routes = default_routes();
        let update = &routes[0];
        let names = rule("[rule]\nname = \"n\"\nmax_chars = 1\nmessage = \"m\"\n").unwrap();
        assert!(names.covers(update, "name") && names.covers(update, "display_name"));
        assert!(!names.covers(update, "description"));
        let all = rule("[rule]\nname = \"a\"\nfields = \"all\"\nmax_chars = 1\nmessage = \"m\"\n")
            .unwrap();
        assert!(all.covers(update, "display_description"));
        let listed = rule(
            "[rule]\nname = \"l\"\nfields = [\"description\"]\nmax_chars = 1\nmessage = \"m\"\n",
        )
        .unwrap();
        assert!(listed.covers(update, "description") && !listed.covers(update, "name"));
        assert!(
            listed.covers(update, "display_description"),
            "the legacy spelling too"
        );
        let name_only =
            rule("[rule]\nname = \"l\"\nfields = [\"name\"]\nmax_chars = 1\nmessage = \"m\"\n")
                .unwrap();
        assert!(
            name_only.covers(update, "display_name"),
            "display_name is stored as name"
        );
    }

    #[test]
    fn scope_by_route_and_project() {
        let routes = default_routes();
        let r = rule(
            "[rule]\nname = \"s\"\nmax_chars = 1\nmessage = \"m\"\nroutes = [\"/v3/{project_id}/snapshots\"]\nprojects = [\"p1\"]\n",
        )
        .unwrap();
        let create = routes
            .iter()
            .find(|r| r.template == "/v3/{project_id}/snapshots")
            .unwrap();
        assert!(r.applies(create, Some("p1")));
        assert!(!r.applies(create, Some("p2")));
        assert!(r.applies(create, Some("P1")), "ids compare ignoring case");
        assert!(
            r.applies(create, None),
            "no project id: every rule applies (fail closed)"
        );
        assert!(!r.applies(&routes[0], Some("p1")), "another route");

        let r = rule(
            "[rule]\nname = \"e\"\nmax_chars = 1\nmessage = \"m\"\nexcept_projects = [\"p1\"]\n",
        )
        .unwrap();
        assert!(!r.applies(&routes[0], Some("p1")));
        assert!(r.applies(&routes[0], Some("p2")));
        assert!(r.applies(&routes[0], None));
    }

    #[test]
    fn bad_rules_are_config_errors_that_name_the_rule() {
        for (text, needle) in [
            ("[rule]\nname = \"bad\"\nrequire = '(unclosed'\nmessage = \"m\"\n", "rule 'bad': require is not a valid pattern"),
            ("[rule]\nname = \"empty\"\nmessage = \"m\"\n", "rule 'empty': give at least one"),
            (
                "[rule]\nname = \"both\"\nmax_chars = 1\nprojects = [\"a\"]\nexcept_projects = [\"b\"]\nmessage = \"m\"\n",
                "rule 'both': projects and except_projects",
            ),
            ("[rule]\nname = \"huge\"\nrequire = '\\w{1000}{1000}'\nmessage = \"m\"\n", "rule 'huge'"),
            ("[rule]\nname = \"x\"\nmax_chars = 1\nmessage = \"m\"\ncolour = 1\n", "colour"),
        ] {
            let err = rule(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn ordinary_unicode_patterns_compile() {
        for pattern in [
            r"^\w{1,63}$",
            r"^[\w-]{3,40}$",
            r"^\p{L}[\p{L}\p{N} _-]{0,62}$",
        ] {
            let text = format!("[rule]\nname = \"u\"\nrequire = '{pattern}'\nmessage = \"m\"\n");
            assert!(rule(&text).is_ok(), "{pattern}: {:?}", rule(&text).err());
        }
    }

    #[test]
    fn a_pathological_pattern_runs_in_linear_time() {
        let r = rule("[rule]\nname = \"evil\"\nrequire = '^(a+)+$'\nmessage = \"m\"\n").unwrap();
        // Exponential for a backtracking engine; linear here. 255 bytes is the field limit.
        let value = format!("{}!", "a".repeat(254));
        assert!(!r.allows(&value));
    }
}
