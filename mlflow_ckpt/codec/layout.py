"""How one checkpoint folder is laid out and read back (``shards`` writes the tensors).

```
MLmodel                                  (written by the flavor layer)
state.json                               the state's structure; tensors are references
tensors-00001-of-00002.safetensors       tensor shards, each <= max_shard_bytes
tensors-00002-of-00002.safetensors
manifest.json                            written last: the commit marker
```
Reading verifies every listed file's size and hash before decoding anything, and checks
that the tensor files hold exactly the tensors the manifest's index announces.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, overload

import torch

from mlflow_ckpt.codec import safetensors_io, torch_io, zstd_io
from mlflow_ckpt.codec.hashing import hash_bytes, hash_file
from mlflow_ckpt.codec.manifest import MANIFEST_NAME, FileEntry, Manifest, TensorEntry, is_shared
from mlflow_ckpt.codec.planar import PlanarTensor
from mlflow_ckpt.errors import CheckpointCorruptedError
from mlflow_ckpt.storage import Store, TransferConfig, open_store
from mlflow_ckpt.storage.routed import RoutedStore

logger = logging.getLogger(__name__)

STRUCTURE_FILE = "state.json"
DEFAULT_MAX_SHARD_BYTES = 512 * 1024 * 1024
MAP_MIN_BYTES = 1024 * 1024  # smaller files are read, larger ones mapped
FORMAT_CODECS: dict[str, tuple[str, ModuleType]] = {
    "safetensors": (".safetensors", safetensors_io),
    "torch": (".pt", torch_io),
}
FORMATS = tuple(FORMAT_CODECS)


def check_format(name: str) -> str:
    """Validate a checkpoint format name."""
    if name not in FORMAT_CODECS:
        raise ValueError(f"format={name!r} is not supported; use one of {', '.join(FORMATS)}")
    return name


def with_shared(store: Store, manifest: Manifest, config: TransferConfig | None = None) -> Store:
    """``store`` (a checkpoint's folder) seen together with the run's shared area its
    manifest references, if any: how every reader reaches ``@shared/`` files."""
    if manifest.shared_uri is None or isinstance(store, RoutedStore):
        return store
    return RoutedStore(store, open_store(manifest.shared_uri, config))


def write_manifest(store: Store, manifest: Manifest) -> None:
    """Write ``manifest.json``: call this last, it is the commit marker."""
    store.write_bytes(MANIFEST_NAME, manifest.to_json().encode())


def read_manifest(
    store: Store, scratch: Path, where: str, expected_sha256: str | Sequence[str] | None = None
) -> Manifest:
    """Fetch and parse the manifest; ``FileNotFoundError`` if the save never committed.

    ``expected_sha256`` is the digest the catalog recorded at commit (when there is one; two
    while a promotion rewrites the manifest): the manifest vouches for every other file, so
    nothing vouches for it but the catalog.
    """
    path = fetch_inside(store, MANIFEST_NAME, scratch, where)
    data = path.read_bytes()
    accepted = [expected_sha256] if isinstance(expected_sha256, str) else expected_sha256
    accepted = [d for d in accepted or () if d]
    if accepted:
        actual = hashlib.sha256(data).hexdigest()
        if actual not in accepted:
            raise CheckpointCorruptedError(
                f"{where}: {MANIFEST_NAME} was modified after the checkpoint was committed "
                f"(sha256 {actual[:12]}..., recorded {accepted[0][:12]}...). Its file list "
                "can no longer be trusted; restore the original or delete the checkpoint.",
                path=MANIFEST_NAME,
            )
    return Manifest.from_json(data, where)


def fetch_inside(store: Store, rel_path: str, scratch: Path, where: str) -> Path:
    """Fetch one file and make sure the local path really lies inside the checkpoint.

    A manifest can only name plain relative paths, but on a local store a file of the
    folder may itself be a symlink (or sit under a symlinked folder) pointing elsewhere:
    with a forged manifest its hash would match, so it is refused before it is opened.
    """
    path = store.fetch(rel_path, scratch)
    bases = [scratch]
    roots = getattr(store, "roots", None) or [getattr(store, "root", None)]
    bases.extend(r for r in roots if isinstance(r, Path))
    resolved = path.resolve()
    inside = any(resolved.is_relative_to(base.resolve()) for base in bases)
    if path.is_symlink() or not inside or not resolved.is_file():
        raise CheckpointCorruptedError(
            f"{where}: file {rel_path} is a link or resolves outside the checkpoint folder; "
            "refusing to read it (the folder was tampered with).",
            path=rel_path,
        )
    return path


def verify_files(
    store: Store,
    manifest: Manifest,
    scratch: Path,
    where: str,
    paths: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Fetch the listed files (all by default) and check each one's size and hash.

    Returns local paths by relative name. Raises :class:`CheckpointCorruptedError` naming
    the first file that is missing or differs.
    """
    wanted = [e for e in manifest.files if paths is None or e.path in paths]
    if store.parallelism <= 1 or len(wanted) <= 1:
        return {e.path: check_file(store, e, scratch, where) for e in wanted}
    with ThreadPoolExecutor(min(store.parallelism, len(wanted))) as pool:
        futures = [pool.submit(check_file, store, e, scratch, where) for e in wanted]
        return {e.path: f.result() for e, f in zip(wanted, futures, strict=True)}


def check_sizes(store: Store, manifest: Manifest, where: str) -> None:
    """Check through the store's listing that every listed file is there with its size.

    One listing per folder, no download: the cheap check after a save. Raises
    :class:`CheckpointCorruptedError` naming the first file missing or of another size.
    """
    listings: dict[str, dict[str, int]] = {}
    for entry in manifest.files:
        directory, _, name = entry.path.rpartition("/")
        if directory not in listings:
            listings[directory] = store.list_sizes(directory)
        size = listings[directory].get(name)
        if size != entry.size:
            found = "missing" if size is None else f"{size} bytes"
            raise CheckpointCorruptedError(
                f"{where}: file {entry.path} is {found} in the store, the manifest says "
                f"{entry.size} bytes",
                path=entry.path,
            )


def check_file(store: Store, entry: FileEntry, scratch: Path, where: str) -> Path:
    """Fetch one listed file and check its size and hash; return its local path."""
    path = _fetch_listed(store, entry, scratch, where)
    digest, size = hash_file(path, entry.algorithm)
    _check_digest(entry, size, digest, where)
    return path


def read_verified(store: Store, entry: FileEntry, scratch: Path, where: str) -> torch.Tensor:
    """Map one listed file into memory (``uint8``) and check its size and hash there.

    The caller decodes tensors as views of this buffer and copies them into the live state
    once every file checked out: one hashing pass over the page cache (BLAKE3 on every
    core) and one copy, instead of reading each file twice (hash, then parse) into fresh
    memory. The mapping is private: nothing is ever written back to the checkpoint.
    """
    path = _fetch_listed(store, entry, scratch, where)
    size = path.stat().st_size
    if size != entry.size:  # before mapping: a listed size is not trusted
        _check_digest(entry, size, "", where)
    if size == 0:
        data = torch.empty(0, dtype=torch.uint8)
    elif size < MAP_MIN_BYTES:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    else:
        data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    # (numpy's stubs declare ndarray.__buffer__ on Python >= 3.12 only: PEP 688)
    digest = hash_bytes(data.numpy(), entry.algorithm)  # pyright: ignore[reportArgumentType]
    _check_digest(entry, data.numel(), digest, where)
    return data


def _fetch_listed(store: Store, entry: FileEntry, scratch: Path, where: str) -> Path:
    try:
        return fetch_inside(store, entry.path, scratch, where)
    except FileNotFoundError as exc:
        raise CheckpointCorruptedError(
            f"{where}: file {entry.path} listed in the manifest is missing", path=entry.path
        ) from exc


def _check_digest(entry: FileEntry, size: int, digest: str, where: str) -> None:
    if size != entry.size or digest != entry.digest:
        raise CheckpointCorruptedError(
            f"{where}: file {entry.path} is corrupt (size {size}, expected {entry.size}; "
            f"{entry.algorithm} {digest[:12] or '-'}..., expected {entry.digest[:12]}...). "
            "Load an older checkpoint of the run instead.",
            path=entry.path,
        )


def load_files(
    store: Store, manifest: Manifest, scratch: Path, where: str
) -> dict[str, Path | torch.Tensor]:
    """Fetch and verify every listed file, several at a time.

    safetensors shards come back as verified in-memory buffers (see :func:`read_verified`),
    every other file as a verified local path.
    """
    in_memory = {t.file for t in manifest.tensors if _in_memory(manifest, t.file)}

    def one(entry: FileEntry) -> Path | torch.Tensor:
        if entry.path in in_memory:
            return read_verified(store, entry, scratch, where)
        return check_file(store, entry, scratch, where)

    entries = sorted(manifest.files, key=lambda e: -e.size)  # largest first: balanced
    workers = max(1, min(store.parallelism, len(entries)))
    with ThreadPoolExecutor(workers, thread_name_prefix="mlflow-ckpt-read") as pool:
        futures = {e.path: pool.submit(one, e) for e in entries}
        return {e.path: futures[e.path].result() for e in manifest.files}


def _in_memory(manifest: Manifest, file: str) -> bool:
    """Whether a tensor file is decoded from a verified buffer (not from a path)."""
    return manifest.format == "safetensors" or file.endswith(zstd_io.EXTENSION)


def _bytes_of(source: Path | torch.Tensor) -> bytes:
    return source.numpy().tobytes() if isinstance(source, torch.Tensor) else source.read_bytes()


# Without ``planar`` every tensor comes back whole (what a rewrite writes out again).
@overload
def read_state(
    manifest: Manifest,
    local: Mapping[str, Path | torch.Tensor],
    where: str,
    planar: None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...
@overload
def read_state(
    manifest: Manifest,
    local: Mapping[str, Path | torch.Tensor],
    where: str,
    planar: Callable[[str], bool] | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor | PlanarTensor]]: ...
def read_state(
    manifest: Manifest,
    local: Mapping[str, Path | torch.Tensor],
    where: str,
    planar: Callable[[str], bool] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:  # (the overloads above say which tensors)
    """Decode verified files into ``(structure document, tensors by name)``.

    Compressed tensors whose name ``planar`` accepts (those a restore will copy into live
    tensors) may come back as :class:`~mlflow_ckpt.codec.planar.PlanarTensor`."""
    if manifest.format not in FORMAT_CODECS:
        raise CheckpointCorruptedError(
            f"{where}: unknown tensor format {manifest.format!r} in the manifest"
        )
    document = _structure(manifest, local, where)
    tensors: dict[str, torch.Tensor | PlanarTensor] = {}
    by_file: dict[str, list[TensorEntry]] = {}
    for entry in manifest.tensors:
        by_file.setdefault(entry.file, []).append(entry)
    for file, entries in by_file.items():
        loaded, offsets = _decode_file(manifest, file, local[file], where, planar)
        expected = {e.name: e for e in entries}
        if is_shared(file):  # an earlier checkpoint's file: it may hold tensors since changed
            loaded = {k: v for k, v in loaded.items() if k in expected}
        _check_against_index(loaded, offsets, expected, file, where)
        tensors.update(loaded)
    return document, tensors


def _structure(manifest: Manifest, local: Mapping[str, Path | torch.Tensor], where: str) -> Any:
    """The structure document (``state.json``): a JSON object, or the checkpoint is corrupt."""
    try:
        document = json.loads(_bytes_of(local[manifest.structure_file]))
    except (ValueError, RecursionError) as exc:
        raise CheckpointCorruptedError(
            f"{where}: {manifest.structure_file} is not valid JSON ({exc})",
            path=manifest.structure_file,
        ) from exc
    if not isinstance(document, dict):
        raise CheckpointCorruptedError(
            f"{where}: {manifest.structure_file} does not hold an object",
            path=manifest.structure_file,
        )
    return document


def _decode_file(
    manifest: Manifest,
    file: str,
    source: Path | torch.Tensor,
    where: str,
    planar: Callable[[str], bool] | None,
) -> tuple[dict[str, Any], dict[str, tuple[int | None, int]]]:
    """One verified tensor file's tensors and their offsets, by its format's one reader."""
    if file.endswith(zstd_io.EXTENSION):  # (archived or incremental: mixed files)
        if not isinstance(source, torch.Tensor):
            source = torch.frombuffer(bytearray(source.read_bytes()), dtype=torch.uint8)
        return zstd_io.read_buffer(source, file, where, planar)
    if isinstance(source, torch.Tensor):
        return safetensors_io.read_buffer(source, file, where)
    _, module = FORMAT_CODECS[manifest.format]
    return module.read(source, where)


def _check_against_index(
    loaded: Mapping[str, torch.Tensor | PlanarTensor],
    offsets: Mapping[str, tuple[int | None, int]],
    expected: Mapping[str, TensorEntry],
    file: str,
    where: str,
) -> None:
    """The file must hold exactly the manifest's tensors for it, each of the dtype, shape,
    offset and size the manifest's index gives it."""
    if set(loaded) != set(expected):
        raise CheckpointCorruptedError(
            f"{where}: {file} holds tensors {sorted(set(loaded) ^ set(expected))[:5]} "
            "that differ from the manifest's index",
            path=file,
        )
    for name, tensor in loaded.items():
        entry = expected[name]
        if tuple(tensor.shape) != entry.shape or str(tensor.dtype) != f"torch.{entry.dtype}":
            raise CheckpointCorruptedError(
                f"{where}: tensor {name} in {file} is {tensor.dtype}{list(tensor.shape)}, "
                f"the manifest says {entry.dtype}{list(entry.shape)}",
                path=file,
            )
        offset, nbytes = offsets.get(name, (None, tensor.numel() * tensor.element_size()))
        if (entry.offset, entry.nbytes) != (offset, nbytes):
            raise CheckpointCorruptedError(
                f"{where}: tensor {name} in {file} lies at offset {offset} ({nbytes} bytes), "
                f"the manifest says offset {entry.offset} ({entry.nbytes} bytes)",
                path=file,
            )
