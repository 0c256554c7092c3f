"""Streaming compression: calibrate, decompose, rewrite and write one group of layers at a time.

For ``--select none`` with one weight-free candidate (``mse``, ``nmse``) every layer's projection depends
only on its own activation statistics, so nothing has to outlive its group:

    for each group of activations that fits the memory budget  (calibration.collect_statistics_in_groups)
        calibrate the group's slice of the graph on the cached hidden states of the previous slice
        per activation: top-L eigenvectors P of C_X (or Ĉ_X)         (candidates.eigen_decomposition)
        rewrite its GEMMs as (X·P)·(PᵀW), reading each W from disk   (graph_passes.project)
        append P and PᵀW to the output's data file as they are made (never into the model proto)
    copy the untouched weights (embeddings, norms, head) into the data file in chunks; write the graph

so the process holds at most one group's statistics, one staged session's weights, the boundary tensors
between stages and one layer's factors — never the model's weights nor all the statistics. The output is
the same model :func:`espace_export.compress` writes for these settings (same ranks, same projections).

With ``select="proxy"`` every unit (a layer, or siblings sharing one projection) is decomposed at the per-layer
ratio as above, but its P and PᵀW go to a scratch folder beside the output with its calibrated relative output
error E‖x(W − PPᵀW)‖²/E‖xW‖² (the in-memory ``--select proxy`` score, from the group's statistics before they
are dropped); once every group is done the units are applied from the least to the most harmful until the
ratio (:func:`espace_export.selection.ranks.progressive_selection`), read back from the scratch folder one
activation at a time, and the rest stay dense.

Under ``torchrun`` each rank runs the stages on its share of the batches, each group's sums are all-reduced,
the group's decompositions are spread over the ranks by cost (K³) and gathered on every rank, and rank 0
alone rewrites and writes (:mod:`espace_export.calibration.distributed`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espace_export.calibration import distributed
from espace_export.calibration.statistics import (
    GroupedCalibration,
    MemoryBudget,
    PackedActivationStats,
    StatisticsSettings,
    StatsPrecision,
    collect_statistics_in_groups,
)
from espace_export.errors import EspaceError
from espace_export.io.models import atomic_output, check_model, check_writable, load_model, without_loader_metadata
from espace_export.memory import physical_memory
from espace_export.options import RankOptions
from espace_export.pipeline import LayerRecord, decide_layers, share_siblings
from espace_export.projection.rewrite import projected_params
from espace_export.runtime import ort_session
from espace_export.selection.candidates import eigen_decomposition, projection_mse
from espace_export.selection.factorizations import projected_output_error
from espace_export.selection.planner import unit_saving
from espace_export.selection.ranks import inflection_point, progressive_selection, rank_layers
from graph_passes import Projection, find_targets, project
from graph_passes.find import external_data_dir, parameter_count, weight_matrix
from graph_passes.project import fold_weight

STREAMING_METHODS = ("mse", "nmse")  # weight-free candidates: one group's statistics decide its layers
STREAMING_SELECTIONS = ("none", "proxy")  # scores one group's statistics can give
DEFAULT_MEMORY_FRACTION = 0.5
# Bytes of runtime memory per byte of a staged session's weights: the weights as read (external data is
# read into the runtime's buffers) and MLAS's prepacked copy of every constant GEMM weight (measured by
# benchmarks/scale.py).
SESSION_WEIGHT_FACTOR = 2.0
_ALIGN = 4096  # data offsets on page boundaries, so the runtime can map them
_CHUNK = 64 * 2**20
_INLINE_BYTES = 1024  # smaller tensors stay in the graph (as model_io.save_model does)

Decompose = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def default_max_memory(fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    """The default ``--max-memory``: a fraction of the machine's RAM."""
    return int(physical_memory() * fraction)


@dataclass
class StreamingResult:
    output: Path
    layers: list[dict[str, Any]]
    calibration: GroupedCalibration
    timings: dict[str, float] = field(default_factory=dict)
    targeted_params_before: int = 0
    targeted_params_after: int = 0
    total_params_before: int = 0
    total_params_after: int = 0
    weight_bytes_read: int = 0  # staged sessions' weights + each targeted weight once (folding) + weights copied
    selection: dict[str, Any] | None = None  # select="proxy": score, order, harm per unit, curve, knee


class _DataWriter:
    """Appends tensors to one external data file and points their protos at it (nothing stays in memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("wb")
        self.offset = 0
        self.bytes_copied = 0

    def _place(self, tensor: onnx.TensorProto, length: int) -> None:
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += length

    def _align(self) -> None:
        pad = -self.offset % _ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad

    def write_in_memory(self, tensor: onnx.TensorProto) -> None:
        """Move an in-memory tensor's bytes to the file."""
        data = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
        self._align()
        self.file.write(data)
        for name in ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data"):
            tensor.ClearField(name)
        self._place(tensor, len(data))

    def external_tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """A new initializer for ``array``: its bytes appended to the file and the proto pointing at them (a small
        one stays inline, as :func:`_move_new_tensors` leaves it). The proto is built on its own, so the bytes
        never enter the model's protobuf arena (which keeps them, cleared or not, as long as the model lives)."""
        tensor = onnx.numpy_helper.from_array(array, name)
        if array.nbytes >= _INLINE_BYTES:
            self.write_in_memory(tensor)
        return tensor

    def copy_external(self, tensor: onnx.TensorProto, source_dir: str) -> None:
        """Copy an external tensor's bytes from the source model's data file, in chunks."""
        entries = {e.key: e.value for e in tensor.external_data}
        offset = int(entries.get("offset", 0))
        source = Path(source_dir) / entries["location"]
        length = int(entries["length"]) if "length" in entries else source.stat().st_size - offset
        self._align()
        with source.open("rb") as file:
            file.seek(offset)
            left = length
            while left:
                chunk = file.read(min(_CHUNK, left))
                if not chunk:
                    raise EspaceError(f"external data file {source.name} is truncated", "copy the model again")
                self.file.write(chunk)
                left -= len(chunk)
        self.bytes_copied += length
        self._place(tensor, length)

    def close(self) -> None:
        self.file.close()


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _move_new_tensors(model: onnx.ModelProto, writer: _DataWriter, written: set[str]) -> None:
    """Every large in-memory initializer not yet written (new factors, or weights of an in-memory model)."""
    for tensor in model.graph.initializer:
        if tensor.name in written or _is_external(tensor):
            continue
        if onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * int(np.prod(tensor.dims)) < _INLINE_BYTES:
            continue
        writer.write_in_memory(tensor)
        written.add(tensor.name)


def staged_session(model: onnx.ModelProto) -> Any:
    """A session for one stage: ONNX Runtime without its CPU memory arena, whose blocks outlive the session
    and would pile up over the stages (resident memory growing with depth; ``benchmarks/scale.py``)."""
    return ort_session(model, memory_arena=False)


@dataclass(frozen=True)
class StreamingSettings:
    """How :func:`compress_streaming` works, besides the ranks.

    ``method``: the weight-free candidate (``mse`` or ``nmse``). ``budget_bytes`` (default
    :func:`default_max_memory`) bounds each group's statistics plus ``weight_factor`` × the weights its staged
    session reads; the boundary tensors between stages (hidden states of all batches) come on top.
    ``precision`` of the statistics' products. ``decompose(C, L)`` returns the leading ``(values, vectors)``
    of C (default :func:`espace_export.selection.candidates.eigen_decomposition`, with the eigen solver in
    force). ``session_factory`` makes the staged sessions (default :func:`staged_session`);
    ``on_group(index, count)`` is called as each group starts. ``select``: ``none`` (every layer at the
    ratio) or ``proxy`` (units at the per-layer ratio, the least harmful by calibrated output error applied
    until the ratio; ``stop="knee"``: until the curve's knee instead).
    """

    method: str = "mse"
    select: str = "none"
    stop: str = "ratio"
    budget_bytes: int | None = None
    precision: StatsPrecision = "float32"
    decompose: Decompose | None = None
    weight_factor: float = SESSION_WEIGHT_FACTOR
    session_factory: Callable[[onnx.ModelProto], object] = staged_session
    on_group: Callable[[int, int], None] | None = None


def compress_streaming(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    batches: Sequence[dict[str, np.ndarray]],
    ranks: RankOptions | None = None,
    settings: StreamingSettings = StreamingSettings(),
) -> StreamingResult:
    """Compress ``model_path`` into ``output`` with one weight-free candidate, under a memory budget.

    Ranks follow ``ranks`` (default :class:`~espace_export.options.RankOptions`) exactly as
    :func:`espace_export.compress` with ``select="none"`` (siblings shared as their fused GEMM, excluded layers
    dense, a forced ``rank``); ``settings`` says how (:class:`StreamingSettings`). The output always stores its weights as
    external data (``<output>.data``) and is written atomically.
    """
    started = time.perf_counter()
    model_path, output_path = _check_streaming_inputs(model_path, output, batches, settings)
    rank, world = distributed.init()
    batches = distributed.shard(batches, rank, world) if world > 1 else batches
    model = load_model(model_path, load_weights=False)
    calibration_graph = onnx.ModelProto()
    calibration_graph.CopyFrom(model)  # the rewrite edits `model`; calibration reads the original graph
    ranks = ranks or RankOptions()
    decisions, units = _decide(model, model_path, ranks, settings)
    compressed = [d for d in decisions if d.L is not None]
    total_before = parameter_count(model)
    source_dir = external_data_dir(model)
    timings = {"load": time.perf_counter() - started, "decompose": 0.0, "rewrite": 0.0}
    selection = None

    with atomic_output(output_path) if rank == 0 else contextlib.nullcontext() as tmp_output:  # others write nothing
        writer = _DataWriter(tmp_output.with_name(output_path.name + ".data")) if tmp_output else None
        with _scratch(tmp_output if settings.select == "proxy" else None) as scratch:  # gone before the commit
            consumer = _GroupConsumer(model, compressed, settings, writer, timings, scratch)
            tick = time.perf_counter()
            calibration = collect_statistics_in_groups(
                settings.session_factory, calibration_graph, [d.target for d in compressed], batches,
                MemoryBudget(_budget(settings), settings.weight_factor), consumer,
                StatisticsSettings(precision=settings.precision, normalized=settings.method == "nmse"),
                on_group=(lambda index, count, _group: settings.on_group(index, count)) if settings.on_group else None,  # type: ignore[misc]
            )  # fmt: skip
            timings["calibrate"] = time.perf_counter() - tick - timings["decompose"] - timings["rewrite"]
            del calibration_graph
            if scratch is not None and writer is not None:
                tick = time.perf_counter()
                selection = _select_units(decisions, units, consumer.terms, ranks, settings)
                consumer.apply_kept()
                timings["rewrite"] += time.perf_counter() - tick
        tick = time.perf_counter()
        if writer is not None and tmp_output is not None:
            _write_rest(model, writer, consumer.written, source_dir, tmp_output)
        timings["write"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    return StreamingResult(
        output=output_path,
        layers=[d.as_json(selection=False) for d in decisions],
        calibration=calibration,
        timings=timings,
        targeted_params_before=sum(d.target.params for d in decisions),
        targeted_params_after=projected_params(model) + sum(d.target.params for d in decisions if d.L is None),
        total_params_before=total_before,
        total_params_after=parameter_count(model),
        weight_bytes_read=sum(calibration.stage_weight_bytes)
        + sum(d.target.params * np.dtype(d.target.dtype).itemsize for d in compressed)
        + (writer.bytes_copied if writer is not None else 0),
        selection=selection,
    )


def _budget(settings: StreamingSettings) -> int:
    return default_max_memory() if settings.budget_bytes is None else int(settings.budget_bytes)


def _check_streaming_inputs(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    batches: Sequence[object],
    settings: StreamingSettings,
) -> tuple[Path, Path]:
    if settings.method not in STREAMING_METHODS:
        raise EspaceError(
            f"streaming compression takes a weight-free candidate, not {settings.method!r}",
            f"use --method {' or '.join(STREAMING_METHODS)}, or drop --max-memory for the in-memory path",
        )
    if settings.select not in STREAMING_SELECTIONS or settings.stop not in ("ratio", "knee"):
        raise EspaceError(
            f"streaming compression selects with {' or '.join(STREAMING_SELECTIONS)}, not {settings.select!r}",
            "use --select none or proxy (and --stop ratio or knee), or drop --max-memory for the in-memory path",
        )
    if not batches:
        raise EspaceError("no calibration batches", "give at least one calibration batch")
    source = Path(model_path)
    output_path = check_writable(Path(output))
    if output_path.resolve() == source.resolve():
        raise EspaceError("the output would overwrite the input model", "choose another path with -o")
    return source, output_path


def _decide(
    model: onnx.ModelProto, model_path: Path, ranks: RankOptions, settings: StreamingSettings
) -> tuple[list[LayerRecord], list[list[str]]]:
    """Each target's rank, as :func:`espace_export.compress` decides it for ``settings.select`` (with
    selection: at the per-layer ratio), and the units selection would choose among (sibling groups that
    share a projection, and every other compressed layer alone)."""
    targets = find_targets(model, include_heads=ranks.include_heads)
    if not targets:
        raise EspaceError(
            f"{model_path} has no compressible GEMM (MatMul/Gemm with a 2-D constant weight)",
            "check that weights are initializers (export with do_constant_folding) or use --include-heads",
        )
    decisions = decide_layers(targets, ranks, settings.method, settings.select)
    groups = share_siblings(decisions, ranks, settings.select)
    if not any(d.L is not None for d in decisions):
        raise EspaceError(
            f"no layer can reach ratio {ranks.ratio} with a rank of at least {ranks.min_rank}",
            "lower --min-rank, use --rank-rule 16, or lower --ratio",
        )
    grouped = {name for group in groups for name in group}
    units = groups + [[d.name] for d in decisions if d.L is not None and d.name not in grouped]
    return decisions, units


@contextlib.contextmanager
def _scratch(tmp_output: Path | None) -> Iterator[Path | None]:
    """A folder beside the output's staging for the factors selection keeps until it decides (None: none)."""
    if tmp_output is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=".factors-", dir=tmp_output.parent) as folder:
        yield Path(folder)


def _select_units(
    decisions: list[LayerRecord],
    units: list[list[str]],
    terms: dict[str, tuple[float, float]],
    ranks: RankOptions,
    settings: StreamingSettings,
) -> dict[str, Any]:
    """Units from the least to the most harmful (relative output error of the unit's fused weight) until the
    ratio, or the curve's knee; the others' ranks are set to None (dense). Returns the report's selection."""
    compressed = [d for d in decisions if d.L is not None]
    by_name = {d.name: d for d in compressed}
    harm = {}
    saved = {}
    for unit in units:
        error, energy = (sum(terms[name][i] for name in unit) for i in (0, 1))
        harm[unit[0]] = error / energy if energy > 0 else 0.0
        saved[unit[0]] = unit_saving([by_name[n].target for n in unit], by_name[unit[0]].L)  # type: ignore[arg-type]
    order, _ = rank_layers(harm)
    targeted = sum(d.target.params for d in decisions)  # every target, as the report counts them
    selected, curve = progressive_selection(order, saved, targeted, ranks.ratio, estimate=harm)
    knee = inflection_point(curve)
    if settings.stop == "knee":
        selected = [step["layer"] for step in curve[1 : knee + 1]]
    unit_of = {unit[0]: unit for unit in units}
    chosen = {name for key in selected for name in unit_of[key]}
    for decision in compressed:
        if decision.name not in chosen:
            decision.L = None
    return {"select": "proxy", "score": "relative output error (proxy)", "order": order, "harm": harm,
            "units": {key: unit_of[key] for key in order}, "curve": curve, "knee": knee}  # fmt: skip


class _GroupConsumer:
    """Decomposes one group's statistics, rewrites its layers and appends their factors to the data file —
    or, with a ``scratch`` folder (selection), keeps each layer's factors there with its output-error terms
    until :meth:`apply_kept`."""

    def __init__(
        self,
        model: onnx.ModelProto,
        compressed: list[LayerRecord],
        settings: StreamingSettings,
        writer: _DataWriter | None,
        timings: dict[str, float],
        scratch: Path | None = None,
    ) -> None:
        self.model = model
        self.scratch = scratch
        self.terms: dict[str, tuple[float, float]] = {}  # layer → (E‖x(W − PPᵀW)‖², E‖xW‖²)
        self.kept: dict[str, list[tuple[str, Path]]] = {}  # activation → (layer, stem of its factors' files)
        self.method = settings.method
        self.decompose: Decompose = settings.decompose or (lambda C, L: eigen_decomposition(C, top=L))
        self.writer = writer
        self.timings = timings
        self.written: set[str] = set()
        self.by_activation: dict[str, list[LayerRecord]] = {}
        for decision in compressed:
            self.by_activation.setdefault(decision.target.activation, []).append(decision)

    def __call__(self, stats: dict[str, PackedActivationStats]) -> None:
        tick = time.perf_counter()
        distributed.all_reduce_statistics(stats)  # under torchrun: every rank's share of the batches summed
        decomposed = distributed.share_work(
            list(stats.items()), lambda item: self._decompose(*item), cost=lambda item: float(item[1].K) ** 3
        )
        projections: dict[str, list[Projection]] = {}  # activation → its layers' projections
        for activation, (vectors, dropped) in zip(stats, decomposed, strict=True):
            for decision, mse_relative in zip(self.by_activation[activation], dropped, strict=True):
                assert decision.L is not None
                decision.mse_relative = mse_relative
                projections.setdefault(activation, []).append(
                    Projection(decision.target, np.ascontiguousarray(vectors[:, : decision.L]))
                )
        self.timings["decompose"] += time.perf_counter() - tick
        if self.writer is None:  # a rank other than 0: rank 0 rewrites and writes
            return
        tick = time.perf_counter()
        if self.scratch is not None:
            for activation, members in projections.items():
                self._keep(stats[activation], members)
        else:  # folds PᵀW read from disk
            project(self.model, [p for members in projections.values() for p in members],
                    new_initializer=self._written_initializer)  # fmt: skip
        self.timings["rewrite"] += time.perf_counter() - tick

    def _keep(self, entry: PackedActivationStats, projections: list[Projection]) -> None:
        """Fold each layer's PᵀW, score it on the activation's statistics, and park P and PᵀW on disk."""
        assert self.scratch is not None
        C_X = entry.C_X.astype(np.float32)  # one dense copy at a time, as the solver's
        CP: dict[int, np.ndarray] = {}  # C·P per rank: siblings with one P share it
        for projection in projections:
            target = projection.target
            W = weight_matrix(self.model, target)
            B = fold_weight(projection.P, W)
            L = projection.rank
            if L not in CP:
                CP[L] = C_X @ projection.P.astype(np.float32)
            self.terms[target.name] = projected_output_error(C_X, W, projection.P, B, CP=CP[L])
            dtype = np.float64 if np.dtype(target.dtype) == np.float64 else np.float32
            stem = self.scratch / f"{len(self.terms)}"
            np.save(stem.with_suffix(".P.npy"), projection.P.astype(dtype))
            np.save(stem.with_suffix(".B.npy"), B.astype(dtype))
            self.kept.setdefault(target.activation, []).append((target.name, stem))

    def apply_kept(self) -> None:
        """Rewrite the layers selection kept (those whose decision still has a rank), one activation at a time,
        from the factors in the scratch folder; the others stay dense."""
        ranked = {d.name: d for group in self.by_activation.values() for d in group if d.L is not None}
        for layers in self.kept.values():
            chosen = [
                Projection(ranked[name].target, np.load(stem.with_suffix(".P.npy")), np.load(stem.with_suffix(".B.npy")))
                for name, stem in layers if name in ranked
            ]  # fmt: skip
            if chosen:
                project(self.model, chosen, new_initializer=self._written_initializer)

    def _written_initializer(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        assert self.writer is not None
        tensor = self.writer.external_tensor(array, name)
        if _is_external(tensor):
            self.written.add(name)
        return tensor

    def _decompose(self, activation: str, entry: PackedActivationStats) -> tuple[np.ndarray, list[float | None]]:
        """The activation's leading eigenvectors (as many as its widest member needs) and each member's
        relative dropped energy E‖x − PPᵀx‖²/E‖x‖²: plain data, so that another rank can compute them."""
        members = self.by_activation[activation]
        top = max(d.L for d in members if d.L is not None)
        C_X = entry.C_X
        values, vectors = self.decompose(entry.C_X_normalized if self.method == "nmse" else C_X, top)
        energy = float(np.trace(C_X))
        dropped: list[float | None] = []
        for decision in members:
            assert decision.L is not None
            if self.method == "mse":  # Theorem 1: the dropped energy is the rest of the spectrum
                lost = energy - float(np.sum(values[: decision.L]))
            else:
                lost = projection_mse(C_X, np.ascontiguousarray(vectors[:, : decision.L]))
            dropped.append(max(lost, 0.0) / energy if energy > 0 else None)
        return np.ascontiguousarray(vectors[:, :top]), dropped


def _write_rest(
    model: onnx.ModelProto, writer: _DataWriter, written: set[str], source_dir: str, tmp_output: Path
) -> None:
    """Copy the untouched weights into the data file in chunks and write the graph beside it."""
    _move_new_tensors(model, writer, written)  # weights of an in-memory model
    for tensor in model.graph.initializer:
        if _is_external(tensor) and tensor.name not in written:
            writer.copy_external(tensor, source_dir)
            written.add(tensor.name)
    writer.close()
    tmp_output.write_bytes(without_loader_metadata(model).SerializeToString())
    check_model(tmp_output)
