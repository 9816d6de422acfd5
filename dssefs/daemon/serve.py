"""Serving one mount: build the file system, mount it, answer FUSE until unmounted or signalled.

The life of a daemon (:class:`Daemon`): open the store and keys (one listing proves the store
answers), mount, report ready (pipe to ``dssefs mount``; ``READY=1`` to systemd) once the kernel's
FUSE_INIT arrives, serve.  Beside FUSE, on the same event loop: the control socket (``dssefs
status``), ``STATUS=`` lines every few seconds, ``WATCHDOG=1`` pings when systemd asks for them.
Once it serves, a worker thread aborts the multipart uploads that crashed writers left under the
mount's prefix (:mod:`dssefs.store.uploads`, ``stale_upload_age``), and interrupted directory
renames are finished (:mod:`dssefs.fs.renames`); READY waits for neither.
SIGTERM, SIGINT or SIGHUP (or an unmount; signals are handled from before the mount exists until
exit, see :mod:`.stopsignals`): ``STOPPING=1``, store every dirty file and send the pending
deletes (``EXTEND_TIMEOUT_USEC=`` while that makes progress), unmount, exit 0; 1 if any file could
not be stored or an object not deleted (each named in the log); 2 after an internal failure, leaving the mount dead (ENOTCONN) so
it cannot be mistaken for an empty directory.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import socket
import threading
import time

import trio

from ..envelope import outer
from ..errors import DssefsError
from ..session import default_source, default_store_dir, key_provider, store_options, vault_for
from ..store.metered import MeteredStore, StoreMeter
from ..store.uploads import abort_stale_uploads
from ..fs.activity import dirty_figures
from . import report
from .control import serve_control
from .mounts import mount_entries
from .notify import Notifier
from .paths import (control_socket, default_journal_dir, default_spill_dir, ensure_runtime_dir, pid_file,
                    recorded_daemon, remove_if_mine, write_pid_file)
from .request import MountRequest
from .stopsignals import StartInterrupted, StopSignals

log = logging.getLogger("dssefs.daemon")


def journal_workers(s) -> int:
    """Uploads of the write-back journal at once."""
    return max(4, s.workers * 2)


def open_backend(req: MountRequest, meter: StoreMeter | None = None):
    """Store (counted by ``meter`` when given), key provider and prefix for the request (may talk
    to S3/KMS)."""
    from ..store import open_store

    s = req.settings
    if req.source is None:
        req.source = default_source()
    if req.source == default_source():
        os.makedirs(default_store_dir(), mode=0o700, exist_ok=True)
    store, prefix = open_store(req.source, **store_options(s))
    if s.write_back and not s.read_only and getattr(store, "supports_upload_helper", False):
        from ..store.helper import HelperPuts

        try:  # the journal's small PUTs, sent by a helper process (store/helper.py)
            store = HelperPuts(store, req.source, store_options(s), workers=journal_workers(s))
        except OSError as e:
            log.warning("event=upload_helper_failed reason='%s' action='PUTs are sent from the daemon'", e)
    if meter is not None:
        store = MeteredStore(store, meter)
    if s.write_back and not s.read_only:
        from ..store.journal import JournalStore

        store = JournalStore(store, s.journal_dir or default_journal_dir(req.mountpoint),
                             workers=journal_workers(s), identity=f"{store.url.rstrip('/')}/{prefix}")
    setup = key_provider(s, create_default=True)
    if setup.created_keyring:
        log.info("event=keyring_created path=%s", setup.created_keyring)
    req.default_keyring_used = s.keyring is None and s.kms_key_id is None
    keys = setup.provider
    return store, keys, prefix


# write-back mode: an answer up to this many TTLs past its TTL is used while it is refreshed in the
# background (fs/stale.py; docs/semantics.md)
STALE_FACTOR = 10
# either mode: what is known of a directory this mount created is used this many TTLs past its TTL
# without a request (a minute by default: tools that build a tree come back to its directories
# later; fs/stale.py; docs/semantics.md "Directories this mount created")
OWN_FACTOR = 60


def build_filesystem(req: MountRequest, store, keys, prefix):
    from ..fs import Filesystem, FsConfig

    s = req.settings
    vault = vault_for(s, store, keys)
    ttl = min(s.entry_timeout, s.attr_timeout)
    cfg = FsConfig(attr_timeout=s.attr_timeout, entry_timeout=s.entry_timeout, attr_delay=s.attr_delay,
                   uid=s.uid if s.uid is not None else os.getuid(),
                   gid=s.gid if s.gid is not None else os.getgid(),
                   file_mode=s.file_mode, dir_mode=s.dir_mode, foreign_objects=s.foreign_objects,
                   read_only=s.read_only, cache_size=s.cache_size, small_file_prefetch=s.small_file_prefetch,
                   spill_dir=s.spill_dir or default_spill_dir(req.mountpoint),
                   chunk_size=s.chunk_size, io_workers=max(2, s.workers * 2), write_behind=s.write_behind,
                   crypto_workers=max(1, os.cpu_count() or 1),
                   stale_window=STALE_FACTOR * ttl if s.write_back else 0.0, own_window=OWN_FACTOR * ttl)
    fs = Filesystem(vault, prefix, cfg)
    from ..store.journal import JournalStore

    journal = store if isinstance(store, JournalStore) else None
    if journal is not None:  # versions refused in the background are saved next to the original
        journal.on_conflict = lambda key, meta, body: vault.save_conflict_copy(key, meta, body, journal.inner)
    # the renames this daemon begins are its mount point's: the next daemon there finishes them
    fs.rename_owner = f"{socket.gethostname()}:{os.path.abspath(req.mountpoint)}"
    return fs


def warm_up_crypto() -> None:
    try:
        outer.warm_up()
    except Exception as e:  # noqa: BLE001 - the first real use reports it where it matters
        log.warning("event=crypto_warm_up_failed reason='%s'", e)


def start_epoch_work(vault, writable: bool) -> None:
    """While the mount starts, in threads of their own (each failure is logged and left to the
    first use, which asks again and reports it there): a writable mount generates its first
    epoch's keys, so that its first write does not wait for KMS (the record is stored with that
    write); every mount unwraps the newest stored epoch's keys, so that the first files opened
    (most often the last writer's) do not wait for the record and KMS."""
    def run(call, event: str, effect: str) -> None:
        try:
            call(vault.epoch_prefix)
        except Exception as e:  # noqa: BLE001 - see above
            log.info("event=%s reason='%s' effect='%s'", event, e, effect)

    if writable:
        threading.Thread(target=run, args=(vault.epochs.prepare, "epoch_prepare_failed",
                                           "the first write asks for the keys itself"),
                         name="dssefs-epoch", daemon=True).start()
    threading.Thread(target=run, args=(vault.epochs.warm, "epoch_warm_failed",
                                       "the first reader fetches the keys itself"),
                     name="dssefs-epoch-warm", daemon=True).start()


def fuse_options(req: MountRequest) -> set[str]:
    src = "".join(c for c in (req.settings.name or req.source or "dssefs") if c not in ", \t\n\\")
    opts = {"fsname=" + src, "subtype=dssefs", "default_permissions"}
    if req.settings.allow_other:
        opts.add("allow_other")
    if req.settings.read_only:
        opts.add("ro")
    return opts


def raise_read_ahead(mnt: str, kb: int = 1024) -> None:
    for e in mount_entries(mnt):
        if e["fstype"].startswith("fuse"):
            path = f"/sys/class/bdi/{e['devno']}/read_ahead_kb"
            try:
                with open(path, "w") as f:
                    f.write(str(kb))
                log.debug("event=read_ahead path=%s kb=%d", path, kb)
            except OSError as err:
                log.debug("event=read_ahead_failed path=%s reason=%s", path, err)


STATUS_INTERVAL = 2.0  # seconds between STATUS= updates (sent only when the line changed)
PROGRESS_INTERVAL = 5.0  # seconds between progress checks while stopping
EXTEND_BY = 30.0  # seconds of stop timeout granted per check that saw progress


class Daemon:
    """One mount's daemon.  ``ready(msg)`` is called once: None when the mount is live, or an
    error message before that."""

    def __init__(self, req: MountRequest, ready, notifier: Notifier | None = None):
        self.req = req
        self._ready_cb = ready
        self.notifier = notifier or Notifier()
        self.meter = StoreMeter()
        self.state = "starting"
        self.live = False
        self.fs = self.keys = self.store = None
        self.prefix = ""
        self._stop_cleanup = threading.Event()  # ends the stale-upload clean-up early
        self.failures: list = []
        self.deletes_left: list = []  # (object, error): deletes the store still refused at unmount
        self.signals: StopSignals | None = None

    # ---- start ----------------------------------------------------------------------------------

    def _fail_start(self, msg: str, code: int = errno.EIO) -> int:
        if self.signals is not None:
            self.signals.ignore()  # exiting anyway: a stop signal now must not interrupt the report
        self.notifier.send(f"STATUS=failed: {msg}", f"ERRNO={code}")
        self._ready_cb(msg)
        return 1

    def run(self) -> int:
        import pyfuse3

        from ..fs.fuse_ops import FuseOps

        req = self.req
        self.signals = StopSignals()
        # the outer layer's libraries load while the store and keys are checked, not on first use
        threading.Thread(target=warm_up_crypto, name="dssefs-warm-up", daemon=True).start()
        try:
            self.signals.install()
            self.store, self.keys, prefix = open_backend(req, self.meter)
            self.prefix = prefix
            self.fs = build_filesystem(req, self.store, self.keys, prefix)
            # reachability: one listing request now gives a clear error instead of a broken mount
            # (before any KMS request is started), and answers the root's first lookups
            self.fs.list_root()
            start_epoch_work(self.fs.vault, not req.settings.read_only and self.fs.vault.keys is not None)
            self.fs.load_root()
        except StartInterrupted as e:
            # asked to stop before anything was mounted: not a failure (exit 0, no READY=1)
            self.signals.ignore()
            log.info("event=start_interrupted reason='%s'", e)
            self.notifier.send(f"STATUS={e}")
            self._ready_cb(str(e))
            return 0
        except DssefsError as e:
            return self._fail_start(str(e), e.errno)
        except Exception as e:  # noqa: BLE001 - an unmapped failure still gets one clear line
            log.exception("event=start_failed")
            return self._fail_start(f"cannot start: {type(e).__name__}: {e}")
        mnt = req.mountpoint
        self.signals.arm()  # from here on a stop signal means: store, unmount, exit
        try:
            pyfuse3.init(FuseOps(self.fs, on_init=self._on_init), mnt, fuse_options(req))
        except Exception as e:  # noqa: BLE001 - libfuse says little more than "failed"
            return self._fail_start(f"cannot mount on {mnt}: {e}")
        pidf = pid_file(mnt)
        try:
            ensure_runtime_dir()
            if recorded_daemon(mnt) is None:  # an earlier daemon's handshake files, nobody waits for them
                for leftover in (pidf + ".status", pidf + ".wait"):
                    if os.path.exists(leftover):
                        os.unlink(leftover)
            write_pid_file(pidf, mnt)
        except (OSError, DssefsError) as e:
            log.warning("event=pid_file_failed path=%s reason=%s effect='dssefs umount and status will not "
                        "find this daemon'", pidf, e)
        log.info("event=mounted name=%s source=%s mountpoint=%s prefix=%r chunk_size=%d cache_size=%d "
                 "pid=%d watchdog_s=%s", req.settings.name or "-", req.source, mnt, prefix,
                 req.settings.chunk_size, req.settings.cache_size, os.getpid(), self.notifier.watchdog)
        try:
            trio.run(self._main)
        except BaseException:
            log.exception("event=fatal action='leaving the mount dead (ENOTCONN) so it is not mistaken "
                          "for an empty directory'")
            pyfuse3.close(unmount=False)
            _status(pidf, 2)
            return 2
        finally:
            if not self.live:
                self._ready_cb("the file system stopped before it was ready (see the log above)")
        pyfuse3.close(unmount=True)
        self._stop_cleanup.set()
        self._close()
        code = 1 if self.failures or self.deletes_left else 0
        if code:
            log.error("event=unmounted mountpoint=%s dirty_files_lost=%d deletes_not_done=%d (see the errors "
                      "above)", mnt, len(self.failures), len(self.deletes_left))
        else:
            spill = self.fs.cache.spill_area
            log.info("event=unmounted mountpoint=%s spill_bytes=%d", mnt, spill.bytes_written if spill else 0)
        _status(pidf, code)
        self.signals.ignore()
        return code

    def _on_init(self) -> None:
        """The kernel's FUSE_INIT: the mount is in the mount table and answers."""
        self.live = True
        self.state = "serving"
        self._ready_cb(None)
        # nothing can be dirty before the kernel's first request
        self.notifier.ready(report.status_line(report.summary(self, 0, 0)))

    def _close(self) -> None:
        self.fs.close()
        for closer in (self.fs.vault.close, self.keys.close, self.store.close):
            try:
                closer()
            except Exception as e:  # noqa: BLE001 - exiting anyway
                log.debug("event=close_failed reason=%s", e)

    # ---- reports ----------------------------------------------------------------------------------

    async def report(self) -> dict:
        return await report.collect(self)

    async def status_line(self) -> str:
        return report.status_line(report.summary(self, *await dirty_figures(self.fs)))

    async def _answer(self, command: str) -> dict:
        return await self.report()

    # ---- the event loop ------------------------------------------------------------------------------

    async def _main(self) -> None:
        import pyfuse3

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            nursery.start_soon(self._after_ready)
            nursery.start_soon(self._clean_stale_uploads)
            nursery.start_soon(self._resume_renames)
            if self.notifier.enabled:
                nursery.start_soon(self._status_updates)
            if self.notifier.watchdog:
                nursery.start_soon(self._watchdog, self.notifier.watchdog)
            try:
                await nursery.start(serve_control, control_socket(self.req.mountpoint), self._answer)
            except (OSError, DssefsError) as e:
                log.warning("event=control_socket_failed reason=%s effect='dssefs status will not answer'", e)
            await pyfuse3.main()
            # unmounted (umount, fusermount -u, or terminate() after a signal): store what is left
            if self.state != "stopping":
                await self._stopping("unmounted")
            self.failures = await self._flush(final=True)
            self.failures += await self._drain_journal()
            nursery.cancel_scope.cancel()

    async def _drain_journal(self) -> list:
        """Write-back: wait until the journal is uploaded.  What the store keeps refusing stays in
        the journal (on disk, encrypted) for the next mount, and is reported like an unstored file."""
        from ..store.journal import JournalStore

        if not isinstance(self.store, JournalStore):
            return []
        drain = self.store.drain
        left = self.store.stats()["entries"]
        if left:
            log.info("event=journal_drain entries=%d", left)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._extend_while_progressing)
            try:
                stuck = await trio.to_thread.run_sync(drain)
            finally:
                nursery.cancel_scope.cancel()
        for key, err in stuck:
            log.error("event=journal_not_drained object=%s/%s reason=%s effect='kept in the write-back journal "
                      "%s; the next mount uploads it'", self.store.url.rstrip("/"), key, err, self.store.dir)
        return [(key, err) for key, err in stuck]

    async def _stopping(self, why: str) -> None:
        self.state = "stopping"
        self._stop_cleanup.set()
        log.info("event=stopping reason=%s action='store dirty files and unmount' dirty_files=%d",
                 why, len(self.fs.dirty_inodes()))
        self.notifier.stopping(await self.status_line())

    async def _signals(self) -> None:
        import pyfuse3

        while True:
            name = signal.Signals(await self.signals.wait()).name
            if self.state == "stopping":
                log.info("event=signal signal=%s effect='already stopping: storing dirty files'", name)
                continue
            await self._stopping(f"signal={name}")
            await self._flush()
            pyfuse3.terminate()

    async def _flush(self, final: bool = False) -> list:
        """flush_all, then the pending deletes (:meth:`_drain_deletes`), telling systemd that the
        stop is making progress meanwhile."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._extend_while_progressing)
            try:
                failures = await self.fs.flush_all(final=final)
                self.deletes_left = await self._drain_deletes()
                return failures
            finally:
                nursery.cancel_scope.cancel()

    async def _drain_deletes(self) -> list:
        """Wait for the deletes unlink and rmdir left to the background: each pending key is sent
        at least once more.  A key the store still refuses is reported like an unstored file (exit
        status 1); its object stays in the store, and the name reappears at the next mount."""
        pending = len(self.fs.deletes)
        if pending:
            log.info("event=deletes_drain pending=%d", pending)
        left = await self.fs.deletes.drain()
        for obj, err in left:
            log.error("op=delete object=%s errno=%s reason=%s effect='not deleted: the object stays in the "
                      "store and reappears at the next mount'", obj,
                      errno.errorcode.get(getattr(err, "errno", None), "EIO"), str(err).replace("\n", " "))
        return left

    def _progress_mark(self) -> tuple[int, int, int]:
        snap = self.meter.snapshot()
        return (snap["bytes_written"], snap["requests"]["upload_part"] + snap["objects_written"],
                self.fs.deletes.deleted)

    async def _extend_while_progressing(self) -> None:
        """While the stop is storing data, grant it more time: ``EXTEND_TIMEOUT_USEC`` after every
        interval in which bytes reached the store.  A flush that is stuck gets no extension, so
        systemd's TimeoutStopSec still ends it."""
        last = self._progress_mark()
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            now = self._progress_mark()
            self.notifier.status(await self.status_line())
            if now != last:
                self.notifier.extend_timeout(EXTEND_BY)
            last = now

    async def _after_ready(self) -> None:
        while not self.live:
            await trio.sleep(0.02)
        await trio.to_thread.run_sync(raise_read_ahead, self.req.mountpoint)

    async def _clean_stale_uploads(self) -> None:
        """Abort the multipart uploads crashed writers left under the prefix, once the mount
        serves, in a worker thread (one listing, one request per upload).  Never fails the mount:
        a failure is logged and the uploads wait for the next mount."""
        s = self.req.settings
        max_age = s.stale_upload_age
        if s.read_only or not max_age:
            return
        while not self.live:
            await trio.sleep(0.02)
        t0 = time.monotonic()
        where = f"{self.store.url.rstrip('/')}/{self.prefix}"
        try:
            result = await trio.to_thread.run_sync(
                functools.partial(abort_stale_uploads, self.store, self.prefix, max_age, stop=self._stop_cleanup),
                abandon_on_cancel=True)  # an unmount does not wait for it
        except Exception as e:  # noqa: BLE001 - housekeeping: the mount serves on
            reason = str(e) if isinstance(e, DssefsError) else f"{type(e).__name__}: {e}"
            log.warning("event=stale_upload_cleanup_failed store=%s max_age=%g reason=%s effect='abandoned "
                        "multipart uploads are kept until the next mount'", where, max_age, reason)
            return
        self.meter.add(stale_uploads_aborted=len(result.aborted))
        log.info("event=stale_uploads store=%s max_age=%g aborted=%d kept=%d failed=%d%s seconds=%.2f", where,
                 max_age, len(result.aborted), result.kept, result.failed,
                 " stopped=yes" if result.stopped else "", time.monotonic() - t0)

    async def _resume_renames(self) -> None:
        """Finish the directory renames that a crash interrupted (:mod:`dssefs.fs.renames`), once
        the mount serves.  Never fails the mount: a failure is logged and they wait for the next
        rename of those directories or the next mount."""
        while not self.live:
            await trio.sleep(0.02)
        try:
            await self.fs.resume_renames()
        except Exception as e:  # noqa: BLE001 - recovery: the mount serves on
            reason = str(e) if isinstance(e, DssefsError) else f"{type(e).__name__}: {e}"
            log.warning("event=rename_recovery_failed store=%s/%s reason=%s effect='interrupted renames "
                        "are finished by the next rename of their directories or the next mount'",
                        self.store.url.rstrip("/"), self.prefix, reason)

    async def _status_updates(self) -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL)
            if self.live:
                self.notifier.status(await self.status_line())

    async def _watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` from the event loop itself: a stalled loop stops the pings."""
        while True:
            self.notifier.ping()
            await trio.sleep(interval)


def serve(req: MountRequest, ready) -> int:
    """Mount and serve until unmounted or signalled; returns the exit status."""
    return Daemon(req, ready).run()


def _status(pidf: str, code: int) -> None:
    """Remove the pid file (if still ours); leave the exit status for a waiting 'dssefs umount'
    (only then: nobody else would remove the file)."""
    try:
        if os.path.exists(pidf + ".wait"):
            with open(pidf + ".status", "w") as f:
                f.write(f"{code}\n")
    except OSError:
        pass
    remove_if_mine(pidf, os.getpid())
