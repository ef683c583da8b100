"""Who is calling a webim action, and whether the request may change state.

Credentials, in the order they are looked at:

- ``auth`` parameter: ``<user id>.<expires unix time>.<hex HMAC-SHA256(secret, "<user
  id>.<expires>")>`` signed by a host site that shares ``--webim-secret`` with the daemon (the
  original plugin trusted the host site's login the same way).
- ``token`` parameter: a token from ``POST /login`` or ``imdctl token`` (API clients).
- ``imd_webim`` cookie: a token set by our login form (``POST /webim/login``); HttpOnly and
  SameSite=Lax.

The first two are secrets the caller had to be given, so they authorize any action.  The
cookie is ambient: the browser attaches it whatever page made the request.  A request that
carries nothing but the cookie may read, but may change state only as a POST whose ``Origin``
is this daemon's own (``same_origin_post``), and gets no JSONP reply when the browser says
another site's page made it (``foreign_script``: any page that includes JSONP can read it).
The client's own login form sends ``online`` with ``username`` and ``password`` (checked in
``actions.WebimActions.password_login``), and the actions the shipped client sends without a
ticket are authorized by the page key ``online`` set (``pages``).
The tab's ticket (issued by ``online``) is the other credential; the actions check it against
the caller (see ``actions.WebimActions.run``).  A ticket remembers a digest of the credential
it was opened with (``credential_digest``), so a request that carries the ticket and that same
credential again needs no store lookup; any other credential beside a ticket is checked as
before (a wrong one is refused).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from twisted.web import server

from imd.accounts import Accounts
from imd.web import arg, public_base

COOKIE = b"imd_webim"


@dataclass(frozen=True)
class Credential:
    uid: int
    ambient: bool  # only the cookie: good for reads, not for state changes across sites
    token: str | None = None  # the token behind it (for logout), if any


def credential_digest(request: server.Request, secret: str) -> bytes | None:
    """A digest of the credential ``caller`` would look at (the kind and the value), b""
    when the request carries none, or None when it carries one ``caller`` treats specially
    (``auth`` without a configured secret).  Tickets keep this, never the credential."""
    signed = arg(request, "auth")
    if signed and secret:
        key = "auth:" + signed
    elif (token := arg(request, "token")):
        key = "token:" + token
    elif signed:
        return None
    else:
        cookie = request.getCookie(COOKIE)
        if not cookie:
            return b""
        key = "cookie:" + cookie.decode("latin-1")
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


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


async def caller(request: server.Request, accounts: Accounts,
                 secret: str) -> Credential | None:
    """The credential the request carries, or None.  A credential that is present but bad
    is None even if another one would be good."""
    signed = arg(request, "auth")
    if signed and secret:
        uid = check_signed(secret, signed, time.time())
        if uid is not None and await accounts.store.get_user(uid) is not None:
            return Credential(uid, ambient=False)
        return None
    token, ambient = arg(request, "token"), False
    if not token:
        cookie = request.getCookie(COOKIE)
        token, ambient = (cookie.decode("latin-1") if cookie else None), True
    if token:
        uid = await accounts.user_for_token(token)
        if uid is not None:
            return Credential(uid, ambient=ambient, token=token)
    return None


def same_origin_post(request: server.Request, public_url: str) -> bool:
    """A POST sent by a page of this daemon's own origin (the browser sets ``Origin`` on
    every POST; a page of another site cannot forge it)."""
    if request.method != b"POST":
        return False
    origin = (request.getHeader(b"origin") or b"").decode("latin-1").rstrip("/")
    if not origin or origin == "null":
        return False
    own = {public_base(request, "")}
    if public_url:
        scheme, _, rest = public_url.partition("://")
        own.add(f"{scheme}://{rest.split('/', 1)[0]}")
    return origin in own


def foreign_script(request: server.Request) -> bool:
    """A request the browser marks as made by a page of another origin (``Sec-Fetch-Site``;
    browsers that do not send it are not told apart)."""
    return request.getHeader(b"sec-fetch-site") in (b"same-site", b"cross-site")


def set_cookie(request: server.Request, token: str, ttl: int) -> None:
    request.addCookie(COOKIE, token.encode(), path=b"/", max_age=str(ttl).encode(),
                      httpOnly=True, sameSite="lax", secure=request.isSecure())


def clear_cookie(request: server.Request) -> None:
    request.addCookie(COOKIE, b"", path=b"/", max_age=b"0", httpOnly=True, sameSite="lax",
                      secure=request.isSecure())
