"""GEMM latency of ESPACE projected pairs against the dense GEMM, at given layer shapes.

Default: Llama-2-7B's block shapes at M = 2048 (one prompt of 2048 tokens), ``--ratio 0.5``, ONNX
Runtime on the CPU. For each shape K→N the rank is the project's rule
(:func:`espace_export.selection.choose_rank`: the largest power of two with L(K+N) ≤ (1−r)KN), the
dense ``X·W`` and the pair ``(X·P)·(PᵀW)`` are timed interleaved, and the ratio is printed beside
the FLOP ratio L(K+N)/(KN). The total weights each shape by its count per Llama block (q, k, v, o:
4 × 4096→4096; gate, up: 2 × 4096→11008; down: 1 × 11008→4096), each GEMM with its own P.

    python benchmarks/gemm.py                               # ORT CPU, all cores
    python benchmarks/gemm.py --threads 1 --optimization basic
    python benchmarks/gemm.py --backend torch-cuda          # FP16 cuBLAS on a GPU (paper's setting)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

from espace_export.deploy.build import BACKENDS, BuildSettings
from espace_export.deploy.profile import GemmGroup, ProfileSettings, gemm_graph, gemm_weights, profile_gemms
from espace_export.errors import EspaceError
from espace_export.selection.ranks import choose_rank

LLAMA2_7B_BLOCK = "4096x4096:4,4096x11008:2,11008x4096:1"
TARGET_SLACK = 0.10  # the target: measured ratio within 10% of the FLOP ratio


def parse_shape_list(text: str) -> list[tuple[int, int, int]]:
    """``4096x4096:4,4096x11008:2`` → ``[(4096, 4096, 4), (4096, 11008, 2)]`` (K, N, count)."""
    shapes = []
    for item in text.split(","):
        dims, _, count = item.partition(":")
        K, N = (int(d) for d in dims.split("x"))
        shapes.append((K, N, int(count or 1)))
    return shapes


def pair_matmuls_after_optimization(K: int, N: int, L: int, M: int, optimization: str) -> int:
    """MatMul-like nodes left in the pair's graph after ONNX Runtime's optimiser (2 = not fused back)."""
    import onnxruntime as ort

    group = GemmGroup(("check",), K, (N,), L)
    model = gemm_graph(group, gemm_weights(group, M), compressed=True)
    levels = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # not the warning about hardware-specific optimised models
        options.graph_optimization_level = levels[optimization]
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    return sum(1 for node in optimized.graph.node if "MatMul" in node.op_type or node.op_type == "Gemm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--M", type=int, default=2048, help="rows (batch × sequence); default 2048")
    parser.add_argument("--ratio", type=float, default=0.5, help="compression ratio for the rank rule")
    parser.add_argument("--shapes", default=LLAMA2_7B_BLOCK, help="KxN:count,... (default: one Llama-2-7B block)")
    parser.add_argument("--backend", default="ort-cpu", choices=BACKENDS)
    parser.add_argument("--dtype", default=None, help="float32 (default on ort-cpu) or float16 (GPU default)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all)")
    parser.add_argument("--optimization", default="all", choices=("none", "basic", "extended", "all"))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = parser.parse_args(argv)

    groups: list[GemmGroup] = []
    for K, N, count in parse_shape_list(args.shapes):
        L = choose_rank(K, N, args.ratio)
        groups += [GemmGroup((f"{K}x{N}#{i}",), K, (N,), L) for i in range(count)]
    settings = ProfileSettings(
        backend=args.backend,
        seq=args.M,
        batch=1,
        warmup=args.warmup,
        repeats=args.repeats,
        gemm_dtype=args.dtype,
        build=BuildSettings(threads=args.threads, optimization=args.optimization),
    )
    if args.backend.startswith("ort"):
        for K, N, _ in parse_shape_list(args.shapes):
            L = choose_rank(K, N, args.ratio)
            if L is not None:
                kept = pair_matmuls_after_optimization(K, N, L, 8, args.optimization)
                print(
                    f"ORT optimiser ({args.optimization}) keeps {kept} GEMM nodes in the {K}→{N} pair (2 = not fused)"
                )
    started = time.perf_counter()
    try:
        gemm = profile_gemms(groups, settings, log=lambda line: print(line, file=sys.stderr))
    except EspaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started

    threads = args.threads or "default (one per core)"
    print(
        f"\nbackend {args.backend}, dtype {gemm['dtype']}, M={args.M}, ratio {args.ratio}, threads {threads}, "
        f"optimization {args.optimization}, {args.warmup} warm-up + {args.repeats} interleaved runs ({elapsed:.0f} s)"
    )
    header = f"{'shape':>14} {'count':>5} {'L':>5} {'orig ms':>9} {'pair ms':>9} {'ratio':>7} {'FLOP ratio':>10} {'target':>7}"
    print(header)
    print("-" * len(header))
    flops_before = flops_after = 0
    for row in gemm["groups"]:
        K, N, L = row["K"], row["N"][0], row["L"]
        flops_before += row["count"] * K * N
        flops_after += row["count"] * (L * (K + N) if L is not None else K * N)
        met = row["ratio"] <= row["flop_ratio"] * (1 + TARGET_SLACK)
        print(
            f"{f'{K}→{N}':>14} {row['count']:>5} {L or '-':>5} {row['original_ms']['median']:>9.1f} "
            f"{row['compressed_ms']['median']:>9.1f} {row['ratio']:>7.3f} {row['flop_ratio']:>10.3f} "
            f"{'met' if met else 'missed':>7}"
        )
    total_flop_ratio = flops_after / flops_before
    met = gemm["ratio"] <= total_flop_ratio * (1 + TARGET_SLACK)
    print(
        f"{'total':>14} {len(groups):>5} {'':>5} {gemm['original_total_ms']:>9.1f} {gemm['compressed_total_ms']:>9.1f} "
        f"{gemm['ratio']:>7.3f} {total_flop_ratio:>10.3f} {'met' if met else 'missed':>7}"
    )
    print(f"target: measured ratio ≤ FLOP ratio × {1 + TARGET_SLACK:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "gemm": gemm}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
