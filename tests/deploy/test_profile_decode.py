"""The profiler on KV-cache graphs: TTFT is the empty-past prefill, time per output token one decode step after a
past of length --seq; encoders get neither."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from espace_export import compress
from espace_export.deploy.build import BuildSettings
from espace_export.deploy.decode import decode_feed, is_decoder, prefill_feed
from espace_export.deploy.profile import ProfileSettings, profile
from tests._cli import run_cli
from tests._graphs import HEAD_DIM, KV_HEADS, VOCAB, kv_decoder, merged_decoder, run
from tests._models import compress_tiny, tiny_decoder

FAST = ProfileSettings(seq=8, warmup=1, repeats=3, build=BuildSettings(threads=1))


def _pair(builder, tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "decoder.onnx"
    onnx.save(builder(), str(source))
    result = compress(
        source, ratio=0.5, min_rank=4, output=tmp_path / "decoder.espace.onnx", seq_len=6, num_batches=2,
        batch_size=2, holdout=0.0, seed=0,
    )  # fmt: skip
    return source, Path(result.output)


@pytest.mark.parametrize("builder", [kv_decoder, merged_decoder], ids=["with-past", "merged"])
def test_decode_feed_has_one_new_token_after_a_past_of_seq(builder) -> None:
    model = builder()
    feed = decode_feed(model, batch=2, past=9, seed=0)
    assert feed["input_ids"].shape == (2, 1)
    assert feed["past_key_values.0.key"].shape == (2, KV_HEADS, 9, HEAD_DIM)
    assert feed["attention_mask"].shape == (2, 10)
    assert feed["position_ids"].tolist() == [[9], [9]]
    if builder is merged_decoder:
        assert feed["use_cache_branch"].tolist() == [True]
    logits, present_key, _ = run(model, feed)
    assert logits.shape == (2, 1, VOCAB) and present_key.shape == (2, KV_HEADS, 10, HEAD_DIM)
    prefill = prefill_feed(model, batch=1, seq=5)
    assert prefill["input_ids"].shape == (1, 5) and prefill["past_key_values.0.value"].shape[2] == 0
    assert run(model, prefill)[1].shape == (1, KV_HEADS, 5, HEAD_DIM)


def test_encoders_are_not_decoders() -> None:
    assert is_decoder(kv_decoder()) and is_decoder(merged_decoder())
    assert not is_decoder(tiny_decoder())  # no KV cache: one prefill, nothing per token


@pytest.mark.parametrize("builder", [kv_decoder, merged_decoder], ids=["with-past", "merged"])
def test_profile_reports_per_token_timings_for_decoders(builder, tmp_path: Path) -> None:
    original, compressed = _pair(builder, tmp_path)
    result = profile(original, compressed, FAST, output=tmp_path / "p.json")
    report = json.loads(result.paths["json"].read_text())
    assert report["ttft"]["feed"] == "prefill: 8 tokens, empty past"
    decode = report["decode"]
    assert decode["past"] == 8 and decode["new_tokens"] == 1 and decode["batch"] == 1
    assert decode["original_ms"]["n"] == decode["compressed_ms"]["n"] == 3
    assert decode["ratio"] == pytest.approx(decode["compressed_ms"]["median"] / decode["original_ms"]["median"])
    assert decode["flop_ratio"] == pytest.approx(report["flop_ratio"]) and decode["flop_ratio"] < 1
    assert decode["gemm_M"] == 1
    assert decode["amdahl_bound"] == pytest.approx(1 - decode["gemm_share"] * (1 - decode["flop_ratio"]))
    markdown = result.paths["markdown"].read_text()
    assert "## Time per output token (1 new token after a past of 8, batch 1)" in markdown
    assert "Per-token ratio (past 8)" in markdown


def test_profile_of_an_encoder_has_no_per_token_entry(tmp_path: Path) -> None:
    original, compressed = tmp_path / "tiny.onnx", tmp_path / "tiny.espace.onnx"
    model = tiny_decoder()
    onnx.save(model, str(original))
    onnx.save(compress_tiny(model), str(compressed))
    report = profile(original, compressed, FAST, output=tmp_path / "p.json").report
    assert "ttft" in report and "decode" not in report and "feed" not in report["ttft"]
    assert "Time per output token" not in (tmp_path / "p.md").read_text()


def test_profile_command_on_a_merged_decoder_without_gemm_timing(tmp_path: Path, capsys) -> None:
    original, compressed = _pair(merged_decoder, tmp_path)
    out = tmp_path / "cli.json"
    args = ["profile", str(original), str(compressed), "--seq", "4", "--warmup", "0", "--repeats", "2"]
    code, _, err = run_cli([*args, "--threads", "1", "--no-gemm", "-o", str(out), "-q"], capsys)
    assert code == 0, err
    decode = json.loads(out.read_text())["decode"]
    assert decode["past"] == 4 and "amdahl_bound" not in decode and np.isfinite(decode["ratio"])
