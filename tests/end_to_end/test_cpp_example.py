"""examples/cpp: the C++ prefill builds with CMake against ONNX Runtime and matches Python ONNX Runtime.

Needs cmake, a C++17 compiler and ONNX Runtime's C/C++ headers, found in this order: ``ONNXRUNTIME_ROOT``
(a release archive or prefix with include/ and lib/), ``ESPACE_ORT_HEADERS`` (a folder of headers, paired
with the onnxruntime wheel's library), then ``/usr/include/onnxruntime`` (Debian's libonnxruntime-dev).
``bash examples/cpp/debian_headers.sh DIR`` fetches the headers without installing anything. Skipped, with
the reason, where one of these is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests._repo import ROOT

EXAMPLE = ROOT / "examples" / "cpp"
SEQ = 12

sys.path.insert(0, str(EXAMPLE))
from assemble_ort_root import assemble, wheel_library  # noqa: E402

sys.path.remove(str(EXAMPLE))


def ort_root(tmp: Path) -> Path:
    """An ONNXRUNTIME_ROOT to build against, or a skip naming what is missing."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install -y cmake g++)")
    if os.environ.get("ONNXRUNTIME_ROOT"):
        return Path(os.environ["ONNXRUNTIME_ROOT"])
    headers = os.environ.get("ESPACE_ORT_HEADERS")
    candidates = (
        [Path(headers)] if headers else [Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime")]
    )
    found = next((c for c in candidates if (c / "onnxruntime_cxx_api.h").is_file()), None)
    if found is None:
        pytest.skip(
            "ONNX Runtime's C++ headers are not installed (no PyPI wheel ships them): set ONNXRUNTIME_ROOT or "
            "ESPACE_ORT_HEADERS, or run `bash examples/cpp/debian_headers.sh DIR` (Debian's libonnxruntime-dev)"
        )
    return assemble(found, tmp / "ort")


def python_feed(session: object) -> dict[str, np.ndarray]:
    """The inputs prefill.cpp makes, for batch 1 and SEQ tokens."""
    t = np.arange(SEQ, dtype=np.int64)
    values = {"input_ids": (7 * t + 3) % 100, "attention_mask": np.ones(SEQ, np.int64), "position_ids": t}
    feed = {}
    for spec in session.get_inputs():  # type: ignore[attr-defined]
        dtype = np.int32 if spec.type == "tensor(int32)" else np.int64
        feed[spec.name] = values.get(spec.name, np.zeros(SEQ, np.int64)).astype(dtype).reshape(1, SEQ)
    return feed


@pytest.mark.slow
def test_cpp_prefill_matches_python_onnxruntime(sample_model: Callable[..., Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="Python ONNX Runtime is the reference (pip install 'espace-export[cpu]')")
    root = ort_root(tmp_path)
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(EXAMPLE), "-B", str(build), f"-DONNXRUNTIME_ROOT={root}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr

    import onnxruntime as ort

    from espace_export import compress

    # a compressed model with its weights in external data, loaded by path as the docs say
    with pytest.warns(UserWarning, match="random token ids"):
        result = compress(sample_model("llama", "torchscript"), ratio=0.5, output=tmp_path / "model.espace.onnx",
                          num_batches=2, batch_size=2, seq_len=16, holdout=0, external_data=True)  # fmt: skip
    assert (tmp_path / "model.espace.onnx.data").is_file()
    ran = subprocess.run(
        [str(build / "prefill"), str(result.output), "--seq", str(SEQ), "--threads", "1", "--values"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    header, *values = ran.stdout.split("\n")
    name, shape = header.split(" ", 1)
    cpp = np.array([float(v) for v in values if v], dtype=np.float32)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(result.output), options, providers=["CPUExecutionProvider"])
    expected = session.run([name], python_feed(session))[0]
    assert shape == str(list(expected.shape)) and cpp.size == expected.size
    library = (root / "lib" / "libonnxruntime.so").resolve()
    if library == wheel_library().resolve():  # the very library Python runs: the same bits
        np.testing.assert_array_equal(cpp, expected.ravel())
    else:  # another build of ONNX Runtime (Debian's, a release archive): its kernels may round differently
        np.testing.assert_allclose(cpp, expected.ravel(), rtol=1e-4, atol=1e-5)
