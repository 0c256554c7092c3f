"""benchmarks/healing.py's core on a tiny random Llama: equal weights across methods, what trains, int8 in ORT."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="healing needs torch")
transformers = pytest.importorskip("transformers", reason="the tiny LM is a transformers Llama")

from benchmarks import healing  # noqa: E402
from espace_export import heal  # noqa: E402
from samples import heal_lm, train_lm  # noqa: E402


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, np.ndarray]:
    config = transformers.LlamaConfig(
        vocab_size=128,  # ≥ 100: train_lm.export_onnx traces with ids below 100
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    stream = np.random.default_rng(0).integers(0, 128, size=1200).astype(np.int64)
    return model, stream


def _prepared(model: torch.nn.Module, stream: np.ndarray) -> healing.Prepared:
    calibration = heal_lm.calibration_batches(stream, num_batches=2, batch_size=4, seq_len=32)
    return healing.prepare(model, calibration, 0.5, "mse", "8")


def test_every_method_keeps_the_same_weights_and_oblique_starts_as_whitened_svd(tiny) -> None:
    model, stream = tiny
    prepared = _prepared(model, stream)
    targets = list(heal.target_modules(model))
    dense = healing.inference_weights(model, targets)
    built = {m: healing.build(model, m, prepared) for m in healing.METHODS}
    counts = {m: healing.inference_weights(b, targets) for m, b in built.items()}
    assert len(set(counts.values())) == 1, counts
    assert 0.4 < 1 - counts["svd"] / dense < 0.6  # ≈ the ratio: every layer ranked on its own
    windows = healing.TestWindows(stream[:300], model, seq_len=64)
    oblique = healing.score_torch(built["oblique"], windows)
    whitened = healing.score_torch(built["whitened-svd"], windows)
    assert oblique["kl"] > 0 and oblique["kl"] == pytest.approx(whitened["kl"], rel=1e-3)
    assert healing.score_torch(model, windows)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_healing_trains_w_through_a_static_p_from_the_baseline_state_and_runs_in_int8(tiny, tmp_path) -> None:
    model, stream = tiny
    baseline = healing.build(model, healing.DENSE, None)  # type: ignore[arg-type]
    config = train_lm.LMConfig(seq_len=32, batch_size=2)
    optimizer = train_lm.make_optimizer(baseline, config)
    train_lm._train(baseline, stream, config, minutes=math.inf, steps=1, seed=0, optimizer=optimizer)
    train_lm.save_optimizer(tmp_path / train_lm.OPTIMIZER_FILE, baseline, optimizer, config, 1)

    schedule = healing.Schedule(steps=2, lr=1e-3, reuse_optimizer=True, lm_dir=tmp_path)
    windows = healing.TestWindows(stream[:300], baseline, seq_len=64)
    context = healing.Context(baseline, stream, windows, schedule, threads=1)
    prepared = _prepared(baseline, stream)

    espace = healing.build(baseline, "espace", prepared)
    name = next(iter(prepared.projections))
    P, W = heal.projections_of(espace)[name].clone(), espace.get_submodule(name).weight.detach().clone()
    assert schedule.optimizer_for(espace, "espace", config) is not None  # the baseline's moments apply
    assert schedule.optimizer_for(healing.build(baseline, "svd", prepared), "svd", config) is None
    healing.train(espace, "espace", stream, schedule, seed=0)
    assert torch.equal(heal.projections_of(espace)[name], P)
    assert not torch.allclose(espace.get_submodule(name).weight, W)

    records = healing.run_method(context, "svd", prepared, seeds=[0])
    assert [r["stage"] for r in records] == ["out of the box", "healed", "healed + int8"]
    assert records[2]["optimizer"] == "fresh AdamW"
    assert all(math.isfinite(r["ppl"]) and r["kl"] >= 0 for r in records)
    int8 = healing.score_int8(espace, windows, tmp_path, threads=1)  # the folded ESPACE pair, quantized
    assert math.isfinite(int8["ppl"]) and int8["kl"] == pytest.approx(
        healing.score_torch(espace, windows)["kl"], abs=0.05
    )
    summary = healing.summarize(records)
    assert "≈50%" in healing.table(summary, 0.5, ["svd"], healing.inference_weights(baseline, context.targets))


def test_paired_differences_are_taken_seed_by_seed() -> None:
    def record(method: str, seed: int, ppl: float, kl: float) -> dict:
        return {"ratio": 0.5, "method": method, "seed": seed, "stage": "healed", "ppl": ppl, "kl": kl}

    records = [record("espace", 0, 100.0, 0.10), record("espace", 1, 102.0, 0.12), record("svd", 1, 101.0, 0.11)]
    records.append(record("svd", 0, 103.0, 0.10))
    assert healing.paired(records).splitlines()[2] == "| 0.5 | espace − svd | -3.00 +1.00 | +0.0000 +0.0100 |"


def test_minilm_methods_compress_to_the_same_weight_count(sample_model, tmp_path) -> None:
    """The MiniLM side compresses each method with --select none at one ratio: every method gets the same
    rank per layer, so the comparison is at equal inference weights, and below the dense count."""
    from pathlib import Path

    import espace_export

    dense = Path(sample_model("bert", "torchscript"))
    counts = {}
    for method, candidate in healing.MINILM_METHODS.items():
        plan = tmp_path / f"{method}.json"
        espace_export.compress(dense, output=tmp_path / f"{method}.onnx", plan_path=plan, ratio=0.5, min_rank=4,
                               method=candidate, select="none", rank_rule="8", num_batches=2, seq_len=16)  # fmt: skip
        counts[method], dense_count = healing._minilm_weights(plan)
    assert len(set(counts.values())) == 1 and counts["espace"] < 0.75 * dense_count, (counts, dense_count)
