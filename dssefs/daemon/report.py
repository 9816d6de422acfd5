"""The daemon's status report: one plain-data dict (``dssefs status --json``), its human form,
and the one-line summary systemd shows as ``STATUS=``.  Never contains keys, plaintext or
credentials: object names, sizes and counters only.
"""

from __future__ import annotations

import os

from .. import __version__
from ..fs.activity import snapshot
from ..store.journal import JournalStore


async def collect(daemon) -> dict:
    """``daemon``: the serving :class:`~dssefs.daemon.serve.Daemon`."""
    req = daemon.req
    report = {
        "mountpoint": req.mountpoint,
        "source": req.source,
        "name": req.settings.name or req.source,
        "pid": os.getpid(),
        "version": __version__,
        "state": daemon.state,
        "read_only": bool(req.settings.read_only),
    }
    report.update(await snapshot(daemon.fs))
    report["store"] = daemon.meter.snapshot()
    report["deletes"] = daemon.fs.deletes.stats()  # the backlog of background deletes (unlink, rmdir)
    report["kms"] = {"provider": getattr(daemon.keys, "kind", "?"), **daemon.keys.stats}
    if isinstance(daemon.store, JournalStore):  # --write-back: the backlog of the journal
        report["write_back"] = daemon.store.stats()
        helper = _upload_helper(daemon.store)
        if helper is not None:
            report["write_back"]["helper"] = helper.stats()
    if daemon.fs.stale.own_window > 0:  # answers used past their TTL (never shorter than the stale window)
        report["stale_answers"] = daemon.fs.stale.stats()
    return report


def _upload_helper(store):
    """The helper process sending small PUTs (store/helper.py) among the stores ``store`` wraps."""
    from ..store.helper import HelperPuts

    while store is not None and not isinstance(store, HelperPuts):
        store = vars(store).get("inner")
    return store


def summary(daemon, dirty_files: int, dirty_bytes: int) -> dict:
    """The part of the report :func:`status_line` reads, without the rest."""
    return {"state": daemon.state, "name": daemon.req.settings.name or daemon.req.source,
            "dirty": {"files": dirty_files, "bytes": dirty_bytes},
            "store": {"writes_in_flight": daemon.meter.snapshot()["writes_in_flight"]},
            "deletes": {"pending": len(daemon.fs.deletes)},
            "errors": {"total": daemon.fs.activity.errors}}


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def status_line(r: dict) -> str:
    """``serving NAME: 2 dirty files (3.0 MiB), 1 upload in flight, 0 errors`` (with ``, 5 deletes
    pending`` before the errors while there are)."""
    dirty = r["dirty"]
    uploads = r["store"]["writes_in_flight"]
    deletes = r.get("deletes", {}).get("pending", 0)
    return (f"{r['state']} {r['name']}: {_plural(dirty['files'], 'dirty file')} ({size(dirty['bytes'])}), "
            f"{_plural(uploads, 'upload')} in flight, "
            + (f"{_plural(deletes, 'delete')} pending, " if deletes else "")
            + _plural(r['errors']['total'], 'error'))


def format_text(r: dict) -> str:
    cache, store, kms = r["cache"], r["store"], r["kms"]
    reqs = ", ".join(f"{k} {v}" for k, v in store["requests"].items() if v) or "none"
    kms_calls = ", ".join(f"{k} {v}" for k, v in kms.items() if k != "provider" and v) or "none"
    errors = r["errors"]
    by_errno = ", ".join(f"{k} {v}" for k, v in sorted(errors["by_errno"].items()))
    lines = [
        f"mount:      {r['mountpoint']} ({r['name']}, {r['source']}){' read-only' if r['read_only'] else ''}",
        f"daemon:     pid {r['pid']}, dssefs {r['version']}, {r['state']} for {_duration(r['uptime_s'])}",
        f"cache:      {size(cache['used'])} of {size(cache['budget'])} in {cache['chunks']} chunks; "
        f"{cache['spilled_chunks']} chunks spilled ({size(cache['spill_bytes_written'])} written to the "
        "encrypted spill area)",
        f"dirty:      {_plural(r['dirty']['files'], 'file')}, {size(r['dirty']['bytes'])} not stored yet",
        f"uploads:    {store['writes_in_flight']} in flight; {r['flushes']['done']} files stored, "
        f"{r['flushes']['failed']} failed",
        f"store:      {store['objects_written']} objects written ({size(store['bytes_written'])}), "
        f"{size(store['bytes_read'])} read; requests: {reqs}; {store['not_found']} not found, "
        f"{store['failures']} failed"
        + (f"; {store['stale_uploads_aborted']} stale multipart uploads aborted"
           if store.get("stale_uploads_aborted") else ""),
        f"kms:        {kms['provider']}: {kms_calls}",
        f"files:      {r['open_files']} open, {r['inodes']} inodes known",
        f"errors:     {errors['total']}" + (f" ({by_errno})" if by_errno else ""),
    ]
    if r.get("deletes") is not None:
        lines.insert(-1, _deletes_line(r["deletes"]))  # before the errors
    wb = r.get("write_back")
    if wb is not None:
        lines.append(f"write-back: {wb['entries']} versions ({size(wb['bytes'])}) waiting in {wb['dir']}, "
                     f"{wb['uploading']} uploading; {wb['uploaded']} uploaded, {wb['failed_attempts']} failed "
                     f"attempts, {wb['conflicts']} conflicts")
        h = wb.get("helper")
        if h is not None:
            lines.append(f"  small PUTs sent by helper process {h['pid']} "
                         f"({'running' if h['alive'] else 'gone: sent by the daemon'}, {h['puts']} sent)")
        for c in wb["recent_conflicts"]:
            lines.append(f"  conflict object={c['object']} saved_as={c['saved_as']}")
    st = r.get("stale_answers")
    if st is not None:
        lines.append(f"revalidate: {st['served']} answers used past their TTL (window {st['window_s']:g} s, "
                     f"{st['own_window_s']:g} s for directories made here: {st['own']}), "
                     f"{st['refreshed']} refreshed in the background, {st['failed']} refreshes failed")
    for e in errors["recent"][-5:]:
        lines.append(f"  op={e['op']} errno={e['errno']} object={e['object']} reason={e['reason']}")
    return "\n".join(lines)


def _deletes_line(d: dict) -> str:
    """``deletes:    3 pending (1 being sent, 2 waiting to retry, oldest 4.0 s); 120 done in 7
    requests, 2 failed attempts (last: REASON)``."""
    line = f"deletes:    {d['pending']} pending"
    if d["pending"]:
        line += (f" ({d['sending']} being sent, {d['waiting_retry']} waiting to retry, "
                 f"oldest {d['oldest_s']:.1f} s)")
    line += (f"; {d['deleted']} done in {_plural(d['requests'], 'request')}, "
             f"{_plural(d['failed_attempts'], 'failed attempt')}")
    if d["failed_attempts"] and d.get("last_error"):
        line += f" (last: {d['last_error']})"
    return line


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
