"""The sender "cards" the 66boss app needs in a message's extension.

The Android app sends, as a message's extension, base64 of a JSON object with ``sender``,
``senderID``, ``senderAvartar``, ``conversation`` and ``conversationAvartar`` (the group's
name and picture, or the sender's own in a one-to-one chat), and it reads the same object back
from every message it receives: one whose extension is not that object is dropped, and one with
an empty extension too (its ``split("_")`` loses the empty last field).  Messages from the other
protocols carry no such extension, so the 66boss side writes one for them from the sender's
and the group's names and pictures, which this cache keeps (per node, for ``ttl`` seconds, at
most ``size`` entries).  A 66boss client's own extension is passed on untouched.
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from imd.model import GROUP, Message
from imd.store.redis import RedisStore

# Extensions other protocols leave on a message: none, or xuanxuan's own gid mark.
FOREIGN_PREFIXES = ("xx:",)


def needs_card(message: Message) -> bool:
    """Whether the 66boss side must write this message's extension."""
    return not message.extension or message.extension.startswith(FOREIGN_PREFIXES)


def extension(message: Message, sender: tuple[str, str],
              group: tuple[str, str] | None) -> str:
    """The extension the app reads: base64 of its JSON object."""
    name, avatar = sender
    conversation, picture = group if message.ctype == GROUP and group else sender
    card = {"sender": name, "senderID": str(message.sender), "senderAvartar": avatar,
            "conversation": conversation, "conversationAvartar": picture}
    return base64.b64encode(json.dumps(card, ensure_ascii=False).encode()).decode()


class Cards:
    """(name, picture) of users and groups, cached."""

    def __init__(self, store: RedisStore, clock: IReactorTime, ttl: float = 300.0,
                 size: int = 100_000):
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self._cache: OrderedDict[tuple[str, int], tuple[tuple[str, str], float]] = \
            OrderedDict()
        self._loading: dict[tuple[str, int], list[defer.Deferred]] = {}  # see fetch()

    def _get(self, key: tuple[str, int]) -> tuple[str, str] | None:
        entry = self._cache.get(key)
        if entry is None or entry[1] < self.clock.seconds():
            return None
        return entry[0]

    def _put(self, key: tuple[str, int], card: tuple[str, str]) -> None:
        self._cache[key] = (card, self.clock.seconds() + self.ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)

    def render_extension(self, message: Message) -> str | None:
        """The extension for ``message`` from the cache, or None when a card is missing."""
        sender = self._get(("u", message.sender))
        group = self._get(("g", message.to)) if message.ctype == GROUP else None
        if sender is None or (message.ctype == GROUP and group is None):
            return None
        return extension(message, sender, group)

    def fetch(self, messages: list[Message]) -> defer.Deferred:
        """Deferred firing once the cards these messages need are loaded (unknown users and
        groups get their id).  A card already being loaded for another caller is waited
        for, not loaded again: a group message reaches every member's connection at once."""
        keys = {("u", m.sender) for m in messages}
        keys |= {("g", m.to) for m in messages if m.ctype == GROUP}
        missing = {k for k in keys if self._get(k) is None}
        loads = {id(load): load for k in missing if (load := self._loading.get(k))}
        new = missing - self._loading.keys()
        if new:
            load: list[defer.Deferred] = []  # the callers waiting on it
            for key in new:
                self._loading[key] = load
            defer.ensureDeferred(self._load(new)).addBoth(self._loaded, new, load)
            loads[id(load)] = load
        waits = []
        for load in loads.values():
            load.append(defer.Deferred())
            waits.append(load[-1])
        return defer.gatherResults(waits, consumeErrors=True)

    def _loaded(self, result, keys: set, load: list[defer.Deferred]) -> None:
        for key in keys:
            self._loading.pop(key, None)
        for d in load:
            d.errback(result) if isinstance(result, Failure) else d.callback(None)

    async def _load(self, keys: set[tuple[str, int]]) -> None:
        uids = [i for kind, i in keys if kind == "u"]
        users = await self.store.get_users(uids) if uids else {}
        for uid in uids:
            user = users.get(uid)
            self._put(("u", uid), (user.name or user.account, user.avatar) if user
                      else (str(uid), ""))
        for gid in [i for kind, i in keys if kind == "g"]:
            group = await self.store.get_group(gid)
            self._put(("g", gid), (group.name, group.snap) if group else (str(gid), ""))
