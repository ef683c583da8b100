"""Groups and who may change them (66boss groups, webim rooms, xuanxuan group chats).

Rules:
- a group is created by an existing user (its creator, always a member) with members that are
  all existing users;
- any member may add members (who must exist);
- only the creator may rename the group, change its notice or remove members; a member may
  remove (only) themselves; the creator cannot be removed;
- anyone may join a public group (webim join, xuanxuan joinchat);
- only members may read a group's details; ``caller=None`` means a trusted caller (closed
  networks, ``--boss-auth=trust`` without a caller id) and skips the caller checks.
"""

from __future__ import annotations

from typing import Iterable

from imd.model import Group
from imd.store.redis import RedisStore

MAX_NAME = 64
MAX_NOTICE = 1024
MAX_MEMBERS = 2000


class GroupError(Exception):
    """A refused group operation; the message is fit to show to the client."""


class GroupNotFound(GroupError):
    """The group, or a user named in the request, does not exist."""


class NotAllowed(GroupError):
    """The caller may not do this to the group."""


class Groups:
    def __init__(self, store: RedisStore):
        self.store = store

    async def _existing(self, uids: Iterable[int]) -> list[int]:
        uids = sorted(set(uids))
        if len(uids) > MAX_MEMBERS:
            raise GroupError(f"at most {MAX_MEMBERS} members")
        missing = await self.store.users_exist(uids)
        if missing:
            raise GroupNotFound("no such user: " + ",".join(map(str, missing)))
        return uids

    async def get(self, gid: int, caller: int | None = None) -> Group:
        group = await self.store.get_group(gid)
        if group is None:
            raise GroupNotFound("no such group")
        if caller is not None and caller not in group.members:
            raise NotAllowed("not a member of this group")
        return group

    async def create(self, creator: int, members: Iterable[int], name: str,
                     snap: str = "") -> Group:
        _check_text("name", name, MAX_NAME)
        members = await self._existing([creator, *members])
        return await self.store.create_group(creator, name, members, snap)

    async def add_members(self, gid: int, members: Iterable[int],
                          caller: int | None = None) -> Group:
        group = await self.get(gid, caller)
        members = await self._existing(members)
        if len(set(group.members) | set(members)) > MAX_MEMBERS:
            raise GroupError(f"at most {MAX_MEMBERS} members")
        await self.store.add_members(gid, members)
        return group

    async def join(self, gid: int, uid: int) -> Group:
        """A user joins a group: already a member, or the group is public."""
        group = await self.get(gid)
        if uid not in group.members:
            if not group.public:
                raise NotAllowed("this group is not public")
            await self.store.add_members(gid, [uid])
            group = await self.get(gid)
        return group

    async def remove_members(self, gid: int, members: Iterable[int],
                             caller: int | None = None) -> Group:
        group = await self.get(gid, caller)
        members = set(members)
        if caller is not None and caller != group.creator and members != {caller}:
            raise NotAllowed("only the creator may remove other members")
        if group.creator in members:
            raise NotAllowed("the creator cannot be removed")
        await self.store.remove_members(gid, members)
        return group

    async def edit(self, gid: int, caller: int | None = None, name: str | None = None,
                   notice: str | None = None) -> Group:
        group = await self.get(gid, caller)
        if caller is not None and caller != group.creator:
            raise NotAllowed("only the creator may edit the group")
        fields = {}
        if name is not None:
            _check_text("name", name, MAX_NAME)
            fields["name"] = name
        if notice is not None:
            if len(notice) > MAX_NOTICE:
                raise GroupError(f"notice must be at most {MAX_NOTICE} characters")
            fields["notice"] = notice
        if not fields:
            raise GroupError("nothing to change: give name and/or notice")
        await self.store.edit_group(gid, **fields)
        return group

    async def of_user(self, uid: int) -> list[Group]:
        groups = []
        for gid in await self.store.user_groups(uid):
            group = await self.store.get_group(gid)
            if group is not None:
                groups.append(group)
        return groups


def _check_text(what: str, value: str, limit: int) -> None:
    if not value or not value.strip():
        raise GroupError(f"{what} must not be empty")
    if len(value) > limit:
        raise GroupError(f"{what} must be at most {limit} characters")
