"""Healing: retrain a PyTorch model through static ESPACE projections, then export the compressed graph.

The paper's training view (§2.2): a projected GEMM computes ``W·(P Pᵀ x)`` with ``P`` static and ``W``
whole and trainable, so a compressed model can be retrained with every weight and with the baseline's
optimizer state. At inference the same layer is ``(x·P)·(PᵀW)`` — the pair :mod:`graph_passes.project`
writes.

This module, in the order a user meets it:

- :func:`calibrate` — P per layer from activation statistics collected on the PyTorch model itself
  (forward hooks, the same :class:`~espace_export.calibration.statistics.ActivationStats` and candidates as the
  ONNX path), L per layer from :func:`~espace_export.selection.choose_rank`.
- :func:`load_projections` — or P from the ONNX path: a compressed ``.onnx`` (its tagged pairs) or a
  ``.npz`` written by :func:`save_projections`.
- :func:`attach_projections` — turn each targeted ``nn.Linear`` / GPT-2 ``Conv1D`` into its projected
  form in place: the module's class is swapped for a subclass whose forward projects, and P becomes a
  non-persistent buffer ``espace_P``. ``weight`` and ``bias`` stay the same Parameter objects, so
  parameter names, shapes, order, ``state_dict()`` keys and an existing optimizer state all carry over.
- :func:`export_onnx` — export the healed model densely with the user's own exporter call, then rewrite
  the targeted GEMMs into projected pairs with the same P (:func:`fold_onnx`): the output is what
  ``espace-export`` itself writes, and reproduces the healed model's outputs to float32 round-off.

Names: a projection is keyed by the module path from the model's root (``model.layers.0.self_attn.q_proj``),
which is also how :func:`graph_passes.find.find_targets` names the layers of a graph exported from that
root. When the two roots differ by leading components (an export wrapper adds ``model.``), the common
prefix is added or removed automatically; anything else must be renamed by the caller.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espace_export._optional import require
from espace_export.calibration.statistics import ActivationStats, StatsPrecision, token_mask
from espace_export.errors import EspaceError
from espace_export.io.models import atomic_output, check_model, check_writable, load_model, read_arrays, save_model
from espace_export.options import RankOptions
from espace_export.selection.candidates import (
    CANDIDATES,
    FORWARD_CANDIDATES,
    NORMALIZED_CANDIDATES,
    candidate_matrix,
    eigen_decomposition,
)
from espace_export.selection.ranks import layer_rank
from graph_passes import Projection, find_projected_pairs, find_targets, project
from graph_passes.find import _HEAD_NAME_HINTS, ConstantTable, weight_matrix

require("torch", extra="torch", purpose="healing (espace_export.heal)")  # one line, not a traceback
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

PROJECTION_BUFFER = "espace_P"
OBLIQUE_BUFFER = "espace_M"  # oblique projections (A, M): M (L×K) with M·A = I; absent for ESPACE (M = Pᵀ)
OBLIQUE_KEY_SUFFIX = "@M"  # an oblique layer's M in a projections .npz: under its name + this suffix
ProjectionFactors = np.ndarray | torch.Tensor | tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]
WEIGHT_FREE_CANDIDATES = ("mse", "nmse")


# --------------------------------------------------------------------------- projected modules


class ProjectedLinear(nn.Linear):
    """``nn.Linear`` whose input is projected onto the static ``espace_P`` (K×L): ``y = W·P·Pᵀ·x + b``.

    Computed as ``(x·P)·(W·P)ᵀ``: the input is projected first and ``P·Pᵀ`` (K×K) is never formed, so a
    step costs ``M·K·L + N·K·L + M·L·N`` multiply-adds instead of ``M·K·N`` (fewer whenever L is well below
    K and N), and the backward pass is as cheap. ``weight`` keeps its shape (N×K) and receives the full
    gradient ``(∂y)ᵀ·(x·P)·Pᵀ``.
    """

    espace_P: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input @ self.espace_P, self.weight @ _fold_matrix(self), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.espace_P.shape[1]}"


class _ProjectedConv1D:
    """GPT-2 ``Conv1D`` (weight stored K×N) with its input projected: ``y = (x·P)·(Pᵀ·W) + b``."""

    espace_P: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    nf: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]) @ self.espace_P
        return torch.addmm(self.bias, rows, _fold_matrix(self).T @ self.weight).view(*x.shape[:-1], self.nf)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"ProjectedConv1D(nf={self.nf}, nx={self.weight.shape[0]}, rank={self.espace_P.shape[1]})"


def _fold_matrix(module: nn.Module) -> torch.Tensor:
    """The K×L matrix Q with ``x·W_kn`` projected as ``(x·P)·(Qᵀ·W_kn)``: P for ESPACE, Mᵀ for an oblique pair
    (whose second factor M·W is folded from the whole weight, which is what trains)."""
    M = module._buffers.get(OBLIQUE_BUFFER)
    return module._buffers[PROJECTION_BUFFER] if M is None else M.T  # type: ignore[return-value]


_PROJECTED_CONV1D: dict[type, type] = {}  # dense Conv1D class → its projected subclass


def _is_conv1d(cls: type) -> bool:
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _projected_class(module: nn.Module) -> type | None:
    """The projected class for ``module``'s class, or None when its forward is not one we know.

    Only exact ``nn.Linear`` and transformers' ``Conv1D``: a subclass may not compute ``x·Wᵀ + b`` in its
    forward (``nn.MultiheadAttention.out_proj`` never calls its own).
    """
    cls = type(module)
    if cls is nn.Linear or cls is ProjectedLinear:
        return ProjectedLinear
    if cls in _PROJECTED_CONV1D.values():
        return cls
    if _is_conv1d(cls):
        if cls not in _PROJECTED_CONV1D:
            projected = type("ProjectedConv1D", (_ProjectedConv1D, cls), {"__module__": __name__})
            _PROJECTED_CONV1D[cls] = projected
            globals().setdefault("ProjectedConv1D", projected)  # so pickle finds it by name
        return _PROJECTED_CONV1D[cls]
    return None


def _dense_class(module: nn.Module) -> type:
    if isinstance(module, ProjectedLinear):
        return nn.Linear
    return next(dense for dense, projected in _PROJECTED_CONV1D.items() if projected is type(module))


def is_projected(module: nn.Module) -> bool:
    return isinstance(module, ProjectedLinear | _ProjectedConv1D)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(K, N)`` of the layer's ``Y = X·W``: input and output widths."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    K, N = _weight(module).shape  # Conv1D stores W as K×N
    return int(K), int(N)


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def weight_kn(module: nn.Module) -> np.ndarray:
    """The layer's weight as the K×N matrix of ``Y = X·W`` in float64 (for the weight-aware candidates)."""
    W = _weight(module).detach().to("cpu", torch.float64)
    return (W.T if isinstance(module, nn.Linear) else W).numpy()


# --------------------------------------------------------------------------- targets and names


def target_modules(
    model: nn.Module, *, include_heads: bool = False, exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """The weight GEMMs ESPACE can project, by module path, in module order.

    Exact ``nn.Linear`` and transformers ``Conv1D`` modules (already projected ones included). Output heads
    — names with ``lm_head``, ``pooler``, ``classifier``, …, a weight shared with an ``nn.Embedding``, or
    an HF model's ``get_output_embeddings()`` — are left out unless ``include_heads``, as in the ONNX path
    (the paper compresses only QKV, Proj, FC1 and FC2). ``exclude`` holds regular expressions on names.
    """
    patterns = [re.compile(p) for p in exclude]
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads: set[int] = set()
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter):
            with contextlib.suppress(Exception):
                head = getter()
                if isinstance(head, nn.Module):
                    heads.add(id(head))
    found = {}
    for name, module in model.named_modules():
        if _projected_class(module) is None or any(p.search(name) for p in patterns):
            continue
        is_head = (
            any(hint in name.lower() for hint in _HEAD_NAME_HINTS)
            or id(_weight(module)) in embedding_weights
            or id(module) in heads
        )
        if is_head and not include_heads:
            continue
        found[name] = module
    return found


def targeted_parameters(model: nn.Module, *, include_heads: bool = False) -> tuple[int, int]:
    """Weights of the targeted GEMMs (:func:`target_modules`) densely, and in inference form: ``L(K+N)``
    for a projected layer (P and PᵀW; a P shared by siblings is counted with each), ``KN`` for a dense one."""
    before = after = 0
    for module in target_modules(model, include_heads=include_heads).values():
        K, N = layer_shape(module)
        before += K * N
        after += getattr(module, PROJECTION_BUFFER).shape[1] * (K + N) if is_projected(module) else K * N
    return before, after


def match_names(wanted: Iterable[str], available: Iterable[str]) -> dict[str, str]:
    """Map each ``wanted`` layer name onto one of ``available``: exactly, or with one common leading
    prefix added or removed for all of them (``model.layers.0.mlp.up_proj`` ↔ ``model.model.layers.0.mlp.up_proj``).

    Raises :class:`EspaceError` naming the first layers that match nothing.
    """
    wanted = list(wanted)
    available_set = set(available)
    if all(name in available_set for name in wanted):
        return {name: name for name in wanted}
    probe = next(name for name in wanted if name not in available_set)
    prefixes: list[tuple[str, str]] = []  # (removed, added)
    for candidate in sorted(available_set):
        if candidate.endswith("." + probe):
            prefixes.append(("", candidate[: -len(probe)]))
        elif probe.endswith("." + candidate):
            prefixes.append((probe[: -len(candidate)], ""))
    for removed, added in prefixes:
        mapping = {name: added + name.removeprefix(removed) for name in wanted}
        if all(target in available_set for target in mapping.values()):
            return mapping
    missing = [name for name in wanted if name not in available_set][:3]
    examples = sorted(available_set)[:3]
    raise EspaceError(
        f"no layer named {', '.join(missing)} (the model has e.g. {', '.join(examples) or 'no projectable layers'})",
        "calibrate or export from the same root module, or rename the projections to the model's module paths",
    )


# --------------------------------------------------------------------------- attach / detach


def attach_projections(model: nn.Module, projections: Mapping[str, ProjectionFactors] | str | Path) -> list[str]:
    """Project the input of each named layer onto its P, in place; returns the module paths projected.

    ``projections`` maps layer names to K×L matrices with orthonormal columns (from :func:`calibrate` or
    :func:`load_projections`), or is a path :func:`load_projections` reads. P is stored in the layer's
    weight dtype and device as the non-persistent buffer ``espace_P``: it is not a parameter (no gradient,
    no optimizer entry) and not in ``state_dict()``, whose keys therefore stay those of the dense model —
    save it with :func:`save_projections`. Attaching again replaces P.

    A value may also be a pair ``(A, M)`` — an oblique projection (``method="oblique"`` of a plan: A K×L,
    M L×K, M·A = I): the layer computes ``(x·A)·(M·W)``, M is a second static buffer ``espace_M``, and W
    still trains whole.
    """
    if isinstance(projections, str | Path):
        projections = load_projections(projections)
    modules = dict(model.named_modules())
    projectable = {name for name, module in modules.items() if _projected_class(module) is not None}
    mapping = match_names(projections, projectable)
    attached = []
    for name, factors in projections.items():
        module = modules[mapping[name]]
        K, _ = layer_shape(module)
        P, M = factors if isinstance(factors, tuple) else (factors, None)
        P_tensor = _as_buffer(P, module)
        if P_tensor.ndim != 2 or P_tensor.shape[0] != K or not 1 <= P_tensor.shape[1] <= K:
            raise EspaceError(
                f"projection for {name} has shape {tuple(P_tensor.shape)}, the layer needs K×L with K={K}, 1 ≤ L ≤ K",
                "calibrate the projections on this model (espace_export.heal.calibrate)",
            )
        M_tensor = None if M is None else _as_buffer(M, module)
        if M_tensor is not None and tuple(M_tensor.shape) != (P_tensor.shape[1], K):
            raise EspaceError(
                f"oblique projection for {name} has A {tuple(P_tensor.shape)} and M {tuple(M_tensor.shape)}, "
                f"M must be L×K = {P_tensor.shape[1]}×{K}",
                "pass the (A, M) of one oblique factorisation (plan method 'oblique')",
            )
        module.__class__ = _projected_class(module)  # type: ignore[assignment]
        module.register_buffer(PROJECTION_BUFFER, P_tensor, persistent=False)
        module._buffers.pop(OBLIQUE_BUFFER, None)
        if M_tensor is not None:
            module.register_buffer(OBLIQUE_BUFFER, M_tensor, persistent=False)
        attached.append(mapping[name])
    return attached


def _as_buffer(matrix: np.ndarray | torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``matrix`` as a tensor in the layer's weight dtype and device (a copy: a numpy array may be read-only)."""
    tensor = matrix if isinstance(matrix, torch.Tensor) else torch.from_numpy(np.array(matrix))
    return tensor.detach().to(device=_weight(module).device, dtype=_weight(module).dtype).contiguous()


def _factors_of(module: nn.Module) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    M = module._buffers.get(OBLIQUE_BUFFER)
    P = module._buffers[PROJECTION_BUFFER]
    return P if M is None else (P, M)  # type: ignore[return-value]


def projections_of(model: nn.Module) -> dict[str, Any]:
    """The attached P of every projected layer (``(A, M)`` for an oblique one), by module path from ``model``."""
    return {name: _factors_of(m) for name, m in model.named_modules() if is_projected(m)}


def detach_projections(model: nn.Module) -> dict[str, Any]:
    """Restore every projected layer to its dense class and drop its P (and M), in place; returns what was
    dropped, as :func:`projections_of` gives it."""
    removed = {}
    for name, module in model.named_modules():
        if is_projected(module):
            removed[name] = _factors_of(module)
            module._buffers.pop(PROJECTION_BUFFER)
            module._buffers.pop(OBLIQUE_BUFFER, None)
            module.__class__ = _dense_class(module)
    return removed


@contextlib.contextmanager
def detached(model: nn.Module) -> Iterator[dict[str, Any]]:
    """The dense model for the duration of the block (export, comparison), projected again afterwards."""
    removed = detach_projections(model)
    try:
        yield removed
    finally:
        attach_projections(model, removed)


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability of ``model`` to 0, as the paper does while healing; returns how many.

    Covers ``nn.Dropout*`` modules, float ``*dropout*`` attributes of modules (HF eager attention reads
    ``self.attention_dropout`` at call time) and the ``*dropout``/``*pdrop`` fields of HF configs.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p:
            module.p = 0.0
            changed += 1
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float) and value:
                setattr(module, key, 0.0)
                changed += 1
        config = getattr(module, "config", None)
        for key in dir(config) if config is not None and hasattr(config, "to_dict") else ():
            if key.endswith(("dropout", "pdrop", "dropout_prob")) and isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)
    return changed


# --------------------------------------------------------------------------- self-distillation


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` without its projections (the dense original): the teacher of
    :func:`distillation_loss`. Make it before training moves the weights."""
    import copy

    teacher = copy.deepcopy(model)
    detach_projections(teacher)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _field(outputs: Any, name: str) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs if name == "main" else None
    if name == "main":
        for key in ("logits", "last_hidden_state"):
            value = getattr(outputs, key, None)
            if value is not None:
                return value
        return outputs[0]
    return getattr(outputs, name, None)


def distillation_loss(
    student: Any, teacher: Any, kind: str = "auto", *, mask: torch.Tensor | None = None, hidden_weight: float = 0.0
) -> torch.Tensor:
    """The loss ``espace-export heal`` trains with, for a PyTorch training loop: ``student`` and ``teacher``
    are the outputs of the projected model and of :func:`frozen_teacher` on one batch (tensors or HF model
    outputs, ``logits`` or ``last_hidden_state`` read first).

    ``kl``: KL(teacher ‖ student) of next-token distributions, mean over (``mask``) tokens; ``distill``:
    ``1 − cosine`` of output rows; ``auto``: ``kl`` for rank-3 ``logits``, else ``distill``. With
    ``hidden_weight`` > 0 and ``hidden_states`` in both outputs (``output_hidden_states=True``), plus that
    weight × the relative MSE of the token states (:func:`espace_export.heal_onnx.hidden_state_loss`).
    """
    from espace_export.heal_onnx import distillation_loss as output_loss
    from espace_export.heal_onnx import hidden_state_loss

    main_s, main_t = _field(student, "main"), _field(teacher, "main")
    if kind == "auto":
        kind = "kl" if getattr(student, "logits", None) is not None and main_s.dim() == 3 else "distill"
    if kind not in ("kl", "distill"):
        raise EspaceError(f"unknown distillation loss {kind!r}", "use kl, distill or auto")
    loss = output_loss(main_s, main_t.detach(), kind, mask)
    hidden_s, hidden_t = _field(student, "hidden_states"), _field(teacher, "hidden_states")
    if hidden_weight > 0 and hidden_s is not None and hidden_t is not None:
        loss = loss + hidden_weight * hidden_state_loss(hidden_s, [h.detach() for h in hidden_t], mask)
    return loss  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- calibration


def collect_statistics(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    normalized: bool = False,
    precision: StatsPrecision = "float32",
) -> tuple[dict[str, ActivationStats], dict[str, str]]:
    """Input statistics of ``modules`` over ``batches`` (each run as ``model(**batch)`` without gradients).

    Layers that read the same tensor in a row (Q, K and V; gate and up) share one statistic, owned by the
    first of them: returns the statistics by owner and each layer's owner. Rows where the batch's
    ``attention_mask`` is 0 are left out.
    """
    stats = {name: ActivationStats(layer_shape(m)[0], normalized) for name, m in modules.items()}
    owner: dict[str, str] = {}
    state: dict[str, Any] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            shared = state.get("last") is x
            owner.setdefault(name, state["owner"] if shared else name)
            state["last"], state["owner"] = x, owner[name]
            if owner[name] != name:
                return
            rows = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32).numpy()
            mask = token_mask(state["feed"], rows.shape[0])
            stats[name].add(rows if mask is None else rows[mask], precision)

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                state.clear()
                state["feed"] = {} if mask is None else {"attention_mask": mask.detach().cpu().numpy()}
                model(**batch)
    finally:
        state.clear()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not any(s.rows for s in stats.values()):
        raise EspaceError("calibration saw no activations", "give calibration batches that run the targeted layers")
    return {name: stats[name] for name in set(owner.values())}, owner


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    ranks: RankOptions | None = None,
    *,
    candidate: str = "mse",
    precision: StatsPrecision = "float32",
    **rank_settings: Any,
) -> dict[str, np.ndarray]:
    """ESPACE projections for ``model``'s GEMM layers, calibrated on ``batches``: layer name → P (K×L, float32).

    Which layers and their ranks: a :class:`~espace_export.options.RankOptions` (``ranks``), or its fields as
    keywords (``ratio=0.5, min_rank=4``) over ``ranks`` — the same rules as ``espace_export.compress``
    (``layer_ratio``, which only selection uses, has no effect here). L per layer by
    :func:`~espace_export.selection.choose_rank` (or a forced ``rank``, clipped to K); layers where no L ≥
    ``min_rank`` fits are absent (stay dense). ``candidate`` is one of the forward candidates (``mse``,
    ``nmse``, ``go-mse``, ``go-mse-l2``). ``siblings="shared"`` (default, as ``compress``): layers that read one
    tensor (Q/K/V, gate/up) get one P, ranked and fitted as their fused GEMM; ``"separate"``: one each
    (weight-free candidates at equal rank still coincide). Identical P let the exported graph compute ``X·P``
    once.
    """
    options = (ranks or RankOptions()).with_settings(**rank_settings)
    if candidate not in FORWARD_CANDIDATES:
        raise EspaceError(
            f"unknown or unsupported candidate {candidate!r}", f"choose from {', '.join(FORWARD_CANDIDATES)}"
        )
    modules = target_modules(model, include_heads=options.include_heads, exclude=options.exclude)
    if not modules:
        raise EspaceError(
            "the model has no nn.Linear or Conv1D layer to project", "pass include_heads=True or another model"
        )
    stats, owner = collect_statistics(
        model, modules, batches, normalized=candidate in NORMALIZED_CANDIDATES, precision=precision
    )
    layer_ranks = _layer_ranks(modules, owner, options)

    def key(name: str) -> str:  # layers whose P is one: weight-free candidates per input, or a shared group
        return owner[name] if candidate in WEIGHT_FREE_CANDIDATES or options.siblings == "shared" else name

    members_of: dict[str, list[str]] = {}
    for name in layer_ranks:
        members_of.setdefault(key(name), []).append(name)
    vectors: dict[str, np.ndarray] = {}
    projections = {}
    for name, L in layer_ranks.items():
        if key(name) not in vectors:
            activation = stats[owner[name]]
            weights = [weight_kn(modules[n]) for n in members_of[key(name)]]
            C, by_magnitude = candidate_matrix(
                candidate,  # type: ignore[arg-type]
                C_X=activation.C_X,
                C_X_normalized=activation.C_X_normalized if activation.normalized else None,
                W=None if candidate in WEIGHT_FREE_CANDIDATES else np.concatenate(weights, axis=1),
            )
            top = max(layer_ranks[n] for n in members_of[key(name)])
            vectors[key(name)] = eigen_decomposition(C, by_magnitude=by_magnitude, top=top)[1]
        projections[name] = np.ascontiguousarray(vectors[key(name)][:, :L], dtype=np.float32)
    return projections


def _layer_ranks(modules: Mapping[str, nn.Module], owner: Mapping[str, str], options: RankOptions) -> dict[str, int]:
    """L for each layer that ran on the calibration batches (``owner``: layer → the input it reads), ranked
    per shared group (their fused GEMM) or per layer; layers where no L ≥ ``min_rank`` fits are left out."""
    groups: dict[str, list[str]] = {}
    for name in modules:
        if name in owner:  # modules that never ran on these batches stay dense
            groups.setdefault(owner[name] if options.siblings == "shared" else name, []).append(name)
    ranks: dict[str, int] = {}
    for members in groups.values():
        K = layer_shape(modules[members[0]])[0]
        N = sum(layer_shape(modules[n])[1] for n in members)
        L = layer_rank(K, N, options.ratio, rule=options.rank_rule, min_rank=options.min_rank, rank=options.rank)
        if L is not None:
            ranks.update(dict.fromkeys(members, L))
    if not ranks:
        raise EspaceError(
            f"no layer can reach ratio {options.ratio} with a rank of at least {options.min_rank}",
            "lower min_rank, use rank_rule=16, or lower the ratio",
        )
    return ranks


# --------------------------------------------------------------------------- projections on disk


def _numpy(matrix: np.ndarray | torch.Tensor) -> np.ndarray:
    return matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)


def save_projections(projections: Mapping[str, ProjectionFactors], path: str | Path) -> Path:
    """Write ``projections`` (layer name → P, or ``(A, M)``) to one ``.npz`` file, atomically (an oblique
    layer's M under ``name`` + ``@M``)."""
    path = check_writable(Path(path))
    arrays = {}
    for name, factors in projections.items():
        P, M = factors if isinstance(factors, tuple) else (factors, None)
        arrays[name] = _numpy(P)
        if M is not None:
            arrays[name + OBLIQUE_KEY_SUFFIX] = _numpy(M)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return path


@dataclass(frozen=True)
class WeightFactors:
    """A layer a plan compresses by a weight factorisation (``svd``, ``asvd``, ``whitened-svd``): ``W ≈ A·B``
    with no static projection; only its two factors can be trained (``heal --train factors``)."""

    A: np.ndarray  # K×L
    B: np.ndarray | None  # L×N; None: AᵀW, folded from the model's weight (A orthonormal, e.g. svd's U_L)


def load_projections(source: str | Path | onnx.ModelProto, factorizations: bool = False) -> dict[str, Any]:
    """Layer name → P from a ``.npz`` (:func:`save_projections`), a plan (``espace-export plan``'s ``.json``
    with its ``.npz``) or a compressed ONNX model.

    From a plan, P is the input factor A of each selected layer, or ``(A, M)`` for a layer the plan
    compresses with ``oblique``; a weight factorisation such as ``svd`` has no static projection to heal
    through: refused, or with ``factorizations`` a :class:`WeightFactors`. A ``.npz`` gives ``(A, M)`` where
    it holds M. From ONNX, P is the second input of each ``espace.role = project`` node that
    :func:`graph_passes.project.project` wrote (``espace-export`` output), keyed by its ``espace.layer``.
    """
    if isinstance(source, onnx.ModelProto):
        return _projections_in_graph(source)
    path = Path(source)
    if path.suffix == ".json":
        return _projections_in_plan(path, factorizations)
    if path.suffix == ".npz":
        if not path.is_file():
            raise EspaceError(f"projections not found: {path}", "pass a .npz written by save_projections")
        arrays = read_arrays(path, "projections", "pass a .npz written by save_projections")
        return {
            name: (P, arrays[name + OBLIQUE_KEY_SUFFIX]) if name + OBLIQUE_KEY_SUFFIX in arrays else P
            for name, P in arrays.items()
            if not name.endswith(OBLIQUE_KEY_SUFFIX)
        }
    return _projections_in_graph(load_model(path), str(path))


def _projections_in_plan(path: Path, factorizations: bool = False) -> dict[str, Any]:
    from espace_export.io.artifacts import load_plan

    plan = load_plan(path)
    found: dict[str, Any] = {}
    for layer in plan.selected_layers():
        factors = plan.factors[layer.name]
        if factors.M is not None:
            found[layer.name] = (
                np.ascontiguousarray(factors.A, np.float32),
                np.ascontiguousarray(factors.M, np.float32),
            )
            continue
        if factors.method not in CANDIDATES and factorizations:
            B = None if factors.B is None else np.asarray(factors.B, np.float32)
            found[layer.name] = WeightFactors(np.asarray(factors.A, np.float32), B)
            continue
        if factors.method not in CANDIDATES:
            raise EspaceError(
                f"plan {path} compresses {layer.name} with {factors.method}, a weight factorisation with no static projection",
                f"make the plan with ESPACE methods only ({', '.join(FORWARD_CANDIDATES)}, nl-mse, nl-mse-l2, oblique)"
                " or train its factors (heal --train factors)",
            )
        found[layer.name] = np.ascontiguousarray(factors.A, dtype=np.float32)
    if not found:
        raise EspaceError(f"plan {path} selects no layer", "make a plan that compresses at least one layer")
    return found


def _projections_in_graph(model: onnx.ModelProto, where: str = "the model") -> dict[str, np.ndarray]:
    constants = ConstantTable(model.graph)
    nodes = {node.name: node for node in model.graph.node}
    found = {pair.name: constants.array(nodes[pair.project_node].input[1]) for pair in find_projected_pairs(model)}
    if not found:
        raise EspaceError(
            f"{where} holds no ESPACE projections", "pass a model written by espace-export, or a .npz of projections"
        )
    return found


def checkpoint_callback(filename: str = "espace_projections.npz") -> Any:
    """A transformers ``TrainerCallback`` that writes the model's projections into every checkpoint directory.

    ``Trainer`` checkpoints hold ``state_dict()`` — W without P — so a run resumed from one needs P again:
    ``attach_projections(model, checkpoint / filename)`` before ``trainer.train(resume_from_checkpoint=...)``.
    """
    from transformers import TrainerCallback

    class SaveProjections(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
            if model is not None and state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                save_projections(projections_of(model), checkpoint / filename)

    return SaveProjections()


# --------------------------------------------------------------------------- export


def fold_onnx(model: onnx.ModelProto, projections: Mapping[str, ProjectionFactors]) -> onnx.ModelProto:
    """Rewrite the dense ``model`` in place (and return it) so each projected layer becomes ``(X·P)·(PᵀW)``
    (``(X·A)·(M·W)`` for an oblique ``(A, M)``).

    ``model`` is the healed model exported densely; layers are found by :func:`graph_passes.find.find_targets`
    (heads included) and matched by name (:func:`match_names`).
    """
    targets = {t.name: t for t in find_targets(model, include_heads=True)}
    mapping = match_names(projections, targets)
    rewrites = []
    for name, factors in projections.items():
        target = targets[mapping[name]]
        P, M = factors if isinstance(factors, tuple) else (factors, None)
        P_array = _numpy(P)
        if P_array.shape[0] != target.K:
            raise EspaceError(
                f"projection for {name} has {P_array.shape[0]} rows, the exported layer has K={target.K}",
                "export the same model the projections were attached to",
            )
        folded = None
        if M is not None:  # the healed W folded through the static M, in float64 as fold_weight does
            folded = _numpy(M).astype(np.float64) @ weight_matrix(model, target).astype(np.float64)
        rewrites.append(Projection(target, P_array, folded=folded))
    return project(model, rewrites)


def export_onnx(
    model: nn.Module,
    output: str | Path,
    export: Callable[[nn.Module, Path], object],
    *,
    external_data: bool | None = None,
) -> Path:
    """Export the projected ``model`` to ``output`` in ESPACE's inference form.

    ``export(module, path)`` is the caller's usual dense export (``torch.onnx.export`` with their inputs,
    names and dynamic axes; either exporter); it runs on ``model`` with its projections detached, so the
    graph holds the healed weights W. Each projected layer is then rewritten to ``(X·P)·(PᵀW)`` with the
    same P (:func:`fold_onnx`) and tagged as ``espace-export`` tags its own output. Written atomically.
    """
    output = check_writable(Path(output))
    projections = {
        name: tuple(_numpy(x) for x in factors) if isinstance(factors, tuple) else _numpy(factors)
        for name, factors in projections_of(model).items()
    }
    if not projections:
        raise EspaceError("the model has no projected layers", "attach_projections(model, ...) before exporting")
    with tempfile.TemporaryDirectory() as tmp, detached(model):
        dense = Path(tmp) / "dense.onnx"
        export(model, dense)
        if not dense.is_file():
            raise EspaceError(
                "the export function wrote nothing", "make it write the ONNX file to the path it is given"
            )
        graph = onnx.load(str(dense), load_external_data=True)
    fold_onnx(graph, projections)  # type: ignore[arg-type]
    with atomic_output(output) as tmp_output:
        save_model(graph, tmp_output, external_data=external_data)
        check_model(tmp_output)
    return output
