"""Calibration: run the model on calibration batches and reduce activation statistics per batch.

"Augment the graph, run it, reduce": the activation tensors that feed target GEMMs are added as graph
outputs, each batch is run through ONNX Runtime, and each distinct activation is reduced at once into
its running sums — ``Σ xxᵀ`` and ``Σ xxᵀ/‖x‖²`` in float64 — so no batch is kept after it is reduced.
Padding tokens (``attention_mask == 0``) are left out of the statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def collect_statistics(
    session_factory: Callable[[onnx.ModelProto], object],
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    batches: Sequence[dict[str, np.ndarray]],
    *,
    precision: StatsPrecision = "float32",
    specs: Sequence[InputSpec] | None = None,
    on_batch: Callable[[], None] | None = None,
    normalized: bool = True,
    reduce: Literal["auto", "graph", "host"] = "auto",
) -> dict[str, ActivationStats]:
    """Statistics of every distinct activation the ``targets`` read, over ``batches``.

    ``normalized=False`` skips the L2-normalised sums (enough for the mse and go-mse candidates).
    ``reduce`` picks where the Gram sums are formed: ``graph`` adds the reduction to the ONNX graph
    (:mod:`graph_passes.statistics`, products in the runtime's GEMM kernels, activations never copied
    out), ``host`` returns the activations and reduces them with BLAS ``syrk``; ``auto`` uses ``graph``
    when the opset allows and falls back to ``host`` if the graph cannot run.

    ``session_factory`` turns the augmented model into an object with onnxruntime's ``run`` method.
    """
    specs = list(specs) if specs is not None else input_specs(model)
    model, measured, keys = prefill_view(session_factory, model, targets, batches, specs)
    if keys:  # GEMMs inside If branches: measured on the main-graph copy of the branch the inputs select
        stats = collect_statistics(
            session_factory, model, measured, batches, precision=precision, specs=specs, on_batch=on_batch,
            normalized=normalized, reduce=reduce,
        )  # fmt: skip
        return {original: stats[inlined] for original, inlined in keys.items()}
    if reduce != "host" and default_opset(model) >= MIN_OPSET:
        try:
            return check_finite(
                _collect_in_graph(session_factory, model, targets, batches, precision, specs, on_batch, normalized)
            )
        except _GraphReductionUnavailable:
            if reduce == "graph":
                raise
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
    precision: StatsPrecision,
    specs: Sequence[InputSpec],
    on_batch: Callable[[], None] | None,
    normalized: bool,
) -> dict[str, ActivationStats]:
    """Like :func:`collect_statistics`, with the Gram sums formed inside the graph."""
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
        if on_batch is not None:
            on_batch()
    for target in stats.values():  # the GEMM forms both triangles; keep the sums exactly symmetric
        target.sum_xx = (target.sum_xx + target.sum_xx.T) / 2
        if normalized:
            target.sum_xx_normalized = (target.sum_xx_normalized + target.sum_xx_normalized.T) / 2
    return stats
