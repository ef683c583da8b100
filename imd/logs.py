"""Log formats: ``imd.logs.json_observer``, a JSON-lines log for ``twistd --logger``.

``twistd --logger=NAME`` calls NAME with no arguments and logs to the observer it returns
(which is why ``--logger=twisted.logger.jsonFileLogObserver`` fails: that function needs the
file to write to).  ``json_observer`` writes one JSON object per line to standard output
(journald, a container runtime or a shell redirect takes it from there)::

    {"time": "2026-11-24T05:31:15.123456Z", "level": "info", "namespace": "imd.service",
     "text": "imd 0.2.0 starting ...", "version": "0.2.0", ...}

``text`` is the message as the text log shows it; the event's own fields with plain values
(strings, numbers, booleans) follow, and an error adds ``traceback``.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

# Legacy (twisted.python.log) keys that repeat what time/level/text already say.
_SKIP = {"message", "time", "system", "isError", "format", "why", "failure"}


def event_as_json(event: dict) -> str:
    """One log event as a JSON object on one line."""
    level = event.get("log_level")
    record = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
        .isoformat().replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in record:
            continue
        if value is None or isinstance(value, (str, int, float, bool)):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """A log observer writing JSON lines to ``out`` (default: standard output)."""
    return FileLogObserver(out if out is not None else sys.stdout, event_as_json)
