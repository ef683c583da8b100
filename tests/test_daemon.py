"""The daemon as an operator sees it: start-up, options, config file, errors, clean stop,
persistence across a restart and on a large data set, a private data directory, and a Redis
outage under a running daemon (imdctl: tests/test_ctl.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from imd.store.embedded import find_redis_server
from tests.conftest import CLEAN_EXIT, REPO, unique
from tests.test_boss import logged_in
from tests.test_cluster import free_port
from tests.wire import ws_connect

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_repeated_stop_signal_is_harmless(fresh_daemon):
    """An operator who presses Ctrl-C twice, or a supervisor that repeats SIGTERM: one clean
    stop, no traceback (the fixture checks the log)."""
    d = fresh_daemon().start()
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(15) in CLEAN_EXIT
    assert "imd stopped" in d.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_stop_takes_redis_down_too(fresh_daemon, sig):
    d = fresh_daemon().start()
    redis_pid = int((d.data_dir / "redis.pid").read_text())
    assert alive(redis_pid)
    started = time.monotonic()
    assert d.stop(sig) in CLEAN_EXIT
    assert time.monotonic() - started < 5
    assert not alive(redis_pid)
    assert not (d.data_dir / "redis.sock").exists()
    assert "imd stopped" in d.log()


def test_help_documents_every_option():
    out = run([*TWISTD, "imd", "--help"]).stdout
    for option in ["--web", "--boss-line", "--redis", "--data-dir", "--boss-auth",
                   "--heartbeat", "--heartbeat-timeout", "--node-timeout", "--max-frame",
                   "--max-body", "--max-upload", "--max-queue", "--max-pending", "--config",
                   "--token-ttl", "--history-limit", "--public-url", "--admin"]:
        assert option in out, option


@pytest.mark.parametrize("args,expected", [
    (["--redis", "http://example.invalid"], "unsupported Redis URL scheme"),
    (["--redis", "redis://127.0.0.1:1", "--redis-wait", "1"], "cannot connect to Redis"),
    (["--boss-auth", "maybe"], "--boss-auth must be"),
    (["--max-frame", "-1"], "--max-frame must be positive"),
    (["--heartbeat", "soon"], "not a valid value"),
    (["--web", "tcp:notaport"], "cannot listen on tcp:notaport"),
])
def test_start_up_errors_are_one_clear_line(tmp_path, args, expected):
    result = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(tmp_path / "d"),
                  "--boss-line", "none", "--xuanxuan", "none", "--admin", "none", *args])
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert expected in output, output
    assert "Traceback" not in output


def test_second_daemon_on_one_data_dir_is_refused(fresh_daemon):
    first = fresh_daemon().start()
    result = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(first.data_dir),
                  "--web", "tcp:0", "--boss-line", "none", "--xuanxuan", "none",
                  "--admin", "none"])
    assert result.returncode != 0
    assert "already using the data directory" in result.stderr + result.stdout
    assert first.proc.poll() is None  # the first one is unharmed


def test_config_file(tmp_path, fresh_daemon):
    conf = tmp_path / "imd.conf"
    conf.write_text("[imd]\nboss-auth = trust\nheartbeat = 0.5\n")
    d = fresh_daemon("--config", str(conf)).start()
    assert "--boss-auth=trust" in d.log()  # the warning an operator must see
    conf.write_text("[imd]\nno-such-option = 1\n")
    result = run([*TWISTD, "-n", "imd", "--config", str(conf)])
    assert result.returncode != 0 and "unknown option(s)" in result.stderr + result.stdout


@pytest_twisted.ensureDeferred
async def test_trust_mode_accepts_bare_login(fresh_daemon):
    d = fresh_daemon("--boss-auth", "trust").start()
    a, _ = await d.user(unique())
    b, _ = await d.user(unique())
    ca, cb = await ws_connect(d.web), await ws_connect(d.web)
    ca.send(f"login_{a}")
    cb.send(f"login_{b}")
    assert await ca.next() == "ok" and await cb.next() == "ok"
    ca.send(f"text_{b}_trusted_unicast_x")
    assert (await cb.next()).startswith(f"text_{a}_trusted_")
    cx = await ws_connect(d.web)
    cx.send("login_999999999")  # still only existing users
    assert (await cx.next()).startswith("error_login_")
    await d.close_store()


@pytest_twisted.ensureDeferred
async def test_offline_messages_survive_a_restart(fresh_daemon, tmp_path):
    d = fresh_daemon().start()
    a, ta, ca = await logged_in(d)
    b, tb = await d.user(unique())
    from tests.test_boss import make_group

    gid = await make_group(d, a, ta, [b])
    ca.send(f"text_{b}_before restart 1_unicast_x")
    ca.send(f"audio_{b}_http://x/a-3.amr_unicast_x")
    ca.send(f"text_{gid}_group before restart_group_x")
    ca.send(f"records_{gid}_0")  # answered after the sends above were stored
    assert (await ca.next()).startswith(f"records_{gid}_0_1")
    await ca.next()
    await d.close_store()
    assert d.stop() in CLEAN_EXIT
    d.start()
    cb = await ws_connect(d.web)
    cb.send(f"login_{b}_{tb}")
    assert await cb.next() == "ok"
    assert (await cb.next()).startswith(f"text_{a}_before restart 1_unicast_{a}_")
    assert (await cb.next()).startswith(f"audio_{a}_http://x/a-3.amr_unicast_{a}_")
    assert (await cb.next()).startswith(f"text_{a}_group before restart_group_{gid}_")
    await cb.nothing()
    await d.close_store()


def test_embedded_redis_that_cannot_start_is_one_clear_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "appendonly.aof").write_bytes(b"*3\r\n$3\r\nSET\r\nthis is not a valid AOF")
    result = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(data),
                  "--web", "tcp:0", "--boss-line", "none", "--xuanxuan", "none",
                  "--admin", "none"])
    assert result.returncode == 1
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "imd: error:" in line]
    assert len(errors) == 1 and "embedded redis-server exited at start" in errors[0], output
    assert "Traceback" not in output


def write_aof(path, keys: int) -> None:
    """An append-only file of ``keys`` 100-byte strings (~140 bytes each), written directly:
    enough data that a redis-server takes a measurable time to load it."""
    value = b"v" * 100
    with open(path, "wb") as f:
        f.write(b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n")
        for start in range(0, keys, 10000):
            f.write(b"".join(b"*3\r\n$3\r\nSET\r\n$14\r\nbulk:%09d\r\n$100\r\n%s\r\n"
                             % (i, value) for i in range(start, min(start + 10000, keys))))


@pytest_twisted.ensureDeferred
async def test_restarts_on_a_large_data_set(fresh_daemon, tmp_path):
    """SIGKILL of imd, SIGKILL of imd and its redis-server, SIGTERM: after each the next
    start waits for Redis to load (it answers LOADING meanwhile) and comes up first time."""
    data = tmp_path / "big"
    data.mkdir()
    write_aof(data / "appendonly.aof", 800_000)
    d = fresh_daemon(data_dir=data).start()
    assert "is loading its data (" in d.log(), d.log()
    a, ta, ca = await logged_in(d)
    b, tb = await d.user(unique())
    ca.send(f"text_{b}_kept across restarts_unicast_x")
    ca.send(f"records_{a}_0")  # answered once the send is stored
    await ca.next()
    await d.close_store()

    assert d.stop(signal.SIGKILL) == -signal.SIGKILL  # its redis-server lives on
    d.start()
    assert "left behind by an earlier imd" in d.log() and "is loading its data" in d.log()

    redis_pid = int((d.data_dir / "redis.pid").read_text())
    os.kill(redis_pid, signal.SIGKILL)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    d.start()
    assert "is loading its data" in d.log()

    assert d.stop() in CLEAN_EXIT
    d.start()
    assert "is loading its data" in d.log()
    assert "imd: error" not in d.log()
    cb = await ws_connect(d.web)
    cb.send(f"login_{b}_{tb}")
    assert await cb.next() == "ok"
    assert (await cb.next()).startswith(f"text_{a}_kept across restarts_unicast_{a}_")
    await cb.nothing()


def test_data_directory_is_private(fresh_daemon, tmp_path):
    data = tmp_path / "old"  # as an older imd left it: world-readable
    data.mkdir(mode=0o755)
    (data / "notes").write_text("x")
    (data / "notes").chmod(0o644)
    d = fresh_daemon(data_dir=data).start()
    assert data.stat().st_mode & 0o777 == 0o700
    # Made private at start, or created private by the server (umask 077).
    for name in ("notes", "redis.pid", "redis.sock", "imd.lock"):
        assert (data / name).stat().st_mode & 0o777 == 0o600, name
    # The append-only files (a directory of them since Redis 7 / Valkey).
    aof = data / "appendonlydir"
    assert aof.stat().st_mode & 0o777 == 0o700
    assert sorted(aof.iterdir())
    for path in aof.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    for name in ("uploads", "files", "login.key"):  # made by the daemon as it starts
        assert (data / name).stat().st_mode & 0o777 in (0o700, 0o600), name
    assert d.stop() in CLEAN_EXIT
    fresh = tmp_path / "new" / "data"
    assert run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(fresh), "--admin", "none",
                "--web", "tcp:notaport"]).returncode == 1
    assert fresh.stat().st_mode & 0o777 == 0o700


class ExternalRedis:
    """A redis-server of our own on 127.0.0.1 (the binary imd embeds) that keeps its port
    and data across a stop and a start (test_cluster's start_redis makes a new one)."""

    def __init__(self, directory):
        self.port = free_port()
        self.dir = directory
        self.dir.mkdir()
        self.binary = find_redis_server()
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, wait: bool = True) -> "ExternalRedis":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(self.dir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait:
            return self
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def external_redis(tmp_path):
    redis = ExternalRedis(tmp_path / "redis").start()
    yield redis
    redis.stop()


@pytest_twisted.ensureDeferred
async def test_redis_outage_refuses_logins_quickly_and_keeps_sends(fresh_daemon,
                                                                   external_redis):
    from tests.test_minami import connect as minami_connect
    from tests.test_xuanxuan import XX, md5
    from tests.wire import line_connect, post_form

    d = fresh_daemon("--redis", external_redis.url, "--redis-timeout", "2").start()
    a, ta, ca = await logged_in(d)
    account = unique("outage")
    b, tb = await d.user(account, password="pw")
    await d.close_store()

    external_redis.stop()
    ca.send(f"text_{b}_sent during the outage_unicast_x")
    started = time.monotonic()
    cb = await ws_connect(d.web)

    async def boss_login():
        cb.send(f"login_{b}_{tb}")
        return await cb.next(timeout=8)

    async def http_login():
        return (await post_form(d.web, "/login", account=account, password="pw")).status

    async def xuanxuan_login():
        x = XX(await line_connect(d.xuanxuan))
        x.send("chat", "login", [account, md5("pw"), "online"])
        return (await x.next(timeout=8))["result"]

    async def minami_login():
        return (await minami_connect(d, account))[1]["code"]

    # Every protocol's login answers with its own error within --redis-timeout, not never.
    boss, status, xuanxuan, minami = await defer.gatherResults([
        defer.ensureDeferred(login()) for login in (boss_login, http_login,
                                                     xuanxuan_login, minami_login)])
    assert boss.startswith("error_login_") and status == 503
    assert xuanxuan == "fail" and minami == 500
    assert time.monotonic() - started < 8

    external_redis.start()
    deadline = time.monotonic() + 15
    while "is back" not in d.log() and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.1, lambda: None)
    cb.send(f"login_{b}_{tb}")
    assert await cb.next() == "ok"
    assert (await cb.next()).startswith(f"text_{a}_sent during the outage_unicast_{a}_")
    ca.send(f"text_{b}_after it_unicast_x")
    assert (await cb.next()).startswith(f"text_{a}_after it_unicast_{a}_")
    log = d.log()
    assert log.count("is down") == 1 and log.count("is back") == 1, log
    await d.close_store()
    assert d.stop() in CLEAN_EXIT  # while its Redis runs


def test_waits_for_an_external_redis_that_is_starting_and_loading(fresh_daemon, tmp_path):
    redis = ExternalRedis(tmp_path / "redis")
    write_aof(redis.dir / "appendonly.aof", 500_000)
    try:
        d = fresh_daemon("--redis", redis.url)
        starting = threading.Thread(target=d.start)
        starting.start()
        # imd finds it refusing connections (and says so after a second), then LOADING: the
        # server starts only now, so its loading cannot be over before imd looks.
        deadline = time.monotonic() + 30
        while not (d.log_path.exists() and "waiting for Redis" in d.log_path.read_text()):
            assert time.monotonic() < deadline, "imd did not wait for the refusing Redis"
            time.sleep(0.05)
        redis.start(wait=False)
        starting.join()
        assert "is loading its data (" in d.log(), d.log()
        assert d.stop() in CLEAN_EXIT
    finally:
        redis.stop()
