#!/usr/bin/env python3
"""The cost of TLS termination: snapguard ([tls], rustls with ring) and nginx (OpenSSL) with the
same certificates, in one run on one machine, interleaved, reported as medians and ratios.

    python3 bench/tls.py [--rounds 3] [--seconds 6] [--clients 8] [--head] [--no-build]

Everything runs on 127.0.0.1. The helpers of bench/run.py are imported (processes pinned with
taskset and stopped by PID, CPU time from /proc/PID/stat, wrk scripts). The bench upstream
(examples/bench_upstream.rs) and the proxy under test share CPU 1; the load generator runs on
CPU 0. snapguard runs `--threads 1`; nginx one worker in one process (master_process off, so its
CPU time is that process's), access logs off for both, the same keep-alive upstream pool as in
bench/run.py, and TLS as Mozilla's "intermediate" profile has it (TLS 1.2 and 1.3, ECDHE,
shared session cache, no session tickets).

Two certificates are generated with the openssl CLI, self-signed for localhost and 127.0.0.1:
ECDSA P-256 and RSA 2048. Each proxy gets a listener for each, and a plain HTTP one, so all
transports of both proxies are measured in the same run:

- new connections: every request on a new connection (GET, `Connection: close`), made by a
  small Rust client embedded below (rustls with ring, built with snapguard's Cargo.lock), N
  threads each a blocking loop of connect, handshake, request, read to EOF, close. Modes: plain
  TCP; TLS 1.3 full handshake with each certificate; TLS 1.3 resumed (tickets from the
  client's session cache, one per connection). CPU per connection minus the plain one is the
  CPU of the handshake.
- keep-alive: wrk, 1 thread, 32 connections, HTTP/1.1 over plain TCP and over TLS (ECDSA
  certificate; wrk speaks no ALPN, so HTTP/1.1), GET passthrough and an allowed policed PUT.

TLS 1.2 and ALPN h2 are only checked (what openssl s_client and curl negotiate), not measured.

Builds snapguard and the upstream into $CARGO_TARGET_DIR (default: /tmp/tlsbench-target), as
bench/run.py does (two builds, so the binary measured is the one users run); from the working
tree, or with --head from HEAD as committed (into $CARGO_TARGET_DIR/head).
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import (BODY_ALLOWED, ROOT, Proc, ensure_tools, free_port, log, parse_duration_us,  # noqa: E402
                 wait_port, wrk_script)

TARGET_DIR = os.environ.get("CARGO_TARGET_DIR", "/tmp/tlsbench-target")
RELEASE = os.path.join(TARGET_DIR, "release")
PATH = "/v3/p1/snapshots/s1"
KEEPALIVE_SCENARIOS = {
    "a GET passthrough": ("GET", PATH, None),
    "b PUT allowed (80 B)": ("PUT", PATH, BODY_ALLOWED),
}
# mode -> (listener, client mode)
NEWCONN_MODES = {
    "plain TCP": ("plain", "plain"),
    "TLS 1.3 full, ECDSA P-256": ("ecdsa", "full"),
    "TLS 1.3 full, RSA 2048": ("rsa", "full"),
    "TLS 1.3 resumed (ticket)": ("ecdsa", "resume"),
}
PROXIES = ["nginx", "snapguard"]


# ---------------------------------------------------------------------------------------------
# The new-connection client: Rust and rustls (ring), N blocking threads on CPU 0. A Python or
# `openssl s_time` client (OpenSSL 3.0) costs 0.8 to 1.2 ms of CPU per TLS connection here, two
# to four times what either proxy spends, so it, not the proxy, would set the rate.

CLIENT_CARGO = """[package]
name = "tls-bench-client"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
rustls = { version = "0.23", default-features = false, features = ["ring", "std", "tls12"] }

[workspace]
"""

CLIENT_MAIN = r"""
//! tls-bench-client PORT plain|full|resume THREADS START END PATH
//! From START to END (Unix seconds), each thread makes one connection after another: connect,
//! (TLS 1.3 handshake,) GET PATH with `Connection: close`, read to EOF, close. Prints JSON.
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, SignatureScheme, StreamOwned};

/// Any certificate is accepted (the server's cost is measured, not the client's chain
/// checks), but the handshake signature is verified, as TLS requires.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>,
                          _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct)
                              -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct)
                              -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// One connection; Ok(resumed).
fn one(port: u16, config: Option<&Arc<ClientConfig>>, request: &[u8]) -> Result<bool, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut answer = Vec::with_capacity(1024);
    let resumed = match config {
        None => {
            let mut tcp = tcp;
            tcp.write_all(request).map_err(|e| format!("write: {e}"))?;
            tcp.read_to_end(&mut answer).map_err(|e| format!("read: {e}"))?;
            false
        }
        Some(config) => {
            let name = ServerName::try_from("localhost").unwrap();
            let conn = ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
            let mut tls = StreamOwned::new(conn, tcp);
            tls.write_all(request).map_err(|e| format!("handshake or write: {e}"))?;
            match tls.read_to_end(&mut answer) {
                Ok(_) => {}
                // A close without close_notify after a whole answer.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof && !answer.is_empty() => {}
                Err(e) => return Err(format!("read: {e}")),
            }
            tls.conn.handshake_kind() == Some(HandshakeKind::Resumed)
        }
    };
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(format!("answer: {:?}", String::from_utf8_lossy(&answer[..answer.len().min(40)])));
    }
    Ok(resumed)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let port: u16 = a[1].parse().unwrap();
    let mode = a[2].clone();
    let threads: usize = a[3].parse().unwrap();
    let (start, end): (f64, f64) = (a[4].parse().unwrap(), a[5].parse().unwrap());
    let request = format!("GET {} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                           Connection: close\r\n\r\n", a[6]).into_bytes();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13]).unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if mode == "full" {
        config.resumption = rustls::client::Resumption::disabled();
    }
    let config = Arc::new(config);
    let config = if mode == "plain" { None } else { Some(config) };
    while now() < start {
        std::thread::sleep(Duration::from_millis(2));
    }
    let handles: Vec<_> = (0..threads).map(|_| {
        let (config, request) = (config.clone(), request.clone());
        std::thread::spawn(move || {
            let (mut done, mut errors, mut resumed, mut first_error) = (0u64, 0u64, 0u64, String::new());
            while now() < end {
                match one(port, config.as_ref(), &request) {
                    Ok(r) => { done += 1; resumed += r as u64; }
                    Err(e) => {
                        errors += 1;
                        if first_error.is_empty() { first_error = e; }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            (done, errors, resumed, first_error)
        })
    }).collect();
    let (mut done, mut errors, mut resumed, mut first_error) = (0, 0, 0, String::new());
    for h in handles {
        let (d, e, r, f) = h.join().unwrap();
        done += d; errors += e; resumed += r;
        if first_error.is_empty() { first_error = f; }
    }
    println!("{{\"done\": {done}, \"errors\": {errors}, \"resumed\": {resumed}, \"first_error\": {:?}}}",
             first_error);
}
"""


def build_client():
    """Builds the client with snapguard's Cargo.lock, so the same rustls and ring, already fetched."""
    src = os.path.join(TARGET_DIR, "tls-bench-client")
    os.makedirs(os.path.join(src, "src"), exist_ok=True)
    for path, text in (("Cargo.toml", CLIENT_CARGO), ("src/main.rs", CLIENT_MAIN)):
        full = os.path.join(src, path)
        if not os.path.exists(full) or open(full).read() != text:
            with open(full, "w") as f:
                f.write(text)
    shutil.copyfile(os.path.join(ROOT, "Cargo.lock"), os.path.join(src, "Cargo.lock"))
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=src, check=True,
                   env={**os.environ, "CARGO_TARGET_DIR": TARGET_DIR})
    return os.path.join(TARGET_DIR, "release", "tls-bench-client")


def run_clients(client, port, mode, seconds, threads):
    start = time.time() + 0.3
    g0 = children_cpu()
    out = subprocess.run(["taskset", "-c", "0", client, str(port), mode, str(threads), repr(start),
                          repr(start + seconds), PATH], capture_output=True, text=True, check=True,
                         timeout=seconds + 60).stdout
    res = json.loads(out)
    res["rate"] = res["done"] / seconds
    res["seconds"] = seconds
    res["gen_busy"] = (children_cpu() - g0) / seconds
    return res


# ---------------------------------------------------------------------------------------------
# Setup.

def head_tree(commit):
    """A commit, exported (git archive) beside the target dir: the tree to build with --head."""
    tree = os.path.join(TARGET_DIR, "head-src")
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit], capture_output=True, check=True).stdout
    # -m: files dated now, not at the commit, so that cargo rebuilds when HEAD has moved since the
    # last export (it tells changed sources by their dates).
    subprocess.run(["tar", "-x", "-m", "-C", tree], input=archive, check=True)
    return tree


def build(tree, target):
    env = {**os.environ, "CARGO_TARGET_DIR": target}
    log(f"building (release) {tree} into {target}")
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "snapguard"], cwd=tree, env=env, check=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "--example", "bench_upstream"], cwd=tree, env=env,
                   check=True)


def make_certs(tmp):
    certs = {}
    for name, newkey in (("ecdsa", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]),
                         ("rsa", ["-newkey", "rsa:2048"])):
        cert, key = os.path.join(tmp, f"{name}.crt"), os.path.join(tmp, f"{name}.key")
        subprocess.run(["openssl", "req", "-x509", *newkey, "-nodes", "-keyout", key, "-out", cert, "-days", "7",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
        certs[name] = (cert, key)
    return certs


def start_snapguard(upstream_port, tmp, tls):
    """One snapguard process; `tls` is (cert, key) or None for plain HTTP."""
    port, admin = free_port(), free_port()
    conf = os.path.join(tmp, f"snapguard-{port}.toml")
    with open(conf, "w") as f:
        f.write(f'listen = "127.0.0.1:{port}"\nadmin = "127.0.0.1:{admin}"\nworkers = 1\n'
                f'[upstream]\nurl = "http://127.0.0.1:{upstream_port}"\n[log]\nlevel = "warn"\n')
        if tls:
            f.write(f'[tls]\ncert_file = "{tls[0]}"\nkey_file = "{tls[1]}"\n')
    subprocess.run([os.path.join(RELEASE, "snapguard"), "check-config", conf], check=True, capture_output=True)
    proc = Proc([os.path.join(RELEASE, "snapguard"), "--config", conf, "--threads", "1"], cpu=1,
                env={"RUST_LOG": "warn"})
    wait_port(port)
    return proc, port


def start_nginx(upstream_port, tmp, certs):
    """One nginx process (one worker) with a plain listener and one TLS listener per certificate."""
    ports = {"plain": free_port(), **{name: free_port() for name in certs}}
    location = """
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }"""
    servers = [f"server {{\n        listen 127.0.0.1:{ports['plain']} reuseport;{location}\n    }}"]
    for name, (cert, key) in certs.items():
        # nginx 1.22 turns HTTP/2 on in `listen` (`http2 on;` is 1.25.1 and later).
        servers.append(f"""server {{
        listen 127.0.0.1:{ports[name]} ssl http2 reuseport;
        ssl_certificate {cert};
        ssl_certificate_key {key};{location}
    }}""")
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # As in bench/run.py: no cap on requests per connection.
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 0;
    client_body_buffer_size 128k;
    upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000000; }}

    # Mozilla's "intermediate" TLS profile (ssl-config.mozilla.org, nginx 1.22, OpenSSL 3.0).
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ecdh_curve X25519:prime256v1:secp384r1;
    ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305;
    ssl_prefer_server_ciphers off;
    ssl_session_cache shared:SSL:10m;
    ssl_session_timeout 1d;
    ssl_session_tickets off;

    {chr(10).join('    ' + s if i else s for i, s in enumerate(servers))}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    subprocess.run([nginx, "-t", "-c", conf, "-e", f"{tmp}/nginx-error.log"], check=True, capture_output=True)
    proc = Proc([nginx, "-c", conf, "-e", f"{tmp}/nginx-error.log"], cpu=1)
    for port in ports.values():
        wait_port(port)
    return proc, ports


def handshake_facts(port, tls12=False):
    """What a client negotiates: openssl s_client's summary and curl's HTTP version over ALPN."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
           "-alpn", "h2,http/1.1"] + (["-tls1_2"] if tls12 else [])
    out = subprocess.run(cmd, input="", capture_output=True, text=True, errors="replace", timeout=10)
    text = out.stdout + out.stderr
    facts = {}
    for key, pattern in (("version", r"New, (\S+), Cipher"), ("cipher", r"New, \S+, Cipher is (\S+)"),
                         ("group", r"Server Temp Key: ([^\n]+)"), ("sigalg", r"Peer signature type: (\S+)"),
                         ("alpn", r"ALPN protocol: (\S+)")):
        m = re.search(pattern, text)
        facts[key] = m.group(1).strip() if m else "?"
    if not tls12:
        curl = subprocess.run(["curl", "-sk", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                               f"https://127.0.0.1:{port}{PATH}"], capture_output=True, text=True, timeout=10)
        facts["curl"] = curl.stdout
    return facts


# ---------------------------------------------------------------------------------------------
# Measurement.

def run_wrk(url, script, seconds, connections=32):
    out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", script, url], capture_output=True, text=True, check=True).stdout
    if "50%" not in out:
        raise RuntimeError(f"wrk printed no latency distribution:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "done": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50": parse_duration_us(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
            "p99": parse_duration_us(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
            "errors": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else ""}


def busy_seconds():
    """Time all CPUs spent not idle (user, nice, system, irq, softirq, steal), and idle, in seconds."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = [int(x) for x in f.readline().split()[1:9]]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / ticks, (idle + iowait) / ticks


def children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def user_system(proc):
    with open(f"/proc/{proc.p.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def measured(run, proxy, upstream):
    """Runs `run()` and adds the CPU of the proxy, the load generator and everyone else."""
    (pu0, ps0), u0 = user_system(proxy), upstream.cpu_seconds()
    t0, g0, (b0, s0) = time.time(), children_cpu(), busy_seconds()
    res = run()
    t1, g1, (b1, s1) = time.time(), children_cpu(), busy_seconds()
    (pu1, ps1), u1 = user_system(proxy), upstream.cpu_seconds()
    p0, p1 = pu0 + ps0, pu1 + ps1
    wall = t1 - t0
    done = max(res["done"], 1)
    res["cpu_us"] = (p1 - p0) * 1e6 / done
    res["user_us"] = (pu1 - pu0) * 1e6 / done
    res["sys_us"] = (ps1 - ps0) * 1e6 / done
    res["upstream_us"] = (u1 - u0) * 1e6 / done
    res.setdefault("gen_busy", (g1 - g0) / wall)
    # Approximate: the kernel charges some network work to whichever task it interrupts.
    res["others"] = max(0.0, (b1 - b0) - (p1 - p0) - (u1 - u0) - (g1 - g0)) / wall
    res["idle"] = (s1 - s0) / wall
    # How much of CPU 1 the proxy and the upstream had: near 1.00, the proxy set the rate.
    res["cpu1_ours"] = ((p1 - p0) + (u1 - u0)) / res.get("seconds", wall)
    return res


def bench(args, tmp, client):
    certs = make_certs(tmp)
    upstream_port = free_port()
    upstream = Proc([os.path.join(RELEASE, "examples", "bench_upstream"), f"127.0.0.1:{upstream_port}"], cpu=1)
    procs = [upstream]
    try:
        wait_port(upstream_port)
        nginx, nginx_ports = start_nginx(upstream_port, tmp, certs)
        procs.append(nginx)
        sg = {}
        for listener in ("plain", *certs):
            proc, port = start_snapguard(upstream_port, tmp, certs.get(listener))
            procs.append(proc)
            sg[listener] = (proc, port)
        # proxy -> listener -> (process, port)
        targets = {"nginx": {name: (nginx, port) for name, port in nginx_ports.items()}, "snapguard": sg}

        facts = {}
        for proxy in PROXIES:
            for listener in certs:
                facts[f"{proxy} {listener}"] = handshake_facts(targets[proxy][listener][1])
            facts[f"{proxy} ecdsa TLS 1.2"] = handshake_facts(targets[proxy]["ecdsa"][1], tls12=True)
        for k, v in facts.items():
            log("negotiated", k, v)

        scripts = {name: wrk_script(tmp, name, m, b) for name, (m, _, b) in KEEPALIVE_SCENARIOS.items()}
        url = lambda proxy, transport, path: (  # noqa: E731
            f"https://127.0.0.1:{targets[proxy]['ecdsa'][1]}{path}" if transport == "TLS"
            else f"http://127.0.0.1:{targets[proxy]['plain'][1]}{path}")

        # Warm-up: every path once.
        for proxy in PROXIES:
            for transport in ("plain", "TLS"):
                for name, (_, path, _) in KEEPALIVE_SCENARIOS.items():
                    run_wrk(url(proxy, transport, path), scripts[name], 1)
            for mode, (listener, cmode) in NEWCONN_MODES.items():
                run_clients(client, targets[proxy][listener][1], cmode, 1, args.clients)

        newconn = {m: {p: [] for p in PROXIES} for m in NEWCONN_MODES}
        keep = {s: {p: {"plain": [], "TLS": []} for p in PROXIES} for s in KEEPALIVE_SCENARIOS}
        loads = [open("/proc/loadavg").read().split()[:3]]
        for r in range(args.rounds):
            for mode, (listener, cmode) in NEWCONN_MODES.items():
                for proxy in PROXIES:
                    proc, port = targets[proxy][listener]
                    res = measured(lambda: run_clients(client, port, cmode, args.seconds, args.clients), proc, upstream)
                    newconn[mode][proxy].append(res)
                    log(f"round {r + 1} {mode:28} {proxy:10} {res['rate']:>8.0f} conn/s cpu {res['cpu_us']:6.1f} us/conn"
                        f" client {res['gen_busy']:.2f} cpu1 {res['cpu1_ours']:.2f} others {res['others']:.2f}"
                        f" errors {res['errors']}"
                        + (f" resumed {res['resumed']}/{res['done']}" if cmode == "resume" else "")
                        + (f" ({res['first_error']})" if res["errors"] else ""))
            for name, (_, path, _) in KEEPALIVE_SCENARIOS.items():
                for proxy in PROXIES:
                    for transport in ("plain", "TLS"):
                        listener = "ecdsa" if transport == "TLS" else "plain"
                        proc = targets[proxy][listener][0]
                        res = measured(lambda: run_wrk(url(proxy, transport, path), scripts[name], args.seconds),
                                       proc, upstream)
                        keep[name][proxy][transport].append(res)
                        log(f"round {r + 1} {name:22} {proxy:10} {transport:5} {res['rate']:>8.0f} req/s "
                            f"p99 {res['p99']:>7.0f} us cpu {res['cpu_us']:5.1f} us/req wrk {res['gen_busy']:.2f} cpu1 {res['cpu1_ours']:.2f} "
                            f"others {res['others']:.2f}" + (f" non-2xx {res['errors']}" if res["errors"] else "")
                            + (f" socket errors {res['socket_errors']}" if res["socket_errors"] else ""))
            loads.append(open("/proc/loadavg").read().split()[:3])
        return facts, newconn, keep, loads
    finally:
        for p in reversed(procs):
            p.stop()


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def report(facts, newconn, keep, loads, args, commit):
    L = []
    L.append(f"`python3 bench/tls.py --rounds {args.rounds} --seconds {args.seconds} --clients {args.clients}"
             f"{' --head' if args.head else ''}{' --no-build' if args.no_build else ''}`, "
             f"{time.strftime('%Y-%m-%d')}, commit {commit}. Load average (1, 5, 15 min) before the rounds and "
             "after each: " + "; ".join(" ".join(x) for x in loads) + ".")
    L.append("")
    L.append("Negotiated (openssl s_client offering ALPN h2 and http/1.1; `curl --http2`: HTTP version and status):")
    L.append("")
    L.append("| proxy, certificate | version | cipher | group | signature | ALPN | curl |")
    L.append("|---|---|---|---|---|---|---|")
    for k, v in facts.items():
        L.append(f"| {k} | {v['version']} | {v['cipher']} | {v['group']} | {v['sigalg']} | {v['alpn']} | "
                 f"{v.get('curl', '')} |")
    L.append("")
    L.append(f"New connection per request: {args.clients} blocking client threads on CPU 0 (Rust, rustls; connect, "
             f"handshake, GET with `Connection: close`, read to EOF), {args.seconds} s a run, median of {args.rounds} "
             "interleaved rounds. CPU is the proxy's per connection (user + system), handshake and request included; "
             "\"handshake\" is that minus the same proxy's plain-TCP connection; \"client\" is the client's CPU "
             "time over the run's length (1.00: CPU 0 was all the client's); \"CPU-bound conn/s\" is "
             "1 s / (proxy + upstream CPU per connection), the rate CPU 1 would sustain with nothing else on it.")
    L.append("")
    L.append("| mode | proxy | conn/s | client | CPU 1 ours | CPU µs/conn | user | system | handshake µs "
             "| CPU-bound conn/s | CPU vs nginx | conn/s vs nginx | errors |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in NEWCONN_MODES:
        for proxy in PROXIES:
            runs = newconn[mode][proxy]
            cpu = med(runs, "cpu_us")
            hs = cpu - med(newconn["plain TCP"][proxy], "cpu_us")
            n = newconn[mode]["nginx"]
            extra = ""
            if NEWCONN_MODES[mode][1] == "resume":
                extra = f" (resumed {sum(r['resumed'] for r in runs)}/{sum(r['done'] for r in runs)})"
            bound = 1e6 / (cpu + med(runs, "upstream_us"))
            L.append(f"| {mode} | {proxy} | {med(runs, 'rate'):.0f} | {med(runs, 'gen_busy'):.2f} | "
                     f"{med(runs, 'cpu1_ours'):.2f} | {cpu:.1f} | "
                     f"{med(runs, 'user_us'):.1f} | {med(runs, 'sys_us'):.1f} | "
                     f"{'' if mode == 'plain TCP' else f'{hs:.1f}'} | {bound:.0f} | "
                     f"{cpu / med(n, 'cpu_us'):.2f} | {med(runs, 'rate') / med(n, 'rate'):.2f} | "
                     f"{sum(r['errors'] for r in runs)}{extra} |")
    L.append("")
    L.append(f"Keep-alive: wrk, 1 thread, 32 connections, HTTP/1.1, {args.seconds} s a run, median of "
             f"{args.rounds} interleaved rounds; TLS with the ECDSA certificate. CPU is the proxy's, per request; "
             "\"vs nginx\" compares the same transport.")
    L.append("")
    L.append("| scenario | proxy | transport | req/s | p50 µs | p99 µs | CPU 1 ours | CPU µs/req | user | system "
             "| CPU vs nginx | CPU TLS/plain | TLS adds µs/req | req/s TLS/plain |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in KEEPALIVE_SCENARIOS:
        for proxy in PROXIES:
            for transport in ("plain", "TLS"):
                runs = keep[name][proxy][transport]
                plain = keep[name][proxy]["plain"]
                n = keep[name]["nginx"][transport]
                cpu = med(runs, "cpu_us")
                tls_cols = (f"{cpu / med(plain, 'cpu_us'):.2f} | {cpu - med(plain, 'cpu_us'):.1f} | "
                            f"{med(runs, 'rate') / med(plain, 'rate'):.2f}") if transport == "TLS" else " | | "
                L.append(f"| {name} | {proxy} | {transport} | {med(runs, 'rate'):.0f} | {med(runs, 'p50'):.0f} | "
                         f"{med(runs, 'p99'):.0f} | {med(runs, 'cpu1_ours'):.2f} | {cpu:.1f} | {med(runs, 'user_us'):.1f} | {med(runs, 'sys_us'):.1f} "
                         f"| {cpu / med(n, 'cpu_us'):.2f} | {tls_cols} |")
    L.append("")
    every = [r for m in newconn.values() for p in m.values() for r in p] + \
            [r for s in keep.values() for p in s.values() for t in p.values() for r in t]
    others = [r["others"] for r in every]
    idle = [r["idle"] for r in every]
    L.append("\"CPU 1 ours\": the proxy's and the upstream's CPU time over the run's length; below 1.00, "
             "something else (the machine's other work) had part of CPU 1 and req/s or conn/s is not the proxy's "
             "capacity. During the runs, the two CPUs were idle for a median "
             f"{statistics.median(idle):.2f} CPU (range {min(idle):.2f} to {max(idle):.2f}), and busy with work "
             f"other than the proxy, upstream and load generator (approximate) for a median "
             f"{statistics.median(others):.2f} CPU (range {min(others):.2f} to {max(others):.2f}).")
    return "\n".join(L) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=8, help="client threads for new connections")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "tls.md"))
    parser.add_argument("--no-build", action="store_true", help="measure the binaries already in the target dir")
    parser.add_argument("--head", action="store_true",
                        help="build HEAD as committed (git archive), without uncommitted changes in the tree")
    args = parser.parse_args()
    if os.cpu_count() < 2:
        sys.exit("needs two CPUs: one for the load, one for the proxy and upstream")
    ensure_tools()
    head = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h"], capture_output=True,
                          text=True, check=True).stdout.strip()
    commit = head
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock",
                            "examples/bench_upstream.rs"], capture_output=True, text=True).stdout.split("\n")
    dirty = [line[3:] for line in dirty if line.strip()]
    if args.no_build:
        commit += " (binaries built before, by hand or by an earlier run)"
    elif dirty and not args.head:
        commit += " with uncommitted changes to " + ", ".join(dirty)
    global RELEASE
    if args.head:
        # A target dir of its own: cargo tells a tree's sources changed by their dates, so two trees
        # built into one target dir could each be taken for the other's up-to-date build.
        RELEASE = os.path.join(TARGET_DIR, "head", "release")
    if not args.no_build:
        build(head_tree(head) if args.head else ROOT, os.path.dirname(RELEASE))
    client = build_client()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="snapguard-tlsbench-") as tmp:
        facts, newconn, keep, loads = bench(args, tmp, client)
    text = report(facts, newconn, keep, loads, args, commit)
    log(f"measured in {time.time() - started:.0f} s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"facts": facts, "new_connections": newconn, "keep_alive": keep, "loads": loads}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
