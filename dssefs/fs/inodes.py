"""The inode table: numbers, names, lookup counts and deferred deletion.

State lives in the trio thread only.  An inode is named by ``(parent, name)`` while it is linked;
unlink/rmdir/rename-over detach it, and it is dropped from the table once the kernel has forgotten
it (lookup count 0), no handle is open and no unsaved data remains.

Inode numbers are stable for the life of the mount: when a linked inode is dropped, its number is
remembered under its name (``(parent number, name)``; parents keep their numbers the same way, so
the names below a renamed directory stay valid) and the next inode made for that name gets it
again.  A rename moves the inode, hence keeps its number; a name that is removed (unlink, rmdir,
replaced, or found gone from the store) forgets its number, so a new object under the name gets a
new one.  Numbers are never reused for another name.
"""

from __future__ import annotations

import trio

from .attributes import Attrs

ROOT_INODE = 1


class Inode:
    __slots__ = ("ino", "parent", "name", "attrs", "nlookup", "open_count", "writers", "linked", "stored",
                 "obj", "etag", "foreign_size", "foreign", "validated", "lock", "content", "symlink_target",
                 "cached_etag", "meta_dirty", "meta_error", "broken", "touched_ns", "stores", "made", "holds_special",
                 "__weakref__")

    def __init__(self, ino: int, parent: int, name: str, attrs: Attrs):
        self.ino, self.parent, self.name, self.attrs = ino, parent, name, attrs
        self.nlookup = 0
        self.open_count = 0
        self.writers = 0
        self.linked = True
        self.stored = False  # an object (file or directory marker) exists in the store
        self.obj = None  # OpenObject of the stored version (dssefs objects)
        self.etag: str | None = None
        self.foreign = False
        self.foreign_size = 0
        self.validated = 0.0  # trio.current_time() of the last check against the store
        self.lock = trio.Lock()  # serialises writes, truncates and flushes of this inode
        self.content = None  # FileContent once opened/read
        self.symlink_target: bytes | None = None
        self.cached_etag: str | None = None  # the version the kernel page cache holds
        self.meta_dirty = False  # attributes changed locally, not stored yet
        self.meta_error = None  # DssefsError of a failed deferred attribute store (see metadata.py)
        self.broken = None  # DssefsError: the object exists but cannot be opened (tampered, key denied)
        # directories: when this mount last changed the entries (in memory only, never stored);
        # a refresh from the store never shows an older mtime/ctime than this (see namespace.py)
        self.touched_ns = 0
        self.stores = 0  # successful content stores of this inode (see Handle.changed)
        self.made = 0.0  # directories: trio time this mount created it (mkdir), else 0
        # directories: a symbolic link or special file entered it through this mount, so its
        # marker is not (or no longer) plain (see common.PLAIN_MARKER_BODY)
        self.holds_special = False

    def __repr__(self) -> str:
        return f"Inode({self.ino}, parent={self.parent}, name={self.name!r}, mode={self.attrs.mode:o})"

    def is_dir(self) -> bool:
        return self.attrs.is_dir()

    @property
    def dirty(self) -> bool:
        return self.meta_dirty or (self.content is not None and self.content.modified)


class InodeTable:
    def __init__(self, root_attrs: Attrs):
        self._next = ROOT_INODE + 1
        root = Inode(ROOT_INODE, ROOT_INODE, "", root_attrs)
        root.nlookup = 1
        self.by_ino: dict[int, Inode] = {ROOT_INODE: root}
        self.by_name: dict[tuple[int, str], int] = {}
        self.kids: dict[int, dict[int, None]] = {}  # linked children known per directory inode (ordered)
        # numbers of linked names whose inode was dropped (forgotten by the kernel): parent -> name -> ino
        self.numbers: dict[int, dict[str, int]] = {}
        self.touched: dict[int, int] = {}  # touched_ns of dropped directories, by inode number

    @property
    def root(self) -> Inode:
        return self.by_ino[ROOT_INODE]

    def __len__(self) -> int:
        return len(self.by_ino)

    def get(self, ino: int) -> Inode | None:
        return self.by_ino.get(ino)

    def child(self, parent: int, name: str) -> Inode | None:
        ino = self.by_name.get((parent, name))
        return None if ino is None else self.by_ino.get(ino)

    def add(self, parent: int, name: str, attrs: Attrs) -> Inode:
        old = self.child(parent, name)
        if old is not None:
            self.detach(old)
        ino = self._number_of(parent, name)
        if ino is None or ino in self.by_ino:
            ino = self._next
            self._next += 1
        node = Inode(ino, parent, name, attrs)
        node.touched_ns = self.touched.pop(ino, 0)
        self.by_ino[node.ino] = node
        self._name(node)
        return node

    def _number_of(self, parent: int, name: str) -> int | None:
        """The number a dropped inode of this name had (taken: the new inode carries it)."""
        names = self.numbers.get(parent)
        if names is None:
            return None
        ino = names.pop(name, None)
        if not names:
            del self.numbers[parent]
        return ino

    def vanish(self, parent: int, name: str) -> None:
        """``parent/name`` does not exist (any more): a new object under it is another file."""
        ino = self._number_of(parent, name)
        if ino is not None:
            self._forget_below(ino)

    def _forget_below(self, ino: int) -> None:
        """Forget the remembered numbers of names below a removed directory (recursively)."""
        self.touched.pop(ino, None)
        todo = [ino]
        while todo:
            names = self.numbers.pop(todo.pop(), None)
            if names:
                for child in names.values():
                    self.touched.pop(child, None)
                    todo.append(child)

    def _name(self, node: Inode) -> None:
        self.by_name[(node.parent, node.name)] = node.ino
        self.kids.setdefault(node.parent, {})[node.ino] = None

    def _unname(self, node: Inode) -> bool:
        if self.by_name.get((node.parent, node.name)) != node.ino:
            return False
        del self.by_name[(node.parent, node.name)]
        kids = self.kids.get(node.parent)
        if kids is not None:
            kids.pop(node.ino, None)
            if not kids:
                del self.kids[node.parent]
        return True

    def detach(self, node: Inode) -> None:
        """Remove the name (unlink/rmdir/replaced); the inode lives on while referenced."""
        parent = self.by_ino.get(node.parent)
        if self._unname(node):
            self.vanish(node.parent, node.name)
        node.linked = False
        if node.is_dir():
            self._forget_below(node.ino)
        self.maybe_drop(node)
        if parent is not None:
            self.maybe_drop(parent)

    def move(self, node: Inode, parent: int, name: str) -> None:
        old_parent = self.by_ino.get(node.parent)
        self._unname(node)
        self.vanish(parent, name)  # whatever had the new name is replaced
        node.parent, node.name = parent, name
        self._name(node)
        node.linked = True
        if old_parent is not None:
            self.maybe_drop(old_parent)

    def children(self, parent: int) -> list[Inode]:
        out = []
        for ino in self.kids.get(parent, ()):
            n = self.by_ino.get(ino)
            if n is not None and n.linked and n.parent == parent and ino != ROOT_INODE:
                out.append(n)
        return out

    def descendants(self, ancestor: int) -> list[Inode]:
        out = []
        for n in self.by_ino.values():
            p, seen = n, 0
            while p.ino != ROOT_INODE and seen < 10000:
                if p.parent == ancestor:
                    out.append(n)
                    break
                p = self.by_ino.get(p.parent)
                if p is None or not p.linked:
                    break
                seen += 1
        return out

    def forget(self, ino: int, n: int) -> None:
        node = self.by_ino.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.nlookup = max(0, node.nlookup - n)
        self.maybe_drop(node)

    def in_use(self, node: Inode) -> bool:
        return node.nlookup > 0 or node.open_count > 0 or node.dirty

    def maybe_drop(self, node: Inode) -> None:
        if node.ino == ROOT_INODE or self.in_use(node):
            return
        # a directory that still has known children stays so their keys can be computed
        if self.kids.get(node.ino):
            return
        self.by_ino.pop(node.ino, None)
        named = self._unname(node)
        if named and node.linked:  # forgotten, not removed: the name keeps its number
            self.numbers.setdefault(node.parent, {})[node.name] = node.ino
            if node.touched_ns:
                self.touched[node.ino] = node.touched_ns
        if node.content is not None:
            node.content.discard()
            node.content = None
        if named:
            parent = self.by_ino.get(node.parent)
            if parent is not None:
                self.maybe_drop(parent)
