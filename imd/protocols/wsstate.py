"""Small per-connection state for autobahn WebSocket servers (idle connections are most of a
daemon's memory: issue 13 asks for at most 12 KB each).

autobahn copies every protocol option of its factory into each new connection's ``__dict__``
(some 30 attributes) and keeps the parsed opening handshake (request bytes, headers, query
parameters, response bytes) for the life of the connection.  ``lean_protocol`` makes the
options class attributes of a per-factory subclass, so autobahn finds them and copies
nothing; ``forget_handshake`` drops the handshake once the connection is open and compacts
the instance dictionary.  Together they save several KB per connection.
"""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

# Read only while the opening handshake is processed; the class default (None) stands in
# afterwards.
HANDSHAKE_ATTRS = ("http_headers", "http_request_data", "http_response_data",
                   "http_status_line", "http_request_params", "http_request_uri",
                   "http_request_path", "http_request_host", "websocket_extensions",
                   "websocket_protocols", "websocket_origin", "_wskey")


def lean_protocol(factory: WebSocketServerFactory,
                  protocol: type[WebSocketServerProtocol]) -> None:
    """Give ``factory`` a subclass of ``protocol`` holding the factory's current protocol
    options (call after ``setProtocolOptions``) and None for the handshake attributes."""
    attrs = {name: getattr(factory, name) for name in protocol.CONFIG_ATTRS}
    attrs.update(dict.fromkeys(HANDSHAKE_ATTRS))
    factory.protocol = type(protocol.__name__, (protocol,), attrs)


def forget_handshake(connection: WebSocketServerProtocol) -> None:
    """Drop what the opening handshake left on an open connection and shrink its
    ``__dict__`` to what is left (a dict never shrinks when keys are deleted)."""
    state = connection.__dict__
    for name in HANDSHAKE_ATTRS:
        state.pop(name, None)
    connection.__dict__ = dict(state)
