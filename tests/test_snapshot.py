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


def test_async_snapshots_reuse_the_previous_host_memory() -> None:
    from mlflow_ckpt.snapshot.host_buffers import HostBuffers

    buffers = HostBuffers()
    state = {"w": torch.arange(1000.0), "b": torch.ones(7, dtype=torch.int64)}
    first = take_snapshot(state, {}, include_rng=False, buffers=buffers)
    pointers = {name: t.data_ptr() for name, t in first.tensors.items()}
    assert all(pointers[n] != state[n].data_ptr() for n in state)  # copies, not the live ones
    buffers.recycle()  # the first snapshot is written
    state["w"] += 1
    second = take_snapshot(state, {}, include_rng=False, buffers=buffers)
    assert {n: t.data_ptr() for n, t in second.tensors.items()} == pointers  # same memory
    assert torch.equal(second.tensors["w"], torch.arange(1000.0) + 1)
    # a tensor whose shape changed gets new memory; the unused old buffer is dropped
    buffers.recycle()
    state["w"] = torch.zeros(10)
    third = take_snapshot(state, {}, include_rng=False, buffers=buffers)
    assert third.tensors["w"].data_ptr() != pointers["w"]
    buffers.recycle()
    assert buffers.nbytes == 10 * 4 + 7 * 8
