"""Password verifiers: a salted scrypt hash of md5hex(password), computed off the reactor.

Every protocol ends up with md5hex(password): plain-password logins hash it first, xuanxuan
sends it already hashed.  The verifier format is ``scrypt$n$r$p$salt_hex$hash_hex``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

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
