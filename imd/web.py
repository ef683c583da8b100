"""The one twisted.web Site that serves every HTTP and WebSocket route, and HTTP helpers.

Request bodies are bounded: a declared Content-Length over the limit is refused with 413 before
the body is read, and a chunked body is cut off once it passes the limit.  Protocol adapters
mount their resources on the root this module builds.
"""

from __future__ import annotations

import email.parser
import functools
import ipaddress
import email.policy
import json
import re
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from imd.unavailable import Unavailable

log = Logger()

# twisted.web parses every request's Content-Type with the email package (about a fifth of
# the daemon's CPU under webim load).  The result depends on the header alone, and clients
# send the same few values, so remember them.  Guarded: if Twisted renames the function,
# nothing changes.
if hasattr(http, "_parseContentType"):
    http._parseContentType = functools.lru_cache(maxsize=256)(http._parseContentType)

_HOST_RE = re.compile(r"(?P<name>[a-z0-9.\-]+)(?::(?P<port>\d{1,5}))?"
                      r"|\[(?P<ip6>[0-9a-f:.]+)\](?::(?P<port6>\d{1,5}))?")


class LimitedRequest(server.Request):
    """A Request whose body may not exceed the site's limit for its path."""

    _received = 0
    _too_large = False
    _limit = 0

    def gotLength(self, length):
        # The request line has been read (the channel keeps the path) but the Request has
        # not been told yet; without it, fall back to the largest limit.
        path = getattr(self.channel, "_path", None)
        self._limit = self.channel.site.body_limit(path)
        if length is not None and length > self._limit:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self):
        self._too_large = True
        body = b'{"code":413,"message":"request body too large"}'
        self.channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.channel.transport.loseConnection()


class ImdSite(server.Site):
    requestFactory = LimitedRequest

    def __init__(self, root: resource.Resource, max_body: int, max_upload: int,
                 upload_paths: tuple[bytes, ...] = (), public_hosts: str = "", **kw):
        super().__init__(root, **kw)
        # Host names (or name:port) besides this listener's own address that may appear in
        # the URLs imd hands out (see public_base).
        self.public_hosts = frozenset(h.strip().lower() for h in public_hosts.split(",")
                                      if h.strip())
        self.max_body = max_body
        self.max_upload = max_upload
        self.upload_paths = upload_paths
        self.noisy = False

    def body_limit(self, path: bytes | None) -> int:
        """Uploads (recognised by a marker in the path or query) may be larger than other
        request bodies."""
        if path is None:
            return max(self.max_body, self.max_upload)
        if any(p in path for p in self.upload_paths):
            return self.max_upload
        return self.max_body

    def log(self, request):
        # No per-request access log at info level: it would cost more than the request.
        pass


def build_root() -> resource.Resource:
    root = resource.Resource()
    root.putChild(b"", _Index())
    return root


class _Index(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"imd: multi-protocol instant-messaging daemon\n"


def write_json(request: server.Request, obj: Any, status: int = 200) -> None:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def arg(request: server.Request, name: str) -> str | None:
    """A query or form parameter as text, or None; invalid UTF-8 counts as absent."""
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


def multipart_files(request: server.Request) -> list[tuple[str, str, bytes]]:
    """The parts of a multipart/form-data body: (field name, file name, content)."""
    ctype = request.getHeader(b"content-type") or b""
    if not ctype.lower().startswith(b"multipart/form-data"):
        return []
    request.content.seek(0)
    raw = b"Content-Type: " + ctype + b"\r\nMIME-Version: 1.0\r\n\r\n" + request.content.read()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    parts = []
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        parts.append((name, part.get_filename() or "", part.get_payload(decode=True) or b""))
    return parts


def request_token(request: server.Request) -> str | None:
    """The token of a request: ``token`` parameter or ``Authorization: Bearer``."""
    token = arg(request, "token")
    header = request.getHeader(b"authorization") or b""
    if not token and header[:7].lower() == b"bearer ":
        token = header[7:].decode("latin-1").strip()
    return token or None


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def public_base(request: server.Request, configured: str) -> str:
    """The base URL clients use to reach this web port: ``configured`` (--public-url) when
    set; else the request's Host when it names this listener (the address and port the
    request came in on, ``localhost`` on loopback) or one of --public-hosts; else the
    listener's own address.  An arbitrary Host never reaches a URL imd hands out."""
    if configured:
        return configured.rstrip("/")
    scheme = "https" if request.isSecure() else "http"
    local = request.getHost()
    local_host = getattr(local, "host", None)
    local_port = getattr(local, "port", None)
    host = (request.getHeader(b"host") or b"").decode("latin-1").strip().lower()
    m = _HOST_RE.fullmatch(host)
    if m:
        name = m.group("name") or m.group("ip6")
        port = int(m.group("port") or m.group("port6") or (443 if scheme == "https" else 80))
        allowed = getattr(request.site, "public_hosts", ())
        if name in allowed or f"{name}:{port}" in allowed:
            return f"{scheme}://{host}"
        if port == local_port and local_host is not None and (
                name == local_host.lower()
                or name == "localhost" and _loopback(local_host)):
            return f"{scheme}://{host}"
    if local_host is None:  # a unix socket: only --public-url can say
        return f"{scheme}://localhost"
    shown = f"[{local_host}]" if ":" in local_host else local_host
    return f"{scheme}://{shown}:{local_port}"


class AsyncJSONResource(resource.Resource):
    """A leaf whose handler is ``async def handle(request) -> (status, obj)``.

    Exceptions become a 500 JSON reply with a logged traceback; a client that went away
    before the reply is not written to.
    """

    isLeaf = True
    handler: Callable

    def __init__(self, handler: Callable):
        super().__init__()
        self.handler = handler

    def render(self, request):
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self.handler(request))

        def reply(result):
            if not gone:
                status, obj = result
                write_json(request, obj, status)

        def failed(failure):
            if failure.check(Unavailable):  # the outage itself is logged once, elsewhere
                if not gone:
                    write_json(request, {"code": 503, "message": "service unavailable, try "
                                                                "again"}, 503)
                return
            log.failure("error handling {uri}", failure, uri=request.uri)
            if not gone:
                write_json(request, {"code": 500, "message": "internal error"}, 500)

        d.addCallbacks(reply, failed)
        return server.NOT_DONE_YET
