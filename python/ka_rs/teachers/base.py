"""The teacher interface: what the amalgamation engine needs from any detector.

Every teacher — a ka_rs checkpoint, a facebookresearch/detr file, a Hugging Face folder —
reaches the engine as a :class:`Teacher`:

- ``class_names``: one entry per class logit of the head, **in the teacher's own index order**.
  ``None`` marks a slot that is not a class (COCO's unused category ids in DETR's 91-slot head:
  "N/A"); such slots keep their logits (the softmax is the teacher's own, unchanged) but never
  become pseudo-targets, union classes or detections.
- ``head``: ``"softmax"`` (``len(class_names) + 1`` logits, the last one "no object") or
  ``"sigmoid"`` (``len(class_names)`` logits, no background).
- ``forward(images, mask)`` → :class:`~ka_rs.models.DetrOutput` with ``pred_logits``
  ``(B, Q, K)``, ``pred_boxes`` ``(B, Q, 4)`` normalised cxcywh, ``aux_outputs`` when the model
  has them, and — for teachers that are a ka_rs :class:`~ka_rs.models.DETR` — ``sequences`` and
  ``padding_mask``, the encoder sequences that sequence-level amalgamation (SA) compares.
  ``images`` are ka_rs's pixels: ``(B, 3, H, W)`` float, standardised with the ImageNet
  mean/std (:class:`ka_rs.data.transforms.Normalize`); ``mask`` ``(B, H, W)`` bool, True =
  padded pixel. A teacher that expects other pixels (RT-DETR: plain ``[0, 1]``) converts them
  itself.
- ``detr_config``: the :class:`~ka_rs.models.DetrConfig` of the ka_rs DETR the teacher runs,
  when it is one. It is what SA needs (hook points, width, stride) and what ``init_from``
  copies; ``None`` makes a **TA-only** teacher (its predictions teach the student, its encoder
  does not).

A teacher is frozen: its parameters never require gradients and its network stays in eval mode
whatever ``train()`` is called with (dropout off, batch statistics fixed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ka_rs.models.detr import DETR, DetrConfig, DetrOutput

__all__ = ["HEADS", "DetrTeacher", "Teacher"]

#: The class-head kinds a teacher can have.
HEADS = ("softmax", "sigmoid")


class Teacher(nn.Module):
    """A frozen teacher detector (see the module docstring for the contract).

    Args:
        model: the wrapped network (its parameters are frozen here).
        class_names: one entry per class logit, in the head's index order; ``None`` = a slot
            that is not a class. At least one real class; real names are unique non-empty
            strings.
        head: ``"softmax"`` or ``"sigmoid"``.
        source: where the teacher came from (a path or ``prefix:path``), for messages and
            run records.
        name: the teacher's name in a run (``teacher_a``); may be set later.
        detr_config: the ka_rs DETR architecture, if the teacher is one (SA + TA); None for a
            TA-only teacher.
        image_size: the shorter image side the teacher was trained at (a hint for the
            student's data when the run does not set one); 0 = unknown.
        info: free-form facts about the source (format, backbone, ...), JSON-friendly.
        run_config: the run configuration a ka_rs checkpoint stores (its ``data`` section
            tells ``ka-rs evaluate`` which images the teacher was validated on); empty for
            other sources.

    Subclasses override :meth:`forward`; the default runs ``model(images, mask)``.
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str | None],
        head: str,
        *,
        source: str = "",
        name: str = "",
        detr_config: DetrConfig | None = None,
        image_size: int = 0,
        info: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
        self.model = model
        self.class_names: tuple[str | None, ...] = _check_class_names(class_names, source)
        self.head = head
        self.source = str(source)
        self.name = str(name)
        self.detr_config = detr_config
        self.image_size = int(image_size)
        self.info: dict[str, Any] = dict(info or {})
        self.run_config: dict[str, Any] = dict(run_config or {})
        self.freeze()

    # -- what the engine reads ----------------------------------------------------------------

    @property
    def classes(self) -> tuple[str, ...]:
        """The real class names, in head order (non-class slots left out)."""
        return tuple(c for c in self.class_names if c is not None)

    @property
    def num_logits(self) -> int:
        """K, logits per query: ``len(class_names) + 1`` (softmax) or ``len(class_names)``."""
        return len(self.class_names) + (1 if self.head == "softmax" else 0)

    @property
    def has_sequences(self) -> bool:
        """True when the teacher yields encoder sequences for SA (it is a ka_rs DETR)."""
        return self.detr_config is not None

    def describe(self) -> dict[str, Any]:
        """JSON-friendly record of the teacher (for run folders and checkpoints)."""
        return {
            "name": self.name,
            "source": self.source,
            "head": self.head,
            "class_names": list(self.class_names),
            "sa": self.has_sequences,
            **({"info": self.info} if self.info else {}),
        }

    # -- frozen behaviour ---------------------------------------------------------------------

    def freeze(self) -> Teacher:
        """No gradients, eval mode (called by the constructor; idempotent)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)  # this wrapper and everything in it
        return self

    def train(self, mode: bool = True) -> Teacher:
        """Keep the wrapped network in eval mode: a teacher is never trained."""
        super().train(False)
        return self

    def forward(self, images: Tensor, mask: Tensor | None = None) -> DetrOutput:
        """Predictions for ``images`` (B, 3, H, W) standardised, ``mask`` (B, H, W) bool."""
        out = self.model(images, mask)
        if isinstance(out, DetrOutput):
            return out
        return DetrOutput(
            pred_logits=out["pred_logits"],
            pred_boxes=out["pred_boxes"],
            aux_outputs=list(out.get("aux_outputs") or []),
        )

    def extra_repr(self) -> str:
        sa = "SA+TA" if self.has_sequences else "TA only"
        return (
            f"name={self.name!r}, source={self.source!r}, head={self.head}, "
            f"classes={len(self.classes)} (+{len(self.class_names) - len(self.classes)} "
            f"non-class slots), {sa}"
        )


class DetrTeacher(Teacher):
    """A teacher that is a ka_rs :class:`~ka_rs.models.DETR` (SA + TA).

    ``detr_config`` and ``head`` come from the model's config; ``forward`` returns the
    model's full :class:`~ka_rs.models.DetrOutput` (with ``sequences``).
    """

    def __init__(
        self,
        model: DETR,
        class_names: Sequence[str | None],
        *,
        source: str = "",
        name: str = "",
        image_size: int = 0,
        info: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, DETR):
            raise ValueError(f"model: expected a ka_rs DETR, got {type(model).__name__}")
        if len(class_names) != model.config.num_classes:
            raise ValueError(
                f"{source or 'class_names'}: {len(class_names)} class names for a head with "
                f"{model.config.num_classes} classes"
            )
        super().__init__(
            model,
            class_names,
            model.config.class_head,
            source=source,
            name=name,
            detr_config=model.config,
            image_size=image_size,
            info=info,
            run_config=run_config,
        )

    def forward(self, images: Tensor, mask: Tensor | None = None) -> DetrOutput:
        """The DETR's output, sequences included."""
        out: DetrOutput = self.model(images, mask)
        return out


def _check_class_names(names: Sequence[str | None], source: str) -> tuple[str | None, ...]:
    where = source or "class_names"
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"{where}: class names must be a list, got {type(names).__name__}")
    out: list[str | None] = []
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n is None:
            out.append(None)
            continue
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"{where}: class name {i} is {n!r}; expected a non-empty string")
        if n in seen:
            raise ValueError(f"{where}: class {n!r} is listed twice")
        seen.add(n)
        out.append(n)
    if not seen:
        raise ValueError(f"{where}: the teacher has no classes (every slot is a non-class slot)")
    return tuple(out)
