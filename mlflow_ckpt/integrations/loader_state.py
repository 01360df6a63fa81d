"""The random generators of the train DataLoaders: the data order a resumed training repeats.

``DataLoader(ds, shuffle=True, generator=torch.Generator().manual_seed(s))`` draws each
epoch's permutation from that generator (its ``RandomSampler`` holds the same object), and
every new iterator first draws a base seed for its workers from ``loader.generator``. The
global random streams do not cover it, so without it a resumed training replays epoch 0's
order. :class:`LoaderGenerators` saves and restores every generator reachable from the
loaders (the loader's, its sampler's, its batch sampler's sampler's, and what Accelerate's
``DataLoaderShard`` wraps), each once, keyed by where it was found.

Frameworks hand the loaders over at different moments, so the loaders are given as a
function; a restore that comes before the framework has built them is kept and applied by
:meth:`LoaderGenerators.apply_pending` once they exist.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Where a generator may hang off a loader (DataLoader, Accelerate's DataLoaderShard).
_PATHS = (
    "generator",
    "sampler.generator",
    "batch_sampler.sampler.generator",
    "synchronized_generator",
    "base_dataloader.generator",
    "base_dataloader.sampler.generator",
    "base_dataloader.batch_sampler.sampler.generator",
)


def flatten_loaders(loaders: Any) -> list[Any]:
    """The loaders in ``loaders``: one, or a list/tuple/dict of them (Lightning's
    ``trainer.train_dataloader`` is whatever the user gave ``fit``)."""
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return [leaf for key in sorted(loaders, key=str) for leaf in flatten_loaders(loaders[key])]
    if isinstance(loaders, list | tuple):
        return [leaf for item in loaders for leaf in flatten_loaders(item)]
    return [loaders]


def _attribute(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def loader_generators(loaders: Iterable[Any]) -> dict[str, torch.Generator]:
    """Every generator reachable from ``loaders``, once each, keyed ``"<index>.<path>"``."""
    found: dict[str, torch.Generator] = {}
    seen: set[int] = set()
    for index, loader in enumerate(loaders):
        for path in _PATHS:
            generator = _attribute(loader, path)
            if isinstance(generator, torch.Generator) and id(generator) not in seen:
                seen.add(id(generator))
                found[f"{index}.{path}"] = generator
    return found


class LoaderGenerators:
    """A ``Stateful`` of the train loaders' generators; ``loaders`` returns the loaders (or
    ``None`` while the framework has not built them yet)."""

    # Checkpoints written before the loaders were saved restore without this entry.
    optional_in_checkpoint = True

    def __init__(self, loaders: Callable[[], Any]) -> None:
        self._loaders = loaders
        self._pending: dict[str, torch.Tensor] | None = None

    @property
    def pending(self) -> bool:
        """Whether restored states wait for the loaders to exist."""
        return self._pending is not None

    def _generators(self) -> dict[str, torch.Generator] | None:
        loaders = flatten_loaders(self._loaders())
        return loader_generators(loaders) if loaders else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._pending is not None:  # restored, not applied yet: still the true position
            return dict(self._pending)
        return {path: g.get_state() for path, g in (self._generators() or {}).items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.apply_pending()  # now, if the loaders exist yet

    def apply_pending(self, *, iterators_made: int = 0) -> None:
        """Give the loaders the restored states (if a restore is pending and they exist).

        ``iterators_made``: iterators the framework already made from each loader since it
        was built (Lightning makes the first epoch's before any callback hook): each drew
        its base seed from ``loader.generator``, which is drawn again here so the next draw
        (the shuffle) comes where it came in the uninterrupted run."""
        pending, generators = self._pending, self._generators()
        if pending is None or generators is None:
            return
        self._pending = None
        unknown = sorted(set(pending) - set(generators))
        missing = sorted(set(generators) - set(pending))
        if unknown or missing:
            logger.warning(
                "The train loaders differ from the checkpoint's: generators %s are new (they "
                "keep their own order), %s are gone; the data order of the resumed training "
                "can differ from the uninterrupted one",
                missing or "none",
                unknown or "none",
            )
        for path, generator in generators.items():
            if path in pending:
                generator.set_state(pending[path])
                if path.endswith(".generator") and path.count(".") == 1:  # loader.generator
                    for _ in range(iterators_made):
                        torch.empty((), dtype=torch.int64).random_(generator=generator)
