"""Differential test: Cinder's real routing against snapguard's classifier, on generated requests.

Every request goes, as raw bytes, through the HTTP server and WSGI app cinder-api runs (eventlet's
HttpProtocol, paste's URLMap, Cinder's middlewares, its v3 APIRouter and Routes' `_method` override:
see cinder_router.py), and, as a `check --batch` line, through snapguard. The test fails when Cinder
would dispatch a request to a controller method that sets a snapshot's name or description (derived
from the methods' JSON schemas: cinder_router.name_setting_methods) while snapguard would forward it
with its reserved name unrefused (any decision but "rejected"; "invalid", which hyper refuses before
snapguard looks at it, counts as refused).

Requests are built from the templates of Cinder's own mapper (every route; the name-setting ones
weighted up) and mutated: methods in any case and Unicode look-alikes, method-override headers and
`?_method=` values (case mixes, Unicode that str.upper() maps to ASCII, percent-encoded UTF-8,
invalid UTF-8, encoded keys, duplicates, `;` separators, padding), percent-encodings of every byte in
and around segments, control characters and a trailing %0A, dot segments, `;params`, repeated and
trailing slashes, format suffixes, absolute-form targets, project ids of every shape or none.

Cinder is handed the target snapguard would forward (hyper's parsed URI, origin form: an
absolute-form target's scheme and authority and any '#fragment' dropped; see forwarded_target),
since that, not the raw target, is what reaches Cinder behind snapguard. Disagreements are printed
(up to 30, one per request class first) as `check --batch` lines and curl commands, each with a
form shrunk while Cinder still dispatches it and snapguard still forwards it.

Knobs: SNAPGUARD_DIFF_N (default 200000 requests), SNAPGUARD_DIFF_SEED (default 20260523),
SNAPGUARD_DIFF_PROCS (worker processes per side, default: CPU count). Over-blocking (snapguard
refuses what Cinder would not dispatch to a name-setting method) is reported, never failed on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os
import random
import re
import shlex
import sys
import time
import urllib.parse

import pytest

from conftest import check_batch, snapguard_bin

import cinder_router

pytestmark = pytest.mark.filterwarnings("ignore")  # eventlet's, oslo's and jsonschema's deprecations

N = int(os.environ.get("SNAPGUARD_DIFF_N", "200000"))
SEED = int(os.environ.get("SNAPGUARD_DIFF_SEED", "20260523"))
PROCS = int(os.environ.get("SNAPGUARD_DIFF_PROCS", "0")) or (os.cpu_count() or 1)
BATCH = 20000
RESERVED_NAME = "autobk_snapshot_x"
REFUSED = ("rejected", "invalid")

# Non-ASCII characters whose str.upper() is ASCII (what Routes' `_method` override applies):
# computed, not listed: U+00DF -> SS, U+0131 -> I, U+017F -> S, U+FB00.. ligatures -> FF, FI, FL,
# FFI, FFL, ST, ST.
UPPER_TO_ASCII = {}
for _cp in range(0x80, 0x110000):
    _c = chr(_cp)
    _u = _c.upper()
    if _u != _c and _u.isascii():
        UPPER_TO_ASCII[_c] = _u

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
HEX = "0123456789abcdef"
OVERRIDE_HEADERS = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]
LOOKALIKES = ["\u017f", "\u0131", "\ufb05", "\ufb06", "\uff30", "\uff35", "\uff33", "\uff34",
              "\u0405", "\u0420", "\u0422", "\u200b", "\u00a0", "\u2215", "\uff0f", "\u2044",
              "\u00e9", "\u0301", "\ufeff", "\u212a", "\u0130"]
PCT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
TEMPLATE_VAR = re.compile(r"\{(\w+)(?::[^}]*)?\}|:\((\w+)\)|:(\w+)|\*(\w+)")


@functools.lru_cache(maxsize=None)
def _spell_options(method: str, i: int):
    """What may stand at position i of `method`: itself, or a non-ASCII character whose
    str.upper() is the ASCII text there (with the length it covers)."""
    options = [(method[i], 1)]
    for c, up in UPPER_TO_ASCII.items():
        if method.startswith(up, i):
            options.append((c, len(up)))
    return tuple(options)


def pct(byte: int, rng: random.Random) -> str:
    s = f"%{byte:02X}"
    return s.lower() if rng.random() < 0.3 else s


def pct_utf8(text: str, rng: random.Random) -> str:
    return "".join(pct(b, rng) for b in text.encode("utf-8"))


class Generator:
    """Seeded requests built from Cinder's route templates, each with the tags of its mutations."""

    def __init__(self, router: cinder_router.CinderRouter, name_setting: dict, rng: random.Random):
        self.rng = rng
        self.routes = [r for r in router.routes() if r.controller and not r.redirect]
        self.name_setting = name_setting
        self.ns_routes = [r for r in self.routes if f"{r.controller}.{r.action}" in name_setting]
        self.ns_methods = sorted({m for r in self.ns_routes for m in (r.methods or ())})
        assert self.ns_routes, "Cinder's mapper has no name-setting route?"

    # ---- pieces ----

    def project_id(self, tags):
        rng = self.rng
        kind = rng.choices(
            ["hex", "uuid", "dashes", "digits", "upper", "word", "mixed", "long"],
            [40, 25, 3, 5, 8, 8, 6, 5])[0]
        tags.append(f"project:{kind}")
        if kind == "hex":
            return "".join(rng.choice(HEX) for _ in range(32))
        if kind == "uuid":
            h = "".join(rng.choice(HEX) for _ in range(32))
            return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        if kind == "dashes":
            return rng.choice(["-", "--", "a-", "-0"])
        if kind == "digits":
            return str(rng.randrange(10 ** rng.randrange(1, 12)))
        if kind == "upper":
            return "".join(rng.choice("0123456789ABCDEF") for _ in range(32))
        if kind == "word":
            return rng.choice(["admin", "demo", "project", "snapshots", "v3", "tenant_1", "x"])
        if kind == "mixed":
            return "".join(rng.choice(HEX + "ABCDEFxyz_") for _ in range(rng.randrange(1, 33)))
        return "".join(rng.choice(HEX) for _ in range(rng.randrange(40, 70)))

    def resource_id(self, tags):
        rng = self.rng
        kind = rng.choices(["uuid", "word", "special"], [70, 20, 10])[0]
        if kind == "uuid":
            h = "".join(rng.choice(HEX) for _ in range(32))
            return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        if kind == "word":
            return rng.choice(["x", "1", "detail", "new", "action", "metadata", "edit", "json",
                               "snapshots", "a.json", "a;b", "..", "."])
        tags.append("id:special")
        return rng.choice(["a%2Fb", "a%5Cb", "%2E%2E", "a%0A", "a%00", "%20", "a.b.json", "~",
                           "a%252F", "a%3Bb", "a%3Fb", "a%23b"])

    def concrete(self, route, tags):
        """The route's path with its variables filled in, under /v3."""
        def fill(m):
            name = next(g for g in m.groups() if g)
            if name == "project_id":
                return self.project_id(tags)
            if name == "format":
                return self.rng.choice(["json"] * 9 + ["xml"])
            return self.resource_id(tags)
        path = TEMPLATE_VAR.sub(fill, route.path)
        return "/v3" + path

    # ---- mutations of the path ----

    def mutate_path(self, path, tags):
        rng = self.rng
        ops = [
            (self.m_pct_chars, 12), (self.m_insert_byte, 12), (self.m_suffix, 14),
            (self.m_dot, 8), (self.m_params, 6), (self.m_slashes, 8), (self.m_format, 5),
            (self.m_case, 4), (self.m_unicode, 4), (self.m_absolute, 4), (self.m_raw, 3),
            (self.m_version, 3), (self.m_drop_project, 5), (self.m_slash_enc, 8),
            (self.m_newline, 8),
        ]
        count = rng.choices([0, 1, 2, 3, 4, 5], [15, 30, 25, 15, 10, 5])[0]
        for _ in range(count):
            op = rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
            path = op(path, tags)
        return path

    def _positions(self, path):
        # Indexes of the characters that are not part of a %XX escape.
        escaped = set()
        for m in PCT_ESCAPE.finditer(path):
            escaped.update(range(m.start(), m.end()))
        return [i for i in range(len(path)) if i not in escaped]

    def m_pct_chars(self, path, tags):
        rng = self.rng
        pos = self._positions(path)
        if not pos:
            return path
        picks = sorted(rng.sample(pos, min(len(pos), rng.randrange(1, 4))), reverse=True)
        for i in picks:
            if path[i] == "/":
                tags.append("pct:slash")
            elif path[i] == ".":
                tags.append("pct:dot")
            else:
                tags.append("pct:char")
            path = path[:i] + pct(ord(path[i]), rng) + path[i + 1:]
        return path

    def m_insert_byte(self, path, tags):
        rng = self.rng
        byte = rng.choice([rng.randrange(256), rng.randrange(32), 0x0A, 0x0D, 0x00, 0x09, 0x20,
                           0x2F, 0x5C, 0x2E, 0x3B, 0x7F, 0x85, 0xA0, 0xFF])
        pos = [i for i in self._positions(path) if path[i] == "/"] + [len(path)]
        if rng.random() < 0.5:
            i = rng.choice(pos)  # at a segment boundary
            where = "boundary"
        else:
            i = rng.choice(self._positions(path) + [len(path)])
            where = "inside"
        tags.append(f"byte:{_byte_class(byte)}:{where}")
        return path[:i] + pct(byte, rng) + path[i:]

    def m_suffix(self, path, tags):
        s = self.rng.choice(["%0A", "%0a", "%0D", "%0D%0A", "%00", "%20", "%09", "%0B", "%0C",
                             "%85", "%A0", "%C2%85", "%C2%A0", "%E2%80%A8", "%2F", "%5C", "/", "//",
                             ".", "%2E", ";", ";x=1", "%3B", "/.", "/%2E", "/..", "~", "%7E",
                             "%0A%0A", "%0A/", "/%0A", "%25", "%2500", "%250A"])
        tags.append(f"suffix:{s}")
        return path + s

    def m_slash_enc(self, path, tags):
        # A '/' of the path encoded, or an encoded one added at a boundary or inside a segment.
        rng = self.rng
        enc = rng.choice(["%2F", "%2f", "%5C", "%5c", "%252F"])
        idx = [i for i in self._positions(path) if path[i] == "/"]
        if idx and rng.random() < 0.5:
            i = rng.choice(idx)
            tags.append("slash-enc:replace")
            return path[:i] + enc + path[i + 1:]
        i = rng.choice(self._positions(path) + [len(path)])
        tags.append("slash-enc:insert")
        return path[:i] + enc + path[i:]

    def m_newline(self, path, tags):
        # A (percent-encoded) line break at the end, or somewhere inside.
        rng = self.rng
        nl = rng.choice(["%0A", "%0a", "%0D%0A", "%0D", "%0A%0A"])
        if rng.random() < 0.7:
            tags.append("newline:end")
            return path + nl
        i = rng.choice(self._positions(path) + [len(path)])
        tags.append("newline:inside")
        return path[:i] + nl + path[i:]

    def m_dot(self, path, tags):
        rng = self.rng
        segs = path.split("/")
        i = rng.randrange(1, len(segs) + 1)
        kind = rng.choice(["cur", "parent", "enc-cur", "enc-parent", "mixed"])
        tags.append(f"dot:{kind}")
        if kind == "cur":
            ins = [rng.choice([".", "./."])]
        elif kind == "parent":
            ins = [rng.choice(["x", "snapshots", "v3", "%2E"]), ".."]
        elif kind == "enc-cur":
            ins = [rng.choice(["%2e", "%2E"])]
        elif kind == "enc-parent":
            ins = [rng.choice(["x", "y"]), rng.choice(["%2e%2e", "%2E%2E", ".%2e", "%2e."])]
        else:
            ins = [rng.choice(["..", "%2e%2e"]), rng.choice(["v3", "x"])]
        segs[i:i] = ins
        return "/".join(segs)

    def m_params(self, path, tags):
        rng = self.rng
        segs = path.split("/")
        i = rng.randrange(len(segs))
        p = rng.choice([";", ";x", ";x=1", ";a=b;c", ";.json", "%3Bx"])
        tags.append("params")
        segs[i] = segs[i] + p
        return "/".join(segs)

    def m_slashes(self, path, tags):
        rng = self.rng
        kind = rng.choice(["lead", "inner", "trail", "many"])
        tags.append(f"slashes:{kind}")
        if kind == "lead":
            return "/" * rng.randrange(1, 4) + path
        if kind == "trail":
            return path + "/" * rng.randrange(1, 3)
        idx = [i for i, c in enumerate(path) if c == "/"] or [0]
        i = rng.choice(idx)
        n = 1 if kind == "inner" else rng.randrange(2, 5)
        return path[:i] + "/" * n + path[i:]

    def m_format(self, path, tags):
        f = self.rng.choice([".json", ".xml", ".JSON", ".json.json", ".%6Ason", "%2Ejson", ".js"])
        tags.append(f"format:{f}")
        return path + f

    def m_case(self, path, tags):
        rng = self.rng
        letters = [i for i in self._positions(path) if path[i].isalpha()]
        if not letters:
            return path
        i = rng.choice(letters)
        tags.append("case")
        return path[:i] + path[i].swapcase() + path[i + 1:]

    def m_unicode(self, path, tags):
        rng = self.rng
        ch = rng.choice(LOOKALIKES)
        i = rng.choice(self._positions(path) + [len(path)])
        tags.append("unicode")
        if rng.random() < 0.5:  # a look-alike in place of a letter
            if i < len(path) and path[i].isalpha():
                return path[:i] + pct_utf8(ch, rng) + path[i + 1:]
        return path[:i] + pct_utf8(ch, rng) + path[i:]

    def m_absolute(self, path, tags):
        rng = self.rng
        kind = rng.choice(["http", "https", "port", "enc-authority", "userinfo", "upper"])
        tags.append(f"absolute:{kind}")
        if kind == "http":
            return "http://cinder" + path
        if kind == "https":
            return "https://cinder.example" + path
        if kind == "port":
            return "http://127.0.0.1:8776" + path
        if kind == "enc-authority":
            # the path's first part inside the authority, its slashes encoded
            return "http://cinder" + path.replace("/", "%2F", rng.randrange(1, 4))
        if kind == "userinfo":
            return "http://u@cinder" + path
        return "HTTP://cinder" + path

    def m_raw(self, path, tags):
        rng = self.rng
        ch = rng.choice(['"', "<", ">", "\\", "^", "`", "{", "|", "}", "\x7f", "\t", " ", "#", "'",
                         "[", "]", "!", "$", "&", "(", ")", "*", "+", ",", "=", "@", ":"])
        i = rng.choice(self._positions(path) + [len(path)])
        tags.append(f"raw:{ch!r}")
        return path[:i] + ch + path[i:]

    def m_version(self, path, tags):
        rng = self.rng
        new = rng.choice(["/V3", "/v3.0", "/v2", "/v3%2F", "/%76%33", "/v%33", "/v3/v3", "/v1",
                          "", "/v3x", "/v03"])
        tags.append(f"version:{new or 'none'}")
        return new + path[3:] if path.startswith("/v3") else path

    def m_drop_project(self, path, tags):
        # Remove the second segment (the project id, when there is one).
        segs = path.split("/")
        if len(segs) > 3:
            tags.append("drop-segment-2")
            del segs[2]
        return "/".join(segs)

    # ---- methods and overrides ----

    def spell(self, method, tags, kind_tag):
        """`method` respelled: case mixes, and Unicode that str.upper() maps back to it."""
        rng = self.rng
        out, i = "", 0
        unicode_used = False
        while i < len(method):
            options = _spell_options(method, i)
            ch, n = rng.choice(options) if rng.random() < 0.5 else (method[i], 1)
            if n == 1 and ch.isascii():
                ch = ch.lower() if rng.random() < 0.5 else ch
            else:
                unicode_used = True
            out += ch
            i += n
        tags.append(f"{kind_tag}:{'unicode' if unicode_used else 'ascii'}")
        return out

    def request_method(self, route_method, tags):
        rng = self.rng
        r = rng.random()
        if r < 0.70:
            return route_method
        if r < 0.82:
            tags.append("method:case")
            return "".join(c.lower() if rng.random() < 0.5 else c for c in route_method)
        if r < 0.90:
            tags.append("method:other")
            return rng.choice(METHODS)
        if r < 0.96:
            return self.spell(route_method, tags, "method-spell")
        tags.append("method:odd")
        return rng.choice([route_method + "X", "X" + route_method, route_method + "\u200b",
                           "M-" + route_method, route_method + "/1.1"])

    def method_override_value(self, target, tags):
        """A `_method=` value meant to read as `target` after WebOb decoding and str.upper()."""
        rng = self.rng
        spelled = self.spell(target, tags, "qm-spell")
        enc = ""
        for ch in spelled:
            if not ch.isascii() or rng.random() < 0.15:
                enc += pct_utf8(ch, rng)
            else:
                enc += ch
        extra = rng.random()
        if extra < 0.08:
            tags.append("qm:invalid-utf8")
            i = rng.randrange(len(enc) + 1)
            enc = enc[:i] + rng.choice(["%FF", "%C0", "%80", "%ED%A0%80", "%C3"]) + enc[i:]
        elif extra < 0.14:
            tags.append("qm:pad")
            pad = rng.choice(["+", "%20", "%09", "%00", "%0A", "%E2%80%8B", "%C2%A0"])
            enc = (pad + enc) if rng.random() < 0.5 else (enc + pad)
        return enc

    def query(self, route_method, tags):
        """An optional query string; with `_method` in some shape."""
        rng = self.rng
        if rng.random() < 0.55:
            if rng.random() < 0.1:
                tags.append("query:plain")
                return rng.choice(["?", "?x=1", "?limit=1&marker=x", "?_methodx=put"])
            return ""
        target = rng.choice(self.ns_methods + [route_method] * 2 + ["GET", "DELETE"])
        value = self.method_override_value(target, tags)
        key = "_method"
        kind = rng.choices(["plain", "enc-key", "dup", "semicolon", "empty-first", "late"],
                           [60, 10, 10, 8, 6, 6])[0]
        tags.append(f"qm:{kind}")
        if kind == "plain":
            return f"?{key}={value}"
        if kind == "enc-key":
            enc_key = rng.choice(["%5Fmethod", "%5fmethod", "_%6Dethod", "_method%00", "_METHOD"])
            decoy = rng.choice(["x_method=1&", "_methods=1&", "", "a=_method&"])
            return f"?{decoy}{enc_key}={value}"
        if kind == "dup":
            other = rng.choice(["GET", "DELETE", "", "POST", "PUT"])
            if rng.random() < 0.5:
                return f"?_method={other}&_method={value}"
            return f"?_method={value}&_method={other}"
        if kind == "semicolon":
            return f"?x=1;_method={value}"
        if kind == "empty-first":
            return f"?_method=&_method={value}"
        return f"?a=1&b=2&_method={value}&c=3"

    def override_headers(self, tags):
        rng = self.rng
        if rng.random() > 0.08:
            return []
        name = rng.choice(OVERRIDE_HEADERS)
        if rng.random() < 0.3:
            name = name.lower()
        value = rng.choice(self.ns_methods + ["GET", "DELETE", "put", "post"])
        tags.append("override-header")
        return [[name, value]]

    # ---- one request ----

    def one(self):
        rng = self.rng
        tags = []
        route = rng.choice(self.ns_routes) if rng.random() < 0.65 else rng.choice(self.routes)
        route_method = rng.choice(route.methods) if route.methods else rng.choice(METHODS)
        path = self.mutate_path(self.concrete(route, tags), tags)
        target = path + self.query(route_method, tags)
        if not target.isascii():  # the batch protocol carries ASCII targets
            target = "".join(c if c.isascii() else pct_utf8(c, rng) for c in target)
        method = self.request_method(route_method, tags)
        headers = [["X-Auth-Token", "admin:admin"], ["Content-Type", "application/json"],
                   ["OpenStack-API-Version", "volume 3.71"]]
        headers += self.override_headers(tags)
        return {
            "method": method,
            "target": target,
            "headers": headers,
            "template": f"{'/'.join(route.methods or ('*',))} {route.path}",
            "intended": f"{route.controller}.{route.action}",
            "tags": tags,
        }


ABSOLUTE_FORM = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def forwarded_target(target: str) -> str:
    """The request target Cinder gets when snapguard forwards `target` (and does not refuse it).

    hyper parses the target into an `http::Uri`, and snapguard's proxy (src/proxy.rs, `forward`)
    sends its `path_and_query()` in origin form: an absolute-form target loses its scheme and
    authority (an empty path becoming "/"), and http's `PathAndQuery` drops everything from the
    first '#' (the fragment) on. Nothing else is rewritten.
    """
    m = ABSOLUTE_FORM.match(target)
    rest = target[m.end():] if m else target
    if m and not rest.startswith("/"):
        rest = "/" + rest
    cut = rest.find("#")
    return rest if cut < 0 else rest[:cut]


def _byte_class(b: int) -> str:
    if b in (0x0A, 0x0D):
        return "newline"
    if b < 0x20 or b == 0x7F:
        return "ctrl"
    if b in (0x2F, 0x5C):
        return "slash"
    if b == 0x2E:
        return "dot"
    if b == 0x20:
        return "space"
    if b >= 0x80:
        return "high"
    if chr(b).isalnum():
        return "alnum"
    return "punct"


def body_for(method_id: str | None, name_setting: dict, fallback_root: str = "snapshot") -> str:
    """The JSON body the method reads, with the reserved name in its name field."""
    roots = name_setting.get(method_id) if method_id else None
    root = next(iter(roots)) if roots else fallback_root
    return json.dumps({root: {"name": RESERVED_NAME}})


def _snapguard_batches(requests, procs):
    chunks = [requests[i:i + BATCH] for i in range(0, len(requests), BATCH)]
    wire = [[{k: r[k] for k in ("method", "target", "headers", "body")} for r in c]
            for c in chunks]
    with concurrent.futures.ThreadPoolExecutor(max_workers=procs) as pool:
        results = list(pool.map(check_batch, wire))
    return [v for chunk in results for v in chunk]


def _copy_paste(req, routed, verdict):
    line = json.dumps({k: req[k] for k in ("method", "target", "headers", "body")},
                      ensure_ascii=True)
    hdrs = " ".join(f"-H {shlex.quote(f'{n}: {v}')}" for n, v in req["headers"])
    curl = (f"curl -sS -X {shlex.quote(req['method'])} {hdrs} --data-raw "
            f"{shlex.quote(req['body'])} --request-target {shlex.quote(req['target'])} "
            f"http://127.0.0.1:8776/")
    fwd = "" if req["forwarded"] == req["target"] else f" (as forwarded: {req['forwarded']!r})"
    return (f"  cinder{fwd}: {routed.controller}.{routed.action} via {routed.route!r} "
            f"(method as routed: {routed.route_methods}, PATH_INFO {routed.path_info!r})\n"
            f"  snapguard: {verdict.get('decision')} route={verdict.get('route')} "
            f"rule={verdict.get('rule')} error={verdict.get('error')}\n"
            f"  template: {req['template']}  mutations: {', '.join(req['tags']) or '-'}\n"
            f"  batch line: {line}\n"
            f"  curl: {curl}")


def _class_of(req, routed) -> str:
    """What is unusual about a request, read off the request itself (not the generator's tags),
    to group disagreements."""
    target = req["forwarded"]
    path, _, query = target.partition("?")
    decoded = urllib.parse.unquote(path, encoding="latin-1")
    f = []
    if req["forwarded"] != req["target"]:
        f.append("absolute-form" if ABSOLUTE_FORM.match(req["target"]) else "fragment")
    if re.search(r"%2f", path, re.I):
        f.append("encoded '/'")
    if re.search(r"%5c", path, re.I) or "\\" in path:
        f.append("'\\' in path")
    if decoded.endswith("\n"):
        f.append("trailing LF")
    if "\n" in decoded[:-1] or "\r" in decoded:
        f.append("CR/LF inside")
    if "//" in path:
        f.append("'//'")
    if any(seg in (".", "..") for seg in decoded.split("/")):
        f.append("dot segment")
    if ";" in decoded:
        f.append("';'")
    if any(ord(c) < 0x20 and c not in "\r\n" for c in decoded) or "\x7f" in decoded:
        f.append("control char")
    if any(ord(c) >= 0x80 for c in decoded):
        f.append("non-ASCII byte")
    others = [m.group(0) for m in PCT_ESCAPE.finditer(path)
              if m.group(0).lower() not in ("%2f", "%5c", "%0a", "%0d")]
    if others:
        f.append("other %XX")
    if "_method" in urllib.parse.unquote(query, errors="replace") or "_method" in query:
        f.append("_method in query")
    if routed is not None and routed.route_methods and req["method"] not in routed.route_methods:
        f.append(f"sent as {req['method']!r}")
    if routed is not None and routed.match and "format" in routed.match:
        f.append(".json")
    if any(n.lower() in [h.lower() for h in OVERRIDE_HEADERS] for n, _ in req["headers"]):
        f.append("override header")
    return " + ".join(f) or "plain"


UUIDISH = re.compile(r"[0-9a-fA-F%]{8}-[0-9a-fA-F%-]{20,}")
LONG_HEX = re.compile(r"[0-9a-f]{16,}")


def _simpler(req):
    """One-step simplifications of a request (for shrinking a disagreement to its core)."""
    out = []
    method, target, headers = req["method"], req["target"], req["headers"]
    path, sep, query = target.partition("?")
    if sep:
        out.append(path)
        parts = re.split(r"([&;])", query)
        for i in range(0, len(parts), 2):
            rest = parts[:max(0, i - 1)] + parts[i + 1:] if i else parts[2:]
            out.append(path + "?" + "".join(rest))
    for m in PCT_ESCAPE.finditer(path):
        ch = chr(int(m.group(0)[1:], 16))
        if ch.isalnum() or ch in "-._~":
            out.append(target[:m.start()] + ch + target[m.end():])
    if "//" in path:
        out.append(re.sub("/{2,}", "/", path, count=1) + sep + query)
    m = UUIDISH.search(path)
    if m:
        out.append(target[:m.start()] + "x" + target[m.end():])
    m = LONG_HEX.search(path)
    if m:
        out.append(target[:m.start()] + "ab12" + target[m.end():])
    m = ABSOLUTE_FORM.match(target)
    if m and target[m.end():].startswith("/"):
        out.append(target[m.end():])
    cands = [dict(req, target=t) for t in out]
    if method != method.upper() or not method.isascii():
        cands.append(dict(req, method=method.upper() if method.isascii() else "POST"))
    extra = [h for h in headers if h[0].lower() in [o.lower() for o in OVERRIDE_HEADERS]]
    if extra:
        cands.append(dict(req, headers=[h for h in headers if h not in extra]))
    return cands


def _shrink(cases, name_setting, rounds=12):
    """Greedily shrink each (request, routed) disagreement while Cinder still dispatches it to the
    same name-setting method and snapguard still does not refuse it."""
    current = list(cases)
    for _ in range(rounds):
        cands, owner = [], []
        for k, (req, routed) in enumerate(current):
            for c in _simpler(req):
                c["forwarded"] = forwarded_target(c["target"])
                cands.append(c)
                owner.append(k)
        if not cands:
            break
        rs = cinder_router.route_many(
            [(c["method"], c["forwarded"], c["headers"], c["body"]) for c in cands], processes=1)
        vs = check_batch([{k: c[k] for k in ("method", "target", "headers", "body")}
                          for c in cands])
        changed = False
        for c, k, r, v in zip(cands, owner, rs, vs):
            req, routed = current[k]
            if (r.target == routed.target and v["decision"] not in REFUSED
                    and len(c["method"]) + len(c["target"]) + len(c["headers"])
                    < len(req["method"]) + len(req["target"]) + len(req["headers"])):
                current[k] = (c, r)
                changed = True
        if not changed:
            break
    return current


def test_cinder_dispatch_to_name_setting_is_refused(snapguard):
    router = cinder_router.CinderRouter.get()
    name_setting = cinder_router.name_setting_methods(router)
    rng = random.Random(SEED)
    gen = Generator(router, name_setting, rng)

    t0 = time.monotonic()
    reqs = [gen.one() for _ in range(N)]
    for r in reqs:  # the body the template's own method reads (routed again below if need be)
        r["body"] = body_for(r["intended"], name_setting)
    t_gen = time.monotonic() - t0

    # Cinder gets what snapguard would forward (see forwarded_target). Pass 1 (routing does not
    # read the body, except to pick a wsgi action for ".../action" routes, none of which sets a
    # name).
    t0 = time.monotonic()
    for r in reqs:
        r["forwarded"] = forwarded_target(r["target"])
    items = [(r["method"], r["forwarded"], r["headers"], r["body"]) for r in reqs]
    routed = cinder_router.route_many(items, processes=PROCS)
    # Pass 2: a name-setting method reached with another body root gets its own root, and is routed
    # again with it (the route must not change).
    redo = []
    for i, (r, res) in enumerate(zip(reqs, routed)):
        if res.target in name_setting:
            body = body_for(res.target, name_setting)
            if body != r["body"]:
                r["body"] = body
                redo.append(i)
    if redo:
        again = cinder_router.route_many(
            [(reqs[i]["method"], reqs[i]["forwarded"], reqs[i]["headers"], reqs[i]["body"])
             for i in redo], processes=PROCS)
        for i, res in zip(redo, again):
            assert res.target == routed[i].target, (reqs[i], res, routed[i])
            routed[i] = res
    # For information only: the targets snapguard rewrites when forwarding, routed as sent. A
    # name-setting dispatch here that snapguard does not refuse is safe only because of the rewrite.
    rewritten = [i for i, r in enumerate(reqs) if r["forwarded"] != r["target"]]
    raw_routed = dict(zip(rewritten, cinder_router.route_many(
        [(reqs[i]["method"], reqs[i]["target"], reqs[i]["headers"], reqs[i]["body"])
         for i in rewritten], processes=PROCS)))
    t_cinder = time.monotonic() - t0

    t0 = time.monotonic()
    verdicts = _snapguard_batches(reqs, PROCS)
    t_snapguard = time.monotonic() - t0

    dispatched_ns = [i for i, res in enumerate(routed) if res.target in name_setting]
    misses = [i for i in dispatched_ns if verdicts[i]["decision"] not in REFUSED]
    over = [i for i, res in enumerate(routed)
            if res.target not in name_setting and verdicts[i]["decision"] in REFUSED]

    raw_only = [i for i, res in raw_routed.items()
                if res.target in name_setting and routed[i].target not in name_setting
                and verdicts[i]["decision"] not in REFUSED]
    by_target = collections.Counter(routed[i].target.rsplit(".", 2)[-2] + "." +
                                    routed[i].target.rsplit(".", 1)[-1] for i in dispatched_ns)
    decisions = collections.Counter(v["decision"] for v in verdicts)
    over_rules = collections.Counter(
        f"{verdicts[i]['decision']}/{verdicts[i].get('rule')}" for i in over)
    over_cinder = collections.Counter(
        ("no route" if not routed[i].dispatched else
         f"{routed[i].controller.rsplit('.', 1)[-1]}.{routed[i].action}"
         + ("" if routed[i].target else " (no method)")) for i in over)
    summary = [
        f"router differential: seed={SEED} requests={N}",
        f"  generation {t_gen:.1f}s; cinder routing {t_cinder:.1f}s ({PROCS} procs); "
        f"snapguard {t_snapguard:.1f}s ({(N + BATCH - 1) // BATCH} batches)",
        f"  cinder dispatched {len(dispatched_ns)} to name-setting methods: {dict(by_target)}",
        f"  cinder dispatched anywhere: {sum(1 for r in routed if r.dispatched)}",
        f"  snapguard decisions: {dict(decisions)}",
        f"  missed (dispatched to name-setting, not refused): {len(misses)}",
        f"  over-blocking (refused, cinder would not set a name): {len(over)} "
        f"({100.0 * len(over) / max(1, N - len(dispatched_ns)):.1f}% of the rest); "
        f"by verdict {dict(over_rules.most_common(8))}; "
        f"cinder side {dict(over_cinder.most_common(8))}",
        "  over-blocking by request class (top 10): " + "; ".join(
            f"{n} {c}" for c, n in collections.Counter(
                _class_of(reqs[i], None) for i in over).most_common(10)),
    ]
    summary.append(
        f"  targets snapguard rewrites when forwarding (absolute form, fragment): {len(rewritten)}; "
        f"of those, reaching a name-setting method only as sent, not as forwarded, and not "
        f"refused: {len(raw_only)} (safe only thanks to the rewrite)"
        + "".join(f"\n    e.g. {reqs[i]['method']} {reqs[i]['target']!r} -> forwarded "
                  f"{reqs[i]['forwarded']!r}" for i in raw_only[:3]))
    if misses:
        classes = collections.Counter(_class_of(reqs[i], routed[i]) for i in misses)
        summary.append("  missed requests by request class:")
        for cls, n in classes.most_common(40):
            summary.append(f"    {n:6d}  {cls}")
        summary.append("  disagreements (up to 30, one per class first), each with a shrunk form:")
        shown, seen = [], set()
        for i in misses:
            c = _class_of(reqs[i], routed[i])
            if c not in seen:
                seen.add(c)
                shown.append(i)
        for i in misses:
            if len(shown) >= 30:
                break
            if i not in shown:
                shown.append(i)
        shrunk = _shrink([(reqs[i], routed[i]) for i in shown[:30]], name_setting)
        for i, (small, small_routed) in zip(shown[:30], shrunk):
            summary.append(_copy_paste(reqs[i], routed[i], verdicts[i]))
            if small is not reqs[i]:
                summary.append(f"  shrunk to: {small['method']} {small['target']}  (cinder: "
                               f"{small_routed.target.rsplit('.', 2)[-2]}."
                               f"{small_routed.action}; snapguard: not refused)")
    text = "\n".join(summary)
    print(text, file=sys.stderr)
    print(text)
    assert dispatched_ns, "no generated request reached a name-setting method in Cinder"
    assert not misses, text
