"""Distributed calibration over 2 CPU processes (torchrun, gloo) equals the single-process run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from espace_export.calibration.distributed import assign, shard, share_work
from espace_export.errors import EspaceError

WORKER = Path(__file__).with_name("_distributed_worker.py")


def test_shards_cover_every_batch_once() -> None:
    batches = list(range(7))
    shards = [shard(batches, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == batches
    assert [len(s) for s in shards] == [3, 2, 2]
    with pytest.raises(EspaceError, match="ranks"):
        shard(batches[:1], 0, 2)


def test_decompositions_are_assigned_largest_first_to_the_least_loaded_rank() -> None:
    costs = [4096.0**3, 11008.0**3, 4096.0**3, 4096.0**3, 11008.0**3, 4096.0**3]
    owners = assign(costs, 2)
    assert owners == [0, 0, 1, 0, 1, 1]  # one 11008² each, then the 4096² ones alternate
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(2)]
    assert max(loads) / min(loads) == 1.0
    assert assign(costs, 1) == [0] * 6
    assert share_work([1, 2, 3], lambda x: x * x) == [1, 4, 9]  # one process: a plain map


@pytest.mark.slow
def test_two_processes_match_one(sample_model: Callable[..., Path], tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed", reason="needs torch.distributed")
    model = sample_model("llama", "torchscript")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    single = tmp_path / "single.npz"
    subprocess.run([sys.executable, str(WORKER), str(model), str(single), "5"], check=True, env=env, timeout=300)
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    double = tmp_path / "double.npz"
    done = subprocess.run(
        [*launcher, "--standalone", "--nproc-per-node", "2", str(WORKER), str(model), str(double), "5"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = np.load(single), np.load(double)
    assert int(one["world"]) == 1 and int(two["world"]) == 2
    assert set(one["owners"]) == {0} and set(two["owners"]) == {0, 1}  # both ranks decomposed, rank 0 got all
    worst = 0.0
    for key in one.files:
        if key.startswith(("C", "N")):
            scale = np.abs(one[key]).max()
            worst = max(worst, float(np.abs(one[key] - two[key]).max() / scale))
            np.testing.assert_allclose(two[key], one[key], rtol=1e-12, atol=1e-13 * scale)
        elif key.startswith("rows"):
            np.testing.assert_array_equal(two[key], one[key])
        elif key.startswith("P"):
            # eigenvectors agree up to the conditioning of the eigen-gap: float64 round-off amplified
            np.testing.assert_allclose(two[key], one[key], atol=1e-8)
    print(f"max relative difference of the statistics, 2 ranks vs 1: {worst:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["fast", "auto-validate", "max-memory"])
def test_cli_under_torchrun_matches_one_process(
    sample_model: Callable[..., Path], tmp_path: Path, selection: str
) -> None:
    """`torchrun -m espace_export`: ranks share the calibration and the per-layer decompositions and
    trials (``auto`` × ``validate`` on calibration data; under ``--max-memory`` group by group), rank 0
    writes the same model as one process, and the other rank writes nothing."""
    import onnx
    from onnx import numpy_helper

    from samples.make_models import sample_inputs

    model = sample_model("llama", "torchscript")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    common = ["--ratio", "0.5", "--min-rank", "4", "--num-batches", "6", "--stats-precision", "float64", "-q"]
    if selection == "auto-validate":  # random ids take the fast preset; real arrays take the recommended one
        data = tmp_path / "calib.npz"
        batches = [sample_inputs("llama", 2, 16, seed=s) for s in range(6)]
        np.savez(data, **{k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
        common += ["--calib-data", str(data), "--batch-size", "2", "--method", "auto", "--select", "validate"]
    if selection == "max-memory":  # several groups: statistics all-reduced and decompositions shared per group
        common += ["--max-memory", "2M"]
    subprocess.run([sys.executable, "-m", "espace_export", str(model), "-o", str(tmp_path / "one.onnx"), *common],
                   check=True, env=env, timeout=300)  # fmt: skip
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    done = subprocess.run(
        [*launcher, "--standalone", "--nproc-per-node", "2", "-m", "espace_export", str(model),
         "-o", str(tmp_path / "two.onnx"), *common],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    one = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "one.onnx")).graph.initializer}
    two = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "two.onnx")).graph.initializer}
    assert one.keys() == two.keys() and any("espace_P" in name for name in one)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == sorted(
        p.name.replace("one", "two") for p in tmp_path.iterdir() if p.name.startswith("one")
    )  # one model and one report, from rank 0 alone
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-5, atol=1e-6)
