"""Compress a Llama-2-7B-shaped decoder under a memory budget: wall time, peak RSS and disk reads per stage.

    python benchmarks/scale.py --layers 2                      # 7B widths, 8 × 2048 tokens, fp16, --ratio 0.5
    python benchmarks/scale.py --layers 4 --tokens 4096 --max-memory 8G --blas-threads 1

The model (hidden 4096, MLP 11008, 32 heads, vocabulary 32000, ``--layers`` blocks; RMSNorm, causal
softmax attention without rotary embeddings, SiLU-gated MLP) is built with ``onnx.helper`` one weight at a
time and streamed into its external data file, so building never holds more than one weight. Each weight
is ``W = Q₁ diag(s) Q₂ᵀ`` with singular values decaying as ``(1+i)^-decay`` (Q₁, Q₂ random signed
permutations followed by an orthonormal DCT, so a 4096×11008 weight costs two FFTs, not a QR), and the
embedding table likewise, so the activations have a decaying spectrum for the projections to find.

Stages, each in a fresh child process (so each peak is its own): ``build`` writes the model under
``--workdir`` (in /tmp, deleted afterwards unless ``--keep``); ``forward`` is one plain ONNX Runtime pass
over the calibration tokens (the unit every stage is divided by); ``compress`` is
:func:`espace_export.streaming.compress_streaming` at ``--ratio`` with ``--method`` under ``--max-memory``;
``check`` runs the output in ONNX Runtime against the original on one sequence. Peak RSS is the child's
``VmHWM``; bytes read are ``/proc/self/io`` ``rchar`` (through read calls, page cache included) and
``read_bytes`` (from the device; 0 when the files are still cached).

``--solver randomized`` (default) decomposes with :func:`espace_export.selection.candidates.randomized_eigh`
(LAPACK's top-1024 of an 11008² matrix takes many minutes on two cores); ``--check-solver`` also runs LAPACK
on the first activation and prints the captured energy. The compress stage prints the resident memory at
each group's start (flat in depth when nothing outlives its group) and its peak against a breakdown: the
interpreter, the largest stage's weights as the runtime holds them, the hidden states, one group's
statistics, the dense matrix handed to the solver and one layer's factors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---- measuring a child --------------------------------------------------------------------------------------


def proc_field(path: str, field: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {path} (Linux only)")


def measurements() -> dict[str, float]:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,  # on a shared machine, less load-dependent than wall time
        "peak_rss": proc_field("/proc/self/status", "VmHWM") * 1024,
        "rchar": proc_field("/proc/self/io", "rchar"),
        "read_bytes": proc_field("/proc/self/io", "read_bytes"),
        "write_bytes": proc_field("/proc/self/io", "wchar"),
    }


# ---- the model ----------------------------------------------------------------------------------------------


def structured_matrix(rng: np.random.Generator, rows: int, cols: int, decay: float, energy: float) -> np.ndarray:
    """A rows×cols float32 matrix with singular values ∝ (1+i)^-decay and squared Frobenius norm ``energy``."""
    from scipy.fft import dct

    rank = min(rows, cols)
    s = (1.0 + np.arange(rank)) ** -decay
    s *= math.sqrt(energy / float(np.sum(s**2)))
    matrix = np.zeros((rows, cols), dtype=np.float32)
    matrix[np.arange(rank), np.arange(rank)] = s
    matrix = matrix[rng.permutation(rows)] * rng.choice([-1.0, 1.0], rows).astype(np.float32)[:, None]
    matrix = dct(matrix, axis=0, norm="ortho", overwrite_x=True)
    matrix = matrix[:, rng.permutation(cols)] * rng.choice([-1.0, 1.0], cols).astype(np.float32)[None, :]
    return np.ascontiguousarray(dct(matrix, axis=1, norm="ortho", overwrite_x=True), dtype=np.float32)


class StreamedInitializers:
    """Initializers written straight to one external data file, page-aligned."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self.file = data_path.open("wb")
        self.offset = 0
        self.tensors: list[Any] = []

    def add(self, name: str, array: np.ndarray) -> str:
        import onnx
        from onnx import numpy_helper

        if array.nbytes < 1024:
            self.tensors.append(numpy_helper.from_array(array, name))
            return name
        pad = -self.offset % 4096
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(np.ascontiguousarray(array).tobytes())
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", self.data_path.name),
            ("offset", str(self.offset)),
            ("length", str(array.nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        self.tensors.append(tensor)
        return name

    def close(self) -> None:
        self.file.close()


def build_model(path: Path, *, layers: int, hidden: int, inter: int, heads: int, vocab: int, dtype: str,
                decay: float, seed: int) -> None:  # fmt: skip
    """Write a Llama-shaped decoder to ``path`` (+ ``path.data``), one weight in memory at a time."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    store = StreamedInitializers(path.with_name(path.name + ".data"))
    nodes: list[Any] = []
    head_dim = hidden // heads
    neg = -1e4 if np_dtype == np.float16 else -1e9  # additive mask, inside the dtype's range

    def const(name: str, value: np.ndarray) -> str:
        return store.add(name, value)

    def node(op: str, inputs: list[str], output: str, name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def linear(layer: str, x: str, k: int, n: int) -> str:
        weight = structured_matrix(rng, k, n, decay, energy=float(n)).astype(np_dtype)
        store.add(f"{layer}.weight", weight)
        del weight
        scope = "/" + layer.replace(".", "/")
        return node("MatMul", [x, f"{layer}.weight"], f"{layer}.out", f"{scope}/MatMul")

    def rms_norm(prefix: str, x: str) -> str:
        gamma = const(f"{prefix}.weight", np.ones(hidden, dtype=np_dtype))
        scope = "/" + prefix.replace(".", "/")
        sq = node("Mul", [x, x], f"{prefix}.sq", f"{scope}/Pow")
        mean = node("ReduceMean", [sq], f"{prefix}.ms", f"{scope}/ReduceMean", axes=[-1], keepdims=1)
        shifted = node(
            "Add", [mean, const(f"{prefix}.eps", np.array(1e-6, dtype=np_dtype))], f"{prefix}.mse", f"{scope}/Add"
        )
        root = node("Sqrt", [shifted], f"{prefix}.rms", f"{scope}/Sqrt")
        normed = node("Div", [x, root], f"{prefix}.n", f"{scope}/Div")
        return node("Mul", [normed, gamma], f"{prefix}.out", f"{scope}/Mul")

    embed = structured_matrix(rng, vocab, hidden, decay, energy=float(vocab)).astype(np_dtype)
    store.add("model.embed_tokens.weight", embed)
    del embed
    h = node("Gather", ["model.embed_tokens.weight", "input_ids"], "h0", "/model/embed_tokens/Gather")
    # additive attention mask [B, 1, S, S]: causal, and padded keys masked out
    shape = node("Shape", ["input_ids"], "ids_shape", "/model/mask/Shape")
    seq = node("Gather", [shape, const("one_index", np.array([1], dtype=np.int64))], "seq1", "/model/mask/Gather")
    square = node("Concat", [seq, seq], "seq_seq", "/model/mask/Concat", axis=0)
    full = node("ConstantOfShape", [square], "neg_full", "/model/mask/ConstantOfShape",
                value=helper.make_tensor("neg", elem, [1], [neg]))  # fmt: skip
    causal = node("Trilu", [full, const("one_k", np.array(1, dtype=np.int64))], "causal", "/model/mask/Trilu", upper=1)
    keep = node("Cast", ["attention_mask"], "mask_f", "/model/mask/Cast", to=elem)
    dropped = node("Sub", [const("one_f", np.array(1, dtype=np_dtype)), keep], "mask_drop", "/model/mask/Sub")
    padding = node("Mul", [dropped, const("neg_f", np.array(neg, dtype=np_dtype))], "mask_pad", "/model/mask/Mul")
    padding4 = node("Unsqueeze", [padding, const("axes_12", np.array([1, 2], dtype=np.int64))], "mask_pad4",
                    "/model/mask/Unsqueeze")  # fmt: skip
    mask = node("Add", [causal, padding4], "attn_mask", "/model/mask/Add")
    split_heads = const("split_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_heads = const("merge_heads", np.array([0, 0, hidden], dtype=np.int64))
    scale = const("attn_scale", np.array(1.0 / math.sqrt(head_dim), dtype=np_dtype))
    for b in range(layers):
        p = f"model.layers.{b}"
        s = f"/model/layers/{b}"
        x = rms_norm(f"{p}.input_layernorm", h)
        q = linear(f"{p}.self_attn.q_proj", x, hidden, hidden)
        k = linear(f"{p}.self_attn.k_proj", x, hidden, hidden)
        v = linear(f"{p}.self_attn.v_proj", x, hidden, hidden)
        q4 = node("Transpose", [node("Reshape", [q, split_heads], f"{p}.q4", f"{s}/attn/Reshape")], f"{p}.qt",
                  f"{s}/attn/Transpose", perm=[0, 2, 1, 3])  # fmt: skip
        k4 = node("Transpose", [node("Reshape", [k, split_heads], f"{p}.k4", f"{s}/attn/Reshape_1")], f"{p}.kt",
                  f"{s}/attn/Transpose_1", perm=[0, 2, 3, 1])  # fmt: skip
        v4 = node("Transpose", [node("Reshape", [v, split_heads], f"{p}.v4", f"{s}/attn/Reshape_2")], f"{p}.vt",
                  f"{s}/attn/Transpose_2", perm=[0, 2, 1, 3])  # fmt: skip
        scores = node("MatMul", [q4, k4], f"{p}.scores", f"{s}/attn/MatMul")
        scores = node("Mul", [scores, scale], f"{p}.scaled", f"{s}/attn/Mul")
        scores = node("Add", [scores, mask], f"{p}.masked", f"{s}/attn/Add")
        probs = node("Softmax", [scores], f"{p}.probs", f"{s}/attn/Softmax", axis=-1)
        context = node("MatMul", [probs, v4], f"{p}.ctx", f"{s}/attn/MatMul_1")
        context = node("Transpose", [context], f"{p}.ctx_t", f"{s}/attn/Transpose_3", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, merge_heads], f"{p}.ctx_m", f"{s}/attn/Reshape_3")
        o = linear(f"{p}.self_attn.o_proj", context, hidden, hidden)
        h1 = node("Add", [h, o], f"{p}.h1", f"{s}/Add")
        x = rms_norm(f"{p}.post_attention_layernorm", h1)
        gate = linear(f"{p}.mlp.gate_proj", x, hidden, inter)
        up = linear(f"{p}.mlp.up_proj", x, hidden, inter)
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.sig", f"{s}/mlp/Sigmoid")], f"{p}.silu", f"{s}/mlp/Mul")
        product = node("Mul", [silu, up], f"{p}.prod", f"{s}/mlp/Mul_1")
        down = linear(f"{p}.mlp.down_proj", product, inter, hidden)
        h = node("Add", [h1, down], f"{p}.h2", f"{s}/Add_1")
    x = rms_norm("model.norm", h)
    logits = linear("lm_head", x, hidden, vocab)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/Identity"))
    store.close()
    graph = helper.make_graph(
        nodes, "llama_shaped",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", elem, ["batch", "seq", vocab])],
        store.tensors,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="espace-bench")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))


# ---- calibration data ------------------------------------------------------------------------------------


def token_batches(tokens: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``tokens`` random ids in sequences of ``seq`` (one sequence per batch, as a long-context calibration)."""
    rng = np.random.default_rng(seed)
    count = max(1, tokens // seq)
    return [
        {"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64), "attention_mask": np.ones((1, seq), np.int64)}
        for _ in range(count)
    ]


# ---- stages (children) --------------------------------------------------------------------------------------


def stage_build(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    build_model(model, layers=args.layers, hidden=args.hidden, inter=args.inter, heads=args.heads, vocab=args.vocab,
                dtype=args.dtype, decay=args.decay, seed=0)  # fmt: skip
    return {"model_bytes": sum(p.stat().st_size for p in model.parent.glob(model.name + "*"))}


def fp32_weight_bytes(args: argparse.Namespace) -> int:
    """Bytes of the model's weights in float32: what ONNX Runtime's CPU provider holds with its graph optimisations
    on (it casts fp16 MatMul weights to float32 and folds the casts: measured 2 × the fp16 file per layer)."""
    block = 4 * args.hidden * args.hidden + 3 * args.hidden * args.inter
    return 4 * (args.layers * block + 2 * args.vocab * args.hidden)


def plain_session(args: argparse.Namespace, path: Path) -> Any:
    """A plain ONNX Runtime CPU session for the unit and the check: all graph optimisations, unless
    ``--ort-optimization none`` (or ``auto`` where the float32 copies of the weights would pass 40 % of RAM):
    then none, so the fp16 weights stay mapped from the data file (page cache) and are cast per run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if unit_optimization(args) == "none":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def unit_optimization(args: argparse.Namespace) -> str:
    if args.ort_optimization != "auto":
        return str(args.ort_optimization)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "none" if args.dtype == "float16" and fp32_weight_bytes(args) > 0.4 * ram else "all"


def stage_forward(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    session = plain_session(args, model)
    loaded = time.perf_counter()
    batches = token_batches(args.tokens, args.seq, args.vocab)
    timed = batches[: args.unit_batches] if args.unit_batches else batches
    for batch in timed:
        session.run(["logits"], batch)
    return {"session_s": loaded - START, "run_s": time.perf_counter() - loaded, "optimization": unit_optimization(args),
            "batches_run": len(timed), "batches": len(batches)}  # fmt: skip


def rss() -> int:
    return proc_field("/proc/self/status", "VmRSS") * 1024


def rss_split() -> tuple[int, int]:
    """Resident anonymous memory (heap, runtime buffers) and file-backed pages (mapped external data, which
    the kernel can drop and re-read: page cache, not a leak), in bytes."""
    return (proc_field("/proc/self/status", "RssAnon") * 1024, proc_field("/proc/self/status", "RssFile") * 1024)


def peak_since_reset() -> int:
    """The peak RSS since the last call (``VmHWM``, then reset through ``/proc/self/clear_refs``)."""
    peak = proc_field("/proc/self/status", "VmHWM") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    return peak


def stage_compress(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from espace_export.memory import parse_memory
    from espace_export.options import RankOptions
    from espace_export.selection.candidates import eigen_decomposition, eigen_solver
    from espace_export.streaming import SESSION_WEIGHT_FACTOR, StreamingSettings, compress_streaming

    baseline = rss()  # interpreter, numpy, onnx, onnxruntime
    checked: dict[str, float] = {}
    per_group: list[dict[str, float]] = []

    decompose_cpu = [0.0]

    def decompose(C: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
        if "calibration_peak" not in per_group[-1]:  # the group's staged pass is over: its peak
            per_group[-1]["calibration_peak"] = peak_since_reset()
            per_group[-1]["anon_after_pass"], per_group[-1]["file_after_pass"] = rss_split()
        tick, wall = time.process_time(), time.perf_counter()
        with eigen_solver(args.solver, device=args.device, precision=args.solver_precision):  # type: ignore[arg-type]
            values, vectors = eigen_decomposition(C, top=L)
        decompose_cpu[0] += time.process_time() - tick
        print(f"    decomposition K={C.shape[0]} L={L}: {time.perf_counter() - wall:.1f} s wall, "
              f"{time.process_time() - tick:.1f} s CPU", file=sys.stderr, flush=True)  # fmt: skip
        if args.check_solver and not checked:
            started = time.perf_counter()
            with eigen_solver("lapack"):
                exact = eigen_decomposition(C, top=L)[0]
            checked.update(lapack_s=time.perf_counter() - started, K=C.shape[0], L=L,
                           captured_energy=float(np.sum((C @ vectors) * vectors) / np.sum(exact)))  # fmt: skip
        return values, vectors

    def on_group(index: int, count: int) -> None:
        now, peak = rss(), proc_field("/proc/self/status", "VmHWM") * 1024
        anon, mapped = rss_split()
        if per_group:  # the previous group's decompositions and rewrite are over: their peak
            per_group[-1]["consume_peak"] = peak_since_reset()
        per_group.append({"rss_at_start": now, "anon_at_start": anon, "file_at_start": mapped, "peak_so_far": peak,
                          "at_s": time.perf_counter() - START})  # fmt: skip
        print(f"  group {index + 1}/{count} at {time.perf_counter() - START:.0f} s: RSS {gib(now)} (anon {gib(anon)}, "
              f"file {gib(mapped)}), peak so far {gib(peak)}", file=sys.stderr, flush=True)  # fmt: skip

    output = model.with_name("compressed.onnx")
    settings = StreamingSettings(
        method=args.method, budget_bytes=parse_memory(args.max_memory), decompose=decompose, on_group=on_group,
        select=args.select,
    )  # fmt: skip
    ranks = RankOptions(ratio=args.ratio, layer_ratio=args.layer_ratio)
    result = compress_streaming(model, output, token_batches(args.tokens, args.seq, args.vocab), ranks, settings)
    per_group[-1]["consume_peak"] = peak_since_reset()  # the last group's, and the copy of the other weights
    info = result.calibration
    widest = max(layer["K"] for layer in result.layers)
    factors = max(  # one layer's P (K×L, float64 while folded) and PᵀW (L×N, the weight's dtype) + W read once
        layer["K"] * layer["L"] * 8 + layer["L"] * layer["N"] * 8 + layer["K"] * layer["N"] * 2
        for layer in result.layers if layer["L"] is not None
    )  # fmt: skip
    return {
        "timings": result.timings,
        "decompose_cpu_s": decompose_cpu[0],
        "groups": len(info.groups),
        "activations_per_group": [len(g.activations) for g in info.groups],
        "peak_statistics_bytes": info.peak_statistics_bytes,
        "peak_boundary_bytes": info.peak_boundary_bytes,
        "targeted_compression": 1 - result.targeted_params_after / result.targeted_params_before,
        "total_params": [result.total_params_before, result.total_params_after],
        "output_bytes": sum(p.stat().st_size for p in output.parent.glob("compressed.onnx*")),
        "solver_check": checked,
        "selection": None
        if result.selection is None
        else {
            "units": len(result.selection["harm"]),
            "chosen": sum(1 for layer in result.layers if layer["L"] is not None),
            "harm_range": [min(result.selection["harm"].values()), max(result.selection["harm"].values())],
        },
        "weight_bytes_read": result.weight_bytes_read,
        "stage_weight_bytes": info.stage_weight_bytes,
        "mse_relative": [layer["mse_relative"] for layer in result.layers if layer["mse_relative"] is not None],
        "per_group": per_group,
        "phases_peak": max(max(g.get("calibration_peak", 0), g.get("consume_peak", 0)) for g in per_group),
        "breakdown": {
            "interpreter and libraries": baseline,
            f"largest stage's weights × {SESSION_WEIGHT_FACTOR:g} (as read + prepacked)": int(
                SESSION_WEIGHT_FACTOR * max(info.stage_weight_bytes)
            ),
            "hidden states between stages (all batches)": info.peak_boundary_bytes,
            "statistics (packed, one group)": info.peak_statistics_bytes,
            "one dense K×K (unpacked for the solver) ×2": 2 * 8 * widest * widest,
            "one layer's factors (P, PᵀW in float64, W)": factors,
        },
    }


def with_depth_outputs(path: Path, layers: int, noise_input: bool) -> tuple[Path, list[str]]:
    """A copy of the graph at ``path`` (same directory, so its external data resolves) that also outputs the
    residual stream after every block; with ``noise_input`` an ``embed_noise`` input is added to the embeddings."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(path), load_external_data=False)
    names = [f"model.layers.{b}.h2" for b in range(layers)]
    elem = next(i for i in proto.graph.initializer if i.name == "model.embed_tokens.weight").data_type
    for name in names:
        proto.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    if noise_input:
        gather = next(n for n in proto.graph.node if n.name == "/model/embed_tokens/Gather")
        gather.output[0] = "h0_clean"
        proto.graph.node.insert(1, helper.make_node("Add", ["h0_clean", "embed_noise"], ["h0"], name="/noise/Add"))
        proto.graph.input.append(helper.make_tensor_value_info("embed_noise", elem, [1, "seq", "hidden"]))
    copy = path.with_name(f"depth_{path.name}")
    copy.write_bytes(proto.SerializeToString())
    return copy, names


def stage_check(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    """Runs the output in ONNX Runtime against the original on one sequence, and follows the error through the
    residual stream block by block; as a control, the original itself fed embeddings perturbed by Gaussian
    noise of relative size ``--check-noise``: how much this random model amplifies any small perturbation.

    Memory: the original runs first and only its outputs are kept, in their own dtype; the control and then the
    compressed model (after the original's session is gone) are compared as they come, one tensor at a time
    in float64 — at 32 layers the old way (every run's outputs as float64, both sessions' peaks) was OOM-killed."""
    batch = token_batches(args.seq, args.seq, args.vocab, seed=1)[0]
    dtype = np.dtype(args.dtype)
    element_rms = 1.0 / math.sqrt(args.hidden)  # build_model gives the embedding rows unit mean norm²
    noise = np.random.default_rng(2).standard_normal((1, args.seq, args.hidden)) * args.check_noise * element_rms
    reference: list[np.ndarray] = []
    compared: dict[str, dict[str, Any]] = {}

    def rows(value: np.ndarray) -> np.ndarray:
        return value.astype(np.float64).reshape(-1, value.shape[-1])

    def compare(values: list[np.ndarray]) -> dict[str, Any]:
        ref, new = rows(reference[0]), rows(values[0])
        cos = np.sum(ref * new, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1))
        depth = [rel(rows(v), rows(r)) for v, r in zip(values[1:], reference[1:], strict=True)]
        return {"finite": bool(np.isfinite(values[0]).all()), "relative_l2": rel(new, ref),
                "cosine_mean": float(cos.mean()), "depth": depth}  # fmt: skip

    runs = ((model, {"original": {**batch, "embed_noise": np.zeros_like(noise, dtype)},
                     "noised": {**batch, "embed_noise": noise.astype(dtype)}}),
            (model.with_name("compressed.onnx"), {"compressed": dict(batch)}))  # fmt: skip
    for path, feeds in runs:
        copy, names = with_depth_outputs(path, args.layers, noise_input=path == model)
        session = plain_session(args, copy)
        copy.unlink()
        for key, feed in feeds.items():
            values = session.run(["logits", *names], feed)
            print(f"  {path.name} ({key}) ran in ONNX Runtime: logits finite {bool(np.isfinite(values[0]).all())}, "
                  f"peak RSS {gib(proc_field('/proc/self/status', 'VmHWM') * 1024)}", file=sys.stderr, flush=True)  # fmt: skip
            if key == "original":
                reference = values
            else:
                compared[key] = compare(values)
            del values  # not held while the next session loads
        del session  # the original's session is released before the compressed one loads
    new, noised = compared["compressed"], compared["noised"]
    return {
        "finite": new["finite"],
        "relative_l2": new["relative_l2"],
        "cosine_mean": new["cosine_mean"],
        "residual_relative_l2": new["depth"],
        "control_noise": args.check_noise,
        "control_relative_l2": noised["depth"],
        "control_logits_relative_l2": noised["relative_l2"],
        "control_cosine_mean": noised["cosine_mean"],
    }


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


STAGES = {"build": stage_build, "forward": stage_forward, "compress": stage_compress, "check": stage_check}
START = time.perf_counter()


def run_child(stage: str, argv: list[str]) -> dict[str, Any]:
    tick = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, *argv, "--child", stage], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:  # the child's stderr (progress, errors) went straight through
        raise SystemExit(f"stage {stage} failed ({done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - tick
    return result


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--decay", type=float, default=1.0, help="singular values ∝ (1+i)^-decay")
    parser.add_argument("--tokens", type=int, default=8 * 2048, help="calibration tokens (default 8 × 2048)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--method", default="mse", choices=["mse", "nmse"])
    parser.add_argument(
        "--select", default="none", choices=["none", "proxy"],
        help="proxy: units at --layer-ratio scored by their calibrated output error, applied until --ratio",
    )  # fmt: skip
    parser.add_argument("--layer-ratio", type=float, help="with --select proxy [default: max(ratio, 0.5)]")
    parser.add_argument("--max-memory", default="50%", help="budget of compress_streaming: 12G, 800M, 50%% of RAM")
    parser.add_argument(
        "--solver",
        choices=["auto", "lapack", "randomized"],
        default="randomized",
        help="eigen solver (espace_export.selection.candidates; randomized = randomized_eigh)",
    )
    parser.add_argument("--solver-precision", choices=["float64", "float32"], default="float64")
    parser.add_argument("--device", default="cpu", help="where the decompositions run: cpu, or cuda / cuda:N (torch)")
    parser.add_argument("--check-solver", action="store_true", help="also run LAPACK on the first activation")
    parser.add_argument(
        "--blas-threads", type=int, help="OpenBLAS/OpenMP threads of the children (ONNX Runtime keeps its own pool)"
    )
    parser.add_argument(
        "--ort-optimization", choices=["auto", "all", "none"], default="auto",
        help="graph optimisations of the forward and check sessions (auto: none where the float32 copies of the "
        "weights would pass 40%% of RAM, e.g. 32 layers on 24 GB)",
    )  # fmt: skip
    parser.add_argument(
        "--unit-batches",
        type=int,
        help="time the forward unit on the first N batches only and "
        "scale it to all of them (a forward pass is linear in batches; saves a long run its hour)",
    )
    parser.add_argument(
        "--check-noise",
        type=float,
        default=0.01,
        help="the check's control: relative size of the Gaussian noise added to the original's embeddings",
    )
    parser.add_argument("--workdir", default="/tmp/espace-scale")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--json", help="write all figures here")
    parser.add_argument("--child", choices=list(STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    model = workdir / "model.onnx"
    if args.child:
        result = STAGES[args.child](args, model)
        phases_peak = int(result.pop("phases_peak", 0))  # the stage reset VmHWM between its phases
        result.update(measurements())
        result["peak_rss"] = max(result["peak_rss"], phases_peak)
        print(json.dumps(result))
        # beside the workdir (which is deleted), so a stage's figures outlive a later stage's failure
        model.parent.with_name(f"{model.parent.name}.{args.child}.json").write_text(json.dumps(result))
        return

    argv = [a for a in sys.argv[1:] if a not in ("--keep",)]
    if "--json" in argv:
        index = argv.index("--json")
        del argv[index : index + 2]
    if args.blas_threads:  # on an oversubscribed machine, threaded LAPACK can run 10× slower than one thread
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.blas_threads)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    figures: dict[str, Any] = {"settings": vars(args)}
    try:
        for stage in ("build", "forward", "compress", "check"):
            print(f"[{time.perf_counter() - START:7.0f} s] {stage} …", file=sys.stderr, flush=True)
            figures[stage] = run_child(stage, argv)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    unit = figures["forward"]
    if unit["batches_run"] < unit["batches"]:  # timed on a prefix of the batches: scale the run to all of them
        scale = unit["batches"] / unit["batches_run"]
        unit["measured"] = {"wall_s": unit["wall_s"], "cpu_s": unit["cpu_s"], "run_s": unit["run_s"]}
        unit["wall_s"] += unit["run_s"] * (scale - 1)
        unit["cpu_s"] *= scale  # the session's load is a small share of its CPU time: a slight overestimate
    forward = figures["forward"]["wall_s"]
    print(f"\nLlama-shaped decoder: {args.layers} layers, hidden {args.hidden}, MLP {args.inter}, {args.dtype}, "
          f"{figures['build']['model_bytes'] / 2**30:.2f} GiB; calibration {args.tokens} tokens "
          f"({max(1, args.tokens // args.seq)} × {args.seq}); --ratio {args.ratio} --method {args.method} "
          f"--max-memory {args.max_memory} --solver {args.solver} --blas-threads {args.blas_threads}; forward and check "
          f"sessions with graph optimisations {figures['forward']['optimization']}")  # fmt: skip
    cpu_forward = figures["forward"]["cpu_s"]
    print(f"{'stage':<10} {'wall':>9} {'× forward':>10} {'CPU':>9} {'× forward':>10} {'peak RSS':>11} "
          f"{'read (rchar)':>13} {'read (device)':>14}")  # fmt: skip
    for stage in ("build", "forward", "compress", "check"):
        f = figures[stage]
        print(f"{stage:<10} {f['wall_s']:>8.1f}s {f['wall_s'] / forward:>10.2f} {f['cpu_s']:>8.1f}s "
              f"{f['cpu_s'] / cpu_forward:>10.2f} {gib(f['peak_rss']):>11} {gib(f['rchar']):>13} "
              f"{gib(f['read_bytes']):>14}")  # fmt: skip
    c = figures["compress"]
    print("compress stages: " + ", ".join(f"{k} {v:.1f}s ({v / forward:.2f}×)" for k, v in c["timings"].items()))
    print(
        f"decompositions: {c['timings']['decompose'] / c['timings']['total']:.1%} of compress wall time, "
        f"{c['decompose_cpu_s'] / c['cpu_s']:.1%} of its CPU time ({c['decompose_cpu_s']:.0f} of {c['cpu_s']:.0f} s)"
    )
    print(f"groups {c['groups']} (activations per group {c['activations_per_group']}); statistics held at once "
          f"{gib(c['peak_statistics_bytes'])}; boundary tensors {gib(c['peak_boundary_bytes'])}; targeted compression "
          f"{c['targeted_compression']:.3f}; output {gib(c['output_bytes'])}")  # fmt: skip
    print(f"weights read by compress: {gib(c['weight_bytes_read'])} (staged sessions {gib(sum(c['stage_weight_bytes']))}, "
          f"largest stage {gib(max(c['stage_weight_bytes']))}); ONNX Runtime maps external data, so rchar misses it")  # fmt: skip
    if c.get("selection"):
        sel = c["selection"]
        print(f"selection (proxy): {sel['chosen']} layers compressed of {sel['units']} units scored; output error "
              f"{sel['harm_range'][0]:.2e} … {sel['harm_range'][1]:.2e}")  # fmt: skip
    mse = c["mse_relative"]
    print(f"dropped activation energy E‖x − PPᵀx‖²/E‖x‖² per layer: mean {np.mean(mse):.3f}, max {np.max(mse):.3f}")
    if c["solver_check"]:
        print(f"solver check: {c['solver_check']}")
    for key, what in (("rss_at_start", "RSS at the start"), ("anon_at_start", "anonymous RSS at the start"),
                      ("file_at_start", "file-backed RSS at the start"), ("calibration_peak", "peak of the staged pass"),
                      ("anon_after_pass", "anonymous RSS after the staged pass"),
                      ("consume_peak", "peak of decompositions + rewrite")):  # fmt: skip
        print(f"{what} of each group: " + ", ".join(gib(g.get(key, 0)) for g in c["per_group"]))
    print(f"compress peak RSS {gib(c['peak_rss'])}; the largest of each part (not all alive at once):")
    for what, size in c["breakdown"].items():
        print(f"  {what:<62} {gib(size):>11}")
    accounted = sum(c["breakdown"].values())
    print(f"  {'sum':<62} {gib(accounted):>11}")
    if unit["batches_run"] < unit["batches"]:
        print(f"forward timed on {unit['batches_run']} of {unit['batches']} batches ({unit['measured']['run_s']:.1f} s "
              f"of runs) and scaled to all of them")  # fmt: skip
    k = figures["check"]
    print(
        f"check: output finite {k['finite']}, logits relative L2 {k['relative_l2']:.3f}, cosine {k['cosine_mean']:.4f}"
    )
    print(f"residual stream after block 1..{args.layers}, relative L2 to the original:")
    print("  compressed:                        " + " ".join(f"{v:.3f}" for v in k["residual_relative_l2"]))
    print(
        f"  original, embeddings + {k['control_noise']:g} noise: "
        + " ".join(f"{v:.3f}" for v in k["control_relative_l2"])
    )
    print(f"  control logits: relative L2 {k['control_logits_relative_l2']:.3f}, cosine {k['control_cosine_mean']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
