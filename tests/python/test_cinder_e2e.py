"""snapguard in front of the real cinder-api (Cinder 29, noauth, sqlite): what snapguard answers,
and what Cinder finally stored (read from Cinder's database, never through snapguard).

Where a test relies on Cinder behaving a certain way (stripping names, accepting a spelling of a
route, accepting a Content-Type), it first checks that on cinder-api directly, with a harmless name,
so a pass means something. Fixtures: cinder_api.py.
"""

import json
import re
import uuid
from dataclasses import dataclass, field

import pytest

from cinder_api import RESERVED, stack  # noqa: F401  (stack is the session fixture)

MV_367 = {"OpenStack-API-Version": "volume 3.67"}


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def assert_refused(resp, attr="name"):
    """snapguard's refusal, in Cinder's fault format."""
    assert resp.status == 400, f"expected snapguard's 400, got {resp!r}"
    try:
        body = resp.json
    except ValueError:
        pytest.fail(f"400 body is not JSON: {resp!r}")
    assert list(body) == ["badRequest"], f"not Cinder's fault format: {resp!r}"
    assert body["badRequest"].get("code") == 400, resp
    assert isinstance(body["badRequest"].get("message"), str), resp
    if attr:
        assert f"field/attribute {attr}" in body["badRequest"]["message"], resp


def assert_nothing_reserved(stack):
    rows = stack.reserved_rows()
    assert not rows, f"Cinder stored reserved names: {rows}"


def dispatched_bodies(log_text, action):
    """The bodies Cinder's wsgi layer logged (debug) for controller `action` in `log_text`."""
    pattern = re.compile(r"Action: '%s', calling method: \w+, body: (.*)$" % re.escape(action),
                         re.M)
    bodies = []
    for m in pattern.finditer(log_text):
        # The debug line goes on after the body with the logging function and file: cut there.
        try:
            bodies.append(json.JSONDecoder().raw_decode(m.group(1))[0])
        except ValueError:
            bodies.append(m.group(1))
    return bodies


@pytest.fixture
def snap(stack):
    """An available seeded snapshot of the test's own."""
    return stack.take_snapshot()


# --- 1, 2: legitimate updates ----------------------------------------------------------------

def test_update_name_and_description(stack, snap):
    resp = stack.proxy("PUT", f"/v3/{stack.project}/snapshots/{snap}",
                       {"snapshot": {"name": "nightly-1", "description": "d"}})
    assert resp.status == 200, resp
    assert resp.json["snapshot"]["name"] == "nightly-1", resp
    row = stack.snapshot(snap)
    assert (row["display_name"], row["display_description"]) == ("nightly-1", "d"), row


def test_update_display_name_is_normalized_to_name(stack, snap):
    offset = stack.cinder_log_size()
    resp = stack.proxy("PUT", f"/v3/{stack.project}/snapshots/{snap}",
                       {"snapshot": {"display_name": "legacy"}})
    assert resp.status == 200, resp
    assert stack.stored_name(snap) == "legacy"
    # What Cinder received (it logs the body it dispatches): `name`, not `display_name`.
    bodies = dispatched_bodies(stack.cinder_log_since(offset), "update")
    assert len(bodies) == 1, f"expected one update dispatched by Cinder, its log had: {bodies}"
    assert bodies[0] == {"snapshot": {"name": "legacy"}}, bodies[0]


# --- 3: reserved names on update --------------------------------------------------------------

def test_cinder_strips_names_as_python_does(stack, snap):
    """Why a reserved name behind whitespace counts: Cinder stores it stripped (checked with a
    harmless name, directly)."""
    resp = stack.cinder("PUT", f"/v3/{stack.project}/snapshots/{snap}",
                        {"snapshot": {"name": "\u3000 stripped-by-cinder\t"}})
    assert resp.status == 200, resp
    assert stack.stored_name(snap) == "stripped-by-cinder"


@pytest.mark.parametrize("name", ["autobk_snapshot_x", "  autobk_snapshot_x",
                                  "\u3000autobk_snapshot_x"],
                         ids=["plain", "spaces", "ideographic-space"])
@pytest.mark.parametrize("key", ["name", "display_name"])
def test_update_reserved_name_refused(stack, snap, name, key):
    before = stack.stored_name(snap)
    resp = stack.proxy("PUT", f"/v3/{stack.project}/snapshots/{snap}",
                       {"snapshot": {key: name, "description": "x"}})
    assert_refused(resp, attr=None)
    assert RESERVED in resp.json["badRequest"]["message"], resp
    row = stack.snapshot(snap)
    assert (row["display_name"], row["display_description"]) == (before, "seeded"), row
    assert_nothing_reserved(stack)


# --- 4: 255 bytes ------------------------------------------------------------------------------

LONG_OK = [("ascii-255", "a" * 255), ("cjk-85x3", "快" * 85)]
LONG_BAD = [("ascii-256", "a" * 256), ("cjk-85x3+1", "快" * 85 + "a"), ("e-acute-128", "é" * 128)]


@pytest.mark.parametrize("value", [v for _, v in LONG_OK], ids=[i for i, _ in LONG_OK])
def test_update_255_bytes_stored(stack, snap, value):
    resp = stack.proxy("PUT", f"/v3/{stack.project}/snapshots/{snap}",
                       {"snapshot": {"name": value, "description": value}})
    assert resp.status == 200, resp
    row = stack.snapshot(snap)
    assert (row["display_name"], row["display_description"]) == (value, value)


@pytest.mark.parametrize("value", [v for _, v in LONG_BAD], ids=[i for i, _ in LONG_BAD])
@pytest.mark.parametrize("key", ["name", "description"])
def test_update_over_255_bytes_refused(stack, snap, value, key):
    before = stack.snapshot(snap)
    resp = stack.proxy("PUT", f"/v3/{stack.project}/snapshots/{snap}",
                       {"snapshot": {key: value}})
    assert_refused(resp, attr=key)
    after = stack.snapshot(snap)
    assert (after["display_name"], after["display_description"]) == (
        before["display_name"], before["display_description"]), after


def test_cinder_itself_accepts_multibyte_names_over_255_bytes(stack, snap):
    """Cinder counts characters: 86 characters / 256 bytes go straight in (so the refusals above
    are snapguard's, not Cinder's)."""
    value = "快" * 85 + "a"
    resp = stack.cinder("PUT", f"/v3/{stack.project}/snapshots/{snap}",
                        {"snapshot": {"name": value}})
    assert resp.status == 200, resp
    assert stack.stored_name(snap) == value


# --- 5: create -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["autobk_snapshot_x", "  autobk_snapshot_x",
                                  "\u3000autobk_snapshot_x"],
                         ids=["plain", "spaces", "ideographic-space"])
def test_create_reserved_name_refused(stack, name):
    before = stack.snapshot_ids()
    resp = stack.proxy("POST", f"/v3/{stack.project}/snapshots",
                       {"snapshot": {"name": name, "volume_id": stack.seed["volume_id"]}})
    assert_refused(resp, attr=None)
    assert stack.snapshot_ids() == before, "a snapshot row was created"
    assert_nothing_reserved(stack)


def test_create_good_name_stored(stack):
    name = unique("nightly")
    resp = stack.proxy("POST", f"/v3/{stack.project}/snapshots",
                       {"snapshot": {"display_name": name, "description": "d",
                                     "volume_id": stack.seed["volume_id"]}})
    assert resp.status == 202, resp
    created = resp.json["snapshot"]["id"]
    row = stack.snapshot(created)
    assert row is not None, f"Cinder answered 202 but has no row {created}"
    assert (row["display_name"], row["display_description"]) == (name, "d"), row


# --- 6: project-less URLs (3.67) ------------------------------------------------------------

def test_projectless_update_allowed(stack, snap):
    resp = stack.proxy("PUT", f"/v3/snapshots/{snap}", {"snapshot": {"name": "no-project"}},
                       MV_367)
    assert resp.status == 200, resp
    assert stack.stored_name(snap) == "no-project"


def test_projectless_update_refused(stack, snap):
    before = stack.stored_name(snap)
    resp = stack.proxy("PUT", f"/v3/snapshots/{snap}",
                       {"snapshot": {"name": "autobk_snapshot_x"}}, MV_367)
    assert_refused(resp, attr="name")
    assert stack.stored_name(snap) == before


def test_projectless_create_allowed(stack):
    name = unique("no-project")
    resp = stack.proxy("POST", "/v3/snapshots",
                       {"snapshot": {"name": name, "volume_id": stack.seed["volume_id"]}},
                       MV_367)
    assert resp.status == 202, resp
    assert [r["id"] for r in stack.snapshots_named(name)] == [resp.json["snapshot"]["id"]]


def test_projectless_create_refused(stack):
    before = stack.snapshot_ids()
    resp = stack.proxy("POST", "/v3/snapshots",
                       {"snapshot": {"name": "autobk_snapshot_x",
                                     "volume_id": stack.seed["volume_id"]}}, MV_367)
    assert_refused(resp, attr="name")
    assert stack.snapshot_ids() == before
    assert_nothing_reserved(stack)


# --- 7: spellings real Cinder's router dispatches to the snapshot actions ----------------------

@dataclass
class Spelling:
    id: str
    method: str
    target: str  # {p}: project, {s}: snapshot
    action: str  # the controller action Cinder dispatches it to
    body: object  # callable(stack, name) -> request body
    # How a direct request with a harmless name shows it reached the action: "stored" (the name is
    # in the database afterwards) or "update-404" (the update action ran, and looked the snapshot
    # id up with the trailing newline still in it).
    direct: str = "stored"
    headers: dict = field(default_factory=dict)


def create_body(stack, name):
    return {"snapshot": {"name": name, "volume_id": stack.seed["volume_id"]}}


def update_body(stack, name):
    return {"snapshot": {"name": name}}


def manage_body(stack, name):
    return {"snapshot": {"name": name, "volume_id": stack.seed["volume_id"],
                         "ref": {"source-name": unique("lv")}}}


def cgsnapshot_body(stack, name):
    return {"cgsnapshot": {"name": name, "consistencygroup_id": stack.seed["group_id"]}}


SPELLINGS = [
    Spelling("create-newline", "POST", "/v3/{p}/snapshots%0A", "create", create_body),
    Spelling("update-newline", "PUT", "/v3/{p}/snapshots/{s}%0A", "update", update_body,
             direct="update-404"),
    Spelling("update-json-newline", "PUT", "/v3/{p}/snapshots/{s}.json%0A", "update",
             update_body),
    Spelling("get-method-long-s", "GET", "/v3/{p}/snapshots?_method=po%C5%BFt", "create",
             create_body),
    Spelling("manage-projectless", "POST", "/v3/os-snapshot-manage", "create", manage_body),
    Spelling("manage-projectless-json", "POST", "/v3/os-snapshot-manage.json", "create",
             manage_body),
    Spelling("cgsnapshot-projectless", "POST", "/v3/cgsnapshots", "create", cgsnapshot_body),
]


def stored_anywhere(stack, name):
    return stack.snapshots_named(name) + stack.group_snapshots_named(name)


@pytest.mark.parametrize("spelling", SPELLINGS, ids=[s.id for s in SPELLINGS])
def test_cinder_dispatches_spelling_to_action(stack, spelling):
    """Directly to cinder-api, with a harmless name: the spelling really reaches the action."""
    snap = stack.take_snapshot()
    target = spelling.target.format(p=stack.project, s=snap)
    name = unique("probe")
    offset = stack.cinder_log_size()
    resp = stack.cinder(spelling.method, target, spelling.body(stack, name), spelling.headers)
    bodies = dispatched_bodies(stack.cinder_log_since(offset), spelling.action)
    assert any(name in json.dumps(b) for b in bodies), (
        f"Cinder did not dispatch {spelling.method} {target} to '{spelling.action}': {resp!r}")
    if spelling.direct == "stored":
        assert resp.status in (200, 202), resp
        assert stored_anywhere(stack, name), f"{resp!r} but nothing named {name} is stored"
    else:
        assert resp.status == 404, resp
        assert f"Snapshot {snap}\\n could not be found" in resp.body.decode(), resp


@pytest.mark.parametrize("spelling", SPELLINGS, ids=[s.id for s in SPELLINGS])
def test_spelling_with_reserved_name_refused(stack, spelling):
    snap = stack.take_snapshot()
    before_name = stack.stored_name(snap)
    before_snaps, before_groups = stack.snapshot_ids(), stack.group_snapshot_ids()
    target = spelling.target.format(p=stack.project, s=snap)
    name = RESERVED + uuid.uuid4().hex[:10]
    offset = stack.cinder_log_size()
    resp = stack.proxy(spelling.method, target, spelling.body(stack, name), spelling.headers)

    stored = stored_anywhere(stack, name)
    reached = [b for b in dispatched_bodies(stack.cinder_log_since(offset), spelling.action)
               if name in json.dumps(b)]
    assert not stored, f"Cinder stored the reserved name via {resp!r}: {stored}"
    assert stack.stored_name(snap) == before_name
    assert stack.snapshot_ids() == before_snaps and stack.group_snapshot_ids() == before_groups, (
        f"new rows after {resp!r}")
    assert_refused(resp, attr=None)
    assert not reached, f"snapguard answered 400 but Cinder's controller also ran: {reached}"


# --- 8: Content-Type with parameters ---------------------------------------------------------

CONTENT_TYPES = ['application/json; profile="a;b"', "application/json; charset=UTF-8"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES, ids=["profile-quoted-semicolon",
                                                           "charset-utf8"])
def test_content_type_with_parameters(stack, content_type):
    direct_snap, proxied_snap = stack.take_snapshot(), stack.take_snapshot()
    headers = {"Content-Type": content_type}
    direct = stack.cinder("PUT", f"/v3/{stack.project}/snapshots/{direct_snap}",
                          {"snapshot": {"name": "typed-direct"}}, headers)
    assert direct.status == 200, f"Cinder itself refused it: {direct!r}"
    assert stack.stored_name(direct_snap) == "typed-direct"

    resp = stack.proxy("PUT", f"/v3/{stack.project}/snapshots/{proxied_snap}",
                       {"snapshot": {"name": "typed-proxied"}}, headers)
    assert resp.status == 200, resp
    assert stack.stored_name(proxied_snap) == "typed-proxied"


def test_content_type_with_parameters_reserved_still_refused(stack, snap):
    before = stack.stored_name(snap)
    resp = stack.proxy("PUT", f"/v3/{stack.project}/snapshots/{snap}",
                       {"snapshot": {"name": "autobk_snapshot_x"}},
                       {"Content-Type": CONTENT_TYPES[0]})
    assert_refused(resp, attr=None)
    assert stack.stored_name(snap) == before


# --- last: the whole session ----------------------------------------------------------------

def test_zz_no_reserved_name_stored_in_the_session(stack):
    assert_nothing_reserved(stack)
