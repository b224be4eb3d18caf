"""Shared pytest fixtures: seeded RNGs and random DETR-style batches."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    """A numpy Generator with a fixed seed (each test gets a fresh one)."""
    return np.random.default_rng(0)


@pytest.fixture
def torch_gen() -> torch.Generator:
    """A torch CPU Generator with a fixed seed (each test gets a fresh one)."""
    return torch.Generator().manual_seed(0)


def random_cxcywh(n: int, gen: torch.Generator, min_size: float = 0.02) -> torch.Tensor:
    """(n, 4) float32 normalised cxcywh boxes lying inside the unit square."""
    wh = min_size + (1.0 - min_size) * torch.rand(n, 2, generator=gen) * 0.5
    c = wh / 2 + torch.rand(n, 2, generator=gen) * (1.0 - wh)
    return torch.cat([c, wh], dim=1)


@pytest.fixture
def make_detr_batch(
    torch_gen: torch.Generator,
) -> Callable[..., tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]]:
    """Factory for ``(outputs, targets)`` like a DETR model's and a data loader's.

    ``make_detr_batch(batch=4, queries=100, num_classes=91, max_targets=20,
    class_head="softmax", sizes=None)`` gives ``outputs = {"pred_logits": (B, Q, K),
    "pred_boxes": (B, Q, 4)}`` with ``K = C + 1`` (softmax) or ``C`` (sigmoid), and ``targets``,
    a list of B dicts with ``"labels"`` (T_i,) int64 and ``"boxes"`` (T_i, 4) cxcywh. ``sizes``
    fixes the T_i; otherwise they are drawn in [0, max_targets].
    """

    def make(
        batch: int = 4,
        queries: int = 100,
        num_classes: int = 91,
        max_targets: int = 20,
        class_head: str = "softmax",
        sizes: list[int] | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        k = num_classes + 1 if class_head == "softmax" else num_classes
        logits = torch.randn(batch, queries, k, generator=torch_gen) * 2.0
        boxes = random_cxcywh(batch * queries, torch_gen).reshape(batch, queries, 4)
        if sizes is None:
            sizes = torch.randint(0, max_targets + 1, (batch,), generator=torch_gen).tolist()
        targets = [
            {
                "labels": torch.randint(0, num_classes, (t,), generator=torch_gen),
                "boxes": random_cxcywh(t, torch_gen),
            }
            for t in sizes
        ]
        return {"pred_logits": logits, "pred_boxes": boxes}, targets

    return make
