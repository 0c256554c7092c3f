"""Distributed calibration: shard batches over ``torch.distributed`` ranks, all-reduce the statistics.

Each rank runs ONNX Runtime on its share of the calibration batches (``batches[rank::world]``) and
reduces them into :class:`~espace_export.calibration.statistics.ActivationStats`; the float64 sums and row counts
are then summed across ranks, so every rank ends with the statistics of the whole calibration set and
projections are computed once from them. Sums are exact up to float64 round-off in the order of addition.

Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, MASTER_ADDR/PORT)::

    torchrun --standalone --nproc-per-node 8 -m espace_export model.onnx --ratio 0.5 --calib-data c.npz

Backend: ``gloo`` on CPU; ``nccl`` when CUDA is available (ONNX Runtime's CUDA provider on each GPU).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from espace_export._optional import require
from espace_export.errors import EspaceError

T = TypeVar("T")


def requested() -> bool:
    """Whether this process was launched as one of several ranks (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _dist() -> Any:
    return require("torch.distributed", extra="torch", purpose="distributed calibration")


def init(backend: str | None = None) -> tuple[int, int]:
    """Join the process group described by the environment; returns ``(rank, world_size)``.

    A single process (no WORLD_SIZE > 1) gets ``(0, 1)`` and nothing is initialised.
    """
    if not requested():
        return 0, 1
    dist = _dist()
    if not dist.is_initialized():
        if backend is None:
            import torch

            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_main_rank() -> bool:
    return not requested() or _dist().get_rank() == 0


def shard(batches: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's batches: every ``world``-th one starting at ``rank`` (balanced to within one)."""
    if world > len(batches):
        raise EspaceError(
            f"{world} ranks but only {len(batches)} calibration batches", "give at least one batch per rank"
        )
    return list(batches[rank::world])


def all_reduce_statistics(stats: dict[str, Any]) -> dict[str, Any]:
    """Sum every rank's statistics in place and return them.

    Works on any statistics dataclass (:class:`~espace_export.calibration.statistics.ActivationStats`, the gradient
    sums of NL-MSE): every ndarray field is summed in float64, every integer count field too (``K`` and
    flags are configuration, not sums, and are left alone).
    """
    if not requested():
        return stats
    import torch

    dist = _dist()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for name in sorted(stats):  # the same order on every rank
        entry = stats[name]
        counts = []
        for item in dataclasses.fields(entry):
            value = getattr(entry, item.name)
            if isinstance(value, np.ndarray):
                tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)).to(device)
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                setattr(entry, item.name, tensor.cpu().numpy())
            elif isinstance(value, int) and not isinstance(value, bool) and item.name != "K":
                counts.append(item.name)
        if counts:
            tensor = torch.tensor([getattr(entry, c) for c in counts], dtype=torch.int64, device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            for count, value in zip(counts, tensor.cpu().tolist(), strict=True):
                setattr(entry, count, int(value))
    return stats


def finish() -> None:
    if requested() and _dist().is_initialized():
        _dist().destroy_process_group()
