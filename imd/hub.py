"""The hub: the protocol-neutral router between sessions of every protocol and every node.

Protocol adapters register a Session per connection (``login``/``logout``) and hand the hub
protocol-neutral messages (``send``).  The hub asks the store to check, persist and route each
message in one round trip, then delivers to the sessions on this node; the store publishes to
the other nodes, whose hubs deliver from ``remote_delivery``.  The hub never builds wire text.

Presence: when a user comes online anywhere (first session), goes offline everywhere (last
session, or their node died), changes show/status or profile, the hub emits one PRESENCE
Event.  It goes to the user's friends and to every session that watches the whole directory
(``watches_directory``, e.g. xuanxuan, whose users see everyone); the latter hear it over one
channel that every node subscribes to, so a change costs one publish, not one per user.  A
watcher may be served by a directory feed (``add_directory_feed``) that its adapter shares
among all its sessions: the hub hands each change to the feed once, however many of those
sessions are here, and the feed fans it out (so that a reconnect storm of N watchers costs the
hub N calls, not N²).
Each node's heartbeat also reaps dead nodes and announces their users' logouts.

A KICK notice (an administrator's, see ``imd.admin.ops``) reaches the named session, or every
session of its user, on whichever node they are, and calls its ``kick``.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Callable, Iterable, Protocol

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from imd.metrics import ERRORS, counter, histogram
from imd.model import (GROUP, KICK, KINDS, OFFLINE, ONLINE, PRESENCE, PROFILE, SHOW, SHOWS,
                       UNICAST, Event, Message, group_conversation, one2one_gid)
from imd.store.redis import (FriendOffline, NoSuchGroup, NoSuchUser, NotACommitter, NotAMember,
                             NotFriends, RedisStore)
from imd.unavailable import Unavailable, log_failure

log = Logger()
LOGINS = counter("imd_logins_total", "Sessions registered with the hub, per protocol",
                 ("protocol",))
MESSAGES_IN = counter("imd_messages_in_total", "Messages accepted from clients, per protocol",
                      ("protocol",))
MESSAGES_OUT = counter("imd_messages_out_total", "Messages written to clients, per protocol",
                       ("protocol",))
DELIVERY_LATENCY = histogram(
    "imd_delivery_latency_seconds", "From a message's acceptance by this node's hub to its "
    "write to a client on this node (live deliveries only), per protocol", ("protocol",),
    buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
MAX_EVENT_AVATAR = 2048  # a URL; longer avatars (inline pictures) stay out of presence events


class Session(Protocol):
    """What a protocol adapter registers with the hub for one client connection."""

    user_id: int
    protocol: str  # the metrics label: "66boss", "minami", "webim", "xuanxuan" (else "other")
    # Optional ``watches_directory = True``: the session shows every user, so it gets every
    # user's presence changes, not only its friends', through ``notice``; or, when it also has
    # a ``directory_feed`` (registered with ``add_directory_feed``), through that feed alone.

    def deliver(self, message: Message) -> None:
        """Write a message (sent by anyone, including this user elsewhere) in the
        adapter's own dialect."""

    def notice(self, event: Event) -> None:
        """Act on a notice (friend request, presence change, newer login); adapters ignore
        the kinds their protocol has no way to show."""

    def kick(self) -> None:
        """Close the client's connection (an administrator kicked it or disabled its
        user); the adapter logs out as when the client leaves."""


# Per protocol, the labelled children of MESSAGES_IN, MESSAGES_OUT and DELIVERY_LATENCY:
# ``labels()`` costs more than the count itself, and these are counted for every message.
_COUNTERS: dict[str, tuple] = {}


def _counters(protocol: str) -> tuple:
    counters = _COUNTERS.get(protocol)
    if counters is None:
        counters = _COUNTERS[protocol] = (MESSAGES_IN.labels(protocol),
                                          MESSAGES_OUT.labels(protocol),
                                          DELIVERY_LATENCY.labels(protocol))
    return counters


def written(session: Session, message: Message) -> None:
    """An adapter wrote ``message`` to its client: count it and, when this node accepted
    it, observe its delivery latency."""
    _, out, latency = _counters(session.protocol)
    out.inc()
    if message.accepted:
        latency.observe(time.monotonic() - message.accepted)


Logout = Callable[..., defer.Deferred]  # logout(unsent: Iterable[Message] = ()), from login


class HubError(Exception):
    """A request the hub refuses; the message is fit to show to the client."""

    def __init__(self, message: str, kind: str = "refused"):
        super().__init__(message)
        self.kind = kind  # no_such_user, no_such_group, not_a_member, not_friends, ...


class Hub:
    def __init__(self, store: RedisStore, clock: IReactorTime, node_ttl: float = 15.0,
                 node_id: str | None = None, max_body: int = 64 * 1024):
        self.store = store
        self.clock = clock
        self.node = node_id or secrets.token_hex(8)
        self.node_ttl = node_ttl
        self.max_body = max_body
        self.sessions: dict[int, list[Session]] = {}
        self.watchers: set[Session] = set()  # sessions here that watch every user's presence
        self._noticed: set[Session] = set()  # the watchers without a directory feed
        self._feeds: list = []  # see add_directory_feed
        self._presence_channel = store.presence_channel()
        # Sessions whose offline queue is being drained: live deliveries wait here so that
        # queued messages come first.
        self._attaching: dict[Session, list[Message]] = {}
        # Per session, the newest message id delivered here before it logged in.
        self._marks: dict[Session, int] = {}
        self._last_id = 0
        self._heartbeat: task.LoopingCall | None = None
        self.stopping = False
        self._logouts = 0  # logouts under way
        self._quiet: list[defer.Deferred] = []

    # -- node life ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.node_alive(self.node, int(self.node_ttl * 1000))
        self._heartbeat = task.LoopingCall(self._refresh)
        self._heartbeat.clock = self.clock
        self._heartbeat.start(self.node_ttl / 3, now=False)

    async def stop(self) -> None:
        self.stopping = True
        if self._heartbeat and self._heartbeat.running:
            self._heartbeat.stop()
        await self._announce_offline(await self.store.node_gone(self.node))

    def _refresh(self) -> defer.Deferred:
        d = defer.ensureDeferred(self._beat())
        # An outage is logged once by the store's connection layer, not at every beat.
        return d.addErrback(lambda f: None if f.check(Unavailable) else log.warn(
            "node heartbeat failed: {e}", e=f.getErrorMessage()))

    async def _beat(self) -> None:
        """Stay alive; announce the logouts of the users of nodes that died."""
        if not await self.store.node_alive(self.node, int(self.node_ttl * 1000)) and \
                self.sessions:
            # This node was late (or Redis lost its key): others may have taken it for dead
            # and forgotten where its users are.
            log.warn("node {node} had lapsed; re-marking its users live", node=self.node)
            await self.resync()
        gone = await self.store.reap(self.node)
        if gone:
            # Not awaited: many announcements must not hold up the next heartbeat.
            defer.ensureDeferred(self._announce_offline(gone)).addErrback(
                lambda f: log.warn("could not announce a dead node's users offline: {e}",
                                   e=f.getErrorMessage()))

    async def _announce_offline(self, uids: list[int]) -> None:
        for uid in uids:
            await self._presence(uid, OFFLINE)

    async def resync(self) -> None:
        """After the pub/sub link came back: re-mark our users live and deliver whatever
        was queued for them while other nodes could not reach us."""
        for uid in list(self.sessions):
            _, queued = await self.store.attach(uid, self.node)
            for message in queued:
                self._deliver_local(uid, message)

    # -- sessions ----------------------------------------------------------------------

    def is_local(self, uid: int) -> bool:
        return uid in self.sessions

    async def login(self, session: Session) -> Logout:
        """Register a session, then deliver its user's offline queue to it, in order.

        Returns the one callable that undoes everything login registered (like
        twisted.cred's ``Portal.login``): ``logout(unsent)`` forgets the session and puts the
        messages it could not write back in its user's offline queue.  Call it exactly when
        the connection ends, also when it ended while this login was under way.  If login
        fails, it has undone itself.
        """
        self._logouts += 1  # a login under way also holds up the shutdown
        try:
            return await self._login(session)
        finally:
            # After the caller has resumed: if its connection closed meanwhile, it has
            # started its logout by then.
            self.clock.callLater(0, self._settled)

    async def _login(self, session: Session) -> Logout:
        uid = session.user_id
        LOGINS.labels(getattr(session, "protocol", "other")).inc()
        self.sessions.setdefault(uid, []).append(session)
        if getattr(session, "watches_directory", False):
            self.watchers.add(session)
            if getattr(session, "directory_feed", None) is None:
                self._noticed.add(session)
        self._attaching[session] = []
        self._marks[session] = self._last_id
        ended = False

        def logout(unsent: Iterable[Message] = ()) -> defer.Deferred:
            nonlocal ended
            if ended:
                return defer.succeed(None)
            ended = True
            return defer.ensureDeferred(self._logout(session, uid, list(unsent)))

        try:
            was_live, queued = await self.store.attach(uid, self.node)
        except BaseException:
            logout().addErrback(lambda f: log_failure(log, "logout after a failed login", f))
            raise
        live = self._attaching.pop(session, [])
        seen: set[int] = set()
        for message in queued:  # sorted by id; a message requeued by two sessions is shown once
            if message.id not in seen:
                seen.add(message.id)
                session.deliver(message)
        for message in live:
            if message.id not in seen:
                session.deliver(message)
        if not was_live:
            await self._presence(uid, ONLINE)
        return logout

    async def logout(self, session: Session, unsent: Iterable[Message] = ()) -> None:
        """Forget a session (prefer the callable ``login`` returned)."""
        await self._logout(session, session.user_id, list(unsent))

    async def _logout(self, session: Session, uid: int, unsent: list[Message]) -> None:
        """Forget a session and requeue what it did not write; when its user is then
        offline everywhere, say so (presence)."""
        self._attaching.pop(session, None)
        self._marks.pop(session, None)
        last = self._remove(session, uid)
        # What another live session here was given is not queued again: it got every
        # message delivered after it logged in (mark: the newest id delivered before).
        others = [self._marks.get(s, 0) for s in self.sessions.get(uid, ())]
        unsent = [m for m in unsent if not any(mark < m.id for mark in others)]
        self._logouts += 1
        try:
            if unsent:
                # Before detach, so that a next login's attach finds them.
                await self.store.requeue(uid, unsent)
            if last and not self.stopping:
                await self.store.detach(uid, self.node)
                if not await self.store.is_online(uid):
                    await self._presence(uid, OFFLINE)
        finally:
            self._settled()

    def _settled(self) -> None:
        """One login or logout is over; at none under way, wake logouts_done()."""
        self._logouts -= 1
        if not self._logouts:
            waiting, self._quiet = self._quiet, []
            for d in waiting:
                d.callback(None)

    def logouts_done(self) -> defer.Deferred:
        """Fires when no login or logout is under way (used at shutdown, before Redis goes)."""
        if not self._logouts:
            return defer.succeed(None)
        d = defer.Deferred()
        self._quiet.append(d)
        return d

    async def is_online(self, uid: int) -> bool:
        """Whether the user has a live session on any node, in any protocol."""
        return uid in self.sessions or await self.store.is_online(uid)

    async def online_among(self, uids) -> set[int]:
        """The users among ``uids`` who are online (one round trip for the lot)."""
        uids = {int(u) for u in uids}
        local = {u for u in uids if u in self.sessions}
        return local | await self.store.online_among(uids - local)

    async def notify(self, uids, event: Event, exclude: Session | None = None) -> None:
        """Give a notice to every session of ``uids`` on every node (never stored)."""
        uids = [int(u) for u in uids]
        self._notice_local(uids, event, exclude)
        await self.store.notify(self.node, uids, event)

    def session_id(self, session: Session) -> str:
        """A session's name across the cluster (what an administrator kicks)."""
        return f"{self.node}.{id(session):x}"

    def _kick(self, uids, event: Event) -> None:
        """A KICK notice: close the named session, or every session of ``uids``."""
        only = event.data.get("session")
        for uid in uids:
            for session in list(self.sessions.get(int(uid), ())):
                if only is None or only == self.session_id(session):
                    guarded(lambda s: s.kick(), session)

    def _notice_local(self, uids, event: Event, exclude: Session | None = None) -> None:
        if event.kind == KICK:
            self._kick(uids, event)
            return
        watched = event.kind == PRESENCE  # watchers get these from the presence channel
        for uid in uids:
            for session in list(self.sessions.get(int(uid), ())):
                if session is not exclude and not (watched and session in self.watchers):
                    guarded(session.notice, event)

    # -- presence ----------------------------------------------------------------------

    async def set_show(self, uid: int, show: str, status: str | None = None) -> None:
        """Change a user's show (one of SHOWS) and, if given, status text; when the user is
        online, whoever sees their presence is told."""
        if show not in SHOWS:
            raise HubError(f"show must be one of {', '.join(SHOWS)}")
        fields = {"show": show} if status is None else {"show": show, "status": status}
        await self.store.set_user_fields(uid, **fields)
        if await self.is_online(uid):
            await self._presence(uid, SHOW)

    async def profile_changed(self, uid: int) -> None:
        """The user's name (or another profile field) changed: tell whoever sees them."""
        await self._presence(uid, PROFILE)

    async def _presence(self, uid: int, change: str) -> None:
        """Emit one presence Event about ``uid``: to their friends and to the sessions that
        watch every user, on every node (one publish for the latter)."""
        user, show, status, friends = await self.store.presence_of(uid)
        if user is None:
            return
        profile = dataclasses.asdict(user)
        if len(profile["avatar"]) > MAX_EVENT_AVATAR:
            profile["avatar"] = ""  # an inline picture: too big to send to every node
        event = Event(PRESENCE, {
            "user": uid, "change": change,
            "show": "unavailable" if change == OFFLINE else (show or "available"),
            "status": status, "profile": profile})
        self._notice_local(friends, event)
        self._watchers_notice(event)
        await self.store.notify(self.node, friends, event, everyone=True)

    def add_directory_feed(self, feed) -> None:
        """From now on hand every presence Event (of any node) once to ``feed.presence``:
        the feed serves every session here that names it as its ``directory_feed`` (and
        leaves out the sessions of the event's own user)."""
        self._feeds.append(feed)

    def _watchers_notice(self, event: Event) -> None:
        """A presence Event for the watchers here: once to each directory feed, and to each
        watcher without one."""
        for feed in self._feeds:
            guarded(feed.presence, event)
        uid = event.data["user"]
        for session in list(self._noticed):
            if session.user_id != uid:
                guarded(session.notice, event)

    def _remote_presence(self, channel: str, payload: str) -> None:
        """A presence Event published by a node (this one included) for the sessions that
        watch every user."""
        try:
            node, raw = payload.split("|", 1)
            if node != self.node:
                self._watchers_notice(Event.from_json(raw))
        except Exception:
            log.failure("bad presence on {channel}", channel=channel)

    def _remove(self, session: Session, uid: int) -> bool:
        """Forget a session; True when it was its user's last one on this node."""
        mine = self.sessions.get(uid)
        if mine is None or session not in mine:
            return False
        mine.remove(session)
        self.watchers.discard(session)
        self._noticed.discard(session)
        if not mine:
            del self.sessions[uid]
            return True
        return False

    # -- messages ----------------------------------------------------------------------

    def send(self, origin: Session, ctype: str, to: int, kind: str, body: str,
             extension: str = "", style: str = "", friends_only: bool = False,
             chat: str = "") -> defer.Deferred:
        """Check, store and deliver one message from ``origin``'s user.

        Deferred[Message]: the stored message (with id and ts) once it is persisted; fails
        with HubError for a message that was refused and so not stored.  ``friends_only``:
        only to a friend who has a live session (minami), else refused and stored nowhere.
        ``chat``: the xuanxuan chat it is posted in (see ``RedisStore.post``).
        """
        d = defer.Deferred()
        self.send_then(d.callback, d.errback, origin, ctype, to, kind, body, extension, style,
                       friends_only, chat)
        return d

    def send_then(self, stored: Callable[[Message], object],
                  refused: Callable[[Failure], object], origin: Session, ctype: str, to: int,
                  kind: str, body: str, extension: str = "", style: str = "",
                  friends_only: bool = False, chat: str = "") -> None:
        """``send`` for the per-message hot path of an adapter: ``stored(message)`` once it
        is persisted (after its delivery here), or ``refused(Failure)`` of a HubError (at
        once for a message refused before the store sees it).  No Deferred per message:
        see ``RedisStore.post_then``."""
        if origin.user_id is None:
            refused(Failure(HubError("not logged in")))
        elif ctype not in (UNICAST, GROUP):
            refused(Failure(HubError(f"unknown conversation type {ctype!r}")))
        elif kind not in KINDS:
            refused(Failure(HubError(f"unknown message kind {kind!r}")))
        elif len(body) > self.max_body:
            refused(Failure(HubError("message too long")))
        else:
            _counters(getattr(origin, "protocol", "other"))[0].inc()
            message = Message(sender=origin.user_id, to=int(to), ctype=ctype, kind=kind,
                              body=body, extension=extension, style=style,
                              accepted=time.monotonic())

            def posted(here: list[int]) -> None:
                for uid in here:
                    self._deliver_local(uid, message, origin)
                stored(message)

            self.store.post_then(message, self.node, posted,
                                 lambda failure: refused(_refusal(failure)),
                                 friends_only, chat)

    def _deliver_local(self, uid: int, message: Message, origin: Session | None = None) -> None:
        if message.id > self._last_id:
            self._last_id = message.id
        sessions = self.sessions.get(uid)
        if not sessions:
            if uid != message.sender:
                # The user left between routing and delivery: keep the message for them.
                defer.ensureDeferred(self.store.requeue(uid, [message])).addErrback(
                    lambda f: log.failure("requeue failed", f))
            return
        for session in list(sessions):
            if session is origin:
                continue
            waiting = self._attaching.get(session)
            if waiting is not None:
                waiting.append(message)
            else:
                guarded(session.deliver, message)

    def remote_delivery(self, channel: str, payload: str) -> None:
        """A message (or, prefixed with '!', a notice) published by another node for users
        with sessions here; or, on the presence channel, a presence Event."""
        if channel == self._presence_channel:
            self._remote_presence(channel, payload)
            return
        try:
            uids, raw = payload.split("|", 1)
            if uids.startswith("!"):
                self._notice_local(uids[1:].split(","), Event.from_json(raw))
                return
            message = Message.from_json(raw)
            for uid in uids.split(","):
                self._deliver_local(int(uid), message)
        except Exception:
            log.failure("bad delivery on {channel}", channel=channel)

    async def history(self, user_id: int, peer: int, since_ms: int = 0,
                      limit: int = 100) -> list[Message]:
        """Messages of the conversation between ``user_id`` and ``peer`` (a user, or a group
        the user belongs to) since ``since_ms``."""
        group = await self.store.get_group(peer)
        if group is not None:
            if user_id not in group.members:
                raise HubError("not a member of this group")
            conversation = group_conversation(peer)
        else:
            if await self.store.get_user(peer) is None:
                raise HubError("no such user or group")
            conversation = one2one_gid(user_id, peer)
        return await self.store.history(conversation, since_ms, limit)


def guarded(call: Callable[[object], object], item) -> None:
    """Hand one session its item; a broken session must not stop the others' delivery (an
    adapter that fans out to its own sessions uses it too)."""
    try:
        call(item)
    except Exception:
        ERRORS.labels("session_failed").inc()
        log.failure("a session failed to take a delivery")


_REFUSALS = {NoSuchUser: ("no_such_user", "no such user"),
             NoSuchGroup: ("no_such_group", "no such group"),
             NotAMember: ("not_a_member", "not a member of this group"),
             NotFriends: ("not_friends", "not friends"),
             FriendOffline: ("friend_offline", "the friend has no live session"),
             NotACommitter: ("not_a_committer", "you may not post in this chat")}


def _refusal(failure: Failure) -> Failure:
    """A failed post as a HubError with a client-facing reason; log the unexpected."""
    kind, reason = _REFUSALS.get(type(failure.value), (None, None))
    if kind is None:
        log_failure(log, "message could not be stored", failure)
        kind, reason = "not_stored", "message could not be stored"
    ERRORS.labels(kind).inc()
    return Failure(HubError(reason, kind))
