"""The one twisted.web Site that serves every HTTP and WebSocket route, and HTTP helpers.

Request bodies are bounded: a declared Content-Length over the limit is refused with 413 before
the body is read, and a chunked body is cut off once it passes the limit.  Requests are bounded
in time: a connection idle between requests is closed after ``timeout`` seconds (twisted.web's
idle timeout, which is reset by every byte and paused while a request is handled, e.g. a
long-poll), and a request whose headers and body have not all arrived ``request_timeout``
seconds after its first byte (an upload's body: ``upload_timeout``) is cut, however steadily
it trickles in.  Protocol adapters mount their resources on the root this module builds.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import failure
from twisted.web import http, resource, server

from imd.model import json_bytes
from imd.throttle import Throttled
from imd.forms import form_args
from imd.unavailable import Unavailable

log = Logger()

SPOOL_OVER = 100_000  # bodies this long or longer are spooled to a file (twisted.web's rule)
_HOST_RE = re.compile(r"(?P<name>[a-z0-9.\-]+)(?::(?P<port>\d{1,5}))?"
                      r"|\[(?P<ip6>[0-9a-f:.]+)\](?::(?P<port6>\d{1,5}))?")


class LimitedRequest(server.Request):
    """A Request whose body may not exceed the site's limit for its path.

    A body that may be big (an upload, or any body of unknown or large length) is spooled to
    an unlinked file in the data directory as it arrives.  twisted.web's own parsing of form
    bodies into ``args`` (which reads a whole multipart body into memory, several times) is
    off: :meth:`process` parses the bodies of other paths, and upload handlers parse theirs
    once, streaming, with ``imd.forms.upload_parts``.
    """

    _received = 0
    _too_large = False
    _limit = 0
    _upload: bool | None = None  # whether the path is an upload's (known from gotLength on)

    def __init__(self, channel, *args, **kw):
        super().__init__(channel, *args, parsePOSTFormSubmission=False, **kw)

    def gotLength(self, length):
        # The request line has been read (the channel keeps the path) but the Request has
        # not been told yet; without it, fall back to the largest limit.
        path = getattr(self.channel, "_path", None)
        site = self.channel.site
        self._upload = None if path is None else site.is_upload(path)
        self._limit = site.body_limit(path, self._upload)
        if length is not None and length > self._limit:
            self._refuse()
            return
        if self._limit > site.max_body:
            self.channel.body_deadline(site.upload_timeout)
        if length == 0 or (length is not None and length < SPOOL_OVER
                           and not self._upload):
            self.content = BytesIO()
        else:
            self.content = tempfile.TemporaryFile(dir=site.spool_dir)

    def process(self):
        site = self.channel.site
        upload = self._upload if self._upload is not None else site.is_upload(self.uri)
        if self.method == b"POST" and not upload:
            self._parse_form()
        leaf = site.exact.get(self.path)
        if leaf is None:
            super().process()
            return
        # A hot path (see Root.put_exact): what server.Request.process does, without the
        # walk down the resource tree, the Server header and a date formatted per request.
        self.site = site
        self.setHeader(b"date", http_date(site.reactor.seconds()))
        self.sitepath = []
        self.prepath = self.path[1:].split(b"/")
        self.postpath = []
        try:
            self.render(leaf)
        except BaseException:
            self.processingFailed(failure.Failure())

    def _parse_form(self) -> None:
        """What twisted.web would have put in ``args`` for a form body (not an upload's)."""
        ctype = self.getHeader(b"content-type") or b""
        kind = ctype.split(b";", 1)[0].strip().lower()
        if kind == b"application/x-www-form-urlencoded":
            self.content.seek(0)
            self.args.update(http.parse_qs(self.content.read(), 1))
            self.content.seek(0)
        elif kind == b"multipart/form-data":
            self.args.update(form_args(self.content, ctype))

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


class ImdChannel(http.HTTPChannel):
    """An HTTP connection whose requests must arrive within a deadline from their first byte
    (the idle timeout alone is reset by every byte, so a request sent a byte at a time would
    live for good)."""

    _deadline = None
    _host = None
    _peer = None

    # Every Request asks for both; they do not change during a connection, and each answer
    # costs a system call and an address object.
    def getHost(self):
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self):
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def isSecure(self) -> bool:
        # Behind imd.guard's wrapper, which does not pass ISSLTransport on.
        return super().isSecure() or bool(getattr(self.transport, "secure", False))

    def dataReceived(self, data):
        if self._deadline is None:
            self._arm(self.site.request_timeout)
        super().dataReceived(data)

    def allContentReceived(self):
        self._disarm()
        super().allContentReceived()

    def connectionLost(self, reason):
        self._disarm()
        super().connectionLost(reason)

    def timeoutConnection(self):
        # Idle between requests: nothing is in flight, so drop it without an info line
        # per connection (twisted.web logs one).
        self.transport.abortConnection()

    def body_deadline(self, seconds: float) -> None:
        """The current request's body (an upload) may take ``seconds`` from now."""
        self._arm(seconds)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.callLater(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport is not None:
            log.debug("cut an HTTP request that did not arrive in time from {peer}",
                      peer=self.transport.getPeer())
            self.transport.abortConnection()


# Query parameters that are credentials; an access log line shows them as "-".
_SECRET_PARAMS = re.compile(
    r"([?&](?:password|token|access_token|auth|ticket)=)[^&#\s\"]*", re.IGNORECASE)


def redacting_log_formatter(timestamp: str, request: server.Request) -> str:
    """The combined log format, without the credentials that clients put in URLs."""
    return _SECRET_PARAMS.sub(r"\1-", http.combinedLogFormatter(timestamp, request))


class ImdSite(server.Site):
    requestFactory = LimitedRequest
    protocol = ImdChannel

    def __init__(self, root: resource.Resource, max_body: int, max_upload: int,
                 upload_paths: tuple[bytes, ...] = (), request_timeout: float = 30.0,
                 upload_timeout: float = 600.0,
                 spool_dir: Path | None = None, public_hosts: str = "", **kw):
        kw.setdefault("logFormatter", redacting_log_formatter)
        super().__init__(root, **kw)
        # Host names (or name:port) besides this listener's own address that may appear in
        # the URLs imd hands out (see public_base).
        self.public_hosts = frozenset(h.strip().lower() for h in public_hosts.split(",")
                                      if h.strip())
        self.max_body = max_body
        self.max_upload = max_upload
        self.request_timeout = request_timeout
        self.upload_timeout = upload_timeout
        self.upload_paths = upload_paths
        self._upload_re = re.compile(b"|".join(re.escape(p) for p in upload_paths)) \
            if upload_paths else None
        # Leaves served at an exact path without a walk down the tree (Root.put_exact).
        self.exact: dict[bytes, resource.Resource] = getattr(root, "exact", {})
        self.spool_dir = spool_dir  # where big request bodies are spooled (None: the system's)
        self.noisy = False

    def is_upload(self, path: bytes | None) -> bool:
        """Uploads are recognised by a marker in the path or query."""
        return path is not None and self._upload_re is not None and bool(
            self._upload_re.search(path))

    def body_limit(self, path: bytes | None, upload: bool | None = None) -> int:
        """Uploads may be larger than other request bodies (``upload``: ``is_upload(path)``,
        when the caller knows it)."""
        if path is None:
            return max(self.max_body, self.max_upload)
        if upload is None:
            upload = self.is_upload(path)
        return self.max_upload if upload else self.max_body

    def log(self, request):
        # An access log only when --access-log names a file (combined log format); never to
        # the daemon's log, where a line per request would cost more than the request.
        if self.logPath is not None:
            super().log(request)


class Root(resource.Resource):
    """The web port's root.  Besides the usual tree, it keeps leaves for exact paths (a
    protocol's hot paths), which the site serves without walking the tree (``ImdSite``)."""

    def __init__(self):
        super().__init__()
        self.exact: dict[bytes, resource.Resource] = {}

    def put_exact(self, path: bytes, leaf: resource.Resource) -> None:
        """Serve ``leaf`` (``isLeaf``) for requests whose path is exactly ``path`` (any
        query); other paths below it still go down the tree."""
        self.exact[path] = leaf


def build_root() -> Root:
    root = Root()
    root.putChild(b"", _Index())
    return root


_date_cache: list = [None, b""]  # (whole second, its HTTP date)


def http_date(now: float) -> bytes:
    """The ``Date`` header's value for ``now``, formatted once per second."""
    second = int(now)
    if _date_cache[0] != second:
        _date_cache[0], _date_cache[1] = second, http.datetimeToString(second)
    return _date_cache[1]


class _Index(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"imd: multi-protocol instant-messaging daemon\n"


def write_json(request: server.Request, obj: Any, status: int = 200) -> None:
    body = json_bytes(obj)
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
            if failure.check(Throttled):
                if not gone:
                    request.setHeader(b"retry-after", b"%d" % failure.value.retry_after)
                    write_json(request, {"code": 429, "message": str(failure.value)}, 429)
                return
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
