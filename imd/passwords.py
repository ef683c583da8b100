"""Password verifiers: a salted scrypt hash of md5hex(password), computed off the reactor.

Every protocol ends up with md5hex(password): plain-password logins hash it first, xuanxuan
sends it already hashed.  The verifier format is ``scrypt$n$r$p$salt_hex$hash_hex``.

``LoginKey`` lets a node recognise a login it has just verified without running scrypt again
(see ``Accounts.authenticate``): a keyed hash of (user, md5hex, verifier) under a secret that
lives only in the node's data directory, never in Redis beside the verifiers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from twisted.internet import defer, threads

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def md5hex(password: str) -> str:
    return hashlib.md5(password.encode("utf-8")).hexdigest()


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.lower().encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=64 * 1024 * 1024)


def _make(md5: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(md5, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def _check(verifier: str, md5: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = verifier.split("$")
        if scheme != "scrypt":
            return False
        computed = _scrypt(md5, bytes.fromhex(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed, bytes.fromhex(digest))


def make_verifier(md5: str) -> defer.Deferred:
    """Deferred[str]: a new verifier for md5hex(password), hashed in the thread pool."""
    return threads.deferToThread(_make, md5)


def check_verifier(verifier: str | None, md5: str) -> defer.Deferred:
    """Deferred[bool]: whether md5hex(password) matches the verifier."""
    if not verifier:
        return defer.succeed(False)
    return threads.deferToThread(_check, verifier, md5)


class LoginKey:
    """A node's secret for remembering verified logins; ``id`` names it in the store."""

    __slots__ = ("_key", "id")

    def __init__(self, key: bytes):
        self._key = key
        self.id = hashlib.sha256(b"imd login key id\0" + key).hexdigest()[:16]

    def mac(self, uid: int, md5: str, verifier: str) -> str:
        """The keyed hash of a login: changes with the password and with the verifier (a
        new salt), and reveals nothing without the key."""
        message = f"{int(uid)}\0{md5.lower()}\0{verifier}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> "LoginKey":
        """The key in the file ``path``, made (0600) when it is missing or holds no key.
        Start-up only (raises OSError when the file cannot be written)."""
        path = Path(path)
        try:
            key = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError):
            key = b""
        if len(key) < 32:
            key = secrets.token_bytes(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key.hex() + "\n")
        return cls(key)
