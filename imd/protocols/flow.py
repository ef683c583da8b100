"""Transport settings shared by the long-lived client connections of every protocol.

- TCP keepalive and TCP_USER_TIMEOUT, so a peer that vanished (no FIN, no RST) is dropped once
  a heartbeat goes unacknowledged for the timeout, not after the kernel's ~15 minutes.
- A bound on the bytes waiting to be sent to a client that does not read, so one slow client
  cannot make the daemon's memory grow without limit.
"""

from __future__ import annotations

import socket


def tune_socket(transport, user_timeout: float) -> None:
    """Turn on keepalive and TCP_USER_TIMEOUT on a TCP transport; ignore other transports."""
    try:
        sock = transport.getHandle()
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle = max(1, int(user_timeout))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
    except (AttributeError, OSError):
        pass


def pending_bytes(transport) -> int:
    """Bytes written to a Twisted TCP/unix transport and not yet handed to the kernel."""
    return len(getattr(transport, "dataBuffer", b"")) + getattr(transport, "_tempDataLen", 0)
