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

**Mixed precision.** Every attention goes through :func:`attention`. Without autocast it calls
the ``nn.MultiheadAttention`` module as is (float32 results are unchanged, bit for bit). Under
:func:`torch.autocast` (``train.amp = "bf16"`` / ``"fp16"``, :mod:`ka_rs.engine.amp`) it
computes the same thing from the module's parameters with the q/k/v input projections and the
output projection under autocast (low precision), but the attention itself (q·kᵀ, mask, softmax,
·v) in float32 with autocast disabled: bf16 attention loses accuracy in the softmax and, on
CPUs, its backward is about twice as slow as float32's. State-dict keys do not change.
"""

from __future__ import annotations

import math
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
    "attention",
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

    @torch.no_grad()
    def zero_output(self) -> None:
        """Zero the last layer's weight and bias: the MLP starts by predicting 0 (a zero box
        delta)."""
        last = self.layers[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def attention(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Batch-first multi-head attention through ``mha``'s parameters; returns (B, L, d).

    Args:
        mha: a batch-first ``nn.MultiheadAttention`` (its weights, heads and dropout are used).
        query: (B, L, d); key, value: (B, S, d).
        key_padding_mask: (B, S) bool (True = ignored key) or float (added), or None.
        attn_mask: (L, S) or (B·nhead, L, S), bool (True = forbidden) or float (added to the
            logits), or None.

    Without autocast this is ``mha(query, key, value, ..., need_weights=False)[0]``, unchanged.
    Under autocast the projections run under autocast and the attention core in float32
    (see the module docstring); the result is in the autocast dtype, as
    ``nn.MultiheadAttention`` would return it.
    """
    if not torch.is_autocast_enabled(query.device.type) or not _plain_mha(mha):
        out: Tensor = mha(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=False,
        )[0]
        return out
    return _attention_fp32_core(mha, query, key, value, key_padding_mask, attn_mask)


def _plain_mha(mha: nn.MultiheadAttention) -> bool:
    """Whether :func:`_attention_fp32_core` can reproduce ``mha`` (batch-first, packed q/k/v
    projection, no bias_k / bias_v / zero attention) -- every attention of these models."""
    return bool(
        mha.batch_first
        and mha._qkv_same_embed_dim
        and mha.in_proj_weight is not None
        and mha.bias_k is None
        and mha.bias_v is None
        and not mha.add_zero_attn
    )


def _merged_mask(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    device: torch.device,
) -> Tensor | None:
    """One float32 additive mask broadcastable to (B, nhead, L, S) (-inf = forbidden)."""
    mask: Tensor | None = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = torch.zeros(attn_mask.shape, dtype=torch.float32, device=device)
            mask = mask.masked_fill(attn_mask, float("-inf"))
        else:
            mask = attn_mask.float()
        if mask.dim() == 3:
            mask = mask.view(batch, heads, q_len, k_len)
    if key_padding_mask is not None:
        pad = key_padding_mask.view(batch, 1, 1, k_len)
        if pad.dtype == torch.bool:
            pad = torch.zeros(pad.shape, dtype=torch.float32, device=device).masked_fill(
                pad, float("-inf")
            )
        mask = pad.float() if mask is None else mask + pad.float()
    return mask


def _attention_fp32_core(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
) -> Tensor:
    """``mha``'s computation with its attention core (scores, softmax, ·v) in float32 and
    autocast disabled; the projections run in whatever precision is current (see
    :func:`attention`)."""
    b, q_len, d = query.shape
    k_len = key.shape[1]
    h = mha.num_heads
    w, bias = mha.in_proj_weight, mha.in_proj_bias
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
    if query is key:  # self-attention: one projection for q and k
        q, k = F.linear(query, w[: 2 * d], None if bias is None else bias[: 2 * d]).chunk(2, -1)
    else:
        q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
    v = F.linear(value, w_v, b_v)

    def split_heads(x: Tensor, length: int) -> Tensor:  # (B, n, d) -> (B, nhead, n, d/nhead)
        return x.reshape(b, length, h, d // h).transpose(1, 2).float()

    mask = _merged_mask(key_padding_mask, attn_mask, b, h, q_len, k_len, query.device)
    dropout_p = mha.dropout if mha.training else 0.0
    dev = query.device.type
    with torch.autocast(dev, enabled=False):
        out = F.scaled_dot_product_attention(
            split_heads(q, q_len),
            split_heads(k, k_len),
            split_heads(v, k_len),
            attn_mask=mask,
            dropout_p=dropout_p,
        )
    out = out.transpose(1, 2).reshape(b, q_len, d)
    if torch.is_autocast_enabled(dev):
        out = out.to(torch.get_autocast_dtype(dev))
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


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
        out = attention(self.self_attn, q, k, x, key_padding_mask=padding, attn_mask=attn_mask)
        dropped: Tensor = self.dropout(out)
        return dropped

    def _ffn(self, x: Tensor) -> Tensor:
        out: Tensor = self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return out

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
        out: Tensor = self.norm2(src + self._ffn(src))
        return out


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
        out: Tensor = self.dropout(attention(self.self_attn, q, k, x))
        return out

    def _cross(
        self,
        x: Tensor,
        memory: Tensor,
        query_pos: Tensor | None,
        memory_pos: Tensor | None,
        padding: Tensor | None,
        bias: Tensor | None = None,
    ) -> Tensor:
        if bias is not None and padding is not None:
            # one float mask (PyTorch deprecates mixing a float attn_mask with a bool
            # key_padding_mask): -inf on padded keys, the bias elsewhere
            b, q, s = x.shape[0], x.shape[1], memory.shape[1]
            pad = padding[:, None, None, :].expand(b, self.cross_attn.num_heads, q, s)
            bias = bias.masked_fill(pad.reshape(-1, q, s), float("-inf"))
            padding = None
        out = attention(
            self.cross_attn,
            _with_pos(x, query_pos),
            _with_pos(memory, memory_pos),
            memory,
            key_padding_mask=padding,
            attn_mask=bias,
        )
        dropped: Tensor = self.dropout(out)
        return dropped

    def _ffn(self, x: Tensor) -> Tensor:
        out: Tensor = self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return out

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        query_pos: Tensor | None = None,
        memory_pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        cross_attn_bias: Tensor | None = None,
    ) -> Tensor:
        """Update queries ``tgt`` (B, Q, d) against ``memory`` (B, S, d); returns (B, Q, d).

        ``cross_attn_bias`` (B·nhead, Q, S) float is added to the cross-attention logits
        (the anchor variant's box prior), or None.
        """
        pad = memory_key_padding_mask
        bias = cross_attn_bias
        if self.normalize_before:
            tgt = tgt + self._self(self.norm1(tgt), query_pos)
            tgt = tgt + self._cross(self.norm2(tgt), memory, query_pos, memory_pos, pad, bias)
            return tgt + self._ffn(self.norm3(tgt))
        tgt = self.norm1(tgt + self._self(tgt, query_pos))
        tgt = self.norm2(tgt + self._cross(tgt, memory, query_pos, memory_pos, pad, bias))
        out: Tensor = self.norm3(tgt + self._ffn(tgt))
        return out


class TransformerDecoder(nn.Module):
    """A stack of decoder layers with a shared output LayerNorm (``layers.{i}``, ``norm``).

    ``renorm_between_layers``: each layer reads the previous layer's normed output and the last
    output is normed twice (Hugging Face transformers' DETR with ``auxiliary_loss``); the
    default is DETR's (layers chained on un-normed outputs, each output normed once).
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        normalize_before: bool = True,
        renorm_between_layers: bool = False,
    ) -> None:
        super().__init__()
        self.renorm_between_layers = bool(renorm_between_layers)
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
            if self.renorm_between_layers:
                x = self.norm(x)
                outputs.append(x)
            else:
                outputs.append(self.norm(x))
        if self.renorm_between_layers:
            outputs[-1] = self.norm(outputs[-1])
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

    **Box prior** (``box_prior=True``, given token centres): each cross-attention also gets an
    additive Gaussian bias centred on the query's current box (SMCA-style spatial modulation,
    still dense attention)::

        bias[h, q, s] = -((x_s - cx_q)^2 / (2 (k_h w_q)^2) + (y_s - cy_q)^2 / (2 (k_h h_q)^2))

    with a learnable spread ``k_h = exp(box_prior_log_scale[layer, h])`` per layer and head
    (initialised from 0.5 to 2 box sizes across heads) and ``w_q, h_q`` clamped to at least
    0.02. From the first step each query reads the features around its box, which removes
    DETR's long initial stall on small CPU budgets.
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        normalize_before: bool = True,
        box_prior: bool = False,
    ) -> None:
        super().__init__(num_layers, d_model, nhead, dim_feedforward, dropout, normalize_before)
        if d_model % 2:
            raise ValueError(f"d_model: the anchor decoder needs an even width, got {d_model}")
        self.nhead = nhead
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.box_prior_log_scale: nn.Parameter | None = None
        if box_prior:
            init = torch.linspace(math.log(0.5), math.log(2.0), nhead) if nhead > 1 else None
            scale = init if init is not None else torch.zeros(1)
            self.box_prior_log_scale = nn.Parameter(scale.repeat(num_layers, 1))

    def box_prior(self, layer: int, boxes: Tensor, token_xy: Tensor) -> Tensor:
        """Gaussian cross-attention bias of decoder ``layer``.

        Args:
            layer: decoder layer index.
            boxes: (B, Q, 4) current reference boxes, normalised cxcywh.
            token_xy: (B, S, 2) normalised (x, y) centres of the memory tokens.

        Returns:
            (B·nhead, Q, S) float bias (0 at the box centre, negative elsewhere).
        """
        assert self.box_prior_log_scale is not None
        scale = self.box_prior_log_scale[layer].exp()  # (H,)
        centre = boxes[..., None, :2]  # (B, Q, 1, 2)
        size = boxes[..., None, 2:].clamp(min=0.02)  # (B, Q, 1, 2)
        dist2 = ((token_xy[:, None, :, :] - centre) / size).square()  # (B, Q, S, 2)
        dist2 = dist2.sum(-1)  # (B, Q, S)
        bias = -0.5 * dist2[:, None] / scale[None, :, None, None].square()  # (B, H, Q, S)
        return bias.flatten(0, 1)

    def forward_refine(
        self,
        tgt: Tensor,
        memory: Tensor,
        anchors: Tensor,
        box_head: Callable[[Tensor], Tensor],
        memory_pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        token_xy: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Decode queries and refine their boxes.

        Args:
            tgt: initial query content (B, Q, d).
            memory: encoder memory (B, S, d).
            anchors: initial boxes (B, Q, 4) in inverse-sigmoid (logit) space.
            box_head: maps (B, Q, d) -> (B, Q, 4) box deltas in logit space.
            memory_pos: memory positional encoding (B, S, d).
            memory_key_padding_mask: (B, S) bool, True = padded token.
            token_xy: (B, S, 2) normalised token centres; required with the box prior,
                ignored without it.

        Returns:
            ``(hidden (L, B, Q, d), boxes (L, B, Q, 4))``: normed outputs of each layer and the
            box each layer predicts (normalised cxcywh, sigmoid).
        """
        if self.box_prior_log_scale is not None and token_xy is None:
            raise ValueError("token_xy: the box prior needs the memory tokens' centres")
        d = tgt.shape[-1]
        hidden, boxes = [], []
        ref_logit = anchors
        x = tgt
        for i, layer in enumerate(self.layers):
            ref = ref_logit.sigmoid()
            query_pos = self.ref_point_head(box_sine_embedding(ref, d // 2))
            bias = None
            if self.box_prior_log_scale is not None and token_xy is not None:
                bias = self.box_prior(i, ref.detach(), token_xy)
            x = layer(x, memory, query_pos, memory_pos, memory_key_padding_mask, bias)
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
        box_prior: give the anchor decoder its Gaussian box prior.
        renorm_decoder_layers: the plain decoder's ``renorm_between_layers``.
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
        box_prior: bool = False,
        renorm_decoder_layers: bool = False,
    ) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"nheads: {nhead} does not divide hidden_dim {d_model}")
        args = (d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(num_encoder_layers, *args)
        self.decoder: TransformerDecoder
        if anchor_decoder:
            self.decoder = AnchorDecoder(num_decoder_layers, *args, box_prior=box_prior)
        else:
            self.decoder = TransformerDecoder(
                num_decoder_layers, *args, renorm_between_layers=renorm_decoder_layers
            )
        self.d_model = d_model
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.endswith("box_prior_log_scale"):
                nn.init.xavier_uniform_(p)
