"""The webim actions, as the shipped plugin served them, with the seed drafts' names too.

Every action takes its parameters from the query string or a form body, answers JSON, or JSONP
when ``callback`` is given.  A plain success is the JSON string ``"ok"``; a failure is
``{"success": false, "error_msg": "..."}``.
"""

from __future__ import annotations

import html
import json
import time

from twisted.internet import defer
from twisted.web import server

from imd import jsonin
from imd.accounts import Accounts
from imd.friends import Friends
from imd.groups import GroupError, Groups
from imd.hub import Hub, HubError
from imd.model import (GROUP, SHOWS, TEXT, UNICAST, Event, Group, Message, User,
                       group_conversation, one2one_gid)
from imd.protocols.webim.auth import (Credential, caller, clear_cookie, credential_digest,
                                     foreign_script, same_origin_post, set_cookie)
from imd.protocols.webim.tickets import Ticket, Tickets
from imd.guard import source_host
from imd.throttle import Throttled
from imd.web import arg, public_base

HISTORY_SIZE = 30
MAX_IDS = 200
# What a page of another site must not make a user do with the user's cookie alone.
CHANGES_STATE = frozenset({"online", "offline", "refresh", "message", "presence", "status",
                           "join", "leave", "clear_history", "setting", "logout"})
SETTING_MAX = 8192  # bytes of one user's webim settings (JSON)
# Parameters of a ``setting`` request that are not settings.
SETTING_NOT_FIELDS = frozenset({b"callback", b"ticket", b"token", b"auth", b"webim_action",
                                b"_"})


class ActionError(Exception):
    """A refused action; the text goes to ``error_msg``."""


def _ok(_) -> str:
    return "ok"


def _refused(failure):
    failure.trap(HubError)
    raise ActionError(str(failure.value))


def ids_param(request: server.Request, *names: str) -> list[int]:
    """Comma-separated ids from the first of ``names`` present; non-ids are ignored."""
    for name in names:
        value = arg(request, name)
        if value:
            parts = [p.strip() for p in value.split(",")]
            ids = [int(p) for p in parts if p.isascii() and p.isdigit() and len(p) <= 18]
            return ids[:MAX_IDS]
    return []


def blocked_rooms(fields: dict) -> frozenset[int]:
    """The rooms a user blocked, from the user's ``webim_blocked`` field (a JSON list)."""
    try:
        ids = json.loads(fields.get("webim_blocked") or "[]")
    except ValueError:
        return frozenset()
    if not isinstance(ids, list):
        return frozenset()
    return frozenset(i for i in ids if isinstance(i, int))


def stored_setting(fields: dict):
    """A user's webim settings, from the user's ``webim_setting`` field."""
    try:
        return jsonin.read(fields.get("webim_setting") or "{}", limit=SETTING_MAX)
    except jsonin.BadJSON:
        return {}  # stored before the reader checked settings


def setting_blocked(setting) -> frozenset[int]:
    """The ``blocked_rooms`` the client keeps in its own setting (the original's ``online``
    marked those rooms blocked)."""
    ids = setting.get("blocked_rooms") if isinstance(setting, dict) else None
    if not isinstance(ids, list):
        return frozenset()
    return frozenset(int(i) for i in ids
                     if isinstance(i, (int, str)) and str(i).isascii() and str(i).isdigit()
                     and len(str(i)) <= 18)


def one_id(request: server.Request, *names: str) -> int:
    ids = ids_param(request, *names)
    if not ids:
        raise ActionError(f"missing or bad parameter: {names[0]}")
    return ids[0]


class WebimActions:
    def __init__(self, hub: Hub, accounts: Accounts, friends: Friends, groups: Groups,
                 tickets: Tickets, secret: str, public_url: str, token_ttl: int):
        self.hub = hub
        self.store = hub.store
        self.accounts = accounts
        self.friends = friends
        self.groups = groups
        self.tickets = tickets
        self.secret = secret
        self.public_url = public_url
        self.token_ttl = token_ttl
        self.needs_ticket = {"message", "status", "presence", "join", "leave", "offline",
                             "refresh"}
        self.actions = {
            "online": self.online, "offline": self.offline, "refresh": self.refresh,
            "message": self.message, "presence": self.presence, "status": self.status,
            "history": self.history, "histories": self.histories, "members": self.members,
            "join": self.join, "leave": self.leave, "buddies": self.buddies,
            "rooms": self.rooms, "clear_history": self.clear_history,
            "setting": self.setting, "notifications": self.notifications,
            "download_history": self.download_history, "login": self.login,
            "logout": self.logout,
        }

    async def run(self, name: str, request: server.Request):
        """The reply object of action ``name``; raises ActionError.

        ``online`` is authorized by a credential (host-signed ``auth``, ``token``, or the
        login cookie); every later action of the tab also by its ticket alone.  The cookie
        alone changes state only in a same-origin POST (see ``auth``)."""
        handler = self.actions.get(name)
        if handler is None:
            raise ActionError("Unknown action")
        if name == "login":
            return await handler(request)
        ticket = self.by_ticket(name, request)
        if ticket is not None:
            # The lean path (most of a tab's traffic: message, status, ...): the ticket
            # alone, or with the credential it was opened with, needs no lookup.
            if name in self.needs_ticket:
                return await handler(request, ticket.user_id, ticket)
            return await handler(request, ticket.user_id)
        credential = self.by_page_key(name, request)
        if credential is None:
            credential = await caller(request, self.accounts, self.secret)
        if credential is None and (arg(request, "auth") or arg(request, "token")):
            raise ActionError("Not Authorized")  # a bad explicit credential; a stale cookie
        if credential is None and name == "notifications":
            return []  # the client asks on every page load, logged in or not: nothing
        if credential is None and name == "online" and arg(request, "username") is not None:
            credential = await self.password_login(request)
        ticket = None if name == "online" else self.tickets.get(arg(request, "ticket"))
        if ticket is not None:
            if credential is not None and credential.uid != ticket.user_id:
                raise ActionError("Not Authorized: not your ticket")
            uid = ticket.user_id
        elif credential is None:
            raise ActionError("Not Authorized")
        else:
            uid = credential.uid
            if credential.ambient:
                if name in CHANGES_STATE and not same_origin_post(request, self.public_url):
                    raise ActionError("Not Authorized: send the ticket, or POST from this site")
                if arg(request, "callback") is not None and foreign_script(request):
                    raise ActionError("Not Authorized: no JSONP for another site's page")
        if name in self.needs_ticket:
            if ticket is None:
                raise ActionError("Not Authorized: unknown ticket")
            return await handler(request, uid, ticket)
        if name == "logout":
            return await handler(request, uid, credential)
        if name == "online":
            return await handler(request, uid, credential_digest(request, self.secret))
        return await handler(request, uid)

    def by_page_key(self, name: str, request: server.Request) -> Credential | None:
        """The user whose host page made this request, by the page key ``online`` set
        (``pages``), when the request carries no other credential.  It is what authorizes
        the actions the shipped client sends without the ticket, and its ``online`` again
        with an ``auth`` of the same user that may have expired."""
        if name == "logout" or arg(request, "token"):
            return None
        signed = arg(request, "auth")
        if name == "online":
            if arg(request, "username") is not None:
                return None  # the login form: its password decides
        elif signed:
            return None  # checked as it is
        uid = self.tickets.pages.user_for(request, download=name == "download_history")
        if uid is None:
            return None
        # online again from the same page (the client reuses its URL, whose auth may have
        # expired since): the key stands for its own user only.
        if signed and signed.split(".", 1)[0] != str(uid):
            return None
        return Credential(uid, ambient=False)

    async def password_login(self, request: server.Request) -> Credential:
        """``online`` from the client's own login form (``username``, ``password``), as the
        original plugin checked it against the host site's accounts."""
        try:
            user = await self.accounts.check_password(
                arg(request, "username") or "", arg(request, "password") or "",
                source_host(request.getClientAddress()))
        except Throttled as e:
            raise ActionError(str(e)) from None
        if user is None:
            raise ActionError("Not Authorized")
        return Credential(user.id, ambient=False)

    def by_ticket(self, name: str, request: server.Request) -> Ticket | None:
        """The tab's ticket when it authorizes action ``name`` without a store lookup: the
        request carries no other credential, or the very one the ticket was opened with.
        (``online`` needs a credential; ``logout`` the token behind it.)"""
        if name in ("online", "logout"):
            return None
        ticket = self.tickets.get(arg(request, "ticket"))
        if ticket is None:
            return None
        digest = credential_digest(request, self.secret)
        if digest == b"" or (digest is not None and digest == ticket.opened_with):
            return ticket
        return None

    # -- rendering -----------------------------------------------------------------------

    async def _nicks(self, uids) -> dict[int, User]:
        return await self.store.get_users(set(uids))

    def _user_json(self, user: User, fields: dict) -> dict:
        # "uid": the host site's user id, which the client's chat links look up.
        return {"id": str(user.id), "uid": str(user.id), "nick": user.name, "name": user.account,
                "pic_url": user.avatar, "default_pic_url": "", "url": "",
                "show": fields.get("show") or "available",
                "status": fields.get("status", ""), "status_time": ""}

    @staticmethod
    def message_json(m: Message, users: dict[int, User]) -> dict:
        sender = users.get(m.sender)
        return {"from": str(m.sender), "nick": sender.name if sender else str(m.sender),
                "to": str(m.to), "timestamp": m.ts,
                "type": "multicast" if m.ctype == GROUP else "unicast",
                "body": m.body if m.kind == TEXT else f"[{m.kind}] {m.body}", "style": m.style}

    def log_item(self, m: Message, users: dict[int, User]) -> dict:
        return {**self.message_json(m, users), "timestamp": str(m.ts)}

    async def _buddy_json(self, uid: int, friends: dict[int, str]) -> dict | None:
        user = (await self.store.get_users([uid])).get(uid)
        if user is None:
            return None
        fields = await self.store.user_fields(uid, "show", "status")
        online = await self.hub.is_online(uid)
        return {**self._user_json(user, fields),
                "nick": friends.get(uid) or user.name,
                "group": "friend" if uid in friends else "stranger",
                "presence": "online" if online else "offline",
                "show": (fields.get("show") or "available") if online else "unavailable"}

    async def _room_json(self, group: Group, blocked: bool | None = False) -> dict:
        """roomInfo; without ``blocked`` when it is None (the client keeps its own flag)."""
        online_set = await self.hub.online_among(group.members)
        online = [u for u in group.members if u in online_set]
        users = await self.store.get_users(online)
        return {"id": str(group.id), "name": group.name, "nick": group.name,
                "pic_url": group.snap, "default_pic_url": "", "url": "",
                "all_count": len(group.members), "count": len(online),
                "members": [{"id": str(u), "nick": users[u].name if u in users else str(u)}
                            for u in online],
                **({} if blocked is None else {"blocked": blocked})}

    def _conversation(self, uid: int, peer: int, kind: str | None) -> str:
        if kind == "multicast":
            return group_conversation(peer)
        return one2one_gid(uid, peer)

    async def _history(self, uid: int, peer: int, kind: str | None = None,
                       unseen: frozenset[int] = frozenset()) -> list[dict]:
        """The last items of a conversation, oldest first, without the messages in
        ``unseen`` (ids of messages the caller has not been given yet)."""
        if kind is None:
            kind = "multicast" if await self.store.get_group(peer) else "unicast"
        if kind == "multicast":
            group = await self.store.get_group(peer)
            if group is None or (uid not in group.members and not group.public):
                return []
        conversation = self._conversation(uid, peer, kind)
        cleared = await self.store.history_cleared(uid, conversation)
        messages = [m for m in await self.store.history(conversation, limit=0)
                    if m.id > cleared and m.id not in unseen][-HISTORY_SIZE:]
        users = await self._nicks(m.sender for m in messages)
        return [self.log_item(m, users) for m in messages]

    # -- actions ---------------------------------------------------------------------------

    async def login(self, request: server.Request):
        """Our login form: account + password -> the session cookie."""
        if request.method != b"POST":
            raise ActionError("use POST with account and password")
        try:
            result = await self.accounts.login(arg(request, "account") or "",
                                               arg(request, "password") or "",
                                               source_host(request.getClientAddress()))
        except Throttled as e:
            raise ActionError(str(e)) from None
        if result is None:
            raise ActionError("wrong account or password")
        user, token = result
        set_cookie(request, token, self.token_ttl)
        return {"success": True, "user": {"id": str(user.id), "nick": user.name}}

    async def logout(self, request: server.Request, uid: int, credential):
        """Ends the login: the token behind the cookie (or ``token``) stops working, and so
        does the tab's ticket.  (The client's own ``offline`` only goes offline.)"""
        if credential is not None and credential.token:
            await self.accounts.revoke(credential.token)
            # Tabs opened with it no longer skip the lookup, which now refuses it.
            self.tickets.forget_credential(uid, credential_digest(request, self.secret))
        ticket = self.tickets.get(arg(request, "ticket"), uid)
        if ticket is not None:
            self.tickets.unbind(ticket, grace=False)
        self.tickets.pages.forget_user(uid)
        clear_cookie(request)
        return "ok"

    async def online(self, request: server.Request, uid: int, opened_with: bytes | None):
        show = arg(request, "show")
        if show in SHOWS:  # told to those who see the user if already online elsewhere
            await self.hub.set_show(uid, show)
        fields = await self.store.user_fields(uid, "show", "status", "webim_setting",
                                              "webim_blocked")
        setting = stored_setting(fields)
        blocked = blocked_rooms(fields) | setting_blocked(setting)
        self.tickets.set_blocked(uid, blocked)
        ticket, unseen = await self.tickets.open(uid, self.tickets.pages.claim(request, uid))
        ticket.opened_with = opened_with
        # A blocked room's messages are not news; they are in its history.
        unseen = [m for m in unseen if not (m.ctype == GROUP and m.to in blocked)]
        unseen_ids = frozenset(m.id for m in unseen)
        user = await self.store.get_user(uid)
        friends = await self.store.friends(uid)
        asked = set(ids_param(request, "buddy_ids", "buddies", "presence_buddies"))
        asked |= set(ids_param(request, "stranger_ids"))
        senders = {m.sender for m in unseen if m.ctype == UNICAST and m.sender != uid}
        active = asked | senders
        buddies = []
        for bid in sorted(set(friends) | active):
            if bid == uid:
                continue
            info = await self._buddy_json(bid, friends)
            if info is None or (info["presence"] != "online" and bid not in active):
                continue
            if bid in active:
                info["history"] = await self._history(uid, bid, "unicast", unseen_ids)
            buddies.append(info)
        asked_rooms = set(ids_param(request, "room_ids", "rooms", "presence_rooms"))
        rooms = []
        for gid in await self.store.user_groups(uid):
            group = await self.store.get_group(gid)
            if group is None:
                continue
            info = await self._room_json(group, gid in blocked)
            if gid in asked_rooms:
                info["history"] = await self._history(uid, gid, "multicast", unseen_ids)
            rooms.append(info)
        users = await self._nicks(m.sender for m in unseen)
        base = public_base(request, self.public_url)
        return {
            "success": True, "server_time": int(time.time() * 1000),
            "user": {**self._user_json(user, fields), "presence": "online"},
            "connection": {"ticket": ticket.id,
                           "domain": arg(request, "domain") or base.split("://", 1)[1],
                           "server": f"{base}/packets"},
            "buddies": buddies, "rooms": rooms,
            "new_messages": [self.message_json(m, users) for m in unseen],
            "setting": setting,
        }

    async def offline(self, request, uid: int, ticket: Ticket):
        self.tickets.unbind(ticket, grace=False)
        return "ok"

    async def refresh(self, request, uid: int, ticket: Ticket):
        self.tickets.unbind(ticket, grace=True)
        return "ok"

    async def message(self, request, uid: int, ticket: Ticket):
        return await self.send_message(request, ticket)

    def send_message(self, request: server.Request, ticket: Ticket) -> defer.Deferred:
        """``message``, the lean path (a plain Deferred chain: this is the hot path): the
        few parameters, one ``hub.send``; Deferred["ok"] once the message is stored."""
        kind = arg(request, "type") or "unicast"
        body = arg(request, "body")
        try:
            if kind not in ("unicast", "multicast"):
                raise ActionError("type must be unicast or multicast")
            to = one_id(request, "to")
            if not body:
                raise ActionError("missing parameter: body")
        except ActionError:
            return defer.fail()
        d = self.hub.send(ticket, GROUP if kind == "multicast" else UNICAST, to, TEXT, body,
                          style=(arg(request, "style") or "")[:256])
        d.addCallbacks(_ok, _refused)
        return d

    async def presence(self, request, uid: int, ticket: Ticket):
        show = arg(request, "show") or "available"
        if show not in SHOWS:
            raise ActionError("bad show")
        status = (arg(request, "status") or "")[:256]
        await self.hub.set_show(uid, show, status)
        return "ok"

    async def status(self, request, uid: int, ticket: Ticket):
        to = one_id(request, "to")
        show = (arg(request, "show") or "typing")[:32]
        if await self.hub.is_online(to):
            await self.hub.notify([to], Event("status", {"user": uid, "to": to, "show": show}))
        return "ok"

    async def history(self, request, uid: int):
        return await self._history(uid, one_id(request, "id", "ids"), arg(request, "type"))

    async def histories(self, request, uid: int):
        kind = arg(request, "type")
        return {str(i): await self._history(uid, i, kind) for i in ids_param(request, "ids")}

    async def clear_history(self, request, uid: int):
        for peer in ids_param(request, "ids", "id"):
            kind = "multicast" if await self.store.get_group(peer) else "unicast"
            await self.store.clear_history(uid, self._conversation(uid, peer, kind))
        return "ok"

    async def members(self, request, uid: int):
        try:
            group = await self.groups.get(one_id(request, "id", "ids"))
        except GroupError as e:
            raise ActionError(str(e)) from None
        if uid not in group.members and not group.public:
            raise ActionError("not a member of this room")
        users = await self.store.get_users(group.members)
        return [{"id": str(m), "nick": users[m].name} for m in group.members if m in users]

    async def join(self, request, uid: int, ticket: Ticket):
        """Join a public room, or unblock one of the user's rooms (the client calls ``join``
        when its user unblocks a room); answers the roomInfo."""
        gid = one_id(request, "id")
        try:
            group = await self.groups.join(gid, uid)
        except GroupError as e:
            raise ActionError(str(e)) from None
        await self._block(uid, gid, False)
        others = [m for m in group.members if m != uid]
        await self.hub.notify(others, Event("join", {"user": uid, "room": gid}))
        # No "blocked" here: the client also joins a blocked room while its window is open
        # (and leaves it again on close), and must keep its own flag meanwhile.
        return await self._room_json(group, blocked=None)

    async def leave(self, request, uid: int, ticket: Ticket):
        """Block a room: the client calls ``leave`` when its user blocks a room (or closes a
        blocked one).  Membership and history stay; the user's webim tabs get none of its
        messages until ``join``.  Membership itself belongs to the host (66boss, xuanxuan),
        as it belonged to the host site in the original."""
        gid = one_id(request, "id")
        try:
            group = await self.groups.get(gid)
        except GroupError as e:
            raise ActionError(str(e)) from None
        if uid not in group.members:
            raise ActionError("not a member of this room")
        await self._block(uid, gid, True)
        others = [m for m in group.members if m != uid]
        await self.hub.notify(others, Event("leave", {"user": uid, "room": gid}))
        return "ok"

    async def _block(self, uid: int, gid: int, block: bool) -> None:
        """Record a block or unblock and apply it to the user's tickets on this node (whose
        set also holds the rooms the client's setting lists as blocked)."""
        stored = blocked_rooms(await self.store.user_fields(uid, "webim_blocked"))
        live = self.tickets.blocked.get(uid, frozenset()) | stored
        if block:
            stored, live = stored | {gid}, live | {gid}
        else:
            stored, live = stored - {gid}, live - {gid}
        await self.store.set_user_fields(uid, webim_blocked=json.dumps(sorted(stored)))
        self.tickets.set_blocked(uid, live)

    async def buddies(self, request, uid: int):
        friends = await self.store.friends(uid)
        result = []
        for bid in ids_param(request, "ids"):
            info = await self._buddy_json(bid, friends)
            if info is not None:
                result.append(info)
        return result

    async def rooms(self, request, uid: int):
        result = []
        for gid in ids_param(request, "ids"):
            group = await self.store.get_group(gid)
            if group is not None and (uid in group.members or group.public):
                result.append(await self._room_json(group))
        return result

    async def setting(self, request, uid: int):
        """Store the client's settings (``data``: its whole settings object, JSON); with no
        parameter at all, answer the stored ones (for the host page's ``_IMC.setting``: the
        client takes its settings from there, not from ``online``)."""
        data = arg(request, "data")
        if data is None and not set(request.args) - SETTING_NOT_FIELDS:
            return stored_setting(await self.store.user_fields(uid, "webim_setting"))
        if data is None:
            # The seed's draft sent the settings as separate parameters.
            data = json.dumps({k.decode(): v[0].decode("utf-8", "replace")
                               for k, v in request.args.items()
                               if k not in SETTING_NOT_FIELDS})
        try:
            jsonin.read(data, limit=SETTING_MAX)
        except jsonin.BadJSON as e:
            raise ActionError(f"data must be JSON: {e}") from None
        await self.store.set_user_fields(uid, webim_setting=data)
        return "ok"

    async def notifications(self, request, uid: int):
        return []

    async def download_history(self, request, uid: int):
        peer = one_id(request, "id")
        items = await self._history(uid, peer, arg(request, "type"))
        rows = "".join(
            f"<tr><td>{html.escape(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(int(i['timestamp']) / 1000)))}"  # noqa: E501
            f"</td><td>{html.escape(i['nick'])}</td><td>{html.escape(i['body'])}</td></tr>"
            for i in items)
        page = (f"<!doctype html><meta charset='utf-8'><title>History {peer}</title>"
                f"<table>{rows}</table>").encode("utf-8")
        return Download(page, f"history-{peer}.html")


class Download:
    """A reply that is a file, not JSON."""

    def __init__(self, body: bytes, filename: str):
        self.body = body
        self.filename = filename
