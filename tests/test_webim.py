"""webim over real HTTP: actions in both URL forms, JSON and JSONP, the long-poll life cycle,
auth, rooms shared with 66boss, and messages to and from the other protocols."""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlencode

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from imd.protocols.webim.auth import sign
from tests.conftest import unique
from tests.test_boss import logged_in, make_group
from tests.wire import get, http, post_form

JSONP_RE = re.compile(r"^([\w.$]+)\((.*)\);$", re.S)


def parse(response):
    text = response.body.decode()
    m = JSONP_RE.match(text)
    return json.loads(m.group(2)) if m else json.loads(text)


class Webim:
    """A webim browser tab of one user (token auth, like an API client)."""

    def __init__(self, daemon, uid: int, token: str):
        self.daemon, self.uid, self.token = daemon, uid, token
        self.ticket = None
        self.online_reply = None

    async def call(self, action, form="path", callback=None, **params):
        params = {"token": self.token, **params}
        if callback:
            params["callback"] = callback
        if "ticket" not in params and self.ticket:
            params["ticket"] = self.ticket
        if form == "path":
            r = await post_form(self.daemon.web, f"/webim/{action}", **params)
        else:
            r = await get(self.daemon.web, "/webim/im.php", webim_action=action, **params)
        return parse(r)

    async def online(self, **params):
        reply = await self.call("online", **params)
        assert reply["success"] is True, reply
        self.ticket = reply["connection"]["ticket"]
        self.online_reply = reply
        return reply

    async def poll(self, ticket=None):
        r = await get(self.daemon.web, "/packets", ticket=ticket or self.ticket,
                      callback="cb")
        assert r.header("content-type").startswith("application/javascript")
        return parse(r)

    def poll_deferred(self, ticket=None):
        return defer.ensureDeferred(self.poll(ticket))

    async def poll_until(self, what: str, predicate, tries: int = 5):
        for _ in range(tries):
            packets = await self.poll()
            found = [p for p in packets.get(what, []) if predicate(p)]
            if found:
                return found
        raise AssertionError(f"no matching {what}")


async def tab(daemon, account=None, **online):
    uid, token = await daemon.user(account or unique("w"), name=unique("Nick"))
    w = Webim(daemon, uid, token)
    await w.online(**online)
    return w


async def another_tab(w: Webim) -> Webim:
    t = Webim(w.daemon, w.uid, w.token)
    await t.online()
    return t


async def befriend(daemon, a: Webim, b: Webim):
    store = await daemon.store()
    await store.befriend(a.uid, b.uid, "B", "A")


@pytest.mark.parametrize("form", ["path", "im.php"])
@pytest_twisted.ensureDeferred
async def test_online_shape_in_both_url_forms(daemon, form):
    uid, token = await daemon.user(unique("w"), name="Susan")
    w = Webim(daemon, uid, token)
    before = int(time.time() * 1000)
    reply = await w.call("online", form=form, domain="example.org")
    assert reply["success"] is True
    assert before - 5000 <= reply["server_time"] <= int(time.time() * 1000) + 5000
    assert reply["user"]["id"] == str(uid) and reply["user"]["nick"] == "Susan"
    assert reply["user"]["show"] == "available" and reply["user"]["presence"] == "online"
    conn = reply["connection"]
    assert conn["domain"] == "example.org" and len(conn["ticket"]) >= 22
    assert conn["server"] == f"http://127.0.0.1:{daemon.web}/packets"
    assert reply["buddies"] == [] and reply["rooms"] == [] and reply["new_messages"] == []
    assert reply["setting"] == {}


@pytest_twisted.ensureDeferred
async def test_jsonp_and_json_replies(daemon):
    w = await tab(daemon)
    r = await get(daemon.web, "/webim/notifications", token=w.token, callback="jQuery.cb_1")
    assert r.body == b"jQuery.cb_1([]);"
    assert r.header("content-type").startswith("application/javascript")
    assert r.header("x-content-type-options") == "nosniff"
    r = await get(daemon.web, "/webim/notifications", token=w.token)
    assert r.body == b"[]" and r.header("content-type").startswith("application/json")
    for bad in ["alert(1)//", "a;b", "1abc", "a-b", "<script>", "a..b", "x" * 100]:
        r = await get(daemon.web, "/webim/notifications", token=w.token, callback=bad)
        assert r.status == 400 and r.header("content-type").startswith("application/json")
        assert bad.encode() not in r.body
    r = await get(daemon.web, "/packets", ticket=w.ticket, callback="alert(1)")
    assert r.status == 400
    assert parse(await get(daemon.web, "/webim/nosuch", token=w.token)) == {
        "success": False, "error_msg": "Unknown action"}


@pytest_twisted.ensureDeferred
async def test_auth(daemon, fresh_daemon):
    w = await tab(daemon)
    other = await tab(daemon)
    assert await w.call("online", token="") == {"success": False,
                                                "error_msg": "Not Authorized"}
    assert (await w.call("buddies", token="f" * 32, ids="1"))["success"] is False
    # Another user's ticket gets nothing of theirs.
    reply = await w.call("message", ticket=other.ticket, to=str(other.uid), body="x")
    assert reply["success"] is False
    # Our login form sets a session cookie (HttpOnly, SameSite=Lax).
    account = unique("cookie")
    uid, _ = await daemon.user(account, password="pw")
    r = await post_form(daemon.web, "/webim/login", account=account, password="pw")
    assert parse(r)["success"] is True
    cookie = r.header("set-cookie")
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    value = cookie.split(";")[0]
    r = await http("GET", f"http://127.0.0.1:{daemon.web}/webim/online",
                   headers={"Cookie": value})
    assert parse(r)["user"]["id"] == str(uid)
    bad = await post_form(daemon.web, "/webim/login", account=account, password="nope")
    assert parse(bad)["success"] is False and bad.header("set-cookie") is None


@pytest_twisted.ensureDeferred
async def test_signed_host_site_token(fresh_daemon):
    d = fresh_daemon("--webim-secret", "s3cret").start()
    uid, _ = await d.user(unique("host"))
    good = sign("s3cret", uid, int(time.time()) + 60)
    assert parse(await get(d.web, "/webim/online", auth=good))["success"] is True
    for auth in [sign("wrong", uid, int(time.time()) + 60),
                 sign("s3cret", uid, int(time.time()) - 1),
                 good.replace(f"{uid}.", f"{uid + 1}.", 1), "garbage"]:
        assert parse(await get(d.web, "/webim/online", auth=auth))["success"] is False
    await d.close_store()


@pytest_twisted.ensureDeferred
async def test_messages_go_to_every_tab_but_the_sending_one(daemon):
    a = await tab(daemon)
    b = await tab(daemon)
    a2 = await another_tab(a)
    b2 = await another_tab(b)
    assert await a.call("message", type="unicast", to=str(b.uid), body="hello 你好",
                        style="color:red") == "ok"
    for t in (b, b2, a2):
        (m,) = await t.poll_until("messages", lambda p: p["body"] == "hello 你好")
        assert m["from"] == str(a.uid) and m["to"] == str(b.uid) and m["type"] == "unicast"
        assert m["style"] == "color:red" and isinstance(m["timestamp"], int)
        assert m["nick"] == (await (await daemon.store()).get_user(a.uid)).name
    packets = await a.poll()  # the sending tab: nothing, until the hold times out
    assert packets == {"status": "ok", "messages": [], "presences": [], "statuses": []}


@pytest_twisted.ensureDeferred
async def test_long_poll_life_cycle(daemon):
    w = await tab(daemon)
    other = await tab(daemon)
    # hold, then wake at once when a packet arrives
    started = time.monotonic()
    held = w.poll_deferred()
    await task.deferLater(reactor, 0.3, lambda: None)
    assert not held.called
    assert await other.call("message", to=str(w.uid), body="wake up") == "ok"
    packets = await held
    assert [m["body"] for m in packets["messages"]] == ["wake up"]
    assert time.monotonic() - started < 1.5
    # an empty hold ends after --poll-timeout (2 s here)
    started = time.monotonic()
    assert (await w.poll())["messages"] == []
    assert 1.5 < time.monotonic() - started < 4
    # a newer poll for the same ticket stops the older one
    first = w.poll_deferred()
    await task.deferLater(reactor, 0.2, lambda: None)
    second = w.poll_deferred()
    assert await first == {"status": "stopped"}
    other = await tab(daemon)  # the first sender's ticket has expired by now (no polls)
    assert await other.call("message", to=str(w.uid), body="to the newer poll") == "ok"
    assert [m["body"] for m in (await second)["messages"]] == ["to the newer poll"]
    # unknown ticket
    assert await w.poll("nonsense") == {"status": "stopped"}
    # offline unbinds the ticket
    assert await w.call("offline") == "ok"
    assert await w.poll() == {"status": "stopped"}


@pytest_twisted.ensureDeferred
async def test_ticket_expires_without_polls_and_messages_are_kept(daemon):
    w = await tab(daemon)
    sender = await tab(daemon)
    await task.deferLater(reactor, 2.5, lambda: None)  # > --ticket-timeout 2
    assert await w.poll() == {"status": "stopped"}
    await task.deferLater(reactor, 1.5, lambda: None)  # > --offline-grace 1: logged out
    sender = await another_tab(sender)
    assert await sender.call("message", to=str(w.uid), body="while away") == "ok"
    reply = await w.online()
    assert [m["body"] for m in reply["new_messages"]] == ["while away"]
    assert (await w.online())["new_messages"] == []  # exactly once


@pytest_twisted.ensureDeferred
async def test_refresh_within_grace_causes_no_offline_flicker(daemon):
    a = await tab(daemon)
    b = await tab(daemon)
    await befriend(daemon, a, b)
    assert await a.call("refresh") == "ok"
    assert await a.poll() == {"status": "stopped"}
    assert await b.call("message", to=str(a.uid), body="during refresh") == "ok"
    reply = await a.online()  # the new page, within the grace
    assert [m["body"] for m in reply["new_messages"]] == ["during refresh"]
    a_polling = a.poll_deferred()  # the new page polls, as a browser does
    await task.deferLater(reactor, 1.5, lambda: None)  # past the old ticket's grace
    packets = await b.poll()
    await a_polling
    offline = [p for p in packets["presences"] if p["type"] == "offline"]
    assert offline == [], (a.uid, b.uid, packets)
    # a real offline is announced to buddies
    assert await a.call("offline") == "ok"
    (p,) = await b.poll_until("presences", lambda p: p["type"] == "offline")
    assert p["from"] == str(a.uid) and p["show"] == "unavailable"
    # ... and coming back online too
    await a.online()
    (p,) = await b.poll_until("presences", lambda p: p["type"] == "online")
    assert p["from"] == str(a.uid)


@pytest_twisted.ensureDeferred
async def test_online_lists_buddies_with_history_and_new_messages(daemon):
    a = await tab(daemon)
    b = await tab(daemon)
    await befriend(daemon, a, b)
    stranger = await tab(daemon)
    for i in range(35):
        assert await b.call("message", to=str(a.uid), body=f"m{i}") == "ok"
    assert await a.call("offline") == "ok"
    assert await stranger.call("message", to=str(a.uid), body="from a stranger") == "ok"
    assert await b.call("offline") == "ok"
    reply = await a.online(buddy_ids=str(b.uid))
    buddies = {x["id"]: x for x in reply["buddies"]}
    assert set(buddies) == {str(b.uid), str(stranger.uid)}
    assert buddies[str(b.uid)]["group"] == "friend" and buddies[str(b.uid)]["nick"] == "B"
    assert buddies[str(b.uid)]["presence"] == "offline"
    assert buddies[str(stranger.uid)]["group"] == "stranger"
    assert buddies[str(stranger.uid)]["presence"] == "online"
    history = buddies[str(b.uid)]["history"]
    assert [h["body"] for h in history] == [f"m{i}" for i in range(5, 35)]  # last 30
    assert reply["new_messages"][-1]["body"] == "from a stranger"


@pytest_twisted.ensureDeferred
async def test_status_presence_history_clear_setting_download(daemon):
    a = await tab(daemon)
    b = await tab(daemon)
    await befriend(daemon, a, b)
    assert await a.call("status", to=str(b.uid), show="typing") == "ok"
    (s,) = await b.poll_until("statuses", lambda p: True)
    assert s == {"from": str(a.uid), "nick": s["nick"], "to": str(b.uid), "show": "typing"}
    assert await a.call("history", id=str(b.uid), type="unicast") == []  # never stored
    await b.call("offline")
    assert await a.call("status", to=str(b.uid), show="typing") == "ok"  # dropped
    b = await another_tab(b)
    assert await a.call("presence", show="away", status="lunch") == "ok"
    (p,) = await b.poll_until("presences", lambda p: p["type"] == "show")
    assert (p["from"], p["show"], p["status"]) == (str(a.uid), "away", "lunch")
    assert (await b.call("buddies", ids=str(a.uid)))[0]["show"] == "away"

    assert await a.call("message", to=str(b.uid), body="<b>one</b>") == "ok"
    assert await b.call("message", to=str(a.uid), body="two") == "ok"
    for reader in (a, b):
        items = await reader.call("history", id=str(a.uid if reader is b else b.uid),
                                  type="unicast")
        assert [i["body"] for i in items] == ["<b>one</b>", "two"]
        assert set(items[0]) >= {"type", "to", "from", "style", "body", "timestamp"}
    histories = await a.call("histories", ids=str(b.uid))
    assert [i["body"] for i in histories[str(b.uid)]] == ["<b>one</b>", "two"]
    assert await a.call("clear_history", ids=str(b.uid)) == "ok"
    assert await a.call("history", id=str(b.uid)) == []
    assert len(await b.call("history", id=str(a.uid))) == 2  # the other side keeps it

    r = await get(daemon.web, "/webim/download_history", token=b.token, id=str(a.uid))
    assert "attachment" in r.header("content-disposition")
    assert b"&lt;b&gt;one&lt;/b&gt;" in r.body and b"<b>one</b>" not in r.body

    assert await a.call("setting", data='{"play_sound": false}') == "ok"
    assert (await a.online())["setting"] == {"play_sound": False}
    assert (await a.call("setting", data="not json"))["success"] is False
    assert await a.call("notifications") == []


@pytest_twisted.ensureDeferred
async def test_rooms_are_66boss_groups(daemon):
    boss_id, boss_token, boss = await logged_in(daemon)
    a = await tab(daemon)
    b = await tab(daemon)
    gid = await make_group(daemon, boss_id, boss_token, [a.uid, b.uid])
    reply = await a.online(room_ids=gid)
    (room,) = reply["rooms"]
    assert room["id"] == gid and room["all_count"] == 3 and room["count"] >= 2
    assert int(gid) not in (a.uid, b.uid, boss_id)
    assert await a.call("message", type="multicast", to=gid, body="hi room") == "ok"
    (m,) = await b.poll_until("messages", lambda p: p["body"] == "hi room")
    assert m["type"] == "multicast" and m["to"] == gid
    assert (await boss.next()).startswith(f"text_{a.uid}_hi room_group_{gid}_")
    boss.send(f"text_{gid}_hi from boss_group_x")
    (m,) = await a.poll_until("messages", lambda p: p["body"] == "hi from boss")
    assert m["from"] == str(boss_id) and m["type"] == "multicast"
    # one history for both protocols
    assert [i["body"] for i in await b.call("history", id=gid, type="multicast")] == [
        "hi room", "hi from boss"]
    boss.send(f"records_{gid}_0")
    assert await boss.next() == f"records_{gid}_0_2"
    members = await a.call("members", id=gid)
    assert sorted(int(x["id"]) for x in members) == sorted([boss_id, a.uid, b.uid])
    assert (await a.call("rooms", ids=gid))[0]["id"] == gid
    # leave / join: presences to the other members; a closed group cannot be joined
    assert await b.call("leave", id=gid) == "ok"
    (p,) = await a.poll_until("presences", lambda p: p["type"] == "leave")
    assert p["from"] == str(b.uid) and p["status"] == gid
    assert (await b.call("join", id=gid))["success"] is False
    await (await daemon.store()).set_public(int(gid), True)
    joined = await b.call("join", id=gid)
    assert joined["id"] == gid and joined["all_count"] == 3
    (p,) = await a.poll_until("presences", lambda p: p["type"] == "join")
    assert p["from"] == str(b.uid) and p["status"] == gid
    outsider = await tab(daemon)
    await (await daemon.store()).set_public(int(gid), False)
    assert (await outsider.call("members", id=gid))["success"] is False
    assert (await outsider.call("message", type="multicast", to=gid, body="x"))[
        "success"] is False


@pytest_twisted.ensureDeferred
async def test_cross_protocol_unicast(daemon):
    from tests.test_minami import new_user

    w = await tab(daemon)
    boss_id, _, boss = await logged_in(daemon)
    assert await w.call("message", to=str(boss_id), body="to boss") == "ok"
    assert (await boss.next()).startswith(f"text_{w.uid}_to boss_unicast_{w.uid}_")
    boss.send(f"picture_{w.uid}_http://x/p-1x1.png_unicast_x")
    (m,) = await w.poll_until("messages", lambda p: p["from"] == str(boss_id))
    assert m["body"] == "[image] http://x/p-1x1.png"
    _, mi = await new_user(daemon)
    await (await daemon.store()).befriend(w.uid, int(mi.id), "M", "W")
    mi.send({"id": "1", "toFriend": str(w.uid), "payload": "from minami"})
    assert (await mi.next())["code"] == 200
    (m,) = await w.poll_until("messages", lambda p: p["from"] == mi.id)
    assert m["body"] == "from minami"
    assert await w.call("message", to=mi.id, body="to minami") == "ok"
    assert await mi.next() == {"from": str(w.uid), "payload": "to minami"}


@pytest_twisted.ensureDeferred
async def test_bad_input(daemon):
    w = await tab(daemon)
    for action, params in [("message", {"to": "abc", "body": "x"}),
                           ("message", {"to": str(w.uid)}),
                           ("message", {"to": "999999999", "body": "x"}),
                           ("message", {"type": "broadcast", "to": "1", "body": "x"}),
                           ("message", {"to": "1", "body": "x" * 5000}),
                           ("status", {}), ("members", {}), ("join", {"id": "999999999"}),
                           ("history", {}), ("presence", {"show": "dancing"})]:
        reply = await w.call(action, **params)
        assert reply["success"] is False and reply["error_msg"], (action, params, reply)
    big = await http("POST", f"http://127.0.0.1:{daemon.web}/webim/message",
                     urlencode({"token": w.token, "body": "x" * 200_000}).encode(),
                     {"Content-Type": "application/x-www-form-urlencoded"})
    assert big.status == 413
    # A flood of polls for one ticket: each newer one stops the older, one stays held.
    polls = [w.poll_deferred() for _ in range(50)]
    await task.deferLater(reactor, 0.5, lambda: None)
    done = [p for p in polls if p.called]
    assert len(done) >= 49
    assert all(p.result == {"status": "stopped"} for p in done[:-1])
    other = await tab(daemon)
    assert await other.call("message", to=str(w.uid), body="after the flood") == "ok"
    results = [await p for p in polls]
    assert any(r.get("messages") for r in results) or \
        (await w.poll_until("messages", lambda p: p["body"] == "after the flood"))
