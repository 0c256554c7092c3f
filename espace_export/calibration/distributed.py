"""Distributed calibration: shard batches over ``torch.distributed`` ranks, all-reduce the statistics;
split the per-layer decompositions over the ranks (:func:`share_work`).

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
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from espace_export._optional import require
from espace_export.errors import EspaceError

T = TypeVar("T")
R = TypeVar("R")


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


def assign(costs: Sequence[float], world: int) -> list[int]:
    """The rank each item goes to: largest cost first, each to the least loaded rank so far (ties: the lower
    rank). Deterministic, so every rank computes the same assignment without talking to the others."""
    loads = [0.0] * world
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def share_work(items: Sequence[T], work: Callable[[T], R], cost: Callable[[T], float] | None = None) -> list[R]:
    """``[work(item) for item in items]``, the items split over the ranks (by :func:`assign` on ``cost``,
    default equal costs) and the results gathered on every rank, in the items' order.

    For the per-layer decompositions: each rank decomposes its share of the activations' matrices (an
    11008² eigenproblem costs ~20× a 4096² one, so pass ``cost=lambda item: K**3``) and all ranks end with
    every projection. A single process just maps ``work``. The results travel pickled
    (``all_gather_object``), so they should be arrays or plain data.
    """
    if not requested():
        return [work(item) for item in items]
    dist = _dist()
    rank, world = init()  # joins the group when no earlier stage did (the `plan` command under torchrun)
    owners = assign([cost(item) if cost else 1.0 for item in items], world)
    mine = {index: work(item) for index, item in enumerate(items) if owners[index] == rank}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    merged = {index: result for part in gathered for index, result in part.items()}
    return [merged[index] for index in range(len(items))]


def all_reduce_statistics(stats: dict[str, Any]) -> dict[str, Any]:
    """Sum every rank's statistics in place and return them.

    Works on any statistics dataclass (:class:`~espace_export.calibration.statistics.ActivationStats`, the gradient
    sums of NL-MSE) or plain object (the packed sums of the streaming path): every ndarray field is summed
    in float64, every integer count field too (``K`` and flags are configuration, not sums, and are left alone).
    """
    if not requested():
        return stats
    import torch

    dist = _dist()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for name in sorted(stats):  # the same order on every rank
        entry = stats[name]
        counts = []
        names = [f.name for f in dataclasses.fields(entry)] if dataclasses.is_dataclass(entry) else sorted(vars(entry))
        for name_ in names:
            value = getattr(entry, name_)
            if isinstance(value, np.ndarray):
                tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)).to(device)
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                setattr(entry, name_, tensor.cpu().numpy())
            elif isinstance(value, int) and not isinstance(value, bool) and name_ != "K":
                counts.append(name_)
        if counts:
            tensor = torch.tensor([getattr(entry, c) for c in counts], dtype=torch.int64, device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            for count, value in zip(counts, tensor.cpu().tolist(), strict=True):
                setattr(entry, count, int(value))
    return stats


def finish() -> None:
    if requested() and _dist().is_initialized():
        _dist().destroy_process_group()
