"""Hostile input over the wire (issue 11, points 7 and 9): one JSON reader for every client
JSON text, wrong value types, and the small ones (NUL in paths, non-ASCII auth, account
case, the Host header, JSONP callbacks, oversized WebSocket frames)."""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import pytest_twisted

from imd.protocols.webim.auth import sign
from tests.conftest import unique
from tests.test_boss import logged_in
from tests.test_minami import befriend as minami_befriend
from tests.test_minami import connect as minami_connect
from tests.test_minami import new_user, ok, register
from tests.test_uploads import make_png
from tests.test_webim import parse, tab
from tests.test_xuanxuan import login as xx_login
from tests.wire import CLOSED, get, http, multipart, post_form

DEEP = "[" * 50_000 + "]" * 50_000  # deeper than any recursive parser goes
NESTED = "[" * 990 + "]" * 990  # fits a C parser's stack alone, not a handler's


@pytest_twisted.ensureDeferred
async def test_deep_json_bodies_get_each_protocols_error(daemon):
    base = f"http://127.0.0.1:{daemon.web}"
    for prefix in ("/im", "/whisperIM"):  # minami register: code 403 in its reply shape
        r = await http("POST", f"{base}{prefix}/register", DEEP[:90_000].encode(),
                       {"Content-Type": "application/json"})
        assert r.status == 200 and r.json() == ok(403)
    for body in (DEEP[:90_000], '{"account": 1, "password": "x"}',
                 '{"account": ["a"], "password": "x"}', '{"account": "a", "password": NaN}',
                 '[]', '"\\ud800"'):  # 66boss /login: code 400 in its JSON shape
        r = await http("POST", f"{base}/login", body.encode(),
                       {"Content-Type": "application/json"})
        assert r.status == 200 and r.json()["code"] == 400, (body[:40], r.body[:200])


@pytest_twisted.ensureDeferred
async def test_xuanxuan_bad_lines_and_wrong_types_fail_and_the_session_goes_on(daemon):
    uid, x, _, _ = await xx_login(daemon)
    for line in (DEEP[:4000], '{"module": "chat", "method": "ping", "x": NaN}',
                 '{"a": 1, "a": 2}', "[" * 40 + "]" * 40):
        x.client.send(line)
        reply = await x.next()
        assert reply["result"] == "fail", reply
    gid = unique("g")
    created = await x.call("create", [gid, "a chat", "group", [uid]])
    assert created["result"] == "success", created
    for method, params in [("changename", [gid, 12345]), ("changename", [gid, ["x"]]),
                           ("create", [unique("g"), {"n": 1}, "group", [uid]]),
                           ("create", [unique("g"), "n", ["group"], [uid]]),
                           ("message", [[{"cgid": gid, "content": "x",
                                          "contentType": ["text"]}]]),
                           ("login", ["a", "b", ["online"]])]:
        reply = await x.call(method, params)
        assert reply["result"] == "fail", (method, reply)
    assert (await x.call("ping"))["result"] == "success"
    sent = await x.call("message", [[{"cgid": gid, "content": "still here"}]])
    assert sent["result"] == "success" and sent["data"][0]["content"] == "still here"


@pytest_twisted.ensureDeferred
async def test_minami_deep_frame_is_a_403_and_the_session_goes_on(daemon):
    _, a = await new_user(daemon)
    _, b = await new_user(daemon)
    await minami_befriend(daemon, a, b)
    for frame in ("[" * 2000 + "]" * 2000, '{"id": "1", "toFriend": "%s", "payload": "x", '
                  '"payload": "y"}' % b.id, '{"id": 1e999, "toFriend": "1", "payload": "x"}'):
        a.send(frame)
        assert await a.next() == ok(403)
    a.send({"id": "9", "toFriend": b.id, "payload": "fine"})
    assert await a.next() == ok(id="9")
    assert await b.next() == {"from": a.id, "payload": "fine"}


@pytest_twisted.ensureDeferred
async def test_webim_nested_setting_is_refused_and_online_keeps_working(daemon):
    w = await tab(daemon)
    for data in (NESTED, DEEP[:8000], '{"a": NaN}'):
        reply = await w.call("setting", data=data)
        assert reply["success"] is False and reply["error_msg"], reply
    assert await w.call("setting", data=json.dumps({"play_sound": True})) == "ok"
    again = await w.online()
    assert again["setting"] == {"play_sound": True}


@pytest_twisted.ensureDeferred
async def test_jsonp_callback_with_a_trailing_newline_is_refused(daemon):
    w = await tab(daemon)
    r = await get(daemon.web, "/webim/buddies", token=w.token, callback="cb\n")
    assert r.status == 400 and json.loads(r.body)["success"] is False
    r = await get(daemon.web, "/webim/buddies", token=w.token, callback="a.b")
    assert r.status == 200 and r.body.startswith(b"a.b(")


@pytest_twisted.ensureDeferred
async def test_nul_in_a_file_path_is_a_404(daemon):
    for path in ("/upload/files/a%00b", "/upload/files/%00", "/sys/attach-download-1%00.json",
                 "/upload/files/a%BDb", "/upload/files/%0D"):
        r = await http("GET", f"http://127.0.0.1:{daemon.web}{path}")
        assert r.status in (400, 403, 404), (path, r.status, r.body[:200])


@pytest_twisted.ensureDeferred
async def test_oversized_websocket_frames_are_closed_with_1009(daemon):
    _, _, c = await logged_in(daemon)
    c.send("text_1_" + "x" * 5000 + "_unicast_x")  # 66boss: over --max-frame 4096
    assert await c.next() is CLOSED and c.proto.close_code == 1009
    _, m = await new_user(daemon)
    m.send("x" * 150_000)  # minami: over its hard limit (--max-body 100000)
    assert await m.next() is CLOSED and m.ws.proto.close_code == 1009


@pytest_twisted.ensureDeferred
async def test_account_names_differ_in_case_only_once(daemon):
    account = unique("CaseMix")
    fields = {"password": "pw", "mail": "m@example.org"}
    assert await register(daemon, account=account, **fields) == ok()
    for other in (account.lower(), account.upper()):
        assert await register(daemon, account=other, **fields) == ok(504)
    client, first = await minami_connect(daemon, account.lower())
    assert first["code"] == 200, first
    client.ws.close()
    r = await post_form(daemon.web, "/login", account=account.upper(), password="pw")
    assert r.status == 200 and r.json()["code"] == 1, r.body
    user = await (await daemon.store()).get_user(int(r.json()["id"]))
    assert user.account == account  # the display form is kept


@pytest_twisted.ensureDeferred
async def test_accounts_from_before_case_folding_are_found_and_kept_unique(fresh_daemon):
    d = fresh_daemon().start()
    account = unique("OldCase")
    uid, _ = await d.user(account, password="pw")
    store = await d.store()
    # As the index was before: keyed by the name as created, no folded key, no mark.
    await store.redis.rename(f"{store.p}acct:{account.lower()}", f"{store.p}acct:{account}")
    await store.redis.delete(f"{store.p}acctfold")
    await d.close_store()
    d.stop()
    d.start()
    fields = {"password": "pw", "mail": "m@example.org"}
    assert await register(d, account=account.lower(), **fields) == ok(504)
    for name in (account, account.upper()):
        r = await post_form(d.web, "/login", account=name, password="pw")
        assert r.status == 200 and r.json()["id"] == str(uid), (name, r.body)


@pytest_twisted.ensureDeferred
async def test_host_header_only_when_it_names_this_listener_or_a_listed_host(fresh_daemon):
    d = fresh_daemon("--webim-secret", "s3cret", "--public-hosts", "chat.example.com").start()
    uid, token = await d.user(unique("host"))
    url = f"http://127.0.0.1:{d.web}/webim/online?" + urlencode({"token": token})
    for host, shown in [("evil.example.net", f"127.0.0.1:{d.web}"),
                        (f"evil.example.net:{d.web}", f"127.0.0.1:{d.web}"),
                        ("chat.example.com", "chat.example.com"),
                        (f"localhost:{d.web}", f"localhost:{d.web}"),
                        (f"127.0.0.1:{d.web}", f"127.0.0.1:{d.web}")]:
        reply = parse(await http("GET", url, headers={"Host": host}))
        assert reply["connection"]["server"] == f"http://{shown}/packets", (host, reply)
    # a non-ASCII signed auth value is refused like any bad one (was a 500)
    for auth in ("١٠٠٠١.9999999999.ab", f"{uid}.{int(time.time()) + 60}.é" + "0" * 63,
                 sign("s3cret", uid, int(time.time()) + 60) + "\u00e9"):
        r = await get(d.web, "/webim/online", auth=auth)
        assert r.status == 200 and parse(r)["success"] is False, (auth, r.status)
    await d.close_store()


@pytest_twisted.ensureDeferred
async def test_boss_upload_url_ignores_a_foreign_host(fresh_daemon):
    d = fresh_daemon().start()
    _, token = await d.user(unique("up"))
    body, body_type = multipart(make_png(3, 4), "a.png", content_type="image/png")
    r = await http("POST", f"http://127.0.0.1:{d.web}/upload/writev2?token={token}", body,
                   {"Content-Type": body_type, "Host": "evil.example.net"})
    assert r.status == 200, r.body
    assert f"http://127.0.0.1:{d.web}/upload/files/" in r.body.decode(), r.body
    await d.close_store()


@pytest_twisted.ensureDeferred
async def test_webim_ids_with_separator_characters_are_ignored(daemon):
    w = await tab(daemon)
    for value in ("1\x1c", "\x1d1", "10001\x1e,2"):  # str.strip() strips these, int() not
        reply = await w.call("buddies", ids=value)
        assert reply == [] or isinstance(reply, list), reply


@pytest_twisted.ensureDeferred
async def test_xuanxuan_requests_cut_off_by_a_too_long_line_leave_no_traceback(daemon):
    uid, x, _, _ = await xx_login(daemon)
    for i in range(5):  # requests in flight, then a line over --max-frame closes the socket
        x.send("chat", "create", [unique("g"), f"chat {i}", "group", [uid]])
    x.client.send("x" * 5000)
    while (await x.next()) is not CLOSED:
        pass


def test_the_reader_counts_nesting_outside_strings_only():
    from imd.jsonin import BadJSON, read

    assert read('["' + "[" * 100 + '\\"{"]') == ["[" * 100 + '"{']
    assert read("[" * 32 + "]" * 32) is not None
    for text in ("[" * 33 + "]" * 33, '{"a": 1, "a": 1}', "[1e400]", '"\\udc00"', b"\xc3(",
                 "[1] [2]", "x" * 10):
        try:
            read(text)
        except BadJSON:
            continue
        raise AssertionError(f"accepted {text!r}")
    try:
        read(b"[" + b"1," * 600 + b"1]", limit=1000)
    except BadJSON as e:
        assert "longer than 1000" in str(e)
    else:
        raise AssertionError("over the limit was accepted")
