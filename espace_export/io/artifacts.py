"""Plans and calibration statistics as artifacts: save, load (validated), and the model fingerprint they carry.

``calibrate`` writes statistics (``.npz``: activation and gradient sums, and the fingerprint); ``plan`` writes
per-layer decisions (``plan.json``, reviewable, + ``plan.npz`` with the chosen factors). Each may run on another
day or machine; a file that does not match the model it is applied to is rejected with an :class:`EspaceError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espace_export.calibration.gradients import GradientStats
from espace_export.calibration.statistics import ActivationStats
from espace_export.errors import EspaceError
from espace_export.io.models import atomic_output, parse_json, read_arrays, read_json
from espace_export.selection.factorizations import (
    PROJECTIONS,
    Factorization,
)
from graph_passes.find import GemmTarget, weight_matrix

PLAN_FORMAT = "espace-plan/1"


STATS_FORMAT = "espace-stats/1"


def fingerprint(model: onnx.ModelProto, targets: Sequence[GemmTarget]) -> list[dict[str, Any]]:
    """What a plan must match: each target's name, K, N and a SHA-1 of its weight."""
    return [
        {
            "name": t.name,
            "K": t.K,
            "N": t.N,
            "sha1": hashlib.sha1(np.ascontiguousarray(weight_matrix(model, t)).tobytes()).hexdigest(),
        }
        for t in targets
    ]


def check_fingerprint(expected: Sequence[dict[str, Any]], model_print: Sequence[dict[str, Any]], what: str) -> None:
    by_name = {entry["name"]: entry for entry in model_print}
    for entry in expected:
        found = by_name.get(entry["name"])
        if found is None:
            raise EspaceError(
                f"the {what} names layer {entry['name']}, which this model does not have",
                f"use the model the {what} was made for, or make a new {what} for this one",
            )
        if (found["K"], found["N"]) != (entry["K"], entry["N"]):
            raise EspaceError(
                f"the {what} has layer {entry['name']} as {entry['K']}×{entry['N']}, this model has it "
                f"{found['K']}×{found['N']}",
                f"make a new {what} for this model",
            )
        if found["sha1"] != entry["sha1"]:
            raise EspaceError(
                f"the weights of {entry['name']} differ from those the {what} was made for",
                f"make a new {what} for this model (a plan is only valid for the exact weights it was calibrated on)",
            )


@dataclass
class Calibration:
    """Activation (and optionally gradient) statistics of a model, with its fingerprint."""

    stats: dict[str, ActivationStats]
    gradients: dict[str, GradientStats] | None
    fingerprint: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def save_calibration(calibration: Calibration, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": STATS_FORMAT, "fingerprint": calibration.fingerprint, "info": calibration.info}
    meta["activations"] = []
    for i, (name, s) in enumerate(calibration.stats.items()):
        meta["activations"].append(
            {"name": name, "K": s.K, "normalized": s.normalized, "rows": s.rows, "rows_normalized": s.rows_normalized}
        )
        arrays[f"xx.{i}"] = s.sum_xx
        if s.normalized:
            arrays[f"xxn.{i}"] = s.sum_xx_normalized
        if calibration.gradients is not None and name in calibration.gradients:
            g = calibration.gradients[name]
            meta["activations"][-1].update({"sequences": g.sequences, "gradients_normalized": g.normalized})
            arrays[f"xg.{i}"] = g.sum_xg
            if g.normalized:
                arrays[f"xgn.{i}"] = g.sum_xg_normalized
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return path


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    path = Path(path)
    if not path.is_file():
        raise EspaceError(f"statistics file not found: {path}", "run `espace-export calibrate` first")
    fix = "pass a file written by `espace-export calibrate`"
    arrays = read_arrays(path, "statistics", fix)
    if "meta" not in arrays or arrays["meta"].dtype != np.uint8 or arrays["meta"].ndim != 1:
        raise EspaceError(f"{path} is not an espace-export statistics file (no metadata)", fix)
    meta = parse_json(arrays.pop("meta").tobytes(), f"the metadata of statistics {path}", fix)
    if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
        raise EspaceError(f"{path} is not an espace-export statistics file", "run `espace-export calibrate`")
    try:
        _check_statistics(meta, arrays)
    except (TypeError, KeyError, ValueError) as exc:
        raise EspaceError(f"statistics {path} are malformed ({exc})", "run `espace-export calibrate` again") from None
    stats: dict[str, ActivationStats] = {}
    gradients: dict[str, GradientStats] = {}
    for i, entry in enumerate(meta["activations"]):
        s = ActivationStats(entry["K"], entry["normalized"])
        s.sum_xx, s.rows, s.rows_normalized = arrays[f"xx.{i}"], entry["rows"], entry["rows_normalized"]
        if entry["normalized"]:
            s.sum_xx_normalized = arrays[f"xxn.{i}"]
        stats[entry["name"]] = s
        if f"xg.{i}" in arrays:
            g = GradientStats(entry["K"], entry["gradients_normalized"])
            g.sum_xg, g.sequences = arrays[f"xg.{i}"], entry["sequences"]
            if g.normalized:
                g.sum_xg_normalized = arrays[f"xgn.{i}"]
            gradients[entry["name"]] = g
    return Calibration(stats, gradients or None, meta["fingerprint"], meta.get("info", {}))


def _check_statistics(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Structure, sizes and finiteness of a statistics file, checked before any K×K array is allocated;
    raises ValueError naming the first entry that is off."""
    entries = meta.get("activations")
    if not isinstance(entries, list) or not isinstance(meta.get("fingerprint"), list):
        raise ValueError("'activations' and 'fingerprint' must be lists")
    if not isinstance(meta.get("info", {}), dict):
        raise ValueError("'info' is not an object")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"activation {i} is not an object with a name")
        K = entry.get("K")
        if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K < _MAX_DIM:
            raise ValueError(f"activation {entry['name']!r} has K={K!r}")
        for key in ("rows", "rows_normalized") + (("sequences",) if f"xg.{i}" in arrays else ()):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"activation {entry['name']!r} has {key}={value!r}")
        if not isinstance(entry.get("normalized"), bool):
            raise ValueError(f"activation {entry['name']!r} has no 'normalized' flag")
        needed = [f"xx.{i}"] + ([f"xxn.{i}"] if entry["normalized"] else [])
        if f"xg.{i}" in arrays:
            if not isinstance(entry.get("gradients_normalized"), bool):
                raise ValueError(f"activation {entry['name']!r} has no 'gradients_normalized' flag")
            needed += [f"xg.{i}"] + ([f"xgn.{i}"] if entry["gradients_normalized"] else [])
        for key in needed:
            array = arrays.get(key)
            if array is None:
                raise ValueError(f"array {key} of {entry['name']!r} is missing")
            if array.shape != (K, K) or not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f"array {key} of {entry['name']!r} is {array.dtype} {array.shape}, not {K}×{K} floats")
            if not np.isfinite(array).all():
                raise ValueError(f"array {key} of {entry['name']!r} holds NaN or infinity")


# ---- plans --------------------------------------------------------------------------------------------


@dataclass
class LayerPlan:
    name: str
    K: int
    N: int
    L: int | None  # None: not compressible at the layer ratio
    method: str | None = None  # the chosen method (best score when selecting)
    selected: bool = False
    scores: dict[str, float] = field(default_factory=dict)  # method → validation loss (or proxy)
    harm: float | None = None  # relative loss increase of the chosen method applied alone
    order: int | None = None  # position in the progressive order
    group: str | None = None  # shared-P siblings: the name of the group's first layer (None: own P)


@dataclass
class Plan:
    ratio: float
    select: str  # "none" | "validate" | "proxy"
    methods: list[str]
    score_kind: str  # "validation loss (next-token)" | ... | "relative output error (proxy)"
    baseline_loss: float | None
    layers: list[LayerPlan]
    fingerprint: list[dict[str, Any]]
    curve: list[dict[str, Any]] = field(default_factory=list)
    knee: int | None = None
    skipped: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    factors: dict[str, Factorization] = field(default_factory=dict)  # selected layers only

    def layer(self, name: str) -> LayerPlan:
        """The record of layer ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def selected_layers(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.selected]

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("factors")
        return {"format": PLAN_FORMAT, **data}


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """``path`` (JSON) and ``path`` with suffix ``.npz``: the factors of the selected layers — A, and B only
    where it is not AᵀW (ASVD, whitened SVD); ``apply`` folds AᵀW from the fingerprinted weight itself."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(plan.as_json(), indent=2) + "\n")
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(plan.layers):
        if layer.name in plan.factors:
            factors = plan.factors[layer.name]
            arrays[f"A.{i}"] = factors.A
            if factors.M is not None:
                arrays[f"M.{i}"] = factors.M
            elif factors.B is not None and factors.method not in PROJECTIONS:
                arrays[f"B.{i}"] = factors.B
    with atomic_output(path.with_suffix(".npz")) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return path


_LAYER_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "K": (int,), "N": (int,), "L": (int, type(None)), "method": (str, type(None)),
    "selected": (bool,), "scores": (dict,), "harm": (float, int, type(None)), "order": (int, type(None)),
    "group": (str, type(None)),
}  # fmt: skip


_MAX_DIM = 2**31  # a K, N or L past this is not a layer of any model

_PLAN_TYPES: dict[str, tuple[type, ...]] = {
    "ratio": (float, int), "select": (str,), "methods": (list,), "score_kind": (str,),
    "baseline_loss": (float, int, type(None)), "curve": (list,), "knee": (int, type(None)), "skipped": (list,),
    "info": (dict,),
}  # fmt: skip


def _check_plan_fields(data: dict[str, Any]) -> None:
    """Types of the fields a plan is read by; raises ValueError naming the first that is off."""
    for key, allowed in _PLAN_TYPES.items():
        if key in data and (not isinstance(data[key], allowed) or isinstance(data[key], bool)):
            raise ValueError(f"{key!r} has the wrong type")
    if not all(isinstance(m, str) for m in data.get("methods", [])) or not all(
        isinstance(n, str) for n in data.get("skipped", [])
    ):
        raise ValueError("'methods' and 'skipped' must be lists of names")
    if not all(isinstance(p, dict) for p in data.get("curve", [])):
        raise ValueError("'curve' must be a list of points")
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise ValueError("'layers' is not a list")
    for entry in layers:
        if not isinstance(entry, dict):
            raise ValueError("a layer entry is not an object")
        for key, value in entry.items():
            found = _LAYER_TYPES.get(key)
            if found is None:
                raise ValueError(f"unknown layer field {key!r}")
            if not isinstance(value, found) or (isinstance(value, bool) and bool not in found):
                raise ValueError(f"layer field {key!r} has the wrong type")
        for key in ("K", "N", "L"):
            value = entry.get(key)
            if isinstance(value, int) and not 1 <= value < _MAX_DIM:
                raise ValueError(f"layer {entry.get('name')!r} has {key}={value}, not a size")
        if not all(isinstance(v, (int, float, type(None))) for v in entry.get("scores", {}).values()):
            raise ValueError(f"layer {entry.get('name')!r} has scores that are not numbers")
    if isinstance(data.get("ratio"), (int, float)) and not 0 <= data["ratio"] <= 1:
        raise ValueError(f"'ratio' is {data['ratio']}, not a fraction")
    knee = data.get("knee")
    if isinstance(knee, int) and not 0 <= knee < max(1, len(data.get("curve", []))):
        raise ValueError(f"'knee' {knee} is not a point of the curve")
    names = {entry.get("name") for entry in layers}
    for entry in layers:
        if entry.get("group") is not None and entry["group"] not in names:
            raise ValueError(
                f"layer {entry.get('name')!r} shares the P of {entry['group']!r}, which is not in the plan"
            )
    fingerprint = data.get("fingerprint")
    if not isinstance(fingerprint, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("K"), int)
        and isinstance(e.get("N"), int) and isinstance(e.get("sha1"), str)
        for e in fingerprint
    ):  # fmt: skip
        raise ValueError("'fingerprint' is not a list of {name, K, N, sha1}")


def check_plan_factors(plan: Plan, targets: Sequence[GemmTarget]) -> None:
    """Every factorised layer exists in the model, is fingerprinted, and has finite factors of its K×N."""
    by_name = {t.name: t for t in targets}
    printed = {entry["name"] for entry in plan.fingerprint}
    for name, factors in plan.factors.items():
        target = by_name.get(name)
        if target is None:
            raise EspaceError(f"the plan names layer {name}, which this model does not have",
                              "use the model the plan was made for, or make a new plan for this one")  # fmt: skip
        if name not in printed:
            raise EspaceError(f"the plan carries no fingerprint for layer {name}", "re-run `espace-export plan`")
        A, B, M = factors.A, factors.B, factors.M
        rank = A.shape[1] if A.ndim == 2 else 0
        if M is not None and (M.ndim != 2 or M.shape != (rank, target.K)):
            raise EspaceError(
                f"the plan's oblique factors for {name} are {A.shape} and {M.shape}, the layer is {target.K}×{target.N}",
                "re-run `espace-export plan` for this model",
            )
        b_shape = B.shape if B is not None else (rank, target.N)  # no B: folded from the weight at apply
        if A.ndim != 2 or len(b_shape) != 2 or A.shape[0] != target.K or b_shape != (rank, target.N) or rank < 1:
            shapes = f"{A.shape} and {b_shape}" if B is not None else f"{A.shape}"
            raise EspaceError(
                f"the plan's factors for {name} are {shapes}, the layer is {target.K}×{target.N}",
                "re-run `espace-export plan` for this model",
            )
        finite = [x for x in (A, B, M) if x is not None]
        if not all(np.issubdtype(x.dtype, np.floating) and np.isfinite(x).all() for x in finite):
            raise EspaceError(f"the plan's factors for {name} are not finite numbers", "re-run `espace-export plan`")


def load_plan(path: str | os.PathLike[str]) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise EspaceError(f"plan not found: {path}", "run `espace-export plan` first")
    data = read_json(path, "plan", "pass a plan written by `espace-export plan`")
    if not isinstance(data, dict) or data.pop("format", None) != PLAN_FORMAT:
        raise EspaceError(f"{path} is not an espace-export plan", "pass a plan written by `espace-export plan`")
    factors_path = path.with_suffix(".npz")
    if not factors_path.is_file():
        raise EspaceError(f"the plan's factors {factors_path} are missing", "keep plan.json and plan.npz together")
    arrays = read_arrays(factors_path, "the plan's factors", "re-run `espace-export plan`")
    try:
        _check_plan_fields(data)
        layers = [LayerPlan(**entry) for entry in data.pop("layers")]
        plan = Plan(layers=layers, **data)
    except (TypeError, KeyError, ValueError, AttributeError, RecursionError) as exc:
        raise EspaceError(f"plan {path} is malformed ({exc})", "pass a plan written by `espace-export plan`") from None
    for i, layer in enumerate(layers):
        if f"A.{i}" in arrays and (f"B.{i}" in arrays or f"M.{i}" in arrays or layer.method in PROJECTIONS):
            A, B, M = arrays[f"A.{i}"], arrays.get(f"B.{i}"), arrays.get(f"M.{i}")
            plan.factors[layer.name] = Factorization(layer.method or "?", A, B, M)
    missing = [layer.name for layer in plan.selected_layers() if layer.name not in plan.factors]
    if missing:
        raise EspaceError(f"the plan's factors lack layer {missing[0]}", "re-run `espace-export plan`")
    return plan
