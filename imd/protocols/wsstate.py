"""Small per-connection state for autobahn WebSocket servers (idle connections are most of a
daemon's memory: issue 13 asks for at most 12 KB each).

autobahn copies every protocol option of its factory into each new connection's ``__dict__``
(some 30 attributes), keeps the parsed opening handshake (request bytes, headers, query
parameters, response bytes) for the life of the connection, sets two dozen flags that stay at
their initial value, and gives each connection a deque for chopped or synchronous sends,
which imd does not make.  ``lean_protocol`` makes the options and those initial values class
attributes of a per-factory subclass, so autobahn finds them and copies nothing;
``forget_handshake`` drops the handshake and the flags still at their initial value once the
connection is open, compacts the instance dictionary, and swaps the empty deque for an empty
list.  Together they save about 5 KB per connection.
"""

from __future__ import annotations

from collections import deque

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

# Read only while the opening handshake is processed; the class default (None) stands in
# afterwards.
HANDSHAKE_ATTRS = ("http_headers", "http_request_data", "http_response_data",
                   "http_status_line", "http_request_params", "http_request_uri",
                   "http_request_path", "http_request_host", "websocket_extensions",
                   "websocket_protocols", "websocket_origin", "_wskey")
# Connection state autobahn initialises per connection that keeps these values while all is
# well; an instance attribute is dropped only while it still holds exactly this value.
INITIAL = {"wasServingFlashSocketPolicyFile": False, "wasOpenHandshakeTimeout": False,
           "wasCloseHandshakeTimeout": False, "wasServerConnectionDropTimeout": False,
           "wasMaxFramePayloadSizeExceeded": False, "wasMaxMessagePayloadSizeExceeded": False,
           "wasClean": False, "wasNotCleanReason": None, "trackedTimings": None,
           "openHandshakeTimeoutCall": None, "closeHandshakeTimeoutCall": None,
           "autoPingTimeoutCall": None, "websocket_protocol_in_use": None,
           "_perMessageCompress": None, "localCloseCode": None, "localCloseReason": None,
           "remoteCloseCode": None, "remoteCloseReason": None, "closedByMe": False,
           "droppedByMe": False, "failedByMe": False, "inside_message": False,
           "current_frame": None}


class _SendQueue(list):
    """What autobahn asks of its send queue (len, append, popleft), in an empty list's
    56 bytes instead of an empty deque's 600."""

    __slots__ = ()

    def popleft(self):
        return self.pop(0)


def lean_protocol(factory: WebSocketServerFactory,
                  protocol: type[WebSocketServerProtocol]) -> None:
    """Give ``factory`` a subclass of ``protocol`` holding the factory's current protocol
    options (call after ``setProtocolOptions``) and None for the handshake attributes."""
    attrs = {name: getattr(factory, name) for name in protocol.CONFIG_ATTRS}
    for name, value in attrs.items():
        if callable(value):  # e.g. perMessageCompressionAccept: not to be bound as a method
            attrs[name] = staticmethod(value)
    attrs.update(dict.fromkeys(HANDSHAKE_ATTRS))
    attrs.update(INITIAL)
    factory.protocol = type(protocol.__name__, (protocol,), attrs)


def forget_handshake(connection: WebSocketServerProtocol) -> None:
    """Drop what the opening handshake left on an open connection and the state still at its
    initial value, and shrink its ``__dict__`` to what is left (a dict never shrinks when
    keys are deleted).  Call at the end of ``onOpen``."""
    state = connection.__dict__
    for name in HANDSHAKE_ATTRS:
        state.pop(name, None)
    for name, value in INITIAL.items():
        if name in state and state[name] is value:
            del state[name]
    queue = state.get("send_queue")
    if type(queue) is deque and not queue:
        state["send_queue"] = _SendQueue()
    connection.__dict__ = dict(state)
