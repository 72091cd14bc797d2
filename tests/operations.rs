//! What an SRE relies on: metrics that move, an access log that never leaks, drain on SIGTERM,
//! reload on SIGHUP under traffic, audit mode, idle timeouts.

// Tests fail by panicking; the no-unwrap rule is for the request path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{StatusCode, Version};
use support::{
    admin_get, await_sample, binary_path, raw, sample, send, Binary, Proxy, Reply, Upstream,
    FAST_TIMEOUTS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UPDATE: &str = "/v3/p1/snapshots/s1";
const ROUTE: &str = "/v3/{project_id}/snapshots/{snapshot_id}";
const RESERVED: &str = r#"{"snapshot":{"name":"autobk_snapshot_x"}}"#;

fn requests(route: &str, method: &str, decision: &str, status: u16) -> String {
    format!(
        r#"snapguard_requests_total{{route="{route}",method="{method}",decision="{decision}",status="{status}"}}"#
    )
}

#[tokio::test]
async fn each_metric_moves_when_it_should() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let url = |p: &str| proxy.url(p);

    let text = String::from_utf8(admin_get(proxy.admin, "/metrics").await.body.to_vec()).unwrap();
    assert!(
        text.contains(&format!(
            r#"snapguard_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert_eq!(
        sample(&text, "snapguard_request_duration_seconds_count"),
        0.0
    );

    send(Version::HTTP_11, "PUT", &url(UPDATE), &[], RESERVED).await;
    send(
        Version::HTTP_11,
        "PUT",
        &url(UPDATE),
        &[],
        r#"{"snapshot":{"display_name":"n"}}"#,
    )
    .await;
    send(Version::HTTP_11, "GET", &url("/v3/p1/volumes"), &[], "").await;
    let a = proxy.admin;
    await_sample(a, &requests(ROUTE, "PUT", "rejected", 400), 1.0).await;
    await_sample(a, &requests(ROUTE, "PUT", "normalized", 200), 1.0).await;
    await_sample(a, &requests("none", "GET", "passthrough", 200), 1.0).await;
    await_sample(
        a,
        r#"snapguard_policy_violations_total{rule="reserved_prefix",field="name"}"#,
        1.0,
    )
    .await;
    await_sample(a, "snapguard_request_duration_seconds_count", 3.0).await;
    await_sample(a, "snapguard_upstream_duration_seconds_count", 2.0).await;

    // A connection counts while it is open.
    let idle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    await_sample(a, "snapguard_connections_active", 1.0).await;
    drop(idle);
    await_sample(a, "snapguard_connections_active", 0.0).await;

    // Reloads count by result.
    let handle = proxy.handle.clone().unwrap();
    let mut config = snapguard::Config::default();
    config.upstream.url = upstream.url().parse().unwrap();
    handle.reload(Ok(config)).unwrap();
    assert!(handle
        .reload(snapguard::Config::from_toml("nonsense = 1"))
        .is_err());
    await_sample(
        a,
        r#"snapguard_config_reloads_total{result="success"}"#,
        1.0,
    )
    .await;
    await_sample(
        a,
        r#"snapguard_config_reloads_total{result="failure"}"#,
        1.0,
    )
    .await;

    // Upstream errors count by kind.
    let silent = Upstream::start(Reply::Silent).await;
    let proxy = Proxy::start(&silent.url(), FAST_TIMEOUTS).await;
    send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    await_sample(
        proxy.admin,
        r#"snapguard_upstream_errors_total{kind="timeout"}"#,
        1.0,
    )
    .await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(&format!("http://{closed}"), FAST_TIMEOUTS).await;
    send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    await_sample(
        proxy.admin,
        r#"snapguard_upstream_errors_total{kind="connect"}"#,
        1.0,
    )
    .await;
    await_sample(
        proxy.admin,
        &requests("none", "GET", "passthrough", 502),
        1.0,
    )
    .await;
}

#[tokio::test]
async fn health_and_readiness_answer_on_the_admin_port() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    assert_eq!(
        admin_get(proxy.admin, "/healthz").await.status,
        StatusCode::OK
    );
    assert_eq!(
        admin_get(proxy.admin, "/readyz").await.status,
        StatusCode::OK
    );
    assert_eq!(
        admin_get(proxy.admin, "/nothing").await.status,
        StatusCode::NOT_FOUND
    );
    let metrics = admin_get(proxy.admin, "/metrics").await;
    assert!(metrics.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(
        upstream.seen().is_empty(),
        "admin traffic never reaches the upstream"
    );
}

#[tokio::test]
async fn the_access_log_has_every_field_and_never_a_secret() {
    let upstream = Upstream::start(Reply::Ok).await;
    // The most verbose level there is: nothing below may print a secret either.
    let bin = Binary::start(
        binary_path(),
        &upstream.url(),
        "[log]\nformat = \"json\"\n",
        &[("RUST_LOG", "trace")],
    )
    .await;
    let secrets = [
        ("authorization", "Bearer s3cr3t-authorization"),
        ("x-auth-token", "s3cr3t-auth-token"),
    ];
    let body =
        r#"{"snapshot":{"name":"s3cr3t-body-name","description":"s3cr3t-body-description"}}"#;
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let got = send(version, "PUT", &bin.url(UPDATE), &secrets, body).await;
        assert_eq!(got.status, StatusCode::OK);
        let got = send(
            version,
            "PUT",
            &bin.url(UPDATE),
            &secrets,
            r#"{"snapshot":{"name":"autobk_snapshot_s3cr3t"}}"#,
        )
        .await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST);
    }
    let got = send(
        Version::HTTP_11,
        "GET",
        &bin.url("/v3/p1/volumes?token=s3cr3t-query"),
        &secrets,
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    bin.signal("TERM");
    let log = bin.log();
    assert!(
        !log.contains("s3cr3t"),
        "a secret reached the log:\n{}",
        log.lines()
            .filter(|l| l.contains("s3cr3t"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let access: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("snapguard::access"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(access.len(), 5, "{log}");
    let first = &access[0];
    for field in [
        "method",
        "path",
        "status",
        "route",
        "decision",
        "rule",
        "error",
        "end",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "upstream_ms",
        "request_id",
    ] {
        assert!(first.get(field).is_some(), "no {field} in {first}");
    }
    assert_eq!(first["method"], "PUT");
    assert_eq!(first["path"], UPDATE);
    assert_eq!(first["decision"], "allowed");
    assert_eq!(first["bytes_in"], body.len());
    assert_eq!(first["bytes_out"], support::OK_BODY.len());
    assert_eq!(first["end"], "complete");
    assert_eq!(access[1]["decision"], "rejected");
    assert_eq!(access[1]["rule"], "reserved_prefix");
    assert_eq!(
        access[4]["path"], "/v3/p1/volumes",
        "the query is not logged"
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_refuses_new_connections() {
    let upstream = Upstream::start(Reply::Slow(Duration::from_millis(1500))).await;
    let mut bin = Binary::start(binary_path(), &upstream.url(), "", &[]).await;
    let url = bin.url("/v3/p1/volumes");
    let in_flight = tokio::spawn(async move { send(Version::HTTP_11, "GET", &url, &[], "").await });
    for _ in 0..200 {
        if !upstream.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.seen().len(), 1, "the slow request is in flight");

    bin.signal("TERM");
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(bin.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "new connections are refused once draining");
    assert_eq!(
        admin_get(bin.admin, "/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let got = in_flight.await.unwrap();
    assert_eq!(
        got.status,
        StatusCode::OK,
        "the in-flight request completes"
    );
    assert_eq!(got.body, support::OK_BODY);
    let status = bin.wait().await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sighup_reloads_under_traffic_and_keeps_the_old_config_when_the_new_one_is_bad() {
    let upstream = Upstream::start(Reply::Ok).await;
    let bin = Binary::start(
        binary_path(),
        &upstream.url(),
        "[policy]\nreserved_prefixes = [\"autobk_snapshot_\"]\n",
        &[],
    )
    .await;
    let team = r#"{"snapshot":{"name":"team_x"}}"#;

    // Traffic throughout: every request must get a complete, expected answer.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, failures, done, put, get) = (
            stop.clone(),
            failures.clone(),
            done.clone(),
            bin.url(UPDATE),
            bin.url("/v3/p1/volumes"),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let a = send(
                    Version::HTTP_11,
                    "PUT",
                    &put,
                    &[],
                    r#"{"snapshot":{"name":"ok"}}"#,
                )
                .await;
                let b = send(Version::HTTP_11, "GET", &get, &[], "").await;
                let c = send(Version::HTTP_11, "PUT", &put, &[], RESERVED).await;
                if a.status != StatusCode::OK
                    || b.status != StatusCode::OK
                    || c.status != StatusCode::BAD_REQUEST
                {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Lets traffic run for a while, so that each step happens under load.
    let some_traffic = || {
        let done = done.clone();
        async move {
            let start = done.load(Ordering::Relaxed);
            while done.load(Ordering::Relaxed) < start + 20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let status_of_team = || async {
        send(Version::HTTP_11, "PUT", &bin.url(UPDATE), &[], team)
            .await
            .status
    };
    assert_eq!(status_of_team().await, StatusCode::OK);

    std::fs::write(
        &bin.config,
        "[policy]\nreserved_prefixes = [\"autobk_snapshot_\", \"team_\"]\n",
    )
    .unwrap();
    some_traffic().await;
    bin.signal("HUP");
    await_sample(
        bin.admin,
        r#"snapguard_config_reloads_total{result="success"}"#,
        1.0,
    )
    .await;
    some_traffic().await;
    assert_eq!(
        status_of_team().await,
        StatusCode::BAD_REQUEST,
        "the new prefix is in force"
    );

    std::fs::write(
        &bin.config,
        "[policy]\nreserved_prefixes = [\"autobk_snapshot_\"]\nnot_a_key = 1\n",
    )
    .unwrap();
    some_traffic().await;
    bin.signal("HUP");
    await_sample(
        bin.admin,
        r#"snapguard_config_reloads_total{result="failure"}"#,
        1.0,
    )
    .await;
    some_traffic().await;
    assert_eq!(
        status_of_team().await,
        StatusCode::BAD_REQUEST,
        "a bad file keeps the config in force"
    );

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(
        done.load(Ordering::Relaxed) > 10,
        "traffic ran during the reloads"
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request was dropped or mis-policed"
    );
    let log = bin.log();
    assert!(
        log.contains("config reload failed") && log.contains("not_a_key"),
        "{log}"
    );
}

#[tokio::test]
async fn audit_mode_logs_counts_and_forwards_violations() {
    let upstream = Upstream::start(Reply::Ok).await;
    let bin = Binary::start(
        binary_path(),
        &upstream.url(),
        "[policy]\nmode = \"audit\"\n",
        &[],
    )
    .await;
    let got = send(Version::HTTP_11, "PUT", &bin.url(UPDATE), &[], RESERVED).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        upstream.only().body,
        RESERVED.as_bytes(),
        "forwarded unchanged"
    );
    await_sample(bin.admin, &requests(ROUTE, "PUT", "audit", 200), 1.0).await;
    await_sample(
        bin.admin,
        r#"snapguard_policy_violations_total{rule="reserved_prefix",field="name"}"#,
        1.0,
    )
    .await;
    let log = bin.log();
    let warn = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("audit mode"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        warn.contains("rule=\"reserved_prefix\"") || warn.contains("rule=reserved_prefix"),
        "{warn}"
    );
    assert!(
        warn.contains("field=\"name\"") || warn.contains("field=name"),
        "{warn}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_header_timeout() {
    let (upstream, proxy) =
        support::pair(Reply::Ok, "[timeouts]\nrequest_header = \"300ms\"\n").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive, then idle: closed by the proxy well within 5 s.
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");

    // A request head trickled slower than the timeout is cut off too.
    let response = raw(
        proxy.addr,
        b"GET /v3/p1/volumes HTTP/1.1\r\nHost:",
        Duration::from_secs(5),
    )
    .await;
    assert!(!response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(upstream.seen().len(), 1);
}

/// Reads until the peer closes; `true` if it did within `wait`.
async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut buf = vec![0u8; 4096];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(wait, read_to_end).await.is_ok()
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed_so_they_cannot_hold_every_slot() {
    let upstream = Upstream::start(Reply::Ok).await;
    let config =
        "[timeouts]\nrequest_header = \"300ms\"\nidle = \"500ms\"\n[limits]\nmax_connections = 2\n";
    let proxy = Proxy::start(&upstream.url(), config).await;

    // A connection that never says anything.
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "a silent connection is closed"
    );

    // An HTTP/2 connection that opens and then sends no request.
    let mut h2 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    assert!(
        closed_within(&mut h2, Duration::from_secs(5)).await,
        "an idle h2c connection is closed"
    );

    // Both slots taken by silent peers: a real request still gets through once they are cut.
    let _a = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        send(
            Version::HTTP_11,
            "GET",
            &proxy.url("/v3/p1/volumes"),
            &[],
            "",
        ),
    )
    .await
    .expect("served despite two silent connections at the limit");
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn an_http2_connection_between_requests_waits_idle_not_the_header_timeout() {
    // HTTP/1 waits for its next request head within request_header; an HTTP/2 connection
    // with no stream open is idle, and has `idle`.
    let (_upstream, proxy) = support::pair(
        Reply::Ok,
        "[timeouts]\nrequest_header = \"300ms\"\nidle = \"3s\"\n",
    )
    .await;
    let (mut sender, conn) = support::h2c(proxy.addr).await;
    let get = || {
        http::Request::get(proxy.url("/v3/p1/volumes"))
            .body(String::new())
            .unwrap()
    };
    let first = sender.send_request(get()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    drop(first);
    // Four header timeouts later, the same connection still serves.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = sender.send_request(get()).await.expect("still open");
    assert_eq!(second.status(), StatusCode::OK);
    drop(second);
    // And it is closed once idle for `idle` (looked at every second).
    let closed = tokio::time::timeout(Duration::from_secs(6), conn).await;
    assert!(closed.is_ok(), "closed after being idle");
}

#[tokio::test]
async fn an_http2_client_resetting_most_of_its_streams_is_told_to_go_away() {
    // The rapid-reset pattern: each stream reset (RST_STREAM CANCEL) a few milliseconds after
    // its HEADERS, while the upstream takes 300 ms. Past 100 abandoned streams, most of the
    // connection's, it gets a GOAWAY and a clean close (hyper's client connection then ends
    // with Ok, where a reset socket would end it with an error), and the cut is counted.
    let (_upstream, proxy) = support::pair(Reply::Slow(Duration::from_millis(300)), "").await;
    let (mut sender, conn) = support::h2c(proxy.addr).await;
    let mut reset = 0;
    while !conn.is_finished() && reset < 1000 {
        if sender.ready().await.is_err() {
            break;
        }
        let get = http::Request::get(proxy.url("/v3/p1/volumes"))
            .body(String::new())
            .unwrap();
        match tokio::time::timeout(Duration::from_millis(3), sender.send_request(get)).await {
            Err(_) => reset += 1,
            Ok(Ok(response)) => panic!("answered before its reset: {response:?}"),
            // Refused: the connection is going away.
            Ok(Err(_)) => break,
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    let ended = ended.expect("the connection was not ended").unwrap();
    assert!(ended.is_ok(), "not a clean GOAWAY and close: {ended:?}");
    assert!(
        (101..=400).contains(&reset),
        "told to go away after {reset}"
    );
    support::await_sample(
        proxy.admin,
        r#"snapguard_peers_cut_total{reason="reset_flood"}"#,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_long_response_is_not_cut_by_the_idle_timeout() {
    let (_upstream, proxy) = support::pair(
        Reply::Slow(Duration::from_millis(1200)),
        "[timeouts]\nidle = \"300ms\"\n",
    )
    .await;
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let got = send(version, "GET", &proxy.url("/v3/p1/volumes"), &[], "").await;
        assert_eq!(got.status, StatusCode::OK, "{version:?}");
    }
}

#[tokio::test]
async fn a_silent_admin_connection_is_closed_after_the_header_timeout() {
    let (_upstream, proxy) = support::pair(Reply::Ok, "").await;
    let header = snapguard::admin::HEADER_TIMEOUT;
    let mut silent = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut silent, header + Duration::from_secs(3)).await,
        "a silent admin connection is closed"
    );
    let closed = started.elapsed();
    assert!(
        closed >= header - Duration::from_millis(500),
        "closed after {closed:?}, before the header timeout"
    );
}

#[tokio::test]
async fn the_admin_listener_serves_at_most_its_connection_limit_at_once() {
    let (_upstream, proxy) = support::pair(Reply::Ok, "").await;
    const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n";
    async fn answered(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 1024];
        matches!(
            tokio::time::timeout(wait, stream.read(&mut buf)).await,
            Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/1.1 200")
        )
    }
    // Every slot held by a kept-alive connection. They are closed HEADER_TIMEOUT (5 s) after
    // their answer, so everything below happens well within that.
    let started = std::time::Instant::now();
    let mut held = Vec::new();
    for _ in 0..snapguard::admin::MAX_CONNECTIONS {
        let mut stream = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
        stream.write_all(HEALTHZ).await.unwrap();
        assert!(answered(&mut stream, Duration::from_secs(2)).await);
        held.push(stream);
    }
    let mut next = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
    next.write_all(HEALTHZ).await.unwrap();
    assert!(
        !answered(&mut next, Duration::from_secs(1)).await,
        "one more connection than the limit was served"
    );
    assert!(
        started.elapsed() < snapguard::admin::HEADER_TIMEOUT - Duration::from_secs(1),
        "too slow to tell the limit from the header timeout: {:?}",
        started.elapsed()
    );
    drop(held.pop());
    assert!(
        answered(&mut next, Duration::from_secs(2)).await,
        "served as soon as a slot is free"
    );
    // The proxy's own traffic port is not affected.
    let got = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn a_refusal_quotes_a_64_kib_value_in_part() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let list = format!("[{}1]", "1,".repeat(32_700));
    for body in [
        format!(r#"{{"snapshot":{{"name":{list}}}}}"#),
        format!(r#"{{"snapshot":{list}}}"#),
    ] {
        assert!(
            body.len() > 65_000 && body.len() <= 65_536,
            "{}",
            body.len()
        );
        let got = send(
            Version::HTTP_11,
            "PUT",
            &proxy.url(UPDATE),
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST);
        assert!(got.body.len() < 1024, "{} bytes", got.body.len());
        let message = got.json()["badRequest"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.contains("[1,1,1,") && message.contains("..."),
            "{message}"
        );
    }
    assert!(upstream.seen().is_empty());
}

/// The WARN line the upstream failure of one request left in `bin`'s log.
fn upstream_failure(bin: &Binary) -> String {
    let log = bin.log();
    log.lines()
        .find(|l| l.contains("WARN") && l.contains("upstream failure"))
        .unwrap_or_else(|| panic!("no upstream failure logged:\n{log}"))
        .to_owned()
}

/// A TLS upstream serving `cert` (signed by `key`).
async fn tls_upstream(cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> Upstream {
    let key = tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let tls = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    Upstream::start_with(
        Reply::Ok,
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))),
    )
    .await
}

/// Each way a connection to the upstream fails is logged with what failed, where, and what to
/// do, in words; the downstream gets the same fixed text whatever it was.
#[tokio::test]
async fn upstream_connection_failures_are_logged_with_cause_place_and_fix() {
    let closed = support::free_addr();
    let plain = Upstream::start(Reply::Ok).await;
    // A self-signed CA certificate, served as the upstream's own and given as its CA.
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = params.self_signed(&key).unwrap();
    let ca_upstream = tls_upstream(&ca, &key).await;
    let ca_file = std::env::temp_dir().join(format!(
        "snapguard-test-ca-as-leaf-{}.pem",
        ca_upstream.addr.port()
    ));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    // The flags apply before the file is validated: a file naming a plain-http upstream with a
    // CA bundle is fine once --upstream says https.
    let with_ca = format!(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\nca_file = {:?}\n",
        ca_file.display().to_string()
    );

    let cases = [
        (
            format!("http://{closed}"),
            String::new(),
            vec![
                format!(
                    "cannot connect to upstream http://{closed}: {closed} refused the connection"
                ),
                "check the port in upstream.url".to_owned(),
            ],
        ),
        (
            "http://does-not-exist.invalid:8776".to_owned(),
            String::new(),
            vec![
                "cannot resolve does-not-exist.invalid, the host of upstream \
                 http://does-not-exist.invalid:8776"
                    .to_owned(),
                "check the host name in upstream.url".to_owned(),
            ],
        ),
        (
            format!("https://{}", plain.addr),
            String::new(),
            vec![
                format!(
                    "TLS handshake with upstream https://{0} failed: {0} answered in plain text, \
                     not TLS",
                    plain.addr
                ),
                "write http:// in upstream.url".to_owned(),
            ],
        ),
        (
            format!("https://{}", ca_upstream.addr),
            with_ca,
            vec![
                format!(
                    "the certificate of upstream https://{} was refused: it is a CA certificate",
                    ca_upstream.addr
                ),
                "serve a certificate issued by that CA".to_owned(),
            ],
        ),
    ];
    for (url, toml, wanted) in cases {
        let bin = Binary::start(binary_path(), &url, &toml, &[]).await;
        let got = send(Version::HTTP_11, "GET", &bin.url("/v3/p1/volumes"), &[], "").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{url}");
        assert_eq!(
            got.json()["computeFault"]["message"],
            "The block storage service could not be reached.",
            "the downstream is told nothing of the cause"
        );
        let line = upstream_failure(&bin);
        for words in wanted {
            assert!(line.contains(&words), "{url}: no {words:?} in\n{line}");
        }
    }
    std::fs::remove_file(&ca_file).unwrap();
}

/// A warning and the access line of the same request carry the same plain request id, so
/// that JSON log lines can be joined on it.
#[tokio::test]
async fn json_log_lines_of_one_request_carry_the_same_plain_request_id() {
    // Audit mode warns about the violation it forwards; a closed upstream port adds an
    // upstream failure to the same request.
    let closed = support::free_addr();
    let bin = Binary::start(
        binary_path(),
        &format!("http://{closed}"),
        "[policy]\nmode = \"audit\"\n[log]\nformat = \"json\"\n",
        &[],
    )
    .await;
    let got = send(Version::HTTP_11, "PUT", &bin.url(UPDATE), &[], RESERVED).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let id = got.headers["x-request-id"].to_str().unwrap().to_owned();
    let log = bin.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l.get("request_id").is_some())
        .collect();
    let message = |l: &serde_json::Value| l["message"].as_str().unwrap_or("").to_owned();
    for wanted in [
        "policy violation forwarded (audit mode)",
        "upstream failure",
    ] {
        let line = lines
            .iter()
            .find(|l| message(l) == wanted)
            .unwrap_or_else(|| panic!("no {wanted:?} line with a request_id in:\n{log}"));
        assert_eq!(
            line["request_id"], id,
            "{wanted:?}: the request id as the access line has it (src/proxy.rs must log \
             `request_id = cx.id.to_str().unwrap_or(\"-\")`, not `?cx.id`)"
        );
    }
    let access = lines
        .iter()
        .find(|l| l["target"] == "snapguard::access")
        .unwrap_or_else(|| panic!("no access line:\n{log}"));
    assert_eq!(access["request_id"], id);
}

/// A reload that changes nothing the upstream client is built from keeps it, and the
/// connection it holds open; one that does builds a new one.
#[tokio::test]
async fn a_reload_with_the_same_upstream_keeps_the_pooled_connection() {
    let upstream = Upstream::start(Reply::Ok).await;
    let proxy = Proxy::start(&upstream.url(), "").await;
    let Some(handle) = proxy.handle.clone() else {
        return; // A spawned binary (SNAPGUARD_BIN): covered by the SIGHUP tests.
    };
    let url = proxy.url("/v3/p1/volumes");
    let get = || send(Version::HTTP_11, "GET", &url, &[], "");
    assert_eq!(get().await.status, StatusCode::OK);
    assert_eq!(upstream.accepted(), 1);

    let config = |toml: &str| {
        let mut config = snapguard::Config::from_toml(toml).unwrap();
        config.upstream.url = upstream.url().parse().unwrap();
        config
    };
    // The policy changes, the upstream does not.
    let same = config("[policy]\nreserved_prefixes = [\"team_\"]\n");
    handle.reload_with(move || Ok(same)).await.unwrap();
    assert_eq!(get().await.status, StatusCode::OK);
    assert_eq!(
        upstream.accepted(),
        1,
        "the warm connection was dropped by a reload that did not touch the upstream \
         (src/proxy.rs needs `Runtime::with_upstream`, see the ops report)"
    );

    let other = config("[timeouts]\nupstream_idle = \"30s\"\n");
    handle.reload_with(move || Ok(other)).await.unwrap();
    assert_eq!(get().await.status, StatusCode::OK);
    assert_eq!(
        upstream.accepted(),
        2,
        "a new client for a new pool timeout"
    );
}

/// The reload's slow part (reading, compiling, loading roots) runs off the runtime: on a
/// single-threaded runtime, as `workers = 1` runs, a request is served while a reload loads.
#[tokio::test]
async fn a_slow_reload_does_not_stall_traffic() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let Some(handle) = proxy.handle.clone() else {
        return;
    };
    let mut config = snapguard::Config::default();
    config.upstream.url = upstream.url().parse().unwrap();
    let reload = tokio::spawn(async move {
        handle
            .reload_with(move || {
                std::thread::sleep(Duration::from_millis(1500));
                Ok(config)
            })
            .await
            .is_ok()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let got = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "a request waited {:?} for a reload",
        started.elapsed()
    );
    assert!(reload.await.unwrap(), "the reload went through");
}

/// Log lines written on this thread, for the in-process server.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_reload_that_moves_the_listeners_names_the_addresses_in_force_and_reloaded() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let Some(handle) = proxy.handle.clone() else {
        return;
    };
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let mut config = snapguard::Config::default();
    config.upstream.url = upstream.url().parse().unwrap();
    config.listen = "127.0.0.1:18081".parse().unwrap();
    config.admin = "127.0.0.1:0".parse().unwrap();
    handle.reload(Ok(config)).unwrap();
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // In-process, the listener in force is the configured 127.0.0.1:0.
    let line = log
        .lines()
        .find(|l| l.contains("WARN"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("listen changes only on restart: still serving on the address in force")
            && line.contains("in_force=127.0.0.1:0")
            && line.contains("reloaded=127.0.0.1:18081"),
        "{line}"
    );
    assert!(
        !log.contains("admin changes"),
        "admin did not change:\n{log}"
    );
}

#[tokio::test]
async fn a_config_file_replaced_by_rename_is_seen_by_the_watch_before_the_timer() {
    // An editor's or a ConfigMap's way: a new file renamed over the old one. The periodic
    // re-read is an hour away, so only the watch on the directory can pick this up.
    let upstream = Upstream::start(Reply::Ok).await;
    let bin = Binary::start(
        binary_path(),
        &upstream.url(),
        "reload_interval = \"1h\"\n",
        &[],
    )
    .await;
    let url = bin.url(UPDATE);
    let team = r#"{"snapshot":{"name":"team_x"}}"#;
    assert_eq!(
        send(Version::HTTP_11, "PUT", &url, &[], team).await.status,
        StatusCode::OK
    );
    let next = bin.config.with_extension("toml.new");
    std::fs::write(
        &next,
        "reload_interval = \"1h\"\n[policy]\nreserved_prefixes = [\"team_\"]\n",
    )
    .unwrap();
    std::fs::rename(&next, &bin.config).unwrap();
    await_sample(
        bin.admin,
        r#"snapguard_config_reloads_total{result="success"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        send(Version::HTTP_11, "PUT", &url, &[], team).await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn a_changed_config_file_is_reloaded_without_a_signal() {
    // As a Kubernetes ConfigMap update reaches a pod: the file changes, nobody sends SIGHUP.
    let upstream = Upstream::start(Reply::Ok).await;
    let bin = Binary::start(
        binary_path(),
        &upstream.url(),
        "reload_interval = \"200ms\"\n[policy]\nreserved_prefixes = [\"autobk_snapshot_\"]\n",
        &[],
    )
    .await;
    let team = r#"{"snapshot":{"name":"team_x"}}"#;
    let url = bin.url(UPDATE);
    let put = || send(Version::HTTP_11, "PUT", &url, &[], team);
    assert_eq!(put().await.status, StatusCode::OK);
    std::fs::write(
        &bin.config,
        "reload_interval = \"200ms\"\n[policy]\nreserved_prefixes = [\"autobk_snapshot_\", \"team_\"]\n",
    )
    .unwrap();
    await_sample(
        bin.admin,
        r#"snapguard_config_reloads_total{result="success"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        put().await.status,
        StatusCode::BAD_REQUEST,
        "the new prefix is in force"
    );
    // A bad file keeps the config in force, and is not retried until it changes again.
    std::fs::write(&bin.config, "reload_interval = \"200ms\"\nnot_a_key = 1\n").unwrap();
    await_sample(
        bin.admin,
        r#"snapguard_config_reloads_total{result="failure"}"#,
        1.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    await_sample(
        bin.admin,
        r#"snapguard_config_reloads_total{result="failure"}"#,
        1.0,
    )
    .await;
    assert_eq!(put().await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn memory_held_by_a_connection_storm_goes_back_to_the_system() {
    // 1,500 connections with a partial request head take some 40 MiB; once they are gone,
    // snapguard gives it back (src/memory.rs) instead of keeping it in malloc's heaps.
    let upstream = Upstream::start(Reply::Ok).await;
    let bin = Binary::start(binary_path(), &upstream.url(), "", &[]).await;
    let idle = bin.rss_kb();
    let mut storm = Vec::new();
    for _ in 0..1500 {
        let mut s = tokio::net::TcpStream::connect(bin.addr).await.unwrap();
        s.write_all(b"GET /v3/p1/snapshots HTTP/1.1\r\nHost: x\r\nX-Partial: ")
            .await
            .unwrap();
        storm.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = bin.rss_kb();
    assert!(
        peak > idle + 16 * 1024,
        "the storm took too little to tell: {idle} -> {peak} KiB"
    );
    drop(storm);
    let mut after = peak;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = bin.rss_kb();
        if after < idle * 2 {
            break;
        }
    }
    assert!(
        after < idle * 2,
        "RSS {idle} KiB idle, {peak} at the storm's peak, {after} after"
    );
}

/// A loopback TCP socket as /proc/net/tcp has it.
#[derive(Debug)]
struct TcpRow {
    local: u16,
    remote: u16,
    /// Bytes sent and not yet acknowledged, or not sent at all.
    tx_queue: u64,
    /// The `tr` field: 2 while a keepalive timer is armed, 0 for none.
    timer: u8,
}

/// The IPv4 TCP sockets of this network namespace (the proxy's among them).
fn tcp_rows() -> Vec<TcpRow> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
    let first = |f: &str| f.split(':').next().unwrap().to_owned();
    table
        .lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            TcpRow {
                local: port(f[1]),
                remote: port(f[2]),
                tx_queue: u64::from_str_radix(&first(f[4]), 16).unwrap(),
                timer: first(f[5]).parse().unwrap(),
            }
        })
        .collect()
}

/// The socket from local port `local` to remote port `remote`.
fn tcp_row(local: u16, remote: u16) -> TcpRow {
    tcp_rows()
        .into_iter()
        .find(|r| r.local == local && r.remote == remote)
        .unwrap_or_else(|| panic!("no socket {local} -> {remote}"))
}

#[tokio::test]
async fn connections_have_tcp_keepalive_on_both_sides_unless_turned_off() {
    for (toml, want) in [("", 2), ("[timeouts]\ntcp_keepalive = \"0s\"\n", 0)] {
        let (upstream, proxy) = support::pair(Reply::Ok, toml).await;
        let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        client
            .write_all(b"GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = client.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // Downstream: the proxy's end of this connection. Upstream: the proxy's end of the
        // pooled connection, the only one to the upstream's port not the upstream's own.
        let downstream = tcp_row(proxy.addr.port(), client.local_addr().unwrap().port());
        let outbound: Vec<TcpRow> = tcp_rows()
            .into_iter()
            .filter(|r| r.remote == upstream.addr.port())
            .collect();
        assert_eq!(
            outbound.len(),
            1,
            "one pooled upstream connection: {outbound:?}"
        );
        assert_eq!(downstream.timer, want, "downstream socket, config {toml:?}");
        assert_eq!(outbound[0].timer, want, "upstream socket, config {toml:?}");
    }
}

#[tokio::test]
async fn the_access_log_says_how_each_exchange_ended() {
    let upstream = Upstream::start(Reply::Stalls(256 * 1024)).await;
    let toml =
        "[log]\nformat = \"json\"\n[timeouts]\nbody_idle = \"400ms\"\nshutdown_grace = \"5s\"\n\
                [limits]\nmin_body_rate = 0\nbuffer_request_body = 16\n";
    let bin = Binary::start(binary_path(), &upstream.url(), toml, &[]).await;
    let exchange = |raw: &'static [u8], wait: u64| {
        let addr = bin.addr;
        async move { support::raw(addr, raw, Duration::from_millis(wait)).await }
    };
    // The upstream's response stalls after its head: broken off on the upstream's side.
    let broke = exchange(
        b"GET /v3/p1/volumes/broke HTTP/1.1\r\nHost: x\r\n\r\n",
        3000,
    )
    .await;
    assert!(broke.starts_with("HTTP/1.1 200"), "{broke}");
    // A HEAD refused by snapguard: its error body may not be sent, and hyper never polls it.
    let head = exchange(
        b"HEAD /v3/p1/volumes/head HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        500,
    );
    assert!(head.await.starts_with("HTTP/1.1 400"));
    // An upload that stops: cut for its pace.
    let cut = exchange(
        b"POST /v3/p1/volumes/cut HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789012345678901234567890123456789",
        3000,
    );
    assert!(cut.await.starts_with("HTTP/1.1 408"));
    // A client that takes the head and goes away.
    let mut gone = tokio::net::TcpStream::connect(bin.addr).await.unwrap();
    gone.write_all(b"GET /v3/p1/volumes/gone HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = gone.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(gone);
    tokio::time::sleep(Duration::from_millis(300)).await;
    bin.signal("TERM");
    let log = bin.log();
    let ends: std::collections::BTreeMap<String, (String, String)> = log
        .lines()
        .filter(|l| l.contains("snapguard::access"))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            let field = |k: &str| v.get(k).and_then(|f| f.as_str()).unwrap_or("").to_owned();
            (field("path"), (field("end"), field("error")))
        })
        .collect();
    let want = |end: &str, error: &str| Some((end.to_owned(), error.to_owned()));
    assert_eq!(
        ends.get("/v3/p1/volumes/broke").cloned(),
        want("upstream_broke", "body_idle"),
        "{log}"
    );
    assert_eq!(
        ends.get("/v3/p1/volumes/head").cloned(),
        want("complete", "bad_host"),
        "{log}"
    );
    assert_eq!(
        ends.get("/v3/p1/volumes/cut").cloned(),
        want("request_cut", "body_idle"),
        "{log}"
    );
    assert_eq!(
        ends.get("/v3/p1/volumes/gone").cloned(),
        want("abandoned", "-"),
        "{log}"
    );
}

#[tokio::test]
async fn a_client_that_does_not_read_holds_little_in_the_kernel() {
    // Without a bound on unsent data, the kernel grows the send buffer to tcp_wmem's maximum
    // (4 MiB here) whatever the peer reads, and snapguard moved about 3 MiB of a large response
    // into it for a client that reads nothing. With TCP_NOTSENT_LOWAT, about 128 KiB wait.
    let (_upstream, proxy) = support::pair(Reply::Large(16 * 1024 * 1024), "").await;
    let client = support::taking_nothing(proxy.addr).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued = tcp_row(proxy.addr.port(), client.local_addr().unwrap().port()).tx_queue;
    assert!(
        queued < 512 * 1024,
        "{queued} bytes queued for a client that reads nothing"
    );
}
