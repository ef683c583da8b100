"""Faults under load, by hand (never from CI or pytest): for each sender protocol and each
fault, stream messages to one 66boss recipient, inject the fault halfway, bring the service
back, drain the recipient, and print sent, acknowledged, delivered, lost, duplicated and the
time the service took to come back.

Faults:
- ``kill-imd``: SIGKILL of imd; restart on the same data directory.
- ``kill-all``: SIGKILL of imd and of its embedded redis-server; restart.
- ``redis-restart``: imd runs on an external redis-server (the one imd would embed), which is
  SIGKILLed and started again on its append-only file while imd keeps running.
- ``slow-reader``: the recipient is online but stops reading; imd ends its session when its
  queue is full (what was not written goes back to the offline queue); the client reads again
  what imd had written, sees the close, logs in again and drains.  (A peer that vanishes
  instead loses what the kernel had accepted for it: the README's delivery promise.)

Acknowledged means: xuanxuan ``result: success``, webim ``"ok"``, minami ``code: 200``.
66boss has no acknowledgement, so for it only delivered and duplicated are meaningful.
A message is *lost* when it was acknowledged and never delivered.  minami only sends to an
online friend, so for minami the recipient is online during the kill faults: what imd had
acknowledged but not yet written to the recipient when it died is in the history but not in
the offline queue (the window the README's delivery promise describes).

    python bench/chaos.py --messages 2000
    python bench/chaos.py --protocols xuanxuan,webim --faults kill-all
"""

from __future__ import annotations

import argparse
import hashlib
import json
from io import BytesIO
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols.basic import LineOnlyReceiver
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imd.accounts import Accounts  # noqa: E402
from imd.store.connection import connect_pool, parse_redis_url  # noqa: E402
from imd.store.embedded import find_redis_server  # noqa: E402
from imd.store.redis import RedisStore  # noqa: E402

PROTOCOLS = ("xuanxuan", "webim", "minami", "boss")
FAULTS = ("kill-imd", "kill-all", "redis-restart", "slow-reader")
WINDOW = 20
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connectable(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Daemon:
    """One ``twistd -n imd`` in a scratch directory, on fixed ports."""

    def __init__(self, root: Path, redis_url: str | None, max_pending: int):
        self.root = root
        self.data = root / "data"
        self.web, self.line, self.xx = free_port(), free_port(), free_port()
        self.redis_url = redis_url
        self.args = ["--data-dir", str(self.data), "--web", f"tcp:{self.web}:interface=127.0.0.1",
                     "--boss-line", f"tcp:{self.line}:interface=127.0.0.1",
                     "--xuanxuan", f"tcp:{self.xx}:interface=127.0.0.1"]
        if redis_url:
            self.args += ["--redis", redis_url]
        self.max_pending = max_pending
        self.proc: subprocess.Popen | None = None

    @property
    def store_url(self) -> str:
        return self.redis_url or f"unix://{self.data}/redis.sock"

    def start(self) -> float:
        """Start and wait until every listener answers; the seconds it took."""
        started = time.monotonic()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        help_text = subprocess.run([*TWISTD, "imd", "--help"], capture_output=True, text=True,
                                   cwd=REPO, env=env).stdout
        extra = []
        if "--max-pending" in help_text:  # options this checkout may not have yet
            extra += ["--max-pending", str(self.max_pending)]
        if "--admin" in help_text:
            extra += ["--admin", "none"]
        with open(self.root / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "imd", *self.args, *extra],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        while not all(connectable(p) for p in (self.web, self.line, self.xx)):
            if self.proc.poll() is not None:
                raise SystemExit(f"imd exited; see {self.root / 'daemon.log'}")
            if time.monotonic() - started > 120:
                raise SystemExit("imd did not come up within 120 s")
            time.sleep(0.05)
        return time.monotonic() - started

    def kill(self, with_redis: bool) -> None:
        redis_pid = None
        if with_redis and (self.data / "redis.pid").exists():
            redis_pid = int((self.data / "redis.pid").read_text())
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if redis_pid:
            os.kill(redis_pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ExternalRedis:
    """The redis-server imd would embed, run by hand on a unix socket, append-only."""

    def __init__(self, root: Path):
        self.dir = root / "redis"
        self.dir.mkdir()
        self.sock = self.dir / "redis.sock"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [find_redis_server(), "--port", "0", "--unixsocket", str(self.sock),
             "--dir", str(self.dir), "--appendonly", "yes", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not self.sock.exists():
            time.sleep(0.02)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.sock.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


# -- clients --------------------------------------------------------------------------------

class _WS(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.on_text(payload.decode("utf-8"))

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        self.factory.closed.callback(None) if not self.factory.closed.called else None


async def ws_open(port: int, path: str, on_text):
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}")
    factory.protocol = _WS
    factory.opened, factory.closed, factory.on_text = defer.Deferred(), defer.Deferred(), on_text
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return await factory.opened


class _Lines(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 24

    def __init__(self, on_line):
        self.on_line = on_line
        self.closed = defer.Deferred()

    def lineReceived(self, line):
        self.on_line(line.decode("utf-8"))

    def connectionLost(self, reason=protocol.connectionDone):
        self.closed.callback(None)


class Recipient:
    """A 66boss WebSocket user; collects the bodies it is sent."""

    def __init__(self, daemon: Daemon, uid: int, token: str):
        self.daemon, self.uid, self.token = daemon, uid, token
        self.bodies: list[str] = []
        self.ws = None

    def _got(self, text: str) -> None:
        if text.startswith("text_"):
            self.bodies.append(text.split("_")[2][:7])

    async def connect(self) -> None:
        self.ws = await ws_open(self.daemon.web, "/entry", self._got)
        self.ws.sendMessage(f"login_{self.uid}_{self.token}".encode())
        await task.deferLater(reactor, 0.2, lambda: None)

    def stop_reading(self) -> None:
        self.ws.transport.pauseProducing()

    def drop(self) -> None:
        if self.ws is not None and self.ws.transport is not None:
            self.ws.transport.abortConnection()

    async def read_until_closed(self, timeout: float = 30.0) -> None:
        """Read again (a slow reader catching up) until imd closes the connection."""
        closed = self.ws.factory.closed
        self.ws.transport.resumeProducing()
        closed.addTimeout(timeout, reactor)
        try:
            await closed
        except defer.TimeoutError:
            pass

    async def drain(self, quiet: float = 2.0) -> None:
        """Log in again and read until nothing came for ``quiet`` seconds."""
        self.drop()
        await self.connect()
        count = -1
        while count != len(self.bodies):
            count = len(self.bodies)
            await task.deferLater(reactor, quiet, lambda: None)


class Sender:
    """Sends numbered bodies with up to WINDOW unacknowledged; records what was acked."""

    acks = True

    def __init__(self, daemon: Daemon, account: str, uid: int, token: str, to: int):
        self.daemon, self.account, self.uid, self.token, self.to = daemon, account, uid, token, to
        self.acked: set[str] = set()
        self.in_flight: dict[str, str] = {}
        self.progress = defer.Deferred()

    def _acked(self, key: str) -> None:
        body = self.in_flight.pop(key, None)
        if body is not None:
            self.acked.add(body[:7])
        if not self.progress.called:
            self.progress.callback(None)

    async def run(self, bodies: list[str], on_half) -> int:
        """Send ``bodies``; call ``on_half`` once half are acked (or sent); return sent."""
        sent = 0
        half = len(bodies) // 2
        fired = False
        deadline = time.monotonic() + 120
        for body in bodies:
            while self.acks and len(self.in_flight) >= WINDOW:
                self.progress = defer.Deferred()
                self.progress.addTimeout(2, reactor)
                try:
                    await self.progress
                except defer.TimeoutError:
                    if time.monotonic() > deadline:
                        return sent
                    self.in_flight.clear()  # lost to the fault: never acked
            try:
                self.send(body)
            except Exception:
                await task.deferLater(reactor, 0.2, lambda: None)
                continue
            sent += 1
            if not self.acks:
                await task.deferLater(reactor, 0.001, lambda: None)
            if not fired and (len(self.acked) if self.acks else sent) >= half:
                fired = True
                await on_half()
        if self.acks:  # the last acks
            end = time.monotonic() + 5
            while self.in_flight and time.monotonic() < end:
                await task.deferLater(reactor, 0.1, lambda: None)
        return sent


class XuanxuanSender(Sender):
    async def connect(self):
        ready = defer.Deferred()
        self.serial = 0

        def on_line(line):
            obj = json.loads(line)
            if isinstance(obj, dict) and obj.get("method") == "login" and not ready.called:
                ready.callback(obj)
            elif isinstance(obj, dict) and obj.get("method") == "message" and \
                    obj.get("result") == "success":
                for m in obj["data"]:
                    self._acked(m["gid"])

        self.proto = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.daemon.xx), _Lines(on_line))
        self.proto.sendLine(json.dumps({"module": "chat", "method": "login", "params": [
            self.account, hashlib.md5(b"pw").hexdigest(), "online"]}).encode())
        assert (await ready)["result"] == "success"
        self.cgid = "&".join(map(str, sorted((self.uid, self.to))))

    def send(self, body):
        if self.proto.transport is None or not self.proto.transport.connected:
            raise ConnectionError
        gid = f"{self.uid}.{body[:7]}"
        self.in_flight[gid] = body
        self.proto.sendLine(json.dumps({"module": "chat", "method": "message", "params": {
            "messages": [{"gid": gid, "cgid": self.cgid, "type": "normal",
                          "contentType": "text", "content": body}]}}).encode())


class WebimSender(Sender):
    async def connect(self):
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor))
        reply = await self._post("online", token=self.token)
        self.ticket = reply["connection"]["ticket"]

    async def _post(self, action, **params):
        body = FileBodyProducer(BytesIO(urlencode(params).encode()))
        response = await self.agent.request(
            b"POST", f"http://127.0.0.1:{self.daemon.web}/webim/{action}".encode(),
            Headers({"Content-Type": ["application/x-www-form-urlencoded"]}), body)
        return json.loads(await readBody(response))

    def send(self, body):
        self.in_flight[body[:7]] = body
        d = defer.ensureDeferred(self._post("message", token=self.token, ticket=self.ticket,
                                            type="unicast", to=str(self.to), body=body))
        d.addCallback(lambda reply: self._acked(body[:7]) if reply == "ok" else None)
        d.addErrback(lambda f: None)


class MinamiSender(Sender):
    async def connect(self):
        ready = defer.Deferred()

        def on_text(text):
            obj = json.loads(text)
            if "profile" in obj and not ready.called:
                ready.callback(obj)
            elif obj.get("code") == 200 and "id" in obj:
                self._acked(obj["id"])

        query = urlencode({"account": self.account, "password": "pw"})
        self.ws = await ws_open(self.daemon.web, f"/im/login?{query}", on_text)
        assert (await ready)["code"] == 200

    def send(self, body):
        if self.ws.transport is None or not self.ws.transport.connected:
            raise ConnectionError
        self.in_flight[body[:7]] = body
        self.ws.sendMessage(json.dumps({"id": body[:7], "toFriend": str(self.to),
                                        "payload": body}).encode())


class BossSender(Sender):
    acks = False

    async def connect(self):
        self.ws = await ws_open(self.daemon.web, "/entry", lambda text: None)
        self.ws.sendMessage(f"login_{self.uid}_{self.token}".encode())

    def send(self, body):
        if self.ws.transport is None or not self.ws.transport.connected:
            raise ConnectionError
        self.ws.sendMessage(f"text_{self.to}_{body}_unicast_x".encode())


SENDERS = {"xuanxuan": XuanxuanSender, "webim": WebimSender, "minami": MinamiSender,
           "boss": BossSender}


# -- one scenario ---------------------------------------------------------------------------

async def users(daemon: Daemon, run: str):
    factory = connect_pool(parse_redis_url(daemon.store_url), poolsize=1)
    store = RedisStore(await factory.deferred)
    accounts = Accounts(store, 3600)
    made = []
    for role in ("sender", "recipient", "probe"):
        account = f"chaos-{run}-{role}"
        user = await accounts.create(account, "pw", account)
        made.append((account, user.id, await accounts.issue_token(user.id)))
    await store.befriend(made[0][1], made[1][1], "r", "s")  # minami talks to friends only
    await factory.disconnect()
    return made


async def logs_in(daemon: Daemon, uid: int, token: str) -> bool:
    """Whether a 66boss token login answers ``ok`` now (the store is reachable)."""
    answer = defer.Deferred()
    try:
        ws = await ws_open(daemon.web, "/entry",
                           lambda text: answer.called or answer.callback(text))
    except Exception:
        return False
    ws.sendMessage(f"login_{uid}_{token}".encode())
    answer.addTimeout(5, reactor)
    try:
        ok = await answer == "ok"
    except defer.TimeoutError:
        ok = False
    ws.transport.abortConnection()
    return ok


async def scenario(args, proto: str, fault: str) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"imd-chaos-{proto}-{fault}-"))
    redis = ExternalRedis(root) if fault == "redis-restart" else None
    if redis:
        redis.start()
    daemon = Daemon(root, redis.url if redis else None, args.max_pending)
    daemon.start()
    run = f"{os.getpid()}{int(time.time() * 1000) % 100000}"
    (s_account, s_id, s_token), (_, r_id, r_token), (_, p_id, p_token) = \
        await users(daemon, run)
    recipient = Recipient(daemon, r_id, r_token)
    online_recipient = fault == "slow-reader" or proto == "minami"
    if online_recipient:
        await recipient.connect()
        if fault == "slow-reader":
            recipient.stop_reading()
    sender = SENDERS[proto](daemon, s_account, s_id, s_token, r_id)
    await sender.connect()
    recovered = 0.0

    async def inject():
        nonlocal recovered
        if fault in ("kill-imd", "kill-all"):
            daemon.kill(with_redis=fault == "kill-all")
            recipient.drop()
            recovered = daemon.start()
            await sender.connect()
            if online_recipient:
                await recipient.connect()
        elif fault == "redis-restart":
            redis.kill()
            await task.deferLater(reactor, 1, lambda: None)
            started = time.monotonic()
            redis.start()
            while not await logs_in(daemon, p_id, p_token):  # back when a login answers
                await task.deferLater(reactor, 0.1, lambda: None)
            recovered = time.monotonic() - started
        elif fault == "slow-reader":  # catch up once imd has ended the session
            started = time.monotonic()
            while b"does not read" not in (root / "daemon.log").read_bytes():
                if time.monotonic() - started > 30:
                    break
                await task.deferLater(reactor, 0.05, lambda: None)
            recipient.ws.transport.resumeProducing()

    # A slow reader needs more than the kernel's socket buffers hold to be dropped at all.
    pad = "x" * (args.slow_body if fault == "slow-reader" else 0)
    bodies = [f"{i:07d}{pad}" for i in range(args.messages)]
    sent = await sender.run(bodies, inject)
    if fault == "slow-reader":  # imd dropped it; it reads what was written, then logs in
        await recipient.read_until_closed()
    await recipient.drain()
    delivered = recipient.bodies
    result = {
        "protocol": proto, "fault": fault, "sent": sent,
        "acked": len(sender.acked) if sender.acks else None,
        "delivered": len(set(delivered)),
        "lost": len(sender.acked - set(delivered)) if sender.acks else None,
        "duplicated": len(delivered) - len(set(delivered)),
        "recover_s": round(recovered, 2),
    }
    recipient.drop()
    daemon.stop()
    if redis:
        redis.stop()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


async def main(reactor_, args) -> None:
    print(f"{'protocol':9} {'fault':14} {'sent':>6} {'acked':>6} {'delivered':>9} "
          f"{'lost':>5} {'dup':>4} {'recover s':>9}")
    for proto in args.protocols.split(","):
        for fault in args.faults.split(","):
            r = await scenario(args, proto, fault)
            print(f"{r['protocol']:9} {r['fault']:14} {r['sent']:>6} "
                  f"{'-' if r['acked'] is None else r['acked']:>6} {r['delivered']:>9} "
                  f"{'-' if r['lost'] is None else r['lost']:>5} {r['duplicated']:>4} "
                  f"{r['recover_s']:>9}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2000, help="messages per scenario")
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--max-pending", type=int, default=200,
                   help="imd's --max-pending for the slow-reader fault (if imd has it)")
    p.add_argument("--slow-body", type=int, default=2000,
                   help="bytes of padding per message in the slow-reader fault")
    p.add_argument("--keep", action="store_true", help="keep the scratch directories")
    args = p.parse_args(argv)
    for name in args.protocols.split(","):
        if name not in PROTOCOLS:
            p.error(f"unknown protocol {name}")
    for name in args.faults.split(","):
        if name not in FAULTS:
            p.error(f"unknown fault {name}")
    return args


if __name__ == "__main__":
    task.react(main, [parse_args()])
