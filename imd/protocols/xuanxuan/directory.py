"""The user list (``userGetlist``) that every xuanxuan login is sent: one copy per node, kept
current by the presence changes, read again from the store only when it may be out of date.

A xuanxuan login is sent every user, so a reconnect storm of N users used to read and encode
N users N times.  Now the node keeps the last list it read and applies to it the presence
changes the presence feed hands out (``apply``, at each of its flushes, before the sessions
get that batch).  A login registered with the hub (and so is pushed every presence change from
then on) and then takes the current copy: the copy holds every change flushed so far, the
pushes that follow the list every change since, so no change falls between the two.

The copy is read again (one fetch shared by every login waiting for it) when there is none,
when it is older than ``max_age`` seconds (accounts made, removed or made administrators
without a presence change), when a change names a user it does not list or changes a profile,
and when a login does not find its own user in it.  The changes flushed while a fetch runs
are applied to what it read (a change is written to the store before it is announced, so what
the fetch missed is among them or still to be flushed), so a login may join a fetch that
started before it registered.

Each user's entry is encoded once (and again only when it changed) as everyone but that user
and the administrators see it, and the whole list is joined once per copy: a login whose own
entry reads the same to its user (no private field set, its status as listed) is sent those
very bytes; the entries that read differently for a login (the viewer's own, those of users
whose change the presence feed still holds) are sent after them, where the 1.0 client's
member store keyed by id takes the later one; an administrator's whole list is made for
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from imd.model import OFFLINE, ONLINE, SHOW, Event, User


@dataclass
class Directory:
    users: list[User]
    fields: dict[int, dict[str, str]]  # "show", "admin"
    online: set[int]
    public: list[bytes]  # each user's entry, encoded, as other non-administrators see it
    joined: bytes = b""  # the JSON array of ``public``
    spans: dict[int, tuple[int, int, int]] | None = None  # uid: (index, start, end) in joined
    serial: int = 0  # this copy's number: the id of its userGetlist packet
    line: bytes = b""  # the userGetlist push line up to the end of ``joined``'s entries
    #                    (see push_line), once made


class Directories:
    """The node's copy of the user list.  ``fetch()``: Deferred[(users, fields, online)]
    from the store; ``render(user, fields, online, viewer, admin)`` makes one entry;
    ``encode`` one JSON text."""

    def __init__(self, fetch: Callable[[], defer.Deferred],
                 render: Callable[..., dict], encode: Callable[[object], bytes],
                 clock: IReactorTime, max_age: float):
        self.fetch = fetch
        self.render = render
        self.encode = encode
        self.clock = clock
        self.max_age = max_age
        self._current: Directory | None = None
        self._read_at = 0.0  # when the fetch that made _current started
        # The fetch under way: (the logins waiting for it, the changes flushed while it
        # runs, when it started).
        self._fetch: tuple[list[defer.Deferred], list[list[Event]], float] | None = None
        # uid: ((user, show, admin, online), entry): what was last encoded for each user
        self._entries: dict[int, tuple[tuple, bytes]] = {}
        self._serial = 0
        # (serial of a copy, the feed's pending changes, [their entries joined]): laid over
        # that copy for every login of the window (see _overrides)
        self._laid_over: tuple[int, dict | None, list[bytes]] = (0, None, [])
        self._pending_entries: tuple[int, dict[tuple, bytes]] = (0, {})

    def get(self, viewer: int | None = None) -> defer.Deferred:
        """Deferred[Directory] for a login registered with the hub: the current copy, or the
        fetch under way (``viewer``: the login's user, who must be listed)."""
        current = self._current
        if current is not None and self.clock.seconds() - self._read_at < self.max_age and \
                (viewer is None or viewer in current.spans):
            return defer.succeed(current)
        self._current = None
        d = defer.Deferred()
        if self._fetch is None:
            fetch = self._fetch = ([], [], self.clock.seconds())
            self.fetch().addCallback(self._fetched, fetch).addBoth(self._done, fetch)
        self._fetch[0].append(d)
        return d

    def _fetched(self, found, fetch: tuple) -> Directory:
        _, during, started = fetch
        read = self._directory(*found)
        directory = read
        for events in during:
            directory = self._updated(directory, events)
            if directory is None:  # a change the copy cannot take: the next login reads
                return read
        self._current, self._read_at = directory, started
        return directory

    def _done(self, outcome, fetch: tuple) -> None:
        self._fetch = None
        for d in fetch[0]:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def apply(self, events: list[Event]) -> None:
        """The presence changes the feed is about to hand out (the newest per user)."""
        if self._fetch is not None:
            self._fetch[1].append(events)
        if self._current is not None:
            self._current = self._updated(self._current, events)

    def _updated(self, d: Directory, events: Iterable[Event]) -> Directory | None:
        """``d`` with the status changes applied (a new Directory); None when one of them
        is a profile change or names a user ``d`` does not list."""
        fields, online = dict(d.fields), set(d.online)
        for event in events:
            uid, change = event.data["user"], event.data["change"]
            if uid not in d.spans or change not in (ONLINE, OFFLINE, SHOW):
                return None
            if change == OFFLINE:
                online.discard(uid)
            else:
                online.add(uid)
                fields[uid] = {**fields[uid], "show": event.data["show"]}
        return self._directory(d.users, fields, online)

    def _directory(self, users, fields, online) -> Directory:
        cache, entries = self._entries, {}
        public = []
        for u in users:
            f = fields[u.id]
            key = (u, f["show"], f["admin"], u.id in online)
            known = cache.get(u.id)
            if known is None or known[0] != key:
                known = (key, self.encode(self.render(u, f, key[3], None, False)))
            entries[u.id] = known
            public.append(known[1])
        self._entries = entries  # users deleted since are forgotten
        spans, at = {}, 1
        for i, (u, entry) in enumerate(zip(users, public)):
            spans[u.id] = (i, at, at + len(entry))
            at += len(entry) + 1
        self._serial += 1
        return Directory(users, fields, online, public, b"[" + b",".join(public) + b"]",
                         spans, self._serial)

    def latest(self, directory: Directory) -> Directory:
        """The current copy if there is one that lists what ``directory`` lists, else
        ``directory``: a login that awaited other reads after it got its copy is shown the
        changes flushed meanwhile (the feed's pending ones are laid over it: ``pending``)."""
        current = self._current
        if current is not None and current.spans.keys() >= directory.spans.keys():
            return current
        return directory

    def _state(self, directory: Directory, uid: int,
               pending: dict[int, tuple[bool, str]]) -> tuple[dict[str, str], bool]:
        """``uid``'s fields and whether online: the copy's, or the change still pending."""
        fields = directory.fields[uid]
        if uid in pending:
            online, show = pending[uid]
            return ({**fields, "show": show} if online else fields), online
        return fields, uid in directory.online

    def entries(self, directory: Directory, viewer: int, admin: bool,
                pending: dict[int, tuple[bool, str]] | None = None) -> list[dict]:
        pending = pending or {}
        return [self.render(u, *self._state(directory, u.id, pending), viewer, admin)
                for u in directory.users]

    def _overrides(self, directory: Directory, viewer: int,
                   pending: dict[int, tuple[bool, str]]) -> list[bytes]:
        """The entries that read differently for this login than in ``joined``: those of
        users whose change the presence feed still holds (the 1.0 client takes a ``login``
        push that comes during its own login for its own: socket.js ``login`` handler,
        ``this.user.isOffline``), then the viewer's own (its private fields, its status).
        The first part is the same for every login of a window: made once."""
        serial, held, shared = self._laid_over
        if serial != directory.serial or held is not pending:
            if self._pending_entries[0] != directory.serial:
                self._pending_entries = (directory.serial, {})
            known = self._pending_entries[1]  # (uid, online, show): entry, for this copy
            shared = []
            for uid, (online, show) in pending.items():
                span = directory.spans.get(uid)
                if span is None:
                    continue
                entry = known.get((uid, online, show))
                if entry is None:
                    entry = known[uid, online, show] = self.encode(self.render(
                        directory.users[span[0]], *self._state(directory, uid, pending),
                        None, False))
                if entry != directory.public[span[0]]:
                    shared.append(entry)
            shared = [b",".join(shared)] if shared else []
            self._laid_over = (directory.serial, pending, shared)
        span = directory.spans.get(viewer)
        if span is None:
            return shared
        own = self.encode(self.render(directory.users[span[0]],
                                      *self._state(directory, viewer, pending), viewer, False))
        return shared if own == directory.public[span[0]] else [*shared, own]

    def encoded(self, directory: Directory, viewer: int, admin: bool,
                pending: dict[int, tuple[bool, str]] | None = None) -> bytes:
        """The list as ``viewer`` is shown it, one JSON array: ``joined`` (the same bytes
        for every login it reads right for), else ``joined`` with the entries that read
        differently for this login appended (``_overrides``; the 1.0 client keys its
        members by id, a later entry replacing an earlier one: dao.js ``initMembers``).
        ``pending``: uid: (online, show) of the changes the presence feed holds
        (``PresenceFeed.pending_status``)."""
        pending = pending or {}
        if admin:
            return self.encode(self.entries(directory, viewer, admin, pending))
        overrides = self._overrides(directory, viewer, pending)
        if not overrides:
            return directory.joined
        return b"".join((directory.joined[:-1], b",", b",".join(overrides), b"]"))

    def push_line(self, directory: Directory, viewer: int, admin: bool,
                  pending: dict[int, tuple[bool, str]] | None = None) -> list[bytes]:
        """The ``userGetlist`` push line for ``viewer``, in pieces to write one after the
        other: the line up to the end of the shared entries (one bytes object per copy, the
        same for every login), then what this login is shown besides (``encoded``).  The
        first piece fills the transport's buffer, so the next waits in the outbox until it
        is sent and the transport never joins (copies) the list: a storm of N logins holds
        one list per copy, not N."""
        if not directory.line:
            directory.line = b"".join((b'[{"id":%d,"module":"chat","method":"userGetlist",'
                                       b'"data":' % directory.serial, directory.joined[:-1]))
        if admin:
            return [directory.line[:-len(directory.joined) + 1],
                    self.encoded(directory, viewer, admin, pending), b"}]\n"]
        overrides = self._overrides(directory, viewer, pending or {})
        if not overrides:
            return [directory.line, b"]}]\n"]
        return [directory.line, b"," + b",".join(overrides) + b"]}]\n"]
