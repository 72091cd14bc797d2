//! An attacker's table: every spelling of a request that could make the upstream store a
//! reserved snapshot name, or a field over the limit, or see something other than what
//! snapguard policed. Each case is sent as raw bytes (or over HTTP/2) through the real proxy,
//! and each asserts what the upstream received.

// Tests fail by panicking; the no-unwrap rule is for the request path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use http::{StatusCode, Version};
use snapguard::policy::is_python_space;
use support::{raw, send, Reply, Seen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESERVED: &str = r#"{"snapshot":{"name":"autobk_snapshot_x"}}"#;
const FINE: &str = r#"{"snapshot":{"name":"snap-001"}}"#;
const NAME_ROOTS: [&str; 3] = ["snapshot", "group_snapshot", "cgsnapshot"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Refused with this status; the upstream hears nothing.
    Refused(u16),
    /// Forwarded: the upstream hears exactly one request.
    Forwarded,
}
use Expect::{Forwarded, Refused};

/// A request as raw bytes, with Content-Length and `Connection: close`.
fn req(method: &str, target: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{method} {target} HTTP/1.1\r\nHost: snapguard.test\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn put(target: &str, body: &str) -> Vec<u8> {
    req("PUT", target, "", body.as_bytes())
}

fn put_h(headers: &str, body: &str) -> Vec<u8> {
    req("PUT", "/v3/p1/snapshots/s1", headers, body.as_bytes())
}

/// A chunked request, one chunk per slice, with optional trailers.
fn chunked(target: &str, chunks: &[&[u8]], trailers: &str) -> Vec<u8> {
    let mut out = format!(
        "PUT {target} HTTP/1.1\r\nHost: snapguard.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in chunks {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("0\r\n{trailers}\r\n").as_bytes());
    out
}

fn one_byte_chunks(body: &[u8]) -> Vec<&[u8]> {
    body.chunks(1).collect()
}

fn named(json_name: &str) -> String {
    format!(r#"{{"snapshot":{{"name":"{json_name}"}}}}"#)
}

/// Walks every member (duplicates included) of the snapshot objects of a body the upstream
/// received, and fails if a name would be stored with a reserved prefix or a field is too long.
fn assert_stored_safely(seen: &Seen) {
    let Ok(text) = std::str::from_utf8(&seen.body) else {
        return;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    // Passthrough traffic (not a snapshot route) is not the policy's business.
    let target = seen.target.to_ascii_lowercase();
    if !target.contains("snapshot") {
        return;
    }
    assert!(
        snapguard::policy::json::validate(text).is_ok(),
        "the upstream received a body with duplicate keys or worse: {text}"
    );
    for root in NAME_ROOTS {
        let Some(fields) = value.get(root).and_then(|v| v.as_object()) else {
            continue;
        };
        for (key, v) in fields {
            let Some(s) = v.as_str() else { continue };
            if ["name", "display_name"].contains(&key.as_str()) {
                let stored = s.trim_start_matches(is_python_space);
                assert!(
                    !stored.starts_with("autobk_snapshot_"),
                    "reserved name reached the upstream: {text}"
                );
            }
            if ["name", "display_name", "description", "display_description"]
                .contains(&key.as_str())
            {
                assert!(
                    s.len() <= 255,
                    "over-long field reached the upstream: {text:.100}"
                );
            }
        }
    }
}

/// The final status of a raw response (interim 1xx responses skipped).
fn status_of(response: &str) -> u16 {
    response
        .match_indices("HTTP/1.")
        .filter_map(|(i, _)| response.get(i + 9..i + 12)?.parse().ok())
        .find(|status| *status >= 200)
        .unwrap_or(0)
}

/// Runs every case against one proxy, checking the upstream after each.
async fn run(cases: Vec<(&str, Vec<u8>, Expect)>) {
    let (upstream, proxy) = support::pair(Reply::Ok, "[timeouts]\nrequest_body = \"2s\"\n").await;
    let mut failures = Vec::new();
    for (name, request, expect) in &cases {
        let before = upstream.seen().len();
        let response = raw(proxy.addr, request, Duration::from_secs(5)).await;
        let seen = upstream.seen();
        let new = &seen[before..];
        for s in new {
            assert_stored_safely(s);
        }
        let status = status_of(&response);
        let ok = match expect {
            Refused(want) => status == *want && new.is_empty(),
            Forwarded => status == 200 && new.len() == 1,
        };
        if !ok {
            failures.push(format!(
                "{name}: expected {expect:?}, got status {status} with {} upstream request(s): {:.200}",
                new.len(),
                response
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn path_spellings() {
    run(vec![
        (
            "baseline",
            put("/v3/p1/snapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "encoded letter",
            put("/v3/p1/%73napshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "encoded version",
            put("/%76%33/p1/snapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "lowercase escape",
            put("/v3/p1/%73%6e%61%70shots/s1", RESERVED),
            Refused(400),
        ),
        (
            "mixed case",
            put("/V3/p1/SnApShOtS/s1", RESERVED),
            Refused(400),
        ),
        (
            "encoded slash",
            put("/v3/p1%2Fsnapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "encoded slash lowercase",
            put("/v3/p1%2fsnapshots/s1", FINE),
            Refused(400),
        ),
        (
            "encoded slash in id",
            put("/v3/p1/snapshots/s%2F1", FINE),
            Refused(400),
        ),
        (
            "encoded backslash",
            put("/v3/p1%5Csnapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "double-encoded letter",
            put("/v3/p1/%2573napshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "double-encoded slash",
            put("/v3/p1%252Fsnapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "dot dot",
            put("/v3/p1/x/../snapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "encoded dot dot",
            put("/v3/p1/x/%2e%2e/snapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "half-encoded dot dot",
            put("/v3/p1/x/.%2E/snapshots/s1", RESERVED),
            Refused(400),
        ),
        ("dot", put("/v3/p1/./snapshots/s1", RESERVED), Refused(400)),
        (
            "dot dot as project",
            put("/v3/../snapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "dot dot with params",
            put("/v3/p1/x/..;/snapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "leading double slash",
            put("//v3/p1/snapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "inner double slashes",
            put("/v3//p1///snapshots//s1", RESERVED),
            Refused(400),
        ),
        (
            "trailing slash",
            put("/v3/p1/snapshots/s1/", RESERVED),
            Refused(400),
        ),
        (
            "params on a segment",
            put("/v3/p1/snapshots;v=1/s1", RESERVED),
            Refused(400),
        ),
        (
            "params on the id",
            put("/v3/p1/snapshots/s1;jsessionid=a", RESERVED),
            Refused(400),
        ),
        (
            "encoded params",
            put("/v3/p1/snapshots%3Bx/s1", RESERVED),
            Refused(400),
        ),
        (
            "id that is all params",
            put("/v3/p1/snapshots/;x", RESERVED),
            Refused(400),
        ),
        (
            "id that starts with an encoded ;",
            put("/v3/p1/snapshots/%3Bx", RESERVED),
            Refused(400),
        ),
        (
            "raw params on literals, an encoded ; as the id",
            put("/v3;a/p1/snapshots;b/%3B", RESERVED),
            Refused(400),
        ),
        (
            "query",
            put("/v3/p1/snapshots/s1?x=1", RESERVED),
            Refused(400),
        ),
        (
            "format suffix",
            req("POST", "/v3/p1/snapshots.json", "", RESERVED.as_bytes()),
            Refused(400),
        ),
        (
            "absolute form",
            put("http://evs.example.com/v3/p1/snapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "absolute form, encoded",
            put("http://evs.example.com/v3/p1/%73napshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "project-less",
            put("/v3/snapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "group snapshot",
            req(
                "POST",
                "/v3/p1/group_snapshots",
                "",
                br#"{"group_snapshot":{"group_id":"g","name":"autobk_snapshot_x"}}"#,
            ),
            Refused(400),
        ),
        ("not a route", put("/v3/p1/volumes/v1", RESERVED), Forwarded),
        ("allowed name", put("/v3/p1/snapshots/s1", FINE), Forwarded),
    ])
    .await;
}

/// The three classes Cinder's own router was found to read differently (a final newline, a
/// Unicode `_method`, project-less twins of every route), and what looser readers might make
/// of control characters, on Cinder and EVS routes alike.
#[tokio::test]
async fn spellings_python_routers_read_loosely() {
    let post = |target: &str, body: &str| req("POST", target, "", body.as_bytes());
    let cg = r#"{"cgsnapshot":{"consistencygroup_id":"c","name":"autobk_snapshot_x"}}"#;
    let group = r#"{"snapshot_group":{"name":"autobk_snapshot_x"}}"#;
    run(vec![
        (
            "final newline",
            post("/v3/ab12/snapshots%0A", RESERVED),
            Refused(400),
        ),
        (
            "final newline, lower",
            post("/v3/ab12/snapshots%0a", RESERVED),
            Refused(400),
        ),
        (
            "final newline, project-less",
            post("/v3/snapshots%0A", RESERVED),
            Refused(400),
        ),
        (
            "final newline, manage",
            post("/v3/ab12/os-snapshot-manage%0A", RESERVED),
            Refused(400),
        ),
        (
            "final newline, cgsnapshots",
            post("/v3/ab12/cgsnapshots%0A", cg),
            Refused(400),
        ),
        (
            "_method with U+017F",
            req(
                "GET",
                "/v3/ab12/snapshots?_method=po%C5%BFt",
                "",
                RESERVED.as_bytes(),
            ),
            Refused(400),
        ),
        (
            "_method with U+FB05",
            req(
                "GET",
                "/v3/ab12/snapshots?_method=po%EF%AC%85",
                "",
                RESERVED.as_bytes(),
            ),
            Refused(400),
        ),
        (
            "_method with invalid UTF-8",
            req(
                "GET",
                "/v3/ab12/snapshots?_method=PO%FFST",
                "",
                RESERVED.as_bytes(),
            ),
            Refused(400),
        ),
        (
            "project-less manage",
            post("/v3/os-snapshot-manage", RESERVED),
            Refused(400),
        ),
        (
            "project-less manage .json",
            post("/v3/os-snapshot-manage.json", RESERVED),
            Refused(400),
        ),
        (
            "project-less cgsnapshots",
            post("/v3/cgsnapshots", cg),
            Refused(400),
        ),
        (
            "EVS v5 create",
            post("/v5/p1/snapshots", RESERVED),
            Refused(400),
        ),
        (
            "EVS v5 group create",
            post("/v5/p1/snapshot-groups", group),
            Refused(400),
        ),
        (
            "EVS v5 group update",
            req("PUT", "/v5/p1/snapshot-groups/g1", "", group.as_bytes()),
            Refused(400),
        ),
        (
            "EVS tab",
            post("/v2/p1/cloudsnapshots%09", RESERVED),
            Refused(400),
        ),
        (
            "EVS NUL",
            put("/v5/p1/snapshots%00/s1", RESERVED),
            Refused(400),
        ),
        (
            "EVS unit separator",
            put("/v5%1F/p1/snapshots/s1", RESERVED),
            Refused(400),
        ),
        (
            "EVS vertical tab",
            post("/v2/p1/%0Bcloudsnapshots", RESERVED),
            Refused(400),
        ),
        (
            "EVS no-break space",
            post("/v2/p1/cloudsnapshots%C2%A0", RESERVED),
            Refused(400),
        ),
        // Still forwarded: a newline in an id is data, and other routes are not policed.
        (
            "allowed name, newline id",
            put("/v3/p1/snapshots/s1%0A", FINE),
            Forwarded,
        ),
        (
            "not a route, newline",
            post("/v3/p1/volumes%0A", RESERVED),
            Forwarded,
        ),
        (
            "not a route, Unicode _method",
            req(
                "GET",
                "/v3/p1/volumes?_method=po%C5%BFt",
                "",
                RESERVED.as_bytes(),
            ),
            Forwarded,
        ),
    ])
    .await;
}

#[tokio::test]
async fn method_spellings() {
    let post = |headers: &str, target: &str| req("POST", target, headers, RESERVED.as_bytes());
    run(vec![
        (
            "override header",
            post("X-HTTP-Method-Override: PUT\r\n", "/v3/p1/snapshots/s1"),
            Refused(400),
        ),
        (
            "override lowercase",
            post("x-http-method-override: put\r\n", "/v3/p1/snapshots/s1"),
            Refused(400),
        ),
        (
            "override shouting",
            post("X-HTTP-METHOD-OVERRIDE: pUt\r\n", "/v3/p1/snapshots/s1"),
            Refused(400),
        ),
        (
            "x-http-method",
            post("X-HTTP-Method: PUT\r\n", "/v3/p1/snapshots/s1"),
            Refused(400),
        ),
        (
            "x-method-override",
            post("X-Method-Override: PUT\r\n", "/v3/p1/snapshots/s1"),
            Refused(400),
        ),
        (
            "override list",
            post(
                "X-HTTP-Method-Override: GET, PUT\r\n",
                "/v3/p1/snapshots/s1",
            ),
            Refused(400),
        ),
        (
            "query _method",
            post("", "/v3/p1/snapshots/s1?_method=PUT"),
            Refused(400),
        ),
        (
            "query _method encoded",
            post("", "/v3/p1/snapshots/s1?%5Fmethod=p%75t"),
            Refused(400),
        ),
        (
            "lowercase method",
            req("put", "/v3/p1/snapshots/s1", "", RESERVED.as_bytes()),
            Refused(400),
        ),
        (
            "override on GET",
            req(
                "GET",
                "/v3/p1/snapshots/s1",
                "X-HTTP-Method-Override: PUT\r\n",
                RESERVED.as_bytes(),
            ),
            Refused(400),
        ),
    ])
    .await;
}

#[tokio::test]
async fn json_spellings() {
    let deep = format!(
        r#"{{"snapshot":{{"name":"a","metadata":{}{}}}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    run(vec![
        ("escaped key", put_h("", r#"{"snapshot":{"n\u0061me":"autobk_snapshot_x"}}"#), Refused(400)),
        ("escaped root key", put_h("", r#"{"\u0073napshot":{"name":"autobk_snapshot_x"}}"#), Refused(400)),
        ("escaped legacy key", put_h("", r#"{"snapshot":{"display\u005fname":"autobk_snapshot_x"}}"#), Refused(400)),
        ("escaped value", put_h("", &named(r"\u0061utobk_snapshot_x")), Refused(400)),
        ("all escaped", put_h("", &named(r"\u0061\u0075\u0074\u006f\u0062\u006b\u005f\u0073\u006e\u0061\u0070\u0073\u0068\u006f\u0074\u005fx")), Refused(400)),
        ("duplicate name", put_h("", r#"{"snapshot":{"name":"ok","name":"autobk_snapshot_x"}}"#), Refused(400)),
        ("duplicate by escape", put_h("", r#"{"snapshot":{"name":"ok","n\u0061me":"autobk_snapshot_x"}}"#), Refused(400)),
        ("duplicate root", put_h("", r#"{"snapshot":{"name":"ok"},"snapshot":{"name":"autobk_snapshot_x"}}"#), Refused(400)),
        ("duplicate deep", put_h("", r#"{"snapshot":{"name":"ok","metadata":{"a":{"b":1,"b":2}}}}"#), Refused(400)),
        ("bom", put_h("", &format!("\u{feff}{RESERVED}")), Refused(400)),
        ("trailing garbage", put_h("", &format!("{FINE}x")), Refused(400)),
        ("two documents", put_h("", &format!("{FINE}{RESERVED}")), Refused(400)),
        ("comment", put_h("", &format!("/* c */{FINE}")), Refused(400)),
        ("lone surrogate", put_h("", &named(r"\ud800autobk_snapshot_x")), Refused(400)),
        ("lone low surrogate", put_h("", &named(r"x\udc00")), Refused(400)),
        ("raw control character", put_h("", &named("\tautobk_snapshot_x")), Refused(400)),
        ("nul first is not stripped", put_h("", &named(r"\u0000autobk_snapshot_x")), Forwarded),
        ("deep nesting", put_h("", &deep), Refused(400)),
        ("huge number", put_h("", r#"{"snapshot":{"name":"a","size":1e400}}"#), Refused(400)),
        ("big integer kept", put_h("", r#"{"snapshot":{"name":"a","size":123456789012345678901234567890}}"#), Forwarded),
        ("name not a string", put_h("", r#"{"snapshot":{"name":["autobk_snapshot_x"]}}"#), Refused(400)),
        ("name object", put_h("", r#"{"snapshot":{"name":{"autobk_snapshot_x":1}}}"#), Refused(400)),
        ("snapshot array", put_h("", r#"{"snapshot":[{"name":"autobk_snapshot_x"}]}"#), Refused(400)),
        ("root array", put_h("", &format!("[{RESERVED}]")), Refused(400)),
        ("invalid utf-8", req("PUT", "/v3/p1/snapshots/s1", "", b"{\"snapshot\":{\"name\":\"\xff\"}}"), Refused(400)),
        ("overlong utf-8", req("PUT", "/v3/p1/snapshots/s1", "", b"{\"snapshot\":{\"name\":\"\xc1\xa1utobk_snapshot_x\"}}"), Refused(400)),
        ("256 bytes by escapes", put_h("", &named(&r"\u00e9".repeat(128))), Refused(400)),
        ("case differs", put_h("", &named("AUTOBK_SNAPSHOT_x")), Forwarded),
    ])
    .await;
}

#[tokio::test]
async fn every_character_python_strips_raw_and_escaped() {
    let python: Vec<char> = (0..=0x10ffff_u32)
        .filter_map(char::from_u32)
        .filter(|c| is_python_space(*c))
        .collect();
    assert_eq!(python.len(), 29);
    let mut cases = Vec::new();
    let names: Vec<(String, String)> = python
        .iter()
        .flat_map(|c| {
            let escaped = format!("\\u{:04x}autobk_snapshot_x", u32::from(*c));
            // Raw control characters are not valid JSON; they are refused either way.
            let raw = format!("{c}autobk_snapshot_x");
            [
                (format!("escaped U+{:04X}", u32::from(*c)), escaped),
                (format!("raw U+{:04X}", u32::from(*c)), raw),
            ]
        })
        .collect();
    for (label, name) in &names {
        cases.push((label.as_str(), put_h("", &named(name)), Refused(400)));
    }
    run(cases).await;
}

#[tokio::test]
async fn header_spellings() {
    let ct = |v: &str| format!("Content-Type: {v}\r\n");
    run(vec![
        ("no content type", put_h("", RESERVED), Refused(400)),
        (
            "json",
            put_h(&ct("application/json"), RESERVED),
            Refused(400),
        ),
        (
            "+json",
            put_h(&ct("application/vnd.openstack.volume+json"), RESERVED),
            Refused(400),
        ),
        (
            "charset utf-16",
            put_h(&ct("application/json; charset=utf-16"), FINE),
            Refused(415),
        ),
        (
            "duplicated charset",
            put_h(&ct("application/json; charset=utf-8; charset=utf-16"), FINE),
            Refused(415),
        ),
        (
            "a list of types",
            put_h(&ct("application/json, text/plain"), FINE),
            Refused(415),
        ),
        (
            "two content types",
            put_h(
                &format!("{}{}", ct("application/json"), ct("text/plain")),
                FINE,
            ),
            Refused(415),
        ),
        (
            "form",
            put_h(&ct("application/x-www-form-urlencoded"), FINE),
            Refused(415),
        ),
        (
            "gzip",
            put_h("Content-Encoding: gzip\r\n", FINE),
            Refused(415),
        ),
        (
            "GZIP",
            put_h("Content-Encoding: GZIP\r\n", FINE),
            Refused(415),
        ),
        ("br", put_h("Content-Encoding: br\r\n", FINE), Refused(415)),
        (
            "identity then gzip",
            put_h("Content-Encoding: identity, gzip\r\n", FINE),
            Refused(415),
        ),
        (
            "claims identity, sends gzip",
            req(
                "PUT",
                "/v3/p1/snapshots/s1",
                "Content-Encoding: identity\r\n",
                b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03",
            ),
            Refused(400),
        ),
        (
            "identity",
            put_h("Content-Encoding: identity\r\n", FINE),
            Forwarded,
        ),
    ])
    .await;
}

#[tokio::test]
async fn framing_spellings() {
    let escape_split: [&[u8]; 2] = [br#"{"snapshot":{"name":"\u00"#, br#"61utobk_snapshot_x"}}"#];
    let ideographic = "{\"snapshot\":{\"name\":\"\u{3000}autobk_snapshot_x\"}}"
        .as_bytes()
        .to_vec();
    let cut = ideographic.iter().position(|b| *b == 0xe3).unwrap() + 1;
    let (utf8_a, utf8_b) = ideographic.split_at(cut);
    let mut http10 = put("/v3/p1/snapshots/s1", RESERVED);
    http10.splice(
        0..http10.iter().position(|b| *b == b'\r').unwrap(),
        b"PUT /v3/p1/snapshots/s1 HTTP/1.0".iter().copied(),
    );
    run(vec![
        (
            "one byte per chunk",
            chunked(
                "/v3/p1/snapshots/s1",
                &one_byte_chunks(RESERVED.as_bytes()),
                "",
            ),
            Refused(400),
        ),
        (
            "chunk inside an escape",
            chunked("/v3/p1/snapshots/s1", &escape_split, ""),
            Refused(400),
        ),
        (
            "chunk inside a UTF-8 character",
            chunked("/v3/p1/snapshots/s1", &[utf8_a, utf8_b], ""),
            Refused(400),
        ),
        (
            "trailers",
            chunked(
                "/v3/p1/snapshots/s1",
                &[RESERVED.as_bytes()],
                "X-Trailer: 1\r\n",
            ),
            Refused(400),
        ),
        (
            "chunk extensions",
            {
                let mut r = chunked("/v3/p1/snapshots/s1", &[], "");
                let head_end = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                r.truncate(head_end);
                r.extend_from_slice(
                    format!("{:x};ext=1\r\n{RESERVED}\r\n0\r\n\r\n", RESERVED.len()).as_bytes(),
                );
                r
            },
            Refused(400),
        ),
        (
            "expect 100-continue",
            put_h("Expect: 100-continue\r\n", RESERVED),
            Refused(400),
        ),
        ("http/1.0", http10, Refused(400)),
        (
            "fine, chunked",
            chunked("/v3/p1/snapshots/s1", &one_byte_chunks(FINE.as_bytes()), ""),
            Forwarded,
        ),
    ])
    .await;
}

#[tokio::test]
async fn expect_continue_gets_its_answer_before_the_body_is_sent() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        RESERVED.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    stream.write_all(RESERVED.as_bytes()).await.unwrap();
    let mut rest = String::new();
    stream.read_to_string(&mut rest).await.unwrap();
    assert!(rest.contains("HTTP/1.1 400"), "{rest}");
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn pipelined_requests_are_each_policed() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let mut pipeline = b"GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    pipeline.extend(req("PUT", "/v3/p1/snapshots/s1", "", RESERVED.as_bytes()));
    let response = raw(proxy.addr, &pipeline, Duration::from_secs(5)).await;
    let statuses: Vec<&str> = response.matches("HTTP/1.1 ").map(|_| "").collect();
    assert_eq!(statuses.len(), 2, "{response}");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("HTTP/1.1 400"), "{response}");
    let seen = upstream.only();
    assert_eq!(seen.method, "GET");
}

#[tokio::test]
async fn http2_requests_are_policed_the_same_way() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    for (path, body, headers, want) in [
        ("/v3/p1/snapshots/s1", RESERVED, vec![], 400),
        ("/V3/p1/%73napshots/s1/", RESERVED, vec![], 400),
        ("/v3/p1/x/../snapshots/s1", RESERVED, vec![], 400),
        (
            "/v3/p1/snapshots/s1",
            r#"{"snapshot":{"n\u0061me":"autobk_snapshot_x"}}"#,
            vec![],
            400,
        ),
        (
            "/v3/p1/snapshots/s1",
            r#"{"snapshot":{"name":"ok","name":"autobk_snapshot_x"}}"#,
            vec![],
            400,
        ),
        (
            "/v3/p1/snapshots/s1",
            &named(r"\u3000autobk_snapshot_x"),
            vec![],
            400,
        ),
        (
            "/v3/p1/snapshots/s1",
            FINE,
            vec![("content-encoding", "gzip")],
            415,
        ),
        (
            "/v3/p1/snapshots/s1",
            RESERVED,
            vec![("x-http-method-override", "PUT")],
            400,
        ),
        ("/v5%1F/p1/snapshots/s1", RESERVED, vec![], 400),
        ("/v3/snapshots/s1", RESERVED, vec![], 400),
        ("/v5/p1/snapshots%00/s1", RESERVED, vec![], 400),
    ] {
        let got = send(
            Version::HTTP_2,
            "PUT",
            &proxy.url(path),
            &headers,
            body.to_owned(),
        )
        .await;
        assert_eq!(got.status.as_u16(), want, "{path} {body}");
    }
    let got = send(
        Version::HTTP_2,
        "POST",
        &proxy.url("/v3/p1/snapshots/s1?_method=PUT"),
        &[],
        RESERVED,
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    for (method, path) in [
        ("POST", "/v3/ab12/snapshots%0A"),
        ("GET", "/v3/ab12/snapshots?_method=po%C5%BFt"),
    ] {
        let got = send(Version::HTTP_2, method, &proxy.url(path), &[], RESERVED).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{method} {path}");
    }
    assert!(upstream.seen().is_empty());
}

/// Raw-socket request smuggling: each case says how many requests the upstream may see.
/// Whatever the framing trick, the upstream sees only requests snapguard parsed and policed
/// itself, re-framed by its own client.
#[tokio::test]
async fn smuggling_attempts_never_reach_the_upstream_unpoliced() {
    let smuggled = req("PUT", "/v3/p1/snapshots/s9", "", RESERVED.as_bytes());
    let smuggled = String::from_utf8(smuggled).unwrap();
    let fine_len = FINE.len();
    let cases: Vec<(&str, String, usize)> = vec![
        (
            "content-length and chunked: chunked wins, the rest is not a request",
            format!(
                "PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{fine_len:x}\r\n{FINE}\r\n0\r\n\r\n{smuggled}"
            ),
            1,
        ),
        (
            "chunked and content-length, passthrough",
            format!(
                "POST /v3/p1/volumes/v1/action HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 200\r\n\r\n3\r\nabc\r\n0\r\n\r\n{smuggled}"
            ),
            1,
        ),
        (
            "content-length shorter than the body: the rest is a request of its own, and policed",
            format!("PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nContent-Length: {fine_len}\r\n\r\n{FINE}{smuggled}"),
            1,
        ),
        (
            "conflicting content-lengths",
            format!("PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nContent-Length: {fine_len}\r\nContent-Length: 4\r\n\r\n{FINE}{smuggled}"),
            0,
        ),
        (
            "duplicate equal content-lengths",
            format!(
                "PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nContent-Length: {fine_len}\r\nContent-Length: {fine_len}\r\nConnection: close\r\n\r\n{FINE}"
            ),
            1,
        ),
        (
            "content-length list",
            format!("PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nContent-Length: {fine_len}, 4\r\n\r\n{FINE}{smuggled}"),
            0,
        ),
        (
            "obs-fold header",
            format!("PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\nContent-Length: {fine_len}\r\n\r\n{FINE}"),
            0,
        ),
        (
            "obs-fold transfer-encoding",
            format!("PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: {fine_len}\r\n\r\n{FINE}"),
            0,
        ),
        (
            "bare LF line endings, reserved name",
            format!("PUT /v3/p1/snapshots/s1 HTTP/1.1\nHost: x\nContent-Length: {}\nConnection: close\n\n{RESERVED}", RESERVED.len()),
            0,
        ),
        (
            "transfer-encoding not ending in chunked",
            format!("PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n{fine_len:x}\r\n{FINE}\r\n0\r\n\r\n"),
            0,
        ),
        (
            "transfer-encoding xchunked",
            format!("PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: {fine_len}\r\n\r\n{FINE}"),
            0,
        ),
        (
            "invalid chunk size",
            "PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_owned(),
            0,
        ),
        (
            "space before the colon",
            format!("PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nContent-Length : {fine_len}\r\n\r\n{FINE}"),
            0,
        ),
        (
            "http/1.0 with transfer-encoding",
            format!("PUT /v3/p1/snapshots/s1 HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{fine_len:x}\r\n{FINE}\r\n0\r\n\r\n"),
            0,
        ),
    ];
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let mut failures = Vec::new();
    for (name, request, want) in &cases {
        let before = upstream.seen().len();
        let response = raw(proxy.addr, request.as_bytes(), Duration::from_secs(2)).await;
        let seen = upstream.seen();
        let new = &seen[before..];
        for s in new {
            assert_stored_safely(s);
            assert!(
                !s.target.contains("s9"),
                "{name}: the smuggled request reached the upstream"
            );
        }
        if new.len() != *want {
            failures.push(format!(
                "{name}: upstream saw {} request(s), expected {want}: {response:.300}",
                new.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn an_oversized_policed_body_is_refused_before_it_is_all_sent() {
    // The proxy answers 413 while the client is still sending: it never holds more than the
    // limit of a policed body.
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"PUT /v3/p1/snapshots/s1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024, "a".repeat(16 * 1024));
    for _ in 0..5 {
        stream.write_all(chunk.as_bytes()).await.unwrap();
    }
    // 80 KiB sent of a body that would go on for ever: the answer must already be there.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(upstream.seen().is_empty());
}

/// A chunked POST of `chunks`, sent in one write; `Connection: close` when `close`.
fn chunked_post(target: &str, chunks: impl Iterator<Item = Vec<u8>>, close: bool) -> Vec<u8> {
    let close = if close { "Connection: close\r\n" } else { "" };
    let mut out = format!(
        "POST {target} HTTP/1.1\r\nHost: snapguard.test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n{close}\r\n"
    )
    .into_bytes();
    for chunk in chunks {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(&chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test]
async fn framing_no_client_sends_is_refused_before_it_reaches_the_upstream() {
    // 2,000 one-byte chunks: past the 1,024 free frames, averaging 1 byte. Refused, 400 in the
    // route's style, the connection closed, counted; nothing reaches the upstream.
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let policed = format!(
        r#"{{"snapshot":{{"name":"ok","description":"{}"}}}}"#,
        "d".repeat(1960)
    );
    for (target, body) in [
        ("/v3/p1/volumes", vec![b'x'; 2000]),
        ("/v3/p1/snapshots", policed.into_bytes()),
        ("/v5/p1/snapshots", vec![b'y'; 2000]),
    ] {
        let request = chunked_post(target, body.iter().map(|b| vec![*b]), false);
        let response = support::raw(proxy.addr, &request, Duration::from_secs(5)).await;
        assert_eq!(status_of(&response), 400, "{target}: {response}");
        let error = if target.starts_with("/v5") {
            "\"error\""
        } else {
            "\"badRequest\""
        };
        assert!(response.contains(error), "{target}: {response}");
        assert!(
            response.contains("frames averaging under 32 bytes"),
            "{response}"
        );
        assert!(
            response.to_ascii_lowercase().contains("connection: close"),
            "{response}"
        );
    }
    assert!(upstream.seen().is_empty(), "{:#?}", upstream.seen());
    let metrics = String::from_utf8_lossy(&support::admin_get(proxy.admin, "/metrics").await.body)
        .into_owned();
    assert_eq!(
        support::sample(
            &metrics,
            r#"snapguard_peers_cut_total{reason="body_fragmented"}"#
        ),
        3.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn small_frames_reach_the_upstream_gathered_and_whole() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    // Ordinary small chunks pass: 1,500 of 40 bytes (above the 32-byte average), read whole.
    let request = chunked_post(
        "/v3/p1/volumes",
        (0..1500).map(|i| vec![b'a' + (i % 26) as u8; 40]),
        true,
    );
    let response = support::raw(proxy.addr, &request, Duration::from_secs(5)).await;
    assert_eq!(status_of(&response), 200, "{response}");
    // Streamed (over the 64 KiB read whole first): 256 KiB in 2,048 chunks of 128 bytes, sent
    // in one write. The upstream gets them gathered into a few large frames, not 2,048.
    let chunks = (0..2048u64).map(|i| {
        (0..128)
            .map(|j| support::pattern_byte(i * 128 + j))
            .collect()
    });
    let request = chunked_post("/v3/p1/volumes", chunks, true);
    let response = support::raw(proxy.addr, &request, Duration::from_secs(10)).await;
    assert_eq!(status_of(&response), 200, "{response}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body.len(), 60_000);
    support::assert_pattern(&seen[1].body, 256 * 1024);
    assert!(
        seen[1].frames <= 64,
        "256 KiB in 2,048 chunks reached the upstream in {} frames",
        seen[1].frames
    );
    eprintln!(
        "2,048 chunks of 128 bytes reached the upstream in {} frames",
        seen[1].frames
    );
}
