"""``imdctl``: the admin command.  Creates users, lists them, issues tokens.

It works on the same store as the daemon: ``--redis URL`` for a shared Redis, otherwise the
embedded one in ``--data-dir`` (reached through the running daemon's socket, or started for
the length of the command when no daemon runs).
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import defer, task

from imd.accounts import AccountError, Accounts
from imd.config import ConfigError, build_config
from imd.store.connection import BadRedisURL, connect_pool, parse_redis_url
from imd.store.embedded import EmbeddedRedis, EmbeddedRedisError
from imd.store.redis import RedisStore


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imdctl", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", help="the daemon's INI config file")
    p.add_argument("--redis", help="Redis URL (default: the embedded one in --data-dir)")
    p.add_argument("--data-dir", help="the daemon's data directory (default ./imd-data)")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("adduser", help="create a user")
    add.add_argument("account")
    add.add_argument("password")
    add.add_argument("name", nargs="?", default="")
    sub.add_parser("users", help="list users (id, account, name)")
    tok = sub.add_parser("token", help="issue a login token for a user")
    tok.add_argument("account")
    adm = sub.add_parser("admin", help="make a user a system administrator (xuanxuan)")
    adm.add_argument("account")
    adm.add_argument("--off", action="store_true", help="take the role away")
    return p


async def _run(args, config) -> int:
    embedded = None
    if config.redis:
        url = config.redis
    else:
        embedded = EmbeddedRedis(config.data_dir)
        # No daemon holds the data dir: run the server for the length of this command.
        own_server = embedded.try_lock()
        if own_server:
            await embedded.start()
        url = embedded.url
    factory = connect_pool(parse_redis_url(url), poolsize=1)
    try:
        redis = await factory.deferred
        accounts = Accounts(RedisStore(redis), config.token_ttl)
        return await _command(args, accounts)
    finally:
        await factory.disconnect()
        if embedded is not None and own_server:
            await embedded.stop()


async def _command(args, accounts: Accounts) -> int:
    store = accounts.store
    if args.command == "adduser":
        try:
            user = await accounts.create(args.account, args.password, args.name)
        except AccountError as e:
            print(f"imdctl: {e}", file=sys.stderr)
            return 1
        print(f"{user.id}\t{user.account}\t{user.name}")
    elif args.command == "users":
        for user in await store.list_users():
            print(f"{user.id}\t{user.account}\t{user.name}")
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
    except (ConfigError, BadRedisURL) as e:
        sys.exit(f"imdctl: error: {e}")

    async def run(reactor):
        try:
            code = await _run(args, config)
        except EmbeddedRedisError as e:
            print(f"imdctl: error: {e}", file=sys.stderr)
            code = 1
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
