"""The EVS operations that name a snapshot or a snapshot group, derived from the Huawei Cloud SDK.

Huawei's EVS gateway is not public; the machine-readable truth about its API is the SDK
(`huaweicloudsdkevs`, pinned in requirements.txt). Nothing here lists EVS routes by hand: every
client class of every version package is walked, each `_<op>_http_info` gives the method, the
path template and the request type, and the request models (`openapi_types`, `attribute_map`,
nested models, recursively) give the body's root key and the fields under it. Requests are then
built with the SDK's own models and captured as the SDK would send them (path quoting, JSON
serialization, AK/SK signature), with the network call replaced.

Run `python tests/python/evs_sdk.py` to print the derived table and every exclusion.

## The rule

A body field is a *naming candidate* when its wire name (case-folded) contains "name" or "desc".
Every candidate must be classified with certainty, or the operation is UNCLASSIFIED and the tests
fail (so a new SDK version's operations are looked at, not guessed at). A candidate is classified
only when all of these hold:

* its wire name is exactly one of NAME_KEYS or DESCRIPTION_KEYS, and its type is `str`;
* it is a direct member of an object that is itself a direct member of the body's JSON root
  object (`{"<root>": {"<field>": ...}}`), reached through no list and no map: that is the shape
  snapguard's routes police (`body_root` + `name_fields`/`description_fields`);
* the root key names a known kind of object (OWNER_KEYS), and the SDK's own documentation of the
  field names the same kind of object (DOC_SUBJECTS: the noun before 名称/名字/描述 in the
  first sentence of the property's docstring), and the same kind of field (名称/名字 = name, 描述 =
  description). Two independent signals must agree; any disagreement is UNCLASSIFIED.

A classified candidate whose kind is in SNAPSHOT_KINDS makes the operation *name-setting*; all of
one operation's name-setting fields must sit under one root key. Parameters outside the body
(path, query, header) whose names are candidates are classified too: on a read (GET, HEAD) they
are filters (EXCLUDED_READ_FILTER); on any other method they are UNCLASSIFIED.

## The exclusion classes (an operation that is not name-setting is in exactly one)

* no-body: the request has no body (reads, deletes, body-less actions such as
  revert_volume_in_recycle); nothing is named.
* read-filter: `name` & co. as query parameters of GET listings and counts; they filter, they set
  nothing.
* body-names-nothing: a body without any naming candidate: tags (key/value pairs), policy
  association (a list of ids), resize, retype, QoS, charge mode, unsubscribe, recycle-bin policy,
  transfer acceptance (auth key), list-by-tags (a query in a body).
* not-a-snapshot: every naming candidate names something else, by key and by SDK documentation:
  `snapshot_policy` (an automatic snapshot policy's own name), `rollback` (its `name` is the name
  of the volume the snapshot is rolled back to: 回滚的目标云硬盘名称), `volume` (a volume's
  name/description), `transfer` (a volume transfer record's name).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import pkgutil
import re
import sys
import uuid
from urllib.parse import urlencode

import huaweicloudsdkevs
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.client import Client

# A hex project id, as Huawei's are, and deterministic UUIDs for the other path parameters.
PROJECT_ID = "5a3b8f0c2d7e4a19b6c1d0e2f3a4b5c6"
ENDPOINT = "https://evs.example.invalid"

NAME_KEYS = frozenset({"name", "display_name"})
DESCRIPTION_KEYS = frozenset({"description", "display_description"})

SNAPSHOT = "snapshot"
SNAPSHOT_GROUP = "snapshot group"
SNAPSHOT_KINDS = frozenset({SNAPSHOT, SNAPSHOT_GROUP})

# The kind of object a body root key stands for, with why a non-snapshot kind is excluded.
OWNER_KEYS = {
    "snapshot": SNAPSHOT,
    "snapshot_group": SNAPSHOT_GROUP,
    "snapshot_policy": "automatic snapshot policy",
    "rollback": "rollback target volume",
    "volume": "volume",
    "transfer": "volume transfer",
}
EXCLUSION_REASONS = {
    "automatic snapshot policy": "the policy's own name, not a snapshot's",
    "rollback target volume": "the name of the volume the snapshot is rolled back to",
    "volume": "a volume's own name/description",
    "volume transfer": "a volume transfer record's name",
}

# The kind of object the SDK's field documentation names, by the noun before 名称/名字/描述.
DOC_SUBJECTS = {
    "云硬盘快照": SNAPSHOT,  # EVS snapshot
    "快照一致性组": SNAPSHOT_GROUP,  # snapshot consistency group
    "自动快照策略": "automatic snapshot policy",
    "回滚的目标云硬盘": "rollback target volume",  # the volume rolled back to
    "云硬盘": "volume",
    "云硬盘过户记录": "volume transfer",  # volume transfer record
}
DOC_FIELD_KINDS = {"名称": "name", "名字": "name", "描述": "description"}

PRIMITIVES = frozenset({"str", "int", "float", "bool", "object", "date", "datetime", "file"})
READ_METHODS = frozenset({"GET", "HEAD"})


@dataclasses.dataclass(frozen=True)
class Operation:
    """One `_<op>_http_info` of one SDK client class."""

    client: type
    name: str  # the SDK operation, e.g. update_snapshot
    method: str
    resource_path: str
    request_cls: type
    body_type: str | None  # openapi type of the request's `body`, if it has one
    path_params: tuple[str, ...]  # request attributes the SDK puts into the path
    query_params: tuple[str, ...]
    header_params: tuple[str, ...]

    @property
    def key(self):
        return (self.method, self.resource_path, self.request_cls.__name__)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A field reachable from a request body."""

    wire_path: tuple[str, ...]  # JSON keys from the body's root object down to the field
    type: str
    owner: type  # the model class holding the field
    attr: str  # its Python attribute
    through_container: bool  # reached through a list or a map


@dataclasses.dataclass
class Classified:
    op: Operation
    status: str  # "name-setting", "excluded" or "unclassified"
    exclusion: str | None = None  # the exclusion class, when excluded
    body_root: str | None = None
    owner_cls: type | None = None  # the model under the body root
    body_attr: str | None = None  # the body model's attribute holding body_root
    kind: str | None = None  # snapshot or snapshot group
    name_fields: tuple[str, ...] = ()
    description_fields: tuple[str, ...] = ()
    notes: list[str] = dataclasses.field(default_factory=list)

    def describe(self):
        op = self.op
        return f"{op.method} {op.resource_path} ({op.name}): " + "; ".join(self.notes)


# --- walking the SDK --------------------------------------------------------------------------


def sdk_version():
    return importlib.metadata.version("huaweicloudsdkevs")


def version_packages():
    """The version packages (v2, v3, ...) this SDK version ships."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(huaweicloudsdkevs.__path__)
        if info.ispkg and re.fullmatch(r"v\d+(_\d+)?", info.name)
    )


def client_classes():
    """Every Client subclass defined in a `*client` module of the SDK, sync and async."""
    found = []
    for info in pkgutil.walk_packages(huaweicloudsdkevs.__path__, "huaweicloudsdkevs."):
        if not info.name.rsplit(".", 1)[-1].endswith("client"):
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Client) and obj is not Client and obj.__module__ == module.__name__:
                found.append(obj)
    return sorted(found, key=lambda c: (c.__module__, c.__name__))


def _model_module(client):
    return importlib.import_module(client.__module__.rsplit(".", 1)[0] + ".model")


def _request_class(client, op):
    """The request class of `op`, from the public method that calls `_<op>_http_info`."""
    helper = f"_{op}_http_info"
    public = [
        fn
        for name, fn in inspect.getmembers(client, inspect.isfunction)
        if not name.startswith("_")
        and not name.endswith("_invoker")
        and helper in fn.__code__.co_names
    ]
    if len(public) != 1:
        raise AssertionError(f"{client.__name__}.{helper}: {len(public)} public methods call it")
    doc = inspect.getdoc(public[0]) or ""
    m = re.search(r":type request: :class:`([\w.]+)`", doc)
    if not m:
        raise AssertionError(f"{client.__name__}.{public[0].__name__}: no ':type request:' in doc")
    module, name = m.group(1).rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def operations(client):
    """Every operation of one client class, read from its `_<op>_http_info` helpers."""
    instance = client()  # the helpers are classmethods in the sync client, methods in the async
    ops = []
    for attr in sorted(vars(client)):
        m = re.fullmatch(r"_(\w+)_http_info", attr)
        if not m:
            continue
        op = m.group(1)
        request_cls = _request_class(client, op)
        helper = getattr(instance, attr)
        info = helper(request_cls())
        if info["request_type"] != request_cls.__name__:
            raise AssertionError(f"{op}: request_type {info['request_type']} != {request_cls}")
        # Where the SDK puts each request attribute: set each to a marker and look for it.
        probe = request_cls()
        markers = {}
        for a in request_cls.openapi_types:
            if a != "body":
                markers[a] = f"@@{a}@@"
                setattr(probe, a, markers[a])
        placed = helper(probe)
        where = lambda values: tuple(a for a, v in markers.items() if v in values)  # noqa: E731
        ops.append(
            Operation(
                client=client,
                name=op,
                method=info["method"].upper(),
                resource_path=info["resource_path"],
                request_cls=request_cls,
                body_type=request_cls.openapi_types.get("body"),
                path_params=where(placed["path_params"].values()),
                query_params=where([v for _, v in placed["query_params"]]),
                header_params=where(placed["header_params"].values()),
            )
        )
    return ops


def _unwrap(type_str):
    """`list[X]` -> (X, True); `dict(str, X)` -> (X, True); X -> (X, False)."""
    m = re.fullmatch(r"list\[(.+)\]", type_str) or re.fullmatch(r"dict\(str, (.+)\)", type_str)
    return (m.group(1), True) if m else (type_str, False)


def leaves(models, type_str, wire_path=(), through=False, seen=frozenset()):
    """Every primitive-typed field reachable from a value of `type_str`, recursively."""
    inner, container = _unwrap(type_str)
    while container:
        through = True
        inner, container = _unwrap(inner)
    cls = getattr(models, inner, None)
    if inner in PRIMITIVES or cls is None:
        if inner not in PRIMITIVES:
            raise AssertionError(f"unknown type {inner!r} at {'.'.join(wire_path) or 'body'}")
        return []
    if inner in seen:  # a recursive model: its fields are listed once
        return []
    out = []
    for attr, t in cls.openapi_types.items():
        path = wire_path + (cls.attribute_map[attr],)
        t_inner = t
        while True:
            t_inner, c = _unwrap(t_inner)
            if not c:
                break
        out.append(Leaf(path, t, cls, attr, through or t != t_inner))
        if t_inner not in PRIMITIVES:
            out.extend(leaves(models, t, path, through, seen | {inner}))
    return out


def is_candidate(key):
    k = key.lower()
    return "name" in k or "desc" in k


def doc_subject(owner, attr):
    """(kind of object, kind of field) that the SDK's docstring of `owner.attr` names."""
    doc = inspect.getdoc(getattr(owner, attr)) or ""
    text = doc.split("\n\n", 1)[1] if "\n\n" in doc else ""
    text = text.replace("**参数解释**", "").strip()
    sentence = re.split(r"[。，,.]", text, maxsplit=1)[0].strip()
    m = re.match(r"^(.*?)的?(名称|名字|描述)", sentence)
    if not m:
        return None, None, sentence
    subject = re.sub(r"^新的", "", m.group(1)).strip()
    return DOC_SUBJECTS.get(subject), DOC_FIELD_KINDS[m.group(2)], subject


def classify(op, models=None):
    """Whether `op` sets a snapshot's or snapshot group's name or description; see the module doc.

    `models` is the module of the request models (by default, the op's version package's).
    """
    c = Classified(op=op, status="excluded")
    unclassified = []
    outside = [a for a in op.path_params + op.query_params + op.header_params if is_candidate(a)]
    outside += [
        a
        for a in op.request_cls.openapi_types
        if a != "body"
        and a not in op.path_params + op.query_params + op.header_params
        and is_candidate(a)
    ]
    if outside:
        if op.method in READ_METHODS and set(outside) <= set(op.query_params):
            c.notes.append(f"read filters {sorted(outside)}")
        else:
            unclassified.append(f"name-like non-body parameters {sorted(outside)} on {op.method}")

    policed = []  # (root, body_attr, owner, wire key, field kind, object kind)
    excluded_kinds = set()
    if op.body_type is not None:
        models = models or _model_module(op.client)
        body_inner, body_container = _unwrap(op.body_type)
        body_cls = getattr(models, body_inner, None)
        for leaf in leaves(models, op.body_type):
            key = leaf.wire_path[-1]
            if not is_candidate(key):
                continue
            where = ".".join(leaf.wire_path)
            if key in NAME_KEYS:
                field_kind = "name"
            elif key in DESCRIPTION_KEYS:
                field_kind = "description"
            else:
                unclassified.append(f"{where}: name-like field that is not a name/description key")
                continue
            if leaf.type != "str":
                unclassified.append(f"{where}: a {key} of type {leaf.type}, not str")
                continue
            nested = len(leaf.wire_path) != 2 or leaf.through_container
            if body_container or body_cls is None or nested:
                unclassified.append(f"{where}: not {{root: {{field}}}}, snapguard's shape")
                continue
            root = leaf.wire_path[0]
            by_key = OWNER_KEYS.get(root)
            by_doc, doc_kind, subject = doc_subject(leaf.owner, leaf.attr)
            if by_key is None:
                unclassified.append(f"{where}: unknown body root {root!r}")
                continue
            if by_doc is None:
                unclassified.append(f"{where}: SDK doc names an unknown subject {subject!r}")
                continue
            if by_key != by_doc or doc_kind != field_kind:
                unclassified.append(
                    f"{where}: key says {by_key} {field_kind}, SDK doc says {by_doc} {doc_kind}"
                )
                continue
            body_attr = next(a for a, w in body_cls.attribute_map.items() if w == root)
            if by_key in SNAPSHOT_KINDS:
                policed.append((root, body_attr, leaf.owner, key, field_kind, by_key))
            else:
                excluded_kinds.add(by_key)
                c.notes.append(f"{where}: {by_key}: {EXCLUSION_REASONS[by_key]}")

    roots = {p[0] for p in policed}
    if len(roots) > 1:
        unclassified.append(f"snapshot names under several roots {sorted(roots)}")
    if unclassified:
        c.status = "unclassified"
        c.notes = unclassified + c.notes
        return c
    if policed:
        c.status = "name-setting"
        c.body_root, c.body_attr, c.owner_cls = policed[0][0], policed[0][1], policed[0][2]
        c.kind = policed[0][5]
        c.name_fields = tuple(p[3] for p in policed if p[4] == "name")
        c.description_fields = tuple(p[3] for p in policed if p[4] == "description")
        return c
    if excluded_kinds:
        c.exclusion = "not-a-snapshot"
    elif op.body_type is None and not outside:
        c.exclusion = "no-body"
    elif op.body_type is None:
        c.exclusion = "read-filter"
    else:
        c.exclusion = "body-names-nothing"
    return c


def all_operations():
    """Every operation of every client, deduplicated across the sync and async clients.

    The clients of one version package must agree on every operation; a disagreement raises.
    """
    by_key = {}
    for client in client_classes():
        for op in operations(client):
            ident = (op.client.__module__.rsplit(".", 1)[0], op.name.removesuffix("_async"))
            sig = (op.method, op.resource_path, op.request_cls, op.path_params, op.query_params)
            if ident in by_key:
                prev = by_key[ident]
                prev_sig = (prev.method, prev.resource_path, prev.request_cls, prev.path_params,
                            prev.query_params)
                if prev_sig != sig:
                    raise AssertionError(f"{ident}: clients disagree: {prev_sig} vs {sig}")
                continue
            by_key[ident] = op
    return sorted(by_key.values(), key=lambda o: (o.resource_path, o.method, o.name))


def derive():
    """(name-setting, excluded, unclassified): lists of Classified."""
    classified = [classify(op) for op in all_operations()]
    pick = lambda s: [c for c in classified if c.status == s]  # noqa: E731
    return pick("name-setting"), pick("excluded"), pick("unclassified")


# --- requests as the SDK sends them -------------------------------------------------------------


def param_value(name):
    if name == "project_id":
        return PROJECT_ID
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"snapguard-evs-test/{name}"))


class _Captured(Exception):
    def __init__(self, request):
        super().__init__("captured")
        self.request = request


def _client(client_cls):
    creds = BasicCredentials("AKSNAPGUARDTEST00000", "sk" * 20, PROJECT_ID)
    client = client_cls.new_builder().with_credentials(creds).with_endpoints([ENDPOINT]).build()

    def capture(request, *args, **kwargs):
        raise _Captured(request)

    client._do_http_request_sync = capture
    client._do_http_request_async = capture
    return client


_SYNC_CLIENTS = {}


def sdk_request(c: Classified, fields: dict[str, str]):
    """The request the SDK sends for `c.op` with `fields` (wire key -> value) under its body root.

    Returned as a `check --batch` request: method, target, headers, body. Other `*_id` string
    fields of the model under the root get ids, as a real caller's would.
    """
    op = c.op
    owner = c.owner_cls()
    for attr, wire in owner.attribute_map.items():
        t = owner.openapi_types[attr]
        if wire in fields:
            setattr(owner, attr, fields[wire])
        elif t == "str" and attr.endswith("_id"):
            setattr(owner, attr, param_value(attr))
        elif t == "list[str]" and attr.endswith("_ids"):
            setattr(owner, attr, [param_value(attr)])
    missing = set(fields) - set(owner.attribute_map.values())
    if missing:
        raise AssertionError(f"{op.name}: no fields {missing} under {c.body_root}")
    models = _model_module(op.client)
    body = getattr(models, op.body_type)()
    setattr(body, c.body_attr, owner)
    request = op.request_cls()
    for a in op.path_params:
        setattr(request, a, param_value(a))
    request.body = body

    # Send it through the sync client of the same version package (the async one only differs in
    # how it waits), with the network call replaced by a capture.
    sync = next(
        k for k in client_classes()
        if k.__module__.rsplit(".", 1)[0] == op.client.__module__.rsplit(".", 1)[0]
        and hasattr(k, op.name.removesuffix("_async"))
    )
    if sync not in _SYNC_CLIENTS:
        _SYNC_CLIENTS[sync] = _client(sync)
    client = _SYNC_CLIENTS[sync]
    try:
        getattr(client, op.name.removesuffix("_async"))(request)
    except _Captured as done:
        sent = done.request
    else:
        raise AssertionError(f"{op.name}: the SDK sent nothing")
    target = sent.uri or sent.resource_path
    if sent.query_params:
        target += "?" + urlencode(sent.query_params)
    raw = sent.body
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return {
        "method": sent.method,
        "target": target,
        "headers": [[k, str(v)] for k, v in sent.header_params.items()],
        "body": raw,
    }


# --- printing ------------------------------------------------------------------------------------


def table_text():
    name_setting, excluded, unclassified = derive()
    lines = [
        f"huaweicloudsdkevs {sdk_version()}: version packages "
        f"{version_packages()}, clients "
        f"{[k.__module__ + '.' + k.__name__ for k in client_classes()]}",
        "",
        "EVS operations that set a snapshot's or snapshot group's name/description:",
        f"  {'method':6} {'path':55} {'body root':15} {'name fields':12} "
        f"{'description fields':19} sdk op",
    ]
    for c in name_setting:
        lines.append(
            f"  {c.op.method:6} {c.op.resource_path:55} {c.body_root:15} "
            f"{','.join(c.name_fields) or '-':12} {','.join(c.description_fields) or '-':19} "
            f"{c.op.name}"
        )
    lines += ["", "Excluded:"]
    for c in sorted(excluded, key=lambda c: (c.exclusion, c.op.resource_path)):
        note = f"  [{'; '.join(c.notes)}]" if c.notes else ""
        lines.append(f"  {c.exclusion:19} {c.op.method:6} {c.op.resource_path} ({c.op.name}){note}")
    lines += ["", f"Unclassified: {len(unclassified)}"]
    lines += [f"  {c.describe()}" for c in unclassified]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(table_text() + "\n")
