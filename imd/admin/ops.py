"""What an administrator can do, for the admin API and ``imdctl`` alike.

Both build an ``Ops`` on a hub: the daemon's own, or (``imdctl``) a hub that is never started
and so has no sessions; everything that reaches sessions goes through the hub and the store's
pub/sub, so a kick or a system message reaches every node either way.

Rules:
- users are named by account or by numeric id;
- disabling a user kicks all their sessions, on every node; they log in with neither
  password nor token until enabled again;
- a system message comes from the system user (made on first use, itself disabled: nobody
  logs in as it) and reaches a user, or each member of a group, as a one-to-one message,
  so every protocol shows it;
- an admin API token is shown once; the store keeps only its SHA-256 digest.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from twisted.internet import defer

from imd.accounts import AccountError, Accounts
from imd.hub import Hub, HubError
from imd.model import KICK, TEXT, UNICAST, Event

SYSTEM_ACCOUNT = "system"


class OpsError(Exception):
    """A refused operation; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class _Origin:
    """The hub Session-like sender of system messages (never registered with the hub)."""

    user_id: int
    protocol: str = "admin"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Ops:
    def __init__(self, hub: Hub, accounts: Accounts, serving: bool = True):
        self.hub = hub
        self.serving = serving  # the hub is a daemon's (imdctl's has no sessions)
        self.store = hub.store
        self.accounts = accounts

    # -- tokens --------------------------------------------------------------------------

    async def new_admin_token(self) -> str:
        token = secrets.token_urlsafe(32)
        await self.store.add_admin_token(token_digest(token))
        return token

    async def admin_token_ok(self, token: str) -> bool:
        return bool(token) and await self.store.is_admin_token(token_digest(token))

    # -- users ---------------------------------------------------------------------------

    async def user_id(self, who: str | int) -> int:
        """The id of the user named by account or id; OpsError 404 when there is none."""
        who = str(who).strip()
        uid = await self.store.find_account(who)
        if uid is None and who.isdigit() and await self.store.get_user(int(who)):
            uid = int(who)
        if uid is None:
            raise OpsError(f"no such user: {who}", 404)
        return uid

    async def create_user(self, account: str, password: str, name: str = "") -> dict:
        try:
            user = await self.accounts.create(account, password, name)
        except AccountError as e:
            raise OpsError(str(e)) from None
        return {"id": user.id, "account": user.account, "name": user.name, "disabled": False}

    async def users(self) -> list[dict]:
        users = await self.store.list_users()
        flags = await self.store.users_fields([u.id for u in users], "disabled")
        return [{"id": u.id, "account": u.account, "name": u.name,
                 "disabled": flags[u.id]["disabled"] == "1"} for u in users]

    async def set_disabled(self, who: str | int, disabled: bool) -> dict:
        uid = await self.user_id(who)
        await self.store.set_user_fields(uid, disabled="1" if disabled else "")
        if disabled:
            await self.hub.notify([uid], Event(KICK, {}))
        return {"id": uid, "disabled": disabled}

    async def reset_password(self, who: str | int, password: str) -> dict:
        uid = await self.user_id(who)
        try:
            await self.accounts.set_password(uid, password)
        except AccountError as e:
            raise OpsError(str(e)) from None
        return {"id": uid}

    # -- sessions ------------------------------------------------------------------------

    def local_counts(self) -> dict[str, int]:
        """This node's sessions per protocol, from the hub."""
        counts: dict[str, int] = {}
        for sessions in self.hub.sessions.values():
            for session in sessions:
                counts[session.protocol] = counts.get(session.protocol, 0) + 1
        return counts

    async def sessions(self) -> dict:
        """Sessions per protocol on every node (as each node last reported them; this
        node's live), and this node's sessions one by one."""
        nodes = await self.store.node_sessions()
        here = [(uid, s) for uid, sessions in self.hub.sessions.items() for s in sessions]
        if self.serving:
            nodes[self.hub.node] = self.local_counts()
        names = await self.store.get_users({uid for uid, _ in here})
        return {"node": self.hub.node, "nodes": nodes, "sessions": [
            {"id": self.hub.session_id(s), "node": self.hub.node, "protocol": s.protocol,
             "user": uid, "account": names[uid].account if uid in names else ""}
            for uid, s in here]}

    async def kick(self, who: str | int, session: str | None = None) -> dict:
        """Close one session (by its id from ``sessions``) or all of a user's sessions."""
        uid = await self.user_id(who)
        await self.hub.notify([uid], Event(KICK, {"session": session} if session else {}))
        return {"id": uid, "session": session}

    # -- groups --------------------------------------------------------------------------

    async def groups(self) -> list[dict]:
        groups = []
        for gid in await self.store.group_ids():
            group = await self.store.get_group(gid)
            if group is not None:
                groups.append({"id": gid, "name": group.name, "creator": group.creator,
                               "members": len(group.members), "public": group.public})
        return groups

    async def group(self, gid: str | int) -> dict:
        group = await self.store.get_group(int(gid)) if str(gid).isdigit() else None
        if group is None:
            raise OpsError(f"no such group: {gid}", 404)
        users = await self.store.get_users(group.members)
        return {"id": group.id, "name": group.name, "creator": group.creator,
                "public": group.public, "members": [
                    {"id": m, "account": users[m].account if m in users else "",
                     "name": users[m].name if m in users else ""} for m in group.members]}

    # -- system messages -----------------------------------------------------------------

    async def system_user(self) -> int:
        uid = await self.store.system_user()
        if uid is not None:
            return uid
        account = SYSTEM_ACCOUNT
        if await self.store.find_account(account) is not None:
            account = f"{SYSTEM_ACCOUNT}-{secrets.token_hex(3)}"
        user = await self.accounts.create(account, secrets.token_urlsafe(24), "System")
        await self.store.set_user_fields(user.id, disabled="1")
        await self.store.set_system_user(user.id)
        return user.id

    async def system_message(self, text: str, user: str | int | None = None,
                             group: str | int | None = None) -> dict:
        """Send ``text`` from the system user to a user or to each member of a group."""
        if not text:
            raise OpsError("empty message")
        if (user is None) == (group is None):
            raise OpsError("give a user or a group")
        if user is not None:
            uids = [await self.user_id(user)]
        else:
            uids = [m["id"] for m in (await self.group(group))["members"]]
        origin = _Origin(await self.system_user())
        sends = [self.hub.send(origin, UNICAST, uid, TEXT, text)
                 for uid in uids if uid != origin.user_id]
        try:
            messages = await defer.gatherResults(sends, consumeErrors=True)
        except defer.FirstError as e:
            if e.subFailure.check(HubError):
                raise OpsError(str(e.subFailure.value)) from None
            e.subFailure.raiseException()
        return {"from": origin.user_id, "to": [m.to for m in messages]}
