"""Export tiny random-init decoder LLMs the way deployment engineers do: with optimum's exporter.

The exporters pin incompatible ``transformers`` versions (optimum-onnx 0.1 wants < 4.58), so they run in their
own virtual environment, given as ``--venv``; this script itself only needs the standard library::

    python -m venv --system-site-packages /work/venvs/optimum
    /work/venvs/optimum/bin/pip install optimum-onnx 'transformers<4.58'
    python samples/export_llm_fixtures.py --venv /work/venvs/optimum -o samples/out/llm

For each family (``llama``, ``qwen2``, ``mistral``, ``phi3`` with its fused ``qkv_proj`` / ``gate_up_proj``,
``gpt2``: hidden 64, 2 layers, vocab 512, random weights) it writes a
``save_pretrained`` folder ``<out>/<family>-hf`` (config, weights, a tiny word-level tokenizer) and optimum
exports of it:

- ``<out>/<family>-with-past/``: ``optimum-cli export onnx --task text-generation-with-past`` (``model.onnx``
  with ``past_key_values.*`` inputs, ``present.*`` outputs);
- ``<out>/<family>-merged/``: the same, ``--no-post-process`` off, i.e. the legacy merged decoder
  ``decoder_model_merged.onnx`` (one ``If`` on ``use_cache_branch`` whose two branches hold every GEMM),
  made by optimum's ``merge_decoders`` from ``decoder_model.onnx`` and ``decoder_with_past_model.onnx``.

With ``--genai-venv`` (``pip install onnxruntime-genai`` in a venv whose transformers is ≥ 5), onnxruntime-genai's
model builder also writes ``<out>/<family>-genai-fp32/`` and ``-genai-int4/`` (GroupQueryAttention, packed QKV,
SimplifiedLayerNormalization; int4: MatMulNBits) for every family but gpt2 (the builder has none for it).

With ``--extras``, two more folders deployment engineers make: ``<out>/llama-fp16-with-past/`` (optimum's
``dtype="fp16"`` export) and ``<out>/gpt2-ort-optimized/`` (onnxruntime's transformers optimizer, ``model_type
"gpt2"``, on the with-past export: FastGelu, SkipLayerNormalization; it fuses no Attention in today's exports).

Nothing is downloaded: the models are built from configs, the tokenizer from a fixed word list.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gpt2")
# more decoder families, with-past only (their caches are not all [batch, heads, past, head], which the merged
# decoder below assumes): each was compressed exactly and ran in optimum's client (benchmarks/README.md)
MORE_FAMILIES = ("gemma", "phi", "qwen3", "opt", "bloom", "gpt_neox", "gpt_bigcode", "falcon")
GENAI_FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma", "phi", "qwen3")  # what its builder takes

# Runs inside the exporter's venv: build the HF folder, export with-past, then the merged decoder.
_EXPORT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    from pathlib import Path
    import torch
    import transformers
    family, out = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    common = dict(vocab_size=512, max_position_embeddings=128)
    if family == "llama":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, **common)
        model = transformers.LlamaForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, **common)
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "mistral":  # llama's layout with a sliding window wider than any test sequence
        config = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                                            **common)
        model = transformers.MistralForCausalLM(config)
    elif family == "phi3":  # fused qkv_proj and gate_up_proj; Phi-3-mini's layout: no GQA (optimum-onnx 0.1's
        # client assumes none for phi3), no LongRoPE (original = max positions); pad inside the vocabulary
        config = transformers.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4,
                                         original_max_position_embeddings=128, pad_token_id=2, bos_token_id=1,
                                         eos_token_id=2, **common)
        model = transformers.Phi3ForCausalLM(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128)
        model = transformers.GPT2LMHeadModel(config)
    else:  # MORE_FAMILIES: tiny configs of each layout (Phi-2 at hidden 128: genai's rotary cache wants 8 | dim)
        ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
        small = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=512, **ids)
        model = {
            "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(
                hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=128, **small)),
            "phi": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(
                hidden_size=128, intermediate_size=256, partial_rotary_factor=0.5, max_position_embeddings=128,
                **small)),
            "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
                hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=128, **small)),
            "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
                hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128, **small)),
            "bloom": lambda: transformers.BloomForCausalLM(transformers.BloomConfig(
                hidden_size=64, n_layer=2, n_head=4, vocab_size=512, **ids)),
            "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
                hidden_size=64, intermediate_size=128, rotary_pct=0.25, max_position_embeddings=128, **small)),
            "gpt_bigcode": lambda: transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
                n_embd=64, n_layer=2, n_head=4, n_positions=128, multi_query=True, vocab_size=512,
                bos_token_id=1, eos_token_id=2)),
            "falcon": lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
                hidden_size=64, new_decoder_architecture=False, multi_query=True, **small)),
        }[family]()
    with torch.no_grad():  # random biases and norm scales, as in a trained checkpoint
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln" in name else 0.0))
    hf = out / f"{family}-hf"
    model.eval().save_pretrained(hf)
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(509)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(hf)
    from optimum.exporters.onnx import main_export
    main_export(str(hf), output=str(out / f"{family}-with-past"), task="text-generation-with-past",
                no_post_process=True, do_validation=False, opset=17)
    if family not in ("llama", "qwen2", "mistral", "phi3", "gpt2"):  # MORE_FAMILIES: with-past only
        print("exported", family, sorted(p.name for p in (out / f"{family}-with-past").iterdir()))
        sys.exit(0)
    # The merged decoder (optimum < 2 wrote it by default): a decoder without past inputs (the with-past graph
    # reading zero-length past made from the batch size) merged with the with-past decoder by merge_decoders.
    import onnx
    from onnx import helper, numpy_helper, TensorProto
    import numpy as np
    merged = out / f"{family}-merged"
    merged.mkdir(parents=True, exist_ok=True)
    with_past = onnx.load(str(out / f"{family}-with-past" / "model.onnx"))
    no_past = onnx.ModelProto()
    no_past.CopyFrom(with_past)
    graph = no_past.graph
    pasts = [i for i in graph.input if i.name.startswith("past_key_values")]
    nodes = [helper.make_node("Shape", ["input_ids"], ["nopast::shape"], start=0, end=1)]
    for index, value in enumerate(pasts):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        rest = numpy_helper.from_array(np.array([dims[1], 0, dims[3]], dtype=np.int64), f"nopast::rest{index}")
        graph.initializer.append(rest)
        nodes += [helper.make_node("Concat", ["nopast::shape", rest.name], [f"nopast::dims{index}"], axis=0),
                  helper.make_node("ConstantOfShape", [f"nopast::dims{index}"], [f"nopast::past{index}"],
                                   value=helper.make_tensor("zero", value.type.tensor_type.elem_type, [1], [0]))]
    renamed = {value.name: f"nopast::past{index}" for index, value in enumerate(pasts)}
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    kept = [i for i in graph.input if not i.name.startswith("past_key_values")]
    del graph.input[:]
    graph.input.extend(kept)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    from optimum.onnx import merge_decoders
    merge_decoders(no_past, with_past, save_path=str(merged / "decoder_model_merged.onnx"), strict=False)
    import shutil
    for extra in (out / f"{family}-with-past").iterdir():
        if extra.suffix != ".onnx" and not extra.name.endswith(".onnx_data"):
            shutil.copy(extra, merged / extra.name)
    print("exported", family, sorted(p.name for p in merged.iterdir()))
    """
)

# Runs inside the exporter's venv after _EXPORT: the fp16 llama and the optimizer's GPT-2.
_EXTRAS = textwrap.dedent(
    """
    import os, sys, shutil, warnings
    os.environ["HF_HUB_OFFLINE"] = "1"
    warnings.simplefilter("ignore")
    from pathlib import Path
    out, families = Path(sys.argv[1]), sys.argv[2:]
    if "llama" in families:
        from optimum.exporters.onnx import main_export
        main_export(str(out / "llama-hf"), output=str(out / "llama-fp16-with-past"), task="text-generation-with-past",
                    no_post_process=True, do_validation=False, opset=17, dtype="fp16")
    if "gpt2" in families:
        from onnxruntime.transformers.optimizer import optimize_model
        source, target = out / "gpt2-with-past", out / "gpt2-ort-optimized"
        target.mkdir(exist_ok=True)
        for extra in source.iterdir():
            if extra.suffix != ".onnx":
                shutil.copy(extra, target / extra.name)
        optimized = optimize_model(str(source / "model.onnx"), model_type="gpt2", num_heads=4, hidden_size=64)
        optimized.save_model_to_file(str(target / "model.onnx"))
        print("optimized gpt2", {k: v for k, v in optimized.get_fused_operator_statistics().items() if v})
    """
)


def export_genai(
    venv: Path, out: Path, families: tuple[str, ...] = FAMILIES, precisions: tuple[str, ...] = ("fp32", "int4")
) -> None:
    """onnxruntime-genai builder folders ``<out>/<family>-genai-<precision>`` from the ``-hf`` folders (made by
    :func:`export` first), with the python of ``venv`` (onnxruntime-genai installed; its builder needs
    transformers ≥ 5, so a different venv than optimum's)."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no python in {venv}: pip install onnxruntime-genai there first")
    env = {**os.environ, "PYTHONPATH": ""}
    for family in families:
        for precision in precisions:
            subprocess.run(
                [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(out / f"{family}-hf"),
                 "-o", str(out / f"{family}-genai-{precision}"), "-p", precision, "-e", "cpu",
                 "-c", str(out / ".genai-cache")],
                check=True, env=env,
            )  # fmt: skip


def export(venv: Path, out: Path, families: tuple[str, ...] = FAMILIES, extras: bool = False) -> None:
    """Export ``families`` into ``out`` with the python of ``venv`` (and, with ``extras``, the fp16 llama and the
    optimized GPT-2 when their family is among them); raises if an export fails."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no python in {venv}: create the venv first (see this script's docstring)")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": ""}  # the exporter's own packages, not the project's checkout
    for family in families:
        subprocess.run([str(python), "-c", _EXPORT, family, str(out)], check=True, env=env)
    if extras:
        subprocess.run([str(python), "-c", _EXTRAS, str(out), *families], check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, required=True, help="virtual environment with optimum-onnx")
    parser.add_argument("-o", "--out", type=Path, default=Path("samples/out/llm"))
    parser.add_argument("--genai-venv", type=Path, help="virtual environment with onnxruntime-genai (optional)")
    parser.add_argument(
        "--family", choices=FAMILIES + MORE_FAMILIES, action="append",
        help=f"default: {', '.join(FAMILIES)} (with-past and merged); also with-past only: {', '.join(MORE_FAMILIES)}",
    )  # fmt: skip
    parser.add_argument("--extras", action="store_true", help="also the fp16 llama and the optimized GPT-2")
    args = parser.parse_args(argv)
    families = tuple(args.family or FAMILIES)
    export(args.venv, args.out, families, args.extras)
    if args.genai_venv:
        export_genai(args.genai_venv, args.out, tuple(f for f in families if f in GENAI_FAMILIES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
