"""The store out of reach: one error type every layer may see, and one way to log it.

The store's connection layer raises ``Unavailable`` when Redis cannot be reached within
``--redis-timeout`` seconds, and logs the outage itself: once when it starts, once when it
ends.  A request that fails because of it is answered with its protocol's error and is not
logged again (``log_failure``), so an outage under load is two log lines, not one per request.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure


class Unavailable(ConnectionError):
    """The store cannot be reached right now; the client may try again later."""


def log_failure(log: Logger, format: str, failure: Failure, **kwargs) -> None:
    """``log.failure`` for anything but an outage (already logged once where it is seen)."""
    if not failure.check(Unavailable):
        log.failure(format, failure, **kwargs)
