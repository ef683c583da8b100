"""Two or three imd nodes on one Redis: 66boss delivery across nodes, and a node killed with
SIGKILL (its messages are queued, its users announced offline once)."""

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
from tests.test_boss import logged_in, make_group
from tests.test_minami import connect as minami_connect
from tests.test_minami import new_user as minami_user
from tests.test_minami import ok
from tests.test_presence import about, none_about
from tests.test_xuanxuan import login as xuanxuan_login
from tests.wire import wait_for_port, ws_connect


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
    wait_for_port(port, proc)
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


@pytest_twisted.ensureDeferred
async def test_a_killed_nodes_users_are_announced_offline_once(shared_redis, fresh_daemon):
    """Two survivors: the dead node's users are announced offline once, by one of them;
    a user still online on a survivor is not announced."""
    timeout = 2.0
    nodes = [fresh_daemon("--redis", shared_redis, "--node-timeout", str(timeout)).start()
             for _ in range(3)]
    node1, node2, node3 = nodes
    _, a = await minami_user(node1)
    # b never logged in before: a logout of an earlier session could still announce itself
    # to the new friend a while the node is killed.
    b_account = unique("mi")
    b_id, _ = await node1.user(b_account, password="pw")
    store = await node1.store()
    await store.befriend(int(a.id), b_id, "B", "A")
    _, x, _, _ = await xuanxuan_login(node3)
    b, first = await minami_connect(node2, b_account)
    assert first["code"] == 200
    uid_b = int(b.id)
    await about(x, "login", uid_b)
    c, token_c, c2 = await logged_in(node2)  # c is on node2 and on node1
    c1 = await login(node1, c, token_c)
    await about(x, "login", c)

    node2.stop(signal.SIGKILL)
    started = time.monotonic()
    assert await a.next(timeout=timeout + 4) == ok(300, id=b.id)
    assert time.monotonic() - started < timeout + 3
    assert (await about(x, "logout", uid_b))["status"] == "offline"
    await a.ws.nothing(timeout)  # not a second time, from the other survivor
    await none_about(x, uid_b, 0.5)
    await none_about(x, c, 0.5)
    assert await store.is_online(c) and not await store.is_online(uid_b)
    c1.close()
    await node1.close_store()
