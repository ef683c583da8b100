"""The admin endpoint (``--admin``): /metrics after real traffic of two protocols, /health
and /ready (Redis stopped), the admin API with and without its token, disabling a user,
kicking sessions, a system message to 66boss and xuanxuan, imdctl on the same operations,
and the admin page in headless Chromium."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from tests.conftest import REPO, unique
from tests.test_cross import Boss, Xuanxuan
from tests.test_ctl import imdctl
from tests.wire import CLOSED, get, http, post_form

WAIT = 5.0


async def scrape(d) -> dict[tuple, float]:
    """Every sample of /metrics: (name, sorted label items) -> value."""
    response = await get(d.admin, "/metrics")
    assert response.status == 200
    assert response.header("content-type").startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def ctl(*args: str) -> tuple[int, str, str]:
    """imdctl without blocking the reactor (the test's clients keep answering pings)."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-c", "from imd.ctl import main; main()", *args],
        env=dict(os.environ, PYTHONPATH=str(REPO)), path=str(REPO))
    return code, out.decode(), err.decode()


async def admin_token(d) -> str:
    code, out, err = await ctl("--data-dir", str(d.data_dir), "admin-token")
    assert code == 0, err
    return out.strip()


_tokens: dict[str, str] = {}


async def token_for(d) -> str:
    if str(d.data_dir) not in _tokens:
        _tokens[str(d.data_dir)] = await admin_token(d)
    return _tokens[str(d.data_dir)]


async def api(d, method: str, path: str, token: str | None = "", **params):
    """Call the admin API; ``token=""`` uses a valid one, None sends none."""
    if token == "":
        token = await token_for(d)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    url = f"http://127.0.0.1:{d.admin}/api/{path}"
    if method == "GET":
        return await http("GET", url, headers=headers)
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    from urllib.parse import urlencode
    return await http(method, url, urlencode(params).encode(), headers)


async def party(d, cls, prefix: str):
    account = unique(prefix)
    uid, token = await d.user(account, "pw")
    p = cls(d, uid, token, account)
    await p.login()
    return p


async def closed(client) -> None:
    """Wait until the server closes the client's connection."""
    while await client.next(timeout=WAIT) is not CLOSED:
        pass


@pytest_twisted.ensureDeferred
async def test_metrics_count_logins_messages_and_latency_per_protocol(daemon):
    before = await scrape(daemon)
    boss = await party(daemon, Boss, "mb")
    xx = await party(daemon, Xuanxuan, "mx")
    await boss.send(xx.uid, "to xuanxuan")
    await xx.receive(boss.uid, "to xuanxuan")
    await xx.send(boss.uid, "to boss")
    await boss.receive(xx.uid, "to boss")
    after = await scrape(daemon)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    for protocol in ("66boss", "xuanxuan"):
        assert moved("imd_connections_total", protocol=protocol) >= 1, protocol
        assert moved("imd_logins_total", protocol=protocol) >= 1, protocol
        assert moved("imd_messages_in_total", protocol=protocol) >= 1, protocol
        assert moved("imd_messages_out_total", protocol=protocol) >= 1, protocol
        # Both messages were accepted and written by this node: latency observed.
        assert moved("imd_delivery_latency_seconds_count", protocol=protocol) >= 1, protocol
        count = value(after, "imd_delivery_latency_seconds_count", protocol=protocol)
        # Buckets are cumulative: every delivery here took less than 10 s.
        for le in ("+Inf", "10.0"):
            assert value(after, "imd_delivery_latency_seconds_bucket", protocol=protocol,
                         le=le) == count, (protocol, le)
        assert value(after, "imd_delivery_latency_seconds_bucket", protocol=protocol,
                     le="0.0005") <= count
        assert value(after, "imd_sessions", protocol=protocol) >= 1, protocol
        assert value(after, "imd_open_connections", protocol=protocol) >= 1, protocol
    assert moved("imd_messages_in_total", protocol="minami") == 0
    assert value(after, "imd_redis_roundtrip_seconds_count") > \
        value(before, "imd_redis_roundtrip_seconds_count")  # a PING per scrape
    assert ("imd_offline_queue_messages", ()) in after
    nodes = [dict(labels) for name, labels in after if name == "imd_node_info"]
    assert len(nodes) == 1 and len(nodes[0]["node"]) == 16 and nodes[0]["version"]

    # A refused message counts as an error of its kind.
    await boss.send(999999999, "to nobody")
    assert (await boss.client.next(timeout=WAIT)).startswith("error_text_")
    errors = await scrape(daemon)
    assert value(errors, "imd_errors_total", kind="no_such_user") == \
        value(after, "imd_errors_total", kind="no_such_user") + 1
    boss.client.close()
    xx.client.close()


@pytest_twisted.ensureDeferred
async def test_health_and_ready_follow_redis(fresh_daemon):
    d = fresh_daemon().start()
    assert (await get(d.admin, "/health")).status == 200
    ready = await get(d.admin, "/ready")
    assert ready.status == 200 and ready.json() == {"ready": True}
    redis_pid = int((d.data_dir / "redis.pid").read_text())
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        ready = await get(d.admin, "/ready")
        assert ready.status == 503
        assert "Redis" in ready.json()["reason"] and ready.json()["ready"] is False
        assert (await get(d.admin, "/health")).status == 200  # the process still runs
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    assert (await get(d.admin, "/ready")).status == 200


def test_admin_none_turns_the_endpoint_off(fresh_daemon):
    d = fresh_daemon("--admin", "none").start()
    assert d.admin == 0 and "admin (metrics" not in d.log()


@pytest_twisted.ensureDeferred
async def test_every_api_call_needs_the_token(daemon):
    calls = [("GET", "users"), ("POST", "users"), ("POST", "users/x/disable"),
             ("POST", "users/x/enable"), ("POST", "users/x/password"), ("GET", "sessions"),
             ("POST", "kick"), ("GET", "groups"), ("GET", "groups/1"), ("POST", "message")]
    for method, path in calls:
        for token in (None, "wrong-" + await token_for(daemon)):
            response = await api(daemon, method, path, token)
            assert response.status == 401, (method, path, token)
            assert response.header("www-authenticate").startswith("Bearer")
    assert (await api(daemon, "GET", "nothing")).status == 404
    # A token is also refused in the store's plain form: only its digest is kept there.
    store = await daemon.store()
    assert not await store.redis.sismember("imd:admintok", await token_for(daemon))


@pytest_twisted.ensureDeferred
async def test_api_users_groups_sessions_and_kick(daemon):
    account = unique("api")
    created = await api(daemon, "POST", "users", account=account, password="first",
                        name="Api User")
    assert created.status == 201, created.body
    uid = created.json()["id"]
    assert (await api(daemon, "POST", "users", account=account, password="x")).status == 400
    listed = (await api(daemon, "GET", "users")).json()
    assert {"id": uid, "account": account, "name": "Api User", "disabled": False} in listed

    assert (await post_form(daemon.web, "/login", account=account, password="first")
            ).json()["code"] == 1
    assert (await api(daemon, "POST", f"users/{account}/password", password="second")
            ).status == 200
    assert (await post_form(daemon.web, "/login", account=account, password="first")
            ).json()["code"] != 1
    assert (await post_form(daemon.web, "/login", account=account, password="second")
            ).json()["code"] == 1
    assert (await api(daemon, "POST", "users/nobody-xyz/password", password="p")
            ).status == 404

    other, _ = await daemon.user(unique("apg"), "pw")
    group = await (await daemon.store()).create_group(uid, "Ops group", [other])
    groups = (await api(daemon, "GET", "groups")).json()
    assert {"id": group.id, "name": "Ops group", "creator": uid, "members": 2,
            "public": False} in groups
    members = (await api(daemon, "GET", f"groups/{group.id}")).json()["members"]
    assert [m["id"] for m in members] == sorted([uid, other])
    assert (await api(daemon, "GET", "groups/999999999")).status == 404

    one = await party(daemon, Boss, "k1")
    two = await party(daemon, Boss, "k2")
    two_again = Boss(daemon, two.uid, two.token, two.account)
    await two_again.login()
    state = (await api(daemon, "GET", "sessions")).json()
    assert state["nodes"][state["node"]]["66boss"] >= 3
    mine = [s for s in state["sessions"] if s["user"] == one.uid]
    assert len(mine) == 1 and mine[0]["protocol"] == "66boss" and \
        mine[0]["account"] == one.account and mine[0]["node"] == state["node"]
    kicked = await api(daemon, "POST", "kick", user=str(one.uid), session=mine[0]["id"])
    assert kicked.status == 200
    await closed(one.client)
    # Without a session: every session of the user.
    assert (await api(daemon, "POST", "kick", user=two.account)).status == 200
    await closed(two.client)
    await closed(two_again.client)
    state = (await api(daemon, "GET", "sessions")).json()
    assert not [s for s in state["sessions"] if s["user"] in (one.uid, two.uid)]


@pytest_twisted.ensureDeferred
async def test_disabled_user_is_kicked_and_cannot_log_in(daemon):
    boss = await party(daemon, Boss, "db")
    xx = Xuanxuan(daemon, boss.uid, boss.token, boss.account)  # the same user on xuanxuan
    await xx.login()
    # The login is over once the client has its lists (a kick before that is the race of
    # a client that leaves during its login, not what this test is about).
    await xx._until(lambda packet: packet["method"].lower() == "usergetlist")
    token = await boss.fresh_token()
    assert (await api(daemon, "POST", f"users/{boss.account}/disable")).status == 200
    await closed(boss.client)
    lines = []
    while (line := await xx.client.next(timeout=WAIT)) is not CLOSED:
        lines.append(line)
    assert any('"kickoff"' in line for line in lines), lines
    assert {"id": boss.uid, "account": boss.account, "name": boss.account,
            "disabled": True} in (await api(daemon, "GET", "users")).json()

    again = Boss(daemon, boss.uid, boss.token, boss.account)
    again.client = await again.connect()
    again.client.send(f"login_{boss.uid}_{token}")  # a token issued before: refused too
    assert (await again.client.next(timeout=WAIT)).startswith("error_login_")
    refused = Xuanxuan(daemon, boss.uid, boss.token, boss.account)
    try:
        await refused.login()
    except AssertionError as e:
        assert "wrong account or password" in str(e)
    else:
        raise AssertionError("a disabled user logged in on xuanxuan")
    assert (await post_form(daemon.web, "/login", account=boss.account, password="pw")
            ).json()["code"] != 1

    assert (await api(daemon, "POST", f"users/{boss.uid}/enable")).status == 200
    again.client.send(f"login_{boss.uid}_{token}")
    assert await again.client.next(timeout=WAIT) == "ok"
    again.client.close()
    refused.client.close()


@pytest_twisted.ensureDeferred
async def test_system_message_reaches_66boss_and_xuanxuan(daemon):
    boss = await party(daemon, Boss, "sb")
    xx = await party(daemon, Xuanxuan, "sx")
    group = await (await daemon.store()).create_group(boss.uid, "Announce", [xx.uid])
    sent = await api(daemon, "POST", "message", group=str(group.id), text="maintenance at 6")
    assert sent.status == 200, sent.body
    system = sent.json()["from"]
    assert sorted(sent.json()["to"]) == sorted([boss.uid, xx.uid])
    await boss.receive(system, "maintenance at 6")
    await xx.receive(system, "maintenance at 6")
    sent = await api(daemon, "POST", "message", user=xx.account, text="just you")
    assert sent.json() == {"from": system, "to": [xx.uid]}
    await xx.receive(system, "just you")
    # Nobody logs in as the system user.
    users = {u["id"]: u for u in (await api(daemon, "GET", "users")).json()}
    assert users[system]["disabled"] and users[system]["name"] == "System"
    assert (await api(daemon, "POST", "message", text="to whom?")).status == 400
    boss.client.close()
    xx.client.close()


@pytest_twisted.ensureDeferred
async def test_imdctl_runs_the_same_operations(daemon):
    at = ("--data-dir", str(daemon.data_dir))
    boss = await party(daemon, Boss, "cb")
    # Each node reports its sessions to the store every 5 s: imdctl sees them from there.
    for _ in range(40):
        sessions = json.loads((await ctl(*at, "sessions"))[1])
        if any(counts.get("66boss", 0) >= 1 for counts in sessions.values()):
            break
        await deferLater(reactor, 0.25, lambda: None)
    else:
        raise AssertionError(sessions)

    code, said, err = await ctl(*at, "say", "--user", boss.account, "hello from imdctl")
    assert code == 0, err
    users = {u["account"]: u for u in (await api(daemon, "GET", "users")).json()}
    system = [u["id"] for u in users.values() if u["name"] == "System" and u["disabled"]]
    assert said.split() == [str(boss.uid)]
    await boss.receive(system[0], "hello from imdctl")

    assert (await ctl(*at, "kick", boss.account))[0] == 0
    await closed(boss.client)

    group = await (await daemon.store()).create_group(boss.uid, "Ctl group", [])
    assert f"{group.id}\tCtl group\t1" in imdctl(*at, "groups").stdout
    assert imdctl(*at, "members", str(group.id)).stdout.split() == \
        [str(boss.uid), boss.account, boss.account]
    assert imdctl(*at, "members", "999999999").returncode == 1

    assert imdctl(*at, "passwd", boss.account, "--password-stdin", stdin="new\n"
                  ).returncode == 0
    assert (await post_form(daemon.web, "/login", account=boss.account, password="new")
            ).json()["code"] == 1
    assert imdctl(*at, "disable", boss.account).returncode == 0
    assert f"{boss.uid}\t{boss.account}\t{boss.account}\tdisabled" in imdctl(*at, "users").stdout
    assert (await post_form(daemon.web, "/login", account=boss.account, password="new")
            ).json()["code"] != 1
    assert imdctl(*at, "enable", boss.account).returncode == 0
    assert (await post_form(daemon.web, "/login", account=boss.account, password="new")
            ).json()["code"] == 1
    # The token imdctl makes is the API's.
    assert (await api(daemon, "GET", "users", await admin_token(daemon))).status == 200


@pytest_twisted.ensureDeferred
async def test_admin_page_shows_nodes_sessions_and_rates(daemon, browser):
    boss = await party(daemon, Boss, "pb")
    page = await browser.page(f"http://127.0.0.1:{daemon.admin}/")
    await page.wait_for("document.readyState === 'complete' && "
                        "document.getElementById('token') !== null")
    await page.fill("token", "wrong")
    await page.click("#connect")
    await page.wait_for("document.getElementById('error').textContent === 'wrong token'")
    await page.fill("token", await token_for(daemon))
    await page.click("#connect")
    await page.wait_for(f"document.getElementById('sessions').textContent.includes("
                        f"{json.dumps(boss.account)})")
    node = await page.text("#node")
    assert len(node) == 16 and node in await page.text("#nodes")
    assert "66boss" in await page.text("#nodes")
    await boss.send(boss.uid, "to myself")  # a message: the rates table gets its row
    await page.wait_for("[...document.querySelectorAll('#rates tbody tr')].some("
                        "r => r.textContent.startsWith('66boss'))")
    assert await page.js("document.getElementById('error').textContent") == ""
    page.close()
    boss.client.close()
