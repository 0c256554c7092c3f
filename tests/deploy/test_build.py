"""Builders: ONNX Runtime runners, TensorRT profiles and configuration choices, the `build` command."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from espace_export.deploy.build import BuildSettings, build_model, build_runner, ort_providers, synthetic_feed
from espace_export.deploy.options import TritonOptions
from espace_export.deploy.tensorrt import (
    EngineOptions,
    ShapeProfile,
    build_engine,
    derive_profile,
    fixed_profile,
    model_float_dtype,
    parse_shapes,
    plan_build,
    profile_for_model,
)
from espace_export.errors import EspaceError
from espace_export.io.data import InputSpec, input_specs
from espace_export.runtime import ort_session
from tests._cli import run_cli
from tests._models import VOCAB, tiny_decoder

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("build") / "tiny.onnx"
    onnx.save(tiny_decoder(), str(path))
    return path


def ids_spec(name: str = "input_ids", shape: tuple = ("batch", "seq")) -> InputSpec:
    return InputSpec(name, np.dtype(np.int64), shape)


# ------------------------------------------------------------------------------------------- shape strings


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ("input_ids:1x128", {"input_ids": (1, 128)}),
        ("input_ids:[1,128]", {"input_ids": (1, 128)}),
        ("input_ids:1x1,attention_mask:1x1", {"input_ids": (1, 1), "attention_mask": (1, 1)}),
        ("input_ids:[1, 8] attention_mask:[1,8]", {"input_ids": (1, 8), "attention_mask": (1, 8)}),
        (["a:2x3", "past.0.key:1x4x0x8"], {"a": (2, 3), "past.0.key": (1, 4, 0, 8)}),
        ("logits_to_keep:", {"logits_to_keep": ()}),
        (None, {}),
    ],
)
def test_parse_shapes_reads_trtexec_and_polygraphy_forms(values: object, expected: dict) -> None:
    assert parse_shapes(values) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["input_ids", "input_ids:1xq", "input_ids:1x-1", "a:1x2,a:1x3", ":1x2"])
def test_parse_shapes_rejects_malformed_specs(bad: str) -> None:
    with pytest.raises(EspaceError):
        parse_shapes(bad)


# ------------------------------------------------------------------------------------------- profiles


def test_derive_profile_spans_batch_and_sequence_axes_and_keeps_static_ones() -> None:
    specs = [
        ids_spec(),
        ids_spec("attention_mask"),
        InputSpec("pixel", np.dtype(np.float32), ("batch_size", 3, "sequence_length")),
    ]
    profile = derive_profile(specs, seq=128, max_seq=2048, batch=2, max_batch=8)
    assert profile.shapes("min") == {"input_ids": (1, 1), "attention_mask": (1, 1), "pixel": (1, 3, 1)}
    assert profile.shapes("opt") == {"input_ids": (2, 128), "attention_mask": (2, 128), "pixel": (2, 3, 128)}
    assert profile.shapes("max") == {"input_ids": (8, 2048), "attention_mask": (8, 2048), "pixel": (8, 3, 2048)}
    assert profile.as_strings()["opt"] == "input_ids:2x128,attention_mask:2x128,pixel:2x3x128"


def test_derive_profile_places_unnamed_axes_of_token_inputs() -> None:
    profile = derive_profile([ids_spec(shape=(None, None))], seq=16)
    assert (profile.inputs[0].min, profile.inputs[0].opt, profile.inputs[0].max) == ((1, 1), (1, 16), (1, 16))


def test_explicit_shapes_replace_the_derived_ones_for_their_input_only() -> None:
    profile = derive_profile(
        [ids_spec(), ids_spec("attention_mask")],
        seq=64,
        min_shapes={"input_ids": (1, 4)},
        opt_shapes={"input_ids": (1, 32)},
        max_shapes={"input_ids": (1, 64)},
    )
    assert profile.inputs[0].min == (1, 4) and profile.inputs[0].opt == (1, 32)
    assert profile.inputs[1].min == (1, 1) and profile.inputs[1].opt == (1, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_shapes": {"bogus": (1, 1)}}, "not an input"),
        ({"min_shapes": {"input_ids": (1, 1, 1)}}, "rank"),
        ({"min_shapes": {"input_ids": (1, 100)}}, "min ≤ opt ≤ max"),
        ({"max_seq": 8}, "max-seq"),
    ],
)
def test_derive_profile_refuses_inconsistent_shapes(kwargs: dict, message: str) -> None:
    with pytest.raises(EspaceError, match=message):
        derive_profile([ids_spec()], seq=16, **kwargs)


def test_static_dims_must_match_and_unknown_dynamic_axes_need_explicit_shapes() -> None:
    fixed = InputSpec("x", np.dtype(np.float32), ("batch", 4))
    with pytest.raises(EspaceError, match="fixes at 4"):
        derive_profile([fixed], seq=8, opt_shapes={"x": (1, 5)})
    odd = InputSpec("x", np.dtype(np.float32), ("batch", "channels"))
    with pytest.raises(EspaceError, match="neither batch nor sequence"):
        derive_profile([odd], seq=8)
    given = derive_profile([odd], seq=8, min_shapes={"x": (1, 2)}, opt_shapes={"x": (1, 3)}, max_shapes={"x": (1, 4)})
    assert given.inputs[0].max == (1, 4)


def test_profile_for_model_reads_the_inputs_from_the_file(tiny_path: Path) -> None:
    profile = profile_for_model(tiny_path, seq=32, max_seq=256, max_shapes=["attention_mask:1x256"])
    assert [entry.name for entry in profile.inputs] == ["input_ids", "attention_mask"]
    assert profile.shapes("max") == {"input_ids": (1, 256), "attention_mask": (1, 256)}


def test_fixed_profile_pins_min_opt_max_to_the_feed() -> None:
    profile = fixed_profile({"X": np.zeros((4, 8), np.float32)})
    assert profile == ShapeProfile((profile.inputs[0],)) and profile.inputs[0].min == profile.inputs[0].max == (4, 8)


# ------------------------------------------------------------------------------------------- build configuration


@pytest.mark.parametrize(
    ("major", "dtype", "fp16", "typed", "strongly", "flags"),
    [
        (10, "float32", True, None, False, ("FP16",)),
        (10, "float32", False, None, False, ()),
        (10, "float32", False, True, True, ()),
        (10, "float16", True, None, True, ()),
        (10, "float16", False, None, True, ()),
        (10, "float16", True, False, False, ("FP16",)),
        (11, "float16", True, None, True, ()),
        (11, "float32", False, None, True, ()),
        (11, "bfloat16", True, True, True, ()),
    ],
)
def test_plan_build_follows_the_configuration_table(
    major: int, dtype: str, fp16: bool, typed: bool | None, strongly: bool, flags: tuple
) -> None:
    plan = plan_build(EngineOptions(fp16=fp16, strongly_typed=typed), trt_major=major, model_float_dtype=dtype)
    assert (plan.strongly_typed, plan.builder_flags, plan.trt_major) == (strongly, flags, major)


@pytest.mark.parametrize(
    ("major", "dtype", "fp16", "typed", "message"),
    [
        (11, "float32", True, None, "modelopt.onnx.autocast"),  # TensorRT 11 has no FP16 flag
        (11, "float16", True, False, "no weakly typed"),
        (10, "float32", True, True, "strongly typed network runs"),
        (8, "float32", True, None, "too old"),
    ],
)
def test_plan_build_refuses_what_the_tensorrt_version_cannot_do(
    major: int, dtype: str, fp16: bool, typed: bool | None, message: str
) -> None:
    with pytest.raises(EspaceError, match=message):
        plan_build(EngineOptions(fp16=fp16, strongly_typed=typed), trt_major=major, model_float_dtype=dtype)


def test_weakly_typed_fp16_plan_says_it_is_deprecated() -> None:
    plan = plan_build(EngineOptions(), trt_major=10, model_float_dtype="float32")
    assert any("removed in 11" in note for note in plan.notes)


def test_model_float_dtype_reads_initializer_types_without_data() -> None:
    model = tiny_decoder()
    assert model_float_dtype(model) == "float32"
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for tensor in half.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            array = onnx.numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    assert model_float_dtype(half) == "float16"


def test_ort_tensorrt_provider_options_carry_profile_fp16_and_cache(tmp_path: Path) -> None:
    profile = derive_profile([ids_spec()], seq=64, max_seq=512)
    settings = BuildSettings(profile=profile, cache_dir=tmp_path, engine=EngineOptions(fp16=True, workspace_gib=2))
    providers = ort_providers("ort-tensorrt", settings)
    name, options = providers[0]  # type: ignore[misc]
    assert name == "TensorrtExecutionProvider"
    assert options["trt_fp16_enable"] is True
    assert options["trt_profile_min_shapes"] == "input_ids:1x1"
    assert options["trt_profile_opt_shapes"] == "input_ids:1x64"
    assert options["trt_profile_max_shapes"] == "input_ids:1x512"
    assert options["trt_engine_cache_path"] == str(tmp_path)
    assert options["trt_max_workspace_size"] == 2 * 2**30
    assert [p if isinstance(p, str) else p[0] for p in providers[1:]] == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert ort_providers("ort-cpu") == ["CPUExecutionProvider"]
    with pytest.raises(EspaceError, match="unknown backend"):
        ort_providers("cuda")


# ------------------------------------------------------------------------------------------- runners


def test_ort_session_keeps_its_signature(tiny_path: Path) -> None:
    session = ort_session(tiny_path, providers=["CPUExecutionProvider"], threads=1, optimization="basic")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]


def test_ort_cpu_runner_matches_onnxruntime_and_times_a_bound_run(tiny_path: Path) -> None:
    model = tiny_decoder()
    feed = synthetic_feed(model, batch=2, seq=7)
    runner = build_runner(tiny_path, "ort-cpu", BuildSettings(threads=1))
    reference = ort.InferenceSession(str(tiny_path), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(runner.run(feed)[0], reference[0], rtol=1e-5, atol=1e-5)
    once = runner.prepare(feed)
    assert all(once() > 0 for _ in range(3))
    assert runner.backend == "ort-cpu" and "threads: 1" in runner.device
    runner.close()


def test_synthetic_feed_is_a_valid_prompt() -> None:
    feed = synthetic_feed(tiny_decoder(), batch=1, seq=9, seed=3)
    assert feed["input_ids"].shape == (1, 9) and feed["input_ids"].dtype == np.int64
    assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() < VOCAB
    assert (feed["attention_mask"] == 1).all()


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime has the CUDA provider")
def test_gpu_backends_without_onnxruntime_gpu_name_the_extra(tiny_path: Path) -> None:
    for backend in ("ort-cuda", "ort-tensorrt"):
        with pytest.raises(EspaceError, match=r"espace-export\[gpu\]"):
            build_runner(tiny_path, backend)


def test_unknown_and_gemm_only_backends_are_refused(tiny_path: Path) -> None:
    with pytest.raises(EspaceError, match="GEMM shapes only"):
        build_runner(tiny_path, "torch-cuda")
    with pytest.raises(EspaceError, match="unknown backend"):
        build_runner(tiny_path, "cuda")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_missing_is_one_clear_error(tiny_path: Path) -> None:
    profile = profile_for_model(tiny_path, seq=8)
    with pytest.raises(EspaceError, match=r"espace-export\[tensorrt\]"):
        build_engine(tiny_path, profile)


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(tmp_path: Path, tiny_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'espace-export[tensorrt]')")
    from espace_export.deploy.tensorrt import TensorRTRunner

    profile = profile_for_model(tiny_path, seq=16, max_seq=32)
    plan_path = tmp_path / "tiny.plan"
    engine = build_engine(tiny_path, profile, EngineOptions(fp16=False), save_engine=plan_path)
    assert plan_path.read_bytes() == engine
    feed = synthetic_feed(tiny_decoder(), batch=1, seq=16)
    runner = TensorRTRunner(engine)
    reference = ort.InferenceSession(str(tiny_path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(runner.run(feed)[0], reference, rtol=1e-3, atol=1e-3)
    assert runner.prepare(feed)() > 0
    runner.close()


# ------------------------------------------------------------------------------------------- build command


def test_build_model_ort_cpu_writes_a_triton_repository(tmp_path: Path, tiny_path: Path) -> None:
    result = build_model(
        tiny_path, "ort-cpu", seq=8, triton=TritonOptions(triton_repo=tmp_path / "repo", triton_name="tiny")
    )
    assert result.first_run_ms > 0 and result.engine is None
    assert result.triton == tmp_path / "repo" / "tiny"
    assert (result.triton / "1" / "model.onnx").read_bytes() == tiny_path.read_bytes()
    assert "kind: KIND_CPU" in (result.triton / "config.pbtxt").read_text()
    with pytest.raises(EspaceError, match="already exists"):
        build_model(
            tiny_path, "ort-cpu", seq=8, triton=TritonOptions(triton_repo=tmp_path / "repo", triton_name="tiny")
        )


def test_triton_batch_size_must_fit_the_engine_profile(tiny_path: Path, tmp_path: Path) -> None:
    with pytest.raises(EspaceError, match="exceeds the engine's largest batch"):
        build_model(tiny_path, "tensorrt", seq=8, triton=TritonOptions(triton_repo=tmp_path / "repo", max_batch_size=4))


def test_save_engine_needs_the_tensorrt_backend(tiny_path: Path, tmp_path: Path) -> None:
    with pytest.raises(EspaceError, match="--save-engine"):
        build_model(tiny_path, "ort-cpu", save_engine=tmp_path / "x.plan")


def test_build_command_prints_one_line_errors(tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["build", str(tiny_path), "--min-shapes", "input_ids:1x1"], capsys)
    assert (code, err.strip()) == (
        2,
        "error: shape profiles apply to TensorRT — add --backend tensorrt or ort-tensorrt",
    )
    code, _, err = run_cli(["build", str(tiny_path), "--backend", "tensorrt", "--min-shapes", "nope:1x1"], capsys)
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1


def test_build_command_runs_on_ort_cpu(tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["build", str(tiny_path), "--seq", "16"], capsys)
    assert code == 0 and "first run at seq 16" in out


def test_input_specs_of_tiny_model_are_dynamic() -> None:
    assert [s.shape for s in input_specs(tiny_decoder())] == [("batch", "seq"), ("batch", "seq")]
