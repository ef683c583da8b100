"""webim tickets: one per browser tab, each a hub Session with a packet queue and at most one
held long-poll.

- A poll is answered at once when packets wait, else held up to ``poll_timeout``; a newer poll
  for the same ticket answers the held one with ``{"status":"stopped"}``.
- A ticket not polled for ``ticket_timeout`` is unbound; so are tickets closed by ``refresh``.
  An unbound ticket stays registered with the hub for ``offline_grace`` more seconds, so a page
  refresh (a new ticket for the same user) causes no offline/online flicker and loses nothing:
  what the old ticket still held is handed to the new one.  After the grace, a user with no
  live ticket is logged out (buddies see an offline presence) and undelivered messages go back
  to the user's offline queue.  ``offline`` unbinds and logs out at once.
- A room the user blocked (webim ``leave``) is not delivered to any of the user's tickets.
- Packets taken for a poll whose answer could not be written are given back: first in line on
  the ticket, or to the offline queue once the ticket has left the hub.
"""

from __future__ import annotations

import secrets
from typing import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from imd.hub import Hub
from imd.metrics import CONNECTIONS
from imd.model import GROUP, OFFLINE, ONLINE, PRESENCE, SHOW, Event, Message
from imd.protocols.webim.pages import Pages
from imd.unavailable import log_failure

log = Logger()


class Ticket:
    """One browser tab of a user: a hub Session."""

    protocol = "webim"

    def __init__(self, registry: "Tickets", user_id: int):
        self.registry = registry
        self.user_id = user_id
        self.id = secrets.token_urlsafe(24)
        # auth.credential_digest of what opened it: that credential again needs no lookup
        self.opened_with: bytes | None = None
        self.page: bytes | None = None  # the page key it keeps alive (see pages.py)
        self.grace: IDelayedCall | None = None  # the end of its offline grace, once unbound
        self.messages: list[Message] = []
        self.presences: list[dict] = []
        self.statuses: list[dict] = []
        self.bound = True
        self.closed = False  # logged out of the hub: nothing more reaches it
        self.waiter: Callable[[bool], None] | None = None  # the held poll's answer
        # Both timers are lazy: a busy tab polls many times a second, and a callLater and a
        # cancel per poll cost more than the rest of its bookkeeping.  Each is armed at most
        # once and, when it fires early (its poll was answered, the tab polled again), re-armed
        # for what is left of the current deadline.
        self._poll_timeout: IDelayedCall | None = None
        self._held_at = 0.0  # when the held poll arrived
        self._expiry: IDelayedCall | None = None
        self._idle_since: float | None = None  # since when no poll is held (None: one is)
        self._flush_due = False  # the held poll's answer is due at the end of this turn

    # -- hub Session ---------------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        if message.ctype == GROUP and message.to in self.registry.blocked.get(self.user_id, ()):
            return
        self.messages.append(message)
        self._queued()

    def kick(self) -> None:
        self.registry.unbind(self, grace=False)

    def notice(self, event: Event) -> None:
        data = event.data
        if event.kind == PRESENCE:
            if data["change"] not in (ONLINE, OFFLINE, SHOW):
                return
            self.presences.append({"from": data["user"], "type": data["change"],
                                   "show": data["show"], "status": data["status"]})
        elif event.kind in ("join", "leave"):
            self.presences.append({"from": data["user"], "type": event.kind,
                                   "show": "available", "status": str(data["room"])})
        elif event.kind == "status":
            self.statuses.append({"from": data["user"], "to": str(data["to"]),
                                  "show": data["show"]})
        else:
            return
        self._queued()

    # -- packets and polls ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self.messages) + len(self.presences) + len(self.statuses)

    def _queued(self) -> None:
        if self.pending > self.registry.max_packets and self.bound:
            log.warn("webim ticket of user {uid} overflowed; unbinding it", uid=self.user_id)
            self.registry.unbind(self, grace=True)
            return
        if self.waiter is not None and not self._flush_due:
            # Answer on the next turn of the reactor, so that everything delivered in this
            # one (a batch of store replies) goes out in one answer.
            self._flush_due = True
            self.registry.flush_soon(self)

    def _flush_now(self) -> None:
        self._flush_due = False
        if self.waiter is not None and self.pending:
            self.answer(stopped=False)

    def take(self) -> tuple[list[Message], list[dict], list[dict]]:
        packets = self.messages, self.presences, self.statuses
        self.messages, self.presences, self.statuses = [], [], []
        return packets

    def give_back(self, packets: tuple[list[Message], list[dict], list[dict]]) -> None:
        """Packets that were taken for a poll but not written go first in line again (and
        to a poll held meanwhile); once the ticket is closed, messages go to the offline
        queue."""
        messages, presences, statuses = packets
        if self.closed:
            if messages:
                self.registry.requeue(self.user_id, messages)
            return
        self.messages[:0] = messages
        self.presences[:0] = presences
        self.statuses[:0] = statuses
        if self.pending and self.waiter is not None:
            self.answer(stopped=False)

    def hold(self, waiter: Callable[[bool], None]) -> None:
        """Hold a poll; ``waiter(stopped)`` answers it exactly once."""
        if self.waiter is not None:
            self.answer(stopped=True)  # superseded by this newer poll
        self._idle_since = None  # a held poll: the ticket does not expire meanwhile
        self.waiter = waiter
        if self.pending:
            self.answer(stopped=False)
            return
        clock = self.registry.clock
        self._held_at = clock.seconds()
        if self._poll_timeout is None:
            self._poll_timeout = clock.callLater(self.registry.poll_timeout, self._poll_due)

    def _poll_due(self) -> None:
        """The poll timer: answers the held poll once it has been held ``poll_timeout``."""
        self._poll_timeout = None
        if self.waiter is None:
            return
        left = self._held_at + self.registry.poll_timeout - self.registry.clock.seconds()
        if left > 0:
            self._poll_timeout = self.registry.clock.callLater(left, self._poll_due)
        else:
            self.answer(stopped=False)

    def answer(self, stopped: bool) -> None:
        waiter, self.waiter = self.waiter, None
        if self.bound:
            self._start_expiry()
        if waiter is not None:
            waiter(stopped)

    def poll_gone(self, waiter) -> None:
        """The client closed a held poll."""
        if self.waiter is waiter:
            self.waiter = None
            if self.bound:
                self._start_expiry()

    def _start_expiry(self) -> None:
        """No poll is held from now on: the ticket is unbound ``ticket_timeout`` from now
        unless a poll comes."""
        clock = self.registry.clock
        self._idle_since = clock.seconds()
        if self._expiry is None:
            self._expiry = clock.callLater(self.registry.ticket_timeout, self._expiry_due)

    def _expiry_due(self) -> None:
        self._expiry = None
        if not self.bound or self._idle_since is None:
            return  # unbound already, or a poll is held (its answer starts the count again)
        left = self._idle_since + self.registry.ticket_timeout - self.registry.clock.seconds()
        if left > 0:
            self._expiry = self.registry.clock.callLater(left, self._expiry_due)
        else:
            self.registry.unbind(self, True)

    def _cancel_timers(self) -> None:
        """The ticket is unbound: neither timer has anything left to do."""
        for call in (self._expiry, self._poll_timeout):
            if call is not None and call.active():
                call.cancel()
        self._expiry = self._poll_timeout = None
        self._idle_since = None


class Tickets:
    def __init__(self, hub: Hub, clock: IReactorTime, poll_timeout: float = 28.0,
                 ticket_timeout: float = 8.0, offline_grace: float = 8.0,
                 max_packets: int = 1000, page_ttl: float = 3600.0):
        self.hub = hub
        self.clock = clock
        self.poll_timeout = poll_timeout
        self.ticket_timeout = ticket_timeout
        self.offline_grace = offline_grace
        self.max_packets = max_packets
        self.by_id: dict[str, Ticket] = {}
        self.bound_count: dict[int, int] = {}  # user id -> bound tickets on this node
        self.unbound: dict[int, list[Ticket]] = {}
        self.resting: dict[str, Ticket] = {}  # the unbound ones by id, while in the grace
        self.blocked: dict[int, frozenset[int]] = {}  # user id -> rooms blocked in webim
        self.pages = Pages(clock, page_ttl)
        self._to_flush: list[Ticket] = []
        self._flush_call: IDelayedCall | None = None

    def flush_soon(self, ticket: Ticket) -> None:
        """Answer ``ticket``'s held poll on the next turn of the reactor (one timer for
        every ticket that got packets in this turn, not one per ticket)."""
        self._to_flush.append(ticket)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        tickets, self._to_flush = self._to_flush, []
        for ticket in tickets:
            try:
                ticket._flush_now()
            except Exception:
                log.failure("webim poll answer of user {uid} failed", uid=ticket.user_id)

    def get(self, ticket_id: str | None, user_id: int | None = None) -> Ticket | None:
        """A bound ticket; with ``user_id``, only if it belongs to that user.  A ticket
        unbound by ``refresh`` or a missed poll that is used again within the offline grace
        is bound again: its page did not leave after all (the client sends ``refresh`` from
        ``beforeunload``, which also fires for a download link)."""
        ticket = self.by_id.get(ticket_id or "")
        if ticket is None:
            ticket = self.resting.get(ticket_id or "")
            if ticket is None or (user_id is not None and ticket.user_id != user_id):
                return None
            self._rebind(ticket)
        if not ticket.bound:
            return None
        if user_id is not None and ticket.user_id != user_id:
            return None
        return ticket

    def _rebind(self, ticket: Ticket) -> None:
        del self.resting[ticket.id]
        waiting = self.unbound.get(ticket.user_id, [])
        waiting.remove(ticket)
        if not waiting:
            self.unbound.pop(ticket.user_id, None)
        if ticket.grace is not None and ticket.grace.active():
            ticket.grace.cancel()
        ticket.grace = None
        ticket.bound = True
        self.by_id[ticket.id] = ticket
        self.bound_count[ticket.user_id] = self.bound_count.get(ticket.user_id, 0) + 1
        ticket._start_expiry()

    async def open(self, user_id: int,
                   page: bytes | None = None) -> tuple[Ticket, list[Message]]:
        """A new ticket (keeping ``page``, a page key, alive) and the messages the user has
        not seen yet (the offline queue, and what an unbound ticket of the same user still
        held)."""
        ticket = Ticket(self, user_id)
        ticket.page = page
        self.pages.add(page, ticket.id)
        CONNECTIONS.labels(Ticket.protocol).inc()
        self.by_id[ticket.id] = ticket
        self.bound_count[user_id] = self.bound_count.get(user_id, 0) + 1
        await self.hub.login(ticket)
        unseen = ticket.messages
        ticket.messages = []
        for old in self.unbound.pop(user_id, []):
            self.resting.pop(old.id, None)
            unseen = old.messages + unseen
            old.messages = []
            await self._logout(old)
        seen, messages = set(), []
        for message in sorted(unseen, key=lambda m: m.id):
            if message.id not in seen:
                seen.add(message.id)
                messages.append(message)
        ticket._start_expiry()
        return ticket, messages

    def forget_credential(self, user_id: int, digest: bytes | None) -> None:
        """A credential was revoked: the user's tickets opened with it stop vouching for it
        (requests that carry it are checked, and refused, again)."""
        for ticket in self.by_id.values():
            if ticket.user_id == user_id and ticket.opened_with == digest:
                ticket.opened_with = None

    def set_blocked(self, user_id: int, rooms: frozenset[int]) -> None:
        """The rooms whose messages the user's tickets on this node do not get."""
        if rooms:
            self.blocked[user_id] = rooms
        else:
            self.blocked.pop(user_id, None)

    def requeue(self, user_id: int, messages: list[Message]) -> None:
        self._finish(self.hub.store.requeue(user_id, messages), "requeue")

    def unbind(self, ticket: Ticket, grace: bool) -> None:
        """Stop a ticket: its polls get 'stopped'; it leaves the hub now or after the grace."""
        if not ticket.bound:
            return
        ticket.bound = False
        ticket.answer(stopped=True)
        ticket._cancel_timers()
        self.by_id.pop(ticket.id, None)
        left = self.bound_count.get(ticket.user_id, 1) - 1
        if left:
            self.bound_count[ticket.user_id] = left
        else:
            self.bound_count.pop(ticket.user_id, None)
        if grace:
            self.unbound.setdefault(ticket.user_id, []).append(ticket)
            self.resting[ticket.id] = ticket
            ticket.grace = self.clock.callLater(self.offline_grace, self._grace_over, ticket)
        else:
            self._finish(self._logout(ticket, requeue=True))

    def _grace_over(self, ticket: Ticket) -> None:
        ticket.grace = None
        self.resting.pop(ticket.id, None)
        waiting = self.unbound.get(ticket.user_id, [])
        if ticket not in waiting:
            return  # a new ticket took it over
        waiting.remove(ticket)
        if not waiting:
            self.unbound.pop(ticket.user_id, None)
        self._finish(self._logout(ticket, requeue=True))

    async def _logout(self, ticket: Ticket, requeue: bool = False) -> None:
        ticket.closed = True
        self.pages.release(ticket.page, ticket.id)
        if not self._has_live_ticket(ticket.user_id) and ticket.user_id not in self.unbound:
            self.blocked.pop(ticket.user_id, None)
        if requeue and ticket.messages and not self._has_live_ticket(ticket.user_id):
            await self.hub.store.requeue(ticket.user_id, ticket.messages)
        ticket.messages = []
        await self.hub.logout(ticket)

    def _has_live_ticket(self, user_id: int) -> bool:
        return user_id in self.bound_count

    @staticmethod
    def _finish(coroutine, what: str = "logout") -> None:
        defer.ensureDeferred(coroutine).addErrback(
            lambda f: log_failure(log, "webim ticket {what} failed", f, what=what))

    def close_all(self) -> None:
        """At shutdown: answer every poll; what no tab was given goes back to the users'
        offline queues (once per user)."""
        held: dict[int, dict[int, Message]] = {}
        unbound = [t for waiting in self.unbound.values() for t in waiting]
        for ticket in [*self.by_id.values(), *unbound]:
            ticket.bound = False
            ticket.answer(stopped=True)
            ticket._cancel_timers()
            held.setdefault(ticket.user_id, {}).update((m.id, m) for m in ticket.messages)
            ticket.messages = []
        self.pages.clear()
        self.resting.clear()
        for uid, messages in held.items():
            if messages:
                self._finish(self.hub.store.requeue(uid, [messages[i] for i in sorted(messages)]))
