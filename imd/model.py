"""Plain value types shared by the hub, the store and the protocol adapters.

Nothing here talks to the network or to Redis; these are the protocol-neutral shapes that
flow between the layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

# Message kinds, protocol-neutral.  Each adapter maps its own names onto these.
TEXT = "text"
EMOTICON = "emoticon"
IMAGE = "image"
AUDIO = "audio"
VIDEO = "video"
FILE = "file"
KINDS = frozenset({TEXT, EMOTICON, IMAGE, AUDIO, VIDEO, FILE})



def _compact_encoder():
    """Compact JSON with the text as is (UTF-8 on the wire, not \\u escapes).

    ``JSONEncoder.encode`` builds a new C encoder on every call, about half of the cost of
    encoding a message; this one is built once (CPython's ``json.encoder.c_make_encoder``,
    with the arguments ``JSONEncoder.iterencode`` gives it; no check for circular
    references, which no value here has).  Where there is no C encoder, the plain one."""
    plain = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return plain.encode
    chunks = make(None, plain.default, json.encoder.encode_basestring, None, ":", ",",
                  False, False, True)

    def compact_json(obj: Any) -> str:
        return "".join(chunks(obj, 0))
    return compact_json


compact_json = _compact_encoder()


def json_bytes(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON: what every protocol writes to its clients."""
    return compact_json(obj).encode("utf-8")

# Conversation types.
UNICAST = "unicast"
GROUP = "group"


def one2one_gid(a: int, b: int) -> str:
    """The conversation id of two users: both ids sorted and joined by '&' (xuanxuan's rule)."""
    low, high = sorted((int(a), int(b)))
    return f"{low}&{high}"


PROFILE_FIELDS = ("sex", "birthday", "sign", "mail")


def group_conversation(group_id: int) -> str:
    """The conversation (history key) of a group."""
    return f"g:{int(group_id)}"


@dataclass(frozen=True)
class User:
    """A user; ``avatar`` is a URL or a data string (minami sends base64 pictures)."""

    id: int
    account: str
    name: str
    avatar: str = ""
    sex: str = ""
    birthday: str = ""
    sign: str = ""
    mail: str = ""


# Profile fields shown only to the user and to system administrators (``imdctl admin``).
# xuanxuan shows the e-mail in every user card; minami profiles (friends, search) carry sex,
# birthday and sign by design but never the mail.  imd keeps no phone numbers.
PRIVATE_FIELDS = ("mail",)


def seen_by(user: User, viewer: int | None, admin: bool = False) -> User:
    """``user`` as ``viewer`` may see them: the private fields blank unless the viewer is the
    user or an administrator.  An adapter whose user objects carry a private field renders
    every user through this (xuanxuan; the others never show one)."""
    if admin or (viewer is not None and int(viewer) == user.id):
        return user
    return replace(user, **{f: "" for f in PRIVATE_FIELDS})


# A presence Event: kind PRESENCE, data {"user": id, "change": ONLINE (first session
# anywhere), OFFLINE (last session everywhere, or its node died), SHOW or PROFILE, "show": one
# of SHOWS ("unavailable" once offline), "status": free text, "profile": the User's fields}.
PRESENCE = "presence"
ONLINE, OFFLINE, SHOW, PROFILE = "online", "offline", "show", "profile"
# Protocol-neutral shows (webim's names); each adapter maps its own onto these.
# A kick Event (to a user's sessions, every node): data {"session": the hub's session id}
# closes that one session, {} every session of the user.
KICK = "kick"
SHOWS = ("available", "away", "chat", "dnd", "busy", "invisible", "unavailable")


@dataclass(frozen=True)
class Event:
    """A protocol-neutral notice for sessions that is never stored: a friend request, a
    presence change, a newer login of the same user (``kind``), with its details."""

    kind: str
    data: dict

    def to_json(self) -> str:
        return compact_json([self.kind, self.data])

    @classmethod
    def from_json(cls, text: str) -> "Event":
        kind, data = json.loads(text)
        return cls(kind, data)


@dataclass(frozen=True)
class Group:
    id: int
    creator: int
    name: str
    notice: str = ""
    snap: str = ""
    members: tuple[int, ...] = ()
    public: bool = False


@dataclass(slots=True)
class Message:
    """One stored message.

    ``to`` is the recipient user id for unicast and the group id for group messages.
    ``ts`` is the server timestamp in milliseconds, ``id`` the store-assigned increasing id.
    ``wire`` caches the encoded form per protocol (created on first use) so that fan-out
    encodes once per protocol, not once per recipient.  ``accepted`` is the monotonic time
    this node's hub accepted it (0: it came from the store or another node); it is never
    stored.
    """

    sender: int
    to: int
    ctype: str
    kind: str
    body: str
    extension: str = ""
    id: int = 0
    ts: int = 0
    style: str = ""
    wire: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    accepted: float = field(default=0.0, compare=False, repr=False)

    @property
    def conversation(self) -> str:
        if self.ctype == GROUP:
            return group_conversation(self.to)
        return one2one_gid(self.sender, self.to)

    def to_json(self) -> str:
        return compact_json([self.id, self.ts, self.sender, self.to, self.ctype, self.kind,
                        self.body, self.extension, self.style])

    @classmethod
    def from_json(cls, text: str | bytes) -> "Message":
        mid, ts, sender, to, ctype, kind, body, ext, *rest = json.loads(text)
        return cls(sender=sender, to=to, ctype=ctype, kind=kind, body=body, extension=ext,
                   id=mid, ts=ts, style=rest[0] if rest else "")
