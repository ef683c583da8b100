"""The one reader of JSON text that comes from a client.

Every adapter parses client JSON (HTTP bodies, WebSocket frames, socket lines, stored client
settings) with :func:`read`, and maps :class:`BadJSON` to its protocol's error reply in one
place.  The reader bounds what the standard parser does not:

- size: at most ``limit`` bytes (checked before parsing);
- nesting: at most ``depth`` levels of arrays and objects, counted without recursion before
  the (recursive) parser sees the text, so deep nesting is a refusal, never a RecursionError;
- text: strict UTF-8, no lone surrogates (a ``"\\ud800"`` escape would fail later, when the
  value is written back as UTF-8);
- values: no NaN or Infinity (not JSON), no number that overflows to infinity, no
  duplicate keys in one object (two parsers would disagree on which one counts).

Type checks of the values themselves belong where they are used.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

DEFAULT_LIMIT = 1024 * 1024
DEFAULT_DEPTH = 32

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class BadJSON(ValueError):
    """Client text that is not a JSON value imd accepts; ``str()`` says why, fit for a client."""


def _constant(name: str):
    raise BadJSON(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON("number out of range")
    return value


def _pairs(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise BadJSON("duplicate key in an object")
    return obj


_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_float,
                            object_pairs_hook=_pairs)


def _check_depth(text: str, depth: int) -> None:
    # Fast path: fewer brackets than the bound cannot nest deeper than it.
    if text.count("[") + text.count("{") <= depth:
        return
    level = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            level += 1
            if level > depth:
                raise BadJSON(f"nested deeper than {depth} levels")
        else:
            level -= 1


def read(data: bytes | str, *, limit: int = DEFAULT_LIMIT, depth: int = DEFAULT_DEPTH) -> Any:
    """Parse one client JSON text; raise :class:`BadJSON` for anything else."""
    if len(data) > limit:
        raise BadJSON(f"JSON text longer than {limit} bytes")
    if isinstance(data, str):
        text = data
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadJSON("lone surrogate in the JSON text") from None
        if size > limit:
            raise BadJSON(f"JSON text longer than {limit} bytes")
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise BadJSON("JSON text is not UTF-8") from None
    _check_depth(text, depth)
    try:
        value = _DECODER.decode(text)
    except BadJSON:
        raise
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and over-long integer literals.
        raise BadJSON(f"not JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadJSON("lone surrogate in a string") from None
    return value
