"""Page keys: what lets a host page's ticketless webim actions through.

webim.uchome.js sends the tab's ticket with ``message``, ``status``, ``presence``, ``join``,
``leave``, ``offline``, ``refresh`` and ``members``, but not with ``history``, ``histories``,
``clear_history``, ``download_history``, ``setting``, ``buddies``, ``rooms`` or
``notifications``; the original answered those by the host site's own login cookie, because its
actions lived on the host site.  Here the actions live on another origin, so ``online`` (the one
action the host page adds its credential to) sets a cookie of this daemon's own, the page key.

A page key is a random value (192 bits), kept only as a digest, bound to the user and to the
origin of the page that called ``online`` (its ``Origin``, else the origin of its ``Referer``).
It is good while a ticket opened with it lives (bound, or within the offline grace) and for
``--webim-page-ttl`` seconds after the last one has gone, and only for a request that

- carries no other credential (``auth``/``token`` are checked as before),
- comes from that same page origin (``Origin``/``Referer``: a page of another origin cannot
  claim it, and a page that sends no referrer gets nothing), and
- is what the client itself makes (``Sec-Fetch-Dest``: ``script`` for JSONP, ``empty`` for
  XHR, ``iframe`` for ``download_history``), so an image or a link on the host site's own
  pages cannot change state with it.  Browsers without Fetch Metadata send no
  ``Sec-Fetch-Dest`` and get nothing; they need ``auth`` on those URLs.

``online`` itself takes it too, for the user it belongs to: the client calls ``online`` again with
the URL it was given (its status menu's "available", a dropped poll), whose ``auth`` may have
expired by then.  ``logout`` ends the user's page keys.

The cookie is HttpOnly; over https it is ``SameSite=None; Secure; Partitioned`` (a host page of
another site: the browser keeps it for that top-level site only), over http ``SameSite=Lax``
(a host page of the same site, e.g. ``www.example.com`` and ``im.example.com``).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web import server

COOKIE = b"imd_webim_page"
# What the shipped client's requests are (Sec-Fetch-Dest) per action it sends without a ticket.
CLIENT_DESTS = frozenset({b"script", b"empty"})
DOWNLOAD_DESTS = frozenset({b"iframe", b"script", b"empty"})


@dataclass
class Page:
    user_id: int
    origin: str
    tickets: set = field(default_factory=set)  # ids of the live tickets opened with it
    expiry: IDelayedCall | None = None  # its end, once it has no tickets


def page_origin(request: server.Request) -> str | None:
    """The origin of the page that made the request: ``Origin``, else the origin part of
    ``Referer``; None when the browser sent neither (or ``Origin: null``)."""
    origin = request.getHeader(b"origin")
    if origin and origin != b"null":
        value = origin.decode("latin-1")
    else:
        referer = request.getHeader(b"referer")
        if not referer:
            return None
        value = referer.decode("latin-1")
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class Pages:
    """The page keys of this node's tickets."""

    def __init__(self, clock: IReactorTime, ttl: float = 3600.0):
        self.clock = clock
        self.ttl = ttl  # how long a key outlives its last ticket
        self.by_digest: dict[bytes, Page] = {}

    def claim(self, request: server.Request, user_id: int) -> bytes | None:
        """For an ``online`` about to open a ticket: the page key the request carries when
        it is this user's from this page origin, else a new one, set as the cookie.  None
        (no key) when the browser named no page origin.  Hand it to ``Tickets.open``."""
        origin = page_origin(request)
        if origin is None:
            return None
        cookie = request.getCookie(COOKIE)
        digest = _digest(cookie) if cookie else None
        page = self.by_digest.get(digest) if digest else None
        if page is None or page.user_id != user_id or page.origin != origin:
            value = secrets.token_urlsafe(24).encode()
            digest = _digest(value)
            self.by_digest[digest] = page = Page(user_id, origin)
            _set_cookie(request, value)
            # (Ticket-less until Tickets.open adds its ticket, which cancels this.)
            page.expiry = self.clock.callLater(self.ttl, self._expire, digest)
        return digest

    def add(self, digest: bytes | None, ticket_id: str) -> None:
        page = self.by_digest.get(digest) if digest else None
        if page is not None:
            page.tickets.add(ticket_id)
            if page.expiry is not None and page.expiry.active():
                page.expiry.cancel()
            page.expiry = None

    def release(self, digest: bytes | None, ticket_id: str) -> None:
        """A ticket has left the hub: its page key ends with its last ticket."""
        page = self.by_digest.get(digest) if digest else None
        if page is None:
            return
        page.tickets.discard(ticket_id)
        if not page.tickets and page.expiry is None:
            page.expiry = self.clock.callLater(self.ttl, self._expire, digest)

    def _expire(self, digest: bytes) -> None:
        page = self.by_digest.get(digest)
        if page is not None and not page.tickets:
            del self.by_digest[digest]

    def forget_user(self, user_id: int) -> None:
        """The user logged out: none of their page keys is good any more."""
        for digest, page in list(self.by_digest.items()):
            if page.user_id == user_id:
                if page.expiry is not None and page.expiry.active():
                    page.expiry.cancel()
                del self.by_digest[digest]

    def user_for(self, request: server.Request, download: bool = False) -> int | None:
        """The user a request's page key vouches for (see the module docstring), or None."""
        cookie = request.getCookie(COOKIE)
        if not cookie:
            return None
        page = self.by_digest.get(_digest(cookie))
        if page is None:
            return None
        dest = request.getHeader(b"sec-fetch-dest")
        if dest not in (DOWNLOAD_DESTS if download else CLIENT_DESTS):
            return None
        if page_origin(request) != page.origin:
            return None
        return page.user_id

    def clear(self) -> None:
        for page in self.by_digest.values():
            if page.expiry is not None and page.expiry.active():
                page.expiry.cancel()
        self.by_digest.clear()


def _set_cookie(request: server.Request, value: bytes) -> None:
    # Written by hand: Request.addCookie knows no SameSite=None or Partitioned.
    attributes = b"; Path=/; HttpOnly"
    if request.isSecure():
        attributes += b"; SameSite=None; Secure; Partitioned"
    else:
        attributes += b"; SameSite=Lax"
    request.responseHeaders.addRawHeader(b"set-cookie", COOKIE + b"=" + value + attributes)
