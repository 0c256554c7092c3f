"""Healing from the ONNX alone: retrain every targeted weight W through static projections, by
self-distillation from the original model, with no PyTorch model at hand.

The original ``.onnx`` is evaluated by the ONNX→torch interpreter the gradient statistics already use
(:class:`espace_export.calibration.onnx_torch.TorchGraph`). Each projected layer's weight constant becomes
``P·(Qᵀ·W)`` with W a trainable parameter (K×N, whole) and P, Q static — ``Q = P`` for ESPACE's
orthonormal projections, ``Q = Mᵀ`` for an oblique pair ``(A, M)`` — so the graph computes exactly
``(X·P)·(QᵀW)``, the pair the compressed model runs. With ``train="factors"`` the pair's two factors train
instead (A = P, B = QᵀW, or a weight factorisation's own A and B: how the SVD baselines are fine-tuned);
siblings that share one P in the plan share one trained A, so the healed graph keeps the plan's shape.
LayerNorm scales and shifts and the biases of the projected GEMMs train too (``train_norms``).

The teacher is the original model in ONNX Runtime, its outputs kept per batch while they fit in
``teacher_cache`` GiB (else it runs again at each step): its first output and the output of every
``LayerNormalization`` (the token states between blocks; kept as bfloat16, half the memory — the loss reads
them in float32, and their rounding, 2⁻⁹ relative, is far below the student's error). The batches are
visited in a new random order on each pass (``shuffle``). The loss (:func:`distillation_loss`): the KL of next-token distributions for a causal LM (``logits [batch, seq,
vocab]``), ``1 − cosine`` of output rows otherwise, plus ``hidden_weight`` × the mean squared error of the
token states relative to the teacher's (:func:`hidden_state_loss`). AdamW, linear warm-up then cosine
decay over ``steps`` (or over the steps that fit in ``minutes``). Checkpoints (W, trained norms, optimizer,
step) let an interrupted run resume. The healed W is folded (``PᵀW`` or ``M·W``) and written as the usual
compressed graph (:func:`graph_passes.project`), with a report of the held-out fidelity before and after,
as one atomic set.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espace_export.errors import EspaceError
from espace_export.io.models import atomic_output_set, check_model, check_writable, load_model, save_model
from espace_export.memory import available_memory
from espace_export.options import option
from graph_passes import Projection, find_targets, project
from graph_passes.find import GemmTarget, weight_matrix

HEAL_LOSSES = ("auto", "kl", "distill")
HEAL_STARTS = ("least-squares", "none")
HEAL_TRAINS = ("weights", "factors")
HEAL_AUTOCASTS = ("auto", "bf16", "off")
_HEALING = "Healing"
CHECKPOINT_NAME = "heal-checkpoint.pt"
START_TOKENS = 65536  # tokens the least-squares start fits on (its statistics are K×K per layer group)


@dataclass(frozen=True)
class HealOptions:
    """How a compressed model is healed: schedule, loss, what trains, checkpoints."""

    steps: int = option(
        300, "Most optimizer steps (batches are cycled); 0: the least-squares start alone. A cap also under "
        "--minutes: pass a large --steps to let the time decide.", panel=_HEALING,
    )  # fmt: skip
    minutes: float | None = option(
        None, "Stop after this many minutes or --steps, whichever comes first; the schedule is fitted to the "
        "steps that fit.", panel=_HEALING,
    )  # fmt: skip
    lr: float = option(2e-4, "Peak learning rate (AdamW; linear warm-up, cosine decay).", panel=_HEALING)
    warmup: float = option(0.05, "Fraction of the steps spent warming up.", panel=_HEALING)
    weight_decay: float = option(0.0, "AdamW weight decay.", panel=_HEALING)
    loss: str = option(
        "auto", "kl (causal LM logits), distill (cosine of outputs), or auto.", panel=_HEALING, choices=HEAL_LOSSES
    )
    hidden_weight: float = option(
        1.0, "Weight of the token-state MSE (every LayerNormalization output) in the loss; 0: outputs only. "
        "More weight generalizes better for an embedding model healed on little text (MiniLM: 3 and 10 beat 1).",
        panel=_HEALING,
    )  # fmt: skip
    hidden_weight_end: float | None = option(
        None, "Where the token-state weight ends: after the warm-up it moves from --hidden-weight to this along "
        "the learning rate's cosine decay (e.g. 0: the block outputs guide the early steps, the outputs alone the "
        "last); default: --hidden-weight throughout.", panel=_HEALING,
    )  # fmt: skip
    start: str = option(
        "none", "least-squares: first fit each pair, in graph order, to the original layer's output on "
        "the compressed model's own input (one pass per layer group, on batches spread over the text, "
        "≈ 64k tokens); none: from the one-shot weights.",
        panel=_HEALING, choices=HEAL_STARTS,
    )  # fmt: skip
    teacher_cache: float | None = option(
        None, "GiB of the original model's outputs kept for the next pass over the batches; beyond it the "
        "teacher runs again at each step (and the least-squares start runs it once per layer group) "
        "[default: half the memory available when healing starts].",
        panel=_HEALING,
    )  # fmt: skip
    train: str = option(
        "weights", "weights: W trains whole behind the static projections (ESPACE's healing); factors: the "
        "pair's two factors train instead (how SVD-style factorizations are fine-tuned; siblings sharing one "
        "projection train one A between them).",
        panel=_HEALING, choices=HEAL_TRAINS,
    )  # fmt: skip
    train_norms: bool = option(True, "Also train LayerNorm scales/shifts and the GEMM biases.", panel=_HEALING)
    train_dense: bool = option(
        True, "Also train, whole, the weights of the GEMMs the plan leaves dense (those compress would target; "
        "not embeddings or heads) and their biases; off: only the pairs (and --train-norms) train.", panel=_HEALING,
    )  # fmt: skip
    augment: float = option(
        0.0, "Fraction of the steps that train on a random crop of their batch instead (each text row keeps its "
        "first and last token and a random contiguous half or more of the tokens between; the teacher runs on "
        "each crop): new token sequences rather than the same ones again, against over-fitting a small healing "
        "text; 0: off.", panel=_HEALING,
    )  # fmt: skip
    ema: float = option(
        0.0, "Decay of an exponential moving average of the trained tensors, updated after each step once the "
        "warm-up is over and written instead of the last step's values (0.999: about the last 1,000 steps "
        "averaged); 0: off.", panel=_HEALING,
    )  # fmt: skip
    shuffle: bool = option(
        True, "Visit the batches in a new random order (fixed seed) on each pass over them; off: in the text's "
        "order.", panel=_HEALING,
    )  # fmt: skip
    autocast: str = option(
        "off", "bf16: the student's matrix products, and the bias/mask sums and activations between them, in "
        "bfloat16 (torch autocast; the weights, residual stream, optimizer and loss stay float32), several times "
        "faster on CPUs with native bf16 (AVX512-BF16, AMX); auto: bf16 "
        "where the CPU has it natively; off: float32 throughout.", panel=_HEALING, choices=HEAL_AUTOCASTS,
    )  # fmt: skip
    threads: int | None = option(
        None, "Torch threads [default: torch's]; 1 is fastest on a busy machine.", panel=_HEALING
    )
    checkpoint_dir: Path | None = option(None, "Write a checkpoint here every --checkpoint-every steps.",
                                         panel=_HEALING)  # fmt: skip
    checkpoint_every: int = option(50, "Steps between checkpoints.", panel=_HEALING)
    resume: bool = option(False, "Continue from the checkpoint in --checkpoint-dir.", panel=_HEALING)

    def __post_init__(self) -> None:
        if self.steps < 0 or (self.steps == 0 and self.start == "none"):
            raise EspaceError(f"steps must be at least 1, got {self.steps}",
                              "pass --steps 1 or more (0 only with the least-squares start)")  # fmt: skip
        if self.minutes is not None and not self.minutes > 0:
            raise EspaceError(f"--minutes must be positive, got {self.minutes}", "pass e.g. --minutes 20")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EspaceError(f"--lr must be a positive number, got {self.lr}", "try --lr 2e-4")
        if not 0 <= self.warmup < 1:
            raise EspaceError(f"--warmup must be in [0, 1), got {self.warmup}", "try --warmup 0.05")
        ends = () if self.hidden_weight_end is None else (self.hidden_weight_end,)
        if not all(v >= 0 and math.isfinite(v) for v in (self.weight_decay, self.hidden_weight, *ends)) or not (
            self.teacher_cache is None or self.teacher_cache >= 0
        ):
            raise EspaceError("--weight-decay, --hidden-weight, --hidden-weight-end and --teacher-cache must be "
                              "non-negative numbers", "pass 0 or more")  # fmt: skip
        if not 0 <= self.ema < 1:
            raise EspaceError(f"--ema must be a decay in [0, 1), got {self.ema}", "try --ema 0.999, or 0 for off")
        if not 0 <= self.augment <= 1:
            raise EspaceError(f"--augment must be a fraction in [0, 1], got {self.augment}", "try --augment 0.5")
        if self.loss not in HEAL_LOSSES:
            raise EspaceError(f"unknown healing loss {self.loss!r}", f"use one of {', '.join(HEAL_LOSSES)}")
        if self.train not in HEAL_TRAINS:
            raise EspaceError(f"unknown --train {self.train!r}", f"use one of {', '.join(HEAL_TRAINS)}")
        if self.autocast not in HEAL_AUTOCASTS:
            raise EspaceError(f"unknown --autocast {self.autocast!r}", f"use one of {', '.join(HEAL_AUTOCASTS)}")
        if self.start not in HEAL_STARTS:
            raise EspaceError(f"unknown healing start {self.start!r}", f"use one of {', '.join(HEAL_STARTS)}")
        if self.threads is not None and self.threads < 1:
            raise EspaceError(f"--threads must be at least 1, got {self.threads}", "pass --threads 1 or more")
        if self.checkpoint_every < 1:
            raise EspaceError("--checkpoint-every must be at least 1", "pass a positive step count")
        if self.resume and self.checkpoint_dir is None:
            raise EspaceError("--resume needs --checkpoint-dir", "pass the directory of the interrupted run")


@dataclass
class HealingResult:
    output: Path
    loss: str  # "kl" | "distill"
    steps: int
    losses: list[float]  # training loss per step (this run's steps, after a resume)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # healed K×N weight per layer (float32)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # train="factors": (A, B)
    trained: dict[str, np.ndarray] = field(default_factory=dict)  # other trained initializers, by name
    fidelity_before: dict[str, dict[str, float]] = field(default_factory=dict)
    fidelity_after: dict[str, dict[str, float]] = field(default_factory=dict)
    # the healed model on as many training batches as were held out (:func:`training_sample`): the gap to
    # fidelity_after shows over-fitting of the healing text
    fidelity_train: dict[str, dict[str, float]] = field(default_factory=dict)
    # the teacher cache: batches, those it held, and the bytes all of them would need (from those the teacher ran on)
    cache: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # start and training together
    start_seconds: float = 0.0  # the least-squares start alone
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- losses


def distillation_loss(student: Any, teacher: Any, kind: str, mask: Any = None) -> Any:
    """``kl``: mean over (unmasked) tokens of KL(teacher ‖ student) of the softmax of the last axis;
    ``distill``: mean of ``1 − cosine`` of output rows."""
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
    return (1.0 - F.cosine_similarity(rows_s, rows_t, dim=-1, eps=1e-12)).mean()


def hidden_state_loss(student: Sequence[Any], teacher: Sequence[Any], mask: Any = None) -> Any:
    """Mean over the tensors of ``‖s − t‖² / ‖t‖²`` over (unmasked) token rows: the token states' error,
    scale-free, so every block counts alike."""
    total: Any = 0.0
    for s, t in zip(student, teacher, strict=True):
        diff = (s.float() - t.float()).pow(2).sum(-1)
        ref = t.float().pow(2).sum(-1)
        if mask is not None and tuple(mask.shape) == tuple(diff.shape):
            weights = mask.to(diff.dtype)
            diff, ref = diff * weights, ref * weights
        total = total + diff.sum() / ref.sum().clamp_min(1e-30)
    return total / max(1, len(student))  # a float 0.0 for no tensors


# ---------------------------------------------------------------------------------------------- student


def _static(factors: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(P, Q)`` with the pair ``(X·P)·(QᵀW)``: Q = P (ESPACE), Q = Mᵀ (oblique ``(A, M)``)."""
    if isinstance(factors, tuple):
        A, M = (np.asarray(x, dtype=np.float32) for x in factors)
        return A, np.ascontiguousarray(M.T)
    P = np.asarray(factors, dtype=np.float32)
    return P, P


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


def _check_factors(name: str, target: GemmTarget, P: np.ndarray, Q: np.ndarray) -> None:
    if P.ndim != 2 or P.shape[0] != target.K or Q.shape != P.shape:
        raise EspaceError(
            f"projection for {name} is {P.shape}, the layer has K={target.K}", "use the model it was made for"
        )
    if P is Q and not np.allclose(P.T.astype(np.float64) @ P, np.eye(P.shape[1]), atol=1e-3):
        raise EspaceError(  # a baseline's A (svd-family, oblique) read back from a compressed graph
            f"the projection of {name} is not orthonormal (the layer was compressed by a weight factorisation "
            "or an oblique projection), so it cannot be healed as x·P·PᵀW",
            "heal from the plan (plan.json keeps an oblique layer's M; with --train factors, a weight "
            "factorisation's factors), or compress with ESPACE or oblique methods",
        )


def _reader_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of the main graph read each tensor name."""
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    return readers


def trainable_extras(model: onnx.ModelProto, targets: Sequence[GemmTarget]) -> list[str]:
    """Float initializers read only by LayerNormalization (scale, shift) or by the Add right after a targeted
    GEMM (its bias): the small tensors that heal along with W."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers = _reader_counts(model)
    gemm_outputs = {o for n in model.graph.node if n.name in {t.node for t in targets} for o in n.output}
    found: list[str] = []
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            candidates = list(node.input[1:3])
        elif node.op_type == "Add" and any(i in gemm_outputs for i in node.input):
            candidates = [i for i in node.input if i not in gemm_outputs]
        else:
            continue
        for name in candidates:
            tensor = initializers.get(name)
            if tensor is not None and readers.get(name) == 1 and tensor.data_type == onnx.TensorProto.FLOAT:
                found.append(name)
    return list(dict.fromkeys(found))


def dense_weights(model: onnx.ModelProto, targets: Sequence[GemmTarget]) -> list[str]:
    """The weight initializers of ``targets`` (GEMMs left dense) that healing may train whole: float, and
    read by their GEMM alone (a tied weight stays as it is)."""
    readers = _reader_counts(model)
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return [t.weight for t in targets if t.weight in floats and readers.get(t.weight) == 1]


@dataclass
class _Pair:
    """One projected layer in training. ``train="weights"``: P, Q static and W (K×N) whole and trained, the
    layer computing ``(X·P)·(QᵀW)``; ``"factors"`` (the SVD baselines' way): the two factors A (K×L, in ``P``)
    and B (L×N) trained, the layer computing ``(X·A)·B``, started balanced from ``A = P``, ``B = QᵀW``."""

    target: GemmTarget
    P: Any
    Q: Any
    W: Any = None  # None when the factors train
    B: Any = None  # None when W trains
    initial: np.ndarray | None = None  # the plan's P (or A), for the one-shot model
    initial_B: np.ndarray | None = None  # the plan's B for a weight factorisation (no Q to fold it with)

    def effective(self) -> Any:
        return self.P @ self.second()

    def second(self) -> Any:
        """The L×N factor the pair multiplies ``X·P`` by: ``QᵀW`` (W trains) or B."""
        return self.Q.T @ self.W if self.W is not None else self.B

    def trained(self) -> list[Any]:
        return [self.W] if self.W is not None else [self.P, self.B]


def _balanced(A: Any, B: Any) -> tuple[Any, Any]:
    """``A·diag(s)``, ``diag(1/s)·B`` with each column of A and row of B of one norm: the product unchanged,
    the two factors' gradients on one scale."""
    import torch

    scale = torch.sqrt(B.norm(dim=1) / A.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30)
    return A * scale, B / scale[:, None]


def _tie_factors(pairs: Sequence[_Pair]) -> None:
    """Make each pair's two factors trainable, started balanced; siblings that share one projection (same
    input, byte-identical P) share one trained A, so the healed graph keeps the plan's single ``X·A``."""
    import torch

    groups: dict[tuple[str, bytes], list[_Pair]] = {}
    for pair in pairs:
        assert pair.initial is not None
        groups.setdefault((pair.target.activation, pair.initial.tobytes()), []).append(pair)
    for siblings in groups.values():
        B = torch.cat([pair.B for pair in siblings], dim=1)  # the siblings' B side by side: one scale for all
        A, B = _balanced(siblings[0].P.float(), B)
        shared = torch.nn.Parameter(A)
        start = 0
        for pair in siblings:
            width = pair.B.shape[1]
            pair.P, pair.B = shared, torch.nn.Parameter(B[:, start : start + width].contiguous())
            start += width


class _Projector:
    """``X·P`` for one group of siblings (one input, one P), computed once per input tensor of a run."""

    def __init__(self, P: Any) -> None:
        self.P = P  # the group's one tensor (a trained A is updated in place)
        self.last: tuple[Any, Any] | None = None  # (X, X·P): X held, so its identity cannot be reused

    def __call__(self, x: Any) -> Any:
        if self.last is None or self.last[0] is not x:
            self.last = (x, x @ self.P)
        return self.last[1]


def _factored(pair: _Pair, projector: _Projector, gemm: bool) -> Callable[[list[Any], dict[str, Any]], Any]:
    """The GEMM node of ``pair`` as ``(X·P)·B``: T·L·(K+N) products a step instead of forming the K×N weight
    (K·L·N, and as much again backwards) and multiplying by it (T·K·N)."""

    def run(args: list[Any], attrs: dict[str, Any]) -> Any:
        y = projector(args[0]) @ pair.second()
        if gemm:
            y = attrs.get("alpha", 1.0) * y
            if len(args) > 2 and args[2] is not None:
                y = y + attrs.get("beta", 1.0) * args[2]
        return y

    return run


class _Student:
    """The interpreted graph with W whole and trainable behind each static pair (or the pair's two factors
    trained, ``train="factors"``), plus the trained extras."""

    def __init__(
        self,
        model: onnx.ModelProto,
        projections: Mapping[str, Any],
        train_norms: bool,
        train: str = "weights",
        train_dense: bool = True,
    ) -> None:
        import torch

        from espace_export.calibration.onnx_torch import TorchGraph, fused_activations
        from espace_export.heal import WeightFactors, match_names

        # GELU as one op; the fused copy is made without the weights, which the graph reads from the model
        self.graph = TorchGraph(fused_activations(model, weights=False), weights=model)
        self.original = dict(self.graph.constants)
        targets = {t.name: t for t in find_targets(model, include_heads=True)}
        mapping = match_names(projections, targets)
        self.layers: list[_Pair] = []
        for name, factors in projections.items():
            target = targets[mapping[name]]
            _check_weight_not_shared(model, target)
            W = np.array(weight_matrix(model, target), dtype=np.float32)
            folded = None  # the plan's L×N factor where there is no Q to fold it from W
            if isinstance(factors, WeightFactors):  # svd-style: the plan's own two factors
                if train != "factors":
                    raise EspaceError(f"layer {name} is compressed by a weight factorisation, with no static "
                                      "projection for W to train behind", "pass --train factors")  # fmt: skip
                P_np, Q_np = np.asarray(factors.A, dtype=np.float32), None
                folded = np.asarray(factors.B if factors.B is not None else P_np.T @ W, dtype=np.float32)
                if P_np.shape[0] != target.K or folded.shape != (P_np.shape[1], target.N):
                    raise EspaceError(f"factors of {name} are {P_np.shape}·{folded.shape}, the layer is "
                                      f"{target.K}×{target.N}", "use the model the plan was made for")  # fmt: skip
            else:
                P_np, Q_np = _static(factors)
                _check_factors(name, target, P_np, Q_np)
            P = torch.from_numpy(np.array(P_np))
            Q = None if Q_np is None else torch.from_numpy(np.array(Q_np))
            pair = _Pair(target, P, Q, initial=np.array(P_np), initial_B=folded)
            if train == "factors":
                B0 = folded if folded is not None else np.asarray(Q_np, dtype=np.float32).T @ W  # QᵀW
                pair.B = torch.from_numpy(np.ascontiguousarray(B0))
            else:
                pair.W = torch.nn.Parameter(torch.from_numpy(W))
            self.layers.append(pair)
        if train == "factors":
            _tie_factors(self.layers)
        gemms = {n.name: (n.output[0], n.op_type == "Gemm") for n in model.graph.node
                 if n.name and n.output and n.op_type in ("MatMul", "Gemm")}  # fmt: skip
        groups: dict[tuple[str, bytes], _Projector] = {}
        self.projectors = {}  # layer → its group's projector
        self.unfactored: list[_Pair] = []  # pairs whose node the interpreter does not run as MatMul/Gemm
        for pair in self.layers:
            assert pair.initial is not None
            group = groups.setdefault((pair.target.activation, pair.initial.tobytes()), _Projector(pair.P))
            pair.P = group.P  # static P: equal bytes, one tensor; trained A: already tied
            self.projectors[pair.target.name] = group
            node = gemms.get(pair.target.node)
            if node is not None:  # (X·P)·B at the node
                self.graph.overrides[node[0]] = _factored(pair, group, node[1])
            else:
                self.unfactored.append(pair)
        projected = {pair.target.name for pair in self.layers}
        dense = [t for t in find_targets(model) if t.name not in projected] if train_dense else []
        names = trainable_extras(model, [pair.target for pair in self.layers] + dense) if train_norms else []
        names += dense_weights(model, dense)
        self.extras = {n: torch.nn.Parameter(self.original[n].detach().clone().float()) for n in names}
        self.hidden = [n.output[0] for n in model.graph.node if n.op_type == "LayerNormalization"]
        self.output = model.graph.output[0].name
        self.model = model
        self.session: Any = None  # the teacher's ONNX Runtime session, made on first use

    def parameters(self) -> list[Any]:
        unique = {id(t): t for pair in self.layers for t in pair.trained()}  # a tied A once
        return list(unique.values()) + list(self.extras.values())

    def install(self) -> None:
        """Set the graph up for a run of the student as it is now. Pairs at a node the interpreter runs as
        MatMul/Gemm compute (X·P)·B there (overrides set once); the others get their effective K×N weight."""
        for projector in self.projectors.values():
            projector.last = None  # the last run's X·P, freed
        for pair in self.unfactored:  # X·effective = (X·P)·(QᵀW): the pair, with W whole
            effective = pair.effective()
            self.graph.constants[pair.target.weight] = effective.T if pair.target.stored_transposed else effective
        self.graph.constants.update(self.extras)

    def run(self, feed: Mapping[str, np.ndarray], hidden: bool) -> tuple[Any, list[Any]]:
        names = [self.output, *(self.hidden if hidden else [])]
        values = self.graph.run(feed, outputs=names)
        return values[self.output], [values[n] for n in names[1:]]

    def teacher(self, feed: Mapping[str, np.ndarray], hidden: bool) -> tuple[Any, list[Any]]:
        names = [self.output, *(self.hidden if hidden else [])]
        values = self.teacher_values(feed, names)
        return values[self.output], [values[n] for n in names[1:]]

    def teacher_values(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, Any]:
        """Tensors ``names`` (the output, token states, GEMM inputs) of the original model on ``feed``, run by
        ONNX Runtime: the teacher needs no gradient, and ORT runs it faster than the interpreter (MiniLM,
        batches of 16 paragraphs, 677 tokens on average: ≈ 0.15 s a batch on 2 cores). Its threads do not
        spin between runs: they would take the cores from the student's step that follows (a first pass over
        the batches, the teacher run at each step: 0.34 → 0.31 s a step)."""
        import torch

        if self.session is None:
            from espace_export.runtime import ort_session

            wanted = [self.output, *self.hidden, *(pair.target.activation for pair in self.layers)]
            graph = onnx.ModelProto()
            graph.CopyFrom(self.model)
            present = {o.name for o in graph.graph.output} | {i.name for i in graph.graph.input}
            graph.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(wanted) if n not in present)
            self.session = ort_session(graph, threads=torch.get_num_threads(), spinning=False)
        run = [n for n in names if n not in feed]
        values = dict(zip(run, self.session.run(run, dict(feed)), strict=True))
        return {n: torch.from_numpy(np.asarray(feed[n] if n in feed else values[n])) for n in names}

    def state(self) -> dict[str, Any]:
        return {"layers": {pair.target.name: [t.detach().clone() for t in pair.trained()] for pair in self.layers},
                "extras": {n: p.detach().clone() for n, p in self.extras.items()}}  # fmt: skip

    def load_state(self, state: Mapping[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for pair in self.layers:
                for tensor, saved in zip(pair.trained(), state["layers"][pair.target.name], strict=True):
                    tensor.copy_(saved)
            for name, p in self.extras.items():
                p.copy_(state["extras"][name])


# ---------------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN's AVX512-BF16 / AMX kernels)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def uses_bf16(autocast: str) -> bool:
    """``--autocast``: ``bf16`` always, ``auto`` where :func:`native_bf16`, ``off`` never."""
    return autocast == "bf16" or (autocast == "auto" and native_bf16())


def _hidden_weight(step: int, planned: int, options: HealOptions) -> float:
    """The token-state weight at ``step``: ``--hidden-weight`` through the warm-up, then towards
    ``--hidden-weight-end`` along the learning rate's cosine."""
    start, end = options.hidden_weight, options.hidden_weight_end
    if end is None or step < max(1, int(options.warmup * planned)):
        return start
    return end + (start - end) * _schedule(step, planned, options.warmup)


def _schedule(step: int, planned: int, warmup: float) -> float:
    """Linear warm-up over ``warmup × planned`` steps, then cosine decay to 0 at ``planned``."""
    warm = max(1, int(warmup * planned))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, planned - warm))))


@functools.lru_cache(maxsize=2)
def _pass_order(count: int, epoch: int) -> np.ndarray:
    """The order of the batches in pass ``epoch`` over ``count`` of them: a permutation that depends on nothing
    but its arguments, so a resumed run visits the batches an uninterrupted one would."""
    return np.random.default_rng([0x5EED, epoch]).permutation(count)


def _batch_index(step: int, count: int, shuffle: bool) -> int:
    epoch, at = divmod(step, count)
    return int(_pass_order(count, epoch)[at]) if shuffle else at


CROP_SHORTEST = 0.5  # the least fraction of a row's inner tokens a crop keeps


def check_croppable(batch: Mapping[str, np.ndarray]) -> None:
    """Refuse ``--augment`` on batches :func:`crop_batch` cannot crop: every input must be token-aligned
    ``[batch, seq]`` (ids, attention mask, token types, positions), as text batches are."""
    ids = batch.get("input_ids")
    odd = [n for n, v in batch.items() if ids is None or v.shape != ids.shape]
    if ids is None or ids.ndim != 2 or odd:
        raise EspaceError(
            f"--augment crops token batches of [batch, seq] inputs, and these batches also hold {odd or 'no 2-D input_ids'}",
            "heal from text (--calib-text), or drop --augment",
        )


def crop_batch(
    batch: Mapping[str, np.ndarray], rng: np.random.Generator, shortest: float = CROP_SHORTEST
) -> dict[str, np.ndarray]:
    """A random crop of each row of a token batch: its first and last real token (the tokenizer's special
    tokens: [CLS]/[SEP], BOS/EOS) around a contiguous run of at least ``shortest`` of the tokens between,
    at a random offset; padded on the side the batch is padded on, to the longest cropped row. Every input is
    ``[batch, seq]`` (:func:`check_croppable`); ``position_ids`` are renumbered over the kept tokens."""
    ids = batch["input_ids"]
    rows = ids.shape[0]
    mask = batch.get("attention_mask")
    real = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    keep = [np.flatnonzero(real[r]) for r in range(rows)]
    inner = min(len(k) for k in keep) - 2
    shared = int(rng.integers(math.ceil(shortest * inner), inner + 1)) if mask is None and inner > 1 else None
    for r, where in enumerate(keep):
        if len(where) > 3:
            n = len(where) - 2
            length = shared if shared is not None else int(rng.integers(math.ceil(shortest * n), n + 1))
            at = int(rng.integers(0, n - length + 1))
            keep[r] = np.concatenate([where[:1], where[1 + at : 1 + at + length], where[-1:]])
    width = max(len(k) for k in keep)
    left = mask is not None and bool((~real[:, 0]).any())  # left-padded rows (causal LMs)
    index, valid = np.zeros((rows, width), np.int64), np.zeros((rows, width), bool)
    for r, where in enumerate(keep):
        span = slice(width - len(where), width) if left else slice(0, len(where))
        index[r, span], valid[r, span] = where, True
    cropped = {}
    for name, value in batch.items():
        if name == "position_ids":
            cropped[name] = np.where(valid, np.cumsum(valid, axis=1) - 1, 1 if left else 0).astype(value.dtype)
        else:
            padded = value[~real]
            fill = padded.flat[0] if padded.size else 0
            cropped[name] = np.where(valid, np.take_along_axis(value, index, axis=1), fill).astype(value.dtype)
    return cropped


def _fingerprint(projections: Mapping[str, Any], options: HealOptions) -> str:
    from espace_export.heal import WeightFactors

    digest = hashlib.sha256()
    for name in sorted(projections):
        value = projections[name]
        matrices = (value.A, *([] if value.B is None else [value.B])) if isinstance(value, WeightFactors) else value
        for matrix in matrices if isinstance(matrices, tuple) else (matrices,):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
    digest.update(
        f"{options.steps}|{options.lr}|{options.loss}|{options.train_norms}|{options.start}|{options.train}|"
        f"{options.shuffle}".encode()
        + (
            b""
            if options.hidden_weight_end is None
            else f"|{options.hidden_weight}|{options.hidden_weight_end}".encode()
        )
        + (f"|augment {options.augment}".encode() if options.augment else b"")
        + (f"|ema {options.ema}".encode() if options.ema else b"")
        + (f"|hidden {options.hidden_weight}".encode() if options.hidden_weight != 1.0 else b"")
        + (b"|train dense" if options.train_dense else b"")  # a checkpoint from before the option: --no-train-dense
    )
    return digest.hexdigest()[:16]


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    import torch

    from espace_export.io.models import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise EspaceError(f"no checkpoint at {path}", "drop --resume, or pass the --checkpoint-dir of the run")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EspaceError(f"checkpoint {path} is unreadable ({type(exc).__name__})", "drop --resume") from None
    if payload.get("fingerprint") != fingerprint:
        raise EspaceError(
            f"checkpoint {path} was written for other projections or settings",
            "resume with the same model, plan, --steps, --lr and --loss, or drop --resume",
        )
    return payload  # type: ignore[no-any-return]


@dataclass
class _Loop:
    """The state of one training run: what :func:`_train` advances and checkpoints."""

    student: _Student
    options: HealOptions
    kind: str
    fingerprint: str
    step: int = 0
    planned: int = 0
    losses: list[float] = field(default_factory=list)
    target_bytes: dict[int, int] = field(default_factory=dict)  # the teacher's outputs per batch run, in bytes
    cached: int = 0  # batches whose outputs the teacher cache held at the end
    cache_gib: float = 0.0  # the teacher cache's size (:func:`teacher_cache_gib`)


def train_step(
    student: _Student,
    optimizer: Any,
    feed: Mapping[str, np.ndarray],
    target: tuple[Any, list[Any]],
    kind: str,
    hidden_weight: float,
    lower: bool,
) -> float:
    """One optimizer step of ``student`` towards the teacher's ``target`` (its output and token states) on
    ``feed``: the run under bfloat16 autocast when ``lower``, the loss in float32; returns the loss."""
    import torch

    mask = torch.from_numpy(feed["attention_mask"]) if "attention_mask" in feed else None
    use_hidden = hidden_weight > 0 and bool(student.hidden)
    student.install()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lower):
        output, hidden = student.run(feed, use_hidden)
    value = distillation_loss(output, target[0], kind, mask)  # in float32 either way
    if use_hidden:
        value = value + hidden_weight * hidden_state_loss(hidden, target[1], mask)
    optimizer.zero_grad()
    value.backward()
    optimizer.step()
    return float(value.detach())


def _train(
    loop: _Loop,
    feeds: Sequence[dict[str, np.ndarray]],
    on_step: Callable[[int, float], None] | None,
    crop: Callable[[int, np.random.Generator], dict[str, np.ndarray]] | None = None,
) -> float:
    """Advance ``loop`` to its planned step on ``feeds``; with ``--augment``, ``crop(index, rng)`` gives a
    cropped feed of batch ``index`` for the steps that draw one (a seeded draw per step: a resumed run crops
    as an uninterrupted one would)."""
    import torch

    options, student = loop.options, loop.student
    use_hidden = max(options.hidden_weight, options.hidden_weight_end or 0.0) > 0 and bool(student.hidden)
    targets: dict[int, tuple[Any, list[Any]]] = {}  # the teacher's outputs per batch, kept while they fit
    cached, budget = 0, loop.cache_gib * 2**30
    lower = uses_bf16(options.autocast)
    parameters = student.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=options.lr, weight_decay=options.weight_decay, eps=1e-7)
    average: list[Any] | None = None  # --ema: the moving average of ``parameters``, from the warm-up's end
    checkpoint = options.checkpoint_dir / CHECKPOINT_NAME if options.checkpoint_dir else None
    if options.resume and checkpoint is not None:
        payload = _load_checkpoint(checkpoint, loop.fingerprint)
        student.load_state(payload["student"])
        optimizer.load_state_dict(payload["optimizer"])
        loop.step, loop.planned = int(payload["step"]), int(payload["planned"])
        average = payload.get("average")
    loop.planned = loop.planned or options.steps
    started = time.perf_counter()
    first_step = loop.step
    while loop.step < loop.planned:
        index = _batch_index(loop.step, len(feeds), options.shuffle)
        feed, target = feeds[index], targets.get(index)
        if crop is not None:
            draw = np.random.default_rng([0xC209, loop.step])
            if draw.random() < options.augment:
                feed = crop(index, draw)
                target = student.teacher(feed, use_hidden)  # a new sequence: never cached
        if target is None:
            target = student.teacher(feeds[index], use_hidden)
            kept = (target[0], [t.to(torch.bfloat16) for t in target[1]])
            size = sum(t.numel() * t.element_size() for t in (kept[0], *kept[1]))
            loop.target_bytes[index] = size
            if cached + size <= budget:
                targets[index], cached = kept, cached + size
        for group in optimizer.param_groups:
            group["lr"] = options.lr * _schedule(loop.step, loop.planned, options.warmup)
        hidden_weight = _hidden_weight(loop.step, loop.planned, options)
        value = train_step(student, optimizer, feed, target, loop.kind, hidden_weight, lower)
        if options.ema and (average is not None or loop.step + 1 >= max(1, int(options.warmup * loop.planned))):
            average = _update_average(average, parameters, options.ema)
        loop.step += 1
        loop.losses.append(value)
        elapsed = time.perf_counter() - started
        if options.minutes is not None:  # fit the schedule to the steps the time allows
            per_step = elapsed / (loop.step - first_step)
            fits = loop.step + int((60 * options.minutes - elapsed) / per_step)
            loop.planned = max(loop.step, min(options.steps, fits))  # re-estimated each step: load drifts
        if checkpoint is not None and (loop.step % options.checkpoint_every == 0 or loop.step == loop.planned):
            _save_checkpoint(checkpoint, {"fingerprint": loop.fingerprint, "step": loop.step, "planned": loop.planned,
                                          "student": student.state(), "optimizer": optimizer.state_dict(),
                                          "average": average})  # fmt: skip
        if on_step is not None:
            on_step(loop.step, loop.losses[-1])
    if average is not None:  # the averaged tensors are the healed ones
        with torch.no_grad():
            torch._foreach_copy_(parameters, average)
    loop.cached = len(targets)
    return time.perf_counter() - started


def _update_average(average: list[Any] | None, parameters: Sequence[Any], decay: float) -> list[Any]:
    """``average ← decay · average + (1 − decay) · parameters`` in place (started at ``parameters``)."""
    import torch

    with torch.no_grad():
        if average is None:
            return [p.detach().clone() for p in parameters]
        torch._foreach_lerp_(average, list(parameters), 1.0 - decay)
    return average


class _Reached(Exception):
    """Raised by a watch once the tensor a partial run needs is produced: the rest of the graph is skipped."""


def _rows(value: Any, feed: Mapping[str, np.ndarray]) -> Any:
    """The token rows of an activation ``[..., K]`` as float64, padded rows (attention mask 0) left out."""
    import torch

    rows = value.detach().reshape(-1, value.shape[-1]).double()
    mask = feed.get("attention_mask")
    if mask is not None and mask.size == rows.shape[0]:
        rows = rows[torch.from_numpy(mask.reshape(-1) != 0)]
    return rows


def _activations(student: _Student, feed: Mapping[str, np.ndarray], names: set[str], last: str) -> dict[str, Any]:
    """The tensors ``names`` of one run of the student as it is now, stopping once ``last`` is produced."""
    import torch

    seen: dict[str, Any] = {}

    def watch(name: str, value: Any) -> Any:
        if name in names:
            seen[name] = _rows(value, feed)
            if name == last:
                raise _Reached
        return value

    with torch.no_grad(), contextlib.suppress(_Reached):
        student.graph.run(feed, watch=watch, outputs=[])
    return seen


def start_batches(feeds: Sequence[dict[str, np.ndarray]], tokens: int = START_TOKENS) -> list[dict[str, np.ndarray]]:
    """About ``tokens`` tokens' worth of ``feeds``, every k-th batch so that the sample spans the whole text."""
    from espace_export.io.data import batch_tokens

    stride = max(1, math.ceil(sum(batch_tokens(f) for f in feeds) / tokens))
    return list(feeds[::stride])


def least_squares_start(
    student: _Student, feeds: Sequence[dict[str, np.ndarray]], ridge: float = 1e-4, budget: float = 2 * 2**30
) -> None:
    """Set each pair's second factor to the one that best maps the student's own input to the teacher's GEMM
    output, layer group by layer group in graph order (so each group corrects the error of those before it).

    With X_s the compressed model's input to the layer and X_t the original's, ``B = argmin ‖X_s·P·B − X_t·W‖²``
    solves ``(PᵀX_sᵀX_sP)·B = PᵀX_sᵀX_t·W``; W moves by ``P·(B − QᵀW)``, so ``QᵀW = B`` (``QᵀP = I``) and its
    part outside the projection is kept. ``ridge`` × the mean eigenvalue damps the solve. The teacher's inputs
    to every group are kept (float32) when they fit in ``budget`` bytes, else the teacher runs again for
    each group.
    """
    import torch

    order = {node.output[0]: i for i, node in enumerate(student.graph.graph.node) if node.output}
    stages: dict[str, list[_Pair]] = {}
    for pair in student.layers:
        stages.setdefault(pair.target.activation, []).append(pair)
    names = set(stages)

    def teacher(feed: dict[str, np.ndarray], wanted: set[str]) -> dict[str, Any]:
        return {k: _rows(v, feed).float() for k, v in student.teacher_values(feed, sorted(wanted)).items()}

    first = teacher(feeds[0], names)
    held = None
    if sum(v.numel() * 4 for v in first.values()) * len(feeds) <= budget:
        held = [first, *(teacher(feed, names) for feed in feeds[1:])]
    for activation in sorted(stages, key=lambda n: order.get(n, -1)):
        student.install()
        K = stages[activation][0].target.K
        G = torch.zeros(K, K, dtype=torch.float64)
        C = torch.zeros(K, K, dtype=torch.float64)
        for index, feed in enumerate(feeds):
            own = _activations(student, feed, {activation}, activation)[activation]
            reference = held[index] if held is not None else teacher(feed, {activation})
            G += own.T @ own
            C += own.T @ reference[activation].double()
        for pair in stages[activation]:
            P64, W64 = pair.P.detach().double(), _original_weight(student, pair).double()
            H = P64.T @ G @ P64
            H += ridge * torch.trace(H) / H.shape[0] * torch.eye(H.shape[0], dtype=H.dtype)
            B = torch.linalg.solve(H, P64.T @ C @ W64)
            with torch.no_grad():
                if pair.B is not None:
                    pair.B.copy_(B.float())
                else:
                    pair.W.add_((P64 @ (B - pair.Q.double().T @ pair.W.double())).float())
    student.install()


# ---------------------------------------------------------------------------------------------- writing


def _original_weight(student: _Student, pair: _Pair) -> Any:
    """The original model's K×N weight of ``pair``'s layer (the teacher's ``W`` in ``X_t·W``)."""
    stored = student.original[pair.target.weight].detach().float()
    return stored.T if pair.target.stored_transposed else stored


def _replace_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
            return
    raise EspaceError(f"weight {name} is not an initializer", "re-export the model with weights as initializers")


def _compressed(model: onnx.ModelProto, student: _Student, healed: bool) -> onnx.ModelProto:
    """The compressed graph: the pairs as planned (``healed=False``) or as trained."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rewrites = []
    for pair in student.layers:
        target = pair.target
        if healed and pair.B is not None:  # the trained factors
            P, folded = pair.P.detach().numpy(), pair.B.detach().numpy().astype(np.float64)
        elif pair.initial_B is not None:  # a weight factorisation as planned
            P, folded = pair.initial, pair.initial_B.astype(np.float64)
        else:  # the static pair folded with the healed W, or the original one
            W_kn = (pair.W.detach().numpy() if healed else weight_matrix(model, target)).astype(np.float64)
            if healed:  # the healed weight replaces the original constant before the rewrite
                stored = (W_kn.T if target.stored_transposed else W_kn).astype(np.dtype(target.dtype))
                _replace_initializer(copy, target.weight, stored)
            P, folded = pair.initial, pair.Q.numpy().astype(np.float64).T @ W_kn
        rewrites.append(Projection(target, np.asarray(P), folded=folded))
    if healed:
        for name, value in student.extras.items():
            _replace_initializer(copy, name, value.detach().numpy().astype(np.float32))
    return project(copy, rewrites)


def heal_onnx(
    original: str | os.PathLike[str] | onnx.ModelProto,
    projections: Mapping[str, Any] | str | os.PathLike[str],
    batches: Sequence[dict[str, np.ndarray]],
    output: str | os.PathLike[str],
    options: HealOptions | None = None,
    *,
    holdout_batches: Sequence[dict[str, np.ndarray]] | None = None,
    report: str | os.PathLike[str] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> HealingResult:
    """Heal ``original`` through ``projections`` on ``batches`` and write the compressed graph to ``output``.

    ``projections``: layer name → P or ``(A, M)``, or a path :func:`espace_export.heal.load_projections`
    reads (a plan ``.json``, a compressed ``.onnx``, a ``.npz``). ``options``: :class:`HealOptions`.
    ``holdout_batches`` measure the fidelity to the original model of the compressed model before and after
    healing (:func:`espace_export.projection.fidelity.output_fidelity`). ``report``: also write the report
    (JSON and its Markdown twin) there, in one atomic set with the model. ``on_step(step, loss)`` after each
    step.
    """
    from espace_export.heal import load_projections
    from espace_export.io.data import complete_feed, input_specs
    from espace_export.selection.validation import resolve_validation_loss

    options = options or HealOptions()
    if not batches:
        raise EspaceError("healing needs training batches", "give calibration text or data")
    output = check_writable(Path(output))
    model = original if isinstance(original, onnx.ModelProto) else load_model(original)
    if not isinstance(projections, Mapping):
        projections = load_projections(projections, options.train == "factors")  # type: ignore[arg-type]
    kind = "kl" if resolve_validation_loss(model, options.loss) == "kl" else "distill"
    specs = input_specs(model)
    for batch in batches if options.augment else ():
        check_croppable(batch)
    with _torch_threads(options.threads):
        student = _Student(model, projections, options.train_norms, options.train, options.train_dense)
        loop = _Loop(student, options, kind, _fingerprint(projections, options))
        loop.cache_gib = teacher_cache_gib(options)  # the student built: half of what is left
        feeds = [complete_feed(b, specs) for b in batches]
        crop = None
        if options.augment:

            def crop(index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
                return complete_feed(crop_batch(batches[index], rng), specs)

        started = time.perf_counter()
        if options.start == "least-squares" and not options.resume:  # a resumed W already holds it
            least_squares_start(student, start_batches(feeds), budget=loop.cache_gib * 2**30)
        start_seconds = time.perf_counter() - started
        seconds = _train(loop, feeds, on_step, crop) if options.steps else 0.0
    result = HealingResult(output, kind, loop.step, loop.losses, seconds=start_seconds + seconds)
    result.start_seconds = start_seconds
    if loop.target_bytes:
        needed = sum(loop.target_bytes.values()) / len(loop.target_bytes) * len(feeds)
        result.cache = {"batches": len(feeds), "cached": loop.cached, "gib": loop.cache_gib,
                        "auto": options.teacher_cache is None, "bytes_for_all": int(needed)}  # fmt: skip
    result.weights = {p.target.name: p.W.detach().numpy().astype(np.float32) for p in student.layers if p.W is not None}
    result.factors = {p.target.name: (p.P.detach().numpy().astype(np.float32), p.B.detach().numpy().astype(np.float32))
                      for p in student.layers if p.B is not None}  # fmt: skip
    result.trained = {n: p.detach().numpy().astype(np.float32) for n, p in student.extras.items()}
    healed = _compressed(model, student, healed=True)
    if holdout_batches:
        from espace_export.projection.fidelity import output_fidelity
        from espace_export.runtime import ort_session

        teacher, healed_session = ort_session(model), ort_session(healed)
        result.fidelity_before = output_fidelity(teacher, ort_session(_compressed(model, student, False)),
                                                 holdout_batches, specs)  # fmt: skip
        result.fidelity_after = output_fidelity(teacher, healed_session, holdout_batches, specs)
        seen = training_sample(batches, len(holdout_batches))
        result.fidelity_train = output_fidelity(teacher, healed_session, seen, specs)
    result.report = healing_report(result, options, len(batches), len(holdout_batches or ()))
    _write(healed, result, Path(report) if report is not None else None)
    return result


def training_sample(batches: Sequence[dict[str, np.ndarray]], count: int) -> list[dict[str, np.ndarray]]:
    """``count`` of ``batches`` (all, if fewer) spread evenly over them, first and last included: the training
    batches the report scores the healed model on beside the held-out ones."""
    if count >= len(batches):
        return list(batches)
    return [batches[i] for i in np.linspace(0, len(batches) - 1, count).round().astype(int)]


# the mean-cosine gap (training batches − held-out) above which the report says the healing text is over-fitted
OVERFIT_GAP = 0.005


def heal_model(
    model: str | os.PathLike[str],
    plan: str | os.PathLike[str],
    output: str | os.PathLike[str],
    data: Any = None,
    options: HealOptions | None = None,
    *,
    report: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> HealingResult:
    """What ``espace-export heal`` does: batches from ``data`` (a :class:`~espace_export.options.DataOptions`;
    its held-out share measures the fidelity), then :func:`heal_onnx` of ``model`` through ``plan`` (a plan
    ``.json``, projections ``.npz`` or the compressed ``.onnx``), writing ``output`` and ``report`` (default:
    beside ``output``) as one set."""
    from espace_export.heal import load_projections
    from espace_export.io.data import load_batches
    from espace_export.options import DataOptions
    from espace_export.pipeline import default_report
    from espace_export.progress import Progress

    options = options or HealOptions()
    output = check_writable(Path(output))
    report = check_writable(Path(report) if report is not None else default_report(output))
    original = load_model(model)
    projections = load_projections(Path(plan), options.train == "factors")
    batches = load_batches(original, data if data is not None else DataOptions())
    held_out = batches.held_out if batches.separate_holdout else []
    with Progress(progress) as bars, bars.task("healing", options.steps) as advance:
        return heal_onnx(original, projections, batches.calibration, output, options,
                         holdout_batches=held_out, report=report, on_step=lambda step, loss: advance())  # fmt: skip


def healing_report(result: HealingResult, options: HealOptions, batches: int, held_out: int) -> dict[str, Any]:
    losses = result.losses
    # over one pass of the batches at each end, so both means see the same batches (a quarter of the steps
    # at each end when the run is shorter than two passes)
    window = batches if len(losses) >= 2 * batches else max(1, len(losses) // 4)
    return {
        "output": str(result.output),
        "loss": result.loss,
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "start_seconds": round(result.start_seconds, 2),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "training_batches": batches,
        "layers_healed": len(result.weights) + len(result.factors),
        "trained": options.train,
        "matmul_dtype": "bfloat16" if uses_bf16(options.autocast) else "float32",
        "other_tensors_trained": len(result.trained),
        "loss_first": float(np.mean(losses[:window])) if losses else None,
        "loss_last": float(np.mean(losses[-window:])) if losses else None,
        "teacher_cache": result.cache,
        "fidelity": {
            "batches": held_out,
            "before": result.fidelity_before,
            "after": result.fidelity_after,
            "training_batches_after": result.fidelity_train,
        },
    }


def overfit_gap(report: Mapping[str, Any]) -> tuple[float, str] | None:
    """The largest gap of mean cosine, training batches − held-out, and its output, when above
    :data:`OVERFIT_GAP` (the healing text looks over-fitted); None otherwise."""
    fidelity = report["fidelity"]
    train = fidelity.get("training_batches_after") or {}
    gaps = [(train[n]["cosine_mean"] - a["cosine_mean"], n) for n, a in fidelity["after"].items() if n in train]
    return max(gaps) if gaps and max(gaps)[0] > OVERFIT_GAP else None


def teacher_cache_gib(options: HealOptions) -> float:
    """``--teacher-cache``, or by default half the memory available now (to 0.1 GiB): the other half is the
    student's, its optimizer's and the runtime's (MiniLM healing at 10 GiB of cache peaked at 14.4 GiB)."""
    if options.teacher_cache is not None:
        return options.teacher_cache
    return math.floor(available_memory() / 2 / 2**30 * 10) / 10


def cache_overflow(report: Mapping[str, Any]) -> str | None:
    """A sentence when the teacher cache did not hold every batch's outputs (the teacher then ran again at
    each of their steps), with the ``--teacher-cache`` that would; None when it held them all."""
    cache = report.get("teacher_cache") or {}
    if not cache or cache["cached"] >= cache["batches"]:
        return None
    held = (f"the teacher cache (by default half the available memory: {cache['gib']:g} GiB)" if cache.get("auto")
            else f"--teacher-cache {cache['gib']:g} GiB")  # fmt: skip
    return (f"{held} held the teacher's outputs for {cache['cached']} of "
            f"{cache['batches']} batches; it ran again at every step of the others (≈ "
            f"{math.ceil(cache['bytes_for_all'] * 1.05 / 2**30 * 10) / 10:g} GiB would hold them all)")  # fmt: skip


def healing_markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# ESPACE healing report: `{report['output']}`", "", "| | |", "|---|---|"]
    for key in ("loss", "steps", "seconds", "training_batches", "layers_healed", "other_tensors_trained",
                "loss_first", "loss_last"):  # fmt: skip
        lines.append(f"| {key} | {report[key]} |")
    overflow = cache_overflow(report)
    if overflow:
        lines += ["", overflow + "."]
    fidelity = report["fidelity"]
    if fidelity["before"]:
        train = fidelity.get("training_batches_after") or {}
        lines += ["", f"Held-out fidelity ({fidelity['batches']} batches; the last column: the healed model on as "
                  "many training batches):", "",
                  "| output | cosine before | cosine after | rel. L2 before | rel. L2 after | cosine after, training |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, before in fidelity["before"].items():
            after, seen = fidelity["after"][name], train.get(name)
            lines.append(f"| `{name}` | {before['cosine_mean']:.4f} | {after['cosine_mean']:.4f} | "
                         f"{before['relative_l2']:.4f} | {after['relative_l2']:.4f} | "
                         f"{'' if seen is None else format(seen['cosine_mean'], '.4f')} |")  # fmt: skip
        overfit = overfit_gap(report)
        if overfit:
            gap, name = overfit
            lines += ["", f"The healed model fits its training batches better than the held-out ones (`{name}`: "
                      f"+{gap:.4f} mean cosine): it has learned its healing text more than the task, unless the "
                      "held-out batches (the text's last part) are of another kind than the rest. More text, or "
                      "more varied text of the kind it will serve, should heal it better."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _write(model: onnx.ModelProto, result: HealingResult, report: Path | None) -> None:
    from espace_export.io.models import strict_json

    paths: list[Path] = [result.output]
    if report is not None:
        paths += [check_writable(report), report.with_suffix(".md")]
    with atomic_output_set(paths) as temporaries:
        save_model(model, temporaries[0])
        check_model(temporaries[0])
        if report is not None:
            temporaries[1].write_text(strict_json(result.report) + "\n")
            temporaries[2].write_text(healing_markdown(result.report))


__all__ = [
    "HealOptions",
    "HealingResult",
    "distillation_loss",
    "heal_model",
    "heal_onnx",
    "hidden_state_loss",
    "trainable_extras",
]
