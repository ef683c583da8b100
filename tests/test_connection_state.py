"""Per-connection state of the WebSocket adapters (issue 13: idle connections are most of the
daemon's memory).  An open connection keeps neither autobahn's per-connection copy of the
protocol options nor the parsed opening handshake, and still works."""

from __future__ import annotations

import tracemalloc

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.testing import StringTransport

from imd.protocols.wsstate import HANDSHAKE_ATTRS, INITIAL, forget_handshake, lean_protocol

HANDSHAKE = (b"GET /entry?account=a&password=b HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
MASKED_HI = b"\x81\x82\x00\x00\x00\x00hi"  # a client text frame "hi", zero mask


class Echo(WebSocketServerProtocol):
    lean = True

    def onOpen(self):
        if self.lean:
            forget_handshake(self)

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload.upper())


def factory(lean: bool) -> WebSocketServerFactory:
    f = WebSocketServerFactory()
    f.protocol = Echo
    f.setProtocolOptions(maxFramePayloadSize=1000, maxMessagePayloadSize=1000,
                         autoPingInterval=0, openHandshakeTimeout=0, closeHandshakeTimeout=0,
                         failByDrop=False)  # no timers left behind in the test process
    if lean:
        lean_protocol(f, Echo)
    else:
        f.protocol = type("Fat", (Echo,), {"lean": False})
    return f


def connect(f: WebSocketServerFactory) -> WebSocketServerProtocol:
    p = f.buildProtocol(None)
    p.makeConnection(StringTransport())
    p.dataReceived(HANDSHAKE)
    return p


def test_an_open_connection_keeps_no_options_or_handshake():
    f = factory(lean=True)
    p = connect(f)
    assert p.state == p.STATE_OPEN
    kept = set(vars(p))
    assert not kept & set(Echo.CONFIG_ATTRS)
    assert not kept & set(HANDSHAKE_ATTRS)
    assert not kept & set(INITIAL)
    assert len(kept) < 30
    assert p.maxFramePayloadSize == 1000 and p.http_headers is None
    # It still talks WebSocket: a frame in, the reply out, options still applied.
    p.transport.clear()
    p.dataReceived(MASKED_HI)
    assert p.transport.value() == b"\x81\x02HI"
    p.dataReceived(b"\x81\xfe\x03\xe9\x00\x00\x00\x00" + b"x" * 1001)  # over the limit
    assert p.state != p.STATE_OPEN


def test_a_client_offering_compression_gets_a_plain_connection():
    # perMessageCompressionAccept is a function among the options: still called as one.
    p = factory(lean=True).buildProtocol(None)
    p.makeConnection(StringTransport())
    p.dataReceived(HANDSHAKE.replace(
        b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"))
    assert p.state == p.STATE_OPEN
    assert b"101 Switching Protocols" in p.transport.value()
    assert b"permessage-deflate" not in p.transport.value()


def test_a_lean_connection_takes_less_than_half_the_memory():
    sizes = {}
    for lean in (False, True):
        f = factory(lean)
        keep = [connect(f)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            keep += [connect(f) for _ in range(200)]
            sizes[lean] = (tracemalloc.get_traced_memory()[0] - before) / 200
        finally:
            tracemalloc.stop()
    assert sizes[True] < sizes[False] * 0.7, sizes
