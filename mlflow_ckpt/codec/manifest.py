"""``manifest.json``: the commit marker and integrity record of one checkpoint.

It is written last. It lists every file with its size and SHA-256, the tensor index (name,
dtype, shape, file, offset), the step/epoch/metrics and the versions that wrote it. Loading
trusts nothing that is not listed here and re-checks everything that is, so parsing is strict:
unknown format versions, absolute paths and ``..`` are refused before any file is opened.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow_ckpt.errors import CheckpointCorruptedError, CheckpointError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_relpath(path: str, where: str) -> str:
    """Return ``path`` if it is a plain relative POSIX path inside the checkpoint folder."""
    if (
        not isinstance(path, str)
        or not path
        or path.startswith(("/", "\\"))
        or "\\" in path
        or ":" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
        or posixpath.normpath(path) != path
    ):
        raise CheckpointCorruptedError(
            f"{where}: file name {path!r} is not a plain relative path inside the checkpoint; "
            "refusing to read it (the manifest was edited or forged).",
            path=str(path),
        )
    return path


@dataclass(frozen=True)
class FileEntry:
    """One file of the checkpoint."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``offset`` is the byte offset of its data in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int | None
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    """Everything needed to verify and decode a checkpoint folder."""

    format: str
    step: int
    epoch: int | None
    metrics: dict[str, float]
    created_at: float
    files: tuple[FileEntry, ...]
    tensors: tuple[TensorEntry, ...]
    structure_file: str
    triggers: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise CheckpointCorruptedError(
            f"manifest does not list {path!r}, which the checkpoint needs", path=path
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["metrics"] = {k: _float_out(v) for k, v in self.metrics.items()}
        return json.dumps(data, indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        """Parse and validate a manifest; ``where`` names it in error messages."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointCorruptedError(
                f"{where}: {MANIFEST_NAME} is not valid JSON ({exc})", path=MANIFEST_NAME
            ) from exc
        try:
            return cls._from_dict(data, where)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorruptedError(
                f"{where}: {MANIFEST_NAME} is malformed ({type(exc).__name__}: {exc})",
                path=MANIFEST_NAME,
            ) from exc

    @classmethod
    def _from_dict(cls, data: Any, where: str) -> Manifest:
        if not isinstance(data, dict):
            raise TypeError("top level is not an object")
        version = data["format_version"]
        if not isinstance(version, int):
            raise TypeError("format_version is not an integer")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where} was written in checkpoint format {version}, newer than this "
                f"mlflow_ckpt understands ({FORMAT_VERSION}); upgrade mlflow_ckpt to load it."
            )
        files = tuple(
            FileEntry(check_relpath(f["path"], where), _int(f["size"]), _sha(f["sha256"]))
            for f in data["files"]
        )
        listed = {f.path for f in files}
        if len(listed) != len(files):
            raise ValueError("a file is listed twice")
        tensors = tuple(
            TensorEntry(
                name=_str(t["name"]),
                dtype=_str(t["dtype"]),
                shape=tuple(_int(d) for d in t["shape"]),
                file=check_relpath(t["file"], where),
                offset=None if t["offset"] is None else _int(t["offset"]),
                nbytes=_int(t["nbytes"]),
            )
            for t in data["tensors"]
        )
        structure_file = check_relpath(data["structure_file"], where)
        for needed in [structure_file, *(t.file for t in tensors)]:
            if needed not in listed:
                raise ValueError(f"{needed!r} is referenced but not listed in files")
        epoch = data["epoch"]
        return cls(
            format=_str(data["format"]),
            step=_int(data["step"]),
            epoch=None if epoch is None else _int(epoch),
            metrics={_str(k): _float_in(v) for k, v in dict(data["metrics"]).items()},
            created_at=float(data["created_at"]),
            files=files,
            tensors=tensors,
            structure_file=structure_file,
            triggers=tuple(_str(t) for t in data.get("triggers", [])),
            versions={_str(k): _str(v) for k, v in dict(data.get("versions", {})).items()},
            format_version=version,
        )


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"expected a non-negative integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _sha(value: Any) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ValueError(f"not a SHA-256 hex digest: {value!r}")
    return value


def _float_out(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _float_in(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"metric value {value!r} is not a number")
    return float(value)
