"""TLS: the web port on an ``ssl:`` endpoint (https and wss) and a ``rediss://`` store
(a Debian redis-server with TLS on), with a CA and certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.web.client import BrowserLikePolicyForHTTPS

from tests.conftest import unique
from tests.test_boss import logged_in
from tests.test_cluster import free_port
from tests.test_daemon import TWISTD, run
from tests.test_media import make_png
from tests.wire import http, multipart, wait_for_port, ws_connect


class CA:
    """A private certificate authority that issues server and client certificates."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imd test CA")])
        self.cert = (self._builder(name, name, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject, issuer, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def issue(self, name: str, dns: list[str], ips: list[str] = ()) -> tuple[Path, Path]:
        """A certificate for ``dns`` names and ``ips``: (key file, certificate file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        alt = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i))
                                                 for i in ips]
        cert = (self._builder(subject, self.cert.subject, key.public_key())
                .add_extension(x509.SubjectAlternativeName(alt), False)
                .sign(self.key, hashes.SHA256()))
        key_path, cert_path = self.directory / f"{name}.key", self.directory / f"{name}.pem"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.chmod(0o600)
        return key_path, cert_path

    def trust(self):
        return ssl.Certificate.loadPEM(self.path.read_bytes())

    def client_options(self, host: str = "localhost"):
        return ssl.optionsForClientTLS(host, trustRoot=self.trust())

    def https_policy(self) -> BrowserLikePolicyForHTTPS:
        return BrowserLikePolicyForHTTPS(trustRoot=self.trust())


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CA:
    return CA(tmp_path_factory.mktemp("tls"))


def ssl_web(ca: CA) -> str:
    key, cert = ca.issue("web", ["localhost"], ["127.0.0.1"])
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


@pytest_twisted.ensureDeferred
async def test_web_port_over_tls_serves_https_and_wss(fresh_daemon, ca):
    # The fixture's plain web listener comes first, the TLS one last (d.web).
    d = fresh_daemon("--web", ssl_web(ca)).start()
    assert "web (66boss /entry" in d.log() and "on ssl:0:" in d.log()
    base = f"https://localhost:{d.web}"

    index = await http("GET", base + "/", tls_policy=ca.https_policy())
    assert index.status == 200, index.body

    # A 66boss user over wss talks to one on the plain listener, both ways.
    a, ta = await d.user(unique())
    b, tb = await d.user(unique())
    plain = int(re.search(r"\] web .* on tcp:0\S* \([\d.]+:(\d+)\)", d.log()).group(1))
    over_tls = await ws_connect(d.web, tls=ca.client_options())
    over_tls.send(f"login_{a}_{ta}")
    assert await over_tls.next() == "ok"
    cleartext = await ws_connect(plain)
    cleartext.send(f"login_{b}_{tb}")
    assert await cleartext.next() == "ok"
    over_tls.send(f"text_{b}_over tls_unicast_x")
    assert (await cleartext.next()).startswith(f"text_{a}_over tls_unicast_")
    cleartext.send(f"text_{a}_back_unicast_x")
    assert (await over_tls.next()).startswith(f"text_{b}_back_unicast_")

    # An upload over https is answered with an https link that serves the file.
    png = make_png(3, 4)
    body, body_type = multipart(png, "p.png", content_type="image/png")
    r = await http("POST", f"{base}/upload/writev2?token={ta}", body,
                   {"Content-Type": body_type}, tls_policy=ca.https_policy())
    url = r.json()["data"]
    assert url.startswith(f"{base}/upload/files/"), url
    fetched = await http("GET", url, tls_policy=ca.https_policy())
    assert fetched.status == 200 and fetched.body == png
    over_tls.close()
    cleartext.close()

    # minami: registration over https, login over wss.
    account = unique("mi")
    r = await http("POST", f"{base}/im/register",
                   json.dumps({"account": account, "password": "pw",
                               "mail": f"{account}@example.org"}).encode(),
                   {"Content-Type": "application/json"}, tls_policy=ca.https_policy())
    assert r.json()["code"] == 200, r.body
    minami = await ws_connect(d.web, f"/im/login?account={account}&password=pw",
                              tls=ca.client_options())
    assert json.loads(await minami.next())["code"] == 200
    minami.close()

    # webim: the long-poll server it hands out is on https too.
    r = await http("POST", f"{base}/webim/online", f"token={tb}".encode(),
                   {"Content-Type": "application/x-www-form-urlencoded"},
                   tls_policy=ca.https_policy())
    assert r.json()["connection"]["server"] == f"{base}/packets", r.body

    # xuanxuan: the HTTP side (getconfig) over https.
    r = await http("GET", f"{base}/index.php?mode=getconfig", tls_policy=ca.https_policy())
    assert r.json()["ip"] == "localhost" and r.json()["port"] == d.xuanxuan


# -- rediss:// ----------------------------------------------------------------------------

REDIS_SERVER = shutil.which("redis-server")
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="no redis-server on PATH (.ci/run installs Debian's)")


@pytest.fixture
def tls_redis(ca, tmp_path):
    """A redis-server that speaks only TLS (and wants a client certificate) on a free port.
    Its certificate names ``localhost`` only."""
    key, cert = ca.issue("redis", ["localhost"])
    port = free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(ca.path), "--tls-auth-clients", "yes",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
    except RuntimeError:
        pytest.fail(f"redis-server with TLS did not start:\n{proc.stdout.read()}")
    client_key, client_cert = ca.issue("imd-client", ["imd"])
    query = f"ssl_ca_certs={ca.path}&ssl_certfile={client_cert}&ssl_keyfile={client_key}"
    yield port, query
    proc.terminate()
    proc.wait(10)


@needs_redis_server
@pytest_twisted.ensureDeferred
async def test_rediss_store_with_a_private_ca(fresh_daemon, tls_redis):
    port, query = tls_redis
    d = fresh_daemon("--redis", f"rediss://localhost:{port}/0?{query}").start()
    assert f"using Redis at rediss://localhost:{port}/0" in d.log()
    a, _, ca_ = await logged_in(d)
    b, _, cb_ = await logged_in(d)
    ca_.send(f"text_{b}_stored over tls_unicast_x")
    assert (await cb_.next()).startswith(f"text_{a}_stored over tls_unicast_")
    ca_.close()
    cb_.close()


@needs_redis_server
def test_rediss_host_name_mismatch_refuses_to_start(tls_redis, tmp_path):
    port, query = tls_redis
    started = time.monotonic()
    out = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(tmp_path / "d"),
               "--admin", "none", "--web", "tcp:0:interface=127.0.0.1", "--boss-line", "none",
               "--xuanxuan", "none", "--redis", f"rediss://127.0.0.1:{port}/0?{query}"])
    assert out.returncode == 1, out.stdout + out.stderr
    assert time.monotonic() - started < 20  # not the 300 s of --redis-wait
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "error" in line]
    assert len(errors) == 1, out.stdout + out.stderr
    assert ("imd: error: cannot connect to Redis: the certificate of Redis at "
            f"rediss://127.0.0.1:{port}/0 is not valid for 127.0.0.1") in errors[0]
    assert "Traceback" not in out.stdout + out.stderr
