//! Test support: a recording upstream on 127.0.0.1:0, snapguard started in-process in front of
//! it, and real HTTP clients (hyper's, and raw sockets where exact bytes matter).
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use snapguard::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as on the wire.
    pub target: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// How many data frames the body came in, as this server's hyper read them.
    pub frames: usize,
}

/// How the upstream answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with a small JSON body.
    Ok,
    /// Cinder's 404 for a missing snapshot.
    NotFound,
    /// Reads the request, then never answers.
    Silent,
    /// 200 with `n` bytes of [`pattern`], streamed.
    Large(u64),
    /// 200 after the given delay.
    Slow(Duration),
    /// 200 with `n` bytes of [`pattern`] (of a body with no declared length), then nothing
    /// more, ever.
    Stalls(u64),
    /// 200 with these extra response headers.
    WithHeaders(Vec<(&'static str, &'static str)>),
}

pub const OK_BODY: &str = r#"{"snapshot":{"id":"s1","status":"available"}}"#;
pub const NOT_FOUND_BODY: &str =
    r#"{"itemNotFound":{"code":404,"message":"Snapshot s1 could not be found."}}"#;

/// A recording upstream server.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Body bytes received so far, over all requests, as they arrive.
    pub progress: watch::Receiver<u64>,
    /// Connections accepted, and connections open now.
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn start(reply: Reply) -> Self {
        Self::start_with(reply, None).await
    }

    /// An upstream speaking TLS with `tls`, when given.
    pub async fn start_with(reply: Reply, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (progress_tx, progress) = watch::channel(0u64);
        let progress_tx = Arc::new(progress_tx);
        let record = seen.clone();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let counters = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counters.0.fetch_add(1, Ordering::SeqCst);
                let (record, reply, progress_tx, tls) = (
                    record.clone(),
                    reply.clone(),
                    progress_tx.clone(),
                    tls.clone(),
                );
                let open = OpenConnection::new(&counters.1);
                tokio::spawn(async move {
                    let _open = open;
                    let svc = service_fn(move |req| {
                        handle(req, record.clone(), reply.clone(), progress_tx.clone())
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            builder.serve_connection(TokioIo::new(stream), svc).await
                        }
                        None => builder.serve_connection(TokioIo::new(stream), svc).await,
                    };
                });
            }
        });
        Self {
            addr,
            seen,
            progress,
            accepted,
            open,
        }
    }

    /// How many connections the upstream has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// How many of them are open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The one request the upstream received; panics if it saw another number.
    pub fn only(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(
            seen.len(),
            1,
            "upstream saw {} requests: {seen:#?}",
            seen.len()
        );
        seen.into_iter().next().unwrap()
    }
}

/// Counts a connection as open until it drops.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    req: Request<Incoming>,
    record: Arc<Mutex<Vec<Seen>>>,
    reply: Reply,
    progress: Arc<watch::Sender<u64>>,
) -> Result<Response<TestBody>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let (mut bytes, mut frames) = (Vec::new(), 0);
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            frames += 1;
            bytes.extend_from_slice(&data);
            progress.send_modify(|n| *n += data.len() as u64);
        }
    }
    record.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map(|pq| pq.to_string())
            .unwrap_or_default(),
        version: parts.version,
        headers: parts.headers,
        body: Bytes::from(bytes),
        frames,
    });
    let response = match reply {
        Reply::Ok => json(StatusCode::OK, OK_BODY),
        Reply::NotFound => json(StatusCode::NOT_FOUND, NOT_FOUND_BODY),
        Reply::Silent => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            json(StatusCode::OK, OK_BODY)
        }
        Reply::Large(n) => Response::new(TestBody::pattern(n)),
        Reply::Stalls(n) => Response::new(TestBody::Stall { sent: 0, total: n }),
        Reply::Slow(delay) => {
            tokio::time::sleep(delay).await;
            json(StatusCode::OK, OK_BODY)
        }
        Reply::WithHeaders(headers) => {
            let mut r = json(StatusCode::OK, OK_BODY);
            for (k, v) in headers {
                r.headers_mut().append(k, v.parse().unwrap());
            }
            r
        }
    };
    Ok(response)
}

fn json(status: StatusCode, body: &'static str) -> Response<TestBody> {
    let mut r = Response::new(TestBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// The byte at offset `i` of a patterned body: cheap to make and to check, and not periodic in
/// any power of two, so a dropped or repeated chunk shows.
pub fn pattern_byte(i: u64) -> u8 {
    ((i.wrapping_mul(31).wrapping_add(i / 251)) % 251) as u8
}

/// Checks `body` is exactly `n` bytes of the pattern.
pub fn assert_pattern(body: &[u8], n: u64) {
    assert_eq!(body.len() as u64, n, "length");
    if let Some(i) = (0..n).find(|&i| body[i as usize] != pattern_byte(i)) {
        panic!("pattern differs at byte {i}");
    }
}

/// A body for tests: fixed bytes, a generated pattern, or chunks fed through a channel.
pub enum TestBody {
    Full(Option<Bytes>),
    Pattern {
        sent: u64,
        total: u64,
    },
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
    /// A pattern of `total` bytes, then a body that never moves again.
    Stall {
        sent: u64,
        total: u64,
    },
}

impl TestBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Self::Full(Some(b.into()))
    }
    pub fn pattern(total: u64) -> Self {
        Self::Pattern { sent: 0, total }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            TestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            TestBody::Pattern { sent, total } => {
                if *sent >= *total {
                    return Poll::Ready(None);
                }
                let n = (*total - *sent).min(64 * 1024);
                let chunk: Vec<u8> = (*sent..*sent + n).map(pattern_byte).collect();
                *sent += n;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
            TestBody::Channel(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
            TestBody::Stall { sent, total } => {
                if *sent >= *total {
                    return Poll::Pending;
                }
                let n = (*total - *sent).min(64 * 1024);
                let chunk: Vec<u8> = (*sent..*sent + n).map(pattern_byte).collect();
                *sent += n;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            TestBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            TestBody::Pattern { sent, total } => SizeHint::with_exact(total - sent),
            TestBody::Channel(_) | TestBody::Stall { .. } => SizeHint::default(),
        }
    }
}

/// snapguard on loopback: in-process by default, or the binary named by `SNAPGUARD_BIN` (for
/// example `SNAPGUARD_BIN=target/release/snapguard cargo test --release`), so the same tests
/// hold against a release build.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Reloads the in-process server.
    pub handle: Option<snapguard::server::Handle>,
    child: Option<Binary>,
}

impl Proxy {
    /// Starts snapguard with `toml` in front of `upstream` (which overrides any url in `toml`).
    pub async fn start(upstream: &str, toml: &str) -> Self {
        if let Ok(bin) = std::env::var("SNAPGUARD_BIN") {
            return Self::spawn(&bin, upstream, toml).await;
        }
        let mut config = Config::from_toml(toml).expect("test config");
        config.upstream.url = upstream.parse().unwrap();
        config.validate().expect("test config");
        Self::start_config(config).await
    }

    /// Starts snapguard in-process with `config`, on ports chosen by the kernel.
    pub async fn start_config(mut config: Config) -> Self {
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.admin = "127.0.0.1:0".parse().unwrap();
        let server = Server::bind(config).await.expect("bind");
        let (addr, admin) = (server.local_addr(), server.admin_addr());
        let handle = Some(server.handle());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            admin,
            stop: Some(stop),
            task: Some(task),
            handle,
            child: None,
        }
    }

    async fn spawn(bin: &str, upstream: &str, toml: &str) -> Self {
        let binary = Binary::start(bin, upstream, toml, &[("RUST_LOG", "error")]).await;
        Self {
            addr: binary.addr,
            admin: binary.admin,
            stop: None,
            task: None,
            handle: None,
            child: Some(binary),
        }
    }

    /// Signals shutdown (SIGTERM for a spawned binary) and waits for the drain to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        if let Some(child) = self.child.take() {
            child.signal("TERM");
            let mut child = child;
            let status = child.wait().await;
            assert!(status.success(), "snapguard exited with {status}");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// The snapguard binary, run with a config file on free loopback ports, its log in a file.
pub struct Binary {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Binary {
    /// Starts `bin` with `toml` in front of `upstream` and waits until it is ready.
    pub async fn start(bin: &str, upstream: &str, toml: &str, env: &[(&str, &str)]) -> Self {
        Self::launch(bin, upstream, Some(toml), &[], env).await
    }

    /// Starts `bin` with no config file at all, on flags (and `extra` ones) alone.
    pub async fn flags_only(bin: &str, upstream: &str, extra: &[&str]) -> Self {
        Self::launch(bin, upstream, None, extra, &[]).await
    }

    async fn launch(
        bin: &str,
        upstream: &str,
        toml: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let stem = std::env::temp_dir().join(format!(
            "snapguard-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let (config, log) = (stem.with_extension("toml"), stem.with_extension("log"));
        let (addr, admin) = (free_addr(), free_addr());
        let mut command = Command::new(bin);
        command.env_remove("SNAPGUARD_CONFIG");
        if let Some(toml) = toml {
            // Tests that rewrite the file reload it with SIGHUP, unless they ask for the watch:
            // a watch picking a rewrite up first would reload it twice.
            let toml = if toml.contains("reload_interval") {
                toml.to_owned()
            } else {
                format!("reload_interval = \"0s\"\n{toml}")
            };
            std::fs::write(&config, toml).unwrap();
            command.arg("--config").arg(&config);
        }
        let child = command
            .args([
                "--listen",
                &addr.to_string(),
                "--admin",
                &admin.to_string(),
                "--upstream",
                upstream,
            ])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn snapguard");
        let binary = Self {
            addr,
            admin,
            config,
            log,
            child: Some(child),
        };
        wait_ready(admin).await;
        binary
    }

    /// The process's resident set size, in KiB.
    pub fn rss_kb(&self) -> u64 {
        let pid = self.child.as_ref().unwrap().id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Sends a signal by name (`TERM`, `HUP`).
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The built `snapguard` binary of this test run.
pub fn binary_path() -> &'static str {
    env!("CARGO_BIN_EXE_snapguard")
}

/// GETs `path` on the admin listener.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Got {
    send(
        Version::HTTP_11,
        "GET",
        &format!("http://{admin}{path}"),
        &[],
        "",
    )
    .await
}

/// The value of the sample `series` (name and labels exactly as exposed), or 0 when absent.
pub fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The value of `series` on the admin endpoint now (0 when it has none).
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let got = admin_get(admin, "/metrics").await;
    sample(&String::from_utf8_lossy(&got.body), series)
}

/// Polls `series` on the admin endpoint until it equals `want` (counters are written when a
/// response body ends, which can be a moment after the client has it).
pub async fn await_sample(admin: SocketAddr, series: &str, want: f64) {
    let mut last = String::new();
    for _ in 0..100 {
        last = String::from_utf8_lossy(&admin_get(admin, "/metrics").await.body).into_owned();
        if sample(&last, series) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{series} never became {want}:\n{last}");
}

/// A loopback address that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits until the admin endpoint says ready.
pub async fn wait_ready(admin: SocketAddr) {
    for _ in 0..200 {
        let response = raw(
            admin,
            b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Duration::from_secs(1),
        )
        .await;
        if response.starts_with("HTTP/1.1 200") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("snapguard at {admin} did not become ready");
}

/// A recording upstream answering with `reply`, and snapguard with `toml` in front of it.
pub async fn pair(reply: Reply, toml: &str) -> (Upstream, Proxy) {
    let upstream = Upstream::start(reply).await;
    let proxy = Proxy::start(&upstream.url(), toml).await;
    (upstream, proxy)
}

/// A response, read whole.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Sends one request with hyper's HTTP/1.1 client (or HTTP/2 prior knowledge).
pub async fn send(
    version: Version,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Got {
    send_body(version, method, url, headers, TestBody::full(body)).await
}

pub async fn send_body(
    version: Version,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> Got {
    let mut builder = Client::builder(TokioExecutor::new());
    if version == Version::HTTP_2 {
        builder.http2_only(true);
    }
    let client: Client<HttpConnector, TestBody> = builder.build(HttpConnector::new());
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = client
        .request(req.body(body).unwrap())
        .await
        .expect("request");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends `GET /v3/p1/volumes` to `addr` on a connection whose receive buffer is 4 KiB, reads
/// the response head (a 200) and nothing more; the connection is returned, to be kept open
/// (or dropped) by the caller.
pub async fn taking_nothing(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(b"GET /v3/p1/volumes HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = stream.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &head[..n]);
    stream
}

/// An HTTP/2 (prior knowledge) client connection to `addr`, driven by a task of its own whose
/// handle says how the connection ended.
pub async fn h2c(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<String>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    (sender, tokio::spawn(conn))
}

/// Writes `raw` on a fresh connection and reads until the peer closes or `wait` passes.
pub async fn raw(addr: SocketAddr, raw: &[u8], wait: Duration) -> String {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return String::new();
    };
    if stream.write_all(raw).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The default config with tighter timeouts, for tests that wait on them.
pub const FAST_TIMEOUTS: &str = "[timeouts]\nupstream_response = \"500ms\"\nupstream_connect = \"500ms\"\nrequest_body = \"500ms\"\nshutdown_grace = \"5s\"\n";
