"""The admin endpoint (``--admin``): its own twisted.web Site, apart from the client ports.

    /          the admin page (static HTML and JavaScript; the token is typed in)
    /metrics   Prometheus text format, from this daemon's own CollectorRegistry
    /health    200 while the process runs
    /ready     200 once every listener is up and Redis answers a PING; else 503 and why
    /api/...   the admin API (``imd.admin.api``), with a bearer token from ``imdctl``

Every few seconds the endpoint also times a PING to Redis and records this node's sessions
per protocol in the store (what ``/api/sessions`` shows for every node).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.application import service
from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.web import resource, server, static

import imd
from imd.accounts import Accounts
from imd.admin.api import Api
from imd.admin.ops import Ops
from imd.compose import listen
from imd.metrics import registry
from imd.unavailable import Unavailable
from imd.web import AsyncJSONResource

log = Logger()
REPORT_INTERVAL = 5.0  # seconds between Redis PINGs and session reports
PING_TIMEOUT = 2.0
WWW = Path(__file__).parent / "www"


class AdminService(service.Service):
    """The admin endpoint of one daemon, a child service that listens on ``--admin``;
    ``daemon`` is its ImdService (``hub`` is set once Redis is up, ``ready`` fires once
    every listener is)."""

    name = "admin"
    port = None

    def __init__(self, daemon):
        self.daemon = daemon
        self.queue_depth = 0
        self.registry = registry(_Live(self))
        self._ops: Ops | None = None
        self._loop = task.LoopingCall(self._report)
        root = resource.Resource()
        root.putChild(b"", static.File(str(WWW / "index.html"), defaultType="text/html"))
        root.putChild(b"metrics", Metrics(self))
        root.putChild(b"health", AsyncJSONResource(_health))
        root.putChild(b"ready", AsyncJSONResource(lambda request: _ready(self)))
        root.putChild(b"api", Api(self.ops))
        self.site = QuietSite(root)

    @property
    def hub(self):
        return self.daemon.hub

    def ops(self) -> Ops | None:
        """The operations, once the store is up."""
        if self._ops is None and self.hub is not None:
            self._ops = Ops(self.hub, Accounts(self.hub.store, self.daemon.config.token_ttl))
        return self._ops

    def startService(self) -> defer.Deferred:
        super().startService()
        self._loop.start(REPORT_INTERVAL, now=False)
        return defer.ensureDeferred(self._listen())

    async def _listen(self) -> None:
        self.port = await listen(self.daemon.config.admin, self.site,
                                 "admin (metrics, health, API)")

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()

    def _report(self) -> defer.Deferred:
        d = defer.ensureDeferred(self._report_once())
        return d.addErrback(lambda f: None if f.check(Unavailable, defer.TimeoutError) else
                            log.warn("admin report failed: {e}", e=f.getErrorMessage()))

    async def _report_once(self) -> None:
        ops = self.ops()
        if ops is None or self.hub.stopping:
            return
        await self.ping()
        await self.hub.store.set_node_sessions(self.hub.node, ops.local_counts(),
                                               int(REPORT_INTERVAL * 3000))

    def ping(self) -> defer.Deferred:
        """Deferred[float]: a timed PING (fails after PING_TIMEOUT s)."""
        return defer.ensureDeferred(self.hub.store.ping()).addTimeout(PING_TIMEOUT, reactor)

    async def refresh(self) -> None:
        """What /metrics reads from Redis at scrape time."""
        if self.hub is not None:
            await self.ping()
            self.queue_depth = await self.hub.store.queue_depth()


class QuietSite(server.Site):
    noisy = False

    def log(self, request):
        pass  # a scraper or the page polling every few seconds: no access log lines


class _Live:
    """The values computed at scrape time."""

    def __init__(self, admin: AdminService):
        self.admin = admin

    def collect(self):
        hub = self.admin.hub
        sessions = GaugeMetricFamily("imd_sessions", "Sessions on this node, per protocol",
                                     labels=["protocol"])
        info = InfoMetricFamily("imd_node", "This node's id and imd's version")
        open_ = GaugeMetricFamily("imd_open_connections", "Client connections open on this "
                                  "node, per protocol (webim: bound tickets)",
                                  labels=["protocol"])
        for protocol in self.admin.daemon.protocols:
            if protocol.running:
                open_.add_metric([protocol.name], protocol.open_connections())
        depth = GaugeMetricFamily("imd_offline_queue_messages",
                                  "Messages waiting in offline queues (all nodes; estimated "
                                  "from a sample of users beyond 200)")
        if hub is not None:
            ops = self.admin.ops()
            for protocol, n in sorted(ops.local_counts().items()):
                sessions.add_metric([protocol], n)
            info.add_metric([], {"node": hub.node, "version": _version()})
            depth.add_metric([], self.admin.queue_depth)
        yield from (sessions, open_, info, depth)


def _version() -> str:
    return getattr(imd, "__version__", "")


class Metrics(resource.Resource):
    isLeaf = True

    def __init__(self, admin: AdminService):
        super().__init__()
        self.admin = admin

    def render_GET(self, request):
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self.admin.refresh())

        def write(result):
            # Redis down: the counters are still worth serving (the RTT shows the outage).
            if isinstance(result, defer.Failure) and not result.check(
                    Unavailable, defer.TimeoutError):
                log.failure("metrics refresh failed", result)
            if gone:
                return
            body = generate_latest(self.admin.registry)
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        d.addBoth(write)
        return server.NOT_DONE_YET


async def _health(request) -> tuple[int, dict]:
    return 200, {"status": "ok"}


async def _ready(admin: AdminService) -> tuple[int, dict]:
    if not admin.daemon.ready.called or admin.hub is None:
        return 503, {"ready": False, "reason": "starting: listeners not all up yet"}
    if admin.hub.stopping:
        return 503, {"ready": False, "reason": "stopping"}
    try:
        await admin.ping()
    except defer.TimeoutError:
        return 503, {"ready": False,
                     "reason": f"Redis did not answer a PING within {PING_TIMEOUT:g} s"}
    except Unavailable as e:
        return 503, {"ready": False, "reason": f"Redis unreachable: {e}"}
    return 200, {"ready": True}
