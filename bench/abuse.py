#!/usr/bin/env python3
"""Cheap attacks that should cost the attacker, not the API: snapguard and nginx side by side,
in one run on one machine.

    python3 bench/abuse.py [--attacks a0,a,s0,s,s64,b0,b,c,c0,d0,d,e,f] [--proxy snapguard,nginx]
                           [--seconds 10] [--clients 50] [--scale 1.0] [--no-build]

Attacks (each with a fresh upstream and a fresh proxy, while an ordinary client sends
`GET /v3/p1/snapshots` every 20 ms on a fresh connection, 5 s timeout, latency counted from the
moment each request was due):

  a0  baseline: a 64 KiB passthrough POST with Content-Length, by --clients keep-alive clients
  a   the same body as 65,536 one-byte chunks (Transfer-Encoding: chunked, written in bulk)
  s0  baseline: a 256 KiB passthrough POST with Content-Length (over limits.buffer_request_body,
      so streamed upstream)
  s   the same body as 262,144 one-byte chunks
  s64 the same body in 64-byte chunks: fragmented, but as a careless
      client might send it
  b0  baseline: a 64 KiB policed PUT (one large metadata value) with Content-Length
  b   the same body as one-byte chunks
  c   HTTP/2 (h2c prior knowledge) on 4 connections: streams (GET) opened with HEADERS and
      reset (RST_STREAM CANCEL) about 3 ms later, for --seconds; the upstream takes 20 ms to
      answer them (`?delay_ms=20`), so every reset finds its request in the upstream's hands
  c0  the same, the upstream answering at once (most streams are answered before their reset)
  d0  baseline: a small policed PUT (80 bytes)
  d   a 64 KiB policed PUT with about 9,000 keys in its snapshot object (and a display_name,
      so snapguard normalizes it: every member is re-serialized)
  e   5,000 connections each sending a partial request head, held until the proxy closes them
      (or 15 s): RSS idle before, peak, and after they are all closed
  f   100 connections each sending 1,000 pipelined GETs in one write and reading the answers,
      repeated for --seconds (at most 5 rounds)

For every run: the proxy's and the upstream's CPU time (utime + stime from /proc) per attack
request, and what reached the upstream (examples/abuse_upstream.rs, bench_upstream's answer
with counters: connections accepted, requests, request-body frames, socket reads that returned
data). Targets, checked on the snapguard rows: a one-byte-chunked request costs the proxy at
most 20 x the CPU of a normally framed one (a vs a0, b vs b0); the upstream sees no more
reads or body frames per request than the normally framed request causes; a reset storm opens
at most 1,000 upstream connections; RSS after a connection storm within 2 x idle RSS; the
ordinary client gets >= 99% answers (200 within 5 s) with p99 <= 1 s during every attack.

snapguard runs its defaults with one worker thread (--threads 1) and RUST_LOG=warn. nginx
(Debian's nginx-light, installed when missing; one worker, master_process off so its CPU and
RSS are one process's, access log off) gets snapguard's default limits: keep-alive upstream
pool of 64, client_header_timeout and HTTP/1 keepalive_timeout 10 s, HTTP/2 idle 60 s,
client_body_timeout 30 s, request bodies buffered (nginx's default), worker_connections 10000,
h2c on a second port. The attack and the ordinary client run on CPU 0, the proxy and the
upstream on CPU 1. Everything listens on 127.0.0.1; every loop is bounded in count and time;
every process started is stopped by PID (and dies with this script: PR_SET_PDEATHSIG).

snapguard is built in release mode with its own CARGO_TARGET_DIR (target/abuse); the HTTP/2
attack uses python-hyper's h2, pinned, in the virtualenv bench/common.py creates (target/benchenv).
The table goes to stdout and to bench/results/abuse-latest.md (raw numbers beside it, .json).
"""

import argparse
import asyncio
import collections
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Proc, cargo_build, ensure_nginx, ensure_venv, free_port, http_get, log, percentile, stop_all, tree_state, wait_port, ROOT  # noqa: E402


ORDINARY_PATH = "/v3/p1/snapshots"
PASSTHROUGH_PATH = "/v3/p1/volumes/v1/action"
POLICED_PATH = "/v3/p1/snapshots/s1"
KIB64 = 65536
ORDINARY_INTERVAL = 0.02
ORDINARY_TIMEOUT = 5.0
PARTIAL_HEAD = b"GET /v3/p1/snapshots HTTP/1.1\r\nHost: 127.0.0.1\r\n"





# ---------------------------------------------------------------------------------------------
# Bodies


def policed_64k():
    """An allowed 64 KiB policed PUT: a name, a description and one large metadata value."""
    head = '{"snapshot":{"name":"snap-001","description":"Daily backup","metadata":{"blob":"'
    tail = '"}}}'
    return (head + "x" * (KIB64 - len(head) - len(tail)) + tail).encode()


def many_keys_64k():
    """A 64 KiB policed PUT with about 9,000 distinct keys in its snapshot object."""
    alphabet = [chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\']
    keys = [a + b for a in alphabet for b in alphabet]
    keys += [a + b + c for a in alphabet[:20] for b in alphabet for c in alphabet]
    head = '{"snapshot":{"display_name":"snap-001","description":"Daily backup"'
    tail = "}}"
    parts, size = [], len(head) + len(tail)
    for k in keys:
        member = f',"{k}":0'
        if size + len(member) > KIB64:
            break
        parts.append(member)
        size += len(member)
    body = (head + "".join(parts) + tail).encode()
    json.loads(body)
    return body, len(parts) + 2


SMALL_PUT = b'{"snapshot":{"name":"snap-001","description":"Daily backup of the orders db"}}'


def request_bytes(method, path, body, chunked, chunk=1):
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if chunked:
        # `chunk`-byte chunks (one by default), all written at once: cheap for the sender, a
        # frame each for the proxy to decode.
        pieces = (body[i:i + chunk] for i in range(0, len(body), chunk))
        payload = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
        return head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + payload
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


# ---------------------------------------------------------------------------------------------
# Processes














# ---------------------------------------------------------------------------------------------
# Setup






def build(target_dir, retries):
    """snapguard on its own (built together with the examples it would get their dev-dependency
    features, tokio's test-util among them), then the counting upstream."""
    for what in (["--bin", "snapguard"], ["--example", "abuse_upstream"]):
        if not cargo_build(target_dir, what, retries):
            sys.exit(f"cargo build {' '.join(what)} failed")


# ---------------------------------------------------------------------------------------------
# Targets


class Target:
    """A fresh upstream and a fresh proxy in front of it."""

    def __init__(self, kind, args, tmp):
        self.kind = kind
        self.up_port, self.stats_port = free_port(), free_port()
        self.upstream = Proc([args.upstream_bin, f"127.0.0.1:{self.up_port}", f"127.0.0.1:{self.stats_port}"],
                             cpu=args.proxy_cpu)
        wait_port(self.up_port, self.upstream)
        wait_port(self.stats_port, self.upstream)
        self.port = free_port()
        self.log_path = os.path.join(tmp, f"{kind}.log")
        self.log_file = open(self.log_path, "ab")
        if kind == "snapguard":
            self.h2_port = self.port
            self.proxy = Proc([args.snapguard_bin, "--threads", "1", "--listen", f"127.0.0.1:{self.port}",
                               "--admin", f"127.0.0.1:{free_port()}", "--upstream",
                               f"http://127.0.0.1:{self.up_port}"],
                              cpu=args.proxy_cpu, env={"RUST_LOG": "warn"}, stderr=self.log_file,
                              stdout=self.log_file)
        else:
            self.h2_port = free_port()
            conf = write_nginx_conf(tmp, self.port, self.h2_port, self.up_port)
            self.proxy = Proc([args.nginx, "-c", conf, "-e", self.log_path], cpu=args.proxy_cpu,
                              stderr=self.log_file, stdout=self.log_file)
        wait_port(self.port, self.proxy)
        wait_port(self.h2_port, self.proxy)

    def stats(self):
        _, body = http_get(self.stats_port, "/")
        return json.loads(body)

    def cpu(self):
        return self.proxy.cpu_seconds(), self.upstream.cpu_seconds()

    def stop(self):
        self.proxy.stop()
        self.upstream.stop()
        self.log_file.close()


def write_nginx_conf(tmp, port, h2_port, upstream_port):
    """nginx with snapguard's default limits (config/snapguard.toml)."""
    conf = os.path.join(tmp, f"nginx-{port}.conf")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 20100 if hard == resource.RLIM_INFINITY else min(20100, hard)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    location = """
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }"""
    with open(conf, "w") as f:
        f.write(f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx-{port}.pid;
error_log {tmp}/nginx-{port}-error.log warn;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    keepalive_requests 1000000000;
    client_header_timeout 10s;
    client_body_timeout 30s;
    send_timeout 30s;
    large_client_header_buffers 4 64k;
    client_max_body_size 0;
    client_body_buffer_size 128k;
    proxy_connect_timeout 5s;
    proxy_send_timeout 60s;
    proxy_read_timeout 60s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000000;
        keepalive_timeout 90s;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_timeout 10s;
        {location}
    }}
    server {{
        listen 127.0.0.1:{h2_port} http2;
        keepalive_timeout 60s;
        {location}
    }}
}}
""")
    return conf


# ---------------------------------------------------------------------------------------------
# Workers: `abuse.py _worker KIND SPEC_FILE` under the venv's Python, pinned to the load CPU.
# Each prints one JSON object on stdout.


async def read_response(reader):
    """One HTTP/1.1 response: (status, keep_alive)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip().lower()
    keep_alive = headers.get(b"connection") != b"close"
    if b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif status not in (204, 304):
        await reader.read()
        keep_alive = False
    return status, keep_alive




async def worker_load(spec):
    """Closed loop: `clients` keep-alive connections each sending `payload` until `max_requests`
    were sent in all or `seconds` passed."""
    payload = request_bytes(spec["method"], spec["path"], bytes.fromhex(spec["body_hex"]), spec["chunked"],
                            spec.get("chunk", 1))
    deadline = time.monotonic() + spec["seconds"]
    state = {"sent": 0, "done": 0, "errors": 0, "statuses": collections.Counter(), "latencies": []}

    async def client():
        reader = writer = None
        while time.monotonic() < deadline and state["sent"] < spec["max_requests"]:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", spec["port"], limit=1 << 20)
                state["sent"] += 1
                started = time.monotonic()
                writer.write(payload)
                await writer.drain()
                status, keep_alive = await asyncio.wait_for(read_response(reader), max(0.1, deadline + 30 - started))
                state["latencies"].append(time.monotonic() - started)
                state["done"] += 1
                state["statuses"][status] += 1
                if not keep_alive:
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError):
                state["errors"] += 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(spec["clients"])))
    elapsed = time.monotonic() - started
    lat = state["latencies"]
    return {"sent": state["sent"], "done": state["done"], "errors": state["errors"],
            "statuses": {str(k): v for k, v in state["statuses"].items()}, "elapsed": elapsed,
            "p50_ms": percentile(lat, 50) * 1e3 if lat else None, "p99_ms": percentile(lat, 99) * 1e3 if lat else None,
            "wire_bytes_per_request": len(payload)}


async def worker_h2reset(spec):
    """`connections` h2c connections, each opening streams (GET, END_STREAM on HEADERS) and
    resetting each `reset_ms` after its HEADERS, at most `concurrency` open at once, for `seconds`
    or until `max_streams` in all."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    deadline = time.monotonic() + spec["seconds"]
    reset_after = spec["reset_ms"] / 1000
    totals = collections.Counter()
    headers = [(":method", "GET"), (":path", spec["path"]), (":scheme", "http"),
               (":authority", f"127.0.0.1:{spec['port']}")]

    async def one_connection():
        reader, writer = await asyncio.open_connection("127.0.0.1", spec["port"])
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        totals["connections"] += 1
        alive = {"ok": True}
        answered = set()

        async def read_loop():
            while alive["ok"]:
                try:
                    data = await reader.read(65536)
                except OSError:
                    data = b""
                if not data:
                    alive["ok"] = False
                    return
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    totals["protocol_errors"] += 1
                    alive["ok"] = False
                    return
                for e in events:
                    if isinstance(e, h2.events.ResponseReceived):
                        totals["responses"] += 1
                        status = dict(e.headers).get(":status", "?")
                        totals[f"status {status}"] += 1
                        answered.add(e.stream_id)
                    elif isinstance(e, h2.events.DataReceived):
                        conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, h2.events.StreamReset):
                        totals["reset_by_server"] += 1
                    elif isinstance(e, h2.events.ConnectionTerminated):
                        totals["goaway"] += 1
                        alive["ok"] = False
                out = conn.data_to_send()
                if out:
                    writer.write(out)

        reading = asyncio.ensure_future(read_loop())
        pending = collections.deque()
        try:
            while alive["ok"] and time.monotonic() < deadline and totals["streams"] < spec["max_streams"]:
                now = time.monotonic()
                while pending and pending[0][0] <= now:
                    _, sid = pending.popleft()
                    try:
                        conn.reset_stream(sid, error_code=8)
                        totals["resets"] += 1
                    except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
                        totals["closed_before_reset"] += 1
                    answered.discard(sid)
                while (len(pending) < spec["concurrency"] and totals["streams"] < spec["max_streams"]
                       and conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams):
                    sid = conn.get_next_available_stream_id()
                    conn.send_headers(sid, headers, end_stream=True)
                    pending.append((now + reset_after, sid))
                    totals["streams"] += 1
                out = conn.data_to_send()
                if out:
                    writer.write(out)
                await writer.drain()
                await asyncio.sleep(0.0005)
        except (OSError, h2.exceptions.ProtocolError) as e:
            totals["errors"] += 1
            totals[f"error {type(e).__name__}"] += 1
        alive["ok"] = False
        reading.cancel()
        writer.close()

    started = time.monotonic()
    while time.monotonic() < deadline and totals["streams"] < spec["max_streams"]:
        await asyncio.gather(*(one_connection() for _ in range(spec["connections"])), return_exceptions=True)
        await asyncio.sleep(0.05)
    totals["elapsed_ms"] = int((time.monotonic() - started) * 1e3)
    return dict(totals)


async def worker_partial(spec):
    """`connections` connections each sending a partial request head; held until the peer
    closes each or `hold` seconds pass, then all closed."""
    sem = asyncio.Semaphore(200)
    conns, failed = [], 0

    async def open_one():
        nonlocal failed
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", spec["port"]), 10)
                w.write(PARTIAL_HEAD)
                conns.append((r, w))
            except (OSError, asyncio.TimeoutError):
                failed += 1

    started = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(spec["connections"])))
    opened_s = time.monotonic() - started
    closed_at = []

    async def watch(r):
        try:
            while await r.read(4096):
                pass
        except OSError:
            pass
        closed_at.append(time.monotonic() - started)

    tasks = [asyncio.ensure_future(watch(r)) for r, _ in conns]
    if tasks:
        await asyncio.wait(tasks, timeout=spec["hold"])
    for t in tasks:
        t.cancel()
    for _, w in conns:
        w.close()
    await asyncio.sleep(0.2)
    return {"opened": len(conns), "failed": failed, "open_s": round(opened_s, 2),
            "closed_by_proxy": len(closed_at), "last_closed_s": round(max(closed_at), 2) if closed_at else None}


async def worker_pipeline(spec):
    """`connections` connections, each writing `depth` pipelined GETs at once and reading the
    answers, for `seconds` or `rounds` rounds."""
    request = f"GET {spec['path']} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    batch = request * spec["depth"]
    deadline = time.monotonic() + spec["seconds"]
    totals = collections.Counter()

    async def one():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", spec["port"])
        except OSError:
            totals["connect_errors"] += 1
            return
        for _ in range(spec["rounds"]):
            if time.monotonic() >= deadline:
                break
            w.write(batch)
            seen, ok, tail = 0, 0, b""
            try:
                while seen < spec["depth"]:
                    data = await asyncio.wait_for(r.read(1 << 16), max(0.1, deadline + 10 - time.monotonic()))
                    if not data:
                        break
                    data = tail + data
                    seen += data.count(b"HTTP/1.1 ")
                    ok += data.count(b"HTTP/1.1 200")
                    tail = data[-12:]
                    # A status line split across reads is counted once: drop it from the tail.
                    seen -= tail.count(b"HTTP/1.1 ")
                    ok -= tail.count(b"HTTP/1.1 200")
            except (OSError, asyncio.TimeoutError):
                totals["errors"] += 1
            seen += tail.count(b"HTTP/1.1 ")
            ok += tail.count(b"HTTP/1.1 200")
            totals["requests"] += spec["depth"]
            totals["responses"] += seen
            totals["ok"] += ok
            totals["rounds"] += 1
            if seen < spec["depth"]:
                totals["short_rounds"] += 1
                break
        w.close()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(spec["connections"])))
    totals["elapsed_ms"] = int((time.monotonic() - started) * 1e3)
    return dict(totals)


async def worker_ordinary(spec):
    """GET on a fresh connection every `interval`, until `stop_file` exists or `seconds`
    passed: (due time, latency from due, ok) for each."""
    results = []
    started = time.monotonic()
    deadline = started + spec["seconds"]
    request = f"GET {spec['path']} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()

    async def one(due):
        ok = False
        try:
            async def go():
                r, w = await asyncio.open_connection("127.0.0.1", spec["port"])
                try:
                    w.write(request)
                    status, _ = await read_response(r)
                    return status == 200
                finally:
                    w.close()
            ok = await asyncio.wait_for(go(), ORDINARY_TIMEOUT - max(0.0, time.monotonic() - due))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            ok = False
        results.append((due - started, time.monotonic() - due, ok))

    tasks, n = [], 0
    while True:
        due = started + n * spec["interval"]
        if due >= deadline or os.path.exists(spec["stop_file"]):
            break
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
        n += 1
    await asyncio.gather(*tasks)
    return {"results": results}


WORKERS = {"load": worker_load, "h2reset": worker_h2reset, "partial": worker_partial,
           "pipeline": worker_pipeline, "ordinary": worker_ordinary}


def worker_main(kind, spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    print(json.dumps(asyncio.run(WORKERS[kind](spec))))


# ---------------------------------------------------------------------------------------------
# Attacks


def attack_specs(args):
    policed = policed_64k()
    keys_body, keys = many_keys_64k()
    s = args.seconds
    scale = lambda n: max(1, int(n * args.scale))
    load = lambda method, path, body, chunked, max_requests: {
        "kind": "load", "method": method, "path": path, "body_hex": body.hex(), "chunked": chunked,
        "clients": args.clients, "seconds": s, "max_requests": scale(max_requests)}
    return {
        "a0": ("64 KiB passthrough POST, Content-Length", load("POST", PASSTHROUGH_PATH, b"x" * KIB64, False, 20000)),
        "a": ("64 KiB passthrough POST, 65,536 one-byte chunks", load("POST", PASSTHROUGH_PATH, b"x" * KIB64, True, 3000)),
        "s0": ("256 KiB passthrough POST (streamed), Content-Length",
               load("POST", PASSTHROUGH_PATH, b"x" * 4 * KIB64, False, 5000)),
        "s": ("256 KiB passthrough POST (streamed), 262,144 one-byte chunks",
              {**load("POST", PASSTHROUGH_PATH, b"x" * 4 * KIB64, True, 1000), "probe": 3}),
        "s64": ("256 KiB passthrough POST (streamed), 4,096 chunks of 64 bytes",
                {**load("POST", PASSTHROUGH_PATH, b"x" * 4 * KIB64, True, 5000), "chunk": 64}),
        "b0": ("64 KiB policed PUT, Content-Length", load("PUT", POLICED_PATH, policed, False, 20000)),
        "b": ("64 KiB policed PUT, 65,536 one-byte chunks", load("PUT", POLICED_PATH, policed, True, 3000)),
        "c": ("h2c streams reset 3 ms after HEADERS, 4 connections, upstream answers in 20 ms",
              {"kind": "h2reset", "path": ORDINARY_PATH + "?delay_ms=20", "connections": 4, "reset_ms": 3,
               "concurrency": 100, "seconds": s, "max_streams": scale(1_000_000)}),
        "c0": ("h2c streams reset 3 ms after HEADERS, 4 connections, upstream answers at once",
               {"kind": "h2reset", "path": ORDINARY_PATH, "connections": 4, "reset_ms": 3, "concurrency": 100,
                "seconds": s, "max_streams": scale(1_000_000)}),
        "d0": ("80 B policed PUT, Content-Length", load("PUT", POLICED_PATH, SMALL_PUT, False, 50000)),
        "d": (f"64 KiB policed PUT with {keys:,} keys, normalized", load("PUT", POLICED_PATH, keys_body, False, 20000)),
        "e": (f"{scale(5000):,} connections with a partial request head",
              {"kind": "partial", "connections": scale(5000), "hold": 15}),
        "f": ("100 connections x 1,000 pipelined GETs",
              {"kind": "pipeline", "path": POLICED_PATH, "connections": scale(100), "depth": 1000, "rounds": 5,
               "seconds": s}),
    }


def run_worker(python, args, kind, spec, tmp, name):
    out = open(os.path.join(tmp, f"{name}.out"), "w+")
    err = open(os.path.join(tmp, f"{name}.err"), "w+")
    spec_path = os.path.join(tmp, f"{name}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    proc = Proc([python, os.path.abspath(__file__), "_worker", kind, spec_path], cpu=args.load_cpu,
                stdout=out, stderr=err)
    return proc, out, err


def collect(proc, out, err, timeout):
    try:
        proc.p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"worker {proc.pid} overran; stopping it")
    proc.stop()
    out.seek(0)
    err.seek(0)
    text = out.read()
    try:
        return json.loads(text)
    except ValueError:
        raise RuntimeError(f"worker printed no result: {text[-500:]!r} {err.read()[-2000:]}")


def run_one(target, name, spec, args, python, tmp):
    """One attack against one target: the attack, the ordinary client beside it, the costs."""
    for _ in range(20):  # warm up the path and the upstream pool
        http_get(target.port, ORDINARY_PATH)
    time.sleep(0.5)
    idle_rss = target.proxy.status_kb("VmRSS")
    cpu0, stats0 = target.cpu(), target.stats()
    stop_file = os.path.join(tmp, f"stop-{name}-{target.kind}")
    ordinary = run_worker(python, args, "ordinary",
                          {"port": target.port, "path": ORDINARY_PATH, "interval": ORDINARY_INTERVAL,
                           "seconds": args.seconds + 60, "stop_file": stop_file}, tmp, f"ordinary-{name}-{target.kind}")
    time.sleep(0.2)
    spec = {**spec, "port": target.h2_port if spec["kind"] == "h2reset" else target.port}
    kind = spec.pop("kind")
    started = time.monotonic()
    attack = run_worker(python, args, kind, spec, tmp, f"attack-{name}-{target.kind}")
    peak_rss, bound = 0, started + args.seconds + 60
    while attack[0].alive() and time.monotonic() < bound:
        peak_rss = max(peak_rss, target.proxy.status_kb("VmRSS"))
        time.sleep(0.1)
    result = collect(*attack, timeout=max(1, bound - time.monotonic()))
    attack_s = time.monotonic() - started
    cpu1, stats1 = target.cpu(), target.stats()
    open(stop_file, "w").close()
    ordinary_res = collect(*ordinary, timeout=ORDINARY_TIMEOUT + 5)
    # Every attack connection is closed by now; give the proxy a moment to let go of them.
    for _ in range(30):
        peak_rss = max(peak_rss, target.proxy.status_kb("VmRSS"))
        time.sleep(0.1)
    after_rss = target.proxy.status_kb("VmRSS")
    hwm = target.proxy.status_kb("VmHWM")
    probe = None
    if kind == "load":
        # Attack requests still at the upstream (uploads the attack gave up on) would blur the
        # probe: wait until they are done, within 15 s.
        for _ in range(150):
            st = target.stats()
            if st["requests"] == st["completed"]:
                break
            time.sleep(0.1)
        # The same request, 20 times in a row on one connection with nothing else going on: what
        # its framing alone makes reach the upstream. The proxy's writes to the upstream are
        # counted by strace (the upstream's reads also depend on when it happens to read).
        before = target.stats()
        trace = os.path.join(tmp, f"strace-{name}-{target.kind}")
        strace = None
        if shutil.which("strace"):
            strace = Proc(["strace", "-f", "-yy", "-qq", "-s", "0", "-e", "trace=write,writev,sendto,sendmsg,sendfile",
                           "-o", trace, "-p", str(target.proxy.pid)], cpu=None)
            time.sleep(1.0)
        p = run_worker(python, args, "load", {**spec, "clients": 1, "max_requests": spec.get("probe", 20), "seconds": 30}, tmp,
                       f"probe-{name}-{target.kind}")
        done = collect(*p, timeout=60)["done"]
        after = target.stats()
        probe = {"done": done, **{k: (after[k] - before[k]) / max(done, 1) for k in ("requests", "reads", "body_frames")}}
        if strace is not None:
            time.sleep(0.3)
            strace.p.send_signal(signal.SIGINT)
            strace.stop()
            upstream = f":{target.up_port}]"
            with open(trace) as f:
                writes = sum(1 for line in f if upstream in line.split(",", 1)[0] and "= -1" not in line)
            probe["proxy_writes"] = writes / max(done, 1)
    window = [r for r in ordinary_res["results"] if r[0] <= attack_s]
    lat = [r[1] for r in window if r[2]]
    delta = {k: stats1[k] - stats0[k] for k in stats1 if k != "open"}
    delta["open_after"] = stats1["open"]
    return {"attack": result, "proxy_cpu_s": cpu1[0] - cpu0[0], "upstream_cpu_s": cpu1[1] - cpu0[1],
            "upstream": delta, "idle_rss_kb": idle_rss, "peak_rss_kb": max(peak_rss, hwm),
            "after_rss_kb": after_rss, "attack_s": attack_s, "probe": probe,
            "ordinary": {"sent": len(window), "ok": sum(1 for r in window if r[2]),
                         "p50_ms": percentile(lat, 50) * 1e3 if lat else None,
                         "p99_ms": percentile(lat, 99) * 1e3 if lat else None,
                         "max_ms": max(lat) * 1e3 if lat else None}}


# ---------------------------------------------------------------------------------------------
# Report


def upstream_per_request(r):
    """Upstream reads and body frames per attack request; the ordinary GETs (no body, one read
    each) taken out. None when no attack request completed."""
    up, done = r["upstream"], r["attack"]["done"]
    if not done:
        return None, None
    others = max(up["requests"] - done, 0)
    return (up["reads"] - others) / done, up["body_frames"] / done


def per_request_cpu(r, key):
    """CPU µs per completed attack request, or the total when none completed."""
    done = r["attack"]["done"]
    if not done:
        return f"none done; {r[key]:.1f} s in all"
    return fmt(r[key] * 1e6 / done)


def fmt(x, digits=0, unit=""):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}{unit}"


def report(results, meta, names):
    L = []
    L.append(f"snapguard {meta['rev']} ({len(meta['dirty'])} files changed or new in the work tree), nginx {meta['nginx']}, "
             f"{meta['date']}. Proxy and upstream on CPU {meta['proxy_cpu']}, load on CPU {meta['load_cpu']}; "
             f"load average at start {meta['loadavg']}.")
    L.append("")
    L.append("**Request framing and policing** (closed loop, "
             f"{meta['clients']} keep-alive clients, at most {meta['seconds']} s). CPU is per request the "
             "attack completed (the ordinary client's few GETs included). At the upstream, per attack request: "
             "socket reads that returned data (net of one read per ordinary GET) and request-body frames "
             "hyper gave it, under load, and in a probe of 20 such requests (3 for s) sent one after another on one "
             "connection with nothing else going on.")
    L.append("")
    L.append("| attack | proxy | requests | statuses | p50 ms | proxy CPU µs/req | upstream CPU µs/req "
             "| proxy writes to upstream/req (probe) | upstream reads/req (load; probe) "
             "| upstream body frames/req (load; probe) | ordinary ok | ordinary p99 ms |")
    L.append("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        if name not in ("a0", "a", "s0", "s", "s64", "b0", "b", "d0", "d"):
            continue
        for proxy, r in results.get(name, {}).items():
            a, o, pr = r["attack"], r["ordinary"], r["probe"] or {}
            reads, frames = upstream_per_request(r)
            L.append(f"| {name}: {meta['labels'][name]} | {proxy} | {a['done']:,} | "
                     f"{' '.join(f'{k}x{v}' for k, v in sorted(a['statuses'].items()))} | {fmt(a['p50_ms'], 1)} | "
                     f"{per_request_cpu(r, 'proxy_cpu_s')} | {per_request_cpu(r, 'upstream_cpu_s')} | "
                     f"{fmt(pr.get('proxy_writes'), 2)} | {fmt(reads, 2)}; {fmt(pr.get('reads'), 2)} | {fmt(frames, 2)}; {fmt(pr.get('body_frames'), 2)} | "
                     f"{fmt(100 * o['ok'] / max(o['sent'], 1), 1)}% of {o['sent']} | {fmt(o['p99_ms'], 1)} |")
    resets = [n for n in ("c", "c0") if n in names]
    if resets:
        L.append("")
        L.append("**HTTP/2 rapid reset** (4 h2c connections, each stream reset about 3 ms after its HEADERS, "
                 "at most 100 open on a connection; the requests at the upstream include the ordinary GETs).")
        L.append("")
        L.append("| attack | proxy | streams opened | reset by us | answered first | streams/s | requests at upstream "
                 "| upstream connections opened | open after | proxy CPU µs/stream | ordinary ok | ordinary p99 ms |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, proxy, r in [(n, p, r) for n in resets for p, r in results.get(n, {}).items()]:
            a, up, o = r["attack"], r["upstream"], r["ordinary"]
            streams = max(a.get("streams", 0), 1)
            L.append(f"| {name}: {meta['labels'][name]} | {proxy} | {a.get('streams', 0):,} | {a.get('resets', 0):,} | "
                     f"{a.get('responses', 0):,} | "
                     f"{fmt(a.get('streams', 0) / max(a.get('elapsed_ms', 1) / 1e3, 1e-3))} | {up['requests']:,} | "
                     f"{up['accepted']:,} | {up['open_after']} | {fmt(r['proxy_cpu_s'] * 1e6 / streams, 1)} | "
                     f"{fmt(100 * o['ok'] / max(o['sent'], 1), 1)}% of {o['sent']} | {fmt(o['p99_ms'], 1)} |")
    if "e" in names:
        L.append("")
        L.append("**Connection storm** (connections with a partial request head, held until the proxy "
                 "closes them or 15 s).")
        L.append("")
        L.append("| proxy | opened | closed by the proxy | last closed after s | idle RSS MiB | peak RSS MiB "
                 "| RSS after MiB | after / idle | ordinary ok | ordinary p99 ms |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for proxy, r in results.get("e", {}).items():
            a, o = r["attack"], r["ordinary"]
            L.append(f"| {proxy} | {a['opened']:,} | {a['closed_by_proxy']:,} | {fmt(a['last_closed_s'], 1)} | "
                     f"{r['idle_rss_kb'] / 1024:.1f} | {r['peak_rss_kb'] / 1024:.1f} | {r['after_rss_kb'] / 1024:.1f} | "
                     f"{r['after_rss_kb'] / max(r['idle_rss_kb'], 1):.2f} | "
                     f"{fmt(100 * o['ok'] / max(o['sent'], 1), 1)}% of {o['sent']} | {fmt(o['p99_ms'], 1)} |")
    if "f" in names:
        L.append("")
        L.append("**Pipelining** (1,000 GETs written at once on each connection, answers read, repeated).")
        L.append("")
        L.append("| proxy | pipelined requests | answered (200) | s | proxy CPU µs/req | ordinary ok | ordinary p99 ms "
                 "| ordinary max ms |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for proxy, r in results.get("f", {}).items():
            a, o = r["attack"], r["ordinary"]
            L.append(f"| {proxy} | {a.get('requests', 0):,} | {a.get('responses', 0):,} ({a.get('ok', 0):,}) | "
                     f"{a.get('elapsed_ms', 0) / 1e3:.1f} | {fmt(r['proxy_cpu_s'] * 1e6 / max(a.get('responses', 0), 1), 1)} | "
                     f"{fmt(100 * o['ok'] / max(o['sent'], 1), 1)}% of {o['sent']} | {fmt(o['p99_ms'], 1)} | "
                     f"{fmt(o['max_ms'], 1)} |")
    L.append("")
    L.append("**Targets** (snapguard):")
    L.append("")
    L.append("| target | measured | met |")
    L.append("|---|---|---|")
    for line in verdicts(results, names):
        L.append(line)
    return "\n".join(L) + "\n"


def verdicts(results, names):
    out = []
    sg = {n: results[n]["snapguard"] for n in names if "snapguard" in results.get(n, {})}
    yes = lambda ok: "yes" if ok else "**no**"
    # With no request completed, at least the whole CPU time was spent on one.
    cpu = lambda r: r["proxy_cpu_s"] * 1e6 / max(r["attack"]["done"], 1)
    for chunked, normal in (("a", "a0"), ("s", "s0"), ("s64", "s0"), ("b", "b0")):
        if chunked in sg and normal in sg:
            ratio = cpu(sg[chunked]) / max(cpu(sg[normal]), 1e-9)
            if sg[chunked]["attack"]["done"]:
                measured = f"{ratio:,.1f} x ({cpu(sg[chunked]):,.0f} vs {cpu(sg[normal]):,.0f} µs)"
            else:
                measured = (f"no request completed: {sg[chunked]['proxy_cpu_s']:.1f} s of CPU, over "
                            f"{ratio:,.0f} x the {cpu(sg[normal]):,.0f} µs of {normal}")
            out.append(f"| {chunked}: chunked upload costs <= 20 x CPU of {normal} | {measured} | {yes(ratio <= 20)} |")
            probe = lambda n, k: (sg[n]["probe"] or {}).get(k, float("nan"))
            writes = (probe(chunked, "proxy_writes"), probe(normal, "proxy_writes"))
            reads = (probe(chunked, "reads"), probe(normal, "reads"))
            frames = (probe(chunked, "body_frames"), probe(normal, "body_frames"))
            up = sg[chunked]["upstream"]
            per_frame = up["body_bytes"] / max(up["body_frames"], 1)
            out.append(f"| {chunked}: upstream sees no more writes than for {normal} | writes by the proxy "
                       f"{writes[0]:,.2f} vs {writes[1]:,.2f} per request (probe); upstream reads {reads[0]:,.2f} vs "
                       f"{reads[1]:,.2f}, body frames {frames[0]:,.2f} vs {frames[1]:,.2f} (probe); under load "
                       f"{per_frame:,.1f} body bytes a frame at the upstream | {yes(writes[0] <= writes[1])} |")
    for name in ("c", "c0"):
        if name in sg:
            opened = sg[name]["upstream"]["accepted"]
            out.append(f"| {name}: reset storm opens <= 1,000 upstream connections | {opened:,} | {yes(opened <= 1000)} |")
    if "e" in sg:
        r = sg["e"]
        ratio = r["after_rss_kb"] / max(r["idle_rss_kb"], 1)
        out.append(f"| e: RSS after the storm <= 2 x idle | {r['after_rss_kb'] / 1024:.1f} vs "
                   f"{r['idle_rss_kb'] / 1024:.1f} MiB ({ratio:.2f} x) | {yes(ratio <= 2)} |")
    for name, r in sg.items():
        o = r["ordinary"]
        share = o["ok"] / max(o["sent"], 1)
        ok = share >= 0.99 and o["p99_ms"] is not None and o["p99_ms"] <= 1000
        out.append(f"| {name}: ordinary traffic >= 99% answered, p99 <= 1 s | {100 * share:.1f}% of {o['sent']}, "
                   f"p99 {fmt(o['p99_ms'], 1)} ms | {yes(ok)} |")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default="a0,a,s0,s,s64,b0,b,c,c0,d0,d,e,f")
    parser.add_argument("--proxy", default="snapguard,nginx")
    parser.add_argument("--seconds", type=float, default=10.0, help="bound on each attack's duration")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies request and connection counts")
    parser.add_argument("--target-dir", default=os.path.join(ROOT, "target", "abuse"))
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--build-retries", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "abuse-latest.md"))
    parser.add_argument("--keep", help="keep logs, configs and worker output in this directory")
    args = parser.parse_args()
    args.snapguard_bin = os.path.join(args.target_dir, "release", "snapguard")
    args.upstream_bin = os.path.join(args.target_dir, "release", "examples", "abuse_upstream")
    two = (os.cpu_count() or 1) >= 2
    args.load_cpu, args.proxy_cpu = (0, 1) if two else (None, None)
    names = [n for n in args.attacks.split(",") if n]
    proxies = [p for p in args.proxy.split(",") if p]

    args.nginx = ensure_nginx() if "nginx" in proxies else None
    python = ensure_venv()
    if not args.no_build:
        build(args.target_dir, args.build_retries)
    rev, dirty = tree_state()
    nginx_version = ""
    if args.nginx:
        nginx_version = subprocess.run([args.nginx, "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    specs = attack_specs(args)
    unknown = [n for n in names if n not in specs]
    if unknown:
        sys.exit(f"unknown attacks: {unknown}")
    meta = {"rev": rev, "dirty": dirty, "nginx": nginx_version, "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_cpu": args.load_cpu, "proxy_cpu": args.proxy_cpu, "clients": args.clients,
            "seconds": args.seconds, "loadavg": open("/proc/loadavg").read().split()[0],
            "labels": {n: specs[n][0] for n in specs}}
    results = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        with tempfile.TemporaryDirectory(prefix="snapguard-abuse-") as tmp:
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                tmp = args.keep
            for name in names:
                label, spec = specs[name]
                for proxy in proxies:
                    log(f"{name}: {label} against {proxy}")
                    target = Target(proxy, args, tmp)
                    try:
                        r = run_one(target, name, dict(spec), args, python, tmp)
                    finally:
                        target.stop()
                    results.setdefault(name, {})[proxy] = r
                    log(f"  {json.dumps({k: v for k, v in r.items() if k != 'ordinary'})}")
                    log(f"  ordinary: {r['ordinary']}")
    finally:
        stop_all()
    text = report(results, meta, names)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        main()
