"""Packaging: the ONNX Runtime comes from exactly one extra, and a missing one is a one-line error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from espace_export._optional import require, require_onnxruntime
from espace_export.errors import EspaceError
from tests._repo import ROOT

RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement (``onnxruntime-gpu>=1.18`` → onnxruntime-gpu)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _extra_names(requirement: str) -> list[str]:
    match = re.match(r"\s*[A-Za-z0-9._-]+\s*\[([^\]]*)\]", requirement)
    return [e.strip() for e in match.group(1).split(",")] if match else []


def resolved_names(project: dict, extras: list[str]) -> set[str]:
    """Distribution names that ``pip install '.[extras]'`` asks for directly: the core dependencies plus each
    extra's, following extras that name this project itself (``espace-export[cpu]``)."""
    names = {_name(r) for r in project["dependencies"]}
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in project["optional-dependencies"][extra]:
            if _name(requirement) == project["name"]:
                pending += _extra_names(requirement)
            else:
                names.add(_name(requirement))
    return names


def test_core_dependencies_hold_no_runtime_and_nothing_unused() -> None:
    project = _project()
    core = {_name(r) for r in project["dependencies"]}
    assert not core & RUNTIMES
    # polygraphy only runs TensorRT engines, onnx-graphsurgeon is imported by nothing: neither belongs in core
    assert not core & {"polygraphy", "onnx-graphsurgeon", "tensorrt"}


def test_gpu_extra_brings_onnxruntime_gpu_without_the_cpu_runtime() -> None:
    project = _project()
    gpu = resolved_names(project, ["gpu"])
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    cpu = resolved_names(project, ["cpu"])
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    # no other extra may bring a runtime back in, so [gpu,torch,tensorrt,...] stays GPU-only
    others = [e for e in project["optional-dependencies"] if e not in ("cpu", "gpu")]
    assert resolved_names(project, ["gpu", *others]) & RUNTIMES == {"onnxruntime-gpu"}
    assert {"tensorrt", "polygraphy"} <= resolved_names(project, ["tensorrt"])


def test_the_extras_the_docs_name_exist() -> None:
    extras = set(_project()["optional-dependencies"])
    assert {"cpu", "gpu", "tensorrt", "torch", "text", "test", "dev"} <= extras


def test_onnx_graphsurgeon_is_imported_by_nothing() -> None:
    sources = [p for d in ("espace_export", "graph_passes", "samples", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    assert sources
    assert not [p for p in sources if re.search(r"^\s*(import|from)\s+onnx_graphsurgeon", p.read_text(), re.M)]


def test_require_names_the_extra_in_one_line() -> None:
    with pytest.raises(EspaceError) as caught:
        require("espace_no_such_module_xyz", extra="tensorrt", purpose="building an engine")
    message = str(caught.value)
    assert message == (
        "building an engine needs the espace_no_such_module_xyz package — pip install 'espace-export[tensorrt]'"
    )
    assert "\n" not in message
    assert require("json", extra="cpu", purpose="x").dumps([1]) == "[1]"


def test_require_reports_a_broken_install_as_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "espace_broken_pkg").mkdir()
    (tmp_path / "espace_broken_pkg" / "__init__.py").write_text("import espace_absent_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EspaceError, match="installed but cannot be imported: it needs 'espace_absent_dependency_xyz'"):
        require("espace_broken_pkg", extra="cpu", purpose="x")


def test_require_onnxruntime_names_both_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when absent
    with pytest.raises(EspaceError) as caught:
        require_onnxruntime("calibration")
    assert str(caught.value).startswith("calibration needs the onnxruntime package — ")
    assert "espace-export[cpu]" in str(caught.value) and "espace-export[gpu]" in str(caught.value)


WITHOUT_RUNTIME = """
import sys
sys.modules["onnxruntime"] = None   # as if neither onnxruntime nor onnxruntime-gpu were installed
import espace_export, espace_export.cli, espace_export.deploy.build, espace_export.calibration
from espace_export.cli import main
main(sys.argv[1:])
"""


def test_without_a_runtime_the_package_imports_and_the_cli_says_which_extra(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], [0.01] * 64 * 64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "one_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [weight],
    )
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RUNTIME, str(model), "--calib-data", str(tmp_path / "calib.npz"), "--fast", "-q"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "needs the onnxruntime package" in lines[0] and "espace-export[cpu]" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.onnx"]


def test_a_half_removed_runtime_is_reported_as_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uninstalling onnxruntime after onnxruntime-gpu leaves an empty `onnxruntime` folder (a namespace package)."""
    import types

    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))
    with pytest.raises(EspaceError, match="incomplete") as caught:
        require_onnxruntime()
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in str(caught.value)
