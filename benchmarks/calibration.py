"""Calibration cost as a multiple of one plain ONNX Runtime pass over the same batches.

Prints, measured side by side in one run (interleaved, median of repeats):

    calibration / plain pass        the measured ratio
    floor 1 + stats / forward       what the K×K reductions cost at best, from FLOP counts

Statistics FLOPs: one symmetric rank-k update per distinct activation and batch, K(K+1) FLOPs per row
(the L2-normalised sum doubles it when the candidate needs it). Forward FLOPs: 2·K·N per row for every
weight GEMM (heads included) plus the attention products 4·S·hidden per token and layer — the GEMMs that
dominate a transformer forward pass.

With ``--gradients`` it also times the NL-MSE gradient path (:func:`collect_gradient_statistics`:
forward + backward through the ONNX graph in torch + the ``XᵀX GᵀG/M²`` reductions) against one torch
forward pass and one torch forward+backward pass (to the same activations, the backward the gradient
path runs) over the same batches, beside its FLOP floor: 1 + stats/(forward + backward) FLOPs, the
backward to activations counted as one forward (input gradients only, no weight gradients); the
reduction's FLOPs per row are ``4MK + 2K²`` (or ``4K² + 2K³/M`` when cheaper) per distinct activation,
twice that with the L2-normalised sum. They run in ``--grad-precision`` (float64 by default, where a FLOP
costs about twice a float32 one on a CPU). The last line is what ``calibrate --method auto`` pays
(ONNX Runtime statistics + gradient path) per torch forward+backward.

    python benchmarks/calibration.py                      # a Llama-style sample made on the spot
    python benchmarks/calibration.py --model m.onnx --candidate nmse
    python benchmarks/calibration.py --model minilm.onnx --candidate nmse --gradients \
        --batches 16 --batch-size 4 --seq 128 --text builtin:pydoc --tokenizer TOKDIR
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from espace_export.calibration.statistics import (  # noqa: E402
    StatisticsSettings,
    StatsPrecision,
    collect_statistics,
    distinct_activations,
)
from espace_export.io.data import complete_feed, input_specs, random_token_batches, read_text, vocab_size  # noqa: E402
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


def gradient_flops_per_token(model: onnx.ModelProto, seq: int, normalized: bool) -> float:
    """``Σᵢ XᵢᵀXᵢ GᵢᵀGᵢ/M²`` per row, by the cheaper association (see espace_export.calibration.gradients)."""
    widths = [K for K, _ in distinct_activations(find_targets(model)).values()]
    per_row = sum(min(4.0 * seq * K + 2.0 * K * K, 4.0 * K * K + 2.0 * K**3 / seq) for K in widths)
    return (2 if normalized else 1) * per_row


def torch_passes(model: onnx.ModelProto, feeds: list[dict]) -> tuple[Callable[[], None], Callable[[], None]]:
    """One torch forward pass over ``feeds``, and one forward+backward to the targeted activations."""
    import torch

    from espace_export.calibration.gradients import _graph_forward, output_loss, resolve_loss
    from espace_export.calibration.onnx_torch import TorchGraph

    graph = TorchGraph(model)
    watched = set(distinct_activations(find_targets(model)))
    kind = resolve_loss(model, "auto")

    def forward() -> None:
        with torch.no_grad():
            for feed in feeds:
                graph.run(feed)

    def forward_backward() -> None:
        for index, feed in enumerate(feeds):
            output, tracked = _graph_forward(graph, watched)(feed)
            torch.autograd.grad(output_loss(kind, output, feed, index), list(tracked.values()), allow_unused=True)

    return forward, forward_backward


def timed(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Each callable once untimed, then ``repeats`` interleaved rounds (machine drift hits all alike)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


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
    parser.add_argument("--gradients", action="store_true", help="also time the NL-MSE gradient path (torch)")
    parser.add_argument(
        "--grad-precision", nargs="+", default=["float64"], choices=["float32", "float64"], help="one timing each"
    )
    parser.add_argument("--text", help="calibration text (or builtin:pydoc) instead of random ids; needs --tokenizer")
    parser.add_argument("--tokenizer", type=Path, help="HuggingFace tokenizer directory for --text")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from samples.make_models import export_sample

            path = export_sample("llama", "torchscript", Path(tmp) / "llama.onnx", hidden=512, layers=4, vocab=1024)
        model = onnx.load(str(path))
        specs = input_specs(model)
        vocab = vocab_size(model) or 1000
        if args.text:
            batches = read_text(
                args.text, args.tokenizer, specs, batch_size=args.batch_size, seq_len=args.seq, max_batches=args.batches
            )
        else:
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
                StatisticsSettings(precision=args.precision, normalized=normalized, reduce=args.reduce),
            )

        runs: dict[str, Callable[[], None]] = {"plain": plain_pass, "calibration": calibration_pass}
        if args.gradients:
            from espace_export.calibration.gradients import GradientSettings, collect_gradient_statistics

            forward, forward_backward = torch_passes(model, feeds)

            def gradient_pass(precision: StatsPrecision) -> Callable[[], None]:
                def run() -> None:
                    collect_gradient_statistics(
                        model,
                        targets,
                        batches,
                        GradientSettings(normalized=normalized, precision=precision),
                        specs=specs,
                    )

                return run

            runs |= {"torch forward": forward, "torch forward+backward": forward_backward}
            runs |= {f"gradients {p}": gradient_pass(cast(StatsPrecision, p)) for p in args.grad_precision}
        times = timed(runs, args.repeats)
        median = {name: statistics.median(values) for name, values in times.items()}
        forward_flops = forward_flops_per_token(model, args.seq)
        floor = 1.0 + stats_flops_per_token(model, normalized) / forward_flops
        activations_count = len(distinct_activations(targets))
        print(
            f"model: {path.name}, {len(targets)} targets, {activations_count} distinct activations, "
            f"{len(batches)} batches of {args.batch_size}×{args.seq} tokens "
            f"({'text ' + args.text if args.text else 'random ids'}), candidate {args.candidate}, "
            f"products in {args.precision}"
        )
        rows = [
            ("calibration / plain pass", median["calibration"] / median["plain"], f"median of {args.repeats}"),
            ("floor 1 + stats/forward FLOPs", floor, ""),
        ]
        if args.gradients:
            forward_time, forward_backward_time = median["torch forward"], median["torch forward+backward"]
            grad_floor = 1.0 + gradient_flops_per_token(model, args.seq, normalized) / (2 * forward_flops)
            rows += [
                ("torch fwd+bwd / torch forward", forward_backward_time / forward_time, ""),
                ("floor 1 + grad stats/(fwd+bwd)", grad_floor, "FLOPs"),
            ]
            for precision in args.grad_precision:
                gradients = median[f"gradients {precision}"]
                rows += [
                    ("gradients / torch forward", gradients / forward_time, f"products in {precision}"),
                    ("gradients / torch fwd+bwd", gradients / forward_backward_time, f"products in {precision}"),
                    (
                        "(calibration + gradients) / fwd+bwd",
                        (median["calibration"] + gradients) / forward_backward_time,
                        f"products in {precision}: what --method auto pays",
                    ),
                ]
        for label, value, note in rows:
            print(f"{label:<38}{value:8.2f}   {note}".rstrip())
        for name, values in times.items():
            print(f"  {name:<36}{statistics.median(values):8.2f} s   ({min(values):.2f}–{max(values):.2f})")


if __name__ == "__main__":
    main()
