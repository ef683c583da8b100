"""Command-line and config-file options of the imd daemon (``twistd imd --help``).

Every option can also be set in an INI file given with ``--config``: a ``[imd]`` section whose
keys are the long option names (``data-dir = /var/lib/imd``).  Options given on the command
line win over the file.  Repeatable options (``web``) take a comma- or newline-separated list
in the file.
"""

from __future__ import annotations

import configparser
from dataclasses import Field, dataclass, field, fields

from twisted.python import usage

from imd import __version__

ENDPOINT, TEXT, SECONDS, BYTES, COUNT, LIMIT = ("endpoint", "text", "seconds", "bytes",
                                                "count", "limit")
# What each unit accepts: seconds, bytes and counts must be positive; a limit may be 0 (none).
_POSITIVE = (SECONDS, BYTES, COUNT)


def option(default, unit: str, help_: str, choices: tuple[str, ...] = ()):
    """One option: its default, its unit (which also says how its value is checked) and its
    help (``twistd imd --help``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default),
                     metadata={"unit": unit, "help": help_, "repeatable": True})
    return field(default=default, metadata={"unit": unit, "help": help_, "choices": choices})


class ConfigError(Exception):
    pass


@dataclass
class Config:
    """Every option, typed, as the rest of imd reads them: the one table of defaults, from
    which the command line (``Options``) and the INI reader are derived.  The long option
    and the INI key is the field name with dashes (``data_dir``: ``--data-dir``)."""

    web: list[str] = option(
        ["tcp:8000"], ENDPOINT,
        "endpoint of the web port (HTTP and WebSocket of every protocol); repeatable (in the "
        "file: comma-separated)")
    boss_line: str = option(
        "tcp:6061", ENDPOINT,
        "endpoint of the 66boss line protocol (one signal per line); 'none' disables it")
    xuanxuan: str = option(
        "tcp:8080", ENDPOINT,
        "endpoint of the xuanxuan 1.0 socket (JSON lines); 'none' disables it")
    admin: str = option(
        "tcp:9180:interface=127.0.0.1", ENDPOINT,
        "endpoint of the admin HTTP port (/metrics, /health, /ready, the admin API and page); "
        "'none' disables it")
    redis: str = option(
        "", TEXT,
        "Redis URL (redis://[:password@]host:port/db, rediss://..., unix:///path.sock); "
        "empty = start the embedded redis-server")
    redis_wait: float = option(
        300.0, SECONDS, "seconds to wait at start for Redis to be reachable and to load its data")
    redis_timeout: float = option(
        5.0, SECONDS,
        "seconds a login or request waits for an unreachable Redis before it gets an error")
    data_dir: str = option(
        "./imd-data", TEXT, "directory for the embedded Redis' data and for uploaded files")
    access_log: str = option(
        "", TEXT,
        "file to append an access log of the web port to (combined log format); empty = none")
    public_url: str = option(
        "", TEXT,
        "base URL clients reach the web port at (for upload links); empty = from the "
        "request's Host header when it names this listener or one of --public-hosts")
    public_hosts: str = option(
        "", TEXT,
        "comma-separated host names (or name:port) the web port may be reached by, besides "
        "the address it listens on; used for upload links and server URLs when --public-url "
        "is empty (another Host header is replaced by the listener's address)")
    boss_auth: str = option(
        "token", TEXT,
        "66boss login: 'token' requires login_<userid>_<token>; 'address' also accepts a bare "
        "login_<userid> from the source address that proved it is that user within "
        "--boss-address-window (the 66boss app); 'trust' accepts any bare login_<userid> "
        "(closed networks only)", choices=("token", "address", "trust"))
    boss_address_window: float = option(
        120.0, SECONDS,
        "seconds after an HTTP login (or a token-checked request, or the end of a connection) "
        "during which a bare 66boss login_<userid> is accepted from that address "
        "(--boss-auth=address)")
    heartbeat: float = option(30.0, SECONDS, "seconds between heartbeats sent to clients")
    heartbeat_timeout: float = option(
        10.0, SECONDS, "seconds a WebSocket client has to answer a ping before it is dropped")
    node_timeout: float = option(
        15.0, SECONDS, "seconds after which the users of a dead imd node count as offline")
    token_ttl: int = option(30 * 86400, SECONDS, "seconds a login token stays valid")
    max_frame: int = option(65536, BYTES, "largest WebSocket message or protocol line, in bytes")
    max_body: int = option(
        1024 * 1024, BYTES, "largest HTTP request body (other than uploads), in bytes")
    max_upload: int = option(20 * 1024 * 1024, BYTES, "largest uploaded file, in bytes")
    max_queue: int = option(
        10000, COUNT, "offline messages kept per user (the oldest are dropped)")
    max_pending: int = option(
        1000, COUNT,
        "messages and replies waiting for one client that does not read before it is dropped "
        "(its unwritten messages go back to its offline queue)")
    history_limit: int = option(1000, COUNT, "messages kept per conversation")
    webim_secret: str = option(
        "", TEXT,
        "secret shared with a host site that signs webim 'auth' values; empty = none accepted")
    poll_timeout: float = option(
        28.0, SECONDS, "seconds a webim long-poll is held when nothing is waiting")
    ticket_timeout: float = option(8.0, SECONDS, "seconds a webim ticket lives without a poll")
    offline_grace: float = option(
        8.0, SECONDS, "seconds after its last ticket before a webim user counts as offline")
    webim_static: str = option(
        "", TEXT,
        "the shipped webim client's static/ folder (that directory itself), served at "
        "/webim/static/ (the plugin's glue takes the emoticon, sound and theme URLs from "
        "_IMC.path); empty = none")
    webim_page_ttl: float = option(
        3600.0, SECONDS,
        "seconds a webim page key (the cookie online sets for the actions the client sends "
        "without its ticket) stays good after the last tab it opened has gone")
    login_timeout: float = option(
        30.0, SECONDS,
        "seconds a connection (xuanxuan socket, 66boss line, WebSocket) may stay open without "
        "logging in, and an HTTP connection may stay idle between requests")
    request_timeout: float = option(
        30.0, SECONDS, "seconds in which an HTTP request's headers and body must have arrived")
    upload_timeout: float = option(
        600.0, SECONDS, "seconds in which an upload's body must have arrived")
    max_connections_per_address: int = option(
        256, LIMIT,
        "open connections allowed from one source address, over all listeners; 0 = no limit")
    login_failures: int = option(
        10, LIMIT,
        "failed logins (password or token) of one account within --login-window before its "
        "logins are refused until the window has passed; 0 = no limit")
    login_address_failures: int = option(
        100, LIMIT,
        "failed logins from one source address within --login-window before its logins are "
        "refused; 0 = no limit")
    login_window: float = option(300.0, SECONDS, "seconds over which failed logins are counted")
    remember_logins: int = option(
        6 * 3600, LIMIT,
        "seconds a node accepts a password it has just verified again without scrypt (a keyed "
        "hash, kept in Redis under a key in the data directory, so reconnects after a restart "
        "are fast); 0 = check every login with scrypt")
    login_key: str = option(
        "", TEXT,
        "file holding this node's key for --remember-logins (made, 0600, on first start); "
        "empty = login.key in --data-dir.  Keep it out of the data directory's backups: with "
        "the key and the Redis data, the passwords of recently remembered logins can be "
        "tested fast")
    xuanxuan_presence_window: float = option(
        0.5, LIMIT,
        "seconds a xuanxuan presence change (a login, logout or status change) may wait for "
        "others before every xuanxuan client is sent the changes of that window in one push, "
        "the newest per user (a reconnect storm of N users costs each client a push per "
        "window, not N); 0 = per reactor turn")
    xuanxuan_directory_age: float = option(
        60.0, SECONDS,
        "seconds this node's copy of the user list every xuanxuan login is sent (kept current "
        "by presence changes) serves logins before it is read again from Redis: an account "
        "made, removed or made an administrator without a presence change shows in new lists "
        "after at most this time")
    registrations: int = option(
        20, LIMIT, "new accounts from one source address within --register-window; 0 = no limit")
    register_window: float = option(
        600.0, SECONDS, "seconds over which registrations are counted")


def option_name(f: Field) -> str:
    """The long option and INI key of a field."""
    return f.name.replace("_", "-")


OPTIONS: tuple[Field, ...] = fields(Config)  # the table, in --help order


def _default(f: Field):
    return f.default_factory() if f.metadata.get("repeatable") else f.default


def _help(f: Field) -> str:
    default = _default(f)
    shown = ", ".join(default) if isinstance(default, list) else default
    return f"{f.metadata['help']} [default: {shown}]"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("imd: multi-protocol instant-messaging daemon (webim, xuanxuan, minami, 66boss) "
                "on one account system.")
    optParameters = [["config", "c", None, "INI config file with an [imd] section"]] + [
        [option_name(f), None, None, _help(f)]
        for f in OPTIONS if not f.metadata.get("repeatable")]

    def __init__(self):
        super().__init__()
        for f in OPTIONS:
            if f.metadata.get("repeatable"):
                self[option_name(f)] = []

    def opt_version(self) -> None:
        """print imd's version and exit"""
        print(f"imd {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.config = build_config(self)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def _repeatable(name: str, help_: str):
    def opt(self, value: str) -> None:
        self[name].append(value)

    opt.__doc__ = help_
    return opt


# A repeatable option is a method of Options (usage.Options collects ``opt_*`` methods).
for _f in OPTIONS:
    if _f.metadata.get("repeatable"):
        setattr(Options, f"opt_{_f.name}", _repeatable(option_name(_f), _help(_f)))


def _read_file(path: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if not parser.has_section("imd"):
        raise ConfigError(f"config file {path} has no [imd] section")
    values = dict(parser.items("imd"))
    unknown = set(values) - {option_name(f) for f in OPTIONS}
    if unknown:
        raise ConfigError(f"unknown option(s) in {path}: {', '.join(sorted(unknown))}")
    return values


def build_config(options: dict) -> Config:
    """Merge defaults, the config file and the command line into a Config."""
    from_file = _read_file(options["config"]) if options.get("config") else {}
    values = {}
    for f in OPTIONS:
        name = option_name(f)
        if f.metadata.get("repeatable"):
            given = list(options.get(name) or [])
            if not given and name in from_file:
                given = [v.strip() for v in from_file[name].replace("\n", ",").split(",")
                         if v.strip()]
            values[f.name] = given or _default(f)
            continue
        raw = options.get(name)
        if raw is None:
            raw = from_file.get(name, f.default)
        try:
            values[f.name] = type(f.default)(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name}: {raw!r} is not a valid value") from None
    config = Config(**values)
    _check(config)
    return config


def _check(config: Config) -> None:
    for f in OPTIONS:
        name, value, unit = option_name(f), getattr(config, f.name), f.metadata["unit"]
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"--{name} must be "
                              + " or ".join(", ".join(f"'{c}'" for c in choices).rsplit(", ", 1)))
        if unit in _POSITIVE and value <= 0:
            raise ConfigError(f"--{name} must be positive")
        if unit == LIMIT and value < 0:
            raise ConfigError(f"--{name} must not be negative")
