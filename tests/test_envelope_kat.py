"""Known-answer tests for the primitives under both layers.

AES-256-GCM: NIST CAVP ``gcmEncryptExtIV256.rsp`` and ``gcmDecrypt256.rsp`` (shipped in the
``cryptography_vectors`` package), restricted to what DSSEFS uses (96-bit IV, 128-bit tag), run
through BOTH ``InnerAEAD`` (cryptography) and ``OuterAEAD`` (pycryptodome).  Wycheproof's
``aes_gcm_test.json`` is not shipped there; set ``DSSEFS_WYCHEPROOF_AES_GCM`` to its path to run it
too.

HKDF-SHA512: a standard-library RFC 5869 implementation (checked against the RFC 5869 SHA-256
vectors) must agree with ``inner.hkdf_sha512`` and ``outer.hkdf_sha512`` on the DSSEFS info strings;
plus the S3 Encryption Client's published HKDF-SHA512 vectors and a fixed DSSEFS known answer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import cryptography_vectors
import pytest

from dssefs.envelope import format as fmt
from dssefs.envelope import inner, outer
from dssefs.envelope.inner import InnerAEAD
from dssefs.envelope.inner import hkdf_sha512 as inner_hkdf
from dssefs.envelope.outer import OuterAEAD
from dssefs.envelope.outer import hkdf_sha512 as outer_hkdf

import refdecoder

VECTORS = Path(cryptography_vectors.__file__).parent
GCM_DIR = VECTORS / "ciphers" / "AES" / "GCM"
LAYERS = [pytest.param(InnerAEAD, id="inner-cryptography"), pytest.param(OuterAEAD, id="outer-pycryptodome")]


# ---- NIST CAVP GCM ---------------------------------------------------------------------------------

def _parse_rsp(path: Path) -> list[dict]:
    """CAVP .rsp: ``[Name = value]`` section parameters, then blank-line separated records."""
    params: dict[str, str] = {}
    records: list[dict] = []
    current: dict | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            if current:
                records.append(current)
                current = None
            continue
        if line.startswith("[") and line.endswith("]"):
            name, _, value = line[1:-1].partition("=")
            params[name.strip()] = value.strip()
            continue
        if line == "FAIL":
            assert current is not None
            current["FAIL"] = True
            continue
        name, _, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if name == "Count":
            if current:
                records.append(current)
            current = dict(params)
        assert current is not None
        current[name] = value
    if current:
        records.append(current)
    return records


def _dssefs_shape(records: list[dict]) -> list[dict]:
    return [r for r in records
            if r["Keylen"] == "256" and r["IVlen"] == "96" and r["Taglen"] == "128"]


ENCRYPT = _dssefs_shape(_parse_rsp(GCM_DIR / "gcmEncryptExtIV256.rsp"))
DECRYPT = _dssefs_shape(_parse_rsp(GCM_DIR / "gcmDecrypt256.rsp"))


def test_nist_vector_selection_is_substantial():
    assert len(ENCRYPT) >= 300
    assert len(DECRYPT) >= 300
    assert any(r.get("FAIL") for r in DECRYPT) and any(not r.get("FAIL") for r in DECRYPT)
    assert {len(bytes.fromhex(r["PT"])) for r in ENCRYPT} >= {0, 16, 51}


@pytest.mark.parametrize("aead", LAYERS)
def test_nist_gcm_encrypt(aead):
    for r in ENCRYPT:
        key, iv, pt, aad = (bytes.fromhex(r[k]) for k in ("Key", "IV", "PT", "AAD"))
        expected = bytes.fromhex(r["CT"]) + bytes.fromhex(r["Tag"])
        out = bytearray(len(pt) + 16)
        aead(key).encrypt_into(iv, pt, aad, out)
        assert bytes(out) == expected, f"Count {r['Count']}"
        back = bytearray(len(pt))
        assert aead(key).decrypt_into(iv, bytes(out), aad, back) is True
        assert bytes(back) == pt


@pytest.mark.parametrize("aead", LAYERS)
def test_nist_gcm_decrypt(aead):
    for r in DECRYPT:
        key, iv, ct, aad, tag = (bytes.fromhex(r[k]) for k in ("Key", "IV", "CT", "AAD", "Tag"))
        out = bytearray(len(ct))
        ok = aead(key).decrypt_into(iv, ct + tag, aad, out)
        if r.get("FAIL"):
            assert ok is False, f"Count {r['Count']} must fail"
        else:
            assert ok is True, f"Count {r['Count']} must verify"
            assert bytes(out) == bytes.fromhex(r["PT"])


@pytest.mark.parametrize("aead", LAYERS)
def test_nist_encrypt_vectors_with_any_flipped_bit_fail(aead):
    rng = random.Random(1)
    for r in ENCRYPT[::7]:
        key, iv, pt, aad = (bytes.fromhex(r[k]) for k in ("Key", "IV", "PT", "AAD"))
        sealed = bytearray(bytes.fromhex(r["CT"]) + bytes.fromhex(r["Tag"]))
        pos = rng.randrange(len(sealed))
        sealed[pos] ^= 1 << rng.randrange(8)
        assert aead(key).decrypt_into(iv, bytes(sealed), aad, bytearray(len(pt))) is False


@pytest.mark.parametrize("aead", LAYERS)
def test_only_96_bit_nonces_and_full_tags(aead):
    key, pt, aad = os.urandom(32), b"x" * 20, b"a"
    for bad in (8, 11, 13, 16):
        with pytest.raises(ValueError):
            aead(key).encrypt_into(os.urandom(bad), pt, aad, bytearray(36))
        with pytest.raises(ValueError):
            aead(key).decrypt_into(os.urandom(bad), bytes(36), aad, bytearray(20))
    nonce = os.urandom(12)
    sealed = bytearray(36)
    aead(key).encrypt_into(nonce, pt, aad, sealed)
    # a truncated tag is never accepted: the last 16 bytes are always the tag
    for cut in (1, 4, 8):
        short = bytes(sealed[:-cut])
        assert aead(key).decrypt_into(nonce, short, aad, bytearray(len(short) - 16)) is False
    with pytest.raises(ValueError):
        aead(bytes(16))


def _wycheproof_path() -> Path | None:
    env = os.environ.get("DSSEFS_WYCHEPROOF_AES_GCM")
    if env:
        return Path(env)
    found = sorted(VECTORS.rglob("aes_gcm_test.json"))
    return found[0] if found else None


@pytest.mark.parametrize("aead", LAYERS)
def test_wycheproof_aes_gcm(aead):
    path = _wycheproof_path()
    if path is None:
        pytest.skip("Wycheproof aes_gcm_test.json is not shipped in cryptography_vectors; "
                    "set DSSEFS_WYCHEPROOF_AES_GCM=/path/to/aes_gcm_test.json to run it")
    data = json.loads(path.read_text())
    n = 0
    for group in data["testGroups"]:
        if (group["keySize"], group["ivSize"], group["tagSize"]) != (256, 96, 128):
            continue
        for t in group["tests"]:
            key, iv, aad, msg, ct, tag = (bytes.fromhex(t[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
            out = bytearray(len(ct))
            ok = aead(key).decrypt_into(iv, ct + tag, aad, out)
            if t["result"] == "invalid":
                assert ok is False, t["tcId"]
            else:
                assert ok is True and bytes(out) == msg, t["tcId"]
                enc = bytearray(len(msg) + 16)
                aead(key).encrypt_into(iv, msg, aad, enc)
                assert bytes(enc) == ct + tag, t["tcId"]
            n += 1
    assert n > 0


# ---- HKDF-SHA512 -------------------------------------------------------------------------------------

def _hkdf(hash_name: str, ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 from hmac/hashlib, any hash: the third implementation."""
    h = getattr(hashlib, hash_name)
    if not salt:
        salt = bytes(h().digest_size)
    prk = hmac.new(salt, ikm, h).digest()
    okm, t, i = b"", b"", 1
    while len(okm) < length:
        t = hmac.new(prk, t + info + bytes([i]), h).digest()
        okm += t
        i += 1
    return okm[:length]


def _parse_kdf_txt(path: Path) -> list[dict]:
    out, cur = [], {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        k, _, v = line.partition("=")
        k, v = k.strip(), v.strip()
        if k == "COUNT" and cur:
            out.append(cur)
            cur = {}
        cur[k] = v
    if cur:
        out.append(cur)
    return out


def test_stdlib_hkdf_matches_rfc5869_vectors():
    """Validates the stdlib HKDF used below against RFC 5869's own test cases (SHA-256)."""
    cases = _parse_kdf_txt(VECTORS / "KDF" / "rfc-5869-HKDF-SHA256.txt")
    assert len(cases) >= 3
    for c in cases:
        okm = _hkdf("sha256", bytes.fromhex(c["IKM"]), bytes.fromhex(c.get("salt", "")),
                    bytes.fromhex(c.get("info", "")), int(c["L"]))
        assert okm.hex() == c["OKM"].lower()


def _dssefs_infos(rng: random.Random) -> list[bytes]:
    infos = []
    for layer in (fmt.LAYER_INNER, fmt.LAYER_OUTER):
        infos.append(fmt.kdf_info(fmt.SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT, layer, b"DERIVEKEY"))
        infos.append(fmt.kdf_info(fmt.SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT, layer, b"ATTRSKEY"))
        infos.append(fmt.commit_info(fmt.SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT, layer, b"COMMITKEY",
                                     rng.randbytes(fmt.HEADER_BOUND_BYTES)))
    return infos


def test_hkdf_three_implementations_agree_on_dssefs_inputs():
    rng = random.Random(20240501)
    for _ in range(60):
        dk, msg_id = rng.randbytes(32), rng.randbytes(32)
        for info in _dssefs_infos(rng):
            expected = _hkdf("sha512", dk, msg_id, info, 32)
            assert inner_hkdf(dk, msg_id, info) == expected
            assert outer_hkdf(dk, msg_id, info) == expected
            assert refdecoder.hkdf_sha512(dk, msg_id, info) == expected


def test_hkdf_agree_on_other_lengths_and_inputs():
    rng = random.Random(7)
    for length in (1, 16, 31, 32, 33, 64, 65, 128, 200):
        ikm, salt, info = rng.randbytes(rng.randrange(1, 80)), rng.randbytes(rng.randrange(1, 80)), \
            rng.randbytes(rng.randrange(0, 120))
        expected = _hkdf("sha512", ikm, salt, info, length)
        assert inner_hkdf(ikm, salt, info, length) == expected
        assert outer_hkdf(ikm, salt, info, length) == expected


def test_outer_hmac_sha512_matches_stdlib_for_every_key_length_class():
    """The outer layer builds HMAC from pycryptodome's SHA-512 (RFC 2104 padding by hand): keys
    shorter than, equal to and longer than the 128-byte block, and empty ones."""
    rng = random.Random(11)
    for klen in (0, 1, 32, 64, 127, 128, 129, 300):
        for mlen in (0, 1, 111, 112, 128, 1000):
            key, msg = rng.randbytes(klen), rng.randbytes(mlen)
            assert outer.hmac_sha512(key, msg) == hmac.new(key, msg, hashlib.sha512).digest()


def test_extract_once_then_expand_equals_one_shot_hkdf():
    rng = random.Random(12)
    for _ in range(20):
        ikm, salt, info = rng.randbytes(32), rng.randbytes(32), rng.randbytes(rng.randrange(0, 100))
        expected = _hkdf("sha512", ikm, salt, info, 32)
        assert inner.hkdf_expand(inner.hkdf_extract(ikm, salt), info) == expected
        assert outer.hkdf_expand(outer.hkdf_extract(ikm, salt), info) == expected


# Published known answers of the same HKDF-SHA512 call pattern (salt = message id, info = suite id
# u16be || "DERIVEKEY" / "COMMITKEY"): S3 Encryption Client suite 0x0073, from
# aws/amazon-s3-encryption-client-go v3/internal/key_derivation_test.go.
S3EC_KATS = [
    ("80d90dc4cc7e77d8a6332efa44eba56230a7fe7b89af37d1e501ab2e07c0a163",
     "b8ea76bed24c7b85382a148cb9dcd1cfdfb765f55ded4dfa6e0c4c79",
     "6dd14f546cc006e639126e83f5d4d1b118576bb5df97f38c6fb3a1db87bbc338",
     "f89818bc0a346d3a3426b68e9509b6b2ae5fe1f904aa329fb73625db"),
    ("501afb8227d22e75e68010414b8abdaf3064c081e8e922dafef4992036394d60",
     "61a00b4981a5aacfd136c55cb726e32d2a547dc7600a7d4675c69127",
     "e14786a714748d1d2c3a4a6816dec56ddf1881bbeabb4f39420ffb9f63700b2f",
     "5c1e73e47f6fe3a70d6d094283aceaa76d2975feb829212d88f0afc1"),
]


@pytest.mark.parametrize("dk,msg_id,key,commit", S3EC_KATS)
@pytest.mark.parametrize("hkdf", [inner_hkdf, outer_hkdf, refdecoder.hkdf_sha512],
                         ids=["inner", "outer", "refdecoder"])
def test_hkdf_sha512_s3ec_known_answers(hkdf, dk, msg_id, key, commit):
    dk, msg_id = bytes.fromhex(dk), bytes.fromhex(msg_id)
    assert hkdf(dk, msg_id, b"\x00\x73DERIVEKEY", 32).hex() == key
    assert hkdf(dk, msg_id, b"\x00\x73COMMITKEY", 28).hex() == commit


# A fixed DSSEFS answer (computed with the stdlib HKDF above, which the test cross-checks with both
# libraries): DK = 00..1f, msg_id = 20..3f, bound header fields = the 69 bytes 40..84.
EXPECTED_DSSEFS_KAT = {
    "inner-key": "62b768727e2e9a10f28231834ed5f39a4887ac59021818085a7dcb6123e0209f",
    "inner-commit": "0a244e99cb2a9384779bd88785712a7a08ae02fd6b30e689bf1e6d9a5cfd7d5e",
    "inner-attrs": "11d7908c072ce91171c884df14062c6cc601a27e904770ff3d322612d1c2dff5",
    "outer-key": "ed58d324938226b5ca727b5c962fc1d6e121a718968cd640176972afdce27ab0",
    "outer-commit": "8a4b3c94e9b6a1c24c143d3ca782a520df11a37d8dd7f79893d771945ac25f4d",
    "outer-attrs": "0c8676068b8d9ed665b23a5e857279155683e862d089a1046150adc7100c9663",
}


def _kat_inputs():
    return bytes(range(0x00, 0x20)), bytes(range(0x20, 0x40)), bytes(range(0x40, 0x40 + 69))


def test_dssefs_hkdf_known_answer():
    dk, msg_id, bound = _kat_inputs()
    suite = fmt.SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT
    got = {}
    for layer, name in ((fmt.LAYER_INNER, "inner"), (fmt.LAYER_OUTER, "outer")):
        hkdf = inner_hkdf if layer == fmt.LAYER_INNER else outer_hkdf
        got[f"{name}-key"] = hkdf(dk, msg_id, fmt.kdf_info(suite, layer, b"DERIVEKEY")).hex()
        got[f"{name}-commit"] = hkdf(dk, msg_id, fmt.commit_info(suite, layer, b"COMMITKEY", bound)).hex()
        got[f"{name}-attrs"] = hkdf(dk, msg_id, fmt.kdf_info(suite, layer, b"ATTRSKEY")).hex()
    assert got == EXPECTED_DSSEFS_KAT


def test_info_strings_are_exactly_as_specified():
    suite = fmt.SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT
    assert fmt.kdf_info(suite, fmt.LAYER_INNER, b"DERIVEKEY") == b"dssefs1\x00\x01\x01DERIVEKEY"
    assert fmt.kdf_info(suite, fmt.LAYER_OUTER, b"ATTRSKEY") == b"dssefs1\x00\x01\x02ATTRSKEY"
    bound = bytes(range(69))
    assert fmt.commit_info(suite, fmt.LAYER_OUTER, b"COMMITKEY", bound) == b"dssefs1\x00\x01\x02COMMITKEY" + bound
    with pytest.raises(ValueError):
        fmt.commit_info(suite, fmt.LAYER_OUTER, b"COMMITKEY", bound[:-1])
    assert fmt.chunk_nonce(0) == bytes(12)
    assert fmt.chunk_nonce(0x0102030405060708) == bytes(4) + bytes(range(1, 9))
    prefix = fmt.aad_prefix(suite, fmt.LAYER_INNER, bytes(32))
    assert prefix == b"dssefs1\x00\x01\x01" + bytes(32) and len(prefix) == 42
    assert fmt.chunk_aad(prefix, 5, True) == prefix + (5).to_bytes(8, "big") + b"\x01"
    assert fmt.chunk_aad(prefix, 5, False)[-1:] == b"\x00" and len(fmt.chunk_aad(prefix, 5, False)) == 51
    assert fmt.attrs_aad(prefix) == prefix + b"attrs"


@pytest.mark.parametrize("aead", LAYERS)
def test_output_into_plain_bytearray_and_in_place(aead):
    """Regression: OuterAEAD sliced its output with ``out[:n]``, which copies a bytearray, so
    encrypting into a bytearray left the plaintext in place (with a valid tag over the real
    ciphertext) and decrypting into one returned zeros."""
    key, nonce, aad = os.urandom(32), os.urandom(12), b"aad"
    pt = b"secret plaintext, 31 bytes long"
    buf = bytearray(pt) + bytearray(16)
    data = memoryview(buf)[:len(pt)] if aead is OuterAEAD else bytes(pt)  # outer supports in place
    aead(key).encrypt_into(nonce, data, aad, buf)
    assert bytes(buf[:len(pt)]) != pt
    expected = bytearray(len(pt) + 16)
    aead(key).encrypt_into(nonce, pt, aad, memoryview(expected))
    assert buf == expected
    out = bytearray(len(pt))
    assert aead(key).decrypt_into(nonce, bytes(buf), aad, out) is True
    assert bytes(out) == pt
    with pytest.raises(ValueError):
        aead(key).encrypt_into(nonce, pt, aad, bytearray(len(pt) + 15))
    with pytest.raises(ValueError):
        aead(key).decrypt_into(nonce, bytes(buf), aad, bytearray(len(pt) + 1))


def test_outer_warm_up_loads_what_the_first_cipher_would():
    """``outer.warm_up`` (run by the daemon at start) leaves nothing for the first real GCM
    operation to import; in a fresh interpreter without it, that first operation does import."""
    probe = ("import sys\n"
             "from dssefs.envelope import outer\n"
             "if sys.argv[1] == 'warm': outer.warm_up()\n"
             "before = set(sys.modules)\n"
             "out = bytearray(3 + outer.TAG_BYTES)\n"
             "outer.OuterAEAD(bytes(range(32))).encrypt_into(bytes(12), b'abc', b'aad', out)\n"
             "print(','.join(sorted(set(sys.modules) - before)))\n")
    cold = subprocess.run([sys.executable, "-c", probe, "cold"], capture_output=True, text=True, check=True)
    warm = subprocess.run([sys.executable, "-c", probe, "warm"], capture_output=True, text=True, check=True)
    assert "Crypto.Cipher._mode_gcm" in cold.stdout.split(",")
    assert warm.stdout.strip() == ""
