"""Load test for imd's 66boss, minami, webim or xuanxuan endpoint (run by hand; never from CI
or pytest).  ``--protocol boss`` (the default), ``minami`` (WebSocket), ``webim`` (HTTP
long-poll) or ``xuanxuan`` (JSON lines over TCP); everything but the connection class, the
login, the send and the parsing of what arrives is shared.

What it does:

1. Creates bench users (``bench-<run id>-<i>``, password ``bench-<run id>``) straight in the
   daemon's Redis with ``imd.store.redis.RedisStore`` (one password verifier computed once),
   so setup takes seconds even for 10,000 users.  boss and webim: a login token per user as
   well.
   minami: only friends may talk, so the active users are befriended in the store too (each
   one with its ``--friends`` nearest users on each side of a ring, within its client
   process).
2. Starts ``--clients`` load-client processes (this same file with ``--worker``), each owning a
   share of the connections.  Every process opens its connections with autobahn's Twisted
   WebSocket client (the daemon's own stack) and logs them in: boss with
   ``login_<uid>_<token>`` on ``/entry``; minami by connecting to
   ``/im/login?account=A&password=P`` and waiting for the code 200 reply (the daemon checks
   the password with scrypt in its thread pool, so minami logins are slow, tens per second).
   webim (twisted.web.client Agent, one persistent HTTPConnectionPool per process): each user
   is a browser tab, ``POST /webim/online`` with ``token=`` gives the ticket, then the tab
   keeps exactly one long-poll ``GET /packets?ticket=`` in flight (re-polled as soon as one
   is answered; the daemon holds it up to 28 s).  xuanxuan: a TCP connection to
   ``--xuanxuan``, ``chat/login [account, md5hex(password), "online"]`` (scrypt again); the
   login is done when the reply and then the push array with ``userGetlist`` (every user in
   the store) have arrived.  Every xuanxuan login is announced (``chat/login``) to every
   other user, so those pushes arrive during setup; they are counted and ignored.
   Optional ``--idle`` connections are opened and logged in first (they only receive
   heartbeats), so the daemon's RSS per idle connection can be measured.
3. Sends ``--messages`` one-to-one text messages.  Message ``seq`` goes from sender
   ``seq % connections`` (every sender gets the same share) to a random other user of the same
   client process (minami: a random one of the sender's friends); its body is
   ``<seq>.<monotonic ns at send>``, so the receiver computes the latency (CLOCK_MONOTONIC is
   system-wide, so it is comparable across processes).  minami frames are
   ``{"toFriend": <uid>, "payload": <body>, "id": <seq>}``; the sender must get exactly one
   code 200 ack per id (counted, with the send-to-ack latency).  An error ack with the id
   (508 friend offline, 507) means the message will not arrive.  webim:
   ``POST /webim/message`` (token, ticket, type=unicast, to, body), at most ``--tab-posts``
   per tab at once (the rest wait in the tab's queue; the body is stamped when its POST is
   issued); the reply ``"ok"`` is the ack, and messages arrive in poll replies as
   ``{from, to, body, ...}``.  xuanxuan: ``chat/message [{gid: <run>.<process>.<seq>, cgid:
   "<low id>&<high id>", contentType: "text", content: <body>}]``; the reply (``result:
   success`` with the stored message and our gid, matched first in, first out) is the ack,
   and the recipient gets a ``chat/message`` push (checked: ``user``, ``cgid``).
   - ``--rate 0`` (full speed): each sender keeps at most ``--window`` messages in flight
     (sent, not yet received by their recipient) and sends the next one when one arrives.
   - ``--rate R``: a timer sends the due messages every ``--tick`` seconds to hold R msg/s
     overall (R/K per process), in sequence order.
4. Checks that every message arrived exactly once at the right recipient from the right
   sender (missing, duplicate and misrouted counts; minami, webim and xuanxuan: also
   missing, duplicate, misplaced and failed acks; the exit status is 1 if any is nonzero, a
   login failed, or ``--timeout`` expired), waiting ``--grace`` seconds after the last one for
   late duplicates.  minami code 300 notices (a friend went offline) are counted, and only
   shown when some arrived during the send phase.
5. Prints messages/s delivered (first send to last receive), latency percentiles, logins/s,
   and with ``--daemon-pid`` the daemon's RSS (before any connection, after the idle ones,
   after all, after the messages), its RSS per idle connection, and the CPU used during the
   send phase by the daemon, its redis-server and the load clients.

Usage (see bench/README.md for a full session)::

    ulimit -n 65536   # or as high as the hard limit allows, in the daemon's shell too
    /work/venv/bin/python bench/boss_load.py --redis unix://./imd-data/redis.sock \\
        --connections 200 --messages 50000 --daemon-pid $(pgrep -f 'twistd.*imd' | head -1)
    /work/venv/bin/python bench/boss_load.py --protocol minami --connections 200 \\
        --messages 50000 --daemon-pid ...
    /work/venv/bin/python bench/boss_load.py --protocol webim --url http://127.0.0.1:8000 ...
    /work/venv/bin/python bench/boss_load.py --protocol xuanxuan --xuanxuan 127.0.0.1:8080 ...

Notes:

- ``--redis`` is only used to create users, tokens and friendships; the load goes through
  ``--url``.
- Each run adds bench accounts and their history to the daemon's Redis; use a throw-away
  data directory.
- With ``--clients K`` the connections are partitioned: a message goes between two
  connections of the same process, so each process checks its own messages; the parent adds
  up the counts and merges the latencies.
- The load clients compete with the daemon for the same cores; the CPU figures at the end say
  how the time was split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import secrets
import sys
import tempfile
import time
from array import array

MONO = time.monotonic_ns
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def ring_friends(n: int, f: int) -> list:
    """minami: the friends of each of ``n`` users placed on a ring, as index lists: the
    ``f`` nearest on each side (up to 2f friends; fewer when n is small)."""
    return [sorted({(i + d) % n for d in range(1, f + 1)}
                   | {(i - d) % n for d in range(1, f + 1)} - {i}) for i in range(n)]


def emit(obj: dict) -> None:
    """One result line from a worker to the parent (blocking write on the pipe)."""
    sys.stdout.write("@@" + json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# =========================================================================================
# Worker: one load-client process
# =========================================================================================

def masked_text_frame(payload: bytes) -> bytes:
    """A client's text frame (RFC 6455 5.2): FIN, opcode 1, a new 32-bit masking key, the
    payload XORed with it."""
    n = len(payload)
    key = random.getrandbits(32).to_bytes(4, "big")
    masked = (int.from_bytes(payload, "big") ^
              int.from_bytes((key * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = b"\x81\xfe" + n.to_bytes(2, "big")
    else:
        head = b"\x81\xff" + n.to_bytes(8, "big")
    return head + key + masked


def worker_main(config_path: str) -> None:
    from urllib.parse import urlencode

    from autobahn.exception import Disconnected
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from autobahn.websocket.types import ConnectingRequest
    from collections import deque

    from twisted.internet import defer, endpoints, protocol, reactor, stdio, task
    from twisted.protocols.basic import LineOnlyReceiver, LineReceiver
    from twisted.web.client import Agent, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IBodyProducer
    from zope.interface import implementer

    from imd.passwords import md5hex

    import warnings
    # Twisted's readBody warns for the HTTP/1.1 client's own transport proxy
    warnings.filterwarnings("ignore", message="Using readBody with a transport",
                            category=DeprecationWarning)

    with open(config_path) as f:
        cfg = json.load(f)
    raise_nofile()

    proto = cfg.get("protocol", "boss")

    class Conn(WebSocketClientProtocol):
        """A 66boss connection: ``login_<uid>_<token>``, then ``text_<from>_<body>_<ctype>``."""
        idx = -1        # index among this worker's active users; -1 for idle ones
        ready = False   # logged in
        resolved = False  # login refused (or connection lost) and counted as a failure
        worker: "Worker"

        def onOpen(self):
            w = self.factory.worker
            self.worker = w
            self.user = w.take_user(self)
            if self.user is None:  # should not happen; nothing left to log in
                self.transport.abortConnection()
                return
            self.sendMessage(b"login_%d_%s" % (self.user[0], self.user[1].encode()))

        def onMessage(self, payload, isBinary):
            if self.ready:
                if payload[:5] == b"text_":
                    try:
                        _, frm, body, _ = payload.split(b"_", 3)
                    except ValueError:
                        self.worker.bad += 1
                        return
                    self.worker.delivered(self, frm, body)
                elif payload[:10] != b"heartbeat_":
                    self.worker.other(self, payload)
            elif payload == b"ok":
                self.ready = True
                self.worker.logged_in(self)
            elif payload[:10] != b"heartbeat_":
                self.worker.login_failed(self, payload)

        def onClose(self, wasClean, code, reason):
            w = self.factory.worker
            if not w.quitting:
                w.closed(self, code, reason)

        def abort(self):
            self.transport.abortConnection()

        def onMessageEnd(self):
            # As the daemon's adapters do: skip the observer future autobahn makes for
            # every message (nothing observes it here).
            if not self.failedByMe:
                self.onMessage(b"".join(self.message_data), self.message_is_binary)

        def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
            """A text frame, masked with a fresh random key as RFC 6455 asks of a client,
            straight to the transport: autobahn builds a masker object per frame, which cost
            a quarter of this client's CPU, taken from the daemon on a 2-core machine."""
            if self.state != self.STATE_OPEN:
                raise Disconnected("not open")
            self.transport.write(masked_text_frame(payload))

    class MinamiConn(Conn):
        """A minami connection: the account and password go in the URL of the WebSocket
        handshake (``/im/login?account=&password=``), so the user is picked as the TCP
        connection opens; the first frame is the login reply.  Then JSON frames: deliveries
        ``{from, payload}``, acks ``{code, message, ok, id}``, code 300 (a friend went
        offline)."""

        def onConnecting(self, transport_details):
            w = self.factory.worker
            self.worker = w
            self.user = w.take_user(self)
            if self.user is None:  # should not happen; nothing left to log in
                raise RuntimeError("no bench user left for this connection")
            query = urlencode({"account": self.user[1], "password": cfg["password"]})
            return ConnectingRequest(host=self.factory.host, port=self.factory.port,
                                     resource=f"{self.factory.resource}?{query}",
                                     useragent=self.factory.useragent)

        def onOpen(self):
            pass  # the daemon speaks first (the login reply)

        def onMessage(self, payload, isBinary):
            w = self.worker
            try:
                obj = json.loads(payload.decode("utf-8"))
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                if self.ready:
                    w.other(self, payload)
                else:
                    w.login_failed(self, payload)
                return
            if self.ready:
                frm, body = obj.get("from"), obj.get("payload")
                code = obj.get("code")
                if frm is not None:
                    if not isinstance(frm, str) or not isinstance(body, str):
                        w.bad += 1
                        return
                    w.delivered(self, frm.encode(), body.encode())
                elif code == 300:
                    w.offline_notices += 1
                elif code is not None and "id" in obj:
                    w.acked(self, obj)
                else:
                    w.other(self, payload)
            elif obj.get("code") == 200 and obj.get("token") and \
                    isinstance(obj.get("profile"), dict) and \
                    str(obj["profile"].get("id")) == str(self.user[0]):
                self.ready = True
                w.logged_in(self)
            else:
                w.login_failed(self, payload)

    class Factory(WebSocketClientFactory):
        protocol = MinamiConn if proto == "minami" else Conn

        def clientConnectionFailed(self, connector, reason):
            self.worker.connect_failed(reason)

    class XuanxuanConn(LineOnlyReceiver):
        """A xuanxuan 1.0 TCP connection: one JSON object + ``\\n`` per line.  Login is
        ``chat/login [account, md5hex(password), "online"]``; line 1 is its reply, then one
        array of pushes (``userGetlist`` of every user, ...) completes it.  Pushes of other
        methods (``chat/login`` announcements of other users ...) are counted and ignored.
        The daemon handles a connection's requests in order, so the replies to ``message``
        are matched to the sent messages first in, first out (and checked by their gid)."""
        delimiter = b"\n"
        MAX_LENGTH = 256 << 20   # the userGetlist push lists every user
        idx = -1
        ready = False
        resolved = False
        got_reply = False

        def connectionMade(self):
            w = self.factory.worker
            self.worker = w
            self.pending: deque = deque()
            self.transport.setTcpNoDelay(True)
            self.user = w.take_user(self)
            if self.user is None:  # should not happen; nothing left to log in
                self.transport.abortConnection()
                return
            self.sendLine(json.dumps({"module": "chat", "method": "login", "params": [
                self.user[1], md5hex(cfg["password"]), "online"]}).encode())

        def abort(self):
            self.transport.abortConnection()

        _parts: list = []
        _size = 0

        def dataReceived(self, data):
            """Lines, with a long one kept as a list of reads until its end arrives
            (LineOnlyReceiver copies its whole buffer at every read: quadratic for the
            megabyte userGetlist line of 10,000 users)."""
            if b"\n" not in data:
                if not self._parts:
                    self._parts = []
                self._parts.append(data)
                self._size += len(data)
                if self._size > self.MAX_LENGTH:
                    self.lineLengthExceeded(b"".join(self._parts))
                return
            if self._parts:
                first = self._parts[0]
                if not self.ready and self.got_reply and len(first) >= 200 and \
                        first[:1] == b"[" and b'"method":"userGetlist"' in first[:200]:
                    # The user list: its head is all lineReceived reads of it (no copy of
                    # the megabyte: 10,000 logins would copy 9 GB here).
                    self._parts, self._size = [], 0
                    self.lineReceived(first[:200])
                    data = data[data.index(b"\n") + 1:]
                    if not data:
                        return
                    self.dataReceived(data)
                    return
                self._parts.append(data)
                data = b"".join(self._parts)
                self._parts, self._size = [], 0
            lines = data.split(b"\n")
            rest = lines.pop()
            if rest:
                self._parts, self._size = [rest], len(rest)
            for line in lines:
                if self.transport.disconnecting:
                    return
                self.lineReceived(line)

        def lineReceived(self, line):
            w = self.worker
            if line[:1] == b"[" and (self.ready or self.got_reply):
                # Pushes are not parsed unless they may hold a message (presence batches,
                # the user list) or complete the login.
                if self.ready and b'"method":"message"' not in line:
                    w.ignored_pushes += line.count(b'"module":')
                    w.ignored_lines += 1
                    return
                if not self.ready and b'"method":"userGetlist"' in line[:200]:
                    self.ready = True
                    w.logged_in(self)
                    return
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if self.ready:
                if isinstance(obj, list):
                    for packet in obj:
                        if isinstance(packet, dict) and packet.get("method") == "message" \
                                and packet.get("module") == "chat":
                            for m in packet.get("data") or ():
                                try:
                                    frm, body = b"%d" % m["user"], m["content"].encode()
                                    cgid = m["cgid"]
                                except (KeyError, TypeError, AttributeError):
                                    w.bad += 1
                                    continue
                                if self.idx < 0 or \
                                        str(cgid).encode() != w.cgid_of(self.idx, frm):
                                    w.wrong += 1  # (counted as missing too)
                                    continue
                                w.delivered(self, frm, body)
                        else:
                            w.ignored_pushes += 1
                elif isinstance(obj, dict) and obj.get("method") == "message" \
                        and "result" in obj:
                    w.xuanxuan_reply(self, obj)
                else:
                    w.other(self, line)
            elif not self.got_reply:
                if isinstance(obj, dict) and obj.get("result") == "success" and \
                        isinstance(obj.get("data"), dict) and \
                        obj["data"].get("id") == self.user[0] and obj.get("sid"):
                    self.got_reply = True
                else:
                    w.login_failed(self, line)
            elif isinstance(obj, list):
                if any(isinstance(p, dict) and p.get("method") == "userGetlist" for p in obj):
                    self.ready = True
                    w.logged_in(self)
                else:
                    w.ignored_pushes += 1  # another user's login announcement came first
            else:
                w.login_failed(self, line)

        def lineLengthExceeded(self, line):
            self.worker.other(self, b"line too long: " + line[:100])
            self.transport.abortConnection()

        def sendMessage(self, seq: int) -> None:
            w = self.worker
            t = w.sent_at[seq] = MONO()
            self.pending.append(seq)
            self.transport.write(
                b'{"module":"chat","method":"message","params":[{"gid":"%s%d","cgid":"%s",'
                b'"contentType":"text","content":"%d.%d"}]}\n'
                % (w.gid_prefix, seq, w.cgid_of(w.dest[seq], w.uid_bytes[self.idx]), seq, t))

        def connectionLost(self, reason):
            w = self.worker
            if not w.quitting:
                w.closed(self, None, reason.getErrorMessage())

    class XuanxuanFactory(protocol.ClientFactory):
        protocol = XuanxuanConn
        noisy = False

        def clientConnectionFailed(self, connector, reason):
            self.worker.connect_failed(reason)

    @implementer(IBodyProducer)
    class BytesProducer:
        def __init__(self, body: bytes):
            self.body = body
            self.length = len(body)

        def startProducing(self, consumer):
            consumer.write(self.body)
            return defer.succeed(None)

        def pauseProducing(self):
            pass

        def stopProducing(self):
            pass

    FORM = Headers({b"content-type": [b"application/x-www-form-urlencoded"]})

    class HttpConn(protocol.Protocol):
        """One keep-alive HTTP/1.1 connection of the raw webim client (``--webim-client
        raw``): one request at a time, the whole request in one write, TCP_NODELAY as
        browsers set it; the answer is read by its Content-Length (or chunked, or until
        the connection closes)."""
        pool: "HttpPool"
        d = None

        def connectionMade(self):
            self.transport.setTcpNoDelay(True)
            self.buf = b""

        def request(self, data: bytes) -> defer.Deferred:
            self.d = defer.Deferred()
            self.buf = b""
            self.head = None
            self.transport.write(data)
            return self.d

        def dataReceived(self, data):
            self.buf += data
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = self.buf[:end].split(b"\r\n")
                self.buf = self.buf[end + 4:]
                self.code = int(lines[0].split(b" ", 2)[1])
                self.length, self.chunked, self.close = None, False, False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        self.length = int(value)
                    elif name == b"transfer-encoding":
                        self.chunked = b"chunked" in value.lower()
                    elif name == b"connection":
                        self.close = b"close" in value.lower()
                self.head = lines
            if self.chunked:
                body = self._dechunk()
                if body is None:
                    return
            elif self.length is not None:
                if len(self.buf) < self.length:
                    return
                body = self.buf[:self.length]
            else:
                return  # read until the connection closes
            self._done(body)

        def _dechunk(self):
            out, pos, buf = [], 0, self.buf
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                size = int(buf[pos:eol].split(b";")[0], 16)
                if size == 0:
                    if buf.find(b"\r\n", eol + 2) < 0:
                        return None
                    return b"".join(out)
                if len(buf) < eol + 2 + size + 2:
                    return None
                out.append(buf[eol + 2:eol + 2 + size])
                pos = eol + 2 + size + 2

        def _done(self, body):
            d, self.d = self.d, None
            self.head, self.buf = None, b""
            if self.close:
                self.transport.loseConnection()
            else:
                self.pool.idle.append(self)
            d.callback((self.code, body))

        def connectionLost(self, reason):
            if self in self.pool.idle:
                self.pool.idle.remove(self)
            if self.d is not None:
                d, self.d = self.d, None
                if self.head is not None and not self.chunked and self.length is None:
                    d.callback((self.code, self.buf))
                else:
                    d.errback(reason)

    class HttpPool(protocol.ClientFactory):
        """Idle keep-alive connections to the daemon, reused last in, first out."""
        protocol = HttpConn

        def __init__(self, base: bytes):
            hostport = base.split(b"://", 1)[1].split(b"/", 1)[0]
            host, _, port = hostport.rpartition(b":")
            self.host, self.port = host.decode(), int(port or 80)
            self.hosthdr = hostport
            self.idle: list = []

        def buildProtocol(self, addr):
            p = HttpConn()
            p.pool = self
            return p

        def request(self, method: bytes, path: bytes, body: bytes | None):
            if body is None:
                data = b"%s %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (method, path, self.hosthdr)
            else:
                data = (b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/"
                        b"x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
                        % (method, path, self.hosthdr, len(body), body))
            if self.idle:
                return self.idle.pop().request(data)
            ep = endpoints.TCP4ClientEndpoint(reactor, self.host, self.port, timeout=30)
            return ep.connect(self).addCallback(lambda conn: conn.request(data))

    class WebimTab:
        """A webim browser tab: ``POST /webim/online`` (token=) gives the ticket, then exactly
        one long-poll ``GET /packets?ticket=`` in flight at any time (re-polled as soon as one
        is answered).  Messages go out as ``POST /webim/message`` (token, ticket,
        type=unicast, to, body), at most ``--tab-posts`` at once per tab (a browser allows
        only a few connections per host); the reply ``"ok"`` is the ack.  The body is stamped
        when its POST is issued, so the latencies leave out this tab's send queue."""
        idx = -1
        ready = False
        resolved = False
        stopped = False

        def __init__(self, worker, user):
            self.worker = worker
            self.user = user
            self.queue: deque = deque()
            self.posting = 0

        def start(self):
            w = self.worker
            d = w.http(b"POST", w.base + b"/webim/online",
                       b"token=" + self.user[1].encode())
            d.addCallbacks(self._online, self._online_failed)

        def abort(self):
            self.stopped = True

        def _online(self, result):
            code, body = result
            try:
                obj = json.loads(body)
                ticket = obj["connection"]["ticket"]
                ok = code == 200 and obj.get("success") is True and \
                    str(obj["user"]["id"]) == str(self.user[0])
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                self.worker.login_failed(self, b"%d " % code + body)
                return
            self.ticket = ticket.encode()
            self.cred = b"token=%s&ticket=%s&type=unicast" % (self.user[1].encode(),
                                                              self.ticket)
            self.poll_url = self.worker.base + b"/packets?ticket=" + self.ticket
            self.ready = True
            self.poll()
            self.worker.logged_in(self)

        def _online_failed(self, failure):
            self.resolved = True
            self.worker._fail(f"online failed: {failure.getErrorMessage()}")

        def poll(self):
            if self.stopped or self.worker.quitting:
                return
            self.worker.http(b"GET", self.poll_url).addCallbacks(self._polled,
                                                                 self._poll_failed)

        def _polled(self, result):
            w = self.worker
            code, body = result
            try:
                obj = json.loads(body)
                status = obj.get("status")
            except (ValueError, AttributeError):
                obj, status = None, None
            if status == "ok":
                self.poll()  # keep one poll in flight
                for m in obj.get("messages") or ():
                    try:
                        frm, text = m["from"].encode(), m["body"].encode()
                    except (KeyError, TypeError, AttributeError):
                        w.bad += 1
                        continue
                    w.delivered(self, frm, text)
                if obj.get("presences") or obj.get("statuses"):
                    w.other(self, json.dumps({"presences": obj.get("presences"),
                                              "statuses": obj.get("statuses")}).encode())
            elif status == "stopped":
                self.stopped = True
                w.closed(self, code, "poll answered stopped")
            else:
                w.other(self, b"poll %d: %s" % (code, body[:150]))
                w.reactor.callLater(0.5, self.poll)

        def _poll_failed(self, failure):
            w = self.worker
            if w.quitting:
                return
            w.other(self, f"poll failed: {failure.getErrorMessage()}".encode())
            w.reactor.callLater(0.5, self.poll)

        def sendMessage(self, seq: int) -> None:
            self.queue.append(seq)
            if self.posting < cfg["tab_posts"]:
                self._post_next()

        def _post_next(self) -> None:
            w = self.worker
            seq = self.queue.popleft()
            self.posting += 1
            t = w.sent_at[seq] = w.t_last_send = MONO()
            d = w.http(b"POST", w.message_url, self.cred + b"&to=%s&body=%d.%d"
                       % (w.uid_bytes[w.dest[seq]], seq, t))
            d.addBoth(self._posted, seq)

        def _posted(self, result, seq: int) -> None:
            self.posting -= 1
            w = self.worker
            if isinstance(result, tuple) and result == (200, b'"ok"'):
                w.acked(self, {"code": 200, "id": seq})
            else:
                why = (f"{result[0]} {result[1][:80]!r}" if isinstance(result, tuple)
                       else result.getErrorMessage())
                w.acked(self, {"code": why, "id": seq})
            if self.queue and self.posting < cfg["tab_posts"]:
                self._post_next()

    class DeadConn:
        """Stands in for an active connection that closed during the run."""

        def __init__(self, worker):
            self.worker = worker
            self.idx = -1

        def sendMessage(self, payload):
            self.worker.sent_dead += 1

    class Worker:
        def __init__(self):
            self.quitting = False
            self.reactor = reactor
            self.ignored_pushes = 0
            self.ignored_lines = 0  # xuanxuan: push lines holding only ignored packets
            if proto == "xuanxuan":
                host, _, port = cfg["xuanxuan"].rpartition(":")
                self.factory = XuanxuanFactory()
                self.factory.host, self.factory.port = host or "127.0.0.1", int(port)
                self.factory.worker = self
                self.open_one = self._open_tcp
            elif proto == "webim":
                url = cfg["url"].rstrip("/")
                if url.startswith("ws"):
                    url = "http" + url[2:]
                self.base = url.encode()
                self.message_url = self.base + b"/webim/message"
                self.pool = HTTPConnectionPool(reactor, persistent=True)
                users = len(cfg["active"]) + len(cfg["idle"]) + len(cfg.get("warm", ()))
                # every tab holds one poll connection plus up to --tab-posts for messages
                self.pool.maxPersistentPerHost = users * (1 + cfg["tab_posts"]) + 16
                self.pool.cachedConnectionTimeout = 600
                self.agent = Agent(reactor, pool=self.pool, connectTimeout=30)
                self.raw = HttpPool(self.base) if cfg["webim_client"] == "raw" else None
                self.open_one = self._open_tab
            else:
                self.factory = Factory(cfg["url"].rstrip("/")
                                       + ("/im/login" if proto == "minami" else "/entry"))
                self.factory.worker = self
                self.factory.setProtocolOptions(
                    utf8validateIncoming=False, openHandshakeTimeout=60,
                    closeHandshakeTimeout=5, tcpNoDelay=True, autoFragmentSize=0)
                self.open_one = self._open_tcp
            self.active = [tuple(u) for u in cfg["active"]]   # (uid, token or account)
            self.idle = [tuple(u) for u in cfg["idle"]]
            self.warm = [tuple(u) for u in cfg.get("warm", ())]
            self.n = len(self.active)
            self.conns: list = [None] * self.n
            self.idle_conns: list = []
            self.unexpected_closes = 0
            self.close_samples: list[str] = []
            self.other_count = 0
            self.other_samples: list[str] = []
            self.offline_notices = 0
            self.sent_dead = 0
            self._phase = None
            self.window = 0
            self.errors_released = 0
            self.ticker = None

        # -- connecting ------------------------------------------------------------------

        def connect_all(self, users, is_active: bool, reply: str) -> None:
            self._phase = {"users": users, "next": 0, "pending": 0, "ok": 0, "failed": 0,
                           "is_active": is_active, "reply": reply, "t0": MONO(),
                           "t_last": None, "failures": [], "done": False,
                           "queue": list(range(len(users)))[::-1]}
            self._pump_connects()
            if not users:
                self._connect_phase_done()

        def _pump_connects(self) -> None:
            ph = self._phase
            limit = cfg["connect_concurrency"]
            users = ph["users"]
            while ph["pending"] < limit and ph["next"] < len(users):
                ph["pending"] += 1
                ph["next"] += 1
                self.open_one()

        def _open_tcp(self) -> None:
            reactor.connectTCP(self.factory.host, self.factory.port, self.factory, timeout=30)

        def _open_tab(self) -> None:
            tab = WebimTab(self, None)
            tab.user = self.take_user(tab)
            tab.start()

        def http(self, method: bytes, url: bytes, body: bytes | None = None):
            """Deferred (status, body) of one request through the persistent pool."""
            if self.raw is not None:
                return self.raw.request(method, url[len(self.base):] or b"/", body)
            d = self.agent.request(method, url, FORM if body is not None else None,
                                   BytesProducer(body) if body is not None else None)
            d.addCallback(lambda resp: readBody(resp).addCallback(
                lambda data: (resp.code, data)))
            return d

        def cgid_of(self, i: int, other: bytes) -> bytes:
            """xuanxuan: the one-to-one chat gid of active user i and user ``other``, the
            ids sorted as text, as the 1.0 client sorts them (99999&100000 is
            100000&99999); imd shows the chat with this gid."""
            return b"&".join(sorted((b"%d" % self.uid_ints[i], other)))

        def xuanxuan_reply(self, conn, obj: dict) -> None:
            """The reply to the oldest unanswered ``message`` request of conn."""
            if not conn.pending:
                self.ack_bad += 1
                self._ack_sample(obj)
                return
            seq = conn.pending.popleft()
            data = obj.get("data")
            if obj.get("result") == "success" and isinstance(data, list) and data and \
                    isinstance(data[0], dict) and \
                    data[0].get("gid") == (self.gid_prefix + b"%d" % seq).decode():
                self.acked(conn, {"code": 200, "id": seq})
            else:
                self._ack_sample(obj)
                self.acked(conn, {"code": f"{obj.get('result')}: {obj.get('message')}",
                                  "id": seq})

        def take_user(self, conn):
            ph = self._phase
            queue = ph["queue"]
            if not queue:
                return None
            i = queue.pop()
            conn.pos = i
            if ph["is_active"]:
                conn.idx = i
            return ph["users"][i]

        def logged_in(self, conn) -> None:
            ph = self._phase
            ph["ok"] += 1
            ph["t_last"] = MONO()
            if ph["is_active"]:
                self.conns[conn.idx] = conn
            else:
                self.idle_conns.append(conn)
            self._one_done()

        def login_failed(self, conn, payload) -> None:
            conn.resolved = True
            self._fail(f"login refused: {payload[:120]!r}")
            conn.abort()

        def connect_failed(self, reason) -> None:
            self._fail(f"connect failed: {reason.getErrorMessage()}")

        def _fail(self, why: str) -> None:
            ph = self._phase
            ph["failed"] += 1
            if len(ph["failures"]) < 5:
                ph["failures"].append(why)
            self._one_done()

        def _one_done(self) -> None:
            ph = self._phase
            ph["pending"] -= 1
            self._pump_connects()
            if ph["ok"] + ph["failed"] == len(ph["users"]):
                self._connect_phase_done()

        def _connect_phase_done(self) -> None:
            ph = self._phase
            if ph["done"]:
                return
            ph["done"] = True
            emit({"event": ph["reply"], "ok": ph["ok"], "failed": ph["failed"],
                  "t0": ph["t0"], "t_last": ph["t_last"], "failures": ph["failures"]})

        def closed(self, conn, code, reason) -> None:
            if not conn.ready:
                if not conn.resolved and self._phase and not self._phase["done"]:
                    conn.resolved = True
                    self._fail(f"closed before login: code={code} reason={reason}")
                return
            self.unexpected_closes += 1
            if len(self.close_samples) < 5:
                self.close_samples.append(f"code={code} reason={reason}")
            if conn.idx >= 0 and self.conns[conn.idx] is conn:
                # later sends from this user go nowhere (they end up missing) instead of
                # raising in the middle of a send loop
                self.conns[conn.idx] = DeadConn(self)

        def other(self, conn, payload) -> None:
            """A signal other than a delivery or a heartbeat: normally an error_ line."""
            self.other_count += 1
            if len(self.other_samples) < 5:
                self.other_samples.append(payload[:200].decode("utf-8", "replace"))
            if payload[:6] == b"error_" and self.window:
                # the refused message will never arrive: give the sender its slot back
                self.inflight[conn.idx] -= 1
                self.errors_released += 1
                self._pump(conn.idx)
                self._check_done()

        # -- sending ---------------------------------------------------------------------

        def start_sending(self) -> None:
            n, m = self.n, cfg["messages"]
            self.m = m
            rnd = random.Random(cfg["seed"])
            self.dest = dest = array("i", bytes(4 * m))
            if proto == "minami":
                # only friends may talk: the recipient is one of the sender's ring friends
                friends = ring_friends(n, cfg["friends"])
                for seq in range(m):
                    mine = friends[seq % n]
                    dest[seq] = mine[rnd.randrange(len(mine))]
            else:
                for seq in range(m):
                    d = rnd.randrange(n - 1)
                    s = seq % n
                    dest[seq] = d + 1 if d >= s else d
            uids = self.uid_ints = [u[0] for u in self.active]
            self.uid_bytes = [b"%d" % u for u in uids]
            if proto in ("webim", "xuanxuan"):
                # the connection builds the request itself (webim: when its POST is issued)
                self.encode = int
                self.need_acks = True
                self.gid_prefix = b"%s.%d." % (cfg["password"].encode(), cfg["index"])
            elif proto == "minami":
                # {"toFriend":"<uid>","payload":"<seq>.<ns>","id":"<seq>"}; acks name the id
                self.prefix = [b'{"toFriend":"%d","payload":"' % u for u in uids]
                self.encode = self._encode_minami
                self.need_acks = True
            else:
                self.prefix = [b"text_%d_" % u for u in uids]
                self.encode = self._encode_boss
                self.need_acks = False
            self.ack_got = bytearray(m)
            self.sent_at = array("q", bytes(8 * m)) if self.need_acks else None
            self.ack_lat = array("q", bytes(8 * m)) if self.need_acks else None
            self.acks = self.acks_ok = self.ack_dups = self.ack_wrong = self.ack_bad = 0
            self.ack_errors: dict[str, int] = {}
            self.ack_samples: list[str] = []
            self.got = bytearray(m)
            self.lat = array("q", bytes(8 * m))
            self.received = self.dups = self.wrong = self.bad = 0
            self.errors_released = 0
            self.sent = 0
            self.inflight = [0] * n
            self.next_seq = list(range(n))  # full speed: sender s sends s, s+n, s+2n, ...
            self.window = cfg["window"] if not cfg["rate"] else 0
            self.t_first_send = self.t_last_send = self.t_last_recv = None
            self.finished = False
            self.behind_ticks = 0
            self.cpu0 = self._cpu()
            self.timeout_call = reactor.callLater(cfg["timeout"], self._finish, True)
            self.t_first_send = MONO()
            if m == 0:
                self._finish(False)
                return
            if self.window:
                for s in range(n):
                    self._pump(s)
            else:
                self.rate_per_ns = cfg["rate"] / 1e9
                self.max_inflight = cfg["max_inflight"]
                self.ticker = task.LoopingCall(self._tick)
                self.ticker.start(cfg["tick"], now=True)

        def _pump(self, s: int) -> None:
            window, m, n = self.window, self.m, self.n
            inflight = self.inflight
            seq = self.next_seq[s]
            if inflight[s] >= window or seq >= m:
                return
            send = self.conns[s].sendMessage
            encode = self.encode
            while inflight[s] < window and seq < m:
                try:
                    send(encode(seq))
                except Disconnected:  # closing (e.g. kicked by a newer login of its user)
                    send = self._dead_sender(s)
                inflight[s] += 1
                seq += n
                self.sent += 1
            self.next_seq[s] = seq
            self.t_last_send = MONO()

        def _tick(self) -> None:
            now = MONO()
            due = min(self.m, int((now - self.t_first_send) * self.rate_per_ns) + 1)
            seq = self.sent
            if seq >= due:
                return
            if seq - self.received > self.max_inflight:
                self.behind_ticks += 1
                return
            due = min(due, self.received + self.max_inflight + 1)
            conns, encode, n = self.conns, self.encode, self.n
            while seq < due:
                try:
                    conns[seq % n].sendMessage(encode(seq))
                except Disconnected:  # closing (e.g. kicked by a newer login of its user)
                    self._dead_sender(seq % n)
                seq += 1
            self.sent = seq
            self.t_last_send = MONO()
            if seq >= self.m:
                self.ticker.stop()

        def _dead_sender(self, s: int):
            """Active connection s refused a message as it is closing: count the message
            (it will be missing) and send its later ones nowhere; the new sendMessage."""
            self.sent_dead += 1
            self.conns[s] = DeadConn(self)
            return self.conns[s].sendMessage

        def _encode_boss(self, seq: int) -> bytes:
            return self.prefix[self.dest[seq]] + b"%d.%d_unicast_b" % (seq, MONO())

        def _encode_minami(self, seq: int) -> bytes:
            t = self.sent_at[seq] = MONO()
            return self.prefix[self.dest[seq]] + b'%d.%d","id":"%d"}' % (seq, t, seq)

        def delivered(self, conn, frm: bytes, body: bytes) -> None:
            """Message ``body`` (``<seq>.<ns at send>``) from user ``frm`` arrived at conn."""
            now = MONO()
            try:
                dot = body.index(b".")
                seq = int(body[:dot])
                t = int(body[dot + 1:])
            except ValueError:
                self.bad += 1
                return
            if not 0 <= seq < self.m:
                self.bad += 1
                return
            if self.got[seq]:
                self.dups += 1
                return
            self.got[seq] = 1
            s = seq % self.n
            if self.dest[seq] != conn.idx or frm != self.uid_bytes[s]:
                self.wrong += 1
            self.lat[seq] = now - t
            self.received += 1
            self.t_last_recv = now
            if self.window:
                self.inflight[s] -= 1
                if self.next_seq[s] < self.m:
                    self._pump(s)
            if self.received + self.errors_released >= self.m:
                self._check_done()

        def acked(self, conn, obj: dict) -> None:
            """minami: the reply to the frame with id ``obj["id"]`` (code 200, or an error
            such as 508 friend offline, after which the message will not arrive)."""
            now = MONO()
            try:
                seq = int(obj["id"])
            except (TypeError, ValueError):
                seq = -1
            if not 0 <= seq < self.m or not self.sent_at[seq]:  # unknown or never sent
                self.ack_bad += 1
                self._ack_sample(obj)
                return
            s = seq % self.n
            if s != conn.idx:
                self.ack_wrong += 1
                self._ack_sample(obj)
                return
            if self.ack_got[seq]:
                self.ack_dups += 1
                self._ack_sample(obj)
                return
            self.ack_got[seq] = 1
            self.acks += 1
            if obj.get("code") == 200:
                self.acks_ok += 1
                self.ack_lat[seq] = now - self.sent_at[seq]
            else:
                key = str(obj.get("code"))
                self.ack_errors[key] = self.ack_errors.get(key, 0) + 1
                self._ack_sample(obj)
                if not self.got[seq]:
                    # the refused message will never arrive: give the sender its slot back
                    self.errors_released += 1
                    if self.window:
                        self.inflight[s] -= 1
                        self._pump(s)
            if self.acks >= self.m:
                self._check_done()

        def _ack_sample(self, obj: dict) -> None:
            if len(self.ack_samples) < 5:
                self.ack_samples.append(json.dumps(obj)[:200])

        def _check_done(self) -> None:
            if not self.finished and self.sent >= self.m and \
                    self.received + self.errors_released >= self.m and \
                    (not self.need_acks or self.acks >= self.m):
                self.finished = True
                reactor.callLater(cfg["grace"], self._finish, False)

        def _finish(self, timed_out: bool) -> None:
            if getattr(self, "reported", False):
                return
            self.reported = True
            self.finished = True
            if self.timeout_call.active():
                self.timeout_call.cancel()
            if self.ticker is not None and self.ticker.running:
                self.ticker.stop()
            got, lat = self.got, self.lat
            lats = [lat[i] // 1000 for i in range(self.m) if got[i]]  # microseconds
            extra = {}
            if self.need_acks:
                ack_got, ack_lat = self.ack_got, self.ack_lat
                extra = {"acks": self.acks, "acks_ok": self.acks_ok, "ack_dups": self.ack_dups,
                         "ack_wrong": self.ack_wrong, "ack_bad": self.ack_bad,
                         "ack_missing": self.sent - self.acks, "ack_errors": self.ack_errors,
                         "ack_samples": self.ack_samples,
                         "ack_lat_us": [ack_lat[i] // 1000 for i in range(self.m)
                                        if ack_got[i] and ack_lat[i]]}
            # code 300 notices seen before the end of the send phase (a friend went away)
            extra["offline"] = self.offline_notices
            emit({**extra, "event": "sent", "timed_out": timed_out, "messages": self.m,
                  "sent": self.sent, "received": self.received, "dups": self.dups,
                  "wrong": self.wrong, "bad": self.bad, "missing": self.sent - self.received,
                  "unsent": self.m - self.sent,
                  "other": self.other_count, "other_samples": self.other_samples,
                  "closes": self.unexpected_closes, "close_samples": self.close_samples,
                  "sent_dead": self.sent_dead, "ignored_pushes": self.ignored_pushes,
                  "ignored_lines": self.ignored_lines,
                  "behind_ticks": self.behind_ticks,
                  "t_first_send": self.t_first_send, "t_last_send": self.t_last_send,
                  "t_last_recv": self.t_last_recv, "cpu": self._cpu() - self.cpu0,
                  "lat_us": lats})

        @staticmethod
        def _cpu() -> float:
            r = resource.getrusage(resource.RUSAGE_SELF)
            return r.ru_utime + r.ru_stime

    worker = Worker()

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            cmd = line.decode().strip()
            if cmd == "idle":
                worker.connect_all(worker.idle, False, "idle")
            elif cmd == "warm":
                worker.connect_all(worker.warm, False, "warm")
            elif cmd == "connect":
                worker.connect_all(worker.active, True, "connected")
            elif cmd == "send":
                worker.start_sending()
            elif cmd == "quit":
                worker.quitting = True
                sys.stdout.flush()
                os._exit(0)

        def connectionLost(self, reason):
            os._exit(0)  # the parent went away

    stdio.StandardIO(Commands(), stdout=os.open(os.devnull, os.O_WRONLY))
    emit({"event": "ready", "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]})
    reactor.run()


# =========================================================================================
# Parent: setup, orchestration, report
# =========================================================================================

def proc_rss_kb(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def find_child(ppid: int, name: str) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        if int(text.rsplit(")", 1)[1].split()[1]) == ppid and comm.startswith(name):
            return int(entry)
    return None


def normalise_redis_url(url: str) -> str:
    """``unix://./x.sock`` and ``unix://x.sock`` mean a path relative to the current
    directory (imd's parser would take the first segment for a host)."""
    if url.startswith("unix://") and not url.startswith("unix:///"):
        path, _, query = url[len("unix://"):].partition("?")
        url = "unix://" + os.path.abspath(path) + (f"?{query}" if query else "")
    return url


def bench_friendships(active: list, k: int, friends: int) -> list:
    """minami: the (uid, uid) friend pairs the messages need.  Client process i owns
    ``active[i::k]`` and each of its users is friends with its ring neighbours there (see
    ``ring_friends``)."""
    pairs = []
    for i in range(k):
        mine = active[i::k]
        for a, others in enumerate(ring_friends(len(mine), friends)):
            pairs += [(mine[a][0], mine[b][0]) for b in others if a < b]
    return pairs


def percentile(sorted_values: list, p: float):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    k = min(len(sorted_values), max(1, math.ceil(p / 100 * len(sorted_values))))
    return sorted_values[k - 1]


async def create_users(redis_url: str, run_id: str, count: int, token_ttl: int,
                       protocol: str = "boss", friendships=None,
                       remembered: str | None = None) -> list:
    """``count`` bench users sharing the password ``bench-<run id>`` (one verifier);
    ``remembered``: the daemon's login key file, under which their logins are stored as
    verified (see --remembered).

    boss and webim: returns (uid, token) pairs.  minami and xuanxuan: returns (uid, account)
    pairs (their clients log in with the password) and, when ``friendships(users)`` is given,
    befriends the (uid a, uid b) pairs it returns."""
    from twisted.internet import defer

    from imd.passwords import LoginKey, make_verifier, md5hex
    from imd.store.connection import connect_pool, parse_redis_url
    from imd.store.redis import AccountTaken, RedisStore

    factory = connect_pool(parse_redis_url(redis_url), poolsize=4)
    try:
        store = RedisStore(await factory.deferred)
        verifier = await make_verifier(md5hex("bench-" + run_id))
        key = None
        if remembered:
            with open(remembered) as f:  # never made here: the daemon's own key
                key = LoginKey(bytes.fromhex(f.read().strip()))

        async def one(i: int):
            account = f"bench-{run_id}-{i}"
            try:
                uid = (await store.create_user(account, account, verifier)).id
            except AccountTaken:  # --run-id: the users of an earlier run
                uid = await store.find_account(account)
            if protocol in ("minami", "xuanxuan"):
                if key is not None:
                    mac = key.mac(uid, md5hex("bench-" + run_id), await store.get_verifier(uid))
                    await store.remember_login(uid, key.id, mac, 6 * 3600)
                return uid, account   # these log in with the password
            return uid, await store.issue_token(uid, token_ttl)

        users: list = []
        chunk = 1000
        for start in range(0, count, chunk):
            ds = [defer.ensureDeferred(one(i)) for i in range(start, min(count, start + chunk))]
            users += await defer.gatherResults(ds, consumeErrors=True)
        if friendships is not None:
            account = dict(users)
            pairs = friendships(users)
            for start in range(0, len(pairs), chunk):
                await defer.gatherResults(
                    [defer.ensureDeferred(store.befriend(a, b, account[b], account[a]))
                     for a, b in pairs[start:start + chunk]], consumeErrors=True)
        return users
    finally:
        await factory.disconnect()


PROTOCOLS = ("boss", "minami", "webim", "xuanxuan")
TITLES = {"boss": "66boss", "minami": "minami", "webim": "webim", "xuanxuan": "xuanxuan 1.0"}
# what an ack is, per protocol that has them (the reply to each sent message)
ACK_WHAT = {"minami": "code 200", "webim": 'POST reply "ok"',
            "xuanxuan": "result success, own gid"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Load test for imd's 66boss, minami, webim or xuanxuan endpoint "
                    "(see the module docstring).")
    p.add_argument("--protocol", "-p", choices=PROTOCOLS, default="boss",
                   help="boss: /entry with login_<uid>_<token>; minami: "
                        "/im/login?account=&password= (scrypt-checked, so logins are slow), "
                        "messages only between friends; webim: HTTP /webim/online with a "
                        "token, a long-poll per tab, POST /webim/message; xuanxuan: JSON lines "
                        "over TCP to --xuanxuan (scrypt-checked login)")
    p.add_argument("--url", default="ws://127.0.0.1:8000",
                   help="base URL of the daemon's web port (/entry or /im/login is appended; "
                        "webim uses it as http://, /webim/... and /packets)")
    p.add_argument("--xuanxuan", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="xuanxuan: the daemon's --xuanxuan TCP address")
    p.add_argument("--tab-posts", type=int, default=2,
                   help="webim: POST /webim/message requests in flight per tab (more wait in "
                        "the tab's queue); each tab also holds its long-poll connection")
    p.add_argument("--webim-client", choices=("raw", "agent"), default="raw",
                   help="webim: the HTTP client of the load processes: raw (keep-alive "
                        "HTTP/1.1 on plain Twisted protocols, TCP_NODELAY, the default; about "
                        "a third of Agent's CPU per message) or agent (twisted.web.client.Agent "
                        "with a persistent pool, as measured before 2026-11-24)")
    p.add_argument("--redis", default="unix://./imd-data/redis.sock",
                   help="URL of the daemon's Redis; used only to create bench users, tokens "
                        "and (minami) friendships")
    p.add_argument("--connections", "-n", type=int, default=200,
                   help="active connections (one bench user each) exchanging messages")
    p.add_argument("--messages", "-m", type=int, default=50000,
                   help="total one-to-one messages to send")
    p.add_argument("--rate", "-r", type=float, default=0,
                   help="messages/s overall; 0 = as fast as the window allows")
    p.add_argument("--window", type=int, default=50,
                   help="full speed: messages in flight per sender")
    p.add_argument("--friends", type=int, default=4,
                   help="minami: each active user is friends with the FRIENDS nearest users on "
                        "each side of a ring (within its client process) and sends to a random "
                        "one of them")
    p.add_argument("--idle", type=int, default=0,
                   help="extra idle logged-in connections, opened before the active ones")
    p.add_argument("--warmup", type=int, default=None,
                   help="logged-in connections opened (and kept) before the first RSS reading, "
                        "so one-off growth is not charged to the idle connections; default 0, "
                        "but 50 for minami with --idle (each scrypt password check leaves "
                        "~16 MB in its thread-pool thread, ~160 MB once all threads ran one)")
    p.add_argument("--clients", "-k", type=int, default=1,
                   help="load-client processes to spread the connections over")
    p.add_argument("--daemon-pid", type=int, help="pid of the imd daemon, to report RSS and CPU")
    p.add_argument("--redis-pid", type=int,
                   help="pid of redis-server (default: the daemon's redis-server child)")
    p.add_argument("--connect-concurrency", type=int, default=50,
                   help="connections being opened/logged in at once, per client process; "
                        "above the daemon's listen backlog (Twisted's default is 50; set "
                        "backlog= in its --web endpoint) SYNs get dropped and retried 1 s later")
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds the send phase may take before the missing ones count as lost")
    p.add_argument("--grace", type=float, default=1.0,
                   help="seconds to wait after the last delivery for duplicates")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds to wait before each RSS reading")
    p.add_argument("--tick", type=float, default=0.01,
                   help="fixed rate: seconds between send batches")
    p.add_argument("--max-inflight", type=int, default=0,
                   help="fixed rate: per-process cap on messages in flight "
                        "(default connections*window)")
    p.add_argument("--seed", type=int, default=None, help="random seed for the recipients")
    p.add_argument("--run-id", default=None,
                   help="use the bench users of this earlier run (made if missing) instead of "
                   "new ones: a second run after a restart of the daemon logs the same users "
                   "in again, as in a reconnect storm")
    p.add_argument("--remembered", metavar="KEY_FILE", default=None,
                   help="minami and xuanxuan: store each bench user's login as already "
                   "verified by the daemon whose --remember-logins key is KEY_FILE (its "
                   "login.key): the state right after a restart, so the run is a reconnect "
                   "storm without a first run of scrypt-checked logins")
    p.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clients < 1:
        p.error("--clients must be at least 1")
    if args.connections < 2 * args.clients:
        p.error("--connections must be at least 2 per client process")
    if args.window < 1:
        p.error("--window must be at least 1")
    if args.friends < 1:
        p.error("--friends must be at least 1")
    if args.tab_posts < 1:
        p.error("--tab-posts must be at least 1")
    if args.warmup is None:
        args.warmup = 50 if args.protocol in ("minami", "xuanxuan") and args.idle else 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    from twisted.internet import defer, protocol, reactor

    raise_nofile()
    redis_url = normalise_redis_url(args.redis)
    run_id = args.run_id or secrets.token_hex(3)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    k = args.clients
    result: dict = {"code": 1}
    redis_pid = args.redis_pid
    if args.daemon_pid and not redis_pid:
        redis_pid = (find_child(args.daemon_pid, "redis-server")
                     or find_child(args.daemon_pid, "valkey-server"))

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    class WorkerProcess(protocol.ProcessProtocol):
        def __init__(self, i: int):
            self.i = i
            self.buf = b""
            self.waiting: dict[str, defer.Deferred] = {}
            self.ended = defer.Deferred()

        def expect(self, event: str) -> defer.Deferred:
            d = self.waiting[event] = defer.Deferred()
            return d

        def command(self, cmd: str) -> None:
            self.transport.write(cmd.encode() + b"\n")

        def outReceived(self, data: bytes) -> None:
            self.buf += data
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if not line.startswith(b"@@"):
                    sys.stderr.write(f"[client {self.i}] {line.decode(errors='replace')}\n")
                    continue
                msg = json.loads(line[2:])
                d = self.waiting.pop(msg["event"], None)
                if d is not None:
                    d.callback(msg)

        def processEnded(self, reason) -> None:
            for d in list(self.waiting.values()):
                d.errback(RuntimeError(f"load client {self.i} exited: "
                                       f"{reason.getErrorMessage()}"))
            self.waiting.clear()
            self.ended.callback(None)

    async def sleep(seconds: float) -> None:
        d = defer.Deferred()
        reactor.callLater(seconds, d.callback, None)
        await d

    async def all_of(workers, event: str, cmd: str | None = None) -> list:
        ds = [w.expect(event) for w in workers]
        if cmd:
            for w in workers:
                w.command(cmd)
        return list(await defer.gatherResults(ds, consumeErrors=True))

    def rss() -> tuple:
        return proc_rss_kb(args.daemon_pid), proc_rss_kb(redis_pid)

    minami = args.protocol == "minami"
    figures: dict = {}

    async def run() -> None:
        total = args.connections + args.idle + args.warmup
        say(f"run {run_id}: creating {total} bench users in {redis_url}")
        t = time.monotonic()
        if minami:
            def friendships(users):
                pairs = bench_friendships(users[:args.connections], k, args.friends)
                figures["friendships"] = len(pairs)
                return pairs
            users = await create_users(redis_url, run_id, total, 7 * 86400, "minami",
                                       friendships, remembered=args.remembered)
            say(f"created {total} users and {figures['friendships']} friendships in "
                f"{time.monotonic() - t:.2f} s")
        else:
            users = await create_users(redis_url, run_id, total, 7 * 86400, args.protocol,
                                       remembered=args.remembered)
            say(f"created {total} users"
                + (" and tokens" if args.protocol in ("boss", "webim") else "")
                + f" in {time.monotonic() - t:.2f} s")
        active, idle = users[:args.connections], users[args.connections:][:args.idle]
        warm = users[args.connections + args.idle:]

        tmpdir = tempfile.mkdtemp(prefix="boss_load-")
        workers = []
        for i in range(k):
            m_i = args.messages // k + (1 if i < args.messages % k else 0)
            active_i = active[i::k]
            cfg = {"url": args.url, "active": active_i, "idle": idle[i::k], "warm": warm[i::k],
                   "messages": m_i,
                   "rate": args.rate / k, "window": args.window, "tick": args.tick,
                   "max_inflight": args.max_inflight or len(active_i) * args.window,
                   "timeout": args.timeout, "grace": args.grace, "seed": seed + i,
                   "connect_concurrency": args.connect_concurrency,
                   "protocol": args.protocol, "password": "bench-" + run_id,
                   "friends": args.friends, "index": i, "xuanxuan": args.xuanxuan,
                   "tab_posts": args.tab_posts, "webim_client": args.webim_client}
            path = os.path.join(tmpdir, f"client{i}.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            w = WorkerProcess(i)
            ready = w.expect("ready")
            reactor.spawnProcess(w, sys.executable,
                                 [sys.executable, os.path.abspath(__file__), "--worker", path],
                                 env=os.environ, childFDs={0: "w", 1: "r", 2: 2})
            workers.append(w)
            w.ready = ready
        try:
            readies = await defer.gatherResults([w.ready for w in workers], consumeErrors=True)
            say(f"{k} load client(s) up (open-file limit {readies[0]['nofile']})")
            if warm:
                say(f"opening {len(warm)} warm-up connections")
                figures["warm"] = await all_of(workers, "warm", "warm")
            await sleep(args.settle if args.daemon_pid else 0)
            figures["rss_before"] = rss()

            if idle:
                say(f"opening {len(idle)} idle connections")
                replies = await all_of(workers, "idle", "idle")
                figures["idle"] = replies
                await sleep(args.settle if args.daemon_pid else 0)
                figures["rss_idle"] = rss()
            say(f"opening {len(active)} active connections")
            replies = await all_of(workers, "connected", "connect")
            figures["active"] = replies
            await sleep(args.settle if args.daemon_pid else 0)
            figures["rss_active"] = rss()
            failed = sum(r["failed"] for r in replies)
            if failed:
                say(f"{failed} active connection(s) failed to log in: "
                    f"{[f for r in replies for f in r['failures']]}")
                figures["aborted"] = True
            else:
                say(f"sending {args.messages} messages"
                    + (f" at {args.rate:g}/s" if args.rate else " at full speed"))
                cpu0 = (proc_cpu_s(args.daemon_pid), proc_cpu_s(redis_pid))
                t0 = MONO()
                figures["sent"] = await all_of(workers, "sent", "send")
                figures["cpu_wall"] = (MONO() - t0) / 1e9
                cpu1 = (proc_cpu_s(args.daemon_pid), proc_cpu_s(redis_pid))
                figures["cpu"] = tuple(b - a if a is not None and b is not None else None
                                       for a, b in zip(cpu0, cpu1))
                await sleep(args.settle if args.daemon_pid else 0)
                figures["rss_after"] = rss()
            result["code"] = report(args, run_id, figures, redis_pid)
        finally:
            for w in workers:
                if w.transport is not None and w.transport.pid is not None:
                    w.command("quit")
            await defer.gatherResults([w.ended for w in workers], consumeErrors=True)
            for name in os.listdir(tmpdir):
                os.unlink(os.path.join(tmpdir, name))
            os.rmdir(tmpdir)

    def failed(failure):
        say(f"bench failed: {failure.getTraceback()}")
        result["code"] = 2

    def start() -> None:
        # started from the running reactor: a failure before the first wait (an import
        # error, say) must stop a reactor that runs, or reactor.run() would never return
        d = defer.ensureDeferred(run())
        d.addErrback(failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return result["code"]


def report(args, run_id: str, f: dict, redis_pid) -> int:
    def mb(kb):
        return "n/a" if kb is None else f"{kb / 1024:.1f} MB"

    def span_rate(count, t0, t1):
        if not count or t0 is None or t1 is None or t1 <= t0:
            return "n/a", 0.0
        s = (t1 - t0) / 1e9
        return f"{count / s:,.0f}", s

    minami = args.protocol == "minami"
    acked = args.protocol in ACK_WHAT
    lines = [f"== imd {TITLES[args.protocol]} load test, run {run_id} ==",
             f"setup          {args.connections} active + {args.idle} idle "
             + (f"+ {args.warmup} warm-up " if args.warmup else "") + "connections, "
             f"{args.clients} client process(es), "
             + (f"rate {args.rate:g} msg/s" if args.rate else f"full speed, window "
                f"{args.window}/sender")
             + (f"; {f.get('friendships', 0)} friendships (up to {2 * args.friends} ring "
                f"friends per active user)" if minami else "")]
    code = 0

    def logins(label, replies):
        nonlocal code
        ok = sum(r["ok"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        t0 = min(r["t0"] for r in replies)
        lasts = [r["t_last"] for r in replies if r["t_last"] is not None]
        rate, secs = span_rate(ok, t0, max(lasts) if lasts else None)
        unit = "onlines/s" if args.protocol == "webim" else "logins/s"
        lines.append(f"{label:<15}{ok} ok, {failed} failed in {secs:.2f} s = {rate} {unit}")
        if failed:
            code = 1
            for r in replies:
                for why in r["failures"]:
                    lines.append(f"               ! {why}")

    if "warm" in f:
        logins("logins (warm)", f["warm"])
    if "idle" in f:
        logins("logins (idle)", f["idle"])
    logins("logins", f["active"])

    if "sent" in f:
        res = f["sent"]
        tot = {key: sum(r[key] for r in res)
               for key in ("messages", "sent", "received", "missing", "unsent", "dups",
                           "wrong", "bad", "other", "closes", "behind_ticks")}
        timed_out = any(r["timed_out"] for r in res)
        t_first = min(r["t_first_send"] for r in res)
        last_sends = [r["t_last_send"] for r in res if r["t_last_send"]]
        last_recvs = [r["t_last_recv"] for r in res if r["t_last_recv"]]
        deliv_rate, deliv_s = span_rate(tot["received"], t_first,
                                        max(last_recvs) if last_recvs else None)
        send_rate, send_s = span_rate(tot["sent"], t_first,
                                      max(last_sends) if last_sends else None)
        lats = sorted(x for r in res for x in r["lat_us"])
        lines.append(f"messages       {tot['sent']} sent, {tot['received']} delivered, "
                     f"{tot['missing']} missing, {tot['dups']} duplicate, {tot['wrong']} "
                     f"misrouted, {tot['bad']} unparsable"
                     + (f", {tot['unsent']} never sent" if tot["unsent"] else "")
                     + (" (TIMED OUT)" if timed_out else ""))
        lines.append(f"throughput     {deliv_rate} msg/s delivered ({tot['received']} in "
                     f"{deliv_s:.2f} s, first send to last receive); sent at {send_rate} "
                     f"msg/s over {send_s:.2f} s")
        if acked:
            acks = {key: sum(r[key] for r in res)
                    for key in ("acks", "acks_ok", "ack_dups", "ack_wrong", "ack_bad",
                                "ack_missing")}
            errors: dict = {}
            for r in res:
                for key, count in r["ack_errors"].items():
                    errors[key] = errors.get(key, 0) + count
            lines.append(f"acks           {acks['acks_ok']} ok ({ACK_WHAT[args.protocol]}), "
                         f"{acks['ack_missing']} missing, {acks['ack_dups']} duplicate, "
                         f"{acks['ack_wrong']} on the wrong connection, {acks['ack_bad']} "
                         f"unknown id; errors "
                         + (", ".join(f"{c}: {n}" for c, n in sorted(errors.items()))
                            or "none"))
            samples = [x for r in res for x in r["ack_samples"]][:3]
            if samples:
                lines.append(f"               e.g. {samples}")
            if acks["acks_ok"] != tot["sent"] or acks["ack_dups"] or acks["ack_wrong"] \
                    or acks["ack_bad"]:
                code = 1

        def lat_line(label, values):
            pct = "  ".join(f"p{p:g} {percentile(values, p) / 1000:.1f}" for p in (50, 95, 99))
            lines.append(f"{label:<15}{pct}  max {values[-1] / 1000:.1f}  (min "
                         f"{values[0] / 1000:.2f}, mean {sum(values) / len(values) / 1000:.1f})")

        if lats:
            lat_line("latency ms", lats)
        if acked:
            ack_lats = sorted(x for r in res for x in r["ack_lat_us"])
            if ack_lats:
                lat_line("ack latency ms", ack_lats)
        offline = sum(r.get("offline", 0) for r in res)
        if offline:
            lines.append(f"offline notices {offline} (minami code 300 during the send phase: "
                         f"a friend's connection went away)")
        ignored = sum(r.get("ignored_pushes", 0) for r in res)
        if ignored:
            lines.append(f"ignored pushes {ignored} (xuanxuan pushes other than messages, e.g. "
                         f"chat/login announcements of other users, since the login), in "
                         f"{sum(r.get('ignored_lines', 0) for r in res)} lines")
        if tot["behind_ticks"]:
            lines.append(f"rate           {tot['behind_ticks']} ticks skipped: in-flight cap "
                         f"reached (the daemon could not keep up with the rate)")
        if tot["other"] or tot["closes"]:
            others = [s for r in res for s in r["other_samples"]][:3]
            closes = [s for r in res for s in r["close_samples"]][:3]
            dead = sum(r.get("sent_dead", 0) for r in res)
            lines.append(f"other signals  {tot['other']} (e.g. {others}); "
                         f"unexpected closes {tot['closes']} {closes}"
                         + (f"; {dead} messages sent after their sender's connection closed"
                            if dead else ""))
        if tot["missing"] or tot["unsent"] or tot["dups"] or tot["wrong"] or tot["bad"] \
                or timed_out:
            code = 1
        # CPU seconds used from the send command to the workers' reports, shown as a share
        # of the busy span (first send to last receive; little is used in the grace period)
        cpu_d, cpu_r = f["cpu"]
        span = deliv_s or f["cpu_wall"]
        cpu_c = sum(r["cpu"] for r in res)
        parts = []
        if cpu_d is not None:
            parts.append(f"daemon {cpu_d:.1f} s ({100 * cpu_d / span:.0f}%)")
        if cpu_r is not None:
            parts.append(f"redis-server {cpu_r:.1f} s ({100 * cpu_r / span:.0f}%)")
        parts.append(f"load clients {cpu_c:.1f} s ({100 * cpu_c / span:.0f}%)")
        lines.append(f"CPU (send)     {', '.join(parts)}; % of one core over the "
                     f"{span:.2f} s busy span")
    else:
        code = 1

    if args.daemon_pid:
        def rss_line(label, i):
            values = [(name, f[k][i]) for name, k in
                      (("before", "rss_before"), ("after idle", "rss_idle"),
                       ("after active", "rss_active"), ("after messages", "rss_after"))
                      if k in f]
            return f"{label:<15}" + ", ".join(f"{name} {mb(v)}" for name, v in values)

        lines.append(rss_line("daemon RSS", 0))
        if redis_pid:
            lines.append(rss_line("redis RSS", 1))
        if args.idle and "rss_idle" in f and f["rss_idle"][0] and f["rss_before"][0]:
            idle_ok = sum(r["ok"] for r in f["idle"]) or 1
            per = (f["rss_idle"][0] - f["rss_before"][0]) / idle_ok
            text = f"per idle conn  {per:.1f} KB in the daemon"
            if redis_pid and f["rss_idle"][1] and f["rss_before"][1]:
                text += (f" (+{(f['rss_idle'][1] - f['rss_before'][1]) / idle_ok:.2f} KB "
                         f"in redis-server)")
            lines.append(text + f"  [(RSS after idle - before) / {idle_ok}]")
    lines.append("result         " + ("OK" if code == 0 else "FAILED"))
    print("\n".join(lines), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
