"""DETR's Transformer: encoder and decoder layers, pre-norm by default, batch-first.

All tensors are batch-first: tokens ``(B, S, d)``, queries ``(B, Q, d)``. Masks follow PyTorch's
convention: ``key_padding_mask`` (B, S) bool, True = padded token (ignored as a key);
``attn_mask`` (S, S) bool, True = the query token may NOT attend to that key token.

**Pre-norm** (``normalize_before=True``, the ka_rs default, DESIGN §1.1): every sub-block is
``x = x + Dropout(Block(LayerNorm(x)))`` and the encoder / decoder end with a final LayerNorm.
**Post-norm** (``normalize_before=False``, the official facebookresearch/detr default):
``x = LayerNorm(x + Dropout(Block(x)))``, no final encoder norm; the decoder still normalises its
outputs. Post-norm exists so that converted DETR checkpoints reproduce DETR
(:func:`ka_rs.models.load_detr_checkpoint`).

Positional encodings are added to queries and keys (never values) in every attention, as in
DETR. The encoder returns every layer's output (before the final norm: the hook points of
sequence-level amalgamation) and the memory (after it). The decoder returns every layer's
output after the shared final norm (for auxiliary losses). :class:`AnchorDecoder` is the
decoder of the ``"anchor"`` variant: each query carries a box that every layer refines.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ka_rs.models.position import box_sine_embedding

__all__ = [
    "MLP",
    "AnchorDecoder",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "inverse_sigmoid",
]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both terms to at least ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head).

    Maps ``(..., input_dim)`` to ``(..., output_dim)``; submodules are ``layers.0`` ..
    ``layers.{num_layers-1}`` as in DETR's state dicts.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """Self-attention + feed-forward block over tokens ``(B, S, d)``.

    Args:
        d_model: token width d.
        nhead: attention heads (must divide d).
        dim_feedforward: hidden width of the feed-forward block.
        dropout: dropout after attention / inside and after the feed-forward block.
        normalize_before: pre-norm (True) or post-norm (False).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        normalize_before: bool = True,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _attend(
        self, x: Tensor, pos: Tensor | None, padding: Tensor | None, attn_mask: Tensor | None
    ) -> Tensor:
        q = k = _with_pos(x, pos)
        out = self.self_attn(
            q, k, x, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False
        )[0]
        return self.dropout(out)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(
        self,
        src: Tensor,
        pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Update ``src`` (B, S, d) given ``pos`` (B, S, d); returns (B, S, d)."""
        if self.normalize_before:
            src = src + self._attend(self.norm1(src), pos, key_padding_mask, attn_mask)
            return src + self._ffn(self.norm2(src))
        src = self.norm1(src + self._attend(src, pos, key_padding_mask, attn_mask))
        return self.norm2(src + self._ffn(src))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers plus the final LayerNorm (pre-norm only).

    ``layers.{i}`` and ``norm`` name the submodules as in DETR's state dicts.
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        normalize_before: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model) if normalize_before else None

    def forward(
        self,
        src: Tensor,
        pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """Encode ``src`` (B, S, d).

        Args:
            src: input tokens (B, S, d).
            pos: positional encoding (B, S, d), added to queries and keys in every layer.
            key_padding_mask: (B, S) bool, True = padded token.
            attn_mask: (S, S) bool, True = attention forbidden (e.g. the student's
                block-diagonal "no cross-slot" mask), or None.

        Returns:
            ``(layer_outputs, memory)``: each layer's output (B, S, d) *before* the final norm,
            and the memory (B, S, d) = final norm of the last output (the last output itself
            for post-norm).
        """
        outputs = []
        x = src
        for layer in self.layers:
            x = layer(x, pos, key_padding_mask, attn_mask)
            outputs.append(x)
        memory = x if self.norm is None else self.norm(x)
        return outputs, memory


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the memory, feed-forward; ``(B, Q, d)``."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        normalize_before: bool = True,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _self(self, x: Tensor, query_pos: Tensor | None) -> Tensor:
        q = k = _with_pos(x, query_pos)
        return self.dropout(self.self_attn(q, k, x, need_weights=False)[0])

    def _cross(
        self,
        x: Tensor,
        memory: Tensor,
        query_pos: Tensor | None,
        memory_pos: Tensor | None,
        padding: Tensor | None,
    ) -> Tensor:
        out = self.cross_attn(
            _with_pos(x, query_pos),
            _with_pos(memory, memory_pos),
            memory,
            key_padding_mask=padding,
            need_weights=False,
        )[0]
        return self.dropout(out)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        query_pos: Tensor | None = None,
        memory_pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Update queries ``tgt`` (B, Q, d) against ``memory`` (B, S, d); returns (B, Q, d)."""
        pad = memory_key_padding_mask
        if self.normalize_before:
            tgt = tgt + self._self(self.norm1(tgt), query_pos)
            tgt = tgt + self._cross(self.norm2(tgt), memory, query_pos, memory_pos, pad)
            return tgt + self._ffn(self.norm3(tgt))
        tgt = self.norm1(tgt + self._self(tgt, query_pos))
        tgt = self.norm2(tgt + self._cross(tgt, memory, query_pos, memory_pos, pad))
        return self.norm3(tgt + self._ffn(tgt))


class TransformerDecoder(nn.Module):
    """A stack of decoder layers with a shared output LayerNorm (``layers.{i}``, ``norm``)."""

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        normalize_before: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        query_pos: Tensor | None = None,
        memory_pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Decode queries.

        Args:
            tgt: initial query content (B, Q, d) (DETR: zeros).
            memory: encoder memory (B, S, d).
            query_pos: query positional embedding (B, Q, d) (DETR: the learned object queries).
            memory_pos: memory positional encoding (B, S, d).
            memory_key_padding_mask: (B, S) bool, True = padded token.

        Returns:
            ``(L, B, Q, d)``: every layer's output after the shared final norm.
        """
        outputs = []
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, query_pos, memory_pos, memory_key_padding_mask)
            outputs.append(self.norm(x))
        return torch.stack(outputs)


class AnchorDecoder(TransformerDecoder):
    """Decoder whose queries carry boxes refined layer by layer (the ``"anchor"`` variant).

    Each query ``q`` holds a reference box ``r_q`` (normalised cxcywh). Before every layer the
    query's positional embedding is computed from its current box,
    ``query_pos = ref_point_head(box_sine_embedding(r_q))`` (a 2-layer MLP over the 4·d/2 sine
    features), so attention "looks" where the box is. After layer ``l`` the shared box head
    predicts a delta in inverse-sigmoid space:
    ``box_l = sigmoid(box_head(h_l) + inverse_sigmoid(r_q))``, and ``r_q <- box_l.detach()``
    (gradients do not flow between layers through the boxes, as in Deformable DETR's box
    refinement). The initial boxes are the model's learnable anchors.
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        normalize_before: bool = True,
    ) -> None:
        super().__init__(num_layers, d_model, nhead, dim_feedforward, dropout, normalize_before)
        if d_model % 2:
            raise ValueError(f"d_model: the anchor decoder needs an even width, got {d_model}")
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)

    def forward_refine(
        self,
        tgt: Tensor,
        memory: Tensor,
        anchors: Tensor,
        box_head: Callable[[Tensor], Tensor],
        memory_pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Decode queries and refine their boxes.

        Args:
            tgt: initial query content (B, Q, d).
            memory: encoder memory (B, S, d).
            anchors: initial boxes (B, Q, 4) in inverse-sigmoid (logit) space.
            box_head: maps (B, Q, d) -> (B, Q, 4) box deltas in logit space.
            memory_pos: memory positional encoding (B, S, d).
            memory_key_padding_mask: (B, S) bool, True = padded token.

        Returns:
            ``(hidden (L, B, Q, d), boxes (L, B, Q, 4))``: normed outputs of each layer and the
            box each layer predicts (normalised cxcywh, sigmoid).
        """
        d = tgt.shape[-1]
        hidden, boxes = [], []
        ref_logit = anchors
        x = tgt
        for layer in self.layers:
            ref = ref_logit.sigmoid()
            query_pos = self.ref_point_head(box_sine_embedding(ref, d // 2))
            x = layer(x, memory, query_pos, memory_pos, memory_key_padding_mask)
            h = self.norm(x)
            box_logit = box_head(h) + ref_logit
            hidden.append(h)
            boxes.append(box_logit.sigmoid())
            ref_logit = box_logit.detach()
        return torch.stack(hidden), torch.stack(boxes)


class Transformer(nn.Module):
    """Holds DETR's ``encoder`` and ``decoder`` (state-dict prefix ``transformer.``).

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
        normalize_before: as in DETR.
        anchor_decoder: use :class:`AnchorDecoder` (the ``"anchor"`` variant).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = True,
        anchor_decoder: bool = False,
    ) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"nheads: {nhead} does not divide hidden_dim {d_model}")
        args = (d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(num_encoder_layers, *args)
        decoder_cls = AnchorDecoder if anchor_decoder else TransformerDecoder
        self.decoder = decoder_cls(num_decoder_layers, *args)
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
