//! Naming rules from config, through the running proxy: scoping by route and project,
//! reserved-prefix exemptions, the error users see, and patterns that cannot stall.

// Tests fail by panicking; the no-unwrap rule is for the request path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use http::{StatusCode, Version};
use support::{await_sample, send, Proxy, Reply, Upstream};

const EXAMPLE: &str = include_str!("../config/naming-rules.example.toml");
const EXEMPT: &str = "5f0c4e3ad1b84c1f9e0a6c7d8b9e0f12";
const PLATFORM: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
const PROD: &str = "9e8d7c6b5a4f30211203f4e5d6c7b8a9";

fn named(name: &str) -> String {
    format!(r#"{{"snapshot":{{"name":"{name}"}}}}"#)
}

#[tokio::test]
async fn the_example_rules_hold_through_the_proxy() {
    let (upstream, proxy) = support::pair(Reply::Ok, EXAMPLE).await;
    let put = |project: &str, body: String| {
        let url = proxy.url(&format!("/v3/{project}/snapshots/s1"));
        async move { send(Version::HTTP_11, "PUT", &url, &[], body).await }
    };

    let got = put("p1", named("Prod_DB")).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        got.json()["badRequest"]["message"],
        "Invalid input for field/attribute name. Value: Prod_DB. Rule 'team-prefix': names must match ^(web|db|ml)-[a-z0-9-]+$, e.g. db-orders-nightly"
    );
    assert_eq!(
        put("p1", named("db-orders-nightly")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        put("p1", named("  db-orders-nightly ")).await.status,
        StatusCode::OK,
        "checked as stored"
    );
    // The platform project is out of the team-prefix rule's scope, not of the others.
    assert_eq!(
        put(PLATFORM, named("Legacy_Name")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        put(PLATFORM, named(&"x".repeat(64))).await.status,
        StatusCode::BAD_REQUEST
    );
    // "all" fields: descriptions too.
    let quoted = r#"{"snapshot":{"name":"db-a","description":"it's"}}"#.to_owned();
    assert_eq!(put("p1", quoted).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(upstream.seen().len(), 3);

    // A rule scoped to the create routes of one project.
    let create = |project: &str, description: &str| {
        let url = proxy.url(&format!("/v3/{project}/snapshots"));
        let body = format!(
            r#"{{"snapshot":{{"volume_id":"v","name":"db-a","description":"{description}"}}}}"#
        );
        async move { send(Version::HTTP_11, "POST", &url, &[], body).await.status }
    };
    assert_eq!(create(PROD, "nightly").await, StatusCode::BAD_REQUEST);
    assert_eq!(
        create(PROD, "change-1234: before the migration").await,
        StatusCode::OK
    );
    assert_eq!(
        create("p1", "nightly").await,
        StatusCode::OK,
        "another project"
    );
    let update = proxy.url(&format!("/v3/{PROD}/snapshots/s1"));
    let body = r#"{"snapshot":{"name":"db-a","description":"nightly"}}"#;
    assert_eq!(
        send(Version::HTTP_11, "PUT", &update, &[], body)
            .await
            .status,
        StatusCode::OK,
        "another route"
    );
    await_sample(
        proxy.admin,
        r#"snapguard_policy_violations_total{rule="team-prefix",field="name"}"#,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn an_exempt_project_may_use_the_reserved_prefix_and_is_counted() {
    let (upstream, proxy) = support::pair(Reply::Ok, EXAMPLE).await;
    let reserved = named("autobk_snapshot_nightly");
    let url = proxy.url(&format!("/v3/{EXEMPT}/snapshots/s1"));
    let got = send(Version::HTTP_11, "PUT", &url, &[], reserved.clone()).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(upstream.only().body, reserved.as_bytes());
    let route = "/v3/{project_id}/snapshots/{snapshot_id}";
    await_sample(
        proxy.admin,
        &format!(r#"snapguard_requests_total{{route="{route}",method="PUT",decision="exempt",status="200"}}"#),
        1.0,
    )
    .await;

    // Any other project, or no project in the path, is not exempt: refused by the reserved
    // prefix itself (the example's team-prefix rule would refuse the name too).
    let message = "Names starting with 'autobk_snapshot_' are reserved";
    for path in ["/v3/p1/snapshots/s1", "/v3/snapshots/s1"] {
        let got = send(
            Version::HTTP_11,
            "PUT",
            &proxy.url(path),
            &[],
            reserved.clone(),
        )
        .await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{path}");
        let said = got.json()["badRequest"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(said.contains(message), "{path}: {said}");
    }
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn a_rule_on_name_also_sees_display_name() {
    let config = "[[rules]]\nname = \"lower\"\nfields = [\"name\"]\ndeny = '[A-Z]'\nmessage = \"lowercase only\"\n";
    let (upstream, proxy) = support::pair(Reply::Ok, config).await;
    let url = proxy.url("/v3/p1/snapshots/s1");
    let body = r#"{"snapshot":{"display_name":"Prod_DB"}}"#;
    let got = send(Version::HTTP_11, "PUT", &url, &[], body).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn rules_use_the_route_error_style() {
    let upstream = Upstream::start(Reply::Ok).await;
    let config = "[[rules]]\nname = \"lower\"\ndeny = '[A-Z]'\nmessage = \"lowercase only\"\n";
    let proxy = Proxy::start(&upstream.url(), config).await;
    let got = send(
        Version::HTTP_11,
        "PUT",
        &proxy.url("/v5/p1/snapshots/s1"),
        &[],
        named("Upper"),
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.json()["error"]["code"], "EVS.5400");
    assert!(got.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Rule 'lower': lowercase only"));
}

#[tokio::test]
async fn a_pathological_pattern_cannot_stall_a_request() {
    let upstream = Upstream::start(Reply::Ok).await;
    // Catastrophic for a backtracking engine on "aaaa...!"; the regex crate is linear.
    let config =
        "[[rules]]\nname = \"evil\"\nrequire = '^(a+)+$'\nfields = \"all\"\nmessage = \"a only\"\n";
    let proxy = Proxy::start(&upstream.url(), config).await;
    let value = format!("{}!", "a".repeat(254));
    let body = format!(r#"{{"snapshot":{{"name":"{value}","description":"{value}"}}}}"#);
    // A guard against a hang, not a speed assertion: a backtracking engine would not finish.
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        send(
            Version::HTTP_11,
            "PUT",
            &proxy.url("/v3/p1/snapshots/s1"),
            &[],
            body,
        ),
    )
    .await
    .expect("the request finished");
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn bad_rules_are_refused_at_load_naming_the_rule() {
    for (text, needle) in [
        ("[[rules]]\nname = \"r\"\nrequire = '('\nmessage = \"m\"\n", "rule 'r'"),
        (
            "[[rules]]\nname = \"r\"\nmax_chars = 3\nroutes = [\"/v9/nowhere\"]\nmessage = \"m\"\n",
            "/v9/nowhere is not a route",
        ),
        (
            "[[rules]]\nname = \"r\"\nmax_chars = 3\nmessage = \"m\"\n[[rules]]\nname = \"r\"\nmax_chars = 4\nmessage = \"m\"\n",
            "used twice",
        ),
        (
            "[[rules]]\nname = \"r\"\nfields = [\"volume_id\"]\nmax_chars = 3\nmessage = \"m\"\n",
            "no route polices the field \"volume_id\"",
        ),
    ] {
        let err = snapguard::Config::from_toml(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
}
