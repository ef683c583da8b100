"""Presence across protocols: xuanxuan sessions see every user of every protocol come, go and
change status (chat/login, chat/logout, chat/userChangeStatus, as the 1.0 client handles
them); friends on minami (code 300) and webim (presence packets) see xuanxuan users."""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.conftest import CLEAN_EXIT, Daemon, run_blocking, unique
from tests.test_boss import logged_in
from tests.test_minami import ok
from tests.test_minami import new_user as minami_user
from tests.test_webim import tab
from tests.test_xuanxuan import about, connect, login, md5, none_about


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A daemon of this module's own: its xuanxuan logins make the system group, which
    test_webim expects the shared daemon not to have."""
    d = Daemon(tmp_path_factory.mktemp("presence") / "data", "--poll-timeout", "2").start()
    yield d
    run_blocking(d.close_store())
    assert d.stop() in CLEAN_EXIT, d.log()
    assert "Traceback" not in d.log(), d.log()


def xuanxuan_shape(data: dict, uid: int, account: str, status: str) -> None:
    """A xuanxuan login/logout/userChangeStatus push: the user's id and status, all the 1.0
    client reads of it (socket.js; see imd/protocols/xuanxuan/socket.py presence_user_json).
    ``account``: the user's, whom the client knows by id from the user list."""
    assert data == {"id": uid, "status": status} and isinstance(data["id"], int)


@pytest_twisted.ensureDeferred
async def test_xuanxuan_sees_66boss_logins_and_logouts(daemon):
    _, x, _, _ = await login(daemon)
    for via in ("ws", "line"):
        account = unique("boss")
        uid, token, client = await logged_in(daemon, via, account)
        xuanxuan_shape(await about(x, "login", uid), uid, account, "online")
        client.send(f"logout_{uid}")
        xuanxuan_shape(await about(x, "logout", uid), uid, account, "offline")
        client.close()
        await none_about(x, uid)


@pytest_twisted.ensureDeferred
async def test_xuanxuan_sees_minami_logins_and_logouts(daemon):
    _, x, _, _ = await login(daemon)
    account, m = await minami_user(daemon)
    uid = int(m.id)
    xuanxuan_shape(await about(x, "login", uid), uid, account, "online")
    m.ws.close()
    xuanxuan_shape(await about(x, "logout", uid), uid, account, "offline")


@pytest_twisted.ensureDeferred
async def test_xuanxuan_sees_webim_login_status_and_logout_once(daemon):
    uid_x, x, _, _ = await login(daemon)
    account = unique("w")
    w = await tab(daemon, account)
    xuanxuan_shape(await about(x, "login", w.uid), w.uid, account, "online")
    # A friend who also watches everyone hears each change once, not twice.
    await (await daemon.store()).befriend(w.uid, uid_x, "X", "W")
    assert await w.call("presence", show="dnd", status="meeting") == "ok"
    assert (await about(x, "userChangeStatus", w.uid))["status"] == "busy"
    await none_about(x, w.uid)
    assert await w.call("offline") == "ok"
    assert (await about(x, "logout", w.uid))["status"] == "offline"
    await none_about(x, w.uid)
    users = {u["id"]: u for u in (await x.call("userGetlist"))["data"]}
    assert users[w.uid]["status"] == "offline"


@pytest_twisted.ensureDeferred
async def test_webim_and_minami_friends_see_xuanxuan_presence(daemon):
    account = unique("xx")
    uid, _ = await daemon.user(account, password="pw")
    w = await tab(daemon)
    _, m = await minami_user(daemon)
    store = await daemon.store()
    await store.befriend(w.uid, uid, "X", "W")
    await store.befriend(int(m.id), uid, "X", "M")

    x = await connect(daemon)
    x.send("chat", "login", [account, md5("pw"), "away"])
    assert (await x.next())["result"] == "success"
    (p,) = await w.poll_until("presences", lambda p: p["from"] == str(uid))
    assert (p["type"], p["show"]) == ("online", "away")

    assert (await x.call("userChangeStatus", ["busy"]))["result"] == "success"
    (p,) = await w.poll_until("presences", lambda p: p["from"] == str(uid))
    assert (p["type"], p["show"]) == ("show", "busy")

    assert (await x.call("logout"))["result"] == "success"
    (p,) = await w.poll_until("presences", lambda p: p["from"] == str(uid))
    assert (p["type"], p["show"]) == ("offline", "unavailable")
    assert await m.next() == ok(300, id=str(uid))
