"""xuanxuan 1.0 over TCP: one JSON object + ``\\n`` per request, response and push.

Requests ``{module, method, params, sid}`` are handled in order; method names are matched
case-insensitively and answered with the method name as sent.  Responses carry ``result``
``success`` or ``fail`` (with ``message``, and the reason in ``data``).  Pushes are one JSON
array of ``{id, module, method, data}``.  A line over ``--max-frame`` gets a fail reply and a
close; a line that is not a JSON object gets a fail reply.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections import deque
from bisect import bisect_left
from typing import Callable, Sequence

from twisted.internet import defer, protocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from imd import jsonin
from imd.accounts import Accounts
from imd.chats import Chat, ChatError, Chats
from imd.config import Config
from imd.hub import Hub, HubError, Logout, written
from imd.metrics import CONNECTIONS
from imd.model import (EMOTICON, FILE, GROUP, IMAGE, OFFLINE, PROFILE, TEXT, UNICAST, Event,
                       Message, User, group_conversation, json_bytes, one2one_gid, seen_by)
from imd.guard import source_host
from imd.protocols.flow import Outbox, ReadGate, tune_socket
from imd.protocols.xuanxuan.directory import Directories
from imd.protocols.xuanxuan.presence import Batch, PresenceFeed
from imd.throttle import Throttled
from imd.unavailable import log_failure

log = Logger()
SHOW_OF_STATUS = {"online": "available", "away": "away", "busy": "busy"}
STATUSES = tuple(SHOW_OF_STATUS)
STATUS_OF_SHOW = {"away": "away", "busy": "busy", "dnd": "busy", "invisible": "offline",
                  "unavailable": "offline"}  # any other show: online
CONTENT_IN = {"text": TEXT, "emoticon": EMOTICON, "image": IMAGE, "file": FILE}
CONTENT_OUT = {TEXT: "text", EMOTICON: "emoticon", IMAGE: "image", FILE: "file"}
PAGE_MAX = 200
LOGIN_CHUNK = 100  # queued messages per push line at login
TARGETS_MAX = 1024  # chats a session remembers where its messages go
PER_USER = ("star", "hide", "mute")  # chat fields that differ per user
# The fields of a user record that the user list leaves out when they have this value.
UNLISTED = {"avatar": "", "role": "", "dept": 0, "admin": "no", "gender": "", "email": "",
            "mobile": "", "site": "", "phone": ""}
BIG_CHAT = 256  # members from which a chat's member list is encoded once per change
BIG_CHATS_KEPT = 16  # big chats whose encoded member list is kept
# A message a xuanxuan client sent keeps the client's gid in its extension after this mark,
# so that its sender is shown that gid again (the client matches its own copy by gid).
OWN_GID = "xx:"
GIDS = uuid.UUID("5c0b8bb4-3f0e-4d1c-9a57-9f1d0c3e6b21")  # namespace of the gids shown
# _message_json's dict as encode() writes it: id, gid, cgid, user, date, contentType, content
MESSAGE_JSON = ('{"id":%d,"gid":%s,"cgid":%s,"user":%d,"date":%d,"type":"normal",'
                '"contentType":"%s","content":%s}')
encode_string = json.encoder.encode_basestring  # a str as json.dumps(ensure_ascii=False) does


encode = json_bytes  # one JSON text as every line of this protocol is written


def presence_user_json(event: Event, viewer: int | None, admin: bool) -> dict:
    """The user record of a presence event as ``viewer`` sees it: ``id`` and ``status`` of
    a login, logout or status change (all the 1.0 client reads of them: its socket.js
    ``login``, ``logout`` and ``userchangestatus`` handlers set the member's ``status``
    from ``data.id``/``data.status``, nothing else, when the user is not the client's
    own); the listed record of a profile change (``userChangeName``, which the 1.0 client
    has no handler for; other clients may show the new name)."""
    data = event.data
    online = data["change"] != OFFLINE
    if data["change"] != PROFILE:
        return {"id": data["user"], "status": status_of(data["show"], online)}
    return XuanxuanService.listed_json(User(**data["profile"]),
                                       {"show": data["show"], "admin": ""}, online, viewer,
                                       admin)


def status_of(show: str, online: bool) -> str:
    """The xuanxuan status of a user with that show (online or not)."""
    return STATUS_OF_SHOW.get(show, "online") if online else "offline"


def message_gid(m: Message, viewer: int | None) -> str:
    """The gid ``viewer`` is shown for a message: the client's own gid to its sender; to
    everyone else one no other message has (the client updates, not adds, on a repeated gid:
    a repeat from the same sender with the same client gid is an update, as the 1.0 server
    made it for images and files)."""
    if m.extension.startswith(OWN_GID):
        own = m.extension[len(OWN_GID):]
        if m.sender == viewer:
            return own
        return str(uuid.uuid5(GIDS, f"{m.sender}/{own}"))
    return str(uuid.uuid5(GIDS, str(m.id)))


def shared(info: dict) -> dict:
    """A chat object fit for every member: without one user's star/hide/mute."""
    return {k: v for k, v in info.items() if k not in PER_USER}


def chat_key(info: dict) -> str:
    """The hub conversation of a chat object as the client is shown it."""
    if info.get("type") == "one2one":
        return one2one_gid(*info["gid"].split("&"))
    return group_conversation(info["id"])


class XuanxuanService:
    def __init__(self, hub: Hub, accounts: Accounts, chats: Chats, config: Config):
        self.hub = hub
        self.store = hub.store
        self.accounts = accounts
        self.chats = chats
        self.config = config
        self.connections: set["XuanxuanProtocol"] = set()
        self._contacts: list[tuple[Chat, int, defer.Deferred]] = []  # see contact()
        self._members_json: dict[str, tuple[Sequence[int], bytes]] = {}  # see chats_json()
        self.directories = Directories(lambda: defer.ensureDeferred(self._read_directory()),
                                       self.listed_json, encode, hub.clock,
                                       config.xuanxuan_directory_age)
        # Every session's presence pushes, coalesced per window and encoded once (point 6).
        self.presence = PresenceFeed(hub.clock, config.xuanxuan_presence_window,
                                     lambda event: encode(presence_user_json(event, None, False)),
                                     self.directories.apply)
        hub.add_directory_feed(self.presence)

    def contact(self, message: Message, uid: int) -> defer.Deferred:
        """Deferred[dict | None]: the chat object of a message's chat as ``uid`` is shown
        it, the chat listed as theirs from now on (None: the group is gone).  The
        one-to-one chats asked for during one reactor turn share one round trip."""
        if message.ctype == GROUP:
            return defer.ensureDeferred(self._group_contact(message, uid))
        d = defer.Deferred()
        self._contacts.append((self.chats.one2one(message.conversation, uid), uid, d))
        if len(self._contacts) == 1:
            self.hub.clock.callLater(0, self._contact_all)
        return d

    def _contact_all(self) -> None:
        batch, self._contacts = self._contacts, []
        self.store.one2one_contacts([(chat.gid, *chat.members, uid) for chat, uid, _ in batch]
                                    ).addCallbacks(self._contacted, self._not_contacted,
                                                   callbackArgs=(batch,), errbackArgs=(batch,))

    def _contacted(self, rows: list, batch: list) -> None:
        for (chat, uid, d), (meta, flags) in zip(batch, rows):
            chat.meta, chat.mine = meta, flags
            info = self.chats.info_now(chat)
            if info is not None:  # a chat made by its first message: no accounts to look up
                d.callback(info)
            else:
                defer.ensureDeferred(self.chats.infos([chat], uid)).addCallback(
                    lambda infos: infos[0]).chainDeferred(d)

    @staticmethod
    def _not_contacted(failure, batch: list) -> None:
        for _, _, d in batch:
            d.errback(failure)

    async def _group_contact(self, message: Message, uid: int) -> dict | None:
        try:
            chat = await self.chats.of_message(message, uid)
        except ChatError:
            return None
        return (await self.chats.infos([chat], uid))[0]

    def chats_json(self, infos: list[dict]) -> bytes:
        """``encode(infos)``, with the member list of a big chat (the system chat: every
        user) encoded once per change of its members, not once per login."""
        return b"[" + b",".join(map(self._chat_json, infos)) + b"]"

    def _chat_json(self, info: dict) -> bytes:
        members = info["members"]
        if len(members) < BIG_CHAT:
            return encode(info)
        cached = self._members_json.get(info["gid"])
        if cached is None or cached[0] is not members:
            # Another tuple (logins that read the group at once each got one): compared
            # once, then kept, so that the next logins, given this one, find it at once.
            if len(self._members_json) >= BIG_CHATS_KEPT:
                self._members_json.clear()
            cached = self._members_json[info["gid"]] = (
                members, cached[1] if cached is not None and cached[0] == members
                else encode(members))
        head = encode({k: v for k, v in info.items() if k != "members"})
        return b"".join((head[:-1], b',"members":', cached[1], b"}"))

    async def own_json(self, user: User, online: bool) -> dict:
        """The user's own record (private fields included)."""
        fields = await self.store.user_fields(user.id, "show", "admin")
        return self._user_json(user, fields, online, user.id, False)

    @staticmethod
    def _user_json(user: User, fields: dict, online: bool, viewer: int | None,
                   admin: bool) -> dict:
        """``user`` as the client of ``viewer`` (an administrator or not) is shown them."""
        user = seen_by(user, viewer, admin)
        return {"id": user.id, "account": user.account, "realname": user.name,
                "avatar": user.avatar, "role": "", "dept": 0,
                "status": status_of(fields["show"], online),
                "admin": fields["admin"] or "no", "gender": user.sex, "email": user.mail,
                "mobile": "", "site": "", "phone": ""}

    @staticmethod
    def listed_json(user: User, fields: dict, online: bool, viewer: int | None,
                    admin: bool) -> dict:
        """``user``'s entry in the user list (userGetlist) as ``viewer`` is shown it: the
        record without its empty or default fields.  Every login is sent every user (1.9 MB
        for 10,000 users with them, half that without).  The 1.0 client copes: its
        ``usergetlist`` handler makes a Member of each entry and replaces its member store
        (socket.js, dao.js ``initMembers``); what it reads of a member treats a missing
        field as the empty one (member.js ``displayName``, ``isSuperAdmin``: admin ===
        'super'; user.js ``fixAvatar``: no avatar; views/contacts/contact.js: email,
        mobile, phone and site shown only when set, gender and role looked up in a table
        with no entry for "" either; dept is read nowhere)."""
        record = XuanxuanService._user_json(user, fields, online, viewer, admin)
        return {k: v for k, v in record.items() if UNLISTED.get(k, record) != v}

    async def all_users_json(self, viewer: int, admin: bool) -> list[dict]:
        """Every user, as userGetlist shows them to ``viewer``."""
        directory = await self.directories.get()
        return self.directories.entries(directory, viewer, admin)

    async def _read_directory(self) -> tuple[list[User], dict, set[int]]:
        """Every user, their show and admin fields, who is online (three round trips)."""
        users = await self.store.list_users()
        online = await self.hub.online_among(u.id for u in users)
        fields = await self.store.users_fields([u.id for u in users], "show", "admin")
        return users, fields, online

def param(params, index: int, name: str, default=None):
    """A positional (list) or named (dict) parameter."""
    if isinstance(params, list):
        return params[index] if index < len(params) else default
    if isinstance(params, dict):
        return params.get(name, default)
    return default


def text(params, index: int, name: str, default: str = "") -> str:
    """A string parameter (``default`` when absent or null); any other type is refused."""
    value = param(params, index, name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise Refused(f"{name} must be a string")
    return value


def id_list(value) -> list[int]:
    """Member ids given as [1, 2], [{"id": 1}], "1,2" or 1."""
    if isinstance(value, (int, str)):
        value = str(value).split(",")
    ids = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict):
            item = item.get("id")
        text = str(item).strip()
        if text.isdigit() and len(text) <= 18:
            ids.append(int(text))
    return ids


def truthy(value, default: bool = True) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.lower() not in ("", "0", "false", "no")
    return bool(value)


class Refused(Exception):
    pass


class Encoded:
    """A reply's ``data`` already encoded as JSON (see _reply)."""

    __slots__ = ("json",)

    def __init__(self, json: bytes):
        self.json = json


def is_member(members: Sequence[int], uid: int) -> bool:
    """``uid in members`` for a sorted member list (a search, not a scan, for the system
    chat's every user)."""
    if len(members) < BIG_CHAT:
        return uid in members
    i = bisect_left(members, uid)
    return i < len(members) and members[i] == uid


def message_items(params) -> list:
    """The messages of a ``message`` request: [[m, ...]], {"messages": [...]}, [m, ...]
    or one m; Refused unless 1-100."""
    messages = param(params, 0, "messages") if isinstance(params, list) and params and \
        isinstance(params[0], list) else (params.get("messages") if isinstance(params, dict)
                                           else params)
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, list) or not messages or len(messages) > 100:
        raise Refused("message takes a list of 1-100 messages")
    return messages


def message_item(item) -> tuple[str, str, str]:
    """(chat gid, hub kind, extension) of one message; Refused when malformed."""
    if not isinstance(item, dict) or not isinstance(item.get("content"), str):
        raise Refused("each message needs cgid and a text content")
    kind = item.get("contentType") or "text"
    kind = CONTENT_IN.get(kind) if isinstance(kind, str) else None
    if kind is None:
        raise Refused("contentType must be text, emoticon, image or file")
    client_gid = str(item.get("gid") or "")[:64]
    return str(item.get("cgid", "")), kind, OWN_GID + client_gid if client_gid else ""


class XuanxuanProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    user_id: int | None = None
    admin = False  # a system administrator (imdctl admin)
    watches_directory = True  # the client lists every user: it gets everyone's presence
    protocol = "xuanxuan"

    @property
    def directory_feed(self) -> PresenceFeed:
        """How the hub hands this session everyone's presence: the service's one feed."""
        return self.service.presence

    def connectionMade(self):
        self.service: XuanxuanService = self.factory.service
        self.MAX_LENGTH = self.service.config.max_frame
        tune_socket(self.transport, self.service.config.heartbeat
                    + self.service.config.heartbeat_timeout)
        try:  # a reply must not wait for the client's delayed ACK of the one before (Nagle)
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not TCP
        self.nonce = secrets.token_hex(8)
        self.sid: str | None = None
        self._chain = defer.succeed(None)
        # Messages handed to the hub at once (_post_now), in request order: [request, the
        # encoded reply once stored (b"": none), the chat's gid as shown]; _drained fires
        # when they are all answered.
        self._answers: deque[list] = deque()
        self._drained: defer.Deferred | None = None
        self._ack_heads: dict[tuple[str, str], bytes] = {}
        # Pushes (messages, notices) that wait, in order: each a callable that writes and
        # returns None, or a Deferred to wait for before the next one runs.  _hold: the
        # reasons they wait (the login pushes not sent yet; a push waiting for its Deferred).
        self._pushes: deque[Callable[[], defer.Deferred | None]] | None = None  # made when used
        self._hold = 0
        self._collect: list[Message] | None = None
        # The chats this client has been shown (conversation -> the chat's gid): a message
        # on any other chat is preceded by the chat (a 1.0 client drops it otherwise).
        self.shown: dict[str, str] = {}
        self._rendering: list[Message] = []  # delivered, not yet written (login, first contact)
        self._slow = 0  # requests queued on _chain for _handle and not yet done
        self._contacting: set[str] = set()  # conversations whose first contact is under way
        self._targets: dict[str, tuple[str, int, str, str, str]] = {}  # see _target
        self._push_serial = 0
        self._gone = False
        self._logout: Logout | None = None
        self.outbox = Outbox(self.transport, self._emit, self.service.config.max_pending,
                             self._overflowed)
        self._gate = ReadGate(self.transport)
        self.service.connections.add(self)
        CONNECTIONS.labels(self.protocol).inc()

    # -- framing ---------------------------------------------------------------------------

    def lineReceived(self, line: bytes):
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        try:
            request = jsonin.read(line)
        except jsonin.BadJSON:
            request = None
        if not isinstance(request, dict):
            self._reply({}, "fail", "request must be one JSON object")
            return
        self._gate.begin()
        posted = None if self._slow else self._post_now(request)
        if posted is not None:  # stored in this turn's post script; answered in turn
            stored, cgid = posted
            answer = [request, None, cgid]
            self._answers.append(answer)
            stored.addCallback(self._stored, answer).addErrback(self._not_stored, answer)
            return
        self._slow += 1
        if self._answers and self._drained is None:  # after the messages under way
            drained = self._drained = defer.Deferred()
            self._chain.addCallback(lambda _: drained)
        self._chain.addCallback(lambda _: defer.ensureDeferred(self._handle(request)))
        self._chain.addBoth(self._slow_done)
        self._chain.addErrback(self._failed, request)
        self._chain.addBoth(self._gate.end)

    def _slow_done(self, result):
        self._slow -= 1
        return result

    def _post_now(self, request: dict) -> tuple[defer.Deferred, str] | None:
        """The hot path: a ``message`` request of one message to a chat this session has
        posted to before, with no other request under way, is handed to the hub at once
        (so that a connection's messages share a post script call) and answered in order
        once stored: (Deferred[Message], the chat's gid as shown); None for every other
        request (handled in order by _handle)."""
        if self._slow or self.user_id is None or self._gone or \
                str(request.get("method") or "").lower() != "message" or \
                str(request.get("module") or "").lower() != "chat":
            return None
        try:
            messages = message_items(request.get("params"))
            if len(messages) != 1:
                return None
            cgid, kind, extension = message_item(messages[0])
            target = self._targets.get(cgid)
            if target is None:
                if "&" not in cgid:
                    return None  # a group chat: resolved once, in turn
                target = self._one2one_target(cgid)
        except (Refused, ChatError):
            return None  # _handle gives the error in turn
        return (self._post(target, kind, messages[0]["content"], extension),
                self.shown[target[2]])

    def _stored(self, m: Message, answer: list) -> None:
        request = answer[0]
        head = self._ack_heads.get((request["module"], request["method"]))
        if head is None:
            head = self._ack_heads[request["module"], request["method"]] = (
                '{"module":%s,"method":%s,"result":"success","message":"","sid":%s,"data":['
                % (encode_string(request["module"]), encode_string(request["method"]),
                   encode_string(self.sid or ""))).encode("utf-8")
        answer[1] = b"".join((head, self._message_bytes(m, self.user_id, answer[2]),
                              b"]}\n"))
        self._answer()

    def _not_stored(self, failure, answer: list) -> None:
        answer[1] = b""
        if failure.check(HubError):
            self._reply(answer[0], "fail", str(failure.value), answer=answer)
        elif not self._gone:
            log_failure(log, "xuanxuan message failed", failure)
            self._reply(answer[0], "fail", "server error", answer=answer)
        self._answer()

    def _answer(self) -> None:
        """Write the replies of the messages under way that are ready, in request order."""
        answers = self._answers
        while answers and answers[0][1] is not None:
            data = answers.popleft()[1]
            if data:
                self.outbox.put(data)
            self._gate.end()
        if not answers and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def lineLengthExceeded(self, line):
        self._reply({}, "fail", "request too long")
        self.transport.loseConnection()

    def _write(self, obj, messages=(), bounded: bool = True) -> None:
        self.outbox.put(encode(obj) + b"\n", messages, bounded)

    def _emit(self, data: bytes) -> bool:
        self.transport.write(data)
        return True

    def _reply(self, request: dict, result: str, message: str = "", data=None,
               answer: list | None = None, **extra):
        """Answer ``request`` now, or with ``answer``: when its turn comes (_answer)."""
        obj = {"module": request.get("module", ""), "method": request.get("method", ""),
               "result": result, "message": message, "sid": self.sid or ""}
        obj["data"] = message if data is None and result == "fail" else data
        obj.update(extra)
        if isinstance(data, Encoded):  # spliced in as is, last
            del obj["data"]
            line = b"".join((encode(obj)[:-1], b',"data":', data.json, b"}\n"))
        else:
            line = encode(obj) + b"\n"
        if answer is None:
            self.outbox.put(line)
        else:
            answer[1] = line

    def _packet(self, module: str, method: str, data) -> dict:
        self._push_serial += 1
        return {"id": self._push_serial, "module": module, "method": method, "data": data}

    def push(self, *packets: dict, messages=(), bounded: bool = True) -> None:
        """Write packets in one push; ``messages``: the hub messages they show;
        ``bounded=False``: not counted against --max-pending (the login backlog)."""
        self._write(list(packets), messages, bounded)

    def _failed(self, failure, request):
        if self._gone:  # it ran on after its connection closed (user_id is gone)
            log.debug("xuanxuan request ended by the close of its connection: {f}",
                      f=failure.getErrorMessage())
            return
        log_failure(log, "xuanxuan request failed", failure)
        self._reply(request, "fail", "server error")

    # -- requests --------------------------------------------------------------------------

    async def _handle(self, request: dict) -> None:
        if self._gone:  # queued behind a request that was running at the close
            return
        module = str(request.get("module") or "").lower()
        method = str(request.get("method") or "").lower()
        params = request.get("params")
        if (module, method) == ("chat", "ping"):
            self._reply(request, "success")
            return
        if (module, method) == ("chat", "login"):
            await self._login(request, params)
            return
        if self.user_id is None:
            self._reply(request, "fail", "login first")
            return
        handler = METHODS.get((module, method))
        if handler is None:
            self._reply(request, "fail", f"unknown method {module}/{method}")
            return
        try:
            await handler(self, request, params)
        except (Refused, ChatError, HubError) as e:
            self._reply(request, "fail", str(e))

    async def _login(self, request, params) -> None:
        service = self.service
        account, password = param(params, 0, "account"), param(params, 1, "password")
        status = param(params, 2, "status", "online")
        if not isinstance(account, str) or not isinstance(password, str) or \
                not isinstance(status, str):
            self._reply(request, "fail", "login takes [account, md5(password), status]")
            return
        if self.user_id is not None:
            self._reply(request, "fail", "already logged in")
            return
        try:
            user = await service.accounts.authenticate(
                account, password.strip().lower(), source_host(self.transport.getPeer()))
        except Throttled as e:
            self._reply(request, "fail", str(e))
            return
        if self._gone:
            return
        if user is None:
            self._reply(request, "fail", "wrong account or password")
            return
        show = SHOW_OF_STATUS.get(status, "available")
        # Side by side (a storm of logins waits for fewer round trips): the show (written
        # before hub.login, whose presence change reads it), the token, my record and the
        # notice that ends this account's older sessions.
        outcomes = await defer.DeferredList([defer.ensureDeferred(step) for step in (
            service.hub.set_show(user.id, show), service.accounts.issue_token(user.id),
            service.own_json(user, online=True),
            service.hub.notify([user.id], Event("login", {"protocol": "xuanxuan",
                                                         "session": self.nonce}),
                               exclude=self))], consumeErrors=True)
        if outcomes[1][0]:
            self.sid = outcomes[1][1]
        failed = [value for ok, value in outcomes if not ok]
        if failed or self._gone:
            if self.sid and self._gone:  # connectionLost did not see the sid yet
                await service.accounts.revoke(self.sid)
            if failed:
                failed[0].raiseException()
            return
        me = outcomes[2][1]
        me["status"] = status_of(show, True)  # read beside the write of the show
        self.user_id = user.id
        self.admin = me["admin"] == "super"  # sees every user's private fields
        self._reply(request, "success", data=me)
        # Messages (the offline queue, then live ones) wait until the user and chat lists
        # are pushed, so that the client knows the chats they refer to.
        self._collect = []
        # Pushes (live messages, chat and presence notices) wait for the login pushes.
        self._hold += 1
        chats: defer.Deferred | None = None
        try:
            service.presence.sessions.add(self)  # registered with the hub from now on
            try:
                # hub.login registers the session before its first round trip: the chats
                # read from then on (beside its round trips) miss no chat notice.
                logging_in = defer.ensureDeferred(service.hub.login(self))
                chats = defer.ensureDeferred(service.chats.of_user(user.id))
                logout = await logging_in
            except BaseException:
                service.presence.sessions.discard(self)
                raise
            if self._gone:  # closed while the login was under way
                await logout(self._unsent())
                return
            self._logout = logout
            queued, self._collect = self._collect, None
            self._rendering[:0] = queued  # delivered, not yet written: requeued if we end
            await self._send_lists(user.id, queued, chats)
        finally:
            if chats is not None:
                chats.addErrback(lambda f: None)  # not awaited: the login ended before
            self._resume()

    async def _send_lists(self, uid: int, queued: list[Message],
                          chats_read: defer.Deferred) -> None:
        """The login pushes: every user, my chats (``chats_read``: Deferred[list[Chat]],
        with the chats of queued messages from chats I was never shown), the queued
        messages."""
        service = self.service
        directory = await service.directories.get(uid)
        if uid not in directory.spans:  # made after the fetch it joined had started
            directory = await service.directories.get(uid)
        mine = await chats_read
        keys = {c.conversation for c in mine}
        for m in queued:  # e.g. the first message from another protocol's user
            if m.conversation not in keys:
                keys.add(m.conversation)
                try:
                    mine.append(await service.chats.of_message(m, uid))
                except ChatError:
                    pass  # the group is gone
        chats = await self._chat_infos(mine)
        if self._gone:  # connectionLost requeued the queued messages
            return
        del self._rendering[:len(queued)]
        queued = [m for m in queued if m.conversation in self.shown]
        # The user list on a line of its own (the same bytes for every login that is shown
        # the list as is), then my chats and the queued messages: the 1.0 client runs the
        # lines in order (socket.js _handleData), as it runs the packets of one array.
        for piece in service.directories.push_line(service.directories.latest(directory), uid,
                                                   self.admin, service.presence.pending_status()):
            self.outbox.put(piece, (), False)
        parts = []
        if chats:
            self._push_serial += 1
            parts.append(b'{"id":%d,"module":"chat","method":"getList","data":%s}'
                         % (self._push_serial, service.chats_json(chats)))
        # The backlog in pushes of LOGIN_CHUNK messages, so that no line grows with it.
        chunks = [queued[i:i + LOGIN_CHUNK] for i in range(0, len(queued), LOGIN_CHUNK)] or [[]]
        for chunk in chunks:
            if chunk:
                parts.append(encode(self._packet("chat", "message",
                                                 [self._message_json(m) for m in chunk])))
            if parts:
                self.outbox.put(b"[" + b",".join(parts) + b"]\n", chunk, False)
            parts = []
        for m in queued:
            written(self, m)

    async def _chat_infos(self, chats: list[Chat]) -> list[dict]:
        """The chat objects for this client; the ones it is a member of count as shown."""
        infos = await self.service.chats.infos(chats, self.user_id)
        for info in infos:
            self._saw(info)
        return infos

    def _saw(self, info: dict) -> None:
        """This client was just sent ``info``: a chat it is (or no longer is) a member of."""
        if is_member(info["members"], self.user_id):
            self.shown[chat_key(info)] = info["gid"]
        else:
            self.shown.pop(chat_key(info), None)

    async def _chat_info(self, chat: Chat) -> dict:
        return (await self._chat_infos([chat]))[0]

    async def _push_chat(self, chat: Chat, method: str, to=None, info=None) -> None:
        """Push a chat's new state to its members, or to ``to`` (every session, every
        node), without this user's own star/hide/mute (the client assigns what it gets)."""
        info = shared(info or await self._chat_info(chat))
        await self.service.hub.notify(chat.members if to is None else to,
                                      Event("xuanxuan", {"method": method, "data": info}))

    # -- hub Session -----------------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        if self._collect is not None:
            self._collect.append(message)
            return
        conversation = message.conversation
        if conversation in self.shown and not self._pushes and not self._hold:
            self._write_message(message, [])  # nothing queued ahead of it: write it now
            return
        self._rendering.append(message)
        contact = None
        if conversation not in self.shown and conversation not in self._contacting:
            # First contact: fetch the chat now, beside the pushes queued ahead of it (the
            # later messages of the chat find it shown by the time they are written).
            contact = self.service.contact(message, self.user_id)
            self._contacting.add(conversation)
        self._later(lambda: self._push_message(message, contact))

    def _later(self, push: Callable[[], defer.Deferred | None]) -> None:
        """Run ``push`` after the login pushes and the pushes queued before."""
        pushes = self._pushes
        if pushes is None:  # most of the time an idle connection has none: no deque
            pushes = self._pushes = deque()
        pushes.append(push)
        if len(pushes) == 1 and not self._hold:
            self._run_pushes()

    def _run_pushes(self) -> None:
        pushes = self._pushes
        while pushes and not self._hold:
            try:
                waiting = pushes.popleft()()
            except Exception:
                log.failure("xuanxuan push failed")
                continue
            if waiting is None:
                continue
            waiting.addErrback(lambda f: log.failure("xuanxuan push failed", f))
            if not waiting.called:  # the next push waits for this one
                self._hold += 1
                waiting.addBoth(self._resume)
        if pushes is not None and not pushes and self._pushes is pushes:
            self._pushes = None  # a burst's deque is not kept by an idle connection

    def _resume(self, _=None) -> None:
        self._hold -= 1
        self._run_pushes()

    def _push_message(self, message: Message,
                      contact: defer.Deferred | None = None) -> defer.Deferred | None:
        if message.conversation not in self.shown:  # first contact: the chat comes first
            if contact is None:
                contact = self.service.contact(message, self.user_id)
            return contact.addCallback(self._first_contact, message)
        if contact is not None:
            contact.addErrback(lambda f: None)  # shown meanwhile (a getList)
            self._contacting.discard(message.conversation)
        self._push_rendered(message, [])
        return None

    def _first_contact(self, info: dict | None, message: Message) -> None:
        self._contacting.discard(message.conversation)
        packets = []
        if info is not None:
            self._saw(info)
            packets.append(self._packet("chat", "create", info))
        self._push_rendered(message, packets)

    def _push_rendered(self, message: Message, packets: list[dict]) -> None:
        """Write a message that waited in _rendering (after ``packets``), unless the
        session ended and requeued it."""
        rendering = self._rendering
        if rendering and rendering[0] is message:  # pushes run in delivery order
            del rendering[0]
        else:
            for i, m in enumerate(rendering):
                if m is message:
                    del rendering[i]
                    break
            else:
                return  # the session ended and requeued it
        if message.conversation in self.shown:  # else: no longer a member
            self._write_message(message, packets)

    def _write_message(self, message: Message, packets: list[dict]) -> None:
        """Push a message (after ``packets``) on a chat this client has been shown.  The
        message's JSON is encoded once for every recipient but its sender (point 6)."""
        if message.sender == self.user_id:
            packets.append(self._packet("chat", "message", [self._message_json(message)]))
            self.push(*packets, messages=(message,))
        else:
            self._push_serial += 1
            head = encode(packets)[1:-1]
            self.outbox.put(b"".join((
                b"[", head, b"," if head else b"",
                b'{"id":%d,"module":"chat","method":"message","data":[' % self._push_serial,
                self._shared_json(message), b"]}]\n")), (message,))
        written(self, message)

    def _shared_json(self, m: Message) -> bytes:
        """The encoded JSON of a message as every viewer but its sender is shown it,
        cached on the message (per chat gid shown)."""
        cgid = self.shown[m.conversation]
        if m.wire is None:
            m.wire = {}
        cached = m.wire.get("xuanxuan")
        if cached is None or cached[0] != cgid:
            cached = m.wire["xuanxuan"] = (cgid, self._message_bytes(m, None, cgid))
        return cached[1]

    def _message_bytes(self, m: Message, viewer: int | None, cgid: str = "") -> bytes:
        """``encode(self._message_json(m))`` as ``viewer`` (None: anyone but the sender)
        is shown it (``cgid``: its chat's gid, if known), without building the dict."""
        kind = CONTENT_OUT.get(m.kind)
        return (MESSAGE_JSON % (
            m.id, encode_string(message_gid(m, viewer)),
            encode_string(cgid or self.shown[m.conversation]), m.sender, m.ts // 1000,
            kind or "text", encode_string(m.body if kind else f"[{m.kind}] {m.body}"))
        ).encode("utf-8")

    def _unsent(self) -> list[Message]:
        """Every message delivered to this session and not written, in order."""
        unsent = self.outbox.close() + (self._collect or []) + self._rendering
        self._collect, self._rendering = None, []
        return unsent

    def _message_json(self, m: Message) -> dict:
        """A message on a chat this client has been shown."""
        kind = CONTENT_OUT.get(m.kind)
        content = m.body if kind else f"[{m.kind}] {m.body}"
        return {"id": m.id, "gid": message_gid(m, self.user_id),
                "cgid": self.shown[m.conversation], "user": m.sender,
                "date": m.ts // 1000, "type": "normal", "contentType": kind or "text",
                "content": content}

    def notice(self, event: Event) -> None:
        data = event.data
        if event.kind == "login" and data.get("protocol") == "xuanxuan" and \
                data.get("session") != self.nonce:
            self._write({"module": "chat", "method": "kickoff",
                         "message": "This account logined in another place."})
            self.transport.loseConnection()
        elif event.kind == "xuanxuan":
            # After the login pushes, in order with the messages waiting to be written.
            self._later(lambda: self._push_notice(event))
        # Presence comes from the service's feed (presence_batch), not as a notice.

    def _push_notice(self, event: Event) -> None:
        pushed = event.data["data"]
        chat = pushed.get("chat", pushed) if isinstance(pushed, dict) else None
        if isinstance(chat, dict) and "members" in chat and "gid" in chat:
            self._saw(chat)
        self.push(self._packet("chat", event.data["method"], pushed))

    def presence_batch(self, batch: Batch) -> None:
        """The feed's coalesced presence changes: after the login pushes, in order with the
        pushes waiting to be written."""
        if self._pushes or self._hold:
            self._later(lambda: self._push_batch(batch))
        else:  # nothing waits (an idle session): no closure, no deque
            self._push_batch(batch)

    def _push_batch(self, batch: Batch) -> None:
        line = batch.line_for(self.user_id, self._admin_view if self.admin else None)
        if line is not None:
            self.outbox.put(line)

    def _admin_view(self, event: Event) -> bytes:
        return encode(presence_user_json(event, self.user_id, True))

    def _overflowed(self) -> None:
        """The client stopped reading: end the session now (what was not written goes back
        to the offline queue), then close after what the transport took."""
        self._leave()
        self.transport.loseConnection()

    def _leave(self) -> None:
        # A login under way sees _gone and logs out itself once hub.login returns.
        logout, self._logout = self._logout, None
        if logout is not None:
            logout(self._unsent()).addErrback(
                lambda f: log_failure(log, "xuanxuan logout failed", f))

    def kick(self) -> None:
        self._write({"module": "chat", "method": "kickoff",
                     "message": "Disconnected by the administrator."})
        self.transport.loseConnection()

    def connectionLost(self, reason=connectionDone):
        self._gone = True
        self.service.connections.discard(self)
        self.service.presence.sessions.discard(self)
        if self.sid:
            defer.ensureDeferred(self.service.accounts.revoke(self.sid)).addErrback(
                lambda f: log_failure(log, "revoke failed", f))
        self._leave()

    # -- methods ---------------------------------------------------------------------------

    async def m_logout(self, request, params):
        user = await self.service.store.get_user(self.user_id)
        me = await self.service.own_json(user, online=False)
        self._reply(request, "success", data=me)
        self.transport.loseConnection()  # the hub announces the logout

    async def m_usergetlist(self, request, params):
        self._reply(request, "success",
                    data=await self.service.all_users_json(self.user_id, self.admin))

    async def m_getlist(self, request, params):
        chats = await self.service.chats.of_user(self.user_id)
        infos = await self._chat_infos(chats)
        self._reply(request, "success", data=Encoded(self.service.chats_json(infos)))

    async def m_userchangename(self, request, params):
        name = param(params, 0, "name")
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise Refused("name must be 1-64 characters")
        await self.service.store.rename_user(self.user_id, name.strip())
        user = await self.service.store.get_user(self.user_id)
        self._reply(request, "success", data={"id": self.user_id, "name": user.name})
        await self.service.hub.profile_changed(self.user_id)

    async def m_userchangestatus(self, request, params):
        status = param(params, 0, "status")
        if status not in STATUSES:
            raise Refused(f"status must be one of {', '.join(STATUSES)}")
        await self.service.hub.set_show(self.user_id, SHOW_OF_STATUS[status])
        self._reply(request, "success", data={"id": self.user_id, "status": status})

    async def m_create(self, request, params):
        gid = param(params, 0, "gid")
        name = text(params, 1, "name")
        kind = text(params, 2, "type") or "group"
        members = id_list(param(params, 3, "members", []))
        subject = param(params, 4, "subject", 0)
        public = truthy(param(params, 5, "public", False), False)
        if not isinstance(gid, str) or not isinstance(name, str):
            raise Refused("create takes [gid, name, type, members, subject, public]")
        chat, created = await self.service.chats.create(
            self.user_id, gid, name, kind, members,
            subject if isinstance(subject, int) else 0, public)
        self._reply(request, "success", data=await self._chat_info(chat))
        if created:
            await self._push_chat(chat, "create")

    async def m_joinchat(self, request, params):
        gid, join = param(params, 0, "gid"), truthy(param(params, 1, "join"))
        chat = await self.service.chats.join(self.user_id, str(gid), join)
        info = await self._chat_info(chat)
        self._reply(request, "success", data={"gid": chat.shown_gid, "join": join, "chat": info})
        # The client reads a joinchat without a true "join" as "I left" and drops the chat:
        # the other members get the new member list as an addmember push.
        await self._push_chat(chat, "addmember",
                              to=[m for m in chat.members if m != self.user_id], info=info)

    async def m_changename(self, request, params):
        gid, name = param(params, 0, "gid"), text(params, 1, "name")
        chat = await self.service.chats.rename(self.user_id, str(gid), name)
        self._reply(request, "success", data={"gid": chat.shown_gid, "name": name})
        await self._push_chat(chat, "changename")

    async def _flag(self, request, params, name: str):
        gid, value = str(param(params, 0, "gid")), truthy(param(params, 1, name))
        chat = await self.service.chats.resolve(gid, self.user_id)
        self.service.chats.require_member(chat, self.user_id)
        await self.service.store.set_chat_flag(self.user_id, chat.gid, name, value)
        self._reply(request, "success", data={"gid": chat.shown_gid, name: value})

    async def m_star(self, request, params):
        await self._flag(request, params, "star")

    async def m_hide(self, request, params):
        await self._flag(request, params, "hide")

    async def m_addmember(self, request, params):
        gid, join = str(param(params, 0, "gid")), truthy(param(params, 2, "join"))
        members = id_list(param(params, 1, "members", []))
        if not members:
            raise Refused("members must be a list of user ids")
        before = await self.service.chats.resolve(gid, self.user_id)
        chat = await self.service.chats.members_change(self.user_id, gid, members, join)
        info = await self._chat_info(chat)
        self._reply(request, "success", data=info)
        await self._push_chat(chat, "addmember", info=info)
        if not join:  # the removed members' clients drop the chat
            removed = [m for m in before.members if m not in chat.members]
            dropped = {"gid": chat.shown_gid, "join": False, "chat": shared(info)}
            await self.service.hub.notify(removed, Event("xuanxuan", {"method": "joinchat",
                                                                     "data": dropped}))

    async def m_message(self, request, params):
        stored = []
        for item in message_items(params):
            cgid, kind, extension = message_item(item)
            target = self._targets.get(cgid) or await self._target(cgid)
            m = await self._post(target, kind, item["content"], extension)
            stored.append(self._message_json(m))
        self._reply(request, "success", data=stored)

    def _post(self, target: tuple[str, int, str, str, str], kind: str, content: str,
              extension: str) -> defer.Deferred:
        """Deferred[Message]: the message stored.  The one round trip: the post script also
        checks the membership and the committers, stamps lastActiveTime and lists a
        one-to-one chat as both users'."""
        ctype, to, conversation, gid, shown_gid = target
        if conversation not in self.shown:  # the client named it: it knows it
            self.shown[conversation] = shown_gid
        return self.service.hub.send(self, ctype, to, kind, content, extension=extension,
                                     chat=gid)

    async def _target(self, cgid: str) -> tuple[str, int, str, str, str]:
        """Where a message to the chat ``cgid`` goes: (conversation type, user or group
        id, conversation, chat gid, the gid the client is shown), resolved once per session.
        What may change (membership, committers, the users and groups themselves) is not
        cached: the post script checks it with every message."""
        if "&" in cgid:
            return self._one2one_target(cgid)
        chat = await self.service.chats.resolve(cgid, self.user_id)
        if not self.service.chats.may_post(chat, self.user_id):
            raise Refused("you may not post in this chat")
        return self._remember(cgid, (GROUP, chat.group.id, chat.conversation, chat.gid,
                                     chat.shown_gid))

    def _remember(self, cgid: str, target: tuple) -> tuple[str, int, str, str, str]:
        if len(self._targets) >= TARGETS_MAX:
            self._targets.clear()
        self._targets[cgid] = target
        return target

    def _one2one_target(self, cgid: str) -> tuple[str, int, str, str, str]:
        """_target of a one-to-one chat: no round trip (the post script checks that the
        peer exists)."""
        chat = self.service.chats.one2one(cgid, self.user_id)
        if self.user_id not in chat.members:
            raise Refused("you may not post in this chat")
        return self._remember(cgid, (UNICAST, chat.peer, chat.conversation, chat.gid,
                                     chat.shown_gid))

    async def m_history(self, request, params):
        gid = str(param(params, 0, "gid"))
        per_page = param(params, 1, "recPerPage", 20)
        page = param(params, 2, "pageID", 1)
        continued = param(params, 4, "continued", False)
        if not isinstance(per_page, int) or not isinstance(page, int) or per_page < 1 or \
                page < 1:
            raise Refused("history takes [gid, recPerPage, pageID, recTotal, continued]")
        per_page = min(per_page, PAGE_MAX)
        chat = await self.service.chats.resolve(gid, self.user_id)
        self.service.chats.require_member(chat, self.user_id)
        self.shown.setdefault(chat.conversation, chat.shown_gid)
        everything = await self.service.store.history(chat.conversation, limit=0)
        total = len(everything)
        end = total - (page - 1) * per_page
        window = everything[max(0, end - per_page):max(0, end)]
        data = [self._message_json(m) for m in window]
        self._reply(request, "success", data=data, pager={
            "recPerPage": per_page, "pageID": page, "recTotal": total, "gid": chat.shown_gid,
            "continued": continued})

    async def m_members(self, request, params):
        chat = await self.service.chats.resolve(str(param(params, 0, "gid")), self.user_id)
        self.service.chats.require_member(chat, self.user_id)
        self._reply(request, "success", data={"gid": chat.shown_gid, "members": chat.members})

    async def m_changepublic(self, request, params):
        gid, public = str(param(params, 0, "gid")), truthy(param(params, 1, "public"))
        chat = await self.service.chats.set_public(self.user_id, gid, public)
        self._reply(request, "success", data={"gid": chat.shown_gid, "public": public})
        await self._push_chat(chat, "changepublic")

    async def m_getpubliclist(self, request, params):
        chats = await self.service.chats.public_list()
        self._reply(request, "success", data=await self._chat_infos(chats))

    async def _set_list(self, request, params, field: str, method: str):
        gid = str(param(params, 0, "gid"))
        members = id_list(param(params, 1, field, []))
        # setAdmin adds or removes (isAdmin); setCommitters sets the whole whitelist.
        add = truthy(param(params, 2, "isAdmin")) if field == "admins" else None
        chat = await self.service.chats.set_list(self.user_id, gid, field, members, add)
        self._reply(request, "success", data=await self._chat_info(chat))
        await self._push_chat(chat, method)

    async def m_setadmin(self, request, params):
        await self._set_list(request, params, "admins", "setAdmin")

    async def m_setcommitters(self, request, params):
        await self._set_list(request, params, "committers", "setCommitters")

    async def m_settings(self, request, params):
        value = param(params, 1, "settings")
        if value is None:
            stored = (await self.service.store.user_fields(self.user_id, "xsettings"))
            self._reply(request, "success", data=json.loads(stored["xsettings"] or "{}"))
            return
        text = json.dumps(value, ensure_ascii=False)
        if len(text) > 65536:
            raise Refused("settings too large")
        await self.service.store.set_user_fields(self.user_id, xsettings=text)
        self._reply(request, "success", data=value)

    async def m_uploadfile(self, request, params):
        # The 1.0 client's socket code has a chunked upload path that nothing in the client
        # calls; its server had no such method and answered "fail".  Files go over HTTP.
        self._reply(request, "fail", "files are uploaded over HTTP (sys/attach-upload.json), "
                                     "not over the socket")

    async def m_attach_getlist(self, request, params):
        chat = await self.service.chats.resolve(str(param(params, 0, "gid")), self.user_id)
        self.service.chats.require_member(chat, self.user_id)
        files = await self.service.store.chat_files(chat.gid)
        self._reply(request, "success", data=[
            {"id": f["id"], "title": f["title"], "size": f["size"], "addedBy": f["addedBy"]}
            for f in files])


METHODS = {("chat", name[2:]): getattr(XuanxuanProtocol, name)
           for name in dir(XuanxuanProtocol) if name.startswith("m_") and
           not name.startswith("m_attach_")}
METHODS[("attach", "getlist")] = XuanxuanProtocol.m_attach_getlist


def socket_factory(service: XuanxuanService) -> protocol.Factory:
    factory = protocol.Factory.forProtocol(XuanxuanProtocol)
    factory.service = service
    factory.noisy = False
    return factory
