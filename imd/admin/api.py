"""The admin API under ``/api/``: JSON replies, form or query parameters, and an
``Authorization: Bearer <token>`` header (or a ``token`` parameter) with a token from
``imdctl admin-token``.

    GET  /api/users                      every user: id, account, name, disabled
    POST /api/users                      account, password, name: a new user
    POST /api/users/<user>/disable       disable (and kick) a user; /enable undoes it
    POST /api/users/<user>/password      password: a new password
    GET  /api/sessions                   sessions per protocol on every node; this node's
                                         sessions one by one (id, protocol, user)
    POST /api/kick                       user [, session]: close one or all of their sessions
    GET  /api/groups                     every group: id, name, creator, members, public
    GET  /api/groups/<id>                a group and its members
    POST /api/message                    text, user or group: a system message

``<user>`` is an account or a user id.  Errors are ``{"error": "..."}`` with 400, 401 (no or
a wrong token), 404 (no such user, group or endpoint) or 503 (Redis unavailable).
"""

from __future__ import annotations

from typing import Callable

from twisted.web import server

from imd.admin.ops import Ops, OpsError
from imd.web import AsyncJSONResource, arg, request_token


class Api(AsyncJSONResource):
    def __init__(self, ops: Callable[[], Ops | None]):
        super().__init__(self.handle)
        self.ops = ops

    async def handle(self, request: server.Request) -> tuple[int, object]:
        ops = self.ops()
        if ops is None:
            return 503, {"error": "starting"}
        if not await ops.admin_token_ok(request_token(request) or ""):
            request.setHeader(b"www-authenticate", b'Bearer realm="imd admin"')
            return 401, {"error": "a valid admin token is required (imdctl admin-token)"}
        try:
            path = [p.decode("utf-8") for p in request.postpath if p]
        except UnicodeDecodeError:
            path = []
        try:
            return await self.route(ops, request.method, path, request)
        except OpsError as e:
            return e.status, {"error": str(e)}

    async def route(self, ops: Ops, method: bytes, path: list[str], request):
        def need(name: str) -> str:
            value = arg(request, name)
            if not value:
                raise OpsError(f"{name} is required")
            return value

        get, post = method in (b"GET", b"HEAD"), method == b"POST"
        if path == ["users"] and get:
            return 200, await ops.users()
        if path == ["users"] and post:
            return 201, await ops.create_user(need("account"), need("password"),
                                              arg(request, "name") or "")
        if len(path) == 3 and path[0] == "users" and post:
            if path[2] in ("disable", "enable"):
                return 200, await ops.set_disabled(path[1], path[2] == "disable")
            if path[2] == "password":
                return 200, await ops.reset_password(path[1], need("password"))
        if path == ["sessions"] and get:
            return 200, await ops.sessions()
        if path == ["kick"] and post:
            return 200, await ops.kick(need("user"), arg(request, "session") or None)
        if path == ["groups"] and get:
            return 200, await ops.groups()
        if len(path) == 2 and path[0] == "groups" and get:
            return 200, await ops.group(path[1])
        if path == ["message"] and post:
            return 200, await ops.system_message(need("text"), arg(request, "user") or None,
                                                 arg(request, "group") or None)
        raise OpsError("no such endpoint", 404)
