"""xuanxuan 1.0 over a real TCP socket and real HTTP: framing, login order, chats, messages,
history, permissions, files, and other protocols."""

from __future__ import annotations

import hashlib
import json

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from tests.conftest import CLEAN_EXIT, unique
from tests.test_boss import logged_in, make_group
from tests.wire import CLOSED, get, http, line_connect, post_file


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class XX:
    def __init__(self, client):
        self.client = client
        self.sid = ""

    def send(self, module, method, params=None):
        self.client.send(json.dumps({"module": module, "method": method, "params": params,
                                     "sid": self.sid}, ensure_ascii=False))

    async def next(self, **kw):
        line = await self.client.next(**kw)
        return line if line is CLOSED else json.loads(line)

    async def reply(self, **kw):
        """The next reply; pushes (other users' presence, on the shared daemon) are skipped."""
        while isinstance(obj := await self.next(**kw), list):
            pass
        return obj

    async def call(self, method, params=None, module="chat"):
        self.send(module, method, params)
        while True:
            reply = await self.next()
            if isinstance(reply, dict) and reply.get("method") == method:
                return reply

    async def login_pushes(self, **kw):
        """The pushes that complete a login: the user list, my chats (and the queued
        messages), up to the line with my chats."""
        pushed = []
        while not any(p["method"] == "getList" for p in pushed):
            pushed += await self.next(**kw)
        return pushed

    async def pushes_until(self, method, **kw):
        """Every pushed packet up to and including the next one with that method."""
        seen = []
        while True:
            packets = await self.next(**kw)
            if isinstance(packets, list):
                seen.extend(packets)
                if any(p["method"].lower() == method.lower() for p in packets):
                    return seen

    async def push(self, method, **kw):
        """The next pushed packet with that method (other pushes are skipped)."""
        while True:
            packets = await self.next(**kw)
            if isinstance(packets, list):
                for packet in packets:
                    if packet["method"].lower() == method.lower():
                        return packet["data"]


async def about(x: XX, method: str, uid: int, wait: float = 5.0) -> dict:
    """The next push ``method`` about user ``uid`` (pushes about others are skipped: a
    presence line holds the changes of a window, some of them from before this login)."""
    while True:
        packets = await x.next(timeout=wait)
        assert packets is not CLOSED
        if isinstance(packets, list):
            for packet in packets:
                if packet["method"] == method and packet["data"].get("id") == uid:
                    return packet["data"]


async def connect(daemon) -> XX:
    return XX(await line_connect(daemon.xuanxuan))


async def login(daemon, account=None, name=None):
    """A new user logged in: (id, XX, the login reply, the pushed array)."""
    account = account or unique("xx")
    uid, _ = await daemon.user(account, password="pw", name=name or account)
    x = await connect(daemon)
    x.send("chat", "login", [account, md5("pw"), "online"])
    reply = await x.next()
    assert reply["result"] == "success", reply
    x.sid = reply["sid"]
    pushed = await x.login_pushes()
    return uid, x, reply, pushed


@pytest_twisted.ensureDeferred
async def test_getconfig(daemon):
    for path in ("/index.php", "/sys/index.php"):
        config = (await get(daemon.web, path, mode="getconfig")).json()
        assert config["ip"] == "127.0.0.1" and config["port"] == daemon.xuanxuan
        assert config["sessionName"] == "rid" and config["name"] == "ranzhi"
        assert isinstance(config["serverTime"], int)


@pytest_twisted.ensureDeferred
async def test_login_order_and_announcement(daemon):
    uid_a, a, _, _ = await login(daemon)
    account = unique("xx")
    uid, _ = await daemon.user(account, password="pw", name="Zhang San")
    x = await connect(daemon)
    x.send("chat", "login", [account, md5("wrong"), "online"])
    bad = await x.next()
    assert bad["result"] == "fail" and bad["method"] == "login"
    x.send("chat", "login", [account, md5("pw"), "busy"])
    reply = await x.next()
    assert reply["module"] == "chat" and reply["method"] == "login"
    assert reply["result"] == "success" and reply["sid"]
    data = reply["data"]
    assert data["id"] == uid and isinstance(data["id"], int) and data["account"] == account
    assert data["realname"] == "Zhang San" and data["status"] == "busy"
    assert isinstance(data["dept"], int)
    pushed = await x.login_pushes()
    assert isinstance(pushed, list)
    assert [p["method"] for p in pushed[:2]] == ["userGetlist", "getList"]
    users = {u["id"]: u for u in pushed[0]["data"]}
    assert users[uid]["status"] == "busy" and users[uid_a]["status"] == "online"
    # An entry leaves out the fields that are empty or default (the 1.0 client reads a
    # missing one as empty): role, dept, mobile, site, phone are never set here.
    assert users[uid] == {"id": uid, "account": account, "realname": "Zhang San",
                          "status": "busy"}
    system = [c for c in pushed[1]["data"] if c["gid"] == "system"]
    assert system and system[0]["type"] == "system" and uid in system[0]["members"]
    assert (await about(a, "login", uid))["id"] == uid


@pytest_twisted.ensureDeferred
async def test_the_user_list_shows_logins_the_presence_window_still_holds(daemon):
    """The node's copy of the list takes presence changes once per window, and the 1.0
    client takes a login push that comes during its own login for its own: so a user who
    logs in again is online in their own list, and a user who logged in just before is
    online in it, both before the window has gone out."""
    accounts = {name: unique("xw") for name in ("known", "back", "first")}
    ids = {name: (await daemon.user(account, password="pw"))[0]
           for name, account in accounts.items()}
    await login(daemon)  # a new user: the node reads the list again, with the three above
    await deferLater(reactor, 0.7, lambda: None)  # that window has gone out

    async def log_in(name: str, status: str) -> dict:
        x = await connect(daemon)
        x.send("chat", "login", [accounts[name], md5("pw"), status])
        assert (await x.next())["result"] == "success"
        pushed = await x.login_pushes()
        assert pushed[0]["method"] == "userGetlist"
        return {u["id"]: u["status"] for u in pushed[0]["data"]}

    listed = await log_in("first", "busy")
    assert listed[ids["first"]] == "busy" and listed[ids["back"]] == "offline"
    listed = await log_in("back", "away")  # within the window of first's login
    assert listed[ids["back"]] == "away" and listed[ids["first"]] == "busy"
    assert listed[ids["known"]] == "offline"


@pytest_twisted.ensureDeferred
async def test_framing(daemon):
    uid, x, _, _ = await login(daemon)
    req = json.dumps({"module": "chat", "method": "ping", "sid": x.sid})
    x.client.send_raw((req + "\n" + req + "\n").encode())  # two in one write
    assert (await x.reply())["result"] == "success"
    assert (await x.reply())["result"] == "success"
    raw = (json.dumps({"module": "chat", "method": "members", "params": ["system"]}) + "\n")
    x.client.send_raw(raw[:10].encode())  # one request split across writes
    x.client.send_raw(raw[10:].encode())
    members = await x.reply()
    assert members["result"] == "success" and uid in members["data"]["members"]
    for garbage in [b"not json\n", b"[1,2,3]\n", b"\"string\"\n", b"\xff\xfe\n"]:
        x.client.send_raw(garbage)
        reply = await x.reply()
        assert reply["result"] == "fail", garbage
    x.send("chat", "nosuchmethod")
    assert (await x.reply())["result"] == "fail"
    x.send("nosuchmodule", "ping2")
    assert (await x.reply())["result"] == "fail"
    x.send("chat", "USERGETLIST")  # case-insensitive, answered as sent
    reply = await x.reply()
    assert reply["method"] == "USERGETLIST" and reply["result"] == "success"
    x.send("chat", "create", "not params")
    assert (await x.reply())["result"] == "fail"
    # still alive and logged in
    assert (await x.call("ping"))["result"] == "success"
    x.client.send_raw(b"x" * 5000)  # over --max-frame
    assert (await x.reply())["result"] == "fail"
    assert await x.reply() is CLOSED


@pytest_twisted.ensureDeferred
async def test_requests_before_login_fail(daemon):
    x = await connect(daemon)
    x.send("chat", "getList")
    reply = await x.next()
    assert reply["result"] == "fail" and reply["method"] == "getList"
    x.send("chat", "ping")
    assert (await x.next())["result"] == "success"


@pytest_twisted.ensureDeferred
async def test_one2one_chat_message_history_and_offline(daemon):
    uid_a, a, _, _ = await login(daemon)
    account_b = unique("xx")
    uid_b, _ = await daemon.user(account_b, password="pw")
    gid = "&".join(map(str, sorted((uid_a, uid_b))))
    created = await a.call("create", [gid, "", "one2one", [uid_a, uid_b], 0])
    assert created["result"] == "success" and created["data"]["gid"] == gid
    assert created["data"]["type"] == "one2one" and created["data"]["members"] == sorted(
        [uid_a, uid_b])
    again = await a.call("create", [gid, "", "one2one", [uid_a, uid_b], 0])
    assert again["data"]["id"] == created["data"]["id"]  # existing chat returned
    for i in range(3):
        sent = await a.call("message", {"messages": [
            {"gid": f"m-{i}", "cgid": gid, "type": "normal", "contentType": "text",
             "content": f"hello {i}"}]})
        assert sent["result"] == "success"
        (m,) = sent["data"]
        assert m["gid"] == f"m-{i}" and m["cgid"] == gid and m["user"] == uid_a
        assert isinstance(m["id"], int) and isinstance(m["date"], int)
    # b was offline: the messages come in the login pushes, in order
    b = await connect(daemon)
    b.send("chat", "login", [account_b, md5("pw"), "online"])
    assert (await b.next())["result"] == "success"
    pushed = await b.login_pushes()
    messages = [p for p in pushed if p["method"] == "message"][0]["data"]
    assert [m["content"] for m in messages] == ["hello 0", "hello 1", "hello 2"]
    assert any(c["gid"] == gid for c in [p for p in pushed if p["method"] == "getList"][0][
        "data"])
    # live
    await a.call("message", [{"gid": "live", "cgid": gid, "contentType": "text",
                              "content": "live one"}])
    (m,) = await b.push("message")
    assert m["content"] == "live one" and m["user"] == uid_a
    history = await b.call("history", [gid, 2, 1, 0, False])
    assert [m["content"] for m in history["data"]] == ["hello 2", "live one"]
    assert history["pager"] == {"recPerPage": 2, "pageID": 1, "recTotal": 4, "gid": gid,
                                "continued": False}
    page2 = await b.call("history", [gid, 2, 2, 4, True])
    assert [m["content"] for m in page2["data"]] == ["hello 0", "hello 1"]
    assert (await b.call("members", [gid]))["data"]["members"] == sorted([uid_a, uid_b])
    uid_c, c, _, _ = await login(daemon)
    assert (await c.call("history", [gid, 10, 1]))["result"] == "fail"
    assert (await c.call("members", [gid]))["result"] == "fail"
    assert (await c.call("message", [{"cgid": gid, "content": "intruder"}]))["result"] == \
        "fail"
    for bad_gid in (f"{uid_a}&{uid_c}&{uid_b}", f"0{uid_a}&{uid_b}", f"{uid_a}&²"):
        assert (await a.call("create", [bad_gid, "", "one2one", [], 0]))["result"] == "fail"


@pytest_twisted.ensureDeferred
async def test_group_chat_permissions(daemon):
    uid_a, a, _, _ = await login(daemon)
    uid_b, b, _, _ = await login(daemon)
    uid_c, c, _, _ = await login(daemon)
    created = await a.call("create", ["g-" + unique(), "team", "group", [uid_a, uid_b], 0])
    chat = created["data"]
    gid = chat["gid"]
    assert chat["type"] == "group" and chat["members"] == sorted([uid_a, uid_b])
    assert chat["public"] == 0 and isinstance(chat["id"], int)
    assert (await b.push("create"))["gid"] == gid
    assert (await c.call("joinchat", [gid, True]))["result"] == "fail"  # not public
    # "create" with someone else's gid must not hand out their chat
    assert (await c.call("create", [gid, "x", "group", [uid_c]]))["result"] == "fail"
    assert (await b.call("changepublic", [gid, True]))["result"] == "fail"  # not admin
    assert (await a.call("changepublic", [gid, True]))["result"] == "success"
    public = await c.call("getPublicList")
    assert gid in [x["gid"] for x in public["data"]]
    joined = await c.call("joinchat", [gid, True])
    assert joined["result"] == "success" and joined["data"]["join"] is True
    assert uid_c in joined["data"]["chat"]["members"]
    assert (await c.call("changename", [gid, "renamed"]))["data"]["name"] == "renamed"
    assert (await b.push("changename"))["name"] == "renamed"
    sent = await c.call("message", [{"gid": "x1", "cgid": gid, "contentType": "text",
                                     "content": "hi team"}])
    assert sent["result"] == "success"
    for x in (a, b):
        (m,) = await x.push("message")
        assert m["content"] == "hi team" and m["cgid"] == gid
    assert (await b.call("addmember", [gid, [uid_c], False]))["result"] == "fail"  # kick
    assert (await a.call("setCommitters", [gid, [uid_a, uid_b]]))["result"] == "success"
    whitelist = await a.call("setCommitters", {"gid": gid, "committers": [{"id": uid_a}]})
    assert whitelist["data"]["committers"] == str(uid_a)  # the list is replaced
    assert (await b.call("message", [{"cgid": gid, "content": "may I?"}]))["result"] == "fail"
    assert (await a.call("message", [{"cgid": gid, "content": "only me"}]))["result"] == \
        "success"
    assert (await a.call("setAdmin", [gid, [uid_b], True]))["result"] == "fail"
    await (await daemon.store()).set_user_fields(uid_a, admin="super")  # imdctl admin
    assert (await a.call("setAdmin", [gid, [uid_b], True]))["result"] == "success"
    kicked = await b.call("addmember", [gid, [uid_c], False])
    assert kicked["result"] == "success" and uid_c not in kicked["data"]["members"]
    assert (await c.call("history", [gid, 10, 1]))["result"] == "fail"
    assert (await a.call("joinchat", ["system", False]))["result"] == "fail"
    one2one = "&".join(map(str, sorted((uid_a, uid_b))))
    await a.call("create", [one2one, "", "one2one", [uid_a, uid_b]])
    assert (await a.call("changename", [one2one, "x"]))["result"] == "fail"
    assert (await a.call("star", [gid, True]))["data"] == {"gid": gid, "star": True}
    assert (await a.call("hide", [gid, True]))["result"] == "success"
    mine = {x["gid"]: x for x in (await a.call("getList"))["data"]}
    assert mine[gid]["star"] == 1 and mine[gid]["hide"] == 1
    assert (await b.call("getList"))["data"] and \
        {x["gid"]: x for x in (await b.call("getList"))["data"]}[gid]["star"] == 0


@pytest_twisted.ensureDeferred
async def test_system_chat_reaches_everyone(daemon):
    uid_a, a, _, _ = await login(daemon)
    uid_b, b, _, _ = await login(daemon)
    sent = await a.call("message", [{"gid": "s1", "cgid": "system", "contentType": "text",
                                     "content": "all hands"}])
    assert sent["result"] == "success"
    (m,) = await b.push("message")
    assert m["cgid"] == "system" and m["content"] == "all hands"


@pytest_twisted.ensureDeferred
async def test_repeat_login_kicks_the_older_connection(daemon):
    account = unique("xx")
    _, a, _, _ = await login(daemon, account)
    a2 = await connect(daemon)
    a2.send("chat", "login", [account, md5("pw"), "online"])
    assert (await a2.next())["result"] == "success"
    kick = await a.next()
    while isinstance(kick, list):
        kick = await a.next()
    assert kick == {"module": "chat", "method": "kickoff",
                    "message": "This account logined in another place."}
    assert await a.next() is CLOSED


@pytest_twisted.ensureDeferred
async def test_files(daemon):
    uid_a, a, login_a, _ = await login(daemon)
    uid_b, b, login_b, _ = await login(daemon)
    uid_c, c, login_c, _ = await login(daemon)
    gid = (await a.call("create", ["f-" + unique(), "files", "group", [uid_a, uid_b]]))[
        "data"]["gid"]
    data = b"%PDF-1.4 not really a pdf \x00\xff"
    r = await post_file(daemon.web, "/sys/attach-upload.json", data, filename="报告.pdf",
                        field="files[]", query=f"?rid={login_a['sid']}&gid={gid}")
    reply = r.json()
    assert reply["result"] == "success" and reply["data"][0]["title"] == "报告.pdf"
    fid = reply["data"][0]["id"]
    r2 = await post_file(daemon.web, "/index.php", b"second",
                         filename="b.txt", field="files[]",
                         query=f"?m=attach&f=upload&type=json&rid={login_b['sid']}&gid={gid}")
    assert r2.json()["result"] == "success"
    denied = await post_file(daemon.web, "/sys/attach-upload.json", b"x", filename="c.txt",
                             field="files[]", query=f"?rid={login_c['sid']}&gid={gid}")
    assert denied.json()["result"] == "fail"
    assert (await post_file(daemon.web, "/sys/attach-upload.json", b"x", field="files[]",
                            query=f"?rid=nope&gid={gid}")).json()["result"] == "fail"
    got = await http("GET", f"http://127.0.0.1:{daemon.web}/sys/attach-download-{fid}.json"
                            f"?rid={login_b['sid']}")
    assert got.status == 200 and got.body == data
    got2 = await get(daemon.web, "/sys/index.php", m="attach", f="download", fileID=str(fid),
                     type="json", rid=login_a["sid"])
    assert got2.body == data
    no = await http("GET", f"http://127.0.0.1:{daemon.web}/sys/attach-download-{fid}.json"
                           f"?rid={login_c['sid']}")
    assert no.status == 404 and data not in no.body
    files = await a.call("getList", [gid], module="attach")
    assert [f["title"] for f in files["data"]] == ["报告.pdf", "b.txt"]
    assert files["data"][0]["size"] == len(data) and files["data"][0]["addedBy"] == uid_a
    assert (await c.call("getList", [gid], module="attach"))["result"] == "fail"


@pytest_twisted.ensureDeferred
async def test_cross_protocol(daemon):
    uid_x, x, _, _ = await login(daemon)
    boss_id, boss_token, boss = await logged_in(daemon)
    # one-to-one with a 66boss user
    gid = "&".join(map(str, sorted((uid_x, boss_id))))
    await x.call("create", [gid, "", "one2one", [uid_x, boss_id]])
    await x.call("message", [{"gid": "c1", "cgid": gid, "contentType": "text",
                              "content": "hi boss"}])
    assert (await boss.next()).startswith(f"text_{uid_x}_hi boss_unicast_{uid_x}_")
    boss.send(f"text_{uid_x}_hi xuanxuan_unicast_x")
    (m,) = await x.push("message")
    assert (m["cgid"], m["content"], m["user"]) == (gid, "hi xuanxuan", boss_id)
    # a 66boss group is a xuanxuan group chat (gid = its id) and a webim room
    group = await make_group(daemon, boss_id, boss_token, [uid_x])
    chats = {c["gid"]: c for c in (await x.call("getList"))["data"]}
    assert chats[group]["type"] == "group" and chats[group]["id"] == int(group)
    await x.call("message", [{"gid": "c2", "cgid": group, "contentType": "text",
                              "content": "group hello"}])
    assert (await boss.next()).startswith(f"text_{uid_x}_group hello_group_{group}_")
    boss.send(f"picture_{group}_http://x/p-3x3.png_group_x")
    (m,) = await x.push("message")
    assert (m["cgid"], m["contentType"], m["content"]) == (group, "image",
                                                          "http://x/p-3x3.png")


@pytest_twisted.ensureDeferred
async def test_offline_messages_survive_a_restart(fresh_daemon):
    d = fresh_daemon().start()
    uid_a, a, _, _ = await login(d)
    account_b = unique("xx")
    uid_b, _ = await d.user(account_b, password="pw")
    gid = "&".join(map(str, sorted((uid_a, uid_b))))
    await a.call("create", [gid, "", "one2one", [uid_a, uid_b]])
    assert (await a.call("message", [{"cgid": gid, "content": "before restart"}]))[
        "result"] == "success"
    await d.close_store()
    assert d.stop() in CLEAN_EXIT
    d.start()
    b = await connect(d)
    b.send("chat", "login", [account_b, md5("pw"), "online"])
    assert (await b.next())["result"] == "success"
    pushed = await b.login_pushes()
    (messages,) = [p["data"] for p in pushed if p["method"] == "message"]
    assert [m["content"] for m in messages] == ["before restart"]
    await d.close_store()


@pytest_twisted.ensureDeferred
async def test_user_methods_settings_and_logout(daemon):
    uid_a, a, _, _ = await login(daemon)
    uid_b, b, _, _ = await login(daemon)
    renamed = await a.call("userChangeName", ["李四"])
    assert renamed["data"] == {"id": uid_a, "name": "李四"}
    pushed = await about(b, "userChangeName", uid_a)
    assert pushed["realname"] == "李四"
    status = await a.call("userChangeStatus", ["away"])
    assert status["data"] == {"id": uid_a, "status": "away"}
    assert (await about(b, "userChangeStatus", uid_a))["status"] == "away"
    assert (await a.call("userChangeStatus", ["sleeping"]))["result"] == "fail"
    users = {u["id"]: u for u in (await b.call("userGetlist"))["data"]}
    assert users[uid_a]["realname"] == "李四" and users[uid_a]["status"] == "away"
    assert (await a.call("settings", ["", {"theme": "dark", "sound": False}]))[
        "result"] == "success"
    assert (await a.call("settings", [""]))["data"] == {"theme": "dark", "sound": False}
    out = await a.call("logout")
    assert out["result"] == "success" and out["data"]["id"] == uid_a
    assert (await about(b, "logout", uid_a))["id"] == uid_a
    assert await a.next() is CLOSED
    users = {u["id"]: u for u in (await b.call("userGetlist"))["data"]}
    assert users[uid_a]["status"] == "offline"


def one2one(a: int, b: int) -> str:
    return "&".join(map(str, sorted((a, b))))


async def stored(daemon, conversation: str, count: int) -> None:
    """Wait until the conversation's history holds ``count`` messages."""
    store = await daemon.store()
    for _ in range(200):
        if len(await store.history(conversation, limit=0)) >= count:
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"{conversation} never got {count} messages")


def methods(packets) -> list[str]:
    return [p["method"] for p in packets]


@pytest_twisted.ensureDeferred
async def test_first_create_of_a_one2one_chat_reaches_the_other_member(daemon):
    uid_a, a, _, _ = await login(daemon)
    uid_b, b, _, _ = await login(daemon)
    gid = one2one(uid_a, uid_b)
    created = await a.call("create", [gid, "", "one2one", [uid_a, uid_b], 0])
    assert created["result"] == "success"
    await a.call("message", [{"gid": "first-1", "cgid": gid, "content": "first contact"}])
    got = await b.pushes_until("message")
    assert methods(got).index("create") < methods(got).index("message")
    chat = got[methods(got).index("create")]["data"]
    assert (chat["gid"], chat["type"], chat["members"]) == (gid, "one2one",
                                                            sorted([uid_a, uid_b]))
    assert got[-1]["data"][0]["cgid"] == gid
    # a second create of the same chat is no news
    await b.call("create", [gid, "", "one2one", [uid_a, uid_b], 0])
    await a.call("message", [{"gid": "first-2", "cgid": gid, "content": "again"}])
    assert methods(await b.pushes_until("message")) == ["message"]


@pytest_twisted.ensureDeferred
async def test_first_message_from_another_protocol_comes_after_its_chat(daemon):
    uid_x, x, _, _ = await login(daemon)
    boss_id, boss_token, boss = await logged_in(daemon)
    boss.send(f"text_{uid_x}_hello from 66boss_unicast_e1")
    got = await x.pushes_until("message")
    assert "create" in methods(got), got
    assert methods(got).index("create") < methods(got).index("message")
    chat = got[methods(got).index("create")]["data"]
    gid = one2one(uid_x, boss_id)
    assert chat["gid"] == gid and chat["members"] == sorted([uid_x, boss_id])
    (m,) = got[-1]["data"]
    assert (m["cgid"], m["content"], m["user"]) == (gid, "hello from 66boss", boss_id)
    boss.send(f"text_{uid_x}_second_unicast_e2")  # shown now: no second chat push
    assert methods(await x.pushes_until("message")) == ["message"]
    # the chat is in the next getList too
    assert gid in [c["gid"] for c in (await x.call("getList"))["data"]]
    # a 66boss group the xuanxuan user was put in: its first message brings the chat
    group = await make_group(daemon, boss_id, boss_token, [uid_x])
    boss.send(f"text_{group}_group hello_group_e3")
    got = await x.pushes_until("message")
    assert methods(got).index("create") < methods(got).index("message")
    assert got[methods(got).index("create")]["data"]["gid"] == group
    assert got[-1]["data"][0]["cgid"] == group


@pytest_twisted.ensureDeferred
async def test_first_message_from_another_protocol_while_offline(daemon):
    account = unique("xx")
    uid_x, _ = await daemon.user(account, password="pw")
    boss_id, _, boss = await logged_in(daemon)
    boss.send(f"text_{uid_x}_while you were away_unicast_e1")
    await stored(daemon, one2one(uid_x, boss_id), 1)
    x = await connect(daemon)
    x.send("chat", "login", [account, md5("pw"), "online"])
    assert (await x.next())["result"] == "success"
    pushed = await x.login_pushes()
    chats = [p for p in pushed if p["method"] == "getList"][0]["data"]
    gid = one2one(uid_x, boss_id)
    assert gid in [c["gid"] for c in chats]
    (m,) = [p for p in pushed if p["method"] == "message"][0]["data"]
    assert (m["cgid"], m["content"]) == (gid, "while you were away")


@pytest_twisted.ensureDeferred
async def test_an_empty_group_name_stays_empty(daemon):
    uid_a, a, _, _ = await login(daemon)
    uid_b, b, _, _ = await login(daemon)
    chat = (await a.call("create", ["n-" + unique(), "", "group", [uid_a, uid_b], 0]))["data"]
    assert chat["name"] == ""
    assert (await b.push("create"))["name"] == ""
    mine = {c["gid"]: c for c in (await b.call("getList"))["data"]}
    assert mine[chat["gid"]]["name"] == ""
    await a.call("changename", [chat["gid"], "named now"])
    mine = {c["gid"]: c for c in (await a.call("getList"))["data"]}
    assert mine[chat["gid"]]["name"] == "named now"


@pytest_twisted.ensureDeferred
async def test_created_by_is_the_creators_account(daemon):
    account_a = unique("xx")
    uid_a, a, _, _ = await login(daemon, account_a)
    uid_b, b, _, _ = await login(daemon)
    chat = (await a.call("create", ["c-" + unique(), "mine", "group", [uid_a, uid_b], 0]))[
        "data"]
    assert chat["createdBy"] == account_a
    assert (await b.push("create"))["createdBy"] == account_a
    mine = {c["gid"]: c for c in (await b.call("getList"))["data"]}
    assert mine[chat["gid"]]["createdBy"] == account_a
    await a.call("changename", [chat["gid"], "still mine"])  # edits: the editor's account
    mine = {c["gid"]: c for c in (await a.call("getList"))["data"]}
    assert mine[chat["gid"]]["editedBy"] == account_a
    # groups made by other protocols: their creator's account
    boss_account = unique("boss")
    boss_id, boss_token, _ = await logged_in(daemon, account=boss_account)
    group = await make_group(daemon, boss_id, boss_token, [uid_a])
    mine = {c["gid"]: c for c in (await a.call("getList"))["data"]}
    assert mine[group]["createdBy"] == boss_account
    assert mine["system"]["createdBy"] == "system"


# Every socket method the shipped 1.0 client sends (app/models/socket.js, chat/app.js).
CLIENT_METHODS = ["ping", "logout", "userGetlist", "userChangeStatus", "uploadfile", "create",
                  "setCommitters", "hide", "changePublic", "getPublicList", "history",
                  "message", "changeName", "addmember", "joinchat", "getList", "star"]


@pytest_twisted.ensureDeferred
async def test_every_client_method_is_known(daemon):
    uid, x, _, _ = await login(daemon)
    chunk = {"fileExt": ".txt", "gid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
             "filesize": 4, "filename": "a.txt", "filetype": "text/plain", "cursor": 4,
             "size": 4, "data": "dGVzdA=="}
    reply = await x.call("uploadfile", [chunk])
    assert reply["result"] == "fail" and "HTTP" in reply["message"]
    for method in CLIENT_METHODS:
        if method == "logout":
            continue
        reply = await x.call(method, [])
        assert "unknown method" not in str(reply.get("message")), (method, reply)


@pytest_twisted.ensureDeferred
async def test_message_gids_are_unique(daemon):
    uid_x, x, _, _ = await login(daemon)
    uid_y, y, _, _ = await login(daemon)
    boss_id, _, boss = await logged_in(daemon)
    for body in ("one", "two"):  # the same 66boss extension twice
        boss.send(f"text_{uid_x}_{body}_unicast_same")
    first = (await x.pushes_until("message"))[-1]["data"][0]
    second = (await x.pushes_until("message"))[-1]["data"][0]
    assert (first["content"], second["content"]) == ("one", "two")
    assert first["gid"] != second["gid"]
    # two xuanxuan users who send the same client gid: one gid each for a third member
    gid = "u-" + unique()
    await x.call("create", [gid, "three", "group", [uid_x, uid_y, boss_id]])
    await y.push("create")
    mine = await x.call("message", [{"gid": "dup-gid", "cgid": gid, "content": "x says"}])
    assert mine["data"][0]["gid"] == "dup-gid"  # the sender's ack keeps its own gid
    (from_x,) = (await y.pushes_until("message"))[-1]["data"]
    assert from_x["content"] == "x says" and from_x["gid"] != "dup-gid"
    theirs = await y.call("message", [{"gid": "dup-gid", "cgid": gid, "content": "y says"}])
    assert theirs["data"][0]["gid"] == "dup-gid"
    history = (await x.call("history", [gid, 10, 1]))["data"]
    gids = {m["content"]: m["gid"] for m in history}
    assert gids["x says"] == "dup-gid"  # x's own message: x's gid, in history too
    assert gids["y says"] != "dup-gid"
    assert len(set(gids.values())) == 2
    history_boss = (await x.call("history", [one2one(uid_x, boss_id), 10, 1]))["data"]
    assert len({m["gid"] for m in history_boss}) == 2


@pytest_twisted.ensureDeferred
async def test_leaving_a_group_keeps_it_for_the_others(daemon):
    uid_a, a, _, _ = await login(daemon)
    uid_b, b, _, _ = await login(daemon)
    uid_c, c, _, _ = await login(daemon)
    gid = (await a.call("create", ["l-" + unique(), "stay", "group", [uid_a, uid_b, uid_c]]))[
        "data"]["gid"]
    for x in (b, c):
        await x.push("create")
    left = await c.call("joinchat", [gid, False])
    assert left["result"] == "success" and left["data"]["join"] is False  # c drops it
    for x in (a, b):
        got = await x.pushes_until("addmember")
        assert "joinchat" not in methods(got)
        assert got[-1]["data"]["gid"] == gid and uid_c not in got[-1]["data"]["members"]
        assert "star" not in got[-1]["data"]  # the client keeps its own star/hide
    # joining a public chat: the joiner gets joinchat with join, the others addmember
    await a.call("changePublic", [gid, True])
    joined = await c.call("joinchat", [gid, True])
    assert joined["data"]["join"] is True and uid_c in joined["data"]["chat"]["members"]
    for x in (a, b):
        got = await x.pushes_until("addmember")
        assert "joinchat" not in methods(got) and uid_c in got[-1]["data"]["members"]
    # a member removed by an admin: their client drops the chat
    await a.call("addmember", [gid, [uid_c], False])
    dropped = await c.push("joinchat")
    assert dropped["gid"] == gid and dropped["join"] is False


@pytest_twisted.ensureDeferred
async def test_getconfig_for_a_client_that_drops_the_port(fresh_daemon):
    d = fresh_daemon("--public-url", "https://im.example.org/").start()
    config = (await http("GET", f"http://127.0.0.1:{d.web}/index.php?mode=getconfig")).json()
    assert config["ip"] == "im.example.org" and config["port"] == d.xuanxuan
    # behind a proxy that passes the Host the client asked (no port: 80 or 443), when that
    # host is one of --public-hosts; another host name is not handed out
    plain = fresh_daemon("--public-hosts", "chat.example.com").start()
    config = (await http("GET", f"http://127.0.0.1:{plain.web}/index.php?mode=getconfig",
                         headers={"Host": "chat.example.com"})).json()
    assert config["ip"] == "chat.example.com" and config["port"] == plain.xuanxuan
    other = (await http("GET", f"http://127.0.0.1:{plain.web}/index.php?mode=getconfig",
                        headers={"Host": "evil.example.net"})).json()
    assert other["ip"] == "127.0.0.1"
    bad = (await http("GET", f"http://127.0.0.1:{plain.web}/sys/index.php?mode=getconfig",
                      headers={"Host": "x y<"})).json()
    assert bad["ip"] == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_one2one_gid_in_the_clients_own_order(fresh_daemon):
    """The 1.0 client sorts the two ids as text (JavaScript's default sort): 100000&10001."""
    d = fresh_daemon().start()
    uid_a, a, _, _ = await login(d)
    store = await d.store()
    await store.redis.set(store.p + "nextid", 99999)  # the next id has six digits
    uid_b, b, _, _ = await login(d)
    assert len(str(uid_a)) == 5 and len(str(uid_b)) == 6
    gid = "&".join(sorted([str(uid_a), str(uid_b)]))
    assert gid != one2one(uid_a, uid_b)
    created = await a.call("create", [gid, "", "one2one", [uid_a, uid_b], 0])
    assert created["result"] == "success" and created["data"]["gid"] == gid
    assert (await b.push("create"))["gid"] == gid
    await a.call("message", [{"gid": "o-1", "cgid": gid, "content": "in order"}])
    (m,) = await b.push("message")
    assert m["cgid"] == gid
    assert gid in [c["gid"] for c in (await b.call("getList"))["data"]]
    assert (await b.call("history", [gid, 10, 1]))["pager"]["gid"] == gid
    # the numeric order names the same chat
    again = await b.call("create", [one2one(uid_a, uid_b), "", "one2one", [uid_a, uid_b]])
    assert again["data"]["gid"] == gid and again["data"]["id"] == created["data"]["id"]
    await d.close_store()


async def message_replies(x: XX, count: int) -> list[dict]:
    """The next ``count`` replies to ``message`` requests (pushes skipped)."""
    replies = []
    while len(replies) < count:
        line = await x.next()
        if isinstance(line, dict) and line.get("method") == "message":
            replies.append(line)
    return replies


@pytest_twisted.ensureDeferred
async def test_pipelined_messages_are_checked_stored_and_answered_in_order(daemon):
    """Messages sent without waiting for the replies go to the store together; each is
    still checked there (committers set after the session first posted to the chat),
    answered in order, stored in order, and stamps the chat's lastActiveTime."""
    uid_a, a, _, _ = await login(daemon)
    uid_b, b, _, _ = await login(daemon)
    gid = (await a.call("create", ["g-" + unique(), "team", "group", [uid_a, uid_b], 0]))[
        "data"]["gid"]
    assert (await b.call("message", [{"cgid": gid, "content": "first"}]))["result"] == \
        "success"  # b's session now knows where messages to gid go
    assert (await a.call("setCommitters", [gid, [uid_a]]))["result"] == "success"
    for i in range(3):
        b.send("chat", "message", [{"gid": f"b{i}", "cgid": gid, "content": f"no {i}"}])
    assert [r["result"] for r in await message_replies(b, 3)] == ["fail"] * 3
    pair = "&".join(sorted((str(uid_a), str(uid_b))))  # the 1.0 client's order
    for i in range(5):
        a.send("chat", "message", [{"gid": f"a{i}", "cgid": pair if i % 2 else
                                    one2one(uid_a, uid_b), "content": f"m{i}"}])
    b.send("chat", "message", [{"cgid": gid, "content": "still no"}])
    replies = await message_replies(a, 5)
    assert [r["result"] for r in replies] == ["success"] * 5
    assert [r["data"][0]["gid"] for r in replies] == [f"a{i}" for i in range(5)]
    assert [r["data"][0]["cgid"] for r in replies] == [pair] * 5
    assert (await message_replies(b, 1))[0]["result"] == "fail"
    history = await b.call("history", [pair, 10, 1])
    assert [m["content"] for m in history["data"]] == [f"m{i}" for i in range(5)]
    assert [m["content"] for m in (await b.call("history", [gid, 10, 1]))["data"]] == \
        ["first"]
    mine = {c["gid"]: c for c in (await b.call("getList"))["data"]}
    assert mine[pair]["lastActiveTime"] >= replies[-1]["data"][0]["date"]


@pytest_twisted.ensureDeferred
async def test_replies_keep_request_order_across_stored_and_other_requests(daemon):
    """Messages answered once stored and other requests sent in one write are answered in
    the order they were sent; an ack shows the message as history does, whatever its
    text holds; the recipient gets the chat before the first message on it."""
    uid_a, a, _, _ = await login(daemon)
    uid_b, b, _, _ = await login(daemon)
    pair = "&".join(sorted((str(uid_a), str(uid_b))))
    texts = ['say "hi"\\', "line\nbreak\t", "中文 😀 \u2028", "</script>", "plain"]
    requests = []
    for i, content in enumerate(texts):
        requests.append({"module": "chat", "method": "message",
                         "params": [{"gid": f"o{i}", "cgid": pair, "content": content}]})
        if i in (1, 3):
            requests.append({"module": "chat", "method": "ping", "params": []})
    requests.insert(2, {"module": "chat", "method": "message",
                        "params": [{"cgid": str(uid_b + 10 ** 9) + "&" + str(uid_a),
                                    "content": "nobody"}]})
    a.client.send("\n".join(json.dumps(r, ensure_ascii=False) for r in requests))
    replies = []
    while len(replies) < len(requests):
        line = await a.next()
        if isinstance(line, dict):
            replies.append(line)
    assert [r["method"] for r in replies] == [r["method"] for r in requests]
    assert [r["result"] for r in replies] == [
        "fail" if "nobody" in json.dumps(r) else "success" for r in requests]
    acks = [r["data"][0] for r in replies if r["method"] == "message" and r["data"]
            and isinstance(r["data"], list)]
    assert [m["content"] for m in acks] == texts
    assert [m["gid"] for m in acks] == [f"o{i}" for i in range(len(texts))]
    history = (await a.call("history", [pair, 10, 1]))["data"]
    assert history == acks
    pushed = await b.pushes_until("message")
    first = [p["method"] for p in pushed if p["method"] in ("create", "message")]
    assert first[0] == "create"
    assert next(p for p in pushed if p["method"] == "create")["data"]["gid"] == pair


def test_logins_share_one_fetch_of_the_user_list():
    """A reconnect storm reads and encodes the user list once for the logins waiting on
    it; a failed fetch fails them all and the next login reads again."""
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from imd.model import User
    from imd.protocols.xuanxuan.directory import Directories
    from imd.protocols.xuanxuan.socket import XuanxuanService, encode

    fetches: list[defer.Deferred] = []

    def fetch():
        fetches.append(defer.Deferred())
        return fetches[-1]

    clock = Clock()
    directories = Directories(fetch, XuanxuanService._user_json, encode, clock, 60)
    users = [User(1, "ann", "Ann", mail="ann@example.org"),
             User(2, "bob", "Bob", mail="bob@example.org")]
    fields = {1: {"show": "available", "admin": ""}, 2: {"show": "away", "admin": ""}}

    failed = []
    first = directories.get(1).addErrback(failed.append)
    assert not directories.get(2).addErrback(failed.append).called
    fetches[0].errback(RuntimeError("store down"))
    assert len(failed) == 2 and first.called
    got = []
    for viewer in (1, 2, None):
        directories.get(viewer).addCallback(got.append)
    assert len(fetches) == 2
    fetches[1].callback((users, fields, {1}))
    assert len(got) == 3 and got[0] is got[1] is got[2]  # one fetch, encoded once
    listed = json.loads(directories.encoded(got[0], 1, False))
    # The shared entries, then ann's own (with her e-mail), which the client's member
    # store, keyed by id, takes in place of the first.
    assert [(u["id"], u["status"], u["email"]) for u in listed] == [
        (1, "online", ""), (2, "offline", ""), (1, "online", "ann@example.org")]
    admin = json.loads(directories.encoded(got[0], 9, True))
    assert [u["email"] for u in admin] == ["ann@example.org", "bob@example.org"]
    directories.get(2).addCallback(got.append)
    assert len(fetches) == 2 and got[3] is got[0]  # the copy


def test_the_user_list_copy_follows_presence_until_it_may_be_out_of_date():
    """After a fetch, logins take the node's copy, kept current by the presence changes
    the feed flushes (the very bytes for every login without a private field); a profile
    change, an unknown user, a login not listed or age make the next login read again."""
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from imd.model import OFFLINE, ONLINE, PROFILE, SHOW, Event, User
    from imd.protocols.xuanxuan.directory import Directories
    from imd.protocols.xuanxuan.socket import XuanxuanService, encode

    fetches: list[defer.Deferred] = []

    def fetch():
        fetches.append(defer.Deferred())
        return fetches[-1]

    def change(uid, what, show="available"):
        return Event("presence", {"user": uid, "change": what, "show": show})

    def status(directory, viewer=2):
        return {u["id"]: u["status"] for u in
                json.loads(directories.encoded(directory, viewer, False))}

    clock = Clock()
    directories = Directories(fetch, XuanxuanService._user_json, encode, clock, 60)
    users = [User(1, "ann", "Ann", mail="ann@example.org"), User(2, "bob", "Bob"),
             User(3, "cy", "Cy")]
    fields = {u.id: {"show": "available", "admin": ""} for u in users}
    got = []
    directories.get(2).addCallback(got.append)
    directories.apply([change(3, ONLINE)])  # flushed while the fetch runs
    fetches[0].callback((users, fields, {1}))
    assert status(got[0]) == {1: "online", 2: "offline", 3: "online"}
    directories.apply([change(1, OFFLINE), change(2, ONLINE), change(3, SHOW, "away")])
    directories.get(2).addCallback(got.append)
    assert len(fetches) == 1  # the copy, with the changes
    assert status(got[1]) == {1: "offline", 2: "online", 3: "away"}
    assert directories.encoded(got[1], 2, False) is got[1].joined  # bob has no mail: as is
    assert b"ann@example.org" in directories.encoded(got[1], 1, False)  # ann's own mail
    for stale in ([change(1, PROFILE)], [change(4, ONLINE)]):
        directories.apply(stale)
        directories.get(2)
        assert len(fetches) == 2
        fetches[-1].callback((users, fields, set()))
        fetches.clear()
        fetches.append(None)
    directories.get(4)  # not listed: read again
    assert len(fetches) == 2
    fetches[-1].callback((users, fields, set()))
    fetches.clear()
    fetches.append(None)
    directories.get(2)
    clock.advance(61)
    assert len(fetches) == 1
    directories.get(2)  # too old
    assert len(fetches) == 2


PRESENCE_STATUS = {"login": None, "userChangeStatus": None, "logout": "offline"}


@pytest_twisted.ensureDeferred
async def test_a_burst_of_logins_and_logouts_comes_coalesced_and_messages_in_order(daemon):
    """Users who log in (and some out again) in a burst reach every other session as their
    newest status, in fewer presence lines than changes (each line holds one packet per
    user); a session's own changes never reach it; messages sent amid the burst arrive at
    once and in order, exactly once."""
    uid_w, w, _, _ = await login(daemon)
    uid_a, a, _, _ = await login(daemon)
    uid_b, b, _, _ = await login(daemon)
    pair = one2one(uid_a, uid_b)
    await a.call("create", [pair, "", "one2one", [uid_a, uid_b]])
    burst = await defer.gatherResults([defer.ensureDeferred(login(daemon)) for _ in range(6)])
    for i in range(3):
        assert (await a.call("message", [{"cgid": pair, "content": f"amid {i}"}]))[
            "result"] == "success"
    leaving, staying = burst[:3], burst[3:]
    for _, x, _, _ in leaving:
        x.client.close()
    expected = {uid: "offline" for uid, *_ in leaving}
    expected.update({uid: "online" for uid, *_ in staying})
    changes = len(burst) + len(leaving)

    seen: dict[int, str] = {}
    lines = 0
    while seen != expected:
        packets = await w.next(timeout=5)
        assert packets is not CLOSED
        about = [p for p in packets if isinstance(p.get("data"), dict)
                 and p["data"].get("id") in expected] if isinstance(packets, list) else []
        if not about:
            continue
        lines += 1
        ids = [p["data"]["id"] for p in about]
        assert len(ids) == len(set(ids)), about  # one packet per user and line
        for p in about:
            assert p["method"] in PRESENCE_STATUS, p
            seen[p["data"]["id"]] = PRESENCE_STATUS[p["method"]] or p["data"]["status"]
    assert lines < changes, (lines, changes)
    for uid in expected:
        await none_about(w, uid)

    got = []
    while len(got) < 3:
        packets = await b.next(timeout=5)
        got += [m["content"] for p in packets if p["method"] == "message" for m in p["data"]]
    assert got == ["amid 0", "amid 1", "amid 2"]
    uid_s, s, _, _ = staying[0]
    await none_about(s, uid_s)  # its own login is not pushed to it
    assert not await message_pushes(b, 0.6)  # exactly once


async def none_about(x: XX, uid: int, wait: float = 0.6) -> None:
    """Assert that no push about user ``uid`` comes within ``wait`` seconds."""
    try:
        while True:
            packets = await x.next(timeout=wait)
            if isinstance(packets, list):
                hits = [p for p in packets if isinstance(p.get("data"), dict)
                        and p["data"].get("id") == uid]
                assert not hits, hits
    except defer.TimeoutError:
        pass


async def message_pushes(x: XX, wait: float) -> list:
    """The message pushes that come within ``wait`` seconds."""
    messages = []
    try:
        while True:
            packets = await x.next(timeout=wait)
            if isinstance(packets, list):
                messages += [p for p in packets if p["method"] == "message"]
    except defer.TimeoutError:
        return messages


def test_a_presence_window_keeps_the_newest_change_per_user_and_leaves_out_the_viewer():
    """The feed's flush: one packet per user and kind, in the order of the last changes,
    the same line for everyone but the changed users (without their own packets) and the
    administrators (each packet rendered for them); the user list copy hears it first."""
    from twisted.internet.task import Clock

    from imd.model import OFFLINE, ONLINE, PROFILE, SHOW, Event
    from imd.protocols.xuanxuan.presence import PresenceFeed

    def change(uid, what):
        return Event("presence", {"user": uid, "change": what, "show": "away"})

    class Session:
        def __init__(self, uid, admin=False):
            self.uid, self.admin, self.lines = uid, admin, []

        def presence_batch(self, batch):
            render = (lambda e: b'{"id":%d,"private":1}' % e.data["user"]) if self.admin \
                else None
            line = batch.line_for(self.uid, render)
            if line is not None:
                self.lines.append(json.loads(line))

    clock, heard = Clock(), []
    feed = PresenceFeed(clock, 0.5, lambda e: b'{"id":%d}' % e.data["user"], heard.append)
    one, two, admin = Session(1), Session(9), Session(8, admin=True)
    feed.sessions.update((one, two, admin))
    for event in (change(1, ONLINE), change(2, ONLINE), change(1, SHOW), change(2, OFFLINE),
                  change(3, PROFILE), change(2, ONLINE)):
        feed.presence(event)
    clock.advance(0.4)
    assert not two.lines
    clock.advance(0.1)
    assert [[e.data["user"], e.data["change"]] for e in heard[0]] == [
        [1, SHOW], [3, PROFILE], [2, ONLINE]]
    assert [(p["method"], p["data"]) for p in two.lines[0]] == [
        ("userChangeStatus", {"id": 1}), ("userChangeName", {"id": 3}), ("login", {"id": 2})]
    assert [p["data"]["id"] for p in one.lines[0]] == [3, 2]  # not its own change
    assert [p["data"] for p in admin.lines[0]] == [
        {"id": 1, "private": 1}, {"id": 3, "private": 1}, {"id": 2, "private": 1}]
    assert len({p["id"] for p in two.lines[0]}) == 3
    clock.advance(5)
    assert len(two.lines) == 1  # nothing more


@pytest_twisted.ensureDeferred
async def test_the_system_chats_members_follow_new_and_removed_users(fresh_daemon):
    """The system chat lists every user.  A node keeps a big group's members (and the
    system chat's encoded member list) between logins; a user made or removed since, also
    when the count stays the same, is in (or out of) the next getList and login."""
    d = fresh_daemon().start()
    store = await d.store()
    for i in range(300):  # big enough to be kept (imd.store.redis.BIG_GROUP)
        await store.create_user(unique("filler"), "filler", "x")
    uid_a, a, _, pushed = await login(d)

    async def system_members(x: XX, packets=None) -> list[int]:
        chats = packets if packets is not None else (await x.call("getList"))["data"]
        (system,) = [c for c in chats if c["gid"] == "system"]
        return system["members"]

    everyone = sorted(u["id"] for u in pushed[0]["data"])
    assert len(everyone) > 300
    (getlist,) = [p["data"] for p in pushed if p["method"] == "getList"]
    assert await system_members(a, getlist) == everyone
    assert await system_members(a) == everyone  # from what the node kept
    new = (await store.create_user(unique("new"), "new", "x")).id
    assert await system_members(a) == everyone + [new]
    # One out, one in: the same count, other members.
    system = await store.system_group()
    await store.remove_members(system, [new])
    newer = (await store.create_user(unique("newer"), "newer", "x")).id
    assert await system_members(a) == everyone + [newer]
    _, b, _, pushed = await login(d)
    (getlist,) = [p["data"] for p in pushed if p["method"] == "getList"]
    members = await system_members(b, getlist)
    assert newer in members and new not in members
    await d.close_store()
