"""Retries with exponential backoff and full jitter, for transient store failures only.

Connection resets and refusals, timeouts and HTTP 408/429/5xx are worth retrying; a 403,
a missing bucket or bad credentials are not: those fail at once with a message naming the
store and the likely fix. Jitter comes from a private ``random.Random``: drawing from the
global stream on a background thread would shift the user's random numbers.
"""

from __future__ import annotations

import functools
import http.client
import importlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_PERMANENT_STATUS = frozenset({400, 401, 403, 404, 409})
# S3 error codes that botocore's own "standard" retry mode calls transient or throttling
# (a structured field of the reply, not message text); S3 sends RequestTimeout as a 400.
_TRANSIENT_S3_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
    }
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


def _optional(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """The exception classes ``names`` of ``module``, or none if it is not installed.

    Imported on first use: a user of one store must not need every other store's SDK.
    """
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return ()
    return tuple(getattr(imported, name) for name in names)


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """Failures of the connection itself (no reply, or a cut one): always worth a retry.

    Each SDK's own retry logic calls these transient; its retries are off (see
    :mod:`mlflow_ckpt.storage.clients`), so ours must recognise them.
    """
    return (
        ConnectionError,  # resets, refusals, aborts, broken pipes (http.client's too)
        TimeoutError,  # socket timeouts
        http.client.IncompleteRead,
        *_optional("urllib3.exceptions", "ProtocolError", "TimeoutError"),
        *_optional("requests.exceptions", "ConnectionError", "Timeout", "ChunkedEncodingError"),
        # botocore's standard retry mode retries exactly these two families
        *_optional("botocore.exceptions", "ConnectionError", "HTTPClientError"),
        *_optional(
            "azure.core.exceptions", "ServiceRequestError", "ServiceResponseError", "DecodeError"
        ),
        *_optional("google.auth.exceptions", "TransportError"),
    )


def _s3_status(exc: BaseException) -> int | None:
    """Status of a botocore ``ClientError`` (the error code first: some are transient)."""
    reply = getattr(exc, "response", None) or {}
    if reply.get("Error", {}).get("Code") in _TRANSIENT_S3_CODES:
        return 503
    status = reply.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def _http_status(response: object) -> int | None:
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


@functools.cache
def _status_readers() -> tuple[tuple[tuple[type[BaseException], ...], Callable[..., Any]], ...]:
    """For each SDK's error type that carries a reply, how to read its HTTP status."""
    return (
        (_optional("botocore.exceptions", "ClientError"), _s3_status),
        (_optional("azure.core.exceptions", "HttpResponseError"), lambda e: e.status_code),
        (_optional("google.api_core.exceptions", "GoogleAPICallError"), lambda e: e.code),
        (
            _optional("google.cloud.storage.exceptions", "InvalidResponse")
            + _optional("google.resumable_media", "InvalidResponse")
            + _optional("requests.exceptions", "HTTPError"),
            lambda e: _http_status(e.response),
        ),
    )


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an SDK exception carries, if it is one that carries a reply."""
    for types, read in _status_readers():
        if types and isinstance(exc, types):
            status = read(exc)
            return status if isinstance(status, int) and 100 <= status < 600 else None
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def chain_status(exc: BaseException) -> int | None:
    """The first HTTP status found along ``exc``'s cause/context chain."""
    for current in _chain(exc):
        status = status_of(current)
        if status is not None:
            return status
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is worth retrying.

    Decided by the status the store replied with (408/429/5xx yes, other 4xx no) or, when
    no reply came, by the exception's type (connection failures and timeouts); never by
    its message text, which SDKs reword between versions.
    """
    status = chain_status(exc)
    if status in _PERMANENT_STATUS:
        return False
    if status in _TRANSIENT_STATUS:
        return True
    transient = _transient_types()
    return any(isinstance(current, transient) for current in _chain(exc))


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
