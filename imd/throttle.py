"""Throttling of password and token checks and of registrations.

A ``Throttle`` counts events (failed logins, registrations) per key within a sliding window and
refuses once a key has reached its limit, until the oldest counted event leaves the window.
Keys are plain strings: ``Accounts`` uses one per account and one per source address, so
guessing many passwords of one account, or passwords of many accounts from one address, is
refused before any password hash is computed.  A success resets the account's key (not the
address's: a valid login must not buy an attacker more guesses).
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IReactorTime


class Throttled(Exception):
    """Too many attempts; ``retry_after`` is the number of seconds to wait."""

    def __init__(self, retry_after: float):
        self.retry_after = max(1, int(retry_after + 0.999))
        super().__init__(f"too many attempts, try again in {self.retry_after} s")


class Throttle:
    """At most ``limit`` events per key within ``window`` seconds; a limit of 0 is no limit."""

    def __init__(self, clock: IReactorTime, limit: int, window: float):
        self.clock = clock
        self.limit = limit
        self.window = window
        self._events: dict[str, deque[float]] = {}
        self._swept = clock.seconds()

    def check(self, *keys: str) -> None:
        """Raise ``Throttled`` when any key has used up its events in the window."""
        if self.limit <= 0:
            return
        now = self.clock.seconds()
        self._sweep(now)
        wait = 0.0
        for key in keys:
            events = self._recent(key, now)
            if events is not None and len(events) >= self.limit:
                wait = max(wait, events[0] + self.window - now)
        if wait > 0:
            raise Throttled(wait)

    def record(self, *keys: str) -> None:
        """Count one event against each key."""
        if self.limit <= 0:
            return
        now = self.clock.seconds()
        for key in keys:
            events = self._events.setdefault(key, deque())
            events.append(now)
            while len(events) > self.limit:
                events.popleft()

    def reset(self, key: str) -> None:
        """Forget a key's events (after a successful login)."""
        self._events.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        while events and events[0] <= now - self.window:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def _sweep(self, now: float) -> None:
        """Drop keys with no event in the window, at most once per window, so that the
        table stays as small as the recent traffic."""
        if now - self._swept < self.window:
            return
        self._swept = now
        for key in [k for k, v in self._events.items() if v[-1] <= now - self.window]:
            del self._events[key]


class LoginThrottles:
    """The throttles every login and registration path goes through (via ``Accounts``).

    Failed logins count per account and per source address; registrations count per source
    address.  An empty address (``imdctl``, tests) is not throttled by address.
    """

    def __init__(self, clock: IReactorTime, account_failures: int, address_failures: int,
                 window: float, registrations: int, register_window: float):
        self.accounts = Throttle(clock, account_failures, window)
        self.addresses = Throttle(clock, address_failures, window)
        self.registrations = Throttle(clock, registrations, register_window)

    def before_login(self, account: str, address: str) -> None:
        self.accounts.check(account)
        if address:
            self.addresses.check(address)

    def login_failed(self, account: str, address: str) -> None:
        self.accounts.record(account)
        if address:
            self.addresses.record(address)

    def login_succeeded(self, account: str) -> None:
        self.accounts.reset(account)

    def before_register(self, address: str) -> None:
        if address:
            self.registrations.check(address)

    def registered(self, address: str) -> None:
        if address:
            self.registrations.record(address)
