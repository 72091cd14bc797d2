//! TLS termination downstream (`[tls]`), from the outside: real clients (curl, `openssl
//! s_client`, and rustls through tokio-rustls) against snapguard on loopback, with a CA, server
//! and client certificates made here with rcgen and written to a temporary directory.
//!
//! What is covered: policing and forwarding over HTTPS with HTTP/1.1 and HTTP/2 (ALPN), the
//! protocol versions and ALPN offered, the forwarding headers with and without a trusted peer,
//! client certificates (mTLS) with their subject in the access log, plain HTTP and silent
//! connections on the TLS port, rotation of a Kubernetes-style mounted Secret (a `..data`
//! symlink swap) under concurrent HTTP/1.1 and HTTP/2 keep-alive traffic, rotation to a broken
//! pair (counted and logged once, saying why), and refusal of bad files at start-up and by
//! `check-config`.

// Tests fail by panicking; the no-unwrap rule is for the request path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{admin_get, binary_path, raw, sample, Binary, Proxy, Reply, Upstream};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const UPDATE: &str = "/v3/p1/snapshots/s1";
const GOOD: &str = r#"{"snapshot":{"name":"nightly-2024"}}"#;
const RESERVED: &str = r#"{"snapshot":{"name":"autobk_snapshot_x"}}"#;

// ---- files ---------------------------------------------------------------------------------

/// A directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "snapguard-tls-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to `name` in the directory and returns its path.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate and its key, in PEM.
struct Pair {
    cert: String,
    key: String,
}

/// A test CA that issues server certificates (for `localhost` and 127.0.0.1) and client
/// certificates, its own certificate written to `ca.pem` in `dir`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
}

/// Sets the validity period of `params`, in Unix seconds.
fn valid(params: &mut CertificateParams, from: i64, until: i64) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(from as u64);
    params.not_after = epoch + Duration::from_secs(until as u64);
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Pki {
    fn new(dir: &TempDir, name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_file = dir.write(&format!("{name}-ca.pem"), &ca.pem());
        Self { ca, ca_file }
    }

    /// A server certificate for `localhost` and 127.0.0.1, with subject `CN=<cn>`, the given
    /// serial number, valid until `not_after` (Unix seconds).
    fn server(&self, cn: &str, serial: u64, not_after: i64) -> Pair {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        valid(&mut params, unix_now() - 3600, not_after);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A client certificate with subject `CN=<cn>, O=<org>`.
    fn client(&self, cn: &str, org: &str) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
        valid(&mut params, unix_now() - 3600, unix_now() + 86400);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A year from now, as the default expiry of the server certificates.
fn next_year() -> i64 {
    unix_now() + 365 * 86400
}

/// Writes `pair` as `<name>.crt` and `<name>.key` in `dir`.
fn write_pair(dir: &TempDir, name: &str, pair: &Pair) -> (PathBuf, PathBuf) {
    (
        dir.write(&format!("{name}.crt"), &pair.cert),
        dir.write(&format!("{name}.key"), &pair.key),
    )
}

/// A `[tls]` table (and `extra` keys in it), with paths quoted for TOML.
fn tls_table(cert: &Path, key: &Path, client_ca: Option<&Path>, extra: &str) -> String {
    let mut out = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    if let Some(ca) = client_ca {
        out.push_str(&format!(
            "client_ca_file = {:?}\n",
            ca.display().to_string()
        ));
    }
    out.push_str(extra);
    out
}

// ---- Kubernetes-style Secret volume ---------------------------------------------------------

/// A directory laid out as the kubelet lays out a mounted Secret: the files live in a
/// timestamped directory, `..data` links to it, and `tls.crt` and `tls.key` link through
/// `..data`. An update writes a new timestamped directory, swaps `..data` with one rename, and
/// removes the old directory.
struct SecretVolume {
    dir: TempDir,
    current: Option<String>,
    generation: usize,
}

impl SecretVolume {
    fn new(pair: &Pair) -> Self {
        let mut volume = Self {
            dir: TempDir::new("secret"),
            current: None,
            generation: 0,
        };
        volume.update(&pair.cert, &pair.key);
        std::os::unix::fs::symlink("..data/tls.crt", volume.dir.path("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", volume.dir.path("tls.key")).unwrap();
        volume
    }

    fn cert(&self) -> PathBuf {
        self.dir.path("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path("tls.key")
    }

    /// The kubelet's atomic update: new files in a new directory, then one rename of `..data`.
    fn update(&mut self, cert: &str, key: &str) {
        self.generation += 1;
        let stamp = format!("..2025_06_01_12_00_{:02}.{:09}", self.generation, 1);
        std::fs::create_dir(self.dir.path(&stamp)).unwrap();
        std::fs::write(self.dir.path(&stamp).join("tls.crt"), cert).unwrap();
        std::fs::write(self.dir.path(&stamp).join("tls.key"), key).unwrap();
        std::os::unix::fs::symlink(&stamp, self.dir.path("..data_tmp")).unwrap();
        std::fs::rename(self.dir.path("..data_tmp"), self.dir.path("..data")).unwrap();
        if let Some(old) = self.current.replace(stamp) {
            std::fs::remove_dir_all(self.dir.path(&old)).unwrap();
        }
    }
}

// ---- clients ---------------------------------------------------------------------------------

/// Runs a command off the runtime's threads (snapguard may be serving on them) and returns its
/// output.
async fn run(program: &str, args: Vec<String>) -> Output {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(&program)
            .args(&args)
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    })
    .await
    .unwrap()
}

/// What curl got: status code, HTTP version as curl names it (`1.1`, `2`), body, exit code,
/// and curl's stderr.
#[derive(Debug)]
struct Curl {
    status: u16,
    version: String,
    body: String,
    exit: i32,
    stderr: String,
}

/// curl to `https://localhost:PORT<path>` (resolved to 127.0.0.1, verified against `ca`),
/// with `args` added (e.g. `--http2`, `-X PUT`).
async fn curl(addr: SocketAddr, ca: &Path, path: &str, args: &[&str]) -> Curl {
    let mut argv: Vec<String> = [
        "-q",
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "--cacert",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push(ca.display().to_string());
    argv.push("--resolve".into());
    argv.push(format!("localhost:{}:127.0.0.1", addr.port()));
    argv.push("--write-out".into());
    argv.push("\n%{http_code} %{http_version}".into());
    argv.extend(args.iter().map(|s| s.to_string()));
    argv.push(format!("https://localhost:{}{path}", addr.port()));
    let out = run("curl", argv).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let (status, version) = last.split_once(' ').unwrap_or(("0", ""));
    Curl {
        status: status.parse().unwrap_or(0),
        version: version.to_owned(),
        body: body.to_owned(),
        exit: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `openssl s_client` to `addr` with SNI `localhost`, verifying against `ca`, with `args` added;
/// its stdout and stderr together.
async fn s_client(addr: SocketAddr, ca: &Path, args: &[&str]) -> String {
    let mut argv: Vec<String> = vec![
        "s_client".into(),
        "-connect".into(),
        addr.to_string(),
        "-servername".into(),
        "localhost".into(),
        "-CAfile".into(),
        ca.display().to_string(),
    ];
    argv.extend(args.iter().map(|s| s.to_string()));
    let out = run("openssl", argv).await;
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The serial number (hex, as openssl prints it) and subject of the certificate that
/// `openssl s_client` is served at `addr`.
async fn served_by_openssl(addr: SocketAddr, ca: &Path) -> String {
    let session = s_client(addr, ca, &[]).await;
    let dir = TempDir::new("served");
    let pem = dir.write("session.txt", &session);
    let out = run(
        "openssl",
        vec![
            "x509".into(),
            "-noout".into(),
            "-serial".into(),
            "-subject".into(),
            "-in".into(),
            pem.display().to_string(),
        ],
    )
    .await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A rustls client configuration trusting `ca`, presenting `client` if given, offering `alpn`.
fn client_config(ca: &Path, client: Option<&Pair>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(pair) => {
            let chain = CertificateDer::pem_slice_iter(pair.cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr` for `localhost`.
async fn connect(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The subject common name of the certificate a TLS connection was served.
fn served_cn(stream: &TlsStream<TcpStream>) -> String {
    let der = &stream.get_ref().1.peer_certificates().unwrap()[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    cn
}

/// A keep-alive connection over rustls, in the HTTP version ALPN chose, sending requests one
/// after another.
enum KeepAlive {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl KeepAlive {
    async fn open(stream: TlsStream<TcpStream>) -> Self {
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        let io = TokioIo::new(stream);
        if h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Self::Http2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Self::Http1(sender)
        }
    }

    /// GETs a passthrough path; the status, or why it failed.
    async fn get(&mut self, port: u16) -> Result<u16, String> {
        let response = match self {
            Self::Http1(sender) => {
                sender.ready().await.map_err(|e| e.to_string())?;
                let request = Request::get("/v3/p1/volumes")
                    .header("host", format!("localhost:{port}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                sender.send_request(request).await
            }
            Self::Http2(sender) => {
                sender.ready().await.map_err(|e| e.to_string())?;
                let request = Request::get(format!("https://localhost:{port}/v3/p1/volumes"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                sender.send_request(request).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(status)
    }
}

async fn metrics(admin: SocketAddr) -> String {
    String::from_utf8_lossy(&admin_get(admin, "/metrics").await.body).into_owned()
}

fn failures(reason: &str) -> String {
    format!("snapguard_tls_handshake_failures_total{{reason=\"{reason}\"}}")
}

const RELOADS_OK: &str = "snapguard_tls_reloads_total{result=\"success\"}";
const RELOADS_FAILED: &str = "snapguard_tls_reloads_total{result=\"failure\"}";
const EXPIRY: &str = "snapguard_tls_certificate_expiry_timestamp_seconds";

/// Polls `series` until `ok` holds for its value; panics with the exposition after `within`.
async fn await_metric(admin: SocketAddr, series: &str, within: Duration, ok: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let text = metrics(admin).await;
        if ok(sample(&text, series)) {
            return;
        }
        if Instant::now() > deadline {
            panic!("{series} never reached the expected value:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---- a server with one certificate -----------------------------------------------------------

/// A CA, a server pair from it on disk, an upstream and snapguard serving TLS in front of it
/// (with `extra_tls` in `[tls]` and `rest` after it).
struct Fixture {
    _dir: TempDir,
    pki: Pki,
    upstream: Upstream,
    proxy: Proxy,
}

async fn tls_fixture(client_ca: bool, extra_tls: &str, rest: &str) -> Fixture {
    let dir = TempDir::new("fixture");
    let pki = Pki::new(&dir, "main");
    let (cert, key) = write_pair(&dir, "server", &pki.server("localhost", 1, next_year()));
    let ca = client_ca.then_some(pki.ca_file.as_path());
    let toml = format!("{}{rest}", tls_table(&cert, &key, ca, extra_tls));
    let upstream = Upstream::start(Reply::Ok).await;
    let proxy = Proxy::start(&upstream.url(), &toml).await;
    Fixture {
        _dir: dir,
        pki,
        upstream,
        proxy,
    }
}

// ---- policing and forwarding over TLS --------------------------------------------------------

#[tokio::test]
async fn curl_over_http1_and_http2_is_policed_and_forwarded_with_proto_https() {
    let f = tls_fixture(false, "", "").await;
    let addr = f.proxy.addr;
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let json = ["-H", "content-type: application/json", "-X", "PUT"];
        let mut args = vec![flag];
        args.extend(json);
        args.extend(["--data-binary", RESERVED]);
        let refused = curl(addr, &f.pki.ca_file, UPDATE, &args).await;
        assert_eq!(refused.exit, 0, "{refused:?}");
        assert_eq!((refused.status, refused.version.as_str()), (400, version));
        assert!(
            refused.body.contains("autobk_snapshot_"),
            "the refusal says why: {refused:?}"
        );

        let mut args = vec![flag];
        args.extend(json);
        args.extend(["--data-binary", GOOD]);
        let forwarded = curl(addr, &f.pki.ca_file, UPDATE, &args).await;
        assert_eq!(
            (forwarded.status, forwarded.version.as_str()),
            (200, version)
        );
        assert_eq!(forwarded.body, support::OK_BODY);
    }

    let seen = f.upstream.seen();
    assert_eq!(
        seen.len(),
        2,
        "only the good PUTs reach the upstream: {seen:#?}"
    );
    let authority = format!("localhost:{}", addr.port());
    for s in &seen {
        assert_eq!((s.method.as_str(), s.target.as_str()), ("PUT", UPDATE));
        assert_eq!(s.body, GOOD.as_bytes());
        assert_eq!(s.headers["x-forwarded-proto"], "https");
        assert_eq!(s.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(s.headers["x-forwarded-host"], authority.as_str());
        // No chain is started (Cinder would read a quoted host literally): X-Forwarded-* only.
        assert!(!s.headers.contains_key("forwarded"));
    }
}

#[tokio::test]
async fn openssl_negotiates_tls13_and_tls12_and_alpn_h2_or_http1_and_nothing_older() {
    let f = tls_fixture(false, "", "").await;
    let (addr, ca) = (f.proxy.addr, f.pki.ca_file.as_path());

    let h2 = s_client(addr, ca, &["-alpn", "h2"]).await;
    assert!(h2.contains("ALPN protocol: h2"), "{h2}");
    assert!(h2.contains("Verify return code: 0 (ok)"), "{h2}");
    assert!(h2.contains("TLSv1.3"), "TLS 1.3 by default: {h2}");

    let http1 = s_client(addr, ca, &["-alpn", "http/1.1"]).await;
    assert!(http1.contains("ALPN protocol: http/1.1"), "{http1}");

    let both = s_client(addr, ca, &["-alpn", "h2,http/1.1"]).await;
    assert!(
        both.contains("ALPN protocol: h2"),
        "the server prefers h2: {both}"
    );

    let none = s_client(addr, ca, &[]).await;
    assert!(none.contains("No ALPN negotiated"), "{none}");
    assert!(none.contains("Verify return code: 0 (ok)"), "{none}");

    for (flag, version) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let out = s_client(addr, ca, &[flag, "-alpn", "h2"]).await;
        assert!(
            out.contains(&format!("Protocol  : {version}"))
                || out.contains(&format!("New, {version}")),
            "{version} offered: {out}"
        );
        assert!(out.contains("ALPN protocol: h2"), "{version}: {out}");
    }

    // TLS 1.1 and 1.0: OpenSSL 3 will only offer them at security level 0. The server must
    // refuse them, which its counter tells apart from the client refusing to offer them.
    let before = sample(&metrics(f.proxy.admin).await, &failures("incompatible"));
    let old = s_client(addr, ca, &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]).await;
    assert!(!old.contains("New, TLSv1.1"), "TLS 1.1 accepted: {old}");
    await_metric(
        f.proxy.admin,
        &failures("incompatible"),
        Duration::from_secs(5),
        |v| v == before + 1.0,
    )
    .await;
}

#[tokio::test]
async fn rustls_client_sees_the_served_certificate_and_expiry_metric() {
    let dir = TempDir::new("expiry");
    let pki = Pki::new(&dir, "main");
    let not_after = unix_now() + 40 * 86400;
    let (cert, key) = write_pair(&dir, "server", &pki.server("gateway-1", 7, not_after));
    let upstream = Upstream::start(Reply::Ok).await;
    let proxy = Proxy::start(&upstream.url(), &tls_table(&cert, &key, None, "")).await;

    let config = client_config(&pki.ca_file, None, &[b"http/1.1"]);
    let stream = connect(proxy.addr, &config).await.unwrap();
    assert_eq!(served_cn(&stream), "gateway-1");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(b"http/1.1".as_slice())
    );
    let mut conn = KeepAlive::open(stream).await;
    for _ in 0..3 {
        assert_eq!(conn.get(proxy.addr.port()).await, Ok(200));
    }
    assert_eq!(upstream.accepted(), 1, "one upstream connection, reused");
    let text = metrics(proxy.admin).await;
    assert_eq!(sample(&text, EXPIRY), not_after as f64, "{text}");
}

// ---- forwarding headers and trusted proxies ---------------------------------------------------

/// What a client (or an ingress in front of snapguard) claims in its forwarding headers.
const CLAIMS: [&str; 8] = [
    "-H",
    "X-Forwarded-Proto: http",
    "-H",
    "X-Forwarded-Host: ingress.example",
    "-H",
    "X-Forwarded-For: 203.0.113.7",
    "-H",
    "Forwarded: for=203.0.113.7;proto=http;host=ingress.example",
];

#[tokio::test]
async fn a_trusted_peer_keeps_its_forwarding_headers_and_they_are_appended_to() {
    let rest = "\n[forwarding]\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\"]\n";
    let f = tls_fixture(false, "", rest).await;
    let authority = format!("localhost:{}", f.proxy.addr.port());
    for flag in ["--http1.1", "--http2"] {
        let mut args = vec![flag];
        args.extend(CLAIMS);
        let got = curl(f.proxy.addr, &f.pki.ca_file, "/v3/p1/volumes", &args).await;
        assert_eq!(got.status, 200, "{got:?}");
    }
    let seen = f.upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let h = &s.headers;
        assert_eq!(h["x-forwarded-proto"], "http", "kept from the trusted peer");
        assert_eq!(h["x-forwarded-host"], "ingress.example", "kept");
        assert_eq!(
            h["x-forwarded-for"], "203.0.113.7, 127.0.0.1",
            "appended to"
        );
        assert_eq!(
            h["forwarded"],
            format!(
                "for=203.0.113.7;proto=http;host=ingress.example, \
                 for=127.0.0.1;proto=https;host=\"{authority}\""
            )
            .as_str(),
            "appended to"
        );
    }
}

#[tokio::test]
async fn an_untrusted_peer_has_its_x_forwarded_headers_overwritten_and_forwarded_removed() {
    // 127.0.0.1 is not in the list: the loopback client is not trusted.
    let rest = "\n[forwarding]\ntrusted_proxies = [\"10.0.0.0/8\"]\n";
    let f = tls_fixture(false, "", rest).await;
    let authority = format!("localhost:{}", f.proxy.addr.port());
    for flag in ["--http1.1", "--http2"] {
        let mut args = vec![flag];
        args.extend(CLAIMS);
        let got = curl(f.proxy.addr, &f.pki.ca_file, "/v3/p1/volumes", &args).await;
        assert_eq!(got.status, 200, "{got:?}");
    }
    let seen = f.upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let h = &s.headers;
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], authority.as_str());
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        // The client's claimed chain is removed, not continued.
        assert!(!h.contains_key("forwarded"));
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }
}

#[tokio::test]
async fn a_client_cannot_add_elements_or_parameters_to_forwarded_through_host() {
    // Trusted, with a chain of its own, so that snapguard appends an element with host=.
    let rest = "\n[forwarding]\ntrusted_proxies = [\"127.0.0.1\"]\n";
    let f = tls_fixture(false, "", rest).await;
    let config = client_config(&f.pki.ca_file, None, &[b"http/1.1"]);
    // One request on a connection of its own (a refusal may close the connection): the status
    // snapguard answered with.
    let send = |host: String| {
        let config = config.clone();
        async move {
            let stream = connect(f.proxy.addr, &config).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let request = Request::get("/v3/p1/volumes")
                .header("host", host)
                .header("forwarded", "for=203.0.113.7")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            status
        }
    };

    // A Host that is not host[:port] never reaches the Forwarded element: it is refused with
    // 400 before anything goes upstream.
    for host in [
        "localhost\";for=6.6.6.6;proto=http",
        "localhost\", for=6.6.6.6;proto=http;host=\"evil.example",
        "localhost;for=6.6.6.6",
        "localhost,for=6.6.6.6",
        "localhost:8443;proto=http",
    ] {
        assert_eq!(send(host.to_owned()).await, 400, "Host: {host}");
    }
    assert!(
        f.upstream.seen().is_empty(),
        "a Host that is not host[:port] was forwarded: {:?}",
        f.upstream.seen()
    );

    // A legal Host is forwarded, and the element appended for it is one element with one for=,
    // one proto= and one host=, the host quoted whole.
    let port = f.proxy.addr.port();
    let hosts = [
        format!("localhost:{port}"),
        "snapguard.example".to_owned(),
        "127.0.0.1:8443".to_owned(),
        "[::1]:8443".to_owned(),
    ];
    for host in &hosts {
        assert_eq!(send(host.clone()).await, 200, "Host: {host}");
    }
    let seen = f.upstream.seen();
    assert_eq!(seen.len(), hosts.len());
    for (host, seen) in hosts.iter().zip(&seen) {
        let forwarded = seen.headers["forwarded"].to_str().unwrap().to_owned();
        assert_eq!(
            forwarded,
            format!("for=203.0.113.7, for=127.0.0.1;proto=https;host=\"{host}\"")
        );
        // Outside quoted strings: two elements, this hop's with one of each parameter.
        let (mut quoted, mut bare) = (false, String::new());
        for c in forwarded.chars() {
            match c {
                '"' => quoted = !quoted,
                c if !quoted => bare.push(c),
                _ => {}
            }
        }
        let ours = bare.rsplit(',').next().unwrap();
        assert!(
            !quoted
                && bare.matches(',').count() == 1
                && ours.matches(';').count() == 2
                && ["for=", "proto=", "host="]
                    .iter()
                    .all(|p| ours.matches(p).count() == 1),
            "the Host wrote into Forwarded: {forwarded}"
        );
        assert_eq!(seen.headers["x-forwarded-host"], host.as_str());
    }
}

// ---- mutual TLS ------------------------------------------------------------------------------

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate_from_the_ca_and_logs_the_subject() {
    let dir = TempDir::new("mtls");
    let pki = Pki::new(&dir, "main");
    let other = Pki::new(&dir, "other");
    let (cert, key) = write_pair(&dir, "server", &pki.server("localhost", 1, next_year()));
    let (client_cert, client_key) =
        write_pair(&dir, "client", &pki.client("backup-job", "Example Tenant"));
    let (stranger_cert, stranger_key) =
        write_pair(&dir, "stranger", &other.client("intruder", "Elsewhere"));
    let toml = format!(
        "[log]\nformat = \"json\"\n\n{}",
        tls_table(&cert, &key, Some(&pki.ca_file), "")
    );
    let upstream = Upstream::start(Reply::Ok).await;
    let bin = Binary::start(binary_path(), &upstream.url(), &toml, &[]).await;

    // No certificate: refused in the handshake, over HTTP/1.1 and HTTP/2 alike.
    for flag in ["--http1.1", "--http2"] {
        let got = curl(bin.addr, &pki.ca_file, "/v3/p1/volumes", &[flag]).await;
        assert_ne!(
            got.exit, 0,
            "a client without a certificate got in: {got:?}"
        );
        assert_eq!(got.status, 0, "{got:?}");
        eprintln!(
            "curl {flag} without a certificate: exit {}: {}",
            got.exit,
            got.stderr.trim()
        );
    }
    await_metric(
        bin.admin,
        &failures("no_client_certificate"),
        Duration::from_secs(5),
        |v| v == 2.0,
    )
    .await;

    // A certificate from another CA: refused too, for another reason.
    let cert_args = |c: &Path, k: &Path| {
        vec![
            "--cert".to_owned(),
            c.display().to_string(),
            "--key".to_owned(),
            k.display().to_string(),
        ]
    };
    let args = cert_args(&stranger_cert, &stranger_key);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let got = curl(bin.addr, &pki.ca_file, "/v3/p1/volumes", &args).await;
    assert_ne!(got.exit, 0, "{got:?}");
    await_metric(
        bin.admin,
        &failures("bad_client_certificate"),
        Duration::from_secs(5),
        |v| v == 1.0,
    )
    .await;
    assert!(
        upstream.seen().is_empty(),
        "nothing refused reached the upstream"
    );

    // A certificate from the CA: served, over both versions, PUTs policed as ever.
    let args = cert_args(&client_cert, &client_key);
    for flag in ["--http1.1", "--http2"] {
        let mut with: Vec<&str> = args.iter().map(String::as_str).collect();
        with.extend([flag, "-X", "PUT", "-H", "content-type: application/json"]);
        let mut good = with.clone();
        good.extend(["--data-binary", GOOD]);
        let got = curl(bin.addr, &pki.ca_file, UPDATE, &good).await;
        assert_eq!(got.status, 200, "{got:?}");
        let mut bad = with;
        bad.extend(["--data-binary", RESERVED]);
        let got = curl(bin.addr, &pki.ca_file, UPDATE, &bad).await;
        assert_eq!(got.status, 400, "{got:?}");
    }
    assert_eq!(upstream.seen().len(), 2);

    // rustls too, with the same certificate.
    let config = client_config(
        &pki.ca_file,
        Some(&pki.client("backup-job-2", "Example Tenant")),
        &[b"http/1.1"],
    );
    let mut conn = KeepAlive::open(connect(bin.addr, &config).await.unwrap()).await;
    assert_eq!(conn.get(bin.addr.port()).await, Ok(200));
    drop(conn);

    bin.signal("TERM");
    // The access log is written when each response ends; give the last one a moment.
    let mut log = String::new();
    for _ in 0..100 {
        log = bin.log();
        if log.contains("snapguard stopped") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("snapguard::access"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        access.len(),
        5,
        "only the five served requests are logged:\n{log}"
    );
    for line in &access[..4] {
        assert_eq!(
            line["client"], "CN=backup-job, O=Example Tenant",
            "the client certificate's subject: {line}"
        );
    }
    assert_eq!(access[4]["client"], "CN=backup-job-2, O=Example Tenant");
}

#[tokio::test]
async fn without_mtls_the_access_log_has_no_client() {
    let dir = TempDir::new("nomtls");
    let pki = Pki::new(&dir, "main");
    let (cert, key) = write_pair(&dir, "server", &pki.server("localhost", 1, next_year()));
    let toml = format!(
        "[log]\nformat = \"json\"\n\n{}",
        tls_table(&cert, &key, None, "")
    );
    let upstream = Upstream::start(Reply::Ok).await;
    let bin = Binary::start(binary_path(), &upstream.url(), &toml, &[]).await;
    // A client certificate nobody asked for is not sent (the server requests none).
    let client = pki.client("backup-job", "Example Tenant");
    let config = client_config(&pki.ca_file, Some(&client), &[b"http/1.1"]);
    let mut conn = KeepAlive::open(connect(bin.addr, &config).await.unwrap()).await;
    assert_eq!(conn.get(bin.addr.port()).await, Ok(200));
    drop(conn);
    bin.signal("TERM");
    let mut log = String::new();
    for _ in 0..100 {
        log = bin.log();
        if log.contains("snapguard stopped") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = log
        .lines()
        .find(|l| l.contains("snapguard::access"))
        .unwrap_or_else(|| panic!("no access line:\n{log}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["client"], "-", "{line}");
}

// ---- what is not a TLS client -----------------------------------------------------------------

#[tokio::test]
async fn plain_http_on_the_tls_port_is_refused_as_not_tls() {
    let f = tls_fixture(false, "", "").await;
    let answer = raw(
        f.proxy.addr,
        b"GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        !answer.contains("HTTP/1."),
        "answered in plain HTTP: {answer:?}"
    );
    await_metric(
        f.proxy.admin,
        &failures("not_tls"),
        Duration::from_secs(5),
        |v| v == 1.0,
    )
    .await;

    // curl speaking http:// to it fails the same way.
    let out = run(
        "curl",
        vec![
            "-q".into(),
            "--silent".into(),
            "--noproxy".into(),
            "*".into(),
            "--max-time".into(),
            "5".into(),
            format!("http://127.0.0.1:{}/v3/p1/volumes", f.proxy.addr.port()),
        ],
    )
    .await;
    assert!(!out.status.success(), "{out:?}");
    await_metric(
        f.proxy.admin,
        &failures("not_tls"),
        Duration::from_secs(5),
        |v| v == 2.0,
    )
    .await;
    assert!(f.upstream.seen().is_empty());
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_handshake_timeout() {
    let f = tls_fixture(false, "handshake_timeout = \"400ms\"\n", "").await;
    // Nothing at all, and a ClientHello's first bytes then nothing: both are cut.
    for opening in [&b""[..], &b"\x16\x03\x01\x02\x00\x01"[..]] {
        let mut stream = TcpStream::connect(f.proxy.addr).await.unwrap();
        if !opening.is_empty() {
            tokio::io::AsyncWriteExt::write_all(&mut stream, opening)
                .await
                .unwrap();
        }
        let started = Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
            .await
            .expect("the connection is still open after 5s");
        let waited = started.elapsed();
        // Closed (EOF or reset), having sent nothing.
        assert!(read.map_or(true, |n| n == 0), "{buf:?}");
        assert!(
            waited >= Duration::from_millis(350) && waited < Duration::from_secs(3),
            "closed after {waited:?}, handshake_timeout is 400ms"
        );
    }
    await_metric(
        f.proxy.admin,
        &failures("timeout"),
        Duration::from_secs(5),
        |v| v == 2.0,
    )
    .await;
    // Still serving.
    let got = curl(f.proxy.addr, &f.pki.ca_file, "/v3/p1/volumes", &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
}

// ---- rotation --------------------------------------------------------------------------------

/// How many keep-alive connections [`Traffic`] keeps busy at once; the last one speaks HTTP/2.
const KEEPALIVE: usize = 4;

/// Keeps requests going until `stop`: [`KEEPALIVE`] keep-alive connections at once, each
/// sending requests one after another (HTTP/1.1 on all but the last, HTTP/2 over ALPN on that
/// one), and a new connection for each request beside them. Counts successes as they happen,
/// and keeps every failure and the certificates new connections were served.
struct Traffic {
    stop: Arc<AtomicBool>,
    /// Requests served so far on each keep-alive connection.
    served: Vec<Arc<AtomicUsize>>,
    /// Each keep-alive connection's certificate and failures.
    keepalive: Vec<tokio::task::JoinHandle<(String, Vec<String>)>>,
    /// Successes, failures and certificates served on new connections.
    fresh: tokio::task::JoinHandle<(usize, Vec<String>, BTreeSet<String>)>,
}

/// What [`Traffic`] saw, once stopped.
struct Tally {
    /// Requests served on each keep-alive connection, and on new connections.
    kept: Vec<usize>,
    fresh: usize,
    /// The certificate each keep-alive connection was served, and those new ones were.
    kept_certificates: Vec<String>,
    fresh_certificates: BTreeSet<String>,
    errors: Vec<String>,
}

impl Traffic {
    async fn start(addr: SocketAddr, ca: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let http1 = client_config(ca, None, &[b"http/1.1"]);
        let http2 = client_config(ca, None, &[b"h2"]);
        let (mut served, mut keepalive) = (Vec::new(), Vec::new());
        for i in 0..KEEPALIVE {
            let (config, version) = match i + 1 == KEEPALIVE {
                true => (&http2, "h2"),
                false => (&http1, "http/1.1"),
            };
            let stream = connect(addr, config).await.unwrap();
            assert_eq!(stream.get_ref().1.alpn_protocol(), Some(version.as_bytes()));
            let certificate = served_cn(&stream);
            let mut conn = KeepAlive::open(stream).await;
            let (until, count) = (stop.clone(), Arc::new(AtomicUsize::new(0)));
            served.push(count.clone());
            keepalive.push(tokio::spawn(async move {
                let mut errors = Vec::new();
                while !until.load(Ordering::Relaxed) {
                    match conn.get(addr.port()).await {
                        Ok(200) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        other => errors.push(format!("keep-alive {i} ({version}): {other:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (certificate, errors)
            }));
        }
        let until = stop.clone();
        let fresh = tokio::spawn(async move {
            let (mut ok, mut errors, mut certificates) = (0, Vec::new(), BTreeSet::new());
            while !until.load(Ordering::Relaxed) {
                match connect(addr, &http1).await {
                    Ok(stream) => {
                        certificates.insert(served_cn(&stream));
                        let mut conn = KeepAlive::open(stream).await;
                        match conn.get(addr.port()).await {
                            Ok(200) => ok += 1,
                            other => errors.push(format!("new connection: {other:?}")),
                        }
                    }
                    Err(e) => errors.push(format!("new connection: handshake: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, errors, certificates)
        });
        Self {
            stop,
            served,
            keepalive,
            fresh,
        }
    }

    /// Requests served on each keep-alive connection so far.
    fn served(&self) -> Vec<usize> {
        self.served
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Stops and says what was seen.
    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let (mut kept_certificates, mut errors) = (Vec::new(), Vec::new());
        for task in self.keepalive {
            let (certificate, failed) = task.await.unwrap();
            kept_certificates.push(certificate);
            errors.extend(failed);
        }
        let (fresh, failed, fresh_certificates) = self.fresh.await.unwrap();
        errors.extend(failed);
        Tally {
            kept: self
                .served
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect(),
            fresh,
            kept_certificates,
            fresh_certificates,
            errors,
        }
    }
}

/// Opens new connections until one is served the certificate named `cn`; how long that took.
async fn until_served(addr: SocketAddr, ca: &Path, cn: &str, within: Duration) -> Duration {
    let config = client_config(ca, None, &[b"http/1.1"]);
    let started = Instant::now();
    loop {
        let stream = connect(addr, &config).await.unwrap();
        if served_cn(&stream) == cn {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "still served {} after {within:?}",
            served_cn(&stream)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_secret_volume_swap_is_served_to_new_connections_without_failing_a_request() {
    // The periodic re-read is an hour away: the watch on the volume's directory must see it.
    let dir = TempDir::new("rotation");
    let pki = Pki::new(&dir, "main");
    let first_expiry = unix_now() + 30 * 86400;
    let mut volume = SecretVolume::new(&pki.server("gateway-gen1", 0x1001, first_expiry));
    let toml = tls_table(
        &volume.cert(),
        &volume.key(),
        None,
        "reload_interval = \"1h\"\n",
    );
    let upstream = Upstream::start(Reply::Ok).await;
    let proxy = Proxy::start(&upstream.url(), &toml).await;
    let (addr, admin, ca) = (proxy.addr, proxy.admin, pki.ca_file.clone());

    assert_eq!(
        until_served(addr, &ca, "gateway-gen1", Duration::from_millis(300))
            .await
            .as_secs(),
        0
    );
    assert!(served_by_openssl(addr, &ca).await.contains("serial=1001"));
    let text = metrics(admin).await;
    assert_eq!(sample(&text, RELOADS_OK), 0.0, "{text}");
    assert_eq!(sample(&text, EXPIRY), first_expiry as f64);

    // Rotate under traffic: four keep-alive connections (one of them HTTP/2) and new
    // connections beside them, all busy while the volume's ..data is swapped.
    let traffic = Traffic::start(addr, &ca).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before_swap = traffic.served();
    let second_expiry = unix_now() + 90 * 86400;
    let second = pki.server("gateway-gen2", 0x1002, second_expiry);
    volume.update(&second.cert, &second.key);
    let took = until_served(addr, &ca, "gateway-gen2", Duration::from_secs(5)).await;
    eprintln!("new connections got the new certificate {took:?} after the swap");
    assert!(
        took <= Duration::from_secs(2),
        "the new certificate took {took:?}: the directory watch did not see the swap"
    );
    let at_new = traffic.served();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let seen = traffic.finish().await;
    assert!(
        seen.errors.is_empty(),
        "requests failed during the rotation: {:#?}",
        seen.errors
    );
    eprintln!(
        "rotation: {:?} requests on {KEEPALIVE} keep-alive connections ({:?} before the swap, \
         {:?} by the time new connections got the new certificate), {} on new ones, none failed",
        seen.kept, before_swap, at_new, seen.fresh
    );
    for (i, ((before, at), end)) in before_swap.iter().zip(&at_new).zip(&seen.kept).enumerate() {
        assert!(
            *before >= 5 && end - at >= 5,
            "keep-alive connection {i} was not busy on both sides of the swap: \
             {before} before, {} after the new certificate was served",
            end - at
        );
    }
    assert!(seen.fresh >= 10, "too little traffic: {} fresh", seen.fresh);
    assert_eq!(
        seen.kept_certificates,
        vec!["gateway-gen1"; KEEPALIVE],
        "connections opened before the swap keep the old certificate"
    );
    assert_eq!(
        seen.fresh_certificates,
        BTreeSet::from(["gateway-gen1".to_owned(), "gateway-gen2".to_owned()]),
        "new connections under the load were served the old certificate, then the new one"
    );

    assert!(served_by_openssl(addr, &ca).await.contains("serial=1002"));
    let text = metrics(admin).await;
    assert!(sample(&text, RELOADS_OK) >= 1.0, "{text}");
    assert_eq!(sample(&text, EXPIRY), second_expiry as f64, "{text}");
    let failed_so_far = sample(&text, RELOADS_FAILED);
    assert_eq!(
        failed_so_far, 0.0,
        "a good rotation counted a failure:\n{text}"
    );

    // A rotation to a key that does not match: the pair in force stays, a failure is counted.
    let third = pki.server("gateway-gen3", 0x1003, next_year());
    let stranger = KeyPair::generate().unwrap().serialize_pem();
    volume.update(&third.cert, &stranger);
    await_metric(admin, RELOADS_FAILED, Duration::from_secs(5), |v| v >= 1.0).await;
    // And one to a file that is no key at all.
    volume.update(
        &third.cert,
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    );
    let failed = sample(&metrics(admin).await, RELOADS_FAILED);
    await_metric(admin, RELOADS_FAILED, Duration::from_secs(5), |v| {
        v > failed
    })
    .await;
    let config = client_config(&ca, None, &[b"h2"]);
    let stream = connect(addr, &config).await.unwrap();
    assert_eq!(
        served_cn(&stream),
        "gateway-gen2",
        "the pair in force still serves"
    );
    assert!(served_by_openssl(addr, &ca).await.contains("serial=1002"));
    let text = metrics(admin).await;
    assert_eq!(sample(&text, EXPIRY), second_expiry as f64, "{text}");
    let ok_before = sample(&text, RELOADS_OK);

    // Fixed: the next good pair is taken.
    let fourth = pki.server("gateway-gen4", 0x1004, next_year());
    volume.update(&fourth.cert, &fourth.key);
    until_served(addr, &ca, "gateway-gen4", Duration::from_secs(5)).await;
    await_metric(admin, RELOADS_OK, Duration::from_secs(5), |v| {
        v == ok_before + 1.0
    })
    .await;
    assert_eq!(
        upstream.seen().len(),
        seen.kept.iter().sum::<usize>() + seen.fresh
    );
}

#[tokio::test]
async fn a_pair_left_broken_is_counted_and_logged_once_saying_why() {
    let dir = TempDir::new("broken-log");
    let pki = Pki::new(&dir, "main");
    let mut volume = SecretVolume::new(&pki.server("logged-gen1", 1, next_year()));
    // Re-read every second, and on every event in the volume's directory.
    let toml = tls_table(
        &volume.cert(),
        &volume.key(),
        None,
        "reload_interval = \"1s\"\n",
    );
    let upstream = Upstream::start(Reply::Ok).await;
    let bin = Binary::start(binary_path(), &upstream.url(), &toml, &[]).await;
    let stranger = KeyPair::generate().unwrap().serialize_pem();
    volume.update(&pki.server("logged-gen2", 2, next_year()).cert, &stranger);
    await_metric(bin.admin, RELOADS_FAILED, Duration::from_secs(5), |v| {
        v >= 1.0
    })
    .await;
    // The same broken pair, re-read on directory events and on the timer.
    for i in 0..8 {
        volume.dir.write("unrelated", &i.to_string());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let text = metrics(bin.admin).await;
    assert_eq!(
        sample(&text, RELOADS_FAILED),
        1.0,
        "the same broken pair was counted on every re-read:\n{text}"
    );
    let log = bin.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS files could not be reloaded"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning for one broken pair:\n{log}");
    let key = volume.key().display().to_string();
    assert!(
        warnings[0].contains("the key does not match the certificate")
            && warnings[0].contains(&key),
        "the warning does not say why, naming the file: {}",
        warnings[0]
    );
    until_served(
        bin.addr,
        &pki.ca_file,
        "logged-gen1",
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test]
async fn sighup_reloads_the_certificate() {
    let dir = TempDir::new("sighup");
    let pki = Pki::new(&dir, "main");
    let (cert, key) = write_pair(&dir, "server", &pki.server("before-hup", 1, next_year()));
    let toml = tls_table(&cert, &key, None, "reload_interval = \"1h\"\n");
    let upstream = Upstream::start(Reply::Ok).await;
    let bin = Binary::start(binary_path(), &upstream.url(), &toml, &[]).await;
    until_served(bin.addr, &pki.ca_file, "before-hup", Duration::from_secs(1)).await;
    write_pair(&dir, "server", &pki.server("after-hup", 2, next_year()));
    bin.signal("HUP");
    until_served(bin.addr, &pki.ca_file, "after-hup", Duration::from_secs(3)).await;
}

// ---- bad files -------------------------------------------------------------------------------

/// Three `[tls]` tables that must not load, each with the file that is wrong.
fn bad_tables(dir: &TempDir, pki: &Pki) -> Vec<(&'static str, String, PathBuf)> {
    let (cert, _) = write_pair(dir, "good", &pki.server("localhost", 1, next_year()));
    let (_, other_key) = write_pair(dir, "other", &pki.server("localhost", 2, next_year()));
    // A certificate that expired yesterday, with its own key.
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    valid(&mut params, unix_now() - 30 * 86400, unix_now() - 86400);
    let key = KeyPair::generate().unwrap();
    let expired = params.signed_by(&key, &pki.ca).unwrap();
    let expired_cert = dir.write("expired.crt", &expired.pem());
    let expired_key = dir.write("expired.key", &key.serialize_pem());
    let missing = dir.path("missing.crt");
    vec![
        (
            "a key of another certificate",
            tls_table(&cert, &other_key, None, ""),
            other_key.clone(),
        ),
        (
            "an expired certificate",
            tls_table(&expired_cert, &expired_key, None, ""),
            expired_cert.clone(),
        ),
        (
            "a missing certificate file",
            tls_table(&missing, &other_key, None, ""),
            missing,
        ),
        (
            "a missing client CA file",
            tls_table(
                &cert,
                &dir.path("good.key"),
                Some(&dir.path("no-ca.pem")),
                "",
            ),
            dir.path("no-ca.pem"),
        ),
    ]
}

#[tokio::test]
async fn snapguard_refuses_to_start_on_bad_tls_files_naming_the_file() {
    let dir = TempDir::new("start");
    let pki = Pki::new(&dir, "main");
    for (what, table, named) in bad_tables(&dir, &pki) {
        let config = dir.write("snapguard.toml", &table);
        let out = run(
            binary_path(),
            vec![
                "--config".into(),
                config.display().to_string(),
                "--listen".into(),
                support::free_addr().to_string(),
                "--admin".into(),
                support::free_addr().to_string(),
                "--upstream".into(),
                "http://127.0.0.1:9".into(),
            ],
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: started anyway");
        assert!(
            stderr.contains(&named.display().to_string()),
            "{what}: the error names {}:\n{stderr}",
            named.display()
        );
        eprintln!("{what}: exit {:?}", out.status.code());
    }
}

#[tokio::test]
async fn check_config_refuses_bad_tls_files_with_exit_64_naming_the_file() {
    let dir = TempDir::new("check");
    let pki = Pki::new(&dir, "main");
    for (what, table, named) in bad_tables(&dir, &pki) {
        let config = dir.write("snapguard.toml", &table);
        let out = run(
            binary_path(),
            vec!["check-config".into(), config.display().to_string()],
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{what}: {stderr}");
        assert!(
            stderr.contains(&named.display().to_string()),
            "{what}: the error names {}:\n{stderr}",
            named.display()
        );
    }
    // And a good pair passes.
    let (cert, key) = write_pair(&dir, "fine", &pki.server("localhost", 3, next_year()));
    let config = dir.write("fine.toml", &tls_table(&cert, &key, Some(&pki.ca_file), ""));
    let out = run(
        binary_path(),
        vec!["check-config".into(), config.display().to_string()],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
}
