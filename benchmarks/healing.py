"""Healing: ESPACE (static activation projections, weights whole) against weight truncated SVD, on the tiny LM.

Prints, in one run on ``samples/out/tiny-lm`` (``python samples/train_lm.py`` makes it), validation and
test perplexity of:

    baseline                      the trained dense model
    baseline + N steps            the dense model trained N more steps (control: how much is just more training)
    ESPACE r, out of the box      P calibrated on train windows, no retraining
    ESPACE r, healed N steps      retrained through the static P, every weight trainable
    SVD r, out of the box         each block GEMM W (K×N) replaced by A (K×L)·B (L×N) from its truncated SVD
    SVD r, healed N steps         A and B retrained

for each ratio r. ESPACE and SVD use the same L per layer, so the same L(K+N) weights at inference.
Every retraining is ``train_lm``'s loop with the same steps, batches (same seed), learning rate schedule
and a fresh AdamW (``train_lm`` keeps no optimizer state to reuse, so ESPACE's §2.2 advantage of
loading the baseline's optimizer state is not exercised here).

    python benchmarks/healing.py --steps 200 --lr 5e-4
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from espace_export import heal  # noqa: E402
from samples import heal_lm  # noqa: E402


class TruncatedSVDLinear(nn.Module):
    """``y = B(A x) + b``: the rank-L truncated SVD of a dense ``nn.Linear`` (weight N×K), both factors trainable."""

    def __init__(self, dense: nn.Linear, L: int) -> None:
        super().__init__()
        U, S, Vh = torch.linalg.svd(dense.weight.detach().double(), full_matrices=False)
        root = S[:L].sqrt()
        self.first = nn.Linear(dense.in_features, L, bias=False)
        self.second = nn.Linear(L, dense.out_features, bias=dense.bias is not None)
        with torch.no_grad():
            self.first.weight.copy_(root[:, None] * Vh[:L])
            self.second.weight.copy_(U[:, :L] * root)
            if dense.bias is not None:
                self.second.bias.copy_(dense.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def factorize(model: nn.Module, ranks: dict[str, int]) -> tuple[int, int]:
    """Replace each named ``nn.Linear`` by its truncated SVD at that rank; returns targeted weights before/after."""
    before = after = 0
    for name, L in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, child)
        assert type(dense) is nn.Linear, f"{name}: only nn.Linear is factorized here"
        setattr(parent, child, TruncatedSVDLinear(dense, L))
        before += dense.in_features * dense.out_features
        after += L * (dense.in_features + dense.out_features)
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", type=Path, default=heal_lm.DEFAULT_LM, help="train_lm.py output directory")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.2])
    parser.add_argument("--steps", type=int, default=heal_lm.HealConfig.steps)
    parser.add_argument("--lr", type=float, default=heal_lm.HealConfig.lr)
    parser.add_argument("--candidate", default="mse")
    parser.add_argument("--rank-rule", default="8", help="pow2 or a granularity (8 tracks the ratios closely)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = heal_lm.HealConfig(args.steps, args.lr, args.seed)
    baseline, _, streams = heal_lm.load(args.lm)
    calibration = heal_lm.calibration_batches(streams["train"], seed=args.seed)
    rows: list[tuple[str, str, dict[str, float], float | None]] = []

    def record(label: str, params: str, model: nn.Module, seconds: float | None = None) -> None:
        rows.append((label, params, heal_lm.perplexities(model, streams), seconds))
        ppl = rows[-1][2]
        print(
            f"[healing] {label:<34} {params:>20}  val {ppl['validation']:8.2f}  test {ppl['test']:8.2f}",
            file=sys.stderr,
        )

    dense_params = heal.targeted_parameters(baseline)[0]
    record("baseline", f"{dense_params:,}", baseline)
    control = copy.deepcopy(baseline)
    record(
        f"baseline + {args.steps} steps",
        f"{dense_params:,}",
        control,
        heal_lm.heal_steps(control, streams["train"], config),
    )

    for ratio in args.ratios:
        espace = copy.deepcopy(baseline)
        projections = heal.calibrate(
            espace, calibration, ratio=ratio, candidate=args.candidate, rank_rule=args.rank_rule
        )
        heal.attach_projections(espace, projections)
        before, after = heal.targeted_parameters(espace)
        params = f"{after:,} ({1 - after / before:.1%})"
        record(f"ESPACE {ratio:g}, out of the box", params, espace)
        record(f"ESPACE {ratio:g}, healed", params, espace, heal_lm.heal_steps(espace, streams["train"], config))

        svd = copy.deepcopy(baseline)
        factored_before, factored_after = factorize(svd, {name: P.shape[1] for name, P in projections.items()})
        assert before - factored_before + factored_after == after  # the same weight count as ESPACE
        record(f"SVD {ratio:g}, out of the box", params, svd)
        record(f"SVD {ratio:g}, healed", params, svd, heal_lm.heal_steps(svd, streams["train"], config))

    print(
        f"\ntiny LM {args.lm}: {args.steps} healing steps, lr {args.lr:g} (warm-up, cosine to 10 %), batch 16×128, "
        f"candidate {args.candidate}, rank rule {args.rank_rule}, seed {args.seed}, torch threads {torch.get_num_threads()}\n"
    )
    print("| model | block GEMM weights (compression) | val ppl | test ppl | heal time |")
    print("|---|---|---|---|---|")
    for label, params, ppl, seconds in rows:
        timing = f"{seconds:.0f} s" if seconds is not None else ""
        print(f"| {label} | {params} | {ppl['validation']:.2f} | {ppl['test']:.2f} | {timing} |")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
