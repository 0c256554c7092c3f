"""Accuracy of ESPACE candidates, per-layer selection and SVD baselines at ≈20 % and ≈50 % compression.

One run, one table per model, every number measured here:

* ``minilm`` — the pretrained all-MiniLM-L6-v2 export (``samples/out/minilm.onnx``): mean cosine of the
  sentence embeddings to the original model's, on the held-out *test* paragraphs of CPython's pydoc text.
* ``tiny-lm`` — the Llama trained by ``samples/train_lm.py`` (``samples/out/tiny-lm``): perplexity on its
  *test* split.

Data: the paragraph splits of :mod:`samples.train_lm` (SHA-1 of each paragraph: 80 % train / 10 %
validation / 10 % test). Calibration (activation + gradient statistics) uses *train*, per-layer validation
uses *validation*, and the reported numbers use *test* only.

Rows, two blocks:

* uniform — every targeted layer at the ratio's rank, so all these rows land on the same compression:
  each ESPACE candidate alone; ``best-of-6`` (each layer with the candidate that validates best on it);
  ``best-of-6, shared P`` (the same with Q/K/V and gate/up sharing one projection, ranked as their fused
  GEMM: ``--siblings shared``); and the baselines ``svd``, ``asvd``, ``whitened-svd``.
* progressive — layers at max(ratio, 50 %) each, ranked by validation loss alone and applied until the
  ratio is met (the paper's §4.2 procedure; the last layer overshoots the ratio a little): best of six
  (``progressive``), with shared siblings, with truncated SVD as the only method (``progressive svd``:
  the same layer selection without ESPACE), ``auto`` (six + whitened SVD), and ``auto, fisher`` (the same
  scored by ``--select fisher``: one gradient pass over the validation batches, no pass per trial — the
  fast selection of issue 12). Validation scores are the
  tool's default: KL of the next-token distribution to the dense model's for the LM, 1 − cosine for
  MiniLM. For the LM also ``progressive (next-token)`` and ``progressive, shared P (next-token)``: layers
  scored by the validation cross-entropy instead (``--valid-loss next-token``, the paper's perplexity).

The LM's cells also give the test KL to the dense model (nats per token): perplexity rewards any change that
happens to fit the test text better — on this small, overfit LM a low-rank weight can act as a regulariser —
while the KL says how far the compressed model moved from the original.

Every row has the same two-GEMM structure at L(K+N) parameters per compressed layer (a shared projection
counted once). Ranks use granularity 1 by default, so the uniform rows meet the ratio within a fraction of a
percent instead of overshooting it through the tensor-core rule. Compression is over the targeted block GEMMs.

    python benchmarks/accuracy.py                    # both models
    python benchmarks/accuracy.py --models tiny-lm --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# On a shared 2-core machine OpenBLAS with 2 threads ran a 256×256 SVD 30× slower than with one
# (threads spinning against other processes); the eigen-decompositions here are small, one thread is enough.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import onnx  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import espace_export  # noqa: E402
from espace_export.io.data import input_specs, read_text  # noqa: E402
from espace_export.pipeline import Run  # noqa: E402
from espace_export.selection.candidates import CANDIDATES  # noqa: E402
from espace_export.selection.planner import plan_summary  # noqa: E402
from espace_export.selection.validation import Validator  # noqa: E402
from graph_passes import find_targets  # noqa: E402

RATIOS = (0.2, 0.5)


def _batches(model: onnx.ModelProto, text: Path, tokenizer: Path, count: int, batch: int, seq: int) -> list:
    return read_text(text, tokenizer, input_specs(model), batch_size=batch, seq_len=seq, max_batches=count)


def _split_files(directory: Path) -> dict[str, Path]:
    from samples.train_lm import SPLITS, split_paragraphs

    splits = split_paragraphs()
    paths = {}
    for name in SPLITS:
        paths[name] = directory / f"{name}.txt"
        paths[name].write_text("\n\n".join(splits[name]) + "\n", encoding="utf-8")
    return paths


def model_files(name: str, args: argparse.Namespace) -> tuple[Path, Path]:
    """The model and its tokenizer directory: ``tiny-lm`` from ``--lm-dir``, ``minilm`` from ``--minilm``."""
    if name == "tiny-lm":
        return args.lm_dir / "model.onnx", args.lm_dir / "hf"
    from samples.export_minilm import minilm_dir

    return args.minilm, minilm_dir()


def _method(methods: list[str]) -> str:
    """The --method that names a list of methods."""
    if methods == list(CANDIDATES):
        return "best"
    return "auto" if methods == [*CANDIDATES, "whitened-svd"] else methods[0]


def _run(path: Path, tokenizer: Path, texts: dict[str, Path], args: argparse.Namespace, **settings: Any) -> Run:
    """A run on the train text (calibration) and the validation text, nothing held out (the test split is)."""
    data = {"calib_text": texts["train"], "valid_text": texts["validation"], "tokenizer": tokenizer, "holdout": 0.0,
            "num_batches": args.calib_batches, "valid_batches": args.valid_batches, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "rank_rule": args.rank_rule, "min_rank": 16}  # fmt: skip
    return Run(path, espace_export.CompressOptions.from_settings(**data, **settings))


def evaluate_model(name: str, path: Path, tokenizer: Path, texts: dict[str, Path], args: argparse.Namespace) -> dict:
    model = onnx.load(path)
    targets = find_targets(model)
    valid = _batches(model, texts["validation"], tokenizer, args.valid_batches, args.batch_size, args.seq_len)
    test = _batches(model, texts["test"], tokenizer, args.test_batches, args.batch_size, args.seq_len)

    tick = time.perf_counter()  # every layer, every method's statistics (gradients too), once
    calibration = espace_export.calibrate(_run(path, tokenizer, texts, args, method="auto"), every_layer=True)
    calibrate_s = time.perf_counter() - tick
    calib = calibration.info
    validator = Validator(model, targets, valid)  # the tool's default score: KL (LM) or 1 - cos (encoder)
    tick = time.perf_counter()
    validator.evaluate({})
    pass_s = time.perf_counter() - tick
    causal = validator.loss == "kl"
    tester = Validator(model, targets, test, loss="next-token" if causal else "distill")
    # for the LM also the KL of its next-token distribution to the dense model's: perplexity rewards any
    # change that happens to fit the test text better, KL measures how far the model moved
    drift = Validator(model, targets, test, loss="kl") if causal else None

    def metric(loss: float) -> float:
        return math.exp(loss) if tester.loss == "next-token" else 1.0 - loss

    label = "test perplexity" if tester.loss == "next-token" else "test cosine to original"
    rows: dict[str, dict[str, Any]] = {
        "dense": {
            str(r): {"metric": metric(tester.baseline), "compression": 0.0, "kl": 0.0 if causal else None}
            for r in RATIOS
        }
    }
    cost: dict[str, Any] = {}
    six = list(CANDIDATES)
    # (row, select, methods, layers, siblings): "uniform" = every layer at the ratio's rank (all these rows
    # land on the same compression); "progressive" = layers at max(ratio, 50 %) chosen by validation.
    configs = [(m, "none", [m], "uniform", "separate") for m in CANDIDATES]
    configs += [
        ("best-of-6", "validate", six, "uniform", "separate"),
        ("best-of-6, shared P", "validate", six, "uniform", "shared"),
    ]
    configs += [(m, "none", [m], "uniform", "separate") for m in ("svd", "asvd", "whitened-svd")]
    configs += [
        ("progressive", "validate", six, "progressive", "separate"),
        ("progressive, shared P", "validate", six, "progressive", "shared"),
        ("progressive svd", "validate", ["svd"], "progressive", "separate"),
        ("auto (+whitened-svd)", "validate", [*CANDIDATES, "whitened-svd"], "progressive", "separate"),
        # the fast selection: the same methods scored by the Fisher estimate (one gradient pass, validation batches)
        ("auto, fisher", "fisher", [*CANDIDATES, "whitened-svd"], "progressive", "separate"),
    ]
    if causal:  # LMs: the same selections scored by the validation cross-entropy (the paper's choice)
        configs += [
            ("progressive (next-token)", "validate", six, "progressive", "separate"),
            ("progressive, shared P (next-token)", "validate", six, "progressive", "shared"),
        ]
    for ratio in RATIOS:
        for row, select, methods, layers, siblings in configs:
            if args.rows and row not in args.rows:
                continue
            run = _run(
                path, tokenizer, texts, args, ratio=ratio, layer_ratio=ratio if layers == "uniform" else None,
                method=_method(methods), select=select, siblings=siblings, valid_loss="next-token" if row.endswith("(next-token)") else "auto",
                progressive=layers == "progressive", full_curve=False,
            )  # fmt: skip
            tick = time.perf_counter()
            plan = espace_export.plan(run, calibration)
            seconds = time.perf_counter() - tick
            overrides = {n: tester.effective(n, f.weight()) for n, f in plan.factors.items()}
            loss = tester.evaluate(overrides)
            kl = drift.evaluate(overrides) if drift is not None else None
            summary = plan_summary(plan, targets)
            rows.setdefault(row, {})[str(ratio)] = {
                "metric": metric(loss),
                "kl": kl,
                "compression": summary["targeted_compression_planned"],
                "methods": summary["methods"],
            }
            if select in ("validate", "fisher"):
                passes = plan.info["validation"]["passes"] - 1 if select == "validate" else 0  # not the baseline pass
                cost[f"{row} @ {ratio}"] = {
                    "passes": passes,
                    "seconds": round(seconds, 1),
                    "in_passes": round(seconds / pass_s, 1),
                }
            print(
                f"[{name}] {row:>22} @ {ratio}: {label} {metric(loss):.4f}"
                + (f", KL to dense {kl:.5f} " if kl is not None else " ")
                + f"(compression {summary['targeted_compression_planned']:.3f})",
                file=sys.stderr,
            )
    return {
        "model": name,
        "metric": label,
        "targets": len(targets),
        "calibration": {"batches": calib["batches"], "tokens": calib["tokens"], "seconds": round(calibrate_s, 1)},
        "validation": {"batches": len(valid), "pass_seconds": round(pass_s, 3)},
        "test": {"batches": len(test)},
        "rows": rows,
        "selection_cost": cost,
    }


def to_markdown(result: dict) -> str:
    with_kl = any(cell.get("kl") is not None for by_ratio in result["rows"].values() for cell in by_ratio.values())
    metric = result["metric"] + (" / KL to dense (nats per token)" if with_kl else "")
    lines = [f"### {result['model']} — {metric} ({result['targets']} targeted GEMMs)", ""]
    lines.append("| method | " + " | ".join(f"≈{int(r * 100)} % (achieved)" for r in RATIOS) + " |")
    lines.append("|---|" + "---|" * len(RATIOS))
    for row, by_ratio in result["rows"].items():
        cells = [
            f"{by_ratio[str(r)]['metric']:.4f}"
            + (f" / {by_ratio[str(r)]['kl']:.5f}" if by_ratio[str(r)].get("kl") is not None else "")
            + f" ({by_ratio[str(r)]['compression']:.1%})"
            for r in RATIOS
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    one = result["validation"]["pass_seconds"]
    lines.append(f"One validation pass: {one:.2f} s ({result['validation']['batches']} batches). Selection cost:")
    for key, value in result["selection_cost"].items():
        lines.append(
            f"- {key}: {value['passes']} validation passes, {value['seconds']} s = {value['in_passes']}× one pass"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-lm", "minilm"], choices=["tiny-lm", "minilm"])
    parser.add_argument("--lm-dir", type=Path, default=ROOT / "samples" / "out" / "tiny-lm")
    parser.add_argument("--minilm", type=Path, default=ROOT / "samples" / "out" / "minilm.onnx")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--valid-batches", type=int, default=2)
    parser.add_argument("--test-batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank-rule", default="1", help="rank granularity (1: every row lands on the ratio)")
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows (names as printed)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        texts = _split_files(Path(tmp))
        for name in args.models:
            results.append(evaluate_model(name, *model_files(name, args), texts, args))
            print(to_markdown(results[-1]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
