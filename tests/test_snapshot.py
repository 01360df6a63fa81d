"""Snapshot-level checks that need no MLflow."""

from __future__ import annotations

import torch

from mlflow_ckpt.snapshot import take_snapshot


class FreshState:
    """Returns a newly allocated tensor from every state_dict() call, like get_state()."""

    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"t": torch.full((1264,), self.value, dtype=torch.int32)}

    def load_state_dict(self, state: dict) -> None:
        self.value = int(state["t"][0])


def test_freed_temporaries_do_not_alias_later_tensors() -> None:
    state = {f"s{i}": FreshState(i) for i in range(64)}
    snap = take_snapshot(state, {}, include_rng=False)
    refs = [node["value"]["t"]["__tensor__"] for node in snap.document["state"].values()]
    assert len(set(refs)) == 64
    for i, ref in enumerate(refs):
        assert int(snap.tensors[ref][0]) == i


def test_real_sharing_is_stored_once() -> None:
    base = torch.arange(10.0)
    snap = take_snapshot({"a": base, "b": {"same": base}, "view": base[2:5]}, {}, include_rng=False)
    assert snap.document["state"]["b"]["same"] == snap.document["state"]["a"]
    assert snap.document["state"]["view"] != snap.document["state"]["a"]
    assert len(snap.tensors) == 2
