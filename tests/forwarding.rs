//! Forwarding behaviour of the real proxy: streaming, framing, headers, upstream failures, TLS.

// Tests fail by panicking; the no-unwrap rule is for the request path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use bytes::Bytes;
use http::{StatusCode, Version};
use support::{raw, send, send_body, Proxy, Reply, TestBody, Upstream, FAST_TIMEOUTS, OK_BODY};

const UPDATE: &str = "/v3/p1/snapshots/s1";
const RESERVED: &str = r#"{"snapshot":{"name":"autobk_snapshot_x"}}"#;
const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn sixty_four_mebibytes_stream_through_in_both_directions() {
    let (upstream, proxy) = support::pair(Reply::Large(64 * MIB), "").await;
    let got = send_body(
        Version::HTTP_11,
        "POST",
        &proxy.url("/v3/p1/volumes/v1/action"),
        &[("content-type", "application/octet-stream")],
        TestBody::pattern(64 * MIB),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    support::assert_pattern(&got.body, 64 * MIB);
    let seen = upstream.only();
    support::assert_pattern(&seen.body, 64 * MIB);
    assert_eq!(
        seen.headers["content-length"],
        (64 * MIB).to_string().as_str()
    );
}

#[tokio::test]
async fn a_passthrough_body_is_streamed_not_buffered() {
    // Each chunk is sent only once the upstream has received the previous one: a proxy that
    // buffered the body whole would never deliver the first, and the test would time out.
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let url = proxy.url("/v3/p1/volumes/v1/action");
    let request = tokio::spawn(async move {
        send_body(Version::HTTP_11, "POST", &url, &[], TestBody::Channel(rx)).await
    });
    let mut progress = upstream.progress.clone();
    // Each chunk is larger than the 64 KiB that would be buffered.
    for i in 1..=8u64 {
        tx.send(Bytes::from(vec![b'x'; 96 * 1024])).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            progress.wait_for(|n| *n >= i * 96 * 1024),
        )
        .await
        .expect("the upstream must receive each chunk before the body ends")
        .unwrap();
    }
    drop(tx);
    let got = request.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(upstream.only().body.len(), 8 * 96 * 1024);
}

#[tokio::test]
async fn a_small_passthrough_body_is_read_whole_and_sent_in_one_piece() {
    // Trickled in one-byte chunks, it reaches the upstream reframed with a Content-Length.
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let body = b"{\"volume\":{\"size\":1}}";
    let mut request =
        b"POST /v3/p1/volumes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for byte in body {
        request.extend_from_slice(b"1\r\n");
        request.push(*byte);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let response = raw(proxy.addr, &request, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.only();
    assert_eq!(seen.body, &body[..]);
    assert_eq!(
        seen.headers["content-length"],
        body.len().to_string().as_str()
    );
    assert!(!seen.headers.contains_key("transfer-encoding"));
}

#[tokio::test]
async fn a_slow_small_passthrough_upload_never_reaches_the_upstream() {
    // A body dripping slower than timeouts.request_body allows holds only its own connection:
    // it is answered 408 without an upstream connection ever being opened.
    let (upstream, proxy) = support::pair(Reply::Ok, FAST_TIMEOUTS).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v3/p1/volumes HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\nab")
        .await
        .unwrap();
    let mut response = String::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("connection: close"), "{response}");
    assert_eq!(upstream.accepted(), 0);
    support::await_sample(
        proxy.admin,
        r#"snapguard_peers_cut_total{reason="request_body_timeout"}"#,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_chunked_policed_body_is_policed_and_reframed() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let body = r#"{"snapshot":{"name":"snap-001"}}"#;
    let (a, b) = body.split_at(13);
    let request = format!(
        "PUT {UPDATE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let response = raw(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.only();
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(
        seen.headers["content-length"],
        body.len().to_string().as_str()
    );
    assert!(!seen.headers.contains_key("transfer-encoding"));

    // The same framing with a reserved name never reaches the upstream.
    let (a, b) = RESERVED.split_at(20);
    let request = format!(
        "PUT {UPDATE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let response = raw(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn an_oversized_chunked_body_is_refused_and_the_connection_closed() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let chunk = "a".repeat(40_000);
    let request = format!(
        "PUT {UPDATE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{n:x}\r\n{chunk}\r\n{n:x}\r\n{chunk}\r\n0\r\n\r\n",
        n = chunk.len()
    );
    // No Connection: close from us: the proxy must close by itself after a 413.
    let response = raw(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response:.200}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response:.300}"
    );
    assert!(response.contains("overLimit"));
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn a_chunked_get_body_is_passed_through() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let request = "GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    let response = raw(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(upstream.only().body, "abcde");
}

#[tokio::test]
async fn content_length_zero_is_preserved() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let request = "POST /v3/p1/volumes/v1/action HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let response = raw(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.only();
    assert_eq!(seen.headers["content-length"], "0");
    assert!(seen.body.is_empty());

    // An empty policed body is not JSON, and is refused.
    let request = format!(
        "PUT {UPDATE} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let response = raw(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let upstream = Upstream::start(Reply::WithHeaders(vec![
        ("connection", "x-upstream-hop"),
        ("x-upstream-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("x-end-to-end", "kept"),
    ]))
    .await;
    let proxy = Proxy::start(&upstream.url(), "").await;
    let request = "GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: websocket\r\nX-Kept: yes\r\n\r\n";
    let response = raw(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.only();
    for gone in [
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.headers["x-kept"], "yes");
    let lower = response.to_ascii_lowercase();
    assert!(!lower.contains("x-upstream-hop"), "{response}");
    assert!(!lower.contains("keep-alive"), "{response}");
    assert!(lower.contains("x-end-to-end: kept"), "{response}");
}

#[tokio::test]
async fn h2c_requests_are_policed_like_http1() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let got = send(Version::HTTP_2, "PUT", &proxy.url(UPDATE), &[], RESERVED).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.json()["badRequest"]["code"], 400);
    assert!(upstream.seen().is_empty());

    let got = send(
        Version::HTTP_2,
        "PUT",
        &proxy.url(UPDATE),
        &[],
        r#"{"snapshot":{"display_name":"new"}}"#,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, OK_BODY);
    let seen = upstream.only();
    assert_eq!(seen.body, r#"{"snapshot":{"name":"new"}}"#.as_bytes());
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.target, UPDATE);
}

#[tokio::test]
async fn an_upstream_that_is_down_gives_502_in_the_route_style() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(&format!("http://{closed}"), FAST_TIMEOUTS).await;
    let got = send(
        Version::HTTP_11,
        "PUT",
        &proxy.url(UPDATE),
        &[],
        r#"{"snapshot":{"name":"ok"}}"#,
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.json()["computeFault"]["code"], 502);
    assert!(got.headers.contains_key("x-request-id"));

    let got = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    assert_eq!(
        got.status,
        StatusCode::BAD_GATEWAY,
        "passthrough requests fail in openstack style"
    );
    assert_eq!(got.json()["computeFault"]["code"], 502);

    let got = send(
        Version::HTTP_11,
        "PUT",
        &proxy.url("/v5/p1/snapshots/s1"),
        &[],
        r#"{"snapshot":{"name":"ok"}}"#,
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.json()["error"]["code"], "EVS.5502");
}

#[tokio::test]
async fn a_silent_upstream_gives_504() {
    let (upstream, proxy) = support::pair(Reply::Silent, FAST_TIMEOUTS).await;
    let got = send(
        Version::HTTP_11,
        "PUT",
        &proxy.url(UPDATE),
        &[],
        r#"{"snapshot":{"name":"ok"}}"#,
    )
    .await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(got.json()["computeFault"]["code"], 504);
    assert_eq!(
        upstream.seen().len(),
        1,
        "the request did reach the upstream"
    );
}

#[tokio::test]
async fn a_trickled_policed_body_times_out_with_408() {
    let (upstream, proxy) = support::pair(Reply::Ok, FAST_TIMEOUTS).await;
    // Content-Length promises more than is ever sent.
    let request =
        format!("PUT {UPDATE} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"snapshot\":");
    let response = raw(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn host_and_forwarded_headers_are_set_for_the_upstream() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let got = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[("x-forwarded-for", "10.0.0.1")],
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = upstream.only();
    assert_eq!(seen.headers["host"], upstream.addr.to_string().as_str());
    // The peer is not a trusted proxy: what it claims is overwritten.
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        proxy.addr.to_string().as_str()
    );
    assert!(!seen.headers.contains_key("forwarded"));

    // From a trusted proxy, its chain is appended to and its proto and host kept.
    let (upstream, proxy) = support::pair(
        Reply::Ok,
        "[forwarding]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    )
    .await;
    send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "api.example.com"),
        ],
        "",
    )
    .await;
    let seen = upstream.only();
    assert_eq!(seen.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-host"], "api.example.com");

    let (upstream, proxy) = support::pair(
        Reply::Ok,
        "[upstream]\npreserve_host = true\n[forwarding]\nx_forwarded = false\n",
    )
    .await;
    send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    let seen = upstream.only();
    assert_eq!(seen.headers["host"], proxy.addr.to_string().as_str());
    assert!(!seen.headers.contains_key("x-forwarded-for"));
}

#[tokio::test]
async fn request_ids_travel_both_ways() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let got = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[("x-request-id", "trace-42")],
        "",
    )
    .await;
    assert_eq!(got.headers["x-request-id"], "trace-42");
    assert_eq!(upstream.only().headers["x-request-id"], "trace-42");

    let got = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    let made = got.headers["x-request-id"].clone();
    assert!(made.to_str().unwrap().starts_with("req-"));
    assert_eq!(upstream.seen()[1].headers["x-request-id"], made);

    let got = send(
        Version::HTTP_11,
        "PUT",
        &proxy.url(UPDATE),
        &[("x-request-id", "trace-43")],
        RESERVED,
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.headers["x-request-id"], "trace-43");
}

#[tokio::test]
async fn signed_requests_are_policed_but_forwarded_byte_for_byte() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let auth = (
        "authorization",
        "SDK-HMAC-SHA256 Access=AK, SignedHeaders=content-type;host;x-sdk-date, Signature=abc",
    );
    let body = r#"{"snapshot": {"display_name": "new"}}"#;
    let headers = [
        auth,
        ("content-type", "application/json"),
        ("x-sdk-date", "20261126T000000Z"),
    ];
    let got = send(Version::HTTP_11, "PUT", &proxy.url(UPDATE), &headers, body).await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = upstream.only();
    assert_eq!(
        seen.body,
        body.as_bytes(),
        "a signed body is never normalized"
    );
    // Every signed header arrives as sent: Host too, although preserve_host is off.
    assert_eq!(seen.headers["host"], proxy.addr.to_string().as_str());
    assert_eq!(seen.headers["content-type"], "application/json");
    assert_eq!(seen.headers["x-sdk-date"], "20261126T000000Z");
    assert_eq!(seen.headers["authorization"], auth.1);

    let got = send(
        Version::HTTP_11,
        "PUT",
        &proxy.url(UPDATE),
        &[auth],
        r#"{"snapshot":{"display_name":"autobk_snapshot_1"}}"#,
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn audit_mode_forwards_violations_unchanged() {
    let (upstream, proxy) = support::pair(
        Reply::Ok,
        "[policy]\nmode = \"audit\"\nmax_body_bytes = 100\n",
    )
    .await;
    let got = send(Version::HTTP_11, "PUT", &proxy.url(UPDATE), &[], RESERVED).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(upstream.only().body, RESERVED.as_bytes());

    // Over the body limit, without a Content-Length: the part read and the rest both arrive,
    // the rest streamed (larger than what gathering small frames could hold whole).
    let big = format!(r#"{{"snapshot":{{"name":"{}"}}}}"#, "a".repeat(100_000));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let chunks: Vec<Bytes> = big
        .as_bytes()
        .chunks(64)
        .map(Bytes::copy_from_slice)
        .collect();
    tokio::spawn(async move {
        for chunk in chunks {
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
    });
    let got = send_body(
        Version::HTTP_11,
        "PUT",
        &proxy.url(UPDATE),
        &[],
        TestBody::Channel(rx),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body, big.as_bytes());
    assert!(
        !seen[1].headers.contains_key("content-length"),
        "streamed on, not re-framed"
    );
}

#[tokio::test]
async fn an_encoded_slash_in_a_snapshot_route_is_refused() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let got = send(
        Version::HTTP_11,
        "PUT",
        &proxy.url("/v3/p1%2Fsnapshots/s1"),
        &[],
        r#"{"snapshot":{"name":"ok"}}"#,
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn an_https_upstream_is_verified_against_the_configured_ca() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let key = tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(
        cert.signing_key.serialize_der().into(),
    );
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let tls = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let upstream = Upstream::start_with(
        Reply::Ok,
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))),
    )
    .await;
    let url = format!("https://{}", upstream.addr);

    let ca = std::env::temp_dir().join(format!("snapguard-test-ca-{}.pem", upstream.addr.port()));
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let proxy = Proxy::start(
        &url,
        &format!(
            "[upstream]\nurl = \"{url}\"\nca_file = {:?}\n",
            ca.display().to_string()
        ),
    )
    .await;
    let got = send(
        Version::HTTP_11,
        "PUT",
        &proxy.url(UPDATE),
        &[],
        r#"{"snapshot":{"display_name":"new"}}"#,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{:?}", got.body);
    assert_eq!(
        upstream.only().body,
        r#"{"snapshot":{"name":"new"}}"#.as_bytes()
    );
    std::fs::remove_file(&ca).unwrap();

    // Without the CA the certificate is not trusted: 502, and nothing is sent.
    let mut config = snapguard::Config::default();
    config.upstream.url = url.parse().unwrap();
    let metrics = snapguard::metrics::Metrics::default();
    if let Err(e) = snapguard::proxy::Runtime::new(config.clone(), &metrics) {
        // On a machine without system roots, refusing to start is the same verdict.
        return assert!(e.to_string().contains("root"), "{e}");
    }
    let proxy = Proxy::start_config(config).await;
    let got = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn signed_headers_are_never_rewritten() {
    let (upstream, proxy) = support::pair(Reply::Ok, "").await;
    let auth =
        "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host;x-request-id;x-forwarded-for, Signature=abc";
    let headers = [
        ("authorization", auth),
        ("x-request-id", "not a sane id"),
        ("x-forwarded-for", "10.1.1.1"),
    ];
    let got = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &headers,
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = upstream.only();
    assert_eq!(seen.headers["host"], proxy.addr.to_string().as_str());
    assert_eq!(seen.headers["x-request-id"], "not a sane id");
    // A signature does not let an untrusted peer choose where the request came from: the
    // header is overwritten (and the upstream refuses the signature, as it should).
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(
        seen.headers["x-forwarded-proto"], "http",
        "unsigned headers are still set"
    );

    // From a trusted proxy, a signed forwarding header reaches the upstream as it came.
    let (upstream, proxy) = support::pair(
        Reply::Ok,
        "[forwarding]\ntrusted_proxies = [\"127.0.0.1\"]\n",
    )
    .await;
    let url = proxy.url("/v3/p1/volumes");
    let got = send(Version::HTTP_11, "GET", &url, &headers, "").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(upstream.only().headers["x-forwarded-for"], "10.1.1.1");
}

#[tokio::test]
async fn the_http2_authority_is_the_downstream_host() {
    let (upstream, proxy) = support::pair(Reply::Ok, "[upstream]\npreserve_host = true\n").await;
    let got = send(
        Version::HTTP_2,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = upstream.only();
    assert_eq!(seen.headers["host"], proxy.addr.to_string().as_str());
    assert_eq!(
        seen.headers["x-forwarded-host"],
        proxy.addr.to_string().as_str()
    );
}

#[tokio::test]
async fn the_upstream_deadline_starts_once_the_body_is_sent() {
    // A streamed body: larger than what is buffered.
    let toml = format!("{FAST_TIMEOUTS}\n[limits]\nbuffer_request_body = 16\n");
    let (upstream, proxy) = support::pair(Reply::Ok, &toml).await;
    // A body trickled over 1.5 s, three times the 500 ms upstream deadline, but never idle
    // for as long as the deadline.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(190)).await;
            if tx.send(Bytes::from_static(b"0123456789")).await.is_err() {
                return;
            }
        }
    });
    let url = proxy.url("/v3/p1/volumes/v1/action");
    let got = send_body(Version::HTTP_11, "POST", &url, &[], TestBody::Channel(rx)).await;
    assert_eq!(got.status, StatusCode::OK, "{:?}", got.body);
    assert_eq!(upstream.only().body.len(), 80);
}

#[tokio::test]
async fn a_body_that_breaks_off_is_the_downstream_fault() {
    let (_upstream, proxy) = support::pair(Reply::Ok, "").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v3/p1/volumes/v1/action HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nonly this")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut response = String::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await;
    assert!(
        !response.starts_with("HTTP/1.1 502"),
        "not blamed on the upstream: {response}"
    );
    let metrics = support::admin_get(proxy.admin, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("snapguard_upstream_errors_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(errors.is_empty(), "{text}");
}

// Upstream connections: kept alive, reused only when whole, closed when idle.

const ALLOWED: &str = r#"{"snapshot":{"name":"snap-001"}}"#;

/// Waits until `upstream` has `want` connections open, or panics after a few seconds.
async fn await_open(upstream: &Upstream, want: usize) {
    for _ in 0..200 {
        if upstream.open() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "upstream has {} connections open, not {want}",
        upstream.open()
    );
}

#[tokio::test]
async fn one_upstream_connection_serves_requests_in_turn() {
    for reply in [Reply::Ok, Reply::Large(MIB)] {
        let (upstream, proxy) = support::pair(reply, "").await;
        for i in 0..6 {
            let got = if i % 2 == 0 {
                send(
                    Version::HTTP_11,
                    "GET",
                    &proxy.url("/v3/p1/volumes"),
                    &[],
                    "",
                )
                .await
            } else {
                send(Version::HTTP_11, "PUT", &proxy.url(UPDATE), &[], ALLOWED).await
            };
            assert_eq!(got.status, StatusCode::OK);
        }
        assert_eq!(upstream.seen().len(), 6);
        assert_eq!(
            upstream.accepted(),
            1,
            "the connection went back to the pool"
        );
    }
}

#[tokio::test]
async fn an_abandoned_response_closes_its_upstream_connection() {
    let (upstream, proxy) = support::pair(Reply::Large(64 * MIB), "").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 4096];
    let n = stream.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    drop(stream);
    // The rest of that body would be read as the next response: the connection must close.
    await_open(&upstream, 0).await;

    let got = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    support::assert_pattern(&got.body, 64 * MIB);
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn connections_the_upstream_closes_are_not_reused() {
    // Said in the response...
    let close = Reply::WithHeaders(vec![("connection", "close")]);
    let (upstream, proxy) = support::pair(close, "").await;
    for _ in 0..3 {
        let got = send(Version::HTTP_11, "PUT", &proxy.url(UPDATE), &[], ALLOWED).await;
        assert_eq!(got.status, StatusCode::OK);
    }
    assert_eq!(upstream.accepted(), 3);

    // ...or not: an upstream that hangs up after every response, without a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let proxy = Proxy::start(&format!("http://{addr}"), "").await;
    for _ in 0..3 {
        let got = send(
            Version::HTTP_11,
            "GET",
            &proxy.url("/v3/p1/volumes"),
            &[],
            "",
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body, "ok");
        // Time for the hang-up to arrive: a request racing it is lost on any keep-alive client.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_after_upstream_idle() {
    let (upstream, proxy) =
        support::pair(Reply::Ok, "[timeouts]\nupstream_idle = \"300ms\"\n").await;
    let got = send(Version::HTTP_11, "PUT", &proxy.url(UPDATE), &[], ALLOWED).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(upstream.open(), 1, "kept for the next request");
    await_open(&upstream, 0).await;

    let got = send(Version::HTTP_11, "PUT", &proxy.url(UPDATE), &[], ALLOWED).await;
    assert_eq!(got.status, StatusCode::OK, "a new connection replaces it");
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn upstream_connections_are_capped_and_requests_wait_for_one() {
    let (upstream, proxy) = support::pair(
        Reply::Slow(Duration::from_millis(200)),
        "[limits]\nmax_upstream_connections = 2\n",
    )
    .await;
    let proxy = Arc::new(proxy);
    let started = std::time::Instant::now();
    let requests: Vec<_> = (0..6)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                send(Version::HTTP_11, "PUT", &proxy.url(UPDATE), &[], ALLOWED).await
            })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(upstream.seen().len(), 6);
    assert_eq!(upstream.accepted(), 2, "two connections, taking turns");
    assert!(
        started.elapsed() >= Duration::from_millis(3 * 200),
        "six 200 ms answers over two connections take three rounds"
    );
}

/// Timeouts for the upstream-slot tests: the queue is waited on for 300 ms at most.
const QUEUE_TIMEOUTS: &str =
    "[timeouts]\nupstream_response = \"3s\"\nupstream_queue = \"300ms\"\nshutdown_grace = \"5s\"\n";

#[tokio::test]
async fn a_request_waiting_for_a_slot_gets_503_when_none_comes_free() {
    let toml = format!("{QUEUE_TIMEOUTS}\n[limits]\nmax_upstream_connections = 1\n");
    let (upstream, proxy) = support::pair(Reply::Silent, &toml).await;
    // The first request holds the only slot: the upstream never answers it.
    let url = proxy.url("/v3/p1/volumes");
    let first = tokio::spawn(async move { send(Version::HTTP_11, "GET", &url, &[], "").await });
    support::await_sample(proxy.admin, "snapguard_upstream_waiting", 0.0).await;
    while upstream.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let url = proxy.url(UPDATE);
    let second = tokio::spawn(async move { send(Version::HTTP_11, "GET", &url, &[], "").await });
    support::await_sample(proxy.admin, "snapguard_upstream_waiting", 1.0).await;
    let second = second.await.unwrap();
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.json()["serviceUnavailable"]["code"], 503);
    support::await_sample(proxy.admin, "snapguard_upstream_waiting", 0.0).await;
    support::await_sample(
        proxy.admin,
        r#"snapguard_upstream_errors_total{kind="queue_timeout"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        upstream.seen().len(),
        1,
        "the second never reached the upstream"
    );
    assert_eq!(first.await.unwrap().status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let toml = format!(
        "{QUEUE_TIMEOUTS}\n[limits]\nmax_upstream_connections = 1\nmax_upstream_waiting = 1\n"
    );
    let (upstream, proxy) = support::pair(Reply::Silent, &toml).await;
    let url = proxy.url("/v3/p1/volumes");
    let first = {
        let url = url.clone();
        tokio::spawn(async move { send(Version::HTTP_11, "GET", &url, &[], "").await })
    };
    while upstream.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = {
        let url = url.clone();
        tokio::spawn(async move { send(Version::HTTP_11, "GET", &url, &[], "").await })
    };
    support::await_sample(proxy.admin, "snapguard_upstream_waiting", 1.0).await;
    let started = std::time::Instant::now();
    let third = send(Version::HTTP_11, "GET", &url, &[], "").await;
    assert_eq!(third.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "refused at once, not after waiting"
    );
    support::await_sample(
        proxy.admin,
        r#"snapguard_upstream_errors_total{kind="queue_full"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        second.await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(first.await.unwrap().status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn waiting_requests_are_served_first_come_first_served() {
    let toml = "[timeouts]\nupstream_queue = \"5s\"\n[limits]\nmax_upstream_connections = 1\n";
    let (upstream, proxy) = support::pair(Reply::Slow(Duration::from_millis(150)), toml).await;
    let mut waiters = Vec::new();
    for i in 0..4 {
        let url = proxy.url(&format!("/v3/p1/volumes/v{i}"));
        waiters.push(tokio::spawn(async move {
            send(Version::HTTP_11, "GET", &url, &[], "").await
        }));
        // Each starts waiting before the next arrives.
        support::await_sample(proxy.admin, "snapguard_upstream_waiting", f64::from(i)).await;
    }
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().status, StatusCode::OK);
    }
    let order: Vec<String> = upstream.seen().iter().map(|s| s.target.clone()).collect();
    assert_eq!(
        order,
        [
            "/v3/p1/volumes/v0",
            "/v3/p1/volumes/v1",
            "/v3/p1/volumes/v2",
            "/v3/p1/volumes/v3"
        ]
    );
}

#[tokio::test]
async fn a_pipelined_backlog_does_not_delay_another_connections_request() {
    // One upstream slot, an upstream taking 100 ms. A connection pipelines ten requests in one
    // write; another sends one while the first of them is in the upstream's hands. hyper serves
    // a connection's requests one at a time, so the backlog holds one slot and one place in the
    // queue at a time, and the queue is first come, first served (a request arriving as a slot
    // frees, like the backlog's next, does not overtake one already waiting): the other
    // connection's request goes upstream second, not eleventh.
    let toml = "[timeouts]\nupstream_queue = \"5s\"\n[limits]\nmax_upstream_connections = 1\n";
    let (upstream, proxy) = support::pair(Reply::Slow(Duration::from_millis(100)), toml).await;
    let mut backlog = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let pipelined: String = (0..10)
        .map(|i| format!("GET /v3/p1/volumes/a{i} HTTP/1.1\r\nHost: x\r\n\r\n"))
        .collect();
    backlog.write_all(pipelined.as_bytes()).await.unwrap();
    while upstream.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let other = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes/b"),
        &[],
        "",
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    let order: Vec<String> = upstream.seen().iter().map(|s| s.target.clone()).collect();
    assert_eq!(
        order[..2],
        ["/v3/p1/volumes/a0", "/v3/p1/volumes/b"],
        "{order:?}"
    );
}

/// A client of `proxy` that takes a response's head and nothing more ([`support::taking_nothing`]),
/// a moment after it came.
async fn request_and_read_nothing(proxy: &Proxy) -> tokio::net::TcpStream {
    let stream = support::taking_nothing(proxy.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream
}

#[tokio::test]
async fn a_small_response_frees_its_upstream_connection_whatever_the_reader_does() {
    // 16 MiB responses, more than the sockets' buffers take, to clients that read none of it.
    // Read whole (buffer_response_body = 16 MiB), each response frees its upstream connection
    // at once: three such clients need one upstream connection. Streamed (0: never
    // buffered), each holds its own.
    for (buffer, connections) in [(16 * MIB, 1), (0, 3)] {
        let toml = format!(
            "[limits]\nbuffer_response_body = {buffer}\nbuffer_memory = {}\n",
            64 * MIB
        );
        let (upstream, proxy) = support::pair(Reply::Large(16 * MIB), &toml).await;
        let mut readers = Vec::new();
        for _ in 0..3 {
            readers.push(request_and_read_nothing(&proxy).await);
        }
        assert_eq!(
            upstream.accepted(),
            connections,
            "buffer_response_body = {buffer}"
        );
    }
}

#[tokio::test]
async fn responses_past_the_buffer_memory_are_streamed() {
    // Room for one 16 MiB response in memory: the first is read whole (its connection freed
    // and reused by the second), the second is streamed (its connection held), so the third
    // needs a second connection. Once the first reader goes, its memory is free again.
    let toml = format!(
        "[limits]\nbuffer_response_body = {}\nbuffer_memory = {}\n",
        16 * MIB,
        24 * MIB
    );
    let (upstream, proxy) = support::pair(Reply::Large(16 * MIB), &toml).await;
    let first = request_and_read_nothing(&proxy).await;
    let _second = request_and_read_nothing(&proxy).await;
    assert_eq!(upstream.accepted(), 1);
    let _third = request_and_read_nothing(&proxy).await;
    assert_eq!(
        upstream.accepted(),
        2,
        "the second was buffered past the memory budget"
    );
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The first's memory is back: the fourth is read whole and frees the connection it came
    // on (a new one: the two there are held by the second and the third), the fifth reuses it.
    let _fourth = request_and_read_nothing(&proxy).await;
    let _fifth = request_and_read_nothing(&proxy).await;
    assert_eq!(upstream.accepted(), 3);
}

#[tokio::test]
async fn a_reader_that_stops_holds_no_upstream_slot() {
    let toml = format!("{FAST_TIMEOUTS}\n[limits]\nmax_upstream_connections = 1\n");
    let (_upstream, proxy) = support::pair(Reply::Large(64 * MIB), &toml).await;
    // The first response streams to a client that reads nothing more than its head.
    let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    first
        .write_all(b"GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = first.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    // Its slot was given back with the response head: the next request is served at once.
    let second = send(Version::HTTP_11, "GET", &proxy.url(UPDATE), &[], "").await;
    assert_eq!(second.status, StatusCode::OK);
    support::assert_pattern(&second.body, 64 * MIB);
    drop(first);
}

// Deadlines on bodies: what bounds a request's life once its head has arrived.

/// A short body deadline, no minimum rate: the idle deadline alone is under test.
const BODY_IDLE: &str =
    "[timeouts]\nbody_idle = \"400ms\"\nshutdown_grace = \"5s\"\n[limits]\nmin_body_rate = 0\n";

#[tokio::test]
async fn a_small_response_that_stalls_upstream_gets_502_before_any_of_it_is_relayed() {
    let (_upstream, proxy) = support::pair(Reply::Stalls(1000), BODY_IDLE).await;
    let got = send(
        Version::HTTP_11,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.json()["computeFault"]["code"], 502);
    support::await_sample(
        proxy.admin,
        r#"snapguard_upstream_errors_total{kind="body_idle"}"#,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_streamed_response_that_stalls_upstream_is_cut() {
    let (_upstream, proxy) = support::pair(Reply::Stalls(256 * 1024), BODY_IDLE).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received));
    assert!(read.await.is_ok(), "the connection was not cut");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(received.starts_with(b"HTTP/1.1 200"));
    assert!(
        received.len() < 256 * 1024 + 1024,
        "the body cannot have ended"
    );
    // Counted once, as the upstream's failure, not as a peer cut.
    support::await_sample(
        proxy.admin,
        r#"snapguard_upstream_errors_total{kind="body_idle"}"#,
        1.0,
    )
    .await;
    let cut = r#"snapguard_peers_cut_total{reason="body_idle"}"#;
    assert_eq!(support::metric(proxy.admin, cut).await, 0.0);
}

#[tokio::test]
async fn a_reader_that_stops_is_cut_after_body_idle() {
    let (_upstream, proxy) = support::pair(Reply::Large(256 * MIB), BODY_IDLE).await;
    let _stream = support::taking_nothing(proxy.addr).await;
    // Read nothing more: the send buffers fill, the body stops moving, the connection is cut.
    support::await_sample(
        proxy.admin,
        r#"snapguard_peers_cut_total{reason="send_idle"}"#,
        1.0,
    )
    .await;
    support::await_sample(proxy.admin, "snapguard_connections_active", 0.0).await;
}

#[tokio::test]
async fn a_slow_reader_is_cut_by_the_minimum_rate() {
    let toml = "[timeouts]\nmin_rate_grace = \"500ms\"\nshutdown_grace = \"5s\"\n[limits]\nmin_body_rate = 1000000\n";
    let (_upstream, proxy) = support::pair(Reply::Large(256 * MIB), toml).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // 4 KiB every 50 ms: about 80 KB/s against a minimum of 1 MB/s.
    let mut buf = [0u8; 4096];
    let reader = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    // Cut by a reset: what it had not read yet is not delivered.
    tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the slow reader was not cut");
    support::await_sample(
        proxy.admin,
        r#"snapguard_peers_cut_total{reason="send_too_slow"}"#,
        1.0,
    )
    .await;
    // The reader's slowness is not the upstream's: its body is held to its pace only for the
    // time it is waited on.
    for kind in ["body_too_slow", "body_idle", "reset"] {
        let series = format!("snapguard_upstream_errors_total{{kind=\"{kind}\"}}");
        assert_eq!(support::metric(proxy.admin, &series).await, 0.0, "{series}");
    }
}

#[tokio::test]
async fn a_streamed_upload_that_stops_gets_408() {
    let toml = "[timeouts]\nbody_idle = \"400ms\"\nshutdown_grace = \"5s\"\n[limits]\nmin_body_rate = 0\nbuffer_request_body = 16\n";
    let (_upstream, proxy) = support::pair(Reply::Ok, toml).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v3/p1/volumes HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789012345678901234567890123456789")
        .await
        .unwrap();
    let mut response = String::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    support::await_sample(
        proxy.admin,
        r#"snapguard_peers_cut_total{reason="body_idle"}"#,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_streamed_upload_slower_than_the_minimum_rate_gets_408() {
    // 100 bytes a second, never idle for long, against a minimum of 1,000 after 500 ms.
    let toml = "[timeouts]\nbody_idle = \"5s\"\nmin_rate_grace = \"500ms\"\nshutdown_grace = \"5s\"\n[limits]\nmin_body_rate = 1000\nbuffer_request_body = 16\n";
    let (_upstream, proxy) = support::pair(Reply::Ok, toml).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /v3/p1/volumes HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while started.elapsed() < Duration::from_secs(5) {
        if stream.write_all(&[b'x'; 10]).await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    support::await_sample(
        proxy.admin,
        r#"snapguard_peers_cut_total{reason="body_too_slow"}"#,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn an_http2_408_the_client_never_takes_still_closes_its_connection() {
    // An upload that stalls gets 408; the client keeps its stream window at 0, so the 408's
    // body can never be sent. The exchange is over all the same: the response not taken is
    // cut after body_idle, and with it the connection.
    let toml = "[timeouts]\nbody_idle = \"400ms\"\nshutdown_grace = \"5s\"\n[limits]\nmin_body_rate = 0\nbuffer_request_body = 16\n";
    let (upstream, proxy) = support::pair(Reply::Ok, toml).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .adaptive_window(false)
            .handshake::<_, TestBody>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let request = http::Request::post(proxy.url("/v3/p1/volumes"))
        .header("content-length", "1000")
        .body(TestBody::Stall {
            sent: 0,
            total: 100,
        })
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("no response head")
        .unwrap();
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the connection was never closed");
    support::await_sample(
        proxy.admin,
        r#"snapguard_peers_cut_total{reason="send_idle"}"#,
        1.0,
    )
    .await;
    assert!(upstream.seen().len() <= 1);
    drop(response);
}

#[tokio::test]
async fn a_connection_whose_request_was_not_sent_whole_is_not_reused() {
    // An upstream that answers at once and reads no body: the exchange's response ends while
    // its upload is still going. The connection must not carry the next request, which would
    // otherwise wait behind that upload.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // Answers each request head it sees, ignoring any body.
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if buf[..n].windows(4).any(|w| w == b"HTTP") {
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
                        if conn.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let toml = "[limits]\nbuffer_request_body = 16\n";
    let proxy = Proxy::start(&format!("http://{upstream}"), toml).await;
    // A streamed upload that is never finished.
    let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    first
        .write_all(b"POST /v3/p1/volumes HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789012345678901234567890123456789")
        .await
        .unwrap();
    let mut head = [0u8; 256];
    let n = first.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &head[..n]);
    // Behind the unfinished upload it would wait for ever; on a connection of its own it is
    // answered at once.
    let url = proxy.url("/v3/p1/volumes");
    let second = send(Version::HTTP_11, "GET", &url, &[], "");
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the second request waited behind the first one's upload");
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the second went on a new connection"
    );
    drop(first);
}

#[tokio::test]
async fn the_downstream_is_answered_in_its_own_http_version() {
    // An HTTP/1.0 upstream (python -m http.server is one).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    .await;
            });
        }
    });
    let proxy = Proxy::start(&format!("http://{upstream}"), "").await;
    let response = raw(
        proxy.addr,
        b"GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    let got = send(
        Version::HTTP_2,
        "GET",
        &proxy.url("/v3/p1/volumes"),
        &[],
        "",
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn an_exchange_the_downstream_abandons_is_finished_and_its_connection_kept() {
    // Each request is abandoned (its stream reset, or its client gone) 20 ms after it was sent,
    // before the upstream's answer at 150 ms. The exchange is finished in the background and its
    // connection pooled again: ten abandoned requests need one upstream connection, not ten.
    let (upstream, proxy) = support::pair(Reply::Slow(Duration::from_millis(150)), "").await;
    for version in [Version::HTTP_2, Version::HTTP_11] {
        for _ in 0..5 {
            let url = proxy.url("/v3/p1/volumes");
            let abandoned = tokio::time::timeout(
                Duration::from_millis(20),
                send(version, "GET", &url, &[], ""),
            );
            assert!(abandoned.await.is_err(), "answered before it was abandoned");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    assert_eq!(upstream.seen().len(), 10);
    assert_eq!(
        upstream.accepted(),
        1,
        "abandoned exchanges threw their connections away"
    );
    // Each is on record, as its client's: 499, abandoned.
    support::await_sample(
        proxy.admin,
        r#"snapguard_requests_total{route="none",method="GET",decision="abandoned",status="499"}"#,
        10.0,
    )
    .await;
}

/// Takes the head and a little of a `GET /v3/p1/volumes` response from `proxy`, then lets go
/// with most of the body unsent: an HTTP/2 stream reset (the stream's window kept at 64 KiB),
/// or an HTTP/1 connection closed (its receive buffer kept at 4 KiB).
async fn abandon_mid_body(proxy: &Proxy, version: Version) {
    use http::Request;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use hyper_util::rt::TokioExecutor;
    if version == Version::HTTP_2 {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .http2_only(true)
            .http2_adaptive_window(false)
            .http2_initial_stream_window_size(65_535);
        let client: Client<HttpConnector, Empty<Bytes>> = builder.build(HttpConnector::new());
        let url = proxy.url("/v3/p1/volumes");
        let response = client
            .request(Request::get(&url).body(Empty::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop((body, client));
    } else {
        let _stream = request_and_read_nothing(proxy).await;
    }
}

#[tokio::test]
async fn a_response_abandoned_mid_body_is_drained_and_its_connection_kept() {
    // 256 KiB: streamed (over limits.buffer_response_body); what is left when the client lets
    // go is within the drain's 256 KiB. It is read in the background and the connection pooled
    // again.
    let (upstream, proxy) = support::pair(Reply::Large(256 * 1024), "").await;
    for version in [
        Version::HTTP_2,
        Version::HTTP_11,
        Version::HTTP_2,
        Version::HTTP_11,
    ] {
        abandon_mid_body(&proxy, version).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(upstream.seen().len(), 4);
    assert_eq!(
        upstream.accepted(),
        1,
        "abandoned responses threw their connections away"
    );
    // A rest surely over the budget is not read: its connection is closed.
    let (upstream, proxy) = support::pair(Reply::Large(16 * MIB), "").await;
    for version in [Version::HTTP_2, Version::HTTP_11] {
        abandon_mid_body(&proxy, version).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn a_request_abandoned_while_it_waits_for_a_slot_leaves_the_queue() {
    let toml = format!(
        "{QUEUE_TIMEOUTS}\n[limits]\nmax_upstream_connections = 1\nmax_upstream_waiting = 1\n"
    );
    let (upstream, proxy) = support::pair(Reply::Silent, &toml).await;
    let url = proxy.url("/v3/p1/volumes");
    let holder = {
        let url = url.clone();
        tokio::spawn(async move { send(Version::HTTP_11, "GET", &url, &[], "").await })
    };
    while upstream.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Waits, then its client gives up.
    let gone = tokio::time::timeout(
        Duration::from_millis(100),
        send(Version::HTTP_11, "GET", &url, &[], ""),
    );
    assert!(gone.await.is_err());
    support::await_sample(proxy.admin, "snapguard_upstream_waiting", 0.0).await;
    // The queue has its one place again: the next request waits (503 after the queue timeout,
    // not queue_full at once).
    let next = send(Version::HTTP_11, "GET", &url, &[], "").await;
    assert_eq!(next.status, StatusCode::SERVICE_UNAVAILABLE);
    support::await_sample(
        proxy.admin,
        r#"snapguard_upstream_errors_total{kind="queue_full"}"#,
        0.0,
    )
    .await;
    holder.abort();
}
