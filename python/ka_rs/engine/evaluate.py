"""COCO-style evaluation of DETR-family detectors (pycocotools), over all classes and subsets.

Protocol (DETR / Deformable DETR): no NMS, at most ``max_dets`` (100) detections per image.

* softmax models (``K = C + 1`` logits, last = no-object): per query, scores = softmax over all
  ``K`` logits with the no-object column dropped; label = arg-max, score = its probability; the
  ``max_dets`` best queries are kept.
* sigmoid models (``K = C``): probabilities = sigmoid(logits); the top ``max_dets`` entries over
  the flattened ``Q × C`` matrix, each giving (query, class, score), like Deformable DETR.

Boxes (normalised cxcywh relative to the unpadded, transformed image) are mapped to the original
image's pixel xyxy with ``target["orig_size"] = (h, w)``. Model labels map to ground-truth
categories **by name** (the dataset's ``coco_gt()`` category names), so a model can be evaluated
on a dataset with more or differently ordered classes; only the model's classes are scored.

Metrics: ``AP`` (@[.50:.95]), ``AP50``, ``AP75``, ``APs``/``APm``/``APl`` over the union of the
model's classes and over each named subset (e.g. each teacher's classes), plus ``AP`` / ``AP50``
per class. Subset and union numbers are averaged from one COCOeval precision array, exactly as
``COCOeval.summarize`` averages them. A value of ``-1`` means no ground truth (COCO's convention).
Under ``torchrun`` each rank predicts its shard and rank 0 scores the gathered predictions; every
rank returns the same :class:`EvalResult`. With ``amp="bf16"`` / ``"fp16"`` the model forward runs
under autocast (:mod:`ka_rs.engine.amp`) and the post-processing in float32.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ka_rs.engine.amp import autocast, validate_amp
from ka_rs.engine.distributed import (
    DistInfo,
    InferenceSampler,
    all_gather_objects,
    broadcast_object,
    unwrap_model,
)

__all__ = [
    "EvalResult",
    "coco_evaluate",
    "evaluate",
    "find_coco_gt",
    "make_eval_loader",
    "postprocess",
    "results_table",
]

_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class EvalResult:
    """Evaluation output.

    ``subsets`` maps ``"all"`` (the union of the model's classes) and every requested subset
    name to ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}``; ``per_class`` maps class name to
    ``{"AP", "AP50"}``. ``metrics`` is the flat view used in logs: ``AP``, ``AP50``, ``AP75``
    for the union and ``"<subset>/AP"`` etc. for each subset.
    """

    subsets: dict[str, dict[str, float]]
    per_class: dict[str, dict[str, float]]
    num_images: int
    num_detections: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """Flat metric dict: union ``AP``/``AP50``/``AP75`` and ``subset/AP`` etc."""
        out: dict[str, float] = {}
        for name, vals in self.subsets.items():
            for key in ("AP", "AP50", "AP75"):
                out[key if name == "all" else f"{name}/{key}"] = vals[key]
        return out

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "subsets": self.subsets,
            "per_class": self.per_class,
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "seconds": self.seconds,
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The result as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)


def results_table(result: EvalResult, title: str = "COCO evaluation") -> Any:
    """A :class:`rich.table.Table`: one row per subset (union first), AP / AP50 / AP75 / ..."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("classes", style="bold")
    table.add_column("#cls", justify="right")
    for m in _METRICS:
        table.add_column(m, justify="right")
    counts = result.extra.get("subset_sizes", {})
    for name, vals in result.subsets.items():
        table.add_row(
            name,
            str(counts.get(name, "")),
            *[("-" if vals[m] < 0 else f"{vals[m]:.3f}") for m in _METRICS],
        )
    return table


def postprocess(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    orig_sizes: torch.Tensor,
    class_head: str,
    max_dets: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Per-image detections in original pixel coordinates (see the module docstring).

    Args:
        pred_logits: (B, Q, K) logits; ``K = C + 1`` for ``class_head="softmax"`` (last column
            = no-object), ``K = C`` for ``"sigmoid"``.
        pred_boxes: (B, Q, 4) normalised cxcywh boxes.
        orig_sizes: (B, 2) original ``(h, w)`` of each image.
        class_head: ``"softmax"`` or ``"sigmoid"``.
        max_dets: detections kept per image (no NMS).

    Returns:
        One dict per image: ``scores`` (D,), ``labels`` i64 (D,) in ``[0, C)``, ``boxes``
        (D, 4) xyxy pixels, by decreasing score, ``D <= max_dets``
        (:func:`ka_rs.models.postprocess`).
    """
    from ka_rs.models import postprocess as model_postprocess

    outputs = {"pred_logits": pred_logits.float(), "pred_boxes": pred_boxes.float()}
    return model_postprocess(outputs, orig_sizes, class_head=class_head, num_detections=max_dets)


def _detections_to_coco(
    dets: dict[str, torch.Tensor], image_id: int, label_to_cat: Mapping[int, int]
) -> list[dict[str, Any]]:
    boxes = dets["boxes"].cpu().double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    res = []
    for box, score, label in zip(
        xywh, dets["scores"].cpu().tolist(), dets["labels"].cpu().tolist(), strict=True
    ):
        cat = label_to_cat.get(int(label))
        if cat is None:
            continue
        res.append(
            {
                "image_id": int(image_id),
                "category_id": int(cat),
                "bbox": [float(v) for v in box],
                "score": float(score),
            }
        )
    return res


def _silent() -> contextlib.AbstractContextManager[Any]:
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _category_maps(
    coco_gt: Mapping[str, Any], class_names: Sequence[str | None]
) -> tuple[dict[int, int], dict[str, int]]:
    name_to_cat: dict[str, int] = {}
    for cat in coco_gt.get("categories", []):
        name_to_cat.setdefault(str(cat["name"]), int(cat["id"]))
    label_to_cat = {i: name_to_cat[n] for i, n in enumerate(class_names) if n in name_to_cat}
    return label_to_cat, name_to_cat


def coco_evaluate(
    coco_gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    class_names: Sequence[str | None],
    subsets: Mapping[str, Sequence[str]] | None = None,
    image_ids: Iterable[int] | None = None,
    max_dets: int = 100,
) -> EvalResult:
    """Score COCO-format detections against COCO-format ground truth.

    Args:
        coco_gt: ground truth dict (``images``, ``annotations``, ``categories``; original
            pixels), e.g. ``dataset.coco_gt()``.
        detections: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dicts.
        class_names: the model's classes; only ground-truth categories with these names are
            scored (the union); a ``None`` entry (a non-class slot) never is.
        subsets: optional ``{name: [class names]}``; each must be a subset of ``class_names``.
        image_ids: images to score (default: every image in ``coco_gt``).
        max_dets: maximum detections per image considered.

    Raises:
        ValueError: a subset names a class outside ``class_names``, or no class of
            ``class_names`` appears in the ground truth's categories.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    t0 = time.perf_counter()
    label_to_cat, name_to_cat = _category_maps(coco_gt, class_names)
    if not label_to_cat:
        raise ValueError(
            f"class_names: none of {list(class_names)[:5]}... is a category of the ground truth "
            f"(categories: {sorted(name_to_cat)[:10]})"
        )
    known = set(class_names)
    subsets = dict(subsets or {})
    for sname, names in subsets.items():
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"subsets[{sname!r}]: classes {bad} are not among the model's classes")
    cat_ids = [label_to_cat[i] for i in range(len(class_names)) if i in label_to_cat]
    # every label in label_to_cat has a name (a category's): the filter drops nothing
    cat_name = {c: n for i, c in label_to_cat.items() if (n := class_names[i]) is not None}
    if image_ids is None:
        img_ids = sorted(int(im["id"]) for im in coco_gt.get("images", []))
    else:
        img_ids = sorted({int(i) for i in image_ids})
    gt_cat_set = set(cat_ids)
    detections = [d for d in detections if int(d["category_id"]) in gt_cat_set]

    with _silent():
        gt = COCO()
        gt.dataset = {
            "images": list(coco_gt.get("images", [])),
            "annotations": list(coco_gt.get("annotations", [])),
            "categories": list(coco_gt.get("categories", [])),
            "info": coco_gt.get("info", {}),
        }
        gt.createIndex()
        precision: np.ndarray | None = None
        if detections:
            dt = gt.loadRes([dict(d) for d in detections])
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.params.catIds = cat_ids
            ev.params.imgIds = img_ids
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
            precision = ev.eval["precision"]  # [T, R, K, A, M]
    # ground-truth presence per category (for -1 = "no ground truth" when nothing detected)
    img_set = set(img_ids)
    has_gt = {
        c: any(
            int(a["category_id"]) == c and int(a["image_id"]) in img_set and not a.get("iscrowd", 0)
            for a in coco_gt.get("annotations", [])
        )
        for c in cat_ids
    }

    def summarise(ks: list[int]) -> dict[str, float]:
        if not ks:
            return dict.fromkeys(_METRICS, -1.0)
        if precision is None:
            val = 0.0 if any(has_gt[cat_ids[k]] for k in ks) else -1.0
            return dict.fromkeys(_METRICS, val)
        out = {}
        for key, t_sel, area in (
            ("AP", slice(None), 0),
            ("AP50", slice(0, 1), 0),
            ("AP75", slice(5, 6), 0),
            ("APs", slice(None), 1),
            ("APm", slice(None), 2),
            ("APl", slice(None), 3),
        ):
            p = precision[t_sel, :, ks, area, -1]
            valid = p[p > -1]
            out[key] = float(valid.mean()) if valid.size else -1.0
        return out

    cat_index = {c: k for k, c in enumerate(cat_ids)}
    subset_results: dict[str, dict[str, float]] = {"all": summarise(list(range(len(cat_ids))))}
    sizes = {"all": len(cat_ids)}
    for sname, names in subsets.items():
        ks = [cat_index[name_to_cat[n]] for n in names if name_to_cat.get(n) in cat_index]
        subset_results[sname] = summarise(ks)
        sizes[sname] = len(ks)
    per_class = {}
    for c, k in cat_index.items():
        vals = summarise([k])
        per_class[cat_name[c]] = {"AP": vals["AP"], "AP50": vals["AP50"]}
    return EvalResult(
        subsets=subset_results,
        per_class=per_class,
        num_images=len(img_ids),
        num_detections=len(detections),
        seconds=time.perf_counter() - t0,
        extra={"subset_sizes": sizes},
    )


def find_coco_gt(dataset: Any) -> dict[str, Any]:
    """``dataset.coco_gt()``, looking through wrappers (``.dataset`` attributes) if needed."""
    seen = 0
    obj = dataset
    while obj is not None and seen < 8:
        fn = getattr(type(obj), "coco_gt", None)
        if callable(fn):
            gt: dict[str, Any] = obj.coco_gt()
            return gt
        obj = getattr(obj, "dataset", None)
        seen += 1
    raise ValueError(
        f"dataset: {type(dataset).__name__} has no coco_gt(); pass coco_gt= to evaluate()"
    )


def make_eval_loader(
    dataset: Any,
    batch_size: int,
    num_workers: int = 0,
    info: DistInfo | None = None,
) -> torch.utils.data.DataLoader[Any]:
    """An in-order, unpadded, rank-sharded DataLoader for evaluation (uses ``collate_fn``)."""
    from ka_rs.data import collate_fn

    info = info or DistInfo()
    sampler = InferenceSampler(len(dataset), info.world_size, info.rank)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=info.device.type == "cuda",
    )


def _class_head(model: torch.nn.Module, num_logits: int, num_classes: int) -> str:
    cfg = getattr(unwrap_model(model), "config", None)
    head = getattr(cfg, "class_head", None)
    if head in ("softmax", "sigmoid"):
        return str(head)
    if num_logits == num_classes + 1:
        return "softmax"
    if num_logits == num_classes:
        return "sigmoid"
    raise ValueError(
        f"class_names: model emits {num_logits} logits, which fits neither softmax "
        f"({num_classes}+1) nor sigmoid ({num_classes}) heads"
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data_loader: Iterable[Any],
    class_names: Sequence[str | None],
    subsets: Mapping[str, Sequence[str]] | None = None,
    *,
    coco_gt: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    max_dets: int = 100,
    class_head: str | None = None,
    progress: bool = False,
    description: str = "evaluating",
    amp: str = "off",
) -> EvalResult:
    """Run ``model`` over ``data_loader`` and compute COCO AP / AP50 / AP75.

    Args:
        model: a detector returning ``pred_logits`` (B, Q, K) and ``pred_boxes`` (B, Q, 4)
            (a :class:`~ka_rs.models.DetrOutput` or mapping); DDP wrappers are looked through.
            Put in eval mode for the call and restored afterwards.
        data_loader: yields ``(images (B,3,H,W), mask (B,H,W) bool, targets)`` as
            :func:`ka_rs.data.collate_fn` builds them; targets need ``image_id`` and
            ``orig_size``. Under torchrun, give each rank its own shard
            (:func:`make_eval_loader`).
        class_names: the model's classes in label order (``None``: a non-class slot, never
            scored).
        subsets: optional ``{name: [class names]}`` scored separately (e.g. per teacher).
        coco_gt: ground truth; default ``data_loader.dataset.coco_gt()``.
        device: where to run the model (default: the model's device).
        max_dets: detections per image (no NMS).
        class_head: ``"softmax"`` / ``"sigmoid"``; default from ``model.config.class_head``.
        progress: show a rich progress bar (rank 0).
        description: progress-bar label.
        amp: ``"off"`` (float32), ``"bf16"`` or ``"fp16"``: the model forward runs under
            :func:`ka_rs.engine.amp.autocast`; scores and boxes are post-processed in float32.

    Returns:
        The same :class:`EvalResult` on every rank.

    Raises:
        ValueError: ``amp`` is not a mode or cannot run on ``device``.
    """
    import torch.distributed as dist

    t0 = time.perf_counter()
    net = unwrap_model(model)
    if device is None:
        try:
            device = next(net.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    validate_amp(amp, key="amp")
    if coco_gt is None:
        dataset = getattr(data_loader, "dataset", None)
        if dataset is None:
            raise ValueError("coco_gt: data_loader has no .dataset with coco_gt(); pass coco_gt=")
        coco_gt = find_coco_gt(dataset)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    label_to_cat, _ = _category_maps(coco_gt, class_names)

    was_training = net.training
    net.eval()
    detections: list[dict[str, Any]] = []
    image_ids: list[int] = []
    total = len(data_loader) if isinstance(data_loader, Sized) else None
    from ka_rs.engine.logging import make_progress

    try:
        with make_progress(enabled=progress and rank == 0, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for batch in data_loader:
                images, mask, targets = batch
                images = images.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True) if mask is not None else None
                with autocast(amp, device):
                    out = net(images, mask)
                logits = out["pred_logits"].float()  # post-processing in float32
                boxes = out["pred_boxes"].float()
                head = class_head or _class_head(net, logits.shape[-1], len(class_names))
                orig = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets])
                dets = postprocess(logits, boxes, orig.to(device), head, max_dets)
                for d, t in zip(dets, targets, strict=True):
                    iid = int(t["image_id"])
                    image_ids.append(iid)
                    detections.extend(_detections_to_coco(d, iid, label_to_cat))
                bar.advance(task)
    finally:
        net.train(was_training)

    gathered = all_gather_objects((image_ids, detections))
    result: EvalResult | None = None
    if rank == 0:
        seen: set[int] = set()
        all_ids: list[int] = []
        all_dets: list[dict[str, Any]] = []
        for ids, dets_r in gathered:
            new = {i for i in ids if i not in seen}
            all_ids.extend(sorted(new))
            all_dets.extend(d for d in dets_r if d["image_id"] in new)
            seen |= new
        result = coco_evaluate(
            coco_gt, all_dets, class_names, subsets, image_ids=all_ids, max_dets=max_dets
        )
        result.seconds = time.perf_counter() - t0
    result = broadcast_object(result)
    assert result is not None
    return result
