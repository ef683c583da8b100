"""minami over the wire: register, WebSocket login and tunnel, friends, cross-protocol."""

from __future__ import annotations

import hashlib
import json
from urllib.parse import urlencode

import pytest
import pytest_twisted

from tests.conftest import unique
from tests.test_boss import logged_in
from tests.wire import CLOSED, get, http, ws_connect

PREFIXES = ["/im", "/whisperIM"]


def ok(code=200, **extra):
    from imd.protocols.minami.codes import MESSAGES, OK_CODES

    return {"code": code, "message": MESSAGES[code], "ok": code in OK_CODES, **extra}


async def register(daemon, prefix="/im", **fields):
    body = json.dumps(fields, ensure_ascii=False).encode()
    r = await http("POST", f"http://127.0.0.1:{daemon.web}{prefix}/register", body,
                   {"Content-Type": "application/json"})
    return r.json()


class Minami:
    """A logged-in minami client."""

    def __init__(self, ws, login: dict):
        self.ws = ws
        self.login = login
        self.id = login.get("profile", {}).get("id")
        self.token = login.get("token")

    async def next(self, **kw):
        frame = await self.ws.next(**kw)
        return frame if frame is CLOSED else json.loads(frame)

    def send(self, obj) -> None:
        self.ws.send(obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False))


async def connect(daemon, account, password="pw", prefix="/im"):
    query = urlencode({"account": account, "password": password})
    ws = await ws_connect(daemon.web, f"{prefix}/login?{query}")
    first = json.loads(await ws.next())
    return Minami(ws, first), first


async def new_user(daemon, prefix="/im", **profile) -> tuple[str, Minami]:
    account = unique("mi")
    fields = {"account": account, "password": "pw", "mail": f"{account}@example.org",
              **profile}
    assert await register(daemon, prefix, **fields) == ok()
    client, first = await connect(daemon, account, prefix=prefix)
    assert first["code"] == 200, first
    return account, client


async def friends_api(daemon, path, client: Minami, prefix="/im", **params):
    return (await get(daemon.web, f"{prefix}/friends/{path}", id=client.id,
                      token=client.token, **params)).json()


async def befriend(daemon, a: Minami, b: Minami, alias_for_a="A", note="hi"):
    assert await friends_api(daemon, "request", a, to=b.id, note=note) == ok()
    assert (await b.next())["code"] == 520
    assert await friends_api(daemon, "add", b, **{"from": a.id, "name": alias_for_a}) == ok()


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest_twisted.ensureDeferred
async def test_register_codes(daemon, prefix):
    account = unique("reg")
    base = {"account": account, "password": "pw", "mail": "m@x"}
    assert await register(daemon, prefix, **{**base, "account": ""}) == ok(501)
    assert await register(daemon, prefix, **{**base, "account": "  "}) == ok(501)
    assert await register(daemon, prefix, **{**base, "password": ""}) == ok(502)
    assert await register(daemon, prefix, **{**base, "mail": ""}) == ok(503)
    assert await register(daemon, prefix, **base) == ok()
    assert await register(daemon, prefix, **base) == ok(504)
    assert await register(daemon, prefix, **{**base, "account": ["x"]}) == ok(403)
    url = f"http://127.0.0.1:{daemon.web}{prefix}/register"
    assert (await http("POST", url, b"not json")).json() == ok(403)
    assert (await http("POST", url, b"[1,2]")).json() == ok(403)
    assert (await http("POST", url, b"\xff\xfe")).json() == ok(403)
    assert (await http("GET", url)).json() == ok(403)


@pytest_twisted.ensureDeferred
async def test_login_frame_profile_and_wrong_password(daemon):
    account, me = await new_user(daemon, name="米娜", sex="女", birthday="1990-01-01",
                                 sign="吃了吗?", picture="img/base64:AAAA")
    login = me.login
    assert login["code"] == 200 and login["message"] == "Success" and login["ok"] is True
    assert login["profile"] == {"id": me.id, "name": "米娜", "picture": "img/base64:AAAA",
                                "sex": "女", "birthday": "1990-01-01", "sign": "吃了吗?"}
    assert login["friends"] is None and login["requests"] is None
    assert len(login["token"]) >= 32
    bad, first = await connect(daemon, account, password="wrong")
    assert first == ok(505)
    assert await bad.ws.next() is CLOSED
    _, first = await connect(daemon, "", password="")
    assert first == ok(505)
    # The account registered with minami is the account of every protocol.
    r = (await http("POST", f"http://127.0.0.1:{daemon.web}/login",
                    urlencode({"account": account, "password": "pw"}).encode(),
                    {"Content-Type": "application/x-www-form-urlencoded"})).json()
    assert r["code"] == 1 and r["id"] == me.id


@pytest_twisted.ensureDeferred
async def test_friends_life_cycle(daemon):
    name = unique("name")
    _, a = await new_user(daemon, name=name)
    _, b = await new_user(daemon)
    found = await friends_api(daemon, "found", b, name=name)
    assert found["code"] == 200 and [p["id"] for p in found["found"]] == [a.id]
    assert await friends_api(daemon, "request", b, to=a.id, note="let's be friends") == ok()
    push = await a.next()
    assert push == ok(520, id=b.id, name=b.login["profile"]["name"], to=a.id,
                      note="let's be friends")
    assert await friends_api(daemon, "add", a, **{"from": b.id, "name": "Bee"}) == ok()
    assert await friends_api(daemon, "request", b, to=a.id) == ok(522)
    assert await friends_api(daemon, "add", a, **{"from": b.id, "name": "x"}) == ok(522)
    # Both see each other at their next login, online, under the right names.
    a.ws.close()
    await a.ws.inbox.closed
    a2, first = await connect(daemon, (await (await daemon.store()).get_user(int(a.id))).account)
    assert [(f["id"], f["name"], f["online"]) for f in first["friends"]] == [
        (b.id, "Bee", True)]
    assert first["requests"] is None
    assert await friends_api(daemon, "remove", a2, to=b.id) == ok()
    assert await friends_api(daemon, "remove", a2, to=b.id) == ok(512)


@pytest_twisted.ensureDeferred
async def test_friend_api_error_codes(daemon):
    _, a = await new_user(daemon)
    _, b = await new_user(daemon)
    base = f"http://127.0.0.1:{daemon.web}/im/friends"
    assert (await get(daemon.web, "/im/friends/found", id=a.id, name="x")).json() == ok(514)
    assert (await get(daemon.web, "/im/friends/found", token=a.token,
                      name="x")).json() == ok(517)
    assert (await get(daemon.web, "/im/friends/found", id=b.id, token=a.token,
                      name="x")).json() == ok(515)
    assert (await get(daemon.web, "/im/friends/found", id=a.id, token="f" * 32,
                      name="x")).json() == ok(515)
    assert await friends_api(daemon, "found", a) == ok(516)
    assert await friends_api(daemon, "request", a) == ok(519)
    assert await friends_api(daemon, "request", a, to="999999999") == ok(523)
    assert await friends_api(daemon, "request", a, to="not-an-id") == ok(523)
    assert await friends_api(daemon, "add", a, **{"from": b.id}) == ok(521)
    assert await friends_api(daemon, "add", a, name="x") == ok(519)
    assert await friends_api(daemon, "add", a, **{"from": "999999999", "name": "x"}) == ok(523)
    assert await friends_api(daemon, "add", a, **{"from": b.id, "name": "x"}) == ok(403)
    assert await friends_api(daemon, "remove", a) == ok(519)
    assert await friends_api(daemon, "remove", a, to=b.id) == ok(512)
    assert (await http("GET", f"{base}/found")).json() == ok(514)


@pytest_twisted.ensureDeferred
async def test_offline_request_comes_with_next_login(daemon):
    account_b, b = await new_user(daemon)
    b.ws.close()
    await b.ws.inbox.closed
    _, a = await new_user(daemon)
    assert await friends_api(daemon, "request", a, to=b.id, note="later") == ok()
    b2, first = await connect(daemon, account_b)
    assert first["requests"] == [{"id": a.id, "name": a.login["profile"]["name"],
                                  "to": b.id, "note": "later"}]


@pytest_twisted.ensureDeferred
async def test_tunnel(daemon):
    _, a = await new_user(daemon)
    _, b = await new_user(daemon)
    await befriend(daemon, a, b)
    a.send({"id": "s1", "toFriend": b.id, "payload": "吃饭了吗？"})
    assert await a.next() == ok(id="s1")
    assert await b.next() == {"from": a.id, "payload": "吃饭了吗？"}
    a.send({"id": 7, "toFriend": int(b.id), "payload": "numeric ids"})
    assert await a.next() == ok(id=7)
    assert await b.next() == {"from": a.id, "payload": "numeric ids"}
    _, stranger = await new_user(daemon)
    for frame, expected in [
            ({"id": "x", "toFriend": "", "payload": "p"}, ok(510)),
            ({"id": "x", "toFriend": b.id}, ok(511)),
            ({"id": "x", "toFriend": b.id, "payload": ""}, ok(511)),
            ({"id": "x", "toFriend": stranger.id, "payload": "p"}, ok(512)),
            ({"id": "x", "toFriend": "nobody", "payload": "p"}, ok(512)),
            ({"toFriend": b.id, "payload": "p"}, ok(506)),
            ({"id": "", "toFriend": b.id, "payload": "p"}, ok(506)),
            ({"id": "x", "toFriend": b.id, "payload": 5}, ok(403)),
            ({"id": [1], "toFriend": b.id, "payload": "p"}, ok(403)),
            ("not json", ok(403)), ("[1, 2]", ok(403)), ('"text"', ok(403))]:
        a.send(frame)
        assert await a.next() == expected, frame
    a.ws.send_binary(b"\x00\x01")
    assert await a.next() == ok(403)
    await b.ws.nothing()
    # 508: the friend has no live session; nothing is delivered or queued.
    b.ws.close()
    await b.ws.inbox.closed
    assert await a.next() == ok(300, id=b.id)  # b went offline
    a.send({"id": "s9", "toFriend": b.id, "payload": "lost?"})
    assert await a.next() == ok(508, id="s9")
    b2, first = await connect(daemon, (await (await daemon.store()).get_user(int(b.id))).account)
    await b2.ws.nothing()


@pytest_twisted.ensureDeferred
async def test_second_login_kicks_the_first(daemon):
    account, a = await new_user(daemon)
    a2, first = await connect(daemon, account)
    assert first["code"] == 200
    assert await a.next() == ok(513)
    assert await a.next() is CLOSED
    # The token of the closed session is revoked; the new one works.
    assert (await get(daemon.web, "/im/friends/found", id=a.id, token=a.token,
                      name="x")).json() == ok(515)
    assert (await friends_api(daemon, "found", a2, name="x"))["code"] == 200


@pytest_twisted.ensureDeferred
async def test_bad_frames_do_not_break_the_session(daemon):
    _, a = await new_user(daemon)
    _, b = await new_user(daemon)
    await befriend(daemon, a, b)
    a.ws.proto.sendMessage(b"\xff\xfe{", isBinary=False)  # a text frame that is not UTF-8
    assert await a.next() == ok(403)
    a.send({"id": "big", "toFriend": b.id, "payload": "x" * 5000})  # over --max-frame 4096
    assert await a.next() == ok(403)
    a.send({"id": "1", "toFriend": b.id, "payload": "still fine"})
    assert await a.next() == ok(id="1")
    assert await b.next() == {"from": a.id, "payload": "still fine"}
    a.send("x" * 150_000)  # over the hard limit (--max-body 100000): closed, 1009
    assert await a.next() is CLOSED
    assert a.ws.proto.close_code == 1009
    assert await b.next() == ok(300, id=a.id)
    _, c = await new_user(daemon)  # the daemon is fine
    await befriend(daemon, c, b)
    c.send({"id": "2", "toFriend": b.id, "payload": "hello"})
    assert await c.next() == ok(id="2")


@pytest_twisted.ensureDeferred
async def test_cross_protocol_with_66boss(daemon):
    _, m = await new_user(daemon)
    boss_id, boss_token, boss = await logged_in(daemon)

    class BossAsMinami:  # the 66boss user uses the minami friends API with its token
        id, token = str(boss_id), boss_token

    assert await friends_api(daemon, "request", BossAsMinami, to=m.id) == ok()
    assert (await m.next())["code"] == 520
    assert await friends_api(daemon, "add", m, **{"from": str(boss_id), "name": "Boss"}) == ok()
    m.send({"id": "1", "toFriend": str(boss_id), "payload": "hi boss_with_underscore"})
    assert await m.next() == ok(id="1")
    assert (await boss.next()).startswith(
        f"text_{m.id}_hi boss_with_underscore_unicast_{m.id}_")
    boss.send(f"text_{m.id}_hi minami_unicast_x")
    assert await m.next() == {"from": str(boss_id), "payload": "hi minami"}
    boss.send(f"picture_{m.id}_http://x/p-2x2.png_unicast_x")
    assert await m.next() == {"from": str(boss_id), "payload": "[image] http://x/p-2x2.png"}


@pytest_twisted.ensureDeferred
async def test_queued_messages_from_other_protocols_arrive_after_login(daemon):
    account, m = await new_user(daemon)
    m.ws.close()
    await m.ws.inbox.closed
    boss_id, _, boss = await logged_in(daemon)
    boss.send(f"text_{m.id}_while you were away_unicast_x")
    boss.send(f"records_{m.id}_0")
    assert (await boss.next()).startswith(f"records_{m.id}_0_1")
    await boss.next()
    m2, first = await connect(daemon, account)
    assert first["code"] == 200
    assert await m2.next() == {"from": str(boss_id), "payload": "while you were away"}


@pytest_twisted.ensureDeferred
async def test_password_is_never_stored_or_logged(daemon):
    account, password = unique("secret"), "S3cr3t-" + unique("pw")
    assert await register(daemon, account=account, password=password, mail="m@x") == ok()
    m, first = await connect(daemon, account, password=password)
    assert first["code"] == 200
    await connect(daemon, account, password=password + "-wrong")
    store = await daemon.store()
    record = await store.redis.hgetall(f"imd:u:{m.id}")
    assert password not in json.dumps(record) and "verifier" in record
    assert hashlib.md5(password.encode()).hexdigest() not in json.dumps(record)
    assert password not in daemon.log()


@pytest_twisted.ensureDeferred
async def test_tokens_are_random_and_expire(daemon):
    _, a = await new_user(daemon)
    _, b = await new_user(daemon)
    assert a.token != b.token and len(bytes.fromhex(a.token)) >= 16
    store = await daemon.store()
    ttl = await store.redis.ttl(f"imd:th:{hashlib.sha256(a.token.encode()).hexdigest()}")
    assert 0 < ttl <= 30 * 86400
