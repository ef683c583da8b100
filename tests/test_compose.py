"""The daemon is composed of child services (imd.compose): they start in order, each once
the one before has started, and stop in reverse; a protocol plugs in as one entry of
``imd.service.PROTOCOLS``."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.web import static

import imd.service
from imd.compose import Listener, Ordered, ProtocolService
from imd.config import Config
from imd.service import ImdService, make_service
from tests.wire import get, line_connect


class Step(service.Service):
    """A child whose start and stop are Deferreds the test fires."""

    def __init__(self, name: str, events: list):
        self.setName(name)
        self.events = events
        self.started, self.stopped = defer.Deferred(), defer.Deferred()

    def startService(self):
        super().startService()
        self.events.append(f"start {self.name}")
        return self.started

    def stopService(self):
        super().stopService()
        self.events.append(f"stop {self.name}")
        return self.stopped


def test_children_start_in_order_each_after_the_one_before_and_stop_in_reverse():
    events: list[str] = []
    parent = Ordered()
    a, b, c = (Step(name, events) for name in "abc")
    for child in (a, b, c):
        child.setServiceParent(parent)

    started = parent.startService()
    assert events == ["start a"]  # b waits until a has started
    a.started.callback(None)
    assert events == ["start a", "start b"]
    b.started.callback(None)
    c.started.callback(None)
    assert started.called and events[-1] == "start c"

    events.clear()
    stopped = parent.stopService()
    assert events == ["stop c"]  # b stops once c has stopped
    c.stopped.callback(None)
    assert events == ["stop c", "stop b"]
    b.stopped.callback(None)
    a.stopped.callback(None)
    assert stopped.called and events == ["stop c", "stop b", "stop a"]


def test_a_failed_start_stops_nothing_more_and_the_stop_skips_what_never_started():
    events: list[str] = []
    parent = Ordered()
    a, b, c = (Step(name, events) for name in "abc")
    for child in (a, b, c):
        child.setServiceParent(parent)
    started = parent.startService()
    a.started.callback(None)
    b.started.errback(RuntimeError("no"))
    failures = []
    started.addErrback(failures.append)
    assert failures and events == ["start a", "start b"]  # c never starts
    for child in (a, b):
        child.stopped.callback(None)
    parent.stopService()
    assert events[2:] == ["stop b", "stop a"]


def test_the_daemon_is_admin_store_hub_protocols_listeners_systemd(tmp_path):
    daemon = ImdService(Config(redis="redis://127.0.0.1:1/0", data_dir=str(tmp_path)))
    assert [child.name for child in daemon] == [
        "admin", "store", "hub", "66boss", "minami", "webim", "xuanxuan", "listeners",
        "systemd"]


class Echo(protocol.Protocol):
    user_id = 1  # logged in: the guard's login deadline leaves it alone

    def dataReceived(self, data):
        self.transport.write(data)


class ToyProtocolService(ProtocolService):
    """A fifth protocol: one route on the web port and one listener of its own."""

    name = "toy"
    web_routes = "toy /toy"
    port = None

    def mount(self, root):
        root.putChild(b"toy", static.Data(b"toy here", "text/plain"))

    def listeners(self):
        return [Listener("tcp:0:interface=127.0.0.1", protocol.Factory.forProtocol(Echo),
                         "toy echo", listening=self._listening)]

    def _listening(self, port):
        self.port = port.getHost().port


@pytest_twisted.ensureDeferred
async def test_a_fifth_protocol_is_one_entry_in_the_list(daemon, tmp_path, monkeypatch):
    monkeypatch.setattr(imd.service, "PROTOCOLS", [*imd.service.PROTOCOLS, ToyProtocolService])
    config = Config(web=["tcp:0:interface=127.0.0.1"], boss_line="tcp:0:interface=127.0.0.1",
                    xuanxuan="none", admin="none", redis=daemon.redis_url,
                    data_dir=str(tmp_path))
    node = make_service(config)
    await node.startService()
    try:
        toy = node.getServiceNamed("toy")
        web = node.getServiceNamed("listeners").ports[0].getHost().port
        assert (await get(web, "/toy")).body == b"toy here"
        assert (await get(web, "/")).status == 200  # the other protocols' root is shared
        client = await line_connect(toy.port)
        client.send("hello")
        assert await client.next() == "hello"
        client.close()
    finally:
        await node.stopService()
    assert not node.running and not any(child.running for child in node)


if __name__ == "__main__":
    pytest.main([__file__])


def test_a_child_that_fails_at_once_exits_with_one_line(tmp_path):
    """twistd starts the service before the reactor runs: a busy --admin port fails the
    first child at once, and the daemon still exits 1 with one error line."""
    from tests.test_daemon import TWISTD, run

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        out = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(tmp_path / "d"),
                   "--web", "tcp:0:interface=127.0.0.1", "--boss-line", "none",
                   "--xuanxuan", "none", "--admin", f"tcp:{port}:interface=127.0.0.1"],
                  timeout=30)
    finally:
        busy.close()
    errors = [line for line in out.stdout.splitlines() if "imd: error:" in line]
    assert out.returncode == 1, out.stdout
    assert len(errors) == 1 and f"cannot listen on tcp:{port}" in errors[0], out.stdout
    assert "Traceback" not in out.stdout
