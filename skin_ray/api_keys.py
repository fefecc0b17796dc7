"""Who may call the service: API keys read from a file, and a rate limit per key.

The key file holds one key per line, `NAME:SECRET`; a line starting with `#` is a comment, blank lines are
ignored. A Kubernetes Secret mounted as a file is such a file. Only SHA-256 digests of the secrets stay in
memory; a presented secret is hashed and compared with every digest in constant time. The file is read again
when it changes (looked at no more than once a second), so keys are added, rotated and revoked by replacing
the file, without a restart. A name, never a secret, is what logs and answers show.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MIN_SECRET_LENGTH = 16  # a guessable secret is no key: `python -c "import secrets; print(secrets.token_urlsafe(32))"`
RELOAD_CHECK_S = 1.0


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and line, never a secret."""


def read_key_file(path: str) -> dict[bytes, str]:
    """SHA-256 digest of each key's secret -> the key's name, from the key file at `path`."""
    try:
        with open(path, encoding="utf-8") as lines:
            text = lines.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the API key file {path}: {exc}") from None
    keys: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, secret = (part.strip() for part in line.partition(":"))
        if not colon or not NAME.fullmatch(name):
            raise KeyFileError(f"{path}, line {number}: expected NAME:SECRET, NAME of letters, digits, '.', '_', '-'")
        if len(secret) < MIN_SECRET_LENGTH:
            raise KeyFileError(f"{path}, line {number}: the secret of {name!r} is shorter than {MIN_SECRET_LENGTH} characters")
        digest = hashlib.sha256(secret.encode()).digest()
        if name in keys.values() or digest in keys:
            raise KeyFileError(f"{path}, line {number}: {name!r} repeats another key's name or secret")
        keys[digest] = name
    if not keys:
        raise KeyFileError(f"{path} holds no key (one NAME:SECRET a line)")
    return keys


class ApiKeys:
    """The keys of a key file, read again whenever the file changes."""

    def __init__(self, path: str):
        self.path = path
        self._keys = read_key_file(path)
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def name_of(self, secret: str) -> str | None:
        """The name of the key whose secret this is, or None."""
        self._reload_if_changed()
        digest = hashlib.sha256(secret.encode()).digest()
        found = None
        for known, name in self._keys.items():  # every digest compared, whichever matches
            if hmac.compare_digest(known, digest):
                found = name
        return found

    def _file_stamp(self) -> tuple:
        stat = os.stat(self.path)
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._keys, self._stamp = read_key_file(self.path), stamp
        except (OSError, KeyFileError) as exc:  # a broken new file keeps the keys in force, and says why
            logger.error("API keys unchanged: %s", exc)


class RateLimit:
    """A token bucket per key name: `per_second` requests a second on average, in bursts of up to as many (at
    least one). Per replica: a service of R replicas admits up to R times as many."""

    def __init__(self, per_second: float):
        self.per_second, self.burst = per_second, max(1.0, per_second)
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, when)

    def wait_s(self, name: str) -> float:
        """0 when `name` may make a request now (and it is counted), else how long until it may."""
        now = time.monotonic()
        tokens, then = self._buckets.get(name, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.per_second)
        if tokens >= 1:
            self._buckets[name] = (tokens - 1, now)
            return 0.0
        self._buckets[name] = (tokens, now)
        return (1 - tokens) / self.per_second
