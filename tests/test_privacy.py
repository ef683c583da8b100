"""Private profile fields (the e-mail) go only to the user and to administrators, on every
listing of users: xuanxuan's login array, ``userGetlist`` and presence pushes, minami's
``friends/found``, webim buddies and 66boss group members."""

from __future__ import annotations

import hashlib
import json

import pytest_twisted

from imd.accounts import Accounts
from tests.conftest import unique
from tests.test_minami import new_user as minami_user
from tests.test_xuanxuan import XX, connect
from tests.wire import get


async def with_mail(daemon, prefix: str):
    account = unique(prefix)
    mail = f"{account}@private.example"
    user = await Accounts(await daemon.store(), 3600).create(account, "pw", mail=mail)
    return user, mail


async def xx_login(daemon, account: str) -> tuple[XX, dict, list]:
    x = await connect(daemon)
    x.send("chat", "login", [account, hashlib.md5(b"pw").hexdigest(), "online"])
    reply = await x.next()
    assert reply["result"] == "success", reply
    return x, reply, await x.next()


def listed(packets: list, method: str) -> list[dict]:
    return next(p["data"] for p in packets if p["method"] == method)


@pytest_twisted.ensureDeferred
async def test_xuanxuan_shows_mail_only_to_its_owner_and_admins(daemon):
    alice, alice_mail = await with_mail(daemon, "alice")
    bob, bob_mail = await with_mail(daemon, "bob")
    boss, _ = await with_mail(daemon, "admin")
    await (await daemon.store()).set_user_fields(boss.id, admin="super")

    x, reply, pushed = await xx_login(daemon, bob.account)
    assert reply["data"]["email"] == bob_mail  # my own record
    everyone = {u["id"]: u for u in listed(pushed, "userGetlist")}
    # (an empty field is left out of the list)
    assert "email" not in everyone[alice.id] and everyone[alice.id]["account"] == alice.account
    assert everyone[bob.id]["email"] == bob_mail
    got = await x.call("userGetlist")
    assert alice_mail not in json.dumps(got) and bob_mail in json.dumps(got)

    # A presence push of alice to bob carries no mail either.
    a, _, _ = await xx_login(daemon, alice.account)
    seen = await x.push("login")
    while seen["id"] != alice.id:
        seen = await x.push("login")
    assert set(seen) == {"id", "status"} and seen["status"] != "offline"
    x.client.close()
    a.client.close()

    # An administrator sees it.
    adm, _, pushed = await xx_login(daemon, boss.account)
    everyone = {u["id"]: u for u in listed(pushed, "userGetlist")}
    assert everyone[alice.id]["email"] == alice_mail
    adm.client.close()


@pytest_twisted.ensureDeferred
async def test_other_listings_carry_no_mail(daemon):
    # minami: a stranger's search result; minami registration requires a mail.
    account, seeker = await minami_user(daemon)
    other, found = await minami_user(daemon)
    r = await get(daemon.web, "/im/friends/found", id=seeker.id, token=seeker.token,
                  name=other)
    assert r.json()["code"] == 200 and f"{other}@example.org" not in r.body.decode()
    seeker.ws.close()
    found.ws.close()
