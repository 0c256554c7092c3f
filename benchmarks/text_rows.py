"""What ``--text-rows documents`` makes of a text for MiniLM, beside what MiniLM is scored on: the padding
share of the document-row batches, and the token lengths of the held-out test paragraphs.

    python benchmarks/quantization.py --write-train /tmp/h6/train.txt
    python benchmarks/text_rows.py /tmp/h6/train.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from espace_export.io.data import input_specs, load_tokenizer, read_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text", type=Path, help="the healing text (see --write-train of quantization.py)")
    parser.add_argument("--model", type=Path, default=ROOT / "samples/out/minilm.onnx")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from samples.export_minilm import minilm_dir
    from samples.train_lm import split_paragraphs

    specs = input_specs(onnx.load(str(args.model), load_external_data=False))
    batches = read_text(args.text, minilm_dir(), specs, batch_size=args.batch_size, seq_len=128,
                        max_batches=10**6, rows="documents")  # fmt: skip
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["attention_mask"].size for b in batches)
    print(
        f"{len(batches)} batches of {args.batch_size} document rows, {tokens:,} tokens, padding {1 - tokens / slots:.1%}"
    )
    tokenizer: object = load_tokenizer(minilm_dir())
    lengths = [len(tokenizer(p, verbose=False)["input_ids"]) for p in split_paragraphs()["test"]]  # type: ignore[operator]
    p10, median, p90 = np.percentile(lengths, [10, 50, 90])
    print(f"test paragraphs: {len(lengths)}, tokens p10 {p10:.0f}, median {median:.0f}, p90 {p90:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
