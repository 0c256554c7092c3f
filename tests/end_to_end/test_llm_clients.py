"""The real clients load the compressed folders: optimum's ``ORTModelForCausalLM.generate`` and
onnxruntime-genai's generator. With a rank ≥ K (exact rewrite) they produce the original's greedy tokens; at
ratio 0.5 they run.

The clients pin other ``transformers`` versions than this project, so they run in their own virtual
environments, named by ``ESPACE_OPTIMUM_PYTHON`` / ``ESPACE_GENAI_PYTHON`` (their python executables), on
folders made by ``samples/export_llm_fixtures.py`` in ``ESPACE_LLM_FIXTURES``. ``.ci/run`` makes both venvs and
the llama and phi3 fixtures with ``.ci/llm_clients.sh`` (best effort: what pip cannot install is skipped here; the
mistral folders are for local runs). Tested with optimum-onnx 0.1.0 (transformers 4.57.6) and onnxruntime-genai
0.18.0 (transformers 5.24.0), onnxruntime 1.32.0, torch 2.13.0.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest

from espace_export import compress
from espace_export.folders import output_folder, report_path_for, resolve_model_folder

FIXTURES = Path(os.environ.get("ESPACE_LLM_FIXTURES", "samples/out/llm"))
PROMPT = [1, 5, 9, 33, 70, 100]

_OPTIMUM = """
import os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from optimum.onnxruntime import ORTModelForCausalLM
file_name = sys.argv[1]
for folder in sys.argv[2:]:
    model = ORTModelForCausalLM.from_pretrained(folder, local_files_only=True, file_name=file_name)
    ids = torch.tensor([PROMPT])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    print(" ".join(map(str, out[0].tolist())))
"""

_GENAI = """
import sys
import onnxruntime_genai as og
for folder in sys.argv[1:]:
    model = og.Model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=22, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([PROMPT])
    while not generator.is_done():
        generator.generate_next_token()
    print(" ".join(str(int(t)) for t in generator.get_sequence(0)))
"""


def _client(variable: str) -> str:
    python = os.environ.get(variable)
    if not python or not Path(python).exists():
        pytest.skip(f"set {variable} to the python of a venv with the client installed")
    return python


def _generate(python: str, script: str, *args: str, runs: int = 1) -> list[list[int]]:
    """The greedy tokens of each of the last ``runs`` folders in ``args``, from one client process (its start
    costs more than the generations)."""
    done = subprocess.run(
        [python, "-c", script.replace("PROMPT", repr(PROMPT)), *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""}, check=True,
    )  # fmt: skip
    return [[int(t) for t in line.split()] for line in done.stdout.strip().splitlines()[-runs:]]


def _compressed(source_dir: Path, out: Path, **settings: object) -> Path:
    source = resolve_model_folder(source_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with output_folder(source, out) as model_path:
            compress(
                source.model, output=model_path, report_path=report_path_for(out), calib_text="builtin:pydoc",
                tokenizer=source.tokenizer_dir, seq_len=32, num_batches=4, batch_size=2, holdout=0.0, fast=True,
                **settings,  # type: ignore[arg-type]
            )  # fmt: skip
    return out


def _fixture(name: str) -> Path:
    folder = FIXTURES / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not made: python samples/export_llm_fixtures.py --venv VENV --genai-venv VENV")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("folder", "file_name"),
    [("llama-with-past", "model.onnx"), ("llama-merged", "decoder_model_merged.onnx"),
     ("mistral-with-past", "model.onnx"), ("phi3-merged", "decoder_model_merged.onnx")],
)  # fmt: skip
def test_optimum_generates_from_the_compressed_folder(folder: str, file_name: str, tmp_path: Path) -> None:
    python = _client("ESPACE_OPTIMUM_PYTHON")
    source = _fixture(folder)
    exact = _compressed(source, tmp_path / "exact", rank=512, include_heads=True)
    half = _compressed(source, tmp_path / "half", ratio=0.5)
    reference, exact_tokens, half_tokens = _generate(
        python, _OPTIMUM, file_name, str(source), str(exact), str(half), runs=3
    )
    assert len(reference) == len(PROMPT) + 16 and exact_tokens == reference
    assert len(half_tokens) == len(reference)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral", "phi3"])
def test_genai_generates_from_the_compressed_folder(family: str, tmp_path: Path) -> None:
    python = _client("ESPACE_GENAI_PYTHON")
    source = _fixture(f"{family}-genai-fp32")
    exact = _compressed(source, tmp_path / "exact", rank=512, include_heads=True)
    half = _compressed(source, tmp_path / "half", ratio=0.5)
    reference, exact_tokens, half_tokens = _generate(python, _GENAI, str(source), str(exact), str(half), runs=3)
    assert len(reference) == 22 and exact_tokens == reference
    assert len(half_tokens) == len(reference)
