"""The one-call pipeline: find → calibrate → select → project → check → evaluate → write.

``compress(model_path, ratio=0.5)`` is everything ``espace-export model.onnx --ratio 0.5`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espace_export import __version__, distributed
from espace_export.baselines import METHODS
from espace_export.build import ort_session
from espace_export.calibration import StatsPrecision, collect_statistics
from espace_export.candidates import (
    CANDIDATES,
    projection_mse,
)
from espace_export.data import (
    BUILTIN_PYDOC,
    complete_feed,
    input_specs,
    random_token_batches,
    read_npz,
    read_text,
    split_holdout,
    vocab_size,
)
from espace_export.errors import EspaceError
from espace_export.model_io import atomic_output, check_model, check_writable, load_model, save_model
from espace_export.plan import (
    Calibration,
    Plan,
    check_fingerprint,
    check_plan_factors,
    fingerprint,
    load_calibration,
    load_plan,
    make_plan,
    needs_gradients,
    needs_normalized,
    plan_summary,
    save_calibration,
    save_plan,
)
from espace_export.selection import check_ratio, check_siblings, layer_compression, layer_rank, parse_rank_rule
from graph_passes import GemmTarget, find_targets
from graph_passes.find import find_projected_pairs, parameter_count
from graph_passes.project import FoldedRangeWarning


@dataclass
class LayerDecision:
    """What happens to one targeted GEMM."""

    target: GemmTarget
    L: int | None  # None: stays dense
    candidate: str
    P: np.ndarray | None = None
    mse_relative: float | None = None  # E‖x − PPᵀx‖² / E‖x‖² on the calibration data

    def as_json(self) -> dict[str, Any]:
        t = self.target
        after = t.params if self.L is None else self.L * (t.K + t.N)
        return {
            "name": t.name,
            "node": t.node,
            "pattern": t.pattern,
            "activation": t.activation,
            "K": t.K,
            "N": t.N,
            "L": self.L,
            "candidate": self.candidate if self.L is not None else None,
            "compressed": self.L is not None,
            "params_before": t.params,
            "params_after": after,
            "compression": layer_compression(t.K, t.N, self.L) if self.L is not None else 0.0,
            "mse_relative": self.mse_relative,
        }


@dataclass
class CompressionResult:
    output: Path
    report_path: Path
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def targeted_compression(self) -> float:
        return float(self.report["targeted_compression"])


class _Progress:
    """A thin wrapper so the pipeline reads the same with or without rich progress bars."""

    def __init__(self, enabled: bool) -> None:
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=False,
            )

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Any]:
        if self._progress is None:
            yield lambda: None
            return
        task_id = self._progress.add_task(description, total=total)
        yield lambda: self._progress.advance(task_id)  # type: ignore[union-attr]

    def stepper(self) -> Any:
        """An ``on_step(phase, total)`` callback: one bar per phase, advanced on each call."""
        tasks: dict[str, Any] = {}

        def step(phase: str, total: int) -> None:
            if self._progress is None:
                return
            if phase not in tasks:
                tasks[phase] = self._progress.add_task(phase, total=total)
            self._progress.advance(tasks[phase])

        return step

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def default_output(model_path: Path) -> Path:
    """``model.onnx`` → ``model.espace.onnx`` beside it."""
    return model_path.with_name(model_path.stem + ".espace" + (model_path.suffix or ".onnx"))


def default_report(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".onnx") + ".report.json")


def load_calibration_batches(
    model: onnx.ModelProto,
    *,
    calib_data: str | os.PathLike[str] | None,
    calib_text: str | os.PathLike[str] | None,
    tokenizer: str | os.PathLike[str] | None,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    seed: int,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Calibration batches from the source the user chose, and a short description of it."""
    if batch_size < 1 or seq_len < 1 or num_batches < 1:
        raise EspaceError("--batch-size, --seq-len and --num-batches must be at least 1", "use positive sizes")
    specs = input_specs(model)
    if calib_data is not None and calib_text is not None:
        raise EspaceError("both --calib-data and --calib-text given", "choose one calibration source")
    if calib_data is not None:
        batches = read_npz(calib_data, specs, batch_size)[:num_batches]
        source = f"npz:{calib_data}"
    elif calib_text is not None:
        batches = read_text(
            calib_text, tokenizer, specs, batch_size=batch_size, seq_len=seq_len, max_batches=num_batches
        )
        source = "text:pydoc_data" if str(calib_text) == BUILTIN_PYDOC else f"text:{calib_text}"
    else:
        vocab = vocab_size(model)
        if vocab is None:
            raise EspaceError(
                "no calibration data given and no token embedding found to generate random ids",
                "pass --calib-data FILE.npz or --calib-text FILE --tokenizer DIR",
            )
        batches = random_token_batches(
            specs, vocab, batch_size=batch_size, seq_len=seq_len, num_batches=num_batches, seed=seed
        )
        source = "random-token-ids"
    if not batches:
        raise EspaceError("the calibration source produced no batches", "give more calibration data")
    for batch in batches:
        complete_feed(batch, specs)  # fail now, not after the first batch ran
    return batches, source


def decide_layers(
    targets: Sequence[GemmTarget],
    *,
    ratio: float,
    candidate: str,
    rank_rule: str | int,
    min_rank: int,
    rank: int | None,
) -> list[LayerDecision]:
    """The rank of each target: a fixed ``rank`` (clipped to K), or the ratio rule of :func:`choose_rank`."""
    decisions = []
    for target in targets:
        L = layer_rank(target.K, target.N, ratio, rule=rank_rule, min_rank=min_rank, rank=rank)
        decisions.append(LayerDecision(target, L, candidate))
    return decisions


def share_siblings(
    decisions: Sequence[LayerDecision],
    *,
    ratio: float,
    rank_rule: str | int,
    min_rank: int,
    rank: int | None,
    excluded: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[list[str]]:
    """Group the layers that read one activation (Q/K/V, gate/up) to share one projection.

    A group is ranked as the paper's fused layer: one GEMM of K×ΣN, so its rank follows the ratio rule on
    ΣN (or the forced ``rank``) and every member gets it — also a narrow member (K/V under GQA) too small
    to be compressed alone. ``excluded`` layers stay out. Returns the groups (two or more layers each).
    """
    by_activation: dict[str, list[LayerDecision]] = {}
    for decision in decisions:
        if decision.target.name not in excluded:
            by_activation.setdefault(decision.target.activation, []).append(decision)
    groups = []
    for members in by_activation.values():
        if len(members) < 2:
            continue
        N = sum(d.target.N for d in members)
        L = layer_rank(members[0].target.K, N, ratio, rule=rank_rule, min_rank=min_rank, rank=rank)
        if L is None:
            continue
        for decision in members:
            decision.L = L
        groups.append([d.target.name for d in members])
    return groups


def output_fidelity(
    original: object, compressed: object, batches: Sequence[dict[str, np.ndarray]], specs: Sequence[Any]
) -> dict[str, dict[str, float]]:
    """Relative L2 error and row cosine of every float output, compressed vs original, over ``batches``."""
    names = [o.name for o in original.get_outputs()]  # type: ignore[attr-defined]
    sums: dict[str, dict[str, float]] = {
        n: {"err": 0.0, "ref": 0.0, "cos_sum": 0.0, "cos_min": 1.0, "rows": 0} for n in names
    }
    for batch in batches:
        feed = complete_feed(batch, specs)
        ref_out = original.run(names, feed)  # type: ignore[attr-defined]
        new_out = compressed.run(names, feed)  # type: ignore[attr-defined]
        for name, ref, new in zip(names, ref_out, new_out, strict=True):
            if not np.issubdtype(np.asarray(ref).dtype, np.floating):
                continue
            ref64 = np.asarray(ref, dtype=np.float64)
            new64 = np.asarray(new, dtype=np.float64)
            acc = sums[name]
            acc["err"] += float(np.sum((new64 - ref64) ** 2))
            acc["ref"] += float(np.sum(ref64**2))
            a = ref64.reshape(-1, ref64.shape[-1]) if ref64.ndim else ref64.reshape(1, 1)
            b = new64.reshape(a.shape)
            denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            valid = denom > 0
            cos = np.sum(a * b, axis=1)[valid] / denom[valid]
            if cos.size:
                acc["cos_sum"] += float(cos.sum())
                acc["cos_min"] = min(acc["cos_min"], float(cos.min()))
                acc["rows"] += int(cos.size)
    result = {}
    for name, acc in sums.items():
        if acc["rows"] == 0 and acc["ref"] == 0:
            continue
        result[name] = {
            "relative_l2": (acc["err"] ** 0.5) / (acc["ref"] ** 0.5) if acc["ref"] > 0 else 0.0,
            "cosine_mean": acc["cos_sum"] / acc["rows"] if acc["rows"] else 1.0,
            "cosine_min": acc["cos_min"],
        }
    return result


def compress(
    model_path: str | os.PathLike[str],
    *,
    ratio: float = 0.5,
    output: str | os.PathLike[str] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    calib_data: str | os.PathLike[str] | None = None,
    calib_text: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    batch_size: int = 4,
    seq_len: int = 128,
    num_batches: int = 16,
    holdout: float = 0.25,
    candidate: str = "mse",
    rank_rule: str | int = "pow2",
    min_rank: int = 16,
    rank: int | None = None,
    include_heads: bool = False,
    exclude: Sequence[str] = (),
    stats_precision: StatsPrecision = "float32",
    external_data: bool | None = None,
    seed: int = 0,
    progress: bool = False,
    method: str | None = None,
    select: str = "none",
    layer_ratio: float | None = None,
    validation: float = 0.25,
    valid_data: str | os.PathLike[str] | None = None,
    valid_text: str | os.PathLike[str] | None = None,
    max_layer_loss: float | None = None,
    stop: str = "ratio",
    statistics: str | os.PathLike[str] | None = None,
    plan_path: str | os.PathLike[str] | None = None,
    curve_path: str | os.PathLike[str] | None = None,
    stage: str = "apply",
    statistics_in: str | os.PathLike[str] | None = None,
    plan_in: str | os.PathLike[str] | None = None,
    siblings: str = "shared",
    validation_loss: str = "auto",
) -> CompressionResult:
    """Compress the weight GEMMs of an ONNX model with ESPACE projections and write the result.

    Args:
        model_path: the exported transformer (``.onnx``, external data beside it is fine).
        ratio: target compression of each compressed layer (and so of the targeted weights), in (0, 1).
        output: where to write the compressed model (default ``<model>.espace.onnx``).
        report_path: JSON report (default ``<output>.report.json``; a Markdown twin is written beside it).
        calib_data / calib_text + tokenizer: calibration source; neither means random token ids (smoke runs).
        batch_size, seq_len, num_batches: calibration batches (seq_len for text and random sources).
        holdout: fraction of batches kept out of calibration to measure output fidelity.
        candidate: projection candidate: ``mse`` (Theorem 1), ``nmse`` (Corollary 2), ``go-mse``, ``go-mse-l2``.
        rank_rule: ``pow2`` (paper, tensor cores) or a granularity such as 16 or 64.
        min_rank: layers whose L would fall below this stay dense.
        rank: force this L on every target (clipped to K; ``rank >= K`` rewrites exactly, for testing).
        include_heads: also compress the LM head / pooler / embedding projections.
        exclude: regular expressions; targets whose name matches one stay dense.
        stats_precision: dtype of each batch's XᵀX product (the running sum is always float64).
        external_data: force (True) or forbid (False) external data in the output; default: only past 2 GB.
        seed: seed of random calibration ids.
        progress: show progress bars.
        method: what factorizes each layer: an ESPACE candidate (as ``candidate``), ``best`` (the six
            candidates, the best per layer), a baseline ``svd``, ``asvd``, ``whitened-svd``, or ``auto``
            (the six candidates and whitened SVD). Default: ``candidate``.
        select: ``none`` (every layer at the ratio's rank with one method), ``validate`` (each layer and
            method applied alone on validation batches, then progressive application in order of harm
            until ``ratio`` of the targeted weights is saved), ``proxy`` (the same ranked by the calibrated
            relative output error, no extra passes).
        layer_ratio: with selection, the compression of each compressed layer (default max(ratio, 0.5),
            the paper's "at least 50 %" per layer); ``ratio`` is then met by choosing layers.
        validation: with ``select="validate"`` and no ``valid_data``/``valid_text``, the fraction of the
            non-held-out batches used for validation instead of calibration.
        valid_data / valid_text: validation batches from their own source (same reader as calibration).
        max_layer_loss: skip layers whose loss increase applied alone exceeds this (relative; paper 0.02).
        stop: ``ratio`` or ``knee`` (stop at the inflection point of loss vs compression).
        statistics: write the calibration statistics here (``.npz``; what ``espace-export calibrate`` writes).
        plan_path: write the plan here (``.json`` + ``.npz``; what ``espace-export plan`` writes).
        curve_path: write the progressive curve here (``.json`` + ``.png``).
        stage: stop after ``calibrate`` (write ``statistics``), after ``plan`` (write ``plan_path``), or
            ``apply`` (the whole chain, default). The result's ``output`` is then what that stage wrote.
        statistics_in: reuse statistics written by an earlier ``calibrate`` (checked against the model).
        plan_in: apply a plan written by an earlier ``plan`` (checked against the model); no calibration.
        validation_loss: what ``select="validate"`` scores: ``auto`` — the distance to the original model:
            ``kl`` (KL of the next-token distributions) for causal LMs, ``distill`` (1 − cosine of the
            outputs) otherwise — or ``next-token`` (validation cross-entropy, the paper's choice).
        siblings: ``separate`` (one projection per layer) or ``shared`` (layers reading one activation —
            Q/K/V, gate/up — share one projection, fitted and ranked as their fused GEMM, as the paper's
            fused QKV layer; selected or skipped together).

    Raises:
        EspaceError: for bad input, with a one-line message naming the problem and the fix.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if rank is None:
        check_ratio(ratio)
    parse_rank_rule(rank_rule)
    methods = resolve_methods(method if method is not None else candidate)
    if select == "none" and len(methods) > 1 and stage != "calibrate" and plan_in is None:
        raise EspaceError(
            f"method {method!r} chooses per layer and needs a selection", "add --select validate or proxy"
        )
    if not 0.0 <= holdout < 1.0:
        raise EspaceError(f"--holdout must be in [0, 1), got {holdout}", "try --holdout 0.25")
    model_path = Path(model_path)
    output_path = check_writable(Path(output) if output else default_output(model_path))
    report_file = check_writable(Path(report_path) if report_path else default_report(output_path))
    if output_path.resolve() == model_path.resolve():
        raise EspaceError("the output would overwrite the input model", "choose another path with -o")
    check_siblings(siblings)
    if stage not in ("calibrate", "plan", "apply"):
        raise EspaceError(f"unknown stage {stage!r}", "use calibrate, plan or apply")
    if stage == "calibrate" and statistics is None:
        raise EspaceError("the calibrate stage needs a statistics path", "pass -o stats.npz")
    if stage == "plan" and plan_path is None:
        raise EspaceError("the plan stage needs a plan path", "pass -o plan.json")
    patterns = [re.compile(p) for p in exclude]

    model = load_model(model_path, load_weights=False)  # external weights stay on disk until written
    targets = find_targets(model, include_heads=include_heads)
    if not targets:
        raise EspaceError(
            f"{model_path} has no compressible GEMM (MatMul/Gemm with a 2-D constant weight)",
            "check that weights are initializers (export with do_constant_folding) or use --include-heads",
        )
    per_layer = ratio if select == "none" else (layer_ratio if layer_ratio is not None else max(ratio, 0.5))
    decisions = decide_layers(
        targets, ratio=per_layer, candidate=methods[0], rank_rule=rank_rule, min_rank=min_rank, rank=rank
    )
    excluded = {d.target.name for d in decisions if any(p.search(d.target.name) for p in patterns)}
    for decision in decisions:  # excluded layers stay dense but still count as targeted weights
        if decision.target.name in excluded:
            decision.L = None
    groups = (
        share_siblings(decisions, ratio=per_layer, rank_rule=rank_rule, min_rank=min_rank, rank=rank, excluded=excluded)
        if siblings == "shared"
        else []
    )
    compressed = [d for d in decisions if d.L is not None]
    if not compressed:
        raise EspaceError(
            f"no layer can reach ratio {per_layer} with a rank of at least {min_rank}",
            "lower --min-rank, use --rank-rule 16, or lower --ratio",
        )
    batches, source = load_calibration_batches(
        model,
        calib_data=calib_data,
        calib_text=calib_text,
        tokenizer=tokenizer,
        batch_size=batch_size,
        seq_len=seq_len,
        num_batches=num_batches,
        seed=seed,
    )
    calibration_batches, eval_batches = split_holdout(batches, holdout) if holdout > 0 else (batches, batches)
    validation_batches: list[dict[str, np.ndarray]] = []
    if select == "validate":
        if valid_data is not None or valid_text is not None:
            validation_batches, _ = load_calibration_batches(
                model, calib_data=valid_data, calib_text=valid_text, tokenizer=tokenizer, batch_size=batch_size,
                seq_len=seq_len, num_batches=num_batches, seed=seed + 1,
            )  # fmt: skip
        else:
            if len(calibration_batches) < 2:
                raise EspaceError(
                    "--select validate needs at least 2 non-held-out batches (calibration + validation)",
                    "raise --num-batches or pass --valid-text/--valid-data",
                )
            calibration_batches, validation_batches = split_holdout(calibration_batches, validation)
    specs = input_specs(model)
    timings["load"] = time.perf_counter() - started

    with _Progress(progress) as bars:
        tick = time.perf_counter()
        calibration: Calibration | None = None
        if plan_in is not None:
            plan = load_plan(plan_in)
        else:
            if statistics_in is not None:
                calibration = load_calibration(statistics_in)
                check_fingerprint(
                    [e for e in calibration.fingerprint if e["name"] in {d.target.name for d in compressed}],
                    fingerprint(model, [d.target for d in compressed]),
                    "statistics file",
                )
                missing = [d.target.name for d in compressed if d.target.activation not in calibration.stats]
                if missing:
                    raise EspaceError(
                        f"the statistics file has no statistics for the input of {missing[0]}"
                        f" ({len(missing)} layer(s) missing)",
                        "re-run `espace-export calibrate` with the same --exclude/--include-heads as this run",
                    )
            else:
                # the calibrate stage covers every layer not excluded, so a later plan may use any ratio
                measured = [d.target for d in decisions if d.target.name not in excluded]
                calibration = calibrate_model(
                    model, measured if stage == "calibrate" else [d.target for d in compressed], calibration_batches,
                    methods=methods, specs=specs,
                    precision=stats_precision, bars=bars, seed=seed,
                )  # fmt: skip
                calibration.info = {"source": source, "batches": len(calibration_batches)}
                if not distributed.is_main_rank():  # rank 0 selects and writes; the others are done
                    return CompressionResult(output_path, report_file, {"rank": distributed.init()[0]})
            if statistics is not None:
                save_calibration(calibration, statistics)
            timings["calibrate"] = time.perf_counter() - tick
            if stage == "calibrate":
                assert statistics is not None
                summary = {"statistics": str(statistics), "activations": len(calibration.stats),
                           "gradients": calibration.gradients is not None, **calibration.info}  # fmt: skip
                return CompressionResult(Path(statistics), Path(statistics), summary)
            tick = time.perf_counter()
            validator = None
            if select == "validate":
                from espace_export.validation import Validator

                validator = Validator(
                    model, [d.target for d in compressed], validation_batches, specs=specs, loss=validation_loss
                )
            plan = make_plan(
                model,
                targets,
                {d.target.name: d.L for d in decisions},
                calibration,
                ratio=ratio,
                methods=methods,
                select=select,
                validator=validator,
                max_layer_loss=max_layer_loss,
                stop=stop,
                groups=groups,
                on_step=bars.stepper(),
            )
            plan.info.update({"model": str(model_path), "layer_ratio": per_layer, "rank_rule": str(rank_rule)})
            if validator is not None:
                plan.info["validation"] = {"batches": len(validation_batches), "passes": validator.passes}
            timings["select"] = time.perf_counter() - tick
    if plan_path is not None and plan_in is None:
        save_plan(plan, plan_path)
    if curve_path is not None and plan.curve:
        write_curve(plan, curve_path)
    if stage == "plan":
        assert plan_path is not None
        return CompressionResult(
            Path(plan_path), Path(plan_path), {"plan": str(plan_path), **plan_summary(plan, targets)}
        )
    return apply_plan_to_model(
        model, model_path, targets, decisions, plan, calibration,
        output_path=output_path, report_file=report_file, eval_batches=eval_batches, holdout=holdout,
        calibration_batches=calibration_batches, specs=specs, external_data=external_data, timings=timings,
        started=started,
        settings={
            "ratio_requested": ratio if rank is None else None, "rank_forced": rank, "candidate": methods[0],
            "method": method or candidate, "select": select, "rank_rule": str(rank_rule), "min_rank": min_rank,
            "source": source, "stats_precision": stats_precision, "siblings": siblings,
        },
    )  # fmt: skip


def resolve_methods(method: str) -> list[str]:
    """``best``: the six candidates; ``auto``: those and whitened SVD; otherwise the one method."""
    if method == "best":
        return list(CANDIDATES)
    if method == "auto":
        return [*CANDIDATES, "whitened-svd"]
    if method not in METHODS:
        raise EspaceError(f"unknown candidate or method {method!r}", f"choose from {', '.join(METHODS)}, best, auto")
    return [method]


def calibrate_model(
    model: onnx.ModelProto,
    targets: Sequence[GemmTarget],
    batches: Sequence[dict[str, np.ndarray]],
    *,
    methods: Sequence[str],
    specs: Sequence[Any] | None = None,
    precision: StatsPrecision = "float32",
    bars: _Progress | None = None,
    gradients: bool | None = None,
    seed: int = 0,
    torch_module: Any = None,
) -> Calibration:
    """Activation statistics (and gradient statistics when a method needs them, or ``gradients=True``)."""
    bars = bars or _Progress(False)
    normalized = needs_normalized(methods)
    rank, world = distributed.init()  # under torchrun: this rank's share of the batches, sums all-reduced
    batches = distributed.shard(batches, rank, world) if world > 1 else batches
    with bars.task("calibrating", len(batches)) as advance:
        stats = collect_statistics(
            ort_session, model, targets, batches, precision=precision, specs=specs, on_batch=advance,
            normalized=normalized,
        )  # fmt: skip
    grads = None
    if gradients or (gradients is None and needs_gradients(methods)):
        from espace_export.gradients import collect_gradient_statistics

        with bars.task("gradients (backward)", len(batches)) as advance:
            grads = collect_gradient_statistics(
                model, targets, batches, normalized=normalized, specs=specs, on_batch=advance, seed=seed,
                torch_module=torch_module,
            )  # fmt: skip
    distributed.all_reduce_statistics(stats)
    if grads is not None:
        distributed.all_reduce_statistics(grads)
    return Calibration(stats, grads, fingerprint(model, targets))


def apply_plan_to_model(
    model: onnx.ModelProto,
    model_path: Path,
    targets: Sequence[GemmTarget],
    decisions: Sequence[LayerDecision],
    plan: Plan,
    calibration: Calibration | None,
    *,
    output_path: Path,
    report_file: Path,
    eval_batches: Sequence[dict[str, np.ndarray]],
    holdout: float,
    calibration_batches: Sequence[dict[str, np.ndarray]],
    specs: Sequence[Any],
    external_data: bool | None,
    timings: dict[str, float],
    started: float,
    settings: dict[str, Any],
) -> CompressionResult:
    """Rewrite ``model`` by ``plan``, check it, measure its fidelity and write it with its report."""
    from espace_export.baselines import apply_factorizations

    by_name = {t.name: t for t in targets}
    check_plan_factors(plan, targets)
    planned = [entry for entry in plan.fingerprint if entry["name"] in plan.factors]
    check_fingerprint(
        planned, fingerprint(model, [by_name[e["name"]] for e in planned if e["name"] in by_name]), "plan"
    )
    layer_plans = {layer.name: layer for layer in plan.layers}
    for decision in decisions:
        layer = layer_plans.get(decision.target.name)
        factors = plan.factors.get(decision.target.name)
        if layer is None or factors is None or not layer.selected:
            decision.L, decision.P = None, None
            continue
        decision.L, decision.P, decision.candidate = factors.rank, factors.A, layer.method or decision.candidate
        if calibration is not None and decision.target.activation in calibration.stats:
            C_X = calibration.stats[decision.target.activation].C_X
            energy = float(np.trace(C_X))
            orthonormal = np.allclose(factors.A.T @ factors.A, np.eye(factors.rank), atol=1e-6)
            decision.mse_relative = (projection_mse(C_X, factors.A) / energy) if energy > 0 and orthonormal else None
    compressed = [d for d in decisions if d.L is not None]
    if not compressed:
        raise EspaceError("the plan compresses no layer", "raise --ratio, lower --max-layer-loss or --min-rank")

    total_before = parameter_count(model)
    original_session = ort_session(model)
    tick = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FoldedRangeWarning)
        apply_factorizations(model, [(by_name[d.target.name], plan.factors[d.target.name]) for d in compressed])
    range_warnings = [str(w.message) for w in caught if issubclass(w.category, FoldedRangeWarning)]
    for w in caught:  # still shown to the user, once each
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    timings["rewrite"] = time.perf_counter() - tick
    total_after = parameter_count(model)

    targeted_before = sum(d.target.params for d in decisions)
    targeted_after = projected_params(model) + sum(d.target.params for d in decisions if d.L is None)
    report: dict[str, Any] = {
        "tool": "espace-export",
        "version": __version__,
        "model": str(model_path),
        "output": str(output_path),
        "ratio_requested": settings["ratio_requested"],
        "rank_forced": settings["rank_forced"],
        "candidate": settings["candidate"],
        "method": settings["method"] if plan.select == "none" else "+".join(plan.methods),
        "select": plan.select,
        "siblings": plan.info.get("siblings", settings["siblings"]),
        "rank_rule": settings["rank_rule"],
        "min_rank": settings["min_rank"],
        "targeted_params_before": targeted_before,
        "targeted_params_after": targeted_after,
        "targeted_compression": 1.0 - targeted_after / targeted_before,
        "total_params_before": total_before,
        "total_params_after": total_after,
        "total_compression": 1.0 - total_after / total_before,
        "layers_compressed": len(compressed),
        "layers_dense": len(decisions) - len(compressed),
        "calibration": {
            "source": settings["source"],
            "batches": len(calibration_batches),
            "heldout_batches": len(eval_batches) if holdout > 0 else 0,
            "rows": {name: s.rows for name, s in calibration.stats.items()} if calibration else {},
            "stats_precision": settings["stats_precision"],
        },
        "layers": [d.as_json() for d in decisions],
    }
    for entry in report["layers"]:
        layer = layer_plans.get(entry["name"])
        if layer is not None and layer.group is not None and layer.selected:
            entry["shares_projection_with"] = layer.group
    if plan.select != "none":
        report["selection"] = {
            "select": plan.select,
            "methods": plan.methods,
            "score": plan.score_kind,
            "baseline_loss": plan.baseline_loss,
            "skipped": plan.skipped,
            "knee": plan.knee,
            "curve": plan.curve,
            **plan.info,
            # how often each method was the best one, over the layers that were compressed
            "wins": plan_summary(plan, targets)["methods"],
        }
        for entry in report["layers"]:
            layer = layer_plans.get(entry["name"])
            if layer is not None:
                entry.update(
                    {
                        "scores": layer.scores,
                        "harm": layer.harm,
                        "order": layer.order,
                        "method": layer.method,
                        "group": layer.group,
                    }
                )

    with atomic_output(output_path) as tmp_output:
        save_model(model, tmp_output, external_data=external_data)
        check_model(tmp_output)
        tick = time.perf_counter()
        try:
            compressed_session = ort_session(tmp_output)
        except Exception as exc:  # an ORT failure here is our bug, but say it plainly
            raise RuntimeError(f"ONNX Runtime cannot load the rewritten model: {exc}") from exc
        report["fidelity"] = {
            "batches": len(eval_batches),
            "measured_on": "held-out batches"
            if holdout > 0 and eval_batches is not calibration_batches
            else "calibration batches",
            "outputs": output_fidelity(original_session, compressed_session, eval_batches, specs),
        }
        timings["fidelity"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - started
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        report["warnings"] = range_warnings
        write_report(report, report_file)
    return CompressionResult(output_path, report_file, report)


def write_curve(plan: Plan, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The progressive curve as JSON and as a PNG (matplotlib, Agg) with the inflection point marked."""
    path = Path(path)
    json_path = path.with_suffix(".json")
    png_path = path.with_suffix(".png")
    with atomic_output(json_path) as tmp:
        tmp.write_text(
            json.dumps(
                {"score": plan.score_kind, "knee": plan.knee, "ratio": plan.ratio, "curve": plan.curve}, indent=2
            )
            + "\n"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * p["compression"] for p in plan.curve]
    y = [p["loss"] for p in plan.curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, y, marker="o", markersize=3, label="progressive application")
    if plan.knee is not None:
        ax.plot([x[plan.knee]], [y[plan.knee]], "r*", markersize=14, label="inflection point")
    ax.axvline(100 * plan.ratio, color="gray", linestyle="--", linewidth=1, label=f"target {plan.ratio:.0%}")
    ax.set_xlabel("targeted compression (%)")
    ax.set_ylabel(plan.score_kind)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return json_path, png_path


def projected_params(model: onnx.ModelProto) -> int:
    """Numbers stored by the projected pairs: each distinct P (K·L, shared by siblings) and each PᵀW (L·N)."""
    pairs = find_projected_pairs(model)
    projections = {pair.project_node: pair.K * pair.L for pair in pairs}
    return sum(projections.values()) + sum(pair.L * pair.N for pair in pairs)


def write_report(report: dict[str, Any], path: Path) -> None:
    """The JSON report and its Markdown twin (``.md``), each written atomically."""
    from espace_export.report import to_markdown

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_output(path.with_suffix(".md")) as tmp:
        tmp.write_text(to_markdown(report))
