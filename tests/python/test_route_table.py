"""Cinder's route table against snapguard's default route table.

Walks the mapper of Cinder's real v3 APIRouter (cinder_router.py builds it from the installed
api-paste.ini): every route, with its method condition, path and requirements, controller class and
action. The controller methods that set a snapshot's name or description are derived from the JSON
schemas they validate their body against (cinder_router.name_setting_methods); this file pins that
derivation to a commented list, requires every snapshot-related route to lead either to one of them
or to a method listed below as known not to set a name, and checks that snapguard's default table
refuses a reserved name sent to a concrete instance of every name-setting route (hex project id and
project-less, bare and `.json`), and lets an ordinary name through.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import check_batch

import cinder_router

pytestmark = pytest.mark.filterwarnings("ignore")  # eventlet's, oslo's and jsonschema's deprecations

RESERVED_NAME = "autobk_snapshot_x"
ORDINARY_NAME = "nightly-1"
PROJECT_ID = "0123456789abcdef0123456789abcdef"
RESOURCE_ID = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b"

# A variable of a Routes path: {name}, {name:regex}, :(name), :name, *name.
TEMPLATE_VAR = re.compile(r"\{(\w+)(?::[^}]*)?\}|:\((\w+)\)|:(\w+)|\*(\w+)")

V3 = "cinder.api.v3."
CONTRIB = "cinder.api.contrib."

# The controller methods that set a snapshot's name or description, with the body root and fields
# their schema accepts. Kept by hand only to notice when the schema-derived set changes.
EXPECTED_NAME_SETTING = {
    # POST /v3/{project_id}/snapshots: "name" (or "display_name") and "description" of the new
    # snapshot.
    V3 + "snapshots.SnapshotsController.create":
        {"snapshot": ["name", "display_name", "description"]},
    # PUT /v3/{project_id}/snapshots/{id}: renames (name/display_name) or re-describes.
    V3 + "snapshots.SnapshotsController.update":
        {"snapshot": ["name", "display_name", "description", "display_description"]},
    # POST /v3/{project_id}/manageable_snapshots (3.8+): adopts a backend snapshot under a name.
    V3 + "snapshot_manage.SnapshotManageController.create": {"snapshot": ["name", "description"]},
    # POST /v3/{project_id}/os-snapshot-manage: the older extension doing the same.
    CONTRIB + "snapshot_manage.SnapshotManageController.create":
        {"snapshot": ["name", "description"]},
    # POST /v3/{project_id}/group_snapshots (3.14+): the group snapshot's name, which Cinder also
    # gives to the snapshot of every volume of the group.
    V3 + "group_snapshots.GroupSnapshotsController.create":
        {"group_snapshot": ["name", "description"]},
    # POST /v3/{project_id}/cgsnapshots: the consistency-group snapshot, the same through the old
    # API (it calls the group snapshot API).
    CONTRIB + "cgsnapshots.CgsnapshotsController.create": {"cgsnapshot": ["name", "description"]},
}

# Methods reachable from snapshot-related routes that set no snapshot name or description, and why.
# A route to a snapshot-related method in neither list fails test_every_snapshot_route_is_known.
KNOWN_NOT_NAME_SETTING = {
    # Reads and deletes of snapshots.
    V3 + "snapshots.SnapshotsController.index": "list",
    V3 + "snapshots.SnapshotsController.detail": "list",
    V3 + "snapshots.SnapshotsController.show": "read",
    V3 + "snapshots.SnapshotsController.delete": "delete",
    # POST /snapshots/{id}/action: the wsgi action is picked by the body's key.
    CONTRIB + "admin_actions.SnapshotAdminController._reset_status":
        "os-reset_status: status only (schema: os-reset_status.status)",
    CONTRIB + "admin_actions.SnapshotAdminController._force_delete": "os-force_delete: delete",
    CONTRIB + "snapshot_actions.SnapshotActionsController._update_snapshot_status":
        "os-update_snapshot_status: status and progress only",
    CONTRIB + "snapshot_unmanage.SnapshotUnmanageController.unmanage": "os-unmanage: forget",
    # Snapshot metadata: key/value pairs of their own, not the snapshot's name or description.
    V3 + "snapshot_metadata.SnapshotMetadataController.index": "metadata list",
    V3 + "snapshot_metadata.SnapshotMetadataController.show": "metadata read",
    V3 + "snapshot_metadata.SnapshotMetadataController.create": "metadata (body root 'metadata')",
    V3 + "snapshot_metadata.SnapshotMetadataController.update": "metadata (body root 'meta')",
    V3 + "snapshot_metadata.SnapshotMetadataController.update_all":
        "metadata (body root 'metadata')",
    V3 + "snapshot_metadata.SnapshotMetadataController.delete": "metadata delete",
    # Listing the backend's manageable snapshots.
    V3 + "snapshot_manage.SnapshotManageController.index": "list",
    V3 + "snapshot_manage.SnapshotManageController.detail": "list",
    CONTRIB + "snapshot_manage.SnapshotManageController.index": "list",
    CONTRIB + "snapshot_manage.SnapshotManageController.detail": "list",
    # Group snapshots: no update method exists (PUT answers 400 "no such action"); reset_status is
    # the only wsgi action (POST /group_snapshots/{id}/action), status only.
    V3 + "group_snapshots.GroupSnapshotsController.index": "list",
    V3 + "group_snapshots.GroupSnapshotsController.detail": "list",
    V3 + "group_snapshots.GroupSnapshotsController.show": "read",
    V3 + "group_snapshots.GroupSnapshotsController.delete": "delete",
    V3 + "group_snapshots.GroupSnapshotsController.reset_status":
        "reset_status: status only (schema: reset_status.status)",
    # Consistency-group snapshots: no update method.
    CONTRIB + "cgsnapshots.CgsnapshotsController.index": "list",
    CONTRIB + "cgsnapshots.CgsnapshotsController.detail": "list",
    CONTRIB + "cgsnapshots.CgsnapshotsController.show": "read",
    CONTRIB + "cgsnapshots.CgsnapshotsController.delete": "delete",
}


@pytest.fixture(scope="module")
def router():
    return cinder_router.CinderRouter.get()


@pytest.fixture(scope="module")
def name_setting(router):
    return cinder_router.name_setting_methods(router)


def _route_targets(info):
    """The method ids a route can make Cinder call (as Resource.get_method resolves them), or []
    when the controller has no such method and no wsgi-action fallback applies (Cinder answers 404
    or 400 without calling anything)."""
    res = info.resource
    ctrl = res.controller
    if ctrl is not None and cinder_router.method_functions(ctrl, info.action):
        return [f"{info.controller}.{info.action}"]
    if info.action == "action":
        targets = []
        for key in res.wsgi_actions:
            owner = cinder_router._wsgi_action_owner(res, key)
            targets.append(f"{cinder_router._class_name(owner)}.{owner.wsgi_actions[key]}")
        return targets
    if info.action in ("create", "update", "delete") and info.action in res.wsgi_actions:
        owner = cinder_router._wsgi_action_owner(res, info.action)
        return [f"{cinder_router._class_name(owner)}.{owner.wsgi_actions[info.action]}"]
    return []


def _snapshot_related(info):
    return "snapshot" in info.path.lower() or "snapshot" in (info.controller or "").lower()


def _name_setting_routes(router, name_setting):
    out = []
    for info in router.routes():
        if info.resource is None:
            continue
        targets = [t for t in _route_targets(info) if t in name_setting]
        if targets:
            assert len(targets) == 1, (info, targets)
            out.append((info, targets[0]))
    return out


def _instance(info):
    """A concrete request target for a route: hex project id, a UUID for every other variable."""
    def fill(m):
        name = next(g for g in m.groups() if g)
        if name == "project_id":
            return PROJECT_ID
        if name == "format":
            return "json"
        return RESOURCE_ID
    return "/v3" + TEMPLATE_VAR.sub(fill, info.path)


def test_name_setting_methods_match_the_known_list(name_setting):
    lines = [f"  {m}: {roots}" for m, roots in sorted(name_setting.items())]
    print("name-setting controller methods (from their JSON schemas):\n" + "\n".join(lines),
          file=sys.stderr)
    assert name_setting == EXPECTED_NAME_SETTING, (
        "the controller methods whose schema takes a snapshot name/description changed: "
        f"new {sorted(set(name_setting) - set(EXPECTED_NAME_SETTING))}, gone "
        f"{sorted(set(EXPECTED_NAME_SETTING) - set(name_setting))}, or their fields changed")


def test_every_snapshot_route_is_known(router, name_setting):
    unknown = []
    checked = 0
    for info in router.routes():
        if info.resource is None or not _snapshot_related(info):
            continue
        checked += 1
        for target in _route_targets(info):
            if target not in name_setting and target not in KNOWN_NOT_NAME_SETTING:
                unknown.append(f"{info.methods} {info.path} -> {target}")
    assert checked > 100, checked
    assert not unknown, (
        "routes to snapshot-related controller methods this test does not know (decide whether "
        "they set a snapshot name, then list them):\n  " + "\n  ".join(sorted(set(unknown))))


def test_known_lists_are_not_stale(router, name_setting):
    reachable = {t for info in router.routes() if info.resource is not None
                 for t in _route_targets(info)}
    stale = sorted(set(KNOWN_NOT_NAME_SETTING) - reachable)
    assert not stale, f"methods listed as known that no route reaches any more: {stale}"


def test_name_setting_routes_have_every_variant(router, name_setting):
    """Cinder routes each name-setting method with and without project id, bare and `.json`."""
    variants = {}
    for info, target in _name_setting_routes(router, name_setting):
        key = ("{project_id" in info.path, ".:(format)" in info.path)
        variants.setdefault((target, tuple(info.methods or ())), set()).add(key)
    lines = []
    for info, target in _name_setting_routes(router, name_setting):
        lines.append(f"  {'/'.join(info.methods or ('*',)):4} /v3{info.path}  "
                     f"requirements={info.requirements} -> {target}")
    print("name-setting routes of Cinder's mapper:\n" + "\n".join(lines), file=sys.stderr)
    assert set(t for t, _ in variants) == set(name_setting)
    for key, seen in variants.items():
        assert seen == {(True, False), (True, True), (False, False), (False, True)}, (key, seen)


def test_default_table_polices_every_name_setting_route(router, name_setting):
    cases = []
    for info, target in _name_setting_routes(router, name_setting):
        target_path = _instance(info)
        for method in info.methods:
            for root, fields in name_setting[target].items():
                for field in [f for f in fields if "name" in f]:
                    cases.append((method, target_path, target, root, field))
    assert cases
    requests, expect = [], []
    for method, path, target, root, field in cases:
        headers = [["X-Auth-Token", "admin:admin"], ["Content-Type", "application/json"]]
        for name, outcome in ((RESERVED_NAME, "refuse"), (ORDINARY_NAME, "forward")):
            body = json.dumps({root: {field: name}})
            routed = router.route(method, path, headers, body)
            assert routed.target == target, (method, path, routed)
            requests.append({"method": method, "target": path, "headers": headers, "body": body})
            expect.append((outcome, method, path, target, field))
    verdicts = check_batch(requests)
    wrong = []
    for (outcome, method, path, target, field), verdict in zip(expect, verdicts):
        if outcome == "refuse":
            ok = (verdict["decision"] == "rejected" and verdict["rule"] == "reserved_prefix")
        else:
            ok = verdict["decision"] != "rejected" and verdict["decision"] != "invalid"
        if not ok:
            wrong.append(f"{method} {path} ({target}, {field}, expected {outcome}): {verdict}")
    print(f"route table: {len(requests)} requests checked", file=sys.stderr)
    assert not wrong, "snapguard's default table does not police:\n  " + "\n  ".join(wrong)
