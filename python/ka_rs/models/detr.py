"""DETR: backbone -> 1×1 input projection -> Transformer -> class and box heads.

Reading order of :meth:`DETR.forward`:

1. ``backbone``: images (B, 3, H, W) -> feature map (B, C, h, w) and padding mask (B, h, w).
2. ``position``: sine encoding of the feature-map cells, (B, d, h, w).
3. :meth:`DETR.encoder_input` (**the subclass hook**): feature map, mask and positions ->
   encoder tokens (B, S, d), their positions (B, S, d), padding mask (B, S) and an optional
   encoder attention mask (S, S). The default projects with ``input_proj`` (1×1 conv C -> d)
   and flattens the h·w cells into S = h·w tokens.
4. :meth:`DETR.encode` (a second hook; default ``transformer.encoder``): every layer's output
   (B, S, d) and the memory.
5. :meth:`DETR.decode`: learned queries attend to the memory; the class head and the 3-layer MLP
   box head run on every decoder layer's output.

Two variants (``DetrConfig.variant``):

- ``"detr"`` — DETR as published: object queries are learned positional embeddings, the class
  head has C + 1 logits (the last one is "no object", softmax), boxes = sigmoid(MLP(h)).
- ``"anchor"`` — faster-converging: every query carries a learnable anchor box (stored in
  inverse-sigmoid space); its positional embedding is derived from the box (sine embedding ->
  MLP), and each decoder layer adds a predicted delta to the box in inverse-sigmoid space
  (iterative refinement, detached between layers as in Deformable DETR). The class head has C
  sigmoid logits (no background) trained with focal loss. Attention stays plain (dense).
  Two opt-in aids (on in the CPU anchor presets): ``box_prior``, a Gaussian bias that points
  each query's cross-attention at its current box, and ``dense_aux``, a per-token class head on
  the encoder memory trained with a fixed token-in-box assignment (``DetrOutput.enc_outputs``).

The result is a :class:`DetrOutput` holding predictions of the last decoder layer, the auxiliary
predictions of the earlier layers, and the **sequences** used by sequence-level amalgamation:
``[projected input tokens, encoder layer 1 output, ..., encoder layer N output]``, each
(B, S, d), taken before the encoder's final norm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ka_rs.models.backbone import BACKBONES, DILATABLE, Backbone
from ka_rs.models.position import PositionEmbeddingSine
from ka_rs.models.transformer import MLP, AnchorDecoder, Transformer, inverse_sigmoid

__all__ = [
    "DETR",
    "VARIANTS",
    "DetrConfig",
    "DetrOutput",
    "EncoderInput",
    "postprocess",
    "tile_centres",
    "token_centres",
]

#: detector variants accepted by ``DetrConfig.variant``
VARIANTS = ("detr", "anchor")


@dataclass
class DetrConfig:
    """Hyper-parameters of a :class:`DETR` (defaults: the paper's DETR-R50).

    Attributes:
        num_classes: C, the number of object classes (without "no object").
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"`` or
            ``"small_cnn"``.
        hidden_dim: token width d.
        nheads: attention heads (divides ``hidden_dim``).
        enc_layers: encoder layers.
        dec_layers: decoder layers.
        dim_feedforward: hidden width of the feed-forward blocks.
        dropout: dropout in the Transformer.
        num_queries: Q, object queries (= predictions per image).
        variant: ``"detr"`` (softmax head over C + 1 logits) or ``"anchor"`` (learnable anchor
            boxes refined by each decoder layer, sigmoid head over C logits).
        pre_norm: pre-norm Transformer (ka_rs default); False = DETR's original post-norm
            (used to reproduce converted facebookresearch/detr checkpoints).
        cnn_channels: stage widths of the ``small_cnn`` backbone (ignored by ResNets); its
            output stride is ``2 ** len(cnn_channels)``.
        anchor_size: initial width and height of the anchor boxes (``"anchor"`` only).
        box_prior: ``"anchor"`` only: bias each decoder cross-attention toward the query's
            current box with a Gaussian over token centres (see
            :class:`~ka_rs.models.transformer.AnchorDecoder`); the CPU anchor presets use it.
        dense_aux: add a dense auxiliary class head on the encoder memory (sigmoid, C logits
            per token), returned in ``DetrOutput.enc_outputs`` and trained by
            :class:`~ka_rs.losses.SetCriterion` to recognise the class of the object each token
            lies in (Co-DETR-style extra supervision of backbone and encoder; inference
            ignores it). The CPU anchor presets use it.
        two_stage: ``"anchor"`` + ``dense_aux`` only: query selection from the encoder
            (Deformable-DETR two-stage / RT-DETR style). A dense box head predicts a box for
            every memory token; the Q feature-map cells with the highest dense class score
            become the decoder's queries (see :meth:`DETR.select_queries`): their boxes
            (detached) are the initial anchors and their memory features (detached) the
            initial query content. The anchors are then a fixed buffer that only fills in
            when an image has fewer cells than queries.
            :class:`~ka_rs.losses.SetCriterion` trains the dense boxes on the tokens inside a
            ground-truth box.
        dilation: DC5 backbone (DETR's ``--dilation``, torchvision's
            ``replace_stride_with_dilation=[False, False, True]``): the last ResNet stage is
            dilated instead of strided, so the output stride is 16, not 32 (4× the tokens).
            ``"resnet50"`` / ``"resnet101"`` only; the weights are those of the plain ResNet.
        renorm_decoder_layers: ``"detr"`` variant only: each decoder layer reads the previous
            layer's *normed* output and the last output is normed once more — what Hugging
            Face transformers' DETR computes when its ``auxiliary_loss`` is True (converted
            ``hf:`` teachers set it; facebookresearch/detr and ka_rs's own DETRs do not).
    """

    num_classes: int
    backbone: str = "resnet50"
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    variant: str = "detr"
    pre_norm: bool = True
    cnn_channels: tuple[int, ...] = (32, 64, 128, 128)
    anchor_size: float = 0.1
    box_prior: bool = False
    dense_aux: bool = False
    two_stage: bool = False
    dilation: bool = False
    renorm_decoder_layers: bool = False

    def __post_init__(self) -> None:
        self.cnn_channels = tuple(int(c) for c in self.cnn_channels)
        positive = ("num_classes", "hidden_dim", "nheads", "enc_layers", "dec_layers")
        for name in (*positive, "dim_feedforward", "num_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {list(BACKBONES)}, got {self.backbone!r}")
        if not isinstance(self.dilation, bool):
            raise ValueError(f"dilation: expected True or False, got {self.dilation!r}")
        if self.dilation and self.backbone not in DILATABLE:
            raise ValueError(
                f"dilation: only the {list(DILATABLE)} backbones can be dilated (DC5), "
                f"got backbone={self.backbone!r}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {self.variant!r}")
        if self.renorm_decoder_layers and self.variant != "detr":
            raise ValueError("renorm_decoder_layers: only the 'detr' variant's decoder has it")
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise ValueError(
                f"hidden_dim: must be even and divisible by nheads={self.nheads}, "
                f"got {self.hidden_dim}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")
        if not self.cnn_channels or any(c <= 0 or c % 8 for c in self.cnn_channels):
            raise ValueError(
                f"cnn_channels: expected positive multiples of 8, got {self.cnn_channels!r}"
            )
        if self.box_prior and self.variant != "anchor":
            raise ValueError("box_prior: only the 'anchor' variant has a box prior")
        if self.two_stage and not (self.variant == "anchor" and self.dense_aux):
            raise ValueError(
                "two_stage: needs variant='anchor' and dense_aux=True (the dense head scores "
                "the proposals)"
            )
        if not 0.0 < self.anchor_size < 1.0:
            raise ValueError(f"anchor_size: expected a value in (0, 1), got {self.anchor_size!r}")

    @property
    def class_head(self) -> str:
        """``"softmax"`` (variant ``"detr"``) or ``"sigmoid"`` (variant ``"anchor"``)."""
        return "softmax" if self.variant == "detr" else "sigmoid"

    @property
    def num_logits(self) -> int:
        """K, logits per query: C + 1 for a softmax head (last = no object), C for sigmoid."""
        return self.num_classes + 1 if self.class_head == "softmax" else self.num_classes

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python fields (for checkpoints and TOML); inverse of :meth:`from_dict`."""
        d = dataclasses.asdict(self)
        d["cnn_channels"] = list(self.cnn_channels)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetrConfig:
        """Build from a mapping; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"config: unknown DetrConfig field(s) {unknown}")
        return cls(**dict(data))


@dataclass
class DetrOutput:
    """Result of :meth:`DETR.forward`; also indexable like DETR's output dict.

    Attributes:
        pred_logits: (B, Q, K) class logits of the last decoder layer (K = ``num_logits``).
        pred_boxes: (B, Q, 4) normalised (cx, cy, w, h) boxes in [0, 1] (sigmoid).
        aux_outputs: decoder layers 1 .. L-1, each ``{"pred_logits", "pred_boxes"}`` as above.
        sequences: SA hook points, each (B, S, d): the projected input tokens, then the output
            of every encoder layer (before the encoder's final norm).
        padding_mask: (B, S) bool, True = padded token.
        enc_outputs: only with ``DetrConfig.dense_aux``: ``{"pred_logits": (B, S, C) dense
            sigmoid class logits of the encoder memory, "token_xy": (B, S, 2) normalised token
            centres, "padding_mask": (B, S)}`` plus, with ``two_stage``, ``"pred_boxes"``
            (B, S, 4) the dense proposal boxes (normalised cxcywh); else None.
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    aux_outputs: list[dict[str, Tensor]] = field(default_factory=list)
    sequences: list[Tensor] = field(default_factory=list)
    padding_mask: Tensor | None = None
    enc_outputs: dict[str, Tensor] | None = None

    _KEYS = (
        "pred_logits",
        "pred_boxes",
        "aux_outputs",
        "sequences",
        "padding_mask",
        "enc_outputs",
    )

    def keys(self) -> tuple[str, ...]:
        """The field names, as for a dict."""
        return self._KEYS

    def __getitem__(self, key: str) -> Any:
        if key not in self._KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self._KEYS

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]`` or ``default``."""
        return getattr(self, key) if key in self._KEYS else default


class EncoderInput(NamedTuple):
    """What :meth:`DETR.encoder_input` hands to the encoder.

    Attributes:
        tokens: (B, S, d) input tokens (the first SA sequence).
        pos: (B, S, d) positional encoding of each token.
        padding_mask: (B, S) bool, True = padded token.
        attn_mask: (S, S) bool encoder attention mask (True = forbidden) or None.
    """

    tokens: Tensor
    pos: Tensor
    padding_mask: Tensor
    attn_mask: Tensor | None


class DETR(nn.Module):
    """DETR detector (plain or anchor variant), see the module docstring.

    Args:
        config: the :class:`DetrConfig`.

    Submodules (state-dict prefixes): ``backbone.body`` (torchvision ResNet keys or the small
    CNN), ``input_proj`` (Conv2d C -> d, 1×1), ``transformer.encoder``,
    ``transformer.decoder``, ``query_embed`` (variant ``"detr"``: Embedding Q×d) or ``anchors``
    (variant ``"anchor"``: Parameter Q×4, inverse-sigmoid cxcywh), ``class_embed``
    (Linear d -> K), ``bbox_embed`` (MLP d -> d -> d -> 4).

    Subclassing (the amalgamation student): override :meth:`encoder_input` to change how the
    feature map becomes encoder tokens, :meth:`encode` to change how the encoder runs on them,
    and replace ``self.input_proj`` after ``super().__init__`` if the projection's width
    changes. Everything else (decoder, heads, :class:`DetrOutput` assembly) is reused unchanged.
    """

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.backbone = Backbone(config.backbone, config.cnn_channels, config.dilation)
        self.position = PositionEmbeddingSine(d // 2)
        self.input_proj: nn.Module = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)
        self.transformer = Transformer(
            d_model=d,
            nhead=config.nheads,
            num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            normalize_before=config.pre_norm,
            anchor_decoder=config.variant == "anchor",
            box_prior=config.box_prior,
            renorm_decoder_layers=config.renorm_decoder_layers,
        )
        self.class_embed = nn.Linear(d, config.num_logits)
        self.bbox_embed = MLP(d, d, 4, 3)
        if config.variant == "detr":
            self.query_embed = nn.Embedding(config.num_queries, d)
        else:
            init = torch.empty(config.num_queries, 4)
            init[:, :2].uniform_(0.0, 1.0)
            init[:, 2:] = config.anchor_size
            if config.two_stage:  # queries come from the encoder; these only fill in when
                # an image has fewer tokens than queries (a buffer: no unused parameter)
                self.register_buffer("anchors", inverse_sigmoid(init))
            else:
                self.anchors = nn.Parameter(inverse_sigmoid(init))
            # start from the anchors (zero delta) and from a low foreground prior (focal loss)
            self.bbox_embed.zero_output()
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        if config.dense_aux:
            self.enc_class_embed = nn.Linear(d, config.num_classes)
            nn.init.constant_(self.enc_class_embed.bias, -math.log((1 - 0.01) / 0.01))
        if config.two_stage:
            # token box = sigmoid(logit of a cell-centred anchor_size box + delta); zero delta
            # at the start
            self.enc_bbox_embed = MLP(d, d, 4, 3)
            self.enc_bbox_embed.zero_output()

    @property
    def num_queries(self) -> int:
        """Q, predictions per image."""
        return self.config.num_queries

    # -- the subclass hook ------------------------------------------------------------------

    def encoder_input(self, features: Tensor, mask: Tensor, pos: Tensor) -> EncoderInput:
        """Turn the backbone output into encoder tokens (**override point for subclasses**).

        Args:
            features: backbone feature map (B, C, h, w).
            mask: (B, h, w) bool, True = padded cell.
            pos: sine positional encoding (B, d, h, w).

        Returns:
            :class:`EncoderInput` with tokens (B, S, d), pos (B, S, d), padding_mask (B, S)
            and attn_mask (S, S) or None. Default: ``input_proj`` then flatten, S = h·w
            (row-major cells), no attention mask.
        """
        tokens = self.input_proj(features).flatten(2).transpose(1, 2)
        return EncoderInput(
            tokens=tokens,
            pos=pos.flatten(2).transpose(1, 2),
            padding_mask=mask.flatten(1),
            attn_mask=None,
        )

    def encode(self, enc: EncoderInput, padding: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """Run the encoder on :meth:`encoder_input`'s tokens (**override point**).

        Args:
            enc: the encoder input: tokens and pos (B, S, d), attn_mask (S, S) or None.
            padding: (B, S) bool padding mask (True = padded token), or None when no token is
                padded.

        Returns:
            ``(layer_outputs, memory)`` as :class:`~ka_rs.models.transformer.TransformerEncoder`
            returns them: every layer's output (B, S, d) before the final norm, and the memory
            (B, S, d). A subclass may compute the same thing differently (the amalgamation
            student runs its block-diagonal attention as independent per-slot sequences).
        """
        encoded: tuple[list[Tensor], Tensor] = self.transformer.encoder(
            enc.tokens, enc.pos, padding, enc.attn_mask
        )
        return encoded

    # -- forward ----------------------------------------------------------------------------

    def forward(self, images: Tensor, mask: Tensor | None = None) -> DetrOutput:
        """Detect objects.

        Args:
            images: (B, 3, H, W) float, normalised.
            mask: (B, H, W) bool, True = padded pixel; None = no padding.

        Returns:
            :class:`DetrOutput` (boxes normalised cxcywh relative to each unpadded image).

        Raises:
            ValueError: wrong shape or dtype of ``images`` / ``mask``.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"images: expected a float (B, 3, H, W) tensor, got shape "
                f"{tuple(images.shape)} dtype {images.dtype}"
            )
        b, _, h, w = images.shape
        if mask is None:
            mask = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
        elif mask.shape != (b, h, w) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask: expected a bool tensor of shape {(b, h, w)}, got shape "
                f"{tuple(mask.shape)} dtype {mask.dtype}"
            )

        features, feat_mask = self.backbone(images, mask)
        pos = self.position(feat_mask).to(features.dtype)
        enc = self.encoder_input(features, feat_mask, pos)
        # an all-False padding mask changes nothing but keeps attention off its fast path
        padding = enc.padding_mask if bool(enc.padding_mask.any()) else None
        layer_outputs, memory = self.encode(enc, padding)
        cell_xy = token_centres(feat_mask)
        token_xy = tile_centres(cell_xy, memory.shape[1])
        enc_outputs = None
        queries = None
        if self.config.dense_aux:
            enc_outputs = {
                "pred_logits": self.enc_class_embed(memory),
                "token_xy": token_xy,
                "padding_mask": enc.padding_mask,
            }
            if self.config.two_stage:
                enc_outputs["pred_boxes"] = self.token_boxes(memory, token_xy)
                queries = self.select_queries(memory, enc_outputs, cell_xy.shape[1])
        logits, boxes = self.decode(memory, enc.pos, padding, token_xy, queries)
        aux = [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(len(logits) - 1)]
        return DetrOutput(
            pred_logits=logits[-1],
            pred_boxes=boxes[-1],
            aux_outputs=aux,
            sequences=[enc.tokens, *layer_outputs],
            padding_mask=enc.padding_mask,
            enc_outputs=enc_outputs,
        )

    def token_boxes(self, memory: Tensor, token_xy: Tensor) -> Tensor:
        """Dense proposal boxes (``two_stage``): (B, S, 4) normalised cxcywh, one per token,
        predicted as a logit-space delta from a box of side ``anchor_size`` at the token's
        cell centre."""
        size = token_xy.new_full((*token_xy.shape[:-1], 2), self.config.anchor_size)
        ref = inverse_sigmoid(torch.cat((token_xy.clamp(0.0, 1.0), size), dim=-1))
        delta: Tensor = self.enc_bbox_embed(memory)
        return (ref + delta).sigmoid()

    def select_queries(
        self, memory: Tensor, enc_outputs: Mapping[str, Tensor], num_cells: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Pick the decoder's queries from the encoder (``two_stage``).

        The Q non-padded tokens with the highest dense class score (max over classes) give
        the query content (their memory features) and the initial anchors (their proposal
        boxes, in logit space); with fewer than Q tokens the learned anchors (and zero content)
        fill the rest. A memory holding k copies of the cell grid (the amalgamation student's
        slots; ``num_cells`` = h·w cells) is scored per cell (the best of its k tokens), so
        every query looks at a different image location (a student whose slots carry equal
        tokens, as after ``init_from``, does not pick one location twice). Both are detached:
        the dense heads learn from their own loss, not through the selection (as in DINO /
        RT-DETR).

        Returns:
            ``(content (B, Q, d), anchors (B, Q, 4))``.
        """
        scores = enc_outputs["pred_logits"].detach().amax(-1)
        scores = scores.masked_fill(enc_outputs["padding_mask"].to(torch.bool), float("-inf"))
        b, s = scores.shape
        cells = num_cells or s
        # best token of each cell over the k slots (ties: the first slot)
        cell_scores, slot = scores.reshape(b, s // cells, cells).max(dim=1)
        q = min(self.config.num_queries, cells)
        top_cells = cell_scores.topk(q, dim=1).indices  # (B, q)
        idx = slot.gather(1, top_cells) * cells + top_cells  # token index in the memory
        content = memory.detach().gather(1, idx[..., None].expand(-1, -1, memory.shape[-1]))
        boxes = enc_outputs["pred_boxes"].detach().gather(1, idx[..., None].expand(-1, -1, 4))
        anchors = inverse_sigmoid(boxes)
        if q < self.config.num_queries:  # fewer tokens than queries (tiny images)
            rest = self.anchors[q:]
            content = torch.cat(
                (content, content.new_zeros(b, rest.shape[0], content.shape[-1])), 1
            )
            anchors = torch.cat((anchors, rest.unsqueeze(0).expand(b, -1, -1)), 1)
        return content, anchors

    def decode(
        self,
        memory: Tensor,
        pos: Tensor,
        padding_mask: Tensor | None,
        token_xy: Tensor | None = None,
        queries: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the decoder and the heads on every decoder layer.

        Args:
            memory: encoder memory (B, S, d).
            pos: positional encoding of the memory tokens (B, S, d).
            padding_mask: (B, S) bool, True = padded token, or None.
            token_xy: normalised (x, y) centres of the feature-map cells, (B, h·w, 2), for the
                anchor variant's box prior. When the memory holds several copies of the h·w
                grid along the token axis (S = k·h·w, like the amalgamation student's slots),
                the centres are repeated k times.
            queries: ``(content (B, Q, d), anchors (B, Q, 4) in logit space)`` chosen by
                :meth:`select_queries` (``two_stage``); None = zero content and the learned
                anchors.

        Returns:
            ``(logits (L, B, Q, K), boxes (L, B, Q, 4))``, boxes normalised cxcywh (sigmoid).
        """
        b = memory.shape[0]
        d = self.config.hidden_dim
        decoder = self.transformer.decoder
        if isinstance(decoder, AnchorDecoder):
            if token_xy is not None:
                token_xy = tile_centres(token_xy, memory.shape[1])
            if queries is not None:
                tgt, anchors = queries
            else:
                tgt = memory.new_zeros(b, self.config.num_queries, d)
                anchors = self.anchors.unsqueeze(0).expand(b, -1, -1)
            hidden, boxes = decoder.forward_refine(
                tgt, memory, anchors, self.bbox_embed, pos, padding_mask, token_xy
            )
        else:
            tgt = memory.new_zeros(b, self.config.num_queries, d)
            query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
            hidden = decoder(tgt, memory, query_pos, pos, padding_mask)
            boxes = self.bbox_embed(hidden).sigmoid()
        return self.class_embed(hidden), boxes


def token_centres(mask: Tensor) -> Tensor:
    """Normalised centres of the feature-map cells, relative to each image's valid extent.

    Args:
        mask: (B, h, w) bool, True = padded cell.

    Returns:
        (B, h·w, 2) float32 ``(x, y)`` in (0, 1) for valid cells (row-major like the tokens);
        padded cells get values outside that range or repeated ones (they are masked anyway).
    """
    valid = (~mask).to(torch.float32)
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    rows = y[:, -1:, :].clamp(min=1.0)
    cols = x[:, :, -1:].clamp(min=1.0)
    h, w = mask.shape[1:]
    iy = torch.arange(h, dtype=torch.float32, device=mask.device)[None, :, None] + 0.5
    ix = torch.arange(w, dtype=torch.float32, device=mask.device)[None, None, :] + 0.5
    cy = (iy / rows).expand_as(y)
    cx = (ix / cols).expand_as(x)
    return torch.stack((cx, cy), dim=-1).flatten(1, 2)


def tile_centres(token_xy: Tensor, num_tokens: int) -> Tensor:
    """Repeat cell centres (B, h·w, 2) along the tokens to cover ``num_tokens`` = k·h·w tokens
    (memories holding k copies of the cell grid, like the amalgamation student's slots)."""
    if token_xy.shape[1] == num_tokens:
        return token_xy
    copies, rest = divmod(num_tokens, token_xy.shape[1])
    if rest or copies == 0:
        raise ValueError(f"token_xy: {token_xy.shape[1]} cells do not tile {num_tokens} tokens")
    return token_xy.repeat(1, copies, 1)


@torch.no_grad()
def postprocess(
    outputs: Mapping[str, Any] | DetrOutput,
    target_sizes: Tensor | Sequence[Sequence[int]],
    class_head: str = "softmax",
    num_detections: int = 100,
) -> list[dict[str, Tensor]]:
    """Turn raw predictions into scored detections in pixel coordinates (no NMS).

    Args:
        outputs: ``pred_logits`` (B, Q, K) and ``pred_boxes`` (B, Q, 4) normalised cxcywh.
        target_sizes: (B, 2) image sizes ``(h, w)`` to scale the boxes to.
        class_head: ``"softmax"`` (last logit = no object; each query gives its best
            foreground class) or ``"sigmoid"`` (the ``num_detections`` best (query, class)
            pairs over Q·C, as in Deformable DETR).
        num_detections: maximum detections per image.

    Returns:
        B dicts with ``"scores"`` (N,), ``"labels"`` (N,) int64 in [0, C) and ``"boxes"``
        (N, 4) xyxy in pixels, sorted by decreasing score.
    """
    logits = outputs["pred_logits"]
    boxes = outputs["pred_boxes"]
    sizes = torch.as_tensor(target_sizes, dtype=torch.float32, device=boxes.device)
    if sizes.shape != (logits.shape[0], 2):
        raise ValueError(f"target_sizes: expected shape {(logits.shape[0], 2)}, got {sizes.shape}")
    if class_head not in ("softmax", "sigmoid"):
        raise ValueError(f"class_head: expected 'softmax' or 'sigmoid', got {class_head!r}")
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)
    scale = torch.stack((sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]), dim=-1)
    xyxy = xyxy * scale[:, None, :]

    results = []
    for i in range(logits.shape[0]):
        if class_head == "softmax":
            scores, labels = logits[i].softmax(-1)[:, :-1].max(-1)
            keep = scores.argsort(descending=True)[:num_detections]
            det_boxes = xyxy[i, keep]
            scores, labels = scores[keep], labels[keep]
        else:
            num_classes = logits.shape[-1]
            flat = logits[i].sigmoid().flatten()
            k = min(num_detections, flat.numel())
            scores, idx = flat.topk(k)
            labels = idx % num_classes
            det_boxes = xyxy[i, idx // num_classes]
        results.append({"scores": scores, "labels": labels.long(), "boxes": det_boxes})
    return results
