"""The attribute blob stored (sealed under both layers) in every dssefs object's metadata.

Compact JSON so it fits S3's 2 KB user-metadata budget next to the envelope:
``{"m":mode,"u":uid,"g":gid,"a":atime_ns,"t":mtime_ns,"c":ctime_ns,"r":rdev,"x":{name:b64}}``.
``mode`` includes the file-type bits.  ``r`` and ``x`` are omitted when empty.
"""

from __future__ import annotations

import base64
import json
import stat
import time
from dataclasses import dataclass, field

from ..errors import IntegrityError


def now_ns() -> int:
    return time.time_ns()


@dataclass
class Attrs:
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def new(cls, mode: int, uid: int, gid: int, rdev: int = 0, t: int | None = None) -> "Attrs":
        t = now_ns() if t is None else t
        return cls(mode, uid, gid, t, t, t, rdev)

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def copy(self) -> "Attrs":
        return Attrs(self.mode, self.uid, self.gid, self.atime_ns, self.mtime_ns, self.ctime_ns,
                     self.rdev, dict(self.xattrs))

    def encode(self) -> bytes:
        d: dict = {"m": self.mode, "u": self.uid, "g": self.gid, "a": self.atime_ns,
                   "t": self.mtime_ns, "c": self.ctime_ns}
        if self.rdev:
            d["r"] = self.rdev
        if self.xattrs:
            d["x"] = {k: base64.b64encode(v).decode("ascii") for k, v in sorted(self.xattrs.items())}
        return json.dumps(d, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def decode(cls, blob: bytes) -> "Attrs":
        try:
            d = json.loads(blob)
            xattrs = {str(k): base64.b64decode(v, validate=True) for k, v in d.get("x", {}).items()}
            a = cls(int(d["m"]), int(d["u"]), int(d["g"]), int(d["a"]), int(d["t"]), int(d["c"]),
                    int(d.get("r", 0)), xattrs)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"malformed attribute blob ({type(e).__name__})") from None
        if not 0 <= a.mode < (1 << 32):
            raise IntegrityError("malformed attribute blob (mode)")
        return a
