"""LLM deployment graph families: GEMMs found, exact-rewrite error at empty and filled past, ratio-0.5 compression.

Runs on the folders samples/export_llm_fixtures.py writes (optimum with-past and merged decoders, onnxruntime-genai
fp32 / int4) and on any extra ``.onnx`` given (an onnxruntime transformers-optimizer encoder, say)::

    python benchmarks/llm_families.py /work/venvs/fixtures [extra.onnx ...]

For each model: weight GEMMs in the graph (MatMul/Gemm/Attention with a 2-D constant weight, If/Loop bodies
included, heads included, quantized ones counted apart), how many :func:`find_targets` found, the largest
relative error of any output (``present.*`` included) after an exact rewrite (``rank`` ≥ K) at past length 0
and at past length 6 (the prefill's cache fed back), and the targeted compression at ``--ratio 0.5`` with a
check that the result runs in ONNX Runtime. A refused model prints its one-line error instead.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from espace_export import EspaceError, compress
from espace_export.folders import resolve_model_folder
from espace_export.io.data import complete_feed, input_specs, is_past_input, vocab_size
from graph_passes.find import find_targets, quantized_gemms, scopes


def weight_gemms(model: onnx.ModelProto) -> int:
    """GEMM nodes (subgraphs included) whose weight is a 2-D float constant of the main graph or their own."""
    count = 0
    for scope in scopes(model):
        producers = {o: n for n in scope.graph.node for o in n.output}
        for node in scope.graph.node:
            if node.op_type not in ("MatMul", "Gemm", "Attention") or len(node.input) < 2:
                continue
            b = node.input[1]
            if b in producers and producers[b].op_type == "Transpose":
                b = producers[b].input[0]
            count += b in scope.constants and len(scope.constants.dims(b)) == 2
    return count


def feeds(model: onnx.ModelProto, session: ort.InferenceSession) -> list[dict[str, np.ndarray]]:
    """A prefill of 6 tokens, and, for decoders, one decode step with the prefill's cache as past."""
    specs = input_specs(model)
    rng = np.random.default_rng(0)
    ids = {s.name: rng.integers(0, vocab_size(model) or 100, size=(2, 6)).astype(s.dtype) for s in specs
           if "input_ids" in s.name}  # fmt: skip
    prefill = complete_feed(ids, specs)
    names = [o.name for o in session.get_outputs()]
    presents = [n for n in names if n.startswith("present")]
    if not presents or not any(is_past_input(s.name) for s in specs):
        return [prefill]
    outputs = dict(zip(names, session.run(None, prefill), strict=True))
    step = {k: v[:, :1] for k, v in ids.items()}
    step |= {n.replace("present", "past_key_values"): outputs[n] for n in presents}
    return [prefill, complete_feed(step, specs)]


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.enable_mem_pattern = False  # genai's fp16 CPU graphs reuse prefill-sized buffers at decode otherwise
    return ort.InferenceSession(str(path), options)


def largest_error(original: Path, compressed: Path, model: onnx.ModelProto) -> list[float]:
    a, b = session(original), session(compressed)
    errors = []
    for feed in feeds(model, a):
        try:
            reference = a.run(None, feed)
        except Exception:  # the original itself fails (genai fp16 CPU graphs at decode): nothing to compare
            errors.append(float("nan"))
            continue
        worst = 0.0
        for x, y in zip(reference, b.run(None, feed), strict=True):
            if np.issubdtype(x.dtype, np.floating) and np.linalg.norm(x) > 0:
                worst = max(worst, float(np.linalg.norm(y.astype(np.float64) - x) / np.linalg.norm(x)))
        errors.append(worst)
    return errors


def measure(path: Path, work: Path) -> str:
    folder = resolve_model_folder(path)
    model = onnx.load(str(folder.model))
    quantized = len(quantized_gemms(model))
    found = sum(1 + len(t.also) for t in find_targets(model, include_heads=True))
    head = f"{path.name:28s} GEMMs {weight_gemms(model) + quantized:3d} (quantized {quantized:2d})  found {found:3d}"
    settings = dict(seq_len=16, num_batches=2, batch_size=2, holdout=0.0)
    try:
        exact = compress(folder.model, rank=4096, include_heads=True, output=work / "exact.onnx", **settings)
        errors = largest_error(folder.model, exact.output, model)
        half = compress(folder.model, ratio=0.5, output=work / "half.onnx", **settings)
        small = session(half.output)
        runs = all(np.isfinite(o).all() for o in small.run(None, feeds(model, small)[0]))
    except EspaceError as exc:
        return f"{head}  refused: {exc}"
    past = " / ".join(f"{e:.1e}" for e in errors)
    return f"{head}  exact err (past 0 / 6) {past}  ratio-0.5 targeted {half.targeted_compression:.3f} runs {runs}"


def main(argv: list[str]) -> int:
    warnings.simplefilter("ignore")
    root = Path(argv[0])
    paths = sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.endswith("-hf") and not p.name.startswith(".")
    )
    paths += [Path(p) for p in argv[1:]]
    for path in paths:
        with tempfile.TemporaryDirectory() as work:
            print(measure(path, Path(work)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
