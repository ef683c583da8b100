"""Fixtures: a real imd daemon (``twistd -n imd`` in a child process, embedded Redis) and a
connection to its store for creating test users."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from imd.accounts import Accounts
from imd.store.connection import connect_pool, parse_redis_url
from imd.store.embedded import EmbeddedRedis
from imd.store.redis import RedisStore

REPO = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(
    r"\] (web|66boss line protocol|xuanxuan socket|admin)\b.* on \S+ \(([\d.]+):(\d+)\)")


# twistd ends by re-raising the signal that stopped it (so systemd sees a normal stop).
CLEAN_EXIT = (0, -signal.SIGTERM, -signal.SIGINT)


class Daemon:
    """One imd process.  ``start`` waits until every listener is up and reads its ports."""

    def __init__(self, data_dir: Path, *args: str):
        self.data_dir = data_dir
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.web = self.line = self.xuanxuan = self.admin = 0
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._store_factory = None
        self._store: RedisStore | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "imd",
                "--data-dir", str(self.data_dir), "--web", "tcp:0:interface=127.0.0.1",
                "--boss-line", "tcp:0:interface=127.0.0.1",
                "--xuanxuan", "tcp:0:interface=127.0.0.1",
                "--admin", "tcp:0:interface=127.0.0.1", *self.args]

    def start(self, timeout: float = 30.0) -> "Daemon":
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=str(REPO), env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            ports = {m.group(1): int(m.group(3)) for m in LISTEN_RE.finditer(text)}
            if {"web", "66boss line protocol", "xuanxuan socket"} <= set(ports):
                self.web, self.line = ports["web"], ports["66boss line protocol"]
                self.xuanxuan = ports["xuanxuan socket"]
                self.admin = ports.get("admin", 0)  # listens first: logged by now if on
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"imd exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"imd did not start:\n{self.log()}")

    def log(self) -> str:
        """What this daemon logged since its last start."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def full_log(self) -> str:
        """Everything every start of this daemon logged."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_bytes().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop the daemon and return its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def kill_leftover_redis(self) -> None:
        """After a SIGKILLed daemon: its embedded redis-server would outlive the test."""
        try:
            os.kill(int((self.data_dir / "redis.pid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass

    @property
    def redis_url(self) -> str:
        if "--redis" in self.args:
            return self.args[self.args.index("--redis") + 1]
        return f"unix://{self.data_dir.resolve()}/redis.sock"

    async def store(self) -> RedisStore:
        """A store connected to this daemon's Redis (for setting up test data)."""
        if self._store is None:
            self._store_factory = connect_pool(parse_redis_url(self.redis_url), poolsize=1)
            self._store = RedisStore(await self._store_factory.deferred)
        return self._store

    async def close_store(self) -> None:
        if self._store_factory is not None:
            await self._store_factory.disconnect()
            self._store_factory = self._store = None

    async def user(self, account: str, password: str = "secret", name: str = "") -> tuple:
        """Create a user; returns (id, token)."""
        accounts = Accounts(await self.store(), 3600)
        user = await accounts.create(account, password, name or account)
        return user.id, await accounts.issue_token(user.id)


_counter = iter(range(1_000_000))


def unique(prefix: str = "u") -> str:
    return f"{prefix}{os.getpid()}x{next(_counter)}"


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    """One daemon shared by the tests that don't restart or reconfigure it."""
    d = Daemon(tmp_path_factory.mktemp("shared") / "data", "--heartbeat", "1",
               "--heartbeat-timeout", "1", "--max-frame", "4096", "--max-upload", "300000",
               "--max-body", "100000", "--poll-timeout", "2", "--ticket-timeout", "2",
               "--offline-grace", "1",
               # Every test registers its users from 127.0.0.1; tests/test_guard.py tests
               # the registration throttle on a daemon of its own.
               "--registrations", "0")
    d.start()
    yield d
    run_blocking(d.close_store())
    assert d.stop() in CLEAN_EXIT, d.log()
    assert "Traceback" not in d.log(), d.log()  # no error went only to the log


@pytest.fixture
def fresh_daemon(tmp_path):
    """A factory of daemons private to one test (stopped at its end)."""
    started: list[Daemon] = []

    def make(*args: str, data_dir: Path | None = None) -> Daemon:
        d = Daemon(data_dir or (tmp_path / f"data{len(started)}"), *args)
        started.append(d)
        return d

    yield make
    for d in started:
        try:
            run_blocking(d.close_store())
            d.stop()  # SIGTERM: the daemon takes its redis-server down with it
        finally:
            d.kill()
            d.kill_leftover_redis()
    for d in started:  # every run of every daemon, restarted ones too
        assert "Traceback" not in d.full_log(), d.full_log()


@pytest.fixture(autouse=True)
def _no_traceback_in_the_shared_daemon(request):
    """Each test that used the shared daemon left no traceback in its log (checked after
    the test, so the failure names the test; the session end checks once more)."""
    if "daemon" not in request.fixturenames:
        yield
        return
    d = request.getfixturevalue("daemon")
    start = len(d.log())
    yield
    new = d.log()[start:]
    assert "Traceback" not in new, new[max(0, new.index("Traceback") - 1500):][:5000]


@pytest_twisted.async_yield_fixture
async def store(tmp_path):
    """A store in-process on an embedded server of its own (small history and queue caps,
    so the store tests can reach them)."""
    embedded = EmbeddedRedis(str(tmp_path / "data"))
    await embedded.start()
    factory = connect_pool(parse_redis_url(embedded.url), poolsize=1)
    redis = await factory.deferred
    yield RedisStore(redis, history_limit=5, queue_limit=3)
    await factory.disconnect()
    await embedded.stop()


@pytest.fixture
def browser():
    """A headless Debian Chromium (skipped where it is not installed; .ci/run installs it)."""
    from tests.browser import CHROMIUM, Browser

    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    b = Browser()
    yield b
    b.close()


def run_blocking(d) -> None:
    """Run a coroutine to completion from synchronous fixture code."""
    import pytest_twisted

    pytest_twisted.blockon(defer.ensureDeferred(d))
