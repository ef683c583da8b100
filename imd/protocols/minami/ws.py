"""minami over WebSocket: ``login?account=&password=`` then the tunnel.

The first frame is the login reply (profile, friends, requests, token) or 505 and a close.
Then each client frame ``{id, toFriend, payload}`` is answered with ``{code: 200, ..., id}``
once the message is stored, or an error code; frames are handled in order.  The friend gets
``{from, payload}``.  One minami session per account: a newer login sends 513 to the older
one and closes it.  A token issued at login is revoked when the connection closes.

What other protocols send appears in ``payload`` as text: a text message as it is, other
kinds as ``[<kind>] <body>`` (``[image] http://…/x-10x10.png``, ``[emoticon] smile``).
minami has no groups, so group messages are not shown here (they stay in the group's history).
"""

from __future__ import annotations

import secrets

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet import defer, reactor
from twisted.logger import Logger

from imd import jsonin
from imd.accounts import Accounts
from imd.config import Config
from imd.friends import Friends
from imd.hub import Hub, HubError, Logout, written
from imd.metrics import CONNECTIONS
from imd.model import GROUP, OFFLINE, PRESENCE, TEXT, UNICAST, Event, Message
from imd.passwords import md5hex
from imd.guard import source_host
from imd.protocols.flow import Outbox, ReadGate, tune_socket
from imd.protocols.wsstate import forget_handshake, lean_protocol
from imd.protocols.wsturn import TurnFrames, TurnWriter
from imd.throttle import Throttled
from imd.unavailable import log_failure
from imd.protocols.minami.codes import ack, encode, reply
from imd.protocols.minami.http import parse_id, profile_json

log = Logger()
MAX_EARLY_FRAMES = 64


class MinamiService:
    def __init__(self, hub: Hub, accounts: Accounts, friends: Friends, config: Config):
        self.hub = hub
        self.accounts = accounts
        self.friends = friends
        self.config = config
        self.connections: set = set()  # open WebSocket connections, closed at shutdown


def _id_value(value) -> str | None:
    """A JSON string or number as id text; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


class MinamiWebSocket(TurnFrames):
    user_id: int | None = None
    protocol = "minami"
    outbox: Outbox | None = None
    _logout: Logout | None = None

    def onConnect(self, request):
        params = request.params
        self._account = (params.get("account") or [""])[0].strip()
        self._password = (params.get("password") or [""])[0].strip()
        return None

    def onOpen(self):
        service: MinamiService = self.factory.service
        tune_socket(self.transport, service.config.heartbeat + service.config.heartbeat_timeout)
        self.nonce = secrets.token_hex(8)
        service.connections.add(self)
        CONNECTIONS.labels(self.protocol).inc()
        self.token: str | None = None
        self._early: list[bytes] | None = []
        self._gone = False
        self.outbox = Outbox(self.transport, self._emit, service.config.max_pending,
                             self._overflowed)
        self._gate = ReadGate(self.transport)  # sends under way
        forget_handshake(self)
        defer.ensureDeferred(self._login()).addErrback(self._login_failed)

    async def _login(self) -> None:
        service: MinamiService = self.factory.service
        account, password = self._account, self._password
        self._password = ""
        user = None
        if account and password:
            try:
                user = await service.accounts.authenticate(
                    account, md5hex(password), source_host(self.transport.getPeer()))
            except Throttled:
                self._send(reply(500))  # minami has no code for "too many attempts"
                self.sendClose(1000)
                return
        if self._gone:
            return
        if user is None:
            self._send(reply(505))
            self.sendClose(1000)
            return
        self.token = await service.accounts.issue_token(user.id)
        if self._gone:  # onClose did not see the token yet
            await service.accounts.revoke(self.token)
            return
        friends = await service.friends.list(user.id)
        requests = await service.friends.requests(user.id)
        if self._gone:
            return
        self._send(reply(
            200, profile=profile_json(user),
            friends=[{**profile_json(f.user), "name": f.alias, "online": f.online}
                     for f in friends] or None,
            requests=[{"id": str(r.requester), "name": r.name, "to": str(r.to),
                       "note": r.note} for r in requests] or None,
            token=self.token))
        self.user_id = user.id
        await service.hub.notify([user.id], Event("login", {"protocol": "minami",
                                                           "session": self.nonce}),
                                 exclude=self)
        if self._gone:
            return
        logout = await service.hub.login(self)
        if self._gone:  # closed while the login was under way
            await logout(self.outbox.close())
            return
        self._logout = logout
        early, self._early = self._early or [], None
        for frame in early:
            self._queue_frame(frame)

    def _login_failed(self, failure) -> None:
        log_failure(log, "minami login failed", failure)
        self._send(reply(500))
        self.sendClose(1000)

    def onMessageEnd(self):
        # As in the 66boss adapter: skip autobahn's per-message observer future.
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)

    def onMessage(self, payload: bytes, isBinary: bool):
        # Like the original server, a bad frame gets an error reply and the session goes on:
        # binary, over --max-frame (up to the hard limit of --max-body, where the
        # connection is closed with 1009), or not UTF-8 (validated here, not by autobahn).
        if isBinary or len(payload) > self.factory.service.config.max_frame:
            self._send(reply(403))
            return
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            self._send(reply(403))
            return
        if self._early is not None:
            if len(self._early) >= MAX_EARLY_FRAMES:
                self.dropConnection(abort=True)
            else:
                self._early.append(payload)
            return
        self._queue_frame(payload)

    def _queue_frame(self, payload: bytes) -> None:
        """Check a tunnel frame and send it; the ack comes once it is stored.  Frames are
        not awaited one by one: the store keeps their order (one script call per reactor
        turn, on one connection), so acks and deliveries keep it too."""
        if self._gone or self.user_id is None:
            return
        try:
            frame = jsonin.read(payload)
        except jsonin.BadJSON:
            frame = None
        if not isinstance(frame, dict):
            self._send(reply(403))
            return
        ident, to = frame.get("id"), frame.get("toFriend")
        text = frame.get("payload")
        if ident is not None and _id_value(ident) is None or \
                to is not None and _id_value(to) is None or \
                text is not None and not isinstance(text, str):
            self._send(reply(403))
            return
        if not to:
            self._send(reply(510))
            return
        if not text:
            self._send(reply(511))
            return
        friend = parse_id(_id_value(to))
        if friend is None:
            self._send(reply(512))
            return
        if ident is None or ident == "":
            self._send(reply(506))
            return
        self._gate.begin()
        self.factory.service.hub.send_then(lambda _: self._sent(ident),
                                           lambda f: self._refused(f, ident),
                                           self, UNICAST, friend, TEXT, text, friends_only=True)

    def _sent(self, ident) -> None:
        self._gate.end()
        self.outbox.put(ack(ident))

    def _refused(self, failure, ident) -> None:
        self._gate.end()
        failure.trap(HubError)
        kind = failure.value.kind
        if kind in ("not_friends", "no_such_user"):
            self._send(reply(512))
        elif kind == "friend_offline":
            self._send(reply(508, id=ident))
        else:
            self._send(reply(507, id=ident))

    # -- hub Session ---------------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        if message.sender == self.user_id or message.ctype == GROUP:
            return
        if message.wire is None:
            message.wire = {}
        frame = message.wire.get("minami")
        if frame is None:  # encoded once for all the recipient's sessions
            body = message.body if message.kind == TEXT else f"[{message.kind}] {message.body}"
            frame = message.wire["minami"] = encode({"from": str(message.sender),
                                                     "payload": body})
        # During the login (no _logout yet) this is the offline queue: not bounded.
        self.outbox.put(frame, (message,), self._logout is not None)
        written(self, message)

    def kick(self) -> None:
        self.sendClose(1000)

    def notice(self, event: Event) -> None:
        data = event.data
        if event.kind == "friend_request":
            self._send(reply(520, id=str(data["from"]), name=data["name"], to=str(data["to"]),
                             note=data["note"]))
        elif event.kind == PRESENCE and data["change"] == OFFLINE:
            self._send(reply(300, id=str(data["user"])))
        elif event.kind == "login" and data.get("protocol") == "minami" and \
                data.get("session") != self.nonce:
            self._send(reply(513))
            self.sendClose(1000)

    # -- transport -----------------------------------------------------------------------

    def _send(self, obj) -> None:
        if self.outbox is not None:
            self.outbox.put(encode(obj))

    def _emit(self, data: bytes) -> bool:
        if self._gone or self.transport is None:
            return False
        return self.send_text(data)

    def _overflowed(self) -> None:
        """The client stopped reading: end the session now (what was not written goes back
        to the offline queue), then close after what the transport took."""
        self._leave()
        self.sendClose(1000)

    def _leave(self) -> None:
        # A login under way sees _gone and logs out itself once hub.login returns.
        logout, self._logout = self._logout, None
        if logout is not None:
            logout(self.outbox.close()).addErrback(
                lambda f: log_failure(log, "minami logout failed", f))

    def onClose(self, wasClean, code, reason):
        self._gone = True
        service: MinamiService = self.factory.service
        service.connections.discard(self)
        if getattr(self, "token", None):
            defer.ensureDeferred(service.accounts.revoke(self.token)).addErrback(
                lambda f: log_failure(log, "token revoke failed", f))
        self._leave()


def login_resource(service: MinamiService) -> WebSocketResource:
    config = service.config
    factory = WebSocketServerFactory()
    factory.service = service
    factory.turn_writer = TurnWriter(reactor)
    hard_limit = max(config.max_frame, config.max_body)
    factory.setProtocolOptions(
        maxFramePayloadSize=hard_limit, maxMessagePayloadSize=hard_limit,
        utf8validateIncoming=False,
        autoPingInterval=config.heartbeat, autoPingTimeout=config.heartbeat_timeout,
        openHandshakeTimeout=10, closeHandshakeTimeout=5, failByDrop=False)
    lean_protocol(factory, MinamiWebSocket)
    return WebSocketResource(factory)
