"""Each layer's wrapped key is accepted only under a key trusted for that layer.

Under split custody (a separate outer key) whoever controls one of the two master keys must not
be able to wrap both layers of a forged object, nor swap the two layers.  The AWS KMS tests run
against a real moto server; the only fault injection is a botocore ``after-call`` handler that
rewrites which key KMS says decrypted (a server cannot be made to lie).
"""

from __future__ import annotations

import argparse
import errno
import uuid

import pytest

from dssefs import config, session
from dssefs.errors import ConfigError, KeyAccessDenied, KeyProviderError
from dssefs.kms import make_provider
from dssefs.kms.aws import AwsKmsProvider
from dssefs.kms.base import KeyProvider, Layer, WrappedKey, context, epoch_context
from dssefs.kms.local import LocalKeyringProvider, create_keyring

CTX_IN = context(Layer.INNER, "bucket", "dir/file.txt")
CTX_OUT = context(Layer.OUTER, "bucket", "dir/file.txt")
CTX = {Layer.INNER: CTX_IN, Layer.OUTER: CTX_OUT}


def one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg
    return msg


def assert_clean(err: BaseException, *secrets: bytes) -> str:
    msg = one_line(err)
    for s in secrets:
        assert s.hex() not in msg and repr(s)[2:-1] not in msg
    return msg


# ============================================================================ AWS KMS


@pytest.fixture
def kms(moto_server):
    return moto_server.client("kms")


@pytest.fixture
def keys(kms) -> tuple[str, str, str]:
    """Three fresh KMS keys (ARNs): A1 for the inner layer, A2 for the outer, A3 foreign."""
    return tuple(kms.create_key(Description=f"dssefs trust {i}")["KeyMetadata"]["Arn"]
                 for i in (1, 2, 3))


def key_uuid(arn: str) -> str:
    return arn.rsplit("/", 1)[1]


def make_alias(kms, arn: str) -> str:
    alias = f"alias/dssefs-trust-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_uuid(arn))
    return alias


def record_ops(provider: AwsKmsProvider) -> list[str]:
    ops: list[str] = []
    provider.client.meta.events.register("before-call.kms",
                                         lambda model, **kw: ops.append(model.name))
    return ops


def forge(key_inner: str, key_outer: str) -> dict[Layer, tuple[bytes, WrappedKey]]:
    """Both data keys of one object, wrapped by a writer using the given keys (e.g. an attacker
    who controls one of them)."""
    writer = AwsKmsProvider(key_inner, key_outer)
    return {layer: writer.generate(layer, CTX[layer]) for layer in Layer}


def test_split_custody_reads_its_own_layers(keys):
    a1, a2, _ = keys
    p = AwsKmsProvider(a1, a2)
    assert p.split_custody
    for layer, (dk, w) in forge(a1, a2).items():
        assert p.unwrap(layer, w, CTX[layer]) == dk
    assert p.trusted_description(Layer.INNER) == f"KMS key {a1} (inner layer only)"
    assert p.trusted_description(Layer.OUTER) == f"KMS key {a2} (outer layer only)"


def test_both_layers_under_the_inner_key_refused(keys):
    a1, a2, _ = keys
    p = AwsKmsProvider(a1, a2)
    ops = record_ops(p)
    obj = forge(a1, a1)
    dk_in, w_in = obj[Layer.INNER]
    assert p.unwrap(Layer.INNER, w_in, CTX_IN) == dk_in  # that layer alone is fine
    dk_out, w_out = obj[Layer.OUTER]
    with pytest.raises(KeyAccessDenied) as ei:
        p.unwrap(Layer.OUTER, w_out, CTX_OUT)
    msg = assert_clean(ei.value, dk_out)
    assert msg == (f"outer data key of 'bucket/dir/file.txt' is wrapped by KMS key {a1}, which "
                   f"this reader trusts only for the inner layer (split custody: inner {a1}, "
                   f"outer {a2}): refusing a possible forgery")
    assert ei.value.errno == errno.EACCES
    assert ops == ["Decrypt"]  # only the inner layer reached KMS


def test_both_layers_under_the_outer_key_refused(keys):
    a1, a2, _ = keys
    p = AwsKmsProvider(a1, a2)
    ops = record_ops(p)
    obj = forge(a2, a2)
    with pytest.raises(KeyAccessDenied, match="trusts only for the outer layer"):
        p.unwrap(Layer.INNER, obj[Layer.INNER][1], CTX_IN)
    assert p.unwrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT) == obj[Layer.OUTER][0]
    assert ops == ["Decrypt"]


def test_swapped_layers_refused(keys):
    a1, a2, _ = keys
    p = AwsKmsProvider(a1, a2)
    ops = record_ops(p)
    obj = forge(a2, a1)
    with pytest.raises(KeyAccessDenied, match="trusts only for the outer layer"):
        p.unwrap(Layer.INNER, obj[Layer.INNER][1], CTX_IN)
    with pytest.raises(KeyAccessDenied, match="trusts only for the inner layer"):
        p.unwrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT)
    # nor can a reader be tricked by relabelling: the blobs say A2/A1, the metadata A1/A2
    with pytest.raises(KeyProviderError):
        p.unwrap(Layer.INNER, WrappedKey(obj[Layer.INNER][1].blob, a1), CTX_IN)
    assert ops == ["Decrypt"]  # the relabelled one: KMS refused it (IncorrectKeyException)


def test_foreign_key_refused_naming_the_option(keys):
    a1, a2, a3 = keys
    p = AwsKmsProvider(a1, a2)
    ops = record_ops(p)
    obj = forge(a3, a3)
    with pytest.raises(KeyAccessDenied) as ei:
        p.unwrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT)
    assert one_line(ei.value) == (
        f"outer data key of 'bucket/dir/file.txt' is wrapped by KMS key {a3}, which this reader "
        "does not trust for the outer layer: if it is yours, add it with "
        f"--kms-allowed-key-ids-outer {a3} (or --kms-allowed-key-ids for the inner layer)")
    with pytest.raises(KeyAccessDenied) as ei:
        p.unwrap(Layer.INNER, obj[Layer.INNER][1], CTX_IN)
    msg = one_line(ei.value)
    assert "not trust for the inner layer" in msg and "add it with --kms-allowed-key-ids " in msg
    with pytest.raises(KeyAccessDenied):
        p.rewrap(Layer.INNER, obj[Layer.INNER][1], CTX_IN, CTX_IN, new_key_id=a1)
    assert ops == []


def test_allowed_outer_key_admits_it_for_the_outer_layer_only(keys):
    a1, a2, a3 = keys
    p = AwsKmsProvider(a1, a2, allowed_key_ids_outer=[a3])
    obj = forge(a3, a3)
    assert p.unwrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT) == obj[Layer.OUTER][0]
    with pytest.raises(KeyAccessDenied, match="trusts only for the outer layer"):
        p.unwrap(Layer.INNER, obj[Layer.INNER][1], CTX_IN)
    assert p.trusted_description(Layer.OUTER) == f"KMS keys {a2}, {a3} (outer layer only)"
    # the inner list works the same way for the inner layer
    q = AwsKmsProvider(a1, a2, allowed_key_ids=[a3])
    assert q.unwrap(Layer.INNER, obj[Layer.INNER][1], CTX_IN) == obj[Layer.INNER][0]
    with pytest.raises(KeyAccessDenied, match="trusts only for the inner layer"):
        q.unwrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT)


def test_bare_key_ids_and_aliases_are_bound_to_their_layer(kms, keys):
    a1, a2, a3 = keys
    p = AwsKmsProvider(key_uuid(a1), make_alias(kms, a2),
                       allowed_key_ids_outer=[make_alias(kms, a3)])
    assert p.split_custody
    good = forge(a1, a2)
    for layer, (dk, w) in good.items():
        assert p.unwrap(layer, w, CTX[layer]) == dk
    assert p.unwrap(Layer.OUTER, forge(a3, a3)[Layer.OUTER][1], CTX_OUT)
    with pytest.raises(KeyAccessDenied, match="trusts only for the inner layer"):
        p.unwrap(Layer.OUTER, forge(a1, a1)[Layer.OUTER][1], CTX_OUT)
    with pytest.raises(KeyAccessDenied, match="trusts only for the outer layer"):
        p.unwrap(Layer.INNER, forge(a3, a3)[Layer.INNER][1], CTX_IN)


def test_one_key_for_both_layers_shares_one_trusted_set(keys):
    a1, a2, a3 = keys
    # the outer key given in another form of the same key is still one key: no split custody
    p = AwsKmsProvider(a1, key_uuid(a1), allowed_key_ids=[a2], allowed_key_ids_outer=[a3])
    assert not p.split_custody
    assert p.trusted_description(Layer.INNER) == p.trusted_description(Layer.OUTER)
    assert "(both layers)" in p.trusted_description(Layer.INNER)
    for key in (a1, a2, a3):
        for layer, (dk, w) in forge(key, key).items():
            assert p.unwrap(layer, w, CTX[layer]) == dk


@pytest.mark.parametrize("kwargs, opts", [
    (dict(allowed_key_ids=["{a2}"]), ("--kms-allowed-key-ids", "--kms-key-id-outer")),
    (dict(allowed_key_ids_outer=["{a1}"]), ("--kms-key-id", "--kms-allowed-key-ids-outer")),
    (dict(allowed_key_ids=["{a3}"], allowed_key_ids_outer=["{a3}"]),
     ("--kms-allowed-key-ids", "--kms-allowed-key-ids-outer")),
    (dict(allowed_key_ids=["{u2}"]), ("--kms-allowed-key-ids", "--kms-key-id-outer")),
])
def test_key_trusted_for_both_layers_is_a_config_error(keys, kwargs, opts):
    a1, a2, a3 = keys
    names = dict(a1=a1, a2=a2, a3=a3, u2=key_uuid(a2))
    kwargs = {k: [v.format(**names) for v in vs] for k, vs in kwargs.items()}
    with pytest.raises(ConfigError) as ei:
        AwsKmsProvider(a1, a2, **kwargs)
    msg = one_line(ei.value)
    named = next(iter(kwargs.values()))[0]
    assert named in msg and all(o + " " in msg or o + ")" in msg for o in opts), msg
    assert "split custody" in msg
    with pytest.raises(ConfigError):
        make_provider(kms_key_id=a1, kms_key_id_outer=a2,
                      kms_allowed_key_ids=kwargs.get("allowed_key_ids", ()),
                      kms_allowed_key_ids_outer=kwargs.get("allowed_key_ids_outer", ()))


def test_kms_reporting_another_key_after_decrypt_is_refused(keys):
    """The object names a trusted key but KMS says another key decrypted: discard the result."""
    a1, a2, a3 = keys
    obj = forge(a1, a2)
    for reported, text in ((a3, "does not trust for the inner layer"),
                           (a2, "trusts only for the outer layer")):
        p = AwsKmsProvider(a1, a2)

        def lie(parsed, reported=reported, **kwargs):
            if "KeyId" in parsed:
                parsed["KeyId"] = reported

        p.client.meta.events.register("after-call.kms.Decrypt", lie)
        dk, w = obj[Layer.INNER]
        with pytest.raises(KeyAccessDenied) as ei:
            p.unwrap(Layer.INNER, w, CTX_IN)
        msg = assert_clean(ei.value, dk)
        assert msg.startswith(f"KMS opened the inner data key of 'bucket/dir/file.txt' (which "
                              f"names KMS key {a1}) with KMS key {reported}, which this reader ")
        assert text in msg and "forgery" in msg
        assert p.stats["errors"] == 1
    p = AwsKmsProvider(a1, a2)
    p.client.meta.events.register("after-call.kms.Decrypt",
                                  lambda parsed, **kw: parsed.pop("KeyId", None))
    with pytest.raises(KeyProviderError, match="did not say which key"):
        p.unwrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT)


def test_kms_reporting_another_source_key_after_reencrypt_is_refused(keys):
    a1, a2, a3 = keys
    _, w = forge(a1, a2)[Layer.OUTER]
    p = AwsKmsProvider(a1, a2)
    p.client.meta.events.register(
        "after-call.kms.ReEncrypt",
        lambda parsed, **kw: parsed.__setitem__("SourceKeyId", a3) if "SourceKeyId" in parsed
        else None)
    new_ctx = context(Layer.OUTER, "bucket", "renamed.txt")
    with pytest.raises(KeyAccessDenied) as ei:
        p.rewrap(Layer.OUTER, w, CTX_OUT, new_ctx)
    msg = one_line(ei.value)
    assert f"with KMS key {a3}" in msg and "--kms-allowed-key-ids-outer" in msg
    # without the lie the same call works
    w2 = AwsKmsProvider(a1, a2).rewrap(Layer.OUTER, w, CTX_OUT, new_ctx)
    assert w2.key_id == a2


def test_rewrap_respects_layers(keys):
    a1, a2, _ = keys
    p = AwsKmsProvider(a1, a2)
    obj = forge(a1, a2)
    new_ctx = context(Layer.OUTER, "bucket", "renamed.txt")
    with pytest.raises(ConfigError, match="trusted only for the inner layer"):
        p.rewrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT, new_ctx, new_key_id=a1)
    with pytest.raises(KeyAccessDenied, match="trusts only for the outer layer"):
        p.rewrap(Layer.INNER, obj[Layer.OUTER][1], CTX_OUT, new_ctx)


def test_rekey_to_new_split_keys(kms, keys):
    """Moving objects from one pair of keys to another: the old keys are named per layer."""
    a1, a2, _ = keys
    b1 = kms.create_key()["KeyMetadata"]["Arn"]
    b2 = kms.create_key()["KeyMetadata"]["Arn"]
    obj = forge(a1, a2)
    p = AwsKmsProvider(b1, b2, allowed_key_ids=[a1], allowed_key_ids_outer=[a2])
    moved = {layer: p.rewrap(layer, obj[layer][1], CTX[layer], CTX[layer],
                             new_key_id=p.key_id(layer)) for layer in Layer}
    assert (moved[Layer.INNER].key_id, moved[Layer.OUTER].key_id) == (b1, b2)
    reader = AwsKmsProvider(b1, b2)
    for layer in Layer:
        assert reader.unwrap(layer, moved[layer], CTX[layer]) == obj[layer][0]


def test_alias_naming_the_other_layers_key_is_refused(kms, keys):
    """An allowed alias that (now) points at the outer key makes that key ambiguous: refused."""
    a1, a2, _ = keys
    p = AwsKmsProvider(a1, a2, allowed_key_ids=[make_alias(kms, a2)])
    obj = forge(a2, a2)
    for layer in Layer:
        with pytest.raises(KeyAccessDenied) as ei:
            p.unwrap(layer, obj[layer][1], CTX[layer])
        assert "trusted for both layers" in one_line(ei.value)


def test_split_aliases_naming_one_key(kms, keys):
    a1, _, _ = keys
    p = AwsKmsProvider(make_alias(kms, a1), make_alias(kms, a1))
    assert p.split_custody  # as configured; KMS shows they are one key
    with pytest.raises(ConfigError, match="both name KMS key"):
        p.check()
    q = AwsKmsProvider(make_alias(kms, a1), make_alias(kms, a1))
    q.generate(Layer.INNER, CTX_IN)
    with pytest.raises(ConfigError, match="split custody needs two different keys"):
        q.generate(Layer.OUTER, CTX_OUT)


def test_make_provider_and_session_plumb_the_outer_list(moto_server, keys):
    a1, a2, a3 = keys
    obj = forge(a3, a3)
    p = make_provider(kms_key_id=a1, kms_key_id_outer=a2, kms_allowed_key_ids_outer=[a3])
    assert p.unwrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT) == obj[Layer.OUTER][0]
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, ("store", "keys"))
    s = config.settings_from(parser.parse_args(
        ["--kms-key-id", a1, "--kms-key-id-outer", a2, "--kms-allowed-key-ids-outer", a3]))
    provider = session.key_provider(s).provider
    assert provider.unwrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT) == obj[Layer.OUTER][0]
    with pytest.raises(KeyAccessDenied, match="trusts only for the outer layer"):
        provider.unwrap(Layer.INNER, obj[Layer.INNER][1], CTX_IN)
    s = config.settings_from(parser.parse_args(
        ["--kms-key-id", a1, "--kms-key-id-outer", a2, "--kms-allowed-key-ids", a3,
         "--kms-allowed-key-ids-outer", f"{a3}"]))
    with pytest.raises(ConfigError, match="trusted for both layers"):
        session.key_provider(s)


def test_keyring_refuses_outer_allowed_kms_keys(tmp_path):
    ring = str(tmp_path / "keyring")
    create_keyring(ring)
    with pytest.raises(ConfigError, match="keyring"):
        make_provider(keyring=ring, kms_allowed_key_ids_outer=["alias/x"])


# ============================================================================ local keyring


@pytest.fixture
def ring(tmp_path):
    path = str(tmp_path / "keyring")
    return create_keyring(path, ["default", "second", "third"])


def wrap_all(ring, inner: str, outer: str, ctx=CTX) -> dict[Layer, tuple[bytes, WrappedKey]]:
    writer = LocalKeyringProvider(ring, inner, outer)
    return {layer: writer.generate(layer, ctx[layer]) for layer in Layer}


@pytest.mark.parametrize("inner, outer, refused", [
    ("default", "default", {Layer.OUTER: "trusts only for the inner layer"}),
    ("second", "second", {Layer.INNER: "trusts only for the outer layer"}),
    ("second", "default", {Layer.INNER: "trusts only for the outer layer",
                           Layer.OUTER: "trusts only for the inner layer"}),
    ("third", "third", {Layer.INNER: "does not trust for the inner layer",
                        Layer.OUTER: "does not trust for the outer layer"}),
])
def test_keyring_split_names_bind_layers(ring, inner, outer, refused):
    p = LocalKeyringProvider(ring, "default", "second")
    assert p.split_custody
    for layer, (dk, w) in wrap_all(ring, inner, outer).items():
        if layer in refused:
            with pytest.raises(KeyAccessDenied) as ei:
                p.unwrap(layer, w, CTX[layer])
            msg = assert_clean(ei.value, dk, ring.master_key("default"))
            assert refused[layer] in msg and f"{layer.value} data key" in msg
            assert f"keyring key {w.key_id!r}" in msg
        else:
            assert p.unwrap(layer, w, CTX[layer]) == dk


def test_keyring_split_allowed_names(ring):
    p = LocalKeyringProvider(ring, "default", "second", allowed_names_outer=["third"])
    obj = wrap_all(ring, "third", "third")
    assert p.unwrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT) == obj[Layer.OUTER][0]
    with pytest.raises(KeyAccessDenied, match="trusts only for the outer layer"):
        p.unwrap(Layer.INNER, obj[Layer.INNER][1], CTX_IN)
    assert p.trusted_description(Layer.OUTER) == \
        f"keyring keys 'second', 'third' of {ring.path} (outer layer only)"
    assert p.trusted_description(Layer.INNER) == \
        f"keyring key 'default' of {ring.path} (inner layer only)"
    q = LocalKeyringProvider(ring, "default", "second", allowed_names_inner="third")
    assert q.unwrap(Layer.INNER, obj[Layer.INNER][1], CTX_IN) == obj[Layer.INNER][0]


@pytest.mark.parametrize("kwargs, name", [
    (dict(allowed_names_inner=["second"]), "second"),
    (dict(allowed_names_outer=["default"]), "default"),
    (dict(allowed_names_inner=["third"], allowed_names_outer=["third"]), "third"),
])
def test_keyring_split_sets_must_be_disjoint(ring, kwargs, name):
    with pytest.raises(ConfigError) as ei:
        LocalKeyringProvider(ring, "default", "second", **kwargs)
    msg = one_line(ei.value)
    assert f"keyring key {name!r} is trusted for both layers" in msg and "split custody" in msg


def test_keyring_one_name_trusts_every_key_for_both_layers(ring):
    p = LocalKeyringProvider(ring, "default", allowed_names_inner=["x"])
    assert not p.split_custody
    assert p.trusted_description(Layer.INNER) == f"every key of keyring {ring.path} (both layers)"
    for inner, outer in (("second", "default"), ("third", "third"), ("default", "second")):
        for layer, (dk, w) in wrap_all(ring, inner, outer).items():
            assert p.unwrap(layer, w, CTX[layer]) == dk


def test_keyring_split_rewrap(ring):
    p = LocalKeyringProvider(ring, "default", "second")
    obj = wrap_all(ring, "default", "second")
    new_ctx = context(Layer.OUTER, "bucket", "renamed.txt")
    with pytest.raises(ConfigError, match="trusted only for the inner layer"):
        p.rewrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT, new_ctx, new_key_id="default")
    with pytest.raises(KeyAccessDenied, match="trusts only for the inner layer"):
        p.rewrap(Layer.OUTER, WrappedKey(obj[Layer.INNER][1].blob, "default"), CTX_OUT, new_ctx)
    w = p.rewrap(Layer.OUTER, obj[Layer.OUTER][1], CTX_OUT, new_ctx, new_key_id="third")
    assert p.unwrap(Layer.OUTER, w, new_ctx) == obj[Layer.OUTER][0]  # re-wrapped here: trusted
    with pytest.raises(KeyAccessDenied):
        LocalKeyringProvider(ring, "default", "second").unwrap(Layer.OUTER, w, new_ctx)


def test_keyring_split_epoch_contexts(ring):
    ctx = {layer: epoch_context(layer, "bucket", "photos/", "0123abcd" * 4) for layer in Layer}
    p = LocalKeyringProvider(ring, "default", "second")
    obj = wrap_all(ring, "default", "default", ctx)
    with pytest.raises(KeyAccessDenied) as ei:
        p.unwrap(Layer.OUTER, obj[Layer.OUTER][1], ctx[Layer.OUTER])
    assert one_line(ei.value).startswith(
        "outer epoch key of 'bucket/photos/' (epoch 0123abcd) is wrapped by keyring key 'default'")


def test_base_class_defaults():
    class Fixed(KeyProvider):
        kind = "test"

        def __init__(self, inner, outer):
            self.ids = {Layer.INNER: inner, Layer.OUTER: outer}

        def key_id(self, layer):
            return self.ids[layer]

        generate = unwrap = rewrap = None

    assert not Fixed("a", "a").split_custody
    assert Fixed("a", "a").trusted_description(Layer.OUTER) == "a (both layers)"
    assert Fixed("a", "b").split_custody
    assert Fixed("a", "b").trusted_description(Layer.OUTER) == "b (outer layer only)"
