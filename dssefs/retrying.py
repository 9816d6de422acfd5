"""Retrying store and KMS requests above botocore (shared by :mod:`dssefs.store.s3` and
:mod:`dssefs.kms.aws`): the retry budget, the back-off between retries, which failures are
transient, and a botocore retry quota that never runs dry."""

from __future__ import annotations

import logging
import random
import re
from typing import TypeVar

from botocore.retries import quota as _quota
from botocore.retries import standard as _standard

from .errors import ConfigError

E = TypeVar("E", bound=BaseException)

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 5
#: Seconds a transient failure is retried above botocore, from the request's first attempt.
DEFAULT_RETRY_BUDGET = 60.0
#: Back-off between those retries: the first wait, and the most any one wait may be.
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 8.0


def retry_budget_for(retry_budget: float | None, max_attempts: int) -> float:
    """The retry budget in seconds: ``retry_budget`` when given (0: no retries above botocore).
    Unset: :data:`DEFAULT_RETRY_BUDGET`, unless ``max_attempts`` was lowered below the default,
    which asks for requests that fail quickly (0)."""
    if retry_budget is None:
        return DEFAULT_RETRY_BUDGET if max_attempts >= DEFAULT_MAX_ATTEMPTS else 0.0
    if not isinstance(retry_budget, (int, float)) or not 0 <= retry_budget <= 3600:
        raise ConfigError(f"retry budget {retry_budget!r} is out of range: use 0..3600 seconds")
    return float(retry_budget)


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1-based) above botocore: capped exponential
    back-off (:data:`RETRY_FIRST_DELAY` doubling up to :data:`RETRY_MAX_DELAY`), half of it
    jitter, so that clients failing together do not come back together."""
    cap = min(RETRY_MAX_DELAY, RETRY_FIRST_DELAY * 2 ** min(attempt - 1, 16))
    return cap / 2 + random.random() * cap / 2


def transient(err: E) -> E:
    """Mark ``err`` as a failure that may pass when tried again (see :func:`is_transient`)."""
    err.transient = True
    return err


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` is a failure that may pass when tried again (throttled, 5xx, connection
    lost or timed out, a body broken off), set by the store that raised it.  Refusals (412, 409,
    ``NoSuchUpload``, a missing object) and configuration or permission errors never are."""
    return bool(getattr(err, "transient", False))


def tls_reason(e: BaseException) -> str:
    """What a TLS failure was, in OpenSSL's words (``certificate verify failed: self-signed
    certificate``), as botocore's error message quotes it; ``""`` if it quotes none."""
    m = _SSL_TEXT.search(str(e))
    return m.group(1).strip() if m else ""


_SSL_TEXT = re.compile(r"\[SSL(?:: [A-Z0-9_]+)?\] ([^()\n]+?)(?: \(_ssl\.c:\d+\))?(?:$|[)'\"])")


def transient_tls_error(e: BaseException) -> bool:
    """A TLS error worth retrying: a handshake cut short, not a certificate that is refused."""
    text = str(e).lower()
    return not any(word in text for word in ("certificate", "hostname", "wrong version number"))


class _BottomlessQuota(_quota.RetryQuota):
    """A retry quota that always grants: botocore's standard quota (500 tokens per client, 5 to
    14 per retry, given back only by a 2xx answer) runs dry in a burst of faults, most of all when
    requests end in a 404 or 412, and botocore then stops retrying at all."""

    def acquire(self, capacity_amount):
        return True

    def release(self, capacity_amount):
        return None

    @property
    def available_capacity(self):
        return self._max_capacity


def keep_retrying(client, max_attempts: int) -> None:
    """Give ``client`` (a botocore client in ``standard`` or ``adaptive`` retry mode) a retry
    quota that never runs out, so that each request gets its ``max_attempts`` attempts however
    many requests failed before.  botocore's own retry handler is registered again (public
    :func:`botocore.retries.standard.register_retry_handler`, under the same unique id) and its
    quota replaced; the back-off, the attempts and what is retried stay botocore's.  Does
    nothing in ``legacy`` mode (which has no quota) or if botocore's handler looks different."""
    if (client.meta.config.retries or {}).get("mode") not in ("standard", "adaptive"):
        return
    service = client.meta.service_model.service_id.hyphenize()
    unique_id = f"retry-config-{service}"
    client.meta.events.unregister(f"needs-retry.{service}", unique_id=unique_id)
    handler = _standard.register_retry_handler(client, max_attempts=max_attempts)
    checker = getattr(handler, "_retry_quota", None)
    if isinstance(getattr(checker, "_quota", None), _quota.RetryQuota):
        checker._quota = _BottomlessQuota()
    else:  # pragma: no cover - a botocore whose retry handler is built differently
        log.debug("event=retry_quota_kept service=%s reason='unknown botocore retry handler'", service)
