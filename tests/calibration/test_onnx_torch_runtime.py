"""The torch interpreter on LLM deployment graphs: ONNX Runtime's own operators agree with an ONNX Runtime
session, merged decoders (GEMMs inside If branches) get gradients through the branch the batches select, and
--select validate / proxy and the nl-mse candidates run on them and on packed-QKV Attention encoders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from espace_export import EspaceError  # noqa: E402
from espace_export.calibration.gradients import collect_gradient_statistics  # noqa: E402
from espace_export.calibration.onnx_torch import TorchGraph  # noqa: E402
from espace_export.io.data import complete_feed, input_specs  # noqa: E402
from graph_passes import find_targets  # noqa: E402
from tests._cli import run_cli  # noqa: E402
from tests._graphs import HIDDEN, VOCAB, decoder_feeds, kv_decoder, merged_decoder, packed_attention_encoder, run  # noqa: E402


def _agree(model: onnx.ModelProto, feed: dict[str, np.ndarray], tolerance: float = 1e-5) -> None:
    expected = run(model, feed)
    got = TorchGraph(model).run(feed)
    for name, reference in zip([o.name for o in model.graph.output], expected, strict=True):
        value = got[name].detach().numpy()
        assert value.shape == reference.shape, name
        assert np.abs(value - reference).max() <= tolerance * max(1.0, np.abs(reference).max()), name


def _encoder_feed(mask_tail: int = 2, batch: int = 2, seq: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    mask = np.ones((batch, seq), np.int32)
    mask[1, seq - mask_tail :] = 0  # right padding in the second row
    return {
        "input_ids": rng.integers(0, VOCAB, size=(batch, seq)).astype(np.int32),
        "token_type_ids": rng.integers(0, 2, size=(batch, seq)).astype(np.int32),
        "attention_mask": mask,
    }


def test_packed_qkv_attention_and_embed_layer_norm_match_onnx_runtime() -> None:
    _agree(packed_attention_encoder(), _encoder_feed())


@pytest.mark.parametrize("past", [0, 3])
def test_simplified_layer_norm_decoder_matches_onnx_runtime(past: int) -> None:
    _agree(kv_decoder(), decoder_feeds(past=past))


def _fused_ops_graph() -> onnx.ModelProto:
    """x, skip ─SkipSimplifiedLayerNormalization─► y1, sum ─SkipLayerNormalization(+bias)─► y2 ─BiasGelu─► y3."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "g1"], ["y1", "", "", "s1"],
                         domain="com.microsoft", epsilon=1e-6),
        helper.make_node("SkipLayerNormalization", ["y1", "s1", "g2", "b2", "bias"], ["y2"], domain="com.microsoft",
                         epsilon=1e-5),
        helper.make_node("BiasGelu", ["y2", "bias"], ["y3"], domain="com.microsoft"),
    ]  # fmt: skip
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "fused",
        [value("x", TensorProto.FLOAT, ["b", "s", HIDDEN]), value("skip", TensorProto.FLOAT, ["b", "s", HIDDEN])],
        [value(n, TensorProto.FLOAT, None) for n in ("y1", "s1", "y3")],
        [w("g1", HIDDEN), w("g2", HIDDEN), w("b2", HIDDEN), w("bias", HIDDEN)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model


def test_skip_norms_and_bias_gelu_match_onnx_runtime() -> None:
    rng = np.random.default_rng(1)
    feed = {name: rng.standard_normal((2, 5, HIDDEN)).astype(np.float32) for name in ("x", "skip")}
    _agree(_fused_ops_graph(), feed)


def test_an_uncovered_operator_is_refused_with_the_forward_only_methods() -> None:
    model = _fused_ops_graph()
    model.graph.node[2].op_type = "GroupQueryAttention"
    with pytest.raises(EspaceError, match=r"GroupQueryAttention.*--method mse, nmse, go-mse or go-mse-l2"):
        TorchGraph(model)


def test_merged_decoder_gradients_equal_the_with_past_decoders() -> None:
    """The merged decoder's prefill branch is the with-past decoder at an empty past: same weights, so the
    same activation-gradient statistics, keyed by the merged decoder's own activation names."""
    batches = [{"input_ids": decoder_feeds(seed=s)["input_ids"]} for s in (1, 2)]
    merged, plain = merged_decoder(), kv_decoder()
    merged_targets, plain_targets = find_targets(merged), find_targets(plain)
    got = collect_gradient_statistics(merged, merged_targets, batches, specs=input_specs(merged))
    want = collect_gradient_statistics(plain, plain_targets, batches, specs=input_specs(plain))
    assert set(got) == {t.activation for t in merged_targets}
    by_weight = {t.weight: t.activation for t in plain_targets}
    for target in merged_targets:
        a, b = got[target.activation], want[by_weight[target.weight]]
        assert a.sequences == b.sequences > 0
        np.testing.assert_allclose(a.C_XG, b.C_XG, rtol=1e-6, atol=1e-12)


def test_merged_decoder_fisher_samples_equal_the_with_past_decoders() -> None:
    """``--select fisher`` on a merged decoder scores the prefill branch: the same samples as the with-past
    decoder at an empty past, keyed by the merged decoder's layer names."""
    from espace_export.harm import collect_fisher_samples

    batches = [{"input_ids": decoder_feeds(seed=s)["input_ids"]} for s in (1, 2)]
    merged, plain = merged_decoder(), kv_decoder()
    got = collect_fisher_samples(merged, find_targets(merged), batches, specs=input_specs(merged))
    want = collect_fisher_samples(plain, find_targets(plain), batches, specs=input_specs(plain))
    by_weight = {t.weight: t.name for t in find_targets(plain)}
    assert got.tokens == want.tokens > 0 and set(got.G) == {t.name for t in find_targets(merged)}
    for target in find_targets(merged):
        np.testing.assert_allclose(got.G[target.name], want.G[by_weight[target.weight]], rtol=1e-5, atol=1e-9)


def test_merged_decoder_prefill_is_the_branch_the_feed_selects() -> None:
    feed = complete_feed({"input_ids": decoder_feeds()["input_ids"]}, input_specs(merged_decoder()))
    assert feed["use_cache_branch"].tolist() == [False]
    _agree(kv_decoder(), {k: v for k, v in feed.items() if k != "use_cache_branch"})


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "nl-mse"],
        ["--select", "validate", "--method", "best"],
        ["--select", "proxy", "--method", "auto"],
        ["--select", "fisher", "--method", "auto"],
    ],
    ids=["nl-mse", "validate-best", "proxy-auto", "fisher-auto"],
)
@pytest.mark.parametrize("builder", [merged_decoder, packed_attention_encoder], ids=["merged", "attention"])
def test_selection_and_gradients_run_on_branch_and_attention_targets(builder, args, tmp_path: Path, capsys) -> None:
    source, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(builder(), str(source))
    common = ["--ratio", "0.5", "--min-rank", "4", "--seq-len", "6", "--num-batches", "4", "--batch-size", "2"]
    code, _, err = run_cli([str(source), *common, *args, "-o", str(out), "-q"], capsys)
    if builder is packed_attention_encoder and "fisher" in args:  # X·W inside Attention: no gradient of it
        assert code == 2 and "cannot score layer" in err and "Attention" in err and len(err.splitlines()) == 1
        assert not out.exists()
        return
    assert code == 0, err
    assert "Traceback" not in err
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["layers_compressed"] >= 1
    compressed = onnx.load(str(out))
    feed = decoder_feeds(past=2, merged=True) if builder is merged_decoder else _encoder_feed()
    assert all(np.isfinite(o).all() for o in run(compressed, feed))


def test_nl_mse_reads_weights_kept_in_external_data(tmp_path: Path, capsys) -> None:
    source = tmp_path / "decoder.onnx"
    onnx.save(kv_decoder(), str(source), save_as_external_data=True, location="decoder.onnx.data", size_threshold=100)
    out = tmp_path / "out.onnx"
    common = ["--ratio", "0.5", "--min-rank", "4", "--seq-len", "6", "--num-batches", "2", "--batch-size", "2"]
    code, _, err = run_cli([str(source), *common, "--method", "nl-mse", "-o", str(out), "-q"], capsys)
    assert code == 0, err
    layers = json.loads(out.with_suffix(".report.json").read_text())["layers"]
    assert {layer["candidate"] for layer in layers if layer["compressed"]} == {"nl-mse"}


def _gelu_graph() -> onnx.ModelProto:
    """x ─Gelu(opset 20)─► y1, ─Gelu(tanh)─► y2, ─com.microsoft Gelu─► y3, ─FastGelu(+bias)─► y4,
    ─QuickGelu─► y5."""
    nodes = [
        helper.make_node("Gelu", ["x"], ["y1"]),
        helper.make_node("Gelu", ["x"], ["y2"], approximate="tanh"),
        helper.make_node("Gelu", ["x"], ["y3"], domain="com.microsoft"),
        helper.make_node("FastGelu", ["x", "bias"], ["y4"], domain="com.microsoft"),
        helper.make_node("QuickGelu", ["x"], ["y5"], domain="com.microsoft", alpha=1.5),
    ]
    value = helper.make_tensor_value_info
    bias = numpy_helper.from_array(np.linspace(-1, 1, HIDDEN).astype(np.float32), "bias")
    graph = helper.make_graph(nodes, "gelus", [value("x", TensorProto.FLOAT, ["b", HIDDEN])],
                              [value(f"y{i}", TensorProto.FLOAT, None) for i in range(1, 6)], [bias])  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    return model


def test_gelu_family_matches_onnx_runtime() -> None:
    x = np.random.default_rng(2).standard_normal((3, HIDDEN)).astype(np.float32) * 3
    _agree(_gelu_graph(), {"x": x})


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fused_activations_compute_the_same_values_with_fewer_nodes(sample_model, arch: str) -> None:
    from espace_export.calibration.onnx_torch import fused_activations
    from samples.make_models import sample_inputs

    model = onnx.load(sample_model(arch, "torchscript"))
    fused = fused_activations(model)
    erf = [n for n in model.graph.node if n.op_type == "Erf"]
    assert sum(n.op_type == "Erf" for n in fused.graph.node) == 0
    assert sum(n.op_type == "Gelu" for n in fused.graph.node) == len(erf)  # bert: one per block; llama (SiLU): 0
    assert len(fused.graph.node) <= len(model.graph.node) - 4 * len(erf)  # and the constants only they read
    assert {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "LayerNormalization")} <= {
        n.name for n in fused.graph.node
    }  # the GEMMs healing overrides and the token states it reads are kept
    feed = complete_feed(sample_inputs(arch, 2, 8, seed=1), input_specs(model))
    want, got = TorchGraph(model).run(feed), TorchGraph(fused).run(feed)
    for name in want:
        np.testing.assert_allclose(got[name].detach().numpy(), want[name].detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(fused, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)  # ORT agrees
    # without the weights: the same graph, no large tensor copied, the weights read from the model
    bare = fused_activations(model, weights=False)
    assert [n.op_type for n in bare.graph.node] == [n.op_type for n in fused.graph.node]
    assert (
        max(int(np.prod(t.dims)) for t in bare.graph.initializer)
        <= 64
        < max(int(np.prod(t.dims)) for t in model.graph.initializer)
    )
    assert len(model.graph.initializer) == len(onnx.load(sample_model(arch, "torchscript")).graph.initializer)
    got = TorchGraph(bare, weights=model).run(feed)
    for name in want:
        np.testing.assert_allclose(got[name].detach().numpy(), want[name].detach().numpy(), rtol=1e-5, atol=1e-5)


def test_autocast_keeps_bias_and_mask_sums_in_bfloat16_and_the_residual_stream_in_float32(sample_model) -> None:
    import torch

    from samples.make_models import sample_inputs

    model = onnx.load(sample_model("bert", "torchscript"))
    producers = {o: n for n in model.graph.node for o in n.output}
    feed = complete_feed(sample_inputs("bert", 2, 8, seed=1), input_specs(model))
    exact = TorchGraph(model).run(feed)
    for low in (True, False):
        graph = TorchGraph(model)
        graph.low_precision_elementwise = low
        dtypes: dict[str, torch.dtype] = {}

        def watch(name: str, value, dtypes=dtypes):
            dtypes[name] = value.dtype
            return value

        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = graph.run(feed, watch=watch)
        bias_adds = [n.output[0] for n in model.graph.node if n.op_type == "Add"
                     and any(producers.get(i) is not None and producers[i].op_type == "MatMul" for i in n.input)
                     and any(i in graph.constants for i in n.input)]  # fmt: skip
        residual = [n.output[0] for n in model.graph.node if n.op_type == "Add"
                    and sum(producers.get(i) is not None and producers[i].op_type == "LayerNormalization"
                            for i in n.input) == 1]  # fmt: skip
        assert bias_adds and residual
        assert {dtypes[name] for name in bias_adds} == {torch.bfloat16 if low else torch.float32}
        assert {dtypes[name] for name in residual} == {torch.float32}
        for name, value in got.items():  # bfloat16 round-off, no more
            want = exact[name].float()
            assert float((value.float() - want).norm() / want.norm()) < 3e-2


def test_an_autocast_mask_of_float32_minimum_stays_finite_in_bfloat16() -> None:
    import torch

    from espace_export.calibration.onnx_torch import _autocast_pair

    scores = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)
    mask = torch.full((2, 1, 4, 4), torch.finfo(torch.float32).min)
    assert torch.isinf(mask.to(torch.bfloat16)).all()  # what a plain cast would give
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = _autocast_pair(scores, mask)
        probabilities = torch.softmax(a + b, dim=-1)  # a row masked throughout: uniform, not NaN
    assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
    assert torch.isfinite(probabilities).all()
    assert _autocast_pair(scores, mask)[1].dtype == torch.float32  # outside autocast: untouched


def test_an_autocast_division_by_a_small_float32_tensor_stays_bfloat16() -> None:
    import torch

    from espace_export.calibration.onnx_torch import _div

    graph = TorchGraph(_division_graph())
    scores = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    divisor = torch.tensor([5.6568])  # an attention scale stored as a 1-element float32 initializer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _div([scores, divisor], {}, graph)
        graph.low_precision_elementwise = False
        promoted = _div([scores, divisor], {}, graph)
    assert low.dtype == torch.bfloat16 and promoted.dtype == torch.float32
    torch.testing.assert_close(low.float(), promoted, rtol=1e-2, atol=1e-2)
    assert _div([torch.tensor([7]), torch.tensor([2])], {}, graph).tolist() == [3]  # integers: truncated


def _division_graph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    scale = numpy_helper.from_array(np.array([2.0], np.float32), "scale")
    node = helper.make_node("Div", ["x", "scale"], ["y"])
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [scale]))


# ---- ONNX Attention (opset 23) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "attrs"),
    [
        ("4d-float-mask", {}),
        ("4d-bool-mask-scale", {"scale": 0.3}),
        ("4d-causal-gqa", {"is_causal": 1}),
        ("3d-gqa", {"q_num_heads": 4, "kv_num_heads": 2}),
        ("4d-past", {}),
    ],
)
def test_the_attention_operator_matches_onnx_runtime(case, attrs) -> None:
    """The interpreter's ONNX ``Attention`` against ONNX Runtime's own (opset 23) on one node."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    batch, seq, past, size = 2, 5, 3, 8
    kv_heads = 2 if "gqa" in case else 4
    if case.startswith("3d"):
        shapes = {"q": [batch, seq, 4 * size], "k": [batch, seq, kv_heads * size], "v": [batch, seq, kv_heads * size]}
    else:
        shapes = {"q": [batch, 4, seq, size], "k": [batch, kv_heads, seq, size], "v": [batch, kv_heads, seq, size]}
    feed = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    total = seq + (past if case.endswith("past") else 0)
    inputs = ["q", "k", "v"]
    if "mask" in case or case.endswith("past") or case == "3d-gqa":
        keep = rng.random((batch, 1, seq, total)) > 0.3
        keep[..., 0] = True  # no row masked throughout
        if "bool" in case:
            feed["mask"] = keep
        else:
            feed["mask"] = np.where(keep, rng.standard_normal(keep.shape), np.finfo(np.float32).min).astype(np.float32)
        inputs.append("mask")
    outputs = ["y"]
    if case.endswith("past"):
        feed["past_key"] = rng.standard_normal((batch, 4, past, size)).astype(np.float32)
        feed["past_value"] = rng.standard_normal((batch, 4, past, size)).astype(np.float32)
        inputs += ["past_key", "past_value"]
        outputs += ["present_key", "present_value"]
    node = helper.make_node("Attention", inputs, outputs, **attrs)
    graph = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info(n, TensorProto.BOOL if v.dtype == bool else TensorProto.FLOAT, v.shape)
         for n, v in feed.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(outputs, feed)
    got = TorchGraph(model).run(feed, outputs=outputs)
    for name, value in zip(outputs, want, strict=True):
        np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-5, atol=1e-5)


def test_the_attention_operator_refuses_3d_inputs_without_head_counts() -> None:
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 8]) for n in "qkv"]
    model = helper.make_model(helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", 1, None)]))
    feed = {n: np.zeros((1, 2, 8), np.float32) for n in "qkv"}
    with pytest.raises(EspaceError, match="q_num_heads"):
        TorchGraph(model).run(feed)
