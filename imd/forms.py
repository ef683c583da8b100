"""multipart/form-data bodies, parsed once, from the file the request body was spooled to.

The parser is the ``multipart`` package's ``PushMultipartParser`` (incremental, bounded, well
kept); the body is read in chunks, so memory stays small whatever the size of the upload:

- :func:`upload_parts` (upload paths): each file part is written, as it is parsed, to a hidden
  temporary file in the adapter's own directory, which the adapter renames into place or
  removes (:func:`discard`); the other fields are kept in memory (small, bounded) and added to
  ``request.args`` as twisted.web would have done.  It does file I/O, so it runs in a thread.
- :func:`form_args` (every other POST, bodies bounded by ``--max-body``): every part's value,
  in the shape of twisted.web's ``request.args``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import multipart
from twisted.internet import threads
from twisted.web import server

CHUNK = 64 * 1024
MAX_FIELD = 64 * 1024  # one field that is not a file
MAX_PARTS = 64
PART_PREFIX = ".part-"  # temporary files in an upload directory (never served)


class FormError(ValueError):
    """A body that is not a well-formed multipart form (or passes a limit)."""


@dataclass
class Part:
    name: str
    filename: str | None  # None for a plain field
    value: bytes = b""  # a plain field's value
    path: Path | None = None  # a file part's temporary file
    size: int = 0


def boundary(content_type: bytes) -> str | None:
    """The boundary of a multipart/form-data Content-Type, else None."""
    mime, options = multipart.parse_options_header(content_type.decode("latin-1"))
    if mime != "multipart/form-data":
        return None
    return options.get("boundary") or None


def _parse(content: BinaryIO, bound: str, open_file: Callable[[], BinaryIO] | None,
           max_field: float) -> list[Part]:
    parts: list[Part] = []
    sink: BinaryIO | None = None
    part: Part | None = None
    value = bytearray()
    content.seek(0)
    try:
        with multipart.PushMultipartParser(bound, max_segment_count=MAX_PARTS) as parser:
            while not parser.closed:
                for event in parser.parse(content.read(CHUNK)):
                    if isinstance(event, multipart.MultipartSegment):
                        part = Part(event.name or "", event.filename)
                        if event.filename is not None and open_file is not None:
                            sink = open_file()
                            part.path = Path(sink.name)
                        parts.append(part)
                    elif event:
                        part.size += len(event)
                        if sink is not None:
                            sink.write(event)
                        elif part.size > max_field:
                            raise FormError(f"a form field is over {max_field} bytes")
                        else:
                            value += event
                    else:  # the end of a part
                        if sink is not None:
                            sink.close()
                            sink = None
                        else:
                            part.value, value = bytes(value), bytearray()
    except (multipart.MultipartError, OSError) as e:
        if sink is not None:
            sink.close()
        discard(parts)
        raise FormError(str(e)) from None
    except BaseException:
        if sink is not None:
            sink.close()
        discard(parts)
        raise
    finally:
        content.seek(0)
    return [p for p in parts if p.name]


def discard(parts: list[Part]) -> None:
    """Remove the temporary files of ``parts`` that were not moved into place."""
    for part in parts:
        if part.path is not None:
            try:
                os.unlink(part.path)
            except FileNotFoundError:
                pass


def clean(directory: Path) -> None:
    """Remove the temporary files an interrupted upload left in ``directory``."""
    for leftover in directory.glob(PART_PREFIX + "*"):
        leftover.unlink(missing_ok=True)


def _upload_parts(content: BinaryIO, bound: str, directory: Path) -> list[Part]:
    def open_file():
        return tempfile.NamedTemporaryFile(dir=directory, prefix=PART_PREFIX, delete=False)

    return _parse(content, bound, open_file, MAX_FIELD)


async def upload_parts(request: server.Request, directory: Path) -> list[Part]:
    """The parts of an upload's multipart body (raises FormError); file parts are streamed to
    temporary files in ``directory``.  The plain fields are also added to ``request.args``."""
    bound = boundary(request.getHeader(b"content-type") or b"")
    if bound is None:
        raise FormError("not a multipart/form-data body")
    parts = await threads.deferToThread(_upload_parts, request.content, bound, directory)
    for part in parts:
        if part.path is None:
            request.args.setdefault(part.name.encode(), []).append(part.value)
    return parts


def form_args(content: BinaryIO, content_type: bytes) -> dict[bytes, list[bytes]]:
    """A small multipart body's parts as twisted.web's ``request.args`` (empty when the body
    is not a well-formed form)."""
    bound = boundary(content_type)
    if bound is None:
        return {}
    args: dict[bytes, list[bytes]] = {}
    try:
        parts = _parse(content, bound, None, float("inf"))  # the body is small
    except FormError:
        return {}
    for part in parts:
        args.setdefault(part.name.encode(), []).append(part.value)
    return args
