"""What each selection setting costs and buys on one model, side by side: the numbers behind the defaults.

For every setting (``METHOD+SELECT``: the recommended default is ``auto+validate``, ``--fast`` is ``mse+none``)
it compresses the model once with the library's ``compress`` on the same calibration batches and prints the
wall time of the whole run (load, calibration, selection, rewrite, held-out fidelity), the targeted
compression reached against the asked ratio, and the held-out cosine of each output to the original model.
Runs are sequential in one process, in the order given, after one untimed warm-up run; ``--repeats`` runs the list again and prints medians
(and the spread of the times).

    python benchmarks/presets.py --model samples/out/minilm.onnx --calib-text builtin:pydoc \\
        --tokenizer "$(python -c 'from samples.export_minilm import minilm_dir; print(minilm_dir())')"
    python benchmarks/presets.py --model samples/out/tiny-lm/model.onnx --calib-text builtin:pydoc \\
        --tokenizer samples/out/tiny-lm/hf --settings mse+none auto+validate auto+proxy
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from espace_export import pipeline  # noqa: E402

DEFAULT_SETTINGS = ("mse+none", "oblique+none", "oblique+proxy", "oblique+validate", "auto+proxy", "auto+validate")


def measure(model: Path, setting: str, ratio: float, data: dict[str, Any], work: Path) -> dict[str, Any]:
    """One compression with ``setting`` (``METHOD+SELECT``): seconds, targeted compression, cosine per output."""
    method, select = setting.split("+")
    tick = time.perf_counter()
    result = pipeline.compress(
        model, ratio=ratio, method=method, select=select, output=work / f"{method}-{select}.onnx", **data
    )
    seconds = time.perf_counter() - tick
    outputs = result.report["fidelity"]["outputs"]
    return {
        "seconds": seconds,
        "targeted": result.targeted_compression,
        "cosine": {name: values["cosine_mean"] for name, values in outputs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "samples/out/minilm.onnx")
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.5])
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="METHOD+SELECT each")
    parser.add_argument("--calib-text", default=None)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first run cold")
    args = parser.parse_args(argv)
    data = {"calib_text": args.calib_text, "tokenizer": args.tokenizer}
    print(f"{args.model}, calibration {args.calib_text or 'random ids'}, default sizes (16 batches of 4 × 128)")
    print(f"{'ratio':>5}  {'setting':<14} {'seconds':>8} {'spread':>7} {'targeted':>8}  cosine (held out)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.warmup:  # imports, tokenizer and text loading, untimed, so the first row is not inflated
            measure(args.model, "mse+none", args.ratio[0], data, Path(tmp))
        for ratio in args.ratio:
            for setting in args.settings:
                runs = [measure(args.model, setting, ratio, data, Path(tmp)) for _ in range(args.repeats)]
                times = [r["seconds"] for r in runs]
                spread = max(times) - min(times)
                cosine = ", ".join(f"{name} {v:.3f}" for name, v in runs[-1]["cosine"].items())
                print(
                    f"{ratio:>5}  {setting:<14} {statistics.median(times):>8.1f} {spread:>7.1f} "
                    f"{runs[-1]['targeted']:>8.3f}  {cosine}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
