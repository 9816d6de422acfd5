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
