"""The Redis store and the hub in-process, on a real embedded redis-server."""

from __future__ import annotations

import hashlib
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from imd.hub import Hub, HubError
from imd.model import GROUP, TEXT, UNICAST, Message
from imd.passwords import check_verifier, make_verifier, md5hex
from imd.store.redis import AccountTaken, RedisStore


class FakeSession:
    """A hub Session that records what it is given."""

    def __init__(self, user_id: int):
        self.user_id = user_id
        self.got: list[Message] = []

    def deliver(self, message: Message) -> None:
        self.got.append(message)


async def users(store: RedisStore, n: int) -> list[int]:
    return [(await store.create_user(f"acct{i}", f"name{i}", "v")).id for i in range(n)]


@pytest_twisted.ensureDeferred
async def test_users_and_groups_share_one_id_counter(store):
    a, b = await users(store, 2)
    group = await store.create_group(a, "g", [b])
    c = (await store.create_user("later", "Later", "v")).id
    assert a < b < group.id < c
    assert group.members == (a, b)
    with pytest.raises(AccountTaken):
        await store.create_user("acct0", "again", "v")
    assert await store.find_account("acct1") == b
    assert [u.account for u in await store.list_users()] == ["acct0", "acct1", "later"]
    assert await store.users_exist([a, 999999]) == [999999]
    await store.rename_user(a, "renamed")
    assert [u.id for u in await store.find_by_name("renamed")] == [a]
    assert await store.find_by_name("name0") == []


@pytest_twisted.ensureDeferred
async def test_the_system_group_is_no_ones_room(store):
    """xuanxuan's system chat holds every user; it is not listed among a user's groups (webim
    rooms, 66boss querymygrps), before or after it was made."""
    a, b = await users(store, 2)
    group = await store.create_group(a, "g", [b])
    system = await store.system_group()
    c = (await store.create_user("later", "Later", "v")).id
    assert a in (await store.get_group(system)).members
    assert c in await store.group_members(system)
    assert await store.user_groups(a) == [group.id]
    assert await store.user_groups(c) == []


@pytest_twisted.ensureDeferred
async def test_password_verifier_is_salted_scrypt_of_md5(store):
    v1, v2 = await make_verifier(md5hex("pw")), await make_verifier(md5hex("pw"))
    assert v1 != v2 and v1.startswith("scrypt$")
    assert "pw" not in v1 and md5hex("pw") not in v1
    assert await check_verifier(v1, md5hex("pw"))
    assert await check_verifier(v1, md5hex("pw").upper())  # md5hex compares case-blind
    assert not await check_verifier(v1, md5hex("wrong"))
    assert not await check_verifier("garbage", md5hex("pw"))
    assert not await check_verifier(None, md5hex("pw"))


@pytest_twisted.ensureDeferred
async def test_tokens_expire_and_are_revocable(store):
    a, = await users(store, 1)
    token = await store.issue_token(a, 100)
    assert len(token) == 32 and await store.check_token(token) == a
    key = f"imd:th:{hashlib.sha256(token.encode()).hexdigest()}"
    assert 0 < await store.redis.ttl(key) <= 100
    await store.revoke_token(token)
    assert await store.check_token(token) is None
    assert await store.check_token("") is None and await store.check_token("x" * 500) is None


@pytest_twisted.ensureDeferred
async def test_queue_is_drained_once_and_capped(store):
    a, b = await users(store, 2)
    for i in range(5):
        await store.post(Message(sender=a, to=b, ctype=UNICAST, kind=TEXT, body=f"m{i}"), "n1")
    was_live, queued = await store.attach(b, "n1")
    assert [m.body for m in queued] == ["m2", "m3", "m4"]  # queue_limit=3 keeps the newest
    assert not was_live
    assert await store.attach(b, "n1") == (False, [])  # node n1 has no liveness key
    history = await store.history(f"{a}&{b}" if a < b else f"{b}&{a}")
    assert [m.body for m in history] == ["m0", "m1", "m2", "m3", "m4"]
    ids = [m.id for m in history]
    assert ids == sorted(ids) and len(set(ids)) == 5


@pytest_twisted.ensureDeferred
async def test_history_is_capped_and_filtered_by_time(store):
    a, b = await users(store, 2)
    group = await store.create_group(a, "g", [b])
    for i in range(7):
        await store.post(Message(sender=a, to=group.id, ctype=GROUP, kind=TEXT, body=str(i)),
                         "n1")
    history = await store.history(f"g:{group.id}")
    assert [m.body for m in history] == ["2", "3", "4", "5", "6"]  # history_limit=5
    assert await store.history(f"g:{group.id}", since_ms=history[-1].ts + 1) == []


@pytest_twisted.ensureDeferred
async def test_hub_delivers_queued_messages_before_live_ones(store):
    a, b = await users(store, 2)
    hub = Hub(store, reactor, node_id="n1")
    await hub.start()
    sa, sb = FakeSession(a), FakeSession(b)
    await hub.login(sa)
    await hub.send(sa, UNICAST, b, TEXT, "queued")
    login = defer.ensureDeferred(hub.login(sb))
    # A message from another node arrives (over pub/sub) before the queue is drained: it
    # waits behind the queued one.
    live = Message(sender=a, to=b, ctype=UNICAST, kind=TEXT, body="live", id=10**9, ts=1)
    hub.remote_delivery("chan", f"{b}|{live.to_json()}")
    assert sb.got == []
    await login
    assert [m.body for m in sb.got] == ["queued", "live"]
    assert sa.got == []  # not echoed to the session it came from
    await hub.stop()


@pytest_twisted.ensureDeferred
async def test_hub_refusals_store_nothing(store):
    a, b, c = await users(store, 3)
    group = await store.create_group(a, "g", [b])
    hub = Hub(store, reactor, node_id="n1", max_body=10)
    await hub.start()
    sc = FakeSession(c)
    for args, reason in [((UNICAST, 999999, TEXT, "x"), "no such user"),
                         ((GROUP, 999999, TEXT, "x"), "no such group"),
                         ((GROUP, group.id, TEXT, "x"), "not a member"),
                         ((UNICAST, a, "sticker", "x"), "unknown message kind"),
                         ((UNICAST, a, TEXT, "x" * 11), "too long"),
                         (("broadcast", a, TEXT, "x"), "unknown conversation type")]:
        with pytest.raises(HubError, match=reason):
            await hub.send(sc, *args)
    assert await store.history(f"g:{group.id}") == []
    assert (await store.attach(a, "n1"))[1] == []
    await hub.stop()


@pytest_twisted.ensureDeferred
async def test_delivery_for_a_user_who_left_is_requeued(store):
    a, b = await users(store, 2)
    hub = Hub(store, reactor, node_id="n1")
    await hub.start()
    message = Message(sender=a, to=b, ctype=UNICAST, kind=TEXT, body="late", id=7, ts=1)
    hub.remote_delivery("chan", f"{b}|{message.to_json()}")  # b has no session here
    from twisted.internet import task

    await task.deferLater(reactor, 0.1, lambda: None)
    assert [m.body for m in (await store.attach(b, "n1"))[1]] == ["late"]
    await hub.stop()


@pytest_twisted.ensureDeferred
async def test_one_bad_message_does_not_sink_its_batch(store):
    a, b = await users(store, 2)
    bad = store.post(Message(sender=None, to=b, ctype=UNICAST, kind=TEXT, body="bad"), "n1")
    good = store.post(Message(sender=a, to=b, ctype=UNICAST, kind=TEXT, body="good"), "n1")
    with pytest.raises(TypeError):
        await bad
    await good
    assert [m.body for m in (await store.attach(b, "n1"))[1]] == ["good"]


@pytest_twisted.ensureDeferred
async def test_a_handler_that_raises_does_not_keep_its_batch_from_the_others(store):
    """post_then calls plain handlers, no Deferred: the one of the first message raising
    must not cost the later messages of the same script call their answers."""
    a, b = await users(store, 2)
    answers: list = []
    done = defer.Deferred()

    def stored(body):
        def handler(here):
            answers.append((body, here))
            if body == "first":
                raise RuntimeError("a broken adapter")
            if body == "third":
                done.callback(None)
        return handler

    def failed(failure):
        answers.append(("refused", failure.type.__name__))

    for to, body in ((b, "first"), (999_999, "refused"), (b, "second"), (b, "third")):
        store.post_then(Message(sender=a, to=to, ctype=UNICAST, kind=TEXT, body=body), "n1",
                        stored(body), failed)
    await done.addTimeout(5, reactor)
    assert answers == [("first", []), ("refused", "NoSuchUser"), ("second", []),
                       ("third", [])]
    assert [m.body for m in (await store.attach(b, "n1"))[1]] == ["first", "second", "third"]


@pytest_twisted.ensureDeferred
async def test_one_batch_routes_each_message_as_if_posted_alone(store):
    """Posts of one reactor turn share a script call: a refused one takes no place in the
    history, ids still increase, and a dead node's location found by the first message is
    gone for the next ones (they are queued, not published to nobody)."""
    a, b, c = await users(store, 3)
    await store.attach(a, "n1")
    await store.node_alive("gone", 60_000)
    await store.attach(b, "gone")
    await store.redis.delete(f"{store.p}alive:gone")  # b's node died without detaching

    def post(to, body):
        return store.post(Message(sender=a, to=to, ctype=UNICAST, kind=TEXT, body=body), "n1")

    posts = [post(b, "1"), post(999_999, "refused"), post(b, "2"), post(c, "3"), post(b, "4")]
    results = await defer.DeferredList(posts, consumeErrors=True)
    assert [ok for ok, _ in results] == [True, False, True, True, True]
    assert all(here == [a] for ok, here in results if ok)  # only the sender is live on n1
    assert await store.redis.smembers(f"{store.p}loc:{b}") == set()
    queued_b = (await store.attach(b, "n1"))[1]
    assert [m.body for m in queued_b] == ["1", "2", "4"]
    ids = [m.id for m in queued_b]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [m.body for m in (await store.attach(c, "n1"))[1]] == ["3"]
    history = await store.history(Message(sender=a, to=b, ctype=UNICAST, kind=TEXT,
                                          body="").conversation)
    assert [m.body for m in history] == ["1", "2", "4"]


@pytest_twisted.ensureDeferred
async def test_a_broken_session_does_not_stop_delivery_to_the_others(store):
    a, b = await users(store, 2)
    hub = Hub(store, reactor, node_id="n1")
    await hub.start()

    class Broken(FakeSession):
        def deliver(self, message):
            raise ConnectionError("going away")

    sa, broken, sb = FakeSession(a), Broken(b), FakeSession(b)
    for session in (sa, broken, sb):
        await hub.login(session)
    message = await hub.send(sa, UNICAST, b, TEXT, "still arrives")
    assert message.id and [m.body for m in sb.got] == ["still arrives"]
    with pytest.raises(HubError):
        await hub.send(FakeSession(None), UNICAST, b, TEXT, "from nobody")
    await hub.stop()


@pytest_twisted.ensureDeferred
async def test_dead_nodes_users_are_reaped_once_in_batches(store):
    uids = await users(store, 5)
    await store.node_alive("dead", 60_000)
    await store.node_alive("live", 60_000)
    for uid in uids:
        await store.attach(uid, "dead")
    await store.attach(uids[0], "live")  # still online elsewhere: not announced
    await store.detach(uids[1], "dead")  # left cleanly: not the reaper's business
    assert await store.reap("live") == []  # "dead" is still alive
    await store.redis.delete(f"{store.p}alive:dead")
    first, second = await defer.gatherResults([
        defer.ensureDeferred(store.reap("live", batch=1)),
        defer.ensureDeferred(store.reap("other", batch=1))])
    assert sorted(first + second) == uids[2:]
    assert not set(first) & set(second)
    assert await store.reap("live") == []
    assert await store.online_among(uids) == {uids[0]}
    assert await store.redis.smembers(f"{store.p}nodes") == {"live"}
    assert await store.node_alive("live", 60_000) is True
    assert await store.node_gone("live") == [uids[0]]
    assert await store.node_alive("live", 60_000) is False  # it had lapsed


@pytest_twisted.ensureDeferred
async def test_a_node_taken_for_dead_marks_its_users_live_again(store):
    (a,) = await users(store, 1)
    clock = task.Clock()
    hub = Hub(store, clock, node_id="n1", node_ttl=3)
    await hub.start()
    await hub.login(FakeSession(a))
    await store.redis.delete(f"{store.p}alive:n1")  # n1 was late: node n2 reaps it
    assert await store.reap("n2") == [a]
    assert not await store.is_online(a)
    clock.advance(1)  # n1's next heartbeat
    for _ in range(100):
        if await store.is_online(a):
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert await store.is_online(a)
    assert await store.reap("n2") == []
    await hub.stop()
