"""The amalgamation student: one DETR whose encoder carries one token slot per teacher.

DESIGN §1.1 (Student). The student is the teachers' detector with one change at the encoder
input: the 1×1 input projection emits N·d channels instead of d. The N chunks of d channels
are laid side by side along the **token** axis, so for a (h, w) feature map the encoder sees
N·S tokens (S = h·w)::

    features (B, C, h, w) --input_proj--> (B, N·d, h, w)
        -> chunks k = channels [k·d, (k+1)·d)  -> (B, S, d) each
        -> concatenated tokens (B, N·S, d);  slot k = tokens [k·S, (k+1)·S)

Slot k is the student's copy of teacher k's sequence, compared with it by
:class:`ka_rs.losses.SequenceAmalgamationLoss` at every hook point. The positional encoding
and the padding mask are repeated per slot. With ``cross_slot_attention=False`` (the default,
the paper's best "no cross" setting) the encoder gets a block-diagonal attention mask: a token
attends only to tokens of its own slot, so the slots evolve independently through the
encoder. The decoder's cross-attention always sees the whole N·S memory. The class head covers
the union label space (|U|+1 softmax logits for the ``"detr"`` variant, |U| sigmoid logits for
``"anchor"``).

With ``num_slots=1`` the student is a plain DETR over the union (the one-slot student of the
prior-KA "aggregation" baseline, :class:`ka_rs.losses.AggregationHintLoss`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ka_rs.models.detr import DETR, DetrConfig, EncoderInput

__all__ = ["AmalgamationStudent", "build_student", "slot_attention_mask"]


def slot_attention_mask(
    num_slots: int, slot_len: int, device: torch.device | None = None
) -> Tensor:
    """Block-diagonal encoder attention mask of an N-slot sequence.

    Returns:
        (N·S, N·S) bool, True = attention forbidden (PyTorch ``attn_mask`` convention): token
        i may attend to token j only when ``i // S == j // S``.
    """
    slot = torch.arange(num_slots * slot_len, device=device) // slot_len
    return slot[:, None] != slot[None, :]


class AmalgamationStudent(DETR):
    """DETR with N token slots at the encoder input (see the module docstring).

    Args:
        config: the detector config; ``config.num_classes`` = |U| (the union).
        num_slots: N ≥ 1, one slot per teacher (1 = plain one-slot student).
        cross_slot_attention: False (default) = block-diagonal encoder attention, each slot
            attends only to itself; True = full attention over all N·S tokens.

    Attributes:
        num_slots: N.
        cross_slot_attention: as given.
        input_proj: ``Conv2d(C, N·d, 1)``.

    ``forward(images (B, 3, H, W), mask (B, H, W) | None)`` returns a
    :class:`~ka_rs.models.DetrOutput` whose ``sequences`` are (B, N·S, d) (slot k = tokens
    ``[k·S, (k+1)·S)``) and whose ``padding_mask`` is (B, N·S).
    """

    def __init__(
        self, config: DetrConfig, num_slots: int, cross_slot_attention: bool = False
    ) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots: expected a positive integer, got {num_slots!r}")
        super().__init__(config)
        self.num_slots = num_slots
        self.cross_slot_attention = bool(cross_slot_attention)
        if num_slots > 1:
            self.input_proj = nn.Conv2d(
                self.backbone.num_channels, num_slots * config.hidden_dim, kernel_size=1
            )
        self._mask_cache: dict[tuple[int, str], Tensor] = {}

    def slot_len(self, num_tokens: int) -> int:
        """S, tokens per slot, of a student sequence with ``num_tokens`` = N·S tokens."""
        if num_tokens % self.num_slots:
            raise ValueError(
                f"num_tokens: {num_tokens} is not a multiple of num_slots={self.num_slots}"
            )
        return num_tokens // self.num_slots

    def slot(self, sequence: Tensor, k: int) -> Tensor:
        """Slot ``k`` (B, S, d) of a student sequence (B, N·S, d)."""
        if not 0 <= k < self.num_slots:
            raise ValueError(f"k: slot {k} out of range for num_slots={self.num_slots}")
        s = self.slot_len(sequence.shape[1])
        return sequence[:, k * s : (k + 1) * s]

    def _attn_mask(self, slot_len: int, device: torch.device) -> Tensor | None:
        if self.cross_slot_attention or self.num_slots == 1:
            return None
        key = (slot_len, str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = slot_attention_mask(self.num_slots, slot_len, device)
            self._mask_cache = {key: mask}  # keep one: image sizes rarely change mid-run
        return mask

    def encoder_input(self, features: Tensor, mask: Tensor, pos: Tensor) -> EncoderInput:
        """Project to N·d channels and lay the N chunks side by side as token slots.

        Args:
            features: backbone feature map (B, C, h, w).
            mask: (B, h, w) bool, True = padded cell.
            pos: sine positional encoding (B, d, h, w).

        Returns:
            :class:`~ka_rs.models.detr.EncoderInput`: tokens (B, N·S, d), pos (B, N·S, d) and
            padding_mask (B, N·S) repeated per slot, attn_mask (N·S, N·S) block-diagonal
            (None with cross-slot attention or a single slot).
        """
        x = self.input_proj(features)  # (B, N·d, h, w)
        b, _, h, w = x.shape
        n, d, s = self.num_slots, self.config.hidden_dim, h * w
        # channel chunk k -> token slot k
        tokens = x.reshape(b, n, d, s).transpose(2, 3).reshape(b, n * s, d)
        pos_tokens = pos.flatten(2).transpose(1, 2)  # (B, S, d)
        padding = mask.flatten(1)  # (B, S)
        if n > 1:
            pos_tokens = pos_tokens.repeat(1, n, 1)
            padding = padding.repeat(1, n)
        return EncoderInput(
            tokens=tokens,
            pos=pos_tokens,
            padding_mask=padding,
            attn_mask=self._attn_mask(s, x.device),
        )

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, cross_slot_attention={self.cross_slot_attention}"


def _stride(config: DetrConfig) -> int:
    """Output stride of ``config``'s backbone: 2^stages (small CNN), 16 (DC5 ResNet) or 32."""
    if config.backbone == "small_cnn":
        return 2 ** len(config.cnn_channels)
    return 16 if config.dilation else 32


def build_student(
    teacher_configs: Sequence[DetrConfig],
    num_classes: int,
    cross_slot_attention: bool = False,
    *,
    num_slots: int | None = None,
    **overrides: Any,
) -> AmalgamationStudent:
    """Build the amalgamation student from its teachers' configs.

    The student copies the first teacher's architecture (backbone, width, heads, encoder and
    decoder depth, FFN width, dropout, variant, box prior), uses the largest teacher query
    count, and predicts ``num_classes`` = |U| classes (the union label space). It has no dense
    auxiliary encoder head unless the teachers are two-stage (their query selection needs it)
    or ``dense_aux=True`` is passed.

    Args:
        teacher_configs: the N ≥ 1 teachers' :class:`DetrConfig`, in slot order.
        num_classes: |U|, size of the union label space.
        cross_slot_attention: allow encoder attention across slots (default False: the
            block-diagonal "no cross" mask).
        num_slots: None (default) = N, one slot per teacher; 1 = a plain one-slot student
            (the aggregation baseline's). Other values are rejected.
        **overrides: any :class:`DetrConfig` field to change (e.g. ``num_queries=50``,
            ``variant="anchor"``, ``dropout=0.1``).

    Raises:
        ValueError: no teachers; teachers of different ``hidden_dim`` (a per-teacher linear
            adapter for unequal widths is a possible extension, not built); teachers whose
            encoders have different depths or output strides (their SA hook points would not
            line up); a bad ``num_slots`` or override.
    """
    configs = list(teacher_configs)
    if not configs:
        raise ValueError("teacher_configs: need at least one teacher config")
    for i, cfg in enumerate(configs):
        if not isinstance(cfg, DetrConfig):
            raise ValueError(
                f"teacher_configs[{i}]: expected a DetrConfig, got {type(cfg).__name__}"
            )
    widths = [cfg.hidden_dim for cfg in configs]
    if len(set(widths)) > 1:
        raise ValueError(
            f"teacher_configs: teachers have different hidden_dim {widths}; sequence-level "
            "amalgamation needs equal widths (a per-teacher linear adapter for unequal widths "
            "is an extension that is not implemented)"
        )
    depths = [cfg.enc_layers for cfg in configs]
    if len(set(depths)) > 1:
        raise ValueError(
            f"teacher_configs: teachers have different enc_layers {depths}; their SA hook "
            "points would not line up with the student's"
        )
    strides = [_stride(cfg) for cfg in configs]
    if len(set(strides)) > 1:
        raise ValueError(
            f"teacher_configs: teachers' backbones have different output strides {strides}; "
            "their token grids would not line up with the student's slots"
        )
    n = len(configs)
    if num_slots is None:
        num_slots = n
    if num_slots not in (1, n):
        raise ValueError(
            f"num_slots: expected None, 1 (plain student) or {n} (one per teacher), "
            f"got {num_slots!r}"
        )
    fields = configs[0].to_dict()
    fields["num_classes"] = num_classes
    fields["num_queries"] = max(cfg.num_queries for cfg in configs)
    # the dense auxiliary class head is a teacher-training aid fed by ground-truth labels; a
    # student keeps it only when its two-stage query selection needs it (TA then trains it on
    # the pseudo-targets). Otherwise its parameters would never get a gradient, which
    # DistributedDataParallel rejects. Override to keep it.
    fields["dense_aux"] = bool(fields.get("two_stage", False))
    names = {f.name for f in dataclasses.fields(DetrConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"overrides: unknown DetrConfig field(s) {unknown}")
    fields.update(overrides)
    if fields["hidden_dim"] != widths[0]:
        raise ValueError(
            f"overrides: hidden_dim={fields['hidden_dim']} differs from the teachers' "
            f"{widths[0]}; SA needs equal widths"
        )
    config = DetrConfig.from_dict(fields)
    return AmalgamationStudent(config, num_slots, cross_slot_attention)
