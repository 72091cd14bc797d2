#!/usr/bin/env python3
"""snapguard's benchmark: the same traffic direct to a fixed upstream, through nginx, and through
snapguard, in one run on one machine, interleaved, reported as medians and ratios.

    python3 bench/run.py [--rounds 3] [--seconds 8] [--out bench/results/latest.md]

Installs wrk and nginx from Debian's packages when missing, builds snapguard and the bench
helpers (examples/bench_upstream.rs, examples/open_loop.rs) in release mode, runs everything on
127.0.0.1, and stops everything it started, by PID. wrk runs on CPU 0; the upstream and the proxy
under test share CPU 1, so CPU spent per request decides throughput. nginx runs one worker (in
a single process, master_process off, so its CPU time is measurable) with a keep-alive upstream
pool; snapguard runs one worker thread (--threads 1). Access logs are off for both.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Proc, ROOT, ensure_nginx, free_port, log, wait_port  # noqa: E402

RELEASE = os.path.join(ROOT, "target", "release")

BODY_ALLOWED = '{"snapshot":{"name":"snap-001","description":"Daily backup of the orders db"}}'
BODY_REJECTED = '{"snapshot":{"name":"autobk_snapshot_x","description":"Daily backup"}}'
BODY_NORMALIZED = '{"snapshot":{"display_name":"snap-001","description":"Daily backup"}}'

# name -> (method, path, body)
SCENARIOS = {
    "a GET passthrough": ("GET", "/v3/p1/snapshots/s1", None),
    "b PUT allowed (80 B)": ("PUT", "/v3/p1/snapshots/s1", BODY_ALLOWED),
    "c PUT rejected": ("PUT", "/v3/p1/snapshots/s1", BODY_REJECTED),
    "d PUT normalized": ("PUT", "/v3/p1/snapshots/s1", BODY_NORMALIZED),
    "e POST 64 KiB passthrough": ("POST", "/v3/p1/volumes/v1/action", "x" * 65536),
}
TARGETS = ["direct", "nginx", "snapguard"]


def ensure_tools():
    ensure_nginx()
    if not shutil.which("wrk"):
        log("installing wrk")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"],
                       check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                       stdout=subprocess.DEVNULL)


def build():
    log("building (release)")
    # Two builds: built together with the examples, snapguard would get the examples'
    # dev-dependency features, tokio's `test-util` among them, which puts a lock behind every
    # `tokio::time::Instant::now()`. The binary measured must be the one users run.
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "snapguard"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "--example", "bench_upstream",
                    "--example", "open_loop"], cwd=ROOT, check=True)


def start_snapguard(upstream_port, tmp):
    port, admin = free_port(), free_port()
    proc = Proc([os.path.join(RELEASE, "snapguard"), "--threads", "1", "--listen", f"127.0.0.1:{port}",
                 "--admin", f"127.0.0.1:{admin}", "--upstream", f"http://127.0.0.1:{upstream_port}"],
                cpu=1, env={"RUST_LOG": "warn"})
    wait_port(port)
    return proc, port


def start_nginx(upstream_port, tmp):
    port = free_port()
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
    # snapguard puts no cap on requests per connection; nginx's default (1000) would make the
    # load generators reconnect, or fail, every thousand requests.
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
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = Proc([nginx, "-c", conf, "-e", f"{tmp}/nginx-error.log"], cpu=1)
    wait_port(port)
    return proc, port


def wrk_script(tmp, name, method, body):
    path = os.path.join(tmp, re.sub(r"\W+", "_", name) + ".lua")
    with open(path, "w") as f:
        f.write(f'wrk.method = "{method}"\n')
        f.write('wrk.headers["Content-Type"] = "application/json"\n')
        if body is not None:
            f.write(f"wrk.body = {json.dumps(body)}\n")
    return path


def parse_duration_us(text):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}[unit]


def run_wrk(port, path, script, seconds, connections=32):
    out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", script, f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, check=True).stdout
    if "50%" not in out:
        raise RuntimeError(f"wrk printed no latency distribution:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = parse_duration_us(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = parse_duration_us(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "total": total, "p50": p50, "p99": p99,
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else ""}


def run_open_loop(port, method, path, body, tmp, rate, seconds):
    body_file = "-"
    if body is not None:
        body_file = os.path.join(tmp, "open_loop_body")
        with open(body_file, "w") as f:
            f.write(body)
    out = subprocess.run(["taskset", "-c", "0", os.path.join(RELEASE, "examples", "open_loop"),
                          f"http://127.0.0.1:{port}{path}", method, body_file, str(rate), str(seconds), "32"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def closed_and_open_loop(args, tmp):
    upstream_port = free_port()
    upstream = Proc([os.path.join(RELEASE, "examples", "bench_upstream"), f"127.0.0.1:{upstream_port}"], cpu=1)
    procs = [upstream]
    try:
        wait_port(upstream_port)
        nginx, nginx_port = start_nginx(upstream_port, tmp)
        procs.append(nginx)
        snapguard, snapguard_port = start_snapguard(upstream_port, tmp)
        procs.append(snapguard)
        # Whose CPU counts for each target: the proxy's, or for direct the upstream's.
        targets = {"direct": (upstream_port, upstream), "nginx": (nginx_port, nginx),
                   "snapguard": (snapguard_port, snapguard)}
        scripts = {name: wrk_script(tmp, name, m, b) for name, (m, _, b) in SCENARIOS.items()}

        # Warm every path once.
        for name, (_, path, _) in SCENARIOS.items():
            for target in TARGETS:
                run_wrk(targets[target][0], path, scripts[name], 1)

        results = {name: {t: [] for t in TARGETS} for name in SCENARIOS}
        for r in range(args.rounds):
            for name, (_, path, _) in SCENARIOS.items():
                for target in TARGETS:
                    port, proc = targets[target]
                    before = proc.cpu_seconds()
                    res = run_wrk(port, path, scripts[name], args.seconds)
                    res["cpu_us"] = (proc.cpu_seconds() - before) * 1e6 / max(res["total"], 1)
                    results[name][target].append(res)
                    log(f"round {r + 1} {name:28} {target:10} {res['rps']:>10.0f} req/s "
                        f"p50 {res['p50']:>7.0f} us p99 {res['p99']:>7.0f} us cpu {res['cpu_us']:.1f} us/req"
                        + (f" non-2xx {res['non2xx']}" if res["non2xx"] else ""))

        medians = {name: {t: {k: statistics.median(r[k] for r in results[name][t])
                              for k in ("rps", "p50", "p99", "cpu_us")} for t in TARGETS} for name in SCENARIOS}

        # Open loop at half the slowest target's throughput, so that every target sustains it.
        open_loop = {}
        for name, (method, path, body) in SCENARIOS.items():
            rate = int(0.5 * min(medians[name][t]["rps"] for t in TARGETS))
            open_loop[name] = {"rate": rate}
            for target in TARGETS:
                res = run_open_loop(targets[target][0], method, path, body, tmp, rate, args.open_seconds)
                open_loop[name][target] = res
                log(f"open loop {name:28} {target:10} {rate} req/s: p50 {res['p50_us']} us p99 {res['p99_us']} us"
                    f" errors {res['errors']}")
        return medians, open_loop
    finally:
        for p in reversed(procs):
            p.stop()


def memory(args, tmp):
    upstream_port = free_port()
    upstream = Proc([os.path.join(RELEASE, "examples", "bench_upstream"), f"127.0.0.1:{upstream_port}"], cpu=1)
    procs = [upstream]
    out = {}
    try:
        wait_port(upstream_port)
        snapguard, port = start_snapguard(upstream_port, tmp)
        procs.append(snapguard)
        script = wrk_script(tmp, "mem_get", "GET", None)
        run_wrk(port, "/v3/p1/snapshots/s1", script, 1)
        out["idle_rss_kb"] = snapguard.status_kb("VmRSS")
        # 1,000 keep-alive connections busy for 6 s; RSS sampled while they are open.
        wrk = subprocess.Popen(["taskset", "-c", "0", "wrk", "-t1", "-c1000", "-d6s", "-s", script,
                                f"http://127.0.0.1:{port}/v3/p1/snapshots/s1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(4)
        out["rss_1000_kb"] = snapguard.status_kb("VmRSS")
        wrk.wait()
        out["hwm_1000_kb"] = snapguard.status_kb("VmHWM")
    finally:
        for p in reversed(procs):
            p.stop()

    # Streaming: a fresh process, its peak RSS before and after 1 GiB each way.
    upstream_port = free_port()
    upstream = Proc([os.path.join(RELEASE, "examples", "bench_upstream"), f"127.0.0.1:{upstream_port}"], cpu=1)
    procs = [upstream]
    gib = 1 << 30
    try:
        wait_port(upstream_port)
        snapguard, port = start_snapguard(upstream_port, tmp)
        procs.append(snapguard)
        run_wrk(port, "/v3/p1/snapshots/s1", wrk_script(tmp, "mem_get", "GET", None), 1)
        out["stream_hwm_before_kb"] = snapguard.status_kb("VmHWM")
        upload = subprocess.run(
            f"head -c {gib} /dev/zero | taskset -c 0 curl -sS -o /dev/null -w '%{{http_code}} %{{size_upload}}' "
            f"-T - -X POST http://127.0.0.1:{port}/v3/p1/volumes/v1/action",
            shell=True, capture_output=True, text=True, check=True).stdout
        out["upload"] = upload
        out["stream_hwm_upload_kb"] = snapguard.status_kb("VmHWM")
        download = subprocess.run(
            ["taskset", "-c", "0", "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
             f"http://127.0.0.1:{port}/bytes/{gib}"], capture_output=True, text=True, check=True).stdout
        out["download"] = download
        out["stream_hwm_download_kb"] = snapguard.status_kb("VmHWM")
    finally:
        for p in reversed(procs):
            p.stop()
    log("memory", out)
    return out


def report(medians, open_loop, mem, args):
    lines = []
    lines.append(f"Closed loop: wrk, 1 thread, 32 connections, {args.seconds} s a run, median of {args.rounds} "
                 "interleaved rounds. CPU is the proxy's (the upstream's for direct), per request.")
    lines.append("")
    lines.append("| scenario | target | req/s | p50 µs | p99 µs | CPU µs/req | req/s vs direct | req/s vs nginx "
                 "| CPU vs nginx |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in SCENARIOS:
        d, n = medians[name]["direct"], medians[name]["nginx"]
        for t in TARGETS:
            m = medians[name][t]
            lines.append(f"| {name} | {t} | {m['rps']:.0f} | {m['p50']:.0f} | {m['p99']:.0f} | {m['cpu_us']:.1f} "
                         f"| {m['rps'] / d['rps']:.2f} | {m['rps'] / n['rps']:.2f} | {m['cpu_us'] / n['cpu_us']:.2f} |")
    lines.append("")
    lines.append(f"Open loop: fixed rate (half the slowest target's closed-loop throughput), {args.open_seconds} s, "
                 "32 connections, latency from the time each request was due.")
    lines.append("")
    lines.append("| scenario | rate req/s | target | p50 µs | p99 µs | max µs | errors | p99 vs nginx |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in SCENARIOS:
        o = open_loop[name]
        for t in TARGETS:
            r = o[t]
            lines.append(f"| {name} | {o['rate']} | {t} | {r['p50_us']} | {r['p99_us']} | {r['max_us']} | "
                         f"{r['errors']} | {r['p99_us'] / max(o['nginx']['p99_us'], 1):.2f} |")
    lines.append("")
    mib = lambda kb: kb / 1024
    lines.append("Memory (snapguard, one worker thread):")
    lines.append("")
    lines.append("| measure | MiB |")
    lines.append("|---|---:|")
    lines.append(f"| RSS idle, after warm-up | {mib(mem['idle_rss_kb']):.1f} |")
    lines.append(f"| RSS with 1,000 keep-alive connections busy | {mib(mem['rss_1000_kb']):.1f} |")
    lines.append(f"| peak RSS over that run | {mib(mem['hwm_1000_kb']):.1f} |")
    lines.append(f"| peak RSS growth over a 1 GiB upload ({mem['upload']}) "
                 f"| {mib(mem['stream_hwm_upload_kb'] - mem['stream_hwm_before_kb']):.1f} |")
    lines.append(f"| peak RSS growth over a 1 GiB download ({mem['download']}) "
                 f"| {mib(mem['stream_hwm_download_kb'] - mem['stream_hwm_upload_kb']):.1f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--open-seconds", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "latest.md"))
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if os.cpu_count() < 2:
        sys.exit("needs two CPUs: one for the load, one for the proxy and upstream")
    ensure_tools()
    if not args.no_build:
        build()
    with tempfile.TemporaryDirectory(prefix="snapguard-bench-") as tmp:
        medians, open_loop = closed_and_open_loop(args, tmp)
        mem = memory(args, tmp)
    text = report(medians, open_loop, mem, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"closed": medians, "open": open_loop, "memory": mem}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
