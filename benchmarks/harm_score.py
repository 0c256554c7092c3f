"""How well cheap scores predict ``--select validate``'s per-layer harm, and what each selection ends at.

For each sample model (the tiny LM of ``samples/train_lm.py``, MiniLM of ``samples/export_minilm.py``) it
calibrates on the *train* split, then plans three ways at the same rank per layer and the same ``--ratio``:

* ``validate`` — each unit × method applied alone on the *validation* batches (the exact mode; its per-unit
  harm is the reference),
* ``fisher`` — :func:`espace_export.harm.fisher_harm` from one forward + backward pass over
  ``--fisher-batches`` *validation* batches (:func:`espace_export.harm.collect_fisher_samples`; the
  validation set by default); for the LM with labels sampled from the model (true Fisher, the default) and
  with the data's labels (``next-token``, the empirical Fisher), for MiniLM with the cosine probe (the
  default) and the isotropic one; and once more from as many *calibration* batches, the tokens the
  factorisations were fitted to (in-sample: blind to a factorisation that does not generalise),
* ``proxy`` — the calibrated relative output error E‖x(W − AB)‖²/E‖xW‖²,

and prints the Spearman rank correlation of each cheap score with the validated one, over units (each
unit's best method) and over every unit × method trial, the cost of each selection (validation passes,
seconds, seconds in plain validation passes), and the final fidelity of each plan on the *test* split:
KL of the next-token distribution to the dense model (LM; lower is better) or mean cosine of the output
rows to the dense model's (MiniLM; higher is better), with the compression it reached.

    python benchmarks/harm_score.py                       # both models
    python benchmarks/harm_score.py --models tiny-lm --methods mse go-mse whitened-svd
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # shared 2-core machine: one BLAS thread, see accuracy.py
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import _batches, _split_files, model_files  # noqa: E402
from espace_export.calibration.collect import calibrate_model  # noqa: E402
from espace_export.harm import FisherSettings, collect_fisher_samples  # noqa: E402
from espace_export.options import RankOptions  # noqa: E402
from espace_export.pipeline import decide_layers, share_siblings  # noqa: E402
from espace_export.selection.planner import PlanInputs, PlanSettings, make_plan, plan_summary  # noqa: E402
from espace_export.selection.validation import Validator  # noqa: E402
from graph_passes import find_targets  # noqa: E402


def measure(name: str, path: Path, tokenizer: Path, texts: dict[str, Path], args: argparse.Namespace) -> dict:
    model = onnx.load(path)
    targets = find_targets(model)
    calib = _batches(model, texts["train"], tokenizer, args.calib_batches, args.batch_size, args.seq_len)
    valid = _batches(model, texts["validation"], tokenizer, args.valid_batches, args.batch_size, args.seq_len)
    test = _batches(model, texts["test"], tokenizer, args.test_batches, args.batch_size, args.seq_len)
    calibration = calibrate_model(model, targets, calib, methods=args.methods)
    validator = Validator(model, targets, valid)
    tick = time.perf_counter()
    validator.evaluate({})
    pass_s = time.perf_counter() - tick
    causal = validator.loss == "kl"
    tester = Validator(model, targets, test, loss="kl" if causal else "distill")

    layer_ratio = max(0.5, args.ratio)
    rank_options = RankOptions(
        ratio=layer_ratio, rank_rule="1", min_rank=16, siblings="shared" if args.shared else "separate"
    )
    decisions = decide_layers(targets, rank_options, args.methods[0])
    groups = share_siblings(decisions, rank_options)
    ranks = {d.target.name: d.L for d in decisions}
    # Fisher samples from the held-out validation batches (what validate scores on) and, to show the bias of
    # scoring on the tokens the factorisations were fitted to, from the calibration batches
    held_out, fitted = valid[: args.fisher_batches], calib[: args.fisher_batches]
    fishers = [("auto", held_out, "validation"), ("auto", fitted, "calibration"),
               ("next-token" if causal else "probe", held_out, "validation")]  # fmt: skip
    plans: dict[str, Any] = {}
    cost: dict[str, dict[str, float]] = {}
    tokens = 0
    for select in ("validate", *(f"fisher:{i}" for i in range(len(fishers))), "proxy"):
        samples, collect_s = None, 0.0
        if select.startswith("fisher"):
            loss, batches, where = fishers[int(select.split(":")[1])]
            tick = time.perf_counter()
            samples = collect_fisher_samples(model, targets, batches, FisherSettings(loss=loss))  # type: ignore[arg-type]
            collect_s, tokens = time.perf_counter() - tick, samples.tokens
            select = f"fisher ({samples.loss}, {where} batches)"
        passes_before = validator.passes
        tick = time.perf_counter()
        settings = PlanSettings(args.ratio, tuple(args.methods), "fisher" if samples is not None else select,
                                full_curve=False)  # fmt: skip
        plans[select] = make_plan(
            PlanInputs(model, targets, ranks, calibration, groups), settings,
            validator=validator if select == "validate" else None, fisher=samples,
        )  # fmt: skip
        seconds = time.perf_counter() - tick
        cost[select] = {
            "passes": validator.passes - passes_before,
            "collect_seconds": collect_s,
            "seconds": seconds + collect_s,
            "in_passes": (seconds + collect_s) / pass_s,
        }
    units = [layer for layer in plans["validate"].layers if layer.scores and (layer.group in (None, layer.name))]
    reference = np.array([u.harm for u in units])
    correlations: dict[str, dict[str, float]] = {}
    per_unit: dict[str, dict[str, Any]] = {u.name: {"validate": u.harm, "method": u.method} for u in units}
    for select in plans:
        if select == "validate":
            continue
        by_name = {layer.name: layer for layer in plans[select].layers}
        for u in units:
            per_unit[u.name][select] = by_name[u.name].harm
        unit_rho = spearmanr(reference, [by_name[u.name].harm for u in units]).statistic
        trials_ref = [u.scores[m] for u in units for m in args.methods]
        trials = [by_name[u.name].scores[m] for u in units for m in args.methods]
        trial_rho = spearmanr(trials_ref, trials).statistic
        same_method = np.mean([by_name[u.name].method == u.method for u in units])
        correlations[select] = {"units": float(unit_rho), "trials": float(trial_rho), "same_method": float(same_method)}
    fidelity: dict[str, dict[str, float]] = {}
    for select, plan in plans.items():
        overrides = {n: tester.effective(n, f.weight()) for n, f in plan.factors.items()}
        loss = tester.evaluate(overrides)
        fidelity[select] = {
            "metric": loss if causal else 1.0 - loss,
            "compression": plan_summary(plan, targets)["targeted_compression_planned"],
            "layers": len(plan.factors),
            "selected": sorted(plan.factors),
        }
    return {
        "model": name,
        "metric": "test KL to dense (nats/token)" if causal else "test cosine to dense",
        "units": len(units),
        "tokens": tokens,
        "pass_seconds": pass_s,
        "correlation": correlations,
        "cost": cost,
        "fidelity": fidelity,
        "per_unit": per_unit,
    }


def report(result: dict) -> str:
    lines = [
        f"## {result['model']}: {result['units']} units, Fisher samples {result['tokens']} tokens, "
        f"one validation pass {result['pass_seconds']:.2f} s",
        "",
        "| score | Spearman vs validated (units) | (unit × method trials) | same method as validate |",
        "|---|---|---|---|",
    ]
    for select, c in result["correlation"].items():
        lines.append(f"| {select} | {c['units']:.3f} | {c['trials']:.3f} | {c['same_method']:.0%} |")
    lines += [
        "",
        f"| selection | validation passes | seconds (of which gradient pass) | in passes | {result['metric']} "
        "| compression | layers |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for select, f in result["fidelity"].items():
        c = result["cost"][select]
        lines.append(
            f"| {select} | {c['passes']} | {c['seconds']:.1f} ({c['collect_seconds']:.1f}) | {c['in_passes']:.1f} | "
            f"{f['metric']:.4g} | {f['compression']:.3f} | {f['layers']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-lm", "minilm"], choices=["tiny-lm", "minilm"])
    parser.add_argument("--lm-dir", type=Path, default=ROOT / "samples" / "out" / "tiny-lm")
    parser.add_argument("--minilm", type=Path, default=ROOT / "samples" / "out" / "minilm.onnx")
    parser.add_argument("--methods", nargs="+", default=["mse", "go-mse", "whitened-svd"])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--shared", action="store_true", help="siblings share one projection (--siblings shared)")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--valid-batches", type=int, default=2)
    parser.add_argument("--test-batches", type=int, default=8)
    parser.add_argument("--fisher-batches", type=int, default=2, help="batches the Fisher pass reads")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure and per-unit score here")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        texts = _split_files(Path(tmp))
        for name in args.models:
            result = measure(name, *model_files(name, args), texts, args)
            print(report(result), flush=True)
            print()
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
