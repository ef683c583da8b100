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


async def cookie_login(daemon, name: str = "") -> tuple[int, str]:
    """A user logged in with our login form: (id, the ``Cookie`` header value)."""
    account = unique("cookie")
    uid, _ = await daemon.user(account, password="pw", name=name)
    r = await post_form(daemon.web, "/webim/login", account=account, password="pw")
    assert parse(r)["success"] is True
    return uid, r.header("set-cookie").split(";")[0]


async def browser_call(daemon, action: str, cookie: str | None = None, method: str = "POST",
                       origin: str | None = "own", **params):
    """An action as a browser sends it: the cookie, and on a POST the page's Origin
    (``own``: this daemon's)."""
    url = f"http://127.0.0.1:{daemon.web}/webim/{action}"
    headers = {"Cookie": cookie} if cookie else {}
    if method == "GET":
        return parse(await http("GET", f"{url}?{urlencode(params)}", headers=headers))
    if origin:
        headers["Origin"] = f"http://127.0.0.1:{daemon.web}" if origin == "own" else origin
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    return parse(await http("POST", url, urlencode(params).encode(), headers))


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
    reply = await browser_call(daemon, "online", value)
    assert reply["user"]["id"] == str(uid)
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
    # unknown ticket: "stopped", as 410 (the shipped client then counts failed polls
    # instead of polling a dead ticket for ever)
    assert await w.poll("nonsense") == {"status": "stopped"}
    r = await get(daemon.web, "/packets", ticket="nonsense", callback="cb")
    assert r.status == 410 and parse(r) == {"status": "stopped"}
    # offline unbinds the ticket
    assert await w.call("offline") == "ok"
    assert await w.poll() == {"status": "stopped"}


@pytest_twisted.ensureDeferred
async def test_ticket_expires_without_polls_and_messages_are_kept(daemon):
    w = await tab(daemon)
    sender = await tab(daemon)
    # > --ticket-timeout 2 + --offline-grace 1: unbound, then logged out
    await task.deferLater(reactor, 3.5, lambda: None)
    assert await w.poll() == {"status": "stopped"}
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
async def test_a_page_that_did_not_leave_goes_on_with_its_ticket(daemon):
    """The client sends refresh from beforeunload, which also fires when the page stays
    (a download link): its next poll within the grace binds the ticket again, with what
    arrived meanwhile, and no one saw it go offline."""
    a, b = await tab(daemon), await tab(daemon)
    await befriend(daemon, a, b)
    held = a.poll_deferred()
    await task.deferLater(reactor, 0.2, lambda: None)
    assert await a.call("refresh") == "ok"
    assert await held == {"status": "stopped"}  # the held poll ends, with a 200
    assert await b.call("message", to=str(a.uid), body="meanwhile") == "ok"
    (m,) = await a.poll_until("messages", lambda m: True)  # the same ticket, polled again
    assert m["body"] == "meanwhile"
    assert await a.call("message", to=str(b.uid), body="still here") == "ok"
    await task.deferLater(reactor, 1.5, lambda: None)  # past what the grace was
    assert await b.call("message", to=str(a.uid), body="later") == "ok"
    (m,) = await a.poll_until("messages", lambda m: True)
    assert m["body"] == "later"
    packets = await b.poll()
    assert [m["body"] for m in packets["messages"]] == ["still here"]
    assert [p for p in packets["presences"] if p["type"] == "offline"] == []


@pytest_twisted.ensureDeferred
async def test_online_lists_buddies_with_history_and_new_messages(daemon):
    a = await tab(daemon)
    b = await tab(daemon)
    await befriend(daemon, a, b)
    stranger = await tab(daemon)
    for i in range(35):
        assert await b.call("message", to=str(a.uid), body=f"m{i}") == "ok"
    await a.poll_until("messages", lambda m: m["body"] == "m34")
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
    # The client takes its settings from the host page's _IMC.setting, not from online:
    # the host reads them (with its token or auth), a setting request with nothing to set.
    r = await get(daemon.web, "/webim/im.php", webim_action="setting", token=a.token)
    assert parse(r) == {"play_sound": False}
    assert await a.call("notifications") == []
    # The client asks for notifications on every page load, logged in or not.
    assert parse(await get(daemon.web, "/webim/notifications", callback="cb")) == []
    # Buddies carry the host site's user id too, which the client's chat links look up.
    (info,) = await a.call("buddies", ids=str(b.uid))
    assert info["id"] == info["uid"] == str(b.uid)


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
    # leave / join (block / unblock in the client): presences to the other members
    assert await b.call("leave", id=gid) == "ok"
    (p,) = await a.poll_until("presences", lambda p: p["type"] == "leave")
    assert p["from"] == str(b.uid) and p["status"] == gid
    joined = await b.call("join", id=gid)
    assert joined["id"] == gid and joined["all_count"] == 3
    (p,) = await a.poll_until("presences", lambda p: p["type"] == "join")
    assert p["from"] == str(b.uid) and p["status"] == gid
    # a closed group cannot be joined by an outsider; a public one can
    outsider = await tab(daemon)
    assert (await outsider.call("join", id=gid))["success"] is False
    assert (await outsider.call("leave", id=gid))["success"] is False
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


EVIL = "<img src=x onerror=alert(1)>\"&'"
EVIL_HTML = "&lt;img src=x onerror=alert(1)&gt;&quot;&amp;&#x27;"


@pytest_twisted.ensureDeferred
async def test_names_are_html_escaped_as_the_host_data_was(daemon):
    """The shipped client puts names and status texts into its HTML as they come."""
    store = await daemon.store()
    evil_id, evil_token = await daemon.user(unique("evil"), name=EVIL)
    evil = Webim(daemon, evil_id, evil_token)
    reader = await tab(daemon)
    await store.befriend(evil.uid, reader.uid, EVIL, EVIL)
    gid = await make_group(daemon, evil.uid, evil_token, [reader.uid])
    await store.edit_group(int(gid), name=EVIL)
    own = await evil.online()
    assert own["user"]["nick"] == EVIL_HTML
    assert own["buddies"][0]["nick"] == EVIL_HTML
    (room,) = own["rooms"]
    assert room["name"] == room["nick"] == EVIL_HTML
    assert {m["nick"] for m in room["members"]} >= {EVIL_HTML}
    body = "<b>bold</b> & \"quoted\""
    assert await evil.call("presence", show="away", status=EVIL) == "ok"
    (p,) = await reader.poll_until("presences", lambda p: p["type"] == "show")
    assert p["nick"] == p["status"] == EVIL_HTML
    assert await evil.call("status", to=str(reader.uid), show="typing") == "ok"
    (s,) = await reader.poll_until("statuses", lambda s: True)
    assert s["nick"] == EVIL_HTML
    assert await evil.call("message", to=str(reader.uid), body=body) == "ok"
    (m,) = await reader.poll_until("messages", lambda m: m["from"] == str(evil.uid))
    assert m["nick"] == EVIL_HTML and m["body"] == body  # the client escapes bodies itself
    (h,) = await reader.call("history", id=str(evil.uid), type="unicast")
    assert h["nick"] == EVIL_HTML and h["body"] == body
    (b,) = await reader.call("buddies", ids=str(evil.uid))
    assert b["nick"] == EVIL_HTML and b["status"] == EVIL_HTML
    assert {m["nick"] for m in await reader.call("members", id=gid)} >= {EVIL_HTML}
    assert (await reader.call("rooms", ids=gid))[0]["name"] == EVIL_HTML
    again = await reader.online(buddy_ids=str(evil.uid))
    (b,) = [x for x in again["buddies"] if x["id"] == str(evil.uid)]
    assert b["nick"] == EVIL_HTML and b["history"][0]["body"] == body
    # the raw text appears nowhere in what the client gets
    r = await get(daemon.web, "/webim/online", token=reader.token, callback="cb")
    assert b"<img" not in r.body


@pytest_twisted.ensureDeferred
async def test_online_history_leaves_out_what_new_messages_carry(daemon):
    """The client appends new_messages to the history online gave: each message once."""
    a = await tab(daemon)
    b = await tab(daemon)
    await befriend(daemon, a, b)
    assert await a.call("message", to=str(b.uid), body="seen before") == "ok"
    await b.poll_until("messages", lambda m: m["body"] == "seen before")
    assert await b.call("offline") == "ok"
    assert await a.call("message", to=str(b.uid), body="while offline") == "ok"
    reply = await b.online(buddy_ids=str(a.uid))
    assert [m["body"] for m in reply["new_messages"]] == ["while offline"]
    (buddy,) = [x for x in reply["buddies"] if x["id"] == str(a.uid)]
    assert [h["body"] for h in buddy["history"]] == ["seen before"]
    # a reload gap: the old tab's unseen messages move to the new one, once
    assert await b.call("refresh") == "ok"
    assert await a.call("message", to=str(b.uid), body="during reload") == "ok"
    reply = await b.online(buddy_ids=str(a.uid))
    assert [m["body"] for m in reply["new_messages"]] == ["during reload"]
    (buddy,) = [x for x in reply["buddies"] if x["id"] == str(a.uid)]
    assert [h["body"] for h in buddy["history"]] == ["seen before", "while offline"]
    # delivered now: the next online has it in the history only
    reply = await b.online(buddy_ids=str(a.uid))
    assert reply["new_messages"] == []
    (buddy,) = [x for x in reply["buddies"] if x["id"] == str(a.uid)]
    assert [h["body"] for h in buddy["history"]] == [
        "seen before", "while offline", "during reload"]


@pytest_twisted.ensureDeferred
async def test_blocking_a_room_is_not_leaving_it(daemon):
    """The client calls leave when its user blocks a room and join when they unblock."""
    boss_id, boss_token, boss = await logged_in(daemon)
    a = await tab(daemon)
    b = await tab(daemon)
    b2 = await another_tab(b)
    gid = await make_group(daemon, boss_id, boss_token, [a.uid, b.uid])
    assert await b.call("leave", id=gid) == "ok"  # block
    assert await a.call("message", type="multicast", to=gid, body="while blocked") == "ok"
    assert await a.call("message", to=str(b.uid), body="marker") == "ok"
    for t in (b, b2):  # no tab of b gets the room's messages
        seen = []
        for _ in range(5):
            packets = await t.poll()
            seen += [m["body"] for m in packets["messages"]]
            if "marker" in seen:
                break
        assert seen == ["marker"], seen
    boss.send(f"text_{gid}_boss while blocked_group_x")
    assert (await boss.next()).startswith(f"text_{a.uid}_while blocked")
    # stored once a member who did not block the room is given it
    await a.poll_until("messages", lambda p: p["body"] == "boss while blocked")
    # membership and history stay
    assert str(b.uid) in {m["id"] for m in await b.call("members", id=gid)}
    assert [i["body"] for i in await b.call("history", id=gid, type="multicast")] == [
        "while blocked", "boss while blocked"]
    # a new page of b: the room is listed as blocked, its messages are not news
    reply = await another_tab(b)
    (room,) = reply.online_reply["rooms"]
    assert room["id"] == gid and room["blocked"] is True
    assert reply.online_reply["new_messages"] == []
    # unblock: join answers the roomInfo the client expects, and delivery resumes
    joined = await b.call("join", id=gid)
    assert joined["id"] == gid and joined["all_count"] == 3
    assert {"nick", "name", "pic_url", "count", "members"} <= set(joined)
    assert "blocked" not in joined  # the client keeps its own flag (it joins to peek too)
    assert await a.call("message", type="multicast", to=gid, body="after unblock") == "ok"
    for t in (b, b2):
        await t.poll_until("messages", lambda m: m["body"] == "after unblock")
    assert (await another_tab(b)).online_reply["rooms"][0]["blocked"] is False
    # the client's own setting lists the blocked rooms too, as the original's online read it
    assert await b.call("setting", data=json.dumps({"blocked_rooms": [gid]})) == "ok"
    b3 = await another_tab(b)
    assert b3.online_reply["rooms"][0]["blocked"] is True
    assert await a.call("message", type="multicast", to=gid, body="blocked by setting") == "ok"
    assert await a.call("message", to=str(b.uid), body="marker 2") == "ok"
    (m,) = await b3.poll_until("messages", lambda m: True)
    assert m["body"] == "marker 2"
    boss.close()


@pytest_twisted.ensureDeferred
async def test_the_ticket_authenticates_the_tabs_later_actions(daemon):
    """Only online needs the host token (or the cookie); the tab's ticket does the rest."""
    a = await tab(daemon)
    b = await tab(daemon)
    await befriend(daemon, a, b)

    async def ticket_only(action, **params):
        return parse(await post_form(daemon.web, f"/webim/{action}", ticket=a.ticket,
                                     **params))

    assert await ticket_only("message", to=str(b.uid), body="by ticket") == "ok"
    (m,) = await b.poll_until("messages", lambda m: m["body"] == "by ticket")
    assert m["from"] == str(a.uid)
    assert await ticket_only("presence", show="away", status="out") == "ok"
    assert await ticket_only("status", to=str(b.uid), show="typing") == "ok"
    assert [h["body"] for h in await ticket_only("history", id=str(b.uid))] == ["by ticket"]
    assert await ticket_only("setting", data='{"play_sound": false}') == "ok"
    assert await ticket_only("clear_history", ids=str(b.uid)) == "ok"
    assert await ticket_only("history", id=str(b.uid)) == []
    # over JSONP GET too, as the client sends it from a host page of another origin
    r = await get(daemon.web, "/webim/im.php", webim_action="buddies", ids=str(b.uid),
                  ticket=a.ticket, callback="cb")
    assert parse(r)[0]["id"] == str(b.uid)
    # online itself needs a credential; a wrong or stopped ticket is nothing
    assert (await ticket_only("online"))["success"] is False
    for bad in ("x" * 32, b.ticket[:-2] + "zz"):
        assert parse(await post_form(daemon.web, "/webim/message", ticket=bad,
                                     to=str(b.uid), body="x"))["success"] is False
    assert await ticket_only("offline") == "ok"
    assert (await ticket_only("history", id=str(b.uid)))["success"] is False


@pytest_twisted.ensureDeferred
async def test_the_cookie_alone_does_not_change_state_cross_site(daemon):
    """CSRF: with nothing but the SameSite=Lax cookie (a link on another site, a form of a
    sibling subdomain), state changes need the tab's ticket or a POST from this origin."""
    uid, cookie = await cookie_login(daemon)
    other = await tab(daemon)
    store = await daemon.store()
    assert (await browser_call(daemon, "setting", cookie, data='{"a": 1}')) == "ok"
    for action, params in [("setting", {"data": '{"a": 2}'}), ("online", {"show": "dnd"}),
                           ("clear_history", {"ids": str(other.uid)}),
                           ("presence", {"show": "dnd"})]:
        for how in ({"method": "GET"}, {"origin": "http://evil.example"}, {"origin": None}):
            reply = await browser_call(daemon, action, cookie, **how, **params)
            assert reply["success"] is False, (action, how, reply)
    assert (await store.user_fields(uid, "webim_setting"))["webim_setting"] == '{"a": 1}'
    assert (await store.user_fields(uid, "show"))["show"] != "dnd"
    # reads work with the cookie alone, but JSONP only for a page of this origin
    assert await browser_call(daemon, "notifications", cookie, method="GET") == []
    url = f"http://127.0.0.1:{daemon.web}/webim/notifications?callback=cb"
    for site, ok in (("same-origin", True), ("same-site", False), ("cross-site", False)):
        r = await http("GET", url, headers={"Cookie": cookie, "Sec-Fetch-Site": site})
        assert (parse(r) == []) is ok, (site, r.body)
    # the page of this origin: POST with its Origin, then the ticket
    reply = await browser_call(daemon, "online", cookie, show="dnd")
    assert reply["success"] is True and reply["user"]["show"] == "dnd"
    ticket = reply["connection"]["ticket"]
    assert await browser_call(daemon, "message", cookie, method="GET", ticket=ticket,
                              to=str(other.uid), body="hi") == "ok"
    assert await browser_call(daemon, "clear_history", cookie, origin=None, ticket=ticket,
                              ids=str(other.uid)) == "ok"
    # a ticket does not work with another user's credential
    reply = await browser_call(daemon, "message", cookie, ticket=other.ticket,
                               to=str(uid), body="x")
    assert reply["success"] is False


@pytest_twisted.ensureDeferred
async def test_logout_revokes_the_cookie_token(daemon):
    uid, cookie = await cookie_login(daemon)
    reply = await browser_call(daemon, "online", cookie)
    ticket = reply["connection"]["ticket"]
    assert (await browser_call(daemon, "logout", cookie, method="GET"))["success"] is False
    r = await http("POST", f"http://127.0.0.1:{daemon.web}/webim/logout",
                   urlencode({"ticket": ticket}).encode(),
                   {"Cookie": cookie, "Origin": f"http://127.0.0.1:{daemon.web}",
                    "Content-Type": "application/x-www-form-urlencoded"})
    assert parse(r) == "ok" and "Max-Age=0" in r.header("set-cookie")
    # the old cookie value (kept by an attacker or a stale tab) no longer works
    assert (await browser_call(daemon, "online", cookie))["success"] is False
    assert (await browser_call(daemon, "buddies", cookie, method="GET", ids="1"))[
        "success"] is False
    assert (await browser_call(daemon, "history", cookie, ticket=ticket, id="1"))[
        "success"] is False


@pytest_twisted.ensureDeferred
async def test_a_poll_answer_that_cannot_be_made_keeps_its_packets(daemon):
    """The store fails while a poll's answer is being made: the poll is answered, and the
    packets taken for it come with the next poll."""
    a = await tab(daemon)
    b = await tab(daemon)
    assert await a.call("message", to=str(b.uid), body="kept") == "ok"
    store = await daemon.store()
    key = f"imd:u:{a.uid}"
    saved = await store.redis.hgetall(key)
    await store.redis.delete(key)
    await store.redis.rpush(key, "not a hash")  # every read of a's name now fails
    try:
        started = time.monotonic()
        packets = await b.poll_deferred().addTimeout(5, reactor)  # it used to hang
        assert time.monotonic() - started < 1.5
        assert packets == {"status": "ok", "messages": [], "presences": [], "statuses": []}
    finally:
        await store.redis.delete(key)
        await store.redis.hmset(key, saved)
    (m,) = await b.poll_until("messages", lambda m: m["body"] == "kept")
    assert m["nick"] == saved["name"]


@pytest_twisted.ensureDeferred
async def test_a_ticket_vouches_only_for_the_credential_it_was_opened_with(daemon):
    """The ticket spares the token lookup for the credential that opened it, and only for
    that one: another credential beside it is checked (and a wrong one refused), and a
    token revoked by logout is refused again beside the other tabs it opened."""
    a = await tab(daemon)
    b = await tab(daemon)
    a2 = await another_tab(a)  # the same token opened a second tab
    _, other_token = await daemon.user(unique("w"))
    assert await a.call("message", to=str(b.uid), body="with its token") == "ok"
    for token in (other_token, "f" * 32, a.token + "x"):
        reply = await a.call("message", token=token, to=str(b.uid), body="wrong")
        assert reply["success"] is False, token
    # a second good token of the same user is looked up, and does
    store = await daemon.store()
    fresh = await store.issue_token(a.uid, 60)
    assert await a.call("message", token=fresh, to=str(b.uid), body="other token") == "ok"
    assert await a.call("logout") == "ok"
    reply = await a2.call("message", to=str(b.uid), body="revoked token")
    assert reply["success"] is False
    assert await a2.call("message", token="", to=str(b.uid), body="ticket alone") == "ok"
    bodies = []
    for _ in range(5):
        bodies += [m["body"] for m in (await b.poll())["messages"]]
        if "ticket alone" in bodies:
            break
    assert bodies == ["with its token", "other token", "ticket alone"]


HOST_PAGE = "http://host.example:8080"  # the host site's page, another origin than imd's


async def as_host_page(daemon, action: str, cookie: str | None = None,
                       page: str | None = HOST_PAGE + "/space.php?do=home",
                       dest: str | None = "script", **params):
    """What webim.uchome.js on a host page of another origin sends: a JSONP GET (a script
    element), with no ticket for the actions below; the browser adds imd's cookies, the
    ``Referer`` (the page's origin, under the default referrer policy) and Fetch Metadata."""
    headers = {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"}
    if cookie:
        headers["Cookie"] = cookie
    if page:
        headers["Referer"] = page
    if dest:
        headers["Sec-Fetch-Dest"] = dest
    query = urlencode({"webim_action": action, **params, "callback": "jsonp1"})
    return await http("GET", f"http://127.0.0.1:{daemon.web}/webim/im.php?{query}",
                      headers=headers)


@pytest_twisted.ensureDeferred
async def test_the_host_pages_key_covers_what_the_client_sends_without_a_ticket(
        fresh_daemon):
    """webim.uchome.js sends no ticket with history, clear_history, download_history,
    setting, buddies, notifications: online (the one URL the host adds its credential to)
    sets a page key, good for that user from that page's origin while a tab it opened
    lives, and only for requests the client itself makes (script, XHR, the download
    iframe), never for an image or a link."""
    daemon = fresh_daemon("--webim-secret", "s3cret", "--webim-page-ttl", "2").start()
    a, b = await tab(daemon), await tab(daemon)
    await befriend(daemon, a, b)
    assert await b.call("message", to=str(a.uid), body="before") == "ok"
    store = await daemon.store()

    r = await as_host_page(daemon, "online", token=a.token)
    online = parse(r)
    assert online["success"] is True
    set_cookie = r.header("set-cookie")
    assert set_cookie.startswith("imd_webim_page=") and "HttpOnly" in set_cookie
    assert "SameSite=Lax" in set_cookie and "Secure" not in set_cookie  # http: same site
    key = set_cookie.split(";")[0]

    history = parse(await as_host_page(daemon, "history", key, id=str(b.uid)))
    assert [h["body"] for h in history] == ["before"]
    assert parse(await as_host_page(daemon, "buddies", key, ids=str(b.uid)))[0]["id"] == \
        str(b.uid)
    assert parse(await as_host_page(daemon, "notifications", key)) == []
    assert parse(await as_host_page(daemon, "setting", key, data='{"play_sound":false}')) \
        == "ok"
    assert (await store.user_fields(a.uid, "webim_setting"))["webim_setting"] == \
        '{"play_sound":false}'
    download = await as_host_page(daemon, "download_history", key, dest="iframe",
                                  id=str(b.uid), type="unicast")
    assert download.status == 200 and b"before" in download.body
    # XHR from the host page (Origin, Sec-Fetch-Dest: empty) too
    xhr = await http("POST", f"http://127.0.0.1:{daemon.web}/webim/history",
                     urlencode({"id": str(b.uid)}).encode(),
                     {"Cookie": key, "Origin": HOST_PAGE, "Sec-Fetch-Dest": "empty",
                      "Content-Type": "application/x-www-form-urlencoded"})
    assert [h["body"] for h in parse(xhr)] == ["before"]

    # Not for another page, a page that hides its referrer, an image or a link, a browser
    # without Fetch Metadata, nor for another user's ticket actions.
    for how in ({"page": "http://evil.example/x.html"}, {"page": "http://host.example/"},
                {"page": None}, {"dest": "image"}, {"dest": "document"}, {"dest": None},
                {"dest": "iframe"}):
        reply = parse(await as_host_page(daemon, "clear_history", key, **how,
                                         ids=str(b.uid)))
        assert reply == {"success": False, "error_msg": "Not Authorized"}, how
        reply = parse(await as_host_page(daemon, "history", key, **how, id=str(b.uid)))
        assert reply == {"success": False, "error_msg": "Not Authorized"}, how
    assert parse(await as_host_page(daemon, "online", key, page="http://evil.example/"))[
        "success"] is False
    assert parse(await as_host_page(daemon, "message", key, to=str(b.uid), body="x"))[
        "success"] is False  # the ticket's actions need the ticket
    assert parse(await as_host_page(daemon, "history", "imd_webim_page=" + "A" * 32,
                                    id=str(b.uid)))["success"] is False
    assert parse(await as_host_page(daemon, "clear_history", key, ids=str(b.uid))) == "ok"
    assert parse(await as_host_page(daemon, "history", key, id=str(b.uid))) == []

    # A second tab of the page keeps the key; it outlives its tabs (--webim-page-ttl).
    r = await as_host_page(daemon, "online", key, token=a.token)
    assert parse(r)["success"] is True and r.header("set-cookie") is None
    second = parse(r)["connection"]["ticket"]
    for ticket in (online["connection"]["ticket"], second):
        assert parse(await as_host_page(daemon, "offline", key, ticket=ticket)) == "ok"
    assert parse(await as_host_page(daemon, "setting", key)) == {"play_sound": False}

    # online again from the same page, with the URL the client was given: the key stands
    # in for an auth that has expired since, for its own user only.
    expired = sign("s3cret", a.uid, int(time.time()) - 60)
    again = parse(await as_host_page(daemon, "online", key, auth=expired))
    assert again["success"] is True and again["user"]["id"] == str(a.uid)
    for auth in (sign("s3cret", b.uid, int(time.time()) - 60), None):
        refused = parse(await as_host_page(daemon, "online", auth=auth or expired))
        assert refused["success"] is False  # another user's; no key
    assert parse(await as_host_page(daemon, "online", key,
                                    auth=sign("s3cret", b.uid, int(time.time()) - 60)))[
        "success"] is False
    # logout ends the user's page keys
    assert parse(await as_host_page(daemon, "logout", key, ticket=again["connection"][
        "ticket"], token=a.token)) == "ok"
    assert parse(await as_host_page(daemon, "history", key, id=str(b.uid)))[
        "success"] is False
    a.token = await store.issue_token(a.uid, 600)

    # The key of one user is never another's: b's online in the same browser gets a new one.
    r = await as_host_page(daemon, "online", token=a.token)
    key = r.header("set-cookie").split(";")[0]
    r = await as_host_page(daemon, "online", key, token=b.token)
    other = r.header("set-cookie").split(";")[0]
    assert other != key
    assert parse(await as_host_page(daemon, "setting", other, data='{"b":1}')) == "ok"
    assert (await store.user_fields(b.uid, "webim_setting"))["webim_setting"] == '{"b":1}'
    # and a key from another page origin is not reused either
    r = await as_host_page(daemon, "online", key, page="http://other.example/", token=a.token)
    assert r.header("set-cookie").split(";")[0] != key

    # A key ends --webim-page-ttl after its last tab.
    assert parse(await as_host_page(daemon, "offline", other,
                                    ticket=parse(r)["connection"]["ticket"])) == "ok"
    r = await as_host_page(daemon, "online", token=a.token)
    key = r.header("set-cookie").split(";")[0]
    assert parse(await as_host_page(daemon, "offline", key,
                                    ticket=parse(r)["connection"]["ticket"])) == "ok"
    assert parse(await as_host_page(daemon, "setting", key)) == {"play_sound": False}
    await task.deferLater(reactor, 2.5, lambda: None)
    assert parse(await as_host_page(daemon, "setting", key)) == {
        "success": False, "error_msg": "Not Authorized"}
    await daemon.close_store()


@pytest_twisted.ensureDeferred
async def test_the_clients_own_login_form(daemon):
    """With is_login off the client shows its own form and sends online with username and
    password (the original checked them against the host site's accounts)."""
    account = unique("form")
    uid, _ = await daemon.user(account, password="pw", name="Form")
    reply = parse(await as_host_page(daemon, "online", username=account, password="pw",
                                     question="", answer="", show="available"))
    assert reply["success"] is True and reply["user"]["id"] == str(uid)
    ticket = reply["connection"]["ticket"]
    assert parse(await as_host_page(daemon, "presence", ticket=ticket, show="away")) == "ok"
    for wrong in ({"username": account, "password": "nope"},
                  {"username": "nobody-" + account, "password": "pw"},
                  {"username": "", "password": ""}):
        assert parse(await as_host_page(daemon, "online", **wrong)) == {
            "success": False, "error_msg": "Not Authorized"}, wrong


@pytest_twisted.ensureDeferred
async def test_the_shipped_clients_own_files_are_served_from_webim_static(fresh_daemon,
                                                                          tmp_path):
    """The plugin's glue loads the client's script, themes, emoticons and sounds from
    _IMC.path + "static/...", i.e. from imd: --webim-static serves that folder."""
    folder = tmp_path / "client" / "static"
    (folder / "images" / "emot" / "default").mkdir(parents=True)
    (folder / "images" / "emot" / "default" / "smile.png").write_bytes(b"\x89PNG smile")
    (folder / "webim.uchome.min.js").write_text("var webim = {};")
    (tmp_path / "secret.txt").write_text("not served")
    d = fresh_daemon("--webim-static", str(folder)).start()
    r = await get(d.web, "/webim/static/images/emot/default/smile.png")
    assert r.status == 200 and r.body == b"\x89PNG smile"
    assert r.header("content-type") == "image/png"
    assert r.header("x-content-type-options") == "nosniff"
    r = await get(d.web, "/webim/static/webim.uchome.min.js")
    assert r.status == 200 and "javascript" in r.header("content-type")
    assert (await get(d.web, "/webim/static/images/")).status == 403  # no listings
    for path in ("/webim/static/../secret.txt", "/webim/static/%2e%2e/secret.txt",
                 "/webim/static/nosuch.png"):
        r = await http("GET", f"http://127.0.0.1:{d.web}{path}")
        assert r.status == 404 and b"not served" not in r.body, path
    # without the option there is nothing there
    plain = fresh_daemon().start()
    assert (await get(plain.web, "/webim/static/webim.uchome.min.js")).status == 404
    # a folder that is not there stops the start with one line
    from tests.test_daemon import TWISTD, run
    result = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(tmp_path / "data"),
                  "--webim-static", str(tmp_path / "client" / "nostatic"), "--web", "tcp:0",
                  "--boss-line", "none", "--xuanxuan", "none", "--admin", "none"])
    assert result.returncode == 1 and "--webim-static" in result.stderr + result.stdout


def test_ticket_timers_count_from_the_latest_poll():
    """The ticket's timers are armed once and re-armed lazily (no callLater per poll): a
    poll held just after another one is still held its whole ``poll_timeout``, and a ticket
    expires ``ticket_timeout`` after its last answer, not after its first."""
    from twisted.internet.task import Clock

    from imd.model import TEXT, UNICAST, Message
    from imd.protocols.webim.tickets import Ticket, Tickets

    clock = Clock()
    tickets = Tickets(hub=None, clock=clock, poll_timeout=28, ticket_timeout=8,
                      offline_grace=8)
    ticket = Ticket(tickets, 1)
    tickets.by_id[ticket.id] = ticket
    tickets.bound_count[1] = 1
    ticket._start_expiry()
    answers: list[bool] = []
    clock.advance(5)
    ticket.hold(answers.append)  # first poll at t=5
    clock.advance(20)
    ticket.deliver(Message(2, 1, UNICAST, TEXT, "hi", id=1))
    clock.advance(0)
    assert answers == [False] and ticket.take()[0]  # answered by the message at t=25
    clock.advance(1)
    ticket.hold(answers.append)  # second poll at t=26: held until t=54
    clock.advance(27.9)
    assert answers == [False]
    clock.advance(0.2)
    assert answers == [False, False]  # the poll timeout at t=54
    clock.advance(7.9)
    assert ticket.bound  # no poll since t=54: bound until t=62
    clock.advance(0.2)
    assert not ticket.bound
