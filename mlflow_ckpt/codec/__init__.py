"""Codec layer: tensor file formats, hashing, the checkpoint folder layout and its manifest."""

from mlflow_ckpt.codec.layout import (
    DEFAULT_MAX_SHARD_BYTES,
    FORMATS,
    STRUCTURE_FILE,
    check_file,
    check_format,
    check_sizes,
    load_files,
    read_manifest,
    read_state,
    verify_files,
    write_manifest,
)
from mlflow_ckpt.codec.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SINGLE_FORMAT_VERSION,
    FileEntry,
    Manifest,
    TensorEntry,
    format_version_for,
)
from mlflow_ckpt.codec.shards import EncodedFiles, write_file, write_state

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "FORMATS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SINGLE_FORMAT_VERSION",
    "STRUCTURE_FILE",
    "EncodedFiles",
    "FileEntry",
    "Manifest",
    "TensorEntry",
    "check_file",
    "check_format",
    "check_sizes",
    "format_version_for",
    "load_files",
    "read_manifest",
    "read_state",
    "verify_files",
    "write_file",
    "write_manifest",
    "write_state",
]
