"""66boss over the wire: WebSocket /entry and the TCP line listener against a real daemon."""

from __future__ import annotations

import base64
import json
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.conftest import unique
from tests.wire import CLOSED, get, line_connect, post_form, ws_connect


async def logged_in(daemon, via: str = "ws", account: str | None = None):
    """A new user and a connection logged in as them: (id, token, client)."""
    uid, token = await daemon.user(account or unique())
    client = await (ws_connect(daemon.web) if via == "ws" else line_connect(daemon.line))
    client.send(f"login_{uid}_{token}")
    assert await client.next() == "ok"
    return uid, token, client


def receive_fields(signal: str) -> list[str]:
    """Split a receive signal whose body has no '_'."""
    return signal.split("_")


@pytest_twisted.ensureDeferred
async def test_unicast_text_in_receive_format(daemon):
    a, _, ca = await logged_in(daemon)
    b, _, cb = await logged_in(daemon)
    before = int(time.time())
    ca.send(f"text_{b}_hello_unicast_ext1")
    kind, frm, body, ctype, fromgroup, timet, ext = receive_fields(await cb.next())
    assert (kind, frm, body, ctype, fromgroup, ext) == ("text", str(a), "hello", "unicast",
                                                        str(a), "ext1")
    assert before - 1 <= int(timet) <= int(time.time()) + 1  # seconds, not milliseconds
    await ca.nothing()  # no echo to the sender


@pytest_twisted.ensureDeferred
async def test_every_kind_round_trips(daemon):
    a, _, ca = await logged_in(daemon)
    b, _, cb = await logged_in(daemon)
    for kind, body in [("text", "hi"), ("emotion", "[smile]"),
                       ("picture", "http://x/1-2x3.jpg"), ("audio", "http://x/a-3.amr"),
                       ("video", "http://x/v-640x330.mp4")]:
        ca.send(f"{kind}_{b}_{body}_unicast_e")
        got = await cb.next()
        assert got.startswith(f"{kind}_{a}_{body}_unicast_{a}_"), got
        assert got.endswith("_e")


@pytest_twisted.ensureDeferred
async def test_body_with_underscores_and_android_extension(daemon):
    a, _, ca = await logged_in(daemon)
    b, _, cb = await logged_in(daemon)
    ext = base64.b64encode(json.dumps({"sender": "张三", "senderAvartar": "x",
                                       "conversation": "c", "conversationAvartar": "y"},
                                      ensure_ascii=False).encode()).decode()
    body = "a_b__c_ login_1 _"
    ca.send(f"text_{b}_{body}_unicast_{ext}")
    got = await cb.next()
    head = f"text_{a}_"
    assert got.startswith(head)
    rest = got[len(head):]
    got_body, tail = rest[:len(body)], rest[len(body):]
    assert got_body == body
    assert tail.startswith(f"_unicast_{a}_") and tail.endswith("_" + ext)
    # The connection is still bound to the same user after a body mentioning login.
    ca.send(f"text_{b}_again_unicast_x")
    assert (await cb.next()).startswith(f"text_{a}_again_")


@pytest_twisted.ensureDeferred
async def test_login_errors_and_signals_before_login(daemon):
    uid, token = await daemon.user(unique())
    other, _ = await daemon.user(unique())
    c = await ws_connect(daemon.web)
    c.send(f"text_{other}_sneaky_unicast_x")
    assert (await c.next()).startswith("error_text_not logged in")
    c.send(f"login_{uid}_wrongtoken")
    assert (await c.next()).startswith("error_login_")
    c.send(f"login_{uid}")  # bare login needs --boss-auth=trust
    assert (await c.next()).startswith("error_login_")
    c.send("login_notanumber_x")
    assert (await c.next()).startswith("error_login_")
    c.send(f"login_{other}_{token}")  # somebody else's token
    assert (await c.next()).startswith("error_login_")
    c.send(f"login_{uid}_{token}")
    assert await c.next() == "ok"
    # The message sent before login was never delivered or queued.
    co = await ws_connect(daemon.web)
    _, other_token = other, await (await daemon.store()).issue_token(other, 60)
    co.send(f"login_{other}_{other_token}")
    assert await co.next() == "ok"
    await co.nothing()


@pytest_twisted.ensureDeferred
async def test_malformed_signals_get_one_error_and_keep_the_binding(daemon):
    a, _, ca = await logged_in(daemon)
    b, _, cb = await logged_in(daemon)
    for bad, prefix in [("text_abc_hi_unicast_x", "error_text_bad id"),
                        (f"text_{b}_hi_broadcast_x", "error_text_type must be"),
                        (f"text_{b}", "error_text_expected"),
                        ("dance_1_2_3_4", "error_dance_unknown signal"),
                        ("", "error_unknown_unknown signal"),
                        (f"text_{b}_hi_group_x", "error_text_no such group"),
                        ("text_999999999_hi_unicast_x", "error_text_no such user"),
                        ("members_abc", "error_members_bad id"),
                        ("records_x_1", "error_records_bad id")]:
        ca.send(bad)
        got = await ca.next()
        assert got.startswith(prefix), (bad, got)
        await ca.nothing(0.05)
    ca.send(f"text_{b}_still here_unicast_x")
    assert (await cb.next()).startswith(f"text_{a}_still here_unicast_")


@pytest_twisted.ensureDeferred
async def test_binary_frames_and_oversized_frames(daemon):
    a, _, ca = await logged_in(daemon)
    b, _, cb = await logged_in(daemon)
    ca.send_binary(f"text_{b}_as binary_unicast_x".encode())
    assert (await cb.next()).startswith(f"text_{a}_as binary_")
    ca.send_binary(b"\xff\xfe not utf-8")
    assert (await ca.next()).startswith("error_frame_")
    ca.send_text_bytes(f"text_{b}_".encode() + b"\xed\xa0\x80_unicast_x")  # a surrogate
    assert (await ca.next()).startswith("error_frame_")
    ca.send(f"text_{b}_still open_unicast_x")
    assert (await cb.next()).startswith(f"text_{a}_still open_")
    ca.send(f"text_{b}_{'x' * 5000}_unicast_x")  # over --max-frame 4096
    assert await ca.next() == CLOSED
    assert ca.proto.close_code == 1009
    # b and the daemon are unharmed.
    c, _, cc = await logged_in(daemon)
    cc.send(f"text_{b}_after_unicast_x")
    assert (await cb.next()).startswith(f"text_{c}_after_")


@pytest_twisted.ensureDeferred
async def test_line_protocol_talks_to_websocket_users(daemon):
    a, _, line = await logged_in(daemon, via="line")
    b, _, ws = await logged_in(daemon, via="ws")
    line.send(f"text_{b}_from line_unicast_x")
    assert (await ws.next()).startswith(f"text_{a}_from line_unicast_{a}_")
    ws.send(f"text_{a}_two\nlines \\ here_unicast_x")
    got = await line.next()
    assert got.startswith(f"text_{b}_two\\nlines \\\\ here_unicast_{b}_")
    line.send(f"text_{b}_esc\\naped_unicast_x")
    assert (await ws.next()).startswith(f"text_{a}_esc\naped_unicast_")
    line.send_raw(b"text_1_\xff\xfe_unicast_x\r\n")
    assert (await line.next()).startswith("error_line_not valid UTF-8")


@pytest_twisted.ensureDeferred
async def test_line_too_long_is_refused_and_closed(daemon):
    a, _, line = await logged_in(daemon, via="line")
    line.send_raw(b"x" * 5000)
    assert (await line.next()).startswith("error_line_line too long")
    assert await line.next() == CLOSED


async def make_group(daemon, creator: int, token: str, members: list[int]) -> str:
    r = (await get(daemon.web, "/creategrp", creator=creator,
                   members=",".join(map(str, members)), name="g", token=token)).json()
    assert r["code"] == 0, r
    return r["data"]["groupid"]


@pytest_twisted.ensureDeferred
async def test_group_fan_out_skips_sender(daemon):
    a, ta, ca = await logged_in(daemon)
    b, _, cb = await logged_in(daemon, via="line")
    c, _, cc = await logged_in(daemon)
    outsider, _, co = await logged_in(daemon)
    gid = await make_group(daemon, a, ta, [b, c])
    ca.send(f"picture_{gid}_http://x/p-1x1.png_group_e")
    for client in (cb, cc):
        kind, frm, body, ctype, fromgroup, timet, ext = receive_fields(await client.next())
        assert (kind, frm, body, ctype, fromgroup, ext) == (
            "picture", str(a), "http://x/p-1x1.png", "group", gid, "e")
        assert abs(int(timet) - time.time()) < 5
    await ca.nothing()
    await co.nothing(0.05)
    co.send(f"text_{gid}_let me in_group_x")
    assert (await co.next()).startswith("error_text_not a member")
    ca.send(f"text_{b}_unicast to b only_unicast_x")
    assert (await cb.next()).startswith(f"text_{a}_unicast to b only_")
    await cc.nothing()


@pytest_twisted.ensureDeferred
async def test_members_and_records_queries(daemon):
    a, ta, ca = await logged_in(daemon)
    b, _, cb = await logged_in(daemon)
    outsider, _, co = await logged_in(daemon)
    gid = await make_group(daemon, a, ta, [b])
    ca.send(f"members_{gid}")
    assert await ca.next() == f"members_{gid}_{min(a, b)},{max(a, b)}"
    co.send(f"members_{gid}")
    assert (await co.next()).startswith("error_members_not a member")
    since = int(time.time()) - 1
    ca.send(f"text_{b}_one_unicast_x")
    ca.send(f"text_{b}_two_has_underscores_unicast_x")
    ca.send(f"text_{gid}_in group_group_x")
    for _ in range(3):
        await cb.next()
    cb.send(f"records_{a}_{since}")
    assert await cb.next() == f"records_{a}_{since}_2"
    first, second = await cb.next(), await cb.next()
    assert first.startswith(f"text_{a}_one_unicast_{a}_")
    assert second.startswith(f"text_{a}_two_has_underscores_unicast_{a}_")
    cb.send(f"records_{gid}_{since}")
    assert await cb.next() == f"records_{gid}_{since}_1"
    assert (await cb.next()).startswith(f"text_{a}_in group_group_{gid}_")
    cb.send(f"records_{a}_{int(time.time()) + 100}")
    assert await cb.next() == f"records_{a}_{int(time.time()) + 100}_0"
    co.send(f"records_{gid}_0")
    assert (await co.next()).startswith("error_records_not a member")


@pytest_twisted.ensureDeferred
async def test_offline_messages_arrive_after_login_in_order_once(daemon):
    a, _, ca = await logged_in(daemon)
    b, tb = await daemon.user(unique())
    for i in range(5):
        ca.send(f"text_{b}_queued {i}_unicast_x")
    ca.send(f"records_{b}_0")  # a round trip: the sends above are stored by now
    assert (await ca.next()).startswith(f"records_{b}_0_5")
    for _ in range(5):
        await ca.next()
    cb = await ws_connect(daemon.web)
    cb.send(f"login_{b}_{tb}")
    assert await cb.next() == "ok"
    for i in range(5):
        assert (await cb.next()).startswith(f"text_{a}_queued {i}_unicast_")
    ca.send(f"text_{b}_live_unicast_x")
    assert (await cb.next()).startswith(f"text_{a}_live_")
    cb.close()
    await cb.inbox.closed
    cb2 = await ws_connect(daemon.web)
    cb2.send(f"login_{b}_{tb}")
    assert await cb2.next() == "ok"
    await cb2.nothing()  # delivered exactly once


@pytest_twisted.ensureDeferred
async def test_two_connections_of_one_user_both_receive(daemon):
    a, _, ca = await logged_in(daemon)
    b, tb, cb1 = await logged_in(daemon)
    cb2 = await line_connect(daemon.line)
    cb2.send(f"login_{b}_{tb}")
    assert await cb2.next() == "ok"
    ca.send(f"text_{b}_both_unicast_x")
    assert (await cb1.next()).startswith(f"text_{a}_both_")
    assert (await cb2.next()).startswith(f"text_{a}_both_")
    cb1.send(f"text_{a}_reply_unicast_x")
    assert (await ca.next()).startswith(f"text_{b}_reply_")
    await cb2.nothing()  # own messages are not echoed to the user's other connections


@pytest_twisted.ensureDeferred
async def test_logout_unbinds_and_closes(daemon):
    a, _, ca = await logged_in(daemon)
    b, tb, cb = await logged_in(daemon)
    cb.send(f"logout_{b}")
    assert await cb.next() == CLOSED
    ca.send(f"text_{b}_after logout_unicast_x")
    await ca.nothing()
    cb2 = await ws_connect(daemon.web)
    cb2.send(f"login_{b}_{tb}")  # logout_ revoked the token
    assert (await cb2.next()).startswith("error_login_")
    fresh = await (await daemon.store()).issue_token(b, 60)
    cb2.send(f"login_{b}_{fresh}")
    assert await cb2.next() == "ok"
    assert (await cb2.next()).startswith(f"text_{a}_after logout_")  # it was queued


@pytest_twisted.ensureDeferred
async def test_heartbeat_is_sent(daemon):
    _, _, ws = await logged_in(daemon)
    _, _, line = await logged_in(daemon, via="line")
    for client in (ws, line):
        got = await client.next(heartbeats=True, timeout=3)
        assert got.startswith("heartbeat_")


@pytest_twisted.ensureDeferred
async def test_dead_websocket_client_is_dropped(daemon):
    # A client that never answers pings (autobahn's client answers them; turn that off).
    _, _, ws = await logged_in(daemon)
    ws.proto.onPing = lambda payload: None
    ws.proto._sendAutoPong = False
    code = await ws.inbox.closed.addTimeout(8, __import__("twisted.internet.reactor",
                                                          fromlist=["reactor"]))
    assert code is not None


@pytest_twisted.ensureDeferred
async def test_rebinding_and_foreign_logout_are_refused(daemon):
    a, ta, ca = await logged_in(daemon)
    b, tb = await daemon.user(unique())
    ca.send(f"login_{b}_{tb}")
    assert (await ca.next()).startswith(f"error_login_already logged in as {a}")
    ca.send(f"login_{a}_{ta}")  # the same user again is harmless
    assert await ca.next() == "ok"
    ca.send(f"logout_{b}")
    assert (await ca.next()).startswith("error_logout_not logged in as that user")
    ca.send(f"text_{a}_note to self_unicast_x")  # still bound to a
    ca.send(f"records_{a}_0")
    assert await ca.next() == f"records_{a}_0_1"


@pytest_twisted.ensureDeferred
async def test_client_that_does_not_read_is_dropped(fresh_daemon):
    d = fresh_daemon("--max-pending", "50").start()
    a, _, ca = await logged_in(d, via="line")
    b, _, cb = await logged_in(d, via="line")
    cb.proto.transport.pauseProducing()  # b stops reading
    body = "y" * 8000
    for i in range(1500):  # ~12 MB: more than the kernel's socket buffers hold
        ca.send(f"text_{b}_{i} {body}_unicast_x")
    ca.send(f"records_{a}_0")
    assert (await ca.next(timeout=30)).startswith(f"records_{a}_0_")
    cb.proto.transport.resumeProducing()
    received = 0
    while (await cb.next(timeout=10)) is not CLOSED:
        received += 1
    assert received < 1500  # dropped, not buffered without limit
    assert "Traceback" not in d.log()
    c, _, cc = await logged_in(d)  # the daemon is fine
    cc.send(f"text_{a}_still up_unicast_x")
    assert (await ca.next()).startswith(f"text_{c}_still up_")
    await d.close_store()


# -- the 66boss Android app (duanjisi/IMProject) as it talks ------------------------------------

def app_extension(sender: str) -> str:
    """What the app puts in the extension field: base64 of a JSON object."""
    return base64.b64encode(json.dumps({
        "sender": sender, "senderAvartar": "", "conversation": sender,
        "conversationAvartar": ""}).encode()).decode()


def app_receive(frame: str) -> tuple[str, ...] | None:
    """ChatServices.messageHandle: Java's ``split("_")`` (trailing empty parts dropped),
    more than six parts, part 6 base64 JSON; None where the app drops the frame."""
    datas = frame.split("_")
    while datas and datas[-1] == "":
        datas.pop()
    if len(datas) <= 6:
        return None
    try:
        obj = json.loads(base64.b64decode(datas[6]))
        obj["sender"], obj["senderAvartar"], obj["conversation"], obj["conversationAvartar"]
    except (ValueError, KeyError, TypeError):
        return None
    return tuple(datas[:6])


async def app_login(d, phone: str, password: str) -> dict:
    """LoginRequest: POST ucenter/login/index, read as BaseDataRequest reads it."""
    r = (await post_form(d.web, "/ucenter/login/index", mobile_phone=phone,
                         password=password)).json()
    assert r["code"] == 1, r
    return r["result"]


def phone_number() -> str:
    return "139" + unique("").replace("x", "")[-8:].zfill(8)


@pytest_twisted.ensureDeferred
async def test_app_bare_login_needs_a_recent_login_from_the_same_address(fresh_daemon):
    d = fresh_daemon("--boss-auth", "address", "--boss-address-window", "2").start()
    phone, other_phone = phone_number(), phone_number()
    a, _ = await d.user(phone, password="pw")
    b, _ = await d.user(other_phone, password="pw")

    ca = await ws_connect(d.web)
    ca.send(f"login_{a}")  # no HTTP login yet: refused
    assert (await ca.next()).startswith("error_login_")

    account = await app_login(d, phone, "pw")
    assert account["user_id"] == str(a)
    far = await ws_connect(d.web, source="127.0.0.2")  # another address
    far.send(f"login_{a}")
    assert (await far.next()).startswith("error_login_")
    ca.send(f"login_{b}")  # a user who did not log in from here
    assert (await ca.next()).startswith("error_login_")
    ca.send(f"login_{a}")  # the app's own login, right after its HTTP login
    assert await ca.next() == "ok"

    await app_login(d, other_phone, "pw")
    cb = await ws_connect(d.web)
    cb.send(f"login_{b}")
    assert await cb.next() == "ok"
    ca.send(f"text_{b}_hello from the app_unicast_{app_extension('A')}")
    assert app_receive(await cb.next())[:5] == ("text", str(a), "hello from the app", "unicast",
                                                str(a))

    # A dropped link: the app reconnects with the same bare login, and that works.
    ca.drop()
    await ca.inbox.closed
    ca = await ws_connect(d.web)
    ca.send(f"login_{a}")
    assert await ca.next() == "ok"

    second = await ws_connect(d.web)  # a second connection of the same app user
    second.send(f"login_{a}")
    assert await second.next() == "ok"

    # logout_ ends the proof and revokes the token the app got at login, also for a proof
    # made later by the end of the other connection.
    ca.send(f"logout_{a}")
    assert await ca.next() == CLOSED
    second.drop()
    await second.inbox.closed
    again = await ws_connect(d.web)
    again.send(f"login_{a}")
    assert (await again.next()).startswith("error_login_")
    r = (await post_form(d.web, "/querymygrps", userid=a,
                         access_token=account["access_token"])).json()
    assert r["code"] == 401

    # After the window, a bare login is refused again.
    await app_login(d, phone, "pw")
    await deferLater(reactor, 2.5)
    late = await ws_connect(d.web)
    late.send(f"login_{a}")
    assert (await late.next()).startswith("error_login_")
    await d.close_store()


@pytest_twisted.ensureDeferred
async def test_login_token_is_refused_after_logout(daemon):
    account = unique("out")
    uid, _ = await daemon.user(account, password="pw")
    token = (await post_form(daemon.web, "/login", account=account, password="pw")).json()["token"]
    c = await ws_connect(daemon.web)
    c.send(f"login_{uid}_{token}")
    assert await c.next() == "ok"
    assert (await get(daemon.web, "/querymygrps", userid=uid, token=token)).json()["code"] == 0
    c.send(f"logout_{uid}")
    assert await c.next() == CLOSED
    assert (await get(daemon.web, "/querymygrps", userid=uid, token=token)).json()["code"] == 401
    c2 = await line_connect(daemon.line)
    c2.send(f"login_{uid}_{token}")
    assert (await c2.next()).startswith("error_login_")


@pytest_twisted.ensureDeferred
async def test_app_drops_frames_with_underscores_in_the_body(daemon):
    """The app's own limit (README): imd delivers the body intact; the app's split drops it."""
    a, _, ca = await logged_in(daemon)
    b, _, cb = await logged_in(daemon)
    ca.send(f"text_{b}_plain_unicast_{app_extension('A')}")
    assert app_receive(await cb.next())[2] == "plain"
    ca.send(f"text_{b}_snake_case_unicast_{app_extension('A')}")
    frame = await cb.next()
    assert f"_snake_case_unicast_{a}_" in frame
    assert app_receive(frame) is None


def test_proofs_expire_and_count_hosts():
    """Proofs (the address mode's memory) on a Clock: expiry, forgetting, bound hosts."""
    from twisted.internet.task import Clock

    from imd.protocols.boss.proofs import Proofs

    clock = Clock()
    proofs = Proofs(clock, window=10, enabled=True)
    proofs.record(1, "10.0.0.1", "t1")
    clock.advance(5)
    proofs.record(2, "10.0.0.1", "t2")
    assert proofs.check(1, "10.0.0.1").token == "t1"
    assert proofs.check(1, "10.0.0.2") is None and proofs.check(3, "10.0.0.1") is None
    clock.advance(6)  # 1's proof is 11 s old, 2's 6 s
    assert proofs.check(1, "10.0.0.1") is None and proofs.check(2, "10.0.0.1") is not None
    assert proofs.host_known("10.0.0.1") and not proofs.host_known("10.0.0.2")
    proofs.forget(2, "10.0.0.1")
    assert not proofs.host_known("10.0.0.1")
    proofs.bound("10.0.0.3")
    assert proofs.host_known("10.0.0.3")
    proofs.unbound("10.0.0.3")
    assert not proofs.host_known("10.0.0.3")
    off = Proofs(clock, window=10, enabled=False)
    off.record(1, "10.0.0.1", "t1")
    assert off.check(1, "10.0.0.1") is None and not off.host_known("10.0.0.1")


def test_source_host_folds_ipv4_mapped_addresses():
    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

    from imd.protocols.boss.proofs import source_host

    assert source_host(IPv6Address("TCP", "::ffff:192.0.2.7", 1)) == "192.0.2.7"
    assert source_host(IPv4Address("TCP", "192.0.2.7", 1)) == "192.0.2.7"
    assert source_host(IPv6Address("TCP", "2001:db8::1", 1)) == "2001:db8::1"
    assert source_host(UNIXAddress(None)) == ""


def as_the_app_reads(signal: str) -> tuple[list[str], dict]:
    """The Android app's parse of a receive signal: Java's split("_") (trailing empty
    fields dropped); it keeps a message only when there are more than six fields and the
    seventh is base64 of its sender card."""
    fields = signal.split("_")
    while fields and fields[-1] == "":
        fields.pop()
    assert len(fields) > 6, signal
    return fields, json.loads(base64.b64decode(fields[6], validate=True))


@pytest_twisted.ensureDeferred
async def test_messages_from_other_protocols_carry_the_card_the_app_reads(daemon):
    """A webim, minami or xuanxuan sender leaves no 66boss extension: the 66boss side
    writes the card the app would have sent (names and pictures), online, offline and in
    records; a 66boss client's own extension is passed on untouched."""
    from tests.test_webim import Webim

    b, tb, cb = await logged_in(daemon)
    wid, wtoken = await daemon.user(unique("web"), name="网页 Wendy")
    store = await daemon.store()
    await store.set_user_fields(wid, avatar="http://pics.example/w.png")
    w = Webim(daemon, wid, wtoken)
    await w.online()
    since = int(time.time()) - 1
    assert await w.call("message", to=str(b), body="hello") == "ok"
    fields, card = as_the_app_reads(await cb.next())
    assert fields[:4] == ["text", str(wid), "hello", "unicast"]
    wendy = {"sender": "网页 Wendy", "senderID": str(wid),
             "senderAvartar": "http://pics.example/w.png"}
    assert card == {**wendy, "conversation": "网页 Wendy",
                    "conversationAvartar": "http://pics.example/w.png"}

    gid = await make_group(daemon, b, tb, [wid])
    await store.edit_group(int(gid), name="Team 群", snap="http://pics.example/g.png")
    assert await w.call("message", type="multicast", to=str(gid), body="to all") == "ok"
    fields, card = as_the_app_reads(await cb.next())
    assert fields[:5] == ["text", str(wid), "to all", "group", str(gid)]
    assert card == {**wendy, "conversation": "Team 群",
                    "conversationAvartar": "http://pics.example/g.png"}

    # offline: delivered at the next login, with the card
    cb.send(f"logout_{b}")
    while await cb.next() is not CLOSED:
        pass
    assert await w.call("message", to=str(b), body="while away") == "ok"
    cb = await ws_connect(daemon.web)
    cb.send(f"login_{b}_{await store.issue_token(b, 60)}")
    assert await cb.next() == "ok"
    fields, card = as_the_app_reads(await cb.next())
    assert fields[2] == "while away" and card["sender"] == "网页 Wendy"

    cb.send(f"records_{wid}_{since}")
    assert await cb.next() == f"records_{wid}_{since}_2"
    for body in ("hello", "while away"):
        fields, card = as_the_app_reads(await cb.next())
        assert fields[2] == body and card["senderID"] == str(wid)

    a, _, ca = await logged_in(daemon)
    ca.send(f"text_{b}_mine_unicast_eyJvd24iOiAxfQ==")
    assert (await cb.next()).endswith("_eyJvd24iOiAxfQ==")
