"""The presence pushes of xuanxuan sessions, coalesced and encoded once for all of them.

Every xuanxuan user sees every user, so a reconnect storm of N users used to cost N² pushes
(each login announced to every session already in), each written as its own line.  Now the
hub hands each presence change to this node's one ``PresenceFeed`` (``directory_feed``), which
keeps, per user, only the newest status change and the newest profile change of the current
window (``--xuanxuan-presence-window``
seconds; 0: the current reactor turn) and then hands every session one ``Batch``: one line
holding one packet per changed user, encoded once, written as the same bytes to every session
that is neither an administrator nor one of the changed users (those get a line of their own).

What this relies on in the 1.0 client (``app/models/socket.js``, easysoft/xuanxuan v1.0.0):
``_handleData``/``SocketMessage.fromJSON`` run the lines in order and every packet of a pushed
array in order (the 1.0 PHP server itself wrote each user's pending pushes as one array per
loop of its daemon); its ``login``, ``logout`` and ``userchangestatus`` handlers
for another user only set that member's ``status`` from ``data.id``/``data.status`` (so the
newest status change of a user makes the older ones of the same window redundant; a status
change and a profile change are kept apart, ``userChangeName`` has no handler there).  A
presence change reaches a client up to one window late, so a message sent after it may come
first: the client shows a message whatever its sender's status; messages are never delayed
and keep their order among themselves, and chat pushes keep theirs with the messages.
"""

from __future__ import annotations

from typing import Callable, Iterable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from imd.hub import guarded
from imd.model import OFFLINE, ONLINE, PROFILE, SHOW, Event

# The push the 1.0 client handles for each presence change (socket.js: login, logout,
# userchangestatus; userChangeName as the original server pushed it).
PRESENCE_PUSH = {ONLINE: "login", OFFLINE: "logout", SHOW: "userChangeStatus",
                 PROFILE: "userChangeName"}
PACKET = b'{"id":%d,"module":"chat","method":"%s","data":%s}'


class Batch:
    """The presence changes of one window: the newest per user and kind, in the order of
    their last change, each as one encoded packet."""

    __slots__ = ("events", "packets", "users", "_line")

    def __init__(self, events: list[Event], packets: list[bytes]):
        self.events = events
        self.packets = packets
        self.users = {e.data["user"] for e in events}
        self._line: bytes | None = None

    def line(self) -> bytes:
        """The push line every session but the changed users' and administrators' gets."""
        if self._line is None:
            self._line = b"[" + b",".join(self.packets) + b"]\n"
        return self._line

    def line_for(self, viewer: int, render: Callable[[Event], bytes] | None = None
                 ) -> bytes | None:
        """The push line for ``viewer``: without the packets about themselves (the 1.0 client
        reads a login push about its own user as its own login), with each packet rendered
        by ``render`` (an administrator's view) if given; None when nothing is left."""
        if render is None and viewer not in self.users:
            return self.line()
        packets = [self._repacked(i, render) if render else self.packets[i]
                   for i, e in enumerate(self.events) if e.data["user"] != viewer]
        return b"[" + b",".join(packets) + b"]\n" if packets else None

    def _repacked(self, i: int, render: Callable[[Event], bytes]) -> bytes:
        head = self.packets[i]
        return head[:head.index(b',"data":') + 8] + render(self.events[i]) + b"}"


class PresenceFeed:
    """This node's xuanxuan presence changes, coalesced per window and handed to every
    session in ``sessions`` (each with ``presence_batch(batch)``) as one Batch.

    ``render(event)`` encodes the user JSON of a change as a non-administrator who is not its
    user sees it.  ``window``: seconds a change may wait for others (0: the reactor turn).
    ``flushing(events)``: told each window's changes first (the user list copy takes them)."""

    def __init__(self, clock: IReactorTime, window: float, render: Callable[[Event], bytes],
                 flushing: Callable[[list[Event]], None] = lambda events: None):
        self.clock = clock
        self.window = window
        self.render = render
        self.flushing = flushing  # called with the changes of each window before they go out
        self.sessions: set = set()
        self._pending: dict[tuple[int, bool], Event] = {}
        self._status: dict[int, tuple[bool, str]] | None = None  # see pending_status
        self._flush: IDelayedCall | None = None
        self._serial = 0  # packet ids, shared by every session (the 1.0 server's were too)

    def presence(self, event: Event) -> None:
        """The hub's call (``directory_feed``): one presence change."""
        data = event.data
        if data.get("change") not in PRESENCE_PUSH:
            return
        key = (data["user"], data["change"] == PROFILE)
        self._pending.pop(key, None)  # re-inserted: the order of the last changes
        self._pending[key] = event
        self._status = None
        if self._flush is None:
            self._flush = self.clock.callLater(self.window, self.flush)

    def pending_status(self) -> dict[int, tuple[bool, str]]:
        """uid: (online, show) of the status changes this window still holds: what the
        node's copy of the user list does not show yet.  The same dict object until the
        next change (every login of a storm asks)."""
        if self._status is None:
            self._status = {event.data["user"]: (event.data["change"] != OFFLINE,
                                                 event.data.get("show") or "")
                            for (_, profile), event in self._pending.items() if not profile}
        return self._status

    def flush(self) -> None:
        """Hand the window's changes to every session as one Batch."""
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        events, self._pending = list(self._pending.values()), {}
        self._status = None
        if not events:
            return
        self.flushing(events)
        if not self.sessions:
            return
        batch = Batch(events, list(self._packets(events)))
        for session in list(self.sessions):
            guarded(session.presence_batch, batch)

    def _packets(self, events: Iterable[Event]) -> Iterable[bytes]:
        for event in events:
            self._serial += 1
            yield PACKET % (self._serial, PRESENCE_PUSH[event.data["change"]].encode(),
                            self.render(event))

    def stop(self) -> None:
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        self._pending = {}
        self._status = None
