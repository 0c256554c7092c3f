"""Evaluate an ONNX graph with torch operators, so autograd can differentiate it.

NL-MSE needs ``∂loss/∂x`` at every targeted GEMM input. ONNX Runtime has no backward pass for an
inference graph, and the user may not have the PyTorch model, so this module interprets the ONNX graph
node by node with torch ops (in the graph's topological order). It covers the operators the PyTorch
exporters emit for transformer blocks (TorchScript opset 17 and dynamo opset 18); an operator outside
that set raises :class:`EspaceError` naming it.

Why not a converter such as ``onnx2torch``: it builds an ``nn.Module`` per node for training and export
use cases, adds a dependency with its own opset coverage to track, and we only need one forward pass
with autograd and access to named intermediate tensors — about 200 lines we control and test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from espace_export._optional import require
from espace_export.errors import EspaceError
from graph_passes.find import external_data_dir


def _torch() -> Any:
    return require("torch", extra="torch", purpose="gradients (nl-mse candidates)")


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's attributes, tensors among them as torch tensors (decoded once)."""
    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: _torch().from_numpy(np.array(numpy_helper.to_array(v))) if isinstance(v, onnx.TensorProto) else v
            for k, v in values.items()}  # fmt: skip


def _dtype(onnx_type: int) -> Any:
    torch = _torch()
    np_type = onnx.helper.tensor_dtype_to_np_dtype(onnx_type)
    return torch.from_numpy(np.zeros(1, dtype=np_type)).dtype


def _ints(t: Any) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


class TorchGraph:
    """An ONNX model as a callable over torch tensors (weights as constant torch tensors)."""

    def __init__(
        self, model: onnx.ModelProto, *, float64: bool = False, weights: onnx.ModelProto | None = None
    ) -> None:
        """``weights``: read the initializers from this model instead (``model`` holds the graph alone: a
        rewritten copy made without the weights, :func:`fused_activations` with ``weights=False``)."""
        torch = _torch()
        self.graph = model.graph
        self.float64 = float64  # evaluate float32 tensors in float64 (finite-difference checks)
        # under CPU autocast to bfloat16: element-wise Add/Sub/Mul with a small float32 operand stay bfloat16
        self.low_precision_elementwise = True
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.output_names = [o.name for o in model.graph.output]
        self.ops = [_operator(node) for node in model.graph.node]  # unnamed nodes too: by position
        self.attrs = [_attrs(node) for node in model.graph.node]  # read once: protobuf decoding per run is slow
        unsupported = sorted({n.op_type for n, op in zip(model.graph.node, self.ops, strict=True) if op is None})
        if unsupported:
            raise EspaceError(
                f"the gradient pass cannot evaluate ONNX operator(s) {', '.join(unsupported)}",
                "use --method mse, nmse, go-mse or go-mse-l2 (best and auto include the nl-mse candidates), "
                "or pass the PyTorch model",
            )
        # node's first output → a replacement for that node's operator, called as ``fn(args, attrs)`` (healing
        # computes a projected GEMM as (X·A)·B through it instead of forming the K×N product)
        self.overrides: dict[str, Callable[[list[Any], dict[str, Any]], Any]] = {}
        source = weights if weights is not None else model
        base_dir = external_data_dir(source)  # weights left on disk by load_model(load_weights=False)
        self.constants: dict[str, Any] = {
            t.name: self._widen(torch.from_numpy(np.array(numpy_helper.to_array(t, base_dir))))
            for t in (*source.graph.initializer, *(model.graph.initializer if weights is not None else ()))
        }
        # Constant nodes are evaluated once, here: their tensors join the constants and the nodes are not run
        self.steps = []
        for node, op, attrs in zip(model.graph.node, self.ops, self.attrs, strict=True):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output and node.output[0]:
                self.constants[node.output[0]] = self._widen(_constant([], attrs, self))
            else:
                self.steps.append((node, op, attrs))

    def run(
        self,
        feeds: Mapping[str, Any],
        *,
        watch: Callable[[str, Any], Any] | None = None,
        outputs: list[str] | None = None,
    ) -> dict[str, Any]:
        """Evaluate the graph; ``watch(name, tensor)`` may replace each produced tensor (e.g. to track it)."""
        torch = _torch()
        env: dict[str, Any] = dict(self.constants)
        for name, value in feeds.items():
            env[name] = self._widen(value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value)))
        for node, op, attrs in self.steps:
            args = [env[i] if i else None for i in node.input]
            override = self.overrides.get(node.output[0]) if self.overrides and node.output else None
            result = override(args, attrs) if override else op(args, attrs, self)  # type: ignore[misc]
            results = tuple(self._widen(r) for r in (result if isinstance(result, tuple) else (result,)))
            for name, value in zip(node.output, results, strict=False):
                if name:
                    env[name] = watch(name, value) if watch is not None else value
        return {name: env[name] for name in (outputs or self.output_names)}

    def _widen(self, value: Any) -> Any:
        if self.float64 and value.dtype in (_torch().float32, _torch().float16):
            return value.double()
        return value


# ---- operators -------------------------------------------------------------------------------------


def _binary(fn_name: str) -> Callable[..., Any]:
    def op(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
        a, b = _autocast_pair(args[0], args[1]) if g.low_precision_elementwise else (args[0], args[1])
        return getattr(_torch(), fn_name)(a, b)

    return op


def _autocast_pair(a: Any, b: Any) -> tuple[Any, Any]:
    """Under CPU autocast to bfloat16, a float32 operand smaller than its bfloat16 partner (a bias, a scale, a
    mask) is cast down, so the result stays bfloat16 for the next product; two large float32 operands (the
    residual stream) keep float32."""
    torch = _torch()
    if not torch.is_autocast_enabled("cpu") or a.dtype == b.dtype:
        return a, b
    low = torch.get_autocast_dtype("cpu")
    if a.dtype == low and b.dtype == torch.float32 and b.numel() < a.numel():
        return a, _lowered(b, low)
    if b.dtype == low and a.dtype == torch.float32 and a.numel() < b.numel():
        return _lowered(a, low), b
    return a, b


def _lowered(x: Any, dtype: Any) -> Any:
    """``x`` cast to ``dtype``, clamped to its finite range first: a mask's float32 minimum would round to
    −inf in bfloat16, and a row masked throughout would then give NaN from softmax instead of a finite value."""
    torch = _torch()
    info = torch.finfo(dtype)
    return x.clamp(info.min, info.max).to(dtype)


def _unary(fn_name: str) -> Callable[..., Any]:
    def op(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
        return getattr(_torch(), fn_name)(args[0])

    return op


def _div(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    torch = _torch()
    a, b = args
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    if g.low_precision_elementwise:
        a, b = _autocast_pair(a, b)
    return a / b


def _gemm(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    a, b = args[0], args[1]
    if attrs.get("transA", 0):
        a = a.T
    if attrs.get("transB", 0):
        b = b.T
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        y = y + attrs.get("beta", 1.0) * args[2]
    return y


def _reshape(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    x, shape = args[0], _ints(args[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    perm = attrs.get("perm") or list(reversed(range(args[0].dim())))
    return args[0].permute(*perm)


def _flatten(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    x = args[0]
    axis = attrs.get("axis", 1) % max(x.dim(), 1) if attrs.get("axis", 1) < 0 else attrs.get("axis", 1)
    outer = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(outer, -1)


def _axes(args: list[Any], attrs: dict[str, Any]) -> list[int] | None:
    if len(args) > 1 and args[1] is not None:
        return _ints(args[1])
    return list(attrs["axes"]) if "axes" in attrs else None


def _squeeze(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    axes = _axes(args, attrs)
    x = args[0]
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    axes = _axes(args, attrs) or []
    x = args[0]
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _concat(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    return _torch().cat([a for a in args if a is not None], dim=attrs["axis"])


def _slice(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    x = args[0]
    starts, ends = _ints(args[1]), _ints(args[2])
    axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= x.dim()
        # Python's slice clamping is ONNX's, for both signs of the step
        bounds = slice(start, end, step).indices(x.shape[axis])
        if step > 0:
            x = x.narrow(axis, bounds[0], len(range(*bounds)))[(slice(None),) * axis + (slice(None, None, step),)]
        else:  # torch has no negative steps
            x = x.index_select(axis, _torch().arange(*bounds))
    return x


def _split(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    x = args[0]
    axis = attrs.get("axis", 0)
    if len(args) > 1 and args[1] is not None:
        sizes = _ints(args[1])
    elif "split" in attrs:
        sizes = list(attrs["split"])
    else:
        parts = attrs.get("num_outputs", 1)
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return tuple(_torch().split(x, sizes, dim=axis))


def _gather(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    x, idx = args
    axis = attrs.get("axis", 0) % x.dim()
    idx = idx.long()
    idx = _torch().where(idx < 0, idx + x.shape[axis], idx)
    picked = x.index_select(axis, idx.reshape(-1))
    return picked.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


def _gather_nd(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    x, idx = args
    batch_dims = attrs.get("batch_dims", 0)
    idx = idx.long()
    depth = idx.shape[-1]
    if batch_dims == 0:
        return x[tuple(idx[..., i] for i in range(depth))]
    torch = _torch()
    batch_shape = x.shape[:batch_dims]
    flat_x = x.reshape(-1, *x.shape[batch_dims:])
    flat_idx = idx.reshape(flat_x.shape[0], -1, depth)
    rows = torch.arange(flat_x.shape[0]).unsqueeze(1).expand(-1, flat_idx.shape[1])
    picked = flat_x[(rows, *(flat_idx[..., i] for i in range(depth)))]
    return picked.reshape((*batch_shape, *idx.shape[batch_dims:-1], *x.shape[batch_dims + depth :]))


def _expand(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    x = args[0]
    return x.expand(_torch().broadcast_shapes(tuple(x.shape), tuple(_ints(args[1]))))


def _shape(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    dims = list(args[0].shape)
    start = attrs.get("start", 0)
    end = attrs.get("end", len(dims))
    return _torch().tensor(dims[start:end], dtype=_torch().int64)


def _cast(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    if g.float64 and args[0].is_floating_point() and _dtype(attrs["to"]).is_floating_point:
        return args[0]  # a float-to-float cast would round the float64 evaluation
    return g._widen(args[0].to(_dtype(attrs["to"])))


def _constant_of_shape(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    torch = _torch()
    value = attrs.get("value")
    fill = value if value is not None else torch.zeros(1)
    return fill.reshape(-1)[0].expand(*_ints(args[0])).clone() if _ints(args[0]) else fill.reshape(())


def _constant(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    torch = _torch()
    if "value" in attrs:
        return attrs["value"].clone()
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return torch.from_numpy(np.array(attrs[key], dtype=dtype))
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return torch.from_numpy(np.array(list(attrs[key]), dtype=dtype))
    raise EspaceError("unsupported Constant node (no tensor, float or int value)", "re-export the model")


def _range(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    start, limit, delta = args
    return _torch().arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _where(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    return _torch().where(args[0].bool(), args[1], args[2])


def _max(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    out = args[0]
    for other in args[1:]:
        out = _torch().maximum(out, other)
    return out


def _clip(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    x = args[0]
    low = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min")
    high = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max")
    return _torch().clamp(x, min=low, max=high)


def _gelu(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    """ONNX ``Gelu`` (opset 20): exact (erf) or, ``approximate="tanh"``, the tanh form."""
    approximate = attrs.get("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return _torch().nn.functional.gelu(args[0], approximate=approximate)


def _softmax(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    return _torch().softmax(args[0], dim=attrs.get("axis", -1))


def _layer_norm(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    x, scale = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    return _torch().nn.functional.layer_norm(x, x.shape[axis:], scale, bias, attrs.get("epsilon", 1e-5))


def _reduce(kind: str) -> Callable[..., Any]:
    def op(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
        x = args[0]
        axes = _axes(args, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        if kind == "mean":
            return x.mean(dim=axes, keepdim=keep)
        if kind == "sum":
            return x.sum(dim=axes, keepdim=keep)
        return x.pow(2).sum(dim=axes, keepdim=keep).sqrt()

    return op


def _trilu(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    k = int(args[1].item()) if len(args) > 1 and args[1] is not None else 0
    return _torch().triu(args[0], k) if attrs.get("upper", 1) else _torch().tril(args[0], k)


def _identity(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    return args[0]


def _not(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    return _torch().logical_not(args[0])


def _attention(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    """ONNX ``Attention`` (opset 23) as one ``scaled_dot_product_attention`` (and its one backward): Q, K, V
    4-D [batch, heads, sequence, head size] or 3-D [batch, sequence, heads · head size] (with
    ``q_num_heads``/``kv_num_heads``), fewer K/V heads than Q heads (grouped queries), an additive or boolean
    ``attn_mask``, ``is_causal``, a past key/value (present outputs); not ``softcap`` or the QK output."""
    torch = _torch()
    q, k, v = args[0], args[1], args[2]
    mask = args[3] if len(args) > 3 else None
    past_key = args[4] if len(args) > 4 else None
    past_value = args[5] if len(args) > 5 else None
    causal = bool(attrs.get("is_causal", 0))
    if attrs.get("softcap", 0.0) or attrs.get("qk_matmul_output_mode", 0) or (causal and past_key is not None):
        raise EspaceError(
            "the gradient pass cannot evaluate Attention with softcap, a QK output or causal masking over a past",
            "use --method mse, nmse, go-mse or go-mse-l2 (best and auto include the nl-mse candidates)",
        )
    flat = q.dim() == 3
    if flat:  # [B, S, H·d] → [B, H, S, d]
        if not (attrs.get("q_num_heads") and attrs.get("kv_num_heads")):
            raise EspaceError(
                "an Attention node with 3-D inputs has no q_num_heads/kv_num_heads attributes (invalid ONNX)",
                "re-export the model, or check it with onnx.checker",
            )
        heads = (int(attrs["q_num_heads"]), int(attrs["kv_num_heads"]), int(attrs["kv_num_heads"]))
        q, k, v = (
            t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2) for t, h in zip((q, k, v), heads, strict=True)
        )
    if past_key is not None:
        k = torch.cat([past_key, k], dim=2)
    if past_value is not None:
        v = torch.cat([past_value, v], dim=2)
    if mask is not None and mask.is_floating_point():
        mask = _lowered(mask, q.dtype) if mask.dtype != q.dtype else mask
    scale = attrs.get("scale")
    y = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    if flat:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return y, k, v


def fused_activations(model: onnx.ModelProto, *, weights: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` whose GELU subgraphs (``x·½(1 + erf(x/√2))`` and the tanh form, as exporters write
    them) are single ``Gelu`` / ``FastGelu`` nodes (com.microsoft), found by ONNX Runtime's own fusions. The
    values are the same; the interpreter runs one fused torch op (and its backward) where it ran five to
    eight element-wise ones. Every other node, and every tensor name a later node reads, is kept.

    ``weights=False``: the copy leaves out the initializers of more than :data:`SMALL_CONSTANT` elements (the
    fusions read scalars only) — the weights are not copied; run it as ``TorchGraph(copy, weights=model)``."""
    from onnxruntime.transformers.fusion_fastgelu import FusionFastGelu
    from onnxruntime.transformers.fusion_gelu import FusionGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    copy = onnx.ModelProto()
    stubs: set[str] = set()  # the weights left out: name, type and shape only (the sort needs them present)
    if weights:
        copy.CopyFrom(model)
    else:  # field by field, the graph's large initializers as stubs
        _copy_fields(model, copy, skip="graph")
        _copy_fields(model.graph, copy.graph, skip="initializer")
        for tensor in model.graph.initializer:
            if _elements(tensor) <= SMALL_CONSTANT:
                copy.graph.initializer.append(tensor)
            else:
                stubs.add(tensor.name)
                copy.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    wrapped = OnnxModel(copy)
    level = logging.getLogger("onnxruntime.transformers").level
    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)  # "Fused Gelu: 6" on every call
    try:
        for fusion in (FusionGelu(wrapped), FusionFastGelu(wrapped)):
            fusion.apply()
    finally:
        logging.getLogger("onnxruntime.transformers").setLevel(level)
    fused = any(n.domain == "com.microsoft" for n in copy.graph.node)
    if fused and not any(o.domain == "com.microsoft" for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    wrapped.topological_sort(is_deterministic=True)
    if stubs:
        kept = [t for t in copy.graph.initializer if t.name not in stubs]
        del copy.graph.initializer[:]
        copy.graph.initializer.extend(kept)
    return copy


SMALL_CONSTANT = 64  # elements: the most a tensor :func:`fused_activations` keeps without its weights has


def _elements(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims))  # 1 for a scalar: the product of no dims


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    """Copy the set fields of protobuf message ``source`` into ``target``, but field ``skip``."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, (list, tuple)) or hasattr(value, "extend"):  # a repeated field
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def gradient_blockers(model: onnx.ModelProto) -> list[str]:
    """The operator types of ``model`` (subgraphs included) that the interpreter cannot evaluate, so that no
    gradient can be taken through it; control flow is not counted (the gradient pass runs the branch the
    batches select, inlined). Empty when the NL-MSE candidates can run."""
    from graph_passes.find import scopes

    return sorted(
        {
            node.op_type
            for scope in scopes(model)
            for node in scope.graph.node
            if node.op_type not in ("If", "Loop", "Scan") and _operator(node) is None
        }
    )


def _operator(node: onnx.NodeProto) -> Callable[[list[Any], dict[str, Any], TorchGraph], Any] | None:
    """The interpreter of ``node``: an ONNX operator, or one of ONNX Runtime's
    (:mod:`espace_export.calibration.onnx_torch_runtime`); None when neither covers it."""
    from espace_export.calibration.onnx_torch_runtime import runtime_op

    if node.domain in ("", "ai.onnx") and node.op_type in _OPS:
        return _OPS[node.op_type]
    return runtime_op(node.domain, node.op_type)


_OPS: dict[str, Callable[[list[Any], dict[str, Any], TorchGraph], Any]] = {
    "Add": _binary("add"),
    "Sub": _binary("sub"),
    "Mul": _binary("mul"),
    "Div": _div,
    "Pow": _binary("pow"),
    "MatMul": _binary("matmul"),
    "Equal": _binary("eq"),
    "Less": _binary("lt"),
    "LessOrEqual": _binary("le"),
    "Greater": _binary("gt"),
    "GreaterOrEqual": _binary("ge"),
    "And": _binary("logical_and"),
    "Or": _binary("logical_or"),
    "Min": _binary("minimum"),
    "Max": _max,
    "Not": _not,
    "IsNaN": _unary("isnan"),
    "Sqrt": _unary("sqrt"),
    "Neg": _unary("neg"),
    "Reciprocal": _unary("reciprocal"),
    "Erf": _unary("erf"),
    "Tanh": _unary("tanh"),
    "Sigmoid": _unary("sigmoid"),
    "Cos": _unary("cos"),
    "Sin": _unary("sin"),
    "Exp": _unary("exp"),
    "Log": _unary("log"),
    "Abs": _unary("abs"),
    "Relu": _unary("relu"),
    "Gemm": _gemm,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Slice": _slice,
    "Split": _split,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "Expand": _expand,
    "Shape": _shape,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Constant": _constant,
    "Range": _range,
    "Where": _where,
    "Clip": _clip,
    "Softmax": _softmax,
    "Attention": _attention,
    "Gelu": _gelu,
    "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceL2": _reduce("l2"),
    "Trilu": _trilu,
    "Identity": _identity,
}
