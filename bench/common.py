"""What the benchmarks share (bench/run.py, and through it bench/instructions.py and bench/tls.py;
bench/attacks.py, bench/abuse.py): processes pinned to a CPU and stopped by PID, ports, a plain
GET, nginx and the HTTP/2 client's virtualenv installed when missing, cargo builds that wait out
a tree being edited, and the tree's commit."""

import ctypes
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One virtualenv for python-hyper's h2, which both scripts' HTTP/2 attackers use.
VENV = os.path.join(ROOT, "target", "benchenv")
H2_PACKAGES = ["h2==4.4.1", "hpack==4.2.0", "hyperframe==6.1.0"]
TICKS = os.sysconf("SC_CLK_TCK")

PROCS = []  # every process started here, stopped by PID on the way out


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def _die_with_parent():
    try:
        # PR_SET_PDEATHSIG = 1: the child gets SIGKILL if the script dies, however it dies.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


class Proc:
    """A process pinned to one CPU (`cpu=None`: not pinned), in its own session (a terminal's
    Ctrl-C reaches only the script, which then stops it), stopped by PID."""

    def __init__(self, cmd, cpu, env=None, stdout=None, stderr=None, stdin=subprocess.DEVNULL):
        self.name = os.path.basename(cmd[0])
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.p = subprocess.Popen([*pin, *cmd], env={**os.environ, **(env or {})}, stdin=stdin,
                                  stdout=stdout or subprocess.DEVNULL, stderr=stderr or subprocess.DEVNULL,
                                  start_new_session=True, preexec_fn=_die_with_parent)
        PROCS.append(self)

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def cpu_seconds(self):
        """utime + stime from /proc, in seconds."""
        try:
            with open(f"/proc/{self.p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / TICKS
        except OSError:
            return float("nan")

    def status_kb(self, key):
        try:
            with open(f"/proc/{self.p.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def stop(self, grace=3.0, sig=signal.SIGTERM):
        if self.p.poll() is None:
            try:
                self.p.send_signal(sig)
                self.p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self in PROCS:
            PROCS.remove(self)


def stop_all():
    for p in reversed(list(PROCS)):
        try:
            p.stop(grace=2.0)
        except Exception as e:  # keep stopping the others
            log(f"could not stop {p.name} ({p.pid}): {e}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def http_get(port, path, timeout=5.0):
    """One blocking HTTP/1.1 GET on a fresh connection: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def percentile(values, p):
    """The nearest-rank percentile of `values` (sorted here), None when there are none."""
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))
    return values[k]


def ensure_nginx():
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx:
        return nginx
    log("installing nginx-light")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx-light"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def ensure_venv():
    """The virtualenv with H2_PACKAGES, made (or remade when they changed); its python."""
    python = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, "bench-requirements.txt")
    wanted = "\n".join(H2_PACKAGES) + "\n"
    if os.path.exists(python) and os.path.exists(stamp) and open(stamp).read() == wanted:
        return python
    log(f"creating {os.path.relpath(VENV, ROOT)} with {' '.join(H2_PACKAGES)}")
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *H2_PACKAGES], check=True)
    with open(stamp, "w") as f:
        f.write(wanted)
    return python


def cargo_build(target_dir, what, retries):
    """`cargo build --release --locked WHAT` in `target_dir`, retried a minute apart (another
    session may be mid-edit); whether it built."""
    env = {**os.environ, "CARGO_TARGET_DIR": target_dir}
    for attempt in range(retries + 1):
        log(f"cargo build --release {' '.join(what)} (CARGO_TARGET_DIR={target_dir})")
        if subprocess.run(["cargo", "build", "--release", "--locked", *what], cwd=ROOT, env=env).returncode == 0:
            return True
        if attempt < retries:
            log(f"cargo build {' '.join(what)} failed (the tree may be mid-edit); retrying in 60 s")
            time.sleep(60)
    return False


def tree_state():
    """The commit checked out, and the work tree's changed or new files."""
    def git(*a):
        r = subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    commit = git("log", "-1", "--format=%h") or "unknown"
    dirty = [line for line in git("status", "--porcelain").splitlines() if line]
    return commit, dirty
