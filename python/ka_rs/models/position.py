"""Sine positional encodings: DETR's 2-D encoding of feature-map cells, and of boxes.

:class:`PositionEmbeddingSine` reproduces DETR's normalised encoding: each valid (non-padded)
cell gets its cumulative row / column index, normalised to ``(0, 2π]`` over the valid extent of
its own image, and encoded with sines and cosines of geometrically spaced frequencies. The
first half of the channels encodes y, the second half x.

:func:`box_sine_embedding` encodes normalised boxes (cx, cy, w, h) the same way (each
coordinate times 2π), which the anchor variant turns into query positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "box_sine_embedding"]


def _sine_features(coords: Tensor, num_feats: int, temperature: float) -> Tensor:
    """Interleaved sin/cos features of ``coords`` (...,) -> (..., num_feats)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    x = coords[..., None] / dim_t
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised 2-D sine positional encoding.

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels
            (use ``hidden_dim // 2``). Must be even.
        temperature: base of the frequency progression.
        normalize: scale each axis to ``(0, scale]`` over the image's valid extent.
        scale: the normalisation range (``2π``).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        if num_pos_feats <= 0 or num_pos_feats % 2:
            raise ValueError(f"num_pos_feats: expected a positive even number, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        """Encode the cells of ``mask`` (B, h, w) bool (True = padded).

        Returns:
            ``(B, 2 * num_pos_feats, h, w)`` float32: y features first, then x features.
        """
        valid = (~mask).to(torch.float32)
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        pos_y = _sine_features(y, self.num_pos_feats, self.temperature)
        pos_x = _sine_features(x, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalised boxes.

    Args:
        boxes: ``(..., 4)`` normalised (cx, cy, w, h) in [0, 1] (or (..., 2) points).
        num_feats: features per coordinate (even).
        temperature: base of the frequency progression.

    Returns:
        ``(..., boxes.shape[-1] * num_feats)``, coordinates in the order (cy, cx, w, h) so that
        the point part lines up with :class:`PositionEmbeddingSine`'s (y, x) channel order.
    """
    if num_feats <= 0 or num_feats % 2:
        raise ValueError(f"num_feats: expected a positive even number, got {num_feats}")
    scaled = boxes * (2 * math.pi)
    order = [1, 0, *range(2, boxes.shape[-1])]
    feats = [_sine_features(scaled[..., i], num_feats, temperature) for i in order]
    return torch.cat(feats, dim=-1)
