"""Healing benchmark (issue 13, item 5): ESPACE against the SVD baselines, each retrained at equal weights.

On the tiny LM of ``samples/train_lm.py`` (``samples/out/tiny-lm``; it must hold ``optimizer.pt``, which
``train_lm.py`` now writes), for each ratio (the fraction of the targeted block-GEMM weights removed) and
each method, all at the same rank L per layer and therefore the same L(K+N) weights per layer:

    espace         orthonormal P (candidate ``--candidate``, default mse) static, W whole and trained
    oblique        the static oblique pair (A, M) of whitened SVD, W whole and trained
    svd            W replaced by the two factors of its truncated SVD, both trained
    whitened-svd   W replaced by the two factors of SVD-LLM's whitened SVD, both trained
    dense          the uncompressed model trained as long (the control: how much is just more training;
                   once, shown in every ratio's table; leave it out of ``--methods`` to skip it)

Every training run is ``train_lm``'s loop on the language-model loss (next-token cross-entropy on train
windows; no distillation), with the same steps, batches and schedule (AdamW, linear warm-up to ``--lr``
over min(30, steps/10) steps, cosine decay to 10 %). The seed (``--seeds``) sets the order of the training
batches; the calibration batches (16 × 8 windows of 128 train tokens) are the same for every seed, so the
"out of the box" models are too. With ``--reuse-optimizer`` (default) the methods whose trained
parameters are the dense model's (espace, oblique, dense) start from the baseline's AdamW moments, as the
paper does (§2.2); the SVD factors have no such state and start from a fresh AdamW. The SVD factors start
balanced (each column of A and row of B scaled to the same norm; the product is unchanged).

Measured on the test split (non-overlapping 128-token windows): perplexity, and the KL divergence from the
dense model's next-token distribution (nats per token, mean over tokens). Each healed model is then
exported to ONNX (ESPACE and oblique in their folded inference form), quantized with
``espace_export.quantize`` (``int8``: dynamic, per-channel weights) and measured again in ONNX Runtime.

    python benchmarks/healing.py --threads 1 --json healing.json          # the defaults below
    python benchmarks/healing.py --methods espace svd --ratios 0.5 --seeds 0 --steps 50

Progress goes to stderr; the tables (one per ratio, healed columns mean ± sd over seeds) and the healed
differences paired by seed (ESPACE and oblique minus each SVD baseline, the same batches) to stdout.
MiniLM (``--models minilm``, ``samples/out/minilm.onnx``): the same four methods from the ONNX alone (``espace-export
heal``'s :func:`heal_onnx`; the SVD baselines with ``train="factors"``), distilled on pydoc's train split and the
stdlib docstrings (no test paragraph), scored by the cosine of the sentence embeddings on the unseen test paragraphs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from espace_export import heal  # noqa: E402
from espace_export.quantize import quantize_model  # noqa: E402
from espace_export.selection.factorizations import Factorization, factorize  # noqa: E402
from samples import heal_lm, train_lm  # noqa: E402

METHODS = ("espace", "oblique", "svd", "whitened-svd")
WHOLE_WEIGHT_METHODS = ("espace", "oblique", "dense")  # trained parameters are the dense model's
DENSE = "dense"


class FactoredLinear(nn.Module):
    """``y = ((x·A)·B) + b`` from a :class:`Factorization` of a dense ``nn.Linear``: both factors trainable."""

    def __init__(self, dense: nn.Linear, factors: Factorization) -> None:
        super().__init__()
        A = torch.as_tensor(factors.A, dtype=torch.float64)
        B = torch.as_tensor(factors.B, dtype=torch.float64)
        scale = (B.norm(dim=1) / A.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30).sqrt()  # balance A and B
        L = A.shape[1]
        self.first = nn.Linear(dense.in_features, L, bias=False)
        self.second = nn.Linear(L, dense.out_features, bias=dense.bias is not None)
        with torch.no_grad():
            self.first.weight.copy_((A * scale).T)
            self.second.weight.copy_((B / scale[:, None]).T)
            if dense.bias is not None:
                self.second.bias.copy_(dense.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@dataclasses.dataclass
class Prepared:
    """What every method at one ratio is built from: ESPACE's P (which fixes L), each layer's C_X."""

    ratio: float
    projections: dict[str, np.ndarray]
    covariances: dict[str, np.ndarray]

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(P.shape[1]) for name, P in self.projections.items()}


def prepare(
    baseline: nn.Module, calibration: Sequence[Mapping[str, torch.Tensor]], ratio: float, candidate: str, rank_rule: str
) -> Prepared:
    """ESPACE's P per layer at ``ratio`` and the input covariance of every layer it projects.

    Each layer is ranked on its own (``siblings="separate"``), so every layer, and the total, loses
    ``ratio`` of its weights up to the rank rule's rounding, whatever the method."""
    projections = heal.calibrate(
        baseline, calibration, ratio=ratio, candidate=candidate, rank_rule=rank_rule, siblings="separate"
    )
    modules = {name: baseline.get_submodule(name) for name in projections}
    stats, owner = heal.collect_statistics(baseline, modules, calibration)
    covariances = {name: stats[owner[name]].C_X for name in projections}
    return Prepared(ratio, projections, covariances)


def build(baseline: nn.Module, method: str, prepared: Prepared) -> nn.Module:
    """A copy of ``baseline`` compressed by ``method`` at the prepared ranks (``dense``: the copy alone)."""
    model = copy.deepcopy(baseline)
    if method == DENSE:
        return model
    if method == "espace":
        heal.attach_projections(model, prepared.projections)
        return model
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    factors = {
        name: factorize(method, heal.weight_kn(model.get_submodule(name)), L, C_X=prepared.covariances[name])
        for name, L in prepared.ranks.items()
    }
    if method == "oblique":  # A and M static, W whole
        heal.attach_projections(
            model,
            {name: (f.A.astype(np.float32), f.M.astype(np.float32)) for name, f in factors.items()},  # type: ignore[union-attr]
        )
        return model
    for name, f in factors.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FactoredLinear(getattr(parent, child), f))
    return model


def inference_weights(model: nn.Module, names: Sequence[str]) -> int:
    """Weights of the named GEMMs as inference runs them: L(K+N) for a projected or factored layer, else KN."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, FactoredLinear):
            total += module.first.weight.numel() + module.second.weight.numel()
        else:
            K, N = heal.layer_shape(module)
            total += getattr(module, heal.PROJECTION_BUFFER).shape[1] * (K + N) if heal.is_projected(module) else K * N
    return total


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The one training schedule every method gets."""

    steps: int
    lr: float
    reuse_optimizer: bool
    lm_dir: Path | None = None  # where optimizer.pt is (None: never reused)

    def optimizer_for(self, model: nn.Module, method: str, config: train_lm.LMConfig) -> torch.optim.Optimizer | None:
        """The baseline's AdamW state for a model whose parameters are the dense ones, else None (fresh)."""
        if not self.reuse_optimizer or self.lm_dir is None or method not in WHOLE_WEIGHT_METHODS:
            return None
        return train_lm.load_optimizer(self.lm_dir, model, config)

    def describe(self, method: str) -> str:
        reused = self.reuse_optimizer and self.lm_dir is not None and method in WHOLE_WEIGHT_METHODS
        return "baseline's AdamW state" if reused else "fresh AdamW"


def train(model: nn.Module, method: str, stream: np.ndarray, schedule: Schedule, seed: int) -> float:
    """Train ``model`` in place with ``train_lm``'s loop and the shared schedule; returns seconds."""
    config = heal_lm.HealConfig(schedule.steps, schedule.lr, seed).lm_config(train_lm.LMConfig())
    optimizer = schedule.optimizer_for(model, method, config)
    torch.manual_seed(seed)
    started = time.perf_counter()
    train_lm._train(model, stream, config, minutes=math.inf, steps=schedule.steps, seed=seed, optimizer=optimizer)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- measuring


class TestWindows:
    """The test stream cut as ``train_lm.perplexity`` cuts it, with the dense model's log-probabilities."""

    def __init__(self, stream: np.ndarray, dense: nn.Module, seq_len: int = 128, batch_size: int = 16) -> None:
        starts = train_lm.window_starts(len(stream), seq_len)
        rows = np.stack([stream[s : s + seq_len + 1] for s in starts])
        self.batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        with torch.no_grad():
            dense.eval()
            self.reference = [torch.log_softmax(_logits(dense, b), -1) for b in self.batches]

    def score(self, logits_of: Callable[[np.ndarray], torch.Tensor]) -> dict[str, float]:
        """Perplexity of the next tokens and KL(dense ‖ model) per token, over every test window."""
        nll = kl = 0.0
        count = 0
        for rows, ref in zip(self.batches, self.reference, strict=True):
            logp = torch.log_softmax(logits_of(rows).float(), -1)
            targets = torch.from_numpy(rows[:, 1:])
            nll -= float(logp.gather(-1, targets[..., None]).sum())
            kl += float((ref.exp() * (ref - logp)).sum())
            count += targets.numel()
        return {"ppl": math.exp(nll / count), "kl": kl / count}


def _logits(model: nn.Module, rows: np.ndarray) -> torch.Tensor:
    return model(input_ids=torch.from_numpy(rows[:, :-1])).logits


def score_torch(model: nn.Module, windows: TestWindows) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        return windows.score(lambda rows: _logits(model, rows))


def export(model: nn.Module, path: Path) -> Path:
    """The model as ONNX: a projected one in its folded inference form, anything else as it computes."""
    if heal.projections_of(model):
        return heal.export_onnx(model, path, train_lm.export_onnx)
    return train_lm.export_onnx(model, path)


def score_int8(model: nn.Module, windows: TestWindows, workdir: Path, threads: int | None) -> dict[str, float]:
    """Export ``model``, quantize it to dynamic int8 and score the quantized graph in ONNX Runtime."""
    from espace_export.runtime import ort_session

    float_path = export(model, workdir / "model.onnx")
    quantized = quantize_model(float_path, workdir / "model.int8.onnx", "int8").output
    session = ort_session(quantized, threads=threads)

    def logits_of(rows: np.ndarray) -> torch.Tensor:
        ids = np.ascontiguousarray(rows[:, :-1])
        return torch.from_numpy(session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0])

    return windows.score(logits_of)


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class Context:
    """What every run of one model shares."""

    baseline: nn.Module
    train_stream: np.ndarray
    windows: TestWindows
    schedule: Schedule
    threads: int | None = None
    int8: bool = True

    @property
    def targets(self) -> list[str]:
        return list(heal.target_modules(self.baseline))


def run_method(context: Context, method: str, prepared: Prepared | None, seeds: Sequence[int]) -> list[dict]:
    """Out of the box once, then per seed: healed and healed + int8. ``prepared`` None: the dense control."""
    start = context.baseline if prepared is None else build(context.baseline, method, prepared)
    ratio = None if prepared is None else prepared.ratio
    common = {
        "ratio": ratio,
        "method": method,
        "weights": inference_weights(start, context.targets),
        "optimizer": context.schedule.describe(method),
    }
    records = [{**common, "seed": None, "stage": "out of the box", **score_torch(start, context.windows)}]
    _say(records[-1])
    for seed in seeds:
        model = copy.deepcopy(start)
        seconds = train(model, method, context.train_stream, context.schedule, seed)
        records.append({**common, "seed": seed, "stage": "healed", "seconds": seconds})
        records[-1].update(score_torch(model, context.windows))
        _say(records[-1])
        if context.int8:
            with tempfile.TemporaryDirectory(prefix="espace-healing.") as work:
                records.append({**common, "seed": seed, "stage": "healed + int8"})
                records[-1].update(score_int8(model, context.windows, Path(work), context.threads))
            _say(records[-1])
    return records


def _say(record: Mapping[str, object]) -> None:
    ratio = "dense" if record["ratio"] is None else f"{record['ratio']:g}"
    seed = "" if record["seed"] is None else f" seed {record['seed']}"
    took = f" ({record['seconds']:.0f} s training)" if "seconds" in record else ""
    print(
        f"[healing] {ratio} {record['method']} {record['stage']}{seed}: test ppl {record['ppl']:.2f}, "
        f"KL {record['kl']:.4f}, {record['weights']:,} weights{took}",
        file=sys.stderr,
        flush=True,
    )


def summarize(records: Sequence[Mapping[str, object]], keys: Sequence[str] = ("ppl", "kl")) -> list[dict]:
    """Mean and sample sd over seeds of ``keys`` (ppl and KL) per (ratio, method, stage)."""
    groups: dict[tuple, list[Mapping[str, object]]] = {}
    for record in records:
        groups.setdefault((record["ratio"], record["method"], record["stage"]), []).append(record)
    summary = []
    for (ratio, method, stage), members in groups.items():
        row: dict[str, object] = {"ratio": ratio, "method": method, "stage": stage, "n": len(members)}
        row.update(weights=members[0]["weights"], optimizer=members[0]["optimizer"])
        for key in keys:
            values = [float(m[key]) for m in members]  # type: ignore[arg-type]
            row[key] = statistics.fmean(values)
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def _cell(row: Mapping[str, object] | None, key: str, digits: int) -> str:
    if row is None:
        return ""
    mean, sd = float(row[key]), float(row[f"{key}_sd"])  # type: ignore[arg-type]
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if row["n"] > 1 else f"{mean:.{digits}f}"  # type: ignore[operator]


def table(summary: Sequence[Mapping[str, object]], ratio: float, methods: Sequence[str], dense_weights: int) -> str:
    """One ratio's markdown table; the dense model trained as long is its last row."""
    find = {(r["ratio"], r["method"], r["stage"]): r for r in summary}
    lines = [
        f"#### ≈{ratio:.0%} of the targeted weights removed",
        "",
        "| method | targeted weights | optimizer | out of the box: ppl | KL | healed: ppl | KL "
        "| healed + int8: ppl | KL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = [*(m for m in methods if m != DENSE), DENSE]  # the dense control last, when it ran
    for method, key_ratio in [(m, None if m == DENSE else ratio) for m in order]:
        rows = [find.get((key_ratio, method, stage)) for stage in ("out of the box", "healed", "healed + int8")]
        if rows[0] is None:
            continue
        weights = int(rows[0]["weights"])  # type: ignore[call-overload]
        label = "dense, trained as long" if method == DENSE else method
        cells = [f"{weights:,} ({1 - weights / dense_weights:.1%} removed)", str(rows[0]["optimizer"])]
        for row in rows:
            cells += [_cell(row, "ppl", 2), _cell(row, "kl", 4)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(records: Sequence[Mapping[str, object]], stage: str = "healed") -> str:
    """Per seed (the same batches), each whole-weight method's ppl and KL minus each SVD baseline's."""
    by = {(r["ratio"], r["method"], r["seed"]): r for r in records if r["stage"] == stage}
    lines = ["| ratio | difference | ppl, per seed | KL, per seed |", "|---|---|---|---|"]
    for ratio, method in dict.fromkeys((q, m) for q, m, _ in by if m in ("espace", "oblique")):
        for baseline in ("svd", "whitened-svd"):
            seeds = [s for q, m, s in by if (q, m) == (ratio, method) and (ratio, baseline, s) in by]
            cells = []
            for key, digits in (("ppl", 2), ("kl", 4)):
                deltas = [float(by[ratio, method, s][key]) - float(by[ratio, baseline, s][key]) for s in seeds]  # type: ignore[arg-type]
                cells.append(" ".join(f"{d:+.{digits}f}" for d in deltas))
            if seeds:
                lines.append(f"| {ratio:g} | {method} − {baseline} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def run_tiny_lm(args: argparse.Namespace) -> tuple[list[dict], int]:
    """Every method at every ratio, and the dense control, on the tiny LM; returns records, dense weights."""
    baseline, _, streams = heal_lm.load(args.lm)
    if args.reuse_optimizer and not (args.lm / train_lm.OPTIMIZER_FILE).is_file():
        raise SystemExit(f"{args.lm} has no {train_lm.OPTIMIZER_FILE}: retrain with samples/train_lm.py")
    schedule = Schedule(args.steps, args.lr, args.reuse_optimizer, args.lm)
    context = Context(baseline, streams["train"], TestWindows(streams["test"], baseline), schedule, args.threads)
    context.int8 = not args.no_int8
    calibration = heal_lm.calibration_batches(streams["train"], seed=0)
    records: list[dict] = []
    for ratio in args.ratios:
        prepared = prepare(baseline, calibration, ratio, args.candidate, args.rank_rule)
        for method in (m for m in args.methods if m != DENSE):
            records += run_method(context, method, prepared, args.seeds)
    if DENSE in args.methods:
        records += run_method(context, DENSE, None, args.seeds)
    return records, inference_weights(baseline, context.targets)


MINILM_METHODS = {"espace": "mse", "oblique": "oblique", "svd": "svd", "whitened-svd": "whitened-svd"}


def _minilm_weights(plan_path: Path) -> tuple[int, int]:
    """Inference weights of the targeted GEMMs as the plan compresses them (L(K+N) per compressed layer, KN
    per dense one), and as they are dense."""
    layers = json.loads(plan_path.read_text())["layers"]
    dense = sum(layer["K"] * layer["N"] for layer in layers)
    compressed = sum(layer["L"] * (layer["K"] + layer["N"]) if layer["selected"] else layer["K"] * layer["N"]
                     for layer in layers)  # fmt: skip
    return compressed, dense


def run_minilm(args: argparse.Namespace) -> tuple[list[dict], int]:
    """MiniLM from the ONNX alone: each method compressed at each ratio (--select none: the same rank L per
    layer for every method), then per seed healed by ``heal_onnx`` (W whole for espace and oblique, the two
    factors for the SVD baselines) with the same steps and schedule, each then quantized to int8; mean
    cosine of the sentence embeddings to the dense model's on the unseen test paragraphs."""
    import onnx

    import espace_export
    from espace_export.heal_onnx import HealOptions, heal_onnx
    from espace_export.io.data import input_specs, read_text

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quantization  # the MiniLM text splits and embeddings

    from samples.export_minilm import minilm_dir

    tokenizer = minilm_dir()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="espace-healing-minilm.") as tmp:
        work = Path(tmp)
        train = work / "train.txt"
        quantization.write_train_text(train, "python")
        _, test = quantization._split_file(work, "test")
        held_out = quantization._sentence_batches(test, tokenizer, 256, 32)
        reference = quantization._embeddings(args.minilm, held_out)
        specs = input_specs(onnx.load(str(args.minilm), load_external_data=False))
        batches = read_text(train, tokenizer, specs, batch_size=16, seq_len=128, max_batches=10**6, rows="documents")

        def score(path: Path) -> dict[str, float]:
            cosines = quantization._cosines(reference, quantization._embeddings(path, held_out))
            return {"cosine": float(cosines.mean()), "cosine_min": float(cosines.min())}

        dense_weights = 0
        for ratio in args.ratios:
            for method in (m for m in args.methods if m in MINILM_METHODS):
                plan = work / f"{method}-{ratio}.plan.json"
                compressed = work / f"{method}-{ratio}.onnx"
                espace_export.compress(args.minilm, output=compressed, plan_path=plan, ratio=ratio,
                                       method=MINILM_METHODS[method], select="none", rank_rule=args.rank_rule,
                                       calib_text=train, tokenizer=tokenizer, num_batches=16, batch_size=4,
                                       seq_len=128, progress=False)  # fmt: skip
                weights, dense_weights = _minilm_weights(plan)
                common = {"ratio": ratio, "method": method, "weights": weights,
                          "optimizer": "AdamW (fresh)",
                          "trained": "factors" if method in ("svd", "whitened-svd") else "weights"}  # fmt: skip
                records.append({**common, "seed": None, "stage": "out of the box", **score(compressed)})
                _say_minilm(records[-1])
                for seed in args.seeds:
                    order = np.random.default_rng(seed).permutation(len(batches))
                    options = HealOptions(steps=args.minilm_steps, lr=args.minilm_lr, start=args.minilm_start,
                                          train=common["trained"], threads=args.threads, teacher_cache=8.0,
                                          shuffle=False)  # the seed orders the batches  # fmt: skip
                    healed = work / f"{method}-{ratio}-{seed}.healed.onnx"
                    tick = time.perf_counter()
                    heal_onnx(args.minilm, plan, [batches[i] for i in order], healed, options)
                    seconds = time.perf_counter() - tick
                    records.append({**common, "seed": seed, "stage": "healed", "seconds": seconds, **score(healed)})
                    _say_minilm(records[-1])
                    if not args.no_int8:
                        quantized = work / f"{method}-{ratio}-{seed}.int8.onnx"
                        quantize_model(healed, quantized, "int8")
                        records.append({**common, "seed": seed, "stage": "healed + int8", **score(quantized),
                                        "file_mb": quantization._file_mb(quantized)})  # fmt: skip
                        _say_minilm(records[-1])
    return records, dense_weights


def _say_minilm(record: Mapping[str, object]) -> None:
    seed = "" if record["seed"] is None else f" seed {record['seed']}"
    took = f" ({record['seconds']:.0f} s healing)" if "seconds" in record else ""
    print(f"[healing] minilm {record['ratio']:g} {record['method']} {record['stage']}{seed}: "
          f"cosine {record['cosine']:.4f} (min {record['cosine_min']:.4f}), {record['weights']:,} weights{took}",
          file=sys.stderr, flush=True)  # fmt: skip


def minilm_table(summary: Sequence[Mapping[str, object]], ratio: float, methods: Sequence[str], dense: int) -> str:
    find = {(r["ratio"], r["method"], r["stage"]): r for r in summary}
    lines = [f"#### MiniLM, ≈{ratio:.0%} of the targeted weights removed", "",
             "| method | targeted weights | trained | out of the box: cosine | healed: cosine | healed + int8: cosine |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for method in methods:
        rows = [find.get((ratio, method, stage)) for stage in ("out of the box", "healed", "healed + int8")]
        if rows[0] is None:
            continue
        weights = int(rows[0]["weights"])  # type: ignore[call-overload]
        trained = "the two factors" if method in ("svd", "whitened-svd") else "W whole"
        cells = [f"{weights:,} ({1 - weights / dense:.1%} removed)", trained]
        cells += [_cell(row, "cosine", 4) for row in rows]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-lm"], choices=["tiny-lm", "minilm"])
    parser.add_argument("--lm", type=Path, default=heal_lm.DEFAULT_LM, help="train_lm.py output directory")
    parser.add_argument("--methods", nargs="+", default=[*METHODS, DENSE], choices=[*METHODS, DENSE])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5], help="fraction of weights removed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training batch orders")
    parser.add_argument("--steps", type=int, default=heal_lm.HealConfig.steps)
    parser.add_argument("--lr", type=float, default=heal_lm.HealConfig.lr)
    parser.add_argument("--reuse-optimizer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--candidate", default="mse", help="ESPACE's candidate (mse, nmse, go-mse, go-mse-l2)")
    parser.add_argument("--rank-rule", default="8", help="pow2 or a granularity (8 tracks the ratios closely)")
    parser.add_argument("--minilm", type=Path, default=Path(__file__).resolve().parents[1] / "samples/out/minilm.onnx")
    parser.add_argument("--minilm-steps", type=int, default=300, help="MiniLM healing steps (batches of 16)")
    parser.add_argument("--minilm-lr", type=float, default=2e-4)
    parser.add_argument("--minilm-start", choices=("least-squares", "none"), default="least-squares")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 export and measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    parser.add_argument("--json", type=Path, default=None, help="write every record and the summary here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer advises pre-processing on every model
    started = time.perf_counter()
    if "minilm" in args.models:
        minilm_records, minilm_dense = run_minilm(args)
        minilm_summary = summarize(minilm_records, ("cosine", "cosine_min"))
        print(f"MiniLM {args.minilm}: healed from the ONNX alone, {args.minilm_steps} steps, lr {args.minilm_lr:g}, "
              f"{args.minilm_start} start, batches of 16 paragraphs (train split + stdlib docstrings), seeds "
              f"{' '.join(map(str, args.seeds))}; mean cosine to the dense model on 256 unseen test paragraphs\n")  # fmt: skip
        for ratio in args.ratios:
            print(minilm_table(minilm_summary, ratio, [m for m in args.methods if m != DENSE], minilm_dense) + "\n")
        if args.json:
            path = args.json.with_name(args.json.stem + ".minilm.json")
            path.write_text(json.dumps({"records": minilm_records, "summary": minilm_summary}, indent=2) + "\n")
    if "tiny-lm" not in args.models:
        print(f"(total {time.perf_counter() - started:.0f} s)")
        return 0
    records, dense_weights = run_tiny_lm(args)
    summary = summarize(records)
    wall = time.perf_counter() - started
    print(
        f"tiny LM {args.lm}: {args.steps} steps, lr {args.lr:g} (warm-up, cosine to 10 %), batch 16×128, "
        f"LM loss, seeds {' '.join(map(str, args.seeds))}, candidate {args.candidate}, rank rule {args.rank_rule}, "
        f"torch threads {torch.get_num_threads()}; test split; KL(dense ‖ model) in nats per token\n"
    )
    for ratio in args.ratios:
        print(table(summary, ratio, args.methods, dense_weights) + "\n")
    differences = paired(records)
    if differences:
        print(f"healed, paired by seed, method minus baseline (seeds {' '.join(map(str, args.seeds))}):\n")
        print(differences + "\n")
    print(f"(total {wall:.0f} s)")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}
        payload = {"settings": settings, "wall_s": wall, "records": records, "summary": summary}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
