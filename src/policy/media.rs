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
    // What nearly every client sends, decided without parsing.
    if value.eq_ignore_ascii_case(b"application/json") {
        return Ok(());
    }
    let Ok(text) = std::str::from_utf8(value) else {
        return refuse();
    };
    // The essence ends at the first `;`, as Cinder (WebOb) reads it; a `;` inside a quoted
    // parameter value further on is data, not a separator.
    let (essence, params) = text.split_once(';').unwrap_or((text, ""));
    let essence = essence.trim();
    let Some((ty, sub)) = essence.split_once('/') else {
        return refuse();
    };
    let json = (ty.eq_ignore_ascii_case("application") && sub.eq_ignore_ascii_case("json"))
        || sub.len() > 5 && sub.as_bytes()[sub.len() - 5..].eq_ignore_ascii_case(b"+json");
    if !(is_token(ty.as_bytes()) && is_token(sub.as_bytes()) && json) {
        return refuse();
    }
    let Some(params) = parameters(params.as_bytes()) else {
        return refuse();
    };
    let mut charsets = params
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"charset"));
    // One charset, UTF-8, or none: two could be read either way.
    match (charsets.next(), charsets.next()) {
        (None, _) => Ok(()),
        (Some((_, value)), None)
            if value.eq_ignore_ascii_case(b"utf-8") || value.eq_ignore_ascii_case(b"utf8") =>
        {
            Ok(())
        }
        _ => refuse(),
    }
}

/// RFC 9110 `tchar`s, at least one.
fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// The parameters after a media type's essence (the text after its first `;`), by RFC 9110
/// section 5.6.6: `*( OWS ";" OWS [ token "=" ( token / quoted-string ) ] )`, quoted strings
/// with their `\` escapes undone. `None` when the text does not follow that grammar.
fn parameters(text: &[u8]) -> Option<Vec<(&[u8], Vec<u8>)>> {
    let is_ows = |b: &u8| matches!(b, b' ' | b'\t');
    let mut params = Vec::new();
    // The first `;` was consumed by the caller.
    let mut rest = text;
    loop {
        rest = &rest[rest.iter().take_while(|b| is_ows(b)).count()..];
        if rest.is_empty() {
            return Some(params);
        }
        if rest[0] != b';' {
            let name_len = rest
                .iter()
                .take_while(|b| is_token(std::slice::from_ref(b)))
                .count();
            let (name, after) = rest.split_at(name_len);
            let after = after.strip_prefix(b"=")?;
            if name.is_empty() {
                return None;
            }
            let (value, after) = match after.strip_prefix(b"\"") {
                Some(quoted) => quoted_string(quoted)?,
                None => {
                    let len = after
                        .iter()
                        .take_while(|b| is_token(std::slice::from_ref(b)))
                        .count();
                    if len == 0 {
                        return None;
                    }
                    (after[..len].to_vec(), &after[len..])
                }
            };
            params.push((name, value));
            rest = &after[after.iter().take_while(|b| is_ows(b)).count()..];
            if rest.is_empty() {
                return Some(params);
            }
        }
        rest = rest.strip_prefix(b";")?;
    }
}

/// The content of a quoted string whose opening quote is already read, and what follows its
/// closing quote.
fn quoted_string(text: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut value = Vec::new();
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => return Some((value, &text[i + 1..])),
            b'\\' => {
                let escaped = *text.get(i + 1)?;
                if escaped.is_ascii_control() && escaped != b'\t' {
                    return None;
                }
                value.push(escaped);
                i += 2;
            }
            b if b.is_ascii_control() && b != b'\t' => return None,
            b => {
                value.push(b);
                i += 1;
            }
        }
    }
    None
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
            // Quoted parameter values may hold `;`, `\"` and spaces (RFC 9110 section 5.6.4).
            "application/json; profile=\"a;b\"",
            "application/json; profile=\"a\\\";b\"; charset=utf-8",
            "application/json; profile=\"x y\" ; ; q=1",
            "application/json;profile=\"\"",
            "application/json; Profile=a; profile=b",
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
            "application/json; =x",
            "application/json; a=",
            "application/json; a=b c",
            "application/json; a=\"b\"c",
            "application/json; charset=\"utf-16\"",
            "application/json; charset=\"utf-8\"; CHARSET=utf-8",
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
