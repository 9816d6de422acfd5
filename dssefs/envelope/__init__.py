"""The DSSEFS on-object format (versions 1 and 2): pure functions, no I/O.

``inner`` uses only ``cryptography``; ``outer`` uses only ``pycryptodome``.  See docs/format.md.
"""

from .codec import ObjectCipher
from .format import (CHUNK_OVERHEAD, DEFAULT_CHUNK_LOG2, FILE_ID_BYTES, MAX_CHUNK_LOG2,
                     MIN_CHUNK_LOG2, Header)
from .metadata import Envelope, is_dssefs, parse
from .sparse import ChunkMap

__all__ = ["ObjectCipher", "ChunkMap", "Header", "Envelope", "parse", "is_dssefs", "CHUNK_OVERHEAD",
           "DEFAULT_CHUNK_LOG2", "MIN_CHUNK_LOG2", "MAX_CHUNK_LOG2", "FILE_ID_BYTES"]
