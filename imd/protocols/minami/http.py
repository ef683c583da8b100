"""minami over HTTP: ``POST register`` (JSON body) and ``GET friends/found|request|add|remove``
with ``id`` + ``token`` auth.  Replies are the seed's JSON with its exact codes and texts."""

from __future__ import annotations


from twisted.web import resource, server

from imd import jsonin
from imd.accounts import AccountError, Accounts
from imd.friends import FriendError, Friends
from imd.model import User
from imd.guard import source_host
from imd.protocols.minami.codes import MinamiError, reply
from imd.throttle import Throttled
from imd.web import AsyncJSONResource, arg

REGISTER_FIELDS = ("account", "password", "name", "picture", "sex", "birthday", "sign", "mail")


def profile_json(user: User) -> dict:
    return {"id": str(user.id), "name": user.name, "picture": user.avatar, "sex": user.sex,
            "birthday": user.birthday, "sign": user.sign}


def parse_id(text: str | None) -> int | None:
    """A user id given as text; None when it is not one (so it matches nobody)."""
    text = (text or "").strip()
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    return None


class MinamiHttp:
    def __init__(self, accounts: Accounts, friends: Friends):
        self.accounts = accounts
        self.friends = friends

    def resource(self, handler) -> resource.Resource:
        async def guarded(request):
            try:
                return 200, await handler(request)
            except MinamiError as e:
                return 200, reply(e.code)
        return AsyncJSONResource(guarded)

    def mount(self, prefix: resource.Resource) -> None:
        prefix.putChild(b"register", self.resource(self.register))
        friends = resource.Resource()
        prefix.putChild(b"friends", friends)
        for name, handler in [("found", self.found), ("request", self.request),
                              ("add", self.add), ("remove", self.remove)]:
            friends.putChild(name.encode(), self.resource(handler))

    async def register(self, request: server.Request) -> dict:
        if request.method != b"POST":
            raise MinamiError(403)
        try:
            body = jsonin.read(request.content.read())
        except jsonin.BadJSON:
            raise MinamiError(403) from None
        if not isinstance(body, dict) or any(
                not isinstance(body.get(k, ""), str) for k in REGISTER_FIELDS):
            raise MinamiError(403)
        fields = {k: body.get(k, "").strip() for k in REGISTER_FIELDS}
        for key, code in (("account", 501), ("password", 502), ("mail", 503)):
            if not fields[key]:
                raise MinamiError(code)
        if await self.accounts.store.find_account(fields["account"]) is not None:
            raise MinamiError(504)
        try:
            await self.accounts.create(
                fields["account"], fields["password"], fields["name"], fields["picture"],
                sex=fields["sex"], birthday=fields["birthday"], sign=fields["sign"],
                mail=fields["mail"], address=source_host(request.getClientAddress()))
        except Throttled:
            raise MinamiError(500) from None  # minami has no code for "too many attempts"
        except AccountError as e:
            if "already exists" in str(e):
                raise MinamiError(504) from None
            raise MinamiError(403) from None
        return reply(200)

    async def _caller(self, request: server.Request) -> int:
        token = (arg(request, "token") or "").strip()
        if not token:
            raise MinamiError(514)
        claimed = (arg(request, "id") or "").strip()
        if not claimed:
            raise MinamiError(517)
        uid = await self.accounts.user_for_token(token)
        if uid is None or str(uid) != claimed:
            raise MinamiError(515)
        return uid

    def _friend_id(self, request: server.Request, name: str) -> int:
        text = (arg(request, name) or "").strip()
        if not text:
            raise MinamiError(519)
        uid = parse_id(text)
        if uid is None:
            raise MinamiError(523)
        return uid

    async def found(self, request: server.Request) -> dict:
        await self._caller(request)
        name = (arg(request, "name") or "").strip()
        if not name:
            raise MinamiError(516)
        return reply(200, found=[profile_json(u) for u in await self.friends.find(name)])

    async def request(self, request: server.Request) -> dict:
        me = await self._caller(request)
        to = self._friend_id(request, "to")
        await self._friend_call(self.friends.request(me, to, (arg(request, "note") or "")))
        return reply(200)

    async def add(self, request: server.Request) -> dict:
        me = await self._caller(request)
        frm = self._friend_id(request, "from")
        alias = (arg(request, "name") or "").strip()
        if not alias:
            raise MinamiError(521)
        await self._friend_call(self.friends.accept(me, frm, alias))
        return reply(200)

    async def remove(self, request: server.Request) -> dict:
        me = await self._caller(request)
        to = self._friend_id(request, "to")
        await self._friend_call(self.friends.remove(me, to))
        return reply(200)

    @staticmethod
    async def _friend_call(call) -> None:
        try:
            await call
        except FriendError as e:
            raise MinamiError({FriendError.NO_SUCH_USER: 523, FriendError.ALREADY: 522,
                               FriendError.NOT_FRIENDS: 512}.get(e.reason, 403)) from None
