"""Healing: projected PyTorch layers (paper §2.2), their calibration, and the export of the healed model."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="healing needs torch (pip install 'espace-export[torch]')")
pytest.importorskip("transformers", reason="the sample models need transformers")

import espace_export  # noqa: E402
from espace_export import heal  # noqa: E402
from espace_export.errors import EspaceError  # noqa: E402
from espace_export.selection.candidates import projection_mse  # noqa: E402
from graph_passes import find_projected_pairs  # noqa: E402
from samples.make_models import build_model, export_model, sample_inputs  # noqa: E402


def inputs(arch: str, batch: int = 3, seq: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in sample_inputs(arch, batch, seq, seed=seed).items()}


def random_orthonormal(K: int, L: int, seed: int) -> np.ndarray:
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((K, K)))
    return Q[:, :L].astype(np.float32)


def full_rank_rotations(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A random orthonormal K×K P per layer: P Pᵀ = I, so the projected model must equal the dense one."""
    targets = heal.target_modules(model)
    return {
        name: random_orthonormal(heal.layer_shape(m)[0], heal.layer_shape(m)[0], i)
        for i, (name, m) in enumerate(targets.items())
    }


def train_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], steps: int
) -> None:
    model.train()
    for _ in range(steps):
        logits = model(**batch)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_full_rank_projection_equals_the_dense_model(arch: str) -> None:
    model = build_model(arch)
    batch = inputs(arch)
    with torch.no_grad():
        dense = model(**batch)
    parameters = dict(model.named_parameters())
    keys = list(model.state_dict())
    attached = heal.attach_projections(model, full_rank_rotations(model))
    assert len(attached) == {"llama": 14, "gpt2": 8, "bert": 12}[arch]
    with torch.no_grad():
        projected = model(**batch)
    torch.testing.assert_close(projected, dense, rtol=1e-5, atol=2e-6)
    # same Parameter objects under the same names; P adds no state_dict key
    assert dict(model.named_parameters()) == parameters
    assert list(model.state_dict()) == keys
    assert all(heal.is_projected(m) for m in heal.target_modules(model).values())
    heal.detach_projections(model)
    assert not any(heal.is_projected(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), dense, rtol=0, atol=0)


def test_projected_layer_computes_w_p_pt_x() -> None:
    linear = torch.nn.Linear(12, 5)
    x = torch.randn(7, 12)
    P = torch.from_numpy(random_orthonormal(12, 4, 0))
    heal.attach_projections(linear, {"": P})
    torch.testing.assert_close(linear(x), (x @ P @ P.T) @ linear.weight.T + linear.bias)


def test_baseline_optimizer_state_loads_and_training_continues() -> None:
    batch = inputs("llama")
    model = build_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, batch, 2)
    model_state, optimizer_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    healed = build_model("llama", seed=1)
    heal.attach_projections(healed, heal.calibrate(healed, [batch], ratio=0.5, min_rank=4))
    healed.load_state_dict(model_state)  # strict: the dense checkpoint has every key the projected model needs
    resumed = torch.optim.AdamW(healed.parameters(), lr=1e-3)
    resumed.load_state_dict(optimizer_state)
    for name, param in healed.named_parameters():
        original = dict(model.named_parameters())[name]
        torch.testing.assert_close(resumed.state[param]["exp_avg"], optimizer.state[original]["exp_avg"])
    train_steps(healed, resumed, batch, 1)
    assert all(int(s["step"]) == 3 for s in resumed.state.values())


def test_projection_gets_no_gradient_and_does_not_change() -> None:
    batch = inputs("gpt2")
    model = build_model("gpt2")
    heal.attach_projections(model, heal.calibrate(model, [batch], ratio=0.5, min_rank=4))
    before = {name: P.clone() for name, P in heal.projections_of(model).items()}
    weights = {name: m.weight.detach().clone() for name, m in heal.target_modules(model).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert not any(p is P for P in before.values() for p in model.parameters())
    train_steps(model, optimizer, batch, 3)
    for name, P in heal.projections_of(model).items():
        assert not P.requires_grad and P.grad is None
        torch.testing.assert_close(P, before[name], rtol=0, atol=0)
        assert not torch.equal(heal.target_modules(model)[name].weight, weights[name])  # W itself trains


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_graph_reproduces_the_healed_model(arch: str, tmp_path: Path) -> None:
    batch = inputs(arch)
    model = build_model(arch)
    projections = heal.calibrate(model, [inputs(arch, 4, 16, seed=3)], ratio=0.5, min_rank=4)
    heal.attach_projections(model, projections)
    train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batch, 2)

    output = heal.export_onnx(
        model, tmp_path / "healed.onnx", lambda module, path: export_model(module, arch, "torchscript", path)
    )
    assert all(heal.is_projected(m) for m in heal.target_modules(model).values())  # attached again after export
    graph = onnx.load(str(output))
    pairs = {pair.name: pair for pair in find_projected_pairs(graph)}
    assert {name: (p.K, p.L) for name, p in pairs.items()} == {name: P.shape for name, P in projections.items()}
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        want = model(**batch).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6


@pytest.mark.filterwarnings("ignore:calibrating on random token ids")
def test_projections_from_the_onnx_path_and_its_plan_attach_by_layer_name(tmp_path: Path) -> None:
    wrapper = build_model("llama")
    dense = export_model(wrapper, "llama", "torchscript", tmp_path / "llama.onnx")
    result = espace_export.compress(
        dense,
        output=tmp_path / "llama.espace.onnx",
        ratio=0.5,
        min_rank=4,
        num_batches=2,
        batch_size=2,
        seq_len=16,
        plan_path=tmp_path / "plan.json",
    )
    projections = heal.load_projections(result.output)
    assert set(projections) == {layer["name"] for layer in result.report["layers"] if layer["L"]}
    from_plan = heal.load_projections(tmp_path / "plan.json")  # the plan artifact holds the same P
    assert all(np.allclose(from_plan[name], P, atol=1e-6) for name, P in projections.items())
    assert set(from_plan) == set(projections)

    hf_model = wrapper.model  # names lack the wrapper's "model." prefix: matched all the same
    attached = heal.attach_projections(hf_model, projections)
    assert attached == [name.removeprefix("model.") for name in projections]
    batch = inputs("llama")
    with torch.no_grad():
        want = wrapper(**batch).numpy()
    session = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run(None, {k: v.numpy() for k, v in batch.items()})[0], want, rtol=1e-4, atol=1e-5
    )

    saved = heal.save_projections(heal.projections_of(hf_model), tmp_path / "p.npz")
    reloaded = heal.load_projections(saved)
    assert all(np.array_equal(reloaded[name.removeprefix("model.")], P) for name, P in projections.items())


def test_torch_calibration_finds_the_same_subspaces_as_the_onnx_path(tmp_path: Path) -> None:
    model = build_model("llama")
    feeds = sample_inputs("llama", 4, 16, seed=5)
    dense = export_model(model, "llama", "torchscript", tmp_path / "llama.onnx")
    np.savez(tmp_path / "calib.npz", **feeds)
    result = espace_export.compress(
        dense,
        output=tmp_path / "out.onnx",
        ratio=0.5,
        min_rank=4,
        calib_data=tmp_path / "calib.npz",
        batch_size=4,
        holdout=0,
        fast=True,
    )
    from_onnx = heal.load_projections(result.output)
    batch = {k: torch.from_numpy(v) for k, v in feeds.items()}
    from_torch = heal.calibrate(model, [batch], ratio=0.5, min_rank=4)
    assert {n: P.shape for n, P in from_torch.items()} == {n: P.shape for n, P in from_onnx.items()}
    stats, owner = heal.collect_statistics(model, heal.target_modules(model), [batch])
    for name, P in from_torch.items():
        C_X = stats[owner[name]].C_X
        kept = np.trace(C_X) - projection_mse(C_X, P)
        assert kept == pytest.approx(np.trace(C_X) - projection_mse(C_X, from_onnx[name]), rel=1e-4)


def test_calibration_skips_padding_and_shares_statistics_between_siblings() -> None:
    model = build_model("llama")
    batch = inputs("llama", 3, 11)
    stats, owner = heal.collect_statistics(model, heal.target_modules(model), [batch])
    assert owner["model.model.layers.0.self_attn.k_proj"] == "model.model.layers.0.self_attn.q_proj"
    assert owner["model.model.layers.0.mlp.up_proj"] == "model.model.layers.0.mlp.gate_proj"
    assert owner["model.model.layers.0.self_attn.o_proj"] == "model.model.layers.0.self_attn.o_proj"
    assert len(stats) == 8  # qkv, o, gate/up, down in each of 2 layers
    assert all(s.rows == int(batch["attention_mask"].sum()) for s in stats.values())
    projections = heal.calibrate(model, [batch], rank=16)
    q, k = (projections[f"model.model.layers.0.self_attn.{p}_proj"] for p in "qk")
    assert np.array_equal(q, k)  # one P, so the exported graph computes X·P once for both


def test_heads_are_left_out_unless_asked() -> None:
    model = build_model("llama-tied")
    assert not any("lm_head" in name for name in heal.target_modules(model))
    assert any("lm_head" in name for name in heal.target_modules(model, include_heads=True))
    assert not any("q_proj" in name for name in heal.target_modules(model, exclude=["q_proj"]))


def test_works_with_the_hf_trainer(tmp_path: Path) -> None:
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    hf_model = build_model("llama").model
    rows = [inputs("llama", 1, 16, seed=s) for s in range(4)]
    heal.attach_projections(hf_model, heal.calibrate(hf_model, rows, ratio=0.5, min_rank=4))
    before = {name: P.clone() for name, P in heal.projections_of(hf_model).items()}
    weight = hf_model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    dataset = [{"input_ids": r["input_ids"][0], "labels": r["input_ids"][0]} for r in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=hf_model, args=args, train_dataset=dataset, callbacks=[heal.checkpoint_callback()]).train()
    saved = heal.load_projections(tmp_path / "checkpoint-2" / "espace_projections.npz")
    assert all(np.array_equal(saved[name], P.numpy()) for name, P in before.items())
    assert all(torch.equal(P, before[name]) for name, P in heal.projections_of(hf_model).items())
    assert not torch.equal(hf_model.model.layers[0].self_attn.q_proj.weight, weight)


def test_projected_models_copy_and_pickle() -> None:
    model = build_model("gpt2")
    batch = inputs("gpt2")
    heal.attach_projections(model, heal.calibrate(model, [batch], ratio=0.5, min_rank=4))
    with torch.no_grad():
        want = model(**batch)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(**batch), want, rtol=0, atol=0)
            assert set(heal.projections_of(clone)) == set(heal.projections_of(model))


def test_disable_dropout() -> None:
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    assert heal.disable_dropout(model) > 0
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.0


def test_user_errors_name_the_fix(tmp_path: Path) -> None:
    model = build_model("llama")
    with pytest.raises(EspaceError, match="K=64"):
        heal.attach_projections(model, {"model.model.layers.0.self_attn.q_proj": np.eye(32, 8, dtype=np.float32)})
    with pytest.raises(EspaceError, match="no layer named"):
        heal.attach_projections(model, {"decoder.fc9": np.eye(64, 8, dtype=np.float32)})
    with pytest.raises(EspaceError, match="candidate"):
        heal.calibrate(model, [inputs("llama")], candidate="nl-mse")
    with pytest.raises(EspaceError, match="no projected layers"):
        heal.export_onnx(model, tmp_path / "x.onnx", lambda m, p: None)
    with pytest.raises(EspaceError, match="no ESPACE projections"):
        heal.load_projections(export_model(model, "llama", "torchscript", tmp_path / "dense.onnx"))


@pytest.mark.parametrize("kind", ["kl", "distill"])
def test_self_distillation_heals_toward_the_dense_teacher(kind: str) -> None:
    """The loss ``espace-export heal`` uses, in a PyTorch loop: zero against itself, and training the projected
    model on it brings its outputs toward the dense teacher's."""
    model = build_model("llama")
    batch = inputs("llama", 4, 16, seed=1)
    teacher = heal.frozen_teacher(model)
    heal.attach_projections(model, heal.calibrate(model, [batch], rank=2))  # far from the teacher
    assert not any(p.requires_grad for p in teacher.parameters()) and not heal.projections_of(teacher)
    with torch.no_grad():
        target = teacher(**batch)
        assert float(heal.distillation_loss(target, target, kind)) == pytest.approx(0.0, abs=1e-6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = heal.distillation_loss(model(**batch), target, kind, mask=batch.get("attention_mask"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    with pytest.raises(EspaceError, match="unknown distillation loss"):
        heal.distillation_loss(target, target, "mse")
