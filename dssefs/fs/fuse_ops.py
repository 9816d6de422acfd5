"""The pyfuse3 adapter: translate FUSE requests to :class:`Filesystem` calls.

This is a thin shell: names are decoded (UTF-8, as S3 keys are), attributes converted,
``DssefsError.errno`` turned into ``FUSEError`` with one log line per failure (operation, object,
errno, reason; never data or keys).
"""

from __future__ import annotations

import errno
import functools
import logging

import pyfuse3

from ..errors import DssefsError
from .filesystem import Filesystem, Stat

log = logging.getLogger("dssefs.fuse")

# errnos that are part of normal operation (probing, races): logged at debug level only
QUIET = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENODATA, errno.EISDIR,
                   errno.ENOTDIR, errno.ENOTSUP, errno.EINVAL, errno.ENAMETOOLONG, errno.EROFS})


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _op(fn=None, *, by_fh: bool = False):
    """Wrap a handler: DssefsError/OSError -> FUSEError(errno) plus one log line.  ``by_fh``:
    the first argument is a file handle (else an inode number)."""
    if fn is None:
        return functools.partial(_op, by_fh=by_fh)
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: "FuseOps", *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an errno
            exc = _leaf(exc)
            if isinstance(exc, pyfuse3.FUSEError):
                raise exc from None
            if isinstance(exc, DssefsError):
                code, reason = exc.errno, str(exc)
            elif isinstance(exc, OSError) and exc.errno:
                code, reason = exc.errno, exc.strerror or str(exc)
            else:
                code, reason = errno.EIO, f"internal error {type(exc).__name__}"
                log.exception("op=%s unexpected error", name)
            target = self._target(args, by_fh)
            quiet = code in QUIET or (name == "link" and code == errno.EPERM)  # by design; git falls back
            level = logging.DEBUG if quiet else logging.WARNING
            log.log(level, "op=%s object=%s errno=%s reason=%s", name, target,
                    errno.errorcode.get(code, code), reason.replace("\n", " "))
            if not quiet:
                self.fs.activity.error(name, target, code, reason)
            raise pyfuse3.FUSEError(code) from None
    return wrapper


def _name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EILSEQ) from None


class FuseOps(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem, *, on_init=None, blksize: int = 128 * 1024):
        super().__init__()
        self.fs = fs
        self.on_init = on_init
        self.blksize = blksize
        self.attr_timeout = fs.cfg.attr_timeout
        self.entry_timeout = fs.cfg.entry_timeout
        self.enable_writeback_cache = fs.cfg.writeback_cache

    def init(self) -> None:
        if self.on_init is not None:
            self.on_init()

    def _target(self, args, by_fh: bool) -> str:
        if not args or not isinstance(args[0], int):
            return "-"
        if by_fh:
            h = self.fs.handles.get(args[0])
            if h is not None:
                return self.fs.describe(h.node.ino)
            d = self.fs.dirs.get(args[0])
            return self.fs.describe(d.node.ino) if d is not None else f"fh {args[0]}"
        where = self.fs.describe(args[0])
        if len(args) >= 2 and isinstance(args[1], bytes):
            where = where.rstrip("/") + "/" + args[1].decode("utf-8", "replace")
        return where

    def _attrs(self, st: Stat, fresh: bool = False) -> pyfuse3.EntryAttributes:
        """``fresh``: the attributes come from the store (a lookup, getattr or listing), and the
        kernel keeps them only for what is left of the TTL since the store was asked."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = st.ino
        e.generation = 0
        if fresh:
            e.entry_timeout = self.fs.ttl_left(st.ino, self.entry_timeout)
            e.attr_timeout = self.fs.ttl_left(st.ino, self.attr_timeout)
        else:
            e.entry_timeout = self.entry_timeout
            e.attr_timeout = self.attr_timeout
        e.st_mode = st.mode
        e.st_nlink = st.nlink
        e.st_uid = st.uid
        e.st_gid = st.gid
        e.st_rdev = st.rdev
        e.st_size = st.size
        e.st_blksize = self.blksize
        e.st_blocks = st.blocks
        e.st_atime_ns = st.atime_ns
        e.st_mtime_ns = st.mtime_ns
        e.st_ctime_ns = st.ctime_ns
        return e

    # ---- names and attributes ---------------------------------------------------------------------

    @_op
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        return self._attrs(await self.fs.lookup(parent_inode, text), fresh=True)

    async def forget(self, inode_list):
        try:
            self.fs.forget(inode_list)
        except Exception:  # noqa: BLE001 - forget must not raise
            log.exception("op=forget unexpected error")

    @_op
    async def getattr(self, inode, ctx=None):
        return self._attrs(await self.fs.getattr(inode), fresh=True)

    @_op
    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        st = await self.fs.setattr(inode, fh=fh, caller_uid=ctx.uid if ctx is not None else 0, **kw)
        return self._attrs(st)

    @_op
    async def readlink(self, inode, ctx):
        return await self.fs.readlink(inode)

    @_op
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._attrs(await self.fs.mknod(parent_inode, _name(name), mode, rdev, ctx.uid, ctx.gid))

    @_op
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attrs(await self.fs.mkdir(parent_inode, _name(name), mode, ctx.uid, ctx.gid))

    @_op
    async def unlink(self, parent_inode, name, ctx):
        await self.fs.unlink(parent_inode, _name(name))

    @_op
    async def rmdir(self, parent_inode, name, ctx):
        await self.fs.rmdir(parent_inode, _name(name))

    @_op
    async def symlink(self, parent_inode, name, target, ctx):
        return self._attrs(await self.fs.symlink(parent_inode, _name(name), bytes(target), ctx.uid, ctx.gid))

    @_op
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.fs.rename(parent_inode_old, _name(name_old), parent_inode_new, _name(name_new), flags)

    @_op
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._attrs(await self.fs.link(inode, new_parent_inode, _name(new_name)))

    @_op
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        for k, v in self.fs.statfs().items():
            setattr(s, k, v)
        return s

    # ---- files ------------------------------------------------------------------------------------

    @_op
    async def open(self, inode, flags, ctx):
        fh, keep = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @_op
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, st = await self.fs.create(parent_inode, _name(name), mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self._attrs(st)

    @_op(by_fh=True)
    async def read(self, fh, off, size):
        return await self.fs.read(fh, off, size)

    @_op(by_fh=True)
    async def write(self, fh, off, buf):
        return await self.fs.write(fh, off, buf)

    @_op(by_fh=True)
    async def flush(self, fh):
        await self.fs.flush(fh)

    @_op(by_fh=True)
    async def fsync(self, fh, datasync):
        await self.fs.fsync(fh)

    @_op(by_fh=True)
    async def release(self, fh):
        await self.fs.release(fh)

    # ---- directories ------------------------------------------------------------------------------

    @_op
    async def opendir(self, inode, ctx):
        return await self.fs.opendir(inode)

    @_op(by_fh=True)
    async def readdir(self, fh, start_id, token):
        offset = start_id
        while True:
            entries = await self.fs.readdir(fh, offset, kernel=True)
            if not entries:
                return
            try:
                for name, st, nxt in entries:
                    if not pyfuse3.readdir_reply(token, name.encode("utf-8"), self._attrs(st, fresh=True), nxt):
                        return
                    if name not in (".", ".."):
                        self.fs.incref(st.ino)
                    offset = nxt
            finally:
                self.fs.trim([st.ino for _n, st, _o in entries])
            if self.fs.readdir_partial(fh):
                return  # the rest when the kernel asks again (it holds the directory meanwhile)

    @_op(by_fh=True)
    async def releasedir(self, fh):
        await self.fs.releasedir(fh)

    @_op(by_fh=True)
    async def fsyncdir(self, fh, datasync):
        await self.fs.fsyncdir(fh)

    # ---- extended attributes ------------------------------------------------------------------------

    @_op
    async def getxattr(self, inode, name, ctx):
        text = name.decode("utf-8", "replace")
        if not text.startswith("user."):
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self.fs.getxattr(inode, text)

    @_op
    async def setxattr(self, inode, name, value, ctx):
        await self.fs.setxattr(inode, _name(name), bytes(value))

    @_op
    async def listxattr(self, inode, ctx):
        return [n.encode("utf-8") for n in await self.fs.listxattr(inode)]

    @_op
    async def removexattr(self, inode, name, ctx):
        await self.fs.removexattr(inode, _name(name))
