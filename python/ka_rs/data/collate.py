"""Batching images of different sizes: zero-padding plus a padding mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Target

__all__ = ["collate_fn", "pad_images"]


def pad_images(
    images: Sequence[torch.Tensor], pad_to_multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(C, H_i, W_i)`` tensors into ``(B, C, Hmax, Wmax)``, zero-padded at the bottom and
    right, and a bool mask ``(B, Hmax, Wmax)`` that is **True on padded pixels**.

    ``pad_to_multiple`` rounds ``Hmax``/``Wmax`` up to a multiple (e.g. the backbone stride).
    """
    if not images:
        raise ValueError("images: empty batch")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple: expected >= 1, got {pad_to_multiple}")
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dim() != 3:
            kind = type(img).__name__
            shape = f" of shape {tuple(img.shape)}" if isinstance(img, torch.Tensor) else ""
            raise ValueError(
                f"batch: item {i} image is a {kind}{shape}, expected a (3, H, W) tensor; "
                "give the dataset transforms, e.g. ka_rs.data.make_transforms(...)"
            )
        if img.shape[0] != images[0].shape[0] or img.dtype != images[0].dtype:
            raise ValueError(
                f"batch: item {i} image has {img.shape[0]} channels / {img.dtype}, item 0 has "
                f"{images[0].shape[0]} / {images[0].dtype}"
            )
    c = int(images[0].shape[0])
    hmax = max(int(img.shape[1]) for img in images)
    wmax = max(int(img.shape[2]) for img in images)
    m = pad_to_multiple
    hmax, wmax = -(-hmax // m) * m, -(-wmax // m) * m
    batch = images[0].new_zeros((len(images), c, hmax, wmax))
    mask = torch.ones((len(images), hmax, wmax), dtype=torch.bool)
    for i, img in enumerate(images):
        h, w = int(img.shape[1]), int(img.shape[2])
        batch[i, :, :h, :w].copy_(img)
        mask[i, :h, :w] = False
    return batch, mask


def collate_fn(
    batch: Sequence[tuple[torch.Tensor, Target]], pad_to_multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor, list[Target]]:
    """DataLoader ``collate_fn`` for detection items ``(image (3,H,W), target)``.

    Returns ``(images (B, 3, Hmax, Wmax) float, mask (B, Hmax, Wmax) bool, True = padding,
    targets: list of the B target dicts unchanged)``. Boxes stay normalised to each image's own
    unpadded size (as :class:`~ka_rs.data.transforms.Normalize` made them). Use
    ``functools.partial(collate_fn, pad_to_multiple=32)`` to pad to a stride.
    """
    if len(batch) == 0:
        raise ValueError("batch: empty batch")
    images: list[Any] = []
    targets: list[Target] = []
    for i, item in enumerate(batch):
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ValueError(f"batch: item {i} is not an (image, target) pair")
        images.append(item[0])
        targets.append(item[1])
    padded, mask = pad_images(images, pad_to_multiple)
    return padded, mask, targets
