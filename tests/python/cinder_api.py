"""Real cinder-api with snapguard in front of it, for the end-to-end tests (test_cinder_e2e.py).

The session fixture `stack`:
- writes a cinder.conf in a temp dir (noauth, fake:/ messaging, no backends, sqlite database),
  runs `cinder-manage db sync`, and seeds through Cinder's own objects/db API (in a subprocess
  with the same config): a cinder-volume service row that stays "up", a volume (available, on that
  service's host) to snapshot and to manage snapshots of, a consistency group holding a second
  volume (for cgsnapshots), a pool of available snapshot rows to update, unlimited quotas;
- starts `cinder-api` (one worker) on a free loopback port and waits until GET / answers;
- starts snapguard (`$SNAPGUARD_BIN`, built-in defaults, no config file) in front of it and
  waits until its admin /readyz answers;
- stops both at the end (their whole process groups, which only they are in).

With `transport_url = fake:/` the RPC casts to the scheduler and volume services go nowhere: a
created snapshot stays "creating", which is all these tests need (the row, with its name, is
written before the cast).

What Cinder stored is read from its sqlite file directly, never through snapguard.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pathlib
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import pytest

from conftest import snapguard_bin

RESERVED = "autobk_snapshot_"
VENV_BIN = pathlib.Path(sys.executable).parent
SNAPSHOT_POOL = 40

# Run by the venv's python with: <cinder.conf> <project_id> <user_id> <pool size>. Prints one JSON
# line with the ids it created.
SEED = r"""
import datetime, json, sys
from oslo_config import cfg
from cinder import context, objects
from cinder.common import constants
from cinder.db import api as db
objects.register_all()
cfg.CONF([], project="cinder", default_config_files=[sys.argv[1]])
from cinder.objects import base as obj_base
from cinder.volume import rpcapi as volume_rpcapi
from cinder.volume import volume_types

project, user, pool = sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = context.RequestContext(user, project, is_admin=True)
vtype = volume_types.get_default_volume_type(ctx)
backend = "snapguard-e2e@fake"
host = backend + "#pool"

# Unlimited quotas for this project (the default class allows 10 snapshots).
for resource in ("snapshots", "gigabytes", "volumes", "groups"):
    db.quota_create(ctx, project, resource, -1)

# os-snapshot-manage needs a cinder-volume service on the volume's host that is enabled and "up":
# up means a heartbeat newer than service_down_time, so date it far in the future.
service = objects.Service(
    ctx, host=backend, binary=constants.VOLUME_BINARY, topic=constants.VOLUME_TOPIC,
    report_count=1, disabled=False, availability_zone="nova",
    rpc_current_version=volume_rpcapi.VolumeAPI.RPC_API_VERSION,
    object_current_version=obj_base.OBJ_VERSIONS.get_current())
service.create()
db.service_update(ctx, service.id, {"updated_at": datetime.datetime(2099, 1, 1)})

# cgsnapshots snapshot every volume of a (consistency) group.
group_type = db.group_type_create(ctx, {"name": "snapguard-e2e-cg", "description": "e2e"})
group = objects.Group(
    ctx, user_id=user, project_id=project, host=host, availability_zone="nova",
    name="e2e-group", group_type_id=group_type["id"], volume_type_ids=[vtype["id"]],
    status="available")
group.create()

def volume(**kwargs):
    v = objects.Volume(
        ctx, user_id=user, project_id=project, size=1, status="available",
        attach_status="detached", host=host, availability_zone="nova",
        volume_type_id=vtype["id"], display_name="e2e-volume", **kwargs)
    v.create()
    return v

plain = volume()
member = volume(group_id=group.id)

snapshots = []
for i in range(pool):
    s = objects.Snapshot(
        ctx, user_id=user, project_id=project, volume_id=plain.id, status="available",
        progress="100%", volume_size=1, display_name="seeded-%d" % i,
        display_description="seeded", volume_type_id=vtype["id"])
    s.create()
    snapshots.append(s.id)

print(json.dumps({"volume_id": plain.id, "group_volume_id": member.id,
                  "group_id": group.id, "snapshots": snapshots}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Response:
    method: str
    target: str
    status: int
    headers: dict
    body: bytes
    via: str

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        text = self.body.decode("utf-8", "replace")
        if len(text) > 600:
            text = text[:600] + "..."
        return f"<{self.via}: {self.method} {self.target} -> {self.status} {text}>"


def request(port, method, target, body=None, headers=None, via="", timeout=30.0) -> Response:
    """One HTTP/1.1 request with `target` sent as is (no re-quoting). `body`: dict (sent as JSON),
    str/bytes (sent as is), or None."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        sent = {k.lower() for k in (headers or {})}
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None and "content-type" not in sent:
            conn.putheader("Content-Type", "application/json")
        if "accept" not in sent:
            conn.putheader("Accept", "application/json")
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(method, target, resp.status,
                        {k.lower(): v for k, v in resp.getheaders()}, data, via)
    finally:
        conn.close()


@dataclass
class Stack:
    tmp: pathlib.Path
    conf: pathlib.Path
    db_path: pathlib.Path
    project: str
    user: str
    cinder_port: int
    proxy_port: int
    admin_port: int
    cinder_log: pathlib.Path
    snapguard_log: pathlib.Path
    seed: dict = field(default_factory=dict)
    _pool: list = field(default_factory=list)

    # --- HTTP -----------------------------------------------------------------------------
    def auth(self, headers=None):
        h = {"X-Auth-Token": f"{self.user}:{self.project}"}
        h.update(headers or {})
        return h

    def cinder(self, method, target, body=None, headers=None) -> Response:
        """Straight to cinder-api, bypassing snapguard."""
        return request(self.cinder_port, method, target, body, self.auth(headers), via="cinder")

    def proxy(self, method, target, body=None, headers=None) -> Response:
        """Through snapguard."""
        return request(self.proxy_port, method, target, body, self.auth(headers), via="snapguard")

    # --- what Cinder stored ---------------------------------------------------------------
    def _query(self, sql, args=()):
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=10)) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, args).fetchall()]

    def snapshot(self, snapshot_id) -> dict | None:
        rows = self._query("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,))
        return rows[0] if rows else None

    def stored_name(self, snapshot_id):
        row = self.snapshot(snapshot_id)
        assert row is not None, f"snapshot {snapshot_id} not in Cinder's database"
        return row["display_name"]

    def snapshot_ids(self) -> set:
        return {r["id"] for r in self._query("SELECT id FROM snapshots")}

    def group_snapshot_ids(self) -> set:
        return {r["id"] for r in self._query("SELECT id FROM group_snapshots")}

    def snapshots_named(self, name) -> list:
        return self._query("SELECT id, display_name, status FROM snapshots WHERE display_name = ?",
                           (name,))

    def group_snapshots_named(self, name) -> list:
        return self._query("SELECT id, name, status FROM group_snapshots WHERE name = ?", (name,))

    def reserved_rows(self) -> list:
        """Every stored snapshot or group snapshot whose name contains the reserved prefix."""
        like = "%" + RESERVED.replace("_", r"\_") + "%"
        return (self._query("SELECT 'snapshots' AS tbl, id, display_name AS name FROM snapshots "
                            "WHERE display_name LIKE ? ESCAPE '\\'", (like,))
                + self._query("SELECT 'group_snapshots' AS tbl, id, name FROM group_snapshots "
                              "WHERE name LIKE ? ESCAPE '\\'", (like,)))

    # --- fixtures' helpers ----------------------------------------------------------------
    def take_snapshot(self) -> str:
        """An available seeded snapshot no other test has touched."""
        if self._pool:
            return self._pool.pop()
        created = self.cinder("POST", f"/v3/{self.project}/snapshots",
                              {"snapshot": {"name": "pool-" + uuid.uuid4().hex[:8],
                                            "volume_id": self.seed["volume_id"]}})
        assert created.status == 202, created
        return created.json["snapshot"]["id"]

    def cinder_log_size(self) -> int:
        return self.cinder_log.stat().st_size

    def cinder_log_since(self, offset) -> str:
        with open(self.cinder_log, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")


def _write_conf(tmp: pathlib.Path, port: int) -> pathlib.Path:
    paste = VENV_BIN.parent / "etc" / "cinder" / "api-paste.ini"
    if not paste.is_file():
        raise RuntimeError(f"no api-paste.ini at {paste}: is {sys.executable} the venv of "
                           "tests/python/setup.sh?")
    (tmp / "lock").mkdir()
    conf = tmp / "cinder.conf"
    conf.write_text(f"""[DEFAULT]
auth_strategy = noauth
transport_url = fake:/
enabled_backends =
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {port}
osapi_volume_workers = 1
api_paste_config = {paste}
state_path = {tmp}
# debug: Cinder then logs each request body it dispatches ("Action: ..., body: ...").
debug = true
use_stderr = true

[database]
connection = sqlite:///{tmp}/cinder.sqlite

[oslo_concurrency]
lock_path = {tmp}/lock
""")
    return conf


def _run(args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def _stop(proc: subprocess.Popen | None):
    """Ends `proc` and its process group (started with start_new_session, so only its own)."""
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
    # cinder-api's worker is in the same group; make sure none is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait(what, proc, probe, log, deadline=60.0):
    start = time.monotonic()
    last = None
    while time.monotonic() - start < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} before it was ready:\n"
                               + log.read_text(errors="replace")[-4000:])
        try:
            if probe():
                return
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {deadline}s ({last}):\n"
                       + log.read_text(errors="replace")[-4000:])


def require_cinder_api():
    """cinder-api and cinder-manage of the venv the tests run in."""
    cinder_api, cinder_manage = VENV_BIN / "cinder-api", VENV_BIN / "cinder-manage"
    if not cinder_api.exists():
        raise RuntimeError(f"no cinder-api beside {sys.executable}: run the tests with the python "
                           "that tests/python/setup.sh prints")
    return cinder_api, cinder_manage


@contextlib.contextmanager
def running(st, snapguard_cmd, seeded):
    """Seeds `st`'s Cinder database with `seeded` snapshots, starts cinder-api and then
    snapguard (`snapguard_cmd`, its environment cleared of SNAPGUARD_* settings), yields once
    both are ready, and stops both. `st.tmp` (cinder.conf, the database, both logs) is removed
    afterwards unless SNAPGUARD_E2E_KEEP is set."""
    cinder_api, cinder_manage = require_cinder_api()
    _run([str(cinder_manage), "--config-file", str(st.conf), "db", "sync"])
    seeded_out = _run([sys.executable, "-c", SEED, str(st.conf), st.project, st.user, str(seeded)])
    st.seed = json.loads(seeded_out.stdout.strip().splitlines()[-1])
    st._pool = list(st.seed["snapshots"])

    cinder = snapguard = None
    try:
        with open(st.cinder_log, "wb") as log:
            cinder = subprocess.Popen([str(cinder_api), "--config-file", str(st.conf)],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      start_new_session=True)
        _wait("cinder-api", cinder,
              lambda: request(st.cinder_port, "GET", "/", timeout=2).status == 300, st.cinder_log)

        env = {k: v for k, v in os.environ.items()
               if k not in ("SNAPGUARD_CONFIG", "SNAPGUARD_LISTEN", "SNAPGUARD_UPSTREAM",
                            "SNAPGUARD_ADMIN")}
        with open(st.snapguard_log, "wb") as log:
            snapguard = subprocess.Popen(snapguard_cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=env, start_new_session=True)
        # The admin listener is plain HTTP, TLS or not.
        _wait("snapguard", snapguard,
              lambda: request(st.admin_port, "GET", "/readyz", timeout=2).status == 200,
              st.snapguard_log, deadline=20)
        yield st
    finally:
        _stop(snapguard)
        _stop(cinder)
        if os.environ.get("SNAPGUARD_E2E_KEEP"):
            print(f"\nkept {st.tmp}")
        else:
            import shutil
            shutil.rmtree(st.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def stack():
    require_cinder_api()
    sg = snapguard_bin()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="snapguard-cinder-e2e-"))
    cinder_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    conf = _write_conf(tmp, cinder_port)
    st = Stack(tmp=tmp, conf=conf, db_path=tmp / "cinder.sqlite",
               project=uuid.uuid4().hex, user="e2e-user",
               cinder_port=cinder_port, proxy_port=proxy_port, admin_port=admin_port,
               cinder_log=tmp / "cinder-api.log", snapguard_log=tmp / "snapguard.log")
    cmd = [sg, "--listen", f"127.0.0.1:{proxy_port}", "--admin", f"127.0.0.1:{admin_port}",
           "--upstream", f"http://127.0.0.1:{cinder_port}"]
    with running(st, cmd, SNAPSHOT_POOL):
        yield st
