"""The temporary folder resume_path writes into: only a folder it made is ever removed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlflow_ckpt.integrations.resume_folder import (
    MARKER,
    PREFIX,
    make_temporary,
    remove_temporary,
    temporary_root,
)


def test_a_folder_resume_path_made_is_recognised_and_removed(own_tempdir: Path) -> None:
    folder = make_temporary("run123")
    assert folder.parent == own_tempdir.resolve() and folder.name.startswith(PREFIX)
    (folder / "checkpoint-8").mkdir()
    (folder / "checkpoint-8" / "model.safetensors").write_bytes(b"x" * 10)
    assert temporary_root(folder) == folder
    assert temporary_root(str(folder)) == folder
    remove_temporary(folder)
    assert not folder.exists()
    remove_temporary(folder)  # already gone: nothing to do
    assert temporary_root(folder) is None


@pytest.mark.parametrize(
    "marker",
    [None, "not json", '["a list"]', '{"folder": "/somewhere/else"}', '{"run_id": "r"}'],
    ids=["no marker", "not JSON", "not an object", "names another folder", "names none"],
)
def test_any_other_folder_is_not_taken_for_one(own_tempdir: Path, marker: str | None) -> None:
    folder = own_tempdir / "mine"
    folder.mkdir()
    if marker is not None:
        (folder / MARKER).write_text(marker)
    assert temporary_root(folder) is None
    assert temporary_root(None) is None and temporary_root("") is None
    assert temporary_root(own_tempdir / "missing") is None


def test_a_copy_of_a_temporary_folder_is_not_removable(own_tempdir: Path) -> None:
    """The marker names the folder itself: a copy (or a folder a checkpoint names after a
    move) keeps the original's marker and is left alone."""
    folder = make_temporary("run123")
    copy = own_tempdir / "copy"
    shutil.copytree(folder, copy)
    assert json.loads((copy / MARKER).read_text())["folder"] == str(folder)
    assert temporary_root(copy) is None
    assert temporary_root(folder) == folder
