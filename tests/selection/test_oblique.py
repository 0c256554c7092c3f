"""Oblique projections: whitened SVD as a static pair (A, M) with W whole — identity, graph, plan, healing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import espace_export
from espace_export.io.artifacts import load_plan
from espace_export.selection.candidates import autocorrelation
from espace_export.selection.factorizations import AUTO_METHODS, METHODS, factorize, oblique_projection, whitened_svd


def _data(K: int = 48, N: int = 40, rows: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, K)) @ (rng.standard_normal((K, K)) * np.exp(-np.arange(K) / 5)).T
    return X, rng.standard_normal((K, N))


@pytest.mark.parametrize("rows", [3000, 12])  # 12 rows for K = 48: singular C_X, regularised whitening
def test_oblique_equals_whitened_svd_and_m_a_is_the_identity(rows: int) -> None:
    X, W = _data(rows=rows)
    C_X = autocorrelation(X)
    for L in (1, 8, 30):
        oblique = oblique_projection(W, C_X, L)
        reference = whitened_svd(W, C_X, L)
        assert oblique.A.shape == (48, L) and oblique.M is not None and oblique.M.shape == (L, 48)
        np.testing.assert_allclose(oblique.M @ oblique.A, np.eye(L), atol=1e-10)
        np.testing.assert_allclose(oblique.B, oblique.M @ W, rtol=0, atol=0)  # B is M·W: W stays whole
        scale = np.abs(reference.weight()).max()
        np.testing.assert_allclose(oblique.A @ (oblique.M @ W), reference.weight(), rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(oblique.A, reference.A, rtol=0, atol=1e-10 * np.abs(reference.A).max())
        projector = oblique.A @ oblique.M
        np.testing.assert_allclose(projector @ projector, projector, atol=1e-8 * np.abs(projector).max())


def test_oblique_is_a_method_and_auto_prefers_it_to_whitened_svd() -> None:
    assert "oblique" in METHODS and "oblique" in AUTO_METHODS and "whitened-svd" not in AUTO_METHODS
    X, W = _data()
    f = factorize("oblique", W, 8, C_X=autocorrelation(X))
    assert f.method == "oblique" and f.M is not None


@pytest.fixture(scope="module")
def compressed(sample_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("oblique")
    path = sample_model("gpt2", "torchscript")  # Gemm layers stored transposed, and Q/K/V siblings sharing A
    models = {"dense": Path(path)}
    for method in ("oblique", "whitened-svd"):
        result = espace_export.compress(
            path, ratio=0.5, method=method, min_rank=4, num_batches=4, seq_len=16, seed=3,
            output=out / f"{method}.onnx", plan_path=out / f"{method}.json",
        )  # fmt: skip
        models[method] = result.output
        models[f"{method}.plan"] = out / f"{method}.json"
    return models


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_oblique_graph_runs_like_whitened_svd_and_its_plan_keeps_w_whole(compressed, tmp_path) -> None:
    from samples.make_models import sample_inputs

    feed = sample_inputs("gpt2", 2, 9, seed=5)
    dense, oblique, whitened = (_run(compressed[k], feed) for k in ("dense", "oblique", "whitened-svd"))
    assert np.abs(oblique - dense).max() > 1e-3  # compressed for real
    np.testing.assert_allclose(oblique, whitened, rtol=1e-4, atol=1e-5 * np.abs(whitened).max())

    plan = load_plan(compressed["oblique.plan"])
    assert plan.factors and {layer.method for layer in plan.selected_layers()} == {"oblique"}
    for f in plan.factors.values():  # stored: A and M, never B (folded from the weight at apply)
        assert f.B is None and f.M is not None and f.M.shape == (f.A.shape[1], f.A.shape[0])
        np.testing.assert_allclose(f.M @ f.A, np.eye(f.rank), atol=1e-8)
    stored = np.load(compressed["oblique.plan"].with_suffix(".npz"))
    assert not any(key.startswith("B.") for key in stored.files)

    again = espace_export.apply(
        compressed["dense"], compressed["oblique.plan"], output=tmp_path / "again.onnx", num_batches=4,
        seq_len=16, seed=3,
    )  # fmt: skip
    np.testing.assert_allclose(_run(again.output, feed), oblique, rtol=1e-5, atol=1e-6)


torch = pytest.importorskip("torch", reason="healing needs torch")


def test_heal_attaches_oblique_pairs_and_trains_only_w(tmp_path) -> None:
    from espace_export import heal
    from samples.make_models import build_model, export_model, sample_inputs

    batch = {k: torch.from_numpy(v) for k, v in sample_inputs("llama", 3, 11, seed=0).items()}
    calib = {k: torch.from_numpy(v) for k, v in sample_inputs("llama", 4, 16, seed=3).items()}
    model = build_model("llama")
    modules = heal.target_modules(model)
    stats, owner = heal.collect_statistics(model, modules, [calib])
    pairs = {}
    for name, module in modules.items():
        f = oblique_projection(heal.weight_kn(module), stats[owner[name]].C_X, 8)
        pairs[name] = (f.A.astype(np.float32), f.M.astype(np.float32))  # type: ignore[union-attr]

    with torch.no_grad():  # the projected layer computes x·A·M·W exactly: compare with W replaced by A·M·W
        reference = build_model("llama")
        reference.load_state_dict(model.state_dict())
        for name, module in heal.target_modules(reference).items():
            A, M = (torch.from_numpy(x).double() for x in pairs[name])
            W_kn = module.weight.detach().double().T
            module.weight.copy_((A @ M @ W_kn).T.float())
        want = reference(**batch)
    heal.attach_projections(model, pairs)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), want, rtol=1e-4, atol=1e-5)

    weights = {name: m.weight.detach().clone() for name, m in modules.items()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        logits = model(**batch)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for name, (A, M) in heal.projections_of(model).items():
        assert id(A) not in trainable and id(M) not in trainable and A.grad is None and M.grad is None
        np.testing.assert_array_equal(A.numpy(), pairs[name][0])
        np.testing.assert_array_equal(M.numpy(), pairs[name][1])
        assert not torch.equal(modules[name].weight, weights[name])  # W trains whole

    output = heal.export_onnx(model, tmp_path / "healed.onnx", lambda m, p: export_model(m, "llama", "torchscript", p))
    got = _run(output, {k: v.numpy() for k, v in batch.items()})
    with torch.no_grad():
        healed = model(**batch).numpy()
    np.testing.assert_allclose(got, healed, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(got - healed) / np.linalg.norm(healed) < 1e-6
    assert all(isinstance(f, tuple) for f in heal.projections_of(model).values())  # re-attached as pairs

    saved = heal.save_projections(heal.projections_of(model), tmp_path / "pairs.npz")
    reloaded = heal.load_projections(saved)
    assert set(reloaded) == set(pairs)
    assert all(np.array_equal(reloaded[n][1], pairs[n][1]) for n in pairs)
    graph = onnx.load(str(output))
    assert len([n for n in graph.graph.node if n.op_type == "MatMul"]) >= len(pairs)
