"""The pipeline as library calls: find → calibrate → select → project, one call per stage.

    calibration = espace_export.calibrate("model.onnx", options)           # activation (and gradient) statistics
    plan = espace_export.plan("model.onnx", calibration, options)          # per-layer method, rank, selection
    result = espace_export.apply("model.onnx", plan, options)              # the compressed model and its report

:func:`compress` is those three in a row — everything ``espace-export model.onnx --ratio 0.5`` does. Each stage
takes a model path, or a :class:`Run` (the model, its targets and its batches, opened once and shared by the
stages), and a :class:`~espace_export.options.CompressOptions` or the same settings as flat keywords
(``ratio=0.3, calib_text="builtin:pydoc"``). Statistics and plans are artifacts (:mod:`espace_export.io.artifacts`):
the stages may run on different days and machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from espace_export import __version__
from espace_export.calibration import distributed
from espace_export.calibration.collect import calibrate_model
from espace_export.calibration.statistics import StatsPrecision
from espace_export.errors import EspaceError
from espace_export.io.artifacts import (
    Calibration,
    LayerPlan,
    Plan,
    check_fingerprint,
    check_plan_factors,
    fingerprint,
    load_plan,
    save_calibration,
    save_plan,
)
from espace_export.io.data import Batches, is_builtin_text, load_batches
from espace_export.io.models import (
    atomic_output_set,
    check_distinct_paths,
    check_model,
    check_writable,
    curve_files,
    load_model,
    model_files,
    plan_files,
    report_files,
    save_model,
)
from espace_export.io.reports import stage_report, write_curve
from espace_export.options import CompressOptions, RankOptions, SelectionOptions
from espace_export.progress import Progress
from espace_export.projection.fidelity import output_fidelity
from espace_export.projection.rewrite import apply_factorizations, projected_params
from espace_export.runtime import ort_session
from espace_export.selection.candidates import eigen_solver, projection_mse
from espace_export.selection.factorizations import output_error
from espace_export.selection.planner import PlanInputs, PlanSettings, make_plan, plan_summary
from espace_export.selection.ranks import layer_compression, layer_rank
from graph_passes import GemmTarget, find_targets
from graph_passes.find import explain_no_targets, parameter_count, weight_matrix
from graph_passes.project import FoldedRangeWarning


@dataclass
class LayerRecord:
    """One targeted GEMM from decision to report: the rank it gets, the plan's choice for it, its measured error."""

    target: GemmTarget
    L: int | None  # None: stays dense
    method: str
    excluded: bool = False
    mse_relative: float | None = None  # E‖x − PPᵀx‖² / E‖x‖² on the calibration data (orthonormal P only)
    output_error: float | None = None  # E‖x(W − AB)‖² / E‖xW‖² on the calibration data (any method)
    plan: LayerPlan | None = None  # the plan's record of this layer, once a plan is applied

    @property
    def name(self) -> str:
        return self.target.name

    def as_json(self, selection: bool) -> dict[str, Any]:
        t = self.target
        entry: dict[str, Any] = {
            "name": t.name,
            "node": t.node,
            "pattern": t.pattern,
            "activation": t.activation,
            "K": t.K,
            "N": t.N,
            "L": self.L,
            "candidate": self.method if self.L is not None else None,
            "compressed": self.L is not None,
            "params_before": t.params,
            "params_after": t.params if self.L is None else self.L * (t.K + t.N),
            "compression": layer_compression(t.K, t.N, self.L) if self.L is not None else 0.0,
            "mse_relative": self.mse_relative,
            "output_error_relative": self.output_error,
        }
        layer = self.plan
        if layer is not None and layer.group is not None and layer.selected:
            entry["shares_projection_with"] = layer.group
        if selection and layer is not None:
            entry.update(
                {"scores": layer.scores, "harm": layer.harm, "order": layer.order, "method": layer.method,
                 "group": layer.group}
            )  # fmt: skip
        return entry


@dataclass
class CompressionResult:
    output: Path
    report_path: Path
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def targeted_compression(self) -> float:
        return float(self.report["targeted_compression"])


def default_output(model_path: Path) -> Path:
    """``model.onnx`` → ``model.espace.onnx`` beside it."""
    return model_path.with_name(model_path.stem + ".espace" + (model_path.suffix or ".onnx"))


def default_report(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".onnx") + ".report.json")


def decide_layers(
    targets: Sequence[GemmTarget], ranks: RankOptions, method: str, select: str = "none"
) -> list[LayerRecord]:
    """The rank of each target at the per-layer ratio (or the forced rank); excluded layers stay dense."""
    per_layer = ranks.per_layer(select)
    patterns = ranks.patterns
    records = []
    for target in targets:
        excluded = any(p.search(target.name) for p in patterns)
        L = layer_rank(target.K, target.N, per_layer, rule=ranks.rank_rule, min_rank=ranks.min_rank, rank=ranks.rank)
        records.append(LayerRecord(target, None if excluded else L, method, excluded=excluded))
    return records


def share_siblings(records: Sequence[LayerRecord], ranks: RankOptions, select: str = "none") -> list[list[str]]:
    """Group the layers that read one activation (Q/K/V, gate/up) to share one projection (``siblings=shared``).

    A group is ranked as the paper's fused layer: one GEMM of K×ΣN, so its rank follows the ratio rule on
    ΣN (or the forced rank) and every member gets it — also a narrow member (K/V under GQA) too small to be
    compressed alone. Excluded layers stay out. Returns the groups (two or more layers each).
    """
    if ranks.siblings != "shared":
        return []
    per_layer = ranks.per_layer(select)
    by_activation: dict[str, list[LayerRecord]] = {}
    for record in records:
        if not record.excluded:
            by_activation.setdefault(record.target.activation, []).append(record)
    groups = []
    for members in by_activation.values():
        if len(members) < 2:
            continue
        N = sum(r.target.N for r in members)
        L = layer_rank(members[0].target.K, N, per_layer, rule=ranks.rank_rule, min_rank=ranks.min_rank,
                       rank=ranks.rank)  # fmt: skip
        if L is None:
            continue
        for record in members:
            record.L = L
        groups.append([r.name for r in members])
    return groups


class Run:
    """What the stages share: the model (external weights stay on disk until written), its targets, the rank of
    each, the sibling groups, the batches (read on first use) and the timings of the run.

    Opening a run checks everything that can be checked without data: ratio and rank rule (in the options),
    that the model loads and has targets, and that some layer can be compressed.
    """

    def __init__(self, model_path: str | os.PathLike[str], options: CompressOptions | None = None) -> None:
        self.started = time.perf_counter()
        self.options = options or CompressOptions()
        self.model_path = Path(model_path)
        self.model = load_model(self.model_path, load_weights=False)
        ranks = self.options.ranks
        self.targets = find_targets(self.model, include_heads=ranks.include_heads)
        if not self.targets:
            problem, fix = explain_no_targets(self.model, include_heads=ranks.include_heads)
            raise EspaceError(f"{self.model_path} {problem}", fix)
        self._check_gradients()
        select = self.options.selection.select
        self.layers = decide_layers(self.targets, ranks, self.options.selection.methods[0], select)
        self.groups = share_siblings(self.layers, ranks, select)
        if not self.compressed:
            per_layer = ranks.per_layer(self.options.selection.select)
            raise EspaceError(
                f"no layer can reach ratio {per_layer} with a rank of at least {ranks.min_rank}",
                "lower --min-rank, use --rank-rule 16, or lower --ratio",
            )
        self.timings: dict[str, float] = {"load": time.perf_counter() - self.started}
        self._batches: Batches | None = None

    def _check_gradients(self) -> None:
        """The preset on a graph the gradient pass cannot run: ``auto`` leaves out the nl-mse candidates and
        the selection validates instead of ``fisher`` (an explicit ``--method``/``--select`` that needs
        gradients is refused later, naming the operators); a GEMM fused into another operator (com.microsoft
        Attention's packed QKV) has no output gradient for ``fisher`` either."""
        selection = self.options.selection
        preset_method = selection.method is None and selection.method_name == "auto"
        asks = preset_method or selection.select_mode is None
        if selection.preset != "recommended" or not asks or selection.no_gradients or selection.no_fisher:
            return
        from espace_export.calibration.onnx_torch import gradient_blockers
        from espace_export.harm import fused_gemms

        blockers = gradient_blockers(self.model)
        if blockers:
            selection = dataclasses.replace(
                selection, no_gradients=f"the gradient pass cannot evaluate {', '.join(blockers)}"
            )
        fused = fused_gemms(self.model, self.targets)
        if fused:
            selection = dataclasses.replace(selection, no_fisher=f"{fused[0]} is computed inside another operator")
        self.options = dataclasses.replace(self.options, selection=selection)

    @classmethod
    def of(cls, model: str | os.PathLike[str] | Run, options: CompressOptions | None, settings: dict[str, Any]) -> Run:
        """``model`` itself when it is a run already, else a run opened with ``options`` and ``settings``."""
        if isinstance(model, Run):
            if options is not None or settings:
                raise TypeError("options belong to the Run; pass them when opening it")
            return model
        return cls(model, CompressOptions.from_settings(options, **settings))

    @property
    def compressed(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.L is not None]

    @property
    def measured(self) -> list[LayerRecord]:
        """Every layer not excluded: what a standalone calibration covers, so a later plan may use any ratio."""
        return [r for r in self.layers if not r.excluded]

    @property
    def batches(self) -> Batches:
        if self._batches is None:
            tick = time.perf_counter()
            validate = self.options.selection.select in ("validate", "fisher")  # both score on validation batches
            self._batches = load_batches(self.model, self.options.data, validate=validate)
            self.timings["load"] += time.perf_counter() - tick
        return self._batches

    def output_paths(self) -> tuple[Path, Path]:
        """The model and report paths this run writes, checked before any work."""
        out = self.options.output
        output = check_writable(Path(out.output) if out.output else default_output(self.model_path))
        report = check_writable(Path(out.report) if out.report else default_report(output))
        if output.resolve() == self.model_path.resolve():
            raise EspaceError("the output would overwrite the input model", "choose another path with -o")
        self.check_paths({"-o": model_files(output), "--report": report_files(report)})
        return output, report

    def check_paths(self, outputs: dict[str, Any]) -> None:
        """No output (side outputs included) may overwrite an input or another output; checked before work."""
        data, out = self.options.data, self.options.output
        text = [t for t in (data.calib_text, data.valid_text) if t is not None and not is_builtin_text(t)]
        inputs = {"MODEL": self.model_path, "--calib-data": data.calib_data, "--valid-data": data.valid_data,
                  "--calib-text": text, "--tokenizer": data.tokenizer}  # fmt: skip
        side = {"--statistics": out.statistics, "--plan": plan_files(out.plan) if out.plan else None,
                "--curve": curve_files(out.curve) if out.curve else None}  # fmt: skip
        check_distinct_paths(inputs, {**side, **outputs})

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[Progress]:
        """Progress bars for one stage, and its wall time in the report's ``timings_s``."""
        tick = time.perf_counter()
        with Progress(self.options.output.progress) as bars:
            yield bars
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - tick


def calibrate(
    model: str | os.PathLike[str] | Run,
    options: CompressOptions | None = None,
    *,
    every_layer: bool = False,
    torch_module: Any = None,
    **settings: Any,
) -> Calibration:
    """Stage 1: activation statistics (and gradient statistics when a method needs them) of the layers the
    run compresses — of every layer not excluded with ``every_layer`` (what ``espace-export calibrate`` saves,
    so that a later plan may use any ratio). Under ``torchrun`` each rank calibrates its share of the batches
    and the sums are all-reduced. ``torch_module``: the user's PyTorch model, for NL-MSE gradients."""
    run = Run.of(model, options, settings)
    layers = run.measured if every_layer else run.compressed
    batches = run.batches
    with run.timed("calibrate") as bars:
        calibration = calibrate_model(
            run.model, [r.target for r in layers], batches.calibration, methods=run.options.selection.methods,
            precision=cast(StatsPrecision, run.options.data.stats_precision), bars=bars, seed=run.options.data.seed,
            torch_module=torch_module,
        )  # fmt: skip
    calibration.info = {"source": batches.source, "batches": len(batches.calibration), "tokens": batches.tokens}
    return calibration


def plan(
    model: str | os.PathLike[str] | Run,
    calibration: Calibration | str | os.PathLike[str],
    options: CompressOptions | None = None,
    **settings: Any,
) -> Plan:
    """Stage 2: decide per layer — method, rank, selected or not — from statistics (a :class:`Calibration`
    or the path of a saved one, checked against the model's weights)."""
    from espace_export.io.artifacts import load_calibration

    run = Run.of(model, options, settings)
    check_selection(run.options)
    if not isinstance(calibration, Calibration):
        calibration = load_calibration(calibration)
    check_statistics(run, calibration)
    selection = run.options.selection
    validator = None
    if selection.select == "validate":
        from espace_export.selection.validation import Validator

        validator = Validator(
            run.model, [r.target for r in run.compressed], run.batches.validation, loss=selection.valid_loss
        )
    with run.timed("select") as bars, decompositions(run.options):
        fisher = fisher_samples(run) if selection.select == "fisher" else None
        inputs = PlanInputs(run.model, run.targets, {r.name: r.L for r in run.layers}, calibration, run.groups)
        plan_settings = PlanSettings(
            run.options.ranks.ratio, tuple(selection.methods), selection.select, selection.max_layer_loss,
            selection.stop, selection.full_curve, selection.progressive,
            run.options.ranks.rank_rule if fills(run.options) else None,
            run.options.ranks.rebalance, run.options.ranks.min_rank,
        )  # fmt: skip
        chosen = make_plan(inputs, plan_settings, validator=validator, on_step=bars.stepper(), fisher=fisher)
    chosen.info.update(
        {"model": str(run.model_path), "layer_ratio": run.options.ranks.per_layer(selection.select),
         "rank_rule": str(run.options.ranks.rank_rule), "settings": selection.summary()}
    )  # fmt: skip
    if validator is not None:
        chosen.info["validation"] = {"batches": len(run.batches.validation), "passes": validator.passes}
    if fisher is not None:
        from espace_export.harm import sequence_count

        sampled, offered = len(fisher.offsets) - 1, sequence_count(run.batches.validation)
        chosen.info["fisher"] = {"batches": len(run.batches.validation), "sequences": sampled,
                                 "tokens": fisher.tokens, "loss": fisher.loss}  # fmt: skip
        if sampled < offered:
            chosen.info["fisher"]["memory_bound"] = True
            warnings.warn(
                f"--select fisher sampled {sampled} of the {offered} validation sequences: the rest would not fit "
                f"three quarters of the memory available; a smaller --holdout or --num-batches gives it fewer to "
                f"offer",
                stacklevel=2,
            )
    return chosen


def fisher_samples(run: Run) -> Any:
    """``--select fisher``'s samples: one forward + backward pass over the *validation* batches (held out: on
    the calibration tokens every factorisation looks as good as it does in-sample), refused in one line where
    the gradient pass cannot run the graph."""
    from espace_export._optional import require
    from espace_export.calibration.onnx_torch import gradient_blockers

    require("torch", extra="torch", purpose="--select fisher")
    blockers = gradient_blockers(run.model)
    if blockers:
        raise EspaceError(
            f"--select fisher needs the model's gradients, but the gradient pass cannot evaluate {', '.join(blockers)}",
            "use --select validate or proxy",
        )
    from espace_export.harm import FisherSettings, collect_fisher_samples, sequence_count
    from espace_export.memory import available_memory

    batches = run.batches.validation
    targets = [r.target for r in run.compressed]
    probes = min(16, max(1, -(-FISHER_SAMPLES // max(sequence_count(batches), 1))))
    max_tokens = fisher_token_budget(targets, probes, available_memory())
    return collect_fisher_samples(run.model, targets, batches, FisherSettings(probes=probes, max_tokens=max_tokens))


def fisher_token_budget(targets: Sequence[GemmTarget], probes: int, available: int) -> int:
    """Validation tokens whose Fisher samples fit :data:`FISHER_MEMORY_SHARE` of ``available`` bytes: each
    token keeps a float32 row per distinct activation (K) and ``probes`` gradient rows per GEMM (N), counted
    twice — the per-sequence pieces and the joined arrays (freed pieces stay in the allocator's heap: MiniLM's
    8.2 GiB of samples peaked at 19.4 GiB RSS before they were joined in place, 19.2 GiB after). The first
    batch is sampled whatever the budget."""
    widths = {t.activation: t.K for t in targets}
    per_token = 2 * 4 * (sum(widths.values()) + probes * sum(t.N for t in targets))
    return max(1, int(FISHER_MEMORY_SHARE * available) // max(per_token, 1))


#: Probe draws × validation sequences ``--select fisher`` aims for: each sequence gives one sample of the
#: estimate per probe, so few sequences get several probes (up to 16 backward passes per batch).
FISHER_SAMPLES = 64

#: Share of the memory available when ``--select fisher`` starts that its samples may take (at their peak,
#: see :func:`fisher_token_budget`); the batches beyond it are not sampled (the plan's ``info.fisher`` says how
#: many were). MiniLM's 90 validation batches of 16 paragraphs (59k tokens) need 17.4 GiB at the peak.
FISHER_MEMORY_SHARE = 0.75


def _moves_ranks(options: CompressOptions) -> bool:
    """Whether ranks can move after selection: a selection that stops at --ratio, in memory."""
    selection = options.selection
    return selection.select != "none" and selection.stop == "ratio" and not options.data.max_memory


def fills(options: CompressOptions) -> bool:
    """Whether the plan spends its saving beyond --ratio on higher ranks: --fill or --rebalance asked for,
    or by default (``--fill`` unset) wherever the selection allows it; ``--no-fill`` turns the default off."""
    if options.ranks.rebalance or options.ranks.fill:
        return True
    return options.ranks.fill is None and _moves_ranks(options)


def check_selection(options: CompressOptions) -> None:
    """A method that chooses per layer (``best``, ``auto``) needs a selection mode that scores the choices."""
    selection = options.selection
    if selection.select == "none" and len(selection.methods) > 1:
        raise EspaceError(
            f"method {selection.method!r} chooses per layer and needs a selection", "add --select validate or proxy"
        )
    moves = options.ranks.fill or options.ranks.rebalance  # asked for: --fill (its default is None) or --rebalance
    if moves and not _moves_ranks(options):
        flag = "--rebalance" if options.ranks.rebalance else "--fill"
        why = "--select none" if selection.select == "none" else f"--stop {selection.stop}"
        why = "--max-memory" if options.data.max_memory else why
        raise EspaceError(
            f"{flag} moves ranks after a selection at --ratio, which {why} does not make",
            f"drop {flag}, or select with --select validate, fisher or proxy at --stop ratio in memory",
        )
    if selection.eig_device != "cpu":  # before calibrating, not after
        from espace_export._optional import require

        torch = require("torch", extra="torch", purpose=f"--eig-device {selection.eig_device}")
        index = int(selection.eig_device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise EspaceError(
                f"--eig-device {selection.eig_device}: torch sees no such CUDA device "
                f"({torch.cuda.device_count()} visible, torch {torch.__version__})",
                "pass --eig-device cpu, or install a CUDA build of torch on a machine with the GPU",
            )


def decompositions(options: CompressOptions) -> contextlib.AbstractContextManager[Any]:
    """The run's eigen-decomposition settings (``--eig-solver``, ``--eig-device``, ``--eig-precision``) for
    every decomposition inside the block: the planner's and the group-by-group path's alike."""
    from espace_export.selection.candidates import EigenSolver, Precision

    selection = options.selection
    solver, precision = cast(EigenSolver, selection.eig_solver), cast(Precision, selection.eig_precision)
    return eigen_solver(solver, device=selection.eig_device, precision=precision)


def check_statistics(run: Run, calibration: Calibration) -> None:
    """Statistics made for this model's weights, covering every layer the run compresses."""
    compressed = [r.target for r in run.compressed]
    names = {t.name for t in compressed}
    check_fingerprint(
        [e for e in calibration.fingerprint if e["name"] in names],
        fingerprint(run.model, compressed),
        "statistics file",
    )
    missing = [t.name for t in compressed if t.activation not in calibration.stats]
    if missing:
        raise EspaceError(
            f"the statistics file has no statistics for the input of {missing[0]} ({len(missing)} layer(s) missing)",
            "re-run `espace-export calibrate` with the same --exclude/--include-heads as this run",
        )
    check_statistics_kinds(run.options.selection, calibration, {t.activation for t in compressed})


def check_statistics_kinds(selection: SelectionOptions, calibration: Calibration, activations: set[str]) -> None:
    """The sums the run's methods need: the L2-normalised ones (nmse, nl-mse-l2) and the gradient ones
    (nl-mse*) are only collected when ``calibrate`` was run for such a method."""
    from espace_export.selection.planner import GRADIENT_METHODS, needs_gradients, needs_normalized

    methods = list(selection.methods)
    fix = f"re-calibrate for this method: espace-export calibrate MODEL --method {selection.method} -o STATS"
    if needs_normalized(methods) and any(not calibration.stats[a].normalized for a in activations):
        raise EspaceError(
            f"--method {selection.method} needs the L2-normalised sums, which the statistics file lacks", fix
        )
    if needs_gradients(methods):
        gradients = calibration.gradients or {}
        lacking = [a for a in activations if a not in gradients]
        normalized = [m for m in methods if m in GRADIENT_METHODS and m.endswith("-l2")]
        if lacking or (normalized and any(not gradients[a].normalized for a in activations)):
            raise EspaceError(
                f"--method {selection.method} needs gradient statistics, which the statistics file lacks", fix
            )


def apply(
    model: str | os.PathLike[str] | Run,
    plan: Plan | str | os.PathLike[str],
    options: CompressOptions | None = None,
    *,
    calibration: Calibration | None = None,
    **settings: Any,
) -> CompressionResult:
    """Stage 3: rewrite the model by a plan (a :class:`Plan` or the path of a saved one, rejected if made for
    other weights), check it in ONNX Runtime, measure its fidelity on held-out batches and write it with its
    report (JSON + Markdown). ``calibration`` adds each layer's calibrated projection error to the report."""
    run = Run.of(model, options, settings)
    output, report_path = run.output_paths()
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    attach_plan(run, plan, calibration)
    batches = run.batches
    total_before = parameter_count(run.model)
    original_session = ort_session(run.model)
    with run.timed("rewrite"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FoldedRangeWarning)
        by_name = {t.name: t for t in run.targets}
        apply_factorizations(run.model, [(by_name[r.name], plan.factors[r.name]) for r in run.compressed])
    range_warnings = [str(w.message) for w in caught if issubclass(w.category, FoldedRangeWarning)]
    for w in caught:  # still shown to the user, once each
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    report = compression_report(run, plan, calibration, output, total_before)
    with model_output_set(output, report_path) as (tmp_output, tmp_json, tmp_markdown):
        save_model(run.model, tmp_output, external_data=run.options.output.external_data)
        check_model(tmp_output)
        with run.timed("fidelity"):
            try:
                compressed_session = ort_session(tmp_output)
            except Exception as exc:  # an ORT failure here is our bug, but say it plainly
                raise RuntimeError(f"ONNX Runtime cannot load the rewritten model: {exc}") from exc
            report["fidelity"] = {
                "batches": len(batches.held_out),
                "measured_on": "held-out batches"
                if run.options.data.holdout > 0 and batches.separate_holdout
                else "calibration batches",
                "outputs": output_fidelity(original_session, compressed_session, batches.held_out, batches.specs),
            }
        run.timings["total"] = time.perf_counter() - run.started
        report["timings_s"] = {k: round(v, 3) for k, v in run.timings.items()}
        report["warnings"] = range_warnings
        if run.options.output.quantize != "none":  # quantized in the staging, so it commits with the rest
            report["quantization"] = {**quantize_output(run, tmp_output), "output": str(output)}
        stage_report(report, tmp_json, tmp_markdown)
    return CompressionResult(output, report_path, report)


@contextlib.contextmanager
def model_output_set(output: Path, report_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """The compressed model, its external-data file and its report (JSON, Markdown) committed as ONE output
    set (:func:`espace_export.io.models.atomic_output_set`): the model moves in last, so a reader who sees the
    new model sees its report; a kill before that leaves the previous model *and* its report. Yields the
    temporaries of the model, the report JSON and its Markdown; a data file written beside the model's
    temporary travels with it (a stale one of the previous set is removed)."""
    paths = [*model_files(output), *report_files(report_path)]
    with atomic_output_set(paths) as temporaries:
        yield temporaries[0], temporaries[2], temporaries[3]


def quantize_output(run: Run, output: Path) -> dict[str, Any]:
    """``--quantize``: the written float model quantized in place (atomically) with the run's batches; its
    bytes and held-out fidelity to the float model, for the report."""
    from espace_export.quantize import quantize_model

    batches = run.batches
    with run.timed("quantize"):
        result = quantize_model(
            output, output, run.options.output.quantize, batches.calibration, holdout_batches=batches.held_out,
            external_data=run.options.output.external_data,
        )  # fmt: skip
    return result.as_report()


def attach_plan(run: Run, plan: Plan, calibration: Calibration | None) -> None:
    """Check the plan against the model (factor shapes, weight fingerprints) and record its choice in each
    layer: rank, projection, method, and — with statistics — the calibrated projection error."""
    by_name = {t.name: t for t in run.targets}
    check_plan_factors(plan, run.targets)
    planned = [entry for entry in plan.fingerprint if entry["name"] in plan.factors]
    check_fingerprint(
        planned, fingerprint(run.model, [by_name[e["name"]] for e in planned if e["name"] in by_name]), "plan"
    )
    layer_plans = {layer.name: layer for layer in plan.layers}
    for record in run.layers:
        record.plan = layer_plans.get(record.name)
        factors = plan.factors.get(record.name)
        if record.plan is None or factors is None or not record.plan.selected:
            record.L = None
            continue
        record.L, record.method = factors.rank, record.plan.method or record.method
        if calibration is not None and record.target.activation in calibration.stats:
            C_X = calibration.stats[record.target.activation].C_X
            energy = float(np.trace(C_X))
            orthonormal = np.allclose(factors.A.T @ factors.A, np.eye(factors.rank), atol=1e-6)
            record.mse_relative = (projection_mse(C_X, factors.A) / energy) if energy > 0 and orthonormal else None
            W = weight_matrix(run.model, record.target).astype(np.float64)
            record.output_error = output_error(W, factors.folded(W), C_X)
    if not run.compressed:
        raise EspaceError("the plan compresses no layer", "raise --ratio, lower --max-layer-loss or --min-rank")


def compression_report(
    run: Run, plan: Plan, calibration: Calibration | None, output: Path, total_before: int
) -> dict[str, Any]:
    """The report of a rewritten run (before fidelity and timings, which :func:`apply` adds)."""
    options, records = run.options, run.layers
    total_after = parameter_count(run.model)
    targeted_before = sum(r.target.params for r in records)
    targeted_after = projected_params(run.model) + sum(r.target.params for r in records if r.L is None)
    batches = run.batches
    report: dict[str, Any] = {
        "tool": "espace-export",
        "version": __version__,
        "model": str(run.model_path),
        "output": str(output),
        "ratio_requested": options.ranks.ratio if options.ranks.rank is None else None,
        "rank_forced": options.ranks.rank,
        "candidate": options.selection.methods[0],
        "method": options.selection.method_name if plan.select == "none" else "+".join(plan.methods),
        "select": plan.select,
        "settings": plan.info.get("settings", options.selection.summary()),  # the preset the plan was made with
        "siblings": plan.info.get("siblings", options.ranks.siblings),
        "rank_rule": str(options.ranks.rank_rule),
        "min_rank": options.ranks.min_rank,
        "targeted_params_before": targeted_before,
        "targeted_params_after": targeted_after,
        "targeted_compression": 1.0 - targeted_after / targeted_before,
        "total_params_before": total_before,
        "total_params_after": total_after,
        "total_compression": 1.0 - total_after / total_before,
        "layers_compressed": len(run.compressed),
        "layers_dense": len(records) - len(run.compressed),
        "calibration": {
            "source": batches.source,
            "batches": len(batches.calibration),
            "heldout_batches": len(batches.held_out) if options.data.holdout > 0 else 0,
            "tokens": batches.tokens,
            "rows": {name: s.rows for name, s in calibration.stats.items()} if calibration else {},
            "stats_precision": options.data.stats_precision,
        },
        "layers": [r.as_json(selection=plan.select != "none") for r in records],
    }
    if plan.select != "none":
        report["selection"] = {
            "select": plan.select, "methods": plan.methods, "score": plan.score_kind,
            "baseline_loss": plan.baseline_loss, "skipped": plan.skipped, "knee": plan.knee, "curve": plan.curve,
            **plan.info,
            "wins": plan_summary(plan, run.targets)["methods"],  # how often each method won, over compressed layers
        }  # fmt: skip
    return report


def compress(
    model: str | os.PathLike[str] | Run, options: CompressOptions | None = None, **settings: Any
) -> CompressionResult:
    """Compress the weight GEMMs of an ONNX model with ESPACE projections and write the result with its report.

    ``apply(plan(calibrate()))``, plus the side outputs the options ask for (statistics, plan, curve). Settings
    are the CLI's options with underscores (see :class:`~espace_export.options.CompressOptions`), for example
    ``compress("model.onnx", ratio=0.5, calib_text="builtin:pydoc", tokenizer="tok/", method="auto",
    select="validate")``.

    Raises:
        EspaceError: for bad input, with a one-line message naming the problem and the fix.
    """
    run = Run.of(model, options, settings)
    check_selection(run.options)
    output, report_path = run.output_paths()
    side = run.options.output
    if run.options.data.max_memory is not None:
        return compress_bounded(run, output, report_path)
    calibration = calibrate(run)
    chosen = plan(run, calibration)  # under torchrun the ranks share the decompositions and trials
    if not distributed.is_main_rank():  # rank 0 applies the plan and writes; the others are done
        return CompressionResult(output, report_path, {"rank": distributed.init()[0]})
    if side.statistics is not None:
        save_calibration(calibration, side.statistics)
    if side.plan is not None:
        save_plan(chosen, side.plan)
    if side.curve is not None and chosen.curve:
        write_curve(chosen, side.curve)
    return apply(run, chosen, calibration=calibration)


def compress_bounded(run: Run, output: Path, report_path: Path) -> CompressionResult:
    """``compress`` under ``--max-memory``: statistics, decompositions and the rewrite group by group
    (:func:`espace_export.streaming.compress_streaming`), for ``--select none`` or ``proxy`` with a
    weight-free method."""
    from espace_export.streaming import STREAMING_METHODS, STREAMING_SELECTIONS

    options = run.options
    method = options.selection.method_name
    side = options.output
    if (
        options.selection.select not in STREAMING_SELECTIONS
        or method not in STREAMING_METHODS
        or side.statistics
        or side.plan
    ):
        raise EspaceError(
            "--max-memory compresses group by group, which takes --select none or proxy, --method mse or nmse "
            "and no --statistics/--plan side outputs",
            "drop --max-memory, or use those settings",
        )
    rank, _ = distributed.init()
    if rank != 0:  # under torchrun: this rank calibrates its share and decomposes its part; rank 0 writes
        _compress_bounded_staged(run, output, output)
        return CompressionResult(output, report_path, {"rank": rank})
    with model_output_set(output, report_path) as (tmp_output, tmp_json, tmp_markdown):
        report = _compress_bounded_staged(run, output, tmp_output)
        stage_report(report, tmp_json, tmp_markdown)
    return CompressionResult(output, report_path, report)


def _compress_bounded_staged(run: Run, output: Path, tmp_output: Path) -> dict[str, Any]:
    """:func:`compress_bounded`'s model, written to ``tmp_output`` (the staging of its output set), and its report."""
    from espace_export.memory import parse_memory
    from espace_export.streaming import StreamingSettings, compress_streaming

    options = run.options
    method = options.selection.method_name
    ranks = options.ranks
    settings = StreamingSettings(
        method=method, budget_bytes=parse_memory(options.data.max_memory),  # type: ignore[arg-type]
        precision=cast(StatsPrecision, options.data.stats_precision), select=options.selection.select,
        stop=options.selection.stop,
    )  # fmt: skip
    with decompositions(options):  # --eig-* apply group by group too
        result = compress_streaming(run.model_path, tmp_output, run.batches.calibration, ranks, settings)
    report: dict[str, Any] = {
        "tool": "espace-export", "version": __version__, "model": str(run.model_path), "output": str(output),
        "ratio_requested": ranks.ratio if ranks.rank is None else None, "rank_forced": ranks.rank,
        "candidate": method, "method": method, "select": settings.select, "settings": options.selection.summary(),
        "siblings": ranks.siblings,
        "rank_rule": str(ranks.rank_rule), "min_rank": ranks.min_rank,
        "targeted_params_before": result.targeted_params_before, "targeted_params_after": result.targeted_params_after,
        "targeted_compression": 1.0 - result.targeted_params_after / result.targeted_params_before,
        "total_params_before": result.total_params_before, "total_params_after": result.total_params_after,
        "total_compression": 1.0 - result.total_params_after / result.total_params_before,
        "layers_compressed": sum(1 for layer in result.layers if layer["compressed"]),
        "layers_dense": sum(1 for layer in result.layers if not layer["compressed"]),
        "calibration": {"source": run.batches.source, "batches": len(run.batches.calibration),
                        "tokens": run.batches.tokens, "stats_precision": options.data.stats_precision,
                        "groups": len(result.calibration.groups), "max_memory": options.data.max_memory},
        "layers": result.layers, "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "fidelity": {"outputs": {}, "measured_on": "not measured under --max-memory (two sessions of the model)"},
        "warnings": [],
    }  # fmt: skip
    if result.selection is not None:
        report["selection"] = result.selection
    return report
