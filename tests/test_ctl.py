"""imdctl, the admin command, as an operator runs it: against a running daemon, on its own,
and when something is wrong (Redis unreachable, no data directory, no password source)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest_twisted

from tests.conftest import REPO, unique
from tests.test_daemon import alive
from tests.wire import post_form, ws_connect


def imdctl(*args: str, stdin: str | None = None, timeout: float = 60
           ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", "from imd.ctl import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
                          input=stdin if stdin is not None else "")


@pytest_twisted.ensureDeferred
async def test_imdctl_against_the_running_daemon(fresh_daemon):
    d = fresh_daemon().start()
    at = ("--data-dir", str(d.data_dir))
    account = unique("ctl")
    added = imdctl(*at, "adduser", account, "Ctl User", "--password-stdin", stdin="pw\n")
    assert added.returncode == 0, added.stderr
    uid = int(added.stdout.split()[0])
    again = imdctl(*at, "adduser", account, "--password-stdin", stdin="pw2\n")
    assert again.returncode == 1 and "already exists" in again.stderr
    listed = imdctl(*at, "users").stdout
    assert f"{uid}\t{account}\tCtl User" in listed
    issued = imdctl(*at, "token", account)
    assert issued.returncode == 0
    tuid, token = issued.stdout.split()
    assert int(tuid) == uid
    assert imdctl(*at, "token", "nobody-" + account).returncode == 1
    assert imdctl(*at, "admin", account).stdout.split() == [str(uid), "super"]
    store = await d.store()
    assert (await store.user_fields(uid, "admin"))["admin"] == "super"
    login = await post_form(d.web, "/login", account=account, password="pw")
    assert login.status == 200 and login.json()["id"] == str(uid)
    c = await ws_connect(d.web)
    c.send(f"login_{uid}_{token}")
    assert await c.next() == "ok"
    await d.close_store()


def test_imdctl_without_a_daemon_uses_the_embedded_store(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    assert imdctl("--data-dir", str(data), "adduser", "solo", "--password-stdin",
                  stdin="pw\n").returncode == 0
    assert "solo" in imdctl("--data-dir", str(data), "users").stdout
    pid = int((data / "redis.pid").read_text()) if (data / "redis.pid").exists() else None
    assert pid is None or not alive(pid)  # the server it started is gone again


def test_a_missing_data_directory_is_an_error_not_an_empty_store(tmp_path):
    missing = tmp_path / "typo"
    result = imdctl("--data-dir", str(missing), "users")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("imdctl: error: no data directory")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not missing.exists()


def test_unreachable_redis_fails_within_seconds(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = imdctl("--redis", f"redis://127.0.0.1:{port}", "--wait", "2", "users",
                    timeout=30)
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imdctl: error: Redis at"), result.stderr
    assert "--wait" in lines[0] and "Traceback" not in result.stderr


def test_passwords_never_come_from_the_command_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # No terminal and no --password-stdin: refused, nothing created.
    result = imdctl("--data-dir", str(data), "adduser", "eve", "s3cret")
    assert result.returncode == 1 and "--password-stdin" in result.stderr
    assert "eve" not in imdctl("--data-dir", str(data), "users").stdout
    empty = imdctl("--data-dir", str(data), "adduser", "eve", "--password-stdin", stdin="\n")
    assert empty.returncode == 1 and "empty password" in empty.stderr


def test_help_is_plain_text():
    for args in (["--help"], ["adduser", "--help"]):
        out = imdctl(*args).stdout
        assert "usage: imdctl" in out
        assert "``" not in out and "--password-stdin" in imdctl("adduser", "--help").stdout
