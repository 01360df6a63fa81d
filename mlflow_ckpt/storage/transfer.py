"""Transfer settings and failure messages shared by every remote store."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from mlflow_ckpt.storage.retry import RetryPolicy, chain_status, is_transient

_FIXES = {
    401: "the credentials were rejected: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "AZURE_STORAGE_CONNECTION_STRING or GOOGLE_APPLICATION_CREDENTIALS",
    403: "access denied: check the credentials and that they may write to this bucket/container",
    404: "the bucket/container (or path) does not exist: create it or fix the artifact location",
}


MIN_PART_BYTES = 5 * 1024 * 1024
PART_ALIGN = 256 * 1024


@dataclass(frozen=True)
class TransferConfig:
    """How checkpoint files move to and from remote stores.

    ``max_workers`` parts or files transfer in parallel. A remote save writes from memory: a
    file of up to ``single_put_bytes`` goes up in one request; a larger one in parts, the
    first of ``single_put_bytes``, the others of ``part_bytes``, with at most
    ``max_workers + 1`` parts in memory at a time. (Fewer, larger requests: on S3 a
    multipart upload costs a commit that a server may pay for in proportion to the size.)
    ``progress`` shows a tqdm bar once a transfer moved ``progress_min_bytes``: ``None``
    means "when stderr is a terminal".
    """

    max_workers: int = 4
    part_bytes: int = 32 * 1024 * 1024
    single_put_bytes: int = 128 * 1024 * 1024
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    progress: bool | None = None
    progress_min_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if self.part_bytes < MIN_PART_BYTES or self.part_bytes % PART_ALIGN:
            raise ValueError(
                f"part_bytes must be a multiple of {PART_ALIGN} (256 KiB, as GCS requires) "
                f"and at least {MIN_PART_BYTES} (5 MiB, S3's smallest part); "
                f"got {self.part_bytes}"
            )
        if self.single_put_bytes < self.part_bytes or self.single_put_bytes % PART_ALIGN:
            raise ValueError(
                f"single_put_bytes must be a multiple of {PART_ALIGN} and at least part_bytes "
                f"({self.part_bytes}); got {self.single_put_bytes}"
            )

    def show_progress(self, nbytes: int) -> bool:
        wanted = sys.stderr.isatty() if self.progress is None else self.progress
        return wanted and nbytes >= self.progress_min_bytes


def redact(uri: str) -> str:
    """The URI without a password, query (SAS tokens) or fragment: safe for messages and logs.

    A user part without a password is kept: in ``wasbs://container@account...`` it is the
    container name.
    """
    parts = urlsplit(uri)
    if not parts.scheme or parts.scheme == "file":
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    netloc = host if ":" in userinfo else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)[^/\s@:]+:[^/\s@]+@")
_SECRET_FIELD = re.compile(
    r"(?P<key>AccountKey|SharedAccessSignature|sig|Signature|X-Amz-Signature|X-Amz-Credential"
    r"|X-Amz-Security-Token|password|secret|token)=[^;&\s'\"]+",
    re.IGNORECASE,
)


def scrub(text: str) -> str:
    """Remove passwords in URLs and key=value secrets (SAS signatures, account keys)."""
    return _SECRET_FIELD.sub(r"\g<key>=***", _USERINFO.sub(r"\g<scheme>", text))


def explain(exc: BaseException, action: str, uri: str) -> str:
    """A one-line description of a store failure, with the likely fix; no secrets."""
    status = chain_status(exc)
    kind = "transient (retries exhausted)" if is_transient(exc) else "permanent"
    fix = _FIXES.get(status or 0, "check the store is reachable and the URI is right")
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    detail = scrub(f"{type(exc).__name__}: {first_line}")
    return f"{action} {redact(uri)} failed, {kind}: {detail[:300]}. Likely fix: {fix}."
