"""Model folders in, model folders out.

Deployment tools load a folder, not a file: optimum's ``ORTModelForCausalLM.from_pretrained(DIR)`` wants
``model.onnx`` (or ``decoder_model_merged.onnx``) beside ``config.json`` and the tokenizer files;
onnxruntime-genai's ``og.Model(DIR)`` wants ``genai_config.json`` naming the model file, which names its
external data file. :func:`resolve_model_folder` reads such a folder into the model to compress, the
tokenizer to calibrate with and the files to carry over; :func:`output_folder` writes the compressed model
as a drop-in copy of the folder, atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx

from espace_export.errors import EspaceError

FolderKind = Literal["optimum", "genai", "folder", "file"]

# What optimum's ORTModelForCausalLM loads, in its order of preference.
OPTIMUM_DECODERS = ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx", "decoder_model.onnx")
GENAI_CONFIG = "genai_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


@dataclass(frozen=True)
class ModelFolder:
    """A model to compress and what travels with it."""

    root: Path  # the folder
    model: Path  # the .onnx file to compress
    kind: FolderKind
    tokenizer_dir: Path | None  # the folder, when it holds a HuggingFace tokenizer
    sidecars: tuple[Path, ...]  # every other file of the folder (configs, tokenizer, other models), to copy
    data_files: tuple[str, ...]  # the model's external data files (names relative to root): rewritten, not copied


def resolve_model_folder(path: str | os.PathLike[str]) -> ModelFolder:
    """Read ``path``: an ``.onnx`` file (as before), an optimum export folder or an onnxruntime-genai folder.

    Raises :class:`EspaceError` for a folder with no ONNX model, a genai config naming a missing file, or a
    folder whose several models leave the choice open.
    """
    path = Path(path)
    if path.is_file():
        return ModelFolder(path.parent, path, "file", None, (), _data_files(path))
    if not path.is_dir():
        raise EspaceError(f"model not found: {path}", "pass an .onnx file or a model folder")
    genai = path / GENAI_CONFIG
    kind: FolderKind
    if genai.is_file():
        model, kind = path / _genai_model_name(genai), "genai"
        if not model.is_file():
            raise EspaceError(
                f"{genai} names the model {model.name}, which is not in the folder",
                "copy the model file into the folder, or fix decoder.filename in genai_config.json",
            )
    else:
        models = sorted(p.name for p in path.glob("*.onnx"))
        if not models:
            raise EspaceError(f"{path} holds no .onnx model", "pass an .onnx file or an exported model folder")
        chosen = next((name for name in OPTIMUM_DECODERS if name in models), None)
        if chosen is None and len(models) > 1:
            raise EspaceError(
                f"{path} holds several models ({', '.join(models[:5])}) and none is a decoder optimum loads",
                "pass the .onnx file to compress",
            )
        model = path / (chosen or models[0])
        kind = "optimum" if (path / "config.json").is_file() else "folder"
    data = _data_files(model)
    skip = {model.name, *data}
    sidecars = tuple(sorted(p for p in path.iterdir() if p.name not in skip and not p.name.startswith(".")))
    tokenizer = path if any((path / name).is_file() for name in TOKENIZER_FILES) else None
    return ModelFolder(path, model, kind, tokenizer, sidecars, data)


def _genai_model_name(config_path: Path) -> str:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        name = config["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EspaceError(
            f"{config_path} has no model.decoder.filename", "check the genai_config.json the builder wrote"
        ) from None
    if not isinstance(name, str) or Path(name).name != name:
        raise EspaceError(f"{config_path} names the model {name!r}", "use a file name inside the folder")
    return name


def _data_files(model: Path) -> tuple[str, ...]:
    """External data files the model's tensors name (read from the graph only, weights untouched)."""
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # unreadable: load_model reports it with the right message later
        return ()
    names = set()
    tensors = list(proto.graph.initializer) + [
        a.t for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
    ]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names |= {e.value for e in tensor.external_data if e.key == "location"}
    return tuple(sorted(names))


def check_output_folder(out_dir: str | os.PathLike[str], source: ModelFolder) -> Path:
    """Fail early when ``out_dir`` cannot become the output folder: it is the source, holds files already, or
    its parent is missing."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == source.root.resolve():
        raise EspaceError("the output folder is the input folder", "choose another folder with -o")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise EspaceError(f"output folder {out_dir} exists and is not empty", "choose a new folder with -o")
    if not out_dir.parent.is_dir():
        raise EspaceError(f"the parent of {out_dir} does not exist", f"create it first (mkdir -p {out_dir.parent})")
    return out_dir


@contextlib.contextmanager
def output_folder(source: ModelFolder, out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield where to write the compressed model (the source model's name, in a temporary folder); on success
    copy every sidecar beside it, point ``genai_config.json`` at the files as written, and rename the folder
    to ``out_dir``. On any exception nothing is left behind.

    The model keeps its file name, so ``config.json``, ``genai_config.json`` and the loaders find it; its
    external data file is whatever the writer chose (the ``.onnx`` names it) and genai_config's data-file
    entries, if any, are updated to it.
    """
    out_dir = check_output_folder(out_dir, source)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield work / source.model.name
        if not (work / source.model.name).is_file():
            raise RuntimeError(f"nothing was written to {work / source.model.name}")
        for sidecar in source.sidecars:
            target = work / sidecar.name
            if target.exists():
                continue  # written by the compressor itself (a report)
            if sidecar.is_dir():
                shutil.copytree(sidecar, target)
            else:
                shutil.copy2(sidecar, target)
        if (work / GENAI_CONFIG).is_file():
            update_genai_config(work / GENAI_CONFIG, source.model.name, _data_files(work / source.model.name))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def update_genai_config(path: Path, model_name: str, data_files: tuple[str, ...]) -> None:
    """Point the decoder of a genai config at ``model_name`` and, where it lists external data files
    (``external_data`` / ``data_filename``), at ``data_files``."""
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    decoder = config.setdefault("model", {}).setdefault("decoder", {})
    decoder["filename"] = model_name
    for key in ("external_data", "data_filename", "external_data_filename"):
        if key in decoder:
            decoder[key] = data_files[0] if len(data_files) == 1 and isinstance(decoder[key], str) else list(data_files)
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def report_path_for(out_dir: str | os.PathLike[str]) -> Path:
    """Where the report of a folder output goes: beside the folder (``OUTDIR.report.json``, its Markdown twin
    ``OUTDIR.report.md``), so the folder stays exactly what the loaders expect."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".report.json")


def compress_into_folder(
    source: ModelFolder,
    out_dir: str | os.PathLike[str],
    report: str | os.PathLike[str] | None,
    compress: Callable[[Path, Path], Any],
) -> Any:
    """Run ``compress(model_path, report_path)`` into a drop-in copy of ``source`` at ``out_dir``
    (:func:`output_folder`); the report goes to ``report`` (default :func:`report_path_for`, beside the folder,
    never inside it) and names the model at its final place. ``compress`` returns a result with ``report``
    (the dict) and ``report_path``, as :func:`espace_export.compress` does. A failure leaves neither the folder
    nor a report of it behind.
    """
    from espace_export.io.models import report_files
    from espace_export.io.reports import write_report

    out_dir = Path(out_dir)
    report_path = Path(report) if report is not None else report_path_for(out_dir)
    if report_path.resolve().is_relative_to(out_dir.resolve()):
        raise EspaceError(
            f"--report {report_path} lies inside the output folder", "leave --report out: it goes beside the folder"
        )
    result = None
    try:
        with output_folder(source, out_dir) as model_path:
            result = compress(model_path, report_path)
    except BaseException:
        if result is not None:  # the model was written and reported, then the folder failed
            for path in report_files(Path(result.report_path)):
                Path(path).unlink(missing_ok=True)
        raise
    result.report["output"] = str(out_dir / source.model.name)
    write_report(result.report, Path(result.report_path))
    return result
