"""Flow control shared by the long-lived client connections of every protocol.

- ``Outbox``: what one connection has to write, kept as items (each carrying the hub messages
  it shows) in a bounded queue and written as the transport asks for more (Twisted's
  producer/consumer API).  A client that stops reading is dropped when its queue is full, and
  whatever was not written is handed back as messages, so its user's offline queue gets them.
- ``ReadGate``: stop reading a connection while too many of its requests are being answered.
- ``tune_socket``: TCP keepalive and TCP_USER_TIMEOUT, so a peer that vanished (no FIN, no RST)
  is dropped once a heartbeat goes unacknowledged for the timeout, not after ~15 minutes.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Callable, Iterable

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from imd.model import Message

log = Logger()
IN_FLIGHT = 32  # requests of one connection under way before it is not read any more


@implementer(IPushProducer)
class Outbox:
    """The bounded write queue of one connection, registered as its transport's producer.

    ``emit(data)`` writes one item to the connection and returns False when the connection can
    no longer take it (closing).  Items are written at once while the transport keeps up; once
    it pauses us they wait, up to ``limit`` of them.  One more calls ``overflow()``, which ends
    the session (``close()`` hands back the messages not written) and closes the connection
    after what the transport already took, so a client that reads again gets that, then EOF.
    """

    # One per connection, mostly idle: no __dict__, and the queue is made when first needed.
    __slots__ = ("_emit", "_overflow", "limit", "_queue", "_backlog", "_paused", "closed",
                 "_transport", "_registered")

    def __init__(self, transport, emit: Callable[[object], bool], limit: int,
                 overflow: Callable[[], None]):
        self._emit = emit
        self._overflow = overflow
        self.limit = limit
        self._queue: deque[tuple[object, tuple[Message, ...], bool]] | None = None
        self._backlog = 0  # items put with bounded=False, not counted against the limit
        self._paused = False
        self.closed = False
        self._transport = transport
        self._registered = True
        try:
            transport.registerProducer(self, True)
        except RuntimeError:
            # A WebSocket transport taken over from twisted.web still has the HTTP channel
            # registered as its producer; it no longer owns the transport, so replace it.
            transport.unregisterProducer()
            transport.registerProducer(self, True)

    def __len__(self) -> int:
        return len(self._queue) if self._queue else 0

    def _append(self, item) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(item)

    def put(self, data, messages: Iterable[Message] = (), bounded: bool = True) -> None:
        """Write ``data`` (showing ``messages``) now, or queue it behind what waits.

        ``bounded=False``: the offline queue handed over at login, already bounded by the
        store; it may exceed ``limit`` (else a big backlog could never be delivered)."""
        if not self._paused and not self._queue and not self.closed:
            if self._emit(data):  # the common case: written at once, nothing to keep
                return
            self._release()
            self._append((data, tuple(messages), bounded))
            return
        item = (data, tuple(messages), bounded)
        if self.closed:
            if item[1]:
                self._append(item)  # kept for close(), so its messages are not lost
            return
        if bounded and len(self) - self._backlog >= self.limit:
            log.warn("closing a client that does not read: {n} items waiting",
                     n=len(self._queue))
            self._append(item)
            self._release()
            self._overflow()
            return
        self._append(item)
        self._backlog += not bounded

    def close(self) -> list[Message]:
        """Stop writing; the messages of every item not written, in order (and, if called
        again, of whatever was put since)."""
        self._release()
        left = [m for _, messages, _ in self._queue or () for m in messages]
        self._queue = None
        self._backlog = 0
        return left

    # -- IPushProducer (called by the transport) ---------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._queue and not self._paused and not self.closed:
            data, _, bounded = self._queue[0]
            if not self._emit(data):
                self._release()
                return
            self._queue.popleft()
            self._backlog -= not bounded
        if not self._queue:
            self._queue = None  # a burst's deque is not kept by an idle connection

    def stopProducing(self) -> None:
        self.closed = True
        self._registered = False

    def _release(self) -> None:
        """Stop writing and let the transport go: a loseConnection() waits for its
        registered producer, so a closed outbox must unregister."""
        self.closed = True
        if self._registered:
            self._registered = False
            self._transport.unregisterProducer()


class ReadGate:
    """Back-pressure on the read side: the transport stops reading while more than ``limit``
    requests of the connection are under way (like twisted.web's HTTPChannel)."""

    __slots__ = ("_transport", "limit", "busy", "_paused")  # one per connection

    def __init__(self, transport, limit: int = IN_FLIGHT):
        self._transport = transport
        self.limit = limit
        self.busy = 0
        self._paused = False

    def begin(self) -> None:
        self.busy += 1
        if self.busy > self.limit and not self._paused:
            self._paused = True
            self._transport.pauseProducing()

    def end(self, result=None):
        self.busy -= 1
        if self._paused and self.busy <= self.limit // 2:
            self._paused = False
            self._transport.resumeProducing()
        return result


def tune_socket(transport, user_timeout: float) -> None:
    """Turn on keepalive and TCP_USER_TIMEOUT on a TCP transport; ignore other transports."""
    try:
        sock = transport.getHandle()
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle = max(1, int(user_timeout))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
    except (AttributeError, OSError):
        pass
