"""Extended attributes (``user.*``), sealed with the other attributes in object metadata.
"""

from __future__ import annotations

import errno

from ..errors import MetadataBudgetError
from .attributes import now_ns
from .common import XATTR_PREFIX, fail
from .inodes import Inode


class XattrOps:
    """get/list/set/removexattr."""

    async def getxattr(self, ino: int, name: str) -> bytes:
        node = self.node(ino)
        await self._refresh(node)
        try:
            return node.attrs.xattrs[name]
        except KeyError:
            raise fail(errno.ENODATA) from None

    async def listxattr(self, ino: int) -> list[str]:
        node = self.node(ino)
        await self._refresh(node)
        return sorted(node.attrs.xattrs)

    async def setxattr(self, ino: int, name: str, value: bytes) -> None:
        if not name.startswith(XATTR_PREFIX) or len(name) <= len(XATTR_PREFIX):
            raise fail(errno.ENOTSUP, "only user.* extended attributes are supported")
        await self._change_xattrs(ino, lambda x: x.__setitem__(name, bytes(value)))

    async def removexattr(self, ino: int, name: str) -> None:
        node = self.node(ino)
        if name not in node.attrs.xattrs:
            raise fail(errno.ENODATA)
        await self._change_xattrs(ino, lambda x: x.pop(name, None))

    async def _change_xattrs(self, ino: int, change) -> None:
        node = self._changeable(ino)
        async with node.lock:
            old = node.attrs.copy()
            was_dirty = node.meta_dirty
            change(node.attrs.xattrs)
            node.attrs.ctime_ns = now_ns()
            try:
                self._check_budget(node)
            except MetadataBudgetError:
                node.attrs = old
                raise
            await self._attrs_changed(node, old, was_dirty)

    def _check_budget(self, node: Inode) -> None:
        """Refuse attributes that cannot fit next to the envelope in 2 KB of S3 metadata."""
        size = len(node.attrs.encode())
        sealed_b64 = ((size + 28) * 4 + 2) // 3
        used = 0
        if node.obj is not None:
            meta = node.obj.envelope.to_metadata()
            used = sum(len(k) + len(v) for k, v in meta.items() if k != "dsse-a")
        else:
            used = 1100  # a conservative envelope estimate (KMS ARNs and wrapped keys)
        if used + len("dsse-a") + sealed_b64 > 2048:
            raise MetadataBudgetError(f"{self.describe(node.ino)}: extended attributes would exceed S3's "
                                      "2 KB metadata budget")
