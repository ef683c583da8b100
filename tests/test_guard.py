"""Limits against idle, slow, greedy and guessing clients (issue 11 points 1 and 2): the login
deadline on every listener, HTTP request deadlines, the per-address connection cap, and the
throttling of logins and registrations in every protocol; the throttle itself on a Clock."""

from __future__ import annotations

import hashlib
import json
import time
from urllib.parse import urlencode

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

from imd.throttle import LoginThrottles, Throttle, Throttled
from tests.conftest import unique
from tests.wire import CLOSED, http, line_connect, post_form, ws_connect

# The deadlines are 1 s here; a closed connection must be seen well before this.
SEEN_WITHIN = 6.0


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


# -- the throttle, on a Clock ----------------------------------------------------------------

def test_throttle_counts_within_the_window():
    clock = task.Clock()
    t = Throttle(clock, limit=3, window=60)
    for _ in range(3):
        t.check("a")
        t.record("a")
    with pytest.raises(Throttled) as refused:
        t.check("a")
    assert refused.value.retry_after == 60
    t.check("b")  # other keys are not affected
    clock.advance(30)
    with pytest.raises(Throttled) as refused:
        t.check("b", "a")  # any throttled key refuses
    assert refused.value.retry_after == 30
    clock.advance(30)
    t.check("a")  # the window has passed
    t.record("a")
    t.reset("a")
    t.check("a")


def test_throttle_forgets_old_keys_and_zero_is_no_limit():
    clock = task.Clock()
    t = Throttle(clock, limit=2, window=10)
    for n in range(100):
        t.record(f"k{n}")
    clock.advance(11)
    t.check("other")
    assert t._events == {}  # noqa: SLF001 (the table does not grow without bound)
    unlimited = Throttle(clock, limit=0, window=10)
    for _ in range(1000):
        unlimited.record("a")
        unlimited.check("a")


def test_login_throttles_successes_reset_the_account_not_the_address():
    clock = task.Clock()
    t = LoginThrottles(clock, account_failures=2, address_failures=3, window=60,
                       registrations=1, register_window=60)
    t.login_failed("user:1", "192.0.2.1")
    t.login_succeeded("user:1")
    t.login_failed("user:1", "192.0.2.1")
    t.before_login("user:1", "192.0.2.1")  # the success cleared the account's count
    t.login_failed("user:2", "192.0.2.1")
    with pytest.raises(Throttled):  # three failures from the address
        t.before_login("user:3", "192.0.2.1")
    t.before_login("user:3", "192.0.2.2")
    t.before_login("user:3", "")  # no address (imdctl): only the account counts
    t.before_register("192.0.2.1")
    t.registered("192.0.2.1")
    with pytest.raises(Throttled):
        t.before_register("192.0.2.1")
    t.before_register("")


def test_guard_login_deadline_repeats_and_the_cap_counts_per_host():
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from imd.guard import Guard

    class Session(protocol.Protocol):
        user_id = None

    clock = task.Clock()
    guard = Guard(clock, max_per_address=2, login_timeout=10)
    factory = guard.wrap(protocol.Factory.forProtocol(Session))
    address = IPv4Address("TCP", "192.0.2.1", 1234)
    first, second = factory.buildProtocol(address), factory.buildProtocol(address)
    assert factory.buildProtocol(address) is None  # the third from that host
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 1)) is not None
    transports = [StringTransport(), StringTransport()]
    for conn, transport in zip((first, second), transports):
        conn.makeConnection(transport)
    first.wrappedProtocol.user_id = 7  # logged in
    clock.advance(10)
    assert not transports[0].disconnecting and transports[1].disconnecting
    second.connectionLost(None)
    assert factory.buildProtocol(address) is not None  # room again
    first.wrappedProtocol.user_id = None  # logged out, still connected
    clock.advance(10)
    assert transports[0].disconnecting
    # A connection that has gone leaves no timer behind (ProtocolWrapper.connectionLost
    # drops the wrapped protocol; that is not a takeover that restarts the deadline).
    third = factory.buildProtocol(IPv4Address("TCP", "192.0.2.3", 1))
    third.makeConnection(StringTransport())
    third.connectionLost(None)
    assert clock.getDelayedCalls() == [], clock.getDelayedCalls()


# -- timeouts and the connection cap, over the wire -----------------------------------------

class Raw(protocol.Protocol):
    """A bare TCP client: what it received and when it was closed."""

    def __init__(self):
        self.data = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(None)


async def raw_connect(port: int, source: str | None = None) -> Raw:
    bind = (source, 0) if source else None
    return await TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind).connect(
        protocol.Factory.forProtocol(Raw))


async def closed_within(client: Raw, seconds: float = SEEN_WITHIN) -> None:
    await client.closed.addTimeout(seconds, reactor)


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


@pytest.fixture
def timeouts(fresh_daemon):
    return fresh_daemon("--login-timeout", "1", "--request-timeout", "1",
                        "--upload-timeout", "1", "--poll-timeout", "2").start()


@pytest_twisted.ensureDeferred
async def test_connections_that_do_not_log_in_are_closed(timeouts):
    d = timeouts
    line, xuanxuan, http_idle = (await raw_connect(d.line), await raw_connect(d.xuanxuan),
                                 await raw_connect(d.web, "127.0.0.2"))
    boss_ws = await ws_connect(d.web, "/entry", source="127.0.0.3")
    for client in (line, xuanxuan, http_idle):
        await closed_within(client)
    assert await boss_ws.next(timeout=SEEN_WITHIN) is CLOSED

    # Logged-in connections stay past the deadline.
    uid, token = await d.user(unique("g"))
    boss = await line_connect(d.line, "127.0.0.4")
    boss.send(f"login_{uid}_{token}")
    assert await boss.next() == "ok"
    account = unique("gx")
    await d.user(account, password="pw")
    xx = await line_connect(d.xuanxuan, "127.0.0.4")
    xx.send(json.dumps({"module": "chat", "method": "login",
                        "params": [account, md5("pw"), "online"]}))
    assert json.loads(await xx.next())["result"] == "success"
    await sleep(2.5)
    boss.send("bogus")
    assert (await boss.next()).startswith("error_bogus_")
    xx.send(json.dumps({"module": "chat", "method": "ping", "params": []}))
    reply = await xx.next()
    while reply is not CLOSED and not (isinstance(json.loads(reply), dict)
                                       and json.loads(reply).get("method") == "ping"):
        reply = await xx.next()
    assert reply is not CLOSED
    boss.close()
    xx.close()


@pytest_twisted.ensureDeferred
async def test_slow_http_requests_are_cut(timeouts):
    d = timeouts
    # Headers a byte at a time: each byte resets the idle timeout, the deadline still cuts.
    headers = await raw_connect(d.web)
    body = await raw_connect(d.web, "127.0.0.2")
    headers.transport.write(b"GET / HTTP/1.1\r\n")
    body.transport.write(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    start = time.monotonic()
    while not (headers.closed.called and body.closed.called):
        assert time.monotonic() - start < SEEN_WITHIN, "a slow request was not cut"
        for client in (headers, body):
            if not client.closed.called:
                client.transport.write(b"x")
        await sleep(0.2)
    assert headers.data == body.data == b""

    # A request that arrives in time is answered; a long-poll is held for --poll-timeout
    # (longer than the idle and request timeouts) and answered, not cut.
    uid, token = await d.user(unique("w"))
    online = (await post_form(d.web, "/webim/online", token=token)).json()
    ticket = online["connection"]["ticket"]
    start = time.monotonic()
    r = await http("GET", f"http://127.0.0.1:{d.web}/packets?ticket={ticket}")
    assert r.status == 200 and r.json()["status"] == "ok", r.body
    assert time.monotonic() - start > 1.5


@pytest_twisted.ensureDeferred
async def test_connections_per_address_are_capped(fresh_daemon):
    d = fresh_daemon("--max-connections-per-address", "3").start()
    source = "127.0.0.5"
    clients = [await raw_connect(d.line, source), await raw_connect(d.xuanxuan, source),
               await raw_connect(d.web, source), await raw_connect(d.line, source)]
    other = await raw_connect(d.line, "127.0.0.6")  # another address is not affected
    # The fourth accepted, over all listeners, is closed at once (the login deadline is 30 s
    # here); which one is fourth is up to the order the daemon accepts them in.
    await defer.DeferredList([c.closed for c in clients], fireOnOneCallback=True
                             ).addTimeout(2, reactor)
    await sleep(0.3)
    open_ = [c for c in clients if not c.closed.called]
    assert len(open_) == 3 and not other.closed.called
    open_[0].transport.loseConnection()
    await open_[0].closed
    await sleep(0.2)
    again = await raw_connect(d.line, source)
    await sleep(0.3)
    assert not again.closed.called  # room again once one closed
    for client in [*open_[1:], other, again]:
        client.transport.loseConnection()


# -- throttling of logins and registrations --------------------------------------------------

@pytest.fixture
def throttled(fresh_daemon):
    return fresh_daemon("--login-failures", "3", "--login-address-failures", "6",
                        "--registrations", "3").start()


async def form(d, path: str, source: str, **params):
    return await http("POST", f"http://127.0.0.1:{d.web}{path}", urlencode(params).encode(),
                      {"Content-Type": "application/x-www-form-urlencoded"}, source=source)


@pytest_twisted.ensureDeferred
async def test_http_logins_are_throttled(throttled):
    d = throttled
    account = unique("t")
    await d.user(account, password="pw")
    for _ in range(3):
        r = await form(d, "/login", "127.0.0.2", account=account, password="nope")
        assert r.json()["code"] == 401, r.body
    r = (await form(d, "/login", "127.0.0.2", account=account, password="pw")).json()
    assert r["code"] == 429 and "too many attempts" in r["message"], r
    # The account is throttled from any address.
    r = await form(d, "/wsim/login", "127.0.0.3", account=account, password="pw")
    assert r.json()["code"] == 429, r.body

    # Successes reset the account's count: a user who mistypes now and then gets in.
    account = unique("t")
    await d.user(account, password="pw")
    for _ in range(3):
        for password in ("nope", "pw"):
            r = await form(d, "/login", "127.0.0.4", account=account, password=password)
        assert r.json()["code"] == 1, r.body

    # webim's login form and the 66boss app's login answer in their own shapes.
    account = unique("t")
    await d.user(account, password="pw")
    for _ in range(3):
        r = await form(d, "/webim/login", "127.0.0.5", account=account, password="nope")
        assert r.json()["error_msg"] == "wrong account or password", r.body
    r = (await form(d, "/webim/login", "127.0.0.5", account=account, password="pw")).json()
    assert r["success"] is False and "too many attempts" in r["error_msg"], r
    phone = "139" + unique("").replace("x", "")[-8:].zfill(8)
    await d.user(phone, password="pw")
    for _ in range(3):
        r = await form(d, "/ucenter/login/index", "127.0.0.6", mobile_phone=phone,
                       password="nope")
        assert r.json()["code"] == 401, r.body
    r = (await form(d, "/ucenter/login/index", "127.0.0.6", mobile_phone=phone,
                    password="pw")).json()
    assert r["code"] == 429 and r["status"] == 0, r


@pytest_twisted.ensureDeferred
async def test_socket_logins_are_throttled(throttled):
    d = throttled
    # xuanxuan: wrong passwords on one connection, then the right one.
    account = unique("tx")
    await d.user(account, password="pw")
    xx = await line_connect(d.xuanxuan, "127.0.0.2")
    for password in ("a", "b", "c", "pw"):
        xx.send(json.dumps({"module": "chat", "method": "login",
                            "params": [account, md5(password), "online"]}))
        reply = json.loads(await xx.next())
        assert reply["result"] == "fail", reply
    assert "too many attempts" in json.dumps(reply), reply
    xx.close()

    # minami: 505 for each wrong password, then 500 (minami has no code for it).
    account = unique("tm")
    await d.user(account, password="pw")
    for password, code in (("a", 505), ("b", 505), ("c", 505), ("pw", 500)):
        query = urlencode({"account": account, "password": password})
        ws = await ws_connect(d.web, f"/im/login?{query}", source="127.0.0.3")
        assert json.loads(await ws.next())["code"] == code
        assert await ws.next() is CLOSED

    # 66boss token login: wrong tokens, then the right one.
    uid, token = await d.user(unique("tb"))
    boss = await line_connect(d.line, "127.0.0.4")
    for _ in range(3):
        boss.send(f"login_{uid}_{'0' * len(token)}")
        assert await boss.next() == "error_login_bad user id or token"
    boss.send(f"login_{uid}_{token}")
    assert (await boss.next()).startswith("error_login_too many attempts")
    boss.close()


@pytest_twisted.ensureDeferred
async def test_guessing_many_accounts_from_one_address_is_throttled(throttled):
    d = throttled
    accounts = [unique("ta") for _ in range(4)]
    for account in accounts:
        await d.user(account, password="pw")
    for account in accounts[:3]:  # two failures each: no account reaches its limit
        for _ in range(2):
            r = await form(d, "/login", "127.0.0.7", account=account, password="nope")
            assert r.json()["code"] == 401, r.body
    r = await form(d, "/login", "127.0.0.7", account=accounts[3], password="pw")
    assert r.json()["code"] == 429, r.body
    r = await form(d, "/login", "127.0.0.8", account=accounts[3], password="pw")
    assert r.json()["code"] == 1, r.body


@pytest_twisted.ensureDeferred
async def test_registrations_are_throttled(throttled):
    d = throttled

    async def register(source: str) -> dict:
        account = unique("tr")
        body = json.dumps({"account": account, "password": "pw", "mail": "m@x"}).encode()
        r = await http("POST", f"http://127.0.0.1:{d.web}/im/register", body,
                       {"Content-Type": "application/json"}, source=source)
        return r.json()

    for _ in range(3):
        assert (await register("127.0.0.9"))["code"] == 200
    assert (await register("127.0.0.9"))["code"] == 500
    assert (await register("127.0.0.10"))["code"] == 200
