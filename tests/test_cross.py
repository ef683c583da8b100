"""Every protocol with every other, over the wire: for each ordered pair of clients (66boss
WebSocket, 66boss line, minami, webim, xuanxuan) online delivery, offline delivery, presence
both ways where the watching protocol can show it, and one group shared by every client that
has groups (minami has none).  The bodies carry what tends to break a dialect: Chinese, emoji,
``_``, quotes, ``<b>``, ``&amp;`` and a newline."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
from urllib.parse import urlencode

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from imd.accounts import Accounts
from tests.conftest import unique
from tests.test_webim import Webim
from tests.wire import CLOSED, get, line_connect, ws_connect

NAMES: dict[int, str] = {}  # user id -> display name, of every party made here
GROUP_NAME = "every protocol 群"
BODY = '你好 🎉 a_b "q" \'s\' <b>bold</b> &amp; line1\nline2'
WAIT = 5.0


def tagged(tag: str) -> str:
    """The test body with a tag of its own, so each check waits for its own message."""
    return f"{BODY} #{tag}"


class Party:
    """One user of one protocol: logs in, sends, and reads what it is sent."""

    name = ""
    shows_online = False   # the protocol pushes "a friend/user came online"
    shows_offline = False  # ... and "went offline"
    has_groups = True
    sends_to_offline = True  # its sends to an offline user are stored for them

    def __init__(self, daemon, uid: int, token: str, account: str):
        self.daemon, self.uid, self.token, self.account = daemon, uid, token, account

    async def fresh_token(self) -> str:
        """A new token (a logout may revoke the one the last login used)."""
        return await Accounts(await self.daemon.store(), 3600).issue_token(self.uid)

    async def login(self) -> None:
        raise NotImplementedError

    async def logout(self) -> None:
        raise NotImplementedError

    async def send(self, to: int, body: str, group: bool = False) -> None:
        raise NotImplementedError

    async def receive(self, frm: int, body: str, group: int | None = None) -> None:
        """Wait until the message ``body`` from ``frm`` (in ``group``) arrives."""
        raise NotImplementedError

    async def presence(self, uid: int, online: bool) -> None:
        """Wait until this client is told that ``uid`` came online / went offline."""
        raise NotImplementedError


class Boss(Party):
    name = "boss_ws"
    client = None

    @staticmethod
    def decode(signal: str) -> str:
        return signal

    @staticmethod
    def encode(signal: str) -> str:
        return signal

    async def connect(self):
        return await ws_connect(self.daemon.web)

    async def login(self):
        self.client = await self.connect()
        self.client.send(f"login_{self.uid}_{await self.fresh_token()}")
        assert await self.client.next() == "ok"

    async def logout(self):
        self.client.send(f"logout_{self.uid}")
        while await self.client.next() is not CLOSED:
            pass

    async def send(self, to, body, group=False):
        self.client.send(self.encode(f"text_{to}_{body}_{'group' if group else 'unicast'}_x"))

    async def receive(self, frm, body, group=None):
        while True:
            signal = await self.client.next(timeout=WAIT)
            assert signal is not CLOSED
            signal = self.decode(signal)
            head, _, rest = signal.partition(f"text_{frm}_")
            if head or not rest:
                continue
            got, ctype, fromgroup, _time, ext = rest.rsplit("_", 4)
            if got == body:
                assert ctype == ("group" if group else "unicast")
                assert fromgroup == str(group if group else frm)
                self.check_extension(ext, frm, group)
                return

    @staticmethod
    def check_extension(ext: str, frm: int, group: int | None) -> None:
        """The Android app drops a message whose extension is not base64 of its sender
        card (cards.py); a 66boss sender's own extension ("x" here) is passed on."""
        if ext == "x":
            return
        card = json.loads(base64.b64decode(ext, validate=True))
        assert card["senderID"] == str(frm), card
        name = NAMES.get(frm)  # (parties made elsewhere have names of their own)
        if name is not None:
            assert card == {"sender": name, "senderID": str(frm), "senderAvartar": "",
                            "conversation": GROUP_NAME if group else name,
                            "conversationAvartar": ""}, card


class BossLine(Boss):
    name = "boss_line"

    async def connect(self):
        return await line_connect(self.daemon.line)

    @staticmethod
    def decode(signal: str) -> str:
        """A line carries a newline as \\n and a backslash as \\\\."""
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), signal)

    @staticmethod
    def encode(signal: str) -> str:
        return signal.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class Minami(Party):
    name = "minami"
    shows_offline = True
    has_groups = False
    sends_to_offline = False  # minami's tunnel refuses an offline friend (508)
    serial = 0

    async def login(self):
        query = urlencode({"account": self.account, "password": "pw"})
        self.ws = await ws_connect(self.daemon.web, f"/im/login?{query}")
        first = json.loads(await self.ws.next())
        assert first["code"] == 200, first

    async def logout(self):
        self.ws.close()
        await self.ws.inbox.closed

    async def frames(self):
        while True:
            frame = await self.ws.next(timeout=WAIT)
            assert frame is not CLOSED
            yield json.loads(frame)

    async def send(self, to, body, group=False):
        self.serial += 1
        serial = str(self.serial)
        self.ws.send(json.dumps({"id": serial, "toFriend": str(to), "payload": body}))
        async for frame in self.frames():
            if frame.get("id") == serial:
                assert frame["code"] == 200, frame
                return

    async def receive(self, frm, body, group=None):
        async for frame in self.frames():
            if frame == {"from": str(frm), "payload": body}:
                return

    async def presence(self, uid, online):
        assert not online
        async for frame in self.frames():
            if frame.get("code") == 300 and frame.get("id") == str(uid):
                return


class Web(Party):
    name = "webim"
    shows_online = shows_offline = True

    async def login(self):
        self.tab = Webim(self.daemon, self.uid, await self.fresh_token())
        reply = await self.tab.online()
        self.pending = list(reply["new_messages"])  # queued while offline
        self.presences: list[dict] = []

    async def logout(self):
        assert await self.tab.call("offline") == "ok"

    async def send(self, to, body, group=False):
        reply = await self.tab.call("message", type="multicast" if group else "unicast",
                                    to=str(to), body=body)
        assert reply == "ok", reply

    async def _poll(self):
        packets = await self.tab.poll()
        assert packets["status"] == "ok", packets
        self.pending += packets["messages"]
        self.presences += packets["presences"]

    async def _until(self, found):
        deadline = reactor.seconds() + WAIT
        while not found():
            assert reactor.seconds() < deadline, "not received in time"
            await self._poll()

    async def receive(self, frm, body, group=None):
        def found():
            for m in self.pending:
                if str(m["from"]) == str(frm) and m["body"] == body:
                    assert m["type"] == ("multicast" if group else "unicast"), m
                    assert str(m["to"]) == str(group if group else self.uid), m
                    return True
            return False

        await self._until(found)

    async def presence(self, uid, online):
        kind = "online" if online else "offline"
        await self._until(lambda: any(str(p["from"]) == str(uid) and p["type"] == kind
                                      for p in self.presences))


class Xuanxuan(Party):
    name = "xuanxuan"
    shows_online = shows_offline = True

    async def login(self):
        self.client = await line_connect(self.daemon.xuanxuan)
        self.shown: set[str] = set()  # the chats this client has been shown
        self.pushed: list[dict] = []
        self._send("chat", "login", [self.account, hashlib.md5(b"pw").hexdigest(), "online"])
        reply = await self._next()
        assert reply["result"] == "success", reply
        self.sid = reply["sid"]

    def _send(self, module, method, params):
        self.client.send(json.dumps({"module": module, "method": method, "params": params,
                                     "sid": getattr(self, "sid", "")}, ensure_ascii=False))

    async def _next(self):
        line = await self.client.next(timeout=WAIT)
        assert line is not CLOSED
        obj = json.loads(line)
        for packet in obj if isinstance(obj, list) else ():
            data = packet["data"]
            method = packet["method"].lower()
            if method == "getlist":
                self.shown.update(c["gid"] for c in data)
            elif method in ("create", "joinchat", "addmember") and isinstance(data, dict):
                self.shown.add(data.get("gid") or data.get("chat", {}).get("gid"))
            elif method == "message":
                for m in data if isinstance(data, list) else [data]:
                    # Never a message on a chat this client has not been shown.
                    assert m["cgid"] in self.shown, (m, self.shown)
            self.pushed.append(packet)
        return obj

    async def logout(self):
        self._send("chat", "logout", [])
        while await self.client.next(timeout=WAIT) is not CLOSED:
            pass

    async def send(self, to, body, group=False):
        cgid = str(to) if group else "&".join(map(str, sorted((self.uid, to))))
        if not group:
            self._send("chat", "create", [cgid, "", "one2one", [self.uid, to], 0])
            while not (isinstance(r := await self._next(), dict) and r["method"] == "create"):
                pass
            assert r["result"] == "success", r
        self._send("chat", "message", {"messages": [{
            "gid": unique("g"), "cgid": cgid, "type": "normal", "contentType": "text",
            "content": body, "date": "", "user": self.uid}]})
        while not (isinstance(r := await self._next(), dict) and r["method"] == "message"):
            pass
        assert r["result"] == "success", r

    async def _until(self, match):
        seen = 0
        while True:
            for packet in self.pushed[seen:]:
                if match(packet):
                    return packet
            seen = len(self.pushed)
            await self._next()

    async def receive(self, frm, body, group=None):
        def match(packet):
            if packet["method"].lower() != "message":
                return False
            data = packet["data"]
            return any(m["user"] == frm and m["content"] == body
                       for m in (data if isinstance(data, list) else [data]))

        await self._until(match)

    async def presence(self, uid, online):
        def match(packet):
            method, data = packet["method"].lower(), packet["data"]
            if not isinstance(data, dict) or data.get("id") != uid:
                return False
            if online:
                return method in ("login", "userchangestatus") and data["status"] != "offline"
            return method == "logout" or data.get("status") == "offline"

        await self._until(match)


PARTIES = [Boss, BossLine, Minami, Web, Xuanxuan]
PAIRS = [(a, b) for a, b in itertools.permutations(PARTIES, 2)]


async def new_party(daemon, cls) -> Party:
    account = unique(cls.name.replace("_", ""))
    uid, token = await daemon.user(account, password="pw", name=f"{cls.name} {account}")
    NAMES[uid] = f"{cls.name} {account}"
    return cls(daemon, uid, token, account)


@pytest.mark.parametrize("sender, receiver", PAIRS,
                         ids=[f"{a.name}_to_{b.name}" for a, b in PAIRS])
@pytest_twisted.ensureDeferred
async def test_pair(daemon, sender, receiver):
    a, b = await new_party(daemon, sender), await new_party(daemon, receiver)
    store = await daemon.store()
    await store.befriend(a.uid, b.uid, "b", "a")  # minami and webim show friends' presence

    # Presence: b watches a come online.
    await b.login()
    await a.login()
    if b.shows_online:
        await b.presence(a.uid, online=True)

    # Online delivery, both ways.
    await a.send(b.uid, tagged("a-to-b"))
    await b.receive(a.uid, tagged("a-to-b"))
    await b.send(a.uid, tagged("b-to-a"))
    await a.receive(b.uid, tagged("b-to-a"))

    # Offline delivery: b leaves, a writes, b comes back and gets it once.
    await b.logout()
    if a.shows_offline:
        await a.presence(b.uid, online=False)
    if a.sends_to_offline:
        await a.send(b.uid, tagged("while-away"))
        await b.login()
        await b.receive(a.uid, tagged("while-away"))
    else:
        await b.login()
    if a.shows_online:
        await a.presence(b.uid, online=True)

    # Presence: b watches a go offline.
    await a.logout()
    if b.shows_offline:
        await b.presence(a.uid, online=False)
    await b.logout()


@pytest_twisted.ensureDeferred
async def test_one_group_shared_by_every_protocol_with_groups(daemon):
    parties = [await new_party(daemon, cls) for cls in PARTIES if cls.has_groups]
    creator = parties[0]
    reply = (await get(daemon.web, "/creategrp", creator=creator.uid, token=creator.token,
                       name=GROUP_NAME,
                       members=",".join(str(p.uid) for p in parties))).json()
    assert reply["code"] == 0, reply
    group = int(reply["data"]["groupid"])
    for p in parties:
        await p.login()
    for sender in parties:
        body = tagged(f"group-from-{sender.name}")
        await sender.send(group, body, group=True)
        await defer.gatherResults([defer.ensureDeferred(p.receive(sender.uid, body, group))
                                   for p in parties if p is not sender])
    for p in parties:
        await p.logout()

