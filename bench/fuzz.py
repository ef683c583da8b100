"""Seeded mutation fuzzing of a running imd daemon, every protocol (run by hand; never from
CI or pytest; the suite's short run is ``tests/test_fuzz.py``).

Sends ``--frames`` mutated inputs per protocol (66boss WebSocket and line, minami, xuanxuan,
webim, the HTTP APIs; the mutations and drivers are ``tests/fuzz.py``), then checks that the
daemon still answers a normal request of every protocol, and prints per protocol the inputs
sent, the error replies and closes seen, the reconnections, the daemon's RSS before and
after, and the tracebacks its log gained during the run.

It creates ``fz*`` users straight in the daemon's Redis, so point it at a throw-away daemon:

    twistd -n imd --data-dir /tmp/imd-fuzz --web tcp:8000 --xuanxuan tcp:8080 \\
        --boss-line tcp:6061 > /tmp/imd-fuzz.log 2>&1 &
    python bench/fuzz.py --web 8000 --line 6061 --xuanxuan 8080 \\
        --data-dir /tmp/imd-fuzz --log /tmp/imd-fuzz.log --pid $! --frames 5000
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_kb(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) if m else None


def log_size(path: str | None) -> int:
    return Path(path).stat().st_size if path and Path(path).exists() else 0


def tracebacks_since(path: str | None, offset: int) -> list[str]:
    """The log records with a traceback written after ``offset``."""
    if not path:
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    records = re.split(r"\n(?=\d{4}-\d\d-\d\dT)", text)
    return [r for r in records if "Traceback" in r]


class RunningDaemon:
    """The subset of tests.conftest.Daemon the drivers use, for a daemon started by hand."""

    def __init__(self, args):
        self.web, self.line, self.xuanxuan = args.web, args.line, args.xuanxuan
        self.redis_url = args.redis or f"unix://{Path(args.data_dir).resolve()}/redis.sock"
        self._store = self._factory = None

    async def store(self):
        from imd.store.connection import connect_pool, parse_redis_url
        from imd.store.redis import RedisStore

        if self._store is None:
            self._factory = connect_pool(parse_redis_url(self.redis_url), poolsize=1)
            self._store = RedisStore(await self._factory.deferred)
        return self._store

    async def user(self, account: str, password: str = "secret", name: str = ""):
        from imd.accounts import Accounts

        accounts = Accounts(await self.store(), 3600)
        user = await accounts.create(account, password, name or account)
        return user.id, await accounts.issue_token(user.id)

    async def close(self):
        if self._factory is not None:
            await self._factory.disconnect()


async def run(args) -> int:
    from tests.fuzz import DRIVERS, check_alive, rng_for

    daemon = RunningDaemon(args)
    protocols = args.protocol or sorted(DRIVERS)
    offset = log_size(args.log)
    rss_before = rss_kb(args.pid)
    print(f"seed {args.seed}, {args.frames} inputs per protocol")
    print(f"{'protocol':<12} {'sent':>7} {'errors':>7} {'reconn':>7} {'seconds':>8}")
    tallies = []
    for name in protocols:
        started = time.monotonic()
        tally = await DRIVERS[name](daemon, rng_for(args.seed, name), args.frames)
        tallies.append(tally)
        print(f"{name:<12} {tally.sent:>7} {tally.errors:>7} {tally.reconnects:>7} "
              f"{time.monotonic() - started:>8.1f}")
        for note in tally.notes[:10]:
            print(f"    {note}")
    alive = True
    try:
        await check_alive(daemon)
    except Exception as e:  # noqa: BLE001 - reported, it is the result
        alive = False
        print(f"daemon failed a normal request afterwards: {e!r}")
    await daemon.close()
    rss_after = rss_kb(args.pid)
    if rss_before is not None:
        print(f"daemon RSS: {rss_before / 1024:.1f} MB before, {rss_after / 1024:.1f} MB after")
    found = tracebacks_since(args.log, offset)
    print(f"tracebacks in the daemon log: {len(found) if args.log else 'not checked (no --log)'}")
    for record in found[:args.show]:
        print("-" * 78)
        print(record.strip())
    return 0 if alive and not found else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--web", type=int, default=8000, help="the daemon's web port")
    p.add_argument("--line", type=int, default=6061, help="its 66boss line port")
    p.add_argument("--xuanxuan", type=int, default=8080, help="its xuanxuan socket port")
    p.add_argument("--data-dir", default="./imd-data",
                   help="its --data-dir (for the embedded Redis' socket)")
    p.add_argument("--redis", default="", help="its --redis URL, if it has one")
    p.add_argument("--log", help="its log file (tracebacks are looked for there)")
    p.add_argument("--pid", type=int, help="its process id (for RSS)")
    p.add_argument("--frames", type=int, default=1000, help="inputs per protocol")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--protocol", action="append",
                   help="only this protocol (repeatable): boss, boss-line, minami, "
                        "xuanxuan, webim, http")
    p.add_argument("--show", type=int, default=5, help="tracebacks printed in full")
    args = p.parse_args(argv)

    from twisted.internet import defer, task

    async def go(reactor):
        raise SystemExit(await run(args))  # task.react exits with this status

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))
    return 1  # not reached

if __name__ == "__main__":
    sys.exit(main())
