"""AWS KMS key provider: data keys from ``GenerateDataKey``, unwrapped with ``Decrypt``.

Each layer gets its own 32-byte data key from its own ``GenerateDataKey`` call, with the layer's
encryption context (:func:`dssefs.kms.base.context`).  The outer layer may use a second KMS key
(split custody: two key policies, possibly two administrators).  Re-wrapping (rename, moving to
another KMS key) uses ``ReEncrypt``, so the data key never leaves KMS.

Credentials, region and endpoint come from boto3's standard chain: ``AWS_PROFILE``,
``AWS_ACCESS_KEY_ID``, SSO, instance and container roles; ``AWS_REGION``; ``AWS_ENDPOINT_URL`` and
``AWS_ENDPOINT_URL_KMS`` (an explicit ``endpoint_url`` wins).  When no region is configured and the
key is given as an ARN, the ARN's region is used.

Which KMS keys are trusted on read
----------------------------------
The KMS key id of each wrapped data key is stored in object metadata, which anyone who can write
to the bucket can change.  Calling ``Decrypt`` with whatever key id an object names would let such
a writer point it at a KMS key of their own (any account can grant everyone ``kms:Decrypt``) and
have forged objects accepted.  So :meth:`AwsKmsProvider.unwrap` and :meth:`AwsKmsProvider.rewrap`
only use keys this provider trusts *for the layer being unwrapped*:

* one key for both layers (no separate outer key): both layers share one set, the configured key
  plus ``allowed_key_ids`` plus ``allowed_key_ids_outer``;
* split custody (a separate outer key): the inner layer trusts the inner key and
  ``allowed_key_ids``, the outer layer the outer key and ``allowed_key_ids_outer``.  The two sets
  must be disjoint (a key named for both is a ConfigError), so whoever controls one of the two
  keys cannot wrap both layers of a forged object, nor swap them.

Aliases are resolved to their current target with ``DescribeKey`` (at most every 30 s); a bare key
id matches the key ARN with that id in the client's region; keys this process generated with or
re-wrapped to are trusted for that layer.  An object naming a key not trusted for the layer is
refused with :class:`~dssefs.errors.KeyAccessDenied` before KMS is called.  After ``Decrypt``
(``ReEncrypt``), the key ARN KMS reports as the one that actually decrypted (``KeyId`` /
``SourceKeyId``) is checked against the same layer's set again, and the result is discarded if it
is not there.

Error mapping (every message is one line, names the problem and the fix, never key material)
--------------------------------------------------------------------------------------------
===========================================  =========================================
botocore                                     dssefs
===========================================  =========================================
AccessDeniedException                        KeyAccessDenied
credentials rejected or expired              KeyAccessDenied
NoCredentialsError, PartialCredentialsError  KeyAccessDenied
credential provider / SSO token failures     KeyAccessDenied
NotFoundException                            KeyNotFound (names the region)
DisabledException, KMSInvalidStateException  KeyUnavailable
KeyUnavailableException                      KeyUnavailable
throttling, KMS internal errors              KeyUnavailable (after every retry, see below)
EndpointConnectionError, timeouts, TLS       KeyUnavailable
InvalidCiphertextException                   WrappedKeyMismatch (a KeyAccessDenied)
IncorrectKeyException                        WrappedKeyMismatch
InvalidKeyUsageException, other errors       KeyProviderError
key not trusted for reading (see above)      KeyAccessDenied, before KMS is called
KMS decrypted with a key not trusted (above)  KeyAccessDenied, the key is discarded
one key named for both layers (split)        ConfigError (raised by the constructor)
key ARN region differs from the client's     ConfigError (raised by the constructor)
===========================================  =========================================

``WrappedKeyMismatch`` (errno ``EACCES``) is shared with the local keyring: a wrapped key that does
not open under the object's context, typically because the object was copied or renamed outside
dssefs, or its metadata was altered.

Retries
-------
As for S3 (:mod:`dssefs.store.s3`): botocore makes ``max_attempts`` attempts per call, with a retry
quota that never runs out; a call that still fails transiently (throttled, a KMS internal error,
connection refused, reset or timed out) is made again with capped exponential back-off and jitter
until ``retry_budget`` seconds (default 60) have passed since its first attempt.  Every KMS call
dssefs makes can be repeated safely: ``GenerateDataKey`` hands out a fresh key each time (an
answer that was lost is simply never used), ``Decrypt``, ``ReEncrypt`` and ``DescribeKey`` change
nothing.
"""

from __future__ import annotations

import errno as _errno
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import boto3
import botocore.config
import botocore.exceptions as bce

from .. import __version__
from ..errors import (ConfigError, KeyAccessDenied, KeyNotFound, KeyProviderError,
                      KeyUnavailable)
from ..retrying import keep_retrying, retry_budget_for, retry_delay, tls_reason, transient_tls_error
from ._common import (METADATA_KEY_ID_RE, Stats, WrappedKeyMismatch, check_context,
                      describe_context, key_noun, layer_value, one_line)
from .base import DATA_KEY_BYTES, KeyProvider, Layer, WrappedKey

__all__ = ["AwsKmsProvider", "KmsKeyRef", "KmsKeyStatus", "parse_kms_key_id",
           "looks_like_kms_key_id", "DEFAULT_MAX_ATTEMPTS"]

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 5  # (as the S3 store's: the budget's default depends on it)
RETRY_MODES = ("standard", "adaptive", "legacy")
#: Minimum seconds between two alias look-ups triggered by an untrusted key id.
_RESOLVE_INTERVAL = 30.0

_KEY_ID_RE = re.compile(
    r"^(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})$")
_ALIAS_RE = re.compile(r"^alias/[A-Za-z0-9/_-]{1,250}$")
_ARN_RE = re.compile(
    r"^arn:(aws[a-z-]*):kms:([a-z0-9-]{1,64}):([0-9]{12}):(key|alias)/([A-Za-z0-9/_-]{1,250})$")

_CREDENTIAL_CODES = frozenset({
    "UnrecognizedClientException", "InvalidClientTokenId", "ExpiredTokenException",
    "ExpiredToken", "InvalidSignatureException", "IncompleteSignature", "SignatureDoesNotMatch",
    "RequestExpired", "MissingAuthenticationToken", "InvalidAccessKeyId",
})
_THROTTLE_CODES = frozenset({
    "ThrottlingException", "Throttling", "ThrottledException", "LimitExceededException",
    "RequestLimitExceeded", "TooManyRequestsException", "SlowDown",
})
_TRANSIENT_CODES = frozenset({
    "KMSInternalException", "DependencyTimeoutException", "InternalFailure", "InternalError",
    "ServiceUnavailable", "ServiceUnavailableException", "RequestTimeout",
    "RequestTimeoutException", "500", "502", "503", "504",
})
#: Answered with a 5xx, yet waiting does not help: someone has to act (reconnect the key store).
_LASTING_CODES = frozenset({"KeyUnavailableException"})


def _transient(exc: Exception) -> bool:
    """Whether a botocore error may pass when the call is made again: throttling, a KMS internal
    error or 5xx, a connection refused, reset or timed out (not a refused certificate)."""
    if isinstance(exc, bce.ClientError):
        code = str((exc.response.get("Error", {}) or {}).get("Code", ""))
        status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
        if code in _LASTING_CODES:
            return False
        return (code in _THROTTLE_CODES or code in _TRANSIENT_CODES
                or (isinstance(status, int) and status >= 500))
    if isinstance(exc, bce.SSLError):
        return transient_tls_error(exc)
    return isinstance(exc, (bce.ConnectionError, bce.HTTPClientError))


# --------------------------------------------------------------------------------------------
# Key ids


@dataclass(frozen=True)
class KmsKeyRef:
    """A parsed KMS key id: ``form`` is ``key-arn``, ``alias-arn``, ``key-id`` or ``alias``."""

    raw: str
    form: str
    region: str | None = None
    account: str | None = None
    name: str | None = None  # key id (UUID / mrk-...) or alias name ``alias/...``

    @property
    def is_arn(self) -> bool:
        return self.form in ("key-arn", "alias-arn")

    @property
    def is_alias(self) -> bool:
        return self.form in ("alias-arn", "alias")


def parse_kms_key_id(key_id: str, *, what: str = "KMS key id") -> KmsKeyRef:
    """Parse a KMS key id, key ARN, alias name (``alias/x``) or alias ARN; ConfigError otherwise."""
    if not isinstance(key_id, str) or not METADATA_KEY_ID_RE.fullmatch(key_id):
        raise ConfigError(f"{what} {one_line(repr(key_id), 80)} is malformed: use a key id, "
                          "key ARN, alias name (alias/NAME) or alias ARN")
    if _KEY_ID_RE.fullmatch(key_id):
        return KmsKeyRef(key_id, "key-id", name=key_id)
    if _ALIAS_RE.fullmatch(key_id):
        return KmsKeyRef(key_id, "alias", name=key_id)
    m = _ARN_RE.fullmatch(key_id)
    if m:
        _partition, region, account, kind, rest = m.groups()
        if kind == "key" and _KEY_ID_RE.fullmatch(rest):
            return KmsKeyRef(key_id, "key-arn", region, account, rest)
        if kind == "alias" and _ALIAS_RE.fullmatch("alias/" + rest):
            return KmsKeyRef(key_id, "alias-arn", region, account, "alias/" + rest)
    raise ConfigError(f"{what} {key_id!r} is not a KMS key: use a key id, key ARN, "
                      "alias name (alias/NAME) or alias ARN")


def looks_like_kms_key_id(value: str) -> bool:
    """True for strings that can only be meant as a KMS key: ARN, ``alias/...``, key id."""
    try:
        parse_kms_key_id(value)
    except ConfigError:
        return False
    return True


def _identity(ref: KmsKeyRef) -> tuple[str, str | None]:
    """What a configured id names, for comparing ids given in different forms: a key ARN and a
    bare key id name the same key when the key ids match (the region was checked), an alias name
    and an alias ARN the same alias."""
    return ("alias" if ref.is_alias else "key", ref.name)


def _other(layer: Layer) -> Layer:
    return Layer.OUTER if layer is Layer.INNER else Layer.INNER


class _TrustSet:
    """The KMS keys one layer accepts on read (shared by both layers without split custody)."""

    def __init__(self, refs: list[KmsKeyRef]):
        refs = list(dict.fromkeys(refs))
        self.refs = refs
        self.raw: frozenset[str] = frozenset(r.raw for r in refs)
        # Key ARNs: configured, resolved from this set's aliases, or answered by KMS for a call
        # this process made for this layer.  Guarded by the provider's lock.
        self.arns: set[str] = {r.raw for r in refs if r.form == "key-arn"}
        self.bare: frozenset[str] = frozenset(r.name for r in refs if r.form == "key-id")
        self.aliases: tuple[str, ...] = tuple(r.raw for r in refs if r.is_alias)


@dataclass(frozen=True)
class KmsKeyStatus:
    """What ``DescribeKey`` says about one configured key (no secrets)."""

    layers: tuple[str, ...]
    key_id: str  # as configured
    arn: str
    state: str
    key_spec: str | None
    key_usage: str | None
    region: str

    @property
    def usable(self) -> bool:
        return (self.state == "Enabled"
                and self.key_spec in (None, "SYMMETRIC_DEFAULT")
                and self.key_usage in (None, "ENCRYPT_DECRYPT"))


# --------------------------------------------------------------------------------------------
# botocore debug logging prints whole response bodies, and GenerateDataKey / Decrypt responses
# carry the plaintext data key.  Redact those records wherever logging is configured.


class _RedactKmsPlaintext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, str) and msg.startswith("Response body"):
            body = record.args[0] if isinstance(record.args, tuple) and record.args else b""
            if isinstance(body, (bytes, bytearray, str)):
                marker = b'"Plaintext"' if isinstance(body, (bytes, bytearray)) else '"Plaintext"'
                if marker in body:
                    record.args = ("<redacted by dssefs: KMS response carries key material>",)
        return True


_REDACTOR = _RedactKmsPlaintext()
_parsers_log = logging.getLogger("botocore.parsers")
if not any(isinstance(f, _RedactKmsPlaintext) for f in _parsers_log.filters):
    _parsers_log.addFilter(_REDACTOR)


# --------------------------------------------------------------------------------------------


class AwsKmsProvider(KeyProvider):
    """Per-layer data keys wrapped by AWS KMS.  Thread-safe; create one per mount."""

    kind = "kms"
    parallel_requests = True  # each request is a network round trip

    def __init__(self, key_id_inner: str, key_id_outer: str | None = None, *,
                 region: str | None = None, profile: str | None = None,
                 endpoint_url: str | None = None, session: boto3.Session | None = None,
                 retries_mode: str = "standard", max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 retry_budget: float | None = None,
                 connect_timeout: float = 5.0, read_timeout: float = 15.0,
                 max_pool_connections: int = 32, allowed_key_ids: Iterable[str] = (),
                 allowed_key_ids_outer: Iterable[str] = (), read_only: bool = False,
                 trust_hint: Callable[[str, str], str] | None = None):
        """``read_only``: a reader's provider (the keys name its trusted sets only; generating
        or re-wrapping is refused).  ``trust_hint(option, key)`` adds where else the key could
        be trusted (e.g. a configuration file line) to the messages that refuse a key.
        ``retry_budget``: seconds a call failing transiently is made again after botocore's
        ``max_attempts`` (0: never); unset, 60 unless ``max_attempts`` is below the default 5
        (then 0: a lowered ``max_attempts`` asks for quick failures)."""
        inner = parse_kms_key_id(key_id_inner, what="inner KMS key id")
        outer = parse_kms_key_id(key_id_outer, what="outer KMS key id") \
            if key_id_outer is not None else inner
        if isinstance(allowed_key_ids, str):
            allowed_key_ids = [allowed_key_ids]
        if isinstance(allowed_key_ids_outer, str):
            allowed_key_ids_outer = [allowed_key_ids_outer]
        extra = [parse_kms_key_id(k, what="allowed KMS key id") for k in allowed_key_ids]
        extra_out = [parse_kms_key_id(k, what="allowed outer KMS key id")
                     for k in allowed_key_ids_outer]
        split = _identity(inner) != _identity(outer)
        if split:
            named_in = [(inner, "--kms-key-id")] + [(r, "--kms-allowed-key-ids") for r in extra]
            named_out = [(outer, "--kms-key-id-outer")] + \
                [(r, "--kms-allowed-key-ids-outer") for r in extra_out]
            for ref_in, opt_in in named_in:
                for ref_out, opt_out in named_out:
                    if _identity(ref_in) == _identity(ref_out):
                        shown = ref_in.raw if ref_in.raw == ref_out.raw \
                            else f"{ref_in.raw} (= {ref_out.raw})"
                        raise ConfigError(
                            f"KMS key {shown} is trusted for both layers ({opt_in} and {opt_out}), "
                            f"but split custody (inner {inner.raw}, outer {outer.raw}) needs each "
                            "key to serve one layer only: remove it from one of the two options")
        if retries_mode not in RETRY_MODES:
            raise ConfigError(f"KMS retry mode {retries_mode!r} is unknown: use "
                              + " or ".join(RETRY_MODES))
        if not isinstance(max_attempts, int) or not 1 <= max_attempts <= 50:
            raise ConfigError(f"KMS max attempts {max_attempts!r} is out of range: use 1..50")
        self.retry_budget = retry_budget_for(retry_budget, max_attempts)

        if session is not None and profile is not None:
            raise ConfigError("pass either an AWS session or a profile, not both")
        if session is None:
            try:
                session = boto3.Session(profile_name=profile, region_name=region)
            except bce.ProfileNotFound:
                raise ConfigError(f"AWS profile {profile!r} not found: check AWS_PROFILE and "
                                  "~/.aws/config") from None

        refs = [inner, outer, *extra, *extra_out]
        arn_regions = {r.region for r in refs if r.is_arn}
        client_region = region or session.region_name
        if client_region is None:
            if len(arn_regions) == 1:
                client_region = next(iter(arn_regions))
            elif len(arn_regions) > 1:
                raise ConfigError("the KMS key ARNs name several regions ("
                                  + ", ".join(sorted(arn_regions))
                                  + "): use keys from one region")
            else:
                raise ConfigError("no AWS region configured for KMS: set AWS_REGION, pass "
                                  "--region, or give the key as an ARN")
        for ref in refs:
            if ref.is_arn and ref.region != client_region:
                raise ConfigError(
                    f"KMS key {ref.raw} is in region {ref.region} but the KMS client uses region "
                    f"{client_region}: set the region to {ref.region} (AWS_REGION / --region) or "
                    f"use a key from {client_region}")

        cfg = botocore.config.Config(
            region_name=client_region,
            retries={"mode": retries_mode, "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            user_agent_extra=f"dssefs/{__version__}",
        )
        try:
            self._client = session.client("kms", region_name=client_region,
                                          endpoint_url=endpoint_url, config=cfg)
        except ValueError as exc:  # botocore: invalid endpoint URL
            raise ConfigError(f"KMS endpoint {endpoint_url!r} is invalid: {one_line(exc)}") \
                from None
        keep_retrying(self._client, max_attempts)

        self._ids = {Layer.INNER: inner, Layer.OUTER: outer}
        self._split = split
        self.read_only = read_only
        self._trust_hint = trust_hint
        if split:
            self._sets = {Layer.INNER: _TrustSet([inner, *extra]),
                          Layer.OUTER: _TrustSet([outer, *extra_out])}
        else:
            shared = _TrustSet([inner, outer, *extra, *extra_out])
            self._sets = {Layer.INNER: shared, Layer.OUTER: shared}
        self.region: str = client_region
        self.endpoint_url: str = self._client.meta.endpoint_url
        self.max_attempts = max_attempts
        self._stats = Stats()
        self._lock = threading.Lock()
        self._resolve_lock = threading.Lock()
        # Aliases of either layer, looked up lazily: alias as configured -> key ARN.
        self._aliases: list[KmsKeyRef] = [r for r in dict.fromkeys(refs) if r.is_alias]
        self._resolved: dict[str, str] = {}
        self._resolve_errors: dict[str, KeyProviderError] = {}
        self._last_resolve = float("-inf")

    # ---------------------------------------------------------------------------- public API

    @property
    def client(self):
        """The boto3 KMS client (thread-safe; shared by all calls)."""
        return self._client

    @property
    def stats(self) -> dict[str, int]:
        """Counts of KMS calls made: generate, unwrap, rewrap, describe, and errors."""
        return self._stats.snapshot()

    def key_id(self, layer: Layer) -> str:
        return self._ids[Layer(layer)].raw

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise ConfigError("no KMS key is configured for writing (only keys trusted for "
                              "reading): pass --kms-key-id, or set kms_key_id in the configuration")

    def generate(self, layer: Layer, ctx: dict[str, str]) -> tuple[bytes, WrappedKey]:
        self._refuse_if_read_only()
        layer = Layer(layer)
        ctx = check_context(ctx)
        kid = self._ids[layer].raw
        self._stats.add("generate")
        resp = self._call("GenerateDataKey", dict(KeyId=kid, KeySpec="AES_256",
                                                  EncryptionContext=ctx),
                          key=kid, layer=layer, ctx=ctx)
        plaintext = resp.get("Plaintext")
        arn = resp.get("KeyId")
        blob = resp.get("CiphertextBlob")
        if not isinstance(plaintext, bytes) or len(plaintext) != DATA_KEY_BYTES:
            raise KeyProviderError(f"KMS GenerateDataKey on {kid} returned a malformed data key: "
                                   "check AWS_ENDPOINT_URL_KMS points at AWS KMS", errno=_errno.EIO)
        if not isinstance(blob, bytes) or not blob or not isinstance(arn, str) \
                or not METADATA_KEY_ID_RE.fullmatch(arn):
            raise KeyProviderError(f"KMS GenerateDataKey on {kid} returned a malformed answer: "
                                   "check AWS_ENDPOINT_URL_KMS points at AWS KMS", errno=_errno.EIO)
        if self._split and self._known(_other(layer), arn):
            del plaintext
            raise self._same_key_error(arn)
        with self._lock:
            self._sets[layer].arns.add(arn)  # KMS says this is what the configured id names
        return plaintext, WrappedKey(blob=blob, key_id=arn)

    def unwrap(self, layer: Layer, wrapped: WrappedKey, ctx: dict[str, str]) -> bytes:
        layer = Layer(layer)
        ctx = check_context(ctx)
        self._require_trusted(wrapped.key_id, layer, ctx)
        self._stats.add("unwrap")
        resp = self._call("Decrypt", dict(CiphertextBlob=wrapped.blob, EncryptionContext=ctx,
                                          KeyId=wrapped.key_id),
                          key=wrapped.key_id, layer=layer, ctx=ctx)
        # Taken out of the answer so that a refusal below leaves no reference to it behind.
        plaintext = resp.pop("Plaintext", None)
        used = resp.get("KeyId")
        try:
            if not isinstance(used, str) or not METADATA_KEY_ID_RE.fullmatch(used):
                raise KeyProviderError(f"KMS Decrypt on {wrapped.key_id} did not say which key "
                                       "decrypted: check AWS_ENDPOINT_URL_KMS points at AWS KMS",
                                       errno=_errno.EIO)
            self._require_decrypted_by_trusted(used, wrapped.key_id, layer, ctx)
        except KeyProviderError:
            self._stats.add("errors")
            del plaintext  # never handed out: drop the only reference at once
            raise
        if not isinstance(plaintext, bytes) or len(plaintext) != DATA_KEY_BYTES:
            n = len(plaintext) if isinstance(plaintext, bytes) else 0
            raise WrappedKeyMismatch(
                f"wrapped {layer.value} {key_noun(ctx)} of {describe_context(ctx)} opens to {n} "
                f"bytes, not {DATA_KEY_BYTES}: the object's metadata was altered")
        return plaintext

    def rewrap(self, layer: Layer, wrapped: WrappedKey, old_ctx: dict[str, str],
               new_ctx: dict[str, str], new_key_id: str | None = None) -> WrappedKey:
        self._refuse_if_read_only()
        layer = Layer(layer)
        old_ctx = check_context(old_ctx)
        new_ctx = check_context(new_ctx)
        self._require_trusted(wrapped.key_id, layer, old_ctx)
        if new_key_id is not None:
            dest = parse_kms_key_id(new_key_id, what="destination KMS key id")
            if dest.is_arn and dest.region != self.region:
                raise ConfigError(f"KMS key {dest.raw} is in region {dest.region} but the KMS "
                                  f"client uses region {self.region}: re-wrap to a key in "
                                  f"{self.region}")
            dest_id = dest.raw
        else:
            dest_id = wrapped.key_id or self._ids[layer].raw
        self._check_destination(dest_id, layer, new_ctx)
        self._stats.add("rewrap")
        resp = self._call("ReEncrypt", dict(
            CiphertextBlob=wrapped.blob, SourceEncryptionContext=old_ctx,
            SourceKeyId=wrapped.key_id, DestinationKeyId=dest_id,
            DestinationEncryptionContext=new_ctx),
            key=wrapped.key_id, dest=dest_id, layer=layer, ctx=old_ctx)
        blob = resp.get("CiphertextBlob")
        arn = resp.get("KeyId")
        source = resp.get("SourceKeyId")
        if not isinstance(blob, bytes) or not blob or not isinstance(arn, str) \
                or not METADATA_KEY_ID_RE.fullmatch(arn) or not isinstance(source, str) \
                or not METADATA_KEY_ID_RE.fullmatch(source):
            raise KeyProviderError(f"KMS ReEncrypt to {dest_id} returned a malformed answer: "
                                   "check AWS_ENDPOINT_URL_KMS points at AWS KMS", errno=_errno.EIO)
        try:
            self._require_decrypted_by_trusted(source, wrapped.key_id, layer, old_ctx)
            self._check_destination(arn, layer, new_ctx)
        except KeyProviderError:
            self._stats.add("errors")
            raise
        with self._lock:
            self._sets[layer].arns.add(arn)  # chosen by the caller, so trusted for reading back
        return WrappedKey(blob=blob, key_id=arn)

    @property
    def split_custody(self) -> bool:
        """Whether the outer layer has its own KMS key (and its own trusted set)."""
        return self._split

    def trusted_description(self, layer: Layer) -> str:
        """The KMS keys configured as trusted for ``layer``, e.g. ``KMS key arn:... (inner layer
        only)``; keys learnt at run time (resolved aliases, re-wrap destinations) are left out."""
        layer = Layer(layer)
        refs = self._sets[layer].refs
        which = f"{layer.value} layer only" if self._split else "both layers"
        return (f"KMS key{'s' if len(refs) > 1 else ''} {', '.join(r.raw for r in refs)} "
                f"({which})")

    def describe(self) -> list[KmsKeyStatus]:
        """``DescribeKey`` for each configured key; raises only if a key cannot be described."""
        out: list[KmsKeyStatus] = []
        by_id: dict[str, list[str]] = {}
        for layer, ref in self._ids.items():
            by_id.setdefault(ref.raw, []).append(layer.value)
        for kid, layers in by_id.items():
            self._stats.add("describe")
            meta = self._call("DescribeKey", dict(KeyId=kid), key=kid)["KeyMetadata"]
            arn = meta.get("Arn", kid)
            with self._lock:
                for layer in layers:
                    self._sets[Layer(layer)].arns.add(arn)
            out.append(KmsKeyStatus(
                layers=tuple(layers), key_id=kid, arn=arn, state=meta.get("KeyState", "Unknown"),
                key_spec=meta.get("KeySpec") or meta.get("CustomerMasterKeySpec"),
                key_usage=meta.get("KeyUsage"), region=self.region))
        return out

    def check(self) -> list[KmsKeyStatus]:
        """Verify at mount time that each configured key exists, is enabled and can wrap keys."""
        statuses = self.describe()
        if self._split and len({st.arn for st in statuses}) < len(statuses):
            raise self._same_key_error(statuses[0].arn)
        for st in statuses:
            if st.state == "Disabled":
                raise KeyUnavailable(f"KMS key {st.key_id} is disabled: enable it "
                                     f"(aws kms enable-key --key-id {st.arn})")
            if st.state == "PendingDeletion":
                raise KeyUnavailable(f"KMS key {st.key_id} is pending deletion: cancel it and "
                                     f"enable it (aws kms cancel-key-deletion --key-id {st.arn})")
            if st.state != "Enabled":
                raise KeyUnavailable(f"KMS key {st.key_id} is in state {st.state}, not Enabled: "
                                     "wait for it or fix it in KMS")
            if not st.usable:
                raise KeyProviderError(
                    f"KMS key {st.key_id} ({st.key_spec}, {st.key_usage}) cannot wrap data keys: "
                    "use a symmetric encryption key", errno=_errno.EINVAL)
        return statuses

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # pragma: no cover - closing is best effort
            pass

    def __repr__(self) -> str:
        outer = self._ids[Layer.OUTER].raw
        return (f"AwsKmsProvider(inner={self._ids[Layer.INNER].raw!r}, outer={outer!r}, "
                f"region={self.region!r}, endpoint={self.endpoint_url!r})")

    # ---------------------------------------------------------------------------- trust

    def _option(self, layer: Layer) -> str:
        """The option that adds a key to ``layer``'s trusted set."""
        if self._split and layer is Layer.OUTER:
            return "--kms-allowed-key-ids-outer"
        return "--kms-allowed-key-ids"

    def _how(self, layer: Layer, key: str) -> str:
        """How to trust ``key`` for ``layer``: the flag, and what the trust hint adds."""
        option = self._option(layer)
        text = f"{option} {key}"
        if self._trust_hint is not None:
            text += self._trust_hint(option, key)
        return text

    def _split_text(self) -> str:
        return (f"split custody: inner {self._ids[Layer.INNER].raw}, "
                f"outer {self._ids[Layer.OUTER].raw}")

    def _same_key_error(self, arn: str) -> ConfigError:
        return ConfigError(
            f"the inner KMS key {self._ids[Layer.INNER].raw} and the outer KMS key "
            f"{self._ids[Layer.OUTER].raw} both name KMS key {arn}, but split custody needs two "
            "different keys: point --kms-key-id-outer at another key, or drop it to use one key "
            "for both layers")

    def _ambiguous_error(self, arn: str, layer: Layer, ctx: Mapping[str, str]) -> KeyAccessDenied:
        return KeyAccessDenied(
            f"KMS key {one_line(arn, 300)} of the {layer.value} {key_noun(ctx)} of "
            f"{describe_context(ctx)} is trusted for both layers, through an alias or an allowed "
            f"key id ({self._split_text()}): refusing it; give each layer its own keys "
            "(--kms-allowed-key-ids / --kms-allowed-key-ids-outer)")

    def _require_trusted(self, key_id: str, layer: Layer, ctx: Mapping[str, str]) -> None:
        """Before KMS is called: ``key_id`` (named by the object) must be trusted for ``layer``."""
        where = describe_context(ctx)
        shown = one_line(key_id if isinstance(key_id, str) else repr(key_id), 300)
        what = f"{layer.value} {key_noun(ctx)} of {where} is wrapped by KMS key {shown}"
        other = _other(layer)

        def untrusted() -> KeyAccessDenied:
            if self._split:
                return KeyAccessDenied(
                    f"{what}, which this reader does not trust for the {layer.value} layer: if it "
                    f"is yours, add it with {self._how(layer, shown)} (or {self._option(other)} "
                    f"for the {other.value} layer)")
            return KeyAccessDenied(f"{what}, which this reader does not trust: if it is yours, "
                                   f"add it with {self._how(layer, shown)}")

        self._check_trust(key_id, layer, ctx, what,
                          f"KMS key {one_line(repr(key_id), 300)} of {where}", untrusted)

    def _require_decrypted_by_trusted(self, arn: str, named: str, layer: Layer,
                                      ctx: Mapping[str, str]) -> None:
        """After KMS answered: the key that actually decrypted (``arn``, as KMS reports it) must be
        trusted for ``layer`` too; the object only *named* ``named``."""
        where = describe_context(ctx)
        what = (f"KMS opened the {layer.value} {key_noun(ctx)} of {where} (which names KMS key "
                f"{one_line(named, 300)}) with KMS key {one_line(arn, 300)}")
        self._check_trust(
            arn, layer, ctx, what,
            f"KMS key {one_line(arn, 300)}, which opened the {layer.value} {key_noun(ctx)} of {where},",
            lambda: KeyAccessDenied(f"{what}, which this reader does not trust for the {layer.value} "
                                    f"layer: refusing a possible forgery; if that key is yours, add "
                                    f"it with {self._how(layer, one_line(arn, 300))}"))

    def _check_trust(self, key: str, layer: Layer, ctx: Mapping[str, str], what: str,
                     checking: str, untrusted: Callable[[], KeyAccessDenied]) -> None:
        """Return if ``key`` is trusted for ``layer`` alone; otherwise raise: a key of both
        layers, a key of the other layer (split custody), an alias look-up that failed (named by
        ``checking``), or ``untrusted()``.  The messages start with ``what``."""
        if self._trusted_for(layer, key):
            if self._split and self._known(_other(layer), key):
                raise self._ambiguous_error(key, layer, ctx)
            return
        other = _other(layer)
        if self._split and self._known(other, key):
            raise KeyAccessDenied(f"{what}, which this reader trusts only for the {other.value} "
                                  f"layer ({self._split_text()}): refusing a possible forgery")
        with self._lock:
            failures = list(self._resolve_errors.values())
        if failures:
            err = failures[0]
            raise type(err)(f"cannot check whether {checking} is trusted: {err}", errno=err.errno)
        raise untrusted()

    def _check_destination(self, dest: str, layer: Layer, ctx: Mapping[str, str]) -> None:
        """Under split custody, refuse to re-wrap a layer under a key of the other layer."""
        if not self._split:
            return
        other = _other(layer)
        if self._known(other, dest) and not self._known(layer, dest):
            raise ConfigError(
                f"re-wrapping the {layer.value} {key_noun(ctx)} of {describe_context(ctx)} under "
                f"KMS key {one_line(dest, 300)} would put it under a key trusted only for the "
                f"{other.value} layer ({self._split_text()}): choose a key of the "
                f"{layer.value} layer")

    def _known(self, layer: Layer, key_id: str) -> bool:
        """Whether ``key_id`` is trusted for ``layer`` by what is known now (no KMS call)."""
        if not isinstance(key_id, str):
            return False
        tset = self._sets[layer]
        if key_id in tset.raw:
            return True
        with self._lock:
            if key_id in tset.arns:
                return True
            if any(self._resolved.get(a) == key_id for a in tset.aliases):
                return True
        m = _ARN_RE.fullmatch(key_id)
        if m is None or m.group(4) != "key" or m.group(2) != self.region:
            return False
        # Key ids are assigned by KMS, so a key ARN of our region with that id is that key.
        return m.group(5) in tset.bare

    def _trusted_for(self, layer: Layer, key_id: str) -> bool:
        """Whether ``key_id`` is trusted for ``layer``, looking up aliases (throttled) if need be.

        A configured id as given counts (``Decrypt`` with ``KeyId=<that id>`` and the check of the
        key KMS reports afterwards make KMS prove it); otherwise only key ARNs of the client's
        region can be trusted.
        """
        if not isinstance(key_id, str) or not METADATA_KEY_ID_RE.fullmatch(key_id):
            return False
        if self._known(layer, key_id):
            return True
        m = _ARN_RE.fullmatch(key_id)
        if m is None or m.group(4) != "key" or m.group(2) != self.region:
            return False
        if self._aliases:
            self._resolve_aliases()
            return self._known(layer, key_id)
        return False

    def _resolve_aliases(self) -> None:
        """Look up the current target of each configured alias.

        Concurrent callers wait for one look-up and then see its result.  After a look-up that
        reached KMS, the next one waits 30 s, so objects naming unknown keys cannot turn every
        read into extra KMS calls; a look-up that could not reach KMS may be retried at once.
        """
        with self._resolve_lock:
            if time.monotonic() - self._last_resolve < _RESOLVE_INTERVAL:
                return
            transient = False
            for ref in self._aliases:
                try:
                    self._stats.add("describe")
                    meta = self._call("DescribeKey", dict(KeyId=ref.raw),
                                      key=ref.raw)["KeyMetadata"]
                except KeyProviderError as exc:
                    transient = transient or isinstance(exc, KeyUnavailable)
                    with self._lock:
                        self._resolve_errors[ref.raw] = exc
                    continue
                with self._lock:
                    self._resolve_errors.pop(ref.raw, None)
                    if isinstance(meta.get("Arn"), str):
                        self._resolved[ref.raw] = meta["Arn"]
            if not transient:
                self._last_resolve = time.monotonic()

    # ---------------------------------------------------------------------------- calls

    def _call(self, op: str, params: dict[str, Any], *, key: str, dest: str | None = None,
              layer: Layer | None = None, ctx: Mapping[str, str] | None = None) -> dict:
        """``op`` with ``params``; made again after a transient failure (see the module
        docstring, Retries) until ``retry_budget`` seconds have passed since the first attempt,
        then that failure is raised, mapped (:meth:`_map_error`)."""
        method = getattr(self._client, _SNAKE[op])
        started = time.monotonic()
        attempt = 1
        while True:
            try:
                return method(**params)
            except (bce.ClientError, bce.BotoCoreError) as exc:
                left = self.retry_budget - (time.monotonic() - started)
                if left > 0 and _transient(exc):
                    delay = min(left, retry_delay(attempt))
                    attempt += 1
                    reason = (str((exc.response.get("Error", {}) or {}).get("Code", "error"))
                              if isinstance(exc, bce.ClientError) else type(exc).__name__)
                    log.info("event=kms_retry op=%s key=%s attempt=%d elapsed=%.1fs retry_in=%.1fs "
                             "reason=%s", op, one_line(key, 300), attempt, time.monotonic() - started,
                             delay, one_line(reason, 80))
                    time.sleep(delay)
                    continue
                self._stats.add("errors")
                raise self._map_error(exc, op, key, dest=dest, layer=layer, ctx=ctx) from exc

    def _map_error(self, exc: Exception, op: str, key: str, *, dest: str | None,
                   layer: Layer | None, ctx: Mapping[str, str] | None) -> Exception:
        endpoint = self.endpoint_url
        lay = f"{layer_value(layer)} " if layer is not None else ""
        where = describe_context(ctx) if ctx is not None else "this object"
        if op == "ReEncrypt":
            action = f"kms:ReEncryptFrom on {key} or kms:ReEncryptTo on {dest}"
            subject = f"{key} or {dest}"
        else:
            action = f"kms:{op} on {key}"
            subject = key

        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", "Unknown"))
            aws_msg = one_line(err.get("Message") or "", 160)
            attempts = (exc.response.get("ResponseMetadata", {}) or {}).get("RetryAttempts", 0)
            status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
            if code in ("AccessDeniedException", "AccessDenied", "403") or (
                    status == 403 and code not in _CREDENTIAL_CODES):
                # some endpoints (proxies, emulators) answer a refusal with a bare 403
                return KeyAccessDenied(f"KMS denied {action}: grant it in the key policy or IAM")
            if code in _CREDENTIAL_CODES:
                return KeyAccessDenied(f"KMS rejected the AWS credentials ({code}): refresh them "
                                       "or check AWS_PROFILE / AWS_ACCESS_KEY_ID")
            if code == "NotFoundException":
                return KeyNotFound(f"KMS key {subject} not found in region {self.region}: check "
                                   "the key id or alias and the region (AWS_REGION / --region)")
            if code == "DisabledException":
                return KeyUnavailable(f"KMS key {subject} is disabled: enable it "
                                      "(aws kms enable-key)")
            if code == "KMSInvalidStateException":
                return KeyUnavailable(f"KMS key {subject} is disabled or pending deletion: enable "
                                      "it (aws kms enable-key / aws kms cancel-key-deletion)")
            if code == "KeyUnavailableException":
                return KeyUnavailable(f"KMS key {subject} is unavailable (custom key store "
                                      "disconnected?): reconnect the key store or retry later")
            if code == "InvalidCiphertextException":
                return WrappedKeyMismatch(
                    f"wrapped {lay}data key does not match the encryption context of {where} "
                    "(object copied or renamed outside dssefs?): restore it or copy it with dssefs")
            if code == "IncorrectKeyException":
                return WrappedKeyMismatch(
                    f"wrapped {lay}data key of {where} was not made with KMS key {key} (object "
                    "metadata altered?): restore the object from a trusted copy")
            if code == "InvalidKeyUsageException":
                return KeyProviderError(f"KMS key {subject} cannot wrap data keys: use a "
                                        "symmetric encryption key (SYMMETRIC_DEFAULT, "
                                        "ENCRYPT_DECRYPT)", errno=_errno.EINVAL)
            if code in _THROTTLE_CODES:
                return KeyUnavailable(f"KMS throttled {op} on {subject} after {attempts + 1} "
                                      "attempts: lower the request rate, raise the KMS quota or "
                                      "use adaptive retries")
            if code in _TRANSIENT_CODES:
                return KeyUnavailable(f"KMS failed {op} on {subject} ({code}) after "
                                      f"{attempts + 1} attempts: retry later")
            if code in ("ValidationException", "InvalidArnException",
                        "InvalidGrantTokenException"):
                return KeyProviderError(f"KMS rejected {op} on {subject} ({code}: {aws_msg}): "
                                        "check the key id and encryption context",
                                        errno=_errno.EINVAL)
            return KeyProviderError(f"KMS {op} on {subject} failed ({code}: {aws_msg})",
                                    errno=_errno.EIO)

        if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
            return KeyAccessDenied("no AWS credentials found: set AWS_PROFILE / AWS_ACCESS_KEY_ID "
                                   "or an instance role")
        if isinstance(exc, (bce.CredentialRetrievalError, bce.TokenRetrievalError,
                            bce.SSOError)):
            source = getattr(exc, "kwargs", {}).get("provider") or type(exc).__name__
            return KeyAccessDenied(f"could not load AWS credentials from {source}: refresh them "
                                   "(e.g. aws sso login) or check AWS_PROFILE")
        if isinstance(exc, bce.SSLError):
            reason = tls_reason(exc)
            return KeyUnavailable(f"TLS error talking to KMS at {endpoint}"
                                  f"{f' ({reason})' if reason else ''}: check AWS_CA_BUNDLE and any proxy")
        if isinstance(exc, bce.ReadTimeoutError):
            return KeyUnavailable(f"KMS at {endpoint} did not answer {op} in time: check network "
                                  "/ AWS_ENDPOINT_URL_KMS")
        if isinstance(exc, (bce.EndpointConnectionError, bce.ConnectionError,
                            bce.HTTPClientError)):
            return KeyUnavailable(f"cannot reach KMS at {endpoint}: check network / "
                                  "AWS_ENDPOINT_URL_KMS")
        if isinstance(exc, bce.ParamValidationError):
            return KeyProviderError(f"invalid KMS {op} request: {one_line(exc)}",
                                    errno=_errno.EINVAL)
        return KeyUnavailable(f"KMS {op} on {subject} failed ({type(exc).__name__}): "
                              "retry later or check the AWS configuration")


_SNAKE = {
    "GenerateDataKey": "generate_data_key",
    "Decrypt": "decrypt",
    "ReEncrypt": "re_encrypt",
    "DescribeKey": "describe_key",
}
