"""Seeded mutation fuzzing of every protocol over the wire, shared by ``tests/test_fuzz.py``
(a few hundred inputs per protocol) and ``bench/fuzz.py`` (run by hand, N per protocol).

Each protocol has a driver: it logs a real user in, sends mutations of valid inputs (a
random generator from a fixed seed picks them), logs in again when the daemon closed the
connection, and counts what it sent and the error replies and closes it got.  Mutations are
byte-level (flip, insert, delete, repeat, truncate, splice in hostile bytes) or structural
for JSON (a value replaced by another type, deep nesting, NaN, lone surrogates, huge
numbers, duplicate keys).  ``check_alive`` then shows the daemon still serves a normal
request of every protocol.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from urllib.parse import urlencode

from twisted.internet import defer, reactor

from tests.wire import CLOSED, get, http, line_connect, post_form, ws_connect

HOSTILE = [b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\r", b"\n", b"_", b"%00", b"\\u0000",
           b'"', b"[" * 64, b"{" * 64, b"\xe2\x80\xa8", b"-1", b"1e999", b"NaN",
           b"9" * 40, b"\\ud800", b"<script>", b"../", b"\t"]
VALUES = [None, True, False, 0, -1, 2**63, 1.5, 1e308, "", "x" * 300, "\u00e9\u4e2d",
          [], {}, [1, "a"], {"a": {"b": [None]}}, "10001", "../../etc/passwd", "%00"]


@dataclass
class Tally:
    protocol: str
    sent: int = 0
    errors: int = 0  # error replies and closes seen
    reconnects: int = 0
    notes: list[str] = field(default_factory=list)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        at = rng.randint(0, len(data))
        if op == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[at:at] = rng.choice(HOSTILE)
        elif op == 2:
            del data[at:at + rng.randint(1, 8)]
        elif op == 3:
            chunk = data[at:at + rng.randint(1, 16)]
            data[at:at] = chunk * rng.randint(1, 50)
        elif op == 4:
            del data[at:]
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


def _hostile_value(rng: random.Random):
    kind = rng.randrange(4)
    if kind == 0:
        depth = rng.choice([10, 40, 1000, 5000])
        return json.loads("[" * min(depth, 30) + "]" * min(depth, 30)) if depth < 40 else \
            _Raw("[" * depth + "]" * depth)
    if kind == 1:
        return _Raw(rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000,
                                '"\\ud800"', '"\\udfff\\ud800"']))
    return rng.choice(VALUES)


class _Raw:
    """JSON text spliced in as is (not encodable by json.dumps)."""

    def __init__(self, text: str):
        self.text = text


def _dump(value) -> str:
    if isinstance(value, _Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def mutate_json(rng: random.Random, obj) -> bytes:
    """Replace one value somewhere in ``obj`` (or the whole) by a hostile one; sometimes
    repeat a key or nest the whole; then, one time in three, mutate the bytes too."""
    def walk(value):
        if isinstance(value, dict) and value and rng.random() < 0.8:
            key = rng.choice(list(value))
            return {**value, key: walk(value[key])}
        if isinstance(value, list) and value and rng.random() < 0.8:
            i = rng.randrange(len(value))
            return value[:i] + [walk(value[i])] + value[i + 1:]
        return _hostile_value(rng)

    text = _dump(walk(obj))
    if isinstance(obj, dict) and obj and rng.random() < 0.1:
        key = rng.choice(list(obj))
        text = text[:-1] + f',{json.dumps(key)}:{_dump(_hostile_value(rng))}}}'
    if rng.random() < 0.05:
        text = "[" * 3000 + text + "]" * 3000
    data = text.encode("utf-8", "surrogatepass")
    return mutate_bytes(rng, data) if rng.random() < 0.33 else data


# -- drivers ------------------------------------------------------------------------------

async def _user(daemon, prefix: str, password: str = "pw") -> tuple[int, str, str]:
    from tests.conftest import unique

    account = unique(prefix)
    uid, token = await daemon.user(account, password=password)
    return uid, token, account


def _is_error(text: str) -> bool:
    return text.startswith("error_") or '"result":"fail"' in text or '"code":403' in text \
        or '"code":5' in text


async def _settle(client, probe: str, done, tally: Tally) -> bool:
    """Send ``probe`` and read up to its reply, counting error replies on the way; False
    when the connection closed or stopped answering."""
    try:
        client.send(probe)
        while True:
            item = await client.next(timeout=10)
            if item is CLOSED:
                tally.errors += 1
                return False
            if done(item):
                return True
            tally.errors += _is_error(item)
    except Exception:  # noqa: BLE001 - a dead or silent connection is what this reports
        return False


async def _closed(client) -> None:
    """Close a connection the fuzzer gives up on and wait until it is gone (a new login
    while the old one still runs would be a race of the test's own making)."""
    if not client.inbox.closed.called:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - already closing
            pass
        d = client.inbox.closed
        d.addTimeout(10, reactor)
        try:
            await d
        except defer.TimeoutError:
            client.drop()


def _send(client, data: bytes, binary: bool = False) -> bool:
    try:
        if hasattr(client, "proto") and hasattr(client.proto, "sendMessage"):
            client.proto.sendMessage(data, isBinary=binary)
        else:
            client.send_raw(data.replace(b"\n", b"") + b"\n")
    except Exception:  # noqa: BLE001 - autobahn refuses to send on a closed connection
        return False
    return True


async def fuzz_boss(daemon, rng: random.Random, n: int, line: bool = False) -> Tally:
    tally = Tally("66boss line" if line else "66boss ws")
    uid, token, _ = await _user(daemon, "fzb")
    peer, _, _ = await _user(daemon, "fzp")
    seeds = [f"login_{uid}_{token}", f"text_{peer}_hello_unicast_x",
             f"picture_{peer}_http://a/b.png_unicast_eyJ9", f"text_{uid}_a_b_c_group_x",
             f"members_{peer}", f"records_{peer}_0", "heartbeat_1", f"logout_{uid}",
             f"audio_{peer}_x_unicast_", "emotion_1_:)_group_"]

    async def connect():
        c = await (line_connect(daemon.line) if line else ws_connect(daemon.web))
        c.send(f"login_{uid}_{token}")
        await c.next(timeout=10)
        return c

    client = await connect()
    for i in range(n):
        data = mutate_bytes(rng, rng.choice(seeds).encode())
        sent = _send(client, data, binary=rng.random() < 0.1)
        tally.sent += 1
        if i % 10 == 9 or not sent:
            if not await _settle(client, "members_999999999999",
                                 lambda t: t.startswith("error_members_"), tally):
                tally.reconnects += 1
                await _closed(client)
                client = await connect()
    client.close()
    return tally


async def fuzz_minami(daemon, rng: random.Random, n: int) -> Tally:
    from tests.test_minami import befriend, connect, new_user

    tally = Tally("minami")
    account, a = await new_user(daemon)
    _, b = await new_user(daemon)
    await befriend(daemon, a, b)
    seeds = [{"id": "1", "toFriend": b.id, "payload": "hello"},
             {"id": 2, "toFriend": int(b.id), "payload": "x" * 50}, {"toFriend": b.id}]
    probe = json.dumps({"id": "probe", "toFriend": b.id, "payload": "p"})
    for i in range(n):
        data = mutate_json(rng, rng.choice(seeds)) if rng.random() < 0.7 else \
            mutate_bytes(rng, json.dumps(rng.choice(seeds)).encode())
        sent = _send(a.ws, data)
        tally.sent += 1
        if i % 10 == 9 or not sent:
            if not await _settle(a.ws, probe, lambda t: '"probe"' in t, tally):
                tally.reconnects += 1
                await _closed(a.ws)
                a, _ = await connect(daemon, account)
    # minami HTTP: register bodies
    base = f"http://127.0.0.1:{daemon.web}"
    for _ in range(max(1, n // 10)):
        body = mutate_json(rng, {"account": "fz", "password": "pw", "mail": "a@b.c"})
        r = await http("POST", f"{base}/im/register", body, {"Content-Type": "application/json"})
        tally.sent += 1
        tally.errors += r.status != 200 or r.json().get("code") != 200
    a.ws.close()
    return tally


async def fuzz_xuanxuan(daemon, rng: random.Random, n: int) -> Tally:
    from tests.test_xuanxuan import md5

    tally = Tally("xuanxuan")
    uid, _, account = await _user(daemon, "fzx")
    peer, _, _ = await _user(daemon, "fzy")
    cgid = "&".join(sorted([str(uid), str(peer)]))

    def req(method, params):
        return {"module": "chat", "method": method, "params": params}

    seeds = [req("ping", None), req("message", [[{"gid": "g1", "cgid": cgid, "content": "hi",
                                                  "contentType": "text"}]]),
             req("create", ["fzgroup", "name", "group", [uid, peer], 0, False]),
             req("changename", ["fzgroup", "new name"]), req("history", [cgid, 20, 1, 0, False]),
             req("userchangestatus", ["away"]), req("settings", ["", {"a": 1}]),
             req("star", [cgid, True]), req("members", [cgid]),
             req("addmember", ["fzgroup", [peer], True]), req("userchangename", ["Fz"])]

    async def connect():
        c = await line_connect(daemon.xuanxuan)
        c.send(json.dumps(req("login", [account, md5("pw"), "online"])))
        await c.next(timeout=10)
        # The login is through once its push array has come (a close before that is the
        # close-during-login race, not what this fuzzes).
        while not (await c.next(timeout=10)).startswith("["):
            pass
        return c

    client = await connect()
    ping = json.dumps(req("ping", None))
    for i in range(n):
        sent = _send(client, mutate_json(rng, rng.choice(seeds)))
        tally.sent += 1
        if i % 10 == 9 or not sent:
            if not await _settle(client, ping, lambda t: '"method":"ping","result":"success"'
                                 in t, tally):
                tally.reconnects += 1
                await _closed(client)
                client = await connect()
    client.close()
    return tally


async def fuzz_webim(daemon, rng: random.Random, n: int) -> Tally:
    tally = Tally("webim")
    uid, token, _ = await _user(daemon, "fzw")
    peer, _, _ = await _user(daemon, "fzv")
    online = json.loads((await post_form(daemon.web, "/webim/online", token=token)).body)
    ticket = online["connection"]["ticket"]
    seeds = [("message", {"type": "unicast", "to": str(peer), "body": "hi", "style": ""}),
             ("setting", {"data": '{"play_sound": true, "a": [1, {"b": 2}]}'}),
             ("presence", {"show": "away", "status": "x"}), ("status", {"to": str(peer)}),
             ("history", {"id": str(peer), "type": "unicast"}), ("buddies", {"ids": str(peer)}),
             ("members", {"id": "1"}), ("join", {"id": "1"}), ("online", {"buddy_ids": "1"})]
    for _ in range(n):
        action, params = rng.choice(seeds)
        params = dict(params)
        key = rng.choice(list(params))
        raw = params[key].encode()
        params[key] = (mutate_json(rng, json.loads(raw)) if key == "data" else
                       mutate_bytes(rng, raw))
        query = {"token": token, "ticket": ticket, **params}
        if rng.random() < 0.2:
            query["callback"] = mutate_bytes(rng, b"cb").decode("latin-1")
        if rng.random() < 0.2:
            query["auth"] = mutate_bytes(rng, b"10001.99999999999.abc").decode("latin-1")
        r = await http("POST", f"http://127.0.0.1:{daemon.web}/webim/{action}",
                       urlencode(query).encode(),
                       {"Content-Type": "application/x-www-form-urlencoded"})
        tally.sent += 1
        tally.errors += r.status != 200 or b'"success": false' in r.body or \
            b'"success":false' in r.body
        if r.status >= 500:
            tally.notes.append(f"{action}: HTTP {r.status}")
    return tally


async def fuzz_http(daemon, rng: random.Random, n: int) -> Tally:
    """JSON and form bodies of the HTTP APIs: 66boss /login and group API, uploads' paths,
    xuanxuan getconfig."""
    tally = Tally("http")
    _, token, account = await _user(daemon, "fzh")
    base = f"http://127.0.0.1:{daemon.web}"
    paths = [f"/creategrp?token={token}&members=1,2&name=x", "/grpinfo?groupid=1",
             "/upload/files/abc", "/sys/attach-download-1.json", "/index.php?mode=getconfig",
             f"/querymygrps?userid=1&token={token}"]
    for i in range(n):
        if i % 2:
            body = mutate_json(rng, {"account": account, "password": "pw"})
            r = await http("POST", f"{base}/login", body, {"Content-Type": "application/json"})
        else:
            path = mutate_bytes(rng, rng.choice(paths).encode())
            path = "/" + path.lstrip(b"/").decode("latin-1").replace(" ", "%20")
            path = "".join(c if 32 < ord(c) < 127 else f"%{ord(c):02X}" for c in path)
            try:
                r = await http("GET", base + path)
            except Exception as e:  # noqa: BLE001 - a path the client itself refuses
                tally.notes.append(f"client refused {path[:40]!r}: {type(e).__name__}")
                continue
        tally.sent += 1
        tally.errors += r.status >= 400 or b'"code":0' not in r.body
        if r.status >= 500:
            tally.notes.append(f"HTTP {r.status} for request {i}")
    return tally


DRIVERS = {"boss": fuzz_boss, "boss-line": lambda d, r, n: fuzz_boss(d, r, n, line=True),
           "minami": fuzz_minami, "xuanxuan": fuzz_xuanxuan, "webim": fuzz_webim,
           "http": fuzz_http}


def rng_for(seed: int, protocol: str) -> random.Random:
    """One generator per protocol, so a protocol's inputs do not depend on the others'."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}/{protocol}".encode())
                                        .digest()[:8], "big"))


async def check_alive(daemon) -> None:
    """A normal request of every protocol still works."""
    from tests.test_minami import new_user
    from tests.test_xuanxuan import login as xx_login

    uid, token, _ = await _user(daemon, "fza")
    for connect in (lambda: ws_connect(daemon.web), lambda: line_connect(daemon.line)):
        c = await connect()
        c.send(f"login_{uid}_{token}")
        assert await c.next() == "ok"
        c.close()
    _, m = await new_user(daemon)
    m.send({"id": "alive"})  # answered once the login is through (510: no toFriend)
    assert (await m.next())["code"] == 510
    m.ws.close()
    _, x, _, _ = await xx_login(daemon)
    assert (await x.call("ping"))["result"] == "success"
    x.client.close()
    online = json.loads((await post_form(daemon.web, "/webim/online", token=token)).body)
    assert online["success"] is True, online
    r = await get(daemon.web, "/grpinfo", groupid="1", token=token)
    assert r.status == 200
