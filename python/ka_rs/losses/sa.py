"""Sequence-level amalgamation (SA) and the prior-KA "aggregation" hint baseline.

docs/method.md §3. A teacher's *sequence* at a hook point is the (B, S, d) token matrix a DETR
encoder carries there: hook 0 is the projected input (after the 1×1 projection, before the
first encoder layer), hooks 1..L are the outputs of encoder layers 1..L (before the encoder's
final norm). ``DetrOutput.sequences`` lists them in that order.

The N-slot student (:class:`ka_rs.models.AmalgamationStudent`) carries (B, N·S, d) sequences
whose slot k, tokens ``[k·S, (k+1)·S)``, is its copy of teacher k's sequence.
:class:`SequenceAmalgamationLoss` compares slot k with teacher k at every hook point. The
compact student (:class:`ka_rs.models.student.CompactAmalgamationStudent`, an extension) carries one
(B, S, d) sequence per hook point; its output's ``teacher_views`` give the same (B, N·S, d) slot
layout (its per-teacher views of that sequence), and SA compares those instead.

:class:`AggregationHintLoss` is the baseline the paper argues against: the N teachers'
sequences are fused along *channels* by a learnable N·d→d projection into one (B, S, d) hint
that a plain one-slot student imitates. Its projection is an ``nn.Module`` parameter that MUST
be given to the optimiser (the authors' release forgot it, so the "trained" projection stayed
at its initialisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AggregationHintLoss",
    "SequenceAmalgamationLoss",
    "normalize_sequence",
    "sequence_mse",
]


def normalize_sequence(x: Tensor, valid: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise a sequence the way SA compares it.

    1. subtract the per-channel mean taken over (batch, tokens) — only the tokens where
       ``valid`` is True when a mask is given;
    2. layer-normalise every token over its channels, without learnable affine.

    Args:
        x: (B, S, d) sequence.
        valid: optional (B, S) bool, True = token takes part in the channel mean.
        eps: layer-norm epsilon.

    Returns:
        (B, S, d) normalised sequence (every token, including excluded ones, is transformed;
        the caller masks the loss).
    """
    if x.dim() != 3:
        raise ValueError(f"x: expected a (B, S, d) sequence, got shape {tuple(x.shape)}")
    if valid is None:
        mean = x.mean(dim=(0, 1), keepdim=True)
    else:
        w = valid.to(x.dtype).unsqueeze(-1)  # (B, S, 1)
        mean = (x * w).sum(dim=(0, 1), keepdim=True) / w.sum().clamp(min=1.0)
    return F.layer_norm(x - mean, (x.shape[-1],), eps=eps)


def sequence_mse(student: Tensor, teacher: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean squared error between two (B, S, d) sequences over the ``valid`` (B, S) tokens.

    The mean runs over valid tokens × channels; with no valid token the result is a zero that
    is still connected to ``student``'s graph.
    """
    sq = (student - teacher).pow(2)
    if valid is None:
        return sq.mean()
    w = valid.to(sq.dtype).unsqueeze(-1)
    denom = w.sum() * sq.shape[-1]
    return (sq * w).sum() / denom.clamp(min=1.0)


def _sequences_of(obj: Any, arg: str) -> list[Tensor]:
    """Hook-point list from a ``DetrOutput``-like object or a plain sequence of tensors."""
    seqs = getattr(obj, "sequences", None)
    if seqs is None and isinstance(obj, dict):
        seqs = obj.get("sequences")
    if seqs is None:
        seqs = obj
    if isinstance(seqs, Tensor) or not isinstance(seqs, Sequence):
        raise ValueError(
            f"{arg}: expected a DetrOutput or a list of (B, S, d) tensors, got {type(obj).__name__}"
        )
    seqs = list(seqs)
    for i, s in enumerate(seqs):
        if not isinstance(s, Tensor) or s.dim() != 3:
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"{arg}[{i}]: expected a (B, S, d) tensor, got {shape}")
    return seqs


def _student_sequences(obj: Any) -> list[Tensor]:
    """The student's SA hook points: its ``teacher_views`` when the output has them (the
    compact student), else its ``sequences`` (the slot layout)."""
    has_views = (
        not isinstance(obj, (Tensor, Sequence))
        and hasattr(obj, "__contains__")
        and "teacher_views" in obj
    )
    views = obj["teacher_views"] if has_views else None
    if has_views and views is None:
        raise ValueError(
            "student: a compact student's output without teacher views (it was run in eval "
            "mode); SA compares the teachers with the views its train-mode forward computes: "
            "call student.train() first"
        )
    return _sequences_of(views if has_views else obj, "student")


def _padding_of(obj: Any) -> Tensor | None:
    mask = getattr(obj, "padding_mask", None)
    if mask is None and isinstance(obj, dict):
        mask = obj.get("padding_mask")
    return mask


def _check_weights(weights: Sequence[float] | None, num_points: int, arg: str) -> list[float]:
    if weights is None:
        return [1.0] * num_points
    weights = [float(w) for w in weights]
    if len(weights) != num_points:
        raise ValueError(
            f"{arg}: got {len(weights)} weights for {num_points} hook points "
            "(projected input + one per encoder layer)"
        )
    return weights


class SequenceAmalgamationLoss(nn.Module):
    """L_SA = Σ_l w_l Σ_k MSE(norm(student slot k at l), norm(teacher k at l)).

    Args:
        weights: optional per-hook-point weights w_l (default 1 at every point); its length
            must equal the number of hook points (1 + encoder layers).
        mask_input_point: docs/method.md §3 compares *all* tokens at the projected-input point (hook
            0) and only non-padded tokens at the encoder-layer points; set True to drop padded
            tokens at hook 0 as well.
        eps: layer-norm epsilon of the normaliser.

    ``forward(student, teachers, padding_mask=None)``:
        student: the student's ``DetrOutput`` (uses ``.sequences``, or ``.teacher_views`` when
            the output has them: the compact student's) or its list of L hook-point tensors,
            each (B, N·S, d).
        teachers: N teacher ``DetrOutput``s or N lists of L tensors, each (B, S, d), in slot
            order. They are detached here: no gradient ever reaches a teacher.
        padding_mask: (B, S) bool, True = padded token; when omitted it is taken from the
            first teacher output's ``padding_mask`` (or the first S columns of the student's),
            and with none anywhere every token counts.

    Returns a dict: ``"loss"`` (the weighted total, scalar) and ``"loss_sa_<l>"`` per hook point
    (each Σ_k MSE_lk, unweighted, detached).

    Student and teacher widths must match (the per-teacher linear adapter for unequal widths is
    an extension not built here).
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        *,
        mask_input_point: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.weights = None if weights is None else [float(w) for w in weights]
        self.mask_input_point = bool(mask_input_point)
        self.eps = float(eps)

    def forward(
        self,
        student: Any,
        teachers: Sequence[Any],
        padding_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute L_SA; see the class docstring for shapes."""
        s_seqs = _student_sequences(student)
        if isinstance(teachers, Tensor) or not isinstance(teachers, Sequence) or not teachers:
            raise ValueError("teachers: expected a non-empty sequence of teacher outputs")
        t_seqs = [_sequences_of(t, f"teachers[{k}]") for k, t in enumerate(teachers)]
        num_slots = len(t_seqs)
        num_points = len(s_seqs)
        for k, seqs in enumerate(t_seqs):
            if len(seqs) != num_points:
                raise ValueError(
                    f"teachers[{k}]: {len(seqs)} hook points but the student has {num_points}; "
                    "teachers and student need the same number of encoder layers"
                )
        weights = _check_weights(self.weights, num_points, "weights")
        if num_points == 0:
            raise ValueError("student: no hook-point sequences")

        batch, tokens, dim = s_seqs[0].shape
        if tokens % num_slots != 0:
            raise ValueError(
                f"student: {tokens} tokens is not a multiple of the {num_slots} teachers (slots)"
            )
        slot_len = tokens // num_slots

        if padding_mask is None:
            padding_mask = _padding_of(teachers[0])
        if padding_mask is None:
            s_mask = _padding_of(student)
            if s_mask is not None:
                padding_mask = s_mask[:, :slot_len]
        valid: Tensor | None = None
        if padding_mask is not None:
            if padding_mask.shape != (batch, slot_len):
                raise ValueError(
                    f"padding_mask: expected shape {(batch, slot_len)}, "
                    f"got {tuple(padding_mask.shape)}"
                )
            valid = ~padding_mask.to(torch.bool)

        out: dict[str, Tensor] = {}
        total = s_seqs[0].new_zeros(())
        for point in range(num_points):
            s = s_seqs[point]
            if s.shape != (batch, tokens, dim):
                raise ValueError(
                    f"student[{point}]: expected shape {(batch, tokens, dim)}, got {tuple(s.shape)}"
                )
            point_valid = valid if (point > 0 or self.mask_input_point) else None
            point_loss = s.new_zeros(())
            for k in range(num_slots):
                t = t_seqs[k][point].detach()
                if t.shape != (batch, slot_len, dim):
                    raise ValueError(
                        f"teachers[{k}][{point}]: expected shape {(batch, slot_len, dim)} "
                        f"(student slot {k}), got {tuple(t.shape)}; widths must match"
                    )
                s_k = s[:, k * slot_len : (k + 1) * slot_len]
                point_loss = point_loss + sequence_mse(
                    normalize_sequence(s_k, point_valid, self.eps),
                    normalize_sequence(t.to(s.dtype), point_valid, self.eps),
                    point_valid,
                )
            out[f"loss_sa_{point}"] = point_loss.detach()
            total = total + weights[point] * point_loss
        out["loss"] = total
        return out


class AggregationHintLoss(nn.Module):
    """Prior-KA "aggregation" baseline: a one-slot student imitates a learnt fusion of teachers.

    At each hook point l the N teacher sequences (B, S, d) are normalised (as in SA),
    concatenated along channels into (B, S, N·d) and multiplied by a learnable N·d×d matrix
    (``self.projections[l]``, an ``nn.Linear`` without bias) into one (B, S, d) hint. The
    one-slot student's sequence at l, normalised the same way, imitates it with MSE over
    non-padded tokens (all tokens at hook 0 unless ``mask_input_point``). The loss is
    Σ_l w_l MSE_l.

    **The projections are trainable parameters: pass this module's ``parameters()`` to the
    optimiser** (e.g. ``AdamW([*student.parameters(), *hint_loss.parameters()])``) — the
    engine does so. Gradients reach them through the student/hint MSE. Each projection starts
    as the channel-wise average of the teachers ([I/N, …, I/N]), i.e. the hint starts as the
    mean of the normalised teacher sequences.

    Args:
        num_teachers: N ≥ 1.
        hidden_dim: d, the common width of the teachers and the student.
        num_points: number of hook points (1 + encoder layers).
        weights: optional per-point weights (default 1).
        mask_input_point: also drop padded tokens at hook 0.
        eps: normaliser epsilon.

    ``forward(student, teachers, padding_mask=None)``: ``student`` a one-slot ``DetrOutput``
    or list of L (B, S, d) tensors; ``teachers`` N outputs / lists of L (B, S, d) tensors
    (detached here). Returns ``{"loss": total, "loss_hint_<l>": per point (detached)}``.
    """

    def __init__(
        self,
        num_teachers: int,
        hidden_dim: int,
        num_points: int,
        weights: Sequence[float] | None = None,
        *,
        mask_input_point: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_teachers < 1:
            raise ValueError(f"num_teachers: must be >= 1, got {num_teachers}")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim: must be >= 1, got {hidden_dim}")
        if num_points < 1:
            raise ValueError(f"num_points: must be >= 1, got {num_points}")
        self.num_teachers = int(num_teachers)
        self.hidden_dim = int(hidden_dim)
        self.num_points = int(num_points)
        self.weights = _check_weights(weights, self.num_points, "weights")
        self.mask_input_point = bool(mask_input_point)
        self.eps = float(eps)
        self.projections = nn.ModuleList(
            nn.Linear(self.num_teachers * self.hidden_dim, self.hidden_dim, bias=False)
            for _ in range(self.num_points)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every projection to the teacher average [I/N, …, I/N] (d × N·d)."""
        eye = torch.eye(self.hidden_dim) / self.num_teachers
        for proj in self.projections:
            assert isinstance(proj, nn.Linear)
            proj.weight.copy_(eye.repeat(1, self.num_teachers))

    def hint(self, teachers: Sequence[Any], point: int, valid: Tensor | None = None) -> Tensor:
        """The fused (B, S, d) hint at hook ``point`` from N teachers' (detached) sequences."""
        t_seqs = [_sequences_of(t, f"teachers[{k}]") for k, t in enumerate(teachers)]
        return self._fuse(point, [ts[point] for ts in t_seqs], valid)

    def _fuse(self, point: int, sequences: Sequence[Tensor], valid: Tensor | None) -> Tensor:
        """Normalise the teachers' (B, S, d) sequences at ``point`` (detached), concatenate
        them along channels and project: the (B, S, d) hint."""
        normed = [normalize_sequence(x.detach(), valid, self.eps) for x in sequences]
        projection = self.projections[point]
        assert isinstance(projection, nn.Linear)
        fused: Tensor = projection(torch.cat(normed, dim=-1))
        return fused

    def forward(
        self,
        student: Any,
        teachers: Sequence[Any],
        padding_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the aggregation hint loss; see the class docstring for shapes."""
        s_seqs = _sequences_of(student, "student")
        if isinstance(teachers, Tensor) or not isinstance(teachers, Sequence):
            raise ValueError("teachers: expected a sequence of teacher outputs")
        if len(teachers) != self.num_teachers:
            raise ValueError(
                f"teachers: got {len(teachers)} teachers, the loss was built for "
                f"{self.num_teachers}"
            )
        t_seqs = [_sequences_of(t, f"teachers[{k}]") for k, t in enumerate(teachers)]
        if len(s_seqs) != self.num_points:
            raise ValueError(
                f"student: {len(s_seqs)} hook points, the loss was built for {self.num_points}"
            )
        for k, seqs in enumerate(t_seqs):
            if len(seqs) != self.num_points:
                raise ValueError(
                    f"teachers[{k}]: {len(seqs)} hook points, the loss was built for "
                    f"{self.num_points}"
                )
        batch, tokens, dim = s_seqs[0].shape
        if dim != self.hidden_dim:
            raise ValueError(f"student: width {dim}, the loss was built for {self.hidden_dim}")
        if padding_mask is None:
            padding_mask = _padding_of(teachers[0])
        if padding_mask is None:
            padding_mask = _padding_of(student)
        valid: Tensor | None = None
        if padding_mask is not None:
            if padding_mask.shape != (batch, tokens):
                raise ValueError(
                    f"padding_mask: expected shape {(batch, tokens)}, "
                    f"got {tuple(padding_mask.shape)}"
                )
            valid = ~padding_mask.to(torch.bool)

        out: dict[str, Tensor] = {}
        total = s_seqs[0].new_zeros(())
        for point in range(self.num_points):
            s = s_seqs[point]
            for k in range(self.num_teachers):
                if t_seqs[k][point].shape != (batch, tokens, dim):
                    raise ValueError(
                        f"teachers[{k}][{point}]: expected shape {(batch, tokens, dim)}, "
                        f"got {tuple(t_seqs[k][point].shape)}"
                    )
            point_valid = valid if (point > 0 or self.mask_input_point) else None
            teacher_seqs = [t_seqs[k][point].to(s.dtype) for k in range(self.num_teachers)]
            hint = self._fuse(point, teacher_seqs, point_valid)
            loss = sequence_mse(normalize_sequence(s, point_valid, self.eps), hint, point_valid)
            out[f"loss_hint_{point}"] = loss.detach()
            total = total + self.weights[point] * loss
        out["loss"] = total
        return out
