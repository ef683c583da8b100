"""Accounts: creating users, checking passwords and issuing, checking and revoking tokens.

Shared by every protocol and by ``imdctl``; password hashing runs in the thread pool.
"""

from __future__ import annotations

import re

from imd.model import PROFILE_FIELDS, User
from imd.passwords import check_verifier, make_verifier, md5hex
from imd.store.redis import AccountTaken, RedisStore

ACCOUNT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MAX_AVATAR = 256 * 1024  # minami sends pictures inline, base64
MAX_FIELD = 256


class AccountError(Exception):
    """A refused account operation; the message is fit to show to the client."""


class Accounts:
    def __init__(self, store: RedisStore, token_ttl: int):
        self.store = store
        self.token_ttl = token_ttl

    async def create(self, account: str, password: str, name: str = "",
                     avatar: str = "", **profile: str) -> User:
        """A new user; ``profile`` may hold sex, birthday, sign and mail."""
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
        verifier = await make_verifier(md5hex(password))
        try:
            return await self.store.create_user(account, name, verifier, avatar, **profile)
        except AccountTaken:
            raise AccountError("account already exists") from None

    async def authenticate(self, account: str, password_md5: str) -> User | None:
        """The user when md5hex(password) matches the account's verifier, else None."""
        uid = await self.store.find_account(account or "")
        if uid is None:
            return None
        if not await check_verifier(await self.store.get_verifier(uid), password_md5):
            return None
        return await self.store.get_user(uid)

    async def login(self, account: str, password: str) -> tuple[User, str] | None:
        """Check a plain password; on success the user and a new token."""
        user = await self.authenticate(account, md5hex(password or ""))
        if user is None:
            return None
        return user, await self.store.issue_token(user.id, self.token_ttl)

    async def issue_token(self, uid: int) -> str:
        return await self.store.issue_token(uid, self.token_ttl)

    async def user_for_token(self, token: str) -> int | None:
        return await self.store.check_token(token)

    async def revoke(self, token: str) -> None:
        await self.store.revoke_token(token)
