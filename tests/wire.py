"""Real network clients for the tests: WebSocket, TCP lines and HTTP, all on the reactor."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
from urllib.parse import urlencode

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.protocols.basic import LineOnlyReceiver
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

CLOSED = object()
TIMEOUT = 5.0


class Inbox:
    """Received signals, read in order with a timeout; heartbeats skipped unless wanted."""

    def __init__(self):
        self.queue = defer.DeferredQueue()
        self.closed = defer.Deferred()

    async def next(self, timeout: float = TIMEOUT, heartbeats: bool = False):
        while True:
            d = self.queue.get()
            d.addTimeout(timeout, reactor)
            item = await d
            if item is CLOSED:
                return CLOSED
            if heartbeats or not item.startswith("heartbeat_"):
                return item

    async def nothing(self, wait: float = 0.3) -> None:
        """Assert that nothing but heartbeats arrives within ``wait`` seconds."""
        try:
            item = await self.next(timeout=wait)
        except defer.TimeoutError:
            return
        raise AssertionError(f"unexpected signal {item!r}")


class _WS(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.inbox.queue.put(payload.decode("utf-8"))

    def onClose(self, wasClean, code, reason):
        self.close_code = code
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        self.inbox.queue.put(CLOSED)
        if not self.inbox.closed.called:
            self.inbox.closed.callback(code)


class WSClient:
    def __init__(self, proto: _WS):
        self.proto = proto
        self.inbox = proto.inbox

    def send(self, text: str) -> None:
        self.proto.sendMessage(text.encode("utf-8"))

    def send_binary(self, data: bytes) -> None:
        self.proto.sendMessage(data, isBinary=True)

    def send_text_bytes(self, data: bytes) -> None:
        """A text frame with exactly these bytes (which may not be UTF-8)."""
        self.proto.sendMessage(data, isBinary=False)

    async def next(self, **kw):
        return await self.inbox.next(**kw)

    async def nothing(self, wait: float = 0.3):
        await self.inbox.nothing(wait)

    def close(self) -> None:
        self.proto.sendClose()

    def drop(self) -> None:
        self.proto.transport.abortConnection()


async def ws_connect(port: int, path: str = "/entry", source: str | None = None,
                     tls=None, **options) -> WSClient:
    """A WebSocket client; ``source`` is the local address to connect from (127.0.0.2...);
    ``tls`` (client TLS options, ``optionsForClientTLS``) makes it wss://."""
    factory = WebSocketClientFactory(f"{'wss' if tls else 'ws'}://127.0.0.1:{port}{path}")
    factory.protocol = _WS
    factory.opened = defer.Deferred()
    if options:
        factory.setProtocolOptions(**options)
    inbox = Inbox()

    def build(addr):
        p = WebSocketClientFactory.buildProtocol(factory, addr)
        p.inbox = inbox
        return p

    factory.buildProtocol = build
    bind = (source, 0) if source else None
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind)
    await (wrapClientTLS(tls, endpoint) if tls else endpoint).connect(factory)
    proto = await factory.opened
    return WSClient(proto)


class _Lines(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 10 * 1024 * 1024

    def lineReceived(self, line):
        self.inbox.queue.put(line.decode("utf-8"))

    def connectionLost(self, reason):
        self.inbox.queue.put(CLOSED)
        if not self.inbox.closed.called:
            self.inbox.closed.callback(None)


class LineClient:
    def __init__(self, proto: _Lines):
        self.proto = proto
        self.inbox = proto.inbox

    def send(self, text: str) -> None:
        self.proto.transport.write(text.encode("utf-8") + b"\n")

    def send_raw(self, data: bytes) -> None:
        self.proto.transport.write(data)

    async def next(self, **kw):
        return await self.inbox.next(**kw)

    async def nothing(self, wait: float = 0.3):
        await self.inbox.nothing(wait)

    def close(self) -> None:
        self.proto.transport.loseConnection()


async def line_connect(port: int, source: str | None = None) -> LineClient:
    """A line client; ``source`` is the local address to connect from (127.0.0.2...)."""
    inbox = Inbox()

    class Factory(protocol.Factory):
        def buildProtocol(self, addr):
            p = _Lines()
            p.inbox = inbox
            p.factory = self
            return p

    bind = (source, 0) if source else None
    proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port,
                                     bindAddress=bind).connect(Factory())
    return LineClient(proto)


@implementer(IBodyProducer)
class _Body:
    def __init__(self, data: bytes):
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return defer.succeed(None)

    def stopProducing(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


class Response:
    def __init__(self, status: int, headers, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


async def http(method: str, url: str, body: bytes | None = None,
               headers: dict[str, str] | None = None, source: str | None = None,
               tls_policy=None) -> Response:
    """One request; ``tls_policy`` (``BrowserLikePolicyForHTTPS``) for https:// URLs."""
    hdrs = Headers({k: [v] for k, v in (headers or {}).items()})
    extra = {"contextFactory": tls_policy} if tls_policy is not None else {}
    agent = Agent(reactor, bindAddress=(source, 0) if source else None, **extra)
    response = await agent.request(method.encode(), url.encode(), hdrs,
                                            _Body(body) if body is not None else None)
    data = await readBody(response)
    return Response(response.code, response.headers, data)


async def get(port: int, path: str, **params) -> Response:
    query = ("?" + urlencode(params)) if params else ""
    return await http("GET", f"http://127.0.0.1:{port}{path}{query}")


async def post_form(port: int, path: str, **params) -> Response:
    return await http("POST", f"http://127.0.0.1:{port}{path}", urlencode(params).encode(),
                      {"Content-Type": "application/x-www-form-urlencoded"})


def multipart(data: bytes, filename: str = "f.bin", field: str = "file",
              content_type: str = "application/octet-stream") -> tuple[bytes, str]:
    """A multipart/form-data body holding one file, and its Content-Type header."""
    boundary = "imdtest" + secrets.token_hex(8)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def post_file(port: int, path: str, data: bytes, filename: str = "f.bin",
                    field: str = "file", query: str = "",
                    content_type: str = "application/octet-stream",
                    source: str | None = None) -> Response:
    body, body_type = multipart(data, filename, field, content_type)
    return await http("POST", f"http://127.0.0.1:{port}{path}{query}", body,
                      {"Content-Type": body_type}, source)


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10) -> None:
    """Block until 127.0.0.1:``port`` takes connections (a server process starting up);
    raise if ``proc`` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server on port {port} exited: {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} after {timeout} s")
            time.sleep(0.05)
