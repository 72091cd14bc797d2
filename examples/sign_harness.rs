//! Drives `snapguard::sign` for `tests/python/test_sign.py`, which compares it with the Huawei
//! Cloud SDK's own signer.
//!
//! Reads JSON lines on stdin, one request each as the SDK signed and sent it:
//! `{"ak", "sk", "token", "method", "uri", "headers": [[name, value], ...], "body_hex",
//! "payload": "body" | "unsigned"}`. Writes one JSON line per request:
//! - `verify`: "ok" or the error of `verify` on the request as it came (the SDK's signature);
//! - `tampered`: the same for the request with "x" added to its path (must be refused);
//! - `authorization`: the `Authorization` that `sign` writes for the request (signing every header
//!   present, `X-Sdk-Date` taken as `now`), and `canonical`, its canonical request.

use std::io::{BufRead, Write};

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde::Deserialize;
use snapguard::sign::{self, Credentials, Payload, SecretKey};

#[derive(Deserialize)]
struct Case {
    ak: String,
    sk: String,
    token: Option<String>,
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    body_hex: String,
    payload: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let case: Case = serde_json::from_str(&line?)?;
        let outcome = run(&case)?;
        writeln!(stdout, "{outcome}")?;
    }
    Ok(())
}

fn run(case: &Case) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let method: Method = case.method.parse()?;
    let uri: Uri = case.uri.parse()?;
    let mut headers = HeaderMap::new();
    for (name, value) in &case.headers {
        headers.append(
            HeaderName::from_bytes(name.as_bytes())?,
            HeaderValue::from_bytes(value.as_bytes())?,
        );
    }
    let body = decode_hex(&case.body_hex).ok_or("body_hex is not hex")?;
    let payload = match case.payload.as_str() {
        "unsigned" => Payload::Unsigned,
        _ => Payload::Body(&body),
    };
    let now = headers
        .get(sign::X_SDK_DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(sign::parse_date)
        .ok_or("no valid X-Sdk-Date")?;

    let secret = SecretKey::new(case.sk.as_bytes());
    let lookup = |ak: &str| (ak == case.ak).then_some(&secret);
    let verdict = |uri: &Uri| match sign::verify(
        lookup,
        &method,
        uri,
        &headers,
        Payload::Body(&body),
        now,
        sign::MAX_SKEW,
    ) {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    let verify = verdict(&uri);
    let tampered_uri: Uri = match uri.query() {
        Some(query) => format!("{}x?{query}", uri.path()),
        None => format!("{}x", uri.path()),
    }
    .parse()?;
    let tampered = verdict(&tampered_uri);

    let creds = Credentials::new(&case.ak, &case.sk, case.token.as_deref())?;
    let mut ours = headers.clone();
    ours.remove(header::AUTHORIZATION);
    let every: Vec<HeaderName> = ours.keys().cloned().collect();
    sign::sign(&creds, &method, &uri, &mut ours, payload, &every, now)?;
    let authorization = ours
        .get(header::AUTHORIZATION)
        .ok_or("sign set no Authorization")?
        .to_str()?
        .to_owned();
    let parsed = sign::parse_authorization(&authorization)?;
    let payload_hash = match payload {
        Payload::Unsigned => sign::UNSIGNED_PAYLOAD.to_owned(),
        Payload::Body(body) => {
            let digest = ring::digest::digest(&ring::digest::SHA256, body);
            digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    let canonical =
        sign::canonical_request(&method, &uri, &ours, &parsed.signed_headers, &payload_hash);

    Ok(serde_json::json!({
        "verify": verify,
        "tampered": tampered,
        "authorization": authorization,
        "canonical": String::from_utf8_lossy(&canonical),
    }))
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}
