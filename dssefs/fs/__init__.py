"""The file system core: namespace, inodes, attributes, chunk cache and flush pipeline.

Nothing in this package imports pyfuse3; :mod:`dssefs.fs.fuse_ops` is the thin FUSE adapter.
"""

from .filesystem import Filesystem, FsConfig, Stat

__all__ = ["Filesystem", "FsConfig", "Stat"]
