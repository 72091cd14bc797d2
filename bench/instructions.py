#!/usr/bin/env python3
"""Instructions per request, counted by valgrind's callgrind: repeatable where timings are not.

    python3 bench/instructions.py [--seconds 10] [--scenarios ab]

For snapguard and for nginx (same configuration as bench/run.py), each run under
`valgrind --tool=callgrind`, it sends each chosen scenario of bench/run.py with wrk (one thread,
8 connections) and divides the user-space instructions the proxy executed by the requests it
served. Kernel work (the loopback TCP stack, about 40% of the CPU) is not counted, so the
figures compare the proxies' own code. Start-up is included and is under 1% of a run.
Needs valgrind (Debian package `valgrind`), wrk and nginx (installed by bench/run.py).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402


def callgrind(cmd, out_file):
    return subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", *cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RUST_LOG": "warn"})


def total_instructions(out_file):
    with open(out_file) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {out_file}")


def measure(target, name, upstream_port, tmp, seconds):
    method, path, body = bench.SCENARIOS[name]
    port = bench.free_port()
    out_file = os.path.join(tmp, f"callgrind.{target}.{name[0]}")
    if target == "snapguard":
        cmd = [os.path.join(bench.RELEASE, "snapguard"), "--threads", "1", "--listen", f"127.0.0.1:{port}",
               "--admin", f"127.0.0.1:{bench.free_port()}", "--upstream", f"http://127.0.0.1:{upstream_port}"]
    else:
        # bench/run.py writes the config; its nginx is stopped and this one run under valgrind.
        nginx, port = bench.start_nginx(upstream_port, tmp)
        nginx.stop()
        cmd = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", os.path.join(tmp, "nginx.conf"), "-e", os.path.join(tmp, "err.log")]
    proc = callgrind(cmd, out_file)
    try:
        bench.wait_port(port, timeout=60)
        script = bench.wrk_script(tmp, name, method, body)
        out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", "-c8", f"-d{seconds}s", "-s", script,
                              f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True).stdout
        requests = int(re.search(r"(\d+) requests in", out).group(1))
    finally:
        proc.terminate()
        proc.wait()
    return total_instructions(out_file) / max(requests, 1), requests


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--scenarios", default="ab", help="scenario letters of bench/run.py (default: ab)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="snapguard-instructions-")
    print(f"callgrind profiles (callgrind.TARGET.SCENARIO, for callgrind_annotate): {tmp}")
    upstream_port = bench.free_port()
    upstream = bench.Proc([os.path.join(bench.RELEASE, "examples", "bench_upstream"),
                           f"127.0.0.1:{upstream_port}"], cpu=1)
    try:
        bench.wait_port(upstream_port)
        print("| scenario | target | requests | instructions/request | vs nginx |")
        print("|---|---|---:|---:|---:|")
        for name in bench.SCENARIOS:
            if name[0] not in args.scenarios:
                continue
            got = {t: measure(t, name, upstream_port, tmp, args.seconds) for t in ("nginx", "snapguard")}
            for t, (per_request, requests) in got.items():
                print(f"| {name} | {t} | {requests} | {per_request:,.0f} | {per_request / got['nginx'][0]:.2f} |",
                      flush=True)
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
