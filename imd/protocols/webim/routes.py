"""webim on the web port: actions at ``/webim/<action>`` and ``/webim/im.php?webim_action=``,
the long-poll at ``/packets`` and ``/webim/packets``, and the demo page at
``/webim/demo.html``.

JSONP: ``callback`` must be a plain JavaScript identifier path (``a.b_c.$d``); anything else
is refused.  JSONP replies are ``application/javascript`` with ``X-Content-Type-Options:
nosniff``.

Names are HTML to the shipped client: it puts nicks, room names and status texts into its
markup as they come, because the host site it was written for stored them HTML-escaped.  So
every reply is rendered here, in one place (``html_names``), the way that host's data looked;
message bodies stay as sent, since the client escapes those itself.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from urllib.parse import quote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server, static
from twisted.web.pages import forbidden, notFound

from imd.hub import written
from imd.model import Message, User, compact_json
from imd.protocols.webim.actions import ActionError, Download, WebimActions
from imd.protocols.webim.tickets import Tickets
from imd.unavailable import Unavailable
from imd.web import Root, arg

log = Logger()
CALLBACK_RE = re.compile(r"[A-Za-z_$][\w$]{0,63}(?:\.[A-Za-z_$][\w$]{0,63}){0,7}", re.ASCII)
WWW = Path(__file__).parent / "www"
NAMES_TTL = 2.0  # seconds a poll answer may reuse a user's name it looked up
NAMES_MAX = 50_000  # names kept at most (then forgotten all at once)


# Texts the client inserts into its HTML: escaped as the host site's data was.
HTML_TEXT = frozenset({"nick", "name", "status", "show"})
# URLs it inserts into attributes: characters that could end the attribute are %-encoded.
HTML_URL = frozenset({"pic_url", "default_pic_url", "url"})
# Left as they are: the client escapes bodies itself; settings are the client's own JSON.
VERBATIM = frozenset({"body", "style", "setting"})


def html_names(obj):
    """``obj`` with every name-like text HTML-escaped (``&<>"'``) as the original host
    site's data was, and URLs made safe inside a quoted attribute."""
    if isinstance(obj, list):
        return [html_names(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for key, value in obj.items():
        if key in VERBATIM:
            out[key] = value
        elif isinstance(value, str) and key in HTML_TEXT:
            out[key] = html.escape(value)
        elif isinstance(value, str) and key in HTML_URL:
            out[key] = quote(value, safe="/:?#[]@!$&()*+,;=%~.-_")
        else:
            out[key] = html_names(value)
    return out




def encode(obj) -> str:
    """``obj`` as the client gets it: JSON, with names HTML-escaped (``html_names``)."""
    if obj == "ok":
        return '"ok"'
    if obj == []:
        return "[]"
    return compact_json(html_names(obj))


def message_packet(m: Message, users: dict[int, User]) -> str:
    """A message as a poll answer carries it, encoded once per message and reused for every
    ticket that gets it (``users``: at least its sender, for the nick)."""
    if m.wire is None:
        m.wire = {}
    text = m.wire.get("webim")
    if text is None:
        text = m.wire["webim"] = encode(WebimActions.message_json(m, users))
    return text


def reply(request: server.Request, obj, status: int = 200) -> None:
    """Write JSON, or JSONP when a valid ``callback`` was given."""
    reply_encoded(request, encode(obj), status)


def reply_encoded(request: server.Request, body: str, status: int = 200) -> None:
    """Write JSON already made by ``encode``, or JSONP of it when a valid ``callback`` was
    given."""
    callback = arg(request, "callback")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"cache-control", b"no-store")
    if callback is not None:
        if not CALLBACK_RE.fullmatch(callback):
            status, callback = 400, None
            body = json.dumps({"success": False, "error_msg": "bad callback name"})
    if callback:
        data = f"{callback}({body});".encode("utf-8")
        request.setHeader(b"content-type", b"application/javascript; charset=utf-8")
    else:
        data = body.encode("utf-8")
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-length", b"%d" % len(data))
    request.write(data)
    request.finish()


class ActionResource(resource.Resource):
    isLeaf = True

    def __init__(self, actions: WebimActions, name: str | None):
        super().__init__()
        self.actions = actions
        self.name = name  # None: taken from webim_action (the im.php form)

    def render(self, request):
        name = self.name or arg(request, "webim_action") or ""
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        ticket = self.actions.by_ticket(name, request) if name == "message" else None
        if ticket is not None:
            d = self.actions.send_message(request, ticket)  # the lean path
        else:
            d = defer.ensureDeferred(self.actions.run(name, request))

        def done(result):
            if gone:
                return
            if isinstance(result, Download):
                request.setHeader(b"content-type", b"text/html; charset=utf-8")
                request.setHeader(b"content-disposition",
                                  f'attachment; filename="{result.filename}"'.encode())
                request.setHeader(b"x-content-type-options", b"nosniff")
                request.write(result.body)
                request.finish()
            else:
                reply(request, result)

        def failed(failure):
            if gone:
                return
            if failure.check(ActionError):
                status = 404 if str(failure.value) == "Unknown action" else 200
                reply(request, {"success": False, "error_msg": str(failure.value)}, status)
            elif failure.check(Unavailable):
                reply(request, {"success": False, "error_msg": "service unavailable, try again"},
                      503)
            else:
                log.failure("webim action {name} failed", failure, name=name)
                reply(request, {"success": False, "error_msg": "internal error"}, 500)

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET


class ClientFiles(static.File):
    """The shipped client's own files (its ``static/`` folder, put in ``--webim-static`` by
    the operator): the plugin's glue builds its emoticon, sound and theme URLs from
    ``_IMC.path``, which points here.  No directory listings."""

    def directoryListing(self):
        return forbidden()

    def render(self, request):
        request.setHeader(b"x-content-type-options", b"nosniff")
        return super().render(request)


class Actions(resource.Resource):
    def __init__(self, actions: WebimActions, packets: resource.Resource,
                 client_files: str = ""):
        super().__init__()
        self.actions = actions
        self.packets = packets
        self.demo = static.File(str(WWW / "demo.html"), defaultType="text/html")
        self.client_files = ClientFiles(client_files) if client_files else notFound()
        # One resource per action, made once; "im.php" takes the action from webim_action.
        self.named = {b"im.php": ActionResource(actions, None),
                      **{name.encode(): ActionResource(actions, name)
                         for name in actions.actions}}

    def getChild(self, name, request):
        if name == b"packets":
            return self.packets
        if name == b"demo.html":
            return self.demo
        if name == b"static":
            return self.client_files
        return self.named.get(name) or ActionResource(self.actions, name.decode("latin-1"))


class Packets(resource.Resource):
    """The JSONP long-poll: ``?ticket=T&callback=CB``."""

    isLeaf = True

    def __init__(self, actions: WebimActions, tickets: Tickets):
        super().__init__()
        self.actions = actions
        self.tickets = tickets
        self._names: dict[int, tuple[float, User]] = {}  # uid -> (expires, user)

    def render(self, request):
        callback = arg(request, "callback")
        if callback is not None and not CALLBACK_RE.match(callback):
            reply(request, {"status": "error", "error_msg": "bad callback name"}, 400)
            return server.NOT_DONE_YET
        ticket = self.tickets.get(arg(request, "ticket"))
        if ticket is None:
            # 410: a browser does not run a script that is not 2xx, so the shipped client
            # counts a failed poll (two, and it shows "Disconnect") instead of polling a
            # dead ticket five times a second for ever, as it does on a 200 "stopped".
            reply(request, {"status": "stopped"}, 410)
            return server.NOT_DONE_YET
        answered: list[bool] = []
        gone: list[bool] = []

        def answer(stopped: bool):
            answered.append(True)
            if stopped:
                if not gone:
                    reply(request, {"status": "stopped"})
                return
            self._send(request, ticket, ticket.take(), gone)

        def lost(_):
            gone.append(True)
            if not answered:
                ticket.poll_gone(answer)

        request.notifyFinish().addErrback(lost)
        ticket.hold(answer)
        return server.NOT_DONE_YET

    def _send(self, request, ticket, packets, gone: list) -> None:
        """Answer a poll with the packets taken for it: at once when every name it needs
        is in the cache (a busy tab's usual case), else once the store has given them."""
        messages, presences, statuses = packets
        try:
            uids = {m.sender for m in messages if not (m.wire and "webim" in m.wire)}
            for p in presences:
                uids.add(p["from"])
            for s in statuses:
                uids.add(s["from"])
            users, missing = self._cached(uids)
        except Exception:
            log.failure("webim poll answer of user {uid} failed", uid=ticket.user_id)
            self._give_back(request, ticket, packets, gone)
            return
        if missing:
            defer.ensureDeferred(self._write(request, ticket, packets, gone, users, missing))
        else:
            self._answer(request, ticket, packets, gone, users)

    async def _write(self, request, ticket, packets, gone: list, users: dict[int, User],
                     missing: list[int]) -> None:
        """``_send`` once the names that were not cached have been read.  Whatever goes
        wrong before the answer is written (the browser left, the store failed, a bug),
        the packets go back to the ticket and the poll is answered if its browser is
        still there."""
        try:
            users.update(await self._lookup(missing))
        except Exception as e:
            if isinstance(e, defer.FirstError):  # a pipeline's: the command that failed
                e = e.subFailure.value
            log.warn("webim poll of user {uid}: store failed ({error}); packets kept",
                     uid=ticket.user_id, error=f"{type(e).__name__}: {e}")
            self._give_back(request, ticket, packets, gone)
            return
        self._answer(request, ticket, packets, gone, users)

    def _answer(self, request, ticket, packets, gone: list, users: dict[int, User]) -> None:
        messages, presences, statuses = packets
        if gone:
            # The browser left before the answer: keep the packets for its next poll.
            ticket.give_back(packets)
            return

        def nick(uid):
            return users[uid].name if uid in users else str(uid)

        try:
            # Everything that waited goes out in this one answer.
            answer = '{"status":"ok","messages":[%s],"presences":%s,"statuses":%s}' % (
                ",".join([message_packet(m, users) for m in messages]),
                encode([{**p, "from": str(p["from"]), "nick": nick(p["from"])}
                        for p in presences]),
                encode([{**s, "from": str(s["from"]), "nick": nick(s["from"])}
                        for s in statuses]))
        except Exception:
            log.failure("webim poll answer of user {uid} failed", uid=ticket.user_id)
            self._give_back(request, ticket, packets, gone)
            return
        reply_encoded(request, answer)
        for m in messages:
            written(ticket, m)

    def _cached(self, uids: set[int]) -> tuple[dict[int, User], list[int]]:
        """The users a poll answer names, from a short-lived cache of the names it looked
        up (a busy tab's answers would each cost a store round trip; a rename shows in
        answers within ``NAMES_TTL``), and the ids that are not in it."""
        users, missing = {}, []
        if not uids:
            return users, missing
        now = self.tickets.clock.seconds()
        for uid in uids:
            hit = self._names.get(uid)
            if hit is not None and hit[0] > now:
                users[uid] = hit[1]
            else:
                missing.append(uid)
        return users, missing

    async def _lookup(self, uids: list[int]) -> dict[int, User]:
        """Users from the store, remembered for ``NAMES_TTL``."""
        found = await self.actions.store.get_users(uids)
        if len(self._names) > NAMES_MAX:
            self._names.clear()
        expires = self.tickets.clock.seconds() + NAMES_TTL
        for uid, user in found.items():
            self._names[uid] = (expires, user)
        return found

    @staticmethod
    def _give_back(request, ticket, packets, gone: list) -> None:
        ticket.give_back(packets)
        if not gone:
            # An empty answer: the client polls again at once and gets them then.
            reply(request, {"status": "ok", "messages": [], "presences": [], "statuses": []})


def mount(root: resource.Resource, actions: WebimActions, tickets: Tickets,
          client_files: str = "") -> None:
    packets = Packets(actions, tickets)
    webim = Actions(actions, packets, client_files)
    root.putChild(b"packets", packets)
    root.putChild(b"webim", webim)
    if isinstance(root, Root):  # the hot paths, without a walk down the tree
        root.put_exact(b"/packets", packets)
        root.put_exact(b"/webim/packets", packets)
        for name, leaf in webim.named.items():
            root.put_exact(b"/webim/" + name, leaf)
