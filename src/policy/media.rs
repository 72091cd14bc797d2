//! Content-Type and Content-Encoding of a policed body.
//!
//! The proxy can only police what it can read: JSON in UTF-8, not compressed. Anything else is
//! refused with 415 rather than forwarded, because the upstream might decode what snapguard
//! could not.

use super::Violation;

/// Accepts no Content-Type at all, `application/json`, or any `+json` type, once, with no
/// charset but UTF-8 and no parameter given twice.
pub fn check_content_type<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Result<(), Violation> {
    let Some(value) = values.next() else {
        return Ok(());
    };
    // The value is copied for the message only when it is refused.
    let refuse = || {
        Err(Violation::ContentType(
            String::from_utf8_lossy(value).into_owned(),
        ))
    };
    if values.next().is_some() {
        return refuse();
    }
    let Ok(text) = std::str::from_utf8(value) else {
        return refuse();
    };
    let mut parts = text.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    let Some((ty, sub)) = essence.split_once('/') else {
        return refuse();
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let json = (ty.eq_ignore_ascii_case("application") && sub.eq_ignore_ascii_case("json"))
        || sub.len() > 5 && sub.as_bytes()[sub.len() - 5..].eq_ignore_ascii_case(b"+json");
    if !(token(ty) && token(sub) && json) {
        return refuse();
    }
    let mut names: Vec<String> = Vec::new();
    for param in parts.map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, value)) = param.split_once('=') else {
            return refuse();
        };
        let name = name.trim().to_ascii_lowercase();
        if !token(&name) || names.contains(&name) {
            return refuse();
        }
        let value = value.trim();
        let value = match value.strip_prefix('"') {
            Some(quoted) => match quoted.strip_suffix('"') {
                Some(inner) if !inner.contains(['"', '\\']) => inner,
                _ => return refuse(),
            },
            None => value,
        };
        if name == "charset"
            && !(value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8"))
        {
            return refuse();
        }
        names.push(name);
    }
    Ok(())
}

/// Accepts no Content-Encoding, or only `identity`.
pub fn check_content_encoding<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<(), Violation> {
    for value in values {
        let encoded = value
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity"));
        if encoded {
            return Err(Violation::ContentEncoding(
                String::from_utf8_lossy(value).into_owned(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(values: &[&str]) -> bool {
        check_content_type(values.iter().map(|v| v.as_bytes())).is_ok()
    }

    #[test]
    fn json_content_types_are_accepted() {
        for v in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
            "application/json; charset=utf8",
            "application/vnd.openstack.volume+json",
            "application/json-patch+json",
            "application/json;",
            "application/json; foo=bar",
        ] {
            assert!(ct(&[v]), "{v}");
        }
        assert!(ct(&[]), "absent");
    }

    #[test]
    fn everything_else_is_refused() {
        for v in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/json; charset=utf-16",
            "application/json; charset=latin1",
            "application/json; charset=utf-8; charset=utf-16",
            "application/json; Charset=utf-8; charset=utf-8",
            "application/json, text/plain",
            "application/json,application/json",
            "application/xjson",
            "application/+json",
            "application",
            "",
            "application/json; charset",
            "application/json; charset=\"utf-8",
            "application /json",
        ] {
            assert!(!ct(&[v]), "{v}");
        }
        assert!(
            !ct(&["application/json", "application/json"]),
            "two headers"
        );
    }

    #[test]
    fn only_identity_encoding_is_accepted() {
        let ce = |v: &[&str]| check_content_encoding(v.iter().map(|v| v.as_bytes())).is_ok();
        assert!(ce(&[]));
        assert!(ce(&["identity"]));
        assert!(ce(&["IDENTITY"]));
        assert!(ce(&[""]));
        for v in [
            "gzip",
            "GZIP",
            "br",
            "deflate",
            "identity, gzip",
            "x-anything",
        ] {
            assert!(!ce(&[v]), "{v}");
        }
        assert!(!ce(&["identity", "gzip"]));
    }
}
