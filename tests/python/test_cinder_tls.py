"""snapguard terminating TLS ([tls]) in front of the real cinder-api (Cinder 29, noauth, sqlite),
with Cinder told to believe its proxy (`[oslo_middleware] enable_proxy_headers_parsing = True`).

What this checks, with Python `requests`, openstacksdk and python-cinderclient (its Python API and
its `cinder` CLI, configured as deploy/README.md says) over HTTPS and a test CA made here with
`cryptography`:
- the links Cinder writes (version documents, a list's next link) name snapguard's own address
  with https, which takes X-Forwarded-Proto and X-Forwarded-Host from snapguard, and nothing a
  client forged (snapguard does not trust 127.0.0.1 here);
- the naming policy holds over TLS: a reserved name is refused with 400 and Cinder's database is
  unchanged, a good one is stored;
- the certificate really is checked: without the test CA, requests refuses the connection.

The session fixture `tls_stack` reuses cinder_api.py's pieces (cinder.conf, seeding, process
handling) with its own cinder.conf variant and snapguard config; it does not use `stack`.
What Cinder stored is read from its sqlite file directly, never through snapguard.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.parse
import uuid

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cinder_api import (RESERVED, Stack, _write_conf, free_port, request, require_cinder_api,
                        running)
from conftest import snapguard_bin

SEEDED = 7  # snapshots seeded: 2+ for the paginated list, the rest for the PUTs


# --- the test PKI ---------------------------------------------------------------------------
def _write_pki(tmp: pathlib.Path) -> dict:
    """A test CA and a server certificate it issued for localhost and 127.0.0.1 (P-256).

    Returns the paths: ca (CA certificate), cert (leaf, then CA), key (leaf key, PKCS#8)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "snapguard test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {"ca": tmp / "ca.pem", "cert": tmp / "tls.crt", "key": tmp / "tls.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    paths["leaf_der"] = cert.public_bytes(serialization.Encoding.DER)
    return paths


# --- the stack --------------------------------------------------------------------------------
class TlsStack(Stack):
    """cinder_api.Stack, plus snapguard's https base URL and the test CA."""

    ca: pathlib.Path
    leaf_der: bytes

    @property
    def https(self) -> str:
        return f"https://localhost:{self.proxy_port}"

    def get(self, url, **kwargs):
        kwargs.setdefault("verify", str(self.ca))
        kwargs.setdefault("timeout", 30)
        headers = self.auth({"Accept": "application/json", **kwargs.pop("headers", {})})
        return requests.get(url, headers=headers, **kwargs)

    def put(self, url, body, **kwargs):
        kwargs.setdefault("verify", str(self.ca))
        kwargs.setdefault("timeout", 30)
        headers = self.auth({"Accept": "application/json", **kwargs.pop("headers", {})})
        return requests.put(url, json=body, headers=headers, **kwargs)


@pytest.fixture(scope="session")
def tls_stack():
    require_cinder_api()
    sg = snapguard_bin()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="snapguard-cinder-tls-"))
    cinder_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    conf = _write_conf(tmp, cinder_port)
    # Cinder believes X-Forwarded-Proto/-Host/-For (oslo.middleware's http_proxy_to_wsgi, which
    # is in every api-paste.ini pipeline, does nothing unless this is set).
    with open(conf, "a") as f:
        f.write("\n[oslo_middleware]\nenable_proxy_headers_parsing = True\n")
    pki = _write_pki(tmp)
    sg_conf = tmp / "snapguard.toml"
    sg_conf.write_text(f"""listen = "127.0.0.1:{proxy_port}"
admin = "127.0.0.1:{admin_port}"
workers = 1

[upstream]
url = "http://127.0.0.1:{cinder_port}"

[tls]
cert_file = "{pki['cert']}"
key_file = "{pki['key']}"
""")
    st = TlsStack(tmp=tmp, conf=conf, db_path=tmp / "cinder.sqlite",
                  project=uuid.uuid4().hex, user="tls-user",
                  cinder_port=cinder_port, proxy_port=proxy_port, admin_port=admin_port,
                  cinder_log=tmp / "cinder-api.log", snapguard_log=tmp / "snapguard.log")
    st.ca = pki["ca"]
    st.leaf_der = pki["leaf_der"]
    with running(st, [sg, "--config", str(sg_conf)], SEEDED):
        yield st


# --- helpers ----------------------------------------------------------------------------------
def hrefs(doc):
    """Every "href" anywhere in a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "href" and isinstance(v, str):
                yield v
            else:
                yield from hrefs(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from hrefs(v)


def assert_points_at_snapguard(st, href):
    url = urllib.parse.urlsplit(href)
    assert (url.scheme, url.netloc) == ("https", f"localhost:{st.proxy_port}"), (
        f"link {href!r} does not name snapguard (https://localhost:{st.proxy_port}); "
        f"cinder-api is on {st.cinder_port}")


# --- tests ------------------------------------------------------------------------------------
def test_certificate_served_is_the_test_one(tls_stack):
    """The handshake on snapguard's port serves the leaf made here (not some other cert)."""
    ctx = ssl.create_default_context(cafile=str(tls_stack.ca))
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", tls_stack.proxy_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.getpeercert(binary_form=True) == tls_stack.leaf_der
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("path", ["/", "/v3/"])
def test_version_links_name_snapguard_over_https(tls_stack, path):
    resp = tls_stack.get(tls_stack.https + path)
    assert resp.status_code in (200, 300), (resp.status_code, resp.text[:500])
    links = list(hrefs(resp.json()))
    assert links, f"no links in {resp.text[:500]}"
    for href in links:
        if href.startswith(("http://docs.", "https://docs.")):  # describedby: docs.openstack.org
            continue
        assert_points_at_snapguard(tls_stack, href)
    # Control: straight to cinder-api (no X-Forwarded-*), the same document names cinder-api's
    # own plain-HTTP address, so the https links above came from snapguard's headers.
    direct = tls_stack.cinder("GET", path)
    assert direct.status in (200, 300), direct
    own = [h for h in hrefs(direct.json) if "docs." not in h]
    assert own and all(h.startswith(f"http://127.0.0.1:{tls_stack.cinder_port}/") for h in own), own


def test_forged_forwarding_headers_are_overwritten(tls_stack):
    """127.0.0.1 is not a trusted proxy here: what it says in X-Forwarded-* and Forwarded must not
    reach Cinder's links."""
    resp = tls_stack.get(tls_stack.https + "/v3/", headers={
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "evil.example:1",
        "Forwarded": 'for=6.6.6.6;proto=http;host="evil.example:2"',
    })
    assert resp.status_code in (200, 300), (resp.status_code, resp.text[:500])
    links = [h for h in hrefs(resp.json()) if "docs." not in h]
    assert links
    for href in links:
        assert_points_at_snapguard(tls_stack, href)


def test_list_next_link_is_https_and_names_snapguard(tls_stack):
    base = f"{tls_stack.https}/v3/{tls_stack.project}/snapshots"
    seen = []
    url = base + "?limit=1"
    for _ in range(SEEDED + 2):
        resp = tls_stack.get(url)
        assert resp.status_code == 200, (resp.status_code, resp.text[:500])
        body = resp.json()
        assert len(body["snapshots"]) <= 1
        seen += [s["id"] for s in body["snapshots"]]
        nxt = [link["href"] for link in body.get("snapshots_links", []) if link["rel"] == "next"]
        if not nxt:
            break
        assert len(nxt) == 1, body["snapshots_links"]
        assert_points_at_snapguard(tls_stack, nxt[0])
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(nxt[0]).query)
        assert q.get("limit") == ["1"] and q.get("marker"), nxt[0]
        assert urllib.parse.urlsplit(nxt[0]).path == f"/v3/{tls_stack.project}/snapshots"
        url = nxt[0]  # followed as is, through snapguard, over TLS
    # The first page did have a next link (2+ snapshots exist) and following them visited each
    # snapshot of the project once.
    assert len(seen) >= 2
    assert len(seen) == len(set(seen))
    assert set(seen) >= set(tls_stack.seed["snapshots"])


def test_reserved_name_refused_over_tls_good_name_stored(tls_stack):
    sid = tls_stack.take_snapshot()
    before = tls_stack.snapshot(sid)
    url = f"{tls_stack.https}/v3/{tls_stack.project}/snapshots/{sid}"

    bad = tls_stack.put(url, {"snapshot": {"name": RESERVED + "x"}})
    assert bad.status_code == 400, (bad.status_code, bad.text[:500])
    assert list(bad.json()) == ["badRequest"], bad.text
    assert "field/attribute name" in bad.json()["badRequest"]["message"], bad.text
    assert tls_stack.snapshot(sid) == before, "Cinder's row changed after a refused PUT"

    # Behind leading whitespace Cinder would strip: refused too.
    bad2 = tls_stack.put(url, {"snapshot": {"display_name": "  " + RESERVED + "y"}})
    assert bad2.status_code == 400, (bad2.status_code, bad2.text[:500])
    assert tls_stack.snapshot(sid) == before

    good = "tls-" + uuid.uuid4().hex[:8]
    ok = tls_stack.put(url, {"snapshot": {"name": good, "description": "over TLS"}})
    assert ok.status_code == 200, (ok.status_code, ok.text[:500])
    assert ok.json()["snapshot"]["name"] == good
    row = tls_stack.snapshot(sid)
    assert (row["display_name"], row["display_description"]) == (good, "over TLS")
    assert not tls_stack.reserved_rows()


def test_certificate_is_checked(tls_stack):
    """Without the test CA (system roots only) the handshake is refused by the client; so is a
    name the certificate does not carry."""
    with pytest.raises(requests.exceptions.SSLError) as e:
        requests.get(tls_stack.https + "/", verify=True, timeout=10)
    assert "CERTIFICATE_VERIFY_FAILED" in str(e.value), e.value
    # A hostname the certificate is not for (127.0.0.2 is loopback but not in the SAN).
    ctx = ssl.create_default_context(cafile=str(tls_stack.ca))
    with socket.create_connection(("127.0.0.1", tls_stack.proxy_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="not-localhost.example")
    # And with the CA, both names in the certificate work.
    for host in ("localhost", "127.0.0.1"):
        resp = requests.get(f"https://{host}:{tls_stack.proxy_port}/", verify=str(tls_stack.ca),
                            timeout=10)
        assert resp.status_code == 300, (host, resp.status_code)


def test_plain_http_on_tls_port_is_not_served(tls_stack):
    """The listener speaks TLS only: a plain HTTP request gets no HTTP response."""
    with pytest.raises((requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout)):
        requests.get(f"http://127.0.0.1:{tls_stack.proxy_port}/", timeout=5)


def _curl_http2():
    curl = shutil.which("curl")
    if not curl:
        return None
    version = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout
    return curl if "HTTP2" in version else None


@pytest.mark.skipif(_curl_http2() is None, reason="no curl with HTTP/2 support")
def test_next_link_over_http2(tls_stack):
    """ALPN h2 (there is no Host header in HTTP/2: the authority is :authority): the next link is
    still https and names snapguard. requests speaks HTTP/1.1 only, so this uses curl."""
    done = subprocess.run(
        [_curl_http2(), "-sS", "--http2", "--cacert", str(tls_stack.ca),
         "-H", f"X-Auth-Token: {tls_stack.user}:{tls_stack.project}",
         "-H", "Accept: application/json", "-w", "\n%{http_version} %{http_code}",
         f"{tls_stack.https}/v3/{tls_stack.project}/snapshots?limit=1"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    assert status == "2 200", (status, body[:500])
    nxt = [link["href"] for link in json.loads(body)["snapshots_links"] if link["rel"] == "next"]
    assert len(nxt) == 1, body
    assert_points_at_snapguard(tls_stack, nxt[0])


def _openstacksdk(st, ca=True):
    """An openstacksdk Connection configured as docs/ tells users to: the block-storage endpoint
    overridden to snapguard's https URL, the test CA as the session's `verify`. Cinder runs noauth
    here, whose token is `user:project`; its middleware answers any request without a token (the
    SDK's unauthenticated version discovery too) with an empty 204, so the session sends the token
    on every request."""
    import openstack.connection
    from keystoneauth1 import session, token_endpoint

    token = f"{st.user}:{st.project}"
    sess = session.Session(auth=token_endpoint.Token(st.https, token),
                           verify=str(st.ca) if ca else True,
                           additional_headers={"X-Auth-Token": token})
    return openstack.connection.Connection(
        session=sess,
        block_storage_endpoint_override=f"{st.https}/v3/{st.project}",
        block_storage_api_version="3",
    )


def test_openstacksdk_over_tls_is_policed_and_stores_a_good_name(tls_stack):
    """openstacksdk (keystoneauth, requests) through snapguard's TLS listener with the test CA:
    version discovery follows Cinder's links (which must name snapguard over https), a reserved
    name is refused with Cinder's Fault and nothing changes, a good one is stored."""
    from openstack import exceptions

    conn = _openstacksdk(tls_stack)
    sid = tls_stack.take_snapshot()
    before = tls_stack.snapshot(sid)
    assert conn.block_storage.get_snapshot(sid).id == sid

    with pytest.raises(exceptions.BadRequestException) as refused:
        conn.block_storage.update_snapshot(sid, name=RESERVED + "sdk")
    assert refused.value.status_code == 400
    assert "field/attribute name" in str(refused.value), refused.value
    assert tls_stack.snapshot(sid) == before, "Cinder's row changed after a refused update"

    good = "sdk-tls-" + uuid.uuid4().hex[:8]
    updated = conn.block_storage.update_snapshot(sid, name=good, description="openstacksdk")
    assert updated.name == good
    row = tls_stack.snapshot(sid)
    assert (row["display_name"], row["display_description"]) == (good, "openstacksdk")
    assert not tls_stack.reserved_rows()


def _handshake_alerts(st) -> float:
    """snapguard's count of handshakes the client ended with an alert (an unknown CA, say)."""
    text = request(st.admin_port, "GET", "/metrics", timeout=10).body.decode()
    series = 'snapguard_tls_handshake_failures_total{reason="alert_received"} '
    return float(next(line for line in text.splitlines() if line.startswith(series)).split()[-1])


def test_openstacksdk_without_the_ca_refuses_snapguards_certificate(tls_stack):
    """The SDK really verifies the certificate: with system roots only it gives up in the
    handshake (snapguard counts the client's alert) and no request reaches Cinder."""
    conn = _openstacksdk(tls_stack, ca=False)
    alerts = _handshake_alerts(tls_stack)
    log = tls_stack.snapguard_log.read_text().count("snapguard::access")
    with pytest.raises(Exception) as e:
        conn.block_storage.get_snapshot(tls_stack.seed["snapshots"][0])
    assert _handshake_alerts(tls_stack) > alerts, e.value
    assert tls_stack.snapguard_log.read_text().count("snapguard::access") == log, e.value


# --- python-cinderclient, as deploy/README.md tells users ------------------------------------
def _cinderclient_auth(st):
    """Cinder runs noauth here, so in place of the recipe's password plugin the session's auth is
    cinderclient's own `noauth` plugin (token `user:project`, and the project keystoneauth puts in
    `%(project_id)s`). Its endpoint stands for the catalogue's: cinder-api's own plain-HTTP address,
    which `os_endpoint` must override, or the requests would bypass snapguard."""
    from keystoneauth1 import loading

    return loading.get_plugin_loader("noauth").load_from_options(
        user_id=st.user, project_id=st.project, endpoint=f"http://127.0.0.1:{st.cinder_port}/v3")


def _access_lines(st) -> int:
    return st.snapguard_log.read_text().count("snapguard::access")


def test_cinderclient_os_endpoint_over_tls_is_policed_and_stores_a_good_name(tls_stack):
    """python-cinderclient's Python API as deploy/README.md has it: `client.Client("3",
    session=..., os_endpoint="https://<snapguard>/v3/%(project_id)s")`, the session verifying with
    the test CA. A reserved name is refused with cinderclient's BadRequest carrying snapguard's
    message and Cinder keeps the old name; a good one is stored."""
    from cinderclient import client, exceptions
    from keystoneauth1 import session

    sess = session.Session(auth=_cinderclient_auth(tls_stack), verify=str(tls_stack.ca))
    cinder = client.Client("3", session=sess,
                           os_endpoint=f"{tls_stack.https}/v3/%(project_id)s")
    sid = tls_stack.take_snapshot()
    before = tls_stack.snapshot(sid)
    seen = _access_lines(tls_stack)
    assert cinder.volume_snapshots.get(sid).id == sid
    assert _access_lines(tls_stack) > seen, "the GET did not go through snapguard"

    with pytest.raises(exceptions.BadRequest) as refused:
        cinder.volume_snapshots.update(sid, name=RESERVED + "x")
    assert refused.value.code == 400
    assert refused.value.message == (
        "Invalid input for field/attribute name. Value: autobk_snapshot_x. Names starting with "
        "'autobk_snapshot_' are reserved for automatic backup snapshots."), refused.value
    assert tls_stack.snapshot(sid) == before, "Cinder's row changed after a refused update"

    good = "cc-tls-" + uuid.uuid4().hex[:8]
    cinder.volume_snapshots.update(sid, name=good, description="cinderclient")
    row = tls_stack.snapshot(sid)
    assert (row["display_name"], row["display_description"]) == (good, "cinderclient")
    assert cinder.volume_snapshots.get(sid).name == good
    assert not tls_stack.reserved_rows()


@pytest.mark.parametrize("endpoint_from", ["--os-endpoint", "CINDER_ENDPOINT"])
def test_cinder_cli_os_endpoint_over_tls_is_policed_and_stores_a_good_name(tls_stack,
                                                                           endpoint_from):
    """The `cinder` CLI of the venv as deploy/README.md has it: the endpoint from `--os-endpoint`
    or `CINDER_ENDPOINT`, the CA from `--os-cacert`; auth is cinderclient's `noauth` plugin (see
    _cinderclient_auth). `snapshot-rename` to a reserved name exits 1 with snapguard's message
    on stderr and changes nothing; to a good name it exits 0 and the name is stored."""
    endpoint = f"{tls_stack.https}/v3/%(project_id)s"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OS_", "CINDER_", "CINDERCLIENT_"))}
    args = [str(pathlib.Path(sys.executable).parent / "cinder"),
            "--os-auth-type", "noauth", "--os-user-id", tls_stack.user,
            "--os-project-id", tls_stack.project, "--os-cacert", str(tls_stack.ca)]
    if endpoint_from == "--os-endpoint":
        args += ["--os-endpoint", endpoint]
    else:
        env["CINDER_ENDPOINT"] = endpoint

    def rename(sid, name):
        return subprocess.run(args + ["snapshot-rename", sid, name], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60)

    sid = tls_stack.take_snapshot()
    before = tls_stack.snapshot(sid)
    seen = _access_lines(tls_stack)
    bad = rename(sid, RESERVED + "x")
    assert bad.returncode == 1, (bad.returncode, bad.stdout, bad.stderr)
    assert ("ERROR: Invalid input for field/attribute name. Value: autobk_snapshot_x. Names "
            "starting with 'autobk_snapshot_' are reserved for automatic backup snapshots. "
            "(HTTP 400)") in bad.stderr, bad.stderr
    assert tls_stack.snapshot(sid) == before, "Cinder's row changed after a refused rename"
    assert _access_lines(tls_stack) > seen, "the CLI's requests did not go through snapguard"

    good = "cli-tls-" + uuid.uuid4().hex[:8]
    ok = rename(sid, good)
    assert ok.returncode == 0, (ok.returncode, ok.stdout, ok.stderr)
    assert tls_stack.stored_name(sid) == good
    assert not tls_stack.reserved_rows()
