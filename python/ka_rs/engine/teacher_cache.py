"""The teachers' outputs on every training image, computed once (``cache_teachers``).

The student then trains on those fixed images (no augmentation) and no teacher runs during
training: worth it when the student sees each image several times (the demo's shapes data).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ka_rs.engine.config import ConfigError
from ka_rs.models.detr import DetrOutput
from ka_rs.teachers.base import Teacher

__all__ = ["TeacherCache"]


class _ListDataset(torch.utils.data.Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """In-memory ``(image, target)`` items (the teacher cache's fixed training images)."""

    def __init__(self, items: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.items[index]


class TeacherCache:
    """The teachers' outputs on every training image, computed once (``cache_teachers``).

    Holds the (deterministically transformed) images and targets as :attr:`dataset` and, per
    teacher, ``pred_logits`` (N, Q_k, K_k), ``pred_boxes`` (N, Q_k, 4) and, if requested, the
    SA hook-point sequences (N, S, d) (float16), indexed by image id. All images must have one
    size (the sequences of a padded batch would depend on the batch).
    """

    def __init__(
        self,
        items: list[tuple[torch.Tensor, dict[str, Any]]],
        outputs: list[dict[str, Any]],
        positions: dict[int, int],
        seconds: float,
    ) -> None:
        self.dataset = _ListDataset(items)
        self._outputs = outputs
        self._positions = positions
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached images and outputs."""
        n = sum(int(img.numel() * img.element_size()) for img, _ in self.dataset.items)
        for out in self._outputs:
            for v in (out["pred_logits"], out["pred_boxes"], *out["sequences"]):
                n += int(v.numel() * v.element_size())
        return n

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teachers: Sequence[Teacher],
        dataset: Any,
        *,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        sequences: Sequence[int] = (),
        progress: bool = False,
        run: Any = None,
    ) -> TeacherCache:
        """Render every item of ``dataset`` once and run every teacher on it.

        Args:
            teachers: the teachers, in order.
            dataset: the training dataset (images of one size).
            batch_size: images per teacher forward.
            device: where the teachers run.
            sequences: indices of the teachers whose encoder sequences are kept (the SA
                teachers; float16 to halve the memory).
            progress: show a progress bar.
            run: ``run(images, mask) -> list of outputs`` (default: each teacher's forward);
                :meth:`ka_rs.amalgamation.AmalgamationStep.run_teachers` adds autocast.
        """
        from ka_rs.data import collate_fn
        from ka_rs.engine.logging import make_progress

        t0 = time.perf_counter()
        items = [dataset[i] for i in range(len(dataset))]
        sizes = {tuple(img.shape[-2:]) for img, _ in items}
        if len(sizes) > 1:
            raise ConfigError(
                f"amalgamation.cache_teachers: needs training images of one size, got "
                f"{len(sizes)} sizes (e.g. {sorted(sizes)[:3]}); turn the cache off"
            )
        positions: dict[int, int] = {}
        for i, (_, tgt) in enumerate(items):
            iid = int(tgt["image_id"])
            if iid in positions:
                raise ValueError(f"dataset: image id {iid} appears twice; cannot cache by id")
            positions[iid] = i
        chunks: list[list[dict[str, Any]]] = [[] for _ in teachers]
        with make_progress(enabled=progress, transient=True) as bar:
            task = bar.add_task("labelling with the teachers", total=len(items))
            for start in range(0, len(items), batch_size):
                images, mask, _ = collate_fn(items[start : start + batch_size])
                images, mask = images.to(device), mask.to(device)
                outs = run(images, mask) if run is not None else [t(images, mask) for t in teachers]
                for k, out in enumerate(outs):
                    chunks[k].append(
                        {
                            "pred_logits": out.pred_logits.float().cpu(),
                            "pred_boxes": out.pred_boxes.float().cpu(),
                            "sequences": [x.half().cpu() for x in out.sequences]
                            if k in sequences
                            else [],
                        }
                    )
                bar.advance(task, images.shape[0])
        outputs = []
        for per_teacher in chunks:
            n_points = len(per_teacher[0]["sequences"])
            outputs.append(
                {
                    "pred_logits": torch.cat([c["pred_logits"] for c in per_teacher]),
                    "pred_boxes": torch.cat([c["pred_boxes"] for c in per_teacher]),
                    "sequences": [
                        torch.cat([c["sequences"][p] for c in per_teacher]) for p in range(n_points)
                    ],
                }
            )
        return cls(items, outputs, positions, time.perf_counter() - t0)

    def outputs(
        self, targets: Sequence[Mapping[str, Any]], device: torch.device
    ) -> list[DetrOutput]:
        """The teachers' cached outputs for a batch (in teacher order)."""
        idx = torch.tensor([self._positions[int(t["image_id"])] for t in targets])
        result = []
        for out in self._outputs:
            seqs = [x[idx].to(device=device, dtype=torch.float32) for x in out["sequences"]]
            result.append(
                DetrOutput(
                    pred_logits=out["pred_logits"][idx].to(device),
                    pred_boxes=out["pred_boxes"][idx].to(device),
                    sequences=seqs,
                    padding_mask=(
                        torch.zeros(seqs[0].shape[:2], dtype=torch.bool, device=device)
                        if seqs
                        else None
                    ),
                )
            )
        return result
