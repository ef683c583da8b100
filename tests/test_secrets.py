"""Secrets at rest: after logins on every protocol, no live token, cookie or sid is readable
in Redis (neither in a key name nor in a value); tokens an older imd stored in clear are
deleted at start and no longer accepted."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from imd.accounts import Accounts
from tests.conftest import unique
from tests.test_minami import new_user as minami_user
from tests.test_xuanxuan import login as xuanxuan_login
from tests.wire import http, post_form, ws_connect


def data_files(data_dir: Path) -> bytes:
    """The contents of every file in the data directory (the append-only file among them)."""
    return b"".join(p.read_bytes() for p in data_dir.rglob("*")
                    if p.is_file() and not p.is_socket())


async def redis_dump(store) -> str:
    """Every key name and every value in the store's Redis, as one text."""
    redis, out, cursor = store.redis, [], 0
    while True:
        cursor, keys = await redis.scan(cursor, None, 1000)
        for key in keys:
            out.append(key)
            kind = await redis.type(key)
            if kind == "string":
                out.append(str(await redis.get(key)))
            elif kind == "hash":
                out.append(repr(await redis.hgetall(key)))
            elif kind == "set":
                out.append(repr(await redis.smembers(key)))
            elif kind == "list":
                out.append(repr(await redis.lrange(key, 0, -1)))
            elif kind == "zset":
                out.append(repr(await redis.zrange(key, 0, -1)))
        if int(cursor) == 0:
            return "\n".join(out)


@pytest_twisted.ensureDeferred
async def test_no_live_token_in_clear(fresh_daemon):
    d = fresh_daemon().start()
    secrets = {}
    # HTTP /login (66boss group API, webim API clients) and imdctl's way (Accounts.issue_token).
    account = unique("sec")
    uid, issued = await d.user(account, password="pw")
    secrets["issued"] = issued
    secrets["/login"] = (await post_form(d.web, "/login", account=account,
                                         password="pw")).json()["token"]
    # 66boss WebSocket with that token.
    boss = await ws_connect(d.web)
    boss.send(f"login_{uid}_{secrets['/login']}")
    assert await boss.next() == "ok"
    # webim's login form: the cookie.
    r = await post_form(d.web, "/webim/login", account=account, password="pw")
    cookie = r.header("set-cookie").split(";")[0]
    secrets["webim cookie"] = cookie.split("=", 1)[1]
    r = await http("POST", f"http://127.0.0.1:{d.web}/webim/online", b"",
                   {"Cookie": cookie, "Origin": f"http://127.0.0.1:{d.web}",
                    "Content-Type": "application/x-www-form-urlencoded"})
    assert b'"id":"%d"' % uid in r.body.replace(b" ", b"")
    # xuanxuan: the sid, used again as the HTTP side's rid.
    _, xx, reply, _ = await xuanxuan_login(d)
    secrets["xuanxuan sid"] = reply["sid"]
    # minami: the token of the login reply.
    _, mi = await minami_user(d)
    secrets["minami token"] = mi.token
    assert all(len(s) >= 32 for s in secrets.values()), secrets
    # Every one of them is live.
    store = await d.store()
    for name, secret in secrets.items():
        assert await store.check_token(secret), name
    dump = await redis_dump(store)
    files = data_files(d.data_dir)
    for name, secret in secrets.items():
        assert secret not in dump, f"{name} is stored in clear"
        assert secret.encode() not in files, f"{name} is in a file of the data directory"
    boss.close()
    xx.client.close()
    mi.ws.close()


@pytest_twisted.ensureDeferred
async def test_clear_tokens_of_an_old_data_set_are_dropped(fresh_daemon):
    d = fresh_daemon().start()
    store = await d.store()
    user = await Accounts(store, 3600).create(unique("old"), "pw")
    old = "0123456789abcdef0123456789abcdef"
    # What an older imd wrote: the token itself as the key name.
    await store.redis.set(f"imd:tok:{old}", user.id, expire=3600)
    await store.redis.delete("imd:tokens")
    await d.close_store()
    d.stop()
    d.start()
    store = await d.store()
    assert await store.redis.exists(f"imd:tok:{old}") == 0
    for _ in range(100):  # the append-only file is rewritten in the background
        info = await store.redis.info("persistence")
        if str(info.get("aof_rewrite_in_progress")) == "0" and \
                str(info.get("aof_rewrite_scheduled")) == "0" and \
                old.encode() not in data_files(d.data_dir):
            break
        await deferLater(reactor, 0.1)
    assert old.encode() not in data_files(d.data_dir)
    assert await store.check_token(old) is None
    boss = await ws_connect(d.web)
    boss.send(f"login_{user.id}_{old}")
    assert await boss.next() != "ok"
    boss.close()
