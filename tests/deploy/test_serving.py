"""Triton model repositories: layout, and a config.pbtxt that parses against Triton's ModelConfig schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from espace_export.deploy.build import synthetic_feed
from espace_export.deploy.serving import data_type_name, parse_config, triton_config, write_triton_repo
from espace_export.errors import EspaceError
from espace_export.io.models import save_model
from tests._models import compress_tiny, tiny_decoder

ONNX_TO_TRITON = {TensorProto.INT64: "TYPE_INT64", TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16"}


@pytest.fixture()
def compressed_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.espace.onnx"
    onnx.save(compress_tiny(tiny_decoder()), str(path))
    return path


def expected_tensors(values: list[onnx.ValueInfoProto], *, drop_batch: bool) -> list[tuple[str, str, list[int]]]:
    """Names, Triton types and dims read straight from the ONNX value infos (independently of serving.py)."""
    rows = []
    for value in values:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        rows.append((value.name, ONNX_TO_TRITON[value.type.tensor_type.elem_type], dims[1:] if drop_batch else dims))
    return rows


def parsed_tensors(fields: object) -> list[tuple[str, str, list[int]]]:
    return [(t.name, data_type_name(t.data_type), list(t.dims)) for t in fields]  # type: ignore[attr-defined]


def test_onnx_repository_layout_and_config_match_the_model(tmp_path: Path, compressed_path: Path) -> None:
    model_dir = write_triton_repo(tmp_path / "repo", compressed_path, name="tiny", instance="cpu")
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "1",
        "1/model.onnx",
        "config.pbtxt",
    ]
    config = parse_config((model_dir / "config.pbtxt").read_text())
    model = onnx.load(str(compressed_path))
    assert (config.name, config.platform, config.max_batch_size) == ("tiny", "onnxruntime_onnx", 0)
    assert parsed_tensors(config.input) == expected_tensors(list(model.graph.input), drop_batch=False)
    assert parsed_tensors(config.output) == expected_tensors(list(model.graph.output), drop_batch=False)
    assert parsed_tensors(config.input) == [
        ("input_ids", "TYPE_INT64", [-1, -1]),
        ("attention_mask", "TYPE_INT64", [-1, -1]),
    ]
    assert parsed_tensors(config.output) == [("logits", "TYPE_FP32", [-1, -1, 40])]
    assert [(g.kind, g.count) for g in config.instance_group] == [(2, 1)]  # KIND_CPU
    assert not config.HasField("dynamic_batching")
    assert (model_dir / "1" / "model.onnx").read_bytes() == compressed_path.read_bytes()


def test_batching_config_leaves_the_batch_axis_out(tmp_path: Path, compressed_path: Path) -> None:
    model_dir = write_triton_repo(tmp_path / "repo", compressed_path, max_batch_size=8)
    assert model_dir.name == "tiny_espace"
    config = parse_config((model_dir / "config.pbtxt").read_text())
    model = onnx.load(str(compressed_path))
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert parsed_tensors(config.input) == expected_tensors(list(model.graph.input), drop_batch=True)
    assert parsed_tensors(config.output) == expected_tensors(list(model.graph.output), drop_batch=True)
    assert not config.instance_group  # auto: Triton places it


def test_batching_needs_a_shared_dynamic_first_axis() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "static",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, "n"])],
    )
    model = helper.make_model(graph)
    with pytest.raises(EspaceError, match="shared dynamic"):
        triton_config(model, name="m", max_batch_size=2)
    config = triton_config(model, name="m")
    assert [(t.data_type, t.dims) for t in config.inputs] == [("TYPE_FP16", (4, -1))]


def test_engine_repository_serves_the_plan(tmp_path: Path, compressed_path: Path) -> None:
    model_dir = write_triton_repo(tmp_path / "repo", compressed_path, engine=b"not-a-real-engine", name="tiny_trt")
    assert (model_dir / "1" / "model.plan").read_bytes() == b"not-a-real-engine"
    assert not (model_dir / "1" / "model.onnx").exists()
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan"
    assert [(g.kind, g.count) for g in config.instance_group] == [(1, 1)]  # KIND_GPU
    assert [t.name for t in config.input] == ["input_ids", "attention_mask"]


def test_external_data_is_kept_beside_the_model_and_loads(tmp_path: Path) -> None:
    source = tmp_path / "src" / "big.onnx"
    source.parent.mkdir()
    model = compress_tiny(tiny_decoder())
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # saving with external data rewrites the proto it is given
    save_model(on_disk, source, external_data=True)
    assert (tmp_path / "src" / "big.onnx.data").is_file()
    model_dir = write_triton_repo(tmp_path / "repo", source, name="big")
    version = model_dir / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx.data"]
    structure = onnx.load(str(version / "model.onnx"), load_external_data=False)
    locations = {
        entry.value for t in structure.graph.initializer for entry in t.external_data if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}
    feed = synthetic_feed(model, batch=1, seq=6)
    served = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(served[0], reference[0], rtol=1e-6)


def test_existing_models_are_replaced_only_when_asked(tmp_path: Path, compressed_path: Path) -> None:
    repo = tmp_path / "repo"
    write_triton_repo(repo, compressed_path, name="tiny")
    with pytest.raises(EspaceError, match="already exists"):
        write_triton_repo(repo, compressed_path, name="tiny", engine=b"x")
    write_triton_repo(repo, compressed_path, name="tiny", engine=b"x", version=2, overwrite=True)
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["2", "config.pbtxt"]
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]  # no staging or backup left behind
    with pytest.raises(EspaceError, match="model name"):
        write_triton_repo(repo, compressed_path, name="../escape")


def test_the_schema_accepts_triton_style_configs_and_rejects_mistakes() -> None:
    documented = """
    name: "resnet"
    platform: "tensorrt_plan"
    max_batch_size: 8
    input [ { name: "input0", data_type: TYPE_FP32, dims: [ 3, 224, 224 ] } ]
    output [ { name: "output0", data_type: TYPE_FP32, dims: [ 1000 ] } ]
    instance_group [ { kind: KIND_GPU, count: 2 } ]
    """
    config = parse_config(documented)
    assert list(config.input[0].dims) == [3, 224, 224] and config.instance_group[0].count == 2
    for wrong in (
        'name: "m" input [ { name: "x", data_type: TYPE_FLOAT32 } ]',  # no such DataType
        'name: "m" input [ { name: "x", dims: [ "a" ] } ]',  # dims are integers
        'name: "m" inputs [ { name: "x" } ]',  # no such field
        "max_batch_size: 1.5",
    ):
        with pytest.raises(EspaceError, match="invalid Triton config"):
            parse_config(wrong)


def test_names_are_quoted_for_text_format(tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ['in "quoted"\\', "w"], ["out.é"])],
        "names",
        [helper.make_tensor_value_info('in "quoted"\\', TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out.é", TensorProto.FLOAT, ["batch", 4])],
        [weight],
    )
    config = parse_config(triton_config(helper.make_model(graph), name="names").to_pbtxt())
    assert config.input[0].name == 'in "quoted"\\' and config.output[0].name == "out.é"
