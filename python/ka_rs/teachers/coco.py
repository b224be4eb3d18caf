"""COCO's category-id slots, as DETR's COCO heads lay out their class logits.

facebookresearch/detr trains COCO models with ``num_classes = 91``: class logit ``i`` is COCO
category id ``i`` (0–90), and a 92nd logit is "no object". Eleven of those ids name no
category (:data:`COCO_UNUSED_IDS`: 0 and the ten ids COCO 2014 dropped); their logits exist and
take part in the softmax, so the head is kept whole and those slots are marked ``None``
(non-class slots, see :mod:`ka_rs.teachers.base`).
"""

from __future__ import annotations

from ka_rs.data.splits import COCO_CLASSES

__all__ = ["COCO_91_SLOTS", "COCO_UNUSED_IDS"]

#: COCO category ids 0–90 that name no category ("N/A" in DETR's label list).
COCO_UNUSED_IDS: tuple[int, ...] = (0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83)


def _slots() -> tuple[str | None, ...]:
    names = iter(COCO_CLASSES)  # the 80 names in category-id order
    slots = tuple(None if i in COCO_UNUSED_IDS else next(names) for i in range(91))
    if next(names, None) is not None:  # pragma: no cover - guards the two tables above
        raise RuntimeError("COCO_CLASSES does not fit the 91 category-id slots")
    return slots


#: Class name of each of DETR's 91 COCO class logits (index = category id); None = unused id.
COCO_91_SLOTS: tuple[str | None, ...] = _slots()
