"""One calibration: activation statistics, and gradient statistics when a method needs them, of some targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from espace_export._optional import require
from espace_export.calibration import distributed
from espace_export.calibration.statistics import StatisticsSettings, StatsPrecision, collect_statistics
from espace_export.errors import EspaceError
from espace_export.io.artifacts import Calibration, fingerprint
from espace_export.io.data import InputSpec, complete_feed, input_specs
from espace_export.progress import Progress
from espace_export.runtime import ort_session
from espace_export.selection.planner import needs_gradients, needs_normalized
from graph_passes import GemmTarget


def calibrate_model(
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    batches: Sequence[dict[str, np.ndarray]],
    *,
    methods: Sequence[str],
    precision: StatsPrecision = "float32",
    bars: Progress | None = None,
    seed: int = 0,
    torch_module: Any = None,
) -> Calibration:
    """Activation statistics, and gradient statistics when a method needs them (``nl-mse``, ``nl-mse-l2``).

    Under ``torchrun`` this rank reduces its share of ``batches`` and the sums are all-reduced over the ranks.
    """
    bars = bars or Progress(False)
    specs = input_specs(model)
    normalized = needs_normalized(methods)
    rank, world = distributed.init()
    batches = distributed.shard(batches, rank, world) if world > 1 else batches
    with bars.task("calibrating", len(batches)) as advance:
        settings = StatisticsSettings(precision=precision, normalized=normalized, specs=tuple(specs), on_batch=advance)
        try:
            stats = collect_statistics(ort_session, model, targets, batches, settings)
        except EspaceError as error:
            raise _blamed(model, specs, error) from None
    grads = None
    if needs_gradients(methods):
        require("torch", extra="torch", purpose="the nl-mse candidates (activation gradients)")
        from espace_export.calibration.gradients import GradientSettings, collect_gradient_statistics

        with bars.task("gradients (backward)", len(batches)) as advance:
            grads = collect_gradient_statistics(
                model, targets, batches, GradientSettings(normalized=normalized, seed=seed, precision=precision),
                specs=specs, on_batch=advance, torch_module=torch_module,
            )  # fmt: skip
    distributed.all_reduce_statistics(stats)
    if grads is not None:
        distributed.all_reduce_statistics(grads)
    return Calibration(stats, grads, fingerprint(model, targets))


_ALONE_FIX = (
    "the model itself fails in ONNX Runtime (on one token too): run it with onnxruntime, then fix or re-export it "
    "(an exporter option ONNX Runtime's kernels reject, say) before compressing"
)


def _blamed(model: onnx.ModelProto, specs: Sequence[InputSpec], error: EspaceError) -> EspaceError:
    """``error`` (ONNX Runtime failed on a calibration batch), its fix pointing at the model when the model alone
    fails on one token id 0 as well (then no calibration input is to blame)."""
    tokens = [s for s in specs if s.is_integer and "input_ids" in s.name]
    if not error.problem.startswith("ONNX Runtime failed on a calibration batch") or len(tokens) != 1:
        return error
    try:
        feed = complete_feed({tokens[0].name: np.zeros((1, 1), tokens[0].dtype)}, specs)
    except EspaceError:
        return error
    try:
        ort_session(model).run(None, feed)
    except Exception:  # onnxruntime's errors share no base class
        return EspaceError(error.problem, _ALONE_FIX)
    return error
