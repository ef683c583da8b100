"""One 66boss client connection, whatever carries it (WebSocket frames or TCP lines).

A connection is bound to a user by ``login_`` and is then a hub Session.  Signals are handled
in the order they arrive: anything sent while a login is being checked waits for it.  Every
malformed or refused signal gets one ``error_<signal>_<reason>`` line and changes nothing else.

``login_<userid>_<token>`` is always accepted with the user's token.  A bare ``login_<userid>``
depends on ``--boss-auth``: refused (``token``), accepted after a recent proof from the same
source address (``address``, see proofs.py) or accepted as is (``trust``).  ``logout_`` revokes
the token the connection logged in with (or the one of the proof it used).
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from imd.accounts import Accounts
from imd.config import Config
from imd.groups import GroupError, Groups
from imd.hub import Hub, HubError, Logout, written
from imd.metrics import CONNECTIONS
from imd.model import Message
from imd.protocols.boss import signals
from imd.protocols.boss.cards import Cards, extension, needs_card
from imd.protocols.boss.proofs import Proofs
from imd.protocols.boss.signals import SignalError
from imd.throttle import Throttled
from imd.unavailable import log_failure
from imd.protocols.flow import Outbox, ReadGate

log = Logger()


class BossService:
    """What every 66boss connection shares: the hub, accounts, settings, and the heartbeat
    (``heartbeat``, called every --heartbeat seconds by the protocol's service)."""

    def __init__(self, hub: Hub, accounts: Accounts, groups: Groups, config: Config,
                 clock: IReactorTime):
        self.hub = hub
        self.accounts = accounts
        self.groups = groups
        self.config = config
        self.clock = clock
        self.connections: set[BossConnection] = set()
        self.proofs = Proofs(clock, config.boss_address_window, config.boss_auth == "address")
        self.cards = Cards(hub.store, clock)

    def start(self) -> None:
        if self.config.boss_auth == "address":
            log.info("--boss-auth=address: a bare 66boss login_<userid> is accepted from an "
                     "address that proved it is that user in the last {window} s (clients "
                     "sharing an address, e.g. behind one NAT, can act as each other)",
                     window=self.config.boss_address_window)

    def stop(self) -> None:
        for conn in list(self.connections):
            conn.abort()

    async def token_user(self, token: str, host: str) -> int | None:
        """The user of a valid token (which also proves ``host`` is that user), else None."""
        uid = await self.accounts.user_for_token(token)
        if uid is not None:
            self.proofs.record(uid, host, token)
        return uid

    def heartbeat(self) -> None:
        line = f"heartbeat_{int(self.clock.seconds())}"
        for conn in list(self.connections):
            conn.write(line)


class BossConnection:
    """Signal handling for one client; ``write`` sends one signal, ``abort`` drops the link.

    Everything is written through ``outbox`` (the transport's producer), whose items are the
    signals' text.
    """

    protocol = "66boss"

    def __init__(self, service: BossService, outbox: Outbox, gate: ReadGate,
                 close: Callable[[], None], abort: Callable[[], None], host: str = ""):
        self.service = service
        self.outbox = outbox
        self.gate = gate  # sends under way: a client sending faster is not read
        self.close = close
        self.abort = abort
        self.host = host  # the client's source address
        self.user_id: int | None = None
        self._token: str | None = None  # what the login was proved with; revoked by logout_
        self._waiting: list[str] | None = None  # signals that arrived during a login
        self._gone = False
        self._leave: Logout | None = None
        # Messages waiting for the sender's card (cards.py), in order, with their bound.
        self._held: list[tuple[Message, bool]] | None = None

    def write(self, text: str) -> None:
        self.outbox.put(text)

    # -- transport events ----------------------------------------------------------------

    def opened(self) -> None:
        CONNECTIONS.labels(self.protocol).inc()
        self.service.connections.add(self)

    def overflowed(self) -> None:
        """The client stopped reading: end the session now (what was not written goes back
        to the offline queue), then close after what the transport took."""
        self._unbind()
        self.close()

    def closed(self) -> None:
        self._gone = True
        self.service.connections.discard(self)
        if self.user_id is not None:  # the link dropped: the app reconnects with a bare login
            self.service.proofs.record(self.user_id, self.host, self._token)
        self._unbind()

    def signal_received(self, text: str) -> None:
        if self._waiting is not None:
            self._waiting.append(text)
            return
        command, _, rest = text.partition("_")
        try:
            if command in signals.KIND_IN:
                self._send(text)
            elif command == "login":
                self._login(rest)
            elif command == "logout":
                self._logout(rest)
            elif command == "members":
                self._query(self._members, command, rest)
            elif command == "records":
                self._query(self._records, command, rest)
            elif command == "heartbeat":
                pass  # some clients echo the heartbeat; nothing to do
            else:
                raise SignalError(command[:32] or "unknown", "unknown signal")
        except SignalError as e:
            self.write(signals.error(e.command, e.reason))

    # -- hub Session ---------------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        # What this user sent from another connection is not echoed: the receive format
        # could not say whom it was sent to.
        if message.sender != self.user_id:
            # During the login (no _leave yet) this is the offline queue: not bounded.
            bounded = self._leave is not None
            text = None if self._held is not None else self._text(message)
            if text is None:
                self._hold(message, bounded)
                return
            self.outbox.put(text, (message,), bounded)
            written(self, message)

    def _text(self, message: Message, fallback: bool = False) -> str | None:
        """The receive signal; None when it needs a card (cards.py) not loaded yet, unless
        ``fallback`` (then the ids stand for the missing names)."""
        if not needs_card(message) or (message.wire and "boss" in message.wire):
            return signals.render(message)
        ext = self.service.cards.render_extension(message)
        if ext is not None:
            return signals.render(message, ext)
        if not fallback:
            return None
        ext = extension(message, (str(message.sender), ""), (str(message.to), ""))
        return signals.render(message, ext, cache=False)

    def _hold(self, message: Message, bounded: bool) -> None:
        """Keep a message (and every later one, for their order) until the cards it needs
        are loaded."""
        if self._held is None:
            self._held = []
            d = self.service.cards.fetch([message])
            d.addErrback(lambda f: log_failure(log, "loading 66boss sender cards failed", f))
            d.addBoth(self._release_held)
        self._held.append((message, bounded))

    def _release_held(self, _) -> None:
        held, self._held = self._held or [], None
        for message, bounded in held:
            self.outbox.put(self._text(message, fallback=True), (message,), bounded)
            written(self, message)

    def _unsent(self) -> list[Message]:
        """At the end of the session: what was not written, in order."""
        held, self._held = self._held or [], None
        return self.outbox.close() + [m for m, _ in held]

    def notice(self, event) -> None:
        pass  # 66boss has no friends, presence or kick signals

    def kick(self) -> None:
        self.close()

    # -- signals -------------------------------------------------------------------------

    def _require_login(self, command: str) -> int:
        if self.user_id is None:
            raise SignalError(command, "not logged in")
        return self.user_id

    def _login(self, rest: str) -> None:
        uid_text, _, token = rest.partition("_")
        uid = signals.parse_id("login", uid_text)
        if self.user_id is not None:
            if self.user_id == uid:
                self.write("ok")
                return
            raise SignalError("login", f"already logged in as {self.user_id}; logout first")
        if not token and self.service.config.boss_auth == "token":
            raise SignalError("login", "a token is required: login_<userid>_<token>")
        self._waiting = []
        d = defer.ensureDeferred(self._check_login(uid, token))
        d.addErrback(self._login_failed)
        d.addBoth(self._login_done)

    async def _check_login(self, uid: int, token: str) -> None:
        proofs = self.service.proofs
        if not token and self.service.config.boss_auth == "address":
            proof = proofs.check(uid, self.host)
            if proof is None or not proof.token:
                self.write(signals.error(
                    "login", "no recent login of this user from this address; log in over "
                             "HTTP first or send login_<userid>_<token>"))
                return
            token = proof.token  # checked below: a proof dies with its token (logout_)
        if token:
            try:
                ok = await self.service.accounts.token_login(uid, token, self.host)
            except Throttled as e:
                self.write(signals.error("login", str(e)))
                return
        else:
            ok = await self.service.accounts.active(uid)
        if not ok:
            self.write(signals.error("login", "bad user id or token"))
            return
        if self._gone:
            return
        self.user_id, self._token = uid, token or None
        proofs.bound(self.host)
        proofs.record(uid, self.host, self._token)
        self.write("ok")
        logout = await self.service.hub.login(self)
        if self._gone:  # closed while the login was under way
            self.service.proofs.unbound(self.host)
            await logout(self._unsent())
        else:
            self._leave = logout

    def _login_failed(self, failure) -> None:
        log_failure(log, "login failed", failure)
        if self.user_id is not None:
            self.service.proofs.unbound(self.host)
        self.user_id = None
        self.write(signals.error("login", "server error, try again"))

    def _login_done(self, _) -> None:
        waiting, self._waiting = self._waiting or [], None
        for text in waiting:
            if self._gone or self._waiting is not None:
                if self._waiting is not None:
                    self._waiting.append(text)
                continue
            self.signal_received(text)

    def _logout(self, rest: str) -> None:
        uid = self._require_login("logout")
        if rest and rest.partition("_")[0] != str(uid):
            raise SignalError("logout", "not logged in as that user")
        self.service.proofs.forget(uid, self.host)
        if self._token:
            d = defer.ensureDeferred(self.service.accounts.revoke(self._token))
            d.addErrback(lambda f: log.failure("revoking a token at logout failed", f))
            self._token = None
        self._unbind()
        self.close()

    def _unbind(self) -> None:
        """Leave the hub; what the outbox did not write goes back to the offline queue."""
        logout, self._leave = self._leave, None
        if logout is not None:
            self.service.proofs.unbound(self.host)
            logout(self._unsent()).addErrback(
                lambda f: log_failure(log, "logout failed", f))
            self.user_id = None

    def _send(self, text: str) -> None:
        command = text.partition("_")[0]
        self._require_login(command)
        send = signals.parse_send(text)
        self.gate.begin()
        self.service.hub.send_then(self.gate.end, lambda f: self._not_sent(f, command), self,
                                   send.ctype, send.to, send.kind, send.body, send.extension)

    def _not_sent(self, failure, command: str) -> None:
        self.gate.end()
        self._refused(failure, command)

    def _refused(self, failure, command: str) -> None:
        if failure.check(SignalError):
            self.write(signals.error(failure.value.command, failure.value.reason))
        elif failure.check(HubError, GroupError):
            self.write(signals.error(command, str(failure.value)))
        else:
            log_failure(log, "send failed", failure)
            self.write(signals.error(command, "server error, message not sent"))

    def _query(self, handler, command: str, rest: str) -> None:
        self._require_login(command)
        d = defer.ensureDeferred(handler(rest))
        d.addErrback(self._refused, command)

    async def _members(self, rest: str) -> None:
        gid = signals.parse_id("members", rest)
        group = await self.service.groups.get(gid, self.user_id)
        self.write(f"members_{gid}_{','.join(map(str, group.members))}")

    async def _records(self, rest: str) -> None:
        peer_text, _, since_text = rest.partition("_")
        peer = signals.parse_id("records", peer_text)
        since = signals.parse_id("records", since_text or "0")
        messages = await self.service.hub.history(self.user_id, peer, since * 1000)
        lines = [f"records_{peer}_{since}_{len(messages)}"]
        await self.service.cards.fetch([m for m in messages if needs_card(m)])
        lines += [self._text(m, fallback=True) for m in messages]
        for line in lines:
            self.write(line)
