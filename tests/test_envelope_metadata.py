"""Strict parsing of the envelope's S3 user metadata (metadata.parse) and the write-time budget."""

from __future__ import annotations

import pytest

from dssefs.envelope import metadata as md
from dssefs.errors import IntegrityError


@pytest.mark.parametrize("text", ["AAA\n", "AAAAAAA\n", "AA\n", "AAAA\n", "AAAA\n\n"])
def test_b64_trailing_newline_is_an_integrity_error(text):
    """Regression: ``re.match(...$)`` accepted a trailing newline, and base64 then raised a bare
    binascii.Error that escaped the error hierarchy."""
    with pytest.raises(IntegrityError):
        md.b64decode(text, "x")
