"""Where an imd daemon's memory goes: the daemon under tracemalloc, with snapshots on demand
(run by hand, for a debug run only: tracemalloc makes the daemon several times slower).

    # start imd as with ``twistd -n --pidfile= imd ...``, its options after ``--``
    python bench/memtrace.py run --out snaps -- --data-dir ./imd-data --web tcp:8000 ...
    kill -USR1 <pid>   # snaps/snap-1.pickle: a snapshot after gc.collect(), logged with
                       # the traced total (Python objects alive, not what malloc keeps)
    ... open N idle connections (bench/boss_load.py --idle N) ...
    kill -USR1 <pid>   # snaps/snap-2.pickle
    python bench/memtrace.py diff snaps/snap-1.pickle snaps/snap-2.pickle --per N

    kill -USR2 <pid>   # gc.collect() and glibc's malloc_trim(0); logs VmRSS before and
                       # after, and the small-object allocator's arenas (sys._debugmallocstats)

SIGUSR2 tells apart what the daemon holds from what malloc kept after a burst (freed memory
that stays in RSS): compare the RSS after a trim, before and after the connections opened.
With ``run --frames 0`` nothing is traced (the daemon runs at full speed) and only SIGUSR2
does something.

``diff`` prints the traced bytes gained between the two snapshots, per ``--per`` (the number
of connections opened in between), grouped by the line that allocated them (``--frames 1``)
or by the innermost frames of imd's own code (``--frames 8 --imd``, with ``run --frames 8``).
RSS per connection (what boss_load.py reports) is this plus what malloc keeps from freed
memory, the interpreter's own arenas and the kernel's socket buffers are not in RSS.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import linecache
import os
import signal
import sys
import tracemalloc
from pathlib import Path


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.frames:
        tracemalloc.start(args.frames)
    count = 0

    def dump() -> None:
        nonlocal count
        gc.collect()
        count += 1
        path = out / f"snap-{count}.pickle"
        tracemalloc.take_snapshot().dump(str(path))
        current, peak = tracemalloc.get_traced_memory()
        print(f"memtrace: {path} traced {current / 1024:.0f} KB (peak {peak / 1024:.0f} KB)",
              file=sys.stderr, flush=True)

    def trim() -> None:
        gc.collect()
        before = rss_kb()
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        print(f"memtrace: malloc_trim: VmRSS {before} kB -> {rss_kb()} kB; pymalloc:",
              file=sys.stderr, flush=True)
        sys._debugmallocstats()  # arenas: freed small objects keep a partly used one alive

    def later(work):
        def handler(*_):
            from twisted.internet import reactor
            reactor.callFromThread(work)  # in the reactor's turn, not inside whatever ran
        return handler

    if args.frames:
        signal.signal(signal.SIGUSR1, later(dump))
    signal.signal(signal.SIGUSR2, later(trim))
    sys.argv = ["twistd", "-n", "--pidfile=", "imd", *args.imd]
    from twisted.scripts.twistd import run as twistd
    twistd()


def diff(args: argparse.Namespace) -> None:
    before = tracemalloc.Snapshot.load(args.before)
    after = tracemalloc.Snapshot.load(args.after)
    frames = min(args.frames, after.traceback_limit)
    key = "lineno" if frames == 1 else "traceback"
    stats = after.compare_to(before, key)
    total = sum(s.size_diff for s in stats)
    count = sum(s.count_diff for s in stats)
    print(f"traced: {total / 1024:,.1f} KB gained, {count:,} blocks"
          + (f"; per {args.per}: {total / args.per:,.0f} bytes, {count / args.per:.1f} blocks"
             if args.per else ""))
    if key == "traceback" and args.imd:  # merge by the innermost frames in imd's own code
        merged: dict = {}
        for s in stats:
            ours = [f for f in s.traceback if f"{os.sep}imd{os.sep}" in f.filename][-2:][::-1]
            where = tuple(ours) or tuple(s.traceback)[-1:]
            size, n = merged.get(where, (0, 0))
            merged[where] = (size + s.size_diff, n + s.count_diff)
        rows = sorted(((size, n, where) for where, (size, n) in merged.items()),
                      key=lambda r: -abs(r[0]))
    else:
        rows = [(s.size_diff, s.count_diff, tuple(s.traceback)[-frames:][::-1])
                for s in stats]
    per = args.per or 1
    print(f"{'bytes' + ('/conn' if args.per else ''):>12} {'blocks':>8}  where")
    for size, n, where in rows[:args.top]:
        lines = [f"{f.filename}:{f.lineno} {linecache.getline(f.filename, f.lineno).strip()}"
                 for f in where]
        print(f"{size / per:12,.0f} {n / per:8.2f}  " + "\n                        <- ".join(
            lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="imd under tracemalloc; SIGUSR1 writes a snapshot")
    r.add_argument("--out", default="memtrace", help="directory for the snapshots")
    r.add_argument("--frames", type=int, default=1,
                   help="frames kept per allocation; 0: no tracing, only SIGUSR2")
    r.add_argument("imd", nargs=argparse.REMAINDER, help="-- and imd's options")
    d = sub.add_parser("diff", help="what was allocated between two snapshots")
    d.add_argument("before")
    d.add_argument("after")
    d.add_argument("--per", type=int, default=0, help="divide by this (connections opened)")
    d.add_argument("--frames", type=int, default=1, help="group by this many frames")
    d.add_argument("--imd", action="store_true",
                   help="group by the innermost two frames in imd's own code")
    d.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    if args.cmd == "run":
        if args.imd and args.imd[0] == "--":
            args.imd = args.imd[1:]
        run(args)
    else:
        diff(args)


if __name__ == "__main__":
    main()
