//! Strict JSON, stricter than `serde_json::from_slice` on its own.
//!
//! The upstream (Python's `json`) keeps the *last* of two duplicate keys, so a body like
//! `{"name":"ok","name":"autobk_snapshot_x"}` would be policed on one value and stored with
//! another. [`validate`] refuses duplicates (compared after unescaping) at every depth, on top of
//! what serde_json already refuses: a BOM, trailing data, invalid UTF-8, raw control characters,
//! lone surrogate escapes, and nesting 128 levels deep or deeper: at most [`MAX_DEPTH`] (127)
//! arrays and objects inside one another pass. That is serde_json's fixed recursion limit (its
//! 128th level is refused), which also keeps the stack bounded.
//!
//! [`police`] is that same strict reading, which also keeps the policed fields of the body's
//! root member on the way: an allowed body is read once. [`members`] reads one object level at
//! a time, keeping every value as its raw text, for the rarer work: a normalized body re-uses
//! the original bytes of every member it does not touch (numbers keep their exact spelling),
//! and an error quotes a value as it was written.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The deepest nesting of arrays and objects that passes [`validate`] (`[[]]` is 2 levels).
/// serde_json refuses the next level; this names its limit, it does not set it.
pub const MAX_DEPTH: usize = 127;

/// An object key or string value, borrowed from the input when it had no escapes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Checks that `text` is exactly one strict JSON value: [`police`] looking for nothing.
pub fn validate(text: &str) -> Result<(), serde_json::Error> {
    police(text, "", &|_| false).map(|_| ())
}

/// Any JSON value, visited whole, with duplicate keys refused.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Strict)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Strict;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut seen = Keys::Few(Vec::new());
        while let Some(key) = map.next_key::<Text<'de>>()? {
            map.next_value::<Strict>()?;
            if let Some(dup) = seen.insert(key) {
                // A key may be most of the body: quoted in part, as every refused value is.
                let shown = super::abbreviate(&dup.0);
                return Err(de::Error::custom(format_args!("duplicate key {shown:?}")));
            }
        }
        Ok(Strict)
    }
}

/// The keys of one object so far. Objects are small: comparing a key with a handful of others
/// costs less than hashing it, until there are more than a handful.
enum Keys<'a> {
    Few(Vec<Text<'a>>),
    Many(HashSet<Text<'a>>),
}

impl<'a> Keys<'a> {
    const FEW: usize = 16;

    /// Adds `key`; gives it back if it was already there.
    fn insert(&mut self, key: Text<'a>) -> Option<Text<'a>> {
        match self {
            Keys::Few(keys) if keys.contains(&key) => Some(key),
            Keys::Few(keys) if keys.len() < Self::FEW => {
                keys.push(key);
                None
            }
            Keys::Few(keys) => {
                let mut all: HashSet<Text<'a>> = keys.drain(..).collect();
                all.insert(key);
                *self = Keys::Many(all);
                None
            }
            Keys::Many(all) => all.replace(key),
        }
    }
}

/// A policed field's value, as [`police`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field<'a> {
    Text(Cow<'a, str>),
    Null,
    /// Any other type: the caller finds its raw text with [`members`] to say what it was.
    Other,
}

/// The policed fields of a body's root member, in document order.
pub type Fields<'a> = Vec<(Cow<'a, str>, Field<'a>)>;

/// Reads `text` in one strict pass, as [`validate`] does (every error of [`validate`] is an
/// error here), and keeps what the policy needs of it: the members of the root object's
/// `root` member that `wanted` names, with their values. `Ok(None)` when the root is not an
/// object, has no `root`, or its `root` is not an object.
///
/// [`validate`], then [`members`] of the root and of its `root`, then each field's value, read
/// a policed body four times; this is the one read an allowed body needs. The others remain
/// for what is rarer: saying what was wrong, and normalizing.
pub fn police<'a>(
    text: &'a str,
    root: &str,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Option<Fields<'a>>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let found = de::DeserializeSeed::deserialize(Level::Root { root, wanted }, &mut de)?;
    de.end()?;
    Ok(found)
}

/// Which object level [`police`] is reading.
#[derive(Clone, Copy)]
enum Level<'s> {
    /// The document: its `root` member is read as [`Level::Fields`].
    Root {
        root: &'s str,
        wanted: &'s dyn Fn(&str) -> bool,
    },
    /// The root member: the members `wanted` names are kept.
    Fields { wanted: &'s dyn Fn(&str) -> bool },
}

impl<'de> de::DeserializeSeed<'de> for Level<'_> {
    type Value = Option<Fields<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// Any other type than an object is read strictly, as [`Strict`] reads it, and is not the shape
/// the policy wants.
impl<'de> Visitor<'de> for Level<'_> {
    type Value = Option<Fields<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Strict.visit_seq(seq).map(|_| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Keys::Few(Vec::new());
        let mut found = None;
        let mut fields = Vec::new();
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match self {
                Level::Root { root, wanted } if key.0 == root => {
                    found = map.next_value_seed(Level::Fields { wanted })?;
                }
                Level::Fields { wanted } if wanted(&key.0) => {
                    let value = map.next_value_seed(FieldSeed)?;
                    fields.push((key.0.clone(), value));
                }
                _ => {
                    map.next_value::<Strict>()?;
                }
            }
            if let Some(dup) = seen.insert(key) {
                let shown = super::abbreviate(&dup.0);
                return Err(de::Error::custom(format_args!("duplicate key {shown:?}")));
            }
        }
        Ok(match self {
            Level::Root { .. } => found,
            Level::Fields { .. } => Some(fields),
        })
    }
}

/// Reads a policed field's value (strictly, whatever its type).
struct FieldSeed;

impl<'de> de::DeserializeSeed<'de> for FieldSeed {
    type Value = Field<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Owned(s.to_owned())))
    }
    fn visit_unit<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field<'de>, A::Error> {
        Strict.visit_seq(seq).map(|_| Field::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<'de>, A::Error> {
        Strict.visit_map(map).map(|_| Field::Other)
    }
}

/// One object level: its members in document order, values as raw JSON text.
pub type Members<'a> = Vec<(Cow<'a, str>, &'a RawValue)>;

/// The members of `text` if it is a JSON object, else `None`. `text` must have passed
/// [`validate`]: duplicates are not checked again here.
pub fn members(text: &str) -> Option<Members<'_>> {
    struct Object<'a>(Members<'a>);
    impl<'de> Deserialize<'de> for Object<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Object<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object<'de>, A::Error> {
                    let mut members = Vec::new();
                    while let Some((Text(k), v)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
                        members.push((k, v));
                    }
                    Ok(Object(members))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_str::<Object<'_>>(text).ok().map(|o| o.0)
}

/// Writes `{"k":raw,...}` for the given members, in order.
pub fn write_object<'a>(out: &mut Vec<u8>, members: impl Iterator<Item = (&'a str, &'a [u8])>) {
    out.push(b'{');
    for (i, (key, raw)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // A str serializes as its escaped, quoted form, straight into `out` (no copy of the key
        // on the way); writing to a Vec cannot fail.
        let _ = serde::Serialize::serialize(key, &mut serde_json::Serializer::new(&mut *out));
        out.push(b':');
        out.extend_from_slice(raw);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_json_refuses_what_python_would_read_differently() {
        for bad in [
            "",
            "not json",
            "\u{feff}{}",
            "{} {}",
            "{}x",
            "{\"a\":1,}",
            "[1,]",
            "{\"a\":1,\"a\":2}",
            "{\"a\":1,\"\\u0061\":2}",
            "{\"s\":{\"x\":[{\"k\":1,\"k\":1}]}}",
            "{\"a\":\"\\ud800\"}",
            "{\"a\":\"\\udc00x\"}",
            "{\"\\ud83d\":1}",
            "{\"a\":\"\u{1}\"}",
            "/* c */ {}",
            "{\"a\":1e400}",
            "{'a':1}",
            "NaN",
            &"[".repeat(200),
            &format!("{}{}", "[".repeat(129), "]".repeat(129)),
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn strict_json_accepts_ordinary_documents() {
        for good in [
            "{}",
            " {\"snapshot\" : {\"name\": null}}\n",
            "{\"a\":\"\\ud83d\\ude00\",\"b\":[1,2,{\"a\":1}],\"c\":{\"a\":1}}",
            "{\"a\":\"\\u0000\"}",
            "12345678901234567890123456789",
            &format!("{}{}", "[".repeat(100), "]".repeat(100)),
        ] {
            assert!(validate(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn duplicate_errors_say_which_key_and_where() {
        let err = validate("{\"snapshot\":{\"name\":\"a\",\"name\":\"b\"}}").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("duplicate key \"name\""), "{msg}");
        assert!(msg.contains("column"), "{msg}");
    }

    #[test]
    fn nesting_passes_up_to_max_depth_and_no_further() {
        let arrays = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let objects = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
        for nest in [arrays, objects] {
            assert!(validate(&nest(MAX_DEPTH)).is_ok(), "{MAX_DEPTH} levels");
            let err = validate(&nest(MAX_DEPTH + 1)).unwrap_err().to_string();
            assert!(err.contains("recursion limit"), "{err}");
        }
    }

    #[test]
    fn a_long_duplicate_key_is_quoted_in_part() {
        let key = "k".repeat(30_000);
        let err = validate(&format!("{{\"{key}\":1,\"{key}\":2}}"))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 200, "{} bytes: {err:.200}", err.len());
        assert!(
            err.contains(&format!("duplicate key \"{}...\"", &key[..64])),
            "{err}"
        );
    }

    #[test]
    fn duplicates_are_found_in_objects_of_any_size() {
        let object = |keys: &[String]| {
            let members: Vec<String> = keys.iter().map(|k| format!("\"{k}\":1")).collect();
            format!("{{{}}}", members.join(","))
        };
        for n in [2, 15, 16, 17, 40] {
            let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            assert!(validate(&object(&keys)).is_ok(), "{n} distinct keys");
            // A repeat of the first key, and of the last, in every position after it.
            for repeated in [0, n - 1] {
                for at in repeated + 1..=n {
                    let mut dup = keys.clone();
                    dup.insert(at, keys[repeated].clone());
                    assert!(
                        validate(&object(&dup)).is_err(),
                        "{n} keys, k{repeated} again at {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn members_keep_order_and_raw_values() {
        let m = members("{ \"b\" : 1.50 , \"a\":{\"x\": [ 1 ]}, \"\\u0063\":\"v\"}").unwrap();
        let got: Vec<_> = m.iter().map(|(k, v)| (k.as_ref(), v.get())).collect();
        assert_eq!(
            got,
            [("b", "1.50"), ("a", "{\"x\": [ 1 ]}"), ("c", "\"v\"")]
        );
        assert!(members("[1]").is_none());
        assert!(members("\"x\"").is_none());
    }

    #[test]
    fn police_keeps_the_wanted_fields_of_the_root_member_in_order() {
        let wanted = |k: &str| matches!(k, "name" | "display_name" | "description");
        let text = r#"{"a":[1,{"name":"x"}],"snapshot":{"description":null,"force":true,
            "name":"\u00e9t\u00e9","metadata":{"name":1},"display_name":5}}"#;
        let fields = police(text, "snapshot", &wanted).unwrap().unwrap();
        assert_eq!(
            fields,
            [
                (Cow::from("description"), Field::Null),
                (Cow::from("name"), Field::Text(Cow::from("été"))),
                (Cow::from("display_name"), Field::Other),
            ]
        );
        // Not the shape wanted: no root object, no such member, or a member that is no object.
        for shape in ["[]", "1", "{}", r#"{"snapshot":[]}"#, r#"{"snapshot":"x"}"#] {
            assert_eq!(police(shape, "snapshot", &wanted).unwrap(), None, "{shape}");
        }
        // Strict at every level, the policed ones included.
        for bad in [
            r#"{"snapshot":{"name":"a","name":"b"}}"#,
            r#"{"snapshot":{},"snapshot":{}}"#,
            r#"{"snapshot":{"name":{"k":1,"k":2}}}"#,
            r#"{"snapshot":{"name":"\ud800"}}"#,
            r#"{"snapshot":{"name":"a"}} x"#,
        ] {
            assert!(police(bad, "snapshot", &wanted).is_err(), "{bad}");
        }
    }

    #[test]
    fn write_object_escapes_keys_and_copies_values() {
        let mut out = Vec::new();
        let members: [(&str, &[u8]); 2] = [("a\"b", b"1"), ("c", b"{\"d\": 2}")];
        write_object(&mut out, members.into_iter());
        assert_eq!(out, b"{\"a\\\"b\":1,\"c\":{\"d\": 2}}");
    }
}
