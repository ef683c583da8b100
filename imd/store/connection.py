"""Opening Redis connections from a ``redis://``, ``rediss://`` or ``unix://`` URL.

Builds txredisapi factories on Twisted endpoints, so TLS (verified with service-identity
through ``optionsForClientTLS``) and unix sockets use the same code path.  Also builds the
pub/sub subscriber connection, which resubscribes by itself after a reconnect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet import reactor
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS


class BadRedisURL(ValueError):
    pass


@dataclass(frozen=True)
class RedisAddress:
    scheme: str
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int | None = None
    username: str | None = None
    password: str | None = None

    @property
    def display(self) -> str:
        """The address without credentials, fit for a log line."""
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return f"{self.scheme}://{self.host}:{self.port}/{self.db or 0}"


def parse_redis_url(url: str) -> RedisAddress:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise BadRedisURL(f"unsupported Redis URL scheme {parts.scheme!r}: "
                          "use redis://, rediss:// or unix://")
    query = parse_qs(parts.query)
    db: int | None = None
    try:
        if scheme == "unix":
            if not parts.path:
                raise BadRedisURL("a unix:// Redis URL needs a socket path")
            if "db" in query:
                db = int(query["db"][0])
        else:
            if not parts.hostname:
                raise BadRedisURL(f"no host in Redis URL {url!r}")
            if parts.path.strip("/"):
                db = int(parts.path.strip("/"))
            port = parts.port or 6379
    except ValueError as e:
        raise BadRedisURL(f"bad Redis URL {url!r}: {e}") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if scheme == "unix":
        return RedisAddress("unix", path=parts.path, db=db, username=username,
                            password=password)
    return RedisAddress(scheme, host=parts.hostname, port=port, db=db,
                        username=username, password=password)


def endpoint_for(address: RedisAddress) -> IStreamClientEndpoint:
    if address.scheme == "unix":
        return UNIXClientEndpoint(reactor, address.path, timeout=10)
    endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=10)
    if address.scheme == "rediss":
        return txredisapi._TLSEndpoint(endpoint, optionsForClientTLS(address.host))
    return endpoint


def _start(factory: txredisapi.RedisFactory, address: RedisAddress):
    factory.startConnecting(endpoint_for(address))
    return factory


def connect_pool(address: RedisAddress, poolsize: int = 2) -> txredisapi.RedisFactory:
    """A reconnecting command pool; ``factory.deferred`` fires with the handler once up."""
    factory = txredisapi.RedisFactory(
        address.display, address.db, poolsize, isLazy=True,
        handler=txredisapi.ConnectionHandler, charset="utf-8", password=address.password,
        convertNumbers=False, username=address.username)
    factory.reconnect = True
    return _start(factory, address)


class _Subscriber(txredisapi.SubscriberProtocol):
    def connectionMade(self):
        d = super().connectionMade()
        d.addCallback(lambda _: self.subscribe(self.factory.channels) if self.connected else None)
        d.addCallback(lambda _: self.factory.on_connect() if self.connected else None)
        d.addErrback(lambda f: self.transport.loseConnection())
        return d

    def messageReceived(self, pattern, channel, message):
        self.factory.on_message(channel, message)


class SubscriberFactory(txredisapi.RedisFactory):
    protocol = _Subscriber


def connect_subscriber(address: RedisAddress, channels: list[str],
                       on_message: Callable[[str, str], None],
                       on_connect: Callable[[], None]) -> txredisapi.RedisFactory:
    """A pub/sub connection subscribed to ``channels``, resubscribing after reconnects.

    ``on_connect`` runs after each (re)subscription, so the caller can resynchronise state
    it may have missed while disconnected.
    """
    factory = SubscriberFactory(
        address.display, None, 1, isLazy=True, charset="utf-8", password=address.password,
        convertNumbers=False, username=address.username)
    factory.reconnect = True
    factory.channels = channels
    factory.on_message = on_message
    factory.on_connect = on_connect
    return _start(factory, address)
