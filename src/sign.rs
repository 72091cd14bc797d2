//! Huawei Cloud AK/SK request signatures (`SDK-HMAC-SHA256`), as pure functions on `http` types.
//!
//! [`sign`] sets `X-Sdk-Date`, `X-Security-Token`, `X-Sdk-Content-Sha256` and `Authorization` on
//! a request about to go upstream; [`verify`] checks the signature a downstream request carries.
//! Neither does I/O or reads the clock: the caller passes `now`.
//!
//! The scheme, as the Huawei SDKs implement it (`huaweicloudsdkcore/signer/signer.py`,
//! `huaweicloud-sdk-go-v3:core/auth/signer/signer.go`, the Java SDK's `AKSKSigner`):
//!
//! ```text
//! canonical request = METHOD \n canonical URI \n canonical query \n
//!                     name:value \n ... (one line per signed header) \n \n
//!                     signed;header;names \n payload hash
//! string to sign    = SDK-HMAC-SHA256 \n X-Sdk-Date \n hex(sha256(canonical request))
//! Authorization     = SDK-HMAC-SHA256 Access=AK, SignedHeaders=a;b, Signature=hex(hmac(SK, sts))
//! ```
//!
//! Where the SDKs disagree with each other the choice made here is stated at the function that
//! makes it. Everything is byte-exact: a value that is not UTF-8 is canonicalized as bytes (as the
//! Go SDK does), where Python would substitute U+FFFD.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Uri};
use percent_encoding::{percent_decode, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use ring::{digest, hmac};

use crate::policy::abbreviate;

/// The scheme name, first in the string to sign and in `Authorization`.
pub const ALGORITHM: &str = "SDK-HMAC-SHA256";
/// The signing time, `YYYYMMDDTHHMMSSZ` in UTC; always signed.
pub const X_SDK_DATE: HeaderName = HeaderName::from_static("x-sdk-date");
/// The STS token of temporary credentials; signed when present.
pub const X_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-security-token");
/// Overrides the payload hash: [`UNSIGNED_PAYLOAD`] leaves the body out of the signature.
pub const X_SDK_CONTENT_SHA256: HeaderName = HeaderName::from_static("x-sdk-content-sha256");
/// The `X-Sdk-Content-Sha256` value (and payload hash) of a request whose body is not signed.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// The same, to match header values against.
const UNSIGNED: &[u8] = UNSIGNED_PAYLOAD.as_bytes();
/// Hex SHA-256 of the empty body.
pub const EMPTY_BODY_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// How far `X-Sdk-Date` may be from the verifier's clock, either way: API Gateway refuses a
/// request whose `X-Sdk-Date` is more than 15 minutes off.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// Bytes left as they are in the canonical URI and query: RFC 3986 unreserved, like Python's
/// `quote(s, safe='~')` and Go's `shouldEscape`. Everything else becomes `%XX`, upper-case hex.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A secret access key, ready for HMAC-SHA256. Never printed.
#[derive(Clone)]
pub struct SecretKey(hmac::Key);

impl SecretKey {
    pub fn new(secret: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// The credentials requests are signed with. `Debug` shows the access key only.
#[derive(Clone)]
pub struct Credentials {
    access_key: String,
    secret: SecretKey,
    security_token: Option<HeaderValue>,
}

/// Why [`Credentials::new`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("the access key must be printable ASCII without spaces or commas")]
    AccessKey,
    #[error("the secret key must not be empty")]
    SecretKey,
    #[error("the security token is not a valid header value")]
    SecurityToken,
}

impl Credentials {
    /// Checked here, once, so that every `Authorization` built from them is a valid header.
    pub fn new(
        access_key: &str,
        secret_key: &str,
        security_token: Option<&str>,
    ) -> Result<Self, CredentialsError> {
        // A space or comma would end the `Access=` parameter early.
        if access_key.is_empty()
            || !access_key
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b',')
        {
            return Err(CredentialsError::AccessKey);
        }
        if secret_key.is_empty() {
            return Err(CredentialsError::SecretKey);
        }
        let security_token = match security_token {
            Some(token) => {
                let mut value =
                    HeaderValue::from_str(token).map_err(|_| CredentialsError::SecurityToken)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Self {
            access_key: access_key.to_owned(),
            secret: SecretKey::new(secret_key.as_bytes()),
            security_token,
        })
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret(&self) -> &SecretKey {
        &self.secret
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field(
                "security_token",
                &self.security_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// What the signature says about the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// The whole body: its SHA-256 is signed (pass an empty slice for a request without one).
    Body(&'a [u8]),
    /// The body is left out (`X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD`), as the SDKs do for
    /// uploads that are not JSON. To [`verify`]: the body was not buffered.
    Unsigned,
}

/// Signs a request on its way upstream, in place.
///
/// Sets `X-Sdk-Date` (from `now`), `X-Security-Token` (removed when the credentials have none),
/// `X-Sdk-Content-Sha256` (set for [`Payload::Unsigned`], removed otherwise) and `Authorization`.
/// The signed headers are `x-sdk-date`, the two above when set, and those of `also_sign` that are
/// present, except `Authorization` and names containing `_`, which the Python and Go SDKs never
/// sign (nginx, for one, drops such headers by default). For `host` to be signed, `Host` must be
/// in `headers` (HTTP/2 requests carry the authority in the URI only).
pub fn sign(
    creds: &Credentials,
    method: &Method,
    uri: &Uri,
    headers: &mut HeaderMap,
    payload: Payload<'_>,
    also_sign: &[HeaderName],
    now: SystemTime,
) -> Result<(), SignError> {
    let date = format_date(now);
    headers.insert(X_SDK_DATE, HeaderValue::from_str(&date)?);
    let mut signed = vec![X_SDK_DATE];
    match &creds.security_token {
        Some(token) => {
            headers.insert(X_SECURITY_TOKEN, token.clone());
            signed.push(X_SECURITY_TOKEN);
        }
        None => {
            headers.remove(X_SECURITY_TOKEN);
        }
    }
    let payload_hash = match payload {
        Payload::Body(body) => {
            headers.remove(X_SDK_CONTENT_SHA256);
            sha256_hex(body)
        }
        Payload::Unsigned => {
            headers.insert(
                X_SDK_CONTENT_SHA256,
                HeaderValue::from_static(UNSIGNED_PAYLOAD),
            );
            signed.push(X_SDK_CONTENT_SHA256);
            UNSIGNED_PAYLOAD.to_owned()
        }
    };
    headers.remove(header::AUTHORIZATION);
    signed.extend(
        also_sign
            .iter()
            .filter(|name| !name.as_str().contains('_') && headers.contains_key(*name))
            .cloned(),
    );
    signed.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    signed.dedup();

    let canonical = canonical_request(method, uri, headers, &signed, &payload_hash);
    let signature = signature(&creds.secret, &date, &canonical);
    let names: Vec<&str> = signed.iter().map(HeaderName::as_str).collect();
    let authorization = format!(
        "{ALGORITHM} Access={}, SignedHeaders={}, Signature={signature}",
        creds.access_key,
        names.join(";")
    );
    let mut value = HeaderValue::from_str(&authorization)?;
    value.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, value);
    Ok(())
}

/// Why [`sign`] failed: never, with credentials from [`Credentials::new`]. Kept so that a bug
/// shows as an error rather than a panic.
#[derive(Debug, thiserror::Error)]
#[error("signing produced an invalid header value: {0}")]
pub struct SignError(#[from] header::InvalidHeaderValue);

/// The canonical request the signature's string to sign hashes.
///
/// Bytes rather than a `String`: header values may hold bytes that are not UTF-8, and the SDKs
/// hash the bytes that go on the wire. `signed` is used in the order given (the verifier must use
/// the signer's order); every value of a signed header gives one line, values sorted as bytes
/// (Go SDK; the Python SDK holds one value per name). A signed header that is absent gives no line.
pub fn canonical_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    signed: &[HeaderName],
    payload_hash: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_uri(uri.path()).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_query(uri.query().unwrap_or("")).as_bytes());
    out.push(b'\n');
    // The SDKs join the header lines with "\n" and add one more: no header, one "\n".
    let mut first = true;
    for name in signed {
        let mut values: Vec<&[u8]> = headers
            .get_all(name)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        values.sort_unstable();
        for value in values {
            if !first {
                out.push(b'\n');
            }
            first = false;
            out.extend_from_slice(name.as_str().as_bytes());
            out.push(b':');
            out.extend_from_slice(trim(value));
        }
    }
    out.extend_from_slice(b"\n\n");
    for (i, name) in signed.iter().enumerate() {
        if i > 0 {
            out.push(b';');
        }
        out.extend_from_slice(name.as_str().as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(payload_hash.as_bytes());
    out
}

/// The canonical URI of a request path: percent-decoded, split on `/`, each segment encoded
/// ([`UNRESERVED`] kept), joined, and ended with `/` if it does not end so already.
///
/// Python `unquote`s the path before splitting, so `%2F` separates segments, and escapes are
/// normalized (`%7e` -> `~`, `%e4` -> `%E4`); nothing is double-encoded. An invalid escape
/// (`%zz`) stays literal and its `%` becomes `%25`. No dot-segment removal, no merging of `//`.
pub fn canonical_uri(path: &str) -> String {
    let decoded: Vec<u8> = percent_decode(path.as_bytes()).collect();
    let mut out = String::with_capacity(path.len() + 1);
    for (i, segment) in decoded.split(|&b| b == b'/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.extend(percent_encode(segment, UNRESERVED));
    }
    if !out.ends_with('/') {
        out.push('/');
    }
    out
}

/// The canonical query string of a raw query (without `?`): pairs split on `&` and at the first
/// `=` (`k` alone means `k=`), percent-decoded, sorted by key then value (as bytes: code-point
/// order for UTF-8, as Python sorts `(key, value)` tuples and Go sorts keys, then each key's
/// values), encoded, and joined as `k=v&k=v`.
///
/// Pairs with an empty raw key are dropped, as the APIG Python signer does. `+` is a literal
/// plus, not a space: `unquote` in the Python signers; Go's API Gateway signer (which reads
/// `URL.Query()`) would read a space. Neither Huawei SDK sends a raw `+`: they percent-encode.
pub fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
        .split('&')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (!key.is_empty()).then(|| {
                (
                    percent_decode(key.as_bytes()).collect(),
                    percent_decode(value.as_bytes()).collect(),
                )
            })
        })
        .collect();
    pairs.sort_unstable();
    let mut out = String::with_capacity(query.len());
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.extend(percent_encode(key, UNRESERVED));
        out.push('=');
        out.extend(percent_encode(value, UNRESERVED));
    }
    out
}

/// A header value as the SDKs sign it: leading and trailing whitespace trimmed (Python's
/// `str.strip()`, Go's `strings.TrimSpace`), inner whitespace kept as is. `str::trim` trims the
/// Unicode White_Space set as Go does; Python also trims U+001C..U+001F, which no header value
/// can hold.
fn trim(value: &[u8]) -> &[u8] {
    match std::str::from_utf8(value) {
        Ok(text) => text.trim().as_bytes(),
        Err(_) => value.trim_ascii(),
    }
}

/// The string to sign: the scheme, the `X-Sdk-Date` value, the canonical request's hex SHA-256.
pub fn string_to_sign(date: &str, canonical_request: &[u8]) -> String {
    format!("{ALGORITHM}\n{date}\n{}", sha256_hex(canonical_request))
}

/// The hex (lower-case) HMAC-SHA256 signature of a canonical request made at `date`.
pub fn signature(secret: &SecretKey, date: &str, canonical_request: &[u8]) -> String {
    let sts = string_to_sign(date, canonical_request);
    hex(hmac::sign(&secret.0, sts.as_bytes()).as_ref())
}

/// A parsed `Authorization: SDK-HMAC-SHA256 Access=..., SignedHeaders=..., Signature=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access_key: String,
    /// In the order listed, which is the order the signer used.
    pub signed_headers: Vec<HeaderName>,
    pub signature: [u8; 32],
}

/// Why a request's signing headers cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Authorization is not an SDK-HMAC-SHA256 signature")]
    Scheme,
    #[error("Authorization parameter {:?} is malformed, unknown or repeated", abbreviate(.0))]
    Param(String),
    #[error("Authorization has no {0} parameter")]
    MissingParam(&'static str),
    #[error("Authorization's Access is empty")]
    AccessKey,
    #[error("Authorization's SignedHeaders is not a list of lower-case header names")]
    SignedHeaders,
    #[error("Authorization's Signature is not 64 lower-case hex digits")]
    Signature,
    #[error("{0} is not YYYYMMDDTHHMMSSZ")]
    Date(HeaderName),
    #[error("{0} is repeated")]
    Repeated(HeaderName),
}

/// Parses an `Authorization` value. The scheme and parameter names are matched without regard to
/// case (RFC 9110 section 11.1 for the scheme), in any order; values must be as the SDKs write
/// them: header names lower-case, the signature lower-case hex.
pub fn parse_authorization(value: &str) -> Result<Authorization, ParseError> {
    let (scheme, params) = value.trim().split_once(' ').ok_or(ParseError::Scheme)?;
    if !scheme.eq_ignore_ascii_case(ALGORITHM) {
        return Err(ParseError::Scheme);
    }
    let (mut access_key, mut signed_headers, mut signature) = (None, None, None);
    for param in params.split(',') {
        let param = param.trim();
        let malformed = || ParseError::Param(param.to_owned());
        let (key, value) = param.split_once('=').ok_or_else(malformed)?;
        let slot = match key.trim() {
            k if k.eq_ignore_ascii_case("Access") => &mut access_key,
            k if k.eq_ignore_ascii_case("SignedHeaders") => &mut signed_headers,
            k if k.eq_ignore_ascii_case("Signature") => &mut signature,
            _ => return Err(malformed()),
        };
        if slot.replace(value.trim()).is_some() {
            return Err(malformed());
        }
    }
    let access_key = access_key.ok_or(ParseError::MissingParam("Access"))?;
    if access_key.is_empty() {
        return Err(ParseError::AccessKey);
    }
    let signed_headers = signed_headers
        .ok_or(ParseError::MissingParam("SignedHeaders"))?
        .split(';')
        .map(|name| HeaderName::from_lowercase(name.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ParseError::SignedHeaders)?;
    let signature = signature.ok_or(ParseError::MissingParam("Signature"))?;
    Ok(Authorization {
        access_key: access_key.to_owned(),
        signed_headers,
        signature: decode_signature(signature).ok_or(ParseError::Signature)?,
    })
}

/// A request whose signature holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub access_key: String,
    pub signed_headers: Vec<HeaderName>,
    /// False for `X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD`: the body is not covered.
    pub payload_signed: bool,
}

/// Why [`verify`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the request has no Authorization header")]
    MissingAuthorization,
    #[error("the request has no X-Sdk-Date header")]
    MissingDate,
    #[error(transparent)]
    Malformed(#[from] ParseError),
    #[error("X-Sdk-Date is {0:?} away from now, more than allowed")]
    ClockSkew(Duration),
    #[error("unknown access key {:?}", abbreviate(.0))]
    UnknownAccessKey(String),
    #[error("signed header {} is absent", abbreviate(.0.as_str()))]
    MissingSignedHeader(HeaderName),
    /// A caller's error: the signature covers the body but [`Payload::Unsigned`] was passed.
    #[error("the signature covers the body, which was not passed")]
    BodyNeeded,
    #[error("the signature does not match the request")]
    BadSignature,
}

/// Whether the request declares `X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD`, so that [`verify`]
/// needs no body.
pub fn declares_unsigned_payload(headers: &HeaderMap) -> bool {
    headers
        .get(X_SDK_CONTENT_SHA256)
        .is_some_and(|v| v.as_bytes() == UNSIGNED_PAYLOAD.as_bytes())
}

/// Checks a downstream request's signature: `lookup` gives the secret of an access key;
/// `X-Sdk-Date` must be within `max_skew` ([`MAX_SKEW`]) of `now`, either way. The signature is
/// compared in constant time.
///
/// The payload hash: the body's SHA-256, unless `X-Sdk-Content-Sha256` is set. Set to
/// `UNSIGNED-PAYLOAD`, that string is signed (Go and Java SDKs) except that for an empty body the
/// Python SDK signs the empty body's hash, so both are accepted when `payload` is an empty body.
/// Set to anything else, the SDKs sign the value as given; it must then be the body's hash.
pub fn verify<'k>(
    lookup: impl FnOnce(&str) -> Option<&'k SecretKey>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    payload: Payload<'_>,
    now: SystemTime,
    max_skew: Duration,
) -> Result<Verified, VerifyError> {
    let authorization = single(headers, &header::AUTHORIZATION)?
        .ok_or(VerifyError::MissingAuthorization)?
        .to_str()
        .map_err(|_| ParseError::Scheme)?;
    let authorization = parse_authorization(authorization)?;
    let date = single(headers, &X_SDK_DATE)?
        .ok_or(VerifyError::MissingDate)?
        .to_str()
        .map_err(|_| ParseError::Date(X_SDK_DATE))?;
    let signed_at = parse_date(date).ok_or(ParseError::Date(X_SDK_DATE))?;
    let skew = match now.duration_since(signed_at) {
        Ok(behind) => behind,
        Err(ahead) => ahead.duration(),
    };
    if skew > max_skew {
        return Err(VerifyError::ClockSkew(skew));
    }
    let secret = lookup(&authorization.access_key)
        .ok_or_else(|| VerifyError::UnknownAccessKey(authorization.access_key.clone()))?;
    if let Some(absent) = authorization
        .signed_headers
        .iter()
        .find(|name| !headers.contains_key(*name))
    {
        return Err(VerifyError::MissingSignedHeader(absent.clone()));
    }

    let declared = single(headers, &X_SDK_CONTENT_SHA256)?.map(HeaderValue::as_bytes);
    let body_hash: String;
    let (candidates, payload_signed): (Vec<&str>, bool) = match (declared, payload) {
        (None, Payload::Body(body)) => {
            body_hash = sha256_hex(body);
            (vec![&body_hash], true)
        }
        (Some(UNSIGNED), Payload::Body([])) => (vec![UNSIGNED_PAYLOAD, EMPTY_BODY_SHA256], false),
        (Some(UNSIGNED), _) => (vec![UNSIGNED_PAYLOAD], false),
        (None | Some(_), Payload::Unsigned) => return Err(VerifyError::BodyNeeded),
        (Some(hash), Payload::Body(body)) => {
            body_hash = sha256_hex(body);
            if hash != body_hash.as_bytes() {
                return Err(VerifyError::BadSignature);
            }
            (vec![&body_hash], true)
        }
    };
    let verified = candidates.iter().any(|hash| {
        let canonical =
            canonical_request(method, uri, headers, &authorization.signed_headers, hash);
        let sts = string_to_sign(date, &canonical);
        hmac::verify(&secret.0, sts.as_bytes(), &authorization.signature).is_ok()
    });
    if !verified {
        return Err(VerifyError::BadSignature);
    }
    Ok(Verified {
        access_key: authorization.access_key,
        signed_headers: authorization.signed_headers,
        payload_signed,
    })
}

/// The one value of `name`, if any: a second one is refused rather than guessed between.
fn single<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'h HeaderValue>, ParseError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        (Some(_), Some(_)) | (None, Some(_)) => Err(ParseError::Repeated(name.clone())),
    }
}

/// `YYYYMMDDTHHMMSSZ` in UTC, the `X-Sdk-Date` format (`%Y%m%dT%H%M%SZ`).
pub fn format_date(time: SystemTime) -> String {
    let secs = unix_seconds(time);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `YYYYMMDDTHHMMSSZ` strictly (no other form, a real calendar date, seconds 0..=59).
pub fn parse_date(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        b[range].iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (number(0..4)?, number(4..6)?, number(6..8)?);
    let (hour, minute, second) = (number(9..11)?, number(11..13)?, number(13..15)?);
    if !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(year, month as u32, day as u32);
    // A day past the month's end comes back as another date.
    if day < 1 || civil_from_days(days) != (year, month as u32, day as u32) {
        return None;
    }
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    match u64::try_from(secs) {
        Ok(after) => UNIX_EPOCH.checked_add(Duration::from_secs(after)),
        Err(_) => UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs())),
    }
}

/// Whole seconds since the epoch, rounded down (negative before it).
fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => {
            let before = before.duration();
            let secs = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            if before.subsec_nanos() > 0 {
                -secs - 1
            } else {
                -secs
            }
        }
    }
}

/// Year, month, day of a day count from 1970-01-01 (proleptic Gregorian; H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// 64 lower-case hex digits, as every SDK writes them (API Gateway's own Python signer compares
/// the whole header as a string).
fn decode_signature(text: &str) -> Option<[u8; 32]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AK: &str = "AccessKey";
    const SK: &str = "SecretKey";

    fn creds() -> Credentials {
        Credentials::new(AK, SK, None).unwrap()
    }

    fn date(text: &str) -> SystemTime {
        parse_date(text).unwrap()
    }

    fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            );
        }
        map
    }

    fn names(names: &[&str]) -> Vec<HeaderName> {
        names
            .iter()
            .map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap())
            .collect()
    }

    /// A signature published in a Huawei SDK's own test suite.
    struct Vector {
        /// Repository and file the expected value is from.
        source: &'static str,
        method: &'static str,
        uri: &'static str,
        /// As the SDK's signer saw them (the Python and Java SDKs add `Host` themselves).
        headers: &'static [(&'static str, &'static str)],
        body: &'static [u8],
        /// What `sign` is given to choose the SDK's signed headers; `None` where the SDK signs
        /// what `sign` never does (names with `_`), so only `verify` is checked.
        also_sign: Option<&'static [&'static str]>,
        expected: &'static str,
    }

    const PY_DATE: &str = "20200608T023900Z";
    const GO_DATE: &str = "20060102T150405Z";
    const JAVA_DATE: &str = "20191115T033655Z";

    const VECTORS: &[Vector] = &[
        Vector {
            source: "huaweicloud/huaweicloud-sdk-python-v3 huaweicloud-sdk-core/tests/test_signer.py test_signer1",
            method: "GET",
            uri: "/resources?size=1",
            headers: &[
                ("X-Sdk-Date", PY_DATE),
                ("TEST_UNDERSCORE", "TEST_VALUE"),
                ("Host", "service.endpoint.myhuaweicloud.com"),
            ],
            body: b"",
            also_sign: Some(&["host", "test_underscore"]),
            expected: "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, Signature=cfb4171acec81de07d50e53d57eb77edd537414d66ddb1d7d780f128e12cd842",
        },
        Vector {
            source: "huaweicloud/huaweicloud-sdk-python-v3 huaweicloud-sdk-core/tests/test_signer.py test_signer2",
            method: "POST",
            uri: "/resources?size=1",
            headers: &[
                ("X-Sdk-Date", PY_DATE),
                ("TEST_UNDERSCORE", "TEST_VALUE"),
                ("Host", "service.endpoint.myhuaweicloud.com"),
            ],
            body: br#"{"name":"test","id":1}"#,
            also_sign: Some(&["host", "test_underscore"]),
            expected: "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, Signature=436b1ac0a1ae03705934bb70ef2f2e09f7bfed2117d731a38235053199323a1f",
        },
        // The Go SDK signs neither Content-Type nor Host (its header map has no Host).
        Vector {
            source: "huaweicloud/huaweicloud-sdk-go-v3 core/auth/signer/signer_test.go TestSigner_Sign test1",
            method: "GET",
            uri: "/path?limit=1",
            headers: &[("X-Sdk-Date", GO_DATE), ("TEST_UNDERSCORE", "TEST_VALUE")],
            body: b"",
            also_sign: Some(&["test_underscore"]),
            expected: "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=x-sdk-date, Signature=5a2ce64c865e0e6046321c6f3d5a77ba8413eeaf355c3166c03d58d02ac79624",
        },
        // Go's json.Encoder ends the body with a newline; the vector signs that byte too.
        Vector {
            source: "huaweicloud/huaweicloud-sdk-go-v3 core/auth/signer/signer_test.go TestSigner_Sign test2",
            method: "POST",
            uri: "/path?key=value",
            headers: &[
                ("X-Sdk-Date", GO_DATE),
                ("TEST_UNDERSCORE", "TEST_VALUE"),
                ("Content-Type", "application/json"),
            ],
            body: b"{\"Name\":\"test\",\"Id\":1}\n",
            also_sign: Some(&["test_underscore"]),
            expected: "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=x-sdk-date, Signature=cecc2af119b18ab70b4d094c0750f3b42c02f254903179a0fc2cc72fc9db4f59",
        },
        Vector {
            source: "huaweicloud/huaweicloud-sdk-java-v3 core/src/test/java/com/huaweicloud/sdk/core/AKSKSignerTest.java testAKSKSigner",
            method: "GET",
            uri: "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs?limit=2&marker=13551d6b-755d-4757-b956-536f674975c0",
            headers: &[
                ("X-Sdk-Date", JAVA_DATE),
                ("TEST_UNDERSCORE", "TEST_VALUE"),
                ("Host", "service.region.example.com"),
                ("Content-Type", "application/json"),
            ],
            body: b"",
            also_sign: Some(&["host"]),
            expected: "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, Signature=fd95e7da6f695cfb4cabbb9d6b0968aec155bc576b064835282473539ae9ea1d",
        },
        Vector {
            source: "huaweicloud/huaweicloud-sdk-java-v3 core/src/test/java/com/huaweicloud/sdk/core/AKSKSignerTest.java testAKSKSigner2",
            method: "POST",
            uri: "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpc/123",
            headers: &[
                ("X-Sdk-Date", JAVA_DATE),
                ("TEST_UNDERSCORE", "TEST_VALUE"),
                ("Host", "service.region.example.com"),
                ("Content-Type", "application/json"),
            ],
            body: br#"{"key":"value"}"#,
            also_sign: Some(&["host"]),
            expected: "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, Signature=b5649aa774f6cac7437631662f08815fc65c70e40e486df6db2436ce68902771",
        },
        // No path at all: the canonical URI is "/".
        Vector {
            source: "huaweicloud/huaweicloud-sdk-java-v3 core/src/test/java/com/huaweicloud/sdk/core/AKSKSignerTest.java testAKSKSigner3",
            method: "GET",
            uri: "/",
            headers: &[
                ("Host", "example.com"),
                ("X-Sdk-Date", JAVA_DATE),
                ("TEST_UNDERSCORE", "TEST_VALUE"),
            ],
            body: b"",
            also_sign: Some(&["host"]),
            expected: "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, Signature=919ad8b75d4ad49da0d377e63ee21c4a7a54b752f6bf2878b4adbe9c19927da6",
        },
        // An API Gateway-style signer (auth/core/signer/signer.go) that signs every header,
        // Content-Type and underscored names included: verify goes by SignedHeaders, whatever
        // it lists.
        Vector {
            source: "chnsz/golangsdk testing/auth_test.go TestSigner_Sign test1",
            method: "GET",
            uri: "/path?limit=1",
            headers: &[("X-Sdk-Date", GO_DATE), ("TEST_UNDERSCORE", "TEST_VALUE")],
            body: b"",
            also_sign: None,
            expected: "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=test_underscore;x-sdk-date, Signature=daeadcf4a306599f7422401cc55d3718a23ef159fed370c62c551a2c45ae9655",
        },
        Vector {
            source: "chnsz/golangsdk testing/auth_test.go TestSigner_Sign test2",
            method: "POST",
            uri: "/path?key=value",
            headers: &[
                ("X-Sdk-Date", GO_DATE),
                ("TEST_UNDERSCORE", "TEST_VALUE"),
                ("Content-Type", "application/json"),
            ],
            body: br#"{"Name":"test","Id":1}"#,
            also_sign: None,
            expected: "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=content-type;test_underscore;x-sdk-date, Signature=0238c3bedddfe8bf113c7530f783322380dedf720d514861623cfe5f73aa8f64",
        },
    ];

    #[test]
    fn sdk_vectors() {
        let creds = creds();
        for v in VECTORS {
            let method: Method = v.method.parse().unwrap();
            let uri: Uri = v.uri.parse().unwrap();
            let at = date(
                v.headers
                    .iter()
                    .find(|(n, _)| *n == "X-Sdk-Date")
                    .unwrap()
                    .1,
            );

            // The published signature from its canonical request.
            let auth = parse_authorization(v.expected).unwrap();
            let headers = header_map(v.headers);
            let canonical = canonical_request(
                &method,
                &uri,
                &headers,
                &auth.signed_headers,
                &sha256_hex(v.body),
            );
            assert_eq!(
                decode_signature(&signature(creds.secret(), &format_date(at), &canonical)),
                Some(auth.signature),
                "{}",
                v.source
            );

            // verify accepts the SDK's request as signed.
            let mut signed = headers.clone();
            signed.insert(header::AUTHORIZATION, v.expected.parse().unwrap());
            let verified = verify(
                |ak| (ak == AK).then_some(creds.secret()),
                &method,
                &uri,
                &signed,
                Payload::Body(v.body),
                at,
                MAX_SKEW,
            );
            assert_eq!(
                verified.map(|v| v.access_key),
                Ok(AK.to_owned()),
                "{}",
                v.source
            );

            // sign writes the same Authorization.
            if let Some(also_sign) = v.also_sign {
                let mut headers = headers.clone();
                sign(
                    &creds,
                    &method,
                    &uri,
                    &mut headers,
                    Payload::Body(v.body),
                    &names(also_sign),
                    at,
                )
                .unwrap();
                assert_eq!(headers[header::AUTHORIZATION], v.expected, "{}", v.source);
            }
        }
    }

    /// huaweicloud/huaweicloud-sdk-python-v3 huaweicloud-sdk-core/tests/test_signer.py
    /// test_process_canonical_query_string and huaweicloud/huaweicloud-sdk-go-v3
    /// core/auth/signer/signer_test.go TestSigner_canonicalQueryString: the SDKs' parameters
    /// (limit=1, enable=true, test="一 (&=?!#%.*)", path="/tmp/123", multi=[1,2,3]), here as a
    /// wire query in another order and another (equivalent) encoding.
    #[test]
    fn sdk_canonical_query_vector() {
        let wire = "test=%E4%B8%80%20(%26%3D%3F!%23%25.*)&multi=3&path=/tmp/123&multi=1&limit=1\
                    &enable=true&multi=2";
        assert_eq!(
            canonical_query(wire),
            "enable=true&limit=1&multi=1&multi=2&multi=3&path=%2Ftmp%2F123\
             &test=%E4%B8%80%20%28%26%3D%3F%21%23%25.%2A%29"
        );
    }

    #[test]
    fn canonical_uri_rules() {
        for (path, expected) in [
            ("", "/"),
            ("/", "/"),
            ("/a", "/a/"),
            ("/a/", "/a/"),
            ("/v3/p1/snapshots/detail", "/v3/p1/snapshots/detail/"),
            // No merging of empty segments, no dot-segment removal.
            ("/a//b", "/a//b/"),
            ("//", "//"),
            ("/a/./../b", "/a/./../b/"),
            // Decoded, then encoded: escapes normalized, never double-encoded.
            ("/%7e%41%2d", "/~A-/"),
            ("/%e4%b8%80", "/%E4%B8%80/"),
            ("/a%20b", "/a%20b/"),
            // An encoded slash separates segments, as in Python's unquote-then-split.
            ("/a%2Fb", "/a/b/"),
            ("/a%2f", "/a/"),
            // Sub-delims and the like are escaped; `+` is a plus.
            ("/a+b", "/a%2Bb/"),
            (
                "/v1/x:y@z!$&'()*,;=",
                "/v1/x%3Ay%40z%21%24%26%27%28%29%2A%2C%3B%3D/",
            ),
            // An invalid escape stays literal, its `%` escaped.
            ("/a%zz", "/a%25zz/"),
            ("/a%4", "/a%254/"),
            ("/100%", "/100%25/"),
            // Bytes that are not UTF-8 stay bytes (Go); Python would sign %EF%BF%BD.
            ("/%ff", "/%FF/"),
        ] {
            assert_eq!(canonical_uri(path), expected, "{path:?}");
        }
    }

    #[test]
    fn canonical_query_rules() {
        for (query, expected) in [
            ("", ""),
            ("a", "a="),
            ("a=", "a="),
            ("a=&b", "a=&b="),
            // Empty keys and empty pairs are dropped.
            ("=v", ""),
            ("a=1&&b=2&", "a=1&b=2"),
            // Sorted by key, then value, as bytes ("10" < "2").
            ("b=2&a=1", "a=1&b=2"),
            ("a=2&a=1&a=10", "a=1&a=10&a=2"),
            ("B=1&a=1", "B=1&a=1"),
            // Only the first `=` splits.
            ("a=b=c", "a=b%3Dc"),
            // `+` is a literal plus.
            ("a+b=c+d", "a%2Bb=c%2Bd"),
            ("k=%41%7e%2d", "k=A~-"),
            ("k=%zz", "k=%25zz"),
            ("k=/?:@", "k=%2F%3F%3A%40"),
            // Sorted on decoded keys: "." (0x2E) before "/" (0x2F), though "%2F" < "." encoded
            // (the Java SDK sorts encoded keys and would put a%2Fb first).
            ("a%2Fb=1&a.b=2", "a.b=2&a%2Fb=1"),
            ("%E4%B8%80=1&z=2", "z=2&%E4%B8%80=1"),
        ] {
            assert_eq!(canonical_query(query), expected, "{query:?}");
        }
    }

    #[test]
    fn canonical_request_layout() {
        let headers = header_map(&[
            ("Host", "evs.example.com"),
            ("X-Sdk-Date", GO_DATE),
            // Trimmed at both ends, inner whitespace kept.
            ("X-Project-Id", " \t p1  x \u{a0}"),
            ("X-Multi", "b"),
            ("X-Multi", "a"),
        ]);
        let canonical = canonical_request(
            &Method::POST,
            &"/v3/p1/snapshots?b=2&a=1".parse().unwrap(),
            &headers,
            &names(&["host", "x-multi", "x-project-id", "x-sdk-date"]),
            EMPTY_BODY_SHA256,
        );
        assert_eq!(
            String::from_utf8(canonical).unwrap(),
            format!(
                "POST\n/v3/p1/snapshots/\na=1&b=2\nhost:evs.example.com\nx-multi:a\nx-multi:b\n\
                 x-project-id:p1  x\nx-sdk-date:{GO_DATE}\n\nhost;x-multi;x-project-id;x-sdk-date\n\
                 {EMPTY_BODY_SHA256}"
            )
        );
        // No signed header at all: the SDKs' join gives one "\n" for the block.
        let bare = canonical_request(&Method::GET, &"/".parse().unwrap(), &headers, &[], "h");
        assert_eq!(bare, b"GET\n/\n\n\n\n\nh");
    }

    #[test]
    fn dates() {
        for (text, secs) in [
            ("19700101T000000Z", 0_i64),
            ("20060102T150405Z", 1_136_214_245),
            ("20200608T023900Z", 1_591_583_940),
            ("20240229T235959Z", 1_709_251_199),
            ("21000301T000000Z", 4_107_542_400),
            ("19691231T235959Z", -1),
        ] {
            let time = match u64::try_from(secs) {
                Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
                Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
            };
            assert_eq!(format_date(time), text);
            assert_eq!(parse_date(text), Some(time), "{text}");
        }
        // Sub-second parts are dropped, not rounded.
        assert_eq!(
            format_date(UNIX_EPOCH + Duration::from_millis(1999)),
            "19700101T000001Z"
        );
        for bad in [
            "20230229T000000Z",
            "20240230T000000Z",
            "20241301T000000Z",
            "20240001T000000Z",
            "20240100T000000Z",
            "20240101T240000Z",
            "20240101T236000Z",
            "20240101T235960Z",
            "20240101t000000Z",
            "20240101T000000",
            "20240101T000000z",
            "2024-01-01T00:00:00Z",
            "+0240101T000000Z",
            "",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn parse_authorization_forms() {
        let sig = "a".repeat(64);
        let ok = parse_authorization(&format!(
            "sdk-hmac-sha256  signature={sig},access=AK , SignedHeaders=host;x-sdk-date"
        ))
        .unwrap();
        assert_eq!(ok.access_key, "AK");
        assert_eq!(ok.signed_headers, names(&["host", "x-sdk-date"]));
        assert_eq!(ok.signature, [0xaa; 32]);

        for (value, error) in [
            (
                format!("AWS4-HMAC-SHA256 Access=AK, SignedHeaders=host, Signature={sig}"),
                ParseError::Scheme,
            ),
            ("SDK-HMAC-SHA256".to_owned(), ParseError::Scheme),
            (
                "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host".to_owned(),
                ParseError::MissingParam("Signature"),
            ),
            (
                format!("SDK-HMAC-SHA256 SignedHeaders=host, Signature={sig}"),
                ParseError::MissingParam("Access"),
            ),
            (
                format!("SDK-HMAC-SHA256 Access=AK, Signature={sig}"),
                ParseError::MissingParam("SignedHeaders"),
            ),
            (
                format!("SDK-HMAC-SHA256 Access=, SignedHeaders=host, Signature={sig}"),
                ParseError::AccessKey,
            ),
            (
                format!(
                    "SDK-HMAC-SHA256 Access=AK, Access=AK, SignedHeaders=host, Signature={sig}"
                ),
                ParseError::Param("Access=AK".to_owned()),
            ),
            (
                format!("SDK-HMAC-SHA256 Access=AK, Region=x, SignedHeaders=host, Signature={sig}"),
                ParseError::Param("Region=x".to_owned()),
            ),
            (
                format!("SDK-HMAC-SHA256 Access=AK, SignedHeaders=Host, Signature={sig}"),
                ParseError::SignedHeaders,
            ),
            (
                format!("SDK-HMAC-SHA256 Access=AK, SignedHeaders=host;, Signature={sig}"),
                ParseError::SignedHeaders,
            ),
            (
                format!("SDK-HMAC-SHA256 Access=AK, SignedHeaders=, Signature={sig}"),
                ParseError::SignedHeaders,
            ),
            (
                "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host, Signature=abc".to_owned(),
                ParseError::Signature,
            ),
            (
                format!(
                    "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host, Signature={}",
                    "A".repeat(64)
                ),
                ParseError::Signature,
            ),
        ] {
            assert_eq!(parse_authorization(&value), Err(error), "{value}");
        }
    }

    #[test]
    fn credentials_are_checked_and_never_printed() {
        let with_token = Credentials::new("AK1", "very-secret", Some("token-xyz")).unwrap();
        let shown = format!("{with_token:?}");
        assert!(shown.contains("AK1"), "{shown}");
        assert!(
            !shown.contains("very-secret") && !shown.contains("token-xyz"),
            "{shown}"
        );
        assert!(!format!("{:?}", with_token.secret()).contains("very-secret"));

        assert_eq!(
            Credentials::new("", SK, None).err(),
            Some(CredentialsError::AccessKey)
        );
        assert_eq!(
            Credentials::new("A K", SK, None).err(),
            Some(CredentialsError::AccessKey)
        );
        assert_eq!(
            Credentials::new("A,K", SK, None).err(),
            Some(CredentialsError::AccessKey)
        );
        assert_eq!(
            Credentials::new(AK, "", None).err(),
            Some(CredentialsError::SecretKey)
        );
        assert_eq!(
            Credentials::new(AK, SK, Some("a\nb")).err(),
            Some(CredentialsError::SecurityToken)
        );
    }

    const NOW: &str = "20240229T120000Z";

    /// A request as the proxy would send it, signed.
    fn signed(creds: &Credentials, payload: Payload<'_>) -> (Method, Uri, HeaderMap) {
        let method = Method::POST;
        let uri: Uri = "/v3/0123abcd/snapshots/%E5%BF%AB%E7%85%A7?metadata=a%20b&limit=10&limit=2"
            .parse()
            .unwrap();
        let mut headers = header_map(&[
            ("Host", "evs.cn-north-4.myhuaweicloud.com"),
            ("Content-Type", "application/json;charset=UTF-8"),
            ("X-Project-Id", "0123abcd"),
            ("User-Agent", "snapguard"),
            ("X-Forwarded-For", "10.0.0.1"),
            // Stale signing headers from downstream are replaced or removed.
            ("Authorization", "SDK-HMAC-SHA256 Access=old"),
            ("X-Sdk-Date", "20000101T000000Z"),
            ("X-Security-Token", "stale"),
            ("X-Sdk-Content-Sha256", "stale"),
        ]);
        let also = names(&[
            "host",
            "content-type",
            "x-project-id",
            "x-missing",
            "authorization",
            "x_under",
        ]);
        sign(
            creds,
            &method,
            &uri,
            &mut headers,
            payload,
            &also,
            date(NOW),
        )
        .unwrap();
        (method, uri, headers)
    }

    const BODY: &[u8] = br#"{"snapshot":{"name":"nightly","volume_id":"v1"}}"#;

    fn check(
        creds: &Credentials,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        payload: Payload<'_>,
        now: SystemTime,
    ) -> Result<Verified, VerifyError> {
        verify(
            |ak| (ak == creds.access_key()).then_some(creds.secret()),
            method,
            uri,
            headers,
            payload,
            now,
            MAX_SKEW,
        )
    }

    #[test]
    fn sign_sets_the_signing_headers() {
        let (_, _, headers) = signed(&creds(), Payload::Body(BODY));
        assert_eq!(headers[X_SDK_DATE], NOW);
        assert!(!headers.contains_key(X_SECURITY_TOKEN));
        assert!(!headers.contains_key(X_SDK_CONTENT_SHA256));
        let auth = parse_authorization(headers[header::AUTHORIZATION].to_str().unwrap()).unwrap();
        assert_eq!(auth.access_key, AK);
        assert_eq!(
            auth.signed_headers,
            names(&["content-type", "host", "x-project-id", "x-sdk-date"])
        );
        assert!(headers[header::AUTHORIZATION].is_sensitive());

        let token = Credentials::new(AK, SK, Some("sts-token")).unwrap();
        let (_, _, headers) = signed(&token, Payload::Unsigned);
        assert_eq!(headers[X_SECURITY_TOKEN], "sts-token");
        assert_eq!(headers[X_SDK_CONTENT_SHA256], UNSIGNED_PAYLOAD);
        let auth = parse_authorization(headers[header::AUTHORIZATION].to_str().unwrap()).unwrap();
        assert_eq!(
            auth.signed_headers,
            names(&[
                "content-type",
                "host",
                "x-project-id",
                "x-sdk-content-sha256",
                "x-sdk-date",
                "x-security-token"
            ])
        );
    }

    #[test]
    fn round_trips() {
        let now = date(NOW);
        let plain = creds();
        let (method, uri, headers) = signed(&plain, Payload::Body(BODY));
        let ok = check(&plain, &method, &uri, &headers, Payload::Body(BODY), now).unwrap();
        assert!(ok.payload_signed);
        assert_eq!(ok.access_key, AK);

        let token = Credentials::new("TMPAK", SK, Some("sts-token")).unwrap();
        let (method, uri, headers) = signed(&token, Payload::Unsigned);
        let ok = check(&token, &method, &uri, &headers, Payload::Unsigned, now).unwrap();
        assert!(!ok.payload_signed);
        // An unsigned payload may be any body.
        assert!(check(
            &token,
            &method,
            &uri,
            &headers,
            Payload::Body(b"other"),
            now
        )
        .is_ok());

        let (method, uri, headers) = signed(&plain, Payload::Body(b""));
        assert!(check(&plain, &method, &uri, &headers, Payload::Body(b""), now).is_ok());

        // Inside the window either way, the boundary included.
        for offset in [Duration::ZERO, MAX_SKEW, Duration::from_secs(60)] {
            let (method, uri, headers) = signed(&plain, Payload::Body(BODY));
            assert!(check(
                &plain,
                &method,
                &uri,
                &headers,
                Payload::Body(BODY),
                now + offset
            )
            .is_ok());
            assert!(check(
                &plain,
                &method,
                &uri,
                &headers,
                Payload::Body(BODY),
                now - offset
            )
            .is_ok());
        }
    }

    #[test]
    fn tampering_is_refused() {
        let plain = creds();
        let now = date(NOW);
        let (method, uri, headers) = signed(&plain, Payload::Body(BODY));
        let run = |method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8], now| {
            check(&plain, method, uri, headers, Payload::Body(body), now)
        };
        let with = |edit: &dyn Fn(&mut HeaderMap)| {
            let mut h = headers.clone();
            edit(&mut h);
            h
        };
        let uri_of = |s: &str| s.parse::<Uri>().unwrap();
        let sixteen_min = Duration::from_secs(16 * 60);
        let bad = Err(VerifyError::BadSignature);

        assert_eq!(
            run(&method, &uri, &headers, b"{\"snapshot\":{}}", now),
            bad,
            "body"
        );
        assert_eq!(run(&Method::PUT, &uri, &headers, BODY, now), bad, "method");
        let path = uri_of("/v3/0123abcd/snapshots/other?metadata=a%20b&limit=10&limit=2");
        assert_eq!(run(&method, &path, &headers, BODY, now), bad, "path");
        let query = uri_of("/v3/0123abcd/snapshots/%E5%BF%AB%E7%85%A7?metadata=a%20b&limit=10");
        assert_eq!(run(&method, &query, &headers, BODY, now), bad, "query");
        let project = with(&|h| {
            h.insert("x-project-id", HeaderValue::from_static("other"));
        });
        assert_eq!(
            run(&method, &uri, &project, BODY, now),
            bad,
            "signed header"
        );
        let added = with(&|h| {
            h.append("x-project-id", HeaderValue::from_static("second"));
        });
        assert_eq!(
            run(&method, &uri, &added, BODY, now),
            bad,
            "second value of a signed header"
        );
        let stamp = with(&|h| {
            h.insert(X_SDK_DATE, HeaderValue::from_static("20240229T120001Z"));
        });
        assert_eq!(run(&method, &uri, &stamp, BODY, now), bad, "date");
        let declared = with(&|h| {
            h.insert(
                X_SDK_CONTENT_SHA256,
                HeaderValue::from_static(UNSIGNED_PAYLOAD),
            );
        });
        assert_eq!(
            run(&method, &uri, &declared, b"evil", now),
            bad,
            "payload declared unsigned"
        );
        let hashed = with(&|h| {
            h.insert(
                X_SDK_CONTENT_SHA256,
                HeaderValue::from_str(&sha256_hex(b"evil")).unwrap(),
            );
        });
        assert_eq!(
            run(&method, &uri, &hashed, BODY, now),
            bad,
            "declared hash of another body"
        );
        let other_secret = Credentials::new(AK, "other", None).unwrap();
        assert_eq!(
            check(
                &other_secret,
                &method,
                &uri,
                &headers,
                Payload::Body(BODY),
                now
            ),
            bad,
            "secret"
        );

        // Unsigned headers may change.
        let unsigned = with(&|h| {
            h.insert("user-agent", HeaderValue::from_static("other"));
            h.insert("x-new", HeaderValue::from_static("1"));
        });
        assert!(run(&method, &uri, &unsigned, BODY, now).is_ok());

        assert_eq!(
            run(&method, &uri, &headers, BODY, now + sixteen_min),
            Err(VerifyError::ClockSkew(sixteen_min))
        );
        assert_eq!(
            run(&method, &uri, &headers, BODY, now - sixteen_min),
            Err(VerifyError::ClockSkew(sixteen_min))
        );
        let removed = with(&|h| {
            h.remove("x-project-id");
        });
        assert_eq!(
            run(&method, &uri, &removed, BODY, now),
            Err(VerifyError::MissingSignedHeader(HeaderName::from_static(
                "x-project-id"
            )))
        );
        let no_auth = with(&|h| {
            h.remove(header::AUTHORIZATION);
        });
        assert_eq!(
            run(&method, &uri, &no_auth, BODY, now),
            Err(VerifyError::MissingAuthorization)
        );
        let no_date = with(&|h| {
            h.remove(X_SDK_DATE);
        });
        assert_eq!(
            run(&method, &uri, &no_date, BODY, now),
            Err(VerifyError::MissingDate)
        );
        let bad_date = with(&|h| {
            h.insert(X_SDK_DATE, HeaderValue::from_static("2024-02-29T12:00:00Z"));
        });
        assert_eq!(
            run(&method, &uri, &bad_date, BODY, now),
            Err(VerifyError::Malformed(ParseError::Date(X_SDK_DATE)))
        );
        let two_auth = with(&|h| {
            h.append(header::AUTHORIZATION, HeaderValue::from_static("x"));
        });
        assert_eq!(
            run(&method, &uri, &two_auth, BODY, now),
            Err(VerifyError::Malformed(ParseError::Repeated(
                header::AUTHORIZATION
            )))
        );
        assert_eq!(
            verify(
                |_| None,
                &method,
                &uri,
                &headers,
                Payload::Body(BODY),
                now,
                MAX_SKEW
            ),
            Err(VerifyError::UnknownAccessKey(AK.to_owned()))
        );
        assert_eq!(
            check(&plain, &method, &uri, &headers, Payload::Unsigned, now),
            Err(VerifyError::BodyNeeded)
        );
    }

    /// For an empty body the Python SDK signs the empty body's hash even when it has set
    /// `X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD` (a non-JSON Content-Type); Go and Java sign
    /// `UNSIGNED-PAYLOAD`. Both are accepted.
    #[test]
    fn empty_unsigned_body_either_way() {
        let plain = creds();
        let uri: Uri = "/v3/p/snapshots/s1".parse().unwrap();
        let mut headers = header_map(&[
            ("Host", "evs.example.com"),
            ("X-Sdk-Date", NOW),
            ("Content-Type", "application/octet-stream"),
            ("X-Sdk-Content-Sha256", UNSIGNED_PAYLOAD),
        ]);
        let list = names(&["content-type", "host", "x-sdk-content-sha256", "x-sdk-date"]);
        for hash in [EMPTY_BODY_SHA256, UNSIGNED_PAYLOAD] {
            let canonical = canonical_request(&Method::DELETE, &uri, &headers, &list, hash);
            let auth = format!(
                "{ALGORITHM} Access={AK}, SignedHeaders={}, Signature={}",
                "content-type;host;x-sdk-content-sha256;x-sdk-date",
                signature(plain.secret(), NOW, &canonical)
            );
            headers.insert(header::AUTHORIZATION, auth.parse().unwrap());
            let now = date(NOW);
            let ok = check(
                &plain,
                &Method::DELETE,
                &uri,
                &headers,
                Payload::Body(b""),
                now,
            );
            assert_eq!(ok.map(|v| v.payload_signed), Ok(false), "{hash}");
            // Without the body at hand, only UNSIGNED-PAYLOAD itself is tried.
            let blind = check(
                &plain,
                &Method::DELETE,
                &uri,
                &headers,
                Payload::Unsigned,
                now,
            );
            assert_eq!(blind.is_ok(), hash == UNSIGNED_PAYLOAD, "{hash}");
        }
    }
}
