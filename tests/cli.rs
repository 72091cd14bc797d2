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
    // A process that exits before reading its stdin (a usage error) closes the pipe early.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const RESERVED_400: &str = r#"{"badRequest":{"code":400,"message":"Invalid input for field/attribute name. Value: autobk_snapshot_x. Names starting with 'autobk_snapshot_' are reserved for automatic backup snapshots."}}"#;

#[test]
fn check_refuses_a_reserved_name_with_exit_1_and_prints_the_error_body() {
    let o = run(
        &["check", "PUT", "/v3/p/snapshots/s"],
        r#"{"snapshot":{"name":"autobk_snapshot_x"}}"#,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // stdout: the error body the downstream would get, byte for byte; stderr: the report.
    assert_eq!(stdout(&o), RESERVED_400);
    assert_eq!(
        stderr(&o),
        "decision: rejected\nroute: /v3/{project_id}/snapshots/{snapshot_id}\n\
         rule: reserved_prefix\nfield: name\nstatus: 400\n"
    );
}

#[test]
fn check_prints_the_body_that_would_be_forwarded() {
    let o = run(
        &["check", "put", "/v3/p/snapshots/s?x=1"],
        r#"{"snapshot":{"display_name":"new"}}"#,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), r#"{"snapshot":{"name":"new"}}"#);
    assert_eq!(
        stderr(&o),
        "decision: normalized\nroute: /v3/{project_id}/snapshots/{snapshot_id}\n"
    );

    // Allowed unchanged, and passthrough: the very bytes read, trailing newline included.
    let body = "{\"snapshot\": {\"name\": \"nightly\"}}\n";
    let o = run(&["check", "PUT", "/v3/p/snapshots/s"], body);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), body);
    assert!(
        stderr(&o).starts_with("decision: allowed\n"),
        "{}",
        stderr(&o)
    );

    let o = run(&["check", "GET", "/v3/p/snapshots/s"], "");
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "");
    assert_eq!(stderr(&o), "decision: passthrough\nroute: none\n");
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
    assert!(stderr(&o).contains("status: 415"), "{}", stderr(&o));
    assert!(stdout(&o).contains(r#""code":415"#), "{}", stdout(&o));

    // A form body is what `curl -d` sends without -H 'Content-Type: application/json'.
    let o = run(
        &[
            "check",
            "-H",
            "Content-Type: application/x-www-form-urlencoded",
            "PUT",
            "/v3/p/snapshots/s",
        ],
        r#"{"snapshot":{"name":"a"}}"#,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("status: 415"), "{}", stderr(&o));
}

/// A refusal quotes a header in part: a 64 KiB Content-Type must not come back whole.
#[test]
fn check_quotes_a_long_media_header_in_part() {
    let long = "x".repeat(64 * 1024);
    for (header, says) in [
        (
            "Content-Type: text/",
            "Unsupported Content-Type \\\"text/xxx",
        ),
        (
            "Content-Encoding: gzip",
            "Unsupported Content-Encoding \\\"gzipxxx",
        ),
    ] {
        let header = format!("{header}{long}");
        let o = run(
            &["check", "-H", &header, "PUT", "/v3/p/snapshots/s"],
            r#"{"snapshot":{"name":"a"}}"#,
        );
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let body = stdout(&o);
        assert!(body.len() < 400, "{} bytes: {body}", body.len());
        assert!(body.contains(says) && body.contains("...\\\""), "{body}");
        assert!(stderr(&o).contains("status: 415"), "{}", stderr(&o));
    }
}

/// `--config` goes before `check` or after it (the nearer one wins), or comes from
/// SNAPGUARD_CONFIG.
#[test]
fn check_takes_the_config_before_or_after_the_subcommand() {
    let dir = std::env::temp_dir().join(format!("snapguard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let strict = dir.join("strict.toml");
    std::fs::write(&strict, "[policy]\nmax_field_bytes = 3\n").unwrap();
    let strict = strict.to_str().unwrap();
    let lax = dir.join("lax.toml");
    std::fs::write(&lax, "[policy]\nmax_field_bytes = 300\n").unwrap();
    let lax = lax.to_str().unwrap();
    let body = r#"{"snapshot":{"name":"abcd"}}"#;
    let refused_by_strict = |args: &[&str], env: Option<&str>| {
        let mut command = Command::new(BIN);
        command.env_remove("SNAPGUARD_CONFIG");
        if let Some(file) = env {
            command.env("SNAPGUARD_CONFIG", file);
        }
        let mut child = command
            .args(args)
            .args(["PUT", "/v3/p/snapshots/s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        match o.status.code() {
            Some(1) => {
                assert!(
                    stderr(&o).contains("rule: max_field_bytes"),
                    "{}",
                    stderr(&o)
                );
                true
            }
            Some(0) => false,
            other => panic!("{args:?}: exit {other:?}: {}", stderr(&o)),
        }
    };
    assert!(refused_by_strict(&["--config", strict, "check"], None));
    assert!(refused_by_strict(&["check", "--config", strict], None));
    assert!(refused_by_strict(&["check"], Some(strict)));
    assert!(!refused_by_strict(&["check"], None));
    assert!(refused_by_strict(
        &["--config", lax, "check", "--config", strict],
        None
    ));
    assert!(!refused_by_strict(
        &["check", "--config", lax],
        Some(strict)
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_in_audit_mode_forwards_the_body_and_says_what_enforce_would_do() {
    let dir = std::env::temp_dir().join(format!("snapguard-cli-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("audit.toml");
    std::fs::write(&file, "[policy]\nmode = \"audit\"\n").unwrap();
    let body = r#"{"snapshot":{"name":"autobk_snapshot_x"}}"#;
    let o = run(
        &[
            "check",
            "--config",
            file.to_str().unwrap(),
            "PUT",
            "/v3/p/snapshots/s",
        ],
        body,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), body);
    let err = stderr(&o);
    assert!(err.starts_with("decision: audit\n"), "{err}");
    assert!(
        err.contains(&format!(
            "would be refused in enforce mode with: 400 {RESERVED_400}"
        )),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_exits_64_on_usage_errors() {
    for args in [
        &["check", "PUT"][..],
        &["check", "P T", "/v3/p/snapshots/s"],
        &["check", "PUT", "not a target"],
        &["check", "-H", "no colon", "PUT", "/"],
        &["check", "--format", "yaml", "PUT", "/"],
        &["check", "--no-such-flag", "PUT", "/"],
        &[
            "check",
            "--config",
            "/nonexistent/snapguard.toml",
            "PUT",
            "/",
        ],
        &["check-config", "--config", "x.toml", "x.toml"],
    ] {
        let o = run(args, "{}");
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), "", "{args:?}");
        assert!(!stderr(&o).is_empty(), "{args:?} says nothing");
    }
}

#[test]
fn help_says_what_each_command_does() {
    let help = |args: &[&str]| {
        let o = run(args, "");
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        stdout(&o)
    };
    let top = help(&["--help"]);
    for words in [
        "--threads",
        "/healthz, /readyz and /metrics",
        "SNAPGUARD_UPSTREAM",
        "check-config",
    ] {
        assert!(top.contains(words), "--help lacks {words:?}:\n{top}");
    }
    let check = help(&["check", "--help"]);
    for words in [
        "stdout",
        "stderr",
        "taken as JSON",
        "--format json",
        "0 forwarded",
        "1 refused",
        "64 usage error",
        "--config <FILE>",
    ] {
        assert!(
            check.contains(words),
            "check --help lacks {words:?}:\n{check}"
        );
    }
    let check_config = help(&["check-config", "--help"]);
    assert!(
        !check_config.contains("--config"),
        "check-config takes the file as its argument:\n{check_config}"
    );
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
    assert!(stderr(&o).contains("rule: team-prefix"), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("Rule 'team-prefix': names must match"),
        "{}",
        stdout(&o)
    );

    let exempt = "/v3/5f0c4e3ad1b84c1f9e0a6c7d8b9e0f12/snapshots/s1";
    let o = run(
        &["check", "--config", example, "PUT", exempt],
        r#"{"snapshot":{"name":"autobk_snapshot_1"}}"#,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("decision: exempt"), "{}", stderr(&o));
    assert_eq!(stdout(&o), r#"{"snapshot":{"name":"autobk_snapshot_1"}}"#);
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
    assert_eq!(stderr(&o), "");
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

/// Writes `toml` to a file of its own and runs `snapguard check-config` on it.
fn check_config(name: &str, toml: &str) -> Output {
    let dir = std::env::temp_dir().join(format!("snapguard-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("snapguard.toml");
    std::fs::write(&file, toml).unwrap();
    let o = run(&["check-config", file.to_str().unwrap()], "");
    std::fs::remove_dir_all(&dir).unwrap();
    o
}

#[test]
fn check_config_reports_every_problem_at_once_each_with_its_line_and_column() {
    let o = check_config(
        "every",
        "[policy]\n\
         max_body_bytes = 0\n\
         \n\
         [timeouts]\n\
         idle = \"0s\"\n\
         \n\
         [[rules]]\n\
         name = \"team\"\n\
         fields = [\"title\"]\n\
         max_chars = 10\n\
         message = \"short names\"\n\
         \n\
         [[rules]]\n\
         name = \"team\"\n\
         max_chars = 20\n\
         routes = [\"/v3/{project_id}/snapshots\", \"/v3/{project}/snapshots/{id}\"]\n\
         message = \"shorter\"\n",
    );
    assert_eq!(o.status.code(), Some(64));
    let err = stderr(&o);
    for line in [
        "invalid config, 5 errors:",
        "policy.max_body_bytes (line 2, column 18): must be from 1 to 67108864 (64 MiB), not 0",
        "timeouts.idle (line 5, column 8): must be from 100ms to 1day, not 0s",
        "rules[0].fields (line 9, column 10): rule 'team': no route polices the field \"title\"",
        "rules[1].name (line 14, column 8): rule name 'team' is used twice",
        "rules[1].routes[1] (line 16, column 41): rule 'team': /v3/{project}/snapshots/{id} is \
         not a route of the table (did you mean /v3/{project_id}/snapshots/{snapshot_id}?)",
    ] {
        assert!(err.contains(line), "no {line:?} in:\n{err}");
    }
}

/// Every duration and limit with its bounds as `config/snapguard.toml` gives them: the least
/// and the greatest value accepted, and the nearest refused on either side (`-`: none below, 0
/// being accepted as "off"). A value that is not a number is a duration, written quoted.
const BOUNDS: &str = "\
    workers                           1      1024         -      1025
    reload_interval                   100ms  1day         99ms   86401s
    timeouts.request_header           100ms  1h           99ms   3601s
    timeouts.request_body             100ms  1day         99ms   86401s
    timeouts.upstream_connect         1ms    1h           999us  3601s
    timeouts.upstream_response        1ms    1day         999us  86401s
    timeouts.upstream_queue           1ms    1h           999us  3601s
    timeouts.upstream_idle            100ms  1day         99ms   86401s
    timeouts.idle                     100ms  1day         99ms   86401s
    timeouts.shutdown_grace           0s     1h           -      3601s
    timeouts.body_idle                100ms  1h           99ms   3601s
    timeouts.min_rate_grace           100ms  1h           99ms   3601s
    timeouts.tcp_keepalive            1s     32767s       999ms  32768s
    limits.max_header_bytes           8192   1048576      8191   1048577
    limits.max_connections            1      1000000      0      1000001
    limits.max_upstream_connections   1      65536        0      65537
    limits.max_upstream_waiting       0      1000000      -      1000001
    limits.buffer_request_body        0      67108864     -      67108865
    limits.buffer_response_body       0      67108864     -      67108865
    limits.buffer_memory              0      68719476736  -      68719476737
    limits.min_body_rate              0      1073741824   -      1073741825
    policy.max_body_bytes             1      67108864     0      67108865
    policy.max_field_bytes            1      67108864     0      67108865
    tls.handshake_timeout             100ms  1h           99ms   3601s
    tls.reload_interval               1s     1day         999ms  86401s
    upstream.signing.reload_interval  1s     1day         999ms  86401s";

/// The rows of [`BOUNDS`]: key, least, most, nearest below, nearest above.
fn bounds() -> Vec<[&'static str; 5]> {
    BOUNDS
        .lines()
        .map(|line| {
            line.split_whitespace()
                .collect::<Vec<_>>()
                .try_into()
                .unwrap()
        })
        .collect()
}

/// A config setting each key of [`BOUNDS`] to column `column` of its row (not at all for
/// `-`), with a certificate, a key and cloud keys written to `dir` for `[tls]` and
/// `[upstream.signing]`.
fn bounds_config(dir: &std::path::Path, column: usize) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let file = |name: &str, content: &str| {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        format!("{:?}", path.to_str().unwrap())
    };
    let mut sections = std::collections::BTreeMap::<&str, Vec<String>>::new();
    sections.entry("tls").or_default().extend([
        format!("cert_file = {}", file("tls.crt", &cert.cert.pem())),
        format!(
            "key_file = {}",
            file("tls.key", &cert.signing_key.serialize_pem())
        ),
    ]);
    sections.entry("upstream.signing").or_default().extend([
        "scheme = \"sdk-hmac-sha256\"".to_owned(),
        format!("access_key_file = {}", file("ak", "AK")),
        format!("secret_key_file = {}", file("sk", "SK")),
        format!("project_id_file = {}", file("project", "p")),
    ]);
    for row in bounds() {
        let (section, key) = row[0].rsplit_once('.').unwrap_or(("", row[0]));
        let value = match row[column] {
            "-" => continue,
            n if n.bytes().all(|b| b.is_ascii_digit()) => n.to_owned(),
            duration => format!("{duration:?}"),
        };
        sections
            .entry(section)
            .or_default()
            .push(format!("{key} = {value}"));
    }
    // The top level ("") sorts first, before any table.
    sections
        .iter()
        .map(|(section, lines)| match *section {
            "" => format!("{}\n", lines.join("\n")),
            _ => format!("\n[{section}]\n{}\n", lines.join("\n")),
        })
        .collect()
}

#[test]
fn check_config_accepts_every_duration_and_limit_at_its_bounds() {
    let dir = std::env::temp_dir().join(format!("snapguard-cli-bounds-{}", std::process::id()));
    for (column, name) in [(1, "least"), (2, "most")] {
        let toml = bounds_config(&dir, column);
        let o = check_config(name, &toml);
        assert_eq!(o.status.code(), Some(0), "{name}:\n{toml}\n{}", stderr(&o));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_config_refuses_every_duration_and_limit_past_its_bounds() {
    let dir = std::env::temp_dir().join(format!("snapguard-cli-past-{}", std::process::id()));
    for (column, name) in [(3, "below"), (4, "above")] {
        let toml = bounds_config(&dir, column);
        let o = check_config(name, &toml);
        assert_eq!(o.status.code(), Some(64), "{name}:\n{toml}");
        let err = stderr(&o);
        let past: Vec<_> = bounds()
            .into_iter()
            .filter(|row| row[column] != "-")
            .collect();
        let count = format!("invalid config, {} errors:", past.len());
        assert!(err.contains(&count), "{name}: not {count:?}\n{err}");
        for row in past {
            let named = format!("\n  {} (line ", row[0]);
            assert!(err.contains(&named), "{name}: {} not named:\n{err}", row[0]);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_config_names_each_out_of_bounds_value_at_its_line() {
    let header_bytes = "must be from 8192 (8 KiB) to 1048576 (1 MiB), not";
    for (toml, at, reason) in [
        // The first panic case: tokio's interval panics at 0.
        (
            "[timeouts]\nupstream_idle = \"0s\"",
            "timeouts.upstream_idle (line 2, column 17)",
            "must be from 100ms to 1day, not 0s",
        ),
        (
            "[timeouts]\nupstream_idle = \"1ns\"",
            "timeouts.upstream_idle (line 2, column 17)",
            "must be from 100ms to 1day, not 1ns",
        ),
        (
            "[timeouts]\nidle = \"1ns\"",
            "timeouts.idle (line 2, column 8)",
            "must be from 100ms to 1day, not 1ns",
        ),
        // Instant + this overflows.
        (
            "[timeouts]\nrequest_body = \"300000000000y\"",
            "timeouts.request_body (line 2, column 16)",
            "must be from 100ms to 1day, not 300000000000years",
        ),
        (
            "[limits]\nmax_connections = 9223372036854775807",
            "limits.max_connections (line 2, column 19)",
            "must be from 1 to 1000000, not 9223372036854775807",
        ),
        (
            "workers = 100000",
            "workers (line 1, column 11)",
            "must be 0 (one per CPU) or from 1 to 1024, not 100000",
        ),
        (
            "[limits]\nmax_header_bytes = 4096",
            "limits.max_header_bytes (line 2, column 20)",
            &format!("{header_bytes} 4096 (4 KiB)"),
        ),
        (
            "[limits]\nmax_header_bytes = 9223372036854775807",
            "limits.max_header_bytes (line 2, column 20)",
            &format!("{header_bytes} 9223372036854775807"),
        ),
    ] {
        let o = check_config("one", toml);
        assert_eq!(o.status.code(), Some(64), "{toml}");
        assert_eq!(
            stderr(&o),
            format!("snapguard: invalid config: {at}: {reason}\n")
        );
    }
}

/// The proxy refuses to start on a value out of bounds, from the file or a flag, as
/// check-config does (exit 64), before it binds anything.
#[test]
fn the_proxy_refuses_to_start_on_a_value_out_of_bounds() {
    let dir = std::env::temp_dir().join(format!("snapguard-cli-start-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("snapguard.toml");
    std::fs::write(&file, "[timeouts]\nupstream_idle = \"0s\"\n").unwrap();
    for (args, says) in [
        (
            vec!["--config", file.to_str().unwrap()],
            "timeouts.upstream_idle (line 2, column 17)",
        ),
        (
            vec!["--threads", "5000"],
            "workers: must be 0 (one per CPU) or from 1 to 1024, not 5000",
        ),
    ] {
        let mut child = Command::new(BIN)
            .args(&args)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.2:0"])
            .env_remove("SNAPGUARD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A proxy that started would run until killed: give it a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("{args:?}: the proxy started");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unknown_rule_route_is_answered_with_the_valid_ones() {
    let o = check_config(
        "templates",
        "[[rules]]\nname = \"x\"\nmax_chars = 9\nroutes = [\"/v3/volumes\"]\nmessage = \"m\"\n",
    );
    assert_eq!(o.status.code(), Some(64));
    let err = stderr(&o);
    assert!(
        err.contains("rules[0].routes[0] (line 4, column 11)") && !err.contains("did you mean"),
        "{err}"
    );
    // Every template of the table, as a rule must spell it.
    for template in [
        "/v3/{project_id}/snapshots/{snapshot_id}",
        "/v2/{project_id}/cloudsnapshots",
        "/v5/{project_id}/snapshot-groups/{snapshot_group_id}",
    ] {
        assert!(err.contains(template), "{template} not listed:\n{err}");
    }
}

#[test]
fn errors_inside_rules_and_routes_tables_point_at_the_table_and_key() {
    // toml alone stops at the first and points at the first [[rules]] whichever is bad.
    let o = check_config(
        "tables",
        "[[rules]]\n\
         name = \"good\"\n\
         max_chars = 9\n\
         message = \"m\"\n\
         \n\
         [[rules]]\n\
         name = \"bad-pattern\"\n\
         require = \"(\"\n\
         message = \"m\"\n\
         \n\
         [[rules]]\n\
         name = \"typo\"\n\
         max_chars = 9\n\
         mesage = \"m\"\n",
    );
    assert_eq!(o.status.code(), Some(64));
    let err = stderr(&o);
    assert!(
        err.contains("rules[1].require (line 8, column 11): rule 'bad-pattern': require is not a valid pattern"),
        "{err}"
    );
    assert!(
        err.contains("rules[2].mesage (line 14, column 1): unknown field `mesage`"),
        "{err}"
    );

    let o = check_config(
        "routes",
        "[[routes]]\n\
         methods = [\"PUT\"]\n\
         path = \"/v3/{project_id}/snapshots/{snapshot_id}\"\n\
         name_fields = [\"name\"]\n\
         \n\
         [[routes]]\n\
         methods = [\"POST\"]\n\
         path = \"v3/{project_id}/snapshots\"\n\
         name_fields = [\"name\"]\n",
    );
    assert_eq!(o.status.code(), Some(64));
    let err = stderr(&o);
    assert!(
        err.contains("routes[1].path (line 8, column 8): route \"v3/{project_id}/snapshots\": the path must start with /"),
        "{err}"
    );
}

#[test]
fn listen_and_admin_take_an_ip_and_a_port_not_a_host_name() {
    let o = check_config("listen", "listen = \"localhost:8080\"\n");
    assert_eq!(o.status.code(), Some(64));
    let err = stderr(&o);
    assert!(err.contains("line 1, column 10"), "{err}");
    for words in [
        "\"localhost:8080\" is not an IP address and port",
        "127.0.0.1:8080",
        "[::1]:8080",
        "not a host name",
    ] {
        assert!(err.contains(words), "no {words:?} in:\n{err}");
    }
    let o = check_config("admin", "admin = \"127.0.0.1\"\n");
    assert!(
        stderr(&o).contains("\"127.0.0.1\" has no port"),
        "{}",
        stderr(&o)
    );

    // The flags say the same.
    let o = run(&["--admin", "localhost:9901", "check", "GET", "/"], "");
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("listen and admin take an IP:port"),
        "{}",
        stderr(&o)
    );
}
