"""imdctl: the admin command.  Creates users, lists them, issues tokens, and does what the
admin API does (with the same code, ``imd.admin.ops``): disable users, reset passwords, list
sessions and groups, kick sessions, send system messages, make admin API tokens.

It works on the same store as the daemon: ``--redis URL`` for a shared Redis, otherwise the
embedded one in ``--data-dir`` (reached through the running daemon's socket, or started for
the length of the command when no daemon runs).  Whatever goes wrong (Redis unreachable, no
such data directory) is one ``imdctl: error:`` line and exit status 1, within ``--wait``
seconds.  Passwords are read from a prompt or, with ``--password-stdin``, from the first
line of standard input: never from the command line, where other users see them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import secrets
import sys
from pathlib import Path

from twisted.internet import defer, reactor, task

from imd import __version__
from imd.accounts import Accounts
from imd.admin.ops import Ops, OpsError
from imd.config import ConfigError, build_config
from imd.hub import Hub
from imd.store.connection import (BadRedisURL, RedisNotReady, RedisUnavailable, connect_pool,
                                  parse_redis_url, wait_until_ready)
from imd.store.embedded import EmbeddedRedis, EmbeddedRedisError
from imd.store.redis import RedisStore


class CtlError(Exception):
    """The command cannot run; the message says why."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imdctl", description="imd's admin command: create users, list them, issue "
        "tokens, on the daemon's store (its embedded Redis in --data-dir, or --redis URL).")
    p.add_argument("--version", action="version", version=f"imdctl (imd) {__version__}")
    p.add_argument("-c", "--config", help="the daemon's INI config file")
    p.add_argument("--redis", help="Redis URL (default: the embedded one in --data-dir)")
    p.add_argument("--data-dir",
                   help="the daemon's data directory, which must exist (default ./imd-data)")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for Redis before giving up (default 10)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser("adduser", help="create a user (the password is prompted for)")
    add.add_argument("account")
    add.add_argument("name", nargs="?", default="", help="display name (default: account)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    sub.add_parser("users", help="list users (id, account, name)")
    tok = sub.add_parser("token", help="issue a login token for a user")
    tok.add_argument("account")
    adm = sub.add_parser("admin", help="make a user a system administrator (xuanxuan)")
    adm.add_argument("account")
    adm.add_argument("--off", action="store_true", help="take the role away")
    sub.add_parser("admin-token", help="make a new admin API token (printed once; only its "
                   "hash is stored)")
    for name, what in (("disable", "disable a user (their sessions are closed and they can "
                        "no longer log in)"), ("enable", "enable a disabled user")):
        sub.add_parser(name, help=what).add_argument("user", help="account or user id")
    pw = sub.add_parser("passwd", help="set a user's password (prompted for)")
    pw.add_argument("user", help="account or user id")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of standard input")
    sub.add_parser("sessions", help="sessions per protocol on every node (JSON)")
    kick = sub.add_parser("kick", help="close a user's sessions on every node")
    kick.add_argument("user", help="account or user id")
    kick.add_argument("--session", help="only this session (an id from the admin API)")
    sub.add_parser("groups", help="list groups (id, name, members)")
    mem = sub.add_parser("members", help="list a group's members (id, account, name)")
    mem.add_argument("group", help="group id")
    say = sub.add_parser("say", help="send a system message to a user or to a group's members")
    to = say.add_mutually_exclusive_group(required=True)
    to.add_argument("--user", help="account or user id")
    to.add_argument("--group", help="group id")
    say.add_argument("text")
    return p


def read_password(from_stdin: bool) -> str:
    """The new user's password, from standard input or a prompt (never from argv)."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password (again): ") != password:
            raise CtlError("the passwords differ")
    else:
        raise CtlError("no terminal to ask for the password on: use --password-stdin")
    if not password:
        raise CtlError("empty password")
    return password


async def _run(args, config) -> int:
    embedded = own_server = None
    if config.redis:
        address = parse_redis_url(config.redis)
    else:
        if not Path(config.data_dir).is_dir():
            raise CtlError(f"no data directory {config.data_dir}: give the daemon's "
                           "--data-dir (or --config), or --redis URL")
        embedded = EmbeddedRedis(config.data_dir, wait=max(args.wait, config.redis_wait))
        # No daemon holds the data dir: run the server for the length of this command.
        own_server = embedded.try_lock()
        if own_server:
            await embedded.start()
        address = parse_redis_url(embedded.url)
    try:
        if not own_server:
            await wait_until_ready(address, args.wait, option="--wait")
        factory = connect_pool(address, poolsize=1, wait=args.wait)
        try:
            redis = await factory.deferred.addTimeout(args.wait, reactor)
            accounts = Accounts(RedisStore(redis), config.token_ttl)
            # A hub that is never started: sessions are reached through the store's pub/sub.
            hub = Hub(accounts.store, reactor, node_id=f"imdctl-{secrets.token_hex(4)}")
            try:
                return await _command(args, accounts, Ops(hub, accounts, serving=False))
            except OpsError as e:
                print(f"imdctl: {e}", file=sys.stderr)
                return 1
        finally:
            await factory.disconnect()
    finally:
        if own_server:
            await embedded.stop()


async def _command(args, accounts: Accounts, ops: Ops) -> int:
    store = accounts.store
    if args.command == "adduser":
        user = await ops.create_user(args.account, args.password, args.name)
        print(f"{user['id']}\t{user['account']}\t{user['name']}")
    elif args.command == "users":
        for user in await ops.users():
            disabled = "\tdisabled" if user["disabled"] else ""
            print(f"{user['id']}\t{user['account']}\t{user['name']}{disabled}")
    elif args.command == "admin-token":
        print(await ops.new_admin_token())
    elif args.command in ("disable", "enable"):
        done = await ops.set_disabled(args.user, args.command == "disable")
        print(f"{done['id']}\t{args.command}d")
    elif args.command == "passwd":
        print((await ops.reset_password(args.user, args.password))["id"])
    elif args.command == "sessions":
        print(json.dumps((await ops.sessions())["nodes"], indent=1, sort_keys=True))
    elif args.command == "kick":
        print((await ops.kick(args.user, args.session))["id"])
    elif args.command == "groups":
        for group in await ops.groups():
            print(f"{group['id']}\t{group['name']}\t{group['members']}")
    elif args.command == "members":
        for member in (await ops.group(args.group))["members"]:
            print(f"{member['id']}\t{member['account']}\t{member['name']}")
    elif args.command == "say":
        sent = await ops.system_message(args.text, args.user, args.group)
        print(" ".join(map(str, sent["to"])))
    elif args.command == "admin":
        uid = await store.find_account(args.account)
        if uid is None:
            print(f"imdctl: no such account: {args.account}", file=sys.stderr)
            return 1
        await store.set_user_fields(uid, admin="no" if args.off else "super")
        print(f"{uid}\t{'no' if args.off else 'super'}")
    elif args.command == "token":
        uid = await store.find_account(args.account)
        if uid is None:
            print(f"imdctl: no such account: {args.account}", file=sys.stderr)
            return 1
        print(f"{uid}\t{await accounts.issue_token(uid)}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    options = {"config": args.config, "redis": args.redis, "data-dir": args.data_dir}
    try:
        config = build_config(options)
        if config.redis:
            parse_redis_url(config.redis)
        if args.wait <= 0:
            raise CtlError("--wait must be positive")
        if args.command in ("adduser", "passwd"):
            args.password = read_password(args.password_stdin)
    except (ConfigError, BadRedisURL, CtlError) as e:
        sys.exit(f"imdctl: error: {e}")
    except (KeyboardInterrupt, EOFError):
        sys.exit(1)

    async def run(_reactor):
        try:
            code = await _run(args, config)
        except (CtlError, EmbeddedRedisError, RedisNotReady) as e:
            print(f"imdctl: error: {e}", file=sys.stderr)
            code = 1
        except (RedisUnavailable, defer.TimeoutError):
            print(f"imdctl: error: Redis did not answer within {args.wait:g} s (--wait)",
                  file=sys.stderr)
            code = 1
        if code:
            raise SystemExit(code)

    task.react(lambda _reactor: defer.ensureDeferred(run(_reactor)))


if __name__ == "__main__":
    main()
