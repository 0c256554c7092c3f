"""Latency, the way the paper measures it: GEMM time and time to first token, original vs compressed.

- **GEMM latency.** Every targeted GEMM of the original model, timed at the model's M = batch·sequence,
  against what the compressed model runs in its place, on the chosen backend. The unit is a *GEMM
  group*: the GEMMs that read one activation. Siblings that share one projection (Q, K and V reading
  the same X with one P) run ``T = X·P`` once and then ``T·(PᵀW)`` per sibling, so they are timed
  together, as they execute. Groups of identical shapes are timed once and counted as many times as
  they occur (the report says so). Layers the compression left dense cost the same on both sides.
- **TTFT.** Prefill of one prompt of ``seq`` tokens (batch 1 by default) through the whole graph.

Both compare the two sides *interleaved* in one run (original, compressed, then compressed,
original, ...) after warm-up, so drift of the machine (clocks, other load) hits both alike; medians
and the interquartile range are reported. Beside the measured ratios: the FLOP ratio
``Σ L(K+N) / Σ KN`` (the physical limit of the GEMM ratio) and the Amdahl bound on the TTFT ratio,
``1 − share × (1 − FLOP ratio)``, with ``share`` = original GEMM time / original TTFT of the same run.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from espace_export import __version__
from espace_export._optional import require
from espace_export.deploy.build import (
    GRAPH_BACKENDS,
    BuildSettings,
    Runner,
    build_runner,
    check_backend,
    check_prompt,
    cpu_description,
    load_structure,
    synthetic_feed,
)
from espace_export.deploy.decode import add_decode, decode_markdown, decode_rows, is_decoder, prefill_feed
from espace_export.deploy.tensorrt import cuda_device_name, derive_profile, fixed_profile
from espace_export.errors import EspaceError
from espace_export.io.data import input_specs
from espace_export.io.models import check_distinct_paths, profile_files
from espace_export.io.reports import write_report_files
from graph_passes.find import find_projected_pairs, find_targets

Log = Callable[[str], None]
TORCH_EXTRA = "pip install 'espace-export[torch]'"


@dataclass(frozen=True)
class GemmGroup:
    """GEMMs reading one activation ``X: [M, K]``: ``X·W_i`` originally; ``T = X·P``, ``T·(PᵀW)_i`` compressed.

    ``L`` is None for layers left dense (the same GEMMs on both sides).
    """

    layers: tuple[str, ...]
    K: int
    Ns: tuple[int, ...]
    L: int | None

    @property
    def signature(self) -> tuple[int, int | None, tuple[int, ...]]:
        return (self.K, self.L, self.Ns)

    def flops(self, M: int, *, compressed: bool) -> int:
        """Multiply-adds × 2 of the group at ``M`` rows."""
        if not compressed or self.L is None:
            return 2 * M * self.K * sum(self.Ns)
        return 2 * M * self.L * (self.K + sum(self.Ns))

    @property
    def label(self) -> str:
        n = "+".join(str(n) for n in self.Ns)
        return f"{self.K}→{n}" + (f" (L={self.L})" if self.L is not None else " (dense)")


def gemm_groups(original: onnx.ModelProto, compressed: onnx.ModelProto) -> list[GemmGroup]:
    """The GEMM groups of a compressed model, matched to the original's targets by layer name.

    Pairs come from :func:`graph_passes.find.find_projected_pairs` (node metadata); pairs sharing a
    projection node form one group. Original block GEMMs without a pair stay dense; heads count only
    when they were compressed.

    Raises:
        EspaceError: the compressed model has no pairs, the original already has some, or a pair's
            layer is missing from the original or has other K/N (the two models do not belong together).
    """
    if find_projected_pairs(original):
        raise EspaceError(
            "ORIGINAL already holds ESPACE projected pairs",
            "pass the uncompressed model first, then the compressed one",
        )
    pairs = find_projected_pairs(compressed)
    if not pairs:
        raise EspaceError(
            "COMPRESSED holds no ESPACE projected pairs", "pass the model written by `espace-export compress` second"
        )
    targets = {t.name: t for t in find_targets(original, include_heads=True)}
    by_projection: dict[str, list] = {}
    for pair in pairs:
        target = targets.get(pair.name)
        if target is None or (target.K, target.N) != (pair.K, pair.N):
            found = f"K={target.K}, N={target.N}" if target is not None else "no such layer"
            raise EspaceError(
                f"layer {pair.name!r} of COMPRESSED (K={pair.K}, N={pair.N}) does not match ORIGINAL ({found})",
                "pass the model COMPRESSED was made from as ORIGINAL",
            )
        by_projection.setdefault(pair.project_node, []).append(pair)
    groups: list[GemmGroup] = []
    compressed_names = {pair.name for pair in pairs}
    for members in by_projection.values():
        groups.append(
            GemmGroup(tuple(p.name for p in members), members[0].K, tuple(p.N for p in members), members[0].L)
        )
    for target in targets.values():
        if target.name not in compressed_names and target.role == "block":
            groups.append(GemmGroup((target.name,), target.K, (target.N,), None))
    order = {name: i for i, name in enumerate(targets)}
    return sorted(groups, key=lambda g: order[g.layers[0]])


def distinct_groups(groups: Sequence[GemmGroup]) -> list[tuple[GemmGroup, list[GemmGroup]]]:
    """Groups of identical shapes together: ``(representative, members)`` in first-seen order."""
    merged: dict[tuple[int, int | None, tuple[int, ...]], list[GemmGroup]] = {}
    for group in groups:
        merged.setdefault(group.signature, []).append(group)
    return [(members[0], members) for members in merged.values()]


def flop_ratio(groups: Sequence[GemmGroup], M: int = 1) -> float:
    """``Σ compressed FLOPs / Σ original FLOPs`` over the groups (M cancels)."""
    before = sum(g.flops(M, compressed=False) for g in groups)
    after = sum(g.flops(M, compressed=True) for g in groups)
    return after / before if before else 1.0


# ---------------------------------------------------------------------------------------------- GEMM graphs


def gemm_weights(group: GemmGroup, M: int, dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Random operands of the right shapes: ``X [M,K]``, ``W_i [K,N_i]`` and, when compressed,
    ``P [K,L]`` and ``PtW_i [L,N_i]`` (values do not change GEMM speed; their scale keeps FP16 finite)."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(dtype)

    weights: dict[str, Any] = {
        "X": rng.standard_normal((M, group.K), dtype=np.float32).astype(dtype),
        "W": [normal(group.K, n) for n in group.Ns],
    }
    if group.L is not None:
        weights["P"] = normal(group.K, group.L)
        weights["PtW"] = [normal(group.L, n) for n in group.Ns]
    return weights


def gemm_graph(group: GemmGroup, weights: Mapping[str, Any], *, compressed: bool) -> onnx.ModelProto:
    """One group as a standalone ONNX graph with input ``X``: ``MatMul(X, W_i)``, or
    ``T = MatMul(X, P)`` then ``MatMul(T, PtW_i)`` (the compressed model's own ops)."""
    X = weights["X"]
    elem = helper.np_dtype_to_tensor_dtype(X.dtype)
    M = X.shape[0]
    nodes, initializers = [], []
    if compressed and group.L is not None:
        initializers.append(numpy_helper.from_array(weights["P"], "P"))
        nodes.append(helper.make_node("MatMul", ["X", "P"], ["T"], name="espace_project"))
        source, stored = "T", weights["PtW"]
    else:
        source, stored = "X", weights["W"]
    outputs = []
    for index, matrix in enumerate(stored):
        initializers.append(numpy_helper.from_array(matrix, f"B{index}"))
        nodes.append(helper.make_node("MatMul", [source, f"B{index}"], [f"Y{index}"], name=f"gemm_{index}"))
        outputs.append(helper.make_tensor_value_info(f"Y{index}", elem, [M, matrix.shape[1]]))
    graph = helper.make_graph(
        nodes, "espace_gemm", [helper.make_tensor_value_info("X", elem, [M, X.shape[1]])], outputs, initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="espace-export")
    model.ir_version = 8
    return model


def import_torch() -> Any:
    return require("torch", extra="torch", purpose="--backend torch-cuda")


def require_torch_cuda() -> Any:
    """PyTorch with a visible CUDA device, or an :class:`EspaceError` saying which is missing."""
    torch = import_torch()
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise EspaceError(
            f"--backend torch-cuda needs a CUDA device and PyTorch sees none (torch {torch.__version__}, {build})",
            "run on a machine with an NVIDIA GPU and a CUDA build of PyTorch, or use --backend ort-cpu",
        )
    return torch


def torch_gemm(
    group: GemmGroup, weights: Mapping[str, Any], *, compressed: bool, device: str = "cuda"
) -> tuple[Callable[[], float], Callable[[], list[Any]]]:
    """The group in PyTorch (cuBLAS on CUDA: the paper's "simple, un-optimised implementation").

    Returns ``(once, compute)``: ``once()`` runs the GEMMs into preallocated outputs and returns seconds
    (CUDA events on a GPU, wall clock on the CPU); ``compute()`` returns the outputs, for checks.
    Operands keep the dtype of ``weights`` (FP16 for the GPU measurement).
    """
    torch = import_torch()
    target = torch.device(device)

    def tensor(array: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(array)).to(target)

    X = tensor(weights["X"])
    use_pair = compressed and group.L is not None
    P = tensor(weights["P"]) if use_pair else None
    stored = [tensor(b) for b in (weights["PtW"] if use_pair else weights["W"])]
    T = torch.empty((X.shape[0], group.L), dtype=X.dtype, device=target) if use_pair else None
    outputs = [torch.empty((X.shape[0], b.shape[1]), dtype=X.dtype, device=target) for b in stored]

    def compute() -> list[Any]:
        with torch.inference_mode():
            source = X
            if P is not None:
                torch.matmul(X, P, out=T)
                source = T
            for b, out in zip(stored, outputs, strict=True):
                torch.matmul(source, b, out=out)
        return outputs

    if target.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def once() -> float:
            start.record()
            compute()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) / 1e3

    else:

        def once() -> float:
            tick = time.perf_counter()
            compute()
            return time.perf_counter() - tick

    return once, compute


# ---------------------------------------------------------------------------------------------- timing


def interleave(
    benches: Sequence[Callable[[], float]], *, warmup: int, repeats: int, first_round: int = 0
) -> list[list[float]]:
    """Run each bench ``warmup`` times, then ``repeats`` rounds alternating the order so drift and order
    effects fall on every bench alike: two benches AB BA AB ..., three or more in rotation and then in
    mirrored rotation (ABC BCA CAB ACB CBA BAC ...: none follows itself, and B and C follow A equally
    often). Both matter on a CPU: with ABC CBA the middle bench never ran right after itself and measured
    17 % slower than an identical copy on the ends; with rotations alone B followed A (the large
    original, which evicts the caches) twice as often as C did and measured 2-3 % slower than C.
    Returns seconds per bench per round. ``first_round`` continues the alternation of an earlier call
    (more rounds of the same measurement)."""
    for _ in range(warmup):
        for bench in benches:
            bench()
    times: list[list[float]] = [[] for _ in benches]
    for round_index in range(first_round, first_round + repeats):
        count = len(benches)
        if count <= 2:
            order: Sequence[int] = range(count) if round_index % 2 == 0 else range(count - 1, -1, -1)
        else:  # rotations, then the same mirrored (0 fixed, 1 ↔ count−1, ...): predecessors balance out
            sign = 1 if (round_index // count) % 2 == 0 else -1
            order = [(sign * (round_index + k)) % count for k in range(count)]
        for index in order:
            times[index].append(float(benches[index]()))
    return times


def interleave_until_tight(benches: Sequence[Callable[[], float]], settings: ProfileSettings) -> list[list[float]]:
    """:func:`interleave` for ``settings.repeats`` rounds; then, with ``settings.target_interval`` and two
    or three benches (original, compressed[, reference]), more rounds in growing blocks until the 95 %
    bootstrap interval of each gated ratio (compressed/original, compressed/reference) is within
    ± ``target_interval`` of it (relative), or ``settings.max_repeats`` rounds."""
    times = interleave(benches, warmup=settings.warmup, repeats=settings.repeats)
    target = settings.target_interval
    if target is None or len(benches) not in (2, 3):
        return times

    def widest() -> float:
        return max(_relative_halfwidth(times[other], times[1]) for other in range(len(times)) if other != 1)

    while len(times[0]) < settings.max_repeats and widest() > target:
        # blocks grow with the rounds taken (a quarter more each time): few interval checks on long runs
        block = min(max(settings.repeats, len(times[0]) // 4), settings.max_repeats - len(times[0]))
        more = interleave(benches, warmup=0, repeats=block, first_round=len(times[0]))
        times = [old + new for old, new in zip(times, more, strict=True)]
    return times


def _relative_halfwidth(original: Sequence[float], compressed: Sequence[float]) -> float:
    from espace_export.deploy.gate import GATE_QUANTILE, MIN_ROUNDS, ratio_interval

    if len(original) < MIN_ROUNDS:
        return math.inf
    low, high = ratio_interval(original, compressed, replicates=500)
    ratio = float(np.quantile(compressed, GATE_QUANTILE) / np.quantile(original, GATE_QUANTILE))
    return (high - low) / 2 / ratio


def ratio_spread(original: Sequence[float], compressed: Sequence[float]) -> dict[str, Any]:
    """What the gate compares, beside the ratio of medians: the ratio of each side's fastest-tenth time
    (:data:`espace_export.deploy.gate.GATE_QUANTILE`), its 95 % bootstrap interval, and the rounds taken."""
    from espace_export.deploy.gate import GATE_QUANTILE, MIN_ROUNDS, ratio_interval

    entry: dict[str, Any] = {"rounds": len(original)}
    if len(original) >= MIN_ROUNDS:
        entry["gate_quantile"] = GATE_QUANTILE
        entry["ratio_quantile"] = float(np.quantile(compressed, GATE_QUANTILE) / np.quantile(original, GATE_QUANTILE))
        entry["ratio_interval"] = list(ratio_interval(original, compressed))
    return entry


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, extremes (milliseconds) and the raw samples (5 significant digits)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p25, median, p75 = np.percentile(ms, [25, 50, 75])
    return {
        "median": float(median),
        "p25": float(p25),
        "p75": float(p75),
        "min": float(ms.min()),
        "max": float(ms.max()),
        "n": int(ms.size),
        "samples": [float(f"{v:.5g}") for v in ms],
    }


def paired_ratios(original: Sequence[float], compressed: Sequence[float]) -> dict[str, float]:
    """Quartiles of the per-round ratios compressed/original: the spread of a ratio measured interleaved."""
    ratios = np.asarray(compressed, dtype=np.float64) / np.asarray(original, dtype=np.float64)
    p25, median, p75 = np.percentile(ratios, [25, 50, 75])
    return {"median": float(median), "p25": float(p25), "p75": float(p75)}


GEMM_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ProfileSettings:
    """How to measure: backend(s), sizes, repetitions and builder settings."""

    backend: str = "ort-cpu"
    ttft_backend: str | None = None  # default: ``backend`` when it runs graphs
    seq: int = 512
    batch: int = 1
    warmup: int = 2
    repeats: int = 10
    gemm: bool = True
    ttft: bool = True
    gemm_dtype: str | None = None  # default: float32 on ort-cpu, float16 on GPU backends
    build: BuildSettings = BuildSettings()
    seed: int = 0
    # More rounds (blocks of ``repeats``) until each ratio's 95 % interval is within ± this (relative)
    target_interval: float | None = None
    max_repeats: int = 200

    @property
    def M(self) -> int:
        return self.batch * self.seq

    def resolved_gemm_dtype(self) -> str:
        if self.gemm_dtype:
            return self.gemm_dtype
        return "float32" if self.backend == "ort-cpu" else "float16"

    def resolved_ttft_backend(self) -> str | None:
        if self.ttft_backend:
            return self.ttft_backend
        return self.backend if self.backend in GRAPH_BACKENDS else None


def _gemm_bench(
    group: GemmGroup, weights: Mapping[str, Any], *, compressed: bool, settings: ProfileSettings
) -> tuple[Callable[[], float], Runner | None]:
    if settings.backend == "torch-cuda":
        once, _ = torch_gemm(group, weights, compressed=compressed, device="cuda")
        return once, None
    feed = {"X": weights["X"]}
    build = settings.build
    if settings.backend == "tensorrt":
        build = replace(build, profile=fixed_profile(feed))
    runner = build_runner(gemm_graph(group, weights, compressed=compressed), settings.backend, build)
    return runner.prepare(feed), runner


def profile_gemms(groups: Sequence[GemmGroup], settings: ProfileSettings, log: Log | None = None) -> dict[str, Any]:
    """Time every distinct group shape (original vs compressed, interleaved) and sum over all groups."""
    if settings.backend == "torch-cuda":
        require_torch_cuda()
    M = settings.M
    dtype = settings.resolved_gemm_dtype()
    rows = []
    total_original = total_compressed = 0.0
    shapes = distinct_groups(groups)
    for index, (group, members) in enumerate(shapes):
        count = len(members)
        if log:
            log(f"GEMM {index + 1}/{len(shapes)}: M={M} {group.label} ×{count}")
        weights = gemm_weights(group, M, dtype, seed=settings.seed + index)
        original, original_runner = _gemm_bench(group, weights, compressed=False, settings=settings)
        benches = [original]
        runners = [original_runner]
        if group.L is not None:
            compressed, compressed_runner = _gemm_bench(group, weights, compressed=True, settings=settings)
            benches.append(compressed)
            runners.append(compressed_runner)
        times = interleave_until_tight(benches, settings)
        for runner in runners:
            if runner is not None:
                runner.close()
        original_ms = summarize(times[0])
        compressed_ms = summarize(times[-1])
        total_original += count * original_ms["median"]
        total_compressed += count * compressed_ms["median"]
        rows.append(
            {
                "label": group.label,
                "K": group.K,
                "L": group.L,
                "N": list(group.Ns),
                "count": count,
                "layers": [name for member in members for name in member.layers],
                "flop_ratio": group.flops(M, compressed=True) / group.flops(M, compressed=False),
                "original_ms": original_ms,
                "compressed_ms": compressed_ms,
                "ratio": compressed_ms["median"] / original_ms["median"],
                "ratio_paired": paired_ratios(times[0], times[-1]),
                **(ratio_spread(times[0], times[-1]) if group.L is not None else {"rounds": len(times[0])}),
            }
        )
    return {
        "M": M,
        "dtype": dtype,
        "timed_once_per_distinct_shape": True,
        "groups": rows,
        "original_total_ms": total_original,
        "compressed_total_ms": total_compressed,
        "ratio": total_compressed / total_original if total_original else 1.0,
    }


# ---------------------------------------------------------------------------------------------- TTFT


def profile_ttft(
    original: str | os.PathLike[str],
    compressed: str | os.PathLike[str],
    structure: onnx.ModelProto,
    settings: ProfileSettings,
    log: Log | None = None,
    reference: Path | None = None,
) -> dict[str, Any]:
    """Prefill of one prompt through both whole graphs (and ``reference``, the accepted compressed model,
    when given), interleaved; medians and spread."""
    backend = settings.resolved_ttft_backend()
    assert backend is not None
    feed = prefill_feed(structure, batch=settings.batch, seq=settings.seq, seed=settings.seed)  # empty past
    build = settings.build
    if backend == "tensorrt":
        if is_decoder(structure):
            profile = fixed_profile(feed)
        else:
            profile = derive_profile(input_specs(structure), seq=settings.seq, batch=settings.batch)
        build = replace(build, profile=profile)
    if log:
        log(f"TTFT: building {backend} sessions")
    paths = [original, compressed] + ([reference] if reference is not None else [])
    runners = [build_runner(path, backend, build) for path in paths]
    benches = [runner.prepare(feed) for runner in runners]
    if log:
        log(
            f"TTFT: {settings.warmup} warm-up + {settings.repeats} interleaved runs at batch {settings.batch}, seq {settings.seq}"
        )
    times = interleave_until_tight(benches, settings)
    device = runners[0].device
    for runner in runners:
        runner.close()
    original_ms, compressed_ms = summarize(times[0]), summarize(times[1])
    entry = {
        "backend": backend,
        "device": device,
        "original_ms": original_ms,
        "compressed_ms": compressed_ms,
        "ratio": compressed_ms["median"] / original_ms["median"],
        "ratio_paired": paired_ratios(times[0], times[1]),
        **ratio_spread(times[0], times[1]),
    }
    if reference is not None:  # the gate's side-by-side verdict: compressed/reference of the same rounds
        entry["reference_ms"] = summarize(times[2])
        entry["vs_reference"] = ratio_spread(times[2], times[1])
    return entry


# ---------------------------------------------------------------------------------------------- the whole profile


@dataclass
class ProfileResult:
    report: dict[str, Any]
    paths: dict[str, Path]


def default_profile_path(compressed: Path) -> Path:
    return compressed.with_name(compressed.name.removesuffix(".onnx") + ".profile.json")


def profile(
    original: str | os.PathLike[str],
    compressed: str | os.PathLike[str],
    settings: ProfileSettings | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    log: Log | None = None,
    reference: str | os.PathLike[str] | None = None,
) -> ProfileResult:
    """GEMM latency and TTFT of ``compressed`` against ``original``; writes JSON, Markdown and a PNG chart.

    Args:
        original: the model before compression (path; external data beside it is fine).
        compressed: the model ``espace-export compress`` wrote from it.
        settings: backend, sizes and repetitions (:class:`ProfileSettings`).
        output: the JSON report (default ``<compressed>.profile.json``); ``.md`` and ``.png`` beside it.
        log: receives one line per step.
        reference: the accepted compressed model (the one the CI baseline report measured): its prefill is
            timed in the same interleaved rounds, and ``espace-export check`` then judges ``compressed``
            against it side by side, which cancels the drift between two runs (docs/ci-gate.md).

    Raises:
        EspaceError: unreadable or mismatched models, an unknown backend, a missing extra or device.
    """
    from espace_export.io.models import check_writable

    settings = settings or ProfileSettings()
    check_settings(settings)
    ttft_backend = settings.resolved_ttft_backend()
    original, compressed = Path(original), Path(compressed)
    accepted = Path(reference) if reference is not None else None
    json_path = check_writable(Path(output) if output else default_profile_path(compressed))
    inputs = {"ORIGINAL": original, "COMPRESSED": compressed} | ({"--reference": accepted} if accepted else {})
    check_distinct_paths(inputs, {"-o": profile_files(json_path)})
    structures = [_load_structure(path) for path in (original, compressed)]
    if accepted is not None:
        if not settings.ttft or ttft_backend is None:
            raise EspaceError(
                "--reference is timed in the TTFT rounds, which this profile skips",
                "drop --no-ttft (on GEMM-only backends pass --ttft-backend), or drop --reference",
            )
        _check_reference_rounds(settings)
        _check_reference(structures[1], _load_structure(accepted))
    groups = gemm_groups(*structures)
    names = [[s.name for s in input_specs(m)] for m in structures]
    if names[0] != names[1]:
        raise EspaceError(
            f"ORIGINAL and COMPRESSED have different inputs ({names[0]} vs {names[1]})",
            "pass the model COMPRESSED was made from as ORIGINAL",
        )

    started = time.perf_counter()
    report = _report_header(original, compressed, groups, settings)
    report["reference"] = str(accepted) if accepted is not None else None
    if settings.gemm:
        report["gemm"] = profile_gemms(groups, settings, log)
    if settings.ttft:
        if ttft_backend is None:
            report["notes"].append(
                f"TTFT not measured: {settings.backend} times GEMM shapes only; pass --ttft-backend ort-cuda "
                "(or tensorrt) to time the whole graph"
            )
        else:
            report["ttft"] = profile_ttft(original, compressed, structures[0], settings, log, accepted)
            if ttft_backend != settings.backend and settings.gemm:
                report["notes"].append(
                    f"GEMMs timed on {settings.backend}, TTFT on {ttft_backend}: the GEMM share mixes two backends"
                )
            add_decode(report, (original, compressed), structures[0], groups, settings, log)  # KV-cache graphs
    _add_amdahl(report)
    report["elapsed_s"] = round(time.perf_counter() - started, 2)
    paths = write_profile(report, json_path)
    return ProfileResult(report, paths)


def check_settings(settings: ProfileSettings) -> None:
    """Backends, sizes and rounds, before any model is read."""
    check_backend(settings.backend)
    ttft_backend = settings.resolved_ttft_backend()
    if ttft_backend is not None:
        check_backend(ttft_backend, graph=True)
    check_prompt(settings.seq, settings.batch)
    if not (1 <= settings.repeats <= 100_000 and 0 <= settings.warmup <= 10_000):
        raise EspaceError(
            f"--repeats must lie in [1, 100000] and --warmup in [0, 10000], got {settings.repeats} and {settings.warmup}",
            "use --repeats 10 --warmup 2 (more rounds: --target-interval)",
        )
    if not (settings.gemm or settings.ttft):
        raise EspaceError("nothing to profile: both --no-gemm and --no-ttft given", "drop one of them")
    check_rounds(settings)


def _report_header(
    original: Path, compressed: Path, groups: Sequence[GemmGroup], settings: ProfileSettings
) -> dict[str, Any]:
    """The report's fields that say what was measured and how (the timings are added after)."""
    return {
        "tool": "espace-export",
        "kind": "profile",
        "version": __version__,
        "original": str(original),
        "compressed": str(compressed),
        "backend": settings.backend,
        "ttft_backend": settings.resolved_ttft_backend() if settings.ttft else None,
        "device": _device(settings.backend, settings.build.threads),
        "threads": settings.build.threads,
        "seq": settings.seq,
        "batch": settings.batch,
        "M": settings.M,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "target_interval": settings.target_interval,
        "interleaved": True,
        "flop_ratio": flop_ratio(groups),
        "layers_compressed": sum(len(g.layers) for g in groups if g.L is not None),
        "layers_dense": sum(len(g.layers) for g in groups if g.L is None),
        "notes": [],
    }


def _add_amdahl(report: dict[str, Any]) -> None:
    """With both GEMMs and TTFT: the GEMM share of the original prefill and the Amdahl bound it implies."""
    if "gemm" not in report or "ttft" not in report:
        return
    share = report["gemm"]["original_total_ms"] / report["ttft"]["original_ms"]["median"]
    report["gemm_share"] = share
    report["amdahl_bound"] = 1.0 - share * (1.0 - report["flop_ratio"])
    report["ttft_expected_from_gemm"] = 1.0 - share * (1.0 - report["gemm"]["ratio"])
    if share > 1.0:
        report["notes"].append(
            f"the GEMMs timed alone take {share:.2f}× the whole prefill: isolated timing overstates them "
            "(threading or caching differ from the graph); the Amdahl bound is not meaningful here"
        )


def _check_reference_rounds(settings: ProfileSettings) -> None:
    """The side-by-side verdict needs :data:`espace_export.deploy.gate.MIN_ROUNDS` rounds (``check`` refuses
    fewer), so a ``--reference`` profile with fewer ``--repeats`` would only be found unusable at the gate."""
    from espace_export.deploy.gate import MIN_ROUNDS

    if settings.repeats < MIN_ROUNDS:
        raise EspaceError(
            f"--reference needs at least {MIN_ROUNDS} rounds for check's verdict, got --repeats {settings.repeats}",
            f"raise --repeats to {MIN_ROUNDS} or more (20 on a shared runner)",
        )


def _check_reference(compressed: onnx.ModelProto, reference: onnx.ModelProto) -> None:
    """``--reference`` must take the inputs COMPRESSED takes (it is fed the same prompt)."""
    names = [[s.name for s in input_specs(m)] for m in (compressed, reference)]
    if names[0] != names[1]:
        raise EspaceError(
            f"--reference has other inputs than COMPRESSED ({names[1]} vs {names[0]})",
            "pass the accepted compressed model of the same original as --reference",
        )


def check_rounds(settings: ProfileSettings) -> None:
    """``target_interval`` is a fraction in (0, 1); ``max_repeats`` at least ``repeats`` and bounded."""
    target = settings.target_interval
    if target is not None and not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target < 1):
        raise EspaceError(
            f"--target-interval must be a fraction in (0, 1), got {target}", "try --target-interval 0.02 (± 2 %)"
        )
    if not settings.repeats <= settings.max_repeats <= 100_000:
        raise EspaceError(
            f"--max-repeats must lie between --repeats ({settings.repeats}) and 100000, got {settings.max_repeats}",
            "try --max-repeats 200",
        )


def _load_structure(path: Path) -> onnx.ModelProto:
    """The graph and initializer metadata, without loading external weights (fast on multi-GB models),
    checked as :func:`espace_export.deploy.build.load_structure` does."""
    return load_structure(path)


def _device(backend: str, threads: int | None) -> str:
    if backend == "ort-cpu":
        return f"{cpu_description()}; ONNX Runtime intra-op threads: {threads or 'default (one per core)'}"
    return cuda_device_name()


# ---------------------------------------------------------------------------------------------- rendering


def _fmt_ms(value: float) -> str:
    return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"


def _ms(summary: Mapping[str, float]) -> str:
    return f"{summary['median']:.2f} [{summary['p25']:.2f}–{summary['p75']:.2f}]"


def headline(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The figures to read first, as (name, value) rows."""
    rows = [("FLOP ratio (targeted GEMMs)", f"{report['flop_ratio']:.3f}")]
    if "gemm" in report:
        gemm = report["gemm"]
        rows.append(
            (
                "GEMM latency ratio",
                f"{gemm['ratio']:.3f}  ({_fmt_ms(gemm['compressed_total_ms'])} / {_fmt_ms(gemm['original_total_ms'])} ms)",
            )
        )
    if "ttft" in report:
        ttft = report["ttft"]
        rows.append(
            (
                "TTFT ratio",
                f"{ttft['ratio']:.3f}  ({_fmt_ms(ttft['compressed_ms']['median'])} / {_fmt_ms(ttft['original_ms']['median'])} ms)",
            )
        )
    if "amdahl_bound" in report:
        rows.append(("GEMM share of original TTFT", f"{report['gemm_share']:.3f}"))
        rows.append(("Amdahl bound on TTFT ratio", f"{report['amdahl_bound']:.3f}"))
        rows.append(("TTFT expected from GEMM ratio", f"{report['ttft_expected_from_gemm']:.3f}"))
    return rows + decode_rows(report)


def to_markdown(report: Mapping[str, Any]) -> str:
    lines = [
        "# ESPACE latency profile",
        "",
        f"`{report['compressed']}` vs `{report['original']}`  ",
        f"backend **{report['backend']}**"
        + (
            f", TTFT on **{report['ttft_backend']}**"
            if report.get("ttft_backend") not in (None, report["backend"])
            else ""
        )
        + f" · {report['device']}  ",
        f"seq {report['seq']}, batch {report['batch']} (M = {report['M']}) · {report['warmup']} warm-up + "
        f"{report['repeats']} interleaved runs; times are median [p25–p75] ms",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in headline(report)]
    if "gemm" in report:
        gemm = report["gemm"]
        lines += [
            "",
            f"## GEMM groups ({gemm['dtype']}; each distinct shape timed once, × count)",
            "",
            "| shape | count | FLOP ratio | original ms | compressed ms | ratio |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in gemm["groups"]:
            lines.append(
                f"| {row['label']} | {row['count']} | {row['flop_ratio']:.3f} | {_ms(row['original_ms'])} "
                f"| {_ms(row['compressed_ms'])} | {row['ratio']:.3f} |"
            )
        lines.append(
            f"| **total** (Σ count × median) | | {report['flop_ratio']:.3f} | {gemm['original_total_ms']:.2f} "
            f"| {gemm['compressed_total_ms']:.2f} | **{gemm['ratio']:.3f}** |"
        )
    if "ttft" in report:
        ttft = report["ttft"]
        lines += [
            "",
            "## Time to first token",
            "",
            "| original ms | compressed ms | ratio | per-round ratio [p25–p75] | Amdahl bound |",
            "|---:|---:|---:|---:|---:|",
            f"| {_ms(ttft['original_ms'])} | {_ms(ttft['compressed_ms'])} | **{ttft['ratio']:.3f}** "
            f"| {ttft['ratio_paired']['p25']:.3f}–{ttft['ratio_paired']['p75']:.3f} "
            f"| {report.get('amdahl_bound', float('nan')):.3f} |",
        ]
    lines += decode_markdown(report)
    if report.get("notes"):
        lines += ["", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def write_chart(report: Mapping[str, Any], path: Path) -> None:
    """Left: per-shape GEMM time (count × median, IQR bars). Right: measured ratios against the FLOP
    ratio and the Amdahl bound."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, width_ratios=[2, 1])
    if "gemm" in report:
        rows = report["gemm"]["groups"]
        x = np.arange(len(rows))
        for offset, key, name in ((-0.2, "original_ms", "original"), (0.2, "compressed_ms", "compressed")):
            medians = np.array([r["count"] * r[key]["median"] for r in rows])
            low = medians - np.array([r["count"] * r[key]["p25"] for r in rows])
            high = np.array([r["count"] * r[key]["p75"] for r in rows]) - medians
            left.bar(x + offset, medians, 0.4, yerr=[low, high], capsize=3, label=name)
        left.set_xticks(x, [f"{r['label']}\n×{r['count']}" for r in rows], fontsize=7)
        left.set_ylabel("ms (count × median)")
        left.set_title(f"GEMM time at M={report['M']} ({report['backend']})")
        left.legend()
    else:
        left.set_axis_off()
    labels, values = [], []
    if "gemm" in report:
        labels.append("GEMM")
        values.append(report["gemm"]["ratio"])
    if "ttft" in report:
        labels.append("TTFT")
        values.append(report["ttft"]["ratio"])
    if "decode" in report:
        labels.append("per token")
        values.append(report["decode"]["ratio"])
    right.bar(labels, values, color=["tab:blue", "tab:green", "tab:purple"][: len(values)])
    right.axhline(report["flop_ratio"], linestyle="--", color="black", label=f"FLOP ratio {report['flop_ratio']:.2f}")
    if "amdahl_bound" in report:
        right.axhline(
            report["amdahl_bound"], linestyle=":", color="tab:red", label=f"Amdahl bound {report['amdahl_bound']:.2f}"
        )
    right.set_ylim(0, max([1.05, *values]))
    right.set_ylabel("compressed / original")
    right.set_title("measured ratios")
    right.legend(fontsize=8)
    canvas.print_png(str(path))


def write_profile(report: Mapping[str, Any], json_path: Path) -> dict[str, Path]:
    """The JSON report, its Markdown twin and the PNG chart, each written atomically."""
    return write_report_files(report, json_path, to_markdown, write_chart)


__all__ = [
    "GemmGroup",
    "ProfileResult",
    "ProfileSettings",
    "flop_ratio",
    "gemm_graph",
    "gemm_groups",
    "gemm_weights",
    "interleave",
    "profile",
    "profile_gemms",
    "profile_ttft",
    "synthetic_feed",
    "torch_gemm",
]
