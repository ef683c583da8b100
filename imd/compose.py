"""How the daemon is put together: child services that start in order and stop in reverse,
and what a protocol declares to be plugged in.

``Ordered`` is a MultiService whose ``startService`` starts each child and waits for it (a
child's ``startService`` may return a Deferred, as Buildbot's AsyncMultiService allows)
before the next, and whose ``stopService`` stops them one by one, last first.  A child that
fails to start fails the whole start; the children already started are left to the stop.

A protocol is a ``ProtocolService``: built on the daemon (its parent's shared state: config,
hub, accounts, the web root), it mounts its HTTP routes in ``mount``, declares its own
listeners (``Listener``: an endpoint description from the config and a factory) and its
open connections (a metric; the counters it bumps are declared in its modules), and at
shutdown closes its connections and lets their logouts finish.  The daemon opens every
listener after every protocol has started, behind the shared guard (imd/guard.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import resource

log = Logger()
LOGOUT_WAIT = 3.0  # seconds a stopping protocol waits for its connections' logouts


class StartupError(Exception):
    """imd cannot start; the message says why and what to do."""


class Ordered(service.MultiService):
    """Children start in order, each once the one before has started, and stop in reverse."""

    def startService(self) -> defer.Deferred:
        service.Service.startService(self)
        return defer.ensureDeferred(self._start_children())

    async def _start_children(self) -> None:
        for child in list(self):
            await defer.maybeDeferred(child.startService)

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        return defer.ensureDeferred(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                # One child's failure must not keep the others (Redis) from stopping.
                log.failure("stopping {child} failed", child=child.name or child)


@dataclass
class Listener:
    """A listener a protocol wants: ``description`` is a Twisted endpoint string (from the
    config; ``none`` leaves it out), ``what`` names it in the log.  ``login_deadline``: its
    connections must log in within --login-timeout (not for HTTP, which has its own
    timeouts).  ``listening`` is told the port once it is open."""

    description: str
    factory: Any
    what: str
    login_deadline: bool = True
    listening: Callable[[Any], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.description.lower() != "none"


async def listen(description: str, factory, what: str):
    """Open one listener and log where; a failure is a StartupError naming it."""
    try:
        port = await serverFromString(reactor, description).listen(factory)
    except Exception as e:
        raise StartupError(f"cannot listen on {description} for {what}: {e}") from None
    log.info("{what} on {endpoint} ({address})", what=what, endpoint=description,
             address=_address(port))
    return port


def _address(port) -> str:
    try:
        host = port.getHost()
        return f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}".strip(":") or str(host)
    except Exception:
        return "?"


class ProtocolService(Ordered):
    """One protocol of the daemon.  Subclasses set ``name`` and ``upload_paths`` and
    override ``build`` (make the adapter's objects; the hub is up), ``mount`` (its HTTP
    routes on the shared root), ``listeners`` and ``close`` (drop its connections).
    ``check`` may refuse its options before anything starts.  ``build`` may add child
    services (a heartbeat: ``internet.TimerService``); they start after ``mount`` and stop
    before ``close``."""

    name = "protocol"
    web_routes = ""  # what it serves on the web port, for the log ("minami /im/")
    # Paths (or markers in them) of the web port's request bodies that may be big uploads.
    upload_paths: tuple[bytes, ...] = ()

    def __init__(self, daemon):
        super().__init__()
        self.daemon = daemon  # imd.service.ImdService: config, hub, accounts, ...

    def check(self) -> str | None:
        """A start-up check of this protocol's options that needs no reactor: what is
        wrong (the daemon exits with it as its one error line), or None."""
        return None

    def build(self) -> None:
        pass

    def mount(self, root: resource.Resource) -> None:
        pass

    def listeners(self) -> list[Listener]:
        return []

    def close(self) -> None:
        """Drop every connection of this protocol (their logouts follow)."""

    def open_connections(self) -> int:
        """Client connections of this protocol open on this node now (the admin endpoint's
        ``imd_open_connections`` gauge, read at scrape time once the protocol runs)."""
        return 0

    def startService(self) -> defer.Deferred:
        self.build()
        self.mount(self.daemon.root)
        return super().startService()

    def stopService(self) -> defer.Deferred:
        return super().stopService().addCallback(
            lambda _: defer.ensureDeferred(self._stop()))

    async def _stop(self) -> None:
        self.close()
        hub = self.daemon.hub
        if hub is None:
            return
        # Let the closed connections log out and revoke their tokens while Redis is still
        # there (connectionLost runs on a later reactor turn than an abort).
        await task.deferLater(reactor, 0, lambda: None)
        try:
            await hub.logouts_done().addTimeout(LOGOUT_WAIT, reactor)
        except defer.TimeoutError:
            log.warn("{protocol}: logouts still under way at shutdown", protocol=self.name)
