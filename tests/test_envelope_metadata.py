"""Strict parsing of the envelope's S3 user metadata (metadata.parse) and the write-time budget.

docs/format.md sections 9 and 11.2: exact lowercase key set, ASCII values, canonical unpadded
base64url, exact lengths, a three-part wrapping descriptor, known providers; anything else is
rejected (UnsupportedFormat for an unknown provider, IntegrityError otherwise), never repaired.
"""

from __future__ import annotations

import base64
import os

import pytest

from dssefs.envelope import metadata as md
from dssefs.envelope.codec import ObjectCipher
from dssefs.envelope.metadata import Envelope
from dssefs.errors import IntegrityError, MetadataBudgetError, NotDssefsObject, UnsupportedFormat

import refdecoder


def _new_v1(*args, **kw):
    """These tests pin format version 1 (v1 objects must stay readable); v2 has its own."""
    return ObjectCipher.new_version(*args, version=1, **kw)


def _meta(attrs: bool = True) -> dict[str, str]:
    c = _new_v1(os.urandom(32), os.urandom(32), plaintext_len=123,
                                 file_id=os.urandom(16), chunk_log2=12)
    env = Envelope(header=c.header, provider="kms",
                   key_id_inner="arn:aws:kms:eu-west-1:111122223333:key/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                   key_id_outer="alias/dssefs-outer", wrapped_inner=os.urandom(184),
                   wrapped_outer=os.urandom(184), attrs=c.seal_attrs(b"attrs") if attrs else None)
    return env.to_metadata()


GOOD = _meta()


def rejects(meta, exc=IntegrityError):
    with pytest.raises(exc):
        md.parse(meta)
    ref_exc = {IntegrityError: refdecoder.Integrity, UnsupportedFormat: refdecoder.Unsupported,
               NotDssefsObject: refdecoder.NotDssefs}[exc]
    with pytest.raises(ref_exc):
        refdecoder.parse_metadata(meta)


def test_good_metadata_round_trips():
    env = md.parse(GOOD)
    assert env.to_metadata() == GOOD
    assert md.parse(_meta(attrs=False)).attrs is None
    assert set(GOOD) == {"dsse-h", "dsse-ki", "dsse-ko", "dsse-w", "dsse-a"}
    refdecoder.parse_metadata(GOOD)


def test_foreign_metadata_keys_are_ignored():
    env = md.parse({**GOOD, "content-owner": "team-a", "x": "ÿ non-ascii is fine outside dsse-*"})
    assert env == md.parse(GOOD)


def test_no_dssefs_metadata_is_not_a_dssefs_object():
    rejects({}, NotDssefsObject)
    rejects({"owner": "x", "dsse": "x", "dssefs": "y"}, NotDssefsObject)
    assert not md.is_dssefs({"owner": "x"})
    assert md.is_dssefs({"DSSE-H": "x"})


@pytest.mark.parametrize("missing", ["dsse-h", "dsse-ki", "dsse-ko", "dsse-w"])
def test_missing_required_key(missing):
    rejects({k: v for k, v in GOOD.items() if k != missing})


@pytest.mark.parametrize("extra", ["dsse-x", "dsse-", "dsse-h2", "dsse-k", "dsse-a ", " dsse-h"])
def test_unknown_dsse_key(extra):
    meta = {**GOOD, extra: GOOD["dsse-h"]}
    if extra.lower().startswith("dsse-"):
        rejects(meta)
    else:  # a key with a leading space is not ours: ignored
        md.parse(meta)


@pytest.mark.parametrize("key", ["DSSE-H", "Dsse-h", "dsse-H", "DSSE-KI", "dsse-A"])
def test_uppercase_key_variants_are_rejected(key):
    lower = key.lower()
    rejects({**{k: v for k, v in GOOD.items() if k != lower}, key: GOOD[lower]})
    rejects({**GOOD, key: GOOD[lower]})  # duplicate in another case


@pytest.mark.parametrize("key", ["dsse-h", "dsse-ki", "dsse-ko", "dsse-a"])
@pytest.mark.parametrize("mangle", [
    pytest.param(lambda v: v + "=", id="one-pad"),
    pytest.param(lambda v: v + "==", id="two-pad"),
    pytest.param(lambda v: v.replace("-", "+").replace("_", "/") if ("-" in v or "_" in v) else "+" + v[1:], id="std-alphabet"),
    pytest.param(lambda v: v[:10] + " " + v[10:], id="space"),
    pytest.param(lambda v: v[:10] + "\n" + v[10:], id="newline"),
    pytest.param(lambda v: v + "\n", id="trailing-newline"),
    pytest.param(lambda v: "", id="empty"),
    pytest.param(lambda v: v[:20] + "!" + v[21:], id="bad-char"),
    pytest.param(lambda v: v[:20] + "." + v[21:], id="dot"),
    pytest.param(lambda v: "=?UTF-8?B?" + base64.b64encode(v.encode()).decode() + "?=", id="rfc2047"),
    pytest.param(lambda v: v + "," + v, id="s3-joined-duplicate"),
])
def test_malformed_base64_values(key, mangle):
    bad = mangle(GOOD[key])
    rejects({**GOOD, key: bad})


@pytest.mark.parametrize("mangle", [
    pytest.param(lambda v: v + "A", id="one-char-more"),
    pytest.param(lambda v: v + "AAAA", id="three-bytes-more"),
    pytest.param(lambda v: v[:-1], id="one-char-less"),
    pytest.param(lambda v: v[:-4], id="three-bytes-less"),
    pytest.param(lambda v: v.encode().hex(), id="hex"),
])
def test_header_value_of_another_length(mangle):
    """Valid base64url of the wrong length: the header must decode to exactly 133 bytes.  (Wrapped
    keys and attribute blobs have variable length; a different but well-formed value there fails
    later, at unwrapping or at the attribute blob's tag.)"""
    rejects({**GOOD, "dsse-h": mangle(GOOD["dsse-h"])})


def _noncanonical(value: str) -> str:
    """Same decoded bytes, different text: set unused low bits of the last character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    rem = len(value) % 4
    assert rem in (2, 3), "value must end in a partial quantum"
    last = alphabet.index(value[-1])
    return value[:-1] + alphabet[last | (0b1111 if rem == 2 else 0b11)]


def test_non_canonical_trailing_bits_are_rejected():
    for key in ("dsse-h", "dsse-ki", "dsse-a"):
        value = GOOD[key]
        if len(value) % 4 == 0:
            continue
        bad = _noncanonical(value)
        assert bad != value
        assert base64.urlsafe_b64decode(bad + "=" * (-len(bad) % 4)) == \
            base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        rejects({**GOOD, key: bad})


@pytest.mark.parametrize("n", [0, 1, 132, 134, 200])
def test_header_of_wrong_length(n):
    rejects({**GOOD, "dsse-h": md.b64encode(os.urandom(n))})


@pytest.mark.parametrize("n", [0, 1025, 2000])
def test_wrapped_keys_of_wrong_length(n):
    for key in ("dsse-ki", "dsse-ko"):
        rejects({**GOOD, key: md.b64encode(os.urandom(n))})


def test_wrapped_key_length_limits_accept_1_and_1024():
    for n in (1, 1024):
        md.parse({**GOOD, "dsse-ki": md.b64encode(os.urandom(n))})


def test_non_ascii_values_are_rejected():
    for key in ("dsse-h", "dsse-w", "dsse-ki"):
        rejects({**GOOD, key: GOOD[key][:5] + "é" + GOOD[key][6:]})
        rejects({**GOOD, key: GOOD[key][:5] + "\u0130" + GOOD[key][6:]})


@pytest.mark.parametrize("value", [
    "kms", "kms;a", "kms;a;b;c", ";a;b", "kms;;b", "kms;a;", "kms;a b;c", "kms;a;b\n", "kms;a\n;b",
    "kms;" + "a" * 257 + ";b", "kms;a;b;", "kms,a,b", "=?UTF-8?B?a21zO2E7Yg==?=", "kms;ä;b", "",
])
def test_malformed_wrapping_descriptor(value):
    rejects({**GOOD, "dsse-w": value})


@pytest.mark.parametrize("provider", ["KMS", "aws", "vault", "local2", "none", "plaintext"])
def test_unknown_provider_is_unsupported(provider):
    rejects({**GOOD, "dsse-w": f"{provider};a;b"}, UnsupportedFormat)


def test_known_providers_and_key_id_alphabet():
    for value in ("local;default;default", "kms;alias/x;arn:aws:kms:us-east-1:1:key/abc",
                  "local;" + "k" * 256 + ";b", "kms;a+b=c@d.e_f-g;x/y:z"):
        env = md.parse({**GOOD, "dsse-w": value})
        assert f"{env.provider};{env.key_id_inner};{env.key_id_outer}" == value


def test_non_string_values_are_rejected():
    for key in ("dsse-h", "dsse-w"):
        with pytest.raises(IntegrityError):
            md.parse({**GOOD, key: None})
        with pytest.raises(IntegrityError):
            md.parse({**GOOD, key: GOOD[key].encode()})


@pytest.mark.parametrize("text", ["AAA\n", "AAAAAAA\n", "AA\n", "AAAA\n", "AAAA\n\n"])
def test_b64_trailing_newline_is_an_integrity_error(text):
    """Regression: ``re.match(...$)`` accepted a trailing newline, and base64 then raised a bare
    binascii.Error that escaped the error hierarchy."""
    with pytest.raises(IntegrityError):
        md.b64decode(text, "x")


def test_b64_is_exactly_the_unpadded_urlsafe_encoding():
    for n in range(0, 70):
        data = os.urandom(n)
        text = md.b64encode(data)
        assert "=" not in text and len(text) == -(-4 * n // 3)
        assert md.b64decode(text, "x") == data == refdecoder.b64u_decode(text)


@pytest.mark.parametrize("n", [0, 1, 12, 43])
def test_attrs_blob_shorter_than_nonce_and_two_tags_is_rejected(n):
    rejects({**GOOD, "dsse-a": md.b64encode(os.urandom(n))})
    md.parse({**GOOD, "dsse-a": md.b64encode(os.urandom(44))})


# ---- budget ----------------------------------------------------------------------------------------

def test_budget_counts_keys_and_values():
    assert md.metadata_size({"dsse-h": "abc"}) == 9
    assert md.metadata_size({"dsse-h": "é"}) == 8
    assert md.metadata_size(GOOD) == sum(len(k) + len(v) for k, v in GOOD.items())


def test_over_budget_at_write_time():
    c = _new_v1(os.urandom(32), os.urandom(32), plaintext_len=1, file_id=bytes(16))
    base = dict(header=c.header, provider="local", key_id_inner="a", key_id_outer="b",
                wrapped_inner=os.urandom(61), wrapped_outer=os.urandom(61))
    fixed = md.metadata_size(Envelope(**base).to_metadata())
    room = md.METADATA_LIMIT - fixed - len("dsse-a")
    fits = room * 3 // 4 - 44  # attrs plaintext that exactly fits
    assert md.metadata_size(Envelope(**base, attrs=c.seal_attrs(bytes(fits))).to_metadata()) <= md.METADATA_LIMIT
    with pytest.raises(MetadataBudgetError):
        Envelope(**base, attrs=c.seal_attrs(bytes(fits + 1))).to_metadata()
    with pytest.raises(MetadataBudgetError):
        Envelope(**{**base, "wrapped_inner": os.urandom(1024), "wrapped_outer": os.urandom(1024)}).to_metadata()


def test_writer_refuses_metadata_it_could_not_read_back():
    c = _new_v1(os.urandom(32), os.urandom(32), plaintext_len=1, file_id=bytes(16))
    base = dict(header=c.header, provider="local", key_id_inner="a", key_id_outer="b",
                wrapped_inner=os.urandom(61), wrapped_outer=os.urandom(61))
    for change in ({"provider": "vault"}, {"key_id_inner": "a;b"}, {"key_id_outer": "a\n"},
                   {"key_id_inner": ""}, {"key_id_outer": "é"}):
        with pytest.raises(ValueError):
            Envelope(**{**base, **change}).to_metadata()


def test_kms_context_matches_the_spec():
    """docs/format.md section 10 names this exact context; it is what CloudTrail will show."""
    from dssefs.kms.base import Layer, context

    assert context(Layer.INNER, "bkt", "dir/a.txt") == {
        "dssefs:v": "1", "dssefs:layer": "inner", "dssefs:bucket": "bkt", "dssefs:key": "dir/a.txt"}
    assert context(Layer.OUTER, "local", "x")["dssefs:layer"] == "outer"
    assert refdecoder.canonical_context(context(Layer.INNER, "b", "a/b.txt")) == \
        b'{"dssefs:bucket":"b","dssefs:key":"a/b.txt","dssefs:layer":"inner","dssefs:v":"1"}'
    assert refdecoder.canonical_context({"dssefs:key": "é"}) == b'{"dssefs:key":"\\u00e9"}'
