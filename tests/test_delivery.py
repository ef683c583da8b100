"""Delivery under flow control and logins cut short: a client that stops reading gets every
message exactly once (what the connection wrote, then the rest at its next login), and a
connection closed at any point of a login leaves its user offline with messages queued."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.testing import StringTransport

from imd.model import TEXT, UNICAST, Message
from imd.protocols.flow import Outbox, ReadGate
from tests.conftest import CLEAN_EXIT, unique
from tests.test_boss import logged_in
from tests.test_minami import ok, register
from tests.test_xuanxuan import md5
from tests.wire import CLOSED, line_connect, ws_connect

# -- the Outbox on a StringTransport ---------------------------------------------------------


def _message(i: int) -> Message:
    return Message(sender=1, to=2, ctype=UNICAST, kind=TEXT, body=str(i), id=i)


def _outbox(limit: int = 3):
    transport, written, overflows = StringTransport(), [], []
    box = Outbox(transport, lambda data: written.append(data) or True, limit,
                 lambda: overflows.append(True))
    return transport, box, written, overflows


def test_outbox_writes_at_once_and_queues_while_paused():
    transport, box, written, _ = _outbox()
    assert transport.producer is box and transport.streaming
    box.put("m1", [_message(1)])
    assert written == ["m1"]
    box.pauseProducing()
    box.put("m2", [_message(2)])
    box.put("reply")
    assert written == ["m1"] and len(box) == 2
    box.resumeProducing()
    assert written == ["m1", "m2", "reply"] and len(box) == 0


def test_outbox_overflow_hands_back_unwritten_messages_in_order():
    _, box, written, overflows = _outbox(limit=3)
    box.put("m1", [_message(1)])
    box.pauseProducing()
    for i in range(2, 5):
        box.put(f"m{i}", [_message(i)])
    assert not overflows
    box.put("m5", [_message(5)])  # one more than the limit
    assert overflows == [True]
    box.put("late reply")  # after the end: not kept
    box.resumeProducing()
    assert written == ["m1"]
    assert [m.id for m in box.close()] == [2, 3, 4, 5]
    box.put("m6", [_message(6)])  # a delivery racing the logout is still handed back
    assert [m.id for m in box.close()] == [6]


def test_outbox_backlog_given_at_login_does_not_count_against_the_limit():
    _, box, written, overflows = _outbox(limit=2)
    box.pauseProducing()
    for i in range(1, 11):  # the offline queue handed over at login
        box.put(f"m{i}", [_message(i)], bounded=False)
    box.put("m11", [_message(11)])
    box.put("m12", [_message(12)])
    assert not overflows
    box.resumeProducing()
    assert len(written) == 12
    box.pauseProducing()
    for i in range(13, 16):
        box.put(f"m{i}", [_message(i)])
    assert overflows == [True]


def test_outbox_replaces_a_producer_left_on_the_transport():
    transport = StringTransport()
    transport.registerProducer(object(), True)  # twisted.web's channel, after an upgrade
    box = Outbox(transport, lambda data: True, 3, lambda: None)
    assert transport.producer is box


def test_outbox_stops_when_the_connection_cannot_take_more():
    transport = StringTransport()
    box = Outbox(transport, lambda data: False, 3, lambda: None)
    box.put("m1", [_message(1)])
    assert [m.id for m in box.close()] == [1]


def test_read_gate_pauses_reading_above_the_limit():
    transport = StringTransport()
    gate = ReadGate(transport, 4)
    for _ in range(5):
        gate.begin()
    assert transport.producerState == "paused"
    for _ in range(2):
        gate.end()
    assert transport.producerState == "paused"
    gate.end()
    assert transport.producerState == "producing"


# -- a client that stops reading (real daemon) -----------------------------------------------

N = 1500
BODY = "y" * 8000  # N * BODY: more than the kernel's socket buffers hold


async def _until_logged(d, text: str, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if text in d.log():
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{text!r} not logged")


async def _all_stored(a: int, ca) -> None:
    """A barrier: every message the 66boss client ``ca`` sent before is stored (the next
    login then gets the rest as one backlog)."""
    ca.send(f"records_{a}_0")
    assert (await ca.next(timeout=30)).startswith(f"records_{a}_0_")


def _index(body: str) -> int:
    return int(body.split(" ", 1)[0])


@pytest_twisted.ensureDeferred
async def test_boss_client_that_stops_reading_gets_every_message_once(fresh_daemon):
    d = fresh_daemon("--max-pending", "50").start()
    a, _, ca = await logged_in(d, via="line")
    b, tb, cb = await logged_in(d)
    cb.proto.transport.pauseProducing()  # b stops reading
    for i in range(N):
        ca.send(f"text_{b}_{i} {BODY}_unicast_x")
    await _until_logged(d, "closing a client that does not read")
    cb.proto.transport.resumeProducing()
    got = []
    while (signal := await cb.next(timeout=10)) is not CLOSED:
        got.append(_index(signal.split("_")[2]))
    assert len(got) < N  # it was closed, not buffered without limit
    await _all_stored(a, ca)
    cb2 = await ws_connect(d.web)
    cb2.send(f"login_{b}_{tb}")
    assert await cb2.next() == "ok"
    while len(got) < N:
        got.append(_index((await cb2.next(timeout=10)).split("_")[2]))
    assert got == list(range(N))  # every message once, in order
    await cb2.nothing()
    await d.close_store()


class _XX:
    """A xuanxuan client reading raw lines."""

    def __init__(self, client):
        self.client = client

    def send(self, method, params):
        self.client.send(json.dumps({"module": "chat", "method": method, "params": params}))

    async def messages(self, timeout: float = 10):
        """The contents of the next chat/message push; CLOSED at the end."""
        while True:
            line = await self.client.next(timeout=timeout)
            if line is CLOSED:
                return CLOSED
            packets = json.loads(line)
            if isinstance(packets, list):
                contents = [m["content"] for p in packets if p["method"] == "message"
                            for m in p["data"]]
                if contents:
                    return contents


async def _xx_login(d, account: str) -> _XX:
    x = _XX(await line_connect(d.xuanxuan))
    x.send("login", [account, md5("pw"), "online"])
    return x


@pytest_twisted.ensureDeferred
async def test_xuanxuan_client_that_stops_reading_gets_every_message_once(fresh_daemon):
    d = fresh_daemon("--max-pending", "50").start()
    a, _, ca = await logged_in(d, via="line")
    account = unique("xx")
    b, _ = await d.user(account, password="pw")
    xb = await _xx_login(d, account)
    reply = json.loads(await xb.client.next())
    assert reply["result"] == "success", reply
    await xb.client.next()  # the login push
    xb.client.proto.transport.pauseProducing()
    for i in range(N):
        ca.send(f"text_{b}_{i} {BODY}_unicast_x")
    await _until_logged(d, "closing a client that does not read")
    xb.client.proto.transport.resumeProducing()
    got = []
    while (contents := await xb.messages()) is not CLOSED:
        got += [_index(c) for c in contents]
    assert len(got) < N
    await _all_stored(a, ca)
    xb2 = await _xx_login(d, account)
    while len(got) < N:
        got += [_index(c) for c in await xb2.messages()]
    assert got == list(range(N))
    await d.close_store()


# -- a connection closed at each point of a login --------------------------------------------

TRIES = 40


async def _timed(login) -> float:
    """How long a whole login takes here (the tries close at points spread over it)."""
    start = reactor.seconds()
    await login()
    return reactor.seconds() - start


async def _pause(i: int, span: float) -> None:
    """A different point of the login for each try: from at once to just past its end."""
    await task.deferLater(reactor, span * 1.2 * i / TRIES, lambda: None)


async def _offline_and_queued(d, uid: int, ca) -> str:
    """After the closes: the user is offline, and a message sent now is queued for them."""
    await task.deferLater(reactor, 0.5, lambda: None)  # the closes' logouts finish
    store = await d.store()
    assert not await store.is_online(uid)
    text = unique("queued")
    ca.send(f"text_{uid}_{text}_unicast_x")
    ca.send(f"records_{uid}_0")  # a barrier: the message is stored
    assert (await ca.next()).startswith(f"records_{uid}_0_")
    return text


async def _next_login_gets(client, uid: int, token: str, text: str) -> None:
    """A 66boss login of the user gets the queued message ``text`` first."""
    client.send(f"login_{uid}_{token}")
    assert await client.next() == "ok"
    got = await client.next()
    assert got.startswith("text_") and text in got


@pytest_twisted.ensureDeferred
async def test_xuanxuan_login_closed_at_any_point_leaves_no_ghost(fresh_daemon):
    # Its own daemon: a xuanxuan login creates the system chat, whose members are everyone
    # (the 66boss group API tests on the shared daemon expect none).
    daemon = fresh_daemon().start()
    _, _, ca = await logged_in(daemon, via="line")
    account = unique("xx")
    b, _ = await daemon.user(account, password="pw")
    async def whole():
        x = await _xx_login(daemon, account)
        assert json.loads(await x.client.next())["result"] == "success"
        x.client.close()
        await x.client.inbox.closed
    span = await _timed(whole)
    for i in range(TRIES):
        x = await _xx_login(daemon, account)
        await _pause(i, span)
        x.client.proto.transport.abortConnection()
    text = await _offline_and_queued(daemon, b, ca)
    x = await _xx_login(daemon, account)
    assert await x.messages() == [text]  # delivered once, at the next login
    await daemon.close_store()


@pytest_twisted.ensureDeferred
async def test_boss_login_closed_at_any_point_leaves_no_ghost(daemon):
    _, _, ca = await logged_in(daemon, via="line")
    b, tb = await daemon.user(unique())
    async def whole():
        cb = await ws_connect(daemon.web)
        cb.send(f"login_{b}_{tb}")
        assert await cb.next() == "ok"
        cb.close()
        await cb.inbox.closed
    span = await _timed(whole)
    for i in range(TRIES):
        cb = await (ws_connect(daemon.web) if i % 2 else line_connect(daemon.line))
        cb.send(f"login_{b}_{tb}")
        await _pause(i, span)
        if i % 2:
            cb.drop()
        else:
            cb.proto.transport.abortConnection()
    text = await _offline_and_queued(daemon, b, ca)
    cb = await ws_connect(daemon.web)
    await _next_login_gets(cb, b, tb, text)
    await cb.nothing()


@pytest_twisted.ensureDeferred
async def test_minami_login_closed_at_any_point_leaves_no_ghost(daemon):
    _, _, ca = await logged_in(daemon, via="line")
    account = unique("mi")
    assert await register(daemon, account=account, password="pw",
                          mail=f"{account}@example.org") == ok()
    query = urlencode({"account": account, "password": "pw"})
    uid = 0

    async def whole():
        nonlocal uid
        ws = await ws_connect(daemon.web, f"/im/login?{query}")
        first = json.loads(await ws.next())
        assert first["code"] == 200
        uid = int(first["profile"]["id"])
        ws.close()
        await ws.inbox.closed
    span = await _timed(whole)
    for i in range(TRIES):
        ws = await ws_connect(daemon.web, f"/im/login?{query}")
        await _pause(i, span)
        ws.drop()
    text = await _offline_and_queued(daemon, uid, ca)
    # minami shows only friends' messages; the queue is what the next login of any
    # protocol gets, so check it with a 66boss connection of the same user.
    cb = await line_connect(daemon.line)
    await _next_login_gets(cb, uid, await _token(daemon, uid), text)
    assert "TypeError" not in daemon.log()


async def _token(d, uid: int) -> str:
    from imd.accounts import Accounts

    return await Accounts(await d.store(), 3600).issue_token(uid)


# -- node shutdown ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_what_a_webim_ticket_held_at_shutdown_is_delivered_after_the_restart(
        fresh_daemon):
    from tests.test_webim import Webim, tab

    d = fresh_daemon().start()
    _, _, ca = await logged_in(d, via="line")
    w = await tab(d)  # a webim tab that does not poll: its ticket holds the message
    ca.send(f"text_{w.uid}_for webim_unicast_x")
    ca.send(f"records_{w.uid}_0")  # a barrier: the message is stored and handed over
    assert (await ca.next()).startswith(f"records_{w.uid}_0_")
    await d.close_store()
    assert d.stop() in CLEAN_EXIT
    d.start()
    reply = await Webim(d, w.uid, w.token).online()
    assert [m["body"] for m in reply["new_messages"]] == ["for webim"]
    await d.close_store()
