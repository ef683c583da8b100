"""66boss HTTP side: the group API and the login endpoint, at ``/<name>`` and ``/wsim/<name>``,
and the 66boss app's own login, ``POST /ucenter/login/index``.

Group API replies are JSON with ``code: 0`` on success, as the shipped server answered and the
app (``BaseModelRequest``) requires, and, on failure, one of: 400 bad or missing parameter,
401 missing or bad token, 403 not allowed, 404 no such group or user, 429 too many failed
logins (throttled, imd/throttle.py), 500 server error, each
with a ``message``.  The HTTP status is 200 either way, as the original clients only read the
JSON.  ``/login`` (imd's own, not the app's) keeps ``code: 1`` on success.

Who is calling: ``token=<token>``, ``access_token=<token>`` (what the app sends, a form field
of its POST) or ``Authorization: Bearer <token>``.  A valid token is also a proof of identity
for ``--boss-auth=address`` (proofs.py).  With ``--boss-auth=trust`` the token may be left
out; the caller is then taken from ``userid`` (or ``creator`` for creategrp), and with neither
the request is trusted as a whole.

The app's login reads its reply through ``BaseDataRequest``: ``code: 1`` is success and the
account (``AccountEntity``: ``user_id``, ``user_name``, ``access_token``, ``avatar``, ...,
all strings) is in ``result``; any other code is a failure whose ``message`` the app shows.
``status`` is always present and never 401 there, as the app unboxes it and treats 401 as
"this session's token expired: log out".
"""

from __future__ import annotations


from twisted.web import resource, server

from imd import jsonin
from imd.groups import GroupError, GroupNotFound, NotAllowed
from imd.model import Group, User
from imd.protocols.boss.connection import BossService
from imd.protocols.boss.proofs import source_host
from imd.throttle import Throttled
from imd.web import AsyncJSONResource, arg, request_token

OK = {"code": 0, "message": "OK"}
LOGIN_OK = {"code": 1, "message": "OK"}  # imd's /login, older than the group API fix
APP_OK = 1  # BaseDataRequest's success code


class ApiError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _fail(code: int, message: str) -> tuple[int, dict]:
    return 200, {"code": code, "message": message}


def _id(request: server.Request, name: str) -> int:
    value = arg(request, name)
    if value is None or not value.strip():
        raise ApiError(400, f"missing parameter: {name}")
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise ApiError(400, f"bad {name}: not an id")
    return int(value)


def _ids(request: server.Request, name: str) -> list[int]:
    value = arg(request, name)
    if value is None or not value.strip(" ,"):
        raise ApiError(400, f"missing parameter: {name}")
    ids = []
    for part in value.strip(" ,").split(","):
        part = part.strip()
        if not part.isascii() or not part.isdigit() or len(part) > 18:
            raise ApiError(400, f"bad {name}: {part[:32]!r} is not an id")
        ids.append(int(part))
    return ids


class BossApi:
    """Handlers of the group API and login; each returns (HTTP status, JSON object)."""

    def __init__(self, service: BossService):
        self.service = service
        self.groups = service.groups
        self.store = service.hub.store

    def resource(self, handler) -> resource.Resource:
        async def guarded(request):
            try:
                return await handler(request)
            except ApiError as e:
                return _fail(e.code, str(e))
            except Throttled as e:
                return _fail(429, str(e))
            except GroupNotFound as e:
                return _fail(404, str(e))
            except NotAllowed as e:
                return _fail(403, str(e))
            except GroupError as e:
                return _fail(400, str(e))
        return AsyncJSONResource(guarded)

    def mount(self, parent: resource.Resource) -> None:
        for name, handler in [
                ("creategrp", self.creategrp), ("addmembers", self.addmembers),
                ("delmembers", self.delmembers), ("editgrp", self.editgrp),
                ("querymygrps", self.querymygrps), ("grpinfo", self.grpinfo),
                ("refreshgrp", self.refreshgrp), ("login", self.login)]:
            parent.putChild(name.encode(), self.resource(handler))

    def mount_app_login(self, root: resource.Resource) -> None:
        """``/ucenter/login/index``, where the app's ``LoginRequest`` posts."""
        node = root
        for name in (b"ucenter", b"login"):
            child = node.children.get(name)
            if child is None:
                child = resource.Resource()
                node.putChild(name, child)
            node = child
        node.putChild(b"index", AsyncJSONResource(self.app_login))

    async def caller(self, request: server.Request, claimed: str = "userid") -> int | None:
        """The user making the request; None for a trusted anonymous caller."""
        token = token_of(request)
        if token:
            uid = await self.service.token_user(token, source_host(request.getClientAddress()))
            if uid is None:
                raise ApiError(401, "bad or expired token")
            return uid
        if self.service.config.boss_auth == "trust":
            return _id(request, claimed) if arg(request, claimed) else None
        raise ApiError(401, "a token is required (access_token=..., token=... or "
                            "Authorization: Bearer ...)")

    def _proved(self, request: server.Request, uid: int, token: str) -> None:
        self.service.proofs.record(uid, source_host(request.getClientAddress()), token)

    async def _group_json(self, group: Group, members_as_users: bool) -> dict:
        obj = {"groupid": str(group.id), "creator": str(group.creator), "name": group.name,
               "notice": group.notice, "snap": group.snap}
        if members_as_users:
            users = await self.store.get_users(group.members)
            obj["members"] = [_member(users[m]) for m in group.members if m in users]
        else:
            obj["members"] = [str(m) for m in group.members]
        return obj

    # -- handlers --------------------------------------------------------------------------

    async def creategrp(self, request):
        creator = _id(request, "creator")
        caller = await self.caller(request, "creator")
        if caller is not None and caller != creator:
            raise ApiError(403, "creator must be the caller")
        members = _ids(request, "members") if arg(request, "members") else []
        name = arg(request, "name")
        group = await self.groups.create(creator, members, name if name is not None else "")
        return 200, {**OK, "data": await self._group_json(group, members_as_users=False)}

    async def addmembers(self, request):
        gid, members = _id(request, "groupid"), _ids(request, "members")
        await self.groups.add_members(gid, members, await self.caller(request))
        return 200, OK

    async def delmembers(self, request):
        gid, members = _id(request, "groupid"), _ids(request, "members")
        await self.groups.remove_members(gid, members, await self.caller(request))
        return 200, OK

    async def editgrp(self, request):
        gid = _id(request, "groupid")
        await self.groups.edit(gid, await self.caller(request), name=arg(request, "name"),
                               notice=arg(request, "notice"))
        return 200, OK

    async def querymygrps(self, request):
        uid = _id(request, "userid")
        caller = await self.caller(request)
        if caller is not None and caller != uid:
            raise ApiError(403, "you may only list your own groups")
        groups = await self.groups.of_user(uid)
        data = [await self._group_json(g, members_as_users=True) for g in groups]
        return 200, {**OK, "data": data}

    async def grpinfo(self, request):
        gid = _id(request, "groupid")
        group = await self.groups.get(gid, await self.caller(request))
        return 200, {**OK, "data": await self._group_json(group, members_as_users=True)}

    async def refreshgrp(self, request):
        # The original dropped a cache entry; imd has no such cache.  Checked like grpinfo.
        await self.groups.get(_id(request, "groupid"), await self.caller(request))
        return 200, OK

    async def login(self, request):
        if request.method != b"POST":
            raise ApiError(400, "use POST with account and password")
        account, password = arg(request, "account"), arg(request, "password")
        if account is None and b"json" in (request.getHeader(b"content-type") or b""):
            try:
                body = jsonin.read(request.content.read())
            except jsonin.BadJSON:
                body = None
            if not isinstance(body, dict):
                raise ApiError(400, "body is not a JSON object")
            account, password = body.get("account"), body.get("password")
            if not isinstance(account, str) or not isinstance(password, str):
                raise ApiError(400, "account and password must be strings")
        if not account or not password:
            raise ApiError(400, "missing parameter: account and password are required")
        result = await self.service.accounts.login(
            account, password, source_host(request.getClientAddress()))
        if result is None:
            raise ApiError(401, "wrong account or password")
        user, token = result
        self._proved(request, user.id, token)
        return 200, {**LOGIN_OK, "id": str(user.id), "token": token, "name": user.name}

    async def app_login(self, request):
        """The app's ``LoginRequest``: form fields ``mobile_phone`` and ``password``; the
        phone number is the imd account name."""
        if request.method != b"POST":
            return 200, _app_failure(400, "use POST with mobile_phone and password")
        phone, password = arg(request, "mobile_phone"), arg(request, "password")
        if not phone or not password:
            return 200, _app_failure(400, "mobile_phone and password are required")
        try:
            result = await self.service.accounts.login(
                phone.strip(), password, source_host(request.getClientAddress()))
        except Throttled as e:
            return 200, _app_failure(429, str(e))
        if result is None:
            return 200, _app_failure(401, "wrong phone number or password")
        user, token = result
        self._proved(request, user.id, token)
        avatar = user.avatar if user.avatar.startswith(("http://", "https://")) else ""
        account = {"user_id": str(user.id), "user_name": user.name,
                   "mobile_phone": user.account, "lastlogin_time": "",
                   "access_token": token, "avatar": avatar, "sex": user.sex,
                   "signature": user.sign, "province": "", "city": "", "district": "",
                   "district_str": "", "cover_pic": ""}
        return 200, {"code": APP_OK, "status": 200, "message": "OK", "result": account}


def token_of(request: server.Request) -> str | None:
    """The caller's token: ``token``, ``Authorization: Bearer`` or the app's ``access_token``."""
    return request_token(request) or arg(request, "access_token")


def _app_failure(code: int, message: str) -> dict:
    # ``status`` 0, not 401: the app logs the user out on status 401.
    return {"code": code, "status": 0, "message": message}


def _member(user: User) -> dict:
    return {"nickname": user.name, "snap": user.avatar}


def mount(root: resource.Resource, service: BossService) -> None:
    """The group API and login at the root and under /wsim/."""
    api = BossApi(service)
    api.mount(root)
    api.mount_app_login(root)
    wsim = root.children.get(b"wsim")
    if wsim is None:
        wsim = resource.Resource()
        root.putChild(b"wsim", wsim)
    api.mount(wsim)
