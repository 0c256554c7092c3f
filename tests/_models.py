"""A tiny decoder-shaped ONNX model built with onnx.helper, and its ESPACE-compressed twin (in milliseconds).

Graph (one block per ``blocks``), node names in the TorchScript exporter's style so layer names read
``model.layers.0.self_attn.q_proj``::

    input_ids ─Gather(embed)─► h ─(× mask)─┬ q_proj ┐
                                           ├ k_proj ├ Add ─ o_proj ─ + h ─► h1 ─┬ gate_proj ─ Relu ┐
                                           └ v_proj ┘                            └ up_proj ──────── Mul ─ down_proj ─ + h1
    h_last ─ lm_head ─► logits [batch, seq, vocab]
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_passes import Projection, find_targets, project

HIDDEN, INTER, VOCAB = 32, 64, 40


def tiny_decoder(
    *, blocks: int = 1, hidden: int = HIDDEN, inter: int = INTER, vocab: int = VOCAB, seed: int = 0
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, *shape: int) -> str:
        initializers.append(
            numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
        )
        return name

    def matmul(layer: str, x: str, k: int, n: int) -> str:
        out = f"{layer}.out"
        w = weight(f"{layer}.weight", k, n)
        nodes.append(helper.make_node("MatMul", [x, w], [out], name="/" + layer.replace(".", "/") + "/MatMul"))
        return out

    weight("model.embed_tokens.weight", vocab, hidden)
    nodes += [
        helper.make_node("Gather", ["model.embed_tokens.weight", "input_ids"], ["emb"], name="/model/embed/Gather"),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], name="/model/Cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis_last"], ["mask_3d"], name="/model/Unsqueeze"),
        helper.make_node("Mul", ["emb", "mask_3d"], ["h0"], name="/model/mask/Mul"),
    ]
    initializers.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last"))
    h = "h0"
    for b in range(blocks):
        p = f"model.layers.{b}"
        q = matmul(f"{p}.self_attn.q_proj", h, hidden, hidden)
        k = matmul(f"{p}.self_attn.k_proj", h, hidden, hidden)
        v = matmul(f"{p}.self_attn.v_proj", h, hidden, hidden)
        nodes += [
            helper.make_node("Add", [q, k], [f"{p}.qk"], name=f"/{p}/attn/Add"),
            helper.make_node("Add", [f"{p}.qk", v], [f"{p}.qkv"], name=f"/{p}/attn/Add_1"),
        ]
        o = matmul(f"{p}.self_attn.o_proj", f"{p}.qkv", hidden, hidden)
        nodes.append(helper.make_node("Add", [h, o], [f"{p}.h1"], name=f"/{p}/Add"))
        gate = matmul(f"{p}.mlp.gate_proj", f"{p}.h1", hidden, inter)
        up = matmul(f"{p}.mlp.up_proj", f"{p}.h1", hidden, inter)
        nodes += [
            helper.make_node("Relu", [gate], [f"{p}.act"], name=f"/{p}/mlp/Relu"),
            helper.make_node("Mul", [f"{p}.act", up], [f"{p}.prod"], name=f"/{p}/mlp/Mul"),
        ]
        down = matmul(f"{p}.mlp.down_proj", f"{p}.prod", inter, hidden)
        nodes.append(helper.make_node("Add", [f"{p}.h1", down], [f"{p}.h2"], name=f"/{p}/Add_1"))
        h = f"{p}.h2"
    logits = matmul("lm_head", h, hidden, vocab)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/Identity"))
    graph = helper.make_graph(
        nodes,
        "tiny_decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="espace-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def orthonormal(k: int, rank: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((k, rank)))
    return q


def compress_tiny(model: onnx.ModelProto, *, rank: int = 8, dense: tuple[str, ...] = ("k_proj",)) -> onnx.ModelProto:
    """A compressed copy: every block GEMM projected at ``rank`` except names containing ``dense``;
    siblings reading one activation get the same P (so they share one ``X·P``), as the pipeline does."""
    compressed = onnx.ModelProto()
    compressed.CopyFrom(model)
    targets = [t for t in find_targets(compressed) if not any(d in t.name for d in dense)]
    shared: dict[str, np.ndarray] = {}
    projections = []
    for index, target in enumerate(targets):
        P = shared.setdefault(target.activation, orthonormal(target.K, rank, seed=index))
        projections.append(Projection(target, P))
    return project(compressed, projections)
