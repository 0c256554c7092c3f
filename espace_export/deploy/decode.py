"""Decoder graphs with a KV cache in the profiler: the prefill (TTFT) and one decode step (time per output token).

A decoder graph (``past_key_values.*`` / ``past.*`` inputs: optimum with-past, optimum's merged decoder with
``use_cache_branch``, onnxruntime-genai's GroupQueryAttention graphs) is timed twice, original vs compressed,
interleaved:

- **TTFT**: the prefill, ``seq`` prompt tokens with an *empty* past (:func:`prefill_feed`);
- **time per output token**: one decode step, 1 new token per row after a past of length ``seq``
  (:func:`decode_feed`; random cache values, which do not change the speed).

Both feeds are completed by :func:`espace_export.io.data.complete_feed` (mask over past + new positions,
positions after the past, ``use_cache_branch``, ``cache_position``). Beside the decode ratio: the FLOP ratio of
the targeted GEMMs, and, with GEMM timing on, the Amdahl bound ``1 − share × (1 − FLOP ratio)`` where ``share``
is the GEMMs' time at M = batch (a decode step's rows) over the original step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from espace_export.deploy.build import build_runner, synthetic_feed
from espace_export.deploy.tensorrt import fixed_profile
from espace_export.io.data import InputSpec, complete_feed, empty_past, input_specs, is_past_input, past_sequence_axis

if TYPE_CHECKING:
    from espace_export.deploy.profile import GemmGroup, ProfileSettings

Log = Callable[[str], None]


def is_decoder(model: onnx.ModelProto) -> bool:
    """A graph with KV-cache inputs (``past_key_values.*``, ``past.*``…) of rank 3 or more."""
    return any(is_past_input(spec.name) and len(spec.shape) >= 3 for spec in input_specs(model))


def prefill_feed(model: onnx.ModelProto, *, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``seq`` random prompt tokens per row with an empty past (the prefill TTFT measures); the feed of
    :func:`espace_export.deploy.build.synthetic_feed` for graphs without a KV cache."""
    feed = synthetic_feed(model, batch=batch, seq=seq, seed=seed)
    if not is_decoder(model):
        return feed
    specs = input_specs(model)
    return complete_feed({s.name: feed[s.name] for s in specs if _is_prompt(s) and s.name in feed}, specs)


def _is_prompt(spec: InputSpec) -> bool:
    """What a caller gives per step: token ids, float inputs that are not the cache (the rest is completed)."""
    if spec.is_integer:
        return len(spec.shape) == 2 and "input_ids" in spec.name.lower()
    return not is_past_input(spec.name)


def decode_feed(model: onnx.ModelProto, *, batch: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One decode step: 1 new token per row after a cache of ``past`` positions (random keys and values, of
    the shapes :func:`espace_export.io.data.empty_past` derives, past axis = ``past``), the rest completed."""
    specs = input_specs(model)
    prompt = synthetic_feed(model, batch=batch, seq=1, seed=seed)
    rng = np.random.default_rng(seed + 1)
    feed: dict[str, np.ndarray] = {}
    for spec in specs:
        if is_past_input(spec.name) and len(spec.shape) >= 3:
            shape = list(empty_past(spec, batch).shape)
            shape[past_sequence_axis(spec)] = past
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif _is_prompt(spec) and spec.name in prompt:
            feed[spec.name] = prompt[spec.name]
    return complete_feed(feed, specs)


def profile_decode(
    paths: Sequence[str | os.PathLike[str]],
    structure: onnx.ModelProto,
    groups: Sequence[GemmGroup],
    settings: ProfileSettings,
    log: Log | None = None,
) -> dict[str, Any]:
    """Time one decode step (past length ``settings.seq``) of ``paths = (original, compressed)``,
    interleaved; with ``settings.gemm`` also the GEMM groups at M = batch, for the Amdahl bound."""
    from espace_export.deploy.profile import (
        flop_ratio,
        interleave_until_tight,
        paired_ratios,
        profile_gemms,
        ratio_spread,
        summarize,
    )

    backend = settings.resolved_ttft_backend()
    assert backend is not None
    feed = decode_feed(structure, batch=settings.batch, past=settings.seq, seed=settings.seed)
    if log:
        log(f"per token: building {backend} sessions (1 new token after a past of {settings.seq})")
    runners = [build_runner(path, backend, _build_for(backend, feed, settings)) for path in paths]
    benches = [runner.prepare(feed) for runner in runners]
    times = interleave_until_tight(benches, settings)
    for runner in runners:
        runner.close()
    original_ms, compressed_ms = summarize(times[0]), summarize(times[1])
    entry: dict[str, Any] = {
        "backend": backend,
        "past": settings.seq,
        "new_tokens": 1,
        "batch": settings.batch,
        "original_ms": original_ms,
        "compressed_ms": compressed_ms,
        "ratio": compressed_ms["median"] / original_ms["median"],
        "ratio_paired": paired_ratios(times[0], times[1]),
        **ratio_spread(times[0], times[1]),
        "flop_ratio": flop_ratio(groups),
    }
    if settings.gemm:
        gemm = profile_gemms(groups, replace(settings, seq=1), log)
        share = gemm["original_total_ms"] / original_ms["median"]
        entry |= {"gemm_M": settings.batch, "gemm_ratio": gemm["ratio"], "gemm_share": share}
        entry["amdahl_bound"] = 1.0 - share * (1.0 - entry["flop_ratio"])
    return entry


def _build_for(backend: str, feed: Mapping[str, np.ndarray], settings: ProfileSettings) -> Any:
    """TensorRT engines are built at the feed's exact shapes (a decode step is one shape)."""
    if backend == "tensorrt":
        return replace(settings.build, profile=fixed_profile(feed))
    return settings.build


def add_decode(
    report: dict[str, Any],
    paths: Sequence[str | os.PathLike[str]],
    structure: onnx.ModelProto,
    groups: Sequence[GemmGroup],
    settings: ProfileSettings,
    log: Log | None = None,
) -> None:
    """The hook :func:`espace_export.deploy.profile.profile` calls after TTFT: for decoder graphs, the
    per-token entry and a note that TTFT is the empty-past prefill; nothing for other graphs."""
    if "ttft" not in report or not is_decoder(structure):
        return
    report["ttft"]["feed"] = f"prefill: {settings.seq} tokens, empty past"
    report["decode"] = profile_decode(paths, structure, groups, settings, log)
    if report["decode"].get("gemm_share", 0.0) > 1.0:
        report["notes"].append(
            "per token: the GEMMs timed alone take longer than the whole decode step; its Amdahl bound is not "
            "meaningful here"
        )


def decode_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Headline rows for the decode step (none for encoders)."""
    decode = report.get("decode")
    if not decode:
        return []
    rows = [
        (
            f"Per-token ratio (past {decode['past']})",
            f"{decode['ratio']:.3f}  ({decode['compressed_ms']['median']:.3g} / "
            f"{decode['original_ms']['median']:.3g} ms)",
        )
    ]
    if "amdahl_bound" in decode:
        rows.append(("Amdahl bound on per-token ratio", f"{decode['amdahl_bound']:.3f}"))
    return rows


def decode_markdown(report: Mapping[str, Any]) -> list[str]:
    """The Markdown section for the decode step (empty for encoders)."""
    decode = report.get("decode")
    if not decode:
        return []

    def ms(summary: Mapping[str, float]) -> str:
        return f"{summary['median']:.3f} [{summary['p25']:.3f}–{summary['p75']:.3f}]"

    bound = f"{decode['amdahl_bound']:.3f}" if "amdahl_bound" in decode else "–"
    share = f"{decode['gemm_share']:.3f}" if "gemm_share" in decode else "–"
    return [
        "",
        f"## Time per output token (1 new token after a past of {decode['past']}, batch {decode['batch']})",
        "",
        "TTFT above is the prefill with an empty past.",
        "",
        "| original ms | compressed ms | ratio | per-round ratio [p25–p75] | FLOP ratio | GEMM share | Amdahl bound |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {ms(decode['original_ms'])} | {ms(decode['compressed_ms'])} | **{decode['ratio']:.3f}** "
        f"| {decode['ratio_paired']['p25']:.3f}–{decode['ratio_paired']['p75']:.3f} | {decode['flop_ratio']:.3f} "
        f"| {share} | {bound} |",
    ]


__all__ = [
    "add_decode",
    "decode_feed",
    "decode_markdown",
    "decode_rows",
    "is_decoder",
    "prefill_feed",
    "profile_decode",
]
