"""Codec layer: tensor file formats, hashing, the checkpoint folder layout and its manifest."""

from mlflow_ckpt.codec.layout import (
    DEFAULT_MAX_SHARD_BYTES,
    FORMATS,
    STRUCTURE_FILE,
    EncodedFiles,
    check_file,
    check_format,
    check_sizes,
    read_manifest,
    read_state,
    verify_files,
    write_file,
    write_manifest,
    write_state,
)
from mlflow_ckpt.codec.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    TensorEntry,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "FORMATS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "STRUCTURE_FILE",
    "EncodedFiles",
    "FileEntry",
    "Manifest",
    "TensorEntry",
    "check_file",
    "check_format",
    "check_sizes",
    "read_manifest",
    "read_state",
    "verify_files",
    "write_file",
    "write_manifest",
    "write_state",
]
