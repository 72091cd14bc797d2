//! SPEC section 5, row by row, through the real proxy in front of a recording upstream.
//!
//! Every case asserts both what the downstream got and what the upstream received: the same
//! bytes for a body forwarded unchanged, the exact JSON for a normalized one, nothing at all for
//! a refused one.

// Tests fail by panicking; the no-unwrap rule is for the request path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{StatusCode, Version};
use support::{send, Reply, Seen, NOT_FOUND_BODY, OK_BODY};

const UPDATE: &str = "/v3/p1/snapshots/s1";

/// Sends one request through a fresh proxy and upstream; returns the response and what the
/// upstream saw.
async fn through(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (support::Got, Vec<Seen>) {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let got = send(
        Version::HTTP_11,
        method,
        &proxy.url(path),
        headers,
        body.to_owned(),
    )
    .await;
    assert!(
        got.headers.contains_key("x-request-id"),
        "every response carries X-Request-Id"
    );
    (got, upstream.seen())
}

async fn assert_forwarded_unchanged(method: &str, path: &str, body: &str) {
    let (got, seen) = through(method, path, &[], body).await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "{method} {path} {body}: {:?}",
        got.body
    );
    assert_eq!(got.body, OK_BODY);
    assert_eq!(seen.len(), 1, "{method} {path} {body}");
    assert_eq!(seen[0].method, method);
    assert_eq!(seen[0].target, path, "the path is forwarded as sent");
    assert_eq!(
        seen[0].body,
        body.as_bytes(),
        "{method} {path}: body forwarded byte for byte"
    );
}

async fn assert_normalized(body: &str, forwarded: &str) {
    let (got, seen) = through("PUT", UPDATE, &[], body).await;
    assert_eq!(got.status, StatusCode::OK, "{body}: {:?}", got.body);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, forwarded.as_bytes(), "{body}");
    assert_eq!(
        seen[0].headers["content-length"],
        forwarded.len().to_string().as_str()
    );
}

/// Asserts a refusal in Cinder's format, and that the upstream never heard of it.
async fn assert_refused(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    status: u16,
) -> String {
    let (got, seen) = through(method, path, headers, body).await;
    assert_eq!(
        got.status.as_u16(),
        status,
        "{method} {path} {body:.80}: {:?}",
        got.body
    );
    assert!(
        seen.is_empty(),
        "{method} {path} {body:.80}: the upstream must not be called, saw {seen:?}"
    );
    assert_eq!(got.headers["content-type"], "application/json");
    let fault = match status {
        400 => "badRequest",
        413 => "overLimit",
        415 => "badMediaType",
        _ => unreachable!(),
    };
    let json = got.json();
    assert_eq!(json[fault]["code"], status, "{json}");
    json[fault]["message"].as_str().unwrap().to_owned()
}

fn named(name: &str) -> String {
    format!(r#"{{"snapshot":{{"name":"{name}"}}}}"#)
}

#[tokio::test]
async fn an_ordinary_update_is_forwarded_unchanged() {
    assert_forwarded_unchanged(
        "PUT",
        UPDATE,
        r#"{"snapshot":{"name":"snap-001","description":"Daily backup"}}"#,
    )
    .await;
}

#[tokio::test]
async fn reserved_names_are_refused_in_every_spelling() {
    let message = assert_refused("PUT", UPDATE, &[], &named("autobk_snapshot_x"), 400).await;
    assert_eq!(
        message,
        "Invalid input for field/attribute name. Value: autobk_snapshot_x. Names starting with 'autobk_snapshot_' are reserved for automatic backup snapshots."
    );
    for name in [
        "  autobk_snapshot_x",
        "\\u3000autobk_snapshot_x",
        "\\u001cautobk_snapshot_x",
        "\\u0061utobk_snapshot_x",
    ] {
        assert_refused("PUT", UPDATE, &[], &named(name), 400).await;
    }
    assert_refused(
        "PUT",
        UPDATE,
        &[],
        r#"{"snapshot":{"display_name":"autobk_snapshot_1"}}"#,
        400,
    )
    .await;
    assert_refused(
        "PUT",
        UPDATE,
        &[],
        r#"{"snapshot":{"name":"ok","display_name":"autobk_snapshot_1"}}"#,
        400,
    )
    .await;
}

#[tokio::test]
async fn display_name_is_normalized_to_name() {
    assert_normalized(
        r#"{"snapshot":{"display_name":"new"}}"#,
        r#"{"snapshot":{"name":"new"}}"#,
    )
    .await;
    assert_normalized(
        r#"{"snapshot":{"name":"a","display_name":"b"}}"#,
        r#"{"snapshot":{"name":"a"}}"#,
    )
    .await;
}

#[tokio::test]
async fn field_lengths_are_counted_in_utf8_bytes() {
    assert_forwarded_unchanged("PUT", UPDATE, &named(&"a".repeat(255))).await;
    assert_refused("PUT", UPDATE, &[], &named(&"a".repeat(256)), 400).await;
    assert_forwarded_unchanged("PUT", UPDATE, &named(&"快".repeat(85))).await;
    assert_refused("PUT", UPDATE, &[], &named(&"快".repeat(86)), 400).await;
    assert_refused("PUT", UPDATE, &[], &named(&"é".repeat(128)), 400).await;
    let description = format!(
        r#"{{"snapshot":{{"display_description":"{}"}}}}"#,
        "d".repeat(256)
    );
    assert_refused("PUT", UPDATE, &[], &description, 400).await;
}

#[tokio::test]
async fn null_fields_are_forwarded() {
    assert_forwarded_unchanged(
        "PUT",
        UPDATE,
        r#"{"snapshot":{"name":null,"description":null}}"#,
    )
    .await;
}

#[tokio::test]
async fn wrong_types_and_malformed_bodies_are_refused() {
    assert_refused("PUT", UPDATE, &[], r#"{"snapshot":{"name":5}}"#, 400).await;
    let message = assert_refused("PUT", UPDATE, &[], "not json", 400).await;
    assert!(message.starts_with("Malformed request body"), "{message}");
    let message = assert_refused(
        "PUT",
        UPDATE,
        &[],
        r#"{"snapshot":{"name":"a","name":"autobk_snapshot_x"}}"#,
        400,
    )
    .await;
    assert!(message.contains("duplicate key"), "{message}");
}

#[tokio::test]
async fn a_one_mebibyte_body_is_refused_with_413() {
    let body = format!(
        r#"{{"snapshot":{{"name":"a","metadata":{{"k":"{}"}}}}}}"#,
        "x".repeat(1 << 20)
    );
    assert_refused("PUT", UPDATE, &[], &body, 413).await;
}

#[tokio::test]
async fn an_encoded_body_is_refused_with_415() {
    assert_refused(
        "PUT",
        UPDATE,
        &[("content-encoding", "gzip")],
        &named("ok"),
        415,
    )
    .await;
}

#[tokio::test]
async fn a_create_with_a_reserved_name_is_refused() {
    let body = r#"{"snapshot":{"volume_id":"5aa119a8-d25b-45a7-8d1b-88e127885635","force":false,"name":"autobk_snapshot_a","description":null,"metadata":{}}}"#;
    assert_refused("POST", "/v3/p1/snapshots", &[], body, 400).await;
}

#[tokio::test]
async fn other_spellings_of_the_path_are_policed() {
    for path in [
        "/v3/p1/snapshots/s1/",
        "//v3/p1/snapshots/s1",
        "/V3/p1/Snapshots/s1",
        "/v3/p1/x/../snapshots/s1",
        "/v3/p1/snapshots/s1?x=1",
    ] {
        assert_refused("PUT", path, &[], &named("autobk_snapshot_x"), 400).await;
    }
}

#[tokio::test]
async fn a_method_override_is_policed() {
    assert_refused(
        "POST",
        UPDATE,
        &[("x-http-method-override", "PUT")],
        &named("autobk_snapshot_x"),
        400,
    )
    .await;
}

#[tokio::test]
async fn other_routes_are_forwarded_unchanged_and_not_inspected() {
    // Bodies the policy would refuse, to show they are not looked at.
    assert_forwarded_unchanged("GET", UPDATE, "").await;
    assert_forwarded_unchanged(
        "PUT",
        "/v3/p1/snapshots/s1/metadata",
        &named("autobk_snapshot_x"),
    )
    .await;
    assert_forwarded_unchanged(
        "PUT",
        "/v3/p1/volumes/v1",
        r#"{"volume":{"name":"autobk_snapshot_x"}} trailing"#,
    )
    .await;
}

#[tokio::test]
async fn an_upstream_404_is_passed_through_as_is() {
    let (upstream, proxy) = support::pair(Reply::NotFound, "").await;
    let got = send(
        Version::HTTP_11,
        "PUT",
        &proxy.url(UPDATE),
        &[],
        named("snap-001"),
    )
    .await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.body, NOT_FOUND_BODY);
    assert_eq!(got.headers["content-type"], "application/json");
    assert_eq!(upstream.only().body, named("snap-001").as_bytes());
}
