"""Running under systemd: readiness and stopping over ``NOTIFY_SOCKET`` (a fake notify
socket bound by the test, in the abstract namespace and as a path), the watchdog, and the
shipped unit files."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, task

from imd import sdnotify
from tests.conftest import CLEAN_EXIT, LISTEN_RE, REPO, Daemon, unique
from tests.test_tls import CA
from tests.wire import http, ws_connect


class FakeNotifySocket:
    """The datagram socket systemd would pass in NOTIFY_SOCKET."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def next(self, timeout: float = 30.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def all(self, seconds: float) -> list[str]:
        """Every datagram received within ``seconds``."""
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.next(left))
            except (TimeoutError, BlockingIOError):
                break
        return got

    def close(self) -> None:
        self.sock.close()


def connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def test_ready_only_once_listeners_are_up_and_stopping_at_sigterm(fresh_daemon, monkeypatch):
    notify = FakeNotifySocket(f"@imd-test-{os.getpid()}-ready")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    d = fresh_daemon()
    starting = threading.Thread(target=d.start)
    starting.start()
    try:
        ready = notify.next()
        # Taken the moment READY arrives: every listener must be logged and accepting.
        ports = {m.group(1): int(m.group(3)) for m in LISTEN_RE.finditer(d.log())}
        up = {name: connectable(port) for name, port in ports.items()}
    finally:
        starting.join()
    assert up == {"web": True, "66boss line protocol": True, "xuanxuan socket": True,
                  "admin": True}, d.log()
    assert ready.splitlines()[0] == "READY=1", ready
    assert "STATUS=serving as node " in ready
    assert notify.all(0.5) == []  # READY once, and no watchdog unless asked for

    d.proc.send_signal(signal.SIGTERM)
    assert notify.next() == "STOPPING=1"
    assert d.proc.wait(15) in CLEAN_EXIT  # (a second SIGTERM would stop twistd twice)
    notify.close()


def test_watchdog_pings_only_while_redis_answers(fresh_daemon, monkeypatch, tmp_path):
    notify = FakeNotifySocket(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    d = fresh_daemon().start()
    assert notify.next().startswith("READY=1")
    pings = notify.all(1.2)
    assert 3 <= pings.count("WATCHDOG=1") <= 8, pings

    redis_pid = int((d.data_dir / "redis.pid").read_text())
    os.kill(redis_pid, signal.SIGSTOP)  # Redis hangs: the watchdog must go quiet
    try:
        notify.all(0.5)  # a ping whose check was already answered may still come
        assert notify.all(1.0) == []
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    assert "watchdog: not pinging systemd while the health check fails (no answer)" in d.log()
    pings = notify.all(1.2)
    assert pings.count("WATCHDOG=1") >= 3, pings
    assert "watchdog: health check passes again" in d.log()

    assert d.stop() in CLEAN_EXIT
    assert "STOPPING=1" in notify.all(1.0)
    notify.close()


def test_watchdog_is_not_meant_for_another_process(fresh_daemon, monkeypatch, tmp_path):
    notify = FakeNotifySocket(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    fresh_daemon().start()
    assert notify.next().startswith("READY=1")
    assert notify.all(0.6) == []
    notify.close()


def test_unit_file_scores_at_most_3_in_systemd_analyze_security():
    try:
        out = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                              "etc/imd.service"], capture_output=True, text=True, cwd=REPO,
                             timeout=60, check=False)
    except FileNotFoundError:
        pytest.skip("systemd-analyze is not installed")
    if "--offline" in out.stderr and out.returncode:
        pytest.skip(f"this systemd-analyze has no --offline: {out.stderr.strip()}")
    score = float(out.stdout.split("Overall exposure level for imd.service:")[1].split()[0])
    assert score <= 3.0, out.stdout


def test_socket_units_match_the_endpoints_they_document():
    service = (REPO / "etc" / "imd.service").read_text()
    assert "\nType=notify\n" in service
    for unit, port, name in [("imd.socket", 80, "http"), ("imd-https.socket", 443, "https")]:
        text = (REPO / "etc" / unit).read_text()
        assert f"\nListenStream=0.0.0.0:{port}\n" in text
        assert f"\nFileDescriptorName={name}\nService=imd.service\n" in text
    assert "\n#Requires=imd.socket imd-https.socket\n" in service
    example = (REPO / "etc" / "imd.socket").read_text()
    assert "systemd:domain=INET:name=http," in example
    assert "systemd-tls:domain=INET:name=https:privateKey=" in example


# What systemd does for imd.socket: listening sockets as fds 3, 4, ... named by
# LISTEN_FDNAMES, in a process whose pid is LISTEN_PID (so set just before exec).
ACTIVATE = """
import os, socket, sys
names = sys.argv[1].split(":")
for i in range(len(names)):  # out of the way of fds 3, 4, ... first
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(50)
    os.dup2(s.fileno(), 100 + i)
    s.close()
for i in range(len(names)):
    os.dup2(100 + i, 3 + i)
    os.close(100 + i)
os.environ.update(LISTEN_FDS=str(len(names)), LISTEN_PID=str(os.getpid()),
                  LISTEN_FDNAMES=sys.argv[1])
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


class ActivatedDaemon(Daemon):
    def command(self) -> list[str]:
        plain = super().command()
        return [plain[0], "-c", ACTIVATE, "http:https", *plain[1:]]


@pytest_twisted.ensureDeferred
async def test_socket_activation_with_tls_on_the_adopted_socket(tmp_path):
    ca = CA(tmp_path)
    key, cert = ca.issue("activated", ["localhost"])
    d = ActivatedDaemon(tmp_path / "data", "--web", "systemd:domain=INET:name=http",
                        "--web", f"systemd-tls:domain=INET:name=https:privateKey={key}"
                        f":certKey={cert}")
    d.start()
    try:
        log = d.log()
        assert "on systemd:domain=INET:name=http (127.0.0.1:" in log
        assert "on systemd-tls:domain=INET:name=https" in log
        https_port = d.web  # the last web listener logged
        http_port = int(re.search(r"on systemd:domain=INET:name=http \([\d.]+:(\d+)\)",
                                  log).group(1))
        r = await http("GET", f"https://localhost:{https_port}/",
                       tls_policy=ca.https_policy())
        assert r.status == 200
        r = await http("GET", f"http://127.0.0.1:{http_port}/")
        assert r.status == 200
        uid, token = await d.user(unique())
        client = await ws_connect(https_port, tls=ca.client_options())
        client.send(f"login_{uid}_{token}")
        assert await client.next() == "ok"
        client.close()
    finally:
        await d.close_store()
        assert d.stop() in CLEAN_EXIT
        d.kill_leftover_redis()
    assert "Traceback" not in d.log(), d.log()


def test_sighup_is_ignored_with_a_log_line(fresh_daemon):
    d = fresh_daemon().start()
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "SIGHUP ignored" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "SIGHUP ignored: imd reloads nothing; restart it" in d.log()
    assert d.proc.poll() is None and connectable(d.web)


# -- imd.sdnotify on a Clock --------------------------------------------------------------

def test_notify_needs_a_socket_and_survives_a_missing_one(tmp_path):
    assert sdnotify.notify("READY=1", environ={}) is False
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "relative"}) is False
    assert sdnotify.notify("READY=1",
                           environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    sock = FakeNotifySocket(str(tmp_path / "n.sock"))
    assert sdnotify.notify("READY=1", "STATUS=x", environ={"NOTIFY_SOCKET": sock.address})
    assert sock.next(1) == "READY=1\nSTATUS=x"
    sock.close()


def test_watchdog_period_is_half_of_watchdog_usec():
    assert sdnotify.watchdog_period({}) is None
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "x"}) is None
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "2000000",
                                     "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert sdnotify.watchdog_period({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


def test_watchdog_skips_pings_while_the_check_hangs_or_fails(tmp_path):
    sock = FakeNotifySocket(str(tmp_path / "w.sock"))
    clock = task.Clock()
    answers: list[defer.Deferred] = []

    def healthy() -> defer.Deferred:
        answers.append(defer.Deferred())
        return answers[-1]

    dog = sdnotify.Watchdog(clock, 10.0, healthy, environ={"NOTIFY_SOCKET": sock.address})
    dog.start()
    answers[-1].callback("PONG")
    assert sock.next(1) == "WATCHDOG=1"
    clock.advance(10)  # this check hangs: no ping within the period
    clock.advance(10)
    assert dog.failing and sock.all(0.1) == []
    answers[1].callback("PONG")  # a late answer changes nothing
    clock.advance(10)
    answers[2].errback(RuntimeError("Redis is down"))
    assert sock.all(0.1) == []
    clock.advance(10)
    answers[3].callback("PONG")
    assert sock.next(1) == "WATCHDOG=1" and not dog.failing
    dog.stop()
    sock.close()
