"""Remembered logins (issue 13, reconnect storms): a password a node has just verified is
accepted again without scrypt, across a restart of the node, and never once the password
changed or the user was disabled.  In-process, on a real embedded redis-server."""

from __future__ import annotations

import stat

import pytest
import pytest_twisted
from twisted.internet import task

import imd.accounts
from imd.accounts import Accounts
from imd.passwords import LoginKey, check_verifier, md5hex
from imd.throttle import LoginThrottles, Throttled


def load_key(directory, name: str = "login.key") -> LoginKey:
    return LoginKey.load(directory / name)


@pytest.fixture
def scrypt_calls(monkeypatch):
    """How many times the accounts ran the scrypt check."""
    calls = []

    def counting(verifier, md5):
        calls.append(md5)
        return check_verifier(verifier, md5)

    monkeypatch.setattr(imd.accounts, "check_verifier", counting)
    return calls


@pytest_twisted.ensureDeferred
async def test_a_second_login_skips_scrypt_even_after_a_restart(store, scrypt_calls, tmp_path):
    key = load_key(tmp_path)
    accounts = Accounts(store, 3600, login_key=key, remember_ttl=600)
    user = await accounts.create("alice", "pw")
    assert (await accounts.authenticate("alice", md5hex("pw"))).id == user.id
    assert len(scrypt_calls) == 1
    assert (await accounts.authenticate("ALICE", md5hex("pw").upper())).id == user.id
    assert (await accounts.login("alice", "pw"))[0].id == user.id
    assert len(scrypt_calls) == 1
    # A wrong password is checked with scrypt, and fails.
    assert await accounts.authenticate("alice", md5hex("nope")) is None
    assert len(scrypt_calls) == 2
    # A restarted node reads the same key from its data directory: still remembered.
    restarted = Accounts(store, 3600, login_key=load_key(tmp_path), remember_ttl=600)
    assert (await restarted.authenticate("alice", md5hex("pw"))).id == user.id
    assert len(scrypt_calls) == 2
    # Another node (another key) checks with scrypt once, then remembers too.
    other = Accounts(store, 3600, login_key=load_key(tmp_path, "other.key"), remember_ttl=600)
    assert (await other.authenticate("alice", md5hex("pw"))).id == user.id
    assert (await other.authenticate("alice", md5hex("pw"))).id == user.id
    assert len(scrypt_calls) == 3
    # What Redis holds expires and contains neither the password nor its md5.
    key_name = f"imd:vl:{user.id}"
    assert 0 < await store.redis.ttl(key_name) <= 600
    held = await store.redis.hgetall(key_name)
    assert len(held) == 2 and key.id in held
    assert not any(md5hex("pw") in v or "pw" == v for v in held.values())
    # Without remembering (remember_ttl 0), every login runs scrypt.
    plain = Accounts(store, 3600, login_key=key, remember_ttl=0)
    assert (await plain.authenticate("alice", md5hex("pw"))).id == user.id
    assert len(scrypt_calls) == 4


@pytest_twisted.ensureDeferred
async def test_a_new_password_or_disabling_forgets_the_login(store, scrypt_calls, tmp_path):
    accounts = Accounts(store, 3600, login_key=load_key(tmp_path), remember_ttl=600)
    user = await accounts.create("bob", "old")
    assert await accounts.authenticate("bob", md5hex("old")) is not None
    await accounts.set_password(user.id, "new")
    assert not await store.redis.exists(f"imd:vl:{user.id}")
    assert await accounts.authenticate("bob", md5hex("old")) is None
    assert len(scrypt_calls) == 2
    assert await accounts.authenticate("bob", md5hex("new")) is not None
    assert await accounts.authenticate("bob", md5hex("new")) is not None
    assert len(scrypt_calls) == 3
    # A remembered login whose verifier was replaced behind the store's back (another
    # writer) does not match the new verifier.
    await store.redis.hset(f"imd:u:{user.id}", "verifier",
                           (await store.user_fields(user.id, "verifier"))["verifier"][:-2]
                           + "00")
    assert await accounts.authenticate("bob", md5hex("new")) is None
    assert len(scrypt_calls) == 4
    await accounts.set_password(user.id, "new")
    assert await accounts.authenticate("bob", md5hex("new")) is not None
    assert len(scrypt_calls) == 5
    # Disabled: refused without scrypt, and enabling again does not bring the login back.
    await store.set_user_fields(user.id, disabled="1")
    assert await accounts.authenticate("bob", md5hex("new")) is None
    assert len(scrypt_calls) == 5
    await store.set_user_fields(user.id, disabled="")
    assert await accounts.authenticate("bob", md5hex("new")) is not None
    assert len(scrypt_calls) == 6


@pytest_twisted.ensureDeferred
async def test_the_throttle_runs_before_a_remembered_login(store, scrypt_calls, tmp_path):
    clock = task.Clock()
    throttles = LoginThrottles(clock, 3, 100, 60, 0, 60)
    accounts = Accounts(store, 3600, throttles, load_key(tmp_path), 600)
    await accounts.create("carol", "pw")
    assert await accounts.authenticate("carol", md5hex("pw"), "1.2.3.4") is not None
    for _ in range(3):
        assert await accounts.authenticate("carol", md5hex("guess"), "5.6.7.8") is None
    with pytest.raises(Throttled):
        await accounts.authenticate("carol", md5hex("pw"), "1.2.3.4")
    clock.advance(61)
    assert await accounts.authenticate("carol", md5hex("pw"), "1.2.3.4") is not None
    assert len(scrypt_calls) == 4


def test_the_login_key_is_private_and_kept(tmp_path):
    key = load_key(tmp_path)
    path = tmp_path / "login.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(tmp_path).id == key.id
    assert key.mac(1, "ab", "v") == load_key(tmp_path).mac(1, "AB", "v")
    assert key.mac(1, "ab", "v") != key.mac(2, "ab", "v") != key.mac(1, "ab", "w")
    path.write_text("junk")
    assert load_key(tmp_path).id != key.id


def test_the_login_key_can_live_outside_the_data_directory(fresh_daemon, tmp_path):
    """--login-key puts the key where backups of the data directory do not take it; a
    path that cannot be written stops the start with one line."""
    from tests.test_daemon import TWISTD, run

    key_dir = tmp_path / "secrets"
    key_dir.mkdir()
    d = fresh_daemon("--login-key", str(key_dir / "imd.key")).start()
    assert stat.S_IMODE((key_dir / "imd.key").stat().st_mode) == 0o600
    assert not (d.data_dir / "login.key").exists()
    assert (fresh_daemon().start().data_dir / "login.key").exists()  # the default

    result = run([*TWISTD, "-n", "--pidfile=", "imd", "--data-dir", str(tmp_path / "data"),
                  "--login-key", str(tmp_path / "no" / "such" / "dir" / "imd.key"),
                  "--web", "tcp:0", "--boss-line", "none", "--xuanxuan", "none",
                  "--admin", "none"])
    assert result.returncode == 1
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if "imd: error:" in line]
    assert len(errors) == 1 and "cannot use the login key file" in errors[0], result
