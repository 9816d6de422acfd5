"""Revalidation that costs no request of its own, and answers used past their TTL while they are
refreshed (write-back mode's stale window, dssefs/fs/stale.py).

* A write below a directory confirms the directories above it: while files are written below
  them, their lookups need no HEAD or listing of their own after the TTL.
* With a stale window, a lookup or getattr of a directory and a lookup of an absent name past the
  TTL answer at once from what the mount knows, and the request that would have been waited for
  runs in the background; the next use sees what it found (another client's removal, new name or
  attribute change).  Directories this mount created are not refreshed within the window.
  Files are revalidated first, as without one.  Past the window, the answer is waited for.
"""

from __future__ import annotations

import errno

import pytest
import trio

from dssefs.errors import DssefsError
from test_fs_core import ROOT, backend, make_fs, write_file  # noqa: F401 (fixture)

TTL = 0.3


class Requests:
    """Counts HEADs and listings of the store (the requests a revalidation makes)."""

    def __init__(self, store):
        self.heads: list[str] = []
        self.lists: list[str] = []
        real_head, real_list = store.head, store.list

        def head(key, *a, **kw):
            self.heads.append(key)
            return real_head(key, *a, **kw)

        def listing(prefix="", *a, **kw):
            self.lists.append(prefix)
            return real_list(prefix, *a, **kw)
        store.head, store.list = head, listing

    def clear(self):
        self.heads.clear()
        self.lists.clear()


async def _lookup_path(fs, *names):
    ino = ROOT
    for n in names:
        ino = (await fs.lookup(ino, n)).ino
    return ino


async def test_writes_below_a_directory_revalidate_it(backend, tmp_path):
    fs = make_fs(backend, tmp_path, attr_timeout=TTL, entry_timeout=TTL)
    a = await fs.mkdir(ROOT, "a", 0o755, 0, 0)
    b = await fs.mkdir(a.ino, "b", 0o755, 0, 0)
    await write_file(fs, "f0", b"x", parent=b.ino)
    req = Requests(backend.store)
    # files written below a/b for three TTLs, each after a path walk from the root (what the
    # kernel does once the entries of a and b have expired)
    end = trio.current_time() + 3 * TTL
    i = 1
    while trio.current_time() < end:
        ino = await _lookup_path(fs, "a", "b")
        await fs.getattr(ino)
        await write_file(fs, f"f{i}", b"x", parent=ino)
        i += 1
        await trio.sleep(TTL / 3)
    assert i > 6
    # neither directory was probed: each write confirmed that both exist
    assert not [k for k in req.heads if k in ("a", "a/", "a/b", "a/b/")], req.heads
    assert "a/" not in req.lists and "" not in req.lists, req.lists
    # (b's own listing answers the lookups of the new names, and is asked again once per TTL)
    assert req.lists.count("a/b/") <= 4, req.lists

    # once nothing is written below them, they are revalidated again after the TTL
    await trio.sleep(TTL * 1.5)
    req.clear()
    await _lookup_path(fs, "a", "b")
    assert "a/" in req.heads or "" in req.lists


async def test_without_a_stale_window_a_stale_answer_is_waited_for(backend, tmp_path):
    fs = make_fs(backend, tmp_path, attr_timeout=TTL, entry_timeout=TTL)
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    await write_file(fs, "f", b"x", parent=d.ino)
    await fs.lookup(d.ino, "f")
    other = make_fs(backend, tmp_path / "o")
    await other.unlink(await _lookup_path(other, "d"), "f")
    await trio.sleep(TTL * 1.5)
    with pytest.raises(DssefsError) as e:
        await fs.lookup(d.ino, "f")
    assert e.value.errno == errno.ENOENT
    assert fs.stale.served == 0


async def test_stale_answers_are_used_while_refreshed_in_the_background(backend, tmp_path):
    # the directories are another client's (this mount's own are not refreshed: see below)
    other = make_fs(backend, tmp_path / "o")
    od = (await other.mkdir(ROOT, "d", 0o755, 0, 0)).ino
    await other.mkdir(od, "s1", 0o755, 0, 0)
    await other.mkdir(od, "s2", 0o755, 0, 0)
    await write_file(other, "f", b"x", parent=od)
    fs = make_fs(backend, tmp_path, attr_timeout=TTL, entry_timeout=TTL, stale_window=20 * TTL)
    d = await fs.lookup(ROOT, "d")
    s1 = await fs.lookup(d.ino, "s1")
    s2 = await fs.lookup(d.ino, "s2")
    await fs.lookup(d.ino, "f")
    with pytest.raises(DssefsError):
        await fs.lookup(d.ino, "new")  # the directory's listing answers it (absent)
    # another client removes s1, changes s2's mode, creates a name and deletes f
    await other.lookup(od, "s1")
    await other.rmdir(od, "s1")
    await other.setattr((await other.lookup(od, "s2")).ino, mode=0o700)
    await write_file(other, "new", b"z", parent=od)
    await other.unlink(od, "f")
    await trio.sleep(TTL * 1.5)

    req = Requests(backend.store)
    # past the TTL, within the window: a directory's answers and an absent name's come at once,
    # without a request
    with trio.fail_after(5):
        assert (await fs.lookup(d.ino, "s1")).ino == s1.ino
        assert (await fs.getattr(s2.ino)).mode & 0o777 == 0o755
        with pytest.raises(DssefsError) as e:
            await fs.lookup(d.ino, "new")
        assert e.value.errno == errno.ENOENT
    assert fs.stale.served >= 3 and fs.stale.own == 0
    # a file's answer is not used past its TTL: it is revalidated first
    with pytest.raises(DssefsError) as e:
        await fs.lookup(d.ino, "f")
    assert e.value.errno == errno.ENOENT
    # the requests that were not waited for run in the background
    with trio.fail_after(10):
        while fs.stale.running or fs.stale.refreshed < 3:
            await trio.sleep(0.01)
    assert req.heads or req.lists
    assert fs.stale.failed == 0
    # the next uses see what the refreshes found
    with pytest.raises(DssefsError) as e:
        await fs.lookup(d.ino, "s1")
    assert e.value.errno == errno.ENOENT
    assert (await fs.getattr(s2.ino)).mode & 0o777 == 0o700
    assert (await fs.lookup(d.ino, "new")).size == 1


async def test_directories_made_here_are_not_refreshed_within_the_window(backend, tmp_path):
    # a directory this mount created, and absent names in it, are answered past the TTL without
    # any request until the window is over; then they are revalidated (waited for) again
    fs = make_fs(backend, tmp_path, attr_timeout=TTL, entry_timeout=TTL, stale_window=4 * TTL)
    mine = await fs.mkdir(ROOT, "mine", 0o755, 0, 0)
    other = make_fs(backend, tmp_path / "o")
    om = (await other.lookup(ROOT, "mine")).ino
    await write_file(other, "theirs", b"t", parent=om)
    await trio.sleep(TTL * 1.5)
    req = await _own_directory_answers_without_a_request(fs, backend, mine, "theirs")
    await trio.sleep(TTL * 4)  # past the TTL and the window
    assert (await fs.lookup(mine.ino, "theirs")).size == 1
    assert req.lists or req.heads


async def _own_directory_answers_without_a_request(fs, backend, mine, absent: str) -> Requests:
    """Past the TTL, within the own window: a lookup and getattr of ``mine`` (made by ``fs``) and
    a lookup of ``absent`` in it (another client's new name) are answered from what the mount
    knows since mkdir, without any request now or in the background."""
    req = Requests(backend.store)
    assert (await fs.lookup(ROOT, "mine")).ino == mine.ino
    assert (await fs.getattr(mine.ino)).mode & 0o777 == 0o755
    with pytest.raises(DssefsError) as e:
        await fs.lookup(mine.ino, absent)  # not seen yet
    assert e.value.errno == errno.ENOENT
    await trio.sleep(0.1)
    assert req.heads == [] and req.lists == [] and fs.stale.running == 0
    assert fs.stale.own >= 3
    return req


async def test_answers_older_than_the_window_are_waited_for(backend, tmp_path):
    other = make_fs(backend, tmp_path / "o")
    od = (await other.mkdir(ROOT, "d", 0o755, 0, 0)).ino
    await other.mkdir(od, "s", 0o755, 0, 0)
    fs = make_fs(backend, tmp_path, attr_timeout=TTL, entry_timeout=TTL, stale_window=TTL)
    d = await fs.lookup(ROOT, "d")
    await fs.lookup(d.ino, "s")
    await other.rmdir(od, "s")
    await trio.sleep(TTL * 2.5)  # past the TTL and the window
    with pytest.raises(DssefsError) as e:
        await fs.lookup(d.ino, "s")
    assert e.value.errno == errno.ENOENT
    assert fs.stale.served == 0


async def test_a_failed_background_refresh_is_counted_and_asked_again(backend, tmp_path):
    await make_fs(backend, tmp_path / "o").mkdir(ROOT, "d", 0o750, 0, 0)  # another client's
    fs = make_fs(backend, tmp_path, attr_timeout=TTL, entry_timeout=TTL, stale_window=20 * TTL)
    d = await fs.lookup(ROOT, "d")
    await trio.sleep(TTL * 1.5)
    store = backend.store
    real_head, real_list, real_get = store.head, store.list, store.get_range

    def down(*_a, **_kw):
        from dssefs.errors import StoreError
        raise StoreError("store unreachable (test)", errno=errno.EIO)
    store.head = store.list = store.get_range = down
    try:
        assert (await fs.getattr(d.ino)).mode & 0o777 == 0o750  # the known answer, at once
        with trio.fail_after(5):
            while fs.stale.failed == 0:
                await trio.sleep(0.01)
        assert (await fs.getattr(d.ino)).mode & 0o777 == 0o750  # still within the window
    finally:
        store.head, store.list, store.get_range = real_head, real_list, real_get
    with trio.fail_after(5):
        while fs.stale.running or fs.stale.refreshed == 0:
            await trio.sleep(0.01)
    assert (await fs.getattr(d.ino)).mode & 0o777 == 0o750


async def test_a_stale_listing_never_hides_a_name_known_since(backend, tmp_path):
    # a listing used past its TTL answers only for names the mount knows nothing about: a known
    # name missing from it (the listing predates it) is probed, not dropped
    other = make_fs(backend, tmp_path / "o")
    od = (await other.mkdir(ROOT, "d", 0o755, 0, 0)).ino
    await write_file(other, "x", b"1", parent=od)
    fs = make_fs(backend, tmp_path, attr_timeout=TTL, entry_timeout=TTL, stale_window=20 * TTL)
    d = await fs.lookup(ROOT, "d")
    x = await fs.lookup(d.ino, "x")
    fs._listings[d.ino] = (trio.current_time() - 2 * TTL, {})  # an older listing, without x
    await trio.sleep(TTL * 1.5)
    assert (await fs.lookup(d.ino, "x")).ino == x.ino
    with pytest.raises(DssefsError) as e:  # an unknown name is answered by that listing
        await fs.lookup(d.ino, "y")
    assert e.value.errno == errno.ENOENT


async def test_default_mode_asks_nothing_about_directories_made_here_within_the_own_window(backend, tmp_path):
    # without write-back: a directory this mount created, its attributes and absent names in it
    # are answered past the TTL without a request until the own window is over; another client's
    # directory is still revalidated (waited for) after the TTL
    other = make_fs(backend, tmp_path / "o")
    od = (await other.mkdir(ROOT, "theirs", 0o755, 0, 0)).ino
    fs = make_fs(backend, tmp_path, attr_timeout=TTL, entry_timeout=TTL, own_window=4 * TTL)
    assert fs.stale.window == 0
    mine = await fs.mkdir(ROOT, "mine", 0o755, 0, 0)
    await write_file(other, "x", b"t", parent=(await other.lookup(ROOT, "mine")).ino)
    theirs = await fs.lookup(ROOT, "theirs")
    with pytest.raises(DssefsError):
        await fs.lookup(theirs.ino, "y")  # its listing is asked (absent)
    await write_file(other, "y", b"u", parent=od)
    await trio.sleep(TTL * 1.5)
    req = await _own_directory_answers_without_a_request(fs, backend, mine, "x")
    assert fs.stale.served == fs.stale.own
    # another client's directory: waited for, the new name is seen
    assert (await fs.lookup(theirs.ino, "y")).size == 1
    assert req.lists or req.heads
    assert fs.stale.served == fs.stale.own  # nothing else was answered past its TTL
    await trio.sleep(TTL * 4)  # past the TTL and the own window
    req.clear()
    assert (await fs.lookup(mine.ino, "x")).size == 1
    assert req.lists or req.heads

