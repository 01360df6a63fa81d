"""``manifest.json``: the commit marker and integrity record of one checkpoint.

It is written last. It lists every file with its size and content hash (BLAKE3 since format
3, SHA-256 before; the algorithm is the entry's key), the tensor index (name,
dtype, shape, file, offset), the step/epoch/metrics and the versions that wrote it. Loading
trusts nothing that is not listed here and re-checks everything that is, so parsing is strict:
unknown format versions, absolute paths and ``..`` are refused before any file is opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow_ckpt.errors import CheckpointCorruptedError, CheckpointError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 5  # the newest this version reads
SINGLE_FORMAT_VERSION = 1
DISTRIBUTED_FORMAT_VERSION = 2  # adds ``world_size``, ``ranks/`` and ``shards/``
BLAKE3_FORMAT_VERSION = 3  # files may be hashed with BLAKE3 (older readers know SHA-256 only)
COMPRESSED_FORMAT_VERSION = 4  # tensor shards may be zstd-compressed ``.ztensors`` files
INCREMENTAL_FORMAT_VERSION = 5  # files under ``@shared/``: the run's shared tensor files
COMPRESSIONS = ("zstd",)
# A file path starting with this lives in the run's shared area (``Manifest.shared_uri``),
# not in the checkpoint's own folder: bytes that later checkpoints of the run reference.
SHARED_PREFIX = "@shared/"
HASH_ALGORITHMS = ("blake3", "sha256")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_INT = 2**63 - 1  # sizes, steps, offsets, dimensions: what an int64 holds


def check_relpath(path: str, where: str) -> str:
    """Return ``path`` if it is a plain relative POSIX path inside the checkpoint folder
    (or, after :data:`SHARED_PREFIX`, inside the run's shared area)."""
    inner = path.removeprefix(SHARED_PREFIX) if isinstance(path, str) else path
    if (
        not isinstance(path, str)
        or not path
        or path.startswith(("/", "\\"))
        or "\\" in path
        or ":" in path
        or _CONTROL.search(path)
        or not inner
        or any(part in ("", ".", "..") for part in inner.split("/"))
        or posixpath.normpath(inner) != inner
        or inner.startswith("@")
        or not _utf8(path)
    ):
        raise CheckpointCorruptedError(
            f"{where}: file name {path!r} is not a plain relative path inside the checkpoint; "
            "refusing to read it (the manifest was edited or forged).",
            path=str(path),
        )
    return path


def _utf8(path: str) -> bool:
    """Whether ``path`` can be encoded as UTF-8: JSON's ``\\ud800`` escapes decode to lone
    surrogates, which no store can open (``UnicodeEncodeError`` deep in the I/O layer)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class FileEntry:
    """One file of the checkpoint: its size and the hex digest of its bytes."""

    path: str
    size: int
    digest: str
    algorithm: str = "sha256"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, self.algorithm: self.digest}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> FileEntry:
        found = [a for a in HASH_ALGORITHMS if a in data]
        if len(found) != 1:
            raise ValueError(
                f"file entry {data.get('path')!r} has no single hash of {'/'.join(HASH_ALGORITHMS)}"
            )
        return cls(
            check_relpath(data["path"], where),
            _int(data["size"]),
            check_hex(data[found[0]]),
            found[0],
        )


def is_shared(path: str) -> bool:
    """Whether a listed file lives in the run's shared area (see :data:`SHARED_PREFIX`)."""
    return path.startswith(SHARED_PREFIX)


def shared_group(path: str) -> str:
    """The group (the model ID of the checkpoint that wrote it) of a shared file's path."""
    return path.removeprefix(SHARED_PREFIX).split("/", 1)[0]


def format_version_for(
    files: Sequence[FileEntry], base: int, compression: str | None = None
) -> int:
    """The oldest manifest format that can describe a checkpoint: BLAKE3 entries need 3,
    compressed shards 4, shared files 5 (older readers then ask for an upgrade instead of
    misreading)."""
    if any(is_shared(f.path) for f in files):
        return max(base, INCREMENTAL_FORMAT_VERSION)
    if compression:
        return max(base, COMPRESSED_FORMAT_VERSION)
    return max(base, BLAKE3_FORMAT_VERSION) if any(f.algorithm == "blake3" for f in files) else base


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``offset`` is the byte offset of its data in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int | None
    nbytes: int
    # BLAKE3 of the tensor's raw bytes, when the save computed it (incremental saves compare
    # it with the next save's bytes; the file's own hash is what verifies a load).
    digest: str | None = None


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
    format_version: int = SINGLE_FORMAT_VERSION
    # 0 for a single-process checkpoint; else the number of ranks that wrote it (their own
    # state under ``ranks/``, the sharded tensors under ``shards/``; see folder/distributed.py)
    world_size: int = 0
    compression: str | None = None  # "zstd": the tensor shards are ``.ztensors`` files
    # Incremental checkpoints: the run's shared area, which holds the ``@shared/`` files
    # (``<group>/<name>``, the group being the model ID of the checkpoint that wrote them).
    shared_uri: str | None = None
    shared_group: str | None = None  # the group this checkpoint wrote, if it wrote one
    # The logical size when the files cannot tell it (a compressed distributed checkpoint:
    # its DCP chunks are not in the tensor index).
    logical_bytes: int | None = None

    @property
    def stored_bytes(self) -> int:
        """What this checkpoint added to the store: its own files and the shared files it
        wrote (shared files written by earlier checkpoints are only referenced)."""
        return sum(
            f.size
            for f in self.files
            if not is_shared(f.path) or shared_group(f.path) == self.shared_group
        )

    @property
    def shared_groups(self) -> tuple[str, ...]:
        """The shared groups this checkpoint needs (sorted): what keeps them alive."""
        return tuple(sorted({shared_group(f.path) for f in self.files if is_shared(f.path)}))

    @property
    def size_bytes(self) -> int:
        """The checkpoint's logical size: its files, with tensor files counted at the size
        of the tensors it takes from them (compressed or shared files hold other sizes)."""
        if self.logical_bytes is not None:
            return self.logical_bytes
        if not self.compression and not self.shared_groups:
            return sum(f.size for f in self.files)
        tensor_files = {t.file for t in self.tensors}
        other = sum(f.size for f in self.files if f.path not in tensor_files)
        return other + sum(t.nbytes for t in self.tensors)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise CheckpointCorruptedError(
            f"manifest does not list {path!r}, which the checkpoint needs", path=path
        )

    def digest(self) -> str:
        """SHA-256 of the manifest's bytes as written: recorded in the catalog at commit, so
        an edit to the manifest itself (which lists every other file's hash) is caught too."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        data = asdict(self)
        data["files"] = [f.to_json() for f in self.files]
        data["metrics"] = {k: _float_out(v) for k, v in self.metrics.items()}
        for key in ("shared_uri", "shared_group", "logical_bytes"):  # absent unless needed
            if data[key] is None:
                del data[key]
        for tensor in data["tensors"]:
            if tensor["digest"] is None:
                del tensor["digest"]
        return json.dumps(data, indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        """Parse and validate a manifest; ``where`` names it in error messages."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointCorruptedError(
                f"{where}: {MANIFEST_NAME} is not valid JSON ({exc})", path=MANIFEST_NAME
            ) from exc
        try:
            return cls._from_dict(data, where)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CheckpointCorruptedError(
                f"{where}: {MANIFEST_NAME} is malformed ({type(exc).__name__}: {exc})",
                path=MANIFEST_NAME,
            ) from exc

    @classmethod
    def _from_dict(cls, data: Any, where: str) -> Manifest:
        if not isinstance(data, dict):
            raise TypeError("top level is not an object")
        version = data["format_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise TypeError(f"format_version {version!r} is not a positive integer")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where} was written in checkpoint format {version}, newer than this "
                f"mlflow_ckpt understands ({FORMAT_VERSION}); upgrade mlflow_ckpt to load it."
            )
        files = tuple(
            FileEntry.from_json(_dict(f, "file"), where) for f in _list(data["files"], "files")
        )
        listed = {f.path for f in files}
        if len(listed) != len(files):
            raise ValueError("a file is listed twice")
        tensors = tuple(
            TensorEntry(
                name=_str(t["name"]),
                dtype=_str(t["dtype"]),
                shape=tuple(_int(d) for d in _list(t["shape"], "shape")),
                file=check_relpath(t["file"], where),
                offset=None if t["offset"] is None else _int(t["offset"]),
                nbytes=_int(t["nbytes"]),
                digest=None if t.get("digest") is None else check_hex(t["digest"]),
            )
            for t in _list(data["tensors"], "tensors")
        )
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("a tensor is listed twice in the tensor index")
        structure_file = check_relpath(data["structure_file"], where)
        for needed in [structure_file, *(t.file for t in tensors)]:
            if needed not in listed:
                raise ValueError(f"{needed!r} is referenced but not listed in files")
        epoch = data["epoch"]
        return cls(
            format=_str(data["format"]),
            step=_int(data["step"]),
            epoch=None if epoch is None else _int(epoch),
            metrics={_str(k): _float_in(v) for k, v in _dict(data["metrics"], "metrics").items()},
            created_at=_number(data["created_at"], "created_at"),
            files=files,
            tensors=tensors,
            structure_file=structure_file,
            triggers=tuple(_str(t) for t in _list(data.get("triggers", []), "triggers")),
            versions={
                _str(k): _str(v) for k, v in _dict(data.get("versions", {}), "versions").items()
            },
            format_version=version,
            world_size=_int(data.get("world_size", 0)),
            compression=_compression(data.get("compression")),
            shared_uri=_shared_uri(data.get("shared_uri"), files),
            shared_group=None if data.get("shared_group") is None else _str(data["shared_group"]),
            logical_bytes=None
            if data.get("logical_bytes") is None
            else _int(data["logical_bytes"]),
        )


def _shared_uri(value: Any, files: Sequence[FileEntry]) -> str | None:
    if value is None:
        if any(is_shared(f.path) for f in files):
            raise ValueError("files under @shared/ are listed but no shared_uri")
        return None
    return _str(value)


def _compression(value: Any) -> str | None:
    if value is not None and value not in COMPRESSIONS:
        raise ValueError(f"unknown compression {value!r}")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        shown = repr(value) if len(repr(value)) < 40 else f"{repr(value)[:40]}..."
        raise TypeError(f"expected an integer from 0 to 2**63-1, got {shown}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{what} is a {type(value).__name__}, not a list")
    return value


def _dict(value: Any, what: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what} is a {type(value).__name__}, not an object")
    return value


def _number(value: Any, what: str) -> float:
    # finite: a manifest holding inf (JSON's 1e999) could not be written again (promotion
    # and archiving rewrite it; ``to_json`` refuses non-finite numbers)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} {value!r} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{what} {value!r} is not a finite number")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def check_hex(value: Any) -> str:
    """``value`` if it is a 256-bit lowercase hex digest (else ``ValueError``)."""
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ValueError(f"not a 256-bit hex digest: {value!r}")
    return value


def _float_out(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _float_in(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"metric value {value!r} is not a number")
    if isinstance(value, str) and value not in ("nan", "inf", "-inf"):
        raise ValueError(f"metric value {value!r} is not a number")
    return float(value)
