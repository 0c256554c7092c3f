"""Calibration cost as a multiple of one plain ONNX Runtime pass over the same batches.

Prints, measured side by side in one run (interleaved, median of repeats):

    calibration / plain pass        the measured ratio
    floor 1 + stats / forward       what the K×K reductions cost at best, from FLOP counts

Statistics FLOPs: one symmetric rank-k update per distinct activation and batch, K(K+1) FLOPs per row
(the L2-normalised sum doubles it when the candidate needs it). Forward FLOPs: 2·K·N per row for every
weight GEMM (heads included) plus the attention products 4·S·hidden per token and layer — the GEMMs that
dominate a transformer forward pass.

    python benchmarks/calibration.py                      # a Llama-style sample made on the spot
    python benchmarks/calibration.py --model m.onnx --candidate nmse
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from espace_export.calibration.statistics import collect_statistics, distinct_activations  # noqa: E402
from espace_export.io.data import complete_feed, input_specs, random_token_batches, vocab_size  # noqa: E402
from espace_export.runtime import ort_session  # noqa: E402
from espace_export.selection.candidates import NORMALIZED_CANDIDATES  # noqa: E402
from graph_passes import find_targets  # noqa: E402


def forward_flops_per_token(model: onnx.ModelProto, seq: int) -> float:
    gemms = find_targets(model, include_heads=True)
    blocks = find_targets(model)
    hidden = max((t.K for t in blocks), key=lambda k: sum(1 for t in blocks if k == t.K))
    layers = max(1, len({t.activation for t in blocks}) // 4)  # Llama/BERT/GPT-2: ~4 distinct inputs per block
    return sum(2.0 * t.K * t.N for t in gemms) + layers * 4.0 * seq * hidden


def stats_flops_per_token(model: onnx.ModelProto, normalized: bool) -> float:
    widths = [K for K, _ in distinct_activations(find_targets(model)).values()]
    return (2 if normalized else 1) * sum(float(K * (K + 1)) for K in widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="ONNX model (default: a Llama-style sample, hidden 512)")
    parser.add_argument("--candidate", default="mse", help="decides whether normalised statistics are collected")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="float32", choices=["float32", "float64"])
    parser.add_argument("--reduce", default="auto", choices=["auto", "graph", "host"], help="where XᵀX is formed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from samples.make_models import export_sample

            path = export_sample("llama", "torchscript", Path(tmp) / "llama.onnx", hidden=512, layers=4, vocab=1024)
        model = onnx.load(str(path))
        specs = input_specs(model)
        vocab = vocab_size(model) or 1000
        batches = random_token_batches(
            specs, vocab, batch_size=args.batch_size, seq_len=args.seq, num_batches=args.batches, seed=0
        )
        targets = find_targets(model)
        normalized = args.candidate in NORMALIZED_CANDIDATES
        plain = ort_session(str(path))
        feeds = [complete_feed(b, specs) for b in batches]

        def plain_pass() -> None:
            for feed in feeds:
                plain.run(None, feed)

        def calibration_pass() -> None:
            collect_statistics(
                ort_session,
                model,
                targets,
                batches,
                precision=args.precision,
                normalized=normalized,
                reduce=args.reduce,
            )

        calibration_pass()  # warm-up both
        plain_pass()
        plain_times, calib_times = [], []
        for _ in range(args.repeats):  # interleaved so machine drift hits both
            start = time.perf_counter()
            plain_pass()
            plain_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            calibration_pass()
            calib_times.append(time.perf_counter() - start)
        floor = 1.0 + stats_flops_per_token(model, normalized) / forward_flops_per_token(model, args.seq)
        ratio = statistics.median(calib_times) / statistics.median(plain_times)
        activations_count = len(distinct_activations(targets))
        print(
            f"model: {path.name}, {len(targets)} targets, {activations_count} distinct activations, "
            f"{args.batches} batches of {args.batch_size}×{args.seq} tokens, candidate {args.candidate}, "
            f"products in {args.precision}"
        )
        print(f"{'calibration / plain pass':<32}{ratio:8.2f}   (median of {args.repeats}, interleaved)")
        print(f"{'floor 1 + stats/forward FLOPs':<32}{floor:8.2f}")
        print(
            f"{'spread (calibration, plain)':<32}  {min(calib_times):.2f}–{max(calib_times):.2f} s, "
            f"{min(plain_times):.2f}–{max(plain_times):.2f} s"
        )


if __name__ == "__main__":
    main()
