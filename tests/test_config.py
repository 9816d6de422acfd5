"""Mount settings: defaults, -o and --flag forms of the options."""

from __future__ import annotations

import argparse
import os

import pytest

from dssefs import config
from dssefs.errors import ConfigError


def parse(argv: list[str], mount_options: str | None = None) -> config.Settings:
    p = argparse.ArgumentParser()
    config.add_arguments(p, ("mount",))
    return config.settings_from(p.parse_args(argv), mount_options)


def test_default_cache_size_is_an_eighth_of_ram_within_bounds(monkeypatch):
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert config.default_cache_size() == max(256 << 20, min(2 << 30, ram // 8))
    for pages, expected in ((1 << 16, 256 << 20), (1 << 20, 512 << 20), (1 << 24, 2 << 30)):
        monkeypatch.setattr(os, "sysconf", lambda name, p=pages: p if name == "SC_PHYS_PAGES" else 4096)
        assert config.default_cache_size() == expected  # 256 MiB, 4 GiB and 64 GiB of RAM


@pytest.mark.parametrize("argv, opts, expected", [
    ([], None, 64 << 10),
    (["--small-file-prefetch", "256K"], None, 256 << 10),
    ([], "small_file_prefetch=0", 0),
    ([], "small-file-prefetch=1M", 1 << 20),
    (["--small-file-prefetch", "8K"], "small_file_prefetch=1M", 8 << 10),  # the flag wins
])
def test_small_file_prefetch_option(argv, opts, expected):
    s = parse(argv, opts)
    assert s.small_file_prefetch == expected


def test_bad_size_is_refused_naming_the_option():
    with pytest.raises(ConfigError) as e:
        parse(["--small-file-prefetch", "lots"])
    assert "small-file-prefetch" in str(e.value) and "\n" not in str(e.value)


# ---- configuration files -----------------------------------------------------------------------

EVERY_OPTION = '''\
# one valid value for every option (keys are the long options' names)
source = "s3://team-bucket/vault"
name = "team-vault"
kms_key_id = "alias/dssefs-inner"
kms-key-id-outer = "alias/dssefs-outer"
kms_allowed_key_ids = ["alias/dssefs-previous", "alias/older"]
keyrings = ["keyrings/old", "/etc/dssefs/keyring-2025"]
stale_upload_age = 3600
kms_allowed_key_ids_outer = ["alias/dssefs-previous-outer"]
epoch_max_age = 3600
epoch-max-objects = 5000
keyring = "/etc/dssefs/keyring"
keyring_passphrase_file = "/etc/dssefs/keyring.pass"
endpoint_url = "http://127.0.0.1:9000"
region = "eu-west-1"
profile = "ops"
path_style = true
retry_mode = "adaptive"
max_attempts = 3
chunk_size = "4M"
workers = 4
cache_size = "1G"
small_file_prefetch = "128K"
spill_dir = "/var/cache/dssefs/team"
write_behind = "16M"
write_back = true
journal-dir = "/var/lib/dssefs/journal-team"
attr_timeout = 2.5
entry_timeout = 2
attr_delay = 0
allow_other = true
read_only = false
uid = 1000
gid = 1000
file_mode = "0640"
dir_mode = "0750"
foreign_objects = "read-only"
log_level = "debug"
foreground = true
'''


def write(tmp_path, text: str, mode: int = 0o644, name: str = "dssefs.toml"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chmod(path, mode)
    return str(path)


def test_every_option_is_a_file_key(tmp_path):
    path = write(tmp_path, EVERY_OPTION)
    values = config.load_file(path)
    assert set(values) == {o.name for o in config.OPTIONS} - {"config"}  # a new option needs a line here
    s = config.settings_from(argparse.Namespace(), None, values, file_name=path)
    assert (s.source, s.name, s.kms_key_id_outer) == ("s3://team-bucket/vault", "team-vault", "alias/dssefs-outer")
    assert s.kms_allowed_key_ids == ("alias/dssefs-previous", "alias/older")
    assert s.keyrings == (str(tmp_path / "keyrings/old"), "/etc/dssefs/keyring-2025")  # relative: to the file
    assert s.kms_allowed_key_ids_outer == ("alias/dssefs-previous-outer",)
    assert (s.epoch_max_age, s.epoch_max_objects) == (3600.0, 5000)
    assert (s.chunk_size, s.cache_size, s.small_file_prefetch) == (4 << 20, 1 << 30, 128 << 10)
    assert (s.file_mode, s.dir_mode, s.attr_timeout, s.attr_delay) == (0o640, 0o750, 2.5, 0.0)
    assert s.path_style is True and s.read_only is False and s.foreground is True
    assert s.write_back is True and s.journal_dir == "/var/lib/dssefs/journal-team"
    assert s.write_behind == 16 << 20
    assert all(src == f"configuration file {path}" for src in s.sources.values())


def test_precedence_cli_over_o_over_file_over_default(tmp_path):
    path = write(tmp_path, 'attr_timeout = 3\nentry_timeout = 3\nattr_delay = 3\n')
    values = config.load_file(path)

    def settings(argv, opts):
        p = argparse.ArgumentParser()
        config.add_arguments(p, ("mount",))
        return config.settings_from(p.parse_args(argv), opts, values, file_name=path)

    s = settings(["--attr-timeout", "5"], "attr_timeout=4,entry-timeout=4")
    assert (s.attr_timeout, s.entry_timeout, s.attr_delay, s.cache_size) == \
        (5.0, 4.0, 3.0, config.default_cache_size())
    assert (s.sources["attr_timeout"], s.sources["entry_timeout"]) == ("cli", "-o")
    assert s.sources["attr_delay"] == f"configuration file {path}" and "cache_size" not in s.sources


@pytest.mark.parametrize("case, text, mode, expected", [
    ("not toml", 'cache_size = "1G\n', 0o644, "not valid TOML"),
    ("not utf-8", b'name = "\xff"\n', 0o644, "not valid UTF-8"),
    ("unknown key", 'cache_sise = "1G"\n', 0o644, "key 'cache_sise' is not an option"),
    ("table", '[mount]\ncache_size = "1G"\n', 0o644, "key 'mount' is a table"),
    ("list for one value", 'keyring = ["/a", "/b"]\n', 0o644, "key 'keyring' takes one value"),
    ("date", 'name = 2026-11-27\n', 0o644, "key 'name' has a date value"),
    ("mode as a number", 'file_mode = 644\n', 0o644, "key 'file_mode' has an int value; write a string such as"),
    ("mode as a boolean", 'dir_mode = true\n', 0o644, "key 'dir_mode' has a bool value"),
    ("mode with a leading zero", 'file_mode = 0644\n', 0o644, 'file_mode = "0640"'),
    ("string option as a boolean", 'kms_key_id = true\n', 0o644, "key 'kms_key_id' has a bool value"),
    ("path as a number", 'keyring = 5\n', 0o644, "key 'keyring' has an int value"),
    ("fraction", 'max_attempts = 2.5\n', 0o644, "key 'max_attempts' has a float value; write a whole number"),
    ("boolean count", 'workers = true\n', 0o644, "key 'workers' has a bool value"),
    ("list of numbers", 'kms_allowed_key_ids = [1, 2]\n', 0o644, "key 'kms_allowed_key_ids' has a list value"),
    ("outer list of numbers", 'kms_allowed_key_ids_outer = [1]\n', 0o644,
     "key 'kms_allowed_key_ids_outer' has a list value"),
    ("age as a string", 'epoch_max_age = "1d"\n', 0o644, "key 'epoch_max_age' has a str value; write a number"),
    ("count as a fraction", 'epoch_max_objects = 2.5\n', 0o644,
     "key 'epoch_max_objects' has a float value; write a whole number"),
    ("count as a boolean", 'epoch_max_objects = true\n', 0o644, "key 'epoch_max_objects' has a bool value"),
    ("aws secret", 'aws_secret_access_key = "x"\n', 0o644, "key 'aws_secret_access_key' is a secret"),
    ("passphrase", 'keyring-passphrase = "x"\n', 0o644, "key 'keyring-passphrase' is a secret"),
    ("given twice", 'cache_size = "1G"\ncache-size = "2G"\n', 0o644, "key 'cache-size' is given twice"),
    ("nested config", 'config = "/etc/other.toml"\n', 0o644, "cannot name another one"),
    ("world-writable", 'cache_size = "1G"\n', 0o666, "writable by every user"),
])
def test_bad_files_are_refused_naming_the_problem(tmp_path, case, text, mode, expected):
    path = write(tmp_path, text, mode)
    with pytest.raises(config.ConfigError) as e:
        config.load_file(path)
    msg = str(e.value)
    assert expected in msg and path in msg and "\n" not in msg, msg


@pytest.mark.parametrize("text, key", [
    ('cache_size = "lots"\n', "cache-size"),
    ('allow_other = "maybe"\n', "allow-other"),
    ('chunk_size = "3M"\n', "chunk-size"),
    ('file_mode = "0999"\n', "file-mode"),
    ('foreign_objects = "sometimes"\n', "foreign-objects"),
    ('source = "ftp://x/y"\n', "source"),
    ('name = "two words"\n', "name"),
    ('attr_timeout = -1\n', "attr-timeout"),
    ('attr_timeout = 1.5e400\n', "attr-timeout"),
    ('attr_timeout = nan\n', "attr-timeout"),
    ('entry_timeout = inf\n', "entry-timeout"),
    ('source = "s3://b\\nREADY=1"\n', "source"),
    ('name = "a\\tb"\n', "name"),
    ('epoch_max_age = 0\n', "epoch-max-age"),
    ('epoch_max_age = -5\n', "epoch-max-age"),
    ('epoch_max_age = inf\n', "epoch-max-age"),
    ('epoch_max_age = nan\n', "epoch-max-age"),
    ('epoch_max_objects = 0\n', "epoch-max-objects"),
    ('epoch_max_objects = -1\n', "epoch-max-objects"),
])
def test_bad_values_are_refused_naming_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    values = config.load_file(path)
    with pytest.raises(config.ConfigError) as e:
        config.settings_from(argparse.Namespace(), None, values, file_name=path)
    msg = str(e.value)
    assert f"'{key}'" in msg and path in msg and "\n" not in msg, msg


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_unreadable_file_is_one_line(tmp_path, what):
    path = str(tmp_path / "absent.toml") if what == "missing" else str(tmp_path)
    with pytest.raises(config.ConfigError) as e:
        config.load_file(path)
    assert f"cannot read configuration file {path}" in str(e.value) and "\n" not in str(e.value)


def test_relative_paths_are_taken_from_the_file_or_the_current_directory(tmp_path, monkeypatch):
    """The daemon runs in /: a relative keyring in a file means the file's directory, on the
    command line the directory the command ran in."""
    etc = tmp_path / "etc"
    etc.mkdir()
    path = write(etc, 'keyring = "keyring"\nspill_dir = "../spill"\nkeyring_passphrase_file = "~/pass"\n')
    s = config.settings_from(argparse.Namespace(), None, config.load_file(path), file_name=path)
    assert (s.keyring, s.spill_dir) == (str(etc / "keyring"), str(tmp_path / "spill"))
    assert s.keyring_passphrase_file == os.path.join(os.path.expanduser("~"), "pass")
    monkeypatch.chdir(tmp_path)
    s = parse(["--spill-dir", "sp"], "keyring=kr")
    assert (s.spill_dir, s.keyring) == (str(tmp_path / "sp"), str(tmp_path / "kr"))


# ---- epoch and per-layer key options ------------------------------------------------------------

def keys_parse(argv: list[str], groups=("store", "keys")) -> config.Settings:
    p = argparse.ArgumentParser()
    config.add_arguments(p, groups)
    return config.settings_from(p.parse_args(argv))


def test_epoch_and_outer_key_options_defaults():
    s = keys_parse([])
    assert (s.epoch_max_age, s.epoch_max_objects) == (86400.0, 1_000_000)
    assert s.kms_allowed_key_ids_outer == ()


@pytest.mark.parametrize("argv, opts, age, count", [
    (["--epoch-max-age", "3600"], None, 3600.0, 1_000_000),
    (["--epoch-max-age", "0.5", "--epoch-max-objects", "10"], None, 0.5, 10),
    ([], "epoch_max_age=600,epoch-max-objects=1", 600.0, 1),
    (["--epoch-max-objects", "7"], "epoch_max_objects=9", 86400.0, 7),  # the flag wins
])
def test_epoch_options(argv, opts, age, count):
    from dssefs.daemon.request import MOUNT_GROUPS

    p = argparse.ArgumentParser()
    config.add_arguments(p, MOUNT_GROUPS)
    s = config.settings_from(p.parse_args(argv), opts)  # the mount takes them
    assert (s.epoch_max_age, s.epoch_max_objects) == (age, count)
    s = config.settings_from(keys_parse_ns(argv), opts)
    assert (s.epoch_max_age, s.epoch_max_objects) == (age, count)  # and so do object commands


def keys_parse_ns(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    config.add_arguments(p, ("store", "keys"))
    return p.parse_args(argv)


@pytest.mark.parametrize("argv, name, text", [
    (["--epoch-max-age", "0"], "epoch-max-age", "greater than 0"),
    (["--epoch-max-age", "-1"], "epoch-max-age", "greater than 0"),
    (["--epoch-max-age", "1d"], "epoch-max-age", "not a number of seconds"),
    (["--epoch-max-age", "inf"], "epoch-max-age", "not a finite number"),
    (["--epoch-max-objects", "0"], "epoch-max-objects", "at least 1"),
    (["--epoch-max-objects", "1.5"], "epoch-max-objects", "not a whole number"),
    (["--epoch-max-objects", "many"], "epoch-max-objects", "not a whole number"),
])
def test_bad_epoch_values_are_one_line_errors(argv, name, text):
    with pytest.raises(ConfigError) as e:
        keys_parse(argv)
    msg = str(e.value)
    assert f"bad value for '{name}' (cli)" in msg and text in msg and "\n" not in msg, msg


def test_outer_allowed_keys_option():
    s = keys_parse(["--kms-allowed-key-ids-outer", "alias/a, alias/b"])
    assert s.kms_allowed_key_ids_outer == ("alias/a", "alias/b")
    s = config.settings_from(argparse.Namespace(), "kms_allowed_key_ids_outer=alias/c")
    assert s.kms_allowed_key_ids_outer == ("alias/c",)


def test_new_options_are_in_the_keys_group_with_help():
    for name in ("kms_allowed_key_ids_outer", "epoch_max_age", "epoch_max_objects"):
        assert config.BY_NAME[name].groups == ("keys",)
    p = argparse.ArgumentParser()
    config.add_arguments(p, ("store",))
    assert "--epoch-max-age" not in p.format_help()
    p = argparse.ArgumentParser()
    config.add_arguments(p, ("keys",))
    text = " ".join(p.format_help().split())
    assert "start a new epoch key pair after this many seconds (default 1 day); see docs/format.md" in text
    assert "start a new epoch key pair after this many objects (default 1,000,000)" in text
    assert "split custody" in text and "--kms-allowed-key-ids-outer" in text
