"""66boss over WebSocket: one text frame is one signal (path ``/entry``)."""

from __future__ import annotations

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet import reactor

from imd.protocols.boss import signals
from imd.protocols.boss.connection import BossConnection, BossService
from imd.protocols.boss.proofs import source_host
from imd.protocols.flow import Outbox, ReadGate, tune_socket
from imd.protocols.wsstate import forget_handshake, lean_protocol
from imd.protocols.wsturn import TurnFrames, TurnWriter


class BossWebSocket(TurnFrames):
    conn: BossConnection | None = None

    @property
    def user_id(self) -> int | None:
        """Who logged in on this connection (the login deadline, imd/guard.py, asks)."""
        return self.conn.user_id if self.conn is not None else None

    def onOpen(self):
        service = self.factory.service
        tune_socket(self.transport, service.config.heartbeat + service.config.heartbeat_timeout)
        outbox = Outbox(self.transport, self._send_text, service.config.max_pending,
                        self._overflowed)
        self.conn = BossConnection(service, outbox, ReadGate(self.transport), self._close,
                                   self._abort,
                                   source_host(self.transport.getPeer()))
        self.conn.opened()
        forget_handshake(self)

    def onMessage(self, payload: bytes, isBinary: bool):
        # Text frames are not validated by autobahn (utf8validateIncoming=False): decoding
        # here is the check, done once, and bad text gets an error signal like bad binary.
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            self.conn.write(signals.error("frame", "frames must be UTF-8 text"))
            return
        self.conn.signal_received(text)

    def onMessageEnd(self):
        # Autobahn's version also "fires" a message event to observers, creating a future
        # per message; nothing observes it here, and it cost ~10% of a message's CPU time.
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)

    def onClose(self, wasClean, code, reason):
        if self.conn is not None:
            self.conn.closed()
            self.conn = None

    def _send_text(self, text: str) -> bool:
        return self.send_text(text.encode("utf-8"))

    def _overflowed(self) -> None:
        if self.conn is not None:
            self.conn.overflowed()

    def _close(self) -> None:
        self.sendClose(1000)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


def entry_resource(service: BossService) -> WebSocketResource:
    config = service.config
    factory = WebSocketServerFactory()
    factory.service = service
    factory.turn_writer = TurnWriter(reactor)
    factory.setProtocolOptions(
        maxFramePayloadSize=config.max_frame, maxMessagePayloadSize=config.max_frame,
        utf8validateIncoming=False,
        autoPingInterval=config.heartbeat, autoPingTimeout=config.heartbeat_timeout,
        openHandshakeTimeout=10, closeHandshakeTimeout=5, failByDrop=False)
    lean_protocol(factory, BossWebSocket)
    return WebSocketResource(factory)
