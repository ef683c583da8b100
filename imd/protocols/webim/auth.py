"""Who is calling a webim action.

- ``imd_webim`` cookie: a token set by our login form (``POST /webim/login``); HttpOnly and
  SameSite=Lax, so other sites cannot use it through JSONP.
- ``auth`` parameter: ``<user id>.<expires unix time>.<hex HMAC-SHA256(secret, "<user
  id>.<expires>")>`` signed by a host site that shares ``--webim-secret`` with the daemon (the
  original plugin trusted the host site's login the same way).
- ``token`` parameter: a token from ``POST /login`` or ``imdctl token`` (API clients).
"""

from __future__ import annotations

import hashlib
import hmac
import time

from twisted.web import server

from imd.accounts import Accounts
from imd.web import arg

COOKIE = b"imd_webim"


def sign(secret: str, user_id: int, expires: int) -> str:
    """The ``auth`` value a host site gives its logged-in user's browser."""
    payload = f"{user_id}.{expires}"
    mac = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{mac}"


def check_signed(secret: str, value: str, now: float) -> int | None:
    if not value.isascii():  # int() reads other scripts' digits; compare_digest wants ASCII
        return None
    try:
        uid, expires, mac = value.split(".")
        if int(expires) < now:
            return None
        expected = sign(secret, int(uid), int(expires)).rsplit(".", 1)[1]
    except ValueError:
        return None
    return int(uid) if hmac.compare_digest(mac, expected) else None


async def caller(request: server.Request, accounts: Accounts, secret: str) -> int | None:
    """The authenticated user id, or None."""
    signed = arg(request, "auth")
    if signed and secret:
        uid = check_signed(secret, signed, time.time())
        if uid is not None and await accounts.store.get_user(uid) is not None:
            return uid
        return None
    token = arg(request, "token")
    if not token:
        cookie = request.getCookie(COOKIE)
        token = cookie.decode("latin-1") if cookie else None
    if token:
        return await accounts.user_for_token(token)
    return None


def set_cookie(request: server.Request, token: str, ttl: int) -> None:
    request.addCookie(COOKIE, token.encode(), path=b"/", max_age=str(ttl).encode(),
                      httpOnly=True, sameSite="lax", secure=request.isSecure())
