"""Command-line and config-file options of the imd daemon (``twistd imd --help``).

Every option can also be set in an INI file given with ``--config``: a ``[imd]`` section whose
keys are the long option names (``data-dir = /var/lib/imd``).  Options given on the command
line win over the file.  Repeatable options (``web``) take a comma- or newline-separated list
in the file.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass, field

from twisted.python import usage

from imd import __version__

# (name, default, coerce, help) for every single-valued option.
_OPTIONS = [
    ("boss-line", "tcp:6061", str,
     "endpoint of the 66boss line protocol (one signal per line); 'none' disables it"),
    ("xuanxuan", "tcp:8080", str,
     "endpoint of the xuanxuan 1.0 socket (JSON lines); 'none' disables it"),
    ("admin", "tcp:9180:interface=127.0.0.1", str,
     "endpoint of the admin HTTP port (/metrics, /health, /ready, the admin API and page); "
     "'none' disables it"),
    ("redis", "", str,
     "Redis URL (redis://[:password@]host:port/db, rediss://..., unix:///path.sock); "
     "empty = start the embedded redis-server"),
    ("redis-wait", 300.0, float,
     "seconds to wait at start for Redis to be reachable and to load its data"),
    ("redis-timeout", 5.0, float,
     "seconds a login or request waits for an unreachable Redis before it gets an error"),
    ("data-dir", "./imd-data", str,
     "directory for the embedded Redis' data and for uploaded files"),
    ("access-log", "", str,
     "file to append an access log of the web port to (combined log format); empty = none"),
    ("public-url", "", str,
     "base URL clients reach the web port at (for upload links); empty = from the request's "
     "Host header when it names this listener or one of --public-hosts"),
    ("public-hosts", "", str,
     "comma-separated host names (or name:port) the web port may be reached by, besides "
     "the address it listens on; used for upload links and server URLs when --public-url "
     "is empty (another Host header is replaced by the listener's address)"),
    ("boss-auth", "token", str,
     "66boss login: 'token' requires login_<userid>_<token>; 'address' also accepts a bare "
     "login_<userid> from the source address that proved it is that user within "
     "--boss-address-window (the 66boss app); 'trust' accepts any bare login_<userid> "
     "(closed networks only)"),
    ("boss-address-window", 120.0, float,
     "seconds after an HTTP login (or a token-checked request, or the end of a connection) "
     "during which a bare 66boss login_<userid> is accepted from that address "
     "(--boss-auth=address)"),
    ("heartbeat", 30.0, float, "seconds between heartbeats sent to clients"),
    ("heartbeat-timeout", 10.0, float,
     "seconds a WebSocket client has to answer a ping before it is dropped"),
    ("node-timeout", 15.0, float,
     "seconds after which the users of a dead imd node count as offline"),
    ("token-ttl", 30 * 86400, int, "seconds a login token stays valid"),
    ("max-frame", 65536, int, "largest WebSocket message or protocol line, in bytes"),
    ("max-body", 1024 * 1024, int, "largest HTTP request body (other than uploads), in bytes"),
    ("max-upload", 20 * 1024 * 1024, int, "largest uploaded file, in bytes"),
    ("max-queue", 10000, int, "offline messages kept per user (the oldest are dropped)"),
    ("max-pending", 1000, int,
     "messages and replies waiting for one client that does not read before it is dropped "
     "(its unwritten messages go back to its offline queue)"),
    ("history-limit", 1000, int, "messages kept per conversation"),
    ("webim-secret", "", str,
     "secret shared with a host site that signs webim 'auth' values; empty = none accepted"),
    ("poll-timeout", 28.0, float, "seconds a webim long-poll is held when nothing is waiting"),
    ("ticket-timeout", 8.0, float, "seconds a webim ticket lives without a poll"),
    ("offline-grace", 8.0, float,
     "seconds after its last ticket before a webim user counts as offline"),
    ("login-timeout", 30.0, float,
     "seconds a connection (xuanxuan socket, 66boss line, WebSocket) may stay open without "
     "logging in, and an HTTP connection may stay idle between requests"),
    ("request-timeout", 30.0, float,
     "seconds in which an HTTP request's headers and body must have arrived"),
    ("upload-timeout", 600.0, float,
     "seconds in which an upload's body must have arrived"),
    ("max-connections-per-address", 256, int,
     "open connections allowed from one source address, over all listeners; 0 = no limit"),
    ("login-failures", 10, int,
     "failed logins (password or token) of one account within --login-window before its "
     "logins are refused until the window has passed; 0 = no limit"),
    ("login-address-failures", 100, int,
     "failed logins from one source address within --login-window before its logins are "
     "refused; 0 = no limit"),
    ("login-window", 300.0, float, "seconds over which failed logins are counted"),
    ("remember-logins", 6 * 3600, int,
     "seconds a node accepts a password it has just verified again without scrypt (a keyed "
     "hash, kept in Redis under a key in the data directory, so reconnects after a restart "
     "are fast); 0 = check every login with scrypt"),
    ("registrations", 20, int,
     "new accounts from one source address within --register-window; 0 = no limit"),
    ("register-window", 600.0, float, "seconds over which registrations are counted"),
]
_DEFAULTS = {name: default for name, default, _, _ in _OPTIONS}
_COERCE = {name: coerce for name, _, coerce, _ in _OPTIONS}


class ConfigError(Exception):
    pass


@dataclass
class Config:
    """The options, typed, as the rest of imd reads them."""

    web: list[str] = field(default_factory=lambda: ["tcp:8000"])
    boss_line: str = "tcp:6061"
    xuanxuan: str = "tcp:8080"
    admin: str = "tcp:9180:interface=127.0.0.1"
    redis: str = ""
    redis_wait: float = 300.0
    redis_timeout: float = 5.0
    data_dir: str = "./imd-data"
    access_log: str = ""
    public_url: str = ""
    public_hosts: str = ""
    boss_auth: str = "token"
    boss_address_window: float = 120.0
    heartbeat: float = 30.0
    heartbeat_timeout: float = 10.0
    node_timeout: float = 15.0
    token_ttl: int = 30 * 86400
    max_frame: int = 65536
    max_body: int = 1024 * 1024
    max_upload: int = 20 * 1024 * 1024
    max_queue: int = 10000
    max_pending: int = 1000
    history_limit: int = 1000
    webim_secret: str = ""
    poll_timeout: float = 28.0
    ticket_timeout: float = 8.0
    offline_grace: float = 8.0
    login_timeout: float = 30.0
    request_timeout: float = 30.0
    upload_timeout: float = 600.0
    max_connections_per_address: int = 256
    login_failures: int = 10
    login_address_failures: int = 100
    login_window: float = 300.0
    remember_logins: int = 6 * 3600
    registrations: int = 20
    register_window: float = 600.0


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("imd: multi-protocol instant-messaging daemon (webim, xuanxuan, minami, 66boss) "
                "on one account system.")
    optParameters = [["config", "c", None, "INI config file with an [imd] section"]] + [
        [name, None, None, f"{help_} [default: {default}]"]
        for name, default, _, help_ in _OPTIONS]

    def __init__(self):
        super().__init__()
        self["web"] = []

    def opt_version(self) -> None:
        """print imd's version and exit"""
        print(f"imd {__version__}")
        raise SystemExit(0)

    def opt_web(self, endpoint: str) -> None:
        """endpoint of the web port (HTTP and WebSocket of every protocol); repeatable
        [default: tcp:8000]"""
        self["web"].append(endpoint)

    def postOptions(self) -> None:
        try:
            self.config = build_config(self)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


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
    unknown = set(values) - set(_DEFAULTS) - {"web"}
    if unknown:
        raise ConfigError(f"unknown option(s) in {path}: {', '.join(sorted(unknown))}")
    return values


def build_config(options: dict) -> Config:
    """Merge defaults, the config file and the command line into a Config."""
    from_file = _read_file(options["config"]) if options.get("config") else {}
    values = {}
    for name, default in _DEFAULTS.items():
        raw = options.get(name)
        if raw is None:
            raw = from_file.get(name, default)
        try:
            values[name.replace("-", "_")] = _COERCE[name](raw)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name}: {raw!r} is not a valid value") from None
    web = list(options.get("web") or [])
    if not web and "web" in from_file:
        web = [w.strip() for w in from_file["web"].replace("\n", ",").split(",") if w.strip()]
    config = Config(web=web or ["tcp:8000"], **values)
    _check(config)
    return config


def _check(config: Config) -> None:
    if config.boss_auth not in ("token", "address", "trust"):
        raise ConfigError("--boss-auth must be 'token', 'address' or 'trust'")
    if config.boss_address_window <= 0:
        raise ConfigError("--boss-address-window must be positive")
    for name in ("redis_wait", "redis_timeout", "heartbeat", "heartbeat_timeout",
                 "node_timeout", "token_ttl", "max_frame", "max_body", "max_upload",
                 "max_queue", "max_pending", "history_limit", "poll_timeout",
                 "ticket_timeout", "offline_grace", "login_timeout", "request_timeout",
                 "upload_timeout", "login_window", "register_window"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    for name in ("max_connections_per_address", "login_failures", "login_address_failures",
                 "registrations", "remember_logins"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
