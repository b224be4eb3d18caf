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

**Per-slot encoder** (``slot_encoder="per_slot"``, the default): the block-diagonal mask lets a
token see only its own slot, so the no-cross encoder is N independent encoders over S tokens
sharing weights. :meth:`AmalgamationStudent.encode` runs it that way -- the (B, N·S, d) tokens
viewed as (N·B, S, d) sequences (padding mask likewise, no attention mask), the results viewed
back as (B, N·S, d) -- which computes N attention blocks of S×S instead of the N² blocks of the
masked (N·S)×(N·S) attention (``slot_encoder="masked"``, kept for the equivalence tests). Both
give the same sequences, memory and predictions to float rounding. The decoder still
cross-attends to all N·S tokens.

**Compact layout** (:class:`CompactAmalgamationStudent`, an extension beyond the paper): the
encoder works on ONE teacher's token count. The N-chunk input projection is merged per
position into one (B, S, d) sequence by a learned softmax gate over the N chunks, and SA
compares the student with teacher k through *teacher views*: the chunk k itself at the input
point, a per-teacher linear head of the student's single sequence at every encoder layer.

With ``num_slots=1`` the student is a plain DETR over the union (the one-slot student of the
prior-KA "aggregation" baseline, :class:`ka_rs.losses.AggregationHintLoss`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ka_rs.models.detr import DETR, DetrConfig, DetrOutput, EncoderInput

__all__ = [
    "SLOT_ENCODERS",
    "STUDENT_LAYOUTS",
    "AmalgamationStudent",
    "CompactAmalgamationStudent",
    "CompactStudentOutput",
    "build_student",
    "slot_attention_mask",
    "student_from_checkpoint",
]

#: how a no-cross N-slot student runs its encoder: ``"per_slot"`` (N·B sequences of S tokens,
#: the default) or ``"masked"`` (one (N·S)×(N·S) attention with the block-diagonal mask)
SLOT_ENCODERS = ("per_slot", "masked")

#: ``"slots"`` (N·S encoder tokens, the paper's student) or ``"compact"`` (S tokens, SA through
#: teacher views; :class:`CompactAmalgamationStudent`)
STUDENT_LAYOUTS = ("slots", "compact")


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
        slot_encoder: how the no-cross encoder runs (see :data:`SLOT_ENCODERS`):
            ``"per_slot"`` (default) = N·B independent sequences of S tokens, ``"masked"`` =
            one masked attention over N·S tokens. Same result to float rounding; ignored with
            cross-slot attention or one slot. Not stored in checkpoints (it is no weight).

    Attributes:
        layout: ``"slots"`` (class attribute; :class:`CompactAmalgamationStudent`:
            ``"compact"``).
        num_slots: N.
        cross_slot_attention: as given.
        slot_encoder: as given (may be changed on a built model).
        input_proj: ``Conv2d(C, N·d, 1)``.

    ``forward(images (B, 3, H, W), mask (B, H, W) | None)`` returns a
    :class:`~ka_rs.models.DetrOutput` whose ``sequences`` are (B, N·S, d) (slot k = tokens
    ``[k·S, (k+1)·S)``) and whose ``padding_mask`` is (B, N·S).
    """

    layout: ClassVar[str] = "slots"

    def __init__(
        self,
        config: DetrConfig,
        num_slots: int,
        cross_slot_attention: bool = False,
        *,
        slot_encoder: str = "per_slot",
    ) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots: expected a positive integer, got {num_slots!r}")
        if slot_encoder not in SLOT_ENCODERS:
            raise ValueError(f"slot_encoder: expected one of {SLOT_ENCODERS}, got {slot_encoder!r}")
        super().__init__(config)
        self.num_slots = num_slots
        self.cross_slot_attention = bool(cross_slot_attention)
        self.slot_encoder = slot_encoder
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

    def encode(self, enc: EncoderInput, padding: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """Run the encoder; with the block-diagonal mask, one slot at a time (batched).

        Args:
            enc: :meth:`encoder_input`'s result: tokens and pos (B, N·S, d), attn_mask
                (N·S, N·S) block-diagonal or None.
            padding: (B, N·S) bool (True = padded token) or None.

        Returns:
            ``(layer_outputs, memory)``, each (B, N·S, d) in the slot layout. With
            ``slot_encoder="per_slot"`` and the block-diagonal mask, the encoder runs on the
            (N·B, S, d) view of the tokens (sequence ``b·N + k`` = slot k of image b) without
            an attention mask: the N² − N masked blocks are never computed. Otherwise (cross-slot
            attention, one slot, ``"masked"``) it is :meth:`DETR.encode`.
        """
        n = self.num_slots
        if enc.attn_mask is None or n == 1 or self.slot_encoder == "masked":
            return super().encode(enc, padding)
        b, tokens, d = enc.tokens.shape
        s = self.slot_len(tokens)
        # (B, N·S, d) is (B, N, S, d) in memory: (N·B, S, d) is a view, not a copy
        outputs, memory = self.transformer.encoder(
            enc.tokens.reshape(b * n, s, d),
            enc.pos.reshape(b * n, s, d),
            None if padding is None else padding.reshape(b * n, s),
            None,
        )
        return [o.reshape(b, tokens, d) for o in outputs], memory.reshape(b, tokens, d)

    def extra_repr(self) -> str:
        return (
            f"layout={self.layout}, num_slots={self.num_slots}, "
            f"cross_slot_attention={self.cross_slot_attention}, slot_encoder={self.slot_encoder}"
        )


@dataclass
class CompactStudentOutput(DetrOutput):
    """:class:`~ka_rs.models.DetrOutput` of a :class:`CompactAmalgamationStudent`.

    ``sequences`` are the student's own hook-point sequences, each (B, S, d) (S = one teacher's
    token count); ``padding_mask`` is (B, S).

    Attributes:
        teacher_views: what SA compares with the teachers, one (B, N·S, d) tensor per hook
            point in the slot layout (tokens ``[k·S, (k+1)·S)`` = the student's view of teacher
            k): at the input point the N chunks of the input projection before they are merged,
            at encoder layer l the per-teacher linear heads ``sa_heads[l-1][k]`` of the
            student's sequence. Computed in train mode only (inference skips the heads); None
            in eval mode.
    """

    teacher_views: list[Tensor] | None = None

    _KEYS = (*DetrOutput._KEYS, "teacher_views")  # type: ignore[assignment]


class CompactAmalgamationStudent(AmalgamationStudent):
    """An amalgamation student whose encoder sees ONE teacher's token count (an extension).

    The input projection emits N·d channels (chunk k = the student's copy of teacher k's
    projected input, as in the slot layout); a learned per-position softmax gate merges them
    into one (B, S, d) sequence before the encoder::

        x (B, N·d, h, w) = input_proj(features);   x_k = chunk k (B, S, d)
        g (B, N, S) = softmax_k(slot_merge(x))      # 1×1 conv N·d -> N
        tokens = Σ_k g_k · x_k                      # (B, S, d): the encoder's input

    The encoder and decoder run on S tokens (the cost of one teacher). SA reaches teacher k
    through :attr:`CompactStudentOutput.teacher_views`: chunk x_k at the input point and
    ``sa_heads[l-1][k]`` (Linear d -> d) of the student's encoder layer l output. The heads only
    run in train mode: inference costs the one-teacher encoder plus the N·d projection and the
    gate.

    Initialisation: the gate starts at zero (an equal-weight average of the chunks) and every
    head at the identity. A student whose chunks all carry one teacher's projection (after
    ``init_from``) therefore reproduces that teacher exactly at step 0.

    Args:
        config: the detector config (``num_classes`` = |U|).
        num_slots: N ≥ 2, the number of SA teachers (views). One teacher needs no compaction:
            use :class:`AmalgamationStudent` with one slot.

    ``forward(images, mask)`` returns a :class:`CompactStudentOutput`.
    """

    layout: ClassVar[str] = "compact"

    def __init__(self, config: DetrConfig, num_slots: int) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 2:
            raise ValueError(
                f"num_slots: the compact student merges N >= 2 teachers' slots, got {num_slots!r}"
            )
        super().__init__(config, num_slots, cross_slot_attention=False)
        n, d = num_slots, config.hidden_dim
        self.slot_merge = nn.Conv2d(n * d, n, kernel_size=1)
        for p in self.slot_merge.parameters():  # gate logits 0: an equal-weight average
            nn.init.zeros_(p)
        self.sa_heads = nn.ModuleList(
            nn.ModuleList(nn.Linear(d, d) for _ in range(n)) for _ in range(config.enc_layers)
        )
        with torch.no_grad():
            for head in self.sa_heads.modules():
                if isinstance(head, nn.Linear):
                    head.weight.copy_(torch.eye(d))
                    head.bias.zero_()
        self._slot_tokens: Tensor | None = None

    def encoder_input(self, features: Tensor, mask: Tensor, pos: Tensor) -> EncoderInput:
        """Project to N chunks and merge them per position into one sequence.

        Args:
            features: backbone feature map (B, C, h, w).
            mask: (B, h, w) bool, True = padded cell.
            pos: sine positional encoding (B, d, h, w).

        Returns:
            :class:`~ka_rs.models.detr.EncoderInput`: tokens (B, S, d) (the merged sequence),
            pos (B, S, d), padding_mask (B, S), attn_mask None. In train mode the unmerged
            chunks, (B, N·S, d) in the slot layout, are kept for :meth:`forward`'s teacher views.
        """
        x = self.input_proj(features)  # (B, N·d, h, w)
        b, _, h, w = x.shape
        n, d, s = self.num_slots, self.config.hidden_dim, h * w
        chunks = x.reshape(b, n, d, s)
        gate = self.slot_merge(x).reshape(b, n, 1, s).softmax(dim=1)  # (B, N, 1, S)
        tokens = (gate * chunks).sum(dim=1).transpose(1, 2)  # (B, S, d)
        self._slot_tokens = chunks.transpose(2, 3).reshape(b, n * s, d) if self.training else None
        return EncoderInput(
            tokens=tokens,
            pos=pos.flatten(2).transpose(1, 2),
            padding_mask=mask.flatten(1),
            attn_mask=None,
        )

    def forward(self, images: Tensor, mask: Tensor | None = None) -> CompactStudentOutput:
        """Detect objects; in train mode also compute the teacher views for SA.

        Args:
            images: (B, 3, H, W) float, normalised.
            mask: (B, H, W) bool, True = padded pixel; None = no padding.

        Returns:
            :class:`CompactStudentOutput`: ``sequences`` (B, S, d) per hook point,
            ``padding_mask`` (B, S), ``teacher_views`` (B, N·S, d) per hook point (train mode)
            or None (eval mode).
        """
        self._slot_tokens = None
        try:
            out = super().forward(images, mask)
            slot_tokens = self._slot_tokens
        finally:
            self._slot_tokens = None
        views: list[Tensor] | None = None
        if self.training:
            assert slot_tokens is not None
            views = [slot_tokens]
            for heads, seq in zip(self.sa_heads, out.sequences[1:], strict=True):
                assert isinstance(heads, nn.ModuleList)
                views.append(torch.cat([head(seq) for head in heads], dim=1))
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        return CompactStudentOutput(**fields, teacher_views=views)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, num_slots={self.num_slots} (teacher views)"


def student_from_checkpoint(
    config: DetrConfig, meta: Mapping[str, Any], state_dict: Mapping[str, Any] | None = None
) -> AmalgamationStudent:
    """The (untrained) student a checkpoint's weights belong to.

    Args:
        config: the checkpoint's ``model_config`` as a :class:`DetrConfig`.
        meta: the checkpoint's ``"student"`` entry (``num_slots``, ``cross_slot_attention``,
            optionally ``layout``).
        state_dict: the stored weights; without a ``layout`` in ``meta``, a ``slot_merge.*``
            weight marks a compact student.

    Returns:
        An :class:`AmalgamationStudent` or :class:`CompactAmalgamationStudent` (weights not
        loaded).
    """
    layout = meta.get("layout")
    if layout is None:
        keys = state_dict or {}
        layout = "compact" if any(str(k).startswith("slot_merge.") for k in keys) else "slots"
    if layout not in STUDENT_LAYOUTS:
        raise ValueError(f"student.layout: expected one of {STUDENT_LAYOUTS}, got {layout!r}")
    if layout == "compact":
        return CompactAmalgamationStudent(config, int(meta["num_slots"]))
    return AmalgamationStudent(
        config, int(meta["num_slots"]), bool(meta.get("cross_slot_attention", False))
    )


def _stride(config: DetrConfig) -> int:
    """Output stride of ``config``'s backbone: 2^stages (small CNN), 16 (DC5 ResNet) or 32."""
    if config.backbone == "small_cnn":
        return 1 << len(config.cnn_channels)
    return 16 if config.dilation else 32


def build_student(
    teacher_configs: Sequence[DetrConfig],
    num_classes: int,
    cross_slot_attention: bool = False,
    *,
    num_slots: int | None = None,
    layout: str = "slots",
    slot_encoder: str = "per_slot",
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
        layout: ``"slots"`` (default, N·S encoder tokens) or ``"compact"`` (S tokens,
            :class:`CompactAmalgamationStudent`; with one slot it is the plain one-slot
            student, there being nothing to compact).
        slot_encoder: ``"per_slot"`` (default) or ``"masked"``, see
            :class:`AmalgamationStudent`.
        **overrides: any :class:`DetrConfig` field to change (e.g. ``num_queries=50``,
            ``variant="anchor"``, ``dropout=0.1``).

    Raises:
        ValueError: an unknown ``layout`` or ``slot_encoder``; compact with cross-slot
            attention (the compact encoder has no slots); no teachers; teachers of different
            ``hidden_dim`` (a per-teacher linear
            adapter for unequal widths is a possible extension, not built); teachers whose
            encoders have different depths or output strides (their SA hook points would not
            line up); a bad ``num_slots`` or override.
    """
    if layout not in STUDENT_LAYOUTS:
        raise ValueError(f"layout: expected one of {STUDENT_LAYOUTS}, got {layout!r}")
    if layout == "compact" and cross_slot_attention:
        raise ValueError(
            "layout: the compact student merges the slots before the encoder; "
            "cross_slot_attention does not apply to it"
        )
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
    if layout == "compact" and num_slots > 1:
        return CompactAmalgamationStudent(config, num_slots)
    return AmalgamationStudent(config, num_slots, cross_slot_attention, slot_encoder=slot_encoder)
