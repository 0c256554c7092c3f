"""Where a healing step's time goes (issue 13): ``espace-export heal``'s student, one step at a time.

Builds the healing student of ``heal`` (:class:`espace_export.heal_onnx._Student`: the interpreted graph with
the plan's pairs, the teacher in ONNX Runtime) for MODEL through PLAN on batches of TEXT read the way the
heal command reads them, then times ``--steps`` training steps on batches spread over the whole text (not the
first, short ones), the teacher's outputs computed beforehand (as in every pass after the first). Prints
the mean, median and p10–p90 of a step, and with ``--profile`` torch's per-operator table of the last steps.

    TOK=$(python -c 'from samples.export_minilm import minilm_dir; print(minilm_dir())')
    python benchmarks/heal_step.py samples/out/minilm.onnx PLAN.json --text /tmp/h6/train.txt --tokenizer $TOK
    python benchmarks/heal_step.py ... --autocast off          # float32 beside the bf16 default
    python benchmarks/heal_step.py ... --profile 10            # the operators of the last 10 steps

Machines here are noisy: compare settings on an idle machine, one right after the other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--text", required=True)
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-batches", type=int, default=100000)
    parser.add_argument("--steps", type=int, default=40, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--autocast", default="bf16", choices=("bf16", "off"))
    parser.add_argument("--train", default="factors", choices=("factors", "weights"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compare",
        choices=("elementwise",),
        help="time the steps with this setting on and off, alternating rounds in one process "
        "(elementwise: TorchGraph.low_precision_elementwise)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --compare")
    parser.add_argument("--profile", type=int, default=0, help="profile the last N steps by operator")
    parser.add_argument("--shapes", action="store_true", help="with --profile: by operator and input shapes")
    args = parser.parse_args()

    from espace_export.heal import load_projections
    from espace_export.heal_onnx import _Student, train_step
    from espace_export.io.data import complete_feed, input_specs, load_batches
    from espace_export.io.models import load_model
    from espace_export.options import DataOptions

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    data = DataOptions(calib_text=args.text, tokenizer=args.tokenizer, text_rows="documents",
                       batch_size=args.batch_size, num_batches=args.num_batches, holdout=0.0)  # fmt: skip
    batches = load_batches(model, data).calibration
    specs = input_specs(model)
    picks = np.linspace(0, len(batches) - 1, args.steps + 3).round().astype(int)
    feeds = [complete_feed(dict(batches[i]), specs) for i in picks]
    tokens = [int(f["attention_mask"].sum()) if "attention_mask" in f else f["input_ids"].size for f in feeds]
    print(f"{len(batches)} batches in the text; timing {args.steps} spread over it, "
          f"{statistics.mean(tokens[3:]):.0f} tokens a batch on average", file=sys.stderr)  # fmt: skip

    projections = load_projections(args.plan, args.train == "factors")
    lower = args.autocast == "bf16"

    student = _Student(model, projections, True, args.train)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, eps=1e-7)
    targets = [student.teacher(feed, True) for feed in feeds]

    def step(i: int) -> float:
        started = time.perf_counter()
        train_step(student, optimizer, feeds[i], targets[i], "distill", 1.0, lower)  # what heal runs
        return time.perf_counter() - started

    if args.compare == "elementwise":

        def switch(on: bool) -> Callable[[int], float]:
            student.graph.low_precision_elementwise = on
            return step

        compare(args, switch)
        return
    times = steps(step, args.steps, args.profile, args.shapes)
    ms = sorted(1000 * t for t in times)
    p10, p90 = ms[len(ms) // 10], ms[(9 * len(ms)) // 10]
    print(f"step ({args.autocast}, train {args.train}, {args.threads} threads): mean "
          f"{statistics.mean(ms):.0f} ms, median {statistics.median(ms):.0f} ms, p10–p90 {p10:.0f}–{p90:.0f} ms "
          f"over {len(ms)} steps")  # fmt: skip


def compare(args: argparse.Namespace, setting: Callable[[bool], Callable[[int], float]]) -> None:
    """Rounds of all timed steps with ``--compare``'s setting on, then off (``setting(on)`` gives the step
    function); per setting, the mean step of each round, and the ratio off/on of the rounds' medians."""
    means: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (True, False):
            means[on].append(1000 * statistics.mean(steps(setting(on), args.steps, 0, False)))
    for on in (True, False):
        print(f"{args.compare} {'on' if on else 'off'}: mean step per round " +
              ", ".join(f"{m:.0f}" for m in means[on]) + " ms")  # fmt: skip
    print(f"off / on (median of rounds): {statistics.median(means[False]) / statistics.median(means[True]):.3f}")


def steps(step: Callable[[int], float], count: int, profiled: int, shapes: bool) -> list[float]:
    """Times ``count`` steps after 3 untimed ones, the last ``profiled`` under torch's profiler."""
    for i in range(3):
        step(i)
    plain = count - profiled
    times = [step(i) for i in range(3, 3 + plain)]
    if profiled:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
            times += [step(i) for i in range(3 + plain, 3 + count)]
        averages = prof.key_averages(group_by_input_shape=shapes)
        print(averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=30))
    return times


if __name__ == "__main__":
    main()
