"""ONNX Runtime's own operators in the torch interpreter of :mod:`espace_export.calibration.onnx_torch`.

The graphs deployment engineers export carry operators ONNX does not define but ONNX Runtime runs: the
onnxruntime-genai builder's ``SimplifiedLayerNormalization`` (default domain) and ``SkipSimplifiedLayerNormalization``,
and the transformers optimizer's fused encoder ops (``EmbedLayerNormalization``, ``Attention`` with a packed QKV
weight, ``SkipLayerNormalization``, ``BiasGelu``; com.microsoft). Each is written here from its ONNX Runtime
contrib-op specification, for the forms those exporters emit, and checked against an ONNX Runtime session in
``tests/calibration/test_onnx_torch_runtime.py``. A form outside them (an ``Attention`` with a past, say) raises
:class:`EspaceError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from espace_export.errors import EspaceError

if TYPE_CHECKING:
    from espace_export.calibration.onnx_torch import TorchGraph

Op = Callable[[list[Any], dict[str, Any], "TorchGraph"], Any]
MASK_FILTER = -10000.0  # what ONNX Runtime's Attention adds at masked positions by default


def _torch() -> Any:
    from espace_export.calibration.onnx_torch import _torch as load

    return load()


def _rms(x: Any, scale: Any, epsilon: float) -> tuple[Any, Any]:
    inv = (x.pow(2).mean(dim=-1, keepdim=True) + epsilon).rsqrt()
    return x * inv * scale, inv


def _simplified_layer_norm(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    """``x / sqrt(mean(x²) + ε) · scale`` over the last axis (RMSNorm); second output the inverse std."""
    if attrs.get("axis", -1) not in (-1, args[0].dim() - 1):
        raise EspaceError("SimplifiedLayerNormalization over an axis other than the last", "re-export the model")
    return _rms(args[0], args[1], attrs.get("epsilon", 1e-5))


def _skip_sum(args: list[Any], bias_at: int) -> Any:
    total = args[0] + args[1]
    if len(args) > bias_at and args[bias_at] is not None:
        total = total + args[bias_at]
    return total


def _skip_simplified_layer_norm(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    """(input + skip [+ bias]) RMS-normalised; outputs: y, mean (unused, zeros), inverse std, the sum."""
    total = _skip_sum(args, 3)
    y, inv = _rms(total, args[2], attrs.get("epsilon", 1e-5))
    return y, _torch().zeros_like(inv), inv, total


def _skip_layer_norm(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    """(input + skip [+ bias]) layer-normalised with gamma [, beta]; outputs: y, mean, inverse std, the sum."""
    torch = _torch()
    total = _skip_sum(args, 4)
    beta = args[3] if len(args) > 3 else None
    epsilon = attrs.get("epsilon", 1e-12)
    mean = total.mean(dim=-1, keepdim=True)
    inv = (total.var(dim=-1, unbiased=False, keepdim=True) + epsilon).rsqrt()
    return torch.nn.functional.layer_norm(total, total.shape[-1:], args[2], beta, epsilon), mean, inv, total


def _bias_gelu(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    return _torch().nn.functional.gelu(args[0] + args[1])


def _gelu(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    """com.microsoft ``Gelu``: the exact (erf) form."""
    return _torch().nn.functional.gelu(args[0])


def _fast_gelu(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    """com.microsoft ``FastGelu``: the tanh approximation, of ``X + bias`` when a bias is given."""
    x = args[0] if len(args) < 2 or args[1] is None else args[0] + args[1]
    return _torch().nn.functional.gelu(x, approximate="tanh")


def _quick_gelu(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    """com.microsoft ``QuickGelu``: ``x·sigmoid(alpha·x)``, alpha 1.702 by default."""
    x = args[0]
    return x * _torch().sigmoid(float(attrs.get("alpha", 1.702)) * x)


def _embed_layer_norm(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    """Word + position (+ segment) embeddings, layer-normalised; ``mask_index`` = the mask's row sums (int32)."""
    torch = _torch()
    ids = args[0].long()
    segments = args[1] if len(args) > 1 else None
    words, positions_table, segment_table, gamma, beta = (args + [None] * 7)[2:7]
    mask = args[7] if len(args) > 7 else None
    given_positions = args[8] if len(args) > 8 else None
    batch, seq = ids.shape
    positions = torch.arange(seq).expand(batch, seq) if given_positions is None else given_positions.long()
    total = words[ids] + positions_table[positions]
    if segments is not None and segment_table is not None:
        total = total + segment_table[segments.long()]
    y = torch.nn.functional.layer_norm(total, total.shape[-1:], gamma, beta, attrs.get("epsilon", 1e-12))
    mask_index = (
        torch.zeros(batch, dtype=torch.int32) if mask is None else mask.to(torch.int32).sum(dim=1).to(torch.int32)
    )
    return y, mask_index, total


def _attention_mask(mask: Any, batch: int, seq: int, total: int) -> Any:
    """``mask_index`` as an additive [B, 1 or S, total] bias: 1-D end positions (right padding), 2-D raw mask
    [B, total], 3-D [B, S, total]."""
    torch = _torch()
    if mask.dim() == 1 and mask.shape[0] == batch:
        keep = torch.arange(total)[None, :] < mask.long()[:, None]
        keep = keep[:, None, :]
    elif mask.dim() == 2 and tuple(mask.shape) == (batch, total):
        keep = mask[:, None, :] != 0
    elif mask.dim() == 3:
        keep = mask != 0
    else:
        raise EspaceError(
            f"the gradient pass cannot evaluate Attention with a mask_index of shape {list(mask.shape)}",
            "use --method mse, nmse, go-mse or go-mse-l2 (best and auto include nl-mse) on this model",
        )
    return (~keep).to(torch.float32) * MASK_FILTER


def _attention(args: list[Any], attrs: dict[str, Any], g: TorchGraph) -> Any:
    """com.microsoft ``Attention``: one packed QKV weight, multi-head scaled dot-product attention, optional
    ``mask_index`` and causal (``unidirectional``) masking; no past (its present output is not produced)."""
    torch = _torch()
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    mask = args[3] if len(args) > 3 else None
    if any(a is not None for a in args[4:]):
        raise EspaceError(
            "the gradient pass cannot evaluate Attention with a past or an attention bias",
            "use --method mse, nmse, go-mse or go-mse-l2 (best and auto include nl-mse) on this model",
        )
    heads = int(attrs["num_heads"])
    sizes = list(attrs.get("qkv_hidden_sizes") or [weight.shape[1] // 3] * 3)
    qkv = x @ weight + (bias if bias is not None else 0)
    q, k, v = torch.split(qkv, sizes, dim=-1)
    batch, seq = x.shape[0], x.shape[1]

    def split_heads(t: Any) -> Any:
        return t.reshape(batch, seq, heads, -1).transpose(1, 2)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    scale = attrs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + _attention_mask(mask, batch, seq, seq).to(scores.dtype)[:, None]
    if attrs.get("unidirectional", 0):
        causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(batch, seq, -1)


DEFAULT_DOMAIN_OPS: dict[str, Op] = {"SimplifiedLayerNormalization": _simplified_layer_norm}
MICROSOFT_OPS: dict[str, Op] = {
    "SkipSimplifiedLayerNormalization": _skip_simplified_layer_norm,
    "SkipLayerNormalization": _skip_layer_norm,
    "BiasGelu": _bias_gelu,
    "Gelu": _gelu,
    "FastGelu": _fast_gelu,
    "QuickGelu": _quick_gelu,
    "EmbedLayerNormalization": _embed_layer_norm,
    "Attention": _attention,
}


def runtime_op(domain: str, op_type: str) -> Op | None:
    """The interpreter of an ONNX Runtime operator, or None."""
    if domain in ("", "ai.onnx"):
        return DEFAULT_DOMAIN_OPS.get(op_type)
    if domain == "com.microsoft":
        return MICROSOFT_OPS.get(op_type)
    return None
