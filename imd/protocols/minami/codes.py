"""minami reply codes with the seed's exact message texts, and reply builders."""

from __future__ import annotations

from imd.model import json_bytes

MESSAGES = {
    200: "Success", 300: "Friend Offline", 403: "Protocol Error",
    500: "Internal Server Error", 501: "Account Info Empty", 502: "Password Info Empty",
    503: "Secure Mail Info Empty", 504: "Account Already Exists",
    505: "Account & Password Wrong", 506: "Dialogue ID Empty",
    507: "Dialogue Send To Friend Failed", 508: "Friend Is Offline", 510: "Friend ID Empty",
    511: "Payload Empty", 512: "Not Relation of Friend", 513: "Login In Other Place",
    514: "Auth Info Empty", 515: "Auth Illegal", 516: "Name Empty", 517: "Account ID Empty",
    519: "Friend Info Empty", 520: "Apply For a Friend", 521: "Alias Empty",
    522: "Already Be Friend", 523: "Friend Not Exists",
}
OK_CODES = {200, 300, 520}


def reply(code: int, **extra) -> dict:
    """``{"code", "message", "ok"}`` plus any extra fields."""
    return {"code": code, "message": MESSAGES[code], "ok": code in OK_CODES, **extra}


encode = json_bytes  # every frame this adapter writes

_ACK_HEAD = encode(reply(200, id=None))[:-len(b"null}")]


def ack(ident: str | int) -> bytes:
    """``encode(reply(200, id=ident))``, with the constant part encoded once (one per
    message sent)."""
    return b"%s%s}" % (_ACK_HEAD, encode(ident))


class MinamiError(Exception):
    def __init__(self, code: int):
        super().__init__(MESSAGES[code])
        self.code = code
