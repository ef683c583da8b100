"""The friend graph (minami friends, webim buddies): requests, acceptance, removal, listing.

Rules: a request goes to an existing user who is not yet a friend; it is stored until accepted
and pushed at once to the recipient's live sessions.  Accepting needs a pending request from
that user and makes the friendship both ways: the accepter names the requester with the alias
they give, the requester sees the accepter under the accepter's display name.  Removing
removes both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

from imd.hub import Hub
from imd.model import Event, User

MAX_ALIAS = 64
MAX_NOTE = 512


class FriendError(Exception):
    """A refused friend operation; ``reason`` is one of the class constants."""

    NO_SUCH_USER = "no such user"
    ALREADY = "already friends"
    NOT_FRIENDS = "not friends"
    NO_REQUEST = "no pending request from that user"
    BAD_VALUE = "bad value"

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True)
class Friend:
    user: User
    alias: str
    online: bool


@dataclass(frozen=True)
class Request:
    requester: int
    name: str
    to: int
    note: str


class Friends:
    def __init__(self, hub: Hub):
        self.hub = hub
        self.store = hub.store

    async def _existing(self, uid: int) -> User:
        user = await self.store.get_user(uid)
        if user is None:
            raise FriendError(FriendError.NO_SUCH_USER)
        return user

    async def find(self, name: str) -> list[User]:
        return await self.store.find_by_name(name)

    async def request(self, frm: int, to: int, note: str) -> None:
        if len(note) > MAX_NOTE:
            raise FriendError(FriendError.BAD_VALUE, "note too long")
        if frm == to:
            raise FriendError(FriendError.BAD_VALUE, "cannot befriend yourself")
        await self._existing(to)
        requester = await self._existing(frm)
        if await self.store.are_friends(frm, to):
            raise FriendError(FriendError.ALREADY)
        await self.store.add_friend_request(frm, to, requester.name, note)
        await self.hub.notify([to], Event("friend_request", {
            "from": frm, "name": requester.name, "to": to, "note": note}))

    async def requests(self, uid: int) -> list[Request]:
        pending = await self.store.friend_requests(uid)
        return [Request(requester=r, name=v.get("name", ""), to=uid, note=v.get("note", ""))
                for r, v in sorted(pending.items())]

    async def accept(self, me: int, frm: int, alias: str) -> None:
        if len(alias) > MAX_ALIAS:
            raise FriendError(FriendError.BAD_VALUE, "alias too long")
        await self._existing(frm)
        if await self.store.are_friends(me, frm):
            raise FriendError(FriendError.ALREADY)
        if frm not in await self.store.friend_requests(me):
            raise FriendError(FriendError.NO_REQUEST)
        accepter = await self._existing(me)
        await self.store.befriend(me, frm, alias, accepter.name)

    async def remove(self, me: int, other: int) -> None:
        if not await self.store.unfriend(me, other):
            raise FriendError(FriendError.NOT_FRIENDS)

    async def are_friends(self, a: int, b: int) -> bool:
        return await self.store.are_friends(a, b)

    async def list(self, uid: int) -> list[Friend]:
        aliases = await self.store.friends(uid)
        users = await self.store.get_users(aliases)
        online = await self.hub.online_among(users)
        return [Friend(users[fid], aliases[fid], fid in online) for fid in sorted(users)]
