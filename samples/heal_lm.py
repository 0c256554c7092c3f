"""Heal the tiny LM of ``train_lm.py``: calibrate ESPACE projections on it, retrain through them, export.

The paper's path (§2.2): project every block GEMM's input onto a static P calibrated from activation
statistics, retrain with every weight trainable and dropout off, then fold to ``(X·P)·(PᵀW)`` for inference.

Steps, each printed with its validation perplexity:

1. load ``samples/out/tiny-lm`` (``train_lm.py`` makes it) and its train/validation/test token streams;
2. calibrate P per layer on windows of the train stream (:func:`espace_export.heal.calibrate`, L from
   ``--ratio``) and attach them (:func:`espace_export.heal.attach_projections`);
3. heal ``--steps`` steps — with ``train_lm``'s own loop (AdamW, warm-up then cosine decay, a fresh
   optimizer here; ``train_lm`` saves its AdamW state in ``optimizer.pt`` and ``benchmarks/healing.py``
   shows healing from it with ``train_lm.load_optimizer``) or, with ``--trainer``, with transformers'
   ``Trainer``;
4. export ``model.espace.onnx`` (the dense TorchScript export of ``train_lm``, rewritten with the same P)
   and check its logits against the healed PyTorch model.

Output directory (default ``samples/out/tiny-lm-heal-<ratio>/``)::

    hf/                    the healed weights W (save_pretrained; same keys as the dense model) + tokenizer
    projections.npz        layer name → P (attach_projections(model, path) projects a reloaded model again)
    model.espace.onnx      the compressed graph, tagged like espace-export's own output
    metrics.json           perplexities, compression, timings, export check

Usage::

    python samples/train_lm.py                          # once, ~2 minutes on 2 idle cores
    python samples/heal_lm.py --ratio 0.5 --steps 200   # a few minutes on 2 cores
    python samples/heal_lm.py --ratio 0.2 --steps 200 --trainer
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from espace_export import heal  # noqa: E402
from espace_export.errors import EspaceError  # noqa: E402
from samples import train_lm  # noqa: E402

DEFAULT_LM = train_lm.DEFAULT_OUT


@dataclasses.dataclass(frozen=True)
class HealConfig:
    """How long and how fast to heal; batches are ``train_lm``'s (16 windows of 128 tokens)."""

    steps: int = 200
    lr: float = 5e-4
    seed: int = 0

    def lm_config(self, base: train_lm.LMConfig) -> train_lm.LMConfig:
        return dataclasses.replace(base, lr=self.lr, warmup_steps=max(1, min(30, self.steps // 10)))


def load(lm_dir: str | os.PathLike[str] = DEFAULT_LM) -> tuple[torch.nn.Module, object, dict[str, np.ndarray]]:
    """The trained LM (eval mode, dropout off), its tokenizer and its token streams by split."""
    lm_dir = pathlib.Path(lm_dir)
    if not (lm_dir / "hf").is_dir():
        raise EspaceError(f"no trained LM in {lm_dir}", "run python samples/train_lm.py first (or pass --lm DIR)")
    import transformers

    transformers.logging.disable_progress_bar()
    model, tokenizer = train_lm.load_lm(lm_dir)
    heal.disable_dropout(model)
    streams = {split: train_lm.token_stream(train_lm.load_split(lm_dir, split), tokenizer) for split in train_lm.SPLITS}
    return model, tokenizer, streams


def calibration_batches(
    stream: np.ndarray, *, num_batches: int = 16, batch_size: int = 8, seq_len: int = 128, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Random windows of the train stream, as ``model(**batch)`` keyword arguments (no padding)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(num_batches):
        starts = rng.integers(0, len(stream) - seq_len, size=batch_size)
        ids = torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def perplexities(model: torch.nn.Module, streams: Mapping[str, np.ndarray], seq_len: int = 128) -> dict[str, float]:
    return {split: train_lm.perplexity(model, streams[split], seq_len) for split in ("validation", "test")}


def heal_steps(model: torch.nn.Module, stream: np.ndarray, config: HealConfig) -> float:
    """Retrain ``model`` in place for ``config.steps`` steps with ``train_lm``'s loop; returns seconds."""
    started = time.perf_counter()
    train_lm._train(
        model, stream, config.lm_config(train_lm.LMConfig()), minutes=math.inf, steps=config.steps, seed=config.seed
    )
    return time.perf_counter() - started


def heal_with_trainer(model: torch.nn.Module, stream: np.ndarray, config: HealConfig, out_dir: pathlib.Path) -> float:
    """The same retraining through transformers' ``Trainer`` (needs ``accelerate``); returns seconds."""
    from transformers import Trainer, TrainingArguments

    lm = config.lm_config(train_lm.LMConfig())
    rng = np.random.default_rng(config.seed)
    starts = rng.integers(0, len(stream) - lm.seq_len - 1, size=config.steps * lm.batch_size)
    rows = [torch.from_numpy(stream[s : s + lm.seq_len + 1].copy()) for s in starts]
    dataset = [{"input_ids": row, "labels": row} for row in rows]  # the model shifts the labels
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        max_steps=config.steps,
        per_device_train_batch_size=lm.batch_size,
        learning_rate=lm.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=lm.warmup_steps,
        weight_decay=lm.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        seed=config.seed,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=50,
        disable_tqdm=True,
    )
    started = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=dataset).train()
    model.eval()
    return time.perf_counter() - started


def export_and_check(model: torch.nn.Module, stream: np.ndarray, output: pathlib.Path) -> dict[str, float]:
    """Write the compressed graph and compare its logits with the healed model's on two windows."""
    import onnxruntime as ort

    heal.export_onnx(model, output, train_lm.export_onnx)
    ids = np.stack([stream[:128], stream[128:256]])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    return {
        "max_abs_diff": float(np.abs(got - want).max()),
        "relative_l2": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
    }


def heal_lm(
    lm_dir: str | os.PathLike[str] = DEFAULT_LM,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    ratio: float = 0.5,
    config: HealConfig | None = None,
    candidate: str = "mse",
    rank_rule: str = "8",
    trainer: bool = False,
) -> dict[str, object]:
    """Calibrate, heal and export the tiny LM; returns (and writes) the metrics."""
    config = config or HealConfig()
    out = pathlib.Path(out_dir) if out_dir else pathlib.Path(lm_dir).parent / f"tiny-lm-heal-{ratio:g}"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model, tokenizer, streams = load(lm_dir)
    metrics: dict[str, object] = {
        "ratio": ratio,
        "candidate": candidate,
        "rank_rule": rank_rule,
        **dataclasses.asdict(config),
    }
    metrics["baseline"] = perplexities(model, streams)
    _say("baseline", metrics["baseline"])

    started = time.perf_counter()
    projections = heal.calibrate(
        model,
        calibration_batches(streams["train"], seed=config.seed),
        ratio=ratio,
        candidate=candidate,
        rank_rule=rank_rule,
    )
    heal.attach_projections(model, projections)
    metrics["calibrate_s"] = round(time.perf_counter() - started, 2)
    before, after = heal.targeted_parameters(model)
    metrics["targeted_params"] = {"before": before, "after": after, "compression": round(1 - after / before, 4)}
    metrics["out_of_the_box"] = perplexities(model, streams)
    _say(f"ESPACE {1 - after / before:.1%} of the block GEMMs, before healing", metrics["out_of_the_box"])

    seconds = (
        heal_with_trainer(model, streams["train"], config, out)
        if trainer
        else heal_steps(model, streams["train"], config)
    )
    metrics["heal_s"] = round(seconds, 1)
    metrics["healed"] = perplexities(model, streams)
    _say(
        f"after {config.steps} healing steps ({'Trainer' if trainer else 'train_lm loop'}, {seconds:.0f} s)",
        metrics["healed"],
    )

    model.save_pretrained(out / "hf")  # type: ignore[operator]  # W only: P is not in the state_dict
    tokenizer.save_pretrained(out / "hf")  # type: ignore[attr-defined]
    heal.save_projections(heal.projections_of(model), out / "projections.npz")
    metrics["export_check"] = export_and_check(model, streams["validation"], out / "model.espace.onnx")
    print(
        f"[heal_lm] exported {out / 'model.espace.onnx'}: logits vs PyTorch {metrics['export_check']}", file=sys.stderr
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _say(what: str, ppl: object) -> None:
    assert isinstance(ppl, dict)
    print(f"[heal_lm] {what}: perplexity validation {ppl['validation']:.2f}, test {ppl['test']:.2f}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", type=pathlib.Path, default=DEFAULT_LM, help="train_lm.py output directory")
    parser.add_argument("-o", "--out", type=pathlib.Path, default=None, help="default: <lm>/../tiny-lm-heal-<ratio>")
    parser.add_argument("--ratio", type=float, default=0.5, help="target compression of each block GEMM")
    parser.add_argument("--candidate", default="mse", help="mse, nmse, go-mse or go-mse-l2")
    parser.add_argument("--rank-rule", default="8", help="pow2, or a granularity such as 8 or 16")
    parser.add_argument("--steps", type=int, default=HealConfig.steps)
    parser.add_argument("--lr", type=float, default=HealConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--trainer", action="store_true", help="heal with transformers' Trainer")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        heal_lm(
            args.lm,
            args.out,
            ratio=args.ratio,
            config=HealConfig(args.steps, args.lr, args.seed),
            candidate=args.candidate,
            rank_rule=args.rank_rule,
            trainer=args.trainer,
        )
    except EspaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
