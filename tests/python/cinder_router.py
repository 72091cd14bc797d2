"""Cinder's own request routing, run for real on raw HTTP requests.

Builds the `osapi_volume` WSGI application exactly as cinder-api does (paste.deploy's `loadapp` of
the installed `etc/cinder/api-paste.ini`, the `noauth` pipeline: request_id, cors,
http_proxy_to_wsgi, faultwrap, sizelimit, osprofiler, noauth, then Cinder's v3 `APIRouter` with its
`ProjectMapper` and Routes' `RoutesMiddleware`, `_method` override included), and replaces only the
router's final dispatch (`oslo_service.wsgi.Router._dispatch`, which would call the matched
controller) with a recorder. The recorder notes the route Routes matched, the controller and action
from `environ['wsgiorg.routing_args']`, and the controller method Cinder's `wsgi.Resource` would call
for that action and body (`Resource.get_body` and `Resource.get_method`, both pure lookups), then
answers 200 without running the controller.

Raw requests are not turned into a WSGI environ here: they are fed, as bytes, through the HTTP
server cinder-api runs them through. cinder-api (`cinder/cmd/api.py`) serves with
`oslo_service.wsgi.Server`, which runs `eventlet.wsgi.server` with `eventlet.wsgi.HttpProtocol`;
this module runs that very `HttpProtocol` over an in-memory connection with an `eventlet.wsgi.Server`
configured the way oslo.service configures it, so the request line split, the `//` collapse of
Python's `BaseHTTPRequestHandler`, header parsing, PATH_INFO (`urllib.parse.unquote(path,
encoding='latin1')`, PEP 3333), QUERY_STRING (raw), REQUEST_METHOD (as sent), and eventlet's own
400/414 refusals are all the real ones.

What is not real: the database (an in-memory SQLite engine, never queried by routing), the message
bus (oslo.messaging's in-process `fake:` transport) and the minimum-service-version lookups the RPC
clients make at construction (answered "no service yet", which Cinder handles by using its own
versions). None of these takes part in routing.

Use `CinderRouter.get()` for the process-wide instance (building it takes about a second).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pathlib
import sys
import threading
import warnings

warnings.simplefilter("ignore")  # eventlet's and oslo's deprecation warnings: noise here

HERE = pathlib.Path(__file__).resolve().parent

# The roots of the request bodies that carry a snapshot's name, by the controller method that reads
# them: derived from the methods' JSON schemas by `name_setting_methods()`; see there.
NAME_FIELDS = ("name", "display_name", "description", "display_description")
SNAPSHOT_ROOTS = ("snapshot", "group_snapshot", "cgsnapshot")


def paste_ini() -> pathlib.Path:
    """The api-paste.ini installed with Cinder in this virtual environment."""
    path = pathlib.Path(sys.prefix) / "etc" / "cinder" / "api-paste.ini"
    if not path.is_file():
        raise RuntimeError(f"no api-paste.ini at {path}: run tests/python/setup.sh's venv python")
    return path


@dataclasses.dataclass(frozen=True)
class Routed:
    """What Cinder did with one raw request."""

    status: str  # the status line the server answered with ("" when none)
    dispatched: bool  # whether the router matched a route and would call a controller
    controller: str | None = None  # e.g. "cinder.api.v3.snapshots.SnapshotsController"
    action: str | None = None  # the route's action, e.g. "create", "update", "action"
    route: str | None = None  # the Routes path of the matched route
    route_methods: tuple[str, ...] | None = None  # the route's method condition
    target: str | None = None  # the controller method Cinder would call: "Class.method" (module.)
    target_error: str | None = None  # why no method would be called (unknown action, ...)
    path_info: str | None = None  # PATH_INFO as the router saw it
    request_method: str | None = None  # REQUEST_METHOD as the server set it (before _method)
    match: dict | None = None  # the route's variables (project_id, id, format...)


class _FakeConnection:
    """An accepted socket for HttpProtocol: reads the raw request, keeps what is written."""

    class _Sink(io.BytesIO):
        def close(self):  # StreamRequestHandler.finish closes wfile: keep the bytes readable
            pass

    def __init__(self, raw: bytes):
        self._raw = raw
        self.out = self._Sink()

    def makefile(self, mode, bufsize=-1):
        if "r" in mode:
            return io.BufferedReader(io.BytesIO(self._raw))
        return self.out

    def setsockopt(self, *args):
        pass

    def settimeout(self, timeout):
        pass

    def getsockname(self):
        return ("127.0.0.1", 8776)

    def shutdown(self, how):
        pass

    def close(self):
        pass


class _FakeListener:
    """The listening socket eventlet.wsgi.Server keeps (only asked whether it does TLS)."""

    def getsockname(self):
        return ("0.0.0.0", 8776)


def _configure_cinder():
    """oslo.config and the process state cinder-api sets up, minimally, for loading its app."""
    from oslo_config import cfg

    from cinder.common import config  # noqa: F401  (registers the options)
    from cinder import objects

    objects.register_all()
    conf = cfg.CONF
    conf([], project="cinder", default_config_files=[])
    conf.set_override("auth_strategy", "noauth")
    conf.set_override("connection", "sqlite://", group="database")
    config.set_middleware_defaults()

    import oslo_messaging
    from cinder import rpc
    from cinder import utils

    rpc.TRANSPORT = oslo_messaging.get_rpc_transport(conf, url="fake:/")
    rpc.NOTIFICATION_TRANSPORT = oslo_messaging.get_notification_transport(conf, url="fake:/")
    rpc.NOTIFIER = utils.DO_NOTHING
    # The RPC clients built with the controllers ask the services table for the lowest running
    # version; "none running" makes them use their own, as Cinder does on a fresh deployment.
    objects.Service.get_minimum_obj_version = classmethod(lambda cls, ctx, binary=None: None)
    objects.Service.get_minimum_rpc_version = classmethod(lambda cls, ctx, binary=None: None)

    from oslo_service import _options as service_options
    conf.register_opts(service_options.wsgi_opts)

    for name in ("cinder", "oslo_messaging", "routes", "eventlet", "osprofiler", "oslo_db"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return conf


class CinderRouter:
    """Cinder's WSGI app behind eventlet's HttpProtocol, with a recording final dispatch."""

    _instance: CinderRouter | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> CinderRouter:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        conf = _configure_cinder()
        import webob
        import webob.dec
        from oslo_service import wsgi as base_wsgi
        from paste.deploy import loadapp

        from cinder.api.openstack import wsgi as cinder_wsgi
        from cinder.api.v3 import router as v3_router

        self._record: dict = {}
        routers = []
        record = self._record

        @webob.dec.wsgify(RequestClass=base_wsgi.Request)
        def recording_dispatch(req):
            # Stands in for oslo_service.wsgi.Router._dispatch: same input (the routing args
            # RoutesMiddleware left in the environ), but records instead of calling the controller.
            match = req.environ["wsgiorg.routing_args"][1]
            route = req.environ.get("routes.route")
            record["path_info"] = req.environ.get("PATH_INFO")
            record["request_method"] = req.environ.get("REQUEST_METHOD")
            if not match:
                record["dispatched"] = False
                return webob.Response(status=404, body=b"no route")
            record["dispatched"] = True
            record["match"] = {k: v for k, v in match.items() if k not in ("controller", "action")}
            resource = match["controller"]
            action = match.get("action")
            record["controller"] = _class_name(resource.controller)
            record["action"] = action
            if route is not None:
                record["route"] = route.routepath
                methods = (route.conditions or {}).get("method")
                record["route_methods"] = tuple(methods) if methods else None
            try:
                # As Resource.__call__ does, on its own Request class (get_content_type & co).
                creq = cinder_wsgi.Request(req.environ)
                content_type, body = resource.get_body(creq)
                meth, _extensions = resource.get_method(creq, action, content_type, body)
                record["target"] = method_id(meth)
            except Exception as exc:  # what Resource._process_stack turns into 404/400
                record["target_error"] = f"{type(exc).__name__}: {exc}"
            return webob.Response(status=200, body=b"recorded")

        original_init = v3_router.APIRouter.__init__

        def init_and_keep(router_self, *args, **kwargs):
            original_init(router_self, *args, **kwargs)
            routers.append(router_self)

        saved_dispatch = v3_router.APIRouter.__dict__.get("_dispatch")
        v3_router.APIRouter._dispatch = staticmethod(recording_dispatch)
        v3_router.APIRouter.__init__ = init_and_keep
        try:
            self.app = loadapp(f"config:{paste_ini()}", name="osapi_volume")
        finally:
            v3_router.APIRouter.__init__ = original_init
            if saved_dispatch is None:
                del v3_router.APIRouter._dispatch
            else:
                v3_router.APIRouter._dispatch = saved_dispatch
        if len(routers) != 1:
            raise RuntimeError(f"expected one v3 APIRouter in the paste app, built {len(routers)}")
        self.router = routers[0]
        self.mapper = self.router.map

        import eventlet.wsgi

        class QuietHttpProtocol(eventlet.wsgi.HttpProtocol):
            # eventlet.wsgi.HttpProtocol, but BaseHTTPRequestHandler's stderr log of the requests
            # it refuses (400/414) goes nowhere. Logging only: nothing else differs.
            def log_message(self, format, *args):
                pass

        self._protocol = QuietHttpProtocol
        # oslo_service.wsgi.Server.__init__ sets this from [DEFAULT] max_header_line.
        eventlet.wsgi.MAX_HEADER_LINE = conf.max_header_line
        self._eventlet = eventlet.wsgi
        # As oslo_service.wsgi.Server.start() configures eventlet.wsgi.server (cinder passes no
        # max_url_len, so eventlet's default url_length_limit applies). Logging off: no routing
        # effect.
        self.server = eventlet.wsgi.Server(
            _FakeListener(),
            ("0.0.0.0", 8776),
            self.app,
            log=None,
            environ=None,
            max_http_version=eventlet.wsgi.DEFAULT_MAX_HTTP_VERSION,
            protocol=QuietHttpProtocol,
            minimum_chunk_size=None,
            log_x_forwarded_for=True,
            keepalive=conf.wsgi_keep_alive,
            log_output=False,
            log_format=conf.wsgi_log_format,
            url_length_limit=eventlet.wsgi.MAX_REQUEST_LINE,
            debug=conf.wsgi_server_debug,
            socket_timeout=conf.client_socket_timeout or None,
        )

    # ---- requests ----------------------------------------------------------------------------

    def route_raw(self, raw: bytes) -> Routed:
        """Serve one raw HTTP/1.1 request (bytes as on the wire) and say where Cinder routed it."""
        self._record.clear()
        conn = _FakeConnection(raw)
        conn_state = [("127.0.0.1", 40000), conn, self._eventlet.STATE_IDLE]
        self._protocol(conn_state, self.server)
        out = conn.out.getvalue()
        status = out.split(b"\r\n", 1)[0].decode("latin-1") if out else ""
        rec = dict(self._record)
        if not rec.get("dispatched"):
            return Routed(status=status, dispatched=False, path_info=rec.get("path_info"))
        return Routed(status=status, **rec)

    def route(self, method: str, target: str, headers=(), body: str | bytes = b"") -> Routed:
        """Route a request given as the batch protocol gives it (method, raw target, headers)."""
        return self.route_raw(raw_request(method, target, headers, body))

    # ---- the route table ---------------------------------------------------------------------

    def routes(self) -> list[RouteInfo]:
        """Every route of Cinder's v3 mapper, in match order."""
        out = []
        for r in self.mapper.matchlist:
            controller = r.defaults.get("controller")
            methods = (r.conditions or {}).get("method")
            out.append(RouteInfo(
                name=r.name,
                path=r.routepath,
                regexp=getattr(r, "regexp", None),
                methods=tuple(methods) if methods else None,
                requirements=dict(r.reqs),
                controller=_class_name(controller.controller) if controller is not None else None,
                action=r.defaults.get("action"),
                resource=controller,
                redirect=bool(getattr(r, "redirect", False)),
            ))
        return out

    def resources(self):
        """The distinct wsgi.Resource objects routes lead to."""
        seen = {}
        for r in self.mapper.matchlist:
            res = r.defaults.get("controller")
            if res is not None:
                seen[id(res)] = res
        return list(seen.values())


@dataclasses.dataclass(frozen=True)
class RouteInfo:
    name: str | None
    path: str
    regexp: str | None
    methods: tuple[str, ...] | None
    requirements: dict
    controller: str | None
    action: str | None
    resource: object = dataclasses.field(compare=False, repr=False)
    redirect: bool = False


def raw_request(method: str, target: str, headers=(), body: str | bytes = b"") -> bytes:
    """The bytes a client sends for this request. Text is sent as UTF-8 (so a non-ASCII method or
    target reaches the server as its UTF-8 bytes, which eventlet then reads as latin-1)."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    lines = [f"{method} {target} HTTP/1.1"]
    names = set()
    for name, value in headers:
        lines.append(f"{name}: {value}")
        names.add(name.lower())
    if "host" not in names:
        lines.insert(1, "Host: cinder:8776")
    if "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def _class_name(obj) -> str | None:
    if obj is None:
        return None
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def method_id(meth) -> str:
    """A stable name for the controller method `Resource.get_method` returned.

    A plain bound method: its class and function name. A microversioned method: Cinder's
    `Controller.__getattribute__` hands out a `version_select` closure over the controller and the
    attribute name; read those from the closure.
    """
    self_obj = getattr(meth, "__self__", None)
    if self_obj is not None:
        return f"{_class_name(self_obj)}.{meth.__func__.__name__}"
    code = getattr(meth, "__code__", None)
    if code is not None and meth.__closure__:
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in meth.__closure__)))
        if "self" in cells and "key" in cells:
            return f"{_class_name(cells['self'])}.{cells['key']}"
    return f"{getattr(meth, '__module__', '?')}.{getattr(meth, '__qualname__', repr(meth))}"


# ---- which controller methods set a snapshot's name -------------------------------------------


def method_functions(controller, name):
    """The plain functions behind `controller.<name>`: every microversion of it, each unwrapped
    through its decorators (validation.schema, wsgi.response, ... keep `__wrapped__`)."""
    ver = getattr(type(controller), "versioned_methods", None) or {}
    # Controller.__getattribute__ maps '-' to '_' for non-versioned names.
    if name in ver:
        funcs = [vm.func for vm in ver[name]]
    else:
        attr = getattr(type(controller), name.replace("-", "_"), None)
        funcs = [attr] if attr is not None else []
    out = []
    for f in funcs:
        chain = []
        while f is not None:
            chain.append(f)
            f = getattr(f, "__wrapped__", None)
        out.append(chain)
    return out


def request_schemas(controller, name):
    """The request-body JSON schemas `validation.schema` registered on `controller.<name>`."""
    schemas = []
    for chain in method_functions(controller, name):
        for f in chain:
            s = f.__dict__.get("_request_schema") if hasattr(f, "__dict__") else None
            if s is not None and all(s is not t for t in schemas):
                schemas.append(s)
    return schemas


def schema_name_fields(schema) -> dict[str, list[str]]:
    """{body root: [name/description fields]} for the snapshot roots this schema accepts."""
    out = {}
    props = schema.get("properties", {}) if isinstance(schema, dict) else {}
    for root in SNAPSHOT_ROOTS:
        sub = props.get(root)
        if not isinstance(sub, dict):
            continue
        fields = [f for f in NAME_FIELDS if f in sub.get("properties", {})]
        if fields:
            out[root] = fields
    return out


def reachable_methods(router: CinderRouter):
    """Every (resource, method name, how) the mapper's routes can make Cinder call.

    For a route's action: the controller's method of that name; for action "action" (and, as
    Resource.get_method does when the controller lacks the method, create/update/delete), every
    wsgi action registered on the resource, picked by the body's key.
    """
    seen = {}
    for info in router.routes():
        res = info.resource
        if res is None or info.action is None:
            continue
        ctrl = res.controller
        if ctrl is not None and method_functions(ctrl, info.action):
            seen[(id(ctrl), info.action)] = (ctrl, info.action, f"route action {info.action!r}")
        elif info.action in ("action", "create", "delete", "update"):
            for key, bound in res.wsgi_actions.items():
                owner = _wsgi_action_owner(res, key)
                name = owner.wsgi_actions[key]
                seen[(id(owner), name)] = (owner, name, f"wsgi action {key!r}")
    return list(seen.values())


def _wsgi_action_owner(resource, key):
    """The controller (main or extension) whose method is registered for wsgi action `key`."""
    bound = resource.wsgi_actions[key]
    owner = getattr(bound, "__self__", None)
    if owner is None and getattr(bound, "__closure__", None):
        cells = dict(zip(bound.__code__.co_freevars, (c.cell_contents for c in bound.__closure__)))
        owner = cells.get("self")
    if owner is None:
        raise RuntimeError(f"cannot tell which controller handles wsgi action {key!r}")
    return owner


def name_setting_methods(router: CinderRouter) -> dict[str, dict[str, list[str]]]:
    """{method id: {body root: fields}} for every reachable controller method whose request schema
    accepts a name or description under a snapshot body root ("snapshot", "group_snapshot",
    "cgsnapshot"). Derived from the schemas, not listed by hand."""
    out = {}
    for ctrl, name, _how in reachable_methods(router):
        found = {}
        for schema in request_schemas(ctrl, name):
            for root, fields in schema_name_fields(schema).items():
                found.setdefault(root, [])
                found[root] += [f for f in fields if f not in found[root]]
        if found:
            out[f"{_class_name(ctrl)}.{name}"] = found
    return out


# ---- routing many requests, in parallel worker processes -------------------------------------

_WORKER_ROUTER: CinderRouter | None = None


def _worker_init():
    global _WORKER_ROUTER
    _WORKER_ROUTER = CinderRouter.get()


def _worker_route(item):
    method, target, headers, body = item
    return _WORKER_ROUTER.route(method, target, headers, body)


def route_many(requests, processes: int | None = None, chunksize: int = 500) -> list[Routed]:
    """Route (method, target, headers, body) tuples; forks `processes` workers (default: the CPU
    count) sharing the app built in this process."""
    requests = list(requests)
    router = CinderRouter.get()
    processes = processes or os.cpu_count() or 1
    if processes <= 1 or len(requests) < 2000:
        return [router.route(*r) for r in requests]
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes, initializer=_worker_init) as pool:
        return pool.map(_worker_route, requests, chunksize=chunksize)
