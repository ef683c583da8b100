"""Acknowledged means stored: imd is SIGKILLed (alone, or with its redis-server) in the middle
of a stream of messages, started again on the data it left, and every message that had been
acknowledged reaches its recipient exactly once; nothing unacknowledged arrives twice."""

from __future__ import annotations

import hashlib
import json
import os
import signal

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.conftest import unique
from tests.wire import CLOSED, line_connect, ws_connect

MESSAGES = 400
KILL_AFTER = 150  # acknowledgements


async def xuanxuan_login(d, account: str):
    client = await line_connect(d.xuanxuan)
    client.send(json.dumps({"module": "chat", "method": "login",
                            "params": [account, hashlib.md5(b"pw").hexdigest(), "online"]}))
    reply = json.loads(await client.next())
    assert reply["result"] == "success", reply
    await client.next()  # the login array
    return client


async def stream_until_killed(d, sender, cgid: str, kill) -> set[str]:
    """Send MESSAGES messages with up to 20 in flight; kill the daemon after KILL_AFTER
    acknowledgements; return the bodies that were acknowledged."""
    acked: set[str] = set()
    sent = 0
    in_flight: dict[str, str] = {}  # client gid -> body

    def send_one():
        nonlocal sent
        body = f"m{sent:05d}"
        gid = unique("g")
        in_flight[gid] = body
        sender.send(json.dumps({"module": "chat", "method": "message", "params": {
            "messages": [{"gid": gid, "cgid": cgid, "type": "normal",
                          "contentType": "text", "content": body}]}}))
        sent += 1

    for _ in range(20):
        send_one()
    killed = False
    while in_flight:
        try:
            line = await sender.next(timeout=5)
        except defer.TimeoutError:
            break
        if line is CLOSED:
            break
        reply = json.loads(line)
        if not isinstance(reply, dict) or reply.get("method") != "message":
            continue
        if reply["result"] == "success":
            for m in reply["data"]:
                acked.add(in_flight.pop(m["gid"]))
        if len(acked) >= KILL_AFTER and not killed:
            kill()
            killed = True
        elif not killed and sent < MESSAGES:
            send_one()
    assert killed and len(acked) >= KILL_AFTER
    return acked


@pytest.mark.parametrize("with_redis", [False, True], ids=["imd", "imd-and-redis"])
@pytest_twisted.ensureDeferred
async def test_sigkill_under_load_loses_no_acknowledged_message(fresh_daemon, with_redis):
    d = fresh_daemon().start()
    sender_account = unique("xk")
    sender_id, _ = await d.user(sender_account, password="pw")
    recipient_id, recipient_token = await d.user(unique("bk"))  # offline: messages queue
    await d.close_store()
    sender = await xuanxuan_login(d, sender_account)
    cgid = "&".join(map(str, sorted((sender_id, recipient_id))))

    def kill():
        redis_pid = int((d.data_dir / "redis.pid").read_text())
        d.proc.send_signal(signal.SIGKILL)
        if with_redis:
            os.kill(redis_pid, signal.SIGKILL)

    acked = await stream_until_killed(d, sender, cgid, kill)
    d.proc.wait()
    d.start()  # on the data the killed daemon (and its redis-server) left behind
    recipient = await ws_connect(d.web)
    recipient.send(f"login_{recipient_id}_{recipient_token}")
    assert await recipient.next() == "ok"
    delivered: list[str] = []
    while True:
        try:
            signal_text = await recipient.next(timeout=2)
        except defer.TimeoutError:
            break
        assert signal_text is not CLOSED
        delivered.append(signal_text.split("_")[2])
    assert not acked - set(delivered), f"lost: {sorted(acked - set(delivered))[:10]}"
    assert len(delivered) == len(set(delivered)), "duplicated"
    assert delivered == sorted(delivered), "out of order"
    await d.close_store()
