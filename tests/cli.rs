//! The `snapguard` binary as users' scripts run it: `check`, `check-config`, and the proxy
//! started from the command line with no config file.

// Tests fail by panicking; the no-unwrap rule is for the request path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use http::{StatusCode, Version};
use support::{send, Binary, Reply, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_snapguard");

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("SNAPGUARD_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_refuses_a_reserved_name_with_exit_1_and_shows_the_error() {
    let o = run(
        &["check", "PUT", "/v3/p/snapshots/s"],
        r#"{"snapshot":{"name":"autobk_snapshot_x"}}"#,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("decision: rejected"), "{out}");
    assert!(out.contains("rule: reserved_prefix"), "{out}");
    assert!(out.contains("status: 400"), "{out}");
    assert!(
        out.contains(r#"response body: {"badRequest":{"code":400,"message":"Invalid input for field/attribute name. Value: autobk_snapshot_x. Names starting with 'autobk_snapshot_' are reserved for automatic backup snapshots."}}"#),
        "{out}"
    );
}

#[test]
fn check_shows_the_body_that_would_be_forwarded() {
    let o = run(
        &["check", "put", "/v3/p/snapshots/s?x=1"],
        r#"{"snapshot":{"display_name":"new"}}"#,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("decision: normalized"), "{out}");
    assert!(
        out.contains("route: /v3/{project_id}/snapshots/{snapshot_id}"),
        "{out}"
    );
    assert!(
        out.contains(r#"forwarded body: {"snapshot":{"name":"new"}}"#),
        "{out}"
    );

    let o = run(&["check", "GET", "/v3/p/snapshots/s"], "");
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("decision: passthrough"));
}

#[test]
fn check_takes_headers_and_the_configured_policy() {
    let o = run(
        &[
            "check",
            "-H",
            "Content-Encoding: gzip",
            "PUT",
            "/v3/p/snapshots/s",
        ],
        r#"{"snapshot":{"name":"a"}}"#,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("status: 415"), "{}", stdout(&o));

    let dir = std::env::temp_dir().join(format!("snapguard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("strict.toml");
    std::fs::write(&file, "[policy]\nmax_field_bytes = 3\n").unwrap();
    let o = run(
        &[
            "--config",
            file.to_str().unwrap(),
            "check",
            "PUT",
            "/v3/p/snapshots/s",
        ],
        r#"{"snapshot":{"name":"abcd"}}"#,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("rule: max_field_bytes"),
        "{}",
        stdout(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_evaluates_the_configured_naming_rules() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/naming-rules.example.toml"
    );
    let o = run(
        &["--config", example, "check", "PUT", "/v3/p1/snapshots/s1"],
        r#"{"snapshot":{"name":"Prod_DB"}}"#,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("rule: team-prefix"), "{out}");
    assert!(
        out.contains("Rule 'team-prefix': names must match"),
        "{out}"
    );

    let exempt = "/v3/5f0c4e3ad1b84c1f9e0a6c7d8b9e0f12/snapshots/s1";
    let o = run(
        &["--config", example, "check", "PUT", exempt],
        r#"{"snapshot":{"name":"autobk_snapshot_1"}}"#,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("decision: exempt"), "{}", stdout(&o));
}

#[test]
fn check_config_accepts_the_shipped_file_and_names_a_bad_key() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/snapguard.toml");
    let o = run(&["check-config", shipped], "");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let dir = std::env::temp_dir().join(format!("snapguard-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[policy]\nmax_body_bytes = 10\nreserved_prefix = [\"x\"]\n",
    )
    .unwrap();
    let o = run(&["check-config", bad.to_str().unwrap()], "");
    assert_eq!(o.status.code(), Some(64));
    let err = stderr(&o);
    assert!(
        err.contains("reserved_prefix") && err.contains("line 3"),
        "{err}"
    );

    let o = run(
        &["check-config", dir.join("missing.toml").to_str().unwrap()],
        "",
    );
    assert_eq!(o.status.code(), Some(64));
    std::fs::remove_dir_all(&dir).unwrap();

    let o = run(&["--upstream", "ftp://x", "check", "GET", "/"], "");
    assert_eq!(
        o.status.code(),
        Some(64),
        "a bad flag is a usage error: {}",
        stderr(&o)
    );
}

#[tokio::test]
async fn the_binary_runs_on_flags_alone_and_drains_on_sigterm() {
    let upstream = Upstream::start(Reply::Ok).await;
    let mut bin = Binary::flags_only(BIN, &upstream.url(), &["--log-format", "json"]).await;
    let listen = bin.addr;

    let url = |p: &str| format!("http://{listen}{p}");
    let got = send(
        Version::HTTP_11,
        "PUT",
        &url("/v3/p1/snapshots/s1"),
        &[],
        r#"{"snapshot":{"name":"autobk_snapshot_x"}}"#,
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    let got = send(
        Version::HTTP_11,
        "PUT",
        &url("/v3/p1/snapshots/s1"),
        &[],
        r#"{"snapshot":{"display_name":"new"}}"#,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        upstream.only().body,
        r#"{"snapshot":{"name":"new"}}"#.as_bytes()
    );

    bin.signal("TERM");
    let status = bin.wait().await;
    let log = bin.log();
    assert_eq!(status.code(), Some(0), "{log}");
    // One JSON access line per request, with the decision.
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("snapguard::access"))
        .collect();
    assert_eq!(access.len(), 2, "{log}");
    assert!(
        access[0].contains(r#""decision":"rejected""#)
            && access[0].contains(r#""rule":"reserved_prefix""#),
        "{}",
        access[0]
    );
    assert!(
        access[1].contains(r#""decision":"normalized""#),
        "{}",
        access[1]
    );
}

#[test]
fn check_prints_a_json_verdict_on_request() {
    let o = run(
        &["check", "--format", "json", "PUT", "/v3/p/snapshots/s"],
        r#"{"snapshot":{"display_name":"nightly"}}"#,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["decision"], "normalized");
    assert_eq!(v["route"], "/v3/{project_id}/snapshots/{snapshot_id}");
    assert_eq!(v["status"], serde_json::Value::Null);
    assert_eq!(v["body"], r#"{"snapshot":{"name":"nightly"}}"#);
}

#[test]
fn check_batch_answers_each_line_in_order() {
    let lines = [
        r#"{"method":"PUT","target":"/v3/p/snapshots/s","body":"{\"snapshot\":{\"name\":\"autobk_snapshot_x\"}}"}"#,
        r#"{"method":"GET","target":"/v3/p/snapshots/s"}"#,
        r#"{"method":"POST","target":"/v3/ab12/snapshots%0A","headers":[["Content-Type","application/json"]]}"#,
        r#"{"method":"P T","target":"/v3/p/snapshots/s"}"#,
        r#"{"method":"CONNECT","target":"example.com:443"}"#,
    ];
    let o = run(&["check", "--batch"], &(lines.join("\n") + "\n"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let verdicts: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decisions: Vec<_> = verdicts.iter().map(|v| v["decision"].clone()).collect();
    assert_eq!(
        decisions,
        ["rejected", "passthrough", "rejected", "invalid", "rejected"]
    );
    assert_eq!(verdicts[0]["rule"], "reserved_prefix");
    assert_eq!(verdicts[2]["rule"], "ambiguous_path");
    assert_eq!(verdicts[4]["status"], 405);

    let bad = run(&["check", "--batch"], "not json\n");
    assert_eq!(bad.status.code(), Some(64));
    assert!(stderr(&bad).contains("line 1"), "{}", stderr(&bad));
}
