"""The one table of options (imd.config.Config): the command line, the INI reader, the
sample config file and the README are all derived from it or checked against it."""

from __future__ import annotations

import configparser
import re

import pytest
from twisted.python import usage

from imd.config import OPTIONS, Config, Options, option_name
from tests.conftest import REPO

NAMES = [option_name(f) for f in OPTIONS]


def parse(*args: str) -> Config:
    options = Options()
    options.parseOptions(list(args))
    return options.config


def test_every_option_is_in_the_sample_config_file():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "etc" / "imd.conf", encoding="utf-8")
    missing = [name for name in NAMES if not parser.has_option("imd", name)]
    assert not missing, f"etc/imd.conf lacks {missing}"


def test_every_option_is_in_the_readme_options_table():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `--([a-z-]+)` \|", readme, re.MULTILINE))
    missing = [name for name in NAMES if name not in table]
    assert not missing, f"the README's options table lacks {missing}"


def test_the_sample_config_file_is_valid_and_its_values_are_the_defaults_but_data_dir():
    config = parse("--config", str(REPO / "etc" / "imd.conf"))
    assert config.data_dir == "/var/lib/imd"
    config.data_dir = Config().data_dir
    assert config == Config()


def test_the_command_line_defaults_are_the_table_defaults():
    assert parse() == Config()
    assert Config().web == ["tcp:8000"]


def test_command_line_wins_over_the_file_and_web_repeats(tmp_path):
    conf = tmp_path / "imd.conf"
    conf.write_text("[imd]\nweb = tcp:1, tcp:2\nheartbeat = 5\nmax-frame = 100\n")
    config = parse("--config", str(conf), "--heartbeat", "7")
    assert (config.web, config.heartbeat, config.max_frame) == (["tcp:1", "tcp:2"], 7.0, 100)
    assert parse("--config", str(conf), "--web", "tcp:3", "--web", "tcp:4").web == \
        ["tcp:3", "tcp:4"]


def test_every_option_has_help_in_twistd_help():
    text = str(Options())
    flat = " ".join(text.split())
    for f in OPTIONS:
        assert f"--{option_name(f)}=" in text
        assert " ".join(f.metadata["help"].split()[:3]) in flat


@pytest.mark.parametrize("args, message", [
    (("--heartbeat", "0"), "--heartbeat must be positive"),
    (("--max-body", "-1"), "--max-body must be positive"),
    (("--registrations", "-1"), "--registrations must not be negative"),
    (("--boss-auth", "x"), "--boss-auth must be 'token', 'address' or 'trust'"),
    (("--token-ttl", "soon"), "--token-ttl: 'soon' is not a valid value"),
])
def test_values_are_checked_by_their_unit(args, message):
    with pytest.raises(usage.UsageError, match=re.escape(message)):
        parse(*args)


def test_an_unknown_key_in_the_file_is_named(tmp_path):
    conf = tmp_path / "imd.conf"
    conf.write_text("[imd]\nheartbeats = 5\n")
    with pytest.raises(usage.UsageError, match="unknown option.*heartbeats"):
        parse("--config", str(conf))
