"""Parsing and rendering 66boss signals (underscore-separated text).

Send: ``<kind>_<to>_<body>_<type>_<extension>``: kind and to are the first two fields, type
and extension the last two, and the body is everything in between, so it may contain ``_``.
Receive: ``<kind>_<from>_<body>_<type>_<fromgroupid>_<timet>_<extension>``.
"""

from __future__ import annotations

from typing import NamedTuple

from imd.model import AUDIO, EMOTICON, FILE, GROUP, IMAGE, TEXT, UNICAST, VIDEO, Message

# 66boss kind -> hub kind, and back.
KIND_IN = {"text": TEXT, "emotion": EMOTICON, "picture": IMAGE, "audio": AUDIO,
           "video": VIDEO}
KIND_OUT = {v: k for k, v in KIND_IN.items()}
KIND_OUT[FILE] = "text"  # files from other protocols arrive as a link in a text message
CONVERSATION_TYPES = (UNICAST, GROUP)


class SignalError(ValueError):
    """A malformed signal; ``command`` names the signal for the error line."""

    def __init__(self, command: str, reason: str):
        super().__init__(reason)
        self.command = command
        self.reason = reason


class Send(NamedTuple):
    kind: str
    to: int
    body: str
    ctype: str
    extension: str


def parse_id(command: str, text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise SignalError(command, f"bad id {text[:32]!r}")
    return int(text)


def parse_send(signal: str) -> Send:
    head = signal.split("_", 2)  # kind, to, then body_type_extension
    tail = head[2].rsplit("_", 2) if len(head) == 3 else ()
    command = head[0]
    if len(tail) < 3:
        raise SignalError(command, "expected <kind>_<to>_<body>_<type>_<extension>")
    body, ctype, extension = tail
    if ctype not in CONVERSATION_TYPES:
        raise SignalError(command, f"type must be unicast or group, not {ctype[:32]!r}")
    return Send(KIND_IN[command], parse_id(command, head[1]), body, ctype, extension)


def render(message: Message, extension: str | None = None, cache: bool = True) -> str:
    """The receive signal of a message, encoded once and cached on the message (with
    ``extension`` in place of the message's own, when given; see cards.py)."""
    if message.wire is None:
        message.wire = {}
    text = message.wire.get("boss")
    if text is None:
        fromgroup = message.to if message.ctype == GROUP else message.sender
        ext = message.extension if extension is None else extension
        text = (f"{KIND_OUT.get(message.kind, 'text')}_{message.sender}_{message.body}_"
                f"{message.ctype}_{fromgroup}_{message.ts // 1000}_{ext}")
        if cache:
            message.wire["boss"] = text
    return text


def error(command: str, reason: str) -> str:
    return f"error_{command}_{reason}"
