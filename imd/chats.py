"""xuanxuan's chats over the hub's conversations: one-to-one chats, group chats (the hub's
groups, so a xuanxuan group chat is a webim room and a 66boss group) and the system chat.

A chat gid is resolved as: ``a&b`` (the two user ids, either order) a one-to-one chat;
``system`` the group every user is in; a gid a xuanxuan client made for a group chat (linked
to its group); or the decimal id of a group made by another protocol.  A one-to-one chat's
``gid`` is kept in numeric order; the client is shown its own order (``shown_gid``).

Rules (the seed's): only group chats can be joined, left or renamed; only public ones joined
by non-members; only admins (or the creator) may remove members; when committers are set,
only they may post; setAdmin is for system administrators (``imdctl admin ACCOUNT``).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Sequence

from twisted.internet import defer

from imd.groups import GroupError, Groups
from imd.model import GROUP, Group, Message, group_conversation, one2one_gid
from imd.store.redis import RedisStore


class ChatError(Exception):
    """A refused chat operation; the message is fit to show to the client."""


@dataclass
class Chat:
    gid: str
    type: str  # one2one | group | system
    members: Sequence[int]  # sorted
    group: Group | None = None
    meta: dict | None = None
    peer: int | None = None  # the other user of a one-to-one chat, seen from the caller
    mine: dict | None = None  # the caller's flags (star, hide, mute), when fetched with it

    def csv(self, name: str) -> list[int]:
        raw = (self.meta or {}).get(name, "")
        return [int(x) for x in raw.split(",") if x.strip().isdigit()]

    @property
    def shown_gid(self) -> str:
        """The gid the 1.0 client knows the chat by: for a one-to-one chat the ids sorted as
        text (JavaScript's default sort, so 100000&99999), else the gid."""
        if self.type != "one2one":
            return self.gid
        return "&".join(sorted(self.gid.split("&")))

    @property
    def conversation(self) -> str:
        """The hub's conversation key (a message's ``conversation``) of this chat."""
        return self.gid if self.type == "one2one" else group_conversation(self.group.id)


class Chats:
    def __init__(self, store: RedisStore, groups: Groups):
        self.store = store
        self.groups = groups

    @staticmethod
    def one2one(gid: str, uid: int | None = None) -> Chat:
        """The one-to-one chat ``a&b`` (either order) without its settings and without
        asking the store whether both users exist; ChatError for a malformed gid."""
        parts = gid.split("&")
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 18
                                      for p in parts):
            raise ChatError("bad chat gid")
        a, b = sorted((int(parts[0]), int(parts[1])))
        if gid not in (f"{a}&{b}", f"{b}&{a}"):
            raise ChatError("bad chat gid")
        # numeric order inside, the client's order on the wire
        return Chat(f"{a}&{b}", "one2one", [a, b],
                    peer=None if uid is None else (b if uid == a else a))

    async def resolve(self, gid: str, uid: int | None = None) -> Chat:
        gid = str(gid or "")
        if "&" in gid:
            chat = self.one2one(gid, uid)
            if await self.store.users_exist(chat.members):
                raise ChatError("no such user")
            chat.meta = await self.store.chat_meta(chat.gid)
            return chat
        if gid == "system":
            group_id = await self.store.system_group()
        else:
            group_id = await self.store.group_for_gid(gid)
            if group_id is None and gid.isdigit() and len(gid) <= 18:
                group_id = int(gid)
        group = await self.store.get_group(group_id) if group_id is not None else None
        if group is None:
            raise ChatError("no such chat")
        meta = await self.store.chat_meta(gid)
        # The group's members come sorted; the tuple is shared (the store keeps a big
        # group's, e.g. the system chat's every user, while it is current).
        return Chat(gid, "system" if gid == "system" else meta.get("type", "group"),
                    group.members, group=group, meta=meta)

    async def gid_of_group(self, group_id: int) -> str:
        return await self.store.gid_for_group(group_id) or str(group_id)

    async def infos(self, chats: list[Chat], uid: int) -> list[dict]:
        """The chat objects ``uid`` is shown (two round trips for the lot, fewer when
        the chats came with ``uid``'s flags or name no creator or editor)."""
        if all(c.mine is not None for c in chats):
            flags = {c.gid: c.mine for c in chats}
        else:
            flags = await self.store.chat_flags(uid)
        people = _people(chats)
        accounts = {u: user.account for u, user in (await self.store.get_users(people)).items()}
        return [self.info(c, flags, accounts) for c in chats]

    def info_now(self, chat: Chat) -> dict | None:
        """``infos([chat], uid)[0]`` without a round trip, for a chat fetched with the
        caller's flags (``mine``) that names no creator or editor; else None."""
        if chat.mine is None or _people([chat]):
            return None
        return self.info(chat, {chat.gid: chat.mine}, {})

    @staticmethod
    def info(chat: Chat, flags: dict[str, dict], accounts: dict[int, str]) -> dict:
        """The chat object of the 1.0 client (ints, Unix-second dates, comma strings);
        ``createdBy``/``editedBy`` are accounts, as the client compares them with
        ``user.account`` to find a group's owner."""
        meta = chat.meta or {}
        mine = flags.get(chat.gid, {})
        created = int(meta.get("createdDate") or 0)
        if chat.group is None:
            name = meta.get("name", "")
        elif meta.get("unnamed") and chat.group.name == unnamed(chat.group.id):
            name = ""  # made without a name: the client shows its own label
        else:
            name = chat.group.name
        creator = _creator(chat)
        editor = meta.get("editedBy", "")
        return {
            "id": chat.group.id if chat.group else _one2one_id(chat.gid),
            "gid": chat.shown_gid, "name": name, "type": chat.type,
            "admins": meta.get("admins", ""), "committers": meta.get("committers", ""),
            "subject": int(meta.get("subject") or 0),
            "public": int(bool(chat.group and chat.group.public)),
            "createdBy": accounts.get(int(creator), "") if str(creator).isdigit() else creator,
            "createdDate": created or "",
            "editedBy": accounts.get(int(editor), "") if editor.isdigit() else editor,
            "editedDate": int(meta.get("editedDate") or 0) or "",
            "lastActiveTime": int(meta.get("lastActiveTime") or 0) or "",
            "star": int(bool(mine.get("star"))), "hide": int(bool(mine.get("hide"))),
            "mute": int(bool(mine.get("mute"))),
            "members": chat.members if chat.group else sorted(chat.members),
        }

    async def of_message(self, message: Message, uid: int) -> Chat:
        """The chat a message belongs to, as ``uid`` sees it; a one-to-one chat is also
        listed as ``uid``'s from now on (so it is in their next getList)."""
        if message.ctype == GROUP:
            system = await self.store.system_group()
            return await self.resolve("system" if message.to == system
                                      else await self.gid_of_group(message.to), uid)
        # The message is stored, so both users exist: one round trip.
        chat = self.one2one(one2one_gid(message.sender, message.to), uid)
        chat.meta, chat.mine = await self.store.one2one_contact(chat.gid, *chat.members, uid)
        return chat

    async def of_user(self, uid: int) -> list[Chat]:
        """The system chat, the user's one-to-one chats, their group chats (the chats gone
        meanwhile left out).  The reads run side by side: a login waits for two or three
        round trips, not two per chat."""
        system, gids, groups = await _together([
            self.resolve("system", uid), self.store.one2one_chats(uid),
            self.store.user_groups(uid)])
        found = await _together([self.resolve(gid, uid) for gid in gids] +
                                [self._resolve_group(group_id, uid) for group_id in groups],
                                skip=ChatError)
        return [system, *found]

    async def _resolve_group(self, group_id: int, uid: int) -> Chat:
        return await self.resolve(await self.gid_of_group(group_id), uid)

    async def create(self, uid: int, gid: str, name: str, kind: str, members: list[int],
                     subject: int = 0, public: bool = False) -> tuple[Chat, bool]:
        """The chat ``gid``, made if new; returns (chat, created).  A one-to-one chat
        counts as made by its first ``create`` (until then it only had messages)."""
        try:
            chat = await self.resolve(gid, uid)
        except ChatError:
            pass
        else:
            if uid not in chat.members and not (chat.group and chat.group.public):
                raise ChatError("not a member of this chat")
            if chat.type != "one2one" or chat.meta.get("createdDate"):
                return chat, False
        now = int(time.time())
        meta = {"createdBy": uid, "createdDate": now, "subject": int(subject or 0),
                "name": name or ""}
        if kind == "one2one" or "&" in gid:
            chat = await self.resolve(gid, uid)  # validates the gid and both users
            if uid not in chat.members:
                raise ChatError("not a member of this chat")
            await self.store.set_chat_meta(chat.gid, type="one2one", **meta)
            await self.store.add_one2one(chat.gid, *chat.members)
            return await self.resolve(chat.gid, uid), True
        if not gid or len(gid) > 64 or gid == "system" or gid.isdigit():
            raise ChatError("bad chat gid")
        try:
            # The other protocols need a room name: an unnamed chat gets a placeholder
            # there and stays unnamed here.
            group = await self.groups.create(uid, members, name or unnamed(0))
            if not name:
                meta["unnamed"] = 1
                await self.store.edit_group(group.id, name=unnamed(group.id))
        except GroupError as e:
            raise ChatError(str(e)) from None
        await self.store.set_chat_meta(gid, type="group", **meta)
        await self.store.link_gid(gid, group.id)
        if public:
            await self.store.set_public(group.id, True)
        return await self.resolve(gid, uid), True

    async def join(self, uid: int, gid: str, join: bool) -> Chat:
        chat = await self.resolve(gid, uid)
        if chat.type != "group":
            raise ChatError("only group chats can be joined or left")
        try:
            if join:
                await self.groups.join(chat.group.id, uid)
            else:
                await self.groups.remove_members(chat.group.id, [uid], uid)
        except GroupError as e:
            raise ChatError(str(e)) from None
        return await self.resolve(gid, uid)

    async def rename(self, uid: int, gid: str, name: str) -> Chat:
        chat = await self.resolve(gid, uid)
        if chat.type != "group":
            raise ChatError("only group chats can be renamed")
        self.require_member(chat, uid)
        if not name or len(name) > 64:
            raise ChatError("name must be 1-64 characters")
        await self.store.edit_group(chat.group.id, name=name)
        await self.store.set_chat_meta(gid, name=name, editedBy=uid,
                                       editedDate=int(time.time()))
        return await self.resolve(gid, uid)

    async def members_change(self, uid: int, gid: str, members: list[int], join: bool) -> Chat:
        chat = await self.resolve(gid, uid)
        if chat.type != "group":
            raise ChatError("only group chats have members to change")
        self.require_member(chat, uid)
        if join:
            try:
                await self.groups.add_members(chat.group.id, members, uid)
            except GroupError as e:
                raise ChatError(str(e)) from None
        else:
            if uid not in chat.csv("admins") and uid != chat.group.creator:
                raise ChatError("only admins may remove members")
            if chat.group.creator in members:
                raise ChatError("the creator cannot be removed")
            await self.store.remove_members(chat.group.id, members)
        return await self.resolve(gid, uid)

    async def set_public(self, uid: int, gid: str, public: bool) -> Chat:
        chat = await self.resolve(gid, uid)
        if chat.type != "group":
            raise ChatError("only group chats can be public")
        self.require_admin(chat, uid)
        await self.store.set_public(chat.group.id, public)
        return await self.resolve(gid, uid)

    async def set_list(self, uid: int, gid: str, field: str, members: list[int],
                       add: bool | None) -> Chat:
        """Change a chat's admins (system administrators only) or committers (admins):
        add or remove ``members``, or with ``add=None`` make the list exactly ``members``."""
        chat = await self.resolve(gid, uid)
        if chat.type == "one2one":
            raise ChatError("one-to-one chats have no admins or committers")
        if field == "admins":
            if (await self.store.user_fields(uid, "admin"))["admin"] != "super":
                raise ChatError("only system administrators may set chat admins")
        else:
            self.require_admin(chat, uid)
        current = set(chat.csv(field))
        if add is None:
            current = set(members)
        else:
            current = current | set(members) if add else current - set(members)
        await self.store.set_chat_meta(gid, **{field: ",".join(map(str, sorted(current)))})
        return await self.resolve(gid, uid)

    async def public_list(self) -> list[Chat]:
        chats = []
        for group_id in await self.store.public_groups():
            try:
                chats.append(await self.resolve(await self.gid_of_group(group_id)))
            except ChatError:
                pass
        return chats

    @staticmethod
    def require_member(chat: Chat, uid: int) -> None:
        if uid not in chat.members:
            raise ChatError("not a member of this chat")

    @staticmethod
    def require_admin(chat: Chat, uid: int) -> None:
        if uid not in chat.csv("admins") and (chat.group is None or uid != chat.group.creator):
            raise ChatError("only admins may do this")

    @staticmethod
    def may_post(chat: Chat, uid: int) -> bool:
        committers = chat.csv("committers")
        return uid in chat.members and (not committers or uid in committers)


async def _together(coroutines: list, skip: type[Exception] | None = None) -> list:
    """The results of ``coroutines``, run side by side, in order; those that raised
    ``skip`` left out.  Any other exception is raised (the first one, as it was)."""
    outcomes = await defer.DeferredList([defer.ensureDeferred(c) for c in coroutines],
                                        consumeErrors=True)
    results = []
    for ok, value in outcomes:
        if ok:
            results.append(value)
        elif skip is None or not value.check(skip):
            value.raiseException()
    return results


def unnamed(group_id: int) -> str:
    """The name other protocols show for a group chat made without one (the 1.0
    client's own label for it)."""
    return f"讨论组{group_id}"


def _creator(chat: Chat) -> str:
    """Who made a chat: a user id (as text), or "system" for the system chat."""
    if chat.type == "system":
        return "system"
    creator = (chat.meta or {}).get("createdBy")
    if creator is None and chat.group is not None:
        creator = chat.group.creator
    return str(creator or "")


def _people(chats: list[Chat]) -> set[int]:
    """The users a list of chats names as creator or editor."""
    return {int(x) for c in chats for x in (_creator(c), (c.meta or {}).get("editedBy"))
            if str(x or "").isdigit()}


def _one2one_id(gid: str) -> int:
    """A stable int id for a one-to-one chat (the client wants ints): a hash of the gid."""
    return zlib.crc32(gid.encode()) & 0x7FFFFFFF
