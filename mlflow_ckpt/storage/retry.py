"""Retries with exponential backoff and full jitter, for transient store failures only.

Connection resets and refusals, timeouts and HTTP 408/429/5xx are worth retrying; a 403,
a missing bucket or bad credentials are not: those fail at once with a message naming the
store and the likely fix. Jitter comes from a private ``random.Random``: drawing from the
global stream on a background thread would shift the user's random numbers.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_PERMANENT_STATUS = {400, 401, 403, 404, 409}
_TRANSIENT_NAMES = (
    "ConnectionError",
    "ConnectionResetError",
    "ConnectionRefusedError",
    "ConnectionAbortedError",
    "BrokenPipeError",
    "TimeoutError",
    "Timeout",
    "ReadTimeout",
    "ConnectTimeout",
    "ReadTimeoutError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "IncompleteRead",
    "ProtocolError",
    "RemoteDisconnected",
    "ServiceRequestError",
    "ServiceResponseError",
    "ChunkedEncodingError",
    "MaxRetryError",
    "TransportError",
)
_STATUS_IN_TEXT = re.compile(
    r"\b(?:status(?: code)?|HTTP|response code)[^0-9]{0,12}([1-5][0-9]{2})\b", re.I
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient failure.

    ``attempts`` counts every try (1 = no retry); the wait before retry ``n`` is uniform in
    ``[0, min(cap, base * 2**n)]`` seconds ("full jitter").
    """

    attempts: int = 6
    base: float = 0.25
    cap: float = 10.0
    _random: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def delay(self, retry: int) -> float:
        return self._random.uniform(0.0, min(self.cap, self.base * 2**retry))


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an SDK exception carries, if any."""
    for attr in ("status_code", "status", "http_status", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    elif response is not None:
        status = getattr(response, "status_code", None) or getattr(response, "status", None)
        if isinstance(status, int):
            return status
    match = _STATUS_IN_TEXT.search(str(exc))
    return int(match.group(1)) if match else None


_PERMANENT_CODES = {
    "AccessDenied": 403,
    "InvalidAccessKeyId": 403,
    "SignatureDoesNotMatch": 403,
    "AuthenticationFailed": 403,
    "AuthorizationFailure": 403,
    "NoSuchBucket": 404,
    "ContainerNotFound": 404,
}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def chain_status(exc: BaseException) -> int | None:
    """The first HTTP status found along ``exc``'s cause/context chain (or in error codes)."""
    for current in _chain(exc):
        status = status_of(current)
        if status is not None:
            return status
        for code, mapped in _PERMANENT_CODES.items():
            if code in str(current):
                return mapped
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is worth retrying."""
    status = chain_status(exc)
    if status in _PERMANENT_STATUS:
        return False
    if status in _TRANSIENT_STATUS:
        return True
    for current in _chain(exc):
        names = {cls.__name__ for cls in type(current).__mro__}
        if names & set(_TRANSIENT_NAMES) or isinstance(current, ConnectionError | TimeoutError):
            return True
    return False


def with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; retry transient failures per ``policy``; re-raise anything else at once."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt + 1 >= policy.attempts or not is_transient(exc):
                raise
            wait = policy.delay(attempt)
            logger.warning(
                "%s failed (%s: %s); retry %d/%d in %.2fs",
                what,
                type(exc).__name__,
                str(exc)[:200],
                attempt + 1,
                policy.attempts - 1,
                wait,
            )
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
