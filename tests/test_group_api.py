"""The 66boss group HTTP API and login endpoint over real HTTP, at / and under /wsim/."""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.conftest import unique
from tests.wire import get, http, post_form


async def users(daemon, n: int):
    return [await daemon.user(unique(), name=f"名字{i}") for i in range(n)]


@pytest.mark.parametrize("prefix", ["", "/wsim"])
@pytest_twisted.ensureDeferred
async def test_group_life_cycle(daemon, prefix):
    (a, ta), (b, tb), (c, tc) = await users(daemon, 3)
    r = (await get(daemon.web, f"{prefix}/creategrp", creator=a, members=f"{a},{b}",
                   name="我的群", token=ta)).json()
    assert r["code"] == 0 and r["message"] == "OK"
    data = r["data"]
    gid = data["groupid"]
    assert isinstance(gid, str) and int(gid) > 0
    assert data == {"groupid": gid, "creator": str(a), "name": "我的群", "notice": "",
                    "snap": "", "members": [str(a), str(b)]}
    assert int(gid) not in (a, b, c)  # ids come from one counter

    assert (await get(daemon.web, f"{prefix}/addmembers", groupid=gid, members=str(c),
                      token=tb)).json() == {"code": 0, "message": "OK"}
    assert (await get(daemon.web, f"{prefix}/editgrp", groupid=gid, notice="公告",
                      name="new", token=ta)).json() == {"code": 0, "message": "OK"}
    info = (await get(daemon.web, f"{prefix}/grpinfo", groupid=gid, token=tc)).json()
    assert info["code"] == 0
    assert info["data"] == {"groupid": gid, "creator": str(a), "name": "new",
                            "notice": "公告", "snap": "",
                            "members": [{"nickname": "名字0", "snap": ""},
                                        {"nickname": "名字1", "snap": ""},
                                        {"nickname": "名字2", "snap": ""}]}
    mine = (await get(daemon.web, f"{prefix}/querymygrps", userid=c, token=tc)).json()
    assert mine["code"] == 0 and [g["groupid"] for g in mine["data"]] == [gid]
    assert mine["data"][0]["members"][2] == {"nickname": "名字2", "snap": ""}

    assert (await get(daemon.web, f"{prefix}/delmembers", groupid=gid, members=str(b),
                      token=ta)).json() == {"code": 0, "message": "OK"}
    mine = (await get(daemon.web, f"{prefix}/querymygrps", userid=b, token=tb)).json()
    assert mine == {"code": 0, "message": "OK", "data": []}
    assert (await get(daemon.web, f"{prefix}/refreshgrp", groupid=gid,
                      token=ta)).json() == {"code": 0, "message": "OK"}


@pytest_twisted.ensureDeferred
async def test_permissions(daemon):
    (a, ta), (b, tb), (c, tc) = await users(daemon, 3)
    gid = (await get(daemon.web, "/creategrp", creator=a, members=str(b), name="g",
                     token=ta)).json()["data"]["groupid"]

    async def code(path, token, **params):
        return (await get(daemon.web, path, token=token, **params)).json()["code"]

    assert await code("/creategrp", tb, creator=a, members=str(c), name="x") == 403
    assert await code("/editgrp", tb, groupid=gid, name="hijack") == 403
    assert await code("/delmembers", tb, groupid=gid, members=str(a)) == 403
    assert await code("/delmembers", ta, groupid=gid, members=str(a)) == 403  # the creator
    assert await code("/addmembers", tc, groupid=gid, members=str(c)) == 403  # outsider
    assert await code("/grpinfo", tc, groupid=gid) == 403
    assert await code("/querymygrps", tc, userid=a) == 403
    # A member may leave by removing themselves.
    assert await code("/delmembers", tb, groupid=gid, members=str(b)) == 0
    info = (await get(daemon.web, "/grpinfo", groupid=gid, token=ta)).json()
    assert info["data"]["name"] == "g" and len(info["data"]["members"]) == 1


@pytest_twisted.ensureDeferred
async def test_bad_parameters_unknown_ids_and_auth(daemon):
    (a, ta), (b, tb) = await users(daemon, 2)
    gid = (await get(daemon.web, "/creategrp", creator=a, members=str(b), name="g",
                     token=ta)).json()["data"]["groupid"]
    cases = [
        ("/creategrp", dict(members=str(b), name="g", token=ta), 400),          # no creator
        ("/creategrp", dict(creator=a, members="1,x", name="g", token=ta), 400),
        ("/creategrp", dict(creator=a, members=str(b), name="", token=ta), 400),
        ("/creategrp", dict(creator=a, members="999999999", name="g", token=ta), 404),
        ("/addmembers", dict(groupid=gid, token=ta), 400),
        ("/addmembers", dict(groupid="999999998", members=str(b), token=ta), 404),
        ("/addmembers", dict(groupid=gid, members="999999999", token=ta), 404),
        ("/delmembers", dict(groupid="abc", members=str(b), token=ta), 400),
        ("/editgrp", dict(groupid=gid, token=ta), 400),                       # nothing to do
        ("/editgrp", dict(groupid=gid, name="x" * 65, token=ta), 400),
        ("/grpinfo", dict(token=ta), 400),
        ("/grpinfo", dict(groupid="999999998", token=ta), 404),
        ("/querymygrps", dict(token=ta), 400),
        ("/grpinfo", dict(groupid=gid), 401),                                 # no token
        ("/grpinfo", dict(groupid=gid, token="0" * 32), 401),
        ("/addmembers", dict(groupid=gid, members=str(b)), 401),
    ]
    for path, params, expected in cases:
        r = (await get(daemon.web, path, **params)).json()
        assert r["code"] == expected, (path, params, r)
        assert r["message"]
    bearer = await http("GET", f"http://127.0.0.1:{daemon.web}/grpinfo?groupid={gid}",
                        headers={"Authorization": f"Bearer {ta}"})
    assert bearer.json()["code"] == 0


@pytest_twisted.ensureDeferred
async def test_http_login(daemon):
    account = unique("login")
    uid, _ = await daemon.user(account, password="pässword")
    r = (await post_form(daemon.web, "/login", account=account, password="pässword")).json()
    assert r["code"] == 1 and r["id"] == str(uid) and len(r["token"]) == 32
    r2 = await http("POST", f"http://127.0.0.1:{daemon.web}/wsim/login",
                    b'{"account": "%s", "password": "p\\u00e4ssword"}' % account.encode(),
                    {"Content-Type": "application/json"})
    assert r2.json()["code"] == 1
    assert (await post_form(daemon.web, "/login", account=account,
                            password="wrong")).json()["code"] == 401
    assert (await post_form(daemon.web, "/login", account="nobody" + account,
                            password="x")).json()["code"] == 401
    assert (await post_form(daemon.web, "/login", account=account)).json()["code"] == 400
    assert (await get(daemon.web, "/login", account=account,
                      password="pässword")).json()["code"] == 400
    # The token works for the group API.
    assert (await get(daemon.web, "/querymygrps", userid=uid,
                      token=r["token"])).json()["code"] == 0


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_refused(daemon):
    r = await http("POST", f"http://127.0.0.1:{daemon.web}/login", b"x" * 400_000,
                   {"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 413
    assert (await get(daemon.web, "/grpinfo", groupid="1")).json()["code"] == 401  # alive


# -- exactly the 66boss app's requests (duanjisi/IMProject) ----------------------------------

ACCOUNT_ENTITY = ("user_id", "user_name", "mobile_phone", "lastlogin_time", "access_token",
                  "avatar", "sex", "signature", "province", "city", "district",
                  "district_str", "cover_pic")


def base_data_request(reply: dict):
    """BaseDataRequest: code 1 is success with the entity in ``result``; otherwise the app
    shows ``message``, unless ``status`` (unboxed, so it must be there) is 401: log out."""
    if reply["code"] == 1:
        return "success", reply["result"]
    assert isinstance(reply["status"], int)
    return ("logout", None) if reply["status"] == 401 else ("failure", reply["message"])


def base_model_request(reply: dict):
    """BaseModelRequest (the group API): code 0 is success, ``data`` parsed."""
    if reply["code"] == 0:
        return "success", reply.get("data")
    return "failure", reply["message"]


def phone_number() -> str:
    return "138" + unique("").replace("x", "")[-8:].zfill(8)


@pytest_twisted.ensureDeferred
async def test_app_login_reply_as_the_app_reads_it(daemon):
    phone = phone_number()
    uid, _ = await daemon.user(phone, password="密码pw", name="小明")
    # LoginRequest: okhttp FormEncodingBuilder, POST to ucenter/login/index.
    reply = (await post_form(daemon.web, "/ucenter/login/index", mobile_phone=phone,
                             password="密码pw")).json()
    outcome, account = base_data_request(reply)
    assert outcome == "success"
    assert set(ACCOUNT_ENTITY) <= set(account)
    assert all(isinstance(account[k], str) for k in ACCOUNT_ENTITY)
    assert account["user_id"] == str(uid) and account["user_name"] == "小明"
    assert account["mobile_phone"] == phone and len(account["access_token"]) >= 32
    # The access_token is an imd token: the group API takes it.
    r = (await post_form(daemon.web, "/querymygrps", userid=uid,
                         access_token=account["access_token"])).json()
    assert base_model_request(r) == ("success", [])

    for params in [dict(mobile_phone=phone, password="wrong"),
                   dict(mobile_phone="13999999999" + phone, password="密码pw"),
                   dict(mobile_phone=phone)]:
        outcome, message = base_data_request(
            (await post_form(daemon.web, "/ucenter/login/index", **params)).json())
        assert outcome == "failure" and message, params
    outcome, _ = base_data_request((await get(daemon.web, "/ucenter/login/index",
                                              mobile_phone=phone, password="密码pw")).json())
    assert outcome == "failure"


@pytest_twisted.ensureDeferred
async def test_group_api_with_the_apps_access_token(daemon):
    (a, ta), (b, tb), (c, tc) = await users(daemon, 3)
    # BaseModelRequest: a form POST; HttpUtil adds access_token to every call.
    created = (await post_form(daemon.web, "/creategrp", creator=a, members=f"{a},{b}",
                               name="群", access_token=ta)).json()
    assert created["code"] == 0 and created["message"] == "OK"
    outcome, group = base_model_request(created)
    assert outcome == "success" and group["creator"] == str(a)
    gid = group["groupid"]
    for path, params, token in [
            ("/addmembers", dict(groupid=gid, members=str(c)), tb),
            ("/editgrp", dict(groupid=gid, notice="公告"), ta),
            ("/delmembers", dict(groupid=gid, members=str(c)), ta),
            ("/refreshgrp", dict(groupid=gid), ta)]:
        r = (await post_form(daemon.web, path, access_token=token, **params)).json()
        assert r == {"code": 0, "message": "OK"}, (path, r)
    outcome, info = base_model_request((await post_form(
        daemon.web, "/grpinfo", groupid=gid, access_token=tb)).json())
    assert outcome == "success" and info["notice"] == "公告" and len(info["members"]) == 2
    outcome, mine = base_model_request((await post_form(
        daemon.web, "/querymygrps", userid=b, access_token=tb)).json())
    assert outcome == "success" and [g["groupid"] for g in mine] == [gid]
    # Errors keep imd's codes and reach the app's failure path with a message.
    for path, params, code in [("/grpinfo", dict(groupid=gid, access_token=tc), 403),
                               ("/grpinfo", dict(groupid=gid, access_token="0" * 32), 401),
                               ("/grpinfo", dict(groupid="999999998", access_token=ta), 404)]:
        r = (await post_form(daemon.web, path, **params)).json()
        assert r["code"] == code and base_model_request(r)[0] == "failure", (path, r)
