"""Time to first token of an ESPACE-compressed Llama against the original, beside the Amdahl bound.

Builds (once, cached in ``--workdir``) a Llama with Llama-2-7B's hidden sizes (hidden 4096, MLP 11008,
32 heads, no grouped KV) and a few blocks, random weights, exported with the TorchScript exporter and
stored with external data; compresses it with ``espace_export.compress(ratio=0.5)`` calibrated on random
token ids (the values of P do not change latency); then runs ``espace_export.deploy.profile`` on it: every
targeted GEMM at M = seq (original vs pair, interleaved) and the whole prefill of one prompt of
``--seq`` tokens (batch 1, interleaved), all in one run. The GEMM share of the original prefill gives
the Amdahl bound ``1 − share × (1 − FLOP ratio)`` on the TTFT ratio.

    python benchmarks/ttft.py                       # 2 blocks, seq 2048, ORT CPU
    python benchmarks/ttft.py --blocks 4 --backend ort-cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

TARGET_SLACK = 0.05  # the target: TTFT ratio within 5% of the Amdahl bound


def export_llama(path: Path, *, blocks: int, vocab: int, seed: int = 0) -> None:
    """A random Llama with Llama-2-7B's widths, exported to ``path`` (+ ``path.data``), inputs
    ``input_ids``/``attention_mask`` [batch, seq] and output ``logits``."""
    import onnx
    import torch
    import transformers

    from espace_export.io.models import atomic_output, save_model

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=blocks,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    llama = transformers.LlamaForCausalLM(config).eval()

    class Prefill(torch.nn.Module):
        def __init__(self, llama: torch.nn.Module) -> None:
            super().__init__()
            self.llama = llama

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.llama(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, vocab, (1, 16))
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = Path(tmp) / "model.onnx"
        torch.onnx.export(
            Prefill(llama),
            (ids, torch.ones_like(ids)),
            str(exported),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
            do_constant_folding=True,
        )
        del llama
        model = onnx.load(str(exported))
        with atomic_output(path) as out:
            save_model(model, out, external_data=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary (Llama-2: 32000)")
    parser.add_argument("--seq", type=int, default=2048, help="prompt length (default 2048)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--backend", default="ort-cpu", choices=("ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt"))
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all)")
    parser.add_argument(
        "--warmup", type=int, default=0, help="extra untimed runs (each side already runs once untimed)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "espace-bench")
    parser.add_argument("--rebuild", action="store_true", help="export and compress again even if cached")
    args = parser.parse_args(argv)

    import espace_export
    from espace_export.deploy.build import BuildSettings
    from espace_export.deploy.profile import ProfileSettings, headline, profile

    args.workdir.mkdir(parents=True, exist_ok=True)
    stem = f"llama2-7b-widths-{args.blocks}blocks-v{args.vocab}"
    original = args.workdir / f"{stem}.onnx"
    compressed = args.workdir / f"{stem}.espace{args.ratio}.onnx"
    started = time.perf_counter()
    if args.rebuild or not original.is_file():
        print(f"exporting {original} ...", file=sys.stderr)
        export_llama(original, blocks=args.blocks, vocab=args.vocab)
    exported = time.perf_counter()
    if args.rebuild or not compressed.is_file():
        print(f"compressing to {compressed} (ratio {args.ratio}, random-token calibration) ...", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            espace_export.compress(
                original, ratio=args.ratio, output=compressed, num_batches=2, seq_len=64, batch_size=1
            )
    compressed_at = time.perf_counter()
    settings = ProfileSettings(
        backend=args.backend,
        seq=args.seq,
        batch=1,
        warmup=args.warmup,
        repeats=args.repeats,
        build=BuildSettings(threads=args.threads),
    )
    result = profile(
        original,
        compressed,
        settings,
        output=args.workdir / f"{stem}.profile.json",
        log=lambda line: print(line, file=sys.stderr),
    )
    report = result.report
    done = time.perf_counter()

    print(
        f"\n{args.blocks} blocks (hidden 4096, MLP 11008, 32 heads, vocab {args.vocab}), seq {args.seq}, batch 1, "
        f"{args.backend} ({report['device']}), {args.warmup} warm-up + {args.repeats} interleaved runs"
    )
    print(
        f"time: export {exported - started:.0f} s, compress {compressed_at - exported:.0f} s, "
        f"profile {done - compressed_at:.0f} s"
    )
    for name, value in headline(report):
        print(f"  {name:<32} {value}")
    for row in report["gemm"]["groups"]:
        print(
            f"    GEMM {row['label']:<24} ×{row['count']}  ratio {row['ratio']:.3f}  (FLOP ratio {row['flop_ratio']:.3f})"
        )
    for note in report["notes"]:
        print(f"  note: {note}")
    bound = report["amdahl_bound"]
    ratio = report["ttft"]["ratio"]
    gap = ratio / bound - 1
    verdict = "met" if abs(gap) <= TARGET_SLACK else "missed"
    print(
        f"TTFT ratio {ratio:.3f} vs Amdahl bound {bound:.3f}: {gap:+.1%} ({verdict}; target within ±{TARGET_SLACK:.0%})"
    )
    print(f"report: {', '.join(str(p) for p in result.paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
