"""The daemon as an operator sees it: start-up, options, config file, errors, clean stop,
persistence across a restart, and the imdctl admin command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted

from tests.conftest import CLEAN_EXIT, REPO, unique
from tests.test_boss import logged_in
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
                   "--token-ttl", "--history-limit", "--public-url"]:
        assert option in out, option


@pytest.mark.parametrize("args,expected", [
    (["--redis", "http://example.invalid"], "unsupported Redis URL scheme"),
    (["--redis", "redis://127.0.0.1:1"], "cannot connect to Redis"),
    (["--boss-auth", "maybe"], "--boss-auth must be"),
    (["--max-frame", "-1"], "--max-frame must be positive"),
    (["--heartbeat", "soon"], "not a valid value"),
    (["--web", "tcp:notaport"], "cannot listen on tcp:notaport"),
])
def test_start_up_errors_are_one_clear_line(tmp_path, args, expected):
    result = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(tmp_path / "d"),
                  "--boss-line", "none", "--xuanxuan", "none", *args])
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert expected in output, output
    assert "Traceback" not in output


def test_second_daemon_on_one_data_dir_is_refused(fresh_daemon):
    first = fresh_daemon().start()
    result = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(first.data_dir),
                  "--web", "tcp:0", "--boss-line", "none", "--xuanxuan", "none"])
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


@pytest_twisted.ensureDeferred
async def test_imdctl_against_the_running_daemon(fresh_daemon):
    d = fresh_daemon().start()
    imdctl = [sys.executable, "-c", "from imd.ctl import main; main()",
              "--data-dir", str(d.data_dir)]
    account = unique("ctl")
    added = run([*imdctl, "adduser", account, "pw", "Ctl User"])
    assert added.returncode == 0, added.stderr
    uid = int(added.stdout.split()[0])
    again = run([*imdctl, "adduser", account, "pw2"])
    assert again.returncode == 1 and "already exists" in again.stderr
    listed = run([*imdctl, "users"]).stdout
    assert f"{uid}\t{account}\tCtl User" in listed
    issued = run([*imdctl, "token", account])
    assert issued.returncode == 0
    tuid, token = issued.stdout.split()
    assert int(tuid) == uid
    assert run([*imdctl, "token", "nobody-" + account]).returncode == 1
    assert run([*imdctl, "admin", account]).stdout.split() == [str(uid), "super"]
    store = await d.store()
    assert (await store.user_fields(uid, "admin"))["admin"] == "super"
    c = await ws_connect(d.web)
    c.send(f"login_{uid}_{token}")
    assert await c.next() == "ok"


def test_imdctl_without_a_daemon_uses_the_embedded_store(tmp_path):
    imdctl = [sys.executable, "-c", "from imd.ctl import main; main()",
              "--data-dir", str(tmp_path / "data")]
    assert run([*imdctl, "adduser", "solo", "pw"]).returncode == 0
    assert "solo" in run([*imdctl, "users"]).stdout
    pid = int((tmp_path / "data" / "redis.pid").read_text()) if (
        tmp_path / "data" / "redis.pid").exists() else None
    assert pid is None or not alive(pid)  # the server it started is gone again


def test_embedded_redis_that_cannot_start_is_one_clear_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "appendonly.aof").write_bytes(b"*3\r\n$3\r\nSET\r\nthis is not a valid AOF")
    result = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(data),
                  "--web", "tcp:0", "--boss-line", "none", "--xuanxuan", "none"])
    assert result.returncode == 1
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "imd: error:" in line]
    assert len(errors) == 1 and "embedded redis-server exited at start" in errors[0], output
    assert "Traceback" not in output
