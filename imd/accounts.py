"""Accounts: creating users, checking passwords and issuing, checking and revoking tokens.

Shared by every protocol and by ``imdctl``; password hashing runs in the thread pool.
Every password or login-token check and every registration from a client passes the client's
source address, and goes through the throttles (imd/throttle.py) before any hash is computed:
a refused attempt raises ``Throttled``, which each adapter answers with its protocol's error.
A disabled user (``imdctl disable``, the admin API) logs in with neither password nor token.

Remembered logins (what makes a reconnect storm after a restart take seconds, not minutes):
after scrypt accepts a password, the node stores in Redis, for ``remember_ttl`` seconds, a keyed
hash of (user, md5hex, verifier) under its ``LoginKey`` (imd/passwords.py).  The same
credentials within that time are accepted by comparing that hash, without scrypt.  The key is
in the node's data directory, never in Redis, so what Redis holds stays as hard to attack as
the scrypt verifiers.  A new password changes the verifier (so the hash no longer matches) and,
like disabling the user, deletes the remembered logins; the throttles still run first.
"""

from __future__ import annotations

import hmac
import re
from typing import Any, Awaitable, Callable

from imd.model import PROFILE_FIELDS, User
from imd.passwords import LoginKey, check_verifier, make_verifier, md5hex
from imd.store.redis import AccountTaken, RedisStore
from imd.throttle import LoginThrottles

ACCOUNT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MAX_AVATAR = 256 * 1024  # minami sends pictures inline, base64
MAX_FIELD = 256


class AccountError(Exception):
    """A refused account operation; the message is fit to show to the client."""


class Accounts:
    def __init__(self, store: RedisStore, token_ttl: int,
                 throttles: LoginThrottles | None = None, login_key: LoginKey | None = None,
                 remember_ttl: int = 0):
        self.store = store
        self.token_ttl = token_ttl
        self.throttles = throttles
        self.login_key = login_key if remember_ttl > 0 else None
        self.remember_ttl = remember_ttl

    async def create(self, account: str, password: str, name: str = "",
                     avatar: str = "", address: str = "", **profile: str) -> User:
        """A new user; ``profile`` may hold sex, birthday, sign and mail.  ``address`` is the
        registering client's (registrations are throttled per address)."""
        if self.throttles is not None:
            self.throttles.before_register(address)
        if not isinstance(account, str) or not ACCOUNT_RE.fullmatch(account):
            raise AccountError("account must be 1-64 letters, digits or ._@- "
                               "and start with a letter or digit")
        if not password:
            raise AccountError("password must not be empty")
        name = (name or account).strip()
        if len(name) > 64:
            raise AccountError("name must be at most 64 characters")
        if len(avatar) > MAX_AVATAR:
            raise AccountError(f"picture must be at most {MAX_AVATAR} bytes")
        for key, value in profile.items():
            if key not in PROFILE_FIELDS or len(value or "") > MAX_FIELD:
                raise AccountError(f"{key} must be at most {MAX_FIELD} characters")
        if self.throttles is not None:
            self.throttles.registered(address)
        verifier = await make_verifier(md5hex(password))
        try:
            return await self.store.create_user(account, name, verifier, avatar, **profile)
        except AccountTaken:
            raise AccountError("account already exists") from None

    async def authenticate(self, account: str, password_md5: str,
                           address: str = "") -> User | None:
        """The user when md5hex(password) matches the account's verifier, else None.

        Raises ``Throttled`` (without checking the password) after too many failures for the
        account or from ``address``."""
        uid = await self.store.find_account(account or "")
        key = f"user:{uid}" if uid is not None else f"account:{(account or '').lower()}"
        return await self._throttled(key, address,
                                     lambda: self._user_with(uid, password_md5 or ""))

    async def _user_with(self, uid: int | None, md5: str) -> User | None:
        if uid is None or not await self._check(uid, md5):
            return None
        return await self.store.get_user(uid)

    async def _throttled(self, key: str, address: str, attempt: Callable[[], Awaitable[Any]]):
        """Run a credential check under the failed-login throttles: refused (``Throttled``)
        before it runs after too many failures for ``key`` or from ``address``; a falsy
        result counts as a failure."""
        if self.throttles is not None:
            self.throttles.before_login(key, address)
        result = await attempt()
        if self.throttles is not None:
            if result:
                self.throttles.login_succeeded(key)
            else:
                self.throttles.login_failed(key, address)
        return result

    async def _check(self, uid: int, md5: str) -> bool:
        """Whether md5hex(password) is the password of the (enabled) user: a remembered login
        or scrypt."""
        key = self.login_key
        verifier, disabled, remembered = await self.store.login_fields(
            uid, key.id if key is not None else "")
        if disabled or not verifier:
            return False
        mac = key.mac(uid, md5, verifier) if key is not None else ""
        if remembered and hmac.compare_digest(remembered, mac):
            return True
        if not await check_verifier(verifier, md5):
            return False
        if key is not None:
            await self.store.remember_login(uid, key.id, mac, self.remember_ttl)
        return True

    async def check_password(self, account: str, password: str,
                             address: str = "") -> User | None:
        """``authenticate`` with a plain password."""
        return await self.authenticate(account, md5hex(password or ""), address)

    async def login(self, account: str, password: str,
                    address: str = "") -> tuple[User, str] | None:
        """Check a plain password; on success the user and a new token."""
        user = await self.check_password(account, password, address)
        if user is None:
            return None
        return user, await self.store.issue_token(user.id, self.token_ttl)

    async def token_login(self, uid: int, token: str, address: str = "") -> bool:
        """Whether ``token`` is a live token of user ``uid``: a login with a token, throttled
        like a password check (raises ``Throttled``)."""
        return await self._throttled(f"user:{uid}", address, lambda: self._token_of(uid, token))

    async def _token_of(self, uid: int, token: str) -> bool:
        return await self.user_for_token(token) == uid

    async def issue_token(self, uid: int) -> str:
        return await self.store.issue_token(uid, self.token_ttl)

    async def user_for_token(self, token: str) -> int | None:
        uid = await self.store.check_token(token)
        if uid is not None and await self.store.is_disabled(uid):
            return None
        return uid

    async def active(self, uid: int) -> bool:
        """Whether the user exists and is not disabled (a login without a password)."""
        fields = await self.store.user_fields(uid, "account", "disabled")
        return bool(fields["account"]) and fields["disabled"] != "1"

    async def set_password(self, uid: int, password: str) -> None:
        if not password:
            raise AccountError("password must not be empty")
        await self.store.set_user_fields(uid, verifier=await make_verifier(md5hex(password)))

    async def revoke(self, token: str) -> None:
        await self.store.revoke_token(token)
