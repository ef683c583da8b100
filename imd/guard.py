"""What every listener shares against idle and greedy clients: a cap on the connections open
from one source address, and a deadline for logging in.

``Guard.wrap`` wraps a listener's factory (``twisted.protocols.policies``): a connection over
the per-address cap is closed as soon as it is accepted, and on the socket listeners a
connection whose protocol has not logged in ``login_timeout`` seconds after it opened is
aborted.  Logged in means the protocol's ``user_id`` is not None (every adapter's connection
has one); the check repeats every ``login_timeout`` seconds, so a connection that logs out
and stays does not stay for good.  On the web port, HTTP has its own timeouts (imd/web.py);
the login deadline starts when an HTTP connection is taken over by a WebSocket protocol.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import noLongerProvides

log = Logger()


def source_host(address) -> str:
    """The host of a peer address (an IPv4-mapped IPv6 address as plain IPv4); "" for a
    unix socket."""
    host = getattr(address, "host", "") or ""
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host


class Guard:
    """Shared by every listener of one daemon."""

    def __init__(self, clock: IReactorTime, max_per_address: int, login_timeout: float):
        self.clock = clock
        self.max_per_address = max_per_address
        self.login_timeout = login_timeout
        self.open: Counter[str] = Counter()  # open connections per source host

    def wrap(self, factory, login_deadline: bool = True) -> "GuardedFactory":
        """``factory`` behind the per-address cap and (``login_deadline``) the login
        deadline from the moment a connection opens."""
        return GuardedFactory(self, factory, login_deadline)

    def admit(self, host: str) -> bool:
        if not host:  # unix sockets: local, not capped
            return True
        if self.max_per_address and self.open[host] >= self.max_per_address:
            return False
        self.open[host] += 1
        return True

    def release(self, host: str) -> None:
        if not host:
            return
        self.open[host] -= 1
        if self.open[host] <= 0:
            del self.open[host]


class GuardedConnection(ProtocolWrapper):
    _inner = None
    _deadline: IDelayedCall | None = None
    host = ""

    # ProtocolWrapper keeps the wrapped protocol in ``wrappedProtocol``.  A WebSocket
    # resource takes over an HTTP connection by replacing it (autobahn does so on a
    # ProtocolWrapper transport), and from then on the connection must log in.
    @property
    def wrappedProtocol(self):
        return self._inner

    @wrappedProtocol.setter
    def wrappedProtocol(self, protocol) -> None:
        # (ProtocolWrapper.connectionLost sets None, to break the cycle: not a takeover.)
        taken_over = self._inner is not None and protocol is not None
        self._inner = protocol
        if taken_over and self.connected:
            self._arm()

    def makeConnection(self, transport):
        # ProtocolWrapper claims every interface of the transport it wraps.  Not TLS: code
        # that sees ISSLTransport reaches for the TLS connection itself (autobahn's channel
        # binding needs a TLSMemoryBIOProtocol), which this wrapper is not.  Whether the
        # connection is secure is asked of ``secure`` instead (see web.ImdChannel).
        self.secure = ISSLTransport.providedBy(transport)
        super().makeConnection(transport)
        if self.secure:
            noLongerProvides(self, ISSLTransport)

    def connectionMade(self):
        if self.factory.login_deadline:
            self._arm()
        super().connectionMade()

    def connectionLost(self, reason):
        self._disarm()
        self.factory.guard.release(self.host)
        self.host = ""
        super().connectionLost(reason)

    def _arm(self) -> None:
        self._disarm()
        guard = self.factory.guard
        self._deadline = guard.clock.callLater(guard.login_timeout, self._check)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _check(self) -> None:
        self._deadline = None
        if getattr(self.wrappedProtocol, "user_id", None) is not None:
            self._arm()
            return
        log.debug("closing a connection from {peer} that did not log in", peer=self.host)
        self.transport.abortConnection()


class GuardedFactory(WrappingFactory):
    protocol = GuardedConnection
    noisy = False

    def __init__(self, guard: Guard, wrapped, login_deadline: bool):
        super().__init__(wrapped)
        self.guard = guard
        self.login_deadline = login_deadline

    def buildProtocol(self, addr):
        host = source_host(addr)
        if not self.guard.admit(host):
            log.debug("refused a connection from {host}: too many open", host=host)
            return None  # the listener closes the connection
        protocol = super().buildProtocol(addr)
        if protocol is None:
            self.guard.release(host)
            return None
        protocol.host = host
        return protocol
