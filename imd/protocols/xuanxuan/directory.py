"""The user list (``userGetlist``) that every xuanxuan login is sent, fetched once for every
login waiting for it.

A xuanxuan login is sent every user, so a reconnect storm of N users used to read and encode
N users N times.  Logins now share one fetch: a login that registered with the hub (and so is
pushed every presence change from then on) joins a fetch that started after it registered, or
starts one; what the fetch reads is then at least as new as the login, so no change falls
between the list and the pushes that follow it.  Each user's entry is encoded once (and
again only when it changed) as everyone but that user and the administrators see it, and the
whole list is joined once per fetch: a login whose own entry reads the same to its user (no
private field set) is sent those very bytes; the viewer's own entry otherwise (with its
private fields) is spliced in, and an administrator's whole list is made for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from imd.model import User


@dataclass
class Directory:
    users: list[User]
    fields: dict[int, dict[str, str]]  # "show", "admin"
    online: set[int]
    public: list[bytes]  # each user's entry, encoded, as other non-administrators see it
    joined: bytes = b""  # the JSON array of ``public``
    spans: dict[int, tuple[int, int, int]] | None = None  # uid: (index, start, end) in joined


class Directories:
    """Shared fetches of the user list.  ``render(user, fields, online, viewer, admin)``
    makes one entry; ``encode`` one JSON text."""

    def __init__(self, fetch: Callable[[], defer.Deferred],
                 render: Callable[..., dict], encode: Callable[[object], bytes]):
        self.fetch = fetch  # Deferred[(users, fields, online)]
        self.render = render
        self.encode = encode
        self.registrations = 0
        self._pending: list[defer.Deferred] | None = None  # logins waiting on the fetch
        self._started_at = 0  # registrations counted when the fetch under way started
        # uid: ((user, show, admin, online), entry): what the last fetch encoded for each user
        self._entries: dict[int, tuple[tuple, bytes]] = {}

    def mark(self) -> int:
        """A point in time (call it once a login has registered with the hub): a fetch
        started after it is new enough for that login."""
        self.registrations += 1
        return self.registrations

    def get(self, since: int) -> defer.Deferred:
        """Deferred[Directory], read after the mark ``since``."""
        d = defer.Deferred()
        if self._pending is not None and self._started_at >= since:
            self._pending.append(d)
            return d
        # A fetch of its own, which later logins join (one under way is older than this
        # login: it finishes for those waiting on it).
        waiting = [d]
        self._pending, self._started_at = waiting, self.registrations
        self.fetch().addCallback(lambda found: self._directory(*found)).addBoth(
            self._done, waiting)
        return d

    def _done(self, outcome, waiting: list[defer.Deferred]) -> None:
        if self._pending is waiting:
            self._pending = None
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

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
        return Directory(users, fields, online, public, b"[" + b",".join(public) + b"]",
                         spans)

    def entries(self, directory: Directory, viewer: int, admin: bool) -> list[dict]:
        return [self.render(u, directory.fields[u.id], u.id in directory.online, viewer,
                            admin) for u in directory.users]

    def encoded(self, directory: Directory, viewer: int, admin: bool) -> bytes:
        """The list as ``viewer`` is shown it, one JSON array."""
        if admin:
            return self.encode(self.entries(directory, viewer, admin))
        span = directory.spans.get(viewer)
        if span is None:
            return directory.joined
        i, start, end = span
        user = directory.users[i]
        own = self.encode(self.render(user, directory.fields[user.id],
                                      user.id in directory.online, viewer, False))
        if own == directory.public[i]:
            return directory.joined  # the same bytes for every such login: no copy
        joined = directory.joined
        return b"".join((joined[:start], own, joined[end:]))
