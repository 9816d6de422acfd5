"""Logging to stderr with levels and ``key=value`` fields; journald picks it up under systemd.

On a terminal or in a log file each line reads ``TIME dssefs[PID] level=LEVEL logger=NAME
event=... key=value ...``.  When stderr is the journal (``$JOURNAL_STREAM`` names stderr's
device and inode, see systemd.exec(5)), the time and pid are left to journald and each line starts
with its syslog priority (``<3>`` error ... ``<7>`` debug), so ``journalctl -p warning`` works.

What may appear: object names, sizes, counters, errno names, key *ids*.  What never may: file
contents, data or master keys, passphrases, credentials, presigned URLs.  The code logs none of
them; as a second line of defence every line passes :func:`redact`, which removes URL signatures
and credentials and AWS secret patterns that third-party messages (botocore exceptions) might
carry.
"""

from __future__ import annotations

import logging
import os
import re
import sys

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

# a quoted value as Python reprs write it: 'text', "text", b'\x00...' (escapes included)
_QUOTED = r"""b?'(?:\\.|[^'\\])*'|b?"(?:\\.|[^"\\])*\""""
_SECRET_KEYS = (r"aws_secret_access_key|aws_session_token|secret_access_key|session_token|SecretAccessKey|"
                r"SessionToken|Plaintext|X-Amz-Security-Token|keyring_passphrase")

_REDACTIONS = (
    # presigned URL query parameters (SigV4 and SigV2): only right after '?' or '&'
    (re.compile(r"(?i)(?<=[?&])(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|"
                r"AWSAccessKeyId)=[^&\s'\"]+"), r"\1=REDACTED"),
    # Authorization headers: a quoted value, or the rest of the line
    (re.compile(r"(?i)(?<![\w/.-])(['\"]?Authorization['\"]?\s*[:=]\s*)(?:" + _QUOTED + r"|[^\n]+)"),
     r"\1REDACTED"),
    # credential fields: identifiers that only ever name secrets, with or without spaces around
    # ':'/'=' ('Plaintext': b'...', aws_secret_access_key = ..., x-amz-security-token: ...)
    (re.compile(r"(?i)(?<![\w/.-])(['\"]?(?:" + _SECRET_KEYS + r")['\"]?\s*[:=]\s*)(?:" + _QUOTED
                + r"|[^\s,})]+)"), r"\1REDACTED"),
    # words that are secrets only as keyword arguments or assignments right before a quoted value:
    # passphrase='...', ReadOnlyCredentials(secret_key='...', token='...')
    (re.compile(r"(?<![\w/.-])((?:passphrase|secret_key|token|password)=)(?:" + _QUOTED + r")"), r"\1REDACTED"),
    # access key ids (AKIA.../ASIA...)
    (re.compile(r"\b((?:AKIA|ASIA)[A-Z0-9]{4})[A-Z0-9]{12}\b"), r"\1REDACTED"),
)
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def redact(text: str) -> str:
    for pattern, repl in _REDACTIONS:
        text = pattern.sub(repl, text)
    return text


def one_line(text: str) -> str:
    """Control characters (newlines above all) as ``\\xNN``: text from outside (object names,
    exception messages) cannot start a forged log line or journal entry."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


class RedactingFormatter(logging.Formatter):
    def __init__(self, journal: bool):
        fmt = "level=%(levelname)s logger=%(name)s %(message)s" if journal else \
            "%(asctime)s dssefs[%(process)d] level=%(levelname)s logger=%(name)s %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:
        # the event line itself is always one line; a traceback (added after it) keeps its lines
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        first, *rest = redact(super().format(record)).split("\n")
        # a traceback keeps its lines, each indented: no continuation can pass for an event line
        # (those start with the time, or with "level=" in the journal)
        rest = ["  " + one_line(line) for line in rest]
        if self.journal:
            prio = PRIORITY.get(record.levelno, 6)
            return "\n".join(f"<{prio}>{line}" for line in [first, *rest])  # one journal entry per line
        return "\n".join([first, *rest])


def stderr_is_journal(env=None) -> bool:
    """systemd.exec(5): ``JOURNAL_STREAM=DEV:INODE`` of the stream connected to the journal."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(journal=stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # botocore logs request headers and signing details at DEBUG: never below WARNING
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
