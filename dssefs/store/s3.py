"""Amazon S3 (or any S3-compatible service) as an :class:`~dssefs.store.base.ObjectStore`.

Credentials and region come from boto3's standard chain (``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``,
SSO, instance and container roles, ``AWS_REGION``).  The endpoint comes from ``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL`` (boto3 reads them itself); an explicit ``endpoint_url`` wins.

Retries, in two layers:

* botocore retries each request (``standard`` or ``adaptive`` mode, ``max_attempts`` attempts in
  all).  Its retry quota (500 tokens per client, spent by retries and given back only by
  successes) would run dry in a burst of faults and then stop retrying altogether: the clients
  made here get a quota that never runs out (:func:`keep_retrying`).  A body that breaks off
  mid-read is fetched again up to ``max_attempts`` times.
* Above botocore, a request that still fails *transiently* (throttled, 5xx, connection refused,
  reset or timed out, a body broken off: the error's ``transient`` attribute is True) is sent
  again with capped exponential back-off and jitter until ``retry_budget`` seconds (default 60)
  have passed since its first attempt; only then is the error raised.  Refusals are never
  retried there: a 412 / 409 / ``NoSuchUpload`` answering the retry of a write whose earlier
  attempt was applied reaches the caller unchanged (the Vault reads the key back to tell its
  own version from another writer's).

Conditional writes use S3's ``If-Match`` / ``If-None-Match`` on PutObject, CopyObject and
CompleteMultipartUpload.  For copies and completions, where some S3-compatible services ignore
these headers, the condition is also checked with a HEAD first, so a stale write is refused there
too (the server-side check closes the remaining race where it is supported).  Every copy pins the source with
``CopySourceIfMatch`` to the ETag it inspected, so a copy never mixes two source versions.
Objects larger than 5 GiB are copied with UploadPartCopy.

Note that S3 computes the ETag of a single-part, unencrypted or SSE-S3 object as the MD5 of its
body: a copy that only replaces metadata keeps the ETag.

Error mapping (every message is one line naming the problem and the fix; never a URL with a
signature, never credentials)
---------------------------------------------------------------------------------------------
=====================================================  =============================================
botocore                                               dssefs
=====================================================  =============================================
NoSuchKey, 404 on an object                            ObjectNotFound
NoSuchBucket, 404 on HeadBucket                        StoreUnavailable ("bucket ... does not exist")
AccessDenied, 403, AllAccessDisabled                   StoreAccessDenied (names the IAM action)
InvalidAccessKeyId, SignatureDoesNotMatch, ExpiredToken StoreAccessDenied (credentials rejected)
NoCredentialsError, PartialCredentialsError, SSO       StoreAccessDenied ("no AWS credentials found")
PreconditionFailed (412), ConditionalRequestConflict   PreconditionFailed
  (409), NoSuchKey on a write with ``if_match``
EndpointConnectionError, timeouts, TLS, broken bodies  StoreUnavailable ("cannot reach S3 endpoint")
SlowDown, 500/503 after retries                        StoreUnavailable (throttled / unavailable)
EntityTooLarge, quota exceeded, 507                    StoreFull
MetadataTooLarge                                       MetadataBudgetError
PermanentRedirect, AuthorizationHeaderMalformed        ConfigError (bucket is in another region)
InvalidBucketName, ProfileNotFound, bad endpoint URL   ConfigError
KeyTooLongError                                        StoreError (``ENAMETOOLONG``)
anything else                                          StoreError (code, HTTP status, S3's message)
=====================================================  =============================================
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno as _errno
import logging
import math
import re
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.config
import botocore.exceptions as bce
from botocore.utils import determine_content_length

from .. import __version__
from ..retrying import (DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_BUDGET, is_transient, keep_retrying,  # noqa: F401
                        retry_budget_for, retry_delay, tls_reason, transient, transient_tls_error)
from ..errors import (ConfigError, MetadataBudgetError, ObjectNotFound, PreconditionFailed,
                      StoreAccessDenied, StoreError, StoreFull, StoreUnavailable)
from ._common import (MAX_PARTS, check_conditions, check_key, check_part_number, check_parts,
                      check_range, normalize_metadata, one_line, strip_etag)
from .base import DELETE_MANY_MAX, MIN_PART_SIZE, ObjectInfo, ObjectStore, PendingUpload, Upload

__all__ = ["S3Store", "S3Upload", "MAX_COPY_OBJECT_SIZE", "RETRY_MODES", "DEFAULT_RETRY_BUDGET",
           "DEFAULT_MAX_ATTEMPTS", "is_transient", "keep_retrying", "retry_budget_for", "retry_delay",
           "transient_tls_error"]

log = logging.getLogger(__name__)

#: CopyObject refuses sources larger than this; bigger objects are copied part by part.
MAX_COPY_OBJECT_SIZE = 5 * 1024**3
#: S3's largest part.
MAX_PART_SIZE = 5 * 1024**3
DEFAULT_COPY_PART_SIZE = 512 * 1024**2
RETRY_MODES = ("standard", "adaptive", "legacy")
CONTENT_TYPE = "application/octet-stream"

_T = TypeVar("_T")

#: Characters an XML request body cannot carry unchanged (see :meth:`S3Store.delete_many`).
_XML_UNSAFE = re.compile(r"[\x00-\x1f\x7f\ufffe\uffff]")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIABLE_RANGE_RE = re.compile(r"^bytes \*/(\d+)$")

_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})
_PRECONDITION = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled",
                     "AccountProblem", "InvalidPayer", "RequestTimeTooSkewed"})
_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                          "TokenRefreshRequired", "InvalidToken", "InvalidSecurity",
                          "MissingSecurityHeader", "CredentialsNotSupported",
                          "InvalidClientTokenId", "UnrecognizedClientException"})
_FULL = frozenset({"EntityTooLarge", "QuotaExceeded", "ServiceQuotaExceeded",
                   "XMinioStorageFull", "StorageFull", "InsufficientStorage", "507",
                   "TooManyBuckets", "MaxMessageLengthExceeded"})
_THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
                        "RequestLimitExceeded", "503", "ServiceUnavailable", "InternalError",
                        "500", "502", "504", "RequestTimeout", "OperationAborted"})
_REGION = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "301",
                     "IllegalLocationConstraintException", "TemporaryRedirect"})

#: The IAM action(s) each operation needs, for AccessDenied messages.
_ACTIONS = {
    "head": "s3:GetObject",
    "get": "s3:GetObject",
    "put": "s3:PutObject",
    "upload": "s3:PutObject",
    "complete": "s3:PutObject",
    "copy": "s3:GetObject on the source and s3:PutObject on the destination",
    "delete": "s3:DeleteObject",
    "list": "s3:ListBucket",
    "list_uploads": "s3:ListBucketMultipartUploads",
    "check": "s3:ListBucket",
    "abort": "s3:AbortMultipartUpload",
}

_UNREACHABLE = (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ProxyConnectionError,
                bce.ConnectionClosedError, bce.ReadTimeoutError, bce.ResponseStreamingError,
                bce.IncompleteReadError, bce.HTTPClientError)
_NO_CREDENTIALS = (bce.NoCredentialsError, bce.PartialCredentialsError,
                   bce.CredentialRetrievalError)
_SSO = tuple(getattr(bce, name) for name in ("SSOTokenLoadError", "UnauthorizedSSOTokenError",
                                             "SSOError", "TokenRetrievalError")
             if hasattr(bce, name))
#: Failures while streaming a response body: the GET is repeated.
_BODY_ERRORS = (bce.ResponseStreamingError, bce.IncompleteReadError, bce.ReadTimeoutError,
                bce.ConnectionClosedError) + tuple(
    getattr(bce, name) for name in ("FlexibleChecksumError",) if hasattr(bce, name))


def _safe_endpoint(url: str | None) -> str:
    """The endpoint URL without user info, query or fragment (nothing secret can leak)."""
    if not url:
        return "(default AWS endpoint)"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "(unparsable endpoint URL)"


def _check_endpoint(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise ConfigError("invalid S3 endpoint URL: use http(s)://HOST[:PORT]") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"invalid S3 endpoint URL {_safe_endpoint(url)!r}: use "
                          "http(s)://HOST[:PORT]")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("the S3 endpoint URL must not carry credentials: use the AWS credential "
                          "chain (AWS_PROFILE, AWS_ACCESS_KEY_ID...)")
    if parts.query or parts.fragment:
        raise ConfigError(f"the S3 endpoint URL {_safe_endpoint(url)!r} must not have a query or "
                          "fragment")


# ---- retries ------------------------------------------------------------------------------------

#: Bodies up to this size are sent without ``Expect: 100-continue`` (see below).
CONTINUE_MIN_BODY = 1 << 20


def _no_continue_for_small_bodies(params: dict, **_kwargs: Any) -> None:
    """botocore asks for ``Expect: 100-continue`` on every upload whose body it streams (every
    PutObject and UploadPart with checksums): the request's headers go first and its body only
    after the server's ``100 Continue``, one more round trip (20 ms per PUT at 20 ms latency, a
    third of a small file's close).  Small bodies are sent with their headers at once; large ones
    keep waiting, so that a refused request (412, 403) does not make us send megabytes first."""
    headers = params.get("headers") or {}
    if "Expect" not in headers:
        return
    body = params.get("body")
    try:
        size = len(body) if isinstance(body, (bytes, bytearray, memoryview)) else determine_content_length(body)
    except Exception:  # noqa: BLE001 - unknown size: keep botocore's header
        return
    if size is not None and size <= CONTINUE_MIN_BODY:
        del headers["Expect"]


class S3Store(ObjectStore):
    """One S3 bucket.  Thread-safe: one botocore client shared by all threads."""

    supports_conditional_writes = True
    #: its small PUTs may be sent by a helper process in write-back mode (store/helper.py)
    supports_upload_helper = True

    def __init__(self, bucket: str, *, region: str | None = None, profile: str | None = None,
                 endpoint_url: str | None = None, path_style: bool = False,
                 retries_mode: str = "standard", max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 retry_budget: float | None = None,
                 max_pool_connections: int = 32, session: Any = None,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 list_page_size: int = 1000,
                 multipart_copy_threshold: int = MAX_COPY_OBJECT_SIZE,
                 copy_part_size: int = DEFAULT_COPY_PART_SIZE, copy_concurrency: int = 8):
        """Open ``bucket``; no request is made until the first operation (see :meth:`check`).

        ``region`` / ``profile``: passed to ``boto3.Session`` (ignored when ``session`` is given).
        ``endpoint_url``: overrides ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; must be
        ``http(s)://HOST[:PORT][/PATH]`` without credentials.  ``path_style``: address buckets as
        ``ENDPOINT/BUCKET/KEY`` (most S3-compatible services need this).  ``retries_mode`` /
        ``max_attempts``: botocore retries, counting every attempt (its retry quota never runs
        out).  ``retry_budget``: seconds a request failing transiently is sent again above
        botocore, from its first attempt (see the module docstring; 0: never); unset, 60 unless
        ``max_attempts`` is below the default 5 (then 0: a lowered ``max_attempts`` asks for
        quick failures).  ``list_page_size``: keys per ListObjectsV2 page.
        ``multipart_copy_threshold`` / ``copy_part_size`` / ``copy_concurrency``: copies of
        larger sources go through UploadPartCopy in parts of that size, that many at a time.
        """
        if not isinstance(bucket, str) or not bucket or "/" in bucket or bucket != bucket.strip():
            raise ConfigError(f"invalid bucket name {bucket!r}: use s3://BUCKET/KEY")
        if retries_mode not in RETRY_MODES:
            raise ConfigError(f"unknown retry mode {retries_mode!r}: use one of "
                              f"{', '.join(RETRY_MODES)}")
        if not isinstance(max_attempts, int) or not 1 <= max_attempts <= 50:
            raise ConfigError(f"S3 max attempts {max_attempts!r} is out of range: use 1..50")
        self.retry_budget = retry_budget_for(retry_budget, max_attempts)
        if not 1 <= list_page_size <= 1000:
            raise ConfigError("list_page_size must be 1..1000")
        if not MIN_PART_SIZE <= copy_part_size <= MAX_PART_SIZE:
            raise ConfigError(f"copy_part_size must be {MIN_PART_SIZE}..{MAX_PART_SIZE} bytes")
        if not 0 < multipart_copy_threshold <= MAX_COPY_OBJECT_SIZE:
            raise ConfigError(f"multipart_copy_threshold must be 1..{MAX_COPY_OBJECT_SIZE}")
        if endpoint_url is not None:
            _check_endpoint(endpoint_url)
        self.bucket = bucket
        self.context_name = bucket
        self.url = f"s3://{bucket}"
        self.max_attempts = max_attempts
        self.list_page_size = list_page_size
        self.multipart_copy_threshold = multipart_copy_threshold
        self.copy_part_size = copy_part_size
        self.copy_concurrency = max(1, copy_concurrency)
        self._local = threading.local()  # .retrying: inside a request's retry loop (no nesting)
        try:
            self._session = session or boto3.Session(profile_name=profile, region_name=region)
        except bce.ProfileNotFound:
            raise ConfigError(f"AWS profile {profile!r} not found: check ~/.aws/config or the "
                              "profile option") from None
        s3_options: dict[str, Any] = {"addressing_style": "path"} if path_style else {}
        #: uploads carry a CRC32 header computed here (or by the caller while sealing) instead
        #: of botocore's SHA-256 signature of the body plus its own CRC32 (see _own_checksums)
        self.own_checksums = _own_checksums(self._session)
        if self.own_checksums:
            s3_options["payload_signing_enabled"] = False
        config = botocore.config.Config(
            region_name=region,
            retries={"mode": retries_mode, "total_max_attempts": max_attempts},
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3=s3_options or None,
            user_agent_extra=f"dssefs/{__version__}",
        )
        try:
            self._client = self._session.client("s3", endpoint_url=endpoint_url, config=config)
        except bce.ProfileNotFound:
            raise ConfigError(f"AWS profile {profile!r} not found: check ~/.aws/config or the "
                              "profile option") from None
        except ValueError as e:  # botocore: "Invalid endpoint: ..."
            raise ConfigError(f"invalid S3 endpoint URL {_safe_endpoint(endpoint_url)!r}: "
                              f"{one_line(e)}") from None
        except bce.BotoCoreError as e:
            raise ConfigError(f"cannot configure the S3 client: {one_line(e)}") from None
        keep_retrying(self._client, max_attempts)
        self._client.meta.events.register_last("before-call.s3", _no_continue_for_small_bodies)
        self.endpoint = _safe_endpoint(self._client.meta.endpoint_url)

    # ------------------------------------------------------------------------------------------
    # Public operations

    def check(self) -> None:
        """Verify at mount time that the bucket exists and these credentials may list it.  Only
        botocore's attempts, not the retry budget: an unreachable store or a wrong endpoint is
        reported within seconds, not after a minute."""
        with self._errors("check", None):
            self._client.head_bucket(Bucket=self.bucket)

    def head(self, key: str, *, prefix: int = 0) -> ObjectInfo:
        check_key(key)
        if prefix > 0:
            # one ranged GET answers both: metadata, ETag, total size and the first bytes
            data, total, r = self._ranged_get(key, 0, prefix, None)
            if r is not None:
                info = self._info(key, r, metadata=True)
                return dataclasses.replace(info, size=total, prefix=data)
            # an empty object: nothing to range over
        r = self._request("head", key, self._client.head_object, Bucket=self.bucket, Key=key)
        info = self._info(key, r, metadata=True)
        return dataclasses.replace(info, prefix=b"") if prefix > 0 and info.size == 0 else info

    def get_range(self, key: str, start: int, length: int, *, if_match: str | None = None
                  ) -> tuple[bytes, int]:
        check_key(key)
        check_range(start, length)
        if length == 0:
            return b"", self._head_size(key, if_match)
        data, total, _r = self._ranged_get(key, start, length, if_match)
        return data, total

    def _ranged_get(self, key: str, start: int, length: int, if_match: str | None
                    ) -> tuple[bytes, int, dict | None]:
        """``(data, total_size, reply)``; the reply is None when the range starts at or after the
        end of the object (HTTP 416)."""
        return self._retrying("get", key, lambda: self._ranged_get_once(key, start, length, if_match))

    def _ranged_get_once(self, key: str, start: int, length: int, if_match: str | None
                         ) -> tuple[bytes, int, dict | None]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key,
                                  "Range": f"bytes={start}-{start + length - 1}"}
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        for attempt in range(1, self.max_attempts + 1):
            with self._errors("get", key):
                try:
                    r = self._client.get_object(**kwargs)
                except bce.ClientError as e:
                    total = self._unsatisfiable_total(e)
                    if total is None:
                        raise
                    # The range starts at or after the end (or the object is empty).
                    return b"", total if total >= 0 else self._head_size(key, if_match), None
            body = r["Body"]
            try:
                data = body.read()
                break
            except _BODY_ERRORS as e:
                # botocore retries requests, not bodies that break off mid-stream.
                if attempt >= self.max_attempts:
                    raise transient(StoreUnavailable(
                        f"lost the connection to S3 endpoint {self.endpoint} while reading "
                        f"{self._where(key)}: check network, or retry")) from e
                log.debug("event=body_read_retry object=%s attempt=%d", self._where(key), attempt)
            except bce.BotoCoreError as e:
                raise StoreError(f"S3 get {self._where(key)} failed while reading the body: "
                                 f"{type(e).__name__}") from e
            finally:
                body.close()
        data, total = self._check_range_reply(key, start, length, r, data)
        return data, total, r

    def put(self, key: str, body: bytes | memoryview, metadata: dict[str, str], *,
            if_match: str | None = None, if_none_match: bool = False, crc32: int | None = None) -> str:
        check_key(key)
        metadata = normalize_metadata(metadata)
        check_conditions(if_match, if_none_match)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": _sendable(body),
                                  "Metadata": metadata, "ContentType": CONTENT_TYPE,
                                  **self._checksum(body, crc32)}
        kwargs.update(_conditions(if_match, if_none_match))
        r = self._request("put", key, self._client.put_object, conditional=if_match is not None,
                          **kwargs)
        return r["ETag"]

    def begin_upload(self, key: str, metadata: dict[str, str], *,
                     if_match: str | None = None, if_none_match: bool = False,
                     size_hint: int | None = None) -> "S3Upload":
        check_key(key)
        metadata = normalize_metadata(metadata)
        check_conditions(if_match, if_none_match)
        r = self._request("upload", key, self._client.create_multipart_upload, Bucket=self.bucket,
                          Key=key, Metadata=metadata, ContentType=CONTENT_TYPE)
        return S3Upload(self, key, r["UploadId"], if_match=if_match, if_none_match=if_none_match)

    def copy(self, src: str, dst: str, metadata: dict[str, str], *,
             if_match: str | None = None, if_none_match: bool = False) -> str:
        check_key(src)
        check_key(dst)
        metadata = normalize_metadata(metadata)
        check_conditions(if_match, if_none_match)
        source = self.head(src)
        if src == dst:
            if if_none_match:
                raise self._precondition(dst, "already exists")
            if if_match is not None and strip_etag(source.etag) != strip_etag(if_match):
                raise self._precondition(src, "changed by another writer")
        elif if_match is not None or if_none_match:
            try:
                current = self.head(dst)
            except ObjectNotFound:
                current = None
            if if_none_match and current is not None:
                raise self._precondition(dst, "already exists")
            if if_match is not None and (current is None
                                         or strip_etag(current.etag) != strip_etag(if_match)):
                raise self._precondition(dst, "changed by another writer")
        if source.size > self.multipart_copy_threshold:
            return self._multipart_copy(source, dst, metadata, if_match, if_none_match)
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket, "Key": dst,
            "CopySource": {"Bucket": self.bucket, "Key": src},
            "CopySourceIfMatch": source.etag,
            "MetadataDirective": "REPLACE", "Metadata": metadata, "ContentType": CONTENT_TYPE,
        }
        kwargs.update(_conditions(if_match, if_none_match))

        def once() -> dict:
            with self._copy_errors(src, dst, if_match):
                return self._client.copy_object(**kwargs)

        return self._retrying("copy", dst, once)["CopyObjectResult"]["ETag"]

    def delete(self, key: str) -> None:
        check_key(key)
        try:
            self._request("delete", key, self._client.delete_object, Bucket=self.bucket, Key=key)
        except ObjectNotFound:
            pass

    def delete_many(self, keys) -> list[tuple[str, StoreError]]:
        """DeleteObjects, up to 1000 keys per request (quiet mode: S3 answers only the keys it
        could not delete).  A key that XML cannot carry exactly (control characters: an XML
        parser would read a CR as a LF and delete another key) is deleted on its own."""
        failures: list[tuple[str, StoreError]] = []
        batch: list[str] = []
        for key in keys:
            try:
                check_key(key)
            except StoreError as e:
                failures.append((key, e))
                continue
            if _XML_UNSAFE.search(key):
                try:
                    self.delete(key)
                except StoreError as e:
                    failures.append((key, e))
                continue
            batch.append(key)
        for start in range(0, len(batch), DELETE_MANY_MAX):
            failures.extend(self._delete_objects(batch[start:start + DELETE_MANY_MAX]))
        return failures

    def _delete_objects(self, keys: list[str]) -> list[tuple[str, StoreError]]:
        try:
            r = self._request("delete", keys[0] if len(keys) == 1 else None,
                              self._client.delete_objects, Bucket=self.bucket,
                              Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
        except StoreError as e:
            return [(k, e) for k in keys]
        failures = []
        for err in r.get("Errors") or ():
            key, code = err.get("Key"), str(err.get("Code") or "")
            if key is None or code in _NOT_FOUND:
                continue  # already gone: deleted
            reply = bce.ClientError({"Error": {"Code": code, "Message": err.get("Message", "")},
                                     "ResponseMetadata": {}}, "DeleteObjects")
            failures.append((key, self._client_error(reply, "delete", key)))
        return failures

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | str]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix,
                                  "MaxKeys": self.list_page_size}
        if delimiter is not None:
            if not delimiter:
                raise ValueError("delimiter must be None or a non-empty string")
            kwargs["Delimiter"] = delimiter
        last_prefix = None
        for page in self._pages("list", prefix, self._client.list_objects_v2, kwargs,
                                (("ContinuationToken", "NextContinuationToken"),)):
            objects = [self._info(o["Key"], o, metadata=False) for o in page.get("Contents", ())]
            prefixes = [p["Prefix"] for p in page.get("CommonPrefixes", ())]
            objects.sort(key=lambda o: o.key)
            prefixes.sort()
            # S3 pages cover consecutive key ranges; within a page merge both kinds by key.
            i = j = 0
            while i < len(objects) or j < len(prefixes):
                if j >= len(prefixes) or (i < len(objects) and objects[i].key < prefixes[j]):
                    yield objects[i]
                    i += 1
                else:
                    p = prefixes[j]
                    j += 1
                    if p != last_prefix:  # never repeat a prefix split across pages
                        last_prefix = p
                        yield p

    def list_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        """ListMultipartUploads, every page (``list_page_size`` uploads each)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix,
                                  "MaxUploads": self.list_page_size}
        for page in self._pages("list_uploads", prefix, self._client.list_multipart_uploads, kwargs,
                                (("KeyMarker", "NextKeyMarker"), ("UploadIdMarker", "NextUploadIdMarker"))):
            for u in page.get("Uploads", ()):
                initiated = u.get("Initiated")
                # without a time (never seen from S3) the upload counts as just begun
                yield PendingUpload(u["Key"], u["UploadId"],
                                    initiated.timestamp() if initiated is not None else time.time())

    def abort_upload(self, key: str, upload_id: str) -> None:
        check_key(key)
        if not isinstance(upload_id, str) or not upload_id:
            raise ValueError("upload_id must be a non-empty string")

        def once() -> None:
            with self._errors("abort", key):
                try:
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except bce.ClientError as e:
                    code = str((e.response.get("Error") or {}).get("Code") or "")
                    status = (e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
                    if code != "NoSuchUpload" and not (status == 404 and code in ("", "404", "NotFound")):
                        raise
                    # completed or aborted meanwhile (or a retried abort whose first attempt worked)

        self._retrying("abort", key, once)

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, endpoint={self.endpoint!r})"

    # ------------------------------------------------------------------------------------------
    # Helpers

    def _checksum(self, body: bytes | memoryview, crc32: int | None) -> dict[str, str]:
        """The upload's ``ChecksumCRC32`` parameter: ``crc32`` when the caller computed it, else
        computed here (zlib releases the GIL); nothing when botocore is left to its own checks."""
        if not self.own_checksums:
            return {}
        if crc32 is None:
            crc32 = zlib.crc32(body)
        return {"ChecksumCRC32": base64.b64encode(crc32.to_bytes(4, "big")).decode("ascii")}

    def _request(self, op: str, key: str | None, method: Callable[..., dict], *,
                 conditional: bool = False, **kwargs: Any) -> dict:
        """``method(**kwargs)`` (a botocore client call) with its errors mapped (see
        :meth:`_errors`), sent again after a transient failure (see :meth:`_retrying`)."""
        body = kwargs.get("Body")

        def once() -> dict:
            if isinstance(body, _ViewBody):
                body.seek(0)  # sent again from its start (botocore rewinds only its own retries)
            with self._errors(op, key, conditional=conditional):
                return method(**kwargs)
        return self._retrying(op, key, once)

    def _retrying(self, op: str, key: str | None, once: Callable[[], _T]) -> _T:
        """``once()``, again after each transient failure (:func:`is_transient`) with capped
        exponential back-off and jitter, until ``retry_budget`` seconds have passed since the
        first attempt; then that failure is raised.  Every other error is raised at once, as it
        is: a refused condition answering a retried write is the caller's to judge.  A call made
        inside another's retries (a HEAD while reading a range) is not retried on its own."""
        if self.retry_budget <= 0 or getattr(self._local, "retrying", False):
            return once()
        self._local.retrying = True
        try:
            started = time.monotonic()
            attempt = 1
            while True:
                try:
                    return once()
                except StoreError as e:
                    left = self.retry_budget - (time.monotonic() - started)
                    if not is_transient(e) or left <= 0:
                        raise
                    delay = min(left, retry_delay(attempt))
                    attempt += 1
                    log.info("event=store_retry op=%s object=%s attempt=%d elapsed=%.1fs retry_in=%.1fs "
                             "reason=%s", op, self._where(key), attempt, time.monotonic() - started, delay,
                             one_line(e, 200))
                    time.sleep(delay)
        finally:
            self._local.retrying = False

    def _pages(self, op: str, prefix: str, method: Callable[..., dict], kwargs: dict[str, Any],
               tokens: tuple[tuple[str, str], ...]) -> Iterator[dict]:
        """Every page of a listing, each fetched with :meth:`_request` (so a fault retries that
        page, not the listing); ``tokens``: (request parameter, reply field) pairs that continue
        a truncated page."""
        kwargs = dict(kwargs)
        while True:
            page = self._request(op, prefix or None, method, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            following = {param: page.get(field) for param, field in tokens if page.get(field)}
            if not following or all(kwargs.get(k) == v for k, v in following.items()):
                raise StoreError(f"S3 {op} {self._where(prefix or None)} failed: a truncated page "
                                 "without a new continuation token (a broken S3-compatible service?)")
            kwargs.update(following)

    def _info(self, key: str, r: dict, *, metadata: bool) -> ObjectInfo:
        size = r.get("ContentLength", r.get("Size", 0))
        lm = r.get("LastModified")
        return ObjectInfo(key=key, size=int(size), etag=r.get("ETag", ""),
                          mtime=lm.timestamp() if lm is not None else 0.0,
                          metadata=dict(r.get("Metadata", {})) if metadata else {})

    def _head_size(self, key: str, if_match: str | None) -> int:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        return int(self._request("head", key, self._client.head_object, **kwargs)["ContentLength"])

    @staticmethod
    def _unsatisfiable_total(e: bce.ClientError) -> int | None:
        """For a 416 reply: the object's size (-1 if the reply does not say); else None."""
        err = e.response.get("Error", {})
        meta = e.response.get("ResponseMetadata", {})
        if err.get("Code") != "InvalidRange" and meta.get("HTTPStatusCode") != 416:
            return None
        size = err.get("ActualObjectSize")
        if size is not None and str(size).isdigit():
            return int(size)
        m = _UNSATISFIABLE_RANGE_RE.match(meta.get("HTTPHeaders", {}).get("content-range", ""))
        return int(m.group(1)) if m else -1

    def _check_range_reply(self, key: str, start: int, length: int, r: dict, data: bytes
                           ) -> tuple[bytes, int]:
        content_range = r.get("ContentRange")
        if content_range:
            m = _CONTENT_RANGE_RE.match(content_range.strip())
            if not m or int(m.group(1)) != start:
                raise StoreError(f"s3://{self.bucket}/{key}: unexpected Content-Range "
                                 f"{one_line(content_range, 60)!r} for a read at {start}")
            if m.group(3) == "*":
                total = self._head_size(key, r.get("ETag"))
            else:
                total = int(m.group(3))
        else:
            # The service ignored Range and sent the whole object (allowed by HTTP).
            total = len(data)
            data = data[start:start + length]
        expected = max(0, min(length, total - start))
        if len(data) != expected:
            raise transient(StoreUnavailable(f"s3://{self.bucket}/{key}: S3 returned {len(data)} bytes "
                                              f"for a {expected}-byte range: retry"))
        return data, total

    def _precondition(self, key: str, what: str) -> PreconditionFailed:
        return PreconditionFailed(f"s3://{self.bucket}/{key}: {what} (precondition failed): "
                                  "re-read and retry")

    @contextlib.contextmanager
    def _errors(self, op: str, key: str | None, *, conditional: bool = False):
        try:
            yield
        except bce.ClientError as e:
            raise self._client_error(e, op, key, conditional=conditional) from e
        except _NO_CREDENTIALS as e:
            raise StoreAccessDenied(
                "no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or run 'aws sso login'") from e
        except _SSO as e:
            raise StoreAccessDenied("the AWS SSO session is missing or expired: run "
                                    "'aws sso login'") from e
        except bce.ProfileNotFound as e:
            raise ConfigError(f"AWS profile not found ({one_line(e)}): check ~/.aws/config") from e
        except bce.SSLError as e:
            reason = tls_reason(e)
            err = StoreUnavailable(f"TLS error talking to S3 endpoint {self.endpoint}"
                                   f"{f' ({reason})' if reason else ''}: check the endpoint URL and "
                                   "AWS_CA_BUNDLE")
            raise (transient(err) if transient_tls_error(e) else err) from e
        except (bce.ConnectTimeoutError, bce.ReadTimeoutError) as e:
            raise transient(StoreUnavailable(f"S3 endpoint {self.endpoint} timed out: check network / "
                                              "AWS_ENDPOINT_URL, or retry")) from e
        except _UNREACHABLE as e:
            raise transient(StoreUnavailable(f"cannot reach S3 endpoint {self.endpoint}: check "
                                              "network / AWS_ENDPOINT_URL")) from e
        except bce.ParamValidationError as e:
            raise StoreError(f"invalid S3 request for {self._where(key)}: {one_line(e)}",
                             errno=_errno.EINVAL) from e
        except bce.EndpointResolutionError as e:
            # The message would echo the configured endpoint verbatim.
            raise ConfigError(f"cannot work out the S3 endpoint for bucket {self.bucket}: check "
                              "AWS_ENDPOINT_URL / the endpoint URL and the region") from e
        except bce.BotoCoreError as e:
            raise StoreError(f"S3 {op} {self._where(key)} failed: {type(e).__name__}") from e

    @contextlib.contextmanager
    def _copy_errors(self, src: str, dst: str, if_match: str | None):
        try:
            with self._errors("copy", dst, conditional=if_match is not None and src != dst):
                yield
        except PreconditionFailed:
            # Either the pinned source or the destination condition failed.
            raise self._precondition(src if src == dst else f"{src} -> {dst}",
                                     "changed by another writer during the copy") from None
        except ObjectNotFound:
            raise ObjectNotFound(f"s3://{self.bucket}/{src}: no such object") from None

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def _client_error(self, e: bce.ClientError, op: str, key: str | None, *,
                      conditional: bool = False) -> StoreError:
        err = e.response.get("Error", {}) or {}
        meta = e.response.get("ResponseMetadata", {}) or {}
        code = str(err.get("Code") or "")
        status = meta.get("HTTPStatusCode")
        where = self._where(key)
        if code == "NoSuchBucket" or (op == "check" and (code in _NOT_FOUND or status == 404)):
            return StoreUnavailable(f"bucket {self.bucket} does not exist: create it or fix the "
                                    "source URI")
        if code == "NoSuchUpload":
            return StoreError(f"{where}: the multipart upload no longer exists (aborted or "
                              "expired): write the file again")
        if code in _NOT_FOUND or (status == 404 and not code):
            if conditional:
                return self._precondition(key or "", "deleted by another writer")
            return ObjectNotFound(f"{where}: no such object")
        if code in _PRECONDITION or status in (409, 412):
            return self._precondition(key or "", "changed by another writer")
        if code == "InvalidObjectState":
            return StoreError(f"{where}: object is archived (Glacier / Deep Archive): restore it "
                              "before reading", errno=_errno.EIO)
        if code in _CREDENTIALS:
            return StoreAccessDenied(f"S3 rejected the AWS credentials ({code}): check "
                                     "AWS_PROFILE / AWS_ACCESS_KEY_ID or refresh the session")
        if code in _DENIED or status == 403:
            action = _ACTIONS.get(op, "the required s3 actions")
            resource = (f"arn:aws:s3:::{self.bucket}" if op in ("list", "check", "list_uploads")
                        else f"arn:aws:s3:::{self.bucket}/*")
            return StoreAccessDenied(f"access denied to {where} ({code or status}): grant {action} "
                                     f"on {resource} to these credentials")
        if code == "MetadataTooLarge":
            return MetadataBudgetError(f"{where}: S3 refused the object metadata as too large "
                                       "(2 KB limit)")
        if code in _FULL or status == 507:
            return StoreFull(f"{where}: S3 refused the write ({code or status}): the object is too "
                             "large or a storage quota is exhausted")
        if code in _REGION or status == 301:
            region = (meta.get("HTTPHeaders", {}).get("x-amz-bucket-region")
                      or err.get("Region") or "another region")
            return ConfigError(f"bucket {self.bucket} is in {region}: set AWS_REGION or the region "
                               "option to match")
        if code == "InvalidBucketName":
            return ConfigError(f"invalid bucket name {self.bucket!r}: fix the source URI")
        if code == "KeyTooLongError":
            return StoreError(f"{where}: key too long for S3 (1024 bytes): shorten the path",
                              errno=_errno.ENAMETOOLONG)
        if code == "NotImplemented" or status == 501:
            return StoreError(f"S3 {op} {where}: this S3-compatible service does not implement the "
                              f"request ({code or status})", errno=_errno.EOPNOTSUPP)
        if code in _THROTTLED or (isinstance(status, int) and status >= 500):
            return transient(StoreUnavailable(f"S3 is throttling or unavailable for {where} "
                                               f"({code or status}) after {self.max_attempts} "
                                               "attempts: retry later"))
        return StoreError(f"S3 {op} {where} failed: {code or 'error'} (HTTP {status}): "
                          f"{one_line(err.get('Message', ''), 160)}")

    def _multipart_copy(self, source: ObjectInfo, dst: str, metadata: dict[str, str],
                        if_match: str | None, if_none_match: bool) -> str:
        size = source.size
        part = max(self.copy_part_size, math.ceil(size / MAX_PARTS))
        if part > MAX_PART_SIZE:  # pragma: no cover - objects > 50 TB do not exist in S3
            raise StoreFull(f"{self._where(source.key)}: too large to copy")
        ranges = [(n + 1, off, min(off + part, size) - 1)
                  for n, off in enumerate(range(0, size, part))]
        upload = self.begin_upload(dst, metadata, if_match=if_match, if_none_match=if_none_match)

        def copy_part(spec: tuple[int, int, int]) -> None:
            number, first, last = spec

            def once() -> dict:
                with self._copy_errors(source.key, dst, None):
                    return self._client.upload_part_copy(
                        Bucket=self.bucket, Key=dst, UploadId=upload.upload_id, PartNumber=number,
                        CopySource={"Bucket": self.bucket, "Key": source.key},
                        CopySourceRange=f"bytes={first}-{last}", CopySourceIfMatch=source.etag)

            r = self._retrying("copy", dst, once)
            upload._record(number, r["CopyPartResult"]["ETag"], last - first + 1)

        try:
            with ThreadPoolExecutor(max_workers=min(self.copy_concurrency, len(ranges)),
                                    thread_name_prefix="dssefs-s3-copy") as pool:
                for f in [pool.submit(copy_part, spec) for spec in ranges]:
                    f.result()
            return upload.complete()
        except BaseException:
            upload.abort()
            raise


def _own_checksums(session: Any) -> bool:
    """Whether uploads carry a CRC32 computed by dssefs and an unsigned payload.

    Over plain HTTP botocore hashes every upload body twice in the calling thread: SHA-256 for the
    signature and CRC32 for its checksum header (37 + 16 ms per 64 MiB here: docs/performance.md).
    The CRC32 alone guards the transfer (the server refuses a body that does not match it) and the
    body is authenticated end to end by both GCM layers, so the payload is sent unsigned, as
    botocore itself does over HTTPS (an unsigned payload with a CRC32 trailer), with the CRC32 in
    a header.  The signature still covers every header, the metadata and the checksum included.
    Kept as botocore has it when the user asked for checksums only where required
    (``AWS_REQUEST_CHECKSUM_CALCULATION=when_required``: a service that refuses checksum headers)
    or set ``payload_signing_enabled`` in the AWS config file."""
    core = getattr(session, "_session", None)
    if core is None:
        return False
    try:
        calc = str(core.get_config_variable("request_checksum_calculation") or "when_supported").lower()
        s3_config = core.get_config_variable("s3") or {}
    except Exception:  # noqa: BLE001 - an unreadable setting: leave botocore's behaviour
        return False
    return calc == "when_supported" and "payload_signing_enabled" not in s3_config


def _sendable(data: bytes | bytearray | memoryview) -> "bytes | bytearray | _ViewBody":
    """A request body botocore sends without copying it: bytes and bytearrays as they are, a view
    of a whole bytearray (a multipart upload's reused part buffer) as that bytearray, any other
    view (a body sealed into a mapping) read through :class:`_ViewBody`.  The caller leaves the
    buffer unchanged until the request returns, retries included."""
    if isinstance(data, (bytes, bytearray)):
        return data
    view = memoryview(data)
    if isinstance(view.obj, bytearray) and view.contiguous and view.format == "B" and view.nbytes == len(view.obj):
        return view.obj
    if view.contiguous:
        return _ViewBody(view)
    return bytes(view)


class _ViewBody:
    """A request body over a contiguous memoryview, as a seekable file whose reads hand out
    slices of it: urllib3 sends each piece it reads as it is, so nothing is copied (botocore
    accepts only bytes, bytearrays and files as bodies).  A read returns up to PIECE bytes
    whatever size it is asked for (urllib3 asks for 16 KiB: 4,096 sends for 64 MiB instead of
    64), never past the end; a retry rewinds it with ``seek(0)``."""

    PIECE = 1 << 20

    def __init__(self, view: memoryview):
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self._pos = 0

    def __len__(self) -> int:
        return self._view.nbytes

    def read(self, n: int | None = -1) -> memoryview:
        start = self._pos
        size = self._view.nbytes
        self._pos = size if n is None or n < 0 else min(size, start + max(n, self.PIECE))
        return self._view[start:self._pos]

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._view.nbytes}[whence]
        self._pos = min(max(0, base + pos), self._view.nbytes)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _conditions(if_match: str | None, if_none_match: bool) -> dict[str, str]:
    if if_match is not None:
        return {"IfMatch": if_match}
    if if_none_match:
        return {"IfNoneMatch": "*"}
    return {}


class S3Upload(Upload):
    """A multipart upload; ``put_part`` may run in many threads at once."""

    def __init__(self, store: S3Store, key: str, upload_id: str, *, if_match: str | None,
                 if_none_match: bool):
        self.store = store
        self.key = key
        self.upload_id = upload_id
        self._if_match = if_match
        self._if_none_match = if_none_match
        self._lock = threading.Lock()
        self._etags: dict[int, str] = {}
        self._sizes: dict[int, int] = {}
        self._state = "open"  # open -> completing -> done | aborted

    def _record(self, number: int, etag: str, size: int) -> None:
        with self._lock:
            if self._state != "open":
                raise StoreError(f"s3://{self.store.bucket}/{self.key}: upload is already "
                                 f"{self._state}", errno=_errno.EINVAL)
            self._etags[number] = etag
            self._sizes[number] = size

    def put_part(self, number: int, data: bytes | memoryview) -> None:
        check_part_number(number)
        with self._lock:
            if self._state != "open":
                raise StoreError(f"s3://{self.store.bucket}/{self.key}: upload is already "
                                 f"{self._state}", errno=_errno.EINVAL)
        r = self.store._request("upload", self.key, self.store._client.upload_part,
                                Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                                PartNumber=number, Body=_sendable(data), **self.store._checksum(data, None))
        self._record(number, r["ETag"], memoryview(data).nbytes)

    def complete(self) -> str:
        with self._lock:
            if self._state != "open":
                raise StoreError(f"s3://{self.store.bucket}/{self.key}: upload is already "
                                 f"{self._state}", errno=_errno.EINVAL)
            numbers = check_parts(self._sizes, MIN_PART_SIZE)
            parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in numbers]
            self._state = "completing"
        kwargs: dict[str, Any] = {"Bucket": self.store.bucket, "Key": self.key,
                                  "UploadId": self.upload_id,
                                  "MultipartUpload": {"Parts": parts}}
        kwargs.update(_conditions(self._if_match, self._if_none_match))
        try:
            if self._if_match is not None:
                # Checked here too for services that ignore If-Match on this call.
                self._check_if_match()
            r = self.store._request("complete", self.key, self.store._client.complete_multipart_upload,
                                    conditional=self._if_match is not None, **kwargs)
        except PreconditionFailed:
            self.abort()
            raise
        except BaseException:
            with self._lock:
                self._state = "open"  # may be retried or aborted
            raise
        with self._lock:
            self._state = "completed"
        return r["ETag"]

    def _check_if_match(self) -> None:
        try:
            current = self.store.head(self.key).etag
        except ObjectNotFound:
            raise self.store._precondition(self.key, "deleted by another writer") from None
        if strip_etag(current) != strip_etag(self._if_match or ""):
            raise self.store._precondition(self.key, "changed by another writer")

    def abort(self) -> None:
        with self._lock:
            if self._state in ("aborted", "completed"):
                return
            self._state = "aborted"
        try:
            self.store._client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                                      UploadId=self.upload_id)
        except bce.ClientError as e:
            if e.response.get("Error", {}).get("Code") == "NoSuchUpload":
                # already gone: most often a completion whose reply was lost took effect (the
                # caller then confirms the stored version), or a retried abort
                log.debug("event=abort_upload_gone object=s3://%s/%s", self.store.bucket, self.key)
                return
            log.warning("event=abort_upload_failed object=s3://%s/%s reason=%s", self.store.bucket,
                        self.key, one_line(e))
        except Exception as e:  # never raises: a lifecycle rule reaps what is left
            log.warning("event=abort_upload_failed object=s3://%s/%s reason=%s", self.store.bucket,
                        self.key, one_line(e))

    def __enter__(self) -> "S3Upload":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
