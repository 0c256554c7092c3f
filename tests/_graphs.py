"""Small ONNX graphs built by hand, one for every weight-GEMM pattern the passes must handle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, WIDE = 50, 16, 24


def pattern_zoo(seed: int = 0, dtype: type = np.float32) -> onnx.ModelProto:
    """Every pattern in one graph.

    ids ─Gather(E)─► emb ─┬ MatMul(Wq) ─► q ┐
                          └ MatMul(Wk) ─► k ┴ Add ─ Relu ─► r ─ MatMul(Constant Wc, unnamed node) ─► f
    f ─ MatMul(Transpose(E)) ─► logits                  (tied head: E is also the embedding table)
    x2 ─ Gemm(B1ᵀ, C1, transB=1) ─► g1 ─ Gemm(B2, transB=0) ─► y2
    """
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype), name)

    initializers = [
        w("E", VOCAB, HIDDEN),
        w("Wq", HIDDEN, WIDE),
        w("Wk", HIDDEN, WIDE),
        w("B1", WIDE, HIDDEN),  # stored N×K for transB=1
        w("C1", WIDE),
        w("B2", WIDE, HIDDEN),  # stored K×N
    ]
    constant_weight = numpy_helper.from_array((rng.standard_normal((WIDE, HIDDEN)) / 5).astype(dtype), "Wc")
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "Wq"], ["q"], name="/layers.0/attn/q_proj/MatMul"),
        helper.make_node("MatMul", ["emb", "Wk"], ["k"], name="/layers.0/attn/k_proj/MatMul"),
        helper.make_node("Add", ["q", "k"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Constant", [], ["Wc_out"], value=constant_weight),
        helper.make_node("MatMul", ["r", "Wc_out"], ["f"]),  # unnamed on purpose
        helper.make_node("Transpose", ["E"], ["E_t"], name="tie_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["f", "E_t"], ["logits"], name="/lm_head/MatMul"),
        helper.make_node("Gemm", ["x2", "B1", "C1"], ["g1"], name="/fc1/Gemm", transB=1),
        helper.make_node("Gemm", ["g1", "B2"], ["y2"], name="/fc2/Gemm"),
    ]
    graph = helper.make_graph(
        nodes,
        "pattern_zoo",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("x2", elem, ["rows", HIDDEN]),
        ],
        [
            helper.make_tensor_value_info("logits", elem, ["batch", "seq", VOCAB]),
            helper.make_tensor_value_info("y2", elem, ["rows", HIDDEN]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="espace-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def zoo_feed(batch: int = 3, seq: int = 5, rows: int = 7, seed: int = 1, dtype: type = np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "ids": rng.integers(0, VOCAB, size=(batch, seq)).astype(np.int64),
        "x2": rng.standard_normal((rows, HIDDEN)).astype(dtype),
    }


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


# --- LLM deployment graphs: KV cache, merged decoder, ORT contrib ops, quantized weights -------------------

KV_HEADS, HEAD_DIM = 2, 8  # HIDDEN = KV_HEADS · HEAD_DIM


def _decoder_body(prefix: str, weights: dict[str, str], with_past: bool, elem: int) -> list[onnx.NodeProto]:
    """One decoder layer over ``ids`` with a KV cache, its tensors named ``<prefix>…``, its GEMMs named as
    the TorchScript exporter names them (identical in every copy, as in optimum's merged decoder).

    emb = SimplifiedLayerNorm(Gather(E, ids)); k, v = emb·Wk, emb·Wv → [B, H, S, D], concatenated after the
    past; q = emb·Wq; y = Relu(q + mean over positions of present.key) · Wo; logits = y·Wlm.
    """
    t = prefix
    shape_bshd = weights["shape_bshd"]
    nodes = [
        helper.make_node("Gather", [weights["E"], "input_ids"], [t + "emb0"], name="/model/embed_tokens/Gather"),
        helper.make_node("SimplifiedLayerNormalization", [t + "emb0", weights["gamma"]], [t + "emb"],
                         name="/model/norm/SLN", axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", [t + "emb", weights["Wq"]], [t + "q"], name="/model/layers.0/self_attn/q_proj/MatMul"),
        helper.make_node("MatMul", [t + "emb", weights["Wk"]], [t + "k"], name="/model/layers.0/self_attn/k_proj/MatMul"),
        helper.make_node("MatMul", [t + "emb", weights["Wv"]], [t + "v"], name="/model/layers.0/self_attn/v_proj/MatMul"),
    ]  # fmt: skip
    for kind in ("k", "v"):
        nodes += [
            helper.make_node("Reshape", [t + kind, shape_bshd], [t + kind + "4"], name=f"/{kind}/Reshape"),
            helper.make_node("Transpose", [t + kind + "4"], [t + kind + "t"], name=f"/{kind}/Transpose", perm=[0, 2, 1, 3]),
        ]  # fmt: skip
        present = "present.0.key" if kind == "k" else "present.0.value"
        past = "past_key_values.0.key" if kind == "k" else "past_key_values.0.value"
        out = t + present if prefix else present
        if with_past:
            nodes.append(helper.make_node("Concat", [past, t + kind + "t"], [out], name=f"/{kind}/Concat", axis=2))
        else:
            nodes.append(helper.make_node("Identity", [t + kind + "t"], [out], name=f"/{kind}/Identity"))
    key = t + "present.0.key" if prefix else "present.0.key"
    nodes += [
        helper.make_node("ReduceMean", [key], [t + "kmean"], name="/kmean", axes=[2], keepdims=1),
        helper.make_node("Transpose", [t + "kmean"], [t + "kmean_t"], name="/kmean_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [t + "kmean_t", weights["shape_b1h"]], [t + "kflat"], name="/kflat"),
        helper.make_node("Add", [t + "q", t + "kflat"], [t + "qk"], name="/qk"),
        helper.make_node("Relu", [t + "qk"], [t + "r"], name="/relu"),
        helper.make_node("MatMul", [t + "r", weights["Wo"]], [t + "o"], name="/model/layers.0/self_attn/o_proj/MatMul"),
        helper.make_node("MatMul", [t + "o", weights["Wlm"]], [t + "logits" if prefix else "logits"],
                         name="/lm_head/MatMul"),
    ]  # fmt: skip
    return nodes


def _decoder_weights(seed: int, dtype: type) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype), name)

    return [
        w("E", VOCAB, HIDDEN),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(HIDDEN)).astype(dtype), "gamma"),
        w("Wq", HIDDEN, HIDDEN),
        w("Wk", HIDDEN, HIDDEN),
        w("Wv", HIDDEN, HIDDEN),
        w("Wo", HIDDEN, WIDE),
        w("Wlm", WIDE, VOCAB),
        numpy_helper.from_array(np.array([0, 0, KV_HEADS, HEAD_DIM], dtype=np.int64), "shape_bshd"),
        numpy_helper.from_array(np.array([0, 1, HIDDEN], dtype=np.int64), "shape_b1h"),
    ]


_WEIGHT_NAMES = {n: n for n in ("E", "gamma", "Wq", "Wk", "Wv", "Wo", "Wlm", "shape_bshd", "shape_b1h")}


def _decoder_io(elem: int, *, merged: bool) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    past = ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "past_sequence_length + sequence_length"]
        ),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("past_key_values.0.key", elem, past),
        helper.make_tensor_value_info("past_key_values.0.value", elem, past),
    ]
    if merged:
        inputs.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    present = ["batch_size", KV_HEADS, "total_sequence_length", HEAD_DIM]
    outputs = [
        helper.make_tensor_value_info("logits", elem, ["batch_size", "sequence_length", VOCAB]),
        helper.make_tensor_value_info("present.0.key", elem, present),
        helper.make_tensor_value_info("present.0.value", elem, present),
    ]
    return inputs, outputs


def _unused_inputs_read(elem: int) -> list[onnx.NodeProto]:
    """attention_mask and position_ids are inputs as exporters write them; read them so no runtime prunes
    them (their sums feed nothing)."""
    return [
        helper.make_node("Identity", ["attention_mask"], ["mask_seen"], name="/mask_seen"),
        helper.make_node("Identity", ["position_ids"], ["positions_seen"], name="/positions_seen"),
    ]


def kv_decoder(seed: int = 0, dtype: type = np.float32) -> onnx.ModelProto:
    """A one-layer decoder with optimum's KV-cache interface (``past_key_values.0.key|value`` in,
    ``present.0.key|value`` out) and onnxruntime-genai's ``SimplifiedLayerNormalization`` in the default
    domain (ONNX does not define it; ONNX Runtime does). GEMMs: q, k, v, o (+ lm_head)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs, outputs = _decoder_io(elem, merged=False)
    nodes = _unused_inputs_read(elem) + _decoder_body("", _WEIGHT_NAMES, True, elem)
    graph = helper.make_graph(nodes, "kv_decoder", inputs, outputs, _decoder_weights(seed, dtype))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="espace-tests")
    model.ir_version = 8
    return model


def merged_decoder(seed: int = 0, dtype: type = np.float32) -> onnx.ModelProto:
    """optimum's merged decoder in miniature: one ``If`` on ``use_cache_branch`` whose branches (with past:
    Concat after the past; without: the new keys only) hold every GEMM, all reading main-graph weights.
    Both branches name their nodes alike, as optimum's do."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs, outputs = _decoder_io(elem, merged=True)
    branches = {}
    for label, with_past in (("then_branch", True), ("else_branch", False)):
        prefix = "with_past/" if with_past else "no_past/"
        body = _decoder_body(prefix, _WEIGHT_NAMES, with_past, elem)
        branch_outputs = [helper.make_tensor_value_info(prefix + o.name, elem, None) for o in outputs]
        branches[label] = helper.make_graph(body, label, [], branch_outputs)
    nodes = [
        *_unused_inputs_read(elem),
        helper.make_node("If", ["use_cache_branch"], [o.name for o in outputs], name="optimum::if", **branches),
    ]
    graph = helper.make_graph(nodes, "merged_decoder", inputs, outputs, _decoder_weights(seed, dtype))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="espace-tests")
    model.ir_version = 8
    return model


def decoder_feeds(batch: int = 2, seq: int = 5, past: int = 0, seed: int = 1, merged: bool = False) -> dict:
    """A decoder feed with ``past`` cached positions (random past keys/values)."""
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(0, VOCAB, size=(batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64),
        "past_key_values.0.key": rng.standard_normal((batch, KV_HEADS, past, HEAD_DIM)).astype(np.float32),
        "past_key_values.0.value": rng.standard_normal((batch, KV_HEADS, past, HEAD_DIM)).astype(np.float32),
    }
    if merged:
        feed["use_cache_branch"] = np.array([past > 0])
    return feed


def matmul_nbits_model(float_too: bool = False) -> onnx.ModelProto:
    """onnxruntime-genai ``-p int4`` in miniature: ``x ─MatMulNBits(4-bit, block 16)─► y`` (com.microsoft),
    with a float ``MatMul`` after it when ``float_too``."""
    rng = np.random.default_rng(0)
    K, N, block = HIDDEN, WIDE, 16
    packed = rng.integers(0, 255, size=(N, K // block, block // 2), dtype=np.uint8)
    scales = (rng.random(N * K // block) / 10).astype(np.float32)
    nodes = [
        helper.make_node("MatMulNBits", ["x", "B_q4", "scales"], ["h"], name="/model/layers.0/mlp/up_proj/MatMul_Q4",
                         domain="com.microsoft", K=K, N=N, bits=4, block_size=block),
    ]  # fmt: skip
    initializers = [numpy_helper.from_array(packed, "B_q4"), numpy_helper.from_array(scales, "scales")]
    out = "h"
    if float_too:
        initializers.append(numpy_helper.from_array(rng.standard_normal((N, HIDDEN)).astype(np.float32), "Wd"))
        nodes.append(helper.make_node("MatMul", ["h", "Wd"], ["y"], name="/model/layers.0/mlp/down_proj/MatMul"))
        out = "y"
    graph = helper.make_graph(
        nodes,
        "nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", HIDDEN if float_too else WIDE])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model


def packed_attention_encoder(seed: int = 0) -> onnx.ModelProto:
    """onnxruntime's transformers optimizer output in miniature: ``EmbedLayerNormalization`` (the word embedding
    inside it) → com.microsoft ``Attention`` with one packed QKV weight [HIDDEN, 3·HIDDEN] → MatMul."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    initializers = [
        w("word_embeddings", VOCAB, HIDDEN),
        w("position_embeddings", 32, HIDDEN),
        w("segment_embeddings", 2, HIDDEN),
        numpy_helper.from_array(np.ones(HIDDEN, np.float32), "ln_gamma"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "ln_beta"),
        w("qkv_weight", HIDDEN, 3 * HIDDEN),
        numpy_helper.from_array((0.1 * rng.standard_normal(3 * HIDDEN)).astype(np.float32), "qkv_bias"),
        w("Wout", HIDDEN, WIDE),
    ]
    nodes = [
        helper.make_node(
            "EmbedLayerNormalization",
            ["input_ids", "token_type_ids", "word_embeddings", "position_embeddings", "segment_embeddings",
             "ln_gamma", "ln_beta", "attention_mask"],
            ["embedded", "mask_index"], name="EmbedLayerNormalization_0", domain="com.microsoft", epsilon=1e-5,
        ),
        helper.make_node("Attention", ["embedded", "qkv_weight", "qkv_bias", "mask_index"], ["attended"],
                         name="/encoder/layer.0/attention/Attention", domain="com.microsoft", num_heads=KV_HEADS),
        helper.make_node("MatMul", ["attended", "Wout"], ["hidden"], name="/encoder/layer.0/output/dense/MatMul"),
    ]  # fmt: skip
    ids = ["batch", "seq"]
    graph = helper.make_graph(
        nodes,
        "packed_attention",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT32, ids),
            helper.make_tensor_value_info("token_type_ids", TensorProto.INT32, ids),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ids),
        ],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", WIDE])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model


def attention_past_decoder(seed: int = 0) -> onnx.ModelProto:
    """onnxruntime's transformers optimizer on a GPT-2 with past (``model_type="gpt2"``) in miniature:
    com.microsoft ``Attention`` (``unidirectional``, one packed QKV weight) reading ``past_0`` [2, batch, heads,
    past, head] and writing ``present_0``, then the output projection and a head."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    initializers = [
        w("wte", VOCAB, HIDDEN),
        w("qkv_weight", HIDDEN, 3 * HIDDEN),
        numpy_helper.from_array((0.1 * rng.standard_normal(3 * HIDDEN)).astype(np.float32), "qkv_bias"),
        w("Wo", HIDDEN, HIDDEN),
        w("Wlm", HIDDEN, VOCAB),
    ]
    nodes = [
        helper.make_node("Gather", ["wte", "input_ids"], ["x"], name="/transformer/wte/Gather"),
        helper.make_node("Cast", ["attention_mask"], ["mask_index"], name="/mask/Cast", to=TensorProto.INT32),
        helper.make_node("Attention", ["x", "qkv_weight", "qkv_bias", "mask_index", "past_0"], ["a", "present_0"],
                         name="/transformer/h.0/attn/Attention", domain="com.microsoft", num_heads=KV_HEADS,
                         unidirectional=1),
        helper.make_node("MatMul", ["a", "Wo"], ["o"], name="/transformer/h.0/attn/c_proj/MatMul"),
        helper.make_node("Add", ["o", "x"], ["h"], name="/transformer/h.0/Add"),
        helper.make_node("MatMul", ["h", "Wlm"], ["logits"], name="/lm_head/MatMul"),
    ]  # fmt: skip
    cache = [2, "batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM]
    graph = helper.make_graph(
        nodes,
        "attention_past",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_length"]),
            helper.make_tensor_value_info("past_0", TensorProto.FLOAT, cache),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB]),
            helper.make_tensor_value_info("present_0", TensorProto.FLOAT, [*cache[:3], "total_length", HEAD_DIM]),
        ],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model
