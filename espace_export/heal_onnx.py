"""Healing from the ONNX alone: retrain every targeted weight W through static projections, by
self-distillation from the original model, with no PyTorch model at hand.

The original ``.onnx`` is evaluated by the ONNX→torch interpreter the gradient statistics already use
(:class:`espace_export.onnx_torch.TorchGraph`). Each projected layer's weight constant becomes
``P·(Qᵀ·W)`` with W a trainable parameter (K×N, whole) and P, Q static — ``Q = P`` for ESPACE's
orthonormal projections, ``Q = Mᵀ`` for an oblique pair ``(A, M)`` — so the graph computes exactly
``(X·P)·(QᵀW)``, the pair the compressed model runs. The loss compares the student's first output with the
original model's (ONNX Runtime, on the same batch): the KL of next-token distributions for a causal LM
(``logits [batch, seq, vocab]``), ``1 − cosine`` of output rows otherwise. Adam, linear warm-up then cosine
decay, for ``steps`` or ``minutes``. The healed W is then folded (``PᵀW`` or ``M·W``) and written as the
usual compressed graph (:func:`graph_passes.project`), atomically, with the held-out fidelity before and
after.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espace_export.errors import EspaceError
from espace_export.io.models import atomic_output, check_model, check_writable, load_model, save_model
from graph_passes import Projection, find_targets, project
from graph_passes.find import GemmTarget, weight_matrix


@dataclass
class HealingResult:
    output: Path
    loss: str  # "kl" | "distill"
    steps: int
    losses: list[float]  # training loss per step
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # healed K×N weight per layer (float32)
    fidelity_before: dict[str, dict[str, float]] = field(default_factory=dict)
    fidelity_after: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def _static(factors: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(P, Q)`` with the pair ``(X·P)·(QᵀW)``: Q = P (ESPACE), Q = Mᵀ (oblique ``(A, M)``)."""
    if isinstance(factors, tuple):
        A, M = (np.asarray(x, dtype=np.float32) for x in factors)
        return A, np.ascontiguousarray(M.T)
    P = np.asarray(factors, dtype=np.float32)
    return P, P


def distillation_loss(student: Any, teacher: Any, kind: str, mask: Any = None) -> Any:
    """``kl``: mean over (unmasked) tokens of KL(teacher ‖ student) of the softmax of the last axis;
    ``distill``: mean of ``1 − cosine`` of output rows."""
    import torch
    import torch.nn.functional as F

    if kind == "kl":
        log_student = F.log_softmax(student.float(), dim=-1)
        log_teacher = F.log_softmax(teacher.float(), dim=-1)
        per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
        if mask is not None and mask.shape == per_token.shape:
            weights = mask.to(per_token.dtype)
            return (per_token * weights).sum() / weights.sum().clamp_min(1.0)
        return per_token.mean()
    rows_s = student.reshape(-1, student.shape[-1]).float()
    rows_t = teacher.reshape(-1, teacher.shape[-1]).float()
    return (1.0 - F.cosine_similarity(rows_s, rows_t, dim=-1, eps=1e-12)).mean() + torch.zeros(())


def _check_weight_not_shared(model: onnx.ModelProto, target: GemmTarget) -> None:
    if target.weight not in {t.name for t in model.graph.initializer}:
        raise EspaceError(
            f"the weight of {target.name} is not an initializer (a Constant node?)",
            "re-export the model with its weights as initializers",
        )
    readers = [n.name for n in model.graph.node if target.weight in n.input]
    own = {target.node, target.transpose_node}
    if any(r not in own for r in readers):
        raise EspaceError(
            f"the weight of {target.name} is also read elsewhere (a tied embedding?), so it cannot train alone",
            "leave that layer out of the projections (exclude it when compressing)",
        )


def heal_onnx(
    original: str | os.PathLike[str] | onnx.ModelProto,
    projections: Mapping[str, Any] | str | os.PathLike[str],
    batches: Sequence[dict[str, np.ndarray]],
    output: str | os.PathLike[str],
    *,
    steps: int = 100,
    minutes: float | None = None,
    lr: float = 1e-4,
    warmup: float = 0.1,
    loss: str = "auto",
    holdout_batches: Sequence[dict[str, np.ndarray]] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    external_data: bool | None = None,
) -> HealingResult:
    """Heal ``original`` through ``projections`` on ``batches`` and write the compressed graph to ``output``.

    ``projections``: layer name → P or ``(A, M)``, or a path :func:`espace_export.heal.load_projections`
    reads (a plan ``.json``, a compressed ``.onnx``, a ``.npz``). ``loss``: ``auto`` (``kl`` for a causal LM,
    ``distill`` otherwise), ``kl`` or ``distill``. Training stops after ``steps`` or ``minutes``, whichever
    comes first; batches are cycled. ``holdout_batches`` measure the fidelity to the original model of the
    compressed model before and after healing (:func:`espace_export.pipeline.output_fidelity`).
    """
    import torch

    from espace_export.calibration.onnx_torch import TorchGraph
    from espace_export.heal import load_projections, match_names
    from espace_export.io.data import complete_feed, input_specs
    from espace_export.projection.fidelity import output_fidelity
    from espace_export.runtime import ort_session
    from espace_export.selection.validation import resolve_validation_loss

    if steps < 1:
        raise EspaceError(f"steps must be at least 1, got {steps}", "pass --steps 1 or more")
    if not batches:
        raise EspaceError("healing needs training batches", "give calibration text or data")
    output = check_writable(Path(output))
    model = original if isinstance(original, onnx.ModelProto) else load_model(original)
    if not isinstance(projections, Mapping):
        projections = load_projections(projections)  # type: ignore[arg-type]
    kind = "kl" if resolve_validation_loss(model, "auto" if loss == "auto" else loss) != "distill" else "distill"
    targets = {t.name: t for t in find_targets(model, include_heads=True)}
    mapping = match_names(projections, targets)
    specs = input_specs(model)
    teacher = ort_session(model)
    output_name = model.graph.output[0].name

    graph = TorchGraph(model)
    layers: list[tuple[GemmTarget, Any, Any, Any]] = []  # target, P, Q, W (trainable)
    for name, factors in projections.items():
        target = targets[mapping[name]]
        _check_weight_not_shared(model, target)
        P, Q = _static(factors)
        if P.shape[0] != target.K or Q.shape != P.shape:
            raise EspaceError(
                f"projection for {name} is {P.shape}, the layer has K={target.K}", "use the model it was made for"
            )
        if P is Q and not np.allclose(P.T.astype(np.float64) @ P, np.eye(P.shape[1]), atol=1e-3):
            raise EspaceError(  # a baseline's A (svd-family, oblique) read back from a compressed graph
                f"the projection of {name} is not orthonormal (the layer was compressed by a weight factorisation "
                "or an oblique projection), so it cannot be healed as x·P·PᵀW",
                "heal from the plan (plan.json keeps an oblique layer's M), or compress with ESPACE or oblique methods",
            )
        W = torch.nn.Parameter(torch.from_numpy(np.array(weight_matrix(model, target), dtype=np.float32)))
        layers.append((target, torch.from_numpy(np.array(P)), torch.from_numpy(np.array(Q)), W))

    def student(feed: dict[str, np.ndarray]) -> Any:
        for target, P, Q, W in layers:
            effective = P @ (Q.T @ W)  # X·effective = (X·P)·(QᵀW): the pair, with W whole
            graph.constants[target.weight] = effective.T if target.stored_transposed else effective
        return graph.run(feed, outputs=[output_name])[output_name]

    optimizer = torch.optim.Adam([W for *_, W in layers], lr=lr)
    warm = max(1, int(warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))),
    )
    feeds = [complete_feed(batch, specs) for batch in batches]
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        feed = feeds[step % len(feeds)]
        target_out = torch.from_numpy(np.asarray(teacher.run([output_name], feed)[0]))
        mask = torch.from_numpy(feed["attention_mask"]) if "attention_mask" in feed else None
        value = distillation_loss(student(feed), target_out, kind, mask)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(value.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        if minutes is not None and time.perf_counter() - started > 60 * minutes:
            break
    seconds = time.perf_counter() - started

    def compressed(weights: Mapping[str, np.ndarray] | None) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        rewrites = []
        for target, P, Q, _ in layers:
            W_kn = weights[target.name] if weights is not None else weight_matrix(model, target).astype(np.float64)
            if weights is not None:  # the healed weight replaces the original constant before the rewrite
                stored = (W_kn.T if target.stored_transposed else W_kn).astype(np.dtype(target.dtype))
                _replace_initializer(copy, target.weight, stored)
            folded = Q.numpy().astype(np.float64).T @ np.asarray(W_kn, dtype=np.float64)
            rewrites.append(Projection(target, P.numpy(), folded=folded))
        return project(copy, rewrites)

    healed = {target.name: W.detach().numpy().astype(np.float64) for target, _, _, W in layers}
    result_model = compressed(healed)
    result = HealingResult(output, kind, len(losses), losses, seconds=seconds)
    result.weights = {name: W.astype(np.float32) for name, W in healed.items()}
    if holdout_batches:
        result.fidelity_before = output_fidelity(teacher, ort_session(compressed(None)), holdout_batches, specs)
        result.fidelity_after = output_fidelity(teacher, ort_session(result_model), holdout_batches, specs)
    with atomic_output(output) as tmp:
        save_model(result_model, tmp, external_data=external_data)
        check_model(tmp)
    return result


def _replace_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
            return
    raise EspaceError(f"weight {name} is not an initializer", "re-export the model with weights as initializers")


__all__ = ["HealingResult", "distillation_loss", "heal_onnx"]
