"""What an operator reads: imd's version (start-up log line, ``imdctl --version``, ``twistd
imd --version``), the JSON log (``twistd --logger=imd.logs.json_observer``) and the optional
access log of the web port (``--access-log``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest_twisted

from imd import __version__
from tests.conftest import CLEAN_EXIT, REPO
from tests.test_daemon import TWISTD, run
from tests.wire import get


def test_version_everywhere(fresh_daemon):
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)
    ctl = subprocess.run([sys.executable, "-m", "imd.ctl", "--version"], capture_output=True,
                         text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert ctl.returncode == 0 and ctl.stdout.strip() == f"imdctl (imd) {__version__}"
    plugin = run([*TWISTD, "imd", "--version"])
    assert plugin.returncode == 0 and plugin.stdout.strip() == f"imd {__version__}"
    d = fresh_daemon().start()
    assert f"imd {__version__} starting (Python {sys.version.split()[0]}, Twisted " in d.log()


def test_json_log(tmp_path):
    """The whole log, from twistd's first line to its last, is one JSON object per line."""
    log_path = tmp_path / "imd.json.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "--logger=imd.logs.json_observer", "imd",
             "--data-dir", str(tmp_path / "data"), "--web", "tcp:0:interface=127.0.0.1",
             "--boss-line", "none", "--xuanxuan", "none", "--admin", "none"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(REPO)))

    def records() -> list[dict]:
        lines = log_path.read_text().splitlines()
        return [json.loads(line) for line in lines]  # every line parses

    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            for r in records():
                if r.get("endpoint") == "tcp:0:interface=127.0.0.1" and "address" in r:
                    port = int(r["address"].rsplit(":", 1)[1])
            time.sleep(0.05)
        assert port, log_path.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as reply:
            assert reply.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) in CLEAN_EXIT
    logged = records()
    start = [r for r in logged if r["text"].startswith(f"imd {__version__} starting")]
    assert len(start) == 1
    assert start[0]["level"] == "info" and start[0]["version"] == __version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", start[0]["time"])
    assert any(r["text"] == "imd stopped" for r in logged)
    assert logged[-1]["text"] == "Server Shut Down."
    assert not any("traceback" in r or "Traceback" in r["text"] for r in logged)


def test_twisted_json_file_observer_is_not_a_logger_factory(tmp_path):
    """Why imd has its own: twistd calls the --logger value with no arguments."""
    result = run([*TWISTD, "-n", "--pidfile=", "--logger=twisted.logger.jsonFileLogObserver",
                  "imd", "--admin", "none", "--data-dir", str(tmp_path / "data"), "--web", "tcp:0",
                  "--boss-line", "none", "--xuanxuan", "none"])
    assert result.returncode != 0
    assert "missing 1 required positional argument: 'outFile'" in result.stderr


@pytest_twisted.ensureDeferred
async def test_access_log(fresh_daemon, tmp_path):
    access = tmp_path / "access.log"
    d = fresh_daemon("--access-log", str(access)).start()
    assert (await get(d.web, "/")).status == 200
    assert (await get(d.web, "/no/such/page")).status == 404
    await get(d.web, "/webim/im.php?webim_action=online&username=u&password=s3cret&callback=f")
    await get(d.web, "/webim/history?id=1&ticket=t1ck&auth=1.2.mac&Token=tok&x=1")
    lines = access.read_text().splitlines()
    assert len(lines) == 4, lines
    # Credentials that clients put in URLs are not kept.
    assert "webim_action=online&username=u&password=-&callback=f HTTP/1.1" in lines[2]
    assert "history?id=1&ticket=-&auth=-&Token=-&x=1 HTTP/1.1" in lines[3]
    assert not any(s in access.read_text() for s in ("s3cret", "t1ck", "mac", "tok&"))
    assert re.match(r'^"127\.0\.0\.1" - - \[[^]]+\] "GET / HTTP/1\.1" 200 \d+ "-" ', lines[0])
    assert '"GET /no/such/page HTTP/1.1" 404 ' in lines[1]
    assert "GET /" not in d.log()  # not in the daemon's log

    # Off by default: no file, and nothing per request in the daemon's log.
    quiet = fresh_daemon().start()
    assert (await get(quiet.web, "/")).status == 200
    assert "GET /" not in quiet.log()
    assert not list(quiet.data_dir.glob("*.log"))


def test_access_log_that_cannot_be_written_is_one_clear_line(tmp_path):
    result = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(tmp_path / "data"),
                  "--access-log", str(tmp_path / "no" / "such" / "dir" / "access.log"),
                  "--web", "tcp:0", "--boss-line", "none", "--xuanxuan", "none", "--admin", "none"])
    assert result.returncode == 1
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if "imd: error:" in line]
    assert len(errors) == 1 and "cannot write the access log" in errors[0], result
