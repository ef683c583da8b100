"""systemd's notification protocol: readiness, stopping and the watchdog (``Type=notify``).

systemd passes a unix datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` in the
abstract namespace); a service reports its state by sending ``KEY=value`` lines to it.  imd
sends ``READY=1`` once every listener is up, ``STOPPING=1`` when it starts to shut down and,
when the unit sets ``WatchdogSec=`` (systemd then passes ``WATCHDOG_USEC``), ``WATCHDOG=1``
every half period while the reactor turns and Redis answers.  Without ``NOTIFY_SOCKET``
(not under systemd) every call here does nothing.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Mapping

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def notify(*states: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``states`` (``"READY=1"``, ``"STATUS=..."``) to systemd; False if not under it.

    The socket is non-blocking: a datagram that systemd cannot take at once is dropped
    rather than stalling the reactor.
    """
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(states).encode(), address)
    except OSError as e:
        log.warn("cannot notify systemd at {address}: {e}", address=environ["NOTIFY_SOCKET"],
                 e=e.strerror or e)
        return False
    return True


def watchdog_period(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None if none is asked.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for.
    """
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Watchdog:
    """Pings systemd's watchdog every ``period`` seconds while ``healthy()`` succeeds.

    ``healthy`` is asked each time (a Redis PING); a ping is sent only if it answers within
    the period.  A stuck reactor or an unanswered check leaves the pings out, and systemd
    restarts the service after ``WatchdogSec``.
    """

    def __init__(self, clock, period: float, healthy: Callable[[], defer.Deferred],
                 environ: Mapping[str, str] = os.environ):
        self.clock = clock
        self.period = period
        self.healthy = healthy
        self.environ = environ
        self.failing = False
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.period, now=True).addErrback(
            lambda f: log.failure("watchdog stopped", f))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> defer.Deferred:
        # A check that does not answer within the period counts as failed; it is not
        # cancelled (a Redis client may still answer it later).
        result = defer.Deferred()
        timer = self.clock.callLater(
            self.period, lambda: result.called or result.errback(defer.TimeoutError()))

        def settle(outcome):
            if timer.active():
                timer.cancel()
            if not result.called:
                (result.errback if isinstance(outcome, Failure) else result.callback)(outcome)

        defer.maybeDeferred(self.healthy).addBoth(settle)
        return result.addCallbacks(self._healthy, self._unhealthy)

    def _healthy(self, _) -> None:
        if self.failing:
            self.failing = False
            log.info("watchdog: health check passes again, pinging systemd")
        notify("WATCHDOG=1", environ=self.environ)

    def _unhealthy(self, failure) -> None:
        if not self.failing:  # once per bad spell, not every period
            self.failing = True
            reason = ("no answer" if failure.check(defer.TimeoutError)
                      else failure.getErrorMessage() or failure.type.__name__)
            log.warn("watchdog: not pinging systemd while the health check fails ({reason}); "
                     "systemd restarts imd after WatchdogSec", reason=reason)
