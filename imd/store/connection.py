"""Opening Redis connections from a ``redis://``, ``rediss://`` or ``unix://`` URL.

Builds txredisapi factories on Twisted endpoints, so TLS (verified with service-identity
through ``optionsForClientTLS``) and unix sockets use the same code path.  A ``rediss://``
URL trusts the system's CAs, or the ones in the file named by ``?ssl_ca_certs=``, and may
present a client certificate (``ssl_certfile=`` and ``ssl_keyfile=``; the parameter names
are redis-py's).  Also builds the
pub/sub subscriber connection, which resubscribes by itself after a reconnect.

Readiness and outages are handled here, once for every caller:

- ``wait_until_ready`` probes a Redis until it answers (it is refused while a server starts
  and answers LOADING while it reads its data), logging once how much it is loading, and
  fails with one line past a bound (``--redis-wait``).
- The command pool hands a connection to callers only once it answers PING, and logs once
  when Redis goes away and once when it is back.  While it is away a command waits at most
  ``--redis-timeout`` seconds and then fails with ``RedisUnavailable`` (a login or an HTTP
  call answers with its protocol's error); the ``patient`` handle, which message sends use,
  waits for as long as the outage lasts, so an accepted send is stored when Redis returns.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from imd.metrics import ERRORS
from imd.unavailable import Unavailable

log = Logger()

# Answers of a Redis that will serve soon: keep waiting.
NOT_YET = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")


class BadRedisURL(ValueError):
    pass


class RedisUnavailable(Unavailable):
    """Redis could not be reached in time; the caller answers with its protocol's error."""


class RedisNotReady(Exception):
    """Redis did not become ready within the bound; the message says why and what to do."""


@dataclass(frozen=True)
class RedisAddress:
    scheme: str
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int | None = None
    username: str | None = None
    password: str | None = None
    ca_certs: str = ""  # rediss: PEM file of the CAs to trust instead of the system's
    certfile: str = ""  # rediss: client certificate (PEM) and its key
    keyfile: str = ""

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
    tls = {name: query[f"ssl_{name}"][0] for name in ("ca_certs", "certfile", "keyfile")
           if f"ssl_{name}" in query}
    if tls and scheme != "rediss":
        raise BadRedisURL("the ssl_... parameters of a Redis URL need rediss://")
    if bool(tls.get("certfile")) != bool(tls.get("keyfile")):
        raise BadRedisURL("a Redis client certificate needs both ssl_certfile and ssl_keyfile")
    address = RedisAddress(scheme, host=parts.hostname, port=port, db=db,
                           username=username, password=password, **tls)
    if scheme == "rediss":
        tls_options(address)  # unreadable files are an error now, not at each connect
    return address


@functools.cache
def tls_options(address: RedisAddress):
    """The client TLS options of a ``rediss://`` address, its files read once."""
    extra = {}
    try:
        if address.ca_certs:
            with open(address.ca_certs, "rb") as f:
                pems = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                                  f.read(), re.DOTALL)
            if not pems:
                raise BadRedisURL(f"no PEM certificate in {address.ca_certs} (ssl_ca_certs)")
            extra["trustRoot"] = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(pem) for pem in pems])
        if address.certfile:
            with open(address.certfile, "rb") as cert, open(address.keyfile, "rb") as key:
                extra["clientCertificate"] = ssl.PrivateCertificate.loadPEM(
                    cert.read() + b"\n" + key.read())
    except OSError as e:
        raise BadRedisURL(f"cannot read {e.filename} for Redis TLS: {e.strerror}") from None
    except SSL.Error as e:
        raise BadRedisURL(f"bad certificate or key for Redis TLS: {_ssl_reason(e)}") from None
    return ssl.optionsForClientTLS(address.host, **extra)


def endpoint_for(address: RedisAddress) -> IStreamClientEndpoint:
    if address.scheme == "unix":
        return UNIXClientEndpoint(reactor, address.path, timeout=10)
    endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=10)
    if address.scheme == "rediss":
        return wrapClientTLS(tls_options(address), endpoint)
    return endpoint


def _start(factory: txredisapi.RedisFactory, address: RedisAddress):
    factory.startConnecting(_Persistent(endpoint_for(address)))
    return factory


@implementer(IStreamClientEndpoint)
class _Persistent:
    """An endpoint whose ``connect`` retries quietly until it succeeds or is cancelled.

    txredisapi reconnects through a ClientService, which logs every failed attempt; with
    this in front an outage is one long attempt, so the pool logs it once (see ``_Pool``),
    and Redis is found again within ``max_delay`` seconds of its return.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, max_delay: float = 1.0):
        self.endpoint = endpoint
        self.max_delay = max_delay

    def __repr__(self) -> str:
        return f"<Redis endpoint {self.endpoint!r}>"

    def connect(self, factory) -> defer.Deferred:
        return _Attempts(self.endpoint, factory, self.max_delay).result


class _Attempts:
    def __init__(self, endpoint, factory, max_delay: float):
        self.endpoint, self.factory, self.max_delay = endpoint, factory, max_delay
        self.delay = 0.05
        self.pending: defer.Deferred | None = None
        self.call = None
        self.cancelled = False
        self.result = defer.Deferred(self._cancel)
        self._attempt()

    def _attempt(self) -> None:
        self.call = None
        self.pending = self.endpoint.connect(self.factory)
        self.pending.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol_) -> None:
        self.pending = None
        self.result.callback(protocol_)

    def _failed(self, failure) -> None:
        self.pending = None
        if not self.cancelled:
            self.call = reactor.callLater(self.delay, self._attempt)
            self.delay = min(self.delay * 2, self.max_delay)

    def _cancel(self, _) -> None:
        self.cancelled = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        if self.pending is not None:
            self.pending.cancel()


# -- readiness --------------------------------------------------------------------------

class _Probe(protocol.Protocol):
    """Sends a few commands and collects their replies: simple lines and bulk strings
    (enough for AUTH, PING and INFO)."""

    def __init__(self, commands: list[tuple[str, ...]]):
        self.commands = commands
        self.replies: list[str] = []
        self.done = defer.Deferred()
        self._buffer = b""

    def connectionMade(self):
        out = b""
        for command in self.commands:
            out += b"*%d\r\n" % len(command)
            for arg in command:
                data = arg.encode()
                out += b"$%d\r\n%s\r\n" % (len(data), data)
        self.transport.write(out)

    def dataReceived(self, data: bytes):
        self._buffer += data
        while len(self.replies) < len(self.commands):
            line, sep, rest = self._buffer.partition(b"\r\n")
            if not sep:
                return
            if line.startswith(b"$"):
                size = int(line[1:]) if line[1:].lstrip(b"-").isdigit() else -1
                if size < 0:
                    self.replies.append("")
                    self._buffer = rest
                    continue
                if len(rest) < size + 2:
                    return
                self.replies.append(rest[:size].decode(errors="replace"))
                self._buffer = rest[size + 2:]
            else:
                self.replies.append(line.decode(errors="replace"))
                self._buffer = rest
        self.transport.loseConnection()
        if not self.done.called:
            self.done.callback(self.replies)

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.errback(reason)


async def _probe(address: RedisAddress, commands: list[tuple[str, ...]],
                 timeout: float = 5.0) -> list[str]:
    auth: list[tuple[str, ...]] = []
    if address.password is not None:
        auth = [("AUTH", address.username, address.password) if address.username
                else ("AUTH", address.password)]
    probe = _Probe(auth + commands)
    factory = protocol.Factory.forProtocol(lambda: probe)
    factory.noisy = False
    await endpoint_for(address).connect(factory).addTimeout(timeout, reactor)
    try:
        replies = await probe.done.addTimeout(timeout, reactor)
    finally:
        probe.transport.loseConnection()
    for reply in replies[:len(auth)]:
        if reply.startswith("-"):
            raise RedisNotReady(f"Redis at {address.display} refused the password "
                                f"({reply[1:]}): check the URL's credentials")
    return replies[len(auth):]


def _info_field(info: str, name: str) -> str:
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


def _megabytes(size: str) -> str:
    try:
        return f"{int(size) / 1e6:.0f} MB"
    except ValueError:
        return "an unknown amount of data"


async def wait_until_ready(address: RedisAddress, bound: float,
                           check: Callable[[], None] | None = None,
                           option: str = "--redis-wait") -> None:
    """Return once Redis at ``address`` answers PING, waiting at most ``bound`` seconds.

    Refused connections and the "not yet" answers (LOADING, BUSY, MASTERDOWN, TRYAGAIN)
    are waited out; the first LOADING is logged once with the size of the data.  ``check``
    runs before each attempt and may raise (an embedded server that exited).  Anything else,
    or still no answer past ``bound``, raises RedisNotReady.
    """
    started = time.monotonic()
    delay, reason, loading_logged, waiting_logged = 0.02, "", False, False
    while True:
        if check is not None:
            check()
        try:
            reply = (await _probe(address, [("PING",)]))[0]
        except RedisNotReady:
            raise
        except (SSL.Error, VerificationError) as e:  # waiting will not mend a certificate
            raise RedisNotReady(_tls_failure(address, e)) from None
        except Exception as e:
            reply, reason = "", _reason(e)
        if reply.startswith("+"):
            if loading_logged:
                log.info("Redis at {redis} has loaded its data ({seconds:.1f} s)",
                         redis=address.display, seconds=time.monotonic() - started)
            return
        if reply.startswith("-"):
            code = reply[1:].split(" ", 1)[0]
            if code not in NOT_YET:
                raise RedisNotReady(f"Redis at {address.display} answers {reply[1:]!r}")
            reason = reply[1:]
            if code == "LOADING" and not loading_logged:
                loading_logged = True
                await _log_loading(address, bound, option)
        waited = time.monotonic() - started
        if waited >= bound:
            raise RedisNotReady(
                f"Redis at {address.display} is not ready after {bound:g} s ({reason}): "
                f"check that it runs, or allow it longer with {option}")
        if not (loading_logged or waiting_logged) and waited > 1:
            waiting_logged = True
            log.info("waiting for Redis at {redis} ({reason}), up to {bound:g} s "
                     "({option})", redis=address.display, reason=reason, bound=bound,
                     option=option)
        await task.deferLater(reactor, delay, lambda: None)
        delay = min(delay * 1.5, 0.25)


async def _log_loading(address: RedisAddress, bound: float, option: str) -> None:
    try:
        info = (await _probe(address, [("INFO", "persistence")]))[0]
    except Exception:
        info = ""
    log.info("Redis at {redis} is loading its data ({size}); waiting up to {bound:g} s "
             "({option})", redis=address.display,
             size=_megabytes(_info_field(info, "loading_total_bytes")), bound=bound,
             option=option)


def _tls_failure(address: RedisAddress, e: Exception) -> str:
    if isinstance(e, VerificationError):
        return (f"the certificate of Redis at {address.display} is not valid for "
                f"{address.host}: use the host name it was issued for in the URL")
    return (f"TLS with Redis at {address.display} failed ({_ssl_reason(e)}): check that "
            "it speaks TLS on that port and that its CA is trusted (?ssl_ca_certs=FILE)")


def _ssl_reason(e: SSL.Error) -> str:
    """OpenSSL's reasons ("certificate verify failed"), without the library names."""
    errors = e.args[0] if e.args and isinstance(e.args[0], list) else []
    reasons = [item[-1] for item in errors if isinstance(item, tuple) and item[-1]]
    return "; ".join(reasons) or str(e) or type(e).__name__


def _reason(e: BaseException) -> str:
    if isinstance(e, defer.TimeoutError):
        return "no answer"
    # Twisted's connect errors read "Connection was refused by other side: 111: Connection
    # refused."; the last part is the one to show.
    text = str(e).strip().rstrip(".") or type(e).__name__
    return text.rsplit(": ", 1)[-1]


# -- the command pool ---------------------------------------------------------------------

class RedisLink(txredisapi.ConnectionHandler):
    """The store's handle on Redis: the txredisapi command methods, with a bound on how long
    a command waits for Redis to come back (see the module docstring)."""

    def __init__(self, factory: "_Pool", wait: float | None = None):
        super().__init__(factory)
        self._wait = wait

    @property
    def patient(self) -> "RedisLink":
        """The same commands, waiting for Redis however long an outage lasts."""
        return self._factory.patient

    def __getattr__(self, method: str):
        if method.startswith("__"):
            raise AttributeError(method)
        call = super().__getattr__(method)
        factory = self._factory

        def wrapper(*args, **kwargs):
            if factory.size:
                d = call(*args, **kwargs)
            else:
                d = factory.when_up(self._wait).addCallback(lambda _: call(*args, **kwargs))
            return d.addErrback(self._lost)
        return wrapper

    def _lost(self, failure):
        """A command cut off by a lost connection fails as the outage it is."""
        failure.trap(txredisapi.ConnectionError)
        raise RedisUnavailable(f"Redis at {self._factory.address.display}: "
                               f"{failure.getErrorMessage()}")

    async def pipeline(self, commands: list[tuple]) -> list:
        """Run several commands in one round trip (pipelined on one connection)."""
        if not self._factory.size:
            await self._factory.when_up(self._wait)
        conn = await self._factory.getConnection(peek=True)
        ds = [conn.execute_command(*c) for c in commands]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
        return list(await d.addErrback(self._lost))

    def before_use(self, prepare: Callable[[object], defer.Deferred]) -> None:
        """Run ``prepare(connection)`` on every new connection before commands use it."""
        self._factory.preparers.append(prepare)


class _Pool(txredisapi.RedisFactory):
    """A reconnecting pool whose connections join only once Redis answers PING."""

    def __init__(self, address: RedisAddress, poolsize: int, wait: float):
        super().__init__(address.display, address.db, poolsize, isLazy=True,
                         handler=lambda f: RedisLink(f, wait), charset="utf-8",
                         password=address.password, convertNumbers=False,
                         username=address.username)
        self.address = address
        self.patient = RedisLink(self)
        self._was_up = False
        self._down = False
        self._waiters: list[defer.Deferred] = []
        self.preparers: list[Callable] = []

    def addConnection(self, conn) -> None:
        defer.ensureDeferred(self._join(conn)).addErrback(
            lambda f: log.failure("Redis connection failed", f))

    async def _join(self, conn) -> None:
        while conn.connected:
            try:
                await conn.ping()
                break
            except txredisapi.ResponseError as e:
                if str(e).split(" ", 1)[0] not in NOT_YET:
                    break  # a real error: let the commands report it
            except txredisapi.ConnectionError:
                return
            await task.deferLater(reactor, 0.1, lambda: None)
        for prepare in self.preparers:
            try:
                await prepare(conn)
            except txredisapi.ConnectionError:
                return
            except Exception as e:  # the connection is still usable: let it join
                log.warn("preparing a Redis connection failed: {e}", e=e)
        if not conn.connected:
            return
        super().addConnection(conn)
        if not self.size:
            return
        if self._down:
            self._down = False
            log.info("Redis at {redis} is back", redis=self.address.display)
        self._was_up = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def delConnection(self, conn) -> None:
        super().delConnection(conn)
        if conn in self.connectionQueue.pending:  # not left for a command to stumble on
            self.connectionQueue.remove(conn)
        if not self.size and self._was_up and not self.disconnectCalled and not self._down:
            self._down = True
            ERRORS.labels("redis_down").inc()
            log.warn("Redis at {redis} is down: logins and requests get an error until it "
                     "returns; accepted messages wait for it", redis=self.address.display)

    def when_up(self, wait: float | None) -> defer.Deferred:
        """Fires once a connection is ready; fails with RedisUnavailable after ``wait`` s."""
        if self.size:
            return defer.succeed(None)
        if self.disconnectCalled:
            return defer.fail(RedisUnavailable(f"Redis at {self.address.display}: closed"))
        d = defer.Deferred()
        self._waiters = [w for w in self._waiters if not w.called] + [d]
        if wait is not None:
            def timed_out(failure):
                failure.trap(defer.TimeoutError)
                raise RedisUnavailable(f"Redis at {self.address.display} is unreachable")
            d.addTimeout(wait, reactor).addErrback(timed_out)
        return d


def connect_pool(address: RedisAddress, poolsize: int = 2,
                 wait: float = 5.0) -> txredisapi.RedisFactory:
    """A reconnecting command pool; ``factory.deferred`` fires with its RedisLink once up.

    While Redis is unreachable a command waits ``wait`` seconds for it (the ``patient``
    handle waits without a bound), then fails with RedisUnavailable.
    """
    factory = _Pool(address, poolsize, wait)
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
