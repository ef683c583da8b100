"""Two imd nodes on one Redis: 66boss delivery across nodes, and a node killed with SIGKILL."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from imd.store.embedded import find_redis_server
from tests.conftest import CLEAN_EXIT, unique
from tests.test_boss import make_group
from tests.wire import ws_connect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(directory) -> tuple[subprocess.Popen, str]:
    """A plain redis-server on a free TCP port, ready to take connections."""
    port = free_port()
    proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}"


@pytest.fixture
def shared_redis(tmp_path):
    proc, url = start_redis(tmp_path)
    yield url
    proc.terminate()
    proc.wait(10)


async def login(node, uid: int, token: str):
    client = await ws_connect(node.web)
    client.send(f"login_{uid}_{token}")
    assert await client.next() == "ok"
    return client


@pytest_twisted.ensureDeferred
async def test_two_nodes_deliver_both_ways_and_survive_a_killed_node(shared_redis,
                                                                     fresh_daemon):
    node1 = fresh_daemon("--redis", shared_redis, "--node-timeout", "2").start()
    node2 = fresh_daemon("--redis", shared_redis, "--node-timeout", "2").start()
    a, ta = await node1.user(unique())
    b, tb = await node1.user(unique())
    c, tc = await node1.user(unique())
    ca = await login(node1, a, ta)
    cb = await login(node2, b, tb)
    cc = await login(node2, c, tc)

    ca.send(f"text_{b}_node1 to node2_unicast_x")
    assert (await cb.next()).startswith(f"text_{a}_node1 to node2_unicast_{a}_")
    cb.send(f"text_{a}_node2 to node1_unicast_x")
    assert (await ca.next()).startswith(f"text_{b}_node2 to node1_unicast_{b}_")
    gid = await make_group(node1, a, ta, [b, c])
    cc.send(f"text_{gid}_group across nodes_group_x")
    assert (await ca.next()).startswith(f"text_{c}_group across nodes_group_{gid}_")
    assert (await cb.next()).startswith(f"text_{c}_group across nodes_group_{gid}_")
    await cc.nothing(0.2)

    store = await node1.store()
    assert await store.is_online(b)
    node2.stop(signal.SIGKILL)
    # Sent right after the kill: the dead node can't take it, so it is queued.
    ca.send(f"text_{b}_while node2 is dead_unicast_x")
    ca.send(f"text_{gid}_group while node2 is dead_group_x")
    deadline = time.monotonic() + 5
    while await store.is_online(b):
        assert time.monotonic() < deadline, "b still counts as online"
        await task.deferLater(reactor, 0.2, lambda: None)
    ca.send(f"text_{b}_after timeout_unicast_x")
    ca.send(f"records_{b}_0")
    assert (await ca.next()).startswith(f"records_{b}_0_")

    cb2 = await login(node1, b, tb)
    assert (await cb2.next()).startswith(f"text_{a}_while node2 is dead_unicast_")
    assert (await cb2.next()).startswith(f"text_{a}_group while node2 is dead_group_{gid}_")
    assert (await cb2.next()).startswith(f"text_{a}_after timeout_unicast_")
    await cb2.nothing()
    cc2 = await login(node1, c, tc)
    assert (await cc2.next()).startswith(f"text_{a}_group while node2 is dead_group_{gid}_")
    await node1.close_store()


def test_a_node_stops_promptly_when_redis_is_gone(fresh_daemon, tmp_path):
    redis, url = start_redis(tmp_path)
    try:
        node = fresh_daemon("--redis", url).start()
    finally:
        redis.terminate()
        redis.wait(10)
    started = time.monotonic()
    assert node.stop() in CLEAN_EXIT
    assert time.monotonic() - started < 10
