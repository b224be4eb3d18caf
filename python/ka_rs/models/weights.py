"""Checking a state dict against the one a model expects (keys and shapes)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

__all__ = ["state_dict_mismatch"]


def state_dict_mismatch(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], limit: int = 6
) -> str | None:
    """What keeps ``given`` from loading into a model whose state dict is ``expected``.

    Returns None when both have the same keys and every tensor the same shape; otherwise one
    line: ``"missing [...], unexpected [...]"`` (at most ``limit`` names each) or
    ``"<key> has shape (..), expected (..)"`` for the first mis-shaped tensor. ``expected``
    may live on the meta device (shapes only).
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        return f"missing {missing[:limit]}, unexpected {unexpected[:limit]}"
    for key, value in given.items():
        want = tuple(expected[key].shape)
        if tuple(value.shape) != want:
            return f"{key} has shape {tuple(value.shape)}, expected {want}"
    return None
