"""Distributed training helpers: ``torchrun`` setup, DDP, samplers, gathering, shutdown.

The same command runs alone or under ``torchrun --nproc-per-node N``: :func:`init_distributed`
reads the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables torchrun sets, picks ``nccl`` on
CUDA and ``gloo`` on CPU, and returns a :class:`DistInfo`. Without those variables it returns a
single-process ``DistInfo`` and every helper here degrades to a no-op.

Data order is a pure function of ``(seed, epoch)``: :class:`ResumableDistributedSampler`
shuffles with a generator seeded by ``seed + epoch`` (like :class:`DistributedSampler`), can
start mid-epoch (resume), and yields ``(epoch, index)`` keys that :class:`SeededDataset` turns
into a per-sample random seed for augmentation. Samples therefore look the same whatever the
number of DataLoader workers, and a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = [
    "DistInfo",
    "InferenceSampler",
    "ResumableDistributedSampler",
    "SeededDataset",
    "all_gather_objects",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "init_distributed",
    "is_main_process",
    "resolve_device",
    "sample_seed",
    "unwrap_model",
    "wrap_ddp",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank, device, whether distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that logs, evaluates and saves)."""
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` → ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device: 'cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {device!r} requested but CUDA is not available")
    return dev


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by torchrun's environment, if any.

    Returns a :class:`DistInfo`; world size 1 (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) means
    no process group is created. ``device`` is ``"auto"``, ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``; under torchrun, CUDA ranks use ``cuda:<LOCAL_RANK>``.
    """
    world_size = _env_int("WORLD_SIZE") or 1
    local_rank = _env_int("LOCAL_RANK") or 0
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(device=dev)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {
            "backend": backend,
            "timeout": datetime.timedelta(minutes=timeout_minutes),
        }
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        distributed=True,
        backend=backend,
    )


def cleanup_distributed() -> None:
    """Leave the process group (idempotent; safe when none was created)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True when not distributed or on rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Synchronise all ranks (no-op when not distributed)."""
    if _is_dist():
        dist.barrier()


def wrap_ddp(
    model: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = False
) -> torch.nn.Module:
    """Wrap ``model`` (already on ``info.device``) in DDP when distributed, else return it."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def all_reduce_mean(values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Average a dict of scalars over ranks (identity when not distributed)."""
    keys = sorted(values)
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if _is_dist() and keys:
        backend = dist.get_backend()
        if backend == "nccl":
            vec = vec.cuda()
        dist.all_reduce(vec)
        vec = vec.cpu() / dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, vec.tolist(), strict=True)}


def all_gather_objects(obj: T) -> list[T]:
    """Gather one picklable object from every rank, in rank order (``[obj]`` alone)."""
    if not _is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (identity when not distributed)."""
    if not _is_dist():
        return obj
    buf = [obj]
    dist.broadcast_object_list(buf, src=src)
    return buf[0]


class ResumableDistributedSampler(DistributedSampler[Any]):
    """Deterministic (seed, epoch) shuffling, sharded over ranks, resumable mid-epoch.

    Yields ``(epoch, index)`` pairs (pass the dataset through :class:`SeededDataset`) or plain
    indices with ``yield_epoch=False``. Rank ``r`` gets ``perm[r::world_size]`` of the padded
    permutation, exactly as :class:`torch.utils.data.DistributedSampler`; so the union of all
    ranks' ``i``-th batches equals the ``i``-th batch of a single process whose batch size is
    ``world_size`` times larger. :meth:`set_start` skips the first samples of this rank's shard
    (used to resume in the middle of an epoch); it is reset by :meth:`set_epoch`.
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        yield_epoch: bool = True,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0
        self.yield_epoch = yield_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` and restart from its beginning."""
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's shard in the current epoch."""
        if start < 0:
            raise ValueError(f"start: must be >= 0, got {start}")
        self.start = start

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())[self.start :]
        if self.yield_epoch:
            return iter([(self.epoch, i) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


class InferenceSampler(Sampler[int]):
    """Contiguous, unpadded shard of ``range(n)`` for this rank (evaluation: no duplicates)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.n = n
        per = (n + num_replicas - 1) // num_replicas
        self.begin = min(rank * per, n)
        self.end = min(self.begin + per, n)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed derived from ``(seed, epoch, index)`` (stable across runs and platforms)."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, index & 0xFFFFFFFF])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64).dot([1 << 31, 1]))


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch / random / numpy's global generators for a block, then restore them."""
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class SeededDataset(Dataset[Any]):
    """Wrap a dataset so that item ``(epoch, index)`` is drawn with its own fixed random seed.

    Random augmentations inside ``dataset[index]`` (flips, jitter, crops) then depend only on
    ``(seed, epoch, index)``: not on the worker that loads it, nor on how many samples were
    drawn before, nor on the training process's own generator (which is restored afterwards).
    A plain integer key means epoch 0. Attributes not found here are looked up on ``dataset``.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int] | list[int]) -> Any:
        if isinstance(key, (tuple, list)):
            epoch, index = int(key[0]), int(key[1])
        else:
            epoch, index = 0, int(key)
        with seeded_rng(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)
