"""66boss over plain TCP: one signal per ``\\n``-terminated UTF-8 line (``--boss-line``).

So that any message fits on one line, a backslash, CR and LF inside a signal are written as
``\\\\``, ``\\r`` and ``\\n`` in both directions; a trailing CR before the LF is ignored.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.protocols.basic import LineOnlyReceiver

from imd.protocols.boss import signals
from imd.protocols.boss.connection import BossConnection, BossService
from imd.protocols.boss.proofs import source_host
from imd.protocols.flow import Outbox, ReadGate, tune_socket

_ESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class BossLine(LineOnlyReceiver):
    delimiter = b"\n"
    conn: BossConnection | None = None

    @property
    def user_id(self) -> int | None:
        """Who logged in on this connection (the login deadline, imd/guard.py, asks)."""
        return self.conn.user_id if self.conn is not None else None

    def connectionMade(self):
        service = self.factory.service
        self.MAX_LENGTH = service.config.max_frame
        tune_socket(self.transport, service.config.heartbeat + service.config.heartbeat_timeout)
        outbox = Outbox(self.transport, self._send_text, service.config.max_pending,
                        self._overflowed)
        self.conn = BossConnection(service, outbox, ReadGate(self.transport),
                                   self.transport.loseConnection, self.transport.abortConnection,
                                   source_host(self.transport.getPeer()))
        self.conn.opened()

    def lineReceived(self, line: bytes):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.conn.write(signals.error("line", "not valid UTF-8"))
            return
        self.conn.signal_received(unescape(text))

    def lineLengthExceeded(self, line):
        self.conn.write(signals.error("line", "line too long"))
        self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone):
        if self.conn is not None:
            self.conn.closed()
            self.conn = None

    def _overflowed(self) -> None:
        if self.conn is not None:
            self.conn.overflowed()

    def _send_text(self, text: str) -> bool:
        self.transport.write(escape(text).encode("utf-8") + b"\n")
        return True


def line_factory(service: BossService) -> protocol.Factory:
    factory = protocol.Factory.forProtocol(BossLine)
    factory.service = service
    factory.noisy = False
    return factory
