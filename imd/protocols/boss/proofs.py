"""Recent proofs of identity per source address, for ``--boss-auth=address``.

The 66boss app only ever sends a bare ``login_<userid>`` on its WebSocket.  In ``address``
mode such a login is accepted when the same source address proved, at most
``--boss-address-window`` seconds before, that it is that user: a successful HTTP login
(``/login`` or the app's ``ucenter/login/index``), a group API or upload request with that
user's valid token, or a connection bound to that user that has just ended (so that the app's
reconnects after a dropped link keep working).  Each proof carries the token it was made with,
so that ``logout_`` can revoke it.

Kept in this node's memory: in a cluster, a client's HTTP requests and its WebSocket must
reach the same node.  What this does and does not protect against is in the README.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import NamedTuple

from twisted.internet.interfaces import IReactorTime

from imd.guard import source_host  # noqa: F401 (the 66boss modules import it from here)


class Proof(NamedTuple):
    expires: float
    token: str | None


class Proofs:
    """(user id, source host) -> latest proof; entries expire after ``window`` seconds."""

    def __init__(self, clock: IReactorTime, window: float, enabled: bool):
        self.clock = clock
        self.window = window
        self.enabled = enabled
        self._proofs: OrderedDict[tuple[int, str], Proof] = OrderedDict()  # oldest first
        self._per_host: Counter[str] = Counter()  # proofs per host
        self._bound: Counter[str] = Counter()  # live bound connections per host

    def record(self, uid: int, host: str, token: str | None) -> None:
        if not self.enabled or not host:
            return
        self._prune()
        key = (uid, host)
        if self._proofs.pop(key, None) is None:
            self._per_host[host] += 1
        self._proofs[key] = Proof(self.clock.seconds() + self.window, token)

    def check(self, uid: int, host: str) -> Proof | None:
        """The unexpired proof that ``host`` is ``uid``, or None."""
        self._prune()
        return self._proofs.get((uid, host)) if self.enabled else None

    def forget(self, uid: int, host: str) -> None:
        if self._proofs.pop((uid, host), None) is not None:
            self._drop_host(host)

    def bound(self, host: str) -> None:
        self._bound[host] += 1

    def unbound(self, host: str) -> None:
        self._bound[host] -= 1
        if self._bound[host] <= 0:
            del self._bound[host]

    def host_known(self, host: str) -> bool:
        """Whether some user proved themselves from ``host`` recently or is bound from it now."""
        self._prune()
        return self.enabled and (self._bound[host] > 0 or self._per_host[host] > 0)

    def _prune(self) -> None:
        now = self.clock.seconds()
        while self._proofs:
            key, proof = next(iter(self._proofs.items()))
            if proof.expires > now:
                break
            del self._proofs[key]
            self._drop_host(key[1])

    def _drop_host(self, host: str) -> None:
        self._per_host[host] -= 1
        if self._per_host[host] <= 0:
            del self._per_host[host]
