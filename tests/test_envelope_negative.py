"""Negative tests: every tampered, truncated, spliced or mis-keyed object fails closed.

Every failure must raise IntegrityError (UnsupportedFormat is a subclass) and leave no plaintext in
the caller's output buffer.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from dssefs.envelope import format as fmt
from dssefs.envelope.codec import ObjectCipher
from dssefs.errors import IntegrityError


def test_forged_header_length_and_generation_fail_at_open():
    """Regression: the commitments cover every header field, so a header claiming a shorter file
    (or a newer generation) fails at open time, before any chunk is read.  Without that binding a
    header forged to plaintext_len=0 over a 32-byte garbage body opened fine and every read
    returned EOF without authenticating anything."""
    dk_in, dk_out = os.urandom(32), os.urandom(32)
    c = ObjectCipher.new_version(dk_in, dk_out, plaintext_len=3 << 12, file_id=os.urandom(16),
                                 generation=9, chunk_log2=12)
    for change in ({"plaintext_len": 0}, {"plaintext_len": 1}, {"generation": 10}, {"generation": 0},
                   {"chunk_log2": 13}, {"file_id": os.urandom(16)}):
        forged = dataclasses.replace(c.header, **change)
        with pytest.raises(IntegrityError, match="commitment"):
            ObjectCipher.open_version(forged, dk_in, dk_out)
