"""Union label spaces and knowledge-amalgamation pseudo-targets.

Knowledge amalgamation merges N teachers, teacher ``k`` knowing the class names ``C_k``, into a
student over the union ``U`` of their classes. :class:`LabelSpace` fixes that union (teacher 1's
classes first, then each new name in teacher order; a name known to several teachers gets one
union index) and each teacher's local→union index map. The student's "no object" class is the
background index ``|U|``. A teacher's class list follows its head's index order and may mark
slots that are not classes with ``None`` (DETR's COCO head has 91 slots indexed by category id,
11 of them unused): such a slot maps to ``-1``, never enters the union and never becomes a
pseudo-target, while the teacher's logits (and softmax) stay whole.

:func:`build_pseudo_targets` turns the teachers' predictions on a batch into the student's
training targets (docs/method.md §4), for all images and all teachers in one Rust call:

1. **Candidates.** Softmax teachers (DETR: ``C_k + 1`` logits, the last one "no object"): a
   query is a candidate when its arg-max is a foreground class and its probability is
   ``> threshold``. Sigmoid teachers (Deformable DETR / DINO style: ``C_k`` logits, no
   background): a query is a candidate when its largest sigmoid probability is ``> threshold``;
   its class is the arg-max.
2. **Dedupe.** With ``nms_iou`` set, class-aware NMS in union space over the pooled candidates of
   all teachers (IoU on xyxy corners of the cxcywh boxes, ``> nms_iou`` suppresses), keeping the
   most confident. It merges the duplicates that overlapping teachers produce for one object.
   It runs **before** the top-n cut, so duplicates do not use up the budget.
3. **Top-n.** The ``top_n`` most confident survivors per image (ties: lower teacher index, then
   lower query index), in decreasing order of score.
4. **Remap.** Hard label = union index of the class; box = the teacher's box (cxcywh);
   soft logits = a ``|U| + 1`` row filled with ``fill_logit`` into which the teacher's raw
   logits are written at their union positions, a softmax teacher's background logit onto the
   union background index ``|U|``. Sigmoid teachers have no background logit: for their
   pseudo-targets the background entry stays ``fill_logit``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
import torch

from ka_rs import _native

__all__ = ["TEACHER_KINDS", "LabelSpace", "PseudoTargets", "build_pseudo_targets"]

#: Accepted teacher head types (``"focal"`` is an alias of ``"sigmoid"``).
TEACHER_KINDS: tuple[str, ...] = ("softmax", "sigmoid", "focal")


@dataclass(frozen=True)
class LabelSpace:
    """The union label space of N teachers.

    Build it with :meth:`from_teachers`::

        >>> space = LabelSpace.from_teachers({"a": ["cat", "dog"], "b": ["dog", "car"]})
        >>> space.names
        ('cat', 'dog', 'car')
        >>> space.local_to_union("b").tolist(), space.background_index
        ([1, 2], 3)

    Attributes:
        teacher_classes: ``((teacher name, (class names...)), ...)`` in teacher order, as given
            (``None`` = a non-class slot of that teacher's head).
        names: the union's class names, teacher 1's classes first, then each new name in teacher
            order (a name known to several teachers appears once).
    """

    teacher_classes: tuple[tuple[str, tuple[str | None, ...]], ...]
    names: tuple[str, ...] = field(init=False)
    _union_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _teacher_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _maps: tuple[np.ndarray, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entries = _normalise_teachers(self.teacher_classes, "teacher_classes")
        union: dict[str, int] = {}
        for _, classes in entries:
            for name in classes:
                if name is not None:
                    union.setdefault(name, len(union))
        maps = []
        for _, classes in entries:
            m = np.array([-1 if c is None else union[c] for c in classes], dtype=np.int64)
            m.setflags(write=False)
            maps.append(m)
        object.__setattr__(self, "teacher_classes", entries)
        object.__setattr__(self, "names", tuple(union))
        object.__setattr__(self, "_union_index", union)
        object.__setattr__(self, "_teacher_index", {t: i for i, (t, _) in enumerate(entries)})
        object.__setattr__(self, "_maps", tuple(maps))

    @classmethod
    def from_teachers(cls, teachers: Mapping[str, Sequence[str | None]]) -> LabelSpace:
        """Union of the teachers' class lists, ``{teacher name: [class names...]}`` in order.

        Overlapping class names across teachers are allowed (one union index per name);
        ``None`` entries are non-class slots of a head. Raises ``ValueError`` naming
        ``teachers`` for no teachers, a teacher with no class, a class name repeated within
        one teacher, or names that are neither non-empty strings nor None.
        """
        if not isinstance(teachers, Mapping):
            raise ValueError(
                "teachers: expected a mapping {teacher name: [class names...]}, "
                f"got {type(teachers).__name__}"
            )
        return cls(_normalise_teachers(tuple(teachers.items()), "teachers"))

    # ---- teachers ---------------------------------------------------------------------------

    @property
    def teachers(self) -> tuple[str, ...]:
        """Teacher names in order."""
        return tuple(t for t, _ in self.teacher_classes)

    @property
    def num_teachers(self) -> int:
        """Number of teachers N."""
        return len(self.teacher_classes)

    def teacher_index(self, teacher: str | int) -> int:
        """Position of ``teacher`` (a name, or an index checked for range)."""
        if isinstance(teacher, (int, np.integer)) and not isinstance(teacher, bool):
            if not 0 <= int(teacher) < self.num_teachers:
                raise ValueError(
                    f"teacher: index {int(teacher)} out of range for {self.num_teachers} teachers"
                )
            return int(teacher)
        if isinstance(teacher, str) and teacher in self._teacher_index:
            return self._teacher_index[teacher]
        raise ValueError(f"teacher: unknown teacher {teacher!r}; known: {list(self.teachers)}")

    def classes(self, teacher: str | int) -> tuple[str | None, ...]:
        """Class names of ``teacher`` in its own (local, head) order; None = non-class slot."""
        return self.teacher_classes[self.teacher_index(teacher)][1]

    def local_to_union(self, teacher: str | int) -> np.ndarray:
        """``int64 (C_k,)``: union index of each of ``teacher``'s local classes, ``-1`` for a
        non-class slot (a fresh copy)."""
        out: np.ndarray = self._maps[self.teacher_index(teacher)].copy()
        return out

    def teachers_of(self, name: str) -> tuple[str, ...]:
        """Names of the teachers that know class ``name``."""
        self.index(name)
        return tuple(t for t, classes in self.teacher_classes if name in classes)

    # ---- union ------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """``|U|``, the number of union classes."""
        return len(self.names)

    @property
    def background_index(self) -> int:
        """Index of the "no object" class in the student's ``|U| + 1`` logits (= ``|U|``)."""
        return len(self.names)

    @property
    def is_overlapping(self) -> bool:
        """True when some class name is known to more than one teacher."""
        known = sum(sum(n is not None for n in c) for _, c in self.teacher_classes)
        return known != len(self.names)

    def index(self, name: str) -> int:
        """Union index of class ``name``; ``ValueError`` for an unknown name."""
        try:
            return self._union_index[name]
        except (KeyError, TypeError):
            raise ValueError(f"name: unknown class {name!r}") from None

    def to_dict(self) -> dict[str, list[str | None]]:
        """``{teacher: [class names...]}``, the input of :meth:`from_teachers` (JSON-friendly)."""
        return {t: list(c) for t, c in self.teacher_classes}


def _normalise_teachers(items: Any, arg: str) -> tuple[tuple[str, tuple[str | None, ...]], ...]:
    try:
        pairs = list(items)
    except TypeError:
        raise ValueError(f"{arg}: expected (teacher name, class names) pairs") from None
    if not pairs:
        raise ValueError(f"{arg}: at least one teacher is required")
    out: list[tuple[str, tuple[str | None, ...]]] = []
    seen_teachers: set[str] = set()
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"{arg}: expected (teacher name, class names) pairs, got {pair!r}")
        teacher, classes = pair
        if not isinstance(teacher, str) or not teacher:
            raise ValueError(f"{arg}: teacher names must be non-empty strings, got {teacher!r}")
        if teacher in seen_teachers:
            raise ValueError(f"{arg}: teacher {teacher!r} appears more than once")
        seen_teachers.add(teacher)
        if isinstance(classes, str) or not isinstance(classes, Sequence):
            raise ValueError(
                f"{arg}: teacher {teacher!r}: expected a list of class names, "
                f"got {type(classes).__name__}"
            )
        if len(classes) == 0:
            raise ValueError(f"{arg}: teacher {teacher!r} has no classes")
        seen: set[str] = set()
        for name in classes:
            if name is None:  # a non-class slot of the head
                continue
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"{arg}: teacher {teacher!r}: class names must be non-empty strings "
                    f"(or None for a non-class slot), got {name!r}"
                )
            if name in seen:
                raise ValueError(f"{arg}: teacher {teacher!r} lists class {name!r} twice")
            seen.add(name)
        if not seen:
            raise ValueError(f"{arg}: teacher {teacher!r} has no classes (only non-class slots)")
        out.append((teacher, tuple(classes)))
    return tuple(out)


class PseudoTargets(TypedDict):
    """Pseudo-targets of one image, as returned by :func:`build_pseudo_targets`.

    ``M`` is the number of pseudo-targets of the image (``<= top_n``), rows by decreasing score.
    The dict is a valid DETR/``HungarianMatcher`` target (``"labels"``, ``"boxes"``).
    """

    labels: torch.Tensor  #: int64 (M,) union class index
    boxes: torch.Tensor  #: float32 (M, 4) normalised cxcywh, the teacher's box
    soft_logits: torch.Tensor  #: float32 (M, |U| + 1) soft-target logits, background last
    scores: torch.Tensor  #: float32 (M,) teacher probability of the hard label
    teacher: torch.Tensor  #: int64 (M,) index of the source teacher in ``LabelSpace.teachers``


def _field(obj: Any, key: str, where: str) -> Any:
    """``obj[key]`` for mappings, else ``obj.key`` (DetrOutput-like objects)."""
    if isinstance(obj, Mapping):
        if key in obj:
            return obj[key]
    else:
        value = getattr(obj, key, None)
        if value is not None:
            return value
        if hasattr(obj, "__getitem__"):
            try:
                return obj[key]
            except (KeyError, TypeError, IndexError):
                pass
    raise ValueError(f"{where}: missing {key!r} (expected a mapping or object with {key!r})")


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x if x.flags.writeable else x.copy())
    else:
        raise ValueError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


def _teacher_list(label_space: LabelSpace, outputs: Any) -> list[Any]:
    names = label_space.teachers
    if isinstance(outputs, Mapping):
        keys = list(outputs.keys())
        missing = [t for t in names if t not in outputs]
        extra = [k for k in keys if k not in label_space._teacher_index]
        if missing or extra:
            raise ValueError(
                f"teacher_outputs: expected a mapping keyed by teacher name {list(names)} "
                f"(or a sequence in teacher order); missing {missing}, unexpected {extra}"
            )
        return [outputs[t] for t in names]
    if isinstance(outputs, Sequence) and not isinstance(outputs, (str, bytes)):
        if len(outputs) != len(names):
            raise ValueError(
                f"teacher_outputs: got {len(outputs)} outputs for {len(names)} teachers "
                f"{list(names)}"
            )
        return list(outputs)
    raise ValueError(
        "teacher_outputs: expected a sequence in teacher order or a mapping keyed by teacher "
        f"name, got {type(outputs).__name__}"
    )


def _kind_list(label_space: LabelSpace, kinds: Any) -> list[str]:
    n = label_space.num_teachers
    if kinds is None:
        raw: list[Any] = ["softmax"] * n
    elif isinstance(kinds, str):
        raw = [kinds] * n
    elif isinstance(kinds, Mapping):
        missing = [t for t in label_space.teachers if t not in kinds]
        extra = [k for k in kinds if k not in label_space._teacher_index]
        if missing or extra:
            raise ValueError(f"kinds: missing teachers {missing}, unexpected {extra}")
        raw = [kinds[t] for t in label_space.teachers]
    elif isinstance(kinds, Sequence):
        if len(kinds) != n:
            raise ValueError(f"kinds: got {len(kinds)} kinds for {n} teachers")
        raw = list(kinds)
    else:
        raise ValueError(f"kinds: expected a str, sequence or mapping, got {type(kinds).__name__}")
    out = []
    for teacher, kind in zip(label_space.teachers, raw, strict=True):
        if kind not in TEACHER_KINDS:
            raise ValueError(
                f"kinds: teacher {teacher!r} has kind {kind!r}; expected 'softmax' or 'sigmoid'"
            )
        out.append("sigmoid" if kind == "focal" else kind)
    return out


def _number(value: Any, name: str, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {type(value).__name__}")
    if kind is int:
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _to_host(tensors: list[torch.Tensor], *, gather_cpu: bool = False) -> list[np.ndarray]:
    """float32 C-contiguous numpy copies/views of ``tensors``, with a single device→host copy.

    CPU tensors are viewed without a copy when already float32 and contiguous. Tensors on an
    accelerator are flattened into one buffer in their own dtype (float32 when dtypes differ),
    copied to the host once, then split and cast on the CPU (``gather_cpu`` sends CPU tensors
    down that path too, for tests).
    """
    out: list[np.ndarray] = [np.empty(0, np.float32)] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.device.type == "cpu" and not gather_cpu:
            out[i] = np.ascontiguousarray(t.to(torch.float32).numpy())
        else:
            by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        dtypes = {tensors[i].dtype for i in idx}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        flat = torch.cat([tensors[i].to(dtype).reshape(-1) for i in idx]).cpu()
        parts = torch.split(flat, [tensors[i].numel() for i in idx])
        for i, part in zip(idx, parts, strict=True):
            out[i] = part.to(torch.float32).reshape(tensors[i].shape).numpy()
    return out


def build_pseudo_targets(
    label_space: LabelSpace,
    teacher_outputs: Sequence[Any] | Mapping[str, Any],
    *,
    kinds: str | Sequence[str] | Mapping[str, str] | None = None,
    threshold: float = 0.1,
    top_n: int = 50,
    fill_logit: float = -5.0,
    nms_iou: float | None = 0.7,
) -> list[PseudoTargets]:
    """KA pseudo-targets for a batch, all teachers in one Rust call (see the module docs).

    Args:
        label_space: the union label space; its teacher order is the order of the outputs.
        teacher_outputs: one output per teacher, either a sequence in teacher order or a mapping
            keyed by teacher name. Each is a mapping or object (e.g. ``DetrOutput``) with
            ``"pred_logits"`` ``(B, Q_k, K_k)`` and ``"pred_boxes"`` ``(B, Q_k, 4)`` normalised
            cxcywh: torch tensors on any device (any float dtype) or numpy arrays. ``Q_k`` may
            differ between teachers; ``B`` may not.
        kinds: each teacher's head: ``"softmax"`` (``K_k = C_k + 1``, last = no object, the
            default) or ``"sigmoid"`` / ``"focal"`` (``K_k = C_k``). One string for all
            teachers, a sequence in teacher order, or a mapping keyed by teacher name.
        threshold: a query is a candidate when its class probability is ``> threshold``;
            in ``[0, 1)``.
        top_n: at most this many pseudo-targets per image (``>= 0``), after NMS.
        fill_logit: soft-logit value of union classes the source teacher does not know.
        nms_iou: IoU threshold of the class-aware cross-teacher NMS in ``[0, 1]``, or ``None``
            to keep duplicates.

    Returns:
        One :class:`PseudoTargets` dict per image (``labels`` int64 (M,), ``boxes`` float32
        (M, 4) cxcywh, ``soft_logits`` float32 (M, |U| + 1), ``scores`` float32 (M,),
        ``teacher`` int64 (M,)), rows by decreasing score, tensors on the device of the first
        teacher's ``pred_logits`` (CPU for numpy input).

    Raises:
        ValueError: naming the argument, e.g. ``"teacher_outputs['b'].pred_logits: ..."`` for a
            logit width that does not match the label space or a NaN logit.
    """
    if not isinstance(label_space, LabelSpace):
        raise ValueError(f"label_space: expected a LabelSpace, got {type(label_space).__name__}")
    outputs = _teacher_list(label_space, teacher_outputs)
    kind_list = _kind_list(label_space, kinds)
    threshold = _number(threshold, "threshold", float)
    top_n = _number(top_n, "top_n", int)
    if top_n > 2**62:  # "at most top_n": anything this large means no cut (fits an i64)
        top_n = 2**62
    fill_logit = _number(fill_logit, "fill_logit", float)
    if nms_iou is not None:
        nms_iou = _number(nms_iou, "nms_iou", float)

    names = label_space.teachers
    where = [f"teacher_outputs[{t!r}]" for t in names]
    logits: list[torch.Tensor] = []
    boxes: list[torch.Tensor] = []
    for k, out in enumerate(outputs):
        lg = _as_tensor(_field(out, "pred_logits", where[k]), f"{where[k]}.pred_logits")
        bx = _as_tensor(_field(out, "pred_boxes", where[k]), f"{where[k]}.pred_boxes")
        c = len(label_space.classes(k))
        want = c + 1 if kind_list[k] == "softmax" else c
        if lg.dim() != 3 or lg.shape[-1] != want:
            raise ValueError(
                f"{where[k]}.pred_logits: expected shape (B, Q, {want}) for a {kind_list[k]} "
                f"teacher with {c} classes, got {tuple(lg.shape)}"
            )
        if bx.dim() != 3 or bx.shape[-1] != 4 or bx.shape[:2] != lg.shape[:2]:
            raise ValueError(
                f"{where[k]}.pred_boxes: expected shape ({lg.shape[0]}, {lg.shape[1]}, 4) "
                f"to match pred_logits, got {tuple(bx.shape)}"
            )
        if logits and lg.shape[0] != logits[0].shape[0]:
            raise ValueError(
                f"{where[k]}.pred_logits: batch size {lg.shape[0]} differs from "
                f"{where[0]}'s {logits[0].shape[0]}"
            )
        logits.append(lg)
        boxes.append(bx)
    device = logits[0].device
    host = _to_host(logits + boxes)
    n = len(outputs)
    try:
        labels, out_boxes, soft, scores, teacher, counts = _native.build_pseudo_targets(
            host[:n],
            host[n:],
            [label_space._maps[k] for k in range(n)],
            label_space.num_classes,
            kind_list,
            threshold,
            top_n,
            fill_logit,
            nms_iou,
        )
    except (ValueError, TypeError, MemoryError) as e:  # the native names -> the user's
        raise type(e)(_rename_args(str(e), names)) from None
    return _split(labels, out_boxes, soft, scores, teacher, counts, device)


def _rename_args(msg: str, names: Sequence[str]) -> str:
    """Native argument names (``teacher_logits[k]``) → the user's (``teacher_outputs[...]``)."""

    def repl(m: re.Match[str]) -> str:
        field_name = "pred_logits" if m.group(1) == "logits" else "pred_boxes"
        return f"teacher_outputs[{names[int(m.group(2))]!r}].{field_name}"

    return re.sub(r"teacher_(logits|boxes)\[(\d+)\]", repl, msg)


def _split(
    labels: np.ndarray,
    boxes: np.ndarray,
    soft: np.ndarray,
    scores: np.ndarray,
    teacher: np.ndarray,
    counts: np.ndarray,
    device: torch.device,
    *,
    pack: bool | None = None,
) -> list[PseudoTargets]:
    """Per-image dicts on ``device``; ``pack`` (default: device is not the CPU) moves the
    outputs as two packed buffers."""
    sizes = counts.tolist()
    if not (device.type != "cpu" if pack is None else pack):
        lab, bx, sl, sc, te = (torch.from_numpy(a) for a in (labels, boxes, soft, scores, teacher))
    else:
        # Two host→device copies (one float buffer, one int buffer), then views.
        m, w = soft.shape
        floats = torch.from_numpy(np.concatenate([boxes.reshape(-1), soft.reshape(-1), scores])).to(
            device
        )
        ints = torch.from_numpy(np.concatenate([labels, teacher])).to(device)
        bx = floats[: 4 * m].view(m, 4)
        sl = floats[4 * m : 4 * m + w * m].view(m, w)
        sc = floats[4 * m + w * m :]
        lab, te = ints[:m], ints[m:]
    parts = [torch.split(t, sizes) for t in (lab, bx, sl, sc, te)]
    return [
        PseudoTargets(labels=a, boxes=b, soft_logits=s, scores=c, teacher=t)
        for a, b, s, c, t in zip(*parts, strict=True)
    ]
