"""imd beside ejabberd: the same one-to-one scenario on each system, back to back (issue 13
point 3).  Run by hand, as root (ejabberd's start script switches to its ``ejabberd`` user),
never from CI or pytest.

For each round, every system gets a full-speed run and then a fixed-rate run, each on a fresh
server: a fresh ejabberd node (``<peers>/ejabberd/start.sh``, users registered with
``register.py``, stopped with ``stop.sh``) or a fresh imd daemon (this checkout, started with
the Python running this script, in a new scratch directory on ports the kernel picks, stopped
with SIGTERM).  The order of the systems rotates from round to round, so that no system always
runs first or right after another one.

- ejabberd: ``<peers>/xmpp_load.py`` (XMPP over WebSocket, run with ``--xmpp-python``, the
  venv the peers README sets up), its result read from ``--json``.
- imd 66boss and imd minami: ``bench/boss_load.py --protocol boss|minami``, its result read
  from the report it prints.

The scenario is the same for all: ``--users`` connections, ``--messages`` one-to-one
messages in total (``messages / users`` per sender) to random recipients, at most
``--window`` of a sender's messages in flight at full speed; then ``--rate`` msg/s for
``--duration`` seconds.  Both load clients check every message (lost, duplicated,
misrouted); a run with any of them, a failed login or a traceback in imd's log is marked
FAILED in the table.  minami only lets friends talk, so there each sender writes to a random
one of its 8 ring friends (see bench/README.md).

The table has one line per run: system, run, delivered msg/s (first send to last receive),
p99 latency (send to receive), and the checks; then, per system, the medians and the ratio to
ejabberd's.  Each load client's full output is kept in ``--out``.

    python bench/peers.py                                   # 3 rounds, the full scenario
    python bench/peers.py --rounds 1 --messages 20000       # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("ejabberd", "boss", "minami")
TITLE = {"ejabberd": "ejabberd", "boss": "imd 66boss", "minami": "imd minami"}
EJABBERD_URL = "ws://127.0.0.1:15290/xmpp-websocket"  # fixed in the peers' ejabberd-bench.yml
EJABBERD_PIDFILE = Path("/tmp/ejabberd-bench/beam.pid")  # written by the peers' start.sh
LISTEN_RE = re.compile(r"\] web\b.* on \S+ \(([\d.]+):(\d+)\)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default=os.environ.get("IMD_PEERS", str(REPO / ".." / "shared"
                                                                        / "peers")),
                   help="the peers directory (xmpp_load.py, ejabberd/); default $IMD_PEERS "
                        "or ../shared/peers next to the checkout's root")
    p.add_argument("--xmpp-python", default=os.environ.get("XMPP_PYTHON",
                                                           "/tmp/xmpp-venv/bin/python"),
                   help="Python with `websockets` for xmpp_load.py (default $XMPP_PYTHON or "
                        "the venv of the peers README)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated, of " + ", ".join(SYSTEMS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--messages", type=int, default=100_000,
                   help="full speed: messages in total (rounded down to a multiple of users)")
    p.add_argument("--window", type=int, default=10, help="full speed: in flight per sender")
    p.add_argument("--rate", type=float, default=2000, help="fixed rate, msg/s; 0 = none")
    p.add_argument("--duration", type=float, default=20, help="fixed rate: seconds")
    p.add_argument("--tick", type=float, default=0.001,
                   help="fixed rate: boss_load.py's --tick, seconds between send batches; "
                        "the default sends as xmpp_load.py does (what is due every ~1 ms "
                        "timer wake-up) rather than boss_load.py's 10 ms batches")
    p.add_argument("--runs", default="full,fixed",
                   help="which runs: full (full speed), fixed (the fixed rate), or both")
    p.add_argument("--ejabberd-config", choices=("default", "nobusywait"), default="default",
                   help="the peers' ejabberdctl config: default, or Erlang schedulers that do "
                        "not busy-wait")
    p.add_argument("--out", help="directory for each run's output (default: a new one in "
                                 "the temporary directory)")
    p.add_argument("--json", help="append each run's figures as one JSON line to this file")
    p.add_argument("--keep", action="store_true", help="keep imd's scratch directories")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    bad = set(args.systems) - set(SYSTEMS)
    if bad or not args.systems:
        p.error(f"unknown system(s) {sorted(bad)}; choose from {', '.join(SYSTEMS)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.users < 2 or args.messages < args.users:
        p.error("need at least 2 users and one message per user")
    args.runs = [r for r in args.runs.split(",") if r]
    if not args.runs or set(args.runs) - {"full", "fixed"}:
        p.error("--runs: full, fixed or full,fixed")
    args.peers = Path(args.peers).resolve()
    if "ejabberd" in args.systems:
        for need in (args.peers / "xmpp_load.py", args.peers / "ejabberd" / "start.sh",
                     Path(args.xmpp_python)):
            if not need.exists():
                p.error(f"{need} is missing (see the peers README / bench/README.md)")
    return args


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_logged(cmd: list, log: Path, **kw) -> int:
    """Run ``cmd`` to completion with its output in ``log``; its exit status."""
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(map(str, cmd)) + "\n").encode())
        f.flush()
        return subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                              **kw).returncode


class Ejabberd:
    """A fresh ejabberd node per run, with the peers directory's scripts."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        here = args.peers / "ejabberd"
        self.start_sh, self.stop_sh = here / "start.sh", here / "stop.sh"
        self.register = here / "register.py"
        self.ctlcfg = here / ("ejabberdctl-bench.cfg" if args.ejabberd_config == "default"
                              else "ejabberdctl-bench-nobusywait.cfg")

    def run(self, label: str, load_args: list, log: Path) -> dict:
        a = self.args
        if EJABBERD_PIDFILE.exists():  # a node left by an interrupted run
            run_logged(["sh", self.stop_sh], log)
        if run_logged(["sh", self.start_sh, self.ctlcfg], log) != 0:
            return {"error": "ejabberd did not start"}
        try:
            pid = int(EJABBERD_PIDFILE.read_text().split()[0])
            if run_logged([sys.executable, self.register, a.users], log) != 0:
                return {"error": "registration failed"}
            time.sleep(2)  # as the peers' run_all.sh does
            results = log.with_suffix(".jsonl")
            code = run_logged([a.xmpp_python, a.peers / "xmpp_load.py", "--url", EJABBERD_URL,
                               "--server-pid", pid, "--users", a.users, "--idle", 1,
                               "--label", label, "--json", results, *load_args], log)
        finally:
            run_logged(["sh", self.stop_sh], log)
        if not results.exists():
            return {"error": f"xmpp_load.py exited with {code}, no result"}
        r = json.loads(results.read_text().splitlines()[-1])
        lat = r.get("latency_ms") or {}
        return {"code": code, "delivered_per_s": r.get("delivered_per_s"),
                "p50": lat.get("p50"), "p99": lat.get("p99"),
                "sent": r.get("sent"), "delivered": r.get("received"),
                "lost": r.get("lost"), "duplicated": r.get("duplicated"),
                "misrouted": r.get("misrouted"), "login_failures": r.get("login_failures"),
                "server_us_per_msg": r.get("server_us_per_msg"),
                "client_us_per_msg": (1e6 * r["client_msg_cpu_s"] / r["received"]
                                      if r.get("client_msg_cpu_s") and r.get("received")
                                      else None)}

    def full(self, label, log):
        a = self.args
        return self.run(label, ["--messages", a.messages // a.users, "--window", a.window], log)

    def fixed(self, label, log):
        a = self.args
        return self.run(label, ["--rate", a.rate, "--duration", a.duration], log)


class Imd:
    """A fresh imd daemon (this checkout) per run, driven by bench/boss_load.py."""

    def __init__(self, args: argparse.Namespace, protocol: str):
        self.args, self.protocol = args, protocol
        # the daemon and boss_load.py (which makes the bench users with imd's store) run
        # this checkout's imd, installed or not
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))

    def start(self, scratch: Path, timeout: float = 60.0):
        log = scratch / "daemon.log"
        cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
               "-n", "--pidfile=", "imd", "--data-dir", str(scratch / "imd-data"),
               "--web", "tcp:0:interface=127.0.0.1:backlog=1024", "--boss-line", "none",
               "--xuanxuan", "none", "--admin", "none", "--max-connections-per-address", "0"]
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=scratch,
                                    env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = LISTEN_RE.search(log.read_text(errors="replace"))
            if m:
                return proc, int(m.group(2))
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        raise RuntimeError(f"imd did not start; see {log}")

    def run(self, label: str, load_args: list, log: Path) -> dict:
        a = self.args
        scratch = Path(tempfile.mkdtemp(prefix=f"imd-peers-{self.protocol}-"))
        try:
            proc, port = self.start(scratch)
        except RuntimeError as e:
            return {"error": str(e)}
        try:
            code = run_logged([sys.executable, REPO / "bench" / "boss_load.py",
                               "--protocol", self.protocol, "--url", f"ws://127.0.0.1:{port}",
                               "--redis", f"unix://{scratch / 'imd-data' / 'redis.sock'}",
                               "--connections", a.users, "--daemon-pid", proc.pid,
                               *load_args], log, env=self.env)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        daemon_log = (scratch / "daemon.log").read_text(errors="replace")
        with open(log, "a") as f:
            f.write(f"--- daemon log ({scratch}) ---\n{daemon_log}")
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        r = parse_boss_load(log.read_text(errors="replace"))
        r["code"] = code
        r["tracebacks"] = daemon_log.count("Traceback")
        return r

    def full(self, label, log):
        a = self.args
        return self.run(label, ["--messages", a.messages // a.users * a.users,
                                "--window", a.window], log)

    def fixed(self, label, log):
        a = self.args
        return self.run(label, ["--messages", int(round(a.rate * a.duration)),
                                "--rate", a.rate, "--tick", a.tick], log)


def parse_boss_load(text: str) -> dict:
    """The figures of boss_load.py's report."""
    r: dict = {}
    m = re.search(r"^throughput\s+([\d,]+) msg/s delivered", text, re.M)
    if m:
        r["delivered_per_s"] = float(m.group(1).replace(",", ""))
    m = re.search(r"^latency ms\s+p50 ([\d.]+)\s+p95 ([\d.]+)\s+p99 ([\d.]+)", text, re.M)
    if m:
        r["p50"], r["p99"] = float(m.group(1)), float(m.group(3))
    m = re.search(r"^messages\s+(\d+) sent, (\d+) delivered, (\d+) missing, (\d+) duplicate, "
                  r"(\d+) misrouted", text, re.M)
    if m:
        r.update(zip(("sent", "delivered", "lost", "duplicated", "misrouted"),
                     map(int, m.groups())))
    m = re.search(r"^acks\s+(\d+) ok .*?, (\d+) missing, (\d+) duplicate", text, re.M)
    if m:
        r["acks_ok"], r["acks_missing"], r["acks_dup"] = map(int, m.groups())
    r["login_failures"] = sum(int(x) for x in re.findall(r"^logins.*? (\d+) failed", text,
                                                         re.M))
    # The server's CPU is the daemon's and its Redis server's: ejabberd keeps its state
    # inside its own process.
    m = re.search(r"^CPU \(send\)\s+daemon ([\d.]+) s \(\d+%\), redis-server ([\d.]+) s "
                  r"\(\d+%\), load clients ([\d.]+) s", text, re.M)
    if m and r.get("delivered"):
        daemon, redis, client = map(float, m.groups())
        r["server_us_per_msg"] = 1e6 * (daemon + redis) / r["delivered"]
        r["client_us_per_msg"] = 1e6 * client / r["delivered"]
    r["ok_line"] = bool(re.search(r"^result\s+OK", text, re.M))
    return r


def checks(r: dict) -> tuple[bool, str]:
    """Whether a run counts, and its lost/duplicated/misrouted summary."""
    if "error" in r:
        return False, r["error"]
    text = (f"{r.get('lost', '?')}/{r.get('duplicated', '?')}/{r.get('misrouted', '?')}")
    bad = (r.get("code") != 0 or r.get("delivered_per_s") is None or r.get("lost")
           or r.get("duplicated") or r.get("misrouted") or r.get("login_failures")
           or r.get("tracebacks"))
    if r.get("tracebacks"):
        text += f", {r['tracebacks']} traceback(s)"
    if r.get("login_failures"):
        text += f", {r['login_failures']} failed login(s)"
    return not bad, text


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every server
    out = Path(args.out or tempfile.mkdtemp(prefix="imd-peers-"))
    out.mkdir(parents=True, exist_ok=True)
    runners = {"ejabberd": Ejabberd(args), "boss": Imd(args, "boss"),
               "minami": Imd(args, "minami")}
    kinds = [(kind, title) for kind, title in (("full", "full speed"),
                                               ("fixed", f"{args.rate:g} msg/s"))
             if kind in args.runs and (kind == "full" or args.rate)]
    per_user = args.messages // args.users
    say(f"{len(args.systems)} systems x {args.rounds} rounds; {args.users} users, "
        f"{per_user * args.users} messages at full speed (window {args.window})"
        + (f", then {args.rate:g} msg/s for {args.duration:g} s" if args.rate else "")
        + f"; output in {out}")
    rows = []
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(args.systems)
        order = args.systems[k:] + args.systems[:k]
        for kind, kind_title in kinds:
            for system in order:
                label = f"{system} {kind} #{rnd}"
                log = out / f"{rnd:02d}-{kind}-{system}.log"
                say(f"{label} ... ({log.name})")
                t = time.monotonic()
                r = getattr(runners[system], kind)(label, log)
                ok, summary = checks(r)
                row = {"system": system, "kind": kind, "round": rnd, "ok": ok,
                       "checks": summary, "seconds": round(time.monotonic() - t, 1),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                       "load": os.getloadavg()[0], **r}
                rows.append(row)
                say(f"{label}: {fmt(r.get('delivered_per_s'), ',.0f')} msg/s, p99 "
                    f"{fmt(r.get('p99'), '.1f')} ms, lost/dup/misrouted {summary}"
                    + ("" if ok else "  FAILED"))
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(table(args, rows, kinds))
    return 0 if all(r["ok"] for r in rows) else 1


def table(args, rows: list, kinds: list) -> str:
    lines = ["| system | run | delivered msg/s | p99 ms | server / load client CPU per "
             "message, µs | lost/dup/misrouted | load (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        run = dict(kinds)[r["kind"]] + f" #{r['round']}"
        cpu = f"{fmt(r.get('server_us_per_msg'), '.0f')} / {fmt(r.get('client_us_per_msg'), '.0f')}"
        lines.append(f"| {TITLE[r['system']]} | {run} | {fmt(r.get('delivered_per_s'), ',.0f')}"
                     f" | {fmt(r.get('p99'), '.1f')} | {cpu} | {r['checks']}"
                     f"{'' if r['ok'] else ' FAILED'} | {r['load']:.1f} |")
    lines += ["", "| system | median full speed msg/s | vs ejabberd | median p99 at the rate, ms "
              "| median server CPU per message at full speed, µs |", "|---|---|---|---|---|"]
    med: dict = {}
    for system in args.systems:
        mine = [r for r in rows if r["system"] == system and r["ok"]]
        full = [r["delivered_per_s"] for r in mine if r["kind"] == "full"]
        p99 = [r["p99"] for r in mine if r["kind"] == "fixed" and r.get("p99") is not None]
        cpu = [r["server_us_per_msg"] for r in mine
               if r["kind"] == "full" and r.get("server_us_per_msg") is not None]
        med[system] = (statistics.median(full) if full else None,
                       statistics.median(p99) if p99 else None,
                       statistics.median(cpu) if cpu else None)
    base = med.get("ejabberd", (None,))[0]
    for system in args.systems:
        full, p99, cpu = med[system]
        ratio = f"{full / base:.2f}x" if full and base else "–"
        lines.append(f"| {TITLE[system]} | {fmt(full, ',.0f')} | {ratio} | {fmt(p99, '.1f')} "
                     f"| {fmt(cpu, '.0f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
