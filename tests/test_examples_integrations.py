"""The integration examples run end to end (autolog, Lightning, Hugging Face)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_examples import run_example


@pytest.mark.slow
def test_autolog_plain_loop_example(tmp_path: Path) -> None:
    out = run_example("autolog_plain_loop.py", tmp_path)
    assert "resumed at step 30" in out


@pytest.mark.slow
def test_lightning_resume_example(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    assert "checkpoints: [15, 11]" in run_example("lightning_resume.py", tmp_path)


@pytest.mark.slow
def test_hf_trainer_resume_example(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    assert "checkpoints: [23, 15, 7]" in run_example("hf_trainer_resume.py", tmp_path)
