"""The demo's network and data, in their own module so ``model_factory`` can import them.

``model_factory`` must be importable by path (``"demo_model:Classifier"``): a class defined
in a script run as ``__main__`` could not be found again by the pyfunc loader.
"""

from __future__ import annotations

import torch


class Classifier(torch.nn.Module):
    """A small MLP with dropout."""

    def __init__(self, features: int = 20, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def synthetic_batch(gen: torch.Generator, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs in 20 dimensions: no downloads, fully reproducible."""
    labels = torch.randint(0, 4, (n,), generator=gen)
    centers = torch.eye(20)[:4] * 3.0
    return centers[labels] + torch.randn(n, 20, generator=gen), labels
