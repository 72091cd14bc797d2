#!/usr/bin/env python3
"""Checks of the deploy files that no off-the-shelf linter makes; run by deploy/validate.sh.

    python3 deploy/validate.py configs OUTDIR [TLSDIR]
                                                write every embedded snapguard config to OUTDIR;
                                                with TLSDIR, the files of their [tls] tables are
                                                TLSDIR's files of the same names
    python3 deploy/validate.py without-crds IN OUT
                                                copy a rendered kustomization without the objects
                                                of CRDs that have no schema here
    python3 deploy/validate.py build-command    print the Dockerfile's cargo build command
    python3 deploy/validate.py context          the Dockerfile's COPY lines carry all build inputs
    python3 deploy/validate.py consistency      the manifests, Dockerfile and unit agree

Paths are relative to the repository root, which must be the working directory. Each check
prints "ok    ..." or "FAIL  ..." on a line of its own; the exit status is 1 if any failed.
Needs Python 3.11+ (tomllib) and PyYAML (installed with yamllint and kubernetes-validate).
"""

import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import yaml

DOCKERFILE = Path("deploy/container/Dockerfile")
KUBERNETES = Path("deploy/kubernetes")
SYSTEMD_UNIT = Path("deploy/systemd/snapguard.service")
SYSTEMD_CONFIG = Path("deploy/systemd/snapguard.toml")
CONFIG_KEY = "snapguard.toml"
# Kinds from CRDs (Prometheus Operator, cert-manager) that kubernetes-validate has no schema for;
# validate.py checks them itself (consistency).
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com/v1", "Certificate": "cert-manager.io/v1"}
# The [tls] keys that name files.
TLS_FILE_KEYS = ("cert_file", "key_file", "client_ca_file")
# SnapguardTLSCertificateExpiresSoon (deploy/prometheus/alerts.yaml) fires at 14 days left; a
# Certificate must be renewed before that, so that the alert means the renewal failed.
ALERT_DAYS_LEFT = 14

failures = 0


def report(ok, what, detail=""):
    global failures
    if ok:
        print(f"ok    {what}")
    else:
        failures += 1
        print(f"FAIL  {what}" + (f": {detail}" if detail else ""))


def cargo_version():
    return tomllib.loads(Path("Cargo.toml").read_text())["package"]["version"]


# ---- Kubernetes manifests ----------------------------------------------------------------


def manifest_files(directory=KUBERNETES):
    return sorted(p for p in directory.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def embedded_configs():
    """(label, text) of every snapguard.toml carried by a ConfigMap under deploy/kubernetes."""
    found = []
    for path in manifest_files():
        for doc in documents(path):
            if doc.get("kind") == "ConfigMap" and CONFIG_KEY in (doc.get("data") or {}):
                found.append((f"{path}:{doc['metadata']['name']}", doc["data"][CONFIG_KEY]))
    return found


def with_tls_files_in(text, tls_dir):
    """The config text with each file named in its [tls] table replaced by the file of the same
    name in tls_dir, line for line (so that check-config's line numbers still hold). The paths
    in the manifests are where a Secret is mounted in the pod, which does not exist here."""
    out, table = [], None
    for line in text.splitlines(keepends=True):
        header = re.match(r"\s*\[([^\]]+)\]\s*(#.*)?$", line)
        if header:
            table = header.group(1).strip()
        key = re.match(r'(\s*)(%s)(\s*=\s*)"([^"]*)"(.*)$' % "|".join(TLS_FILE_KEYS), line, re.S)
        if table == "tls" and key:
            indent, name, eq, path, rest = key.groups()
            line = f'{indent}{name}{eq}"{Path(tls_dir) / Path(path).name}"{rest}'
        out.append(line)
    return "".join(out)


def cmd_configs(outdir, tls_dir=None):
    """Writes each config to OUTDIR and prints "LABEL<TAB>FILE" for each."""
    outdir = Path(outdir)
    configs = embedded_configs()
    if not configs:
        print(f"no ConfigMap with a {CONFIG_KEY} key under {KUBERNETES}", file=sys.stderr)
        return 1
    configs.append((str(SYSTEMD_CONFIG), SYSTEMD_CONFIG.read_text()))
    for i, (label, text) in enumerate(configs):
        name = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
        target = outdir / f"{i:02}-{name}.toml"
        if tls_dir and "tls" in tomllib.loads(text):
            text = with_tls_files_in(text, tls_dir)
            label += f" ([tls] files from {tls_dir})"
        target.write_text(text)
        print(f"{label}\t{target}")
    return 0


def cmd_without_crds(source, target):
    """Copies a multi-document YAML file without the objects of CRD_KINDS; says which it left."""
    with open(source) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kept = [d for d in docs if d.get("kind") not in CRD_KINDS]
    left = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs if d.get("kind") in CRD_KINDS)
    with open(target, "w") as f:
        yaml.safe_dump_all(kept, f, sort_keys=False)
    print(", ".join(left) if left else "none")
    return 0


# ---- Dockerfile -------------------------------------------------------------------------


def dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    result, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def stages():
    """The Dockerfile's stages, each a list of instructions starting with its FROM."""
    result = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def build_command():
    runs = [args for stage in stages() for keyword, args in stage
            if keyword == "RUN" and re.match(r"cargo\s+build\b", args)]
    if len(runs) != 1:
        raise SystemExit(f"{DOCKERFILE}: expected one `RUN cargo build ...`, found {len(runs)}")
    return shlex.split(runs[0])


def cmd_build_command():
    print("\n".join(build_command()))
    return 0


def copy_sources(stage):
    """Sources of the stage's COPY/ADD instructions from the build context."""
    sources = []
    for keyword, args in stage:
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        if any(w.startswith("--from=") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        sources += [os.path.normpath(w) for w in words[:-1]]
    return sources


def dockerignore_patterns():
    patterns = []
    for line in Path(".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip("/"))
        regex = "".join(
            ".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", pattern)
        )
        patterns.append((re.compile(regex + "$"), negate))
    return patterns


def ignored(path, patterns):
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for regex, negate in patterns:
        if any(regex.match(p) for p in prefixes):
            verdict = not negate
    return verdict


def build_inputs():
    """Files that `cargo build --release` reads beyond src/: manifests, build script, includes.

    include_str!/include_bytes! after the first #[cfg(test)] of a file are taken to be in its
    test module, which a release build does not compile.
    """
    inputs = {"Cargo.toml", "Cargo.lock"}
    if Path("build.rs").exists():
        inputs.add("build.rs")
    for rs in Path("src").rglob("*.rs"):
        text = rs.read_text().split("#[cfg(test)]", 1)[0]
        for target in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', text):
            inputs.add(os.path.relpath(os.path.normpath(rs.parent / target)))
    for rs in Path("src").rglob("*"):
        if rs.is_file():
            inputs.add(str(rs))
    return inputs


def cmd_context():
    all_stages = stages()
    builder = next((s for s in all_stages if any(k == "RUN" and "cargo build" in a for k, a in s)), None)
    report(builder is not None, "Dockerfile: a builder stage runs cargo build")
    if builder is None:
        return 1
    sources = copy_sources(builder)

    def covered(path):
        return any(path == s or path.startswith(s.rstrip("/") + "/") for s in sources)

    missing = sorted(p for p in build_inputs() if not covered(p))
    report(not missing, "Dockerfile: the builder's COPY lines carry every build input",
           f"not copied: {', '.join(missing)}")
    patterns = dockerignore_patterns()
    excluded = []
    for source in sources:
        files = [source] if Path(source).is_file() else \
            [str(p) for p in Path(source).rglob("*") if p.is_file()]
        if not Path(source).exists():
            excluded.append(f"{source} (does not exist)")
        excluded += [f for f in files if ignored(f, patterns)]
    report(not excluded, ".dockerignore keeps every COPY source in the build context",
           f"excluded: {', '.join(excluded[:10])}")
    kept_out = [p for p in ("target", ".git") if not ignored(p, patterns)]
    report(not kept_out, ".dockerignore keeps target/ and .git/ out of the build context",
           f"not ignored: {', '.join(kept_out)}")
    # The final stage copies the binary from where the builder leaves it.
    workdir = next((a for k, a in builder if k == "WORKDIR"), "/")
    expected = f"{workdir.rstrip('/')}/target/release/snapguard"
    from_builder = [shlex.split(a) for s in all_stages for k, a in s
                    if k == "COPY" and "--from=" in a]
    report(any(expected in words for words in from_builder),
           f"Dockerfile: the runtime stage copies {expected}")
    return 1 if failures else 0


# ---- consistency ------------------------------------------------------------------------


def parse_duration(text):
    """Seconds in a humantime duration such as "30s", "500ms", "1m 30s"."""
    units = {"ms": 0.001, "msec": 0.001, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
             "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
             "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]+)", text)
    if not parts or re.sub(r"[\d\sa-z]", "", text):
        raise ValueError(f"cannot parse duration {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def shutdown_grace(config_text):
    config = tomllib.loads(config_text)
    return parse_duration(config.get("timeouts", {}).get("shutdown_grace", "30s"))


def systemd_seconds(value):
    value = value.strip()
    return float(value) if re.fullmatch(r"\d+(\.\d+)?", value) else parse_duration(value)


def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def port_number(container, port):
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def host_port(address):
    host, _, port = (address or "").rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None


def check_snapguard_container(where, pod, container, config_maps, sidecar):
    """The rules every snapguard container in these manifests follows."""
    what = f"{where}: container {container['name']}"
    env = env_of(container)
    image = container.get("image", "")
    report(image.endswith(":" + cargo_version()), f"{what}: image tag is the crate version {cargo_version()}",
           image)

    # SNAPGUARD_CONFIG names the snapguard.toml of a ConfigMap in the same directory.
    config_path = Path(env.get("SNAPGUARD_CONFIG", ""))
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    text = None
    for mount in container.get("volumeMounts", []):
        if config_path == Path(mount["mountPath"]) / CONFIG_KEY:
            name = volumes.get(mount["name"], {}).get("configMap", {}).get("name")
            text = config_maps.get(name)
    config = tomllib.loads(text) if text is not None else {}

    listen_host, listen_port = host_port(env.get("SNAPGUARD_LISTEN"))
    admin_host, admin_port = host_port(env.get("SNAPGUARD_ADMIN"))
    if sidecar:
        report(listen_host == "127.0.0.1", f"{what}: listens on loopback only", env.get("SNAPGUARD_LISTEN"))
        report(container.get("restartPolicy") == "Always",
               f"{what}: is a native sidecar (initContainers, restartPolicy: Always)")
    else:
        # With [tls] the port serves HTTPS, and is named so.
        port_name = "https" if "tls" in config else "http"
        report(listen_host == "0.0.0.0" and port_number(container, port_name) == listen_port,
               f"{what}: listens on 0.0.0.0 at the port named {port_name}", env.get("SNAPGUARD_LISTEN"))
    report(admin_host == "0.0.0.0", f"{what}: admin listens on 0.0.0.0 (kubelet probes the pod IP)",
           env.get("SNAPGUARD_ADMIN"))

    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        report(get.get("path") == path and port_number(container, get.get("port")) == admin_port,
               f"{what}: {probe} GETs {path} on the admin port {admin_port}",
               f"{get.get('path')} on {get.get('port')}")

    sc, psc = container.get("securityContext", {}), pod.get("securityContext", {})
    hardened = (
        (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) is True
        and sc.get("readOnlyRootFilesystem") is True
        and sc.get("allowPrivilegeEscalation") is False
        and "ALL" in sc.get("capabilities", {}).get("drop", [])
        and (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault"
    )
    report(hardened, f"{what}: non-root, read-only root, no privilege escalation, no capabilities, "
           "RuntimeDefault seccomp")
    res = container.get("resources", {})
    report({"cpu", "memory"} <= set(res.get("requests", {})) and "memory" in res.get("limits", {}),
           f"{what}: requests CPU and memory, limits memory")

    report(text is not None, f"{what}: SNAPGUARD_CONFIG is the {CONFIG_KEY} of a ConfigMap mounted from "
           "this directory", str(config_path))
    if text is not None:
        report("listen" not in config and "admin" not in config,
               f"{what}: its config leaves listen/admin to the environment, which would override them")
        check_tls_files(what, pod, container, config.get("tls"))
    return text


def check_tls_files(what, pod, container, tls):
    """Each file of [tls] is a key of a Secret volume mounted as a directory: never through a
    subPath mount, which the kubelet does not update (a renewed certificate would never reach
    snapguard), and not world-readable."""
    if not tls:
        return
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    secrets = {}
    for key in TLS_FILE_KEYS:
        if key not in tls:
            continue
        path = Path(tls[key])
        mounts = [m for m in container.get("volumeMounts", []) if Path(m["mountPath"]) == path.parent]
        secret = volumes.get(mounts[0]["name"], {}).get("secret") if len(mounts) == 1 else None
        ok = secret is not None and "subPath" not in mounts[0] and "subPathExpr" not in mounts[0]
        items = (secret or {}).get("items")
        if ok and items is not None:
            ok = any(i.get("path") == path.name for i in items)
        report(ok, f"{what}: tls.{key} {path} is a file of a Secret volume mounted as a directory "
               "(no subPath, which would never be updated)")
        if secret is not None:
            secrets[secret.get("secretName")] = secret
    for name, secret in secrets.items():
        mode = secret.get("defaultMode", 0o644)
        report(mode & 0o007 == 0, f"{what}: the Secret {name} is mounted not world-readable",
               f"defaultMode {mode:o}")
        if mode & 0o070:
            report(pod.get("securityContext", {}).get("fsGroup") is not None,
                   f"{what}: fsGroup is set, so the group-readable Secret {name} is readable")


def secret_names(docs):
    """The Secrets the pods of these Deployments mount, by name."""
    names = set()
    for deployment in docs.get("Deployment", []):
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                names.add(volume["secret"].get("secretName"))
    return names


# cert-manager.io/v1 Certificate spec fields (cert-manager 1.15): a misspelt one fails here,
# since no schema checks it.
CERTIFICATE_FIELDS = {
    "subject", "literalSubject", "commonName", "duration", "renewBefore", "renewBeforePercentage",
    "dnsNames", "ipAddresses", "uris", "otherNames", "emailAddresses", "secretName",
    "secretTemplate", "keystores", "issuerRef", "isCA", "usages", "privateKey",
    "encodeUsagesInRequest", "revisionHistoryLimit", "additionalOutputFormats", "nameConstraints",
}
PRIVATE_KEY_FIELDS = {"rotationPolicy", "encoding", "algorithm", "size"}
ISSUER_REF_FIELDS = {"name", "kind", "group"}


def check_certificates(where, docs):
    mounted = secret_names(docs)
    services = [s["metadata"]["name"] for s in docs.get("Service", [])]
    for cert in docs.get("Certificate", []):
        name = cert["metadata"]["name"]
        what = f"{where}: Certificate {name}"
        spec = cert.get("spec", {})
        report(cert.get("apiVersion") == CRD_KINDS["Certificate"], f"{what}: apiVersion {CRD_KINDS['Certificate']}",
               cert.get("apiVersion"))
        unknown = sorted(set(spec) - CERTIFICATE_FIELDS)
        unknown += [f"privateKey.{k}" for k in sorted(set(spec.get("privateKey", {})) - PRIVATE_KEY_FIELDS)]
        unknown += [f"issuerRef.{k}" for k in sorted(set(spec.get("issuerRef", {})) - ISSUER_REF_FIELDS)]
        report(not unknown, f"{what}: only cert-manager v1 fields", ", ".join(unknown))
        report(bool(spec.get("issuerRef", {}).get("name")), f"{what}: names an issuer")
        report(spec.get("secretName") in mounted,
               f"{what}: writes a Secret the Deployment mounts ({spec.get('secretName')})", str(sorted(mounted)))
        dns = spec.get("dnsNames", [])
        for service in services:
            report(service in dns and any(d.startswith(f"{service}.") and ".svc" in d for d in dns),
                   f"{what}: covers the Service {service} by its short and .svc names", str(dns))
        report("server auth" in spec.get("usages", ["server auth"]), f"{what}: usable for server auth")
        duration = parse_duration(spec.get("duration", "2160h"))
        renew = parse_duration(spec.get("renewBefore", "720h")) if "renewBefore" in spec else duration / 3
        report(ALERT_DAYS_LEFT * 86400 < renew < duration,
               f"{what}: renewed before the expiry alert's {ALERT_DAYS_LEFT} days and within its lifetime",
               f"renewBefore {renew / 86400:g}d, duration {duration / 86400:g}d")


def check_directory(directory):
    where = str(directory)
    docs = {}
    for path in manifest_files(directory):
        for doc in documents(path):
            docs.setdefault(doc["kind"], []).append(doc)
    config_maps = {d["metadata"]["name"]: d.get("data", {}).get(CONFIG_KEY)
                   for d in docs.get("ConfigMap", [])}

    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    present = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    report(listed <= present and present - listed <= {"servicemonitor.yaml"},
           f"{where}: kustomization.yaml lists every manifest (the ServiceMonitor is optional)",
           f"listed {sorted(listed)}, present {sorted(present)}")

    for deployment in docs.get("Deployment", []):
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        report(subset(spec["selector"]["matchLabels"], labels),
               f"{where}: Deployment {name} selects its own pod template")

        sidecars = [c for c in pod.get("initContainers", []) if "snapguard" in c.get("image", "")]
        mains = [c for c in pod.get("containers", []) if "snapguard" in c.get("image", "")]
        report(len(sidecars) + len(mains) == 1, f"{where}: Deployment {name} runs one snapguard container")
        grace_period = pod.get("terminationGracePeriodSeconds", 30)
        for container, sidecar in [(c, True) for c in sidecars] + [(c, False) for c in mains]:
            text = check_snapguard_container(f"{where}: Deployment {name}", pod, container,
                                             config_maps, sidecar)
            if text is None:
                continue
            grace = shutdown_grace(text)
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            if not sidecar:
                report(pre_stop > 0, f"{where}: Deployment {name} sleeps in preStop until endpoints are gone")
            report(grace_period > pre_stop + grace,
                   f"{where}: terminationGracePeriodSeconds {grace_period} > preStop {pre_stop}s "
                   f"+ shutdown_grace {grace:g}s")

        for service in docs.get("Service", []):
            report(subset(service["spec"]["selector"], labels),
                   f"{where}: Service {service['metadata']['name']} selects Deployment {name}'s pods")
            containers = pod.get("containers", []) + pod.get("initContainers", [])
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                report(any(port_number(c, target) for c in containers),
                       f"{where}: Service port {port['name']} targets a container port ({target})")
        for pdb in docs.get("PodDisruptionBudget", []):
            report(subset(pdb["spec"]["selector"]["matchLabels"], labels),
                   f"{where}: PodDisruptionBudget {pdb['metadata']['name']} covers Deployment {name}'s pods")
        for hpa in docs.get("HorizontalPodAutoscaler", []):
            target = hpa["spec"]["scaleTargetRef"]
            if target["kind"] == "Deployment" and target["name"] == name:
                report("replicas" not in spec,
                       f"{where}: Deployment {name} leaves replicas to HorizontalPodAutoscaler "
                       f"{hpa['metadata']['name']}")
                report(hpa["spec"].get("minReplicas", 1) >= 2,
                       f"{where}: HorizontalPodAutoscaler keeps at least two replicas")
    for hpa in docs.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]
        report(any(d["metadata"]["name"] == target["name"] for d in docs.get(target["kind"], [])),
               f"{where}: HorizontalPodAutoscaler {hpa['metadata']['name']} targets {target['kind']} "
               f"{target['name']} of this directory")

    check_certificates(where, docs)

    for monitor in docs.get("ServiceMonitor", []):
        services = [s for s in docs.get("Service", [])
                    if subset(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        report(len(services) == 1,
               f"{where}: ServiceMonitor {monitor['metadata']['name']} selects one Service")
        port_names = {p["name"] for s in services for p in s["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            report(endpoint.get("port") in port_names and endpoint.get("path") == "/metrics",
                   f"{where}: ServiceMonitor scrapes /metrics on Service port {endpoint.get('port')}")


def check_dockerfile():
    final = stages()[-1]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in final if k == "ARG" and "=" in a}
    report(args.get("VERSION") == cargo_version(),
           f"Dockerfile: ARG VERSION defaults to the crate version {cargo_version()}", args.get("VERSION"))
    user = next((a for k, a in reversed(final) if k == "USER"), "")
    report(re.fullmatch(r"[1-9]\d*(:\d+)?", user) is not None, "Dockerfile: runs as a numeric non-root USER",
           user)
    env = dict(w.split("=", 1) for k, a in final if k == "ENV" for w in shlex.split(a) if "=" in w)
    exposed = {int(p.split("/")[0]) for k, a in final if k == "EXPOSE" for p in a.split()}
    for var in ("SNAPGUARD_LISTEN", "SNAPGUARD_ADMIN"):
        host, port = host_port(env.get(var))
        report(host == "0.0.0.0" and port in exposed, f"Dockerfile: {var} is on 0.0.0.0 at an EXPOSEd port",
               env.get(var))


def check_systemd():
    unit = SYSTEMD_UNIT.read_text()
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    exec_start = shlex.split(settings.get("ExecStart", [""])[0])
    config = exec_start[exec_start.index("--config") + 1] if "--config" in exec_start else None
    report(config == f"/etc/snapguard/{CONFIG_KEY}",
           f"systemd: ExecStart reads /etc/snapguard/{CONFIG_KEY}, where the sample config goes")
    grace = shutdown_grace(SYSTEMD_CONFIG.read_text())
    stop = systemd_seconds(settings.get("TimeoutStopSec", ["90s"])[0])
    report(stop > grace, f"systemd: TimeoutStopSec {stop:g}s > shutdown_grace {grace:g}s")


def check_egress_policies():
    """The NetworkPolicies beside the kustomizations (networkpolicy-egress.yaml) let pods reach
    the gateway's pods on the port snapguard listens on: a policy sees the pod's port, not the
    Service's."""
    gateways = []
    for path in manifest_files(KUBERNETES / "gateway"):
        for doc in documents(path):
            if doc.get("kind") == "Deployment":
                pod = doc["spec"]["template"]
                for c in pod["spec"].get("containers", []):
                    listen = host_port(env_of(c).get("SNAPGUARD_LISTEN"))[1]
                    if "snapguard" in c.get("image", "") and listen:
                        gateways.append((pod["metadata"]["labels"], listen))
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in documents(path):
            if doc.get("kind") != "NetworkPolicy":
                continue
            what = f"{path}: NetworkPolicy {doc['metadata']['name']}"
            rules = [r for r in doc["spec"].get("egress", [])
                     if any(subset(p.get("podSelector", {}).get("matchLabels"), labels)
                            and p.get("podSelector", {}).get("matchLabels")
                            for p in r.get("to", []) for labels, _ in gateways)]
            report(len(rules) == 1, f"{what}: one egress rule for the gateway's pods")
            ports = {p.get("port") for r in rules for p in r.get("ports", [])}
            listen = {port for _, port in gateways}
            report(bool(ports) and ports <= listen | {"https"},
                   f"{what}: allows the gateway on the port snapguard listens on {sorted(listen)}",
                   str(sorted(ports, key=str)))


def cmd_consistency():
    for directory in sorted(p for p in KUBERNETES.iterdir() if (p / "kustomization.yaml").exists()):
        check_directory(directory)
    check_egress_policies()
    check_dockerfile()
    check_systemd()
    return 1 if failures else 0


def main(argv):
    commands = {
        "configs": lambda: cmd_configs(*argv[2:4]),
        "without-crds": lambda: cmd_without_crds(argv[2], argv[3]),
        "build-command": cmd_build_command,
        "context": cmd_context,
        "consistency": cmd_consistency,
    }
    arity = {"configs": (3, 4), "without-crds": (4,)}
    if len(argv) < 2 or argv[1] not in commands or len(argv) not in arity.get(argv[1], (len(argv),)):
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[1]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
