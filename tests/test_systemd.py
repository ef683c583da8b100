"""Running under systemd: readiness and stopping over ``NOTIFY_SOCKET`` (a fake notify
socket bound by the test, in the abstract namespace and as a path), the watchdog, and the
shipped unit files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import CLEAN_EXIT, LISTEN_RE, REPO


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
            except (socket.timeout, BlockingIOError):
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
    assert up == {"web": True, "66boss line protocol": True, "xuanxuan socket": True}, d.log()
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
                             timeout=60)
    except FileNotFoundError:
        pytest.skip("systemd-analyze is not installed")
    if "--offline" in out.stderr and out.returncode:
        pytest.skip(f"this systemd-analyze has no --offline: {out.stderr.strip()}")
    score = float(out.stdout.split("Overall exposure level for imd.service:")[1].split()[0])
    assert score <= 3.0, out.stdout


def test_socket_unit_and_service_agree():
    service = (REPO / "etc" / "imd.service").read_text()
    sockets = (REPO / "etc" / "imd.socket").read_text()
    assert "Type=notify" in service
    for name in ("http", "https"):
        assert f"FileDescriptorName={name}" in sockets
    assert "ListenStream=80" in sockets and "ListenStream=443" in sockets
