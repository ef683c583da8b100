"""Builds and runs the daemon: embedded Redis (or a URL), store, hub, pub/sub bus, listeners.

Start-up is asynchronous: Redis first, then the hub, then the listeners.  Any failure on the
way is logged as one line saying why and what to do, and the process exits with status 1.
Stopping closes the listeners and client connections, marks this node's users offline, and
stops the embedded redis-server (which flushes its append-only file).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from twisted import version as twisted_version
from twisted.application import service
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from imd import __version__, sdnotify
from imd.accounts import Accounts
from imd.admin.site import AdminService
from imd.config import Config
from imd.chats import Chats
from imd.friends import Friends
from imd.groups import Groups
from imd.guard import Guard
from imd.hub import Hub
from imd.passwords import LoginKey
from imd.protocols.boss import http as boss_http
from imd.protocols.boss import uploads as boss_uploads
from imd.protocols.boss.connection import BossService
from imd.protocols.boss.line import line_factory
from imd.protocols.boss.ws import entry_resource
from imd.protocols.minami import routes as minami_routes
from imd.protocols.minami.ws import MinamiService
from imd.protocols.webim import routes as webim_routes
from imd.protocols.webim.actions import WebimActions
from imd.protocols.webim.tickets import Tickets
from imd.protocols.xuanxuan import http as xuanxuan_http
from imd.protocols.xuanxuan.http import XuanxuanHttp
from imd.protocols.xuanxuan.socket import XuanxuanService, socket_factory
from imd.store.connection import (BadRedisURL, RedisAddress, RedisNotReady, connect_pool,
                                  connect_subscriber, parse_redis_url, wait_until_ready)
from imd.store.embedded import (EmbeddedRedis, EmbeddedRedisError, find_redis_server,
                                prepare_data_dir)
from imd.store.redis import RedisStore
from imd.throttle import LoginThrottles
from imd.web import ImdSite, build_root

log = Logger()


class StartupError(Exception):
    """imd cannot start; the message says why and what to do."""


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


class ImdService(service.MultiService):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.data_dir = Path(config.data_dir).resolve()
        self.embedded: EmbeddedRedis | None = None
        self.ports: list = []
        self.ready = defer.Deferred()
        self._factories: list = []
        self.hub: Hub | None = None
        self.boss: BossService | None = None
        self.tickets: Tickets | None = None
        self.connections: set = set()  # minami and xuanxuan client connections
        self.watchdog: sdnotify.Watchdog | None = None
        self.check()

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
        if self.config.access_log:
            try:
                open(self.config.access_log, "a").close()
            except OSError as e:
                fail(f"cannot write the access log {self.config.access_log} ({e.strerror}): "
                     "fix its directory or permissions, or choose another --access-log")

    def startService(self) -> None:
        log.info("imd {version} starting (Python {python}, Twisted {twisted})",
                 version=__version__, python=sys.version.split()[0],
                 twisted=twisted_version.short())
        super().startService()
        # SIGHUP would otherwise kill the process on the spot (no clean stop of the embedded
        # Redis); imd reads its configuration and certificates at start only.
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(
            log.warn, "SIGHUP ignored: imd reloads nothing; restart it to apply a new "
            "configuration or certificate"))
        d = defer.ensureDeferred(self._start())
        d.addCallbacks(self.ready.callback, self._start_failed)

    def _start_failed(self, failure) -> None:
        if failure.check(StartupError, EmbeddedRedisError):
            log.critical("imd: error: {message}", message=str(failure.value))
        else:
            log.failure("imd: error: start-up failed", failure)
        self.ready.errback(failure)
        reactor.addSystemEventTrigger("after", "shutdown", _exit_with_error)
        reactor.stop()

    async def _start(self) -> None:
        config = self.config
        if config.admin.lower() != "none":
            # First, so that /health and /ready answer during the start-up.
            admin = AdminService(self)
            admin.setServiceParent(self)
            await self._listen(config.admin, admin.site, "admin (metrics, health, API)")
        address, factory, store = await open_store(config, self.embedded)
        self._factories.append(factory)
        self.hub = hub = Hub(store, reactor, node_ttl=config.node_timeout,
                             max_body=config.max_frame)
        await hub.start()
        subscribed = defer.Deferred()

        def on_connect():
            if not subscribed.called:
                subscribed.callback(None)
            else:
                # The pool may still be waiting for a restarted Redis to load its data.
                d = factory.when_up(None)
                d.addCallback(lambda _: defer.ensureDeferred(hub.resync()))
                d.addErrback(lambda f: log.failure("resync after reconnect failed", f))

        self._factories.append(connect_subscriber(
            address, [store.channel(hub.node), store.presence_channel()],
            hub.remote_delivery, on_connect))
        await subscribed
        log.info("node {node} using Redis at {redis}", node=hub.node, redis=address.display)

        accounts = Accounts(store, config.token_ttl, LoginThrottles(
            reactor, config.login_failures, config.login_address_failures, config.login_window,
            config.registrations, config.register_window),
            LoginKey.load(self.data_dir), config.remember_logins)
        friends, groups = Friends(hub), Groups(store)
        minami = MinamiService(hub, accounts, friends, config)
        self.boss = BossService(hub, accounts, groups, config, reactor)
        self.tickets = Tickets(hub, reactor, config.poll_timeout, config.ticket_timeout,
                               config.offline_grace, config.max_queue)
        webim = WebimActions(hub, accounts, friends, groups, self.tickets,
                             config.webim_secret, config.public_url, config.token_ttl)
        xuanxuan = XuanxuanService(hub, accounts, Chats(store, groups), config)
        minami.connections = xuanxuan.connections = self.connections
        xuanxuan_port: list[int] = []
        self.boss.start()
        if config.boss_auth == "trust":
            log.warn("--boss-auth=trust: 66boss clients may log in as any user id without a "
                     "token; use only on a closed network")

        root = build_root()
        root.putChild(b"entry", entry_resource(self.boss))
        boss_http.mount(root, self.boss)
        boss_uploads.mount(root, self.boss, self.data_dir)
        minami_routes.mount(root, minami)
        webim_routes.mount(root, webim, self.tickets)
        xuanxuan_http.mount(root, XuanxuanHttp(xuanxuan, self.data_dir / "files",
                                               lambda: xuanxuan_port[0] if xuanxuan_port else 0))
        site = ImdSite(root, max_body=config.max_body, max_upload=config.max_upload,
                       upload_paths=boss_uploads.UPLOAD_PATHS + xuanxuan_http.UPLOAD_MARKERS,
                       timeout=config.login_timeout, request_timeout=config.request_timeout,
                       upload_timeout=config.upload_timeout, spool_dir=self.data_dir,
                       logPath=config.access_log or None, public_hosts=config.public_hosts)
        # Every listener: a cap on connections per address and a deadline for logging in
        # (HTTP connections: the site's own timeouts until a WebSocket takes one over).
        guard = Guard(reactor, config.max_connections_per_address, config.login_timeout)
        for description in config.web:
            await self._listen(description, guard.wrap(site, login_deadline=False),
                               "web (66boss /entry, group API, uploads; minami /im/; "
                               "webim /webim/; xuanxuan HTTP)")
        if config.boss_line.lower() != "none":
            await self._listen(config.boss_line, guard.wrap(line_factory(self.boss)),
                               "66boss line protocol")
        if config.xuanxuan.lower() != "none":
            port = await self._listen(config.xuanxuan, guard.wrap(socket_factory(xuanxuan)),
                                      "xuanxuan socket")
            xuanxuan_port.append(getattr(port.getHost(), "port", 0))
        self._notify_ready()

    def _notify_ready(self) -> None:
        """Every listener is up: tell systemd (Type=notify) and start its watchdog."""
        sdnotify.notify("READY=1", f"STATUS=serving as node {self.hub.node}")
        period = sdnotify.watchdog_period()
        if period is not None:
            self.watchdog = sdnotify.Watchdog(reactor, period, self.hub.store.redis.ping)
            self.watchdog.start()

    async def _listen(self, description: str, factory, what: str):
        try:
            port = await serverFromString(reactor, description).listen(factory)
        except Exception as e:
            raise StartupError(f"cannot listen on {description} for {what}: {e}") from None
        self.ports.append(port)
        log.info("{what} on {endpoint} ({address})", what=what, endpoint=description,
                 address=_address(port))
        return port

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        sdnotify.notify("STOPPING=1")
        if self.watchdog is not None:
            self.watchdog.stop()
        for port in self.ports:
            try:
                await port.stopListening()
            except Exception:
                pass
        self.ports = []
        if self.boss is not None:
            self.boss.stop()
        for connection in list(self.connections):
            connection.transport.abortConnection()
        if self.tickets is not None:
            self.tickets.close_all()
        if self.hub is not None:
            # Let the closed connections log out and revoke their tokens while Redis is
            # still there (a token revoke runs before a PING sent after it).
            await task.deferLater(reactor, 0, lambda: None)
            try:
                await self.hub.logouts_done().addTimeout(3, reactor)
                await self.hub.store.redis.ping().addTimeout(3, reactor)
            except Exception:
                pass
            try:
                # Redis may be gone already: do not let that hold up the shutdown.
                await defer.ensureDeferred(self.hub.stop()).addTimeout(3, reactor)
            except Exception as e:
                log.warn("could not mark this node's users offline: {e!r}", e=e)
        for factory in self._factories:
            try:
                await factory.disconnect().addTimeout(3, reactor)
            except Exception:
                pass
        if self.embedded is not None:
            await self.embedded.stop()
        log.info("imd stopped")


def _address(port) -> str:
    try:
        host = port.getHost()
        return f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}".strip(":") or str(host)
    except Exception:
        return "?"


def _exit_with_error() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def make_service(config: Config) -> ImdService:
    return ImdService(config)
