"""The datasets a training run reads: shapes / COCO / VOC with transforms and a class subset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ka_rs.engine.config import DataConfig

__all__ = ["build_datasets", "preset_hints", "resolve_classes"]


def resolve_classes(data: DataConfig, all_classes: Sequence[str]) -> list[str]:
    """The classes a detector trained on ``data`` learns (see :class:`DataConfig`)."""
    all_classes = list(all_classes)
    if data.split:
        from ka_rs.data import get_split

        split = get_split(data.split)
        if not data.teacher:
            raise ValueError(
                f"data.teacher: required with data.split={data.split!r}; one of {sorted(split)}"
            )
        if data.teacher not in split:
            raise ValueError(
                f"data.teacher: {data.teacher!r} is not part of split {data.split!r}; "
                f"expected one of {sorted(split)}"
            )
        classes = list(split[data.teacher])
    elif data.classes:
        classes = list(data.classes)
    else:
        return all_classes
    unknown = [c for c in classes if c not in all_classes]
    if unknown:
        raise ValueError(
            f"data.classes: {unknown} are not classes of the dataset "
            f"(it has: {', '.join(all_classes)})"
        )
    if len(set(classes)) != len(classes):
        raise ValueError(f"data.classes: duplicate class names in {classes}")
    return classes


def build_datasets(
    data: DataConfig, *, image_size: int = 128, max_size: int = 0, train: bool = True
) -> tuple[Any, Any, list[str]]:
    """Training and validation datasets for ``data`` (with transforms and class subset).

    Returns ``(train_dataset or None, val_dataset, class_names)``. ``image_size`` /
    ``max_size`` are the defaults used when ``data.image_size`` / ``data.max_size`` are 0.
    """
    from ka_rs.data import ClassSubset, make_transforms

    size = data.image_size or image_size
    # DETR's 800/1333 aspect cap unless given
    max_size = data.max_size or max_size or round(size * 1333 / 800)
    train_tf = make_transforms(
        "train",
        image_size=size,
        max_size=max_size,
        scales=data.scales or None,
        flip=data.flip,
        color_jitter=data.color_jitter,
    )
    val_tf = make_transforms("val", image_size=size, max_size=max_size)
    train_ds: Any = None
    if data.source == "shapes":
        from ka_rs.data import ShapesDataset

        def shapes(split: str, n: int, tf: Any) -> Any:
            return ShapesDataset(split, n or None, image_size=size, seed=data.seed, transforms=tf)

        if train:
            train_ds = shapes(data.train_set, data.num_train_images, train_tf)
        val_ds = shapes(data.val_set, data.num_val_images, val_tf)
    elif data.source == "coco":
        from ka_rs.data import CocoDetection

        if train:
            train_ds = CocoDetection(
                data.root, data.ann_file, transforms=train_tf, skip_invalid=data.skip_invalid
            )
        if not data.val_ann_file:
            raise ValueError("data.val_ann_file: required for evaluation with data.source='coco'")
        val_ds = CocoDetection(
            data.val_root or data.root,
            data.val_ann_file,
            transforms=val_tf,
            skip_invalid=data.skip_invalid,
        )
    elif data.source == "voc":
        from ka_rs.data import VocDetection

        if train:
            train_ds = VocDetection(
                data.root, data.train_set, transforms=train_tf, skip_invalid=data.skip_invalid
            )
        val_ds = VocDetection(
            data.val_root or data.root,
            data.val_set,
            transforms=val_tf,
            skip_invalid=data.skip_invalid,
        )
    else:  # validated by the config already
        raise ValueError(f"data.source: unknown source {data.source!r}")
    all_classes = list(val_ds.class_names)
    classes = resolve_classes(data, all_classes)
    if classes != all_classes:
        if train_ds is not None:
            train_ds = ClassSubset(train_ds, classes)
        val_ds = ClassSubset(val_ds, classes)
    return train_ds, val_ds, classes


def preset_hints(preset: str) -> dict[str, Any]:
    """The suggested training settings of a model preset (``image_size``, ``batch_size``,
    ``lr``, ``lr_backbone``), or ``{}`` for an unknown preset."""
    try:
        from ka_rs.models import TRAINING_HINTS

        return dict(TRAINING_HINTS.get(preset, {}))
    except ImportError:  # pragma: no cover
        return {}
