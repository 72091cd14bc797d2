#!/usr/bin/env python3
"""Slow and stalled peers against snapguard and nginx, side by side, in one run on one machine.

    python3 bench/attacks.py [--attackers 150] [--seconds 30] [--proxy snapguard,nginx]
                             [--snapguard-bin PATH] [--attacks 0,1,2,3,4a,4b]

For each proxy in turn, and for each attack, a fresh upstream (examples/bench_upstream.rs) and a
fresh proxy are started; an ordinary client sends `GET /v3/{p}/snapshots` every 50 ms, each on a
fresh connection with a 5 s timeout, while the attack runs. Attacks:

  1   N passthrough uploads (POST /v3/{p}/volumes, Content-Length: 2000) dripping 1 byte/s
  2   N clients asking for a 4 MiB response and never reading it (SO_RCVBUF 4 KiB)
  3   one reader of a 64 MiB response taking 16 KiB/s
  4a  N HTTP/2 (h2c prior knowledge) clients asking for 4 MiB, never sending WINDOW_UPDATE
  4b  N HTTP/2 uploads dripping 1 byte/s
  0   no attack (baseline of the ordinary client)

While `--seconds` last, a hostile connection that the proxy cuts is replaced (at most one new
connection a second per attacker), so the pressure stays; after that the attack watches the
open ones until they are all cut, or their assumed deadline (plus a tolerance) has passed, or
`--max-extra` seconds. A hostile connection counts as cut when the proxy ends it: its socket on
the proxy's side leaves ESTABLISHED (/proc/net/tcp: the proxy closed it, even if unsent data
still sits in the kernel), or the attacker sees a response, a FIN, a reset, RST_STREAM or
GOAWAY. The ordinary requests counted are those due while hostile connections were open.

snapguard runs from a generated config: listen/admin/upstream, one worker thread, and every
[timeouts] and [limits] key documented in config/snapguard.toml (plus the slow-peer keys this
script knows, at snapguard's defaults), each kept only if `snapguard check-config` accepts it,
so that the script runs before and after keys are added. nginx (Debian's nginx-light, one
worker, master_process off so its RSS is one process's) gets the equivalent limits: keep-alive
upstream pool of max_upstream_connections, client_header/body and send timeouts from
snapguard's, client_max_body_size 0, h2c on a second port. Everything listens on 127.0.0.1;
the load runs on CPU 0, the proxy and upstream on CPU 1. Every process started is stopped by
PID, also on Ctrl-C (children also die with this script: PR_SET_PDEATHSIG).

The table goes to stdout and to bench/results/attacks-latest.md (raw numbers beside it, .json).
Targets, checked on the snapguard rows: at least 99% of ordinary requests answered (200, whole
body, within 5 s) with p99 <= 1 s, and every hostile connection cut within the deadline assumed
from the config (plus 2 s + 10% for timer and polling granularity).
"""

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Proc, cargo_build, ensure_nginx, ensure_venv, free_port, http_get, log, percentile, stop_all, tree_state, wait_port, ROOT  # noqa: E402

# The HTTP/2 attacks drive raw frames with python-hyper's h2 (and its two dependencies), pinned.

PROJECT = "6a3c5b1d9e2f4a7b8c0d1e2f3a4b5c6d"
ORDINARY_PATH = f"/v3/{PROJECT}/snapshots"
UPLOAD_PATH = f"/v3/{PROJECT}/volumes"
UPLOAD_BYTES = 2000
SMALL_DOWNLOAD = 4 << 20
LARGE_DOWNLOAD = 64 << 20
SLOW_READ_RATE = 16 << 10
NO_READ_RCVBUF = 4096

ATTACKS = {
    "0": "no attack (baseline)",
    "1": "HTTP/1 uploads, 1 B/s of 2000 B",
    "2": "HTTP/1 4 MiB responses never read",
    "3": "HTTP/1 64 MiB response read at 16 KiB/s",
    "4a": "h2c 4 MiB responses, window kept at 0",
    "4b": "h2c uploads, 1 B/s of 2000 B",
}
H2_ATTACKS = {"4a", "4b"}

# The keys this script sets when the binary accepts them, at snapguard's built-in defaults as of
# this writing (src/config.rs); a value documented in config/snapguard.toml takes precedence,
# and documented [timeouts]/[limits] keys not listed here are set too.
KNOWN_KEYS = {
    "timeouts.request_header": "10s",
    "timeouts.request_body": "30s",
    "timeouts.upstream_connect": "5s",
    "timeouts.upstream_response": "60s",
    "timeouts.upstream_idle": "90s",
    "timeouts.idle": "60s",
    "timeouts.shutdown_grace": "30s",
    "timeouts.body_idle": "30s",
    "timeouts.min_rate_grace": "10s",
    "timeouts.upstream_queue": "10s",
    "timeouts.tcp_keepalive": "60s",
    "limits.max_header_bytes": 65536,
    "limits.max_connections": 10000,
    "limits.max_upstream_connections": 64,
    "limits.max_upstream_waiting": 1024,
    "limits.buffer_request_body": 65536,
    "limits.buffer_response_body": 65536,
    "limits.buffer_memory": 64 << 20,
    "limits.min_body_rate": 1024,
}
SECTIONS = ("timeouts", "limits")





# ---------------------------------------------------------------------------------------------
# Values


def seconds_of(value):
    """A humantime duration ("10s", "500ms", "2m", "1m 30s") or a number of seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total, matched = 0.0, False
    for number, unit in re.findall(r"([\d.]+)\s*([a-z]+)", str(value)):
        if unit not in units:
            return None
        total += float(number) * units[unit]
        matched = True
    return total if matched else None


def bytes_of(value):
    """An integer, or a string like "1KiB", "1 KiB/s", "64k"."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    m = re.match(r"\s*([\d.]+)\s*([kmg]?)(i?b)?(/s)?\s*$", str(value).lower())
    if not m:
        return None
    mult = {"": 1, "k": 1024, "m": 1 << 20, "g": 1 << 30}[m.group(2)]
    return int(float(m.group(1)) * mult)


def fmt_s(x):
    if x is None:
        return "—"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def fmt_ms(x):
    if x is None:
        return "—"
    return f"{x * 1000:.0f}" if x >= 0.1 else f"{x * 1000:.1f}"




# ---------------------------------------------------------------------------------------------
# Processes














def h2c_supported(port):
    """Whether the port answers the HTTP/2 preface with a SETTINGS frame (h2c prior knowledge)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            data = b""
            while len(data) < 9:
                chunk = s.recv(1024)
                if not chunk:
                    break
                data += chunk
        return len(data) >= 9 and data[3] == 0x4
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Setup: tools, virtualenv, build








def build(args):
    """Like bench/run.py: snapguard on its own (built with the examples it would get their
    dev-dependency features), then the upstream."""
    target_dir = args.target_dir
    snapguard = args.snapguard_bin
    if snapguard is None or args.upstream_bin is None:
        log(f"building (release) in {target_dir}")
    if snapguard is None:
        if not cargo_build(target_dir, ["--bin", "snapguard"], args.build_retries):
            sys.exit("snapguard does not build")
        snapguard = os.path.join(target_dir, "release", "snapguard")
    upstream = args.upstream_bin
    if upstream is None:
        upstream = os.path.join(target_dir, "release", "examples", "bench_upstream")
        # The example links the library, so a mid-edit tree stops it too: an earlier build serves.
        if not cargo_build(target_dir, ["--example", "bench_upstream"], 0 if os.path.exists(upstream)
                           else args.build_retries):
            if not os.path.exists(upstream):
                sys.exit("examples/bench_upstream does not build")
            log(f"using the bench_upstream built earlier: {upstream}")
    return os.path.abspath(snapguard), os.path.abspath(upstream)




# ---------------------------------------------------------------------------------------------
# snapguard's config


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {v!r} as TOML")


def write_snapguard_config(path, base, keys):
    """`base`: top-level and [upstream]/[log] values; `keys`: "section.key" -> value."""
    sections = {}
    for name, value in keys.items():
        section, key = name.split(".", 1)
        sections.setdefault(section, {})[key] = value
    for section, values in base["sections"].items():
        sections.setdefault(section, {}).update(values)
    with open(path, "w") as f:
        for k, v in base["top"].items():
            f.write(f"{k} = {toml_value(v)}\n")
        for section, values in sections.items():
            f.write(f"\n[{section}]\n")
            for k, v in values.items():
                f.write(f"{k} = {toml_value(v)}\n")


def documented_keys():
    """[timeouts] and [limits] of config/snapguard.toml, flattened; {} when it does not parse."""
    path = os.path.join(ROOT, "config", "snapguard.toml")
    try:
        import tomllib
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except Exception as e:
        log(f"warning: cannot read {path} ({e}); using the script's own list of keys")
        return {}
    out = {}
    for section in SECTIONS:
        for k, v in (doc.get(section) or {}).items():
            if not isinstance(v, dict):
                out[f"{section}.{k}"] = v
    return out


def snapguard_base(listen, admin, upstream_port):
    return {"top": {"listen": f"127.0.0.1:{listen}", "admin": f"127.0.0.1:{admin}", "workers": 1},
            "sections": {"upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
                         "log": {"level": "warn"}}}


def snapguard_config(binary, tmp):
    """The [timeouts]/[limits] keys this binary accepts: (accepted, skipped, source of each)."""
    base = snapguard_base(free_port(), free_port(), free_port())
    documented = documented_keys()
    wanted = dict(KNOWN_KEYS)
    wanted.update(documented)
    source = {k: ("config/snapguard.toml" if k in documented else "script default") for k in wanted}
    path = os.path.join(tmp, "snapguard-check.toml")
    accepted, skipped = {}, {}

    def check(keys):
        write_snapguard_config(path, base, keys)
        r = subprocess.run([binary, "check-config", path], capture_output=True, text=True)
        return r.returncode == 0, (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]

    ok, why = check({})
    if not ok:
        raise RuntimeError(f"snapguard check-config rejects even the base config: {why[0]}")
    for key, value in wanted.items():
        ok, why = check({**accepted, key: value})
        if ok:
            accepted[key] = value
        else:
            skipped[key] = (value, why[0])
    ok, why = check(accepted)
    if not ok:
        raise RuntimeError(f"snapguard check-config rejects the combined config: {why[0]}")
    return accepted, skipped, source


# ---------------------------------------------------------------------------------------------
# Deadlines assumed, from the config in force


class Deadline:
    """When a hostile connection of one attack must be cut, from its start: `seconds`, or None
    when nothing bounds it. `expected` is False when the attack is within the configured pace
    (so not being cut is by design)."""

    def __init__(self, seconds, why, expected=True):
        self.seconds, self.why, self.expected = seconds, why, expected

    def label(self):
        if self.seconds is None:
            return ("none expected" if not self.expected else "none") + f" ({self.why})"
        return f"{self.seconds:.0f} s ({self.why})"


def snapguard_deadlines(keys):
    t = lambda k: seconds_of(keys.get(f"timeouts.{k}"))
    request_body, body_idle, grace = t("request_body"), t("body_idle"), t("min_rate_grace")
    min_rate = bytes_of(keys.get("limits.min_body_rate"))
    buffer_request = bytes_of(keys.get("limits.buffer_request_body"))
    out = {}

    # A 2000-byte upload at 1 B/s.
    if buffer_request is not None and UPLOAD_BYTES <= buffer_request and request_body:
        upload = Deadline(request_body, f"timeouts.request_body: a body <= limits.buffer_request_body "
                                        f"({buffer_request} B) is read whole first")
    else:
        options = []
        if min_rate and min_rate > 1 and grace is not None:
            options.append((grace, f"limits.min_body_rate {min_rate} B/s after timeouts.min_rate_grace"))
        if body_idle is not None and body_idle <= 1:
            options.append((body_idle, "timeouts.body_idle"))
        if options:
            upload = Deadline(*min(options))
        else:
            upload = Deadline(None, "no key bounds a streamed passthrough body moving 1 B/s; "
                                    "timeouts.request_body covers policed bodies only")
    out["1"] = out["4b"] = upload

    # A response the client stopped taking (HTTP/1 window full, or h2 window at 0).
    if body_idle is not None:
        stalled = Deadline(body_idle, "timeouts.body_idle: a response the downstream does not take")
    else:
        stalled = Deadline(None, "no key bounds a response the downstream does not take")
    out["2"] = out["4a"] = stalled

    # 64 MiB read at 16 KiB/s: never idle, so only a minimum rate above 16 KiB/s cuts it.
    if min_rate is not None and min_rate > SLOW_READ_RATE and grace is not None:
        out["3"] = Deadline(grace + 1, f"limits.min_body_rate {min_rate} B/s after timeouts.min_rate_grace")
    elif min_rate is not None:
        out["3"] = Deadline(None, f"16 KiB/s is above limits.min_body_rate ({min_rate} B/s) and never "
                                  f"idle for timeouts.body_idle", expected=False)
    else:
        out["3"] = Deadline(None, "no minimum rate configured")
    out["0"] = Deadline(None, "no hostile connections", expected=False)
    return out


def nginx_deadlines(directives):
    send = seconds_of(directives["send_timeout"][0])
    body = directives["client_body_timeout"][0]
    out = {}
    out["1"] = out["4b"] = Deadline(None, f"client_body_timeout {body} is between two reads; a 1 B/s drip "
                                          "never trips it")
    out["2"] = out["4a"] = Deadline(send, f"send_timeout, between two writes")
    out["3"] = Deadline(None, "16 KiB/s keeps send_timeout from firing; nginx has no minimum rate",
                        expected=False)
    out["0"] = Deadline(None, "no hostile connections", expected=False)
    return out


def tolerance(deadline):
    return 2.0 + 0.1 * deadline


# ---------------------------------------------------------------------------------------------
# nginx


def nginx_directives(keys):
    """nginx directives equivalent to snapguard's config in force: name -> (value, source)."""
    d = {}
    g = lambda k: keys.get(k)
    secs = lambda v: f"{seconds_of(v):g}s"
    d["client_header_timeout"] = (secs(g("timeouts.request_header") or "10s"), "timeouts.request_header")
    d["keepalive_timeout"] = (secs(g("timeouts.request_header") or "10s"),
                              "timeouts.request_header (snapguard closes idle HTTP/1 keep-alive with it)")
    d["keepalive_timeout (h2c server)"] = (secs(g("timeouts.idle") or "60s"), "timeouts.idle")
    if g("timeouts.body_idle") is not None:
        d["client_body_timeout"] = (secs(g("timeouts.body_idle")), "timeouts.body_idle")
        d["send_timeout"] = (secs(g("timeouts.body_idle")), "timeouts.body_idle")
    else:
        d["client_body_timeout"] = (secs(g("timeouts.request_body") or "30s"), "timeouts.request_body")
        d["send_timeout"] = ("60s", "nginx default: snapguard has no equivalent key")
    d["proxy_connect_timeout"] = (secs(g("timeouts.upstream_connect") or "5s"), "timeouts.upstream_connect")
    d["proxy_send_timeout"] = (secs(g("timeouts.upstream_response") or "60s"), "timeouts.upstream_response")
    d["proxy_read_timeout"] = (secs(g("timeouts.upstream_response") or "60s"), "timeouts.upstream_response")
    header = bytes_of(g("limits.max_header_bytes")) or 65536
    d["large_client_header_buffers"] = (f"4 {max(1, header // 1024)}k", "limits.max_header_bytes")
    d["keepalive (upstream)"] = (str(g("limits.max_upstream_connections") or 64), "limits.max_upstream_connections")
    d["keepalive_timeout (upstream)"] = (secs(g("timeouts.upstream_idle") or "90s"), "timeouts.upstream_idle")
    conns = int(g("limits.max_connections") or 10000)
    d["worker_connections"] = (str(conns), "limits.max_connections (nginx counts upstream connections too)")
    d["client_max_body_size"] = ("0", "unlimited (snapguard streams passthrough bodies of any size)")
    if seconds_of(g("timeouts.tcp_keepalive")):
        d["listen so_keepalive"] = (f"{seconds_of(g('timeouts.tcp_keepalive')):g}s::", "timeouts.tcp_keepalive")
    return d


def write_nginx_conf(tmp, directives, port, h2_port, upstream_port):
    v = lambda k: directives[k][0]
    keepalive = f" so_keepalive={v('listen so_keepalive')}" if "listen so_keepalive" in directives else ""
    conf = os.path.join(tmp, "nginx.conf")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 2 * int(v("worker_connections")) + 100
    if hard != resource.RLIM_INFINITY:
        nofile = min(nofile, hard)
    common = f"""
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"""
    with open(conf, "w") as f:
        f.write(f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log info;
events {{ worker_connections {v('worker_connections')}; }}
http {{
    access_log off;
    keepalive_requests 1000000000;
    client_header_timeout {v('client_header_timeout')};
    client_body_timeout {v('client_body_timeout')};
    send_timeout {v('send_timeout')};
    large_client_header_buffers {v('large_client_header_buffers')};
    client_max_body_size {v('client_max_body_size')};
    proxy_connect_timeout {v('proxy_connect_timeout')};
    proxy_send_timeout {v('proxy_send_timeout')};
    proxy_read_timeout {v('proxy_read_timeout')};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive {v('keepalive (upstream)')};
        keepalive_requests 1000000000;
        keepalive_timeout {v('keepalive_timeout (upstream)')};
    }}
    server {{
        listen 127.0.0.1:{port}{keepalive};
        keepalive_timeout {v('keepalive_timeout')};
        {common}
    }}
    server {{
        listen 127.0.0.1:{h2_port} http2{keepalive};
        keepalive_timeout {v('keepalive_timeout (h2c server)')};
        {common}
    }}
}}
""")
    return conf


# ---------------------------------------------------------------------------------------------
# Workers (run as `attacks.py _client|_attack SPEC` under the venv's Python)

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
PROXY_CLOSED = {4, 5, 6, 7, 9, 11}


def proxy_side_sockets(port):
    """Sockets on 127.0.0.1:port (the proxy's side) by peer port: state number."""
    out = {}
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, st = fields[1], fields[2], fields[3]
                ip, lport = local.split(":")
                if ip == "0100007F" and int(lport, 16) == port:
                    out[int(remote.split(":")[1], 16)] = int(st, 16)
    except OSError:
        pass
    return out


def tcp_info(sock):
    """(state, bytes received) from TCP_INFO."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    except OSError:
        return None, None
    received = struct.unpack_from("Q", raw, 128)[0] if len(raw) >= 136 else None
    return raw[0], received


async def client_worker(spec):
    """The ordinary client: a GET every `interval` on a fresh connection, open loop; one JSON
    line per request (due time, latency from the due time, status, whole body or not)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port, timeout = spec["port"], spec["timeout"]
    request = (f"GET {spec['path']} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n"
               f"User-Agent: ordinary\r\nConnection: close\r\n\r\n").encode()
    out = open(spec["out"], "a", buffering=1)

    async def one(due):
        status, ok, err, writer = None, False, None, None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                data = await reader.read()
            head, sep, body = data.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else None
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            whole = bool(sep) and (m is None or int(m.group(1)) == len(body))
            ok = status == 200 and whole
            if not whole:
                err = "truncated"
        except TimeoutError:
            err = "timeout"
        except (OSError, ValueError, IndexError) as e:
            err = type(e).__name__
        finally:
            if writer is not None:
                writer.transport.abort()
        done = time.monotonic()
        out.write(json.dumps({"due": due, "lat": done - due, "status": status, "ok": ok, "err": err}) + "\n")

    tasks = set()
    t0 = time.monotonic()
    k = 0
    while not stop.is_set() and time.monotonic() - t0 < spec["max_seconds"]:
        due = t0 + k * spec["interval"]
        k += 1
        delay = due - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                break
            except TimeoutError:
                pass
        task = asyncio.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    out.close()


class Hostile:
    def __init__(self, slot, t0):
        self.slot, self.t0 = slot, t0
        self.opened = time.monotonic()
        self.cut = None
        self.how = None
        self.lport = None
        self.seen = False
        self.abandoned = False
        self.bytes = 0
        self.status = None
        self.sock = None
        self.writer = None
        self.done = asyncio.Event()

    def close(self):
        if self.writer is not None:
            self.writer.transport.abort()
        elif self.sock is not None:
            self.sock.close()

    def cut_by(self, how):
        if self.cut is None:
            self.cut, self.how = time.monotonic(), how
        self.done.set()

    def record(self):
        return {"slot": self.slot, "opened": self.opened - self.t0,
                "cut_after": None if self.cut is None else self.cut - self.opened,
                "how": self.how, "bytes": self.bytes, "status": self.status, "lport": self.lport}


async def hostile_socket(h, port, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Closed with a reset at the end, so nothing lingers in TIME_WAIT or FIN_WAIT.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    h.sock = s
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    h.lport = s.getsockname()[1]
    return s


def status_of(data):
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else None


async def drip_h1(h, port):
    s = await hostile_socket(h, port)
    reader, writer = await asyncio.open_connection(sock=s)
    h.writer = writer
    writer.write((f"POST {UPLOAD_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {UPLOAD_BYTES}\r\n\r\n").encode())
    await writer.drain()
    read = asyncio.ensure_future(reader.read(65536))
    try:
        for _ in range(UPLOAD_BYTES):
            done, _ = await asyncio.wait({read}, timeout=1.0)
            if done:
                data = read.result()
                if data:
                    h.status = status_of(data)
                    h.cut_by(f"{h.status} response")
                else:
                    h.cut_by("FIN")
                return
            writer.write(b"x")
            h.bytes += 1
            await writer.drain()
        h.cut_by("body sent whole")
    except (ConnectionError, OSError) as e:
        h.cut_by(type(e).__name__)
    finally:
        read.cancel()


async def no_read_h1(h, port):
    s = await hostile_socket(h, port, rcvbuf=NO_READ_RCVBUF)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(s, f"GET /bytes/{SMALL_DOWNLOAD} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    while True:
        state, received = tcp_info(s)
        if received is not None:
            h.bytes = received
        if state is not None and state != 1:
            h.cut_by("FIN" if state == 8 else f"reset ({TCP_STATES.get(state, state)})")
            return
        await asyncio.sleep(0.1)


async def slow_read_h1(h, port):
    s = await hostile_socket(h, port, rcvbuf=SLOW_READ_RATE)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(s, f"GET /bytes/{LARGE_DOWNLOAD} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    tick, per_tick = 0.25, SLOW_READ_RATE // 4
    next_t = time.monotonic()
    try:
        while True:
            next_t += tick
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            try:
                data = s.recv(per_tick)
            except BlockingIOError:
                continue
            if not data:
                h.cut_by(f"FIN after {h.bytes} B read")
                return
            if h.status is None:
                h.status = status_of(data)
            h.bytes += len(data)
    except (ConnectionError, OSError) as e:
        h.cut_by(type(e).__name__)


async def h2_exchange(h, port, upload):
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    s = await hostile_socket(h, port)
    reader, writer = await asyncio.open_connection(sock=s)
    h.writer = writer
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    headers = [(":method", "POST" if upload else "GET"), (":scheme", "http"),
               (":authority", f"127.0.0.1:{port}"),
               (":path", UPLOAD_PATH if upload else f"/bytes/{SMALL_DOWNLOAD}")]
    if upload:
        headers += [("content-type", "application/json"), ("content-length", str(UPLOAD_BYTES))]
    conn.send_headers(sid, headers, end_stream=not upload)
    writer.write(conn.data_to_send())
    await writer.drain()
    read = asyncio.ensure_future(reader.read(65536))
    sent = 0
    next_drip = time.monotonic() + 1.0
    try:
        while True:
            timeout = max(0.0, next_drip - time.monotonic()) if upload and sent < UPLOAD_BYTES else None
            done, _ = await asyncio.wait({read}, timeout=timeout)
            if not done:
                conn.send_data(sid, b"x", end_stream=sent + 1 == UPLOAD_BYTES)
                sent += 1
                h.bytes = sent
                next_drip += 1.0
                writer.write(conn.data_to_send())
                await writer.drain()
                continue
            data = read.result()
            if not data:
                h.cut_by("connection closed")
                return
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                h.cut_by(f"protocol error: {e}")
                return
            # SETTINGS and PING acknowledgements only: WINDOW_UPDATE is never sent.
            pending = conn.data_to_send()
            if pending:
                writer.write(pending)
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived):
                    h.status = int(dict(ev.headers).get(":status", 0))
                    if upload:
                        h.cut_by(f"{h.status} response")
                elif isinstance(ev, h2.events.DataReceived):
                    if not upload:
                        h.bytes += ev.flow_controlled_length
                elif isinstance(ev, h2.events.StreamReset):
                    h.cut_by(f"RST_STREAM {getattr(ev.error_code, 'name', ev.error_code)}")
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    h.cut_by(f"GOAWAY {getattr(ev.error_code, 'name', ev.error_code)}")
                elif isinstance(ev, h2.events.StreamEnded):
                    h.cut_by(f"stream ended ({h.status}, {h.bytes} B)")
            if h.done.is_set():
                return
            read = asyncio.ensure_future(reader.read(65536))
    except (ConnectionError, OSError) as e:
        h.cut_by(type(e).__name__)
    finally:
        read.cancel()


ATTACKERS = {
    "1": lambda h, port: drip_h1(h, port),
    "2": lambda h, port: no_read_h1(h, port),
    "3": lambda h, port: slow_read_h1(h, port),
    "4a": lambda h, port: h2_exchange(h, port, upload=False),
    "4b": lambda h, port: h2_exchange(h, port, upload=True),
}


async def attack_worker(spec):
    """Runs one attack against spec["port"] and writes what happened to spec["out"]."""
    port, attack, n = spec["port"], spec["attack"], spec["n"]
    deadline = spec["deadline"]
    tol = None if deadline is None else tolerance(deadline)
    t0 = time.monotonic()
    open_end = t0 + spec["open_seconds"]
    hard_end = open_end + spec["max_extra"]
    hostiles = []
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def slot(i):
        while not stopping.is_set():
            h = Hostile(i, t0)
            hostiles.append(h)
            task = asyncio.ensure_future(ATTACKERS[attack](h, port))
            waiter = asyncio.ensure_future(h.done.wait())
            stop_wait = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({task, waiter, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if task.done() and not h.done.is_set():
                # The attacker's own failure (a refused connect, say) is not a cut by the proxy.
                exc = task.exception()
                h.abandoned = True
                h.how = f"attacker error: {type(exc).__name__}: {exc}" if exc else "attacker ended"
            for t in (task, waiter, stop_wait):
                t.cancel()
            await asyncio.sleep(0)
            h.close()
            if not spec["reopen"] or time.monotonic() >= open_end or stopping.is_set():
                return
            # At most one new connection a second per attacker.
            await asyncio.sleep(max(0.0, h.opened + 1.0 - time.monotonic()))

    async def monitor():
        while not stopping.is_set():
            sockets = proxy_side_sockets(port)
            for h in hostiles:
                if h.cut is not None or h.lport is None or h.abandoned:
                    continue
                st = sockets.get(h.lport)
                if st is not None and st not in PROXY_CLOSED:
                    h.seen = True
                elif st in PROXY_CLOSED:
                    h.cut_by(f"proxy closed ({TCP_STATES[st]})")
                elif h.seen:
                    h.cut_by("proxy reset")
            now = time.monotonic()
            if now >= open_end:
                live = [h for h in hostiles if h.cut is None and not h.abandoned]
                if not live or deadline is None or now >= hard_end or \
                        now >= max(h.opened for h in live) + deadline + tol + 1.0:
                    stopping.set()
            await asyncio.sleep(0.2)

    slots = [asyncio.ensure_future(slot(i)) for i in range(n)]
    await monitor()
    await asyncio.wait(slots, timeout=5)
    end = time.monotonic()
    for h in hostiles:
        h.close()
    with open(spec["out"], "w") as f:
        json.dump({"start": t0, "end": end, "open_end": open_end,
                   "hostiles": [h.record() for h in hostiles]}, f)


def worker_main(kind, spec_json):
    spec = json.loads(spec_json)
    asyncio.run(client_worker(spec) if kind == "_client" else attack_worker(spec))


# ---------------------------------------------------------------------------------------------
# Orchestration


class Target:
    """A running proxy (or none yet) and how to start one."""

    def __init__(self, name, args, tmp, binaries, nginx):
        self.name, self.args, self.tmp = name, args, tmp
        self.snapguard_bin, self.upstream_bin = binaries
        self.nginx = nginx
        self.procs = []
        self.keys = self.directives = None

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self):
        upstream_port = free_port()
        upstream = Proc([self.upstream_bin, f"127.0.0.1:{upstream_port}"], cpu=1)
        self.procs = [upstream]
        wait_port(upstream_port, upstream)
        if self.name == "snapguard":
            port, admin = free_port(), free_port()
            path = os.path.join(self.tmp, "snapguard.toml")
            write_snapguard_config(path, snapguard_base(port, admin, upstream_port), self.keys)
            with open(os.path.join(self.tmp, "snapguard.log"), "ab") as stderr:
                proc = Proc([self.snapguard_bin, "--config", path], cpu=1, env={"RUST_LOG": "warn"},
                            stderr=stderr)
            self.ports = {"h1": port, "h2": port, "admin": admin}
        else:
            port, h2_port = free_port(), free_port()
            conf = write_nginx_conf(self.tmp, self.directives, port, h2_port, upstream_port)
            proc = Proc([self.nginx, "-c", conf, "-e", f"{self.tmp}/nginx-error.log"], cpu=1)
            self.ports = {"h1": port, "h2": h2_port, "admin": None}
        self.procs.append(proc)
        self.proxy = proc
        wait_port(port, proc)
        for _ in range(3):
            status, _ = http_get(port, ORDINARY_PATH)
            if status != 200:
                raise RuntimeError(f"{self.name} answers {status} to the ordinary GET")

    def metrics(self):
        if not self.ports.get("admin"):
            return {}
        try:
            with socket.create_connection(("127.0.0.1", self.ports["admin"]), timeout=2) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        out = {}
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("#") or not re.search(r"cut|upstream_errors|upstream_failures", line):
                continue
            name, _, value = line.rpartition(" ")
            try:
                if float(value) > 0:
                    out[name] = float(value)
            except ValueError:
                pass
        return out

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        self.procs = []


def run_one(target, attack, args, worker_python, deadline):
    """One attack on a fresh proxy and upstream: a dict of results."""
    tmp = target.tmp
    target.start()
    port = target.ports["h2" if attack in H2_ATTACKS else "h1"]
    result = {"attack": attack, "proxy": target.name, "deadline": deadline.seconds,
              "deadline_label": deadline.label(), "deadline_expected": deadline.expected}
    client = attacker = None
    try:
        if attack in H2_ATTACKS and not h2c_supported(port):
            result["not_comparable"] = f"{target.name} does not answer h2c prior knowledge on {port}"
            return result
        rss_before = target.proxy.status_kb("VmRSS")
        client_out = os.path.join(tmp, f"client-{target.name}-{attack}.jsonl")
        client_spec = {"port": target.ports["h1"], "path": ORDINARY_PATH, "interval": 0.05, "timeout": 5.0,
                       "out": client_out, "max_seconds": args.seconds + args.max_extra + 120}
        with open(os.path.join(tmp, "client.log"), "ab") as stderr:
            client = Proc([worker_python, os.path.abspath(__file__), "_client", json.dumps(client_spec)], cpu=0,
                          stderr=stderr)
        time.sleep(1.0)  # the client settles; its first second is not counted
        rss_peak = 0
        if attack == "0":
            start = time.monotonic()
            while time.monotonic() - start < args.baseline_seconds:
                rss_peak = max(rss_peak, target.proxy.status_kb("VmRSS"))
                time.sleep(0.1)
            window = (start, time.monotonic())
            hostiles = []
        else:
            attack_out = os.path.join(tmp, f"attack-{target.name}-{attack}.json")
            spec = {"port": port, "attack": attack, "n": 1 if attack == "3" else args.attackers,
                    "open_seconds": args.seconds, "max_extra": args.max_extra, "deadline": deadline.seconds,
                    "reopen": attack != "3", "out": attack_out}
            with open(os.path.join(tmp, "attacker.log"), "ab") as stderr:
                attacker = Proc([worker_python, os.path.abspath(__file__), "_attack", json.dumps(spec)], cpu=0,
                                stderr=stderr)
            limit = time.monotonic() + args.seconds + args.max_extra + 60
            while attacker.alive() and time.monotonic() < limit:
                rss_peak = max(rss_peak, target.proxy.status_kb("VmRSS"))
                if not target.proxy.alive():
                    raise RuntimeError(f"{target.name} exited with {target.proxy.p.returncode} during attack "
                                       f"{attack}: {tail(os.path.join(tmp, target.name + '.log'))}")
                time.sleep(0.1)
            attacker.stop(grace=10)
            if not os.path.exists(attack_out):
                raise RuntimeError(f"the attacker wrote nothing: {tail(os.path.join(tmp, 'attacker.log'))}")
            with open(attack_out) as f:
                attacked = json.load(f)
            window = (attacked["start"], attacked["end"])
            hostiles = attacked["hostiles"]
        rss_peak = max(rss_peak, target.proxy.status_kb("VmHWM"))
        client.stop(grace=10)
        result.update(ordinary_stats(client_out, window))
        result.update(hostile_stats(hostiles, deadline))
        result.update({"window": window[1] - window[0], "rss_before_mib": rss_before / 1024,
                       "rss_peak_mib": rss_peak / 1024, "metrics": target.metrics()})
        result["verdict"] = verdict(result, deadline)
        return result
    finally:
        for p in (attacker, client):
            if p is not None:
                p.stop()
        target.stop()


def tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-n:])
    except OSError:
        return ""


def ordinary_stats(path, window):
    start, end = window
    rows = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if start <= r["due"] <= end:
                rows.append(r)
    ok = [r["lat"] for r in rows if r["ok"]]
    # When the slow and failed ones were due, from the start of the window: where in the attack.
    slow = [[round(r["due"] - start, 2), round(r["lat"], 3), r["err"] or r["status"]]
            for r in rows if not r["ok"] or r["lat"] > 0.1][:200]
    failures = {}
    for r in rows:
        if not r["ok"]:
            key = r["err"] or f"status {r['status']}"
            failures[key] = failures.get(key, 0) + 1
    return {"sent": len(rows), "answered": len(ok), "p50": percentile(ok, 50), "p99": percentile(ok, 99),
            "max": max(ok) if ok else None, "failures": failures, "slow": slow}


def hostile_stats(hostiles, deadline):
    cut = [h["cut_after"] for h in hostiles if h["cut_after"] is not None]
    how = {}
    for h in hostiles:
        key = h["how"] or "not cut"
        how[key] = how.get(key, 0) + 1
    late = 0
    if deadline.seconds is not None:
        late = sum(1 for c in cut if c > deadline.seconds + tolerance(deadline.seconds))
    moved = [h["bytes"] for h in hostiles]
    return {"opened": len(hostiles), "cut": len(cut), "cut_median": statistics.median(cut) if cut else None,
            "cut_max": max(cut) if cut else None, "late": late, "how": how,
            "bytes_median": statistics.median(moved) if moved else None}


def verdict(r, deadline):
    reasons = []
    if r["sent"] == 0:
        reasons.append("no ordinary request sent")
    else:
        share = r["answered"] / r["sent"]
        if share < 0.99:
            reasons.append(f"answered {share:.1%} < 99%")
        if r["p99"] is None or r["p99"] > 1.0:
            reasons.append("p99 > 1 s")
    if r["attack"] != "0":
        if deadline.seconds is None:
            if deadline.expected:
                reasons.append("no deadline bounds it" + (f"; {r['opened'] - r['cut']} never cut"
                                                           if r["cut"] < r["opened"] else ""))
        else:
            if r["cut"] < r["opened"]:
                reasons.append(f"{r['opened'] - r['cut']} not cut")
            if r["late"]:
                reasons.append(f"{r['late']} cut late")
    return ("PASS", []) if not reasons else ("FAIL", reasons)


# ---------------------------------------------------------------------------------------------
# Report


def report(results, meta, args):
    lines = [f"# Slow and stalled peers: snapguard and nginx", ""]
    tree = f"commit {meta['commit']}" + (f" plus uncommitted work ({len(meta['dirty'])} files changed or new)"
                                         if meta["dirty"] else "")
    built = (f"snapguard built from the work tree at {tree}" if not meta["given_bin"] else
             f"snapguard binary given: `{meta['given_bin']}` (the work tree is at {tree})")
    lines.append(f"{meta['date']}, `python3 bench/attacks.py {' '.join(meta['argv'])}`; {built} "
                 f"({meta['snapguard_version']}); {meta['nginx_version']}; {meta['machine']}.")
    lines.append("")
    lines.append(f"Ordinary client: `GET {ORDINARY_PATH.replace(PROJECT, '{p}')}` every 50 ms, open loop, a fresh "
                 "connection each, 5 s timeout; answered = 200 with the whole body; latency from the time each "
                 "request was due, over the answered ones; counted while hostile connections were open. "
                 f"N = {args.attackers} hostile connections (1 for attack 3), replaced when cut during the first "
                 f"{args.seconds} s, then watched until cut or past their deadline + tolerance (at most "
                 f"{args.max_extra} s more). Cut = the proxy ended the exchange (its socket left ESTABLISHED, or "
                 "a response, FIN, reset, RST_STREAM or GOAWAY reached the attacker); seconds from the hostile "
                 "connection's start. Deadlines are the ones assumed from the config; tolerance 2 s + 10%. "
                 "RSS: the proxy process's peak over the attack (fresh process per attack).")
    lines.append("")
    lines.append("| attack | proxy | ordinary answered / sent | p50 ms | p99 ms | hostile cut / opened | cut after "
                 "median / max s | deadline assumed | RSS peak MiB | target |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---|---:|---|")
    for r in results:
        name = f"{r['attack']} {ATTACKS[r['attack']]}"
        if r.get("not_comparable"):
            lines.append(f"| {name} | {r['proxy']} | not comparable: {r['not_comparable']} | | | | | | | |")
            continue
        if r.get("error"):
            lines.append(f"| {name} | {r['proxy']} | error: {r['error']} | | | | | | | |")
            continue
        share = f"{r['answered']} / {r['sent']} ({100 * r['answered'] / r['sent']:.1f}%)" if r["sent"] else "0 / 0"
        hostile = "—" if r["attack"] == "0" else f"{r['cut']} / {r['opened']}"
        cut = "—" if not r["cut"] else f"{fmt_s(r['cut_median'])} / {fmt_s(r['cut_max'])}"
        v, why = r["verdict"]
        if r["proxy"] == "snapguard":
            target = f"**{v}**" + (f": {'; '.join(why)}" if why else "")
        else:
            target = f"({v.lower()})"
        lines.append(f"| {name} | {r['proxy']} | {share} | {fmt_ms(r['p50'])} | {fmt_ms(r['p99'])} | {hostile} | "
                     f"{cut} | {r['deadline_label'] if r['attack'] != '0' else '—'} | {r['rss_peak_mib']:.1f} | "
                     f"{target} |")
    lines.append("")
    lines.append("target: PASS/FAIL for snapguard; nginx's rows show in parentheses how it fares against the same "
                 "targets, with its own deadlines.")
    lines.append("")
    lines.append("Details:")
    lines.append("")
    lines.append("| attack | proxy | window s | ordinary failures | how hostile connections ended | "
                 "median bytes moved | snapguard counters (non-zero) |")
    lines.append("|---|---|---:|---|---|---:|---|")
    for r in results:
        if r.get("not_comparable") or r.get("error"):
            continue
        fails = ", ".join(f"{k}: {v}" for k, v in sorted(r["failures"].items())) or "none"
        how = ", ".join(f"{k}: {v}" for k, v in sorted(r["how"].items(), key=lambda kv: -kv[1])) or "—"
        counters = ", ".join(f"`{k}` {v:g}" for k, v in sorted(r.get("metrics", {}).items())) or "—"
        lines.append(f"| {r['attack']} | {r['proxy']} | {r['window']:.0f} | {fails} | {how} | "
                     f"{'—' if r['bytes_median'] is None else int(r['bytes_median'])} | {counters} |")
    lines.append("")
    lines.append("snapguard's generated config (each key accepted by `snapguard check-config`):")
    lines.append("")
    for k, v in meta["keys"].items():
        lines.append(f"- `{k} = {toml_value(v)}` ({meta['sources'][k]})")
    for k, (v, why) in meta["skipped"].items():
        lines.append(f"- skipped, rejected by this binary: `{k} = {toml_value(v)}` ({why})")
    lines.append("- and `workers = 1`, `log.level = \"warn\"`, listen/admin/upstream on 127.0.0.1")
    lines.append("")
    lines.append("nginx (one worker, master_process off, h2c on a second port with `listen ... http2`; "
                 "proxy_buffering and proxy_request_buffering at their default, on):")
    lines.append("")
    for k, (v, src) in meta["directives"].items():
        lines.append(f"- `{k} {v}` ({src})")
    lines.append("")
    return "\n".join(lines) + "\n"


def console_keys(keys, skipped, sources):
    log("snapguard config keys set:")
    for k, v in keys.items():
        log(f"  {k} = {toml_value(v)}  ({sources[k]})")
    for k, (v, why) in skipped.items():
        log(f"  skipped {k} = {toml_value(v)}: check-config says {why}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] in ("_client", "_attack"):
        return worker_main(sys.argv[1], sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attackers", type=int, default=150, help="hostile connections per attack (not 3)")
    parser.add_argument("--seconds", type=int, default=30, help="how long hostile connections are kept up")
    parser.add_argument("--max-extra", type=int, default=75,
                        help="longest wait after --seconds for hostile connections to be cut")
    parser.add_argument("--baseline-seconds", type=int, default=10)
    parser.add_argument("--proxy", default="snapguard,nginx")
    parser.add_argument("--attacks", default="0,1,2,3,4a,4b")
    parser.add_argument("--snapguard-bin", help="use this snapguard binary instead of building one")
    parser.add_argument("--upstream-bin", help="use this bench_upstream binary instead of building one")
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"),
                        help="CARGO_TARGET_DIR for the builds (default: $CARGO_TARGET_DIR or target/)")
    parser.add_argument("--build-retries", type=int, default=5, help="retries, a minute apart, of a failed build")
    parser.add_argument("--deadline", action="append", default=[], metavar="ATTACK=SECONDS",
                        help="override the deadline assumed for snapguard on an attack (SECONDS or none)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "attacks-latest.md"))
    args = parser.parse_args()
    proxies = [p for p in args.proxy.split(",") if p]
    attacks = [a for a in args.attacks.split(",") if a]
    for p in proxies:
        if p not in ("snapguard", "nginx"):
            sys.exit(f"unknown proxy {p}")
    for a in attacks:
        if a not in ATTACKS:
            sys.exit(f"unknown attack {a}; one of {', '.join(ATTACKS)}")
    if os.cpu_count() < 2:
        sys.exit("needs two CPUs: one for the load, one for the proxy and upstream")

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    # Also SIGINT: a shell that starts this in the background would have it ignored otherwise.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    nginx = ensure_nginx() if "nginx" in proxies else None
    worker_python = ensure_venv()
    commit, dirty = tree_state()
    binaries = build(args)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="snapguard-attacks-", ignore_cleanup_errors=True) as tmp:
            # The config snapguard runs with decides the deadlines, and nginx's equivalents.
            keys, skipped, sources = snapguard_config(binaries[0], tmp)
            console_keys(keys, skipped, sources)
            directives = nginx_directives(keys)
            deadlines = {"snapguard": snapguard_deadlines(keys), "nginx": nginx_deadlines(directives)}
            for override in args.deadline:
                attack, _, value = override.partition("=")
                seconds = None if value == "none" else float(value)
                deadlines["snapguard"][attack] = Deadline(seconds, "given with --deadline")
            for proxy in proxies:
                target = Target(proxy, args, tmp, binaries, nginx)
                target.keys, target.directives = keys, directives
                for attack in attacks:
                    deadline = deadlines[proxy][attack]
                    log(f"{proxy}: attack {attack} ({ATTACKS[attack]}), deadline {deadline.label()}")
                    try:
                        r = run_one(target, attack, args, worker_python, deadline)
                    except Exception as e:  # one attack failing must not lose the others
                        why = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
                        log(f"  error: {why}")
                        r = {"attack": attack, "proxy": proxy, "error": why}
                    results.append(r)
                    if r.get("sent") is not None:
                        log(f"  ordinary {r['answered']}/{r['sent']} p50 {fmt_ms(r['p50'])} ms p99 "
                            f"{fmt_ms(r['p99'])} ms; hostile cut {r['cut']}/{r['opened']} median "
                            f"{fmt_s(r['cut_median'])} s max {fmt_s(r['cut_max'])} s; {r['how']}; RSS peak "
                            f"{r['rss_peak_mib']:.1f} MiB; {r['verdict'][0]} {'; '.join(r['verdict'][1])}")
                    elif r.get("not_comparable"):
                        log(f"  not comparable: {r['not_comparable']}")
            version = subprocess.run([binaries[0], "--version"], capture_output=True, text=True).stdout.strip()
            nginx_version = (subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
                             if nginx else "nginx not run")
            meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "argv": sys.argv[1:], "commit": commit,
                    "dirty": dirty, "given_bin": args.snapguard_bin, "snapguard_version": version, "nginx_version": nginx_version,
                    "machine": f"{os.cpu_count()} CPUs, Linux {os.uname().release}",
                    "keys": keys, "skipped": skipped, "sources": sources, "directives": directives}
    except KeyboardInterrupt:
        log("interrupted: stopping everything started")
        stop_all()
        sys.exit(130)
    finally:
        stop_all()
    text = report(results, meta, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"meta": {k: v for k, v in meta.items() if k != "skipped"},
                   "skipped": {k: list(v) for k, v in meta["skipped"].items()}, "results": results}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
