#!/usr/bin/env python3
"""A seeded random file-system workload in the manner of fsstress (xfstests' ``ltp/fsstress.c``),
for machines where fsstress itself cannot be installed (Debian 12 packages neither xfstests nor
LTP).

One process works in ``DIR/p0`` and runs N operations drawn from fsstress's default frequency
table (the btrfs-only subvolume and snapshot operations are off, as fsstress turns them off on
other file systems).  Each operation opens, acts and closes, as fsstress does, so on dssefs
every modifying operation ends with a flush of that file.  Offsets and lengths follow fsstress:

* ``write``/``writev``/``uring_write`` write 1..128 KiB at a random offset below size + 1 MiB;
  ``dwrite``/``awrite`` do the same with ``O_DIRECT``, aligned to ``st_blksize``;
* ``truncate`` and the ``fallocate`` family pick an offset below size + 1 MiB;
* ``copyrange`` (``copy_file_range``) and ``splice`` copy 1..128 KiB of one file into another
  at an offset below the target's size + 1024 * ``st_blksize``: on a file system that reports a
  large ``st_blksize`` (dssefs: 128 KiB) these make files grow by up to 128 MiB at a time, sparse;
* ``mwrite``/``mread`` map a range inside the file; ``read``/``readv``/``dread``/``aread``/
  ``uring_read`` read inside it;
* namespace operations: ``creat``, ``mkdir``, ``mknod``, ``symlink`` (targets up to 4 KiB),
  ``link``, ``rename`` and ``renameat2`` with ``NOREPLACE``/``EXCHANGE``/``WHITEOUT``, ``unlink``,
  ``rmdir``; metadata: ``chown``, ``stat``, ``getdents``, ``readlink``, user xattrs;
  ``fsync``/``fdatasync``/``sync``;
* ioctls: ``clonerange``/``deduperange``/``fiemap``/``getattr`` issue the generic ioctls,
  ``resvsp`` the generic preallocation ioctl; the XFS-only ``allocsp``/``freesp``/``unresvsp``/
  ``bulkstat``/``bulkstat1``/``setxattr`` open and stat the file and count as ENOTTY (what they
  get on any file system but XFS) without the ioctl.

Errors are part of the workload (fsstress ignores them too): every operation's result is counted
by errno.  The random sequence is Python's, so the same seed does not give fsstress's exact
operations, only the same mix.

Usage (prints a JSON summary on stdout)::

    python tests/bench/fsstress_like.py -d /mnt/x/fss -n 4000 -s 1
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import mmap
import os
import random
import stat
import struct
import sys
import time

FILELEN_MAX = 32 * 4096
MiB = 1 << 20
PATH_MAX = 4096

FT_DIR, FT_REG, FT_SYM, FT_DEV = range(4)
TAGS = "dflc"
ANYDIR = (FT_DIR,)
REG = (FT_REG,)
NOTDIR = (FT_REG, FT_SYM, FT_DEV)
ANY = (FT_DIR, FT_REG, FT_SYM, FT_DEV)

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_ZERO_RANGE, FALLOC_FL_INSERT_RANGE = 0x08, 0x10, 0x20
FICLONERANGE = 0x4020940D
FIDEDUPERANGE = 0xC0189436
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_FIEMAP = 0xC020660B
FS_IOC_RESVSP64 = 0x4030582A
AT_FDCWD = -100

#: fsstress's default frequencies (0: off by default or btrfs only)
FREQ = {
    "allocsp": 1, "aread": 1, "awrite": 1, "bulkstat": 1, "bulkstat1": 1, "chown": 3,
    "clonerange": 4, "copyrange": 4, "creat": 4, "deduperange": 4, "dread": 4, "dwrite": 4,
    "fallocate": 1, "fdatasync": 1, "fiemap": 1, "freesp": 1, "fsync": 1, "getattr": 1,
    "getdents": 1, "getfattr": 1, "link": 1, "listfattr": 1, "mkdir": 2, "mknod": 2, "mread": 2,
    "mwrite": 2, "punch": 1, "zero": 1, "collapse": 1, "insert": 1, "read": 1, "readlink": 1,
    "readv": 1, "removefattr": 1, "rename": 2, "rnoreplace": 2, "rexchange": 2, "rwhiteout": 2,
    "resvsp": 1, "rmdir": 1, "setfattr": 2, "setxattr": 1, "splice": 1, "stat": 1, "symlink": 2,
    "sync": 1, "truncate": 2, "unlink": 1, "unresvsp": 1, "uring_read": 1, "uring_write": 1,
    "write": 4, "writev": 4,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def _check(rc: int) -> None:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _aligned(off: int, n: int, align: int) -> tuple[int, int]:
    """O_DIRECT I/O: the offset rounded down and the length rounded to a multiple of ``align``
    (at least one block)."""
    return off - off % align, (n - n % align) or align


class Entry:
    __slots__ = ("id", "ft", "parent", "xattrs")

    def __init__(self, id: int, ft: int, parent: int, xattrs: int = 0):
        self.id, self.ft, self.parent, self.xattrs = id, ft, parent, xattrs


class Stress:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.flist: list[list[Entry]] = [[] for _ in range(4)]
        self.nameseq = 0
        self.stats: dict[str, dict] = {}

    # ---- fsstress's bookkeeping ----------------------------------------------------------------

    def random(self) -> int:
        return self.rng.getrandbits(31)

    def lrandom(self) -> int:
        return (self.random() << 32) + self.random()

    def dir_entry(self, id: int) -> Entry | None:
        for e in self.flist[FT_DIR]:
            if e.id == id:
                return e
        return None

    def path(self, e: Entry) -> str:
        parts = []
        while e is not None:
            parts.append(f"{TAGS[e.ft]}{e.id:x}")
            e = self.dir_entry(e.parent) if e.parent != -1 else None
        return "/".join(reversed(parts))

    def pick(self, types, r: int) -> Entry | None:
        total = sum(len(self.flist[t]) for t in types)
        if not total:
            return None
        x = r % total
        for t in types:
            if x < len(self.flist[t]):
                return self.flist[t][x]
            x -= len(self.flist[t])
        return None

    def new_name(self, parent: Entry | None, ft: int) -> tuple[str, int]:
        id = self.nameseq
        self.nameseq += 1
        name = f"{TAGS[ft]}{id:x}"
        return (f"{self.path(parent)}/{name}" if parent else name), id

    def add(self, ft: int, id: int, parent: int, xattrs: int = 0) -> None:
        self.flist[ft].append(Entry(id, ft, parent, xattrs))

    def remove(self, e: Entry) -> None:
        lst = self.flist[e.ft]
        i = lst.index(e)
        lst[i] = lst[-1]
        lst.pop()

    def fix_parent(self, old: int, new: int, swap: bool) -> None:
        for lst in self.flist:
            for e in lst:
                if e.parent == old:
                    e.parent = new
                elif swap and e.parent == new:
                    e.parent = old

    # ---- the run ---------------------------------------------------------------------------------

    def run(self, n: int) -> None:
        table = [op for op, f in FREQ.items() for _ in range(f)]
        for opno in range(n):
            op = table[self.random() % len(table)]
            r = self.random()
            s = self.stats.setdefault(op, {"n": 0, "ok": 0, "errors": {}, "time_s": 0.0})
            t0 = time.perf_counter()
            try:
                getattr(self, "op_" + op)(opno, r)
                s["ok"] += 1
            except OSError as e:
                name = errno.errorcode.get(e.errno, str(e.errno))
                s["errors"][name] = s["errors"].get(name, 0) + 1
            s["n"] += 1
            s["time_s"] += time.perf_counter() - t0

    # ---- helpers -------------------------------------------------------------------------------

    def _file(self, r: int, types=REG) -> str:
        e = self.pick(types, r)
        if e is None:
            raise OSError(errno.ENOENT, "no file")  # fsstress: "no filename", nothing done
        return self.path(e)

    def _open_stat(self, r: int, flags: int, types=REG) -> tuple[int, os.stat_result]:
        fd = os.open(self._file(r, types), flags)
        try:
            return fd, os.fstat(fd)
        except OSError:
            os.close(fd)
            raise

    def _fill(self, n: int) -> bytes:
        return bytes([self.nameseq & 0xFF]) * n

    def _write(self, r: int, direct: bool, vectored: bool = False) -> None:
        fd, st = self._open_stat(r, os.O_WRONLY | (os.O_DIRECT if direct else 0))
        try:
            off = self.lrandom() % (st.st_size + MiB)
            n = self.random() % FILELEN_MAX + 1
            if direct:
                off, n = _aligned(off, n, st.st_blksize)
                buf = mmap.mmap(-1, n)
                buf.write(self._fill(n))
                try:
                    os.pwrite(fd, buf, off)
                finally:
                    buf.close()
            elif vectored:
                data = self._fill(n)
                cnt = self.random() % min(n, 1024) + 1
                size = n // cnt
                os.pwritev(fd, [data[i * size:(i + 1) * size] for i in range(cnt)], off)
            else:
                os.pwrite(fd, self._fill(n), off)
        finally:
            os.close(fd)

    def _read(self, r: int, direct: bool, vectored: bool = False) -> None:
        fd, st = self._open_stat(r, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            if st.st_size == 0:
                return
            off = self.lrandom() % st.st_size
            n = self.random() % FILELEN_MAX + 1
            if direct:
                off, n = _aligned(off, n, st.st_blksize)
                buf = mmap.mmap(-1, n)
                try:
                    os.preadv(fd, [buf], off)
                finally:
                    buf.close()
            elif vectored:
                cnt = self.random() % min(n, 1024) + 1
                os.preadv(fd, [bytearray(n // cnt) for _ in range(cnt)], off)
            else:
                os.pread(fd, n, off)
        finally:
            os.close(fd)

    def _fallocate(self, r: int, mode: int, opno: int) -> None:
        fd, st = self._open_stat(r, os.O_RDWR)
        try:
            off = self.lrandom() % (st.st_size + MiB)
            n = self.random() % MiB
            if mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE) and opno % 2:
                b = st.st_blksize
                off, n = -(-off // b) * b, -(-n // b) * b
            mode |= FALLOC_FL_KEEP_SIZE & self.random()
            _check(_libc.fallocate(fd, mode, off, n))
        finally:
            os.close(fd)

    def _two_files(self, r: int) -> tuple[int, os.stat_result, int, os.stat_result]:
        src = self._file(r)
        dst = self._file(self.random())
        fd1 = os.open(src, os.O_RDONLY)
        try:
            fd2 = os.open(dst, os.O_WRONLY)
        except OSError:
            os.close(fd1)
            raise
        return fd1, os.fstat(fd1), fd2, os.fstat(fd2)

    def _copy_ranges(self, st1, st2) -> tuple[int, int, int]:
        n = self.random() % FILELEN_MAX + 1
        n = min(n, st1.st_size)
        off1 = 0 if st1.st_size == n else self.lrandom() % (st1.st_size - n)
        max_off2 = st2.st_size + 1024 * st2.st_blksize
        while True:
            off2 = self.lrandom() % max_off2
            if st1.st_ino != st2.st_ino or abs(off2 - off1) >= n:
                return n, off1, off2

    def _no_ioctl(self, r: int) -> None:
        """An XFS-only ioctl: fsstress opens and stats the file, the ioctl fails."""
        fd, _st = self._open_stat(r, os.O_RDWR)
        os.close(fd)
        raise OSError(errno.ENOTTY, "XFS-only ioctl")

    # ---- data operations -------------------------------------------------------------------------

    def op_write(self, opno, r): self._write(r, direct=False)
    def op_writev(self, opno, r): self._write(r, direct=False, vectored=True)
    def op_uring_write(self, opno, r): self._write(r, direct=False)
    def op_dwrite(self, opno, r): self._write(r, direct=True)
    def op_awrite(self, opno, r): self._write(r, direct=True)
    def op_read(self, opno, r): self._read(r, direct=False)
    def op_readv(self, opno, r): self._read(r, direct=False, vectored=True)
    def op_uring_read(self, opno, r): self._read(r, direct=False)
    def op_dread(self, opno, r): self._read(r, direct=True)
    def op_aread(self, opno, r): self._read(r, direct=True)
    def op_fallocate(self, opno, r): self._fallocate(r, 0, opno)
    def op_punch(self, opno, r): self._fallocate(r, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, opno)
    def op_zero(self, opno, r): self._fallocate(r, FALLOC_FL_ZERO_RANGE, opno)
    def op_collapse(self, opno, r): self._fallocate(r, FALLOC_FL_COLLAPSE_RANGE, opno)
    def op_insert(self, opno, r): self._fallocate(r, FALLOC_FL_INSERT_RANGE, opno)

    def op_truncate(self, opno, r):
        p = self._file(r)
        st = os.stat(p)
        os.truncate(p, self.lrandom() % (st.st_size + MiB))

    def _map(self, r: int, write: bool) -> None:
        fd, st = self._open_stat(r, os.O_RDWR if write else os.O_RDONLY)
        try:
            if st.st_size == 0:
                return
            off = self.lrandom() % st.st_size
            off -= off % mmap.PAGESIZE
            n = self.random() % min(st.st_size - off, FILELEN_MAX) + 1
            shared = self.random() % 2
            m = mmap.mmap(fd, n, flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE,
                          prot=mmap.PROT_READ | (mmap.PROT_WRITE if write else 0), offset=off)
            try:
                if write:
                    m[:] = self._fill(n)
                else:
                    bytes(m)
            finally:
                m.close()
        finally:
            os.close(fd)

    def op_mwrite(self, opno, r): self._map(r, write=True)
    def op_mread(self, opno, r): self._map(r, write=False)

    def op_copyrange(self, opno, r):
        fd1, st1, fd2, st2 = self._two_files(r)
        try:
            n, off1, off2 = self._copy_ranges(st1, st2)
            while n > 0:
                done = os.copy_file_range(fd1, fd2, n, off1, off2)
                if done <= 0:
                    break
                n, off1, off2 = n - done, off1 + done, off2 + done
        finally:
            os.close(fd1)
            os.close(fd2)

    def op_splice(self, opno, r):
        fd1, st1, fd2, st2 = self._two_files(r)
        pr, pw = os.pipe()
        try:
            n = min(self.random() % FILELEN_MAX + 1, st1.st_size)
            off1 = 0 if st1.st_size == n else self.lrandom() % (st1.st_size - n)
            off2 = self.lrandom() % (st2.st_size + 1024 * st2.st_blksize)
            while n > 0:
                got = os.splice(fd1, pw, n, offset_src=off1)
                if got <= 0:
                    break
                off1 += got
                n -= got
                while got > 0:
                    put = os.splice(pr, fd2, got, offset_dst=off2)
                    off2 += put
                    got -= put
        finally:
            for fd in (pr, pw, fd1, fd2):
                os.close(fd)

    def op_clonerange(self, opno, r):
        fd1, st1, fd2, st2 = self._two_files(r)
        try:
            n, off1, off2 = self._copy_ranges(st1, st2)
            b = st1.st_blksize
            fcntl.ioctl(fd2, FICLONERANGE, struct.pack("<qQQQ", fd1, off1 - off1 % b, n - n % b,
                                                         off2 - off2 % b))
        finally:
            os.close(fd1)
            os.close(fd2)

    def op_deduperange(self, opno, r):
        if len(self.flist[FT_REG]) < 2:
            return
        fd1, st1, fd2, st2 = self._two_files(r)
        try:
            n = min(self.random() % FILELEN_MAX + 1, st1.st_size // 2)
            arg = bytearray(struct.pack("<QQHHI", 0, n, 1, 0, 0) + struct.pack("<qQQiI", fd2, 0, 0, 0, 0))
            fcntl.ioctl(fd1, FIDEDUPERANGE, arg)
        finally:
            os.close(fd1)
            os.close(fd2)

    def op_fiemap(self, opno, r):
        fd, st = self._open_stat(r, os.O_RDWR)
        try:
            off = self.lrandom() % (st.st_size + MiB)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, bytearray(struct.pack("<QQIIII", off, self.lrandom(), 0, 0, 0, 0)))
        finally:
            os.close(fd)

    def op_getattr(self, opno, r):
        e = self.pick(ANY, r)
        fd = os.open(self.path(e) if e else ".", os.O_RDONLY)
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytearray(8))
        finally:
            os.close(fd)

    def op_resvsp(self, opno, r):
        fd, st = self._open_stat(r, os.O_RDWR)
        try:
            off = self.lrandom() % (st.st_size + MiB)
            # struct space_resv: l_type, l_whence, l_start, l_len, l_sysid, l_pid, l_pad[4]
            fcntl.ioctl(fd, FS_IOC_RESVSP64, struct.pack("<hh4xqqiI4i", 0, 0, off, self.random() % MiB, 0, 0,
                                                         0, 0, 0, 0))
        finally:
            os.close(fd)

    def op_allocsp(self, opno, r): self._no_ioctl(r)
    def op_freesp(self, opno, r): self._no_ioctl(r)
    def op_unresvsp(self, opno, r): self._no_ioctl(r)
    def op_setxattr(self, opno, r): self._no_ioctl(r)

    def op_bulkstat(self, opno, r):
        raise OSError(errno.ENOTTY, "XFS-only ioctl")

    op_bulkstat1 = op_bulkstat

    def op_fsync(self, opno, r):
        e = self.pick((FT_REG, FT_DIR), r)
        if e is None:
            raise OSError(errno.ENOENT, "no file")
        p = self.path(e)
        try:
            fd = os.open(p, os.O_WRONLY)
        except IsADirectoryError:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def op_fdatasync(self, opno, r):
        fd = os.open(self._file(r), os.O_WRONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def op_sync(self, opno, r):
        os.sync()

    # ---- names and metadata --------------------------------------------------------------------------

    def _create(self, r: int, ft: int, make) -> None:
        parent = self.pick(ANYDIR, r)
        path, id = self.new_name(parent, ft)
        make(path)
        self.add(ft, id, parent.id if parent else -1)

    def op_creat(self, opno, r):
        self._create(r, FT_REG, lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o666)))

    def op_mkdir(self, opno, r):
        self._create(r, FT_DIR, lambda p: os.mkdir(p, 0o777))

    def op_mknod(self, opno, r):
        self._create(r, FT_DEV, lambda p: os.mknod(p, stat.S_IFCHR | 0o444, 0))

    def op_symlink(self, opno, r):
        n = self.random() % PATH_MAX
        target = bytearray(b"x" * n)
        for i in range(10, n - 1, 10):
            target[i:i + 1] = b"/"
        self._create(r, FT_SYM, lambda p: os.symlink(target.decode(), p))

    def op_link(self, opno, r):
        src = self.pick(NOTDIR, r)
        if src is None:
            raise OSError(errno.ENOENT, "no file")
        parent = self.pick((FT_DIR,), self.random())
        path, id = self.new_name(parent, src.ft)
        os.link(self.path(src), path)
        self.add(src.ft, id, parent.id if parent else -1, src.xattrs)

    def _rename(self, r: int, mode: int) -> None:
        src = self.pick((FT_DEV,) if mode == RENAME_WHITEOUT else ANY, r)
        if src is None:
            raise OSError(errno.ENOENT, "no file")
        if mode == RENAME_EXCHANGE:
            dst = self.pick((src.ft,), self.random())
            if src.ft == FT_DIR and self._ancestor(src, dst):
                return
            new_path, id, parid = self.path(dst), dst.id, dst.parent
        else:
            dst = self.pick((FT_DIR,), self.random())
            parid = dst.id if dst else -1
            new_path, id = self.new_name(dst, src.ft)
        _check(_libc.renameat2(AT_FDCWD, self.path(src).encode(), AT_FDCWD, new_path.encode(), mode))
        if src.ft == FT_DIR:
            self.fix_parent(src.id, id, mode == RENAME_EXCHANGE)
        if mode == RENAME_WHITEOUT:
            self.add(src.ft, id, parid, src.xattrs)
            src.xattrs = 0
        elif mode == RENAME_EXCHANGE:
            src.xattrs, dst.xattrs = dst.xattrs, src.xattrs
        else:
            self.remove(src)
            self.add(src.ft, id, parid, src.xattrs)

    def _ancestor(self, a: Entry, b: Entry) -> bool:
        for x, y in ((a, b), (b, a)):
            e = x
            while e is not None and e.parent != -1:
                if e.parent == y.id:
                    return True
                e = self.dir_entry(e.parent)
        return False

    def op_rename(self, opno, r): self._rename(r, 0)
    def op_rnoreplace(self, opno, r): self._rename(r, RENAME_NOREPLACE)
    def op_rexchange(self, opno, r): self._rename(r, RENAME_EXCHANGE)
    def op_rwhiteout(self, opno, r): self._rename(r, RENAME_WHITEOUT)

    def op_unlink(self, opno, r):
        e = self.pick(NOTDIR, r)
        if e is None:
            raise OSError(errno.ENOENT, "no file")
        os.unlink(self.path(e))
        self.remove(e)

    def op_rmdir(self, opno, r):
        e = self.pick((FT_DIR,), r)
        if e is None:
            raise OSError(errno.ENOENT, "no directory")
        os.rmdir(self.path(e))
        self.remove(e)

    def op_chown(self, opno, r):
        e = self.pick(ANY, r)
        u, g = self.random(), self.random()
        bits = self.random() % 31
        os.lchown(self.path(e) if e else ".", u & ((1 << bits) - 1), g & ((1 << bits) - 1))

    def op_stat(self, opno, r):
        e = self.pick(ANY, r)
        if e is None:
            raise OSError(errno.ENOENT, "no entries")
        os.lstat(self.path(e))

    def op_getdents(self, opno, r):
        e = self.pick(ANYDIR, r)
        os.listdir(self.path(e) if e else ".")

    def op_readlink(self, opno, r):
        os.readlink(self._file(r, (FT_SYM,)))

    def _xattr_entry(self, r: int) -> Entry:
        e = self.pick((FT_REG, FT_DIR), r)
        if e is None:
            raise OSError(errno.ENOENT, "no file")
        return e

    def op_setfattr(self, opno, r):
        e = self._xattr_entry(r)
        flag = 0
        if e.xattrs > 0 and self.random() % 2:
            num = self.random() % e.xattrs + 1
            if self.random() % 2:
                flag = os.XATTR_REPLACE
        else:
            num = e.xattrs + 1
            if self.random() % 2:
                flag = os.XATTR_CREATE
        n = self.random() % 101
        value = "".join(self.rng.choice("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
                        for _ in range(n)).encode()
        os.setxattr(self.path(e), f"user.x{num}", value, flag, follow_symlinks=False)
        e.xattrs += 1

    def op_getfattr(self, opno, r):
        e = self._xattr_entry(r)
        num = self.random() % e.xattrs + 1 if e.xattrs else 0
        os.getxattr(self.path(e), f"user.x{num}")

    def op_listfattr(self, opno, r):
        os.listxattr(self.path(self._xattr_entry(r)))

    def op_removefattr(self, opno, r):
        e = self._xattr_entry(r)
        num = self.random() % e.xattrs + 1 if e.xattrs else 0
        os.removexattr(self.path(e), f"user.x{num}")


def tree_sizes(top: str) -> dict:
    """Apparent and allocated sizes of the regular files under ``top``."""
    sizes = []
    blocks = 0
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                sizes.append(st.st_size)
                blocks += st.st_blocks * 512
    sizes.sort()
    return {"files": len(sizes), "total_bytes": sum(sizes), "allocated_bytes": blocks,
            "largest": sizes[-10:][::-1], "over_64MiB": sum(1 for s in sizes if s > 64 * MiB)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-d", "--dir", required=True, help="directory to work in (created)")
    ap.add_argument("-n", "--ops", type=int, default=4000, help="operations (default 4000)")
    ap.add_argument("-s", "--seed", type=int, default=1, help="random seed (default 1)")
    args = ap.parse_args(argv)
    work = os.path.join(args.dir, "p0")
    os.makedirs(work, exist_ok=True)
    os.chdir(work)
    os.umask(0)
    s = Stress(args.seed)
    t0 = time.perf_counter()
    s.run(args.ops)
    elapsed = time.perf_counter() - t0
    os.chdir("/")
    ops = {k: {**v, "time_s": round(v["time_s"], 3)} for k, v in sorted(s.stats.items())}
    json.dump({"ops": args.ops, "seed": args.seed, "elapsed_s": round(elapsed, 3),
               "by_op": ops, "sizes": tree_sizes(work)}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
