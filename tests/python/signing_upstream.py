"""Helpers of test_signing_e2e.py: an upstream that verifies Huawei AK/SK signatures as API Gateway
would, with the Huawei Cloud SDK's own signer; the SDK's signer for raw client requests; and a
snapguard process with an `[upstream.signing]` config.

The verifying upstream (`VerifyingUpstream`) knows a set of cloud keys (access key -> secret key,
changeable while it runs). For every request it receives it:

* reads the whole body as it comes (Content-Length or chunked), hashing it, and keeps it when it
  is small (`KEEP_BODY` bytes); larger bodies are only counted and hashed, so memory stays flat;
* parses `Authorization: SDK-HMAC-SHA256 Access=..., SignedHeaders=..., Signature=...`, takes the
  secret of that access key, checks `X-Sdk-Date` is within 15 minutes of its clock, and gives
  `huaweicloudsdkcore.signer.signer.Signer` a request made of exactly what arrived: the method,
  the raw path, the query pairs (split on `&` and the first `=`, percent-decoded; pairs with an
  empty key dropped), the headers the signature lists (and no other), the `Host` received and
  the body. The SDK's Authorization must equal the one received (constant-time compare);
* records the request (method, path, query, headers, body or its length and SHA-256, verdict)
  and answers 200 with a small JSON body, or 401 in API Gateway's format when the signature is
  wrong, as the real gateway would.

Where the body was not kept (over `KEEP_BODY`), the SDK is handed its SHA-256, computed while the
body streamed, instead of the bytes (`_PrehashedSigner`); everything else is the SDK's code.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_SKEW_SECONDS = 15 * 60
KEEP_BODY = 1 << 20
AUTHORIZATION = re.compile(
    r"^SDK-HMAC-SHA256 Access=([^,\s]+), SignedHeaders=([a-z0-9;._-]+), Signature=([0-9a-f]{64})$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the SDK's signer ----------------------------------------------------------------------------

class _Prehashed:
    """A body that was hashed as it streamed and not kept: its length and SHA-256."""

    def __init__(self, length: int, sha256: str):
        self.length, self.sha256 = length, sha256

    def __bool__(self):
        return self.length > 0


class _PrehashedSigner(Signer):
    """The SDK's signer, given a body's SHA-256 instead of its bytes when the body was not kept."""

    def _process_hash_payload(self, request: SdkRequest) -> str:
        if isinstance(request.body, _Prehashed):
            if not request.body:
                return self._EMPTY_HASH
            declared = self._get_header_ignore_case(request, self._HEADER_CONTENT)
            return declared or request.body.sha256
        return super()._process_hash_payload(request)


def sdk_sign(ak: str, sk: str, method: str, host: str, path: str, query=(), headers=None,
             body=b"", date: str | None = None):
    """Signs a request with the SDK's signer as the SDK's clients do. Returns the target to send
    (the path and the SDK's own query encoding) and the headers to send (Host included).

    `body` may be any truthy object (an iterator of chunks) when the headers declare
    `X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD`: the SDK then never reads it."""
    header_params = dict(headers or {})
    if date is not None:
        header_params["X-Sdk-Date"] = date
    request = SdkRequest(method=method, schema="http", host=host, resource_path=path,
                         query_params=list(query), header_params=header_params, body=body)
    Signer(BasicCredentials(ak, sk)).sign(request)
    return request.uri, dict(request.header_params)


def sdk_date(at: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=timezone.utc)
    return moment.strftime(DATE_FORMAT)


# --- verification as the gateway does it ---------------------------------------------------------

@dataclass
class Verdict:
    ok: bool
    reason: str
    access_key: str | None = None
    signed_headers: list = field(default_factory=list)
    expected: str | None = None


def parse_query(raw: str) -> list[tuple[str, str]]:
    pairs = []
    for pair in raw.split("&"):
        key, _, value = pair.partition("=")
        if key:
            pairs.append((unquote(key), unquote(value)))
    return pairs


def _header_text(value: str) -> str:
    """http.server decodes header bytes as ISO-8859-1; the SDK signs the UTF-8 text."""
    try:
        return value.encode("iso-8859-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def verify(method: str, path: str, query: str, headers: list[tuple[str, str]], body,
           keys: dict[str, str], now: float | None = None) -> Verdict:
    """The gateway's check of one received request: `headers` as (name, value) pairs as they
    arrived, `body` its bytes or a `_Prehashed`."""
    now = time.time() if now is None else now

    def values(name):
        return [v for n, v in headers if n.lower() == name]

    auth = values("authorization")
    if len(auth) != 1:
        return Verdict(False, f"{len(auth)} Authorization headers")
    m = AUTHORIZATION.match(auth[0])
    if not m:
        return Verdict(False, f"malformed Authorization {auth[0][:40]!r}")
    ak, signed, _ = m.groups()
    signed_headers = signed.split(";")
    verdict = Verdict(False, "", ak, signed_headers)
    sk = keys.get(ak)
    if sk is None:
        verdict.reason = f"unknown access key {ak}"
        return verdict
    dates = values("x-sdk-date")
    if len(dates) != 1:
        verdict.reason = f"{len(dates)} X-Sdk-Date headers"
        return verdict
    try:
        signed_at = datetime.strptime(dates[0], DATE_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        verdict.reason = f"malformed X-Sdk-Date {dates[0]!r}"
        return verdict
    skew = abs(now - signed_at.timestamp())
    if skew > MAX_SKEW_SECONDS:
        verdict.reason = f"X-Sdk-Date {dates[0]} is {skew:.0f}s off"
        return verdict
    if "x-sdk-date" not in signed_headers or "host" not in signed_headers:
        verdict.reason = f"host and x-sdk-date must be signed: {signed}"
        return verdict
    header_params = {}
    for name in signed_headers:
        got = values(name)
        if len(got) != 1:
            verdict.reason = f"signed header {name} sent {len(got)} times"
            return verdict
        header_params[name] = _header_text(got[0])
    declared = header_params.get("x-sdk-content-sha256")
    actual = body.sha256 if isinstance(body, _Prehashed) else hashlib.sha256(body).hexdigest()
    if declared is not None and declared != UNSIGNED_PAYLOAD and declared != actual:
        verdict.reason = "X-Sdk-Content-Sha256 is not the body's hash"
        return verdict
    request = SdkRequest(method=method, schema="http", host=header_params["host"],
                         resource_path=path, query_params=parse_query(query),
                         header_params=header_params, body=body)
    _PrehashedSigner(BasicCredentials(ak, sk)).sign(request)
    expected = request.header_params["Authorization"]
    verdict.expected = expected
    if not hmac.compare_digest(expected.encode(), auth[0].encode()):
        verdict.reason = "signature mismatch"
        return verdict
    verdict.ok, verdict.reason = True, "ok"
    return verdict


@dataclass
class Received:
    method: str
    target: str
    path: str
    query: str
    headers: list  # (name, value) as received
    body: bytes | None  # None when over KEEP_BODY
    body_len: int
    body_sha256: str
    chunked: bool
    verdict: Verdict
    at: float
    upstream_authority: str

    def header(self, name: str) -> str | None:
        got = [v for n, v in self.headers if n.lower() == name.lower()]
        assert len(got) <= 1, (name, got)
        return got[0] if got else None

    @property
    def json(self):
        return json.loads(self.body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "verifying-upstream"

    def log_message(self, *args):  # quiet
        pass

    def _read_body(self):
        digest, kept, total = hashlib.sha256(), bytearray(), 0

        def take(data):
            nonlocal total
            digest.update(data)
            total += len(data)
            if total <= KEEP_BODY:
                kept.extend(data)

        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if chunked:
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, 1 << 20))
                    if not data:
                        raise ConnectionError("body cut short")
                    take(data)
                    remaining -= len(data)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                data = self.rfile.read(min(remaining, 1 << 20))
                if not data:
                    raise ConnectionError("body cut short")
                take(data)
                remaining -= len(data)
        body = bytes(kept) if total <= KEEP_BODY else None
        return body, total, digest.hexdigest(), chunked

    def _handle(self):
        upstream: VerifyingUpstream = self.server.upstream
        body, length, sha, chunked = self._read_body()
        path, _, query = self.path.partition("?")
        headers = list(self.headers.items())
        given = body if body is not None else _Prehashed(length, sha)
        verdict = verify(self.command, path, query, headers, given, upstream.keys_now())
        record = Received(self.command, self.path, path, query, headers, body, length, sha,
                          chunked, verdict, time.time(), upstream.authority)
        upstream.record(record)
        if verdict.ok:
            status, reply = 200, upstream.reply_for(record)
        else:
            # API Gateway's answer to a bad signature.
            status, reply = 401, {"error_msg": "Incorrect IAM authentication information: "
                                               + verdict.reason,
                                  "error_code": "APIGW.0301",
                                  "request_id": uuid.uuid4().hex}
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _handle


class VerifyingUpstream:
    """A threaded HTTP/1.1 server on 127.0.0.1 that verifies every request's signature."""

    def __init__(self):
        self._lock = threading.Lock()
        self._keys: dict[str, str] = {}
        self._records: list[Received] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.upstream = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_key(self, ak: str, sk: str):
        with self._lock:
            self._keys[ak] = sk

    def keys_now(self) -> dict[str, str]:
        with self._lock:
            return dict(self._keys)

    def record(self, r: Received):
        with self._lock:
            self._records.append(r)

    def mark(self) -> int:
        with self._lock:
            return len(self._records)

    def since(self, mark: int) -> list[Received]:
        with self._lock:
            return list(self._records[mark:])

    @staticmethod
    def reply_for(r: Received):
        """A small JSON answer: a snapshot echoing the fields sent, or a plain acknowledgement."""
        try:
            sent = json.loads(r.body) if r.body else None
        except ValueError:
            sent = None
        if isinstance(sent, dict) and isinstance(sent.get("snapshot"), dict):
            snapshot = {"id": str(uuid.uuid4()), "status": "creating", "size": 1}
            snapshot.update(sent["snapshot"])
            return {"snapshot": snapshot}
        if r.method == "GET" and r.path.endswith("/cloudsnapshots/detail"):
            return {"snapshots": [], "count": 0}
        return {"ok": True, "received": r.body_len}


# --- the client side -------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.body[:400]!r}>"


def send(port: int, method: str, target: str, headers: dict, body=b"", length: int | None = None,
         timeout: float = 60.0) -> Reply:
    """One HTTP/1.1 request to 127.0.0.1:`port`, `target` and `headers` sent exactly as given
    (Host included). `body`: bytes, or an iterable of chunks sent with Content-Length `length`
    (chunked when `length` is None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if isinstance(body, (bytes, bytearray)):
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(bytes(body) if body else None)
        elif length is not None:
            conn.putheader("Content-Length", str(length))
            conn.endheaders()
            for chunk in body:
                conn.send(chunk)
        else:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for chunk in body:
                if chunk:
                    conn.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


# --- snapguard -------------------------------------------------------------------------------

def _toml(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(str(value))  # a TOML basic string for these values
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def signing_config(listen: str, admin: str, upstream_url: str, signing: dict,
                   clients: list[dict] = (), extra: str = "") -> str:
    lines = [f"listen = {_toml(listen)}", f"admin = {_toml(admin)}", extra, "[upstream]",
             f"url = {_toml(upstream_url)}", "", "[upstream.signing]"]
    lines += [f"{k} = {_toml(v)}" for k, v in signing.items()]
    for client in clients:
        lines += ["", "[[upstream.signing.clients]]"]
        lines += [f"{k} = {_toml(v)}" for k, v in client.items()]
    return "\n".join(lines) + "\n"


class Snapguard:
    """One snapguard process with a config file, its stdout and stderr in one log file."""

    def __init__(self, binary: str, tmp: pathlib.Path, name: str, config_text: str,
                 proxy_port: int, admin_port: int, env: dict | None = None):
        self.binary, self.name = binary, name
        self.proxy_port, self.admin_port = proxy_port, admin_port
        self.config = tmp / f"{name}.toml"
        self.config.write_text(config_text)
        self.log_path = tmp / f"{name}.log"
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, deadline: float = 20.0):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SNAPGUARD_", "HUAWEICLOUD_SDK_", "RUST_LOG"))}
        env.update(self.env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([self.binary, "--config", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, start_new_session=True)
        start = time.monotonic()
        while time.monotonic() - start < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"snapguard {self.name} exited {self.proc.returncode}:\n"
                                   + self.log()[-4000:])
            with contextlib.suppress(OSError):
                if self.admin("/readyz")[0] == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"snapguard {self.name} not ready:\n" + self.log()[-4000:])

    def stop(self):
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def admin(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.status, r.read().decode()

    def metrics(self) -> str:
        return self.admin("/metrics")[1]

    def metric(self, name: str, **labels) -> float:
        """The value of one series of /metrics (0 when absent)."""
        text = self.metrics()
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(have.get(k) == str(v) for k, v in labels.items()):
                return float(m.group(3))
        return 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def peak_rss_kib(self) -> int | None:
        """VmHWM of the process, from /proc (Linux)."""
        with contextlib.suppress(OSError):
            for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return None
