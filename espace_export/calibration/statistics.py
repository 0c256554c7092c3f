"""Calibration: run the model on calibration batches and reduce activation statistics per batch.

"Augment the graph, run it, reduce": the activation tensors that feed target GEMMs are added as graph
outputs, each batch is run through ONNX Runtime, and each distinct activation is reduced at once into
its running sums — ``Σ xxᵀ`` and ``Σ xxᵀ/‖x‖²`` in float64 — so no batch is kept after it is reduced.
Padding tokens (``attention_mask == 0``) are left out of the statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx
from scipy.linalg import blas

from espace_export.errors import EspaceError, runtime_errors
from espace_export.io.data import InputSpec, complete_feed, input_specs
from graph_passes.find import SUBGRAPH_SEPARATOR, GemmTarget
from graph_passes.statistics import MIN_OPSET, add_gram_outputs, default_opset

StatsPrecision = Literal["float32", "float64"]
_LOAD_FIX = "check that the model runs in onnxruntime (re-export it if not)"
_BATCH_FIX = "check the calibration inputs against the model (token ids below the vocabulary size, --seq-len within its positions)"


@dataclass
class ActivationStats:
    """Running sums for one activation tensor of width K."""

    K: int
    normalized: bool = True  # also accumulate Σ xxᵀ/‖x‖² (nmse, go-mse-l2); doubles the reduction cost
    sum_xx: np.ndarray = field(init=False)
    sum_xx_normalized: np.ndarray = field(init=False)
    rows: int = 0
    rows_normalized: int = 0

    def __post_init__(self) -> None:
        self.sum_xx = np.zeros((self.K, self.K), dtype=np.float64)
        self.sum_xx_normalized = np.zeros((self.K, self.K), dtype=np.float64)

    def add(self, X: np.ndarray, precision: StatsPrecision = "float32") -> None:
        """Reduce a batch of rows ``X`` (M×K) into the sums.

        ``float32`` forms each batch's product in float32 (BLAS syrk, half the FLOPs of a GEMM) and
        accumulates in float64; ``float64`` does both in float64.
        """
        X = np.ascontiguousarray(X.reshape(-1, self.K), dtype=np.float32 if precision == "float32" else np.float64)
        if X.shape[0] == 0:
            return
        self.sum_xx += _gram(X)
        self.rows += X.shape[0]
        if not self.normalized:
            return
        norms = np.linalg.norm(X.astype(np.float64), axis=1)
        keep = norms > 0
        if keep.any():
            normalized = (X[keep] / norms[keep, None].astype(X.dtype)).astype(X.dtype)
            self.sum_xx_normalized += _gram(np.ascontiguousarray(normalized))
        self.rows_normalized += int(keep.sum())

    def merge(self, other: ActivationStats) -> None:
        self.sum_xx += other.sum_xx
        self.sum_xx_normalized += other.sum_xx_normalized
        self.rows += other.rows
        self.rows_normalized += other.rows_normalized

    @property
    def C_X(self) -> np.ndarray:
        """``E[x xᵀ]``."""
        return self.sum_xx / max(self.rows, 1)

    @property
    def C_X_normalized(self) -> np.ndarray:
        """``E[x xᵀ/‖x‖²]``."""
        if not self.normalized:
            raise ValueError("normalized statistics were not collected (collect_statistics(normalized=True))")
        return self.sum_xx_normalized / max(self.rows_normalized, 1)


def _gram(X: np.ndarray) -> np.ndarray:
    """``XᵀX`` in float64, through the symmetric rank-k update (only one triangle is computed)."""
    syrk = blas.ssyrk if X.dtype == np.float32 else blas.dsyrk
    upper = np.asarray(syrk(1.0, X, trans=1, lower=0), dtype=np.float64)
    return np.triu(upper) + np.triu(upper, 1).T


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str], elem_types: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensors`` (the "augmented" calibration model)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in tensors:
        if name not in existing:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_types[name], None))
    return augmented


def token_mask(feed: dict[str, np.ndarray], rows: int) -> np.ndarray | None:
    """A boolean row mask for activations of ``rows`` rows, from the feed's attention mask, if it lines up."""
    mask = feed.get("attention_mask")
    if mask is None or mask.size != rows:
        return None
    return mask.reshape(-1).astype(bool)


def distinct_activations(targets: Sequence[GemmTarget]) -> dict[str, tuple[int, int]]:
    """Each distinct activation tensor read by ``targets``: name → (K, ONNX element type)."""
    found: dict[str, tuple[int, int]] = {}
    for target in targets:
        found.setdefault(target.activation, (target.K, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(target.dtype))))
    return found


@dataclass(frozen=True)
class StatisticsSettings:
    """How statistics are collected (:func:`collect_statistics`, :func:`collect_statistics_in_groups`).

    ``precision``: each batch's Gram product in float32 (accumulated in float64) or float64.
    ``normalized=False`` skips the L2-normalised sums (enough for the mse and go-mse candidates).
    ``reduce`` picks where the Gram sums are formed: ``graph`` adds the reduction to the ONNX graph
    (:mod:`graph_passes.statistics`, products in the runtime's GEMM kernels, activations never copied
    out), ``host`` returns the activations and reduces them with BLAS ``syrk``; ``auto`` uses ``graph``
    when the opset allows and falls back to ``host`` if the graph cannot run (the grouped path always
    behaves as ``auto``). ``specs``: the model's inputs (default read from the model); ``on_batch()`` is
    called after each batch (of each stage, when grouped).
    """

    precision: StatsPrecision = "float32"
    normalized: bool = True
    reduce: Literal["auto", "graph", "host"] = "auto"
    specs: tuple[InputSpec, ...] | None = None
    on_batch: Callable[[], None] | None = None

    def with_specs(self, model: onnx.ModelProto) -> StatisticsSettings:
        """These settings with ``specs`` filled in from ``model`` when not given."""
        return self if self.specs is not None else replace(self, specs=tuple(input_specs(model)))


def collect_statistics(
    session_factory: Callable[[onnx.ModelProto], object],
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    batches: Sequence[dict[str, np.ndarray]],
    settings: StatisticsSettings = StatisticsSettings(),
) -> dict[str, ActivationStats]:
    """Statistics of every distinct activation the ``targets`` read, over ``batches`` (see
    :class:`StatisticsSettings`). ``session_factory`` turns the augmented model into an object with
    onnxruntime's ``run`` method.
    """
    settings = settings.with_specs(model)
    specs = list(settings.specs or ())
    model, measured, keys = prefill_view(session_factory, model, targets, batches, specs)
    if keys:  # GEMMs inside If branches: measured on the main-graph copy of the branch the inputs select
        stats = collect_statistics(session_factory, model, measured, batches, settings)
        return {original: stats[inlined] for original, inlined in keys.items()}
    if settings.reduce != "host" and default_opset(model) >= MIN_OPSET:
        try:
            return check_finite(_collect_in_graph(session_factory, model, targets, batches, settings))
        except _GraphReductionUnavailable:
            if settings.reduce == "graph":
                raise
    precision, normalized, on_batch = settings.precision, settings.normalized, settings.on_batch
    activations = distinct_activations(targets)
    names = list(activations)
    augmented = with_outputs(model, names, {n: t for n, (_, t) in activations.items()})
    with runtime_errors("to load the model", _LOAD_FIX):
        session = session_factory(augmented)
    stats = {name: ActivationStats(K, normalized) for name, (K, _) in activations.items()}
    for batch in batches:
        feed = complete_feed(batch, specs)
        with runtime_errors("on a calibration batch", _BATCH_FIX):
            values = session.run(names, feed)  # type: ignore[attr-defined]
        for name, value in zip(names, values, strict=True):
            rows = value.reshape(-1, stats[name].K)
            mask = token_mask(feed, rows.shape[0])
            stats[name].add(rows if mask is None else rows[mask], precision)
        if on_batch is not None:
            on_batch()
    return check_finite(stats)


def prefill_view(
    session_factory: Callable[[onnx.ModelProto], object],
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    batches: Sequence[dict[str, np.ndarray]],
    specs: Sequence[InputSpec],
) -> tuple[onnx.ModelProto, list[GemmTarget], dict[str, str]]:
    """The model to calibrate ``targets`` on, when some of them sit inside ``If`` branches.

    Each main-graph ``If`` is replaced by the branch the (completed) first batch selects — for optimum's merged
    decoder fed the prefill, its no-past branch — so the activations are main-graph tensors that can be made
    outputs. Returns that model, the targets re-pointed at their copies in it, and original activation →
    measured activation (empty, and the model unchanged, when every target is in the main graph already).
    Targets inside Loop/Scan bodies, or only in the branch not taken, are refused.
    """
    main = {i.name for i in model.graph.input} | {o for node in model.graph.node for o in node.output}
    if all(t.activation in main for t in targets) or not batches:
        return model, list(targets), {}
    from graph_passes.inline import BRANCHES, inline_branches

    feed = complete_feed(batches[0], specs)
    conditions = {node.name: node.input[0] for node in model.graph.node if node.op_type == "If"}
    unknown = [c for c in conditions.values() if c not in feed]
    values = dict(feed)
    if unknown:
        probe = with_outputs(model, unknown, dict.fromkeys(unknown, onnx.TensorProto.BOOL))
        with runtime_errors("to evaluate the branch conditions", _LOAD_FIX):
            values.update(zip(unknown, session_factory(probe).run(unknown, feed), strict=True))  # type: ignore[attr-defined]
    choices = {name: bool(np.asarray(values[cond]).reshape(-1)[0]) for name, cond in conditions.items()}
    inlined = inline_branches(model, choices)
    prefixes = tuple(
        f"{name}{SUBGRAPH_SEPARATOR}{BRANCHES[taken]}{SUBGRAPH_SEPARATOR}" for name, taken in choices.items()
    )
    measured, keys = [], {}
    produced = {o for node in inlined.graph.node for o in node.output}
    for target in targets:
        found = next(
            ((path, activation) for path, activation in target.occurrences
             if activation in main or (path.startswith(prefixes) and activation in produced)),
            None,
        )  # fmt: skip
        if found is None:
            raise EspaceError(
                f"layer {target.name} runs only in a Loop/Scan body or in an If branch the calibration inputs "
                "do not select, so it cannot be calibrated",
                f"--exclude '{target.name}'",
            )
        measured.append(replace(target, node=found[0], activation=found[1], also=()))
        keys[target.activation] = found[1]
    return inlined, measured, keys


def check_finite(stats: dict[str, ActivationStats]) -> dict[str, ActivationStats]:
    """Fail clearly when the model produced inf/NaN activations (an FP16 overflow, a broken export)."""
    for name, entry in stats.items():
        if not np.isfinite(entry.sum_xx).all() or (entry.normalized and not np.isfinite(entry.sum_xx_normalized).all()):
            raise EspaceError(
                f"activation '{name}' reached inf/NaN during calibration: the model overflows on these inputs",
                "calibrate a float32 export of the model, or --exclude the layers reading it",
            )
    return stats


class _GraphReductionUnavailable(RuntimeError):
    """The augmented graph could not be built or run on the first batch."""


def _collect_in_graph(
    session_factory: Callable[[onnx.ModelProto], object],
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    batches: Sequence[dict[str, np.ndarray]],
    settings: StatisticsSettings,
) -> dict[str, ActivationStats]:
    """Like :func:`collect_statistics`, with the Gram sums formed inside the graph."""
    specs, precision, normalized = list(settings.specs or ()), settings.precision, settings.normalized
    widths = {name: K for name, (K, _) in distinct_activations(targets).items()}
    has_mask = any(spec.name == "attention_mask" for spec in specs)
    # Block activations are [batch, seq, K] (or [batch·seq, K]) and line up with the attention mask; if one
    # does not (a pooled or sliced input), the first run fails and the host path takes over.
    try:
        augmented, outputs = add_gram_outputs(
            model, widths, mask_input="attention_mask" if has_mask else None,
            masked=set(widths) if has_mask else set(), normalized=normalized, precision=precision,
        )  # fmt: skip
        session = session_factory(augmented)
    except Exception as exc:
        raise _GraphReductionUnavailable(str(exc)) from exc
    names: list[str] = []
    for out in outputs.values():
        names += [out.gram, out.rows] + ([out.gram_l2, out.rows_l2] if out.gram_l2 and out.rows_l2 else [])
    stats = {name: ActivationStats(K, normalized) for name, K in widths.items()}
    for index, batch in enumerate(batches):
        feed = complete_feed(batch, specs)
        try:
            values = dict(zip(names, session.run(names, feed), strict=True))  # type: ignore[attr-defined]
        except Exception as exc:
            if index == 0:
                raise _GraphReductionUnavailable(str(exc)) from exc
            raise
        for name, out in outputs.items():
            target = stats[name]
            target.sum_xx += values[out.gram]
            target.rows += int(round(float(values[out.rows])))
            if out.gram_l2 and out.rows_l2:
                target.sum_xx_normalized += values[out.gram_l2]
                target.rows_normalized += int(round(float(values[out.rows_l2])))
        if settings.on_batch is not None:
            settings.on_batch()
    for target in stats.values():  # the GEMM forms both triangles; keep the sums exactly symmetric
        target.sum_xx = (target.sum_xx + target.sum_xx.T) / 2
        if normalized:
            target.sum_xx_normalized = (target.sum_xx_normalized + target.sum_xx_normalized.T) / 2
    return stats


# ---- bounded memory: statistics in groups, each group calibrated on a staged slice of the graph -------------

PACK_BLOCK = 512  # rows handled at once when packing/unpacking a triangle: bounds the temporaries to 512×K


def packed_size(K: int) -> int:
    """Entries of the upper triangle (diagonal included) of a K×K matrix."""
    return K * (K + 1) // 2


def _row_offset(K: int, row: int) -> int:
    """Where row ``row`` of the upper triangle starts in the packed array (row-major, columns row…K−1)."""
    return row * K - row * (row - 1) // 2


def _trapezoid_mask(rows: int, cols: int) -> np.ndarray:
    """``mask[i, j] = j ≥ i``: the upper-triangle entries of a row block, in packed (row-major) order."""
    return np.arange(cols)[None, :] >= np.arange(rows)[:, None]


def pack_add(packed: np.ndarray, gram: np.ndarray, *, symmetrize: bool = True) -> None:
    """``packed += upper(gram)`` (float64); with ``symmetrize`` the upper triangle of ``(G + Gᵀ)/2``.

    A runtime GEMM need not give an exactly symmetric ``XᵀX``; averaging it with its transpose here matches
    :func:`collect_statistics`, which symmetrises its dense sums once at the end. Works a block of rows at a
    time, so no K×K temporary is made.
    """
    K = gram.shape[0]
    for start in range(0, K, PACK_BLOCK):
        stop = min(start + PACK_BLOCK, K)
        block = gram[start:stop, start:].astype(np.float64)
        if symmetrize:
            block += gram[start:, start:stop].T
            block *= 0.5
        segment = packed[_row_offset(K, start) : _row_offset(K, stop)]
        segment += block[_trapezoid_mask(stop - start, K - start)]


def unpack(packed: np.ndarray, K: int) -> np.ndarray:
    """The dense symmetric K×K matrix of a packed upper triangle."""
    dense = np.empty((K, K), dtype=np.float64)
    for start in range(0, K, PACK_BLOCK):
        stop = min(start + PACK_BLOCK, K)
        upper = _trapezoid_mask(stop - start, K - start)
        dense[start:stop, start:][upper] = packed[_row_offset(K, start) : _row_offset(K, stop)]
        dense[stop:, start:stop] = dense[start:stop, stop:].T  # mirror: below the diagonal block
        diagonal = dense[start:stop, start:stop]
        lower = ~upper[:, : stop - start]
        diagonal[lower] = diagonal.T[lower]
    return dense


class PackedActivationStats:
    """Running sums of one activation stored as packed upper triangles (half of :class:`ActivationStats`).

    Reads like :class:`ActivationStats` (``K``, ``rows``, ``sum_xx``, ``C_X``, ``C_X_normalized`` …); the dense
    matrices are unpacked on each access, so a consumer that decomposes one activation at a time holds one
    dense K×K at a time.
    """

    def __init__(self, K: int, normalized: bool = True) -> None:
        self.K = K
        self.normalized = normalized
        self.packed_xx = np.zeros(packed_size(K), dtype=np.float64)
        self.packed_xx_normalized = np.zeros(packed_size(K) if normalized else 0, dtype=np.float64)
        self.rows = 0
        self.rows_normalized = 0

    @property
    def nbytes(self) -> int:
        return int(self.packed_xx.nbytes + self.packed_xx_normalized.nbytes)

    def add_gram(self, gram: np.ndarray, rows: int, gram_normalized: np.ndarray | None, rows_normalized: int) -> None:
        """Add one run's ``XᵀX`` (and ``Σ xxᵀ/‖x‖²``) over ``rows`` rows."""
        pack_add(self.packed_xx, gram)
        self.rows += rows
        if self.normalized and gram_normalized is not None:
            pack_add(self.packed_xx_normalized, gram_normalized)
            self.rows_normalized += rows_normalized

    def add(self, X: np.ndarray, precision: StatsPrecision = "float32") -> None:
        """Reduce a batch of rows ``X`` (M×K), as :meth:`ActivationStats.add` does (host reduction)."""
        X = np.ascontiguousarray(X.reshape(-1, self.K), dtype=np.float32 if precision == "float32" else np.float64)
        if X.shape[0] == 0:
            return
        pack_add(self.packed_xx, _upper_gram(X), symmetrize=False)
        self.rows += X.shape[0]
        if not self.normalized:
            return
        norms = np.linalg.norm(X.astype(np.float64), axis=1)
        keep = norms > 0
        if keep.any():
            normalized = np.ascontiguousarray((X[keep] / norms[keep, None].astype(X.dtype)).astype(X.dtype))
            pack_add(self.packed_xx_normalized, _upper_gram(normalized), symmetrize=False)
        self.rows_normalized += int(keep.sum())

    @property
    def sum_xx(self) -> np.ndarray:
        return unpack(self.packed_xx, self.K)

    @property
    def sum_xx_normalized(self) -> np.ndarray:
        if not self.normalized:
            return np.zeros((self.K, self.K))
        return unpack(self.packed_xx_normalized, self.K)

    @property
    def C_X(self) -> np.ndarray:
        """``E[x xᵀ]``."""
        dense = self.sum_xx
        dense /= max(self.rows, 1)
        return dense

    @property
    def C_X_normalized(self) -> np.ndarray:
        """``E[x xᵀ/‖x‖²]``."""
        if not self.normalized:
            raise ValueError("normalized statistics were not collected (normalized=True)")
        dense = self.sum_xx_normalized
        dense /= max(self.rows_normalized, 1)
        return dense

    def to_dense(self) -> ActivationStats:
        """The same sums as an :class:`ActivationStats` (dense K×K arrays)."""
        stats = ActivationStats(self.K, self.normalized)
        stats.sum_xx, stats.rows = self.sum_xx, self.rows
        if self.normalized:
            stats.sum_xx_normalized, stats.rows_normalized = self.sum_xx_normalized, self.rows_normalized
        return stats

    def is_finite(self) -> bool:
        return bool(np.isfinite(self.packed_xx).all() and np.isfinite(self.packed_xx_normalized).all())


def _upper_gram(X: np.ndarray) -> np.ndarray:
    """The upper triangle of ``XᵀX`` (BLAS syrk; the strict lower triangle is left unset)."""
    syrk = blas.ssyrk if X.dtype == np.float32 else blas.dsyrk
    return np.asarray(syrk(1.0, X, trans=1, lower=0))


def statistics_bytes(K: int, *, normalized: bool, precision: StatsPrecision = "float32") -> int:
    """Bytes one activation's statistics occupy while a group is calibrated, counted exactly.

    The packed float64 running sums (``8·K(K+1)/2`` each) and one run's K×K Gram output (``K²·4`` for
    float32 products, ``K²·8`` for float64) held twice — in the runtime's arena, which keeps the block for the
    next run, and as the array handed back — all twice over when the normalised sums are kept.
    """
    itemsize = 4 if precision == "float32" else 8
    return (8 * packed_size(K) + 2 * itemsize * K * K) * (2 if normalized else 1)


def dense_statistics_bytes(K: int, *, normalized: bool) -> int:
    """Bytes of one activation's dense :class:`ActivationStats` (what :func:`collect_statistics` keeps)."""
    return 8 * K * K * (2 if normalized else 1)


@dataclass(frozen=True)
class CalibrationGroup:
    """Activations calibrated together in one staged pass, and what they cost."""

    activations: tuple[str, ...]
    statistics_bytes: int  # the group's statistics as counted by statistics_bytes
    weight_bytes: int  # bytes of the weights of the targets reading these activations


def plan_groups(
    targets: Sequence[GemmTarget],
    budget_bytes: int,
    *,
    normalized: bool,
    precision: StatsPrecision = "float32",
    weight_factor: float = 0.0,
) -> list[CalibrationGroup]:
    """Split the distinct activations, in graph order, into consecutive groups that fit ``budget_bytes``.

    A group's cost is its statistics (:func:`statistics_bytes`), plus the unpacking of its widest
    activation for the consumer (one dense K×K at a time), plus ``weight_factor`` × the bytes of the weights
    of its targets (the runtime's copy of the weights a staged session reads; 0 leaves them out). Raises
    :class:`EspaceError` when a single activation does not fit.
    """
    activations = distinct_activations(targets)
    weights: dict[str, int] = {}
    for target in targets:
        weights[target.activation] = weights.get(target.activation, 0) + target.params * np.dtype(target.dtype).itemsize
    groups: list[CalibrationGroup] = []
    names: list[str] = []
    stats_total = weight_total = widest = 0

    def cost(stats: int, weight: int, K: int) -> int:
        return stats + 8 * K * K + int(weight_factor * weight)

    for name, (K, _) in activations.items():
        stats = statistics_bytes(K, normalized=normalized, precision=precision)
        alone = cost(stats, weights[name], K)
        if alone > budget_bytes:
            raise EspaceError(
                f"the statistics of activation '{name}' (K={K}) need {int(np.ceil(alone / 2**20))} MiB, over the memory budget"
                f" of {budget_bytes / 2**20:.0f} MiB",
                f"raise --max-memory to at least {int(np.ceil(alone / 2**20))} MiB",
            )
        if names and cost(stats_total + stats, weight_total + weights[name], max(widest, K)) > budget_bytes:
            groups.append(CalibrationGroup(tuple(names), stats_total, weight_total))
            names, stats_total, weight_total, widest = [], 0, 0, 0
        names.append(name)
        stats_total += stats
        weight_total += weights[name]
        widest = max(widest, K)
    if names:
        groups.append(CalibrationGroup(tuple(names), stats_total, weight_total))
    return groups


@dataclass
class GroupedCalibration:
    """What :func:`collect_statistics_in_groups` did: its groups, and the most statistics held at once."""

    groups: list[CalibrationGroup]
    peak_statistics_bytes: int = 0  # the packed sums alive at once (a group's), as allocated
    peak_boundary_bytes: int = 0  # cached tensors handed from one stage to the next, all batches
    stage_nodes: list[int] = field(default_factory=list)  # nodes each staged session runs
    stage_weight_bytes: list[int] = field(default_factory=list)  # bytes of the weights each staged session reads


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """Tensors a node reads, including outer-scope names read inside its subgraphs."""
    read = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
            inner |= {t.name for t in sub.initializer}
            for n in sub.node:
                read |= _node_reads(n) - inner
            read |= {o.name for o in sub.output} - inner
    return read


def _ancestors(nodes: Sequence[onnx.NodeProto], wanted: set[str], producer: dict[str, int]) -> set[int]:
    """Indices of the nodes needed to compute ``wanted``."""
    needed: set[int] = set()
    stack = [producer[name] for name in wanted if name in producer]
    while stack:
        index = stack.pop()
        if index in needed:
            continue
        needed.add(index)
        stack.extend(producer[name] for name in _node_reads(nodes[index]) if name in producer)
    return needed


@dataclass
class Stage:
    """One slice of the graph: the nodes no earlier stage ran that one group of activations needs."""

    activations: tuple[str, ...]
    nodes: list[onnx.NodeProto]
    inputs: list[str]  # tensors computed by earlier stages that this one reads
    outputs: list[str]  # tensors this stage computes that later stages read
    keep: list[str]  # everything computed so far that later stages read (outputs and older tensors)
    initializers: list[str]


def stage_graph(model: onnx.ModelProto, groups: Sequence[Sequence[str]]) -> list[Stage]:
    """Cut ``model`` into one stage per group of activations, each running only the nodes not run before.

    Stage g runs the nodes needed for its activations that no earlier stage ran; the tensors it needs from
    earlier stages (the residual stream, a causal mask, the input of a layer that spills over the cut)
    become its inputs, and those later stages need from it (or pass through it) become its outputs. Every
    node of the graph that leads to a grouped activation runs exactly once over all stages; nodes that
    lead only to the model's outputs (the LM head) never run.
    """
    graph = model.graph
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    reads = [_node_reads(node) for node in nodes]
    cumulative = [_ancestors(nodes, set(names), producer) for names in groups]
    for g in range(1, len(cumulative)):
        cumulative[g] |= cumulative[g - 1]
    initializers = {t.name for t in graph.initializer}
    stages: list[Stage] = []
    done: set[int] = set()
    available: set[str] = set()  # tensors computed by the stages so far
    for g, names in enumerate(groups):
        run = sorted(cumulative[g] - done)
        needed = set(names).union(*(reads[i] for i in run))
        later_nodes = set().union(*cumulative[g + 1 :]) - cumulative[g] if g + 1 < len(groups) else set()
        later = set().union(*(reads[i] for i in later_nodes), *groups[g + 1 :])
        produced = {out for i in run for out in nodes[i].output if out}
        stages.append(
            Stage(
                activations=tuple(names),
                nodes=[nodes[i] for i in run],
                inputs=sorted(needed & available),
                outputs=sorted(later & produced),
                keep=sorted(later & (produced | available)),
                initializers=sorted(needed & initializers),
            )
        )
        available |= produced
        done |= cumulative[g]
    return stages


def stage_model(model: onnx.ModelProto, stage: Stage, input_types: Mapping[str, int]) -> onnx.ModelProto:
    """The stage as a runnable model: the original graph inputs, ``stage.inputs`` typed by ``input_types``,
    ``stage.outputs`` as outputs (untyped: the runtime infers them), and only the weights it reads."""
    graph = model.graph
    wanted = set(stage.initializers)
    initializers = [t for t in graph.initializer if t.name in wanted]
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    for name in stage.inputs:
        inputs.append(onnx.helper.make_tensor_value_info(name, input_types[name], None))
    outputs = []
    for name in stage.outputs:
        value = onnx.ValueInfoProto()
        value.name = name
        outputs.append(value)
    sub = onnx.helper.make_graph(stage.nodes, graph.name, inputs, outputs, initializers)
    sub.value_info.extend(v for v in graph.value_info if v.name in {o for n in stage.nodes for o in n.output})
    staged = onnx.ModelProto()
    for field_name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(staged, field_name, getattr(model, field_name))
    staged.opset_import.extend(model.opset_import)
    staged.functions.extend(model.functions)
    staged.metadata_props.extend(model.metadata_props)  # keeps the external-data directory of unloaded weights
    staged.graph.CopyFrom(sub)
    return staged


@dataclass(frozen=True)
class MemoryBudget:
    """What one group of :func:`collect_statistics_in_groups` may hold: ``budget_bytes`` for its statistics,
    the dense unpacking of its widest activation, and ``weight_factor`` × the weights its staged session
    reads (see :func:`plan_groups`)."""

    budget_bytes: int
    weight_factor: float = 0.0


def collect_statistics_in_groups(
    session_factory: Callable[[onnx.ModelProto], object],
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    batches: Sequence[dict[str, np.ndarray]],
    budget: MemoryBudget,
    consume: Callable[[dict[str, PackedActivationStats]], None],
    settings: StatisticsSettings = StatisticsSettings(),
    on_group: Callable[[int, int, CalibrationGroup], None] | None = None,
) -> GroupedCalibration:
    """The statistics of :func:`collect_statistics`, under a memory budget, handed over one group at a time.

    The activations are split by :func:`plan_groups` into consecutive groups that fit ``budget``; the
    graph is cut into one stage per group (:func:`stage_graph`), and each stage runs on every batch from the
    tensors the previous stages left (cached, per batch), so the whole calibration costs about one forward
    pass however many groups there are, and each session holds only its stage's weights. A group's sums are
    packed upper triangles in float64; ``consume`` gets them when the group is done and may decompose them —
    they are dropped before the next group starts, and the freed heap is handed back to the system
    (:func:`release_freed_memory`), so the resident memory does not grow with depth. Same numbers as
    :func:`collect_statistics` (up to the runtime's rounding when a fusion straddles a cut).

    The reduction is formed in the graph (opset ≥ 13) or, failing that, on the host (``settings.reduce`` is
    not consulted). ``on_group(index, count, group)`` is called as each group starts.
    """
    settings = settings.with_specs(model)
    groups = plan_groups(
        targets, budget.budget_bytes, normalized=settings.normalized, precision=settings.precision,
        weight_factor=budget.weight_factor,
    )  # fmt: skip
    activations = distinct_activations(targets)
    stages = stage_graph(model, [g.activations for g in groups])
    runner = _StageRunner(session_factory, model, batches, settings, {n: t for n, (_, t) in activations.items()})
    result = GroupedCalibration(groups)
    for index, (group, stage) in enumerate(zip(groups, stages, strict=True)):
        if on_group is not None:
            on_group(index, len(groups), group)
        stats = runner.run(stage, {name: activations[name][0] for name in group.activations})
        result.peak_statistics_bytes = max(result.peak_statistics_bytes, sum(s.nbytes for s in stats.values()))
        result.stage_nodes.append(len(stage.nodes))
        result.stage_weight_bytes.append(_initializer_bytes(model, stage.initializers))
        result.peak_boundary_bytes = max(result.peak_boundary_bytes, runner.boundary_bytes())
        _check_packed_finite(stats)
        consume(stats)
        del stats  # before the next group's sums are allocated
        release_freed_memory()
    return result


def release_freed_memory() -> None:
    """Hand the heap memory freed so far back to the operating system (glibc ``malloc_trim``).

    glibc serves blocks below its mmap threshold (which grows to 32 MiB once a large block is freed) from
    heaps it keeps: the runtime's per-run buffers, a stage's weights and the statistics of a finished group
    are freed there but stay resident, and the next group, with different sizes, cannot always reuse them.
    Without this, resident memory grew by about a block's worth per group (``benchmarks/scale.py``). A no-op
    where the C library has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


class _StageRunner:
    """Runs one stage of the staged graph over every batch: its session, the batch loop, the boundary cache.

    ``boundary``: per batch, the tensors later stages read (hidden states, the causal mask …), kept between
    stages and dropped once no later stage needs them. The reduction is formed in the graph while the opset
    allows and the augmented graph runs; once it fails, this and every later stage reduce on the host.
    """

    def __init__(
        self,
        session_factory: Callable[[onnx.ModelProto], object],
        model: onnx.ModelProto,
        batches: Sequence[dict[str, np.ndarray]],
        settings: StatisticsSettings,
        activation_types: dict[str, int],
    ) -> None:
        self.session_factory = session_factory
        self.model = model
        self.settings = settings
        self.feeds = [complete_feed(batch, list(settings.specs or ())) for batch in batches]
        self.boundary: list[dict[str, np.ndarray]] = [{} for _ in batches]
        self.has_mask = any(spec.name == "attention_mask" for spec in settings.specs or ())
        self.in_graph = default_opset(model) >= MIN_OPSET
        self.activation_types = activation_types

    def boundary_bytes(self) -> int:
        return sum(v.nbytes for values in self.boundary for v in values.values())

    def run(self, stage: Stage, widths: dict[str, int]) -> dict[str, PackedActivationStats]:
        """The packed statistics of the activations ``widths`` (name → K), from one pass of ``stage``."""
        types = {name: onnx.helper.np_dtype_to_tensor_dtype(self.boundary[0][name].dtype) for name in stage.inputs}
        staged = stage_model(self.model, stage, types)
        if self.in_graph:
            stats = self._fresh(widths)
            try:
                self._run_in_graph(staged, stage, stats)
                return stats
            except _GraphReductionUnavailable:
                self.in_graph = False
                del stats
        stats = self._fresh(widths)
        self._run_on_host(staged, stage, stats)
        return stats

    def _fresh(self, widths: dict[str, int]) -> dict[str, PackedActivationStats]:
        return {name: PackedActivationStats(K, self.settings.normalized) for name, K in widths.items()}

    def _run_in_graph(self, staged: onnx.ModelProto, stage: Stage, stats: dict[str, PackedActivationStats]) -> None:
        widths = {name: entry.K for name, entry in stats.items()}
        try:
            augmented, outputs = add_gram_outputs(
                staged, widths, mask_input="attention_mask" if self.has_mask else None,
                masked=set(widths) if self.has_mask else set(), normalized=self.settings.normalized,
                precision=self.settings.precision,
            )  # fmt: skip
            session = self.session_factory(augmented)
        except Exception as exc:
            raise _GraphReductionUnavailable(str(exc)) from exc
        del augmented
        names = list(stage.outputs)
        for out in outputs.values():
            names += [out.gram, out.rows] + ([out.gram_l2, out.rows_l2] if out.gram_l2 and out.rows_l2 else [])

        def reduce(values: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> None:
            for name, out in outputs.items():
                gram_l2 = values[out.gram_l2] if out.gram_l2 else None
                rows_l2 = int(round(float(values[out.rows_l2]))) if out.rows_l2 else 0
                stats[name].add_gram(values[out.gram], int(round(float(values[out.rows]))), gram_l2, rows_l2)

        self._batches(session, stage, names, reduce, fallback_on_first=True)

    def _run_on_host(self, staged: onnx.ModelProto, stage: Stage, stats: dict[str, PackedActivationStats]) -> None:
        produced = {out for node in stage.nodes for out in node.output}
        computed = [name for name in stats if name in produced and name not in stage.outputs]
        augmented = with_outputs(staged, computed, self.activation_types)
        with runtime_errors("to load the model", _LOAD_FIX):
            session = self.session_factory(augmented)
        del augmented

        def reduce(values: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> None:
            for name, entry in stats.items():
                rows = (values[name] if name in values else feed[name]).reshape(-1, entry.K)
                mask = token_mask(feed, rows.shape[0])
                entry.add(rows if mask is None else rows[mask], self.settings.precision)

        self._batches(session, stage, list(stage.outputs) + computed, reduce, fallback_on_first=False)

    def _batches(
        self,
        session: object,
        stage: Stage,
        names: list[str],
        reduce: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None],
        fallback_on_first: bool,
    ) -> None:
        """Run ``session`` on every batch (its feed plus the boundary tensors the stage reads), ``reduce``
        each run's outputs, keep what later stages read; a failure on the first batch is
        :class:`_GraphReductionUnavailable` when ``fallback_on_first``."""
        for index, feed in enumerate(self.feeds):
            cached = self.boundary[index]
            run_feed = {**feed, **{name: cached[name] for name in stage.inputs}}
            try:
                with runtime_errors("on a calibration batch", _BATCH_FIX):
                    values = dict(zip(names, session.run(names, run_feed), strict=True))  # type: ignore[attr-defined]
            except Exception as exc:
                if fallback_on_first and index == 0:
                    raise _GraphReductionUnavailable(str(exc)) from exc
                raise
            reduce(values, run_feed)
            for name in list(cached):  # keep what later stages read; drop what none needs any more
                if name not in stage.keep:
                    del cached[name]
            for name in stage.outputs:
                cached[name] = values[name]
            del values, run_feed
            if self.settings.on_batch is not None:
                self.settings.on_batch()


def _initializer_bytes(model: onnx.ModelProto, names: Sequence[str]) -> int:
    wanted = set(names)
    return sum(
        int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
        if t.name in wanted
    )


def _check_packed_finite(stats: dict[str, PackedActivationStats]) -> None:
    for name, entry in stats.items():
        if not entry.is_finite():
            raise EspaceError(
                f"activation '{name}' reached inf/NaN during calibration: the model overflows on these inputs",
                "calibrate a float32 export of the model, or --exclude the layers reading it",
            )
