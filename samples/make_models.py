"""Build tiny random-initialised transformers and export them to ONNX.

The models are small enough to export in a few seconds on a laptop CPU and are
meant as fixtures for the compression passes and their tests.  Every
architecture can be exported with both ``torch.onnx.export`` back ends:

* ``"dynamo"``: ``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)``
  (``torch.export`` + onnxscript translation, opset 18).
* ``"torchscript"``: ``torch.onnx.export(..., dynamo=False, dynamic_axes=...)``
  (the legacy tracer, opset 17).

Each Hugging Face model is wrapped in a small :class:`torch.nn.Module` that takes
explicit tensors and returns a single tensor, so the ONNX graph has

* inputs ``input_ids`` and ``attention_mask`` (plus ``token_type_ids`` for
  ``bert``), all ``int64`` of shape ``[batch, seq]``;
* one output, ``logits`` ``[batch, seq, vocab]`` for the causal LMs or
  ``last_hidden_state`` ``[batch, seq, hidden]`` for ``bert``;

with the batch and sequence axes dynamic.  The files are written with the
weights inline (a single self-contained ``.onnx``).

Model details: eager attention (explicit ``MatMul``/``Softmax``, no fused
attention op), dropout off, eval mode, float32, ``max_position_embeddings=512``.
``llama`` uses grouped-query attention (``num_key_value_heads = heads // 2``) and an
untied ``lm_head``; ``llama-tied`` ties it to the embedding; ``gpt2`` has fused QKV
``Conv1D`` layers (exported as ``Gemm``) and a tied head; ``bert`` is the encoder only.
Biases and norm scales are randomised too (see :func:`build_model`), so no two
initialisers are identical and every bias is non-zero, as in a trained checkpoint.

Importing this module sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_VERBOSITY=error``
unless already set; nothing is ever downloaded.

Example::

    python samples/make_models.py --arch llama --exporter dynamo -o samples/out/llama.onnx
    python samples/make_models.py --all samples/out
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import pathlib
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

ARCHS = ("llama", "llama-tied", "gpt2", "bert")
EXPORTERS = ("dynamo", "torchscript")

#: ONNX opset used by each exporter.
OPSETS = {"dynamo": 18, "torchscript": 17}

_EXAMPLE_BATCH = 2


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")


def input_names(arch: str) -> tuple[str, ...]:
    """Return the ONNX input names of the exported graph for ``arch``."""
    _check_arch(arch)
    if arch == "bert":
        return ("input_ids", "attention_mask", "token_type_ids")
    return ("input_ids", "attention_mask")


def output_name(arch: str) -> str:
    """Return the name of the single ONNX output for ``arch``."""
    _check_arch(arch)
    return "last_hidden_state" if arch == "bert" else "logits"


class CausalLMWrapper(torch.nn.Module):
    """Call a causal LM with explicit tensors and return only its logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return ``logits`` of shape ``[batch, seq, vocab]``."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            return_dict=True,
        )
        return out.logits


class EncoderWrapper(torch.nn.Module):
    """Call a BERT-style encoder with explicit tensors and return ``last_hidden_state``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Return ``last_hidden_state`` of shape ``[batch, seq, hidden]``."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        )
        return out.last_hidden_state


def _num_heads(hidden: int) -> int:
    heads = max(2, hidden // 16)
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    return heads


def build_model(
    arch: str,
    *,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int | None = None,
    vocab: int = 256,
    seed: int = 0,
) -> torch.nn.Module:
    """Build a random-initialised, eval-mode, float32 model wrapped for export.

    Args:
        arch: one of :data:`ARCHS`.
        hidden: hidden size; the number of heads is ``max(2, hidden // 16)``.
        layers: number of transformer blocks.
        intermediate: MLP inner size (default ``2 * hidden``).
        vocab: vocabulary size.
        seed: ``torch.manual_seed`` used before initialisation (same seed, same weights);
            biases then get ``N(0, 0.02)`` values and norm scales ``1 + N(0, 0.05)``.

    Returns:
        A :class:`CausalLMWrapper` (``llama``, ``llama-tied``, ``gpt2``) whose forward is
        ``(input_ids, attention_mask) -> logits`` or an :class:`EncoderWrapper` (``bert``)
        whose forward is ``(input_ids, attention_mask, token_type_ids) -> last_hidden_state``.
    """
    _check_arch(arch)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    heads = _num_heads(hidden)
    inter = 2 * hidden if intermediate is None else intermediate
    max_pos = 512
    torch.manual_seed(seed)
    model: torch.nn.Module
    if arch in ("llama", "llama-tied"):
        kv_heads = max(1, heads // 2)
        llama_cfg = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_pos,
            tie_word_embeddings=arch == "llama-tied",
            attention_dropout=0.0,
            use_cache=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        llama_cfg._attn_implementation = "eager"
        model = CausalLMWrapper(transformers.LlamaForCausalLM(llama_cfg))
    elif arch == "gpt2":
        gpt2_cfg = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=inter,
            n_positions=max_pos,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        )
        gpt2_cfg._attn_implementation = "eager"
        model = CausalLMWrapper(transformers.GPT2LMHeadModel(gpt2_cfg))
    else:
        bert_cfg = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=max_pos,
            type_vocab_size=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
        bert_cfg._attn_implementation = "eager"
        model = EncoderWrapper(transformers.BertModel(bert_cfg, add_pooling_layer=False))
    _randomise_vectors(model, seed)
    model.eval()
    return model.float()


def _randomise_vectors(model: torch.nn.Module, seed: int) -> None:
    """Give every 1-D parameter (biases, norm scales) distinct random values.

    Fresh Hugging Face models start with zero biases and unit norm scales.  Both
    exporters de-duplicate identical initialisers (the TorchScript one through
    ``Identity`` nodes) and the dynamo optimiser drops all-zero Gemm biases, which
    would make the fixtures unlike real checkpoints.  Biases become ``N(0, 0.02)``
    and norm scales ``1 + N(0, 0.05)``, drawn from a generator seeded with ``seed``.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 1:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if name.endswith("bias"):
                param.copy_(0.02 * noise)
            else:
                param.copy_(1.0 + 0.05 * noise)


def sample_inputs(arch: str, batch: int, seq: int, vocab: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """Return int64 feeds for the exported graph, keyed by ONNX input name.

    ``input_ids`` are random tokens in ``[3, vocab)``.  ``attention_mask`` is right
    padded: row ``i`` keeps ``seq - i * max(1, seq // (batch + 1))`` tokens (at least one),
    so with ``batch > 1`` and ``seq > 1`` every row but the first ends with padding zeros
    (whose ``input_ids`` are 0, the pad id).  ``token_type_ids``
    (``bert`` only) are 0 for the first half of each row and 1 afterwards.
    """
    _check_arch(arch)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    step = max(1, seq // (batch + 1))
    for i in range(batch):
        keep = max(1, seq - i * step)
        mask[i, keep:] = 0
        ids[i, keep:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if arch == "bert":
        tt = np.zeros((batch, seq), dtype=np.int64)
        tt[:, seq // 2 :] = 1
        feeds["token_type_ids"] = tt
    return feeds


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings, exporter logging and stdout chatter; errors still propagate.

    If the body raises, the swallowed stdout is replayed on stderr before the exception
    continues, so the exporter's diagnostics are not lost.
    """
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        sys.stderr.write(sink.getvalue())
        raise
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _save_inline(model_proto: onnx.ModelProto, out_path: pathlib.Path) -> None:
    onnx.save(model_proto, str(out_path), save_as_external_data=False)


def export_module(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    out_path: str | os.PathLike[str],
    *,
    exporter: str,
    input_names: Sequence[str],
    output_name: str,
    output_axes: Mapping[int, str],
    max_seq: int = 512,
) -> pathlib.Path:
    """Export ``module(*args)`` to one self-contained ONNX file with dynamic batch/seq.

    Every input must be ``[batch, seq]``; axis 0 is named ``"batch"`` and axis 1 ``"seq"``
    (``torch.export.Dim`` objects for the dynamo exporter, ``dynamic_axes`` names for the
    TorchScript one).  ``output_axes`` names the dynamic axes of the single output (used
    by the TorchScript exporter; the dynamo one infers them).  Exporter warnings and
    chatter are silenced; exceptions propagate unchanged.
    """
    _check_exporter(exporter)
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(input_names)
    if len(names) != len(args):
        raise ValueError(f"{len(args)} example tensors for {len(names)} input names")

    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            batch_dim = torch.export.Dim("batch", min=1, max=4096)
            seq_dim = torch.export.Dim("seq", min=1, max=max_seq)
            dyn = {n: {0: batch_dim, 1: seq_dim} for n in names}
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=names,
                output_names=[output_name],
                dynamic_shapes=dyn,
                opset_version=OPSETS["dynamo"],
                optimize=True,
                verbose=False,
                report=False,
            )
            if program is None:  # pragma: no cover - dynamo always returns a program
                raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
            # ``model_proto`` holds the weights in memory; write them inline.
            _save_inline(program.model_proto, out)
        else:
            axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "seq"} for n in names}
            axes[output_name] = dict(output_axes)
            with tempfile.TemporaryDirectory() as tmp:
                tmp_file = pathlib.Path(tmp) / "model.onnx"
                torch.onnx.export(
                    module,
                    args,
                    str(tmp_file),
                    dynamo=False,
                    input_names=names,
                    output_names=[output_name],
                    dynamic_axes=axes,
                    opset_version=OPSETS["torchscript"],
                    do_constant_folding=True,
                    verbose=False,
                )
                # Loading resolves any external data; saving writes everything inline.
                _save_inline(onnx.load(str(tmp_file)), out)
    return out


def export_model(
    model: torch.nn.Module,
    arch: str,
    exporter: str,
    out_path: str | os.PathLike[str],
    *,
    seq: int = 16,
    vocab: int = 256,
) -> pathlib.Path:
    """Export an already-built wrapper (see :func:`build_model`) to a single ONNX file."""
    _check_arch(arch)
    feeds = sample_inputs(arch, _EXAMPLE_BATCH, seq, vocab=vocab)
    names = input_names(arch)
    return export_module(
        model,
        tuple(torch.from_numpy(feeds[n]) for n in names),
        out_path,
        exporter=exporter,
        input_names=names,
        output_name=output_name(arch),
        output_axes={0: "batch", 1: "seq"},
    )


def verify_export(
    model: torch.nn.Module,
    arch: str,
    onnx_path: str | os.PathLike[str],
    *,
    batch: int = 3,
    seq: int = 11,
    vocab: int = 256,
    seed: int = 1,
) -> float:
    """Run ``onnx_path`` in onnxruntime and return the max abs difference to ``model``.

    The feeds come from :func:`sample_inputs` (right-padded ``attention_mask``), at a
    batch and sequence length that differ from the export example (2 x 16) by default.
    """
    import onnxruntime as ort

    feeds = sample_inputs(arch, batch, seq, vocab=vocab, seed=seed)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run([output_name(arch)], feeds)[0]
    with torch.no_grad():
        ref = model(*(torch.from_numpy(feeds[n]) for n in input_names(arch))).numpy()
    if got.shape != ref.shape:
        raise AssertionError(f"ONNX output shape {got.shape} != PyTorch {ref.shape}")
    return float(np.abs(got - ref).max())


def export_sample(
    arch: str,
    exporter: str,
    out_path: str | os.PathLike[str],
    *,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int | None = None,
    vocab: int = 256,
    seed: int = 0,
    seq: int = 16,
) -> pathlib.Path:
    """Build a random model (see :func:`build_model`) and export it to ``out_path``.

    Args:
        arch: one of :data:`ARCHS`.
        exporter: one of :data:`EXPORTERS`.
        out_path: destination ``.onnx`` file (parent directories are created).
        hidden, layers, intermediate, vocab, seed: forwarded to :func:`build_model`.
        seq: sequence length of the example inputs used for tracing (batch is 2);
            the exported axes are dynamic either way.

    Returns:
        The path of the written single-file ONNX model.
    """
    _check_exporter(exporter)
    model = build_model(arch, hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab, seed=seed)
    return export_model(model, arch, exporter, out_path, seq=seq, vocab=vocab)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", choices=ARCHS, help="architecture to export")
    what.add_argument("--all", metavar="DIR", help="export every arch x exporter into DIR")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo")
    p.add_argument("-o", "--output", help="output .onnx path (with --arch)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq", type=int, default=16, help="example sequence length for tracing")
    p.add_argument(
        "--verify",
        action="store_true",
        help="run each export in onnxruntime (batch 3, seq 11, padded mask) and compare with PyTorch",
    )
    ns = p.parse_args(argv)
    if ns.arch and not ns.output:
        p.error("--arch needs -o/--output")
    return ns


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ns = _parse_args(argv)
    if ns.all:
        jobs = [(arch, exp, pathlib.Path(ns.all) / f"{arch}-{exp}.onnx") for arch in ARCHS for exp in EXPORTERS]
    else:
        jobs = [(ns.arch, ns.exporter, pathlib.Path(ns.output))]
    status = 0
    for arch, exp, path in jobs:
        t0 = time.perf_counter()
        model = build_model(
            arch,
            hidden=ns.hidden,
            layers=ns.layers,
            intermediate=ns.intermediate,
            vocab=ns.vocab,
            seed=ns.seed,
        )
        out = export_model(model, arch, exp, path, seq=ns.seq, vocab=ns.vocab)
        line = f"{arch:<11} {exp:<12} {time.perf_counter() - t0:6.2f}s  {out}"
        if ns.verify:
            diff = verify_export(model, arch, out, vocab=ns.vocab)
            line += f"  max|onnx-torch|={diff:.2e}"
            if not diff < 1e-4:
                line += "  FAILED"
                status = 1
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
