"""The daemon: child services that start in order and stop in reverse (``imd.compose``).

    admin       the admin endpoint (first, so /health and /ready answer during start-up)
    store       Redis (the embedded server, or --redis) and the store on it
    hub         the hub, its node heartbeat and pub/sub link, and the domain services
    <protocol>  one child per entry of PROTOCOLS: builds its adapter, mounts its routes
    listeners   the web port and every protocol's own listeners, behind the guard
    systemd     READY once every listener is up (and the watchdog); STOPPING at shutdown

The daemon itself holds what the children share (config, store, hub, accounts, the web
root), as twisted.mail's MailService does.  A fifth protocol is a package with a
``ProtocolService`` and one line in PROTOCOLS; protocols never import each other.

Start-up is asynchronous; any failure on the way is logged as one line saying why and what
to do, and the process exits with status 1.  Stopping closes the listeners and client
connections, marks this node's users offline, and stops the embedded Redis (which flushes
its append-only file).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from pathlib import Path

from twisted import version as twisted_version
from twisted.application import service
from twisted.internet import defer, reactor
from twisted.logger import Logger

from imd import __version__, sdnotify
from imd.accounts import Accounts
from imd.admin.site import AdminService
from imd.compose import Ordered, ProtocolService, StartupError, listen
from imd.config import Config
from imd.friends import Friends
from imd.groups import Groups
from imd.guard import Guard
from imd.hub import Hub
from imd.passwords import LoginKey
from imd.protocols.boss.service import BossProtocolService
from imd.protocols.minami.service import MinamiProtocolService
from imd.protocols.webim.service import WebimProtocolService
from imd.protocols.xuanxuan.service import XuanxuanProtocolService
from imd.store.connection import (BadRedisURL, RedisAddress, RedisNotReady, connect_pool,
                                  connect_subscriber, parse_redis_url, wait_until_ready)
from imd.store.embedded import (EmbeddedRedis, EmbeddedRedisError, find_redis_server,
                                prepare_data_dir)
from imd.store.redis import RedisStore
from imd.throttle import LoginThrottles
from imd.web import ImdSite, build_root

log = Logger()
STOP_WAIT = 3.0  # seconds each step of the shutdown may wait for Redis
# The cycle collector's thresholds once the daemon is up (see _tune_gc).
GC_THRESHOLDS = (10_000, 20, 100)

# Every protocol the daemon serves, in start order (stopped in reverse).
PROTOCOLS: list[type[ProtocolService]] = [
    BossProtocolService,
    MinamiProtocolService,
    WebimProtocolService,
    XuanxuanProtocolService,
]


def fail(message: str) -> None:
    """Print one error line and exit (before the reactor runs)."""
    raise SystemExit(f"imd: error: {message}")


async def open_store(config: Config, embedded: EmbeddedRedis | None
                     ) -> tuple[RedisAddress, object, RedisStore]:
    """Connect to Redis (starting the embedded one first) and return the store.

    Waits up to ``--redis-wait`` seconds for Redis to answer (a server still loading its
    data answers LOADING), then fails with one line.
    """
    if embedded is not None:
        await embedded.start()
        address = parse_redis_url(embedded.url)
    else:
        address = parse_redis_url(config.redis)
        try:
            await wait_until_ready(address, config.redis_wait)
        except RedisNotReady as e:
            raise StartupError(f"cannot connect to Redis: {e}") from None
    factory = connect_pool(address, poolsize=1, wait=config.redis_timeout)
    timeout = reactor.callLater(max(15, config.redis_timeout), factory.deferred.cancel)
    try:
        redis = await factory.deferred
    except Exception as e:
        factory.disconnect()
        reason = "timed out" if isinstance(e, defer.CancelledError) else str(e)
        raise StartupError(f"cannot use Redis at {address.display} ({reason}): "
                           "check that it runs and that the URL and password are right"
                           ) from None
    finally:
        if timeout.active():
            timeout.cancel()
    store = RedisStore(redis, history_limit=config.history_limit,
                       queue_limit=config.max_queue)
    await store.prepare()
    return address, factory, store


async def _quietly(d: defer.Deferred) -> None:
    """Wait for ``d`` at most STOP_WAIT seconds; Redis may be gone already at shutdown."""
    try:
        await d.addTimeout(STOP_WAIT, reactor)
    except Exception:
        pass


class StoreService(service.Service):
    """Redis and the store: the embedded server (or --redis) and a connection pool."""

    name = "store"

    def __init__(self, daemon: "ImdService"):
        self.daemon = daemon
        self.pool = None

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        daemon = self.daemon
        daemon.redis_address, self.pool, daemon.store = await open_store(daemon.config,
                                                                         daemon.embedded)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.pool is not None:
            await _quietly(self.pool.disconnect())
        if self.daemon.embedded is not None:
            await self.daemon.embedded.stop()


class HubService(service.Service):
    """The hub (its node heartbeat reaps dead nodes), its pub/sub link to the other nodes,
    and the domain services every protocol shares (accounts, friends, groups)."""

    name = "hub"

    def __init__(self, daemon: "ImdService"):
        self.daemon = daemon
        self.subscriber = None

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        daemon, config, store = self.daemon, self.daemon.config, self.daemon.store
        pool = daemon.getServiceNamed("store").pool
        hub = Hub(store, reactor, node_ttl=config.node_timeout, max_body=config.max_frame)
        await hub.start()
        daemon.hub = hub
        subscribed = defer.Deferred()

        def on_connect():
            if not subscribed.called:
                subscribed.callback(None)
            else:
                # The pool may still be waiting for a restarted Redis to load its data.
                d = pool.when_up(None)
                d.addCallback(lambda _: defer.ensureDeferred(hub.resync()))
                d.addErrback(lambda f: log.failure("resync after reconnect failed", f))

        self.subscriber = connect_subscriber(
            daemon.redis_address, [store.channel(hub.node), store.presence_channel()],
            hub.remote_delivery, on_connect)
        await subscribed
        log.info("node {node} using Redis at {redis}", node=hub.node,
                 redis=daemon.redis_address.display)
        daemon.accounts = Accounts(store, config.token_ttl, LoginThrottles(
            reactor, config.login_failures, config.login_address_failures, config.login_window,
            config.registrations, config.register_window),
            daemon.login_key, config.remember_logins)
        daemon.friends, daemon.groups = Friends(hub), Groups(store)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        hub = self.daemon.hub
        if hub is not None:
            # Token revokes of the protocols' last logouts run before a PING sent after them.
            await _quietly(hub.store.redis.ping())
            try:
                await defer.ensureDeferred(hub.stop()).addTimeout(STOP_WAIT, reactor)
            except Exception as e:
                log.warn("could not mark this node's users offline: {e!r}", e=e)
        if self.subscriber is not None:
            await _quietly(self.subscriber.disconnect())


class ListenersService(service.Service):
    """Every listener, opened once the hub and every protocol are up: the web port (one
    Site for every protocol's routes) and each protocol's own listeners, all behind one
    Guard (a cap per source address, a deadline for logging in)."""

    name = "listeners"

    def __init__(self, daemon: "ImdService"):
        self.daemon = daemon
        self.ports: list = []

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        daemon, config = self.daemon, self.daemon.config
        site = ImdSite(daemon.root, max_body=config.max_body, max_upload=config.max_upload,
                       upload_paths=tuple(p for protocol in daemon.protocols
                                          for p in protocol.upload_paths),
                       timeout=config.login_timeout, request_timeout=config.request_timeout,
                       upload_timeout=config.upload_timeout, spool_dir=daemon.data_dir,
                       logPath=config.access_log or None, public_hosts=config.public_hosts)
        guard = Guard(reactor, config.max_connections_per_address, config.login_timeout)
        what = "web ({})".format("; ".join(p.web_routes for p in daemon.protocols
                                           if p.web_routes))
        for description in config.web:
            self.ports.append(await listen(description, guard.wrap(site, login_deadline=False),
                                           what))
        for protocol in daemon.protocols:
            for listener in protocol.listeners():
                if not listener.enabled:
                    continue
                port = await listen(listener.description,
                                    guard.wrap(listener.factory, listener.login_deadline),
                                    listener.what)
                self.ports.append(port)
                if listener.listening is not None:
                    listener.listening(port)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        ports, self.ports = self.ports, []
        for port in ports:
            try:
                await port.stopListening()
            except Exception as e:
                log.warn("could not close a listener: {e!r}", e=e)


class SystemdService(service.Service):
    """Tells systemd (Type=notify) READY once every listener is up, runs its watchdog, and
    says STOPPING first thing at shutdown."""

    name = "systemd"
    watchdog: sdnotify.Watchdog | None = None

    def __init__(self, daemon: "ImdService"):
        self.daemon = daemon

    def startService(self) -> None:
        super().startService()
        hub = self.daemon.hub
        sdnotify.notify("READY=1", f"STATUS=serving as node {hub.node}")
        period = sdnotify.watchdog_period()
        if period is not None:
            self.watchdog = sdnotify.Watchdog(reactor, period, hub.store.redis.ping)
            self.watchdog.start()

    def stopService(self) -> None:
        super().stopService()
        sdnotify.notify("STOPPING=1")
        if self.watchdog is not None:
            self.watchdog.stop()


class ImdService(Ordered):
    """The daemon: the shared state of its children, which it starts in order."""

    def __init__(self, config: Config,
                 protocols: list[type[ProtocolService]] | None = None):
        super().__init__()
        self.config = config
        self.data_dir = Path(config.data_dir).resolve()
        self.embedded: EmbeddedRedis | None = None
        self.ready = defer.Deferred()
        # Set by the children as they start.
        self.redis_address: RedisAddress | None = None
        self.store: RedisStore | None = None
        self.hub: Hub | None = None
        self.accounts: Accounts | None = None
        self.friends: Friends | None = None
        self.groups: Groups | None = None
        self.root = build_root()  # the web port's routes; every protocol mounts its own
        self.check()
        self.protocols = [protocol(self) for protocol in (PROTOCOLS if protocols is None
                                                          else protocols)]
        for protocol in self.protocols:
            problem = protocol.check()
            if problem:
                fail(problem)
        if config.admin.lower() != "none":
            AdminService(self).setServiceParent(self)
        StoreService(self).setServiceParent(self)
        HubService(self).setServiceParent(self)
        for protocol in self.protocols:
            protocol.setServiceParent(self)
        ListenersService(self).setServiceParent(self)
        SystemdService(self).setServiceParent(self)

    def check(self) -> None:
        """The start-up checks that need no reactor; exits with one line on failure."""
        try:
            if self.config.redis:
                parse_redis_url(self.config.redis)
                prepare_data_dir(self.config.data_dir)
            else:
                find_redis_server()
                self.embedded = EmbeddedRedis(self.config.data_dir, self.config.redis_wait)
                self.embedded.lock()
        except (BadRedisURL, EmbeddedRedisError) as e:
            fail(str(e))
        except OSError as e:
            fail(f"cannot use data directory {self.data_dir}: {e.strerror}")
        key_path = self.config.login_key or str(Path(self.config.data_dir) / "login.key")
        try:
            self.login_key = LoginKey.load(key_path)
        except OSError as e:
            fail(f"cannot use the login key file {key_path} ({e.strerror}): fix its directory "
                 "or permissions, or choose another --login-key")
        if self.config.access_log:
            try:
                open(self.config.access_log, "a").close()
            except OSError as e:
                fail(f"cannot write the access log {self.config.access_log} ({e.strerror}): "
                     "fix its directory or permissions, or choose another --access-log")

    def startService(self) -> defer.Deferred:
        log.info("imd {version} starting (Python {python}, Twisted {twisted})",
                 version=__version__, python=sys.version.split()[0],
                 twisted=twisted_version.short())
        # SIGHUP would otherwise kill the process on the spot (no clean stop of the embedded
        # Redis); imd reads its configuration and certificates at start only.
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(
            log.warn, "SIGHUP ignored: imd reloads nothing; restart it to apply a new "
            "configuration or certificate"))
        # A second SIGTERM or SIGINT (an impatient operator, a supervisor that repeats it)
        # would make the reactor stop twice and log a traceback: once stopping, say so.
        reactor.callWhenRunning(_stop_signals_once)
        d = super().startService()
        d.addCallback(_tune_gc)
        return d.addCallbacks(self.ready.callback, self._start_failed)

    def _start_failed(self, failure) -> None:
        if failure.check(StartupError, EmbeddedRedisError):
            log.critical("imd: error: {message}", message=str(failure.value))
        else:
            log.failure("imd: error: start-up failed", failure)
        self.ready.errback(failure)
        reactor.addSystemEventTrigger("after", "shutdown", _exit_with_error)
        # twistd starts the service before it runs the reactor: a child that fails at once
        # (a busy --admin port) fails before there is a reactor to stop.
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    def stopService(self) -> defer.Deferred:
        d = super().stopService()
        d.addCallback(lambda _: log.info("imd stopped"))
        return d


def _tune_gc(result=None):
    """Keep the cycle collector off the message path.  With Python's defaults (a young
    collection every 700 new objects) a busy daemon scanned its whole heap several times a
    second: every message under way holds a few dozen small objects, at thousands of
    messages a second they live long enough to reach the oldest generation, and each full
    collection also walked the ~65,000 objects loaded at start-up (up to 45% of the
    daemon's CPU under load, and pauses of 50-250 ms).  What exists once the daemon is up
    (modules, classes, the services) is frozen out of the collector, and collections run
    less often; reference counting still frees everything that is not in a cycle at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return result


def _stop_signals_once() -> None:
    """Wrap the reactor's SIGTERM and SIGINT handlers (installed by now) so that only the
    first signal stops it; later ones are logged."""
    seen: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        first = signal.getsignal(signum)
        if not callable(first):
            continue

        def handler(number, frame, first=first) -> None:
            if seen:
                reactor.callFromThread(log.info, "already stopping ({signal})",
                                       signal=signal.Signals(number).name)
                return
            seen.append(number)
            first(number, frame)

        signal.signal(signum, handler)


def _exit_with_error() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def make_service(config: Config) -> ImdService:
    return ImdService(config)
