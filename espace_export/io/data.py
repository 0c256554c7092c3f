"""Calibration data: readers behind one protocol, and feeds completed the way exporters expect.

Every reader follows onnxruntime's quantization convention: ``get_next() -> dict[str, ndarray] | None``
(one batch of model inputs keyed by input name, ``None`` when exhausted) plus ``rewind()``.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx

from espace_export.errors import EspaceError
from espace_export.io.models import read_arrays

if TYPE_CHECKING:
    from espace_export.options import DataOptions

BUILTIN_PYDOC = "builtin:pydoc"
BUILTIN_STDLIB = "builtin:stdlib"
BUILTIN_PYTHON = "builtin:python"
BUILTIN_TEXTS = (BUILTIN_PYDOC, BUILTIN_STDLIB, BUILTIN_PYTHON)


class CalibrationDataReader(Protocol):
    def get_next(self) -> dict[str, np.ndarray] | None: ...

    def rewind(self) -> None: ...


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and dims (int for static, str for symbolic, None unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def is_integer(self) -> bool:
        return np.issubdtype(self.dtype, np.integer)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims: list[int | str | None] = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or None)
        specs.append(InputSpec(value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), tuple(dims)))
    return [_with_cache_dims(model, spec) if is_past_input(spec.name) else spec for spec in specs]


def _with_cache_dims(model: onnx.ModelProto, spec: InputSpec) -> InputSpec:
    """A KV-cache input whose head size is symbolic (onnxruntime-genai writes ``kv_cache_dim``) gets it from
    the ``GroupQueryAttention`` reading it: the query's width over the heads it packs."""
    if len(spec.shape) != 4 or isinstance(spec.shape[3], int):
        return spec
    joined = _concatenated_dims(model, spec)
    if joined is not None:
        return joined
    reader = next(
        (n for n in model.graph.node if n.op_type == "GroupQueryAttention" and spec.name in n.input[3:5]), None
    )
    if reader is None:
        return spec
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in reader.attribute}
    heads, kv_heads = int(attrs.get("num_heads", 0)), int(attrs.get("kv_num_heads", 0))
    width = _output_width(model, reader.input[0])
    packed = len(reader.input) < 2 or not reader.input[1]  # Q, K and V in one input
    packs = heads + 2 * kv_heads if packed else heads
    if not width or not packs or width % packs:
        return spec
    shape = list(spec.shape)
    shape[3] = width // packs
    if not isinstance(shape[1], int) and kv_heads:
        shape[1] = kv_heads
    return InputSpec(spec.name, spec.dtype, tuple(shape))


def _concatenated_dims(model: onnx.ModelProto, spec: InputSpec) -> InputSpec | None:
    """The past's missing dims from the new keys/values a ``Concat`` appends to it, as the graph's value_info
    records them (the builders write it for every tensor)."""
    shapes = {v.name: v.type.tensor_type.shape.dim for v in model.graph.value_info}
    for node in model.graph.node:
        if node.op_type != "Concat" or spec.name not in node.input:
            continue
        for other in node.input:
            dims = shapes.get(other)
            if other == spec.name or dims is None or len(dims) != len(spec.shape):
                continue
            shape = list(spec.shape)
            for axis, dim in enumerate(dims):
                if axis != past_sequence_axis(spec) and not isinstance(shape[axis], int) and dim.HasField("dim_value"):
                    shape[axis] = int(dim.dim_value)
            if isinstance(shape[3], int):
                return InputSpec(spec.name, spec.dtype, tuple(shape))
    return None


def _output_width(model: onnx.ModelProto, tensor: str) -> int | None:
    """The last dim of ``tensor``: as the graph's value_info records it, else from the GEMM that computes it
    (then maybe an Add): a MatMul's constant weight, or a ``MatMulNBits``' ``N`` (int4 graphs)."""
    recorded = next((v.type.tensor_type.shape.dim for v in model.graph.value_info if v.name == tensor), None)
    if recorded and recorded[-1].HasField("dim_value"):
        return int(recorded[-1].dim_value)
    producers = {out: node for node in model.graph.node for out in node.output}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    node = producers.get(tensor)
    if node is not None and node.op_type == "Add":
        gemms = ("MatMul", "MatMulNBits")
        node = next((producers[i] for i in node.input if i in producers and producers[i].op_type in gemms), None)
    if node is not None and node.op_type == "MatMulNBits":
        width = next((a.i for a in node.attribute if a.name == "N"), 0)
        return int(width) or None
    if node is None or node.op_type != "MatMul" or len(weights.get(node.input[1], [])) != 2:
        return None
    return int(weights[node.input[1]][1])


class BatchListReader:
    """A reader over batches already in memory."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self.batches = list(batches)
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self.batches):
            return None
        self._index += 1
        return self.batches[self._index - 1]

    def rewind(self) -> None:
        self._index = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)


def read_npz(path: str | Path, specs: Sequence[InputSpec], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Batches from a ``.npz`` of arrays keyed by input name, first axis = samples.

    Names, dtypes, ranks and static dims are checked against the model's inputs.
    """
    path = Path(path)
    if not path.is_file():
        raise EspaceError(f"calibration data not found: {path}", "pass an existing .npz with --calib-data")
    arrays = read_arrays(path, "calibration data", "save it with numpy.savez(path, input_ids=..., ...)")
    by_name = {spec.name: spec for spec in specs}
    if not arrays:
        raise EspaceError(f"calibration data {path} holds no arrays", f"save arrays named {', '.join(by_name)}")
    rows = None
    for key, array in arrays.items():
        spec = by_name.get(key)
        if spec is None:
            raise EspaceError(
                f"calibration array '{key}' is not an input of the model",
                f"rename it to one of: {', '.join(by_name)}",
            )
        if array.dtype != spec.dtype:
            raise EspaceError(
                f"calibration array '{key}' has dtype {array.dtype}, the model input wants {spec.dtype}",
                f"convert it with .astype(numpy.{spec.dtype})",
            )
        if array.ndim != len(spec.shape):
            raise EspaceError(
                f"calibration array '{key}' has shape {array.shape}, the model input has rank {len(spec.shape)} "
                f"{_shape_text(spec.shape)}",
                "reshape it to the model's input layout (first axis = samples)",
            )
        for axis, (have, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if axis > 0 and isinstance(want, int) and have != want:
                raise EspaceError(
                    f"calibration array '{key}' has shape {array.shape}, the model input wants "
                    f"{_shape_text(spec.shape)}",
                    f"make axis {axis} of size {want}",
                )
        if array.shape[0] == 0:
            raise EspaceError(f"calibration array '{key}' has no samples", "provide at least one row per input")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise EspaceError(f"calibration array '{key}' contains NaN or Inf", "clean the data before calibrating")
        if rows is not None and array.shape[0] != rows:
            raise EspaceError(
                f"calibration arrays disagree on the number of samples ({rows} vs {array.shape[0]} in '{key}')",
                "give every array the same first axis",
            )
        rows = array.shape[0]
    assert rows is not None
    return [{k: v[start : start + batch_size] for k, v in arrays.items()} for start in range(0, rows, batch_size)]


def _shape_text(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def pydoc_text() -> str:
    """About 0.5 MB of English prose shipped with CPython (the ``pydoc_data.topics`` help pages)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


_SKIPPED_STDLIB = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}


@functools.lru_cache(maxsize=1)
def stdlib_text(min_words: int = 20) -> str:
    """About 1.4 MB of English prose from the docstrings of CPython's standard library (modules, classes and
    functions with at least ``min_words`` words; test suites left out), read with :mod:`ast` (nothing is
    imported or run), in a fixed order."""
    import sysconfig

    return "\n\n".join(docstrings(Path(sysconfig.get_paths()["stdlib"]), _SKIPPED_STDLIB, min_words))


def docstrings(root: Path, skipped: Collection[str] = _SKIPPED_STDLIB, min_words: int = 20) -> list[str]:
    """The docstrings of the modules, classes and functions under ``root`` with at least ``min_words`` words,
    in path order, read with :mod:`ast` (nothing is imported or run); files under a folder named in
    ``skipped`` are left out."""
    import ast

    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if set(skipped).intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    docs.append(doc)
    return docs


def builtin_text(name: str) -> str:
    """The text behind ``builtin:pydoc`` (CPython's help pages), ``builtin:stdlib`` (its standard library's
    docstrings) or ``builtin:python`` (both, ≈ 1.9 MB)."""
    if name == BUILTIN_PYDOC:
        return pydoc_text()
    if name == BUILTIN_STDLIB:
        return stdlib_text()
    if name == BUILTIN_PYTHON:
        return pydoc_text() + "\n\n" + stdlib_text()
    raise EspaceError(f"unknown built-in text {name!r}", f"use one of {', '.join(BUILTIN_TEXTS)} or a text file")


def is_builtin_text(path: object) -> bool:
    return str(path).startswith("builtin:")


def read_text(
    path: str | Path,
    tokenizer_dir: str | Path | None,
    specs: Sequence[InputSpec],
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    rows: str = "packed",
) -> list[dict[str, np.ndarray]]:
    """Batches of token rows from a text file, tokenized by a HuggingFace tokenizer directory.

    ``path`` may name built-in English text (:func:`builtin_text`): ``builtin:pydoc``, ``builtin:stdlib``,
    ``builtin:python``; or a folder, whose text and HTML files are read (:func:`espace_export.io.text.folder_text`). ``rows``: ``packed`` cuts windows of ``seq_len`` tokens from the whole token stream
    (:func:`token_windows`); ``documents`` makes one row per paragraph (blank-line separated, or per line in a
    text without blank lines; longer ones split every ``seq_len`` tokens), the shape of inputs a
    sentence-embedding or classification model serves (:func:`document_rows`).
    """
    if tokenizer_dir is None:
        raise EspaceError("--calib-text needs a tokenizer", "pass --tokenizer DIR (a HuggingFace tokenizer directory)")
    if is_builtin_text(path):
        text = builtin_text(str(path))
        if not text.strip():  # a Python installed without its standard library's sources
            raise EspaceError(f"{path} found no text in this Python's installation",
                              f"use {BUILTIN_PYDOC} or a text file")  # fmt: skip
    else:
        path = Path(path)
        if path.is_dir():
            from espace_export.io.text import folder_text

            text = folder_text(path)
        elif not path.is_file():
            raise EspaceError(f"calibration text not found: {path}",
                              f"pass an existing text file, a folder of them, or {BUILTIN_PYDOC}")  # fmt: skip
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
    tokenizer: Any = load_tokenizer(tokenizer_dir)
    documents = [d.strip() for d in text.split("\n\n") if d.strip()]
    if rows == "documents" and len(documents) == 1:  # no blank lines: one document (sentence) per line
        documents = [line.strip() for line in text.splitlines() if line.strip()]
    if not documents:
        raise EspaceError(f"calibration text {path} is empty", "give it some representative text")
    if rows == "documents":
        fixed = any(isinstance(spec.shape[-1], int) for spec in specs if spec.is_integer and len(spec.shape) == 2)
        windows = padded_rows(document_rows(documents, tokenizer, seq_len, batch_size * max_batches), batch_size,
                              seq_len if fixed else None)  # fmt: skip
    else:
        windows = token_windows(documents, tokenizer, seq_len, batch_size * max_batches)
    names = {spec.name: spec for spec in specs}
    batches = []
    for start in range(0, len(windows), batch_size):
        ids = np.asarray(windows[start : start + batch_size], dtype=np.int64)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        mask = (ids != -1).astype(np.int64)
        ids[ids == -1] = pad if pad is not None else 0
        encoded = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        batches.append({k: v.astype(names[k].dtype) for k, v in encoded.items() if k in names})
    return batches


def token_windows(documents: Sequence[str], tokenizer: Any, seq_len: int, count: int) -> list[list[int]]:
    """Up to ``count`` windows of ``seq_len`` token ids cut from the whole token stream of ``documents``.

    The documents are tokenized one after another (only as many as the windows need) and joined by the
    tokenizer's separator (EOS, else SEP); each window carries the tokenizer's own special tokens (BOS, or
    CLS … SEP). A corpus with one document per line is one long stream, not one window. Only when the
    text is shorter than one window is a single, shorter window returned, padded with ``-1`` to ``seq_len``.
    """
    prefix, suffix = special_tokens(tokenizer)
    body = max(1, seq_len - len(prefix) - len(suffix))
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: list[int] = []
    for document in documents:
        if len(stream) >= body * count:
            break
        if stream and separator is not None:
            stream.append(int(separator))
        stream.extend(int(t) for t in tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"])
    starts = range(0, max(len(stream) - body + 1, 1), body)
    windows = []
    for start in list(starts)[:count]:
        window = [*prefix, *stream[start : start + body], *suffix][:seq_len]
        windows.append(window + [-1] * (seq_len - len(window)))
    return windows


def document_rows(documents: Sequence[str], tokenizer: Any, seq_len: int, count: int) -> list[list[int]]:
    """Up to ``count`` rows of token ids, one per document (its tail in further rows when it is longer than
    ``seq_len`` with the tokenizer's special tokens), in document order, unpadded."""
    prefix, suffix = special_tokens(tokenizer)
    body = max(1, seq_len - len(prefix) - len(suffix))
    rows: list[list[int]] = []
    for document in documents:
        if len(rows) >= count:
            break
        ids = [int(t) for t in tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]]
        rows.extend([*prefix, *ids[at : at + body], *suffix][:seq_len] for at in range(0, max(len(ids), 1), body))
    return rows[:count]


def padded_rows(rows: Sequence[list[int]], batch_size: int, width: int | None, bucket: int = 16) -> list[list[int]]:
    """``rows`` padded with ``-1``: to ``width``, or (``None``) to the longest row of their batch of
    ``batch_size``. Rows are sorted by length within runs of ``bucket`` batches first, so that a batch holds
    rows of like length (little padding) while the text's order holds at the scale of the runs."""
    ordered: list[list[int]] = []
    run = batch_size * bucket
    for start in range(0, len(rows), run):
        ordered.extend(sorted(rows[start : start + run], key=len))
    padded: list[list[int]] = []
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        size = width or max(len(r) for r in batch)
        padded.extend(r + [-1] * (size - len(r)) for r in batch)
    return padded


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (BOS; CLS … SEP), found by encoding one word."""
    plain = [int(t) for t in tokenizer("a", add_special_tokens=False)["input_ids"]]
    full = [int(t) for t in tokenizer("a", add_special_tokens=True)["input_ids"]]
    for at in range(len(full) - len(plain) + 1):
        if full[at : at + len(plain)] == plain:
            return full[:at], full[at + len(plain) :]
    return [], []


def load_tokenizer(tokenizer_dir: str | Path) -> object:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise EspaceError("--calib-text needs the transformers package", "pip install 'espace-export[text]'") from None
    if not Path(tokenizer_dir).is_dir():
        raise EspaceError(f"tokenizer directory not found: {tokenizer_dir}", "pass a HuggingFace tokenizer directory")
    refuse_custom_code(Path(tokenizer_dir))
    try:
        # trust_remote_code=False: transformers raises instead of asking on stdin whether to run the folder's code
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise EspaceError(f"cannot load a tokenizer from {tokenizer_dir}: {detail}", "check the directory") from None


def refuse_custom_code(tokenizer_dir: Path) -> None:
    """Refuse a tokenizer folder whose configuration maps a class to Python code shipped in the folder.

    Such code (``auto_map`` in ``tokenizer_config.json`` or ``config.json``) would be imported, that is run,
    by ``AutoTokenizer``; espace-export never runs code it did not ship.
    """
    for name in ("tokenizer_config.json", "config.json"):
        path = tokenizer_dir / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue  # unreadable configuration: transformers reports it below
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map:
            raise EspaceError(
                f"the tokenizer in {tokenizer_dir} needs custom Python code ({name} has an auto_map), "
                "which espace-export never runs",
                "save the tokenizer as a standard HuggingFace tokenizer (tokenizer.json) and pass that folder",
            )


def random_token_batches(
    specs: Sequence[InputSpec], vocab_size: int, *, batch_size: int, seq_len: int, num_batches: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """Random token ids, for smoke runs only: projections calibrated on them are not meaningful."""
    warnings.warn(
        "calibrating on random token ids (no --calib-data/--calib-text): fine for a smoke run, "
        "not for a model you deploy",
        stacklevel=2,
    )
    token_specs = [s for s in specs if "input_ids" in s.name or s.name in ("ids", "tokens")]
    if not token_specs:
        raise EspaceError(
            "cannot generate random calibration data: the model has no input_ids input",
            "pass --calib-data FILE.npz",
        )
    rng = np.random.default_rng(seed)
    return [
        {spec.name: rng.integers(0, vocab_size, size=(batch_size, seq_len)).astype(spec.dtype) for spec in token_specs}
        for _ in range(num_batches)
    ]


def is_past_input(name: str) -> bool:
    """A KV-cache input as exporters name it: ``past_key_values.0.key`` (optimum, onnxruntime-genai),
    ``past_key_values.0`` / ``past.0`` / ``past_0`` (older GPT-2 exports), ``past_key.0``, ``past_value.0``."""
    lowered = name.lower()
    return lowered.startswith(("past_key_values", "past.", "past_", "pkv")) or lowered == "past"


def past_sequence_axis(spec: InputSpec) -> int:
    """The axis of a KV-cache input that grows with the past: the one whose symbolic name says so
    (``past_sequence_length``, ``past_seq``, ``total_length``…), else the second-to-last
    (``[batch, heads, past, head_dim]`` and ``[2, batch, heads, past, head_dim]`` alike)."""
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, str) and any(word in dim.lower() for word in ("past", "seq", "length", "cache")):
            return axis
    return len(spec.shape) - 2


def empty_past(spec: InputSpec, batch: int) -> np.ndarray:
    """A zero-length past for a KV-cache input: static dims kept, the past axis 0, the batch axis ``batch``.

    The batch axis is the symbolic one (other than the past axis); a past input with another unknown dim
    cannot be filled in (the number of heads or the head size must be in the graph).
    """
    seq_axis = past_sequence_axis(spec)
    dims = []
    for axis, dim in enumerate(spec.shape):
        if axis == seq_axis:
            dims.append(0)
        elif isinstance(dim, int):
            dims.append(dim)
        elif batch not in dims or (isinstance(dim, str) and "batch" in dim.lower()):
            dims.append(batch)
        else:
            raise EspaceError(
                f"model input '{spec.name}' {_shape_text(spec.shape)} has more than one unknown dim besides its "
                "past length, so its zero-length past cannot be made",
                "export the model with static head counts and sizes, or give the past in --calib-data",
            )
    return np.zeros(dims, dtype=spec.dtype)


def past_length(feed: dict[str, np.ndarray], specs: Sequence[InputSpec]) -> int:
    """The past length of the KV-cache inputs the feed already holds (0 when it holds none)."""
    for spec in specs:
        value = feed.get(spec.name)
        if value is not None and is_past_input(spec.name) and value.ndim == len(spec.shape):
            return int(value.shape[past_sequence_axis(spec)])
    return 0


def complete_feed(feed: dict[str, np.ndarray], specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Add the inputs exporters expect but users rarely give: attention_mask (ones), position_ids
    (0..S-1), token_type_ids (zeros) and scalar integer inputs such as ``logits_to_keep`` (0).

    Decoder graphs with a KV cache get the prefill: every past input (``past_key_values.*``, ``past.*``)
    an empty past of its static shape, ``use_cache_branch`` False (optimum's merged decoder then runs its
    no-past branch), ``cache_position`` 0..S-1. When the feed holds a past of length P already, the mask
    covers P + S positions and positions continue at P.
    """
    complete = dict(feed)
    reference = next((v for v in feed.values() if v.ndim == 2 and np.issubdtype(v.dtype, np.integer)), None)
    past = past_length(feed, specs)
    for spec in specs:
        if spec.name in complete:
            continue
        name = spec.name.lower()
        if reference is not None and is_past_input(spec.name) and len(spec.shape) >= 3:
            if past:
                raise EspaceError(
                    f"the calibration data holds part of the KV cache but not '{spec.name}'",
                    "give every past_key_values input, or none (calibration then runs the prefill)",
                )
            complete[spec.name] = empty_past(spec, reference.shape[0])
            continue
        if "use_cache_branch" in name and spec.dtype == np.bool_:
            complete[spec.name] = np.full([d if isinstance(d, int) else 1 for d in spec.shape], past > 0, np.bool_)
            continue
        if len(spec.shape) == 0 and spec.is_integer:
            complete[spec.name] = np.zeros((), dtype=spec.dtype)
            continue
        if reference is not None and "cache_position" in name and len(spec.shape) == 1 and spec.is_integer:
            complete[spec.name] = np.arange(past, past + reference.shape[1], dtype=spec.dtype)
            continue
        if reference is None or len(spec.shape) != 2 or not spec.is_integer:
            raise EspaceError(
                f"model input '{spec.name}' {_shape_text(spec.shape)} is not in the calibration data and cannot be "
                "filled in",
                f"add an array named '{spec.name}' to the --calib-data .npz",
            )
        batch, seq = reference.shape
        if "attention_mask" in name or name == "mask":
            mask = feed.get("attention_mask")
            complete[spec.name] = (
                np.ones((batch, past + seq), dtype=spec.dtype) if mask is None else mask.astype(spec.dtype)
            )
        elif "position_ids" in name:
            complete[spec.name] = np.broadcast_to(np.arange(past, past + seq, dtype=spec.dtype), (batch, seq)).copy()
        elif "token_type_ids" in name:
            complete[spec.name] = np.zeros((batch, seq), dtype=spec.dtype)
        else:
            raise EspaceError(
                f"model input '{spec.name}' is not in the calibration data and cannot be filled in",
                f"add an array named '{spec.name}' to the --calib-data .npz",
            )
    return complete


def vocab_size(model: onnx.ModelProto) -> int | None:
    """Rows of the largest embedding table gathered by an integer graph input (in If/Loop bodies too, and
    inside ``EmbedLayerNormalization``)."""
    from graph_passes.find import _embedding_tables, scopes

    int_inputs = {s.name for s in input_specs(model) if s.is_integer}
    rows: set[int] = set()
    for scope in scopes(model):
        rows |= _embedding_tables(scope.graph, scope.constants, int_inputs)[1]
    return max(rows, default=None)


def split_holdout(
    batches: Sequence[dict[str, np.ndarray]], holdout: float
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Calibration batches and held-out batches (the last ``holdout`` fraction, at least one).

    With a single batch there is nothing to hold out: both sets are that batch, and a warning says so.
    """
    batches = list(batches)
    if len(batches) == 1:
        warnings.warn("only one calibration batch: fidelity is measured on the calibration data", stacklevel=2)
        return batches, batches
    held = min(len(batches) - 1, max(1, round(len(batches) * holdout)))
    return batches[:-held], batches[-held:]


@dataclass
class Batches:
    """The batches of one run: calibration, validation (for ``--select validate``) and held-out (fidelity)."""

    calibration: list[dict[str, np.ndarray]]
    validation: list[dict[str, np.ndarray]]
    held_out: list[dict[str, np.ndarray]]
    source: str  # "random-token-ids", "text:...", "npz:..."
    specs: list[InputSpec]

    @property
    def separate_holdout(self) -> bool:
        """Whether fidelity is measured on batches the calibration did not see."""
        return self.held_out is not self.calibration

    @property
    def tokens(self) -> int:
        """Calibration tokens (padding excluded): what the statistics were measured on."""
        return sum(batch_tokens(batch) for batch in self.calibration)


def batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Tokens in one batch, padding excluded (its attention mask, else its input ids; 0 with neither)."""
    mask = batch.get("attention_mask")
    ids = next((v for k, v in batch.items() if "input_ids" in k), None)
    return int(mask.sum()) if mask is not None else int(ids.size) if ids is not None else 0


def is_causal_lm(model: onnx.ModelProto) -> bool:
    """The graph is a causal LM: its first output is ``logits`` of rank 3 (or of unknown rank)."""
    output = model.graph.output[0]
    return "logits" in output.name.lower() and len(output.type.tensor_type.shape.dim) in (0, 3)


def resolve_text_rows(model: onnx.ModelProto, rows: str) -> str:
    """``auto``: ``packed`` windows for a causal LM (it reads a token stream), ``documents`` otherwise (an
    embedding or classification model serves one paragraph or sentence per row)."""
    if rows != "auto":
        return rows
    return "packed" if is_causal_lm(model) else "documents"


def read_batches(
    model: onnx.ModelProto, data: DataOptions, *, text: Any, array: Any, seed: int, count: int | None = None
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Up to ``count`` (default ``num_batches``) batches from one source (``array`` a .npz, ``text`` a text
    file), else random ids; and the source's description."""
    specs = input_specs(model)
    count = count or data.num_batches
    if array is not None:
        batches = read_npz(array, specs, data.batch_size)[:count]
        source = f"npz:{array}"
    elif text is not None:
        batches = read_text(
            text,
            data.tokenizer,
            specs,
            batch_size=data.batch_size,
            seq_len=data.seq_len,
            max_batches=count,
            rows=resolve_text_rows(model, data.text_rows),
        )
        source = "text:pydoc_data" if str(text) == BUILTIN_PYDOC else f"text:{text}"
    else:
        vocab = vocab_size(model)
        if vocab is None:
            raise EspaceError(
                "no calibration data given and no token embedding found to generate random ids",
                "pass --calib-data FILE.npz or --calib-text FILE --tokenizer DIR",
            )
        batches = random_token_batches(
            specs, vocab, batch_size=data.batch_size, seq_len=data.seq_len, num_batches=count, seed=seed
        )
        source = "random-token-ids"
    if not batches:
        raise EspaceError("the calibration source produced no batches", "give more calibration data")
    for batch in batches:
        complete_feed(batch, specs)  # fail now, not after the first batch ran
    return batches, source


def load_batches(model: onnx.ModelProto, data: DataOptions, *, validate: bool = False) -> Batches:
    """The run's batches from the sources ``data`` names: the last ``holdout`` fraction held out for fidelity;
    with ``validate``, validation batches from ``valid_text``/``valid_data`` or split off the calibration ones."""
    batches, source = read_batches(model, data, text=data.calib_text, array=data.calib_data, seed=data.seed)
    calibration, held_out = split_holdout(batches, data.holdout) if data.holdout > 0 else (batches, batches)
    validation: list[dict[str, np.ndarray]] = []
    if validate:
        if data.valid_data is not None or data.valid_text is not None:
            validation, _ = read_batches(
                model, data, text=data.valid_text, array=data.valid_data, seed=data.seed + 1, count=data.valid_batches
            )
        else:
            if len(calibration) < 2:
                raise EspaceError(
                    "--select validate (the default) needs at least 2 non-held-out batches (calibration + validation)",
                    "give more calibration data or raise --num-batches, pass --valid-text/--valid-data, or use --fast",
                )
            calibration, validation = split_holdout(calibration, data.validation)
    limits = token_id_limits(model)
    check_token_ids(batches, limits)  # every batch, held-out ones too, not only the first
    check_token_ids(validation, limits, what="validation batch")
    return Batches(calibration, validation, held_out, source, input_specs(model))


# ---------------------------------------------------------------------------------------------- validation

# Tokens a calibration may ask for in all (batches × batch size × sequence): far past any useful run,
# well short of what would exhaust memory before the first batch is built.
MAX_CALIBRATION_TOKENS = 2**31
MAX_SEED = 2**63 - 1


def check_calibration_sizes(*, batch_size: int, seq_len: int, num_batches: int, seed: int = 0) -> None:
    """``--batch-size``, ``--seq-len``, ``--num-batches`` and ``--seed`` within bounds, before any work."""
    for option, value in (("--batch-size", batch_size), ("--seq-len", seq_len), ("--num-batches", num_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EspaceError(f"{option} must be a whole number of at least 1, got {value!r}", "use positive sizes")
    tokens = batch_size * seq_len * num_batches
    if tokens > MAX_CALIBRATION_TOKENS:
        raise EspaceError(
            f"--num-batches {num_batches} × --batch-size {batch_size} × --seq-len {seq_len} asks for {tokens:.3g} "
            f"calibration tokens, more than the {MAX_CALIBRATION_TOKENS:.3g} this tool takes",
            "a few hundred thousand tokens calibrate well: try --num-batches 64",
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise EspaceError(f"--seed must be a whole number from 0 to 2**63-1, got {seed!r}", "try --seed 0")


def compile_patterns(patterns: Sequence[str], option: str = "--exclude") -> list[re.Pattern[str]]:
    """Compile layer-name regular expressions, each bad one an :class:`EspaceError` naming it."""
    compiled = []
    for pattern in patterns:
        if len(pattern) > 1000:
            raise EspaceError(
                f"{option} pattern is {len(pattern)} characters long", "pass a shorter regular expression"
            )
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise EspaceError(
                f"{option} {pattern!r} is not a regular expression ({exc.msg} at position {exc.pos})",
                "escape special characters with a backslash (\\( matches a parenthesis) or quote the name",
            ) from None
    return compiled


def token_id_limits(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph inputs that index an embedding table (directly or through a Cast/Reshape/Unsqueeze/
    Flatten), with the table's row count: ids must lie in ``[0, rows)``."""
    from graph_passes.find import ConstantTable, embedding_lookups

    integer_inputs = {spec.name for spec in input_specs(model) if spec.is_integer}
    limits: dict[str, int] = {}
    for index, _, rows in embedding_lookups(model.graph, ConstantTable(model.graph), integer_inputs):
        limits[index] = min(limits.get(index, rows), rows)
    return limits


def check_token_ids(
    batches: Sequence[Mapping[str, np.ndarray]], limits: Mapping[str, int], *, what: str = "calibration batch"
) -> None:
    """Every token id of every batch lies inside the embedding it indexes (see :func:`token_id_limits`).

    ONNX Runtime would otherwise stop mid-run with its Gather error, after the batches before it ran;
    check the held-out and validation batches too, not only the first."""
    for number, batch in enumerate(batches, start=1):
        for name, rows in limits.items():
            ids = batch.get(name)
            if ids is None or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                continue
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= rows:
                bad = low if low < 0 else high
                raise EspaceError(
                    f"{what} {number}: '{name}' holds token id {bad}, outside the model's embedding of {rows} rows",
                    "tokenize with the model's own tokenizer (its vocabulary must match the model)",
                )
