"""snapguard polices every EVS operation that names a snapshot or snapshot group, in every spelling.

The operations are derived from the Huawei Cloud SDK (see evs_sdk.py for the rule and its
exclusion classes), not remembered: a new SDK version's operations are classified or make
test_every_operation_is_classified fail. For each name-setting operation, the request is the one
the SDK itself would send (its models, its JSON, its path quoting, its signature headers), and:

* a reserved name in each name field is rejected (reserved_prefix, Huawei-style error body);
* a benign name passes, on the route the SDK calls;
* an over-long description in each description field is rejected (max_field_bytes);
* every spelling of the path that a loose reader might still route to the operation (case,
  percent-encoded letters, `//`, trailing `/`, dot segments, `;params`, `.json`, a query, method
  overrides, control characters before and after each literal segment, ...) is rejected;
* the default route table (config/default-routes.toml) has a route policing it.

The verdicts come from one `snapguard check --batch` run over every request (conftest.py).
"""

from __future__ import annotations

import json
import re
import tomllib
import types
from collections import defaultdict

import pytest

import evs_sdk
from conftest import ROOT, check_batch

NAME_SETTING, EXCLUDED, UNCLASSIFIED = evs_sdk.derive()
RESERVED = "autobk_snapshot_x"
BENIGN_NAME = "nightly-2024-01-01"
BENIGN_DESCRIPTION = "taken before the upgrade"
LONG = "d" * 256  # policy.max_field_bytes is 255 by default


def pct(byte):
    return f"%{byte:02X}"


def pct_text(text):
    return "".join(pct(b) for b in text.encode("utf-8"))


CONTROL_BYTES = list(range(0x00, 0x20)) + [0x7F]
# Not in the brief: spaces that Python's str.strip()/split() and `\s` take for whitespace.
# WSGI servers hand PATH_INFO over decoded as latin-1, so the single bytes %85 and %A0 become
# U+0085 and U+00A0 there; the others are UTF-8, as a reader decoding UTF-8 would see them.
UNICODE_SPACES = ["%85", "%A0"] + [
    pct_text(u)
    for u in ["\u0085", "\u00a0", "\u1680", "\u2000", "\u2028", "\u2029", "\u202f", "\u3000"]
]
OVERRIDE_HEADERS = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]
# Classes of spellings that the brief asks for, and the extra ones this file adds.
BRIEF_CLASSES = [
    "upper-case", "mixed-case", "percent-letter", "double-slash", "trailing-slash", "dot-segment",
    "dotdot-segment", "semicolon-param", "json-suffix", "query", "method-override",
    "control-after-literal", "control-before-literal", "control-trailing",
]
# Their ids start with "extra-": `-k "not extra"` runs the brief's classes alone.
EXTRA_CLASSES = [
    "extra-space-around-literal", "extra-unicode-space-around-literal", "extra-lowercase-method",
    "extra-control-trailing-segment", "extra-unicode-method-override",
]
# Non-ASCII letters that Python's str.upper() turns into ASCII ones (ſ -> S, ﬆ -> ST, ...):
# Cinder's router upper-cases `_method` that way. Found by scanning Unicode, not listed.
UPPER_TO_ASCII = defaultdict(list)
for _cp in range(0x80, 0x110000):
    _up = chr(_cp).upper()
    if _up.isascii() and _up.isalpha():
        UPPER_TO_ASCII[_up].append(chr(_cp))


def op_id(c):
    return c.op.name


def shape(template):
    """A path template's shape: literals (case-folded) and parameter positions, names ignored."""
    return tuple("{}" if re.fullmatch(r"\{[^}]+\}", s) else s.lower() for s in template.split("/"))


def matches(template, target):
    """Whether a concrete path fits a template: equal literals, anything for a {param}."""
    t, p = template.split("/"), target.partition("?")[0].split("/")
    return len(t) == len(p) and all(
        re.fullmatch(r"\{[^}]+\}", a) or a == b for a, b in zip(t, p)
    )


def fields(c, names, descriptions):
    out = {f: names for f in c.name_fields}
    out.update({f: descriptions for f in c.description_fields})
    return out


# --- the requests -------------------------------------------------------------------------------


def mutations(c, request):
    """(class, label, request) for every spelling of `request`'s path that names the same route."""
    template = c.op.resource_path.strip("/").split("/")
    path, _, query = request["target"].partition("?")
    assert not query, "the SDK sends these operations without a query"
    segs = path.strip("/").split("/")
    assert len(segs) == len(template), (segs, template)
    literals = [i for i, s in enumerate(template) if not s.startswith("{")]
    n = len(segs)

    def req(target, method=None, headers=()):
        r = dict(request, target=target, method=method or request["method"])
        r["headers"] = request["headers"] + [list(h) for h in headers]
        return r

    def join(parts, tail=""):
        return "/" + "/".join(parts) + tail

    def with_seg(i, value):
        return join(segs[:i] + [value] + segs[i + 1:])

    def insert(i, values):
        return join(segs[:i] + list(values) + segs[i:])

    out = []
    add = lambda cls, label, r: out.append((cls, label, r))  # noqa: E731

    for i in literals:
        s = segs[i]
        if s.upper() != s:
            add("upper-case", s.upper(), req(with_seg(i, s.upper())))
        mixed = "".join(ch.upper() if k % 2 == 0 else ch.lower() for k, ch in enumerate(s))
        if mixed != s:
            add("mixed-case", mixed, req(with_seg(i, mixed)))
        first = s[0]
        enc = pct(ord(first)) + s[1:]
        add("percent-letter", enc, req(with_seg(i, enc)))
        lower_hex = f"%{ord(first):02x}"
        if lower_hex != pct(ord(first)):
            add("percent-letter", f"{lower_hex}{s[1:]}", req(with_seg(i, lower_hex + s[1:])))
        if first.upper() != first:
            enc = pct(ord(first.upper())) + s[1:]
            add("percent-letter", enc, req(with_seg(i, enc)))
        add("percent-letter", pct_text(s), req(with_seg(i, pct_text(s))))
    all_upper = [s.upper() if i in literals else s for i, s in enumerate(segs)]
    add("upper-case", "all literals", req(join(all_upper)))

    for i in range(n):
        add("double-slash", f"// before segment {i}", req(insert(i, [""])))
    add("trailing-slash", "/", req(join(segs, "/")))
    add("trailing-slash", "//", req(join(segs, "//")))
    for i in range(n + 1):
        add("dot-segment", f"/./ before segment {i}", req(insert(i, ["."])))
        add("dot-segment", f"/%2e/ before segment {i}", req(insert(i, ["%2e"])))
        add("dotdot-segment", f"/x/../ before segment {i}", req(insert(i, ["x", ".."])))
        add("dotdot-segment", f"/x/%2E%2E/ before segment {i}", req(insert(i, ["x", "%2E%2E"])))
    for i in range(n):
        for p in (";x", ";x=1", ";"):
            add("semicolon-param", f"{segs[i]}{p}", req(with_seg(i, segs[i] + p)))
    add("json-suffix", f"{segs[-1]}.json", req(with_seg(n - 1, segs[-1] + ".json")))
    for q in ("?x=1", "?", "?x=1&y=2"):
        add("query", q, req(path + q))

    m = request["method"]
    for carrier in ("GET", "POST"):
        if carrier == m:
            continue
        for value in (m, m.lower()):
            add("method-override", f"{carrier} ?_method={value}",
                req(f"{path}?_method={value}", carrier))
            for h in OVERRIDE_HEADERS:
                add("method-override", f"{carrier} {h}: {value}", req(path, carrier, [(h, value)]))
    add("extra-lowercase-method", m.lower(), req(path, m.lower()))
    for ascii_letters, chars in sorted(UPPER_TO_ASCII.items()):
        at = m.find(ascii_letters)
        for ch in chars if at >= 0 else ():
            value = (m[:at] + ch + m[at + len(ascii_letters):]).lower()
            for carrier in ("GET", "POST"):
                if carrier != m:
                    add("extra-unicode-method-override", f"{carrier} ?_method={value}",
                        req(f"{path}?_method={pct_text(value)}", carrier))

    for i in literals:
        for b in CONTROL_BYTES:
            add("control-after-literal", f"{segs[i]}{pct(b)}", req(with_seg(i, segs[i] + pct(b))))
            add("control-before-literal", f"{pct(b)}{segs[i]}", req(with_seg(i, pct(b) + segs[i])))
        add("extra-space-around-literal", f"{segs[i]}%20", req(with_seg(i, segs[i] + "%20")))
        add("extra-space-around-literal", f"%20{segs[i]}", req(with_seg(i, "%20" + segs[i])))
        for e in UNICODE_SPACES:
            for spelled in (segs[i] + e, e + segs[i]):
                add("extra-unicode-space-around-literal", spelled, req(with_seg(i, spelled)))
    for b in CONTROL_BYTES:
        add("control-trailing", f"...{pct(b)}", req(path + pct(b)))
        if f"%{b:02x}" != pct(b):
            add("control-trailing", f"...%{b:02x}", req(path + f"%{b:02x}"))
        add("extra-control-trailing-segment", f".../{pct(b)}", req(path + "/" + pct(b)))
    add("extra-space-around-literal", "...%20", req(path + "%20"))
    return out


def all_cases():
    """{case id: request} for every request of this file, in one dict."""
    cases = {}
    for c in NAME_SETTING:
        base = c.op.name
        cases[(base, "benign")] = evs_sdk.sdk_request(c, fields(c, BENIGN_NAME, BENIGN_DESCRIPTION))
        for f in c.name_fields:
            body = fields(c, BENIGN_NAME, BENIGN_DESCRIPTION)
            body[f] = RESERVED
            cases[(base, "reserved", f)] = evs_sdk.sdk_request(c, body)
        for f in c.description_fields:
            body = fields(c, BENIGN_NAME, BENIGN_DESCRIPTION)
            body[f] = LONG
            cases[(base, "long", f)] = evs_sdk.sdk_request(c, body)
        reserved = evs_sdk.sdk_request(c, fields(c, RESERVED, BENIGN_DESCRIPTION))
        for cls, label, r in mutations(c, reserved):
            cases[(base, "mutation", cls, label)] = r
    return cases


@pytest.fixture(scope="session")
def verdicts(snapguard):
    cases = all_cases()
    keys = list(cases)
    results = check_batch([cases[k] for k in keys])
    return {k: (cases[k], v) for k, v in zip(keys, results)}


def assert_huawei_error(verdict):
    assert verdict["status"] == 400, verdict
    doc = json.loads(verdict["body"])
    assert set(doc) == {"error"}, doc
    assert re.fullmatch(r"EVS\.\d{4}", doc["error"]["code"]), doc
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"], doc


def field_is(verdict_field, wire):
    return verdict_field is not None and re.fullmatch(rf"(.*[./])?{re.escape(wire)}", verdict_field)


# --- the derivation -----------------------------------------------------------------------------


def test_derived_table(capsys):
    """Prints the derived table; the SDK must still offer the operations the product began with."""
    with capsys.disabled():
        print("\n" + evs_sdk.table_text())
    assert evs_sdk.version_packages(), "no version package in huaweicloudsdkevs"
    assert evs_sdk.client_classes(), "no client class in huaweicloudsdkevs"
    # A canary, not the table: if the derivation breaks, it finds nothing, not a smaller table.
    assert ("PUT", "/v2/{project_id}/cloudsnapshots/{snapshot_id}") in {
        (c.op.method, c.op.resource_path) for c in NAME_SETTING
    }
    for c in NAME_SETTING:
        assert c.body_root and (c.name_fields or c.description_fields), c


def test_every_client_is_walked():
    """Every version package's clients are walked, and sync and async clients agree."""
    packages = {k.__module__.split(".")[1] for k in evs_sdk.client_classes()}
    assert packages == set(evs_sdk.version_packages())
    ops = evs_sdk.all_operations()  # raises when a package's clients disagree
    assert len({(o.method, o.resource_path, o.request_cls) for o in ops}) == len(ops)


def test_every_operation_is_classified():
    """An operation the rule cannot classify with certainty must be looked at by a person."""
    assert not UNCLASSIFIED, "unclassified EVS operations:\n" + "\n".join(
        c.describe() for c in UNCLASSIFIED
    )


def fake_model(name, fields):
    """A model class shaped like the SDK's: openapi_types, attribute_map, documented properties."""
    attrs = {
        "openapi_types": {a: t for a, (t, _, _) in fields.items()},
        "attribute_map": {a: w for a, (_, w, _) in fields.items()},
    }
    for a, (_, _, doc) in fields.items():
        attrs[a] = property(lambda self: None, doc=f"Gets the {a} of this {name}.\n\n        {doc}")
    return type(name, (), attrs)


def fake_operation(method, root, owner_fields, query=()):
    """An operation whose body is {root: Owner}, for the classifier's self-tests."""
    models = types.SimpleNamespace(
        Owner=fake_model("Owner", owner_fields),
        Body=fake_model("Body", {"root": ("Owner", root, "")}),
    )
    request_fields = {"body": ("Body", "body", "")}
    request_fields.update({q: ("str", q, "") for q in query})
    op = evs_sdk.Operation(
        client=None, name="fake", method=method, resource_path="/v9/{project_id}/things",
        request_cls=fake_model("FakeRequest", request_fields), body_type="Body",
        path_params=(), query_params=tuple(query), header_params=(),
    )
    return op, models


SNAPSHOT_NAME_DOC = "云硬盘快照名称。最大支持255个字节。"


@pytest.mark.parametrize(
    "method,root,owner_fields,query,status",
    [
        # What the rule accepts: a snapshot's name, in either spelling, by key and by doc.
        ("PUT", "snapshot", {"name": ("str", "name", SNAPSHOT_NAME_DOC)}, (), "name-setting"),
        ("PUT", "snapshot", {"display_name": ("str", "display_name", SNAPSHOT_NAME_DOC)}, (),
         "name-setting"),
        ("PUT", "volume", {"name": ("str", "name", "云硬盘名称。")}, (), "excluded"),
        # What it must not guess at.
        ("POST", "snapshots", {"name": ("str", "name", SNAPSHOT_NAME_DOC)}, (), "unclassified"),
        ("PUT", "snapshot", {"name": ("str", "name", "云硬盘名称。")}, (), "unclassified"),
        ("PUT", "snapshot", {"snapshot_name": ("str", "snapshot_name", SNAPSHOT_NAME_DOC)}, (),
         "unclassified"),
        ("PUT", "snapshot", {"name": ("list[str]", "name", SNAPSHOT_NAME_DOC)}, (), "unclassified"),
        ("PUT", "snapshot", {"name": ("str", "name", "A snapshot's name.")}, (), "unclassified"),
        ("PUT", "snapshot", {"size": ("int", "size", "")}, ("name",), "unclassified"),
        ("GET", "snapshot", {"size": ("int", "size", "")}, ("name",), "excluded"),
    ],
)
def test_classifier_refuses_to_guess(method, root, owner_fields, query, status):
    """The rule's own check: new shapes of naming are UNCLASSIFIED, not silently excluded."""
    op, models = fake_operation(method, root, owner_fields, query)
    c = evs_sdk.classify(op, models)
    assert c.status == status, c.notes


def test_every_exclusion_is_a_documented_class():
    documented = {"no-body", "read-filter", "body-names-nothing", "not-a-snapshot"}
    assert {c.exclusion for c in EXCLUDED} <= documented


def test_sdk_requests_carry_the_fields_under_the_root():
    for c in NAME_SETTING:
        r = evs_sdk.sdk_request(c, fields(c, BENIGN_NAME, BENIGN_DESCRIPTION))
        body = json.loads(r["body"])
        assert list(body) == [c.body_root], body
        for f in c.name_fields:
            assert body[c.body_root][f] == BENIGN_NAME
        for f in c.description_fields:
            assert body[c.body_root][f] == BENIGN_DESCRIPTION
        assert r["method"] == c.op.method
        assert matches(c.op.resource_path, r["target"]), r["target"]


# --- the route table: derived, not remembered ---------------------------------------------------


def default_routes():
    with open(ROOT / "config" / "default-routes.toml", "rb") as f:
        return tomllib.load(f)["routes"]


@pytest.mark.parametrize("c", NAME_SETTING, ids=op_id)
def test_default_table_polices(c):
    """config/default-routes.toml has a route that polices this SDK operation, field for field."""
    routes = [
        r for r in default_routes()
        if c.op.method in {m.upper() for m in r["methods"]}
        and shape(r["path"]) == shape(c.op.resource_path)
    ]
    assert routes, (
        f"no default route for {c.op.method} {c.op.resource_path} (SDK {c.op.name}); it needs "
        f"body_root={c.body_root!r}, name_fields={list(c.name_fields)}, "
        f"description_fields={list(c.description_fields)}, error_style='huawei'"
    )
    r = routes[0]
    assert r.get("body_root", "snapshot") == c.body_root, r
    assert set(c.name_fields) <= set(r.get("name_fields", [])), r
    assert set(c.description_fields) <= set(r.get("description_fields", [])), r
    assert r.get("error_style", "openstack") == "huawei", r


# --- snapguard's verdicts -----------------------------------------------------------------------


@pytest.mark.parametrize("c", NAME_SETTING, ids=op_id)
def test_benign_name_passes(c, verdicts):
    request, v = verdicts[(c.op.name, "benign")]
    assert v["decision"] in ("allowed", "normalized"), v
    assert v["route"] is not None and shape(v["route"]) == shape(c.op.resource_path), v


@pytest.mark.parametrize(
    "c,field", [(c, f) for c in NAME_SETTING for f in c.name_fields],
    ids=lambda x: x if isinstance(x, str) else op_id(x),
)
def test_reserved_name_is_rejected(c, field, verdicts):
    request, v = verdicts[(c.op.name, "reserved", field)]
    assert v["decision"] == "rejected", (request["method"], request["target"], v)
    assert v["rule"] == "reserved_prefix", v
    assert field_is(v["field"], field), v
    assert v["route"] is not None and shape(v["route"]) == shape(c.op.resource_path), v
    assert_huawei_error(v)


@pytest.mark.parametrize(
    "c,field", [(c, f) for c in NAME_SETTING for f in c.description_fields],
    ids=lambda x: x if isinstance(x, str) else op_id(x),
)
def test_long_description_is_rejected(c, field, verdicts):
    request, v = verdicts[(c.op.name, "long", field)]
    assert v["decision"] == "rejected", (request["method"], request["target"], v)
    assert v["rule"] == "max_field_bytes", v
    assert field_is(v["field"], field), v
    assert_huawei_error(v)


@pytest.mark.parametrize("cls", BRIEF_CLASSES + EXTRA_CLASSES)
@pytest.mark.parametrize("c", NAME_SETTING, ids=op_id)
def test_every_spelling_is_rejected(c, cls, verdicts):
    """Each spelling in the class is rejected (any rule) or refused by hyper (invalid)."""
    mine = [
        (k[3], *verdicts[k])
        for k in verdicts
        if k[0] == c.op.name and k[1:3] == ("mutation", cls)
    ]
    if not mine and cls == "extra-unicode-method-override":
        pytest.skip(f"no non-ASCII letter upper-cases into a letter of {c.op.method}")
    assert mine, f"no {cls} spelling generated for {c.op.name}"
    slipped = defaultdict(list)
    for label, request, v in mine:
        if v["decision"] not in ("rejected", "invalid"):
            slipped[v["decision"]].append(f"{request['method']} {request['target']}  [{label}]")
    assert not slipped, f"{sum(map(len, slipped.values()))} of {len(mine)} {cls} spellings of " + (
        f"{c.op.method} {c.op.resource_path} were not rejected:\n"
        + "\n".join(f"  {d}: {t}" for d, ts in slipped.items() for t in ts)
    )
