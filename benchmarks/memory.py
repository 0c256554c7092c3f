"""Peak memory of calibration as a multiple of what it must hold.

    budget = peak of plain ONNX Runtime forward passes over the same batches (the weights as the runtime
             holds them plus one batch's activations, attention maps included) + the K×K statistics
    ratio  = (peak RSS during calibration − RSS after imports) / budget        target ≤ 1.5

Every measurement runs in a fresh child process (so peaks of earlier work do not count) on a Llama-style
sample saved with external data, the way large models ship. Both reductions are measured (in-graph and
host). The sizes of the weights and of the GEMM inputs alone are printed for reference.

    python benchmarks/memory.py                 # hidden 1024, 4 layers (≈ 270 MB of weights)
    python benchmarks/memory.py --hidden 2048 --layers 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field. VmHWM (this address space's peak RSS) resets at exec, unlike
    getrusage's ru_maxrss, which Linux carries over from the parent that forked the child."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(model_path: str, batch_size: int, seq: int, batches: int, mode: str) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np  # noqa: F401  (imports count in the baseline, not in the peak)
    import onnxruntime  # noqa: F401

    from espace_export.calibration.statistics import StatisticsSettings, collect_statistics, distinct_activations
    from espace_export.io.data import input_specs, random_token_batches, vocab_size
    from espace_export.io.models import load_model
    from espace_export.runtime import ort_session
    from graph_passes import find_targets

    baseline = status_bytes("VmHWM")
    model = load_model(model_path, load_weights=False)
    targets = find_targets(model)
    specs = input_specs(model)
    data = random_token_batches(
        specs, vocab_size(model) or 1000, batch_size=batch_size, seq_len=seq, num_batches=batches, seed=0
    )
    if mode == "plain":  # what running the model on one batch costs, weights included
        from espace_export.io.data import complete_feed

        session = ort_session(model_path)
        for batch in data:  # the same batches: ONNX Runtime's arena keeps growing after the first run
            session.run(None, complete_feed(batch, specs))
    else:
        collect_statistics(ort_session, model, targets, data, StatisticsSettings(reduce=mode, normalized=False))  # type: ignore[arg-type]
    peak = status_bytes("VmHWM")
    widths = [K for K, _ in distinct_activations(targets).values()]
    activations = sum(batch_size * seq * K * 4 for K in widths)
    statistics = sum(K * K * 8 for K in widths)
    weights = sum(p.stat().st_size for p in Path(model_path).parent.glob("*.data"))
    print(json.dumps({"baseline": baseline, "peak": peak, "weights": weights, "activations": activations,
                      "statistics": statistics}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument(
        "--child", nargs=5, metavar=("MODEL", "BATCH", "SEQ", "BATCHES", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        model, batch, seq, batches, mode = args.child
        child(model, int(batch), int(seq), int(batches), mode)
        return

    sys.path.insert(0, str(ROOT))
    import onnx

    from samples.make_models import export_sample

    with tempfile.TemporaryDirectory() as tmp:
        inline = export_sample("llama", "torchscript", Path(tmp) / "inline.onnx", hidden=args.hidden,
                               layers=args.layers, vocab=args.vocab)  # fmt: skip
        external = Path(tmp) / "ext" / "model.onnx"
        external.parent.mkdir()
        onnx.save_model(onnx.load(str(inline)), str(external), save_as_external_data=True,
                        location="model.onnx.data", size_threshold=1024)  # fmt: skip
        print(f"Llama-style sample: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
              f"{args.batches} batches of {args.batch_size}×{args.seq} tokens")  # fmt: skip
        measured = {}
        for mode in ("plain", "graph", "host"):
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(external), str(args.batch_size), str(args.seq),
                 str(args.batches), mode],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            measured[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        mb = 1 << 20
        plain = measured["plain"]
        forward = plain["peak"] - plain["baseline"]
        budget = forward + plain["statistics"]
        print(f"weights {plain['weights'] / mb:.1f} MB, GEMM inputs of one batch {plain['activations'] / mb:.1f} MB, "
              f"statistics {plain['statistics'] / mb:.1f} MB")  # fmt: skip
        print(f"plain forward passes (peak − base): {forward / mb:.1f} MB;  budget = that + statistics = "
              f"{budget / mb:.1f} MB")  # fmt: skip
        print(f"{'calibration':<14}{'peak − base MB':>16}{'ratio to budget':>17}")
        for mode in ("graph", "host"):
            used = measured[mode]["peak"] - measured[mode]["baseline"]
            print(f"{mode + ' reduce':<14}{used / mb:16.1f}{used / budget:17.2f}")
        print("target: ratio ≤ 1.5")


if __name__ == "__main__":
    main()
