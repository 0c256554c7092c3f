"""LLM deployment graphs: KV-cache inputs, merged decoders (GEMMs inside If branches), ONNX Runtime's own
operators, packed QKV, quantized weights.

The graphs are built with onnx.helper (tests/_graphs.py) so these run everywhere; the optimum exports made
by samples/export_llm_fixtures.py are tested at the end when ``ESPACE_LLM_FIXTURES`` names their folder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from espace_export import EspaceError, compress
from espace_export.io.data import complete_feed, input_specs, random_token_batches, vocab_size
from espace_export.io.models import check_model, load_model
from graph_passes import Projection, find_targets, project
from graph_passes.find import QuantizedWeightsWarning, explain_no_targets, find_projected_pairs, quantized_gemms
from tests._graphs import (
    HEAD_DIM,
    HIDDEN,
    KV_HEADS,
    VOCAB,
    attention_past_decoder,
    decoder_feeds,
    kv_decoder,
    matmul_nbits_model,
    merged_decoder,
    packed_attention_encoder,
    pattern_zoo,
    run,
)

GEMMS_PER_DECODER = 5  # q, k, v, o, lm_head


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _relative_errors(reference: list[np.ndarray], other: list[np.ndarray]) -> list[float]:
    return [float(np.linalg.norm(b - a) / np.linalg.norm(a)) for a, b in zip(reference, other, strict=True)]


# --- validity is what ONNX Runtime accepts ------------------------------------------------------------------


def test_runtime_ops_in_the_default_domain_are_valid(tmp_path: Path) -> None:
    path = _save(kv_decoder(), tmp_path / "genai_like.onnx")
    with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(str(path))  # what the tool used to report as "corrupted"
    check_model(path)
    assert len(load_model(path).graph.node) > 0
    run(onnx.load(str(path)), decoder_feeds())  # and ONNX Runtime runs it


def test_unknown_operator_and_truncated_file_are_told_apart(tmp_path: Path) -> None:
    model = kv_decoder()
    next(n for n in model.graph.node if n.op_type == "Relu").op_type = "NoSuchOp"
    with pytest.raises(EspaceError, match="'NoSuchOp'.*neither ONNX nor ONNX Runtime") as unknown:
        check_model(_save(model, tmp_path / "unknown.onnx"))
    assert "truncated" not in str(unknown.value)
    good = _save(kv_decoder(), tmp_path / "good.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(EspaceError, match="truncated"):
        load_model(cut)


def test_external_data_graph_with_runtime_ops_checks(tmp_path: Path) -> None:
    path = tmp_path / "external.onnx"
    onnx.save(kv_decoder(), str(path), save_as_external_data=True, location="external.onnx.data", size_threshold=0)
    check_model(path)
    load_model(path, load_weights=False)


# --- KV-cache inputs -----------------------------------------------------------------------------------


def test_prefill_feed_fills_the_kv_cache_inputs() -> None:
    specs = input_specs(merged_decoder())
    ids = np.zeros((3, 7), dtype=np.int64)
    feed = complete_feed({"input_ids": ids}, specs)
    assert feed["past_key_values.0.key"].shape == (3, KV_HEADS, 0, HEAD_DIM)
    assert feed["past_key_values.0.value"].dtype == np.float32
    assert feed["use_cache_branch"].tolist() == [False]
    assert feed["attention_mask"].shape == (3, 7)
    assert feed["position_ids"][1].tolist() == list(range(7))


def test_feed_with_a_past_continues_positions_and_mask() -> None:
    specs = input_specs(merged_decoder())
    given = decoder_feeds(batch=2, seq=1, past=4)
    del given["attention_mask"], given["position_ids"]
    feed = complete_feed(given, specs)
    assert feed["attention_mask"].shape == (2, 5)
    assert feed["position_ids"].tolist() == [[4], [4]]
    assert feed["use_cache_branch"].tolist() == [True]
    partial = {"input_ids": given["input_ids"], "past_key_values.0.key": given["past_key_values.0.key"]}
    with pytest.raises(EspaceError, match="part of the KV cache"):
        complete_feed(partial, specs)


def test_random_calibration_batches_run_on_kv_graphs() -> None:
    for model in (kv_decoder(), merged_decoder()):
        specs = input_specs(model)
        assert vocab_size(model) == VOCAB
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = random_token_batches(specs, VOCAB, batch_size=2, seq_len=6, num_batches=1, seed=0)
        outputs = run(model, complete_feed(batches[0], specs))
        assert outputs[1].shape == (2, KV_HEADS, 6, HEAD_DIM)


@pytest.mark.parametrize("builder", [kv_decoder, merged_decoder], ids=["with-past", "merged"])
def test_exact_rewrite_of_kv_graphs_at_empty_and_filled_past(builder, tmp_path: Path) -> None:
    source = _save(builder(), tmp_path / "decoder.onnx")
    result = compress(
        source, rank=WIDE_ENOUGH, include_heads=True, output=tmp_path / "exact.onnx", seq_len=6, num_batches=2,
        batch_size=2, holdout=0.0,
    )  # fmt: skip
    assert result.report["layers_compressed"] == GEMMS_PER_DECODER
    original, compressed = onnx.load(str(source)), onnx.load(str(result.output))
    merged = builder is merged_decoder
    for past in (0, 3):
        feed = decoder_feeds(past=past, merged=merged)
        errors = _relative_errors(run(original, feed), run(compressed, feed))
        assert max(errors) <= 1e-5, (past, errors)  # logits and present.* alike


WIDE_ENOUGH = 64  # ≥ every K of the decoders


@pytest.mark.parametrize("builder", [kv_decoder, merged_decoder], ids=["with-past", "merged"])
def test_float16_kv_graphs_rewrite_within_float16_rounding(builder, tmp_path: Path) -> None:
    """optimum's ``dtype="fp16"`` exports: float16 past fed, and the exact rewrite as close to the float16 graph
    as that graph is to its float32 twin (one more rounding of X·P and P^T·W; 1e-5 is out of float16's reach)."""
    source = _save(builder(dtype=np.float16), tmp_path / "decoder16.onnx")
    prefill = complete_feed({"input_ids": np.zeros((2, 3), np.int64)}, input_specs(onnx.load(str(source))))
    assert prefill["past_key_values.0.key"].dtype == np.float16
    result = compress(
        source, rank=WIDE_ENOUGH, include_heads=True, output=tmp_path / "exact.onnx", seq_len=6, num_batches=2,
        batch_size=2, holdout=0.0,
    )  # fmt: skip
    half, full, compressed = onnx.load(str(source)), builder(), onnx.load(str(result.output))
    for past in (0, 3):
        feed32 = decoder_feeds(past=past, merged=builder is merged_decoder)
        feed = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feed32.items()}
        reference = [r.astype(np.float64) for r in run(half, feed)]
        rounding = max(_relative_errors([r.astype(np.float64) for r in run(full, feed32)], reference))
        assert max(_relative_errors(reference, run(compressed, feed))) <= 2 * rounding, (past, rounding)


def test_ratio_half_runs_and_counts_every_gemm(tmp_path: Path) -> None:
    source = _save(merged_decoder(), tmp_path / "merged.onnx")
    result = compress(
        source, ratio=0.5, min_rank=4, output=tmp_path / "half.onnx", seq_len=6, num_batches=2, batch_size=2,
        holdout=0.0,
    )  # fmt: skip
    assert 0.3 < result.report["targeted_compression"] < 0.8
    compressed = onnx.load(str(result.output))
    for past in (0, 2):
        outputs = run(compressed, decoder_feeds(past=past, merged=True))
        assert all(np.isfinite(o).all() for o in outputs)


# --- GEMMs inside If branches --------------------------------------------------------------------------


def _gemm_count(graph: onnx.GraphProto) -> int:
    count = 0
    for node in graph.node:
        count += node.op_type in ("MatMul", "Gemm")
        for attr in node.attribute:
            if attr.HasField("g"):
                count += _gemm_count(attr.g)
    return count


def test_branch_gemms_are_one_target_per_weight() -> None:
    model = merged_decoder()
    targets = find_targets(model, include_heads=True)
    assert _gemm_count(model.graph) == 2 * GEMMS_PER_DECODER
    assert sorted(t.weight for t in targets) == ["Wk", "Wlm", "Wo", "Wq", "Wv"]
    for target in targets:
        paths = [path for path, _ in target.occurrences]
        assert len(paths) == 2 and {p.split("::")[2] for p in paths} == {"else_branch", "then_branch"}


def test_branches_share_one_projection_per_weight(tmp_path: Path) -> None:
    model = merged_decoder()
    targets = find_targets(model)
    rng = np.random.default_rng(0)
    P = np.linalg.qr(rng.standard_normal((HIDDEN, 8)))[0]
    project(model, [Projection(t, P) for t in targets if t.K == HIDDEN])
    check_model(_save(model, tmp_path / "projected.onnx"))  # no dangling names in either branch
    initializers = {t.name for t in model.graph.initializer}
    assert not {"Wq", "Wk", "Wv", "Wo"} & initializers  # every copy rewritten, the dense weights gone
    assert sum(name.endswith("espace_P") for name in initializers) == 1  # one P for q, k, v, o and both branches
    assert {p.name for p in find_projected_pairs(model)} == {t.name for t in targets if t.K == HIDDEN}
    for past in (0, 2):
        assert all(np.isfinite(o).all() for o in run(model, decoder_feeds(past=past, merged=True)))


# --- packed and fused weights --------------------------------------------------------------------------


def test_packed_qkv_attention_is_a_target_and_its_vocabulary_is_found() -> None:
    model = packed_attention_encoder()
    targets = find_targets(model)
    attention = next(t for t in targets if t.weight == "qkv_weight")
    assert (attention.K, attention.N) == (HIDDEN, 3 * HIDDEN)
    assert vocab_size(model) == VOCAB  # the word embedding inside EmbedLayerNormalization
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 5)).astype(np.int32)
    feed = {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}
    reference = run(model, feed)[0]
    exact = onnx.ModelProto()
    exact.CopyFrom(model)
    project(exact, [Projection(t, np.eye(HIDDEN)) for t in find_targets(exact)])
    assert _relative_errors([reference], run(exact, feed))[0] <= 1e-5
    half = onnx.ModelProto()
    half.CopyFrom(model)
    P = np.linalg.qr(np.random.default_rng(1).standard_normal((HIDDEN, HIDDEN // 2)))[0]
    project(half, [Projection(t, P) for t in find_targets(half)])  # Attention takes the narrower input
    assert np.isfinite(run(half, feed)[0]).all()


def test_packed_attention_with_past_rewrites_exactly(tmp_path: Path) -> None:
    """The GPT-2 layout onnxruntime's optimizer writes: the cache [2, batch, heads, past, head] as ``past_0`` fed
    empty, the packed QKV weight a target, the rewrite exact at empty and filled past."""
    model = attention_past_decoder()
    assert {(t.weight, t.N) for t in find_targets(model, include_heads=True)} >= {("qkv_weight", 3 * HIDDEN)}
    specs = input_specs(model)
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 5))
    prefill = complete_feed({"input_ids": ids}, specs)
    assert prefill["past_0"].shape == (2, 2, KV_HEADS, 0, HEAD_DIM)
    result = compress(
        _save(model, tmp_path / "gpt2.onnx"), rank=WIDE_ENOUGH, include_heads=True, output=tmp_path / "exact.onnx",
        seq_len=6, num_batches=2, batch_size=2, holdout=0.0,
    )  # fmt: skip
    assert result.report["layers_compressed"] == 3
    compressed = onnx.load(str(result.output))
    present = run(model, prefill)[1]
    decode = complete_feed({"input_ids": ids[:, :1], "past_0": present}, specs)
    for feed in (prefill, decode):
        assert max(_relative_errors(run(model, feed), run(compressed, feed))) <= 1e-5


def _tied_through_transpose() -> onnx.ModelProto:
    """onnxruntime-genai's tied embeddings (Gemma, Llama-3.2, Qwen2.5-0.5B): the token table is a ``Transpose`` of
    the lm_head's MatMul weight [hidden, vocab], gathered by ``input_ids``."""
    helper = onnx.helper
    rng = np.random.default_rng(0)
    weights = [
        onnx.numpy_helper.from_array((rng.standard_normal((HIDDEN, VOCAB)) / 4).astype(np.float32), "lm_head.weight"),
        onnx.numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) / 4).astype(np.float32), "Wq"),
    ]
    nodes = [
        helper.make_node("Transpose", ["lm_head.weight"], ["table"], name="/model/embed_tokens/Transpose", perm=[1, 0]),
        helper.make_node("Gather", ["table", "input_ids"], ["emb"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["emb", "Wq"], ["q"], name="/model/layers.0/attn/q_proj/MatMul"),
        helper.make_node("Relu", ["q"], ["r"], name="/model/layers.0/relu"),
        helper.make_node("MatMul", ["r", "lm_head.weight"], ["logits"], name="/lm_head/MatMul"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_embedding_tied_through_a_transpose_gives_the_vocabulary(tmp_path: Path) -> None:
    model = _tied_through_transpose()
    assert vocab_size(model) == VOCAB  # random calibration ids need it (was: refused, "no token embedding found")
    head = next(t for t in find_targets(model, include_heads=True) if t.weight == "lm_head.weight")
    assert head.role == "head" and [t.weight for t in find_targets(model)] == ["Wq"]
    result = compress(
        _save(model, tmp_path / "tied.onnx"), rank=WIDE_ENOUGH, include_heads=True, output=tmp_path / "exact.onnx",
        seq_len=6, num_batches=2, batch_size=2, holdout=0.0,
    )  # fmt: skip
    assert result.report["layers_compressed"] == 2
    feed = {"input_ids": np.random.default_rng(1).integers(0, VOCAB, size=(2, 5))}
    assert max(_relative_errors(run(model, feed), run(onnx.load(str(result.output)), feed))) <= 1e-5  # table kept


def test_a_model_that_fails_alone_is_blamed_not_the_calibration_inputs(tmp_path: Path) -> None:
    """A graph ONNX Runtime rejects on any input (genai's rotary cache for a head size its kernel refuses, say):
    the fix points at the model; where the model runs on one token, the fix stays about the inputs."""
    from espace_export.calibration.collect import _blamed

    broken = _tied_through_transpose()
    broken.graph.initializer.append(onnx.numpy_helper.from_array(np.array([7, 3], np.int64), "bad_shape"))
    relu = next(n for n in broken.graph.node if n.op_type == "Relu")
    broken.graph.node.insert(
        list(broken.graph.node).index(relu) + 1, onnx.helper.make_node("Reshape", ["r", "bad_shape"], ["r_bad"])
    )
    broken.graph.output.append(onnx.helper.make_tensor_value_info("r_bad", onnx.TensorProto.FLOAT, [7, 3]))
    with pytest.raises(EspaceError, match="the model itself fails in ONNX Runtime"):
        compress(_save(broken, tmp_path / "broken.onnx"), rank=8, seq_len=6, num_batches=1, batch_size=2)
    working = _tied_through_transpose()
    error = EspaceError("ONNX Runtime failed on a calibration batch: indices out of range", "check the inputs")
    assert _blamed(working, input_specs(working), error) is error


# --- quantized weights ---------------------------------------------------------------------------------


def test_quantized_only_model_is_refused_with_the_right_hint() -> None:
    model = matmul_nbits_model()
    assert find_targets(model) == []
    problem, fix = explain_no_targets(model)
    assert "MatMulNBits" in problem and "do_constant_folding" not in fix
    assert "compress the float model, then quantize" in fix


def test_quantized_blocks_with_a_float_head_hint_at_include_heads() -> None:
    model = matmul_nbits_model(float_too=True)
    next(n for n in model.graph.node if n.op_type == "MatMul").name = "/lm_head/MatMul"  # genai nodes_to_exclude
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller warned about the quantized GEMMs already
        problem, fix = explain_no_targets(model)
    assert "MatMulNBits" in problem and "only its output heads are float (lm_head)" in problem
    assert "compress the float model, then quantize" in fix and "--include-heads" in fix
    assert "--include-heads" not in explain_no_targets(model, include_heads=True)[1]
    with pytest.warns(QuantizedWeightsWarning):
        assert [t.weight for t in find_targets(model, include_heads=True)] == ["Wd"]


def test_mixed_model_warns_about_its_quantized_gemms() -> None:
    with pytest.warns(QuantizedWeightsWarning, match="MatMulNBits"):
        targets = find_targets(matmul_nbits_model(float_too=True))
    assert [t.weight for t in targets] == ["Wd"]


def test_dynamic_int8_and_qdq_graphs_are_named(tmp_path: Path) -> None:
    quantization = pytest.importorskip("onnxruntime.quantization")
    source = _save(pattern_zoo(), tmp_path / "zoo.onnx")
    dynamic = tmp_path / "zoo.int8.onnx"
    quantization.quantize_dynamic(str(source), str(dynamic), weight_type=quantization.QuantType.QInt8)
    kinds = {kind for _, kind in quantized_gemms(onnx.load(str(dynamic)))}
    assert any("MatMulInteger" in k or "DynamicQuantizeMatMul" in k for k in kinds), kinds
    qdq = pattern_zoo()
    wq = next(t for t in qdq.graph.initializer if t.name == "Wq")
    scale = onnx.numpy_helper.from_array(np.array(0.05, np.float32), "Wq_scale")
    quantized = onnx.numpy_helper.from_array(np.zeros((wq.dims[0], wq.dims[1]), np.int8), "Wq_int8")
    qdq.graph.initializer.extend([scale, quantized])
    qdq.graph.node.insert(0, onnx.helper.make_node("DequantizeLinear", ["Wq_int8", "Wq_scale"], ["Wq_dq"]))
    next(n for n in qdq.graph.node if n.name.endswith("q_proj/MatMul")).input[1] = "Wq_dq"
    with pytest.warns(QuantizedWeightsWarning, match="DequantizeLinear"):
        assert "Wq" not in {t.weight for t in find_targets(qdq)}


def test_no_gemm_hint_depends_on_the_graph() -> None:
    heads_only = pattern_zoo()
    keep = {"embed", "tie_transpose"}
    nodes = [n for n in heads_only.graph.node if n.name in keep]
    nodes.append(onnx.helper.make_node("MatMul", ["emb", "E_t"], ["logits"], name="/lm_head/MatMul"))
    del heads_only.graph.node[:]
    heads_only.graph.node.extend(nodes)
    problem, fix = explain_no_targets(heads_only)
    assert "--include-heads" in fix
    weights_as_inputs = pattern_zoo()
    for node in weights_as_inputs.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            node.input[1] = "x2"
    problem, fix = explain_no_targets(weights_as_inputs)
    assert "graph inputs" in problem and "export_params" in fix


# --- optimum exports (samples/export_llm_fixtures.py), when made --------------------------------------

FIXTURES = Path(os.environ.get("ESPACE_LLM_FIXTURES", "samples/out/llm"))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "gpt2"])
@pytest.mark.parametrize("layout", ["with-past/model.onnx", "merged/decoder_model_merged.onnx"])
def test_optimum_exports_rewrite_exactly(family: str, layout: str, tmp_path: Path) -> None:
    folder, name = layout.split("/")
    source = FIXTURES / f"{family}-{folder}" / name
    if not source.exists():
        pytest.skip(f"{source} not made: python samples/export_llm_fixtures.py --venv VENV -o {FIXTURES}")
    model = onnx.load(str(source))
    targets = find_targets(model, include_heads=True)
    assert sum(1 + len(t.also) for t in targets) == _weight_gemm_count(model)
    result = compress(
        source, rank=512, include_heads=True, output=tmp_path / "exact.onnx", seq_len=8, num_batches=2,
        batch_size=2, holdout=0.0,
    )  # fmt: skip
    compressed = onnx.load(str(result.output))
    specs = input_specs(model)
    rng = np.random.default_rng(0)
    prefill = complete_feed({"input_ids": rng.integers(0, 512, size=(2, 6))}, specs)
    names = [o.name for o in model.graph.output]
    reference = run(model, prefill)
    assert max(_relative_errors(reference, run(compressed, prefill))) <= 1e-5
    step = {"input_ids": rng.integers(0, 512, size=(2, 1))}
    step |= {
        n.replace("present", "past_key_values"): v for n, v in zip(names, reference, strict=True) if "present" in n
    }
    decode = complete_feed(step, specs)
    assert max(_relative_errors(run(model, decode), run(compressed, decode))) <= 1e-5


def _weight_gemm_count(model: onnx.ModelProto) -> int:
    """MatMul/Gemm nodes (subgraphs included) whose second input is a 2-D float initializer of the main graph,
    directly or through a Transpose."""
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.data_type in (1, 10, 16)}

    def count(graph: onnx.GraphProto) -> int:
        producers = {o: n for n in graph.node for o in n.output}
        total = 0
        for node in graph.node:
            if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
                b = node.input[1]
                if b in producers and producers[b].op_type == "Transpose":
                    b = producers[b].input[0]
                total += b in weights
            for attr in node.attribute:
                if attr.HasField("g"):
                    total += count(attr.g)
        return total

    return count(model.graph)


def _symbolic_head_size_graph(reader: str) -> onnx.ModelProto:
    """A past input with genai's symbolic ``kv_cache_dim``, read by GroupQueryAttention (packed QKV from a
    MatMul, from an int4 ``MatMulNBits``, or from an op whose width only value_info records) or appended to by a
    Concat whose other input has a recorded shape."""
    helper = onnx.helper
    past = helper.make_tensor_value_info(
        "past_key_values.0.key",
        onnx.TensorProto.FLOAT,
        ["batch_size", "kv_heads", "past_sequence_length", "kv_cache_dim"],
    )
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch_size", "sequence_length", HIDDEN])
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    weight = onnx.numpy_helper.from_array(np.zeros((HIDDEN, (4 + 2 * 2) * 4), np.float32), "qkv")
    nodes = [helper.make_node("MatMul", ["x", "qkv"], ["packed"])]
    value_info = []
    if reader == "gqa-int4":  # genai -p int4: the packed width is MatMulNBits' N
        nodes = [
            helper.make_node("MatMulNBits", ["x", "qkv_q4", "scales"], ["packed"], domain="com.microsoft", K=HIDDEN,
                             N=weight.dims[1], bits=4, block_size=16),
        ]  # fmt: skip
    elif reader == "gqa-value-info":  # any producer, the width recorded as the builders record every tensor
        nodes = [helper.make_node("Identity", ["x"], ["packed"])]
        value_info.append(
            helper.make_tensor_value_info("packed", onnx.TensorProto.FLOAT, ["batch_size", "sequence_length", 32])
        )
    if reader.startswith("gqa"):
        nodes.append(
            helper.make_node(
                "GroupQueryAttention", ["packed", "", "", "past_key_values.0.key", "past_key_values.0.value"], ["y"],
                domain="com.microsoft", num_heads=4, kv_num_heads=2,
            )
        )  # fmt: skip
    else:
        nodes.append(helper.make_node("Concat", ["past_key_values.0.key", "k_new"], ["y"], axis=2))
        value_info.append(
            helper.make_tensor_value_info("k_new", onnx.TensorProto.FLOAT, ["batch_size", 2, "sequence_length", 4])
        )
    graph = helper.make_graph(nodes, "g", [x, past], [out], [weight], value_info=value_info)
    return helper.make_model(graph)


@pytest.mark.parametrize("reader", ["gqa", "gqa-int4", "gqa-value-info", "concat"])
def test_symbolic_head_size_is_read_from_the_graph(reader: str) -> None:
    spec = next(s for s in input_specs(_symbolic_head_size_graph(reader)) if s.name.startswith("past"))
    assert spec.shape == ("batch_size", 2, "past_sequence_length", 4)
    feed = complete_feed({"x": np.zeros((3, 5), np.int64)}, [spec])
    assert feed[spec.name].shape == (3, 2, 0, 4)
