"""ESPACE and quantization on the real all-MiniLM-L6-v2: does quantizing a compressed model cost more fidelity
than quantizing the dense one, and does equalizing the projected pairs (graph_passes.equalize) fix that?

One run, one table, every number measured here side by side:

* rows — dense fp32; ``quantize_dynamic`` int8 dense (weights per output channel, the stage's default, and
  per tensor, ``quantize_dynamic``'s own default); int4 weight-only dense (MatMulNBits, block 32); ESPACE 0.5
  (``--method auto --select proxy`` by default); ESPACE + int8 without equalization and after each
  equalization tried (SmoothQuant scales at several α, a Hadamard rotation inside each pair's L-space, both),
  with per-channel and with per-tensor weight scales; ESPACE + int4, plain and equalized.
* columns — file MB; mean (and min) cosine of the sentence embeddings to the dense model's on held-out pydoc
  paragraphs (the *test* split of :mod:`samples.train_lm`, tokenized by the model's own tokenizer, padded,
  truncated at 128 tokens); the latency ratio to dense of one 8×128 batch (ORT CPU, 2 intra-op threads,
  the models run interleaved round by round, median of the rounds, with the spread).

Calibration (ESPACE statistics, equalization ranges, nothing else: the int8 and int4 quantizers here take
no calibration) uses the *train* split. Needs ``samples/out/minilm.onnx`` (``python samples/export_minilm.py
-o samples/out/minilm.onnx``).

    python benchmarks/quantization.py
    python benchmarks/quantization.py --espace samples/out/minilm.auto.onnx   # reuse a compressed model
    python benchmarks/quantization.py --fidelity a.onnx b.onnx   # only each model's cosine on the test paragraphs
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from espace_export.io.data import input_specs, read_text  # noqa: E402
from espace_export.io.text import html_paragraphs  # noqa: E402
from espace_export.quantize import equalize_pairs, quantize_model  # noqa: E402
from espace_export.runtime import ort_session  # noqa: E402


def _split_file(directory: Path, split: str) -> tuple[Path, list[str]]:
    from samples.train_lm import split_paragraphs

    paragraphs = split_paragraphs()[split]
    path = directory / f"{split}.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path, paragraphs


# installed packages whose docstrings the ``site`` healing text adds (those `pip install -e ".[cpu,torch,test]"`
# brings, the large ones first): English technical prose, like the pydoc test paragraphs, never containing them
SITE_PACKAGES = ("torch", "transformers", "numpy", "onnxruntime", "onnx", "huggingface_hub", "_pytest", "rich")
SITE_SKIPPED = ("test", "tests", "testing", "_vendor", "__pycache__")
# the HTML documentation of CPython (Debian: ``apt-get install python3.11-doc``), which the ``docs`` healing
# text reads: the prose of its library, reference, tutorial, how-to and FAQ pages — the help pages' own kind of
# text (pydoc's topics are cut from these pages, so every paragraph sharing SHINGLE words in a row with a test
# paragraph is dropped)
DOCS_DIR = Path("/usr/share/doc/python3.11/html")
DOCS_PARTS = ("library", "reference", "tutorial", "howto", "faq", "glossary.html", "using", "extending")
SHINGLE = 8


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {tuple(words[i : i + SHINGLE]) for i in range(max(len(words) - SHINGLE + 1, 1))}


def docs_paragraphs(root: Path, test: Sequence[str], min_words: int = 8) -> tuple[list[str], int]:
    """The prose paragraphs of the HTML pages under ``root``'s :data:`DOCS_PARTS` with at least ``min_words``
    words, each once, less those sharing :data:`SHINGLE` words in a row with a ``test`` paragraph (how many: the
    second value)."""
    banned = set().union(*(_shingles(p) for p in test))
    paragraphs, seen, dropped = [], set(), 0
    for part in DOCS_PARTS:
        pages = [root / part] if (root / part).is_file() else sorted((root / part).rglob("*.html"))
        for page in pages:
            for para in html_paragraphs(page.read_text(encoding="utf-8", errors="replace"), tags=("p", "dt")):
                if len(para.split()) < min_words or para in seen:
                    continue
                seen.add(para)
                if _shingles(para) & banned:
                    dropped += 1
                else:
                    paragraphs.append(para)
    return paragraphs, dropped


def write_train_text(
    path: Path, source: str, site_mb: float = 6.0, docs_dir: Path = DOCS_DIR, docs_mb: float | None = None
) -> str:
    """The training text for healing: pydoc's train split (``pydoc``), plus the standard library's docstrings
    (``python``, ``builtin:stdlib``), plus (``site``) paragraphs of at least 8 words from the docstrings of
    :data:`SITE_PACKAGES` up to ``site_mb`` MB, each once — less any paragraph that is also a test paragraph;
    or (``docs``) pydoc's train and validation splits, the stdlib docstrings and the prose of CPython's HTML
    documentation under ``docs_dir`` (:func:`docs_paragraphs`; up to ``docs_mb`` MB of them, a seeded random
    choice, in page order). Returns what went in."""
    import sysconfig

    from espace_export.io.data import docstrings, stdlib_text
    from samples.train_lm import split_paragraphs

    splits = split_paragraphs()
    test = set(splits["test"])
    paragraphs = list(splits["train"])
    told = f"{len(paragraphs)} train-split paragraphs"
    if source == "docs":
        if not docs_dir.is_dir():
            raise SystemExit(f"no HTML documentation at {docs_dir}: apt-get install python3.11-doc, or pass --docs-dir")
        paragraphs += splits["validation"]
        told += f" + {len(splits['validation'])} validation-split paragraphs"
    if source in ("python", "site", "docs"):
        docs = [p for p in (q.strip() for q in stdlib_text().split("\n\n")) if p]
        kept = [p for p in docs if p not in test]
        paragraphs += kept
        told += f" + {len(kept)} stdlib docstrings ({len(docs) - len(kept)} dropped: test paragraphs)"
    if source == "site":
        root, seen, size, added = Path(sysconfig.get_paths()["purelib"]), set(paragraphs), 0, 0
        for package in SITE_PACKAGES:
            for doc in docstrings(root / package, SITE_SKIPPED) if (root / package).is_dir() else []:
                for para in (q.strip() for q in doc.split("\n\n")):
                    if size < site_mb * 1e6 and len(para.split()) >= 8 and para not in seen and para not in test:
                        seen.add(para)
                        paragraphs.append(para)
                        size, added = size + len(para), added + 1
        told += f" + {added} paragraphs ({size / 1e6:.1f} MB) of the docstrings of {', '.join(SITE_PACKAGES)}"
    if source == "docs":
        prose, dropped = docs_paragraphs(docs_dir, splits["test"])
        seen = set(paragraphs)
        prose = [p for p in prose if p not in seen]
        if docs_mb is not None:  # a seeded choice spread over every page, kept in page order
            order, size, chosen = np.random.default_rng(0).permutation(len(prose)), 0, set()
            for i in order:
                if size + len(prose[i]) > docs_mb * 1e6:
                    break
                chosen.add(int(i))
                size += len(prose[i])
            prose = [p for i, p in enumerate(prose) if i in chosen]
        paragraphs += prose
        told += f" + {len(prose)} paragraphs ({sum(map(len, prose)) / 1e6:.1f} MB) of {docs_dir} ({dropped} dropped: they share {SHINGLE} words in a row with a test paragraph)"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return told


def _sentence_batches(paragraphs: list[str], tokenizer: Path, count: int, batch: int) -> list[dict[str, np.ndarray]]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    batches = []
    for start in range(0, min(count, len(paragraphs)), batch):
        enc = tok(paragraphs[start : start + batch], padding=True, truncation=True, max_length=128, return_tensors="np")
        batches.append(
            {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        )
    return batches


def _embeddings(path: Path, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = ort_session(path, threads=2)
    return np.concatenate([session.run(None, b)[0] for b in batches]).astype(np.float64)


def _cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1)
    return np.sum(reference * other, axis=1) / np.maximum(norms, 1e-30)


def _latency(paths: dict[str, Path], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per 8×128 batch, each model once per round, rounds interleaved (load drifts hit all alike)."""
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(1000, 30000, (8, 128)).astype(np.int64),
        "attention_mask": np.ones((8, 128), np.int64),
        "token_type_ids": np.zeros((8, 128), np.int64),
    }
    sessions = {name: ort_session(path, threads=2) for name, path in paths.items()}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, session in sessions.items():
            tick = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - tick)
    return times


def _file_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name)) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "samples/out/minilm.onnx")
    parser.add_argument("--espace", type=Path, help="an ESPACE-compressed model of --model to reuse")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--select", default="proxy")
    parser.add_argument("--calib-batches", type=int, default=16, help="ESPACE calibration batches (4×128)")
    parser.add_argument("--equalize-batches", type=int, default=8, help="batches measuring X·P ranges (4×128)")
    parser.add_argument("--sentences", type=int, default=256, help="held-out test paragraphs")
    parser.add_argument("--alphas", default="0.25,0.5,0.75", help="SmoothQuant α values tried")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, help="keep the models here (default: a temporary directory)")
    parser.add_argument("--write-train", type=Path, metavar="PATH",
                        help="only write the healing text (no test paragraph in it) to PATH and stop")  # fmt: skip
    parser.add_argument("--fidelity", type=Path, nargs="+", metavar="ONNX",
                        help="only score these models of --model (mean, min, p10 cosine on the test paragraphs)")  # fmt: skip
    parser.add_argument("--split", choices=("train", "validation", "test"), default="test",
                        help="--fidelity: score on this split's first --sentences paragraphs (train: the healing "
                        "text's own, which shows over-fitting)")  # fmt: skip
    parser.add_argument("--train-text", choices=("pydoc", "python", "site", "docs"), default="python",
                        help="--write-train: pydoc's train split; it and the stdlib docstrings; those and "
                        "installed packages' docstrings; pydoc's train and validation splits, the stdlib "
                        "docstrings and CPython's HTML documentation (--docs-dir)")  # fmt: skip
    parser.add_argument("--docs-dir", type=Path, default=DOCS_DIR, help="--train-text docs: the HTML pages")
    parser.add_argument("--docs-mb", type=float, help="--train-text docs: at most this many MB of their prose")
    parser.add_argument("--site-mb", type=float, default=6.0, help="--train-text site: MB of package docstrings")
    args = parser.parse_args(argv)
    if args.write_train is not None:
        told = write_train_text(args.write_train, args.train_text, args.site_mb, args.docs_dir, args.docs_mb)
        print(f"wrote {told} to {args.write_train}")
        return 0
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizers advise pre-processing on every call

    from samples.export_minilm import minilm_dir

    tokenizer = minilm_dir()
    if args.fidelity:
        from samples.train_lm import split_paragraphs

        batches = _sentence_batches(split_paragraphs()[args.split], tokenizer, args.sentences, 32)
        reference = _embeddings(args.model, batches)
        for path in args.fidelity:
            cos = _cosines(reference, _embeddings(path, batches))
            print(f"{path}: mean {cos.mean():.4f}  min {cos.min():.4f}  p10 {np.percentile(cos, 10):.4f}")
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train, _ = _split_file(work, "train")
        _, test = _split_file(work, "test")
        dense_model = onnx.load(str(args.model))
        specs = input_specs(dense_model)
        calib = read_text(train, tokenizer, specs, batch_size=4, seq_len=128, max_batches=args.equalize_batches)
        held_out = _sentence_batches(test, tokenizer, args.sentences, 32)

        espace = args.espace
        if espace is None:
            import espace_export

            tick = time.perf_counter()
            result = espace_export.compress(
                args.model, output=work / "espace.onnx", ratio=args.ratio, method=args.method, select=args.select,
                calib_text=train, tokenizer=tokenizer, num_batches=args.calib_batches, batch_size=4, seq_len=128,
                progress=False,
            )  # fmt: skip
            espace = result.output
            print(
                f"compressed with --method {args.method} --select {args.select} in {time.perf_counter() - tick:.0f} s"
            )

        models: dict[str, Path] = {"dense fp32": args.model}
        notes: dict[str, str] = {}

        def add(name: str, make: Callable[[Path], object]) -> None:
            tick = time.perf_counter()
            path = work / (name.replace(" ", "_").replace(",", "").replace("α=", "a") + ".onnx")
            make(path)
            models[name] = path
            notes[name] = f"{time.perf_counter() - tick:.0f} s"

        add("int8 dense", lambda p: quantize_model(args.model, p, "int8"))
        add("int8 dense per-tensor", lambda p: quantize_model(args.model, p, "int8", per_channel=False))
        add("int4 dense", lambda p: quantize_model(args.model, p, "int4"))
        models[f"ESPACE {args.ratio}"] = espace
        espace_model = onnx.load(str(espace))

        def equalized(alpha: float | None, rotate: bool) -> onnx.ModelProto:
            copy = onnx.ModelProto()
            copy.CopyFrom(espace_model)
            return equalize_pairs(copy, calib, alpha=alpha, rotate=rotate)

        add("ESPACE + int8", lambda p: quantize_model(espace, p, "int8"))
        for alpha in [float(a) for a in args.alphas.split(",") if a]:
            add(f"ESPACE + smooth α={alpha} + int8", lambda p, a=alpha: quantize_model(equalized(a, False), p, "int8"))
        add("ESPACE + rotate + int8", lambda p: quantize_model(equalized(None, True), p, "int8"))
        add("ESPACE + rotate + smooth α=0.5 + int8", lambda p: quantize_model(equalized(0.5, True), p, "int8"))
        # per-tensor weight scales (quantize_dynamic's own default): where balancing the pair should matter
        add("ESPACE + int8 per-tensor", lambda p: quantize_model(espace, p, "int8", per_channel=False))
        for label, alpha, rotate in (("smooth α=0.5", 0.5, False), ("rotate", None, True)):
            add(
                f"ESPACE + {label} + int8 per-tensor",
                lambda p, a=alpha, r=rotate: quantize_model(equalized(a, r), p, "int8", per_channel=False),
            )
        add("ESPACE + int4", lambda p: quantize_model(espace, p, "int4"))
        add("ESPACE + smooth α=0.5 + int4", lambda p: quantize_model(equalized(0.5, False), p, "int4"))
        add("ESPACE + rotate + int4", lambda p: quantize_model(equalized(None, True), p, "int4"))

        reference = _embeddings(args.model, held_out)
        cosines = {name: _cosines(reference, _embeddings(path, held_out)) for name, path in models.items()}
        times = _latency(models, args.rounds, warmup=2)
        sizes = {name: _file_mb(path) for name, path in models.items()}

    dense_median = float(np.median(times["dense fp32"]))
    print(
        f"\nall-MiniLM-L6-v2, {len(reference)} held-out pydoc paragraphs (≤128 tokens), latency of 8×128 on ORT CPU "
        f"with 2 threads, {args.rounds} interleaved rounds; {time.perf_counter() - started:.0f} s in all\n"
    )
    print("| model | file MB | mean cosine | min cosine | latency ratio (median) | spread (p25–p75) |")
    print("|---|---|---|---|---|---|")
    for name in models:
        ratios = np.asarray(times[name]) / dense_median
        p25, p75 = np.percentile(ratios, [25, 75])
        print(
            f"| {name} | {sizes[name]:.1f} | {cosines[name].mean():.4f} | {cosines[name].min():.4f} | "
            f"{np.median(ratios):.2f} | {p25:.2f}–{p75:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
