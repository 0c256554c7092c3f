"""Train a small Llama-style causal LM from scratch on CPython's documentation prose, and export it.

The random-init samples of ``make_models.py`` have no low-rank activation structure, so fidelity
figures measured on them mean little. This script makes a *trained* model small enough for a CPU
(about 4.5 M parameters; the default 300 steps take 1.9 minutes on 2 idle cores, and reached test
perplexity 111 against 652 for the unigram baseline) so that accuracy comparisons mean something.

Data and splits
    The text is :func:`espace_export.io.data.pydoc_text` (the ``pydoc_data.topics`` help pages shipped
    with CPython, ~0.5 MB). It is cut into paragraphs on blank lines (stripped, empty ones dropped).
    Each paragraph goes to a split by the SHA-1 of its UTF-8 text: ``int(sha1[:8], 16) % 20`` is
    0–15 → ``train`` (80 %), 16–17 → ``validation`` (10 %), 18–19 → ``test`` (10 %). Identical
    paragraphs therefore always land in the same split (no leakage between splits), and the
    assignment does not depend on paragraph order or on the Python version's topic ordering.
    Within a split the paragraphs keep their document order. ``validation`` is for selection and
    early decisions; ``test`` is only for the final numbers.

Tokenizer
    A byte-level BPE (``tokenizers``) trained on the ``train`` split only, vocabulary 3072 including
    the one special token ``<|endoftext|>`` (used as BOS/EOS/padding), saved as a
    ``PreTrainedTokenizerFast`` directory: ``AutoTokenizer.from_pretrained(out_dir / "hf")`` loads it.

Model and training
    ``LlamaForCausalLM``: hidden 256, 4 layers, 4 heads (2 KV heads), intermediate 688, untied head,
    max positions 512, dropout 0, eager attention. AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.1),
    linear warm-up then cosine decay, batches of 16 random windows of 129 tokens from the train stream
    (paragraphs joined with ``<|endoftext|>``). The cosine runs over ``steps`` (default 300: bit-for-bit
    reproducible on one machine); the train split has only ~92 k tokens, and longer runs overfit it (train
    loss 1.9 at step 500 of a 1200-step run, against 4.05 at the end of 300 steps). Passing
    ``steps=None`` runs the cosine over 88 % of ``minutes`` of wall-clock time instead.

Evaluation
    Perplexity over non-overlapping windows of ``seq_len`` tokens of the validation and test streams
    (every token predicted exactly once, except the first of each window), next to the unigram
    baseline (add-one smoothed token frequencies of the train stream) on the same tokens.

Output directory (default ``samples/out/tiny-lm/``)::

    hf/               save_pretrained model + tokenizer (AutoModelForCausalLM / AutoTokenizer)
    optimizer.pt      the AdamW state at the end of training (torch.save of a dict): ``optimizer`` (its
                      ``state_dict()``: first and second moments and step count per parameter),
                      ``parameter_names`` (the model's parameter names in the optimizer's order: matrices,
                      then vectors), ``schedule`` (``steps`` done, ``last_lr``, ``peak_lr``,
                      ``warmup_steps``) and ``config``. :func:`load_optimizer` rebuilds the AdamW of a model
                      with these parameters (the dense LM or a projected one, as the paper's §2.2 reuses
                      the baseline's optimizer state for retraining)
    model.onnx        TorchScript export, inputs input_ids/attention_mask int64 [batch, seq] -> logits
    train.txt, validation.txt, test.txt   the split paragraphs, joined by blank lines
    splits.json       the split rule, paragraph indices per split, token counts
    metrics.json      steps, minutes, parameters, validation/test perplexity, unigram baseline

Usage::

    python samples/train_lm.py                 # 300 steps, ~2 minutes on 2 idle cores -> samples/out/tiny-lm/
    python samples/train_lm.py --minutes 2 -o /tmp/lm

    from samples.train_lm import train_lm, load_lm
    out = train_lm("samples/out/tiny-lm")
    model, tokenizer = load_lm(out)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out" / "tiny-lm"
SPLITS = ("train", "validation", "test")
EOS = "<|endoftext|>"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass(frozen=True)
class LMConfig:
    """Model and optimisation sizes; the defaults are the documented tiny LM."""

    vocab: int = 3072
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 688
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30


def split_of(paragraph: str) -> str:
    """The split a paragraph belongs to (see the module docstring)."""
    bucket = int(hashlib.sha1(paragraph.encode("utf-8")).hexdigest()[:8], 16) % 20
    return "train" if bucket < 16 else ("validation" if bucket < 18 else "test")


def split_paragraphs(text: str | None = None) -> dict[str, list[str]]:
    """The pydoc paragraphs (or ``text``'s) by split, each in document order."""
    if text is None:
        from espace_export.io.data import pydoc_text

        text = pydoc_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for paragraph in paragraphs:
        splits[split_of(paragraph)].append(paragraph)
    return splits


def train_tokenizer(paragraphs: Sequence[str], vocab: int) -> object:
    """A byte-level BPE trained on ``paragraphs``, wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(paragraphs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=None)


def token_stream(paragraphs: Sequence[str], tokenizer: object) -> np.ndarray:
    """All paragraphs tokenized and joined, each followed by the EOS token."""
    eos = tokenizer.convert_tokens_to_ids(EOS)  # type: ignore[attr-defined]
    ids: list[int] = []
    for encoded in tokenizer(list(paragraphs), add_special_tokens=False)["input_ids"]:  # type: ignore[operator]
        ids.extend(encoded)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def build_lm(config: LMConfig, tokenizer: object, seed: int) -> torch.nn.Module:
    import transformers

    eos = tokenizer.convert_tokens_to_ids(EOS)  # type: ignore[attr-defined]
    hf_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
        pad_token_id=eos,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(hf_config)


def window_starts(n_tokens: int, seq_len: int) -> np.ndarray:
    """Starts of the non-overlapping evaluation windows of ``seq_len + 1`` tokens (last token shared)."""
    return np.arange(0, max(0, n_tokens - seq_len - 1) + 1, seq_len)


@torch.no_grad()
def perplexity(model: torch.nn.Module, stream: np.ndarray, seq_len: int, batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of ``stream``."""
    model.eval()
    starts = window_starts(len(stream), seq_len)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        rows = np.stack([stream[s : s + seq_len + 1] for s in starts[i : i + batch_size]])
        ids = torch.from_numpy(rows)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def unigram_perplexity(train: np.ndarray, evaluated: np.ndarray, vocab: int, seq_len: int) -> float:
    """Perplexity of add-one smoothed train-token frequencies on the tokens :func:`perplexity` scores."""
    probs = (np.bincount(train, minlength=vocab) + 1.0) / (len(train) + vocab)
    targets = np.concatenate([evaluated[s + 1 : s + seq_len + 1] for s in window_starts(len(evaluated), seq_len)])
    return float(np.exp(-np.log(probs[targets]).mean()))


def make_optimizer(model: torch.nn.Module, config: LMConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters in ``named_parameters`` order: matrices decayed, vectors not."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )


def optimizer_parameter_names(model: torch.nn.Module) -> list[str]:
    """The parameter names in the order :func:`make_optimizer` numbers them (its state is keyed 0, 1, …)."""
    named = list(model.named_parameters())
    return [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]


def _train(
    model: torch.nn.Module,
    stream: np.ndarray,
    config: LMConfig,
    *,
    minutes: float,
    steps: int | None,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[int, float]:
    """Train in place with ``optimizer`` (default: a fresh :func:`make_optimizer`; a loaded one keeps its
    moments, its learning rate is set by this loop's schedule every step); returns (steps, last loss)."""
    rng = np.random.default_rng(seed)
    optimizer = optimizer or make_optimizer(model, config)
    budget_s = 0.88 * minutes * 60.0  # leave ~12 % of the budget for evaluation and export
    start = time.perf_counter()
    model.train()
    step = 0
    loss_value = float("nan")
    progress = 0.0
    while progress < 1.0:
        # the schedule runs on the fraction of steps done, or of the time budget used when steps is None
        if step < config.warmup_steps:
            lr = config.lr * (step + 1) / config.warmup_steps
        else:
            lr = config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(stream) - config.seq_len - 1, size=config.batch_size)
        ids = torch.from_numpy(np.stack([stream[s : s + config.seq_len + 1] for s in starts]))
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        loss_value = loss.item()
        elapsed = time.perf_counter() - start
        progress = step / steps if steps is not None else elapsed / budget_s
        if step % 50 == 0:
            print(f"[train_lm] step {step} loss {loss_value:.3f} lr {lr:.2e} {elapsed:.0f}s", file=sys.stderr)
    model.eval()
    return step, loss_value


def _write_json(path: pathlib.Path, data: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def train_lm(
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    minutes: float = 8.0,
    seed: int = 0,
    steps: int | None = 300,
    config: LMConfig | None = None,
    threads: int | None = None,
    export: bool = True,
) -> pathlib.Path:
    """Train the tiny LM, evaluate it, save it and export it; returns ``out_dir``.

    ``steps`` fixes the schedule's length (reproducible); with ``steps=None``, ``minutes`` bounds the
    whole run instead (training gets 88 % of it, on a time-based cosine schedule). ``threads`` sets ``torch.set_num_threads``. Layout of
    ``out_dir``: see the module docstring.
    """
    config = config or LMConfig()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    began = time.perf_counter()
    splits = split_paragraphs()
    tokenizer = train_tokenizer(splits["train"], config.vocab)
    streams = {name: token_stream(splits[name], tokenizer) for name in SPLITS}
    model = build_lm(config, tokenizer, seed)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, config)
    done, last_loss = _train(
        model, streams["train"], config, minutes=minutes, steps=steps, seed=seed, optimizer=optimizer
    )
    train_s = time.perf_counter() - began

    vocab = len(tokenizer)  # type: ignore[arg-type]
    metrics = {
        "steps": done,
        "train_minutes": round(train_s / 60, 2),
        "final_train_loss": round(last_loss, 4),
        "parameters": n_params,
        "config": asdict(config),
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
    }
    for name in ("validation", "test"):
        metrics[f"{name}_perplexity"] = round(perplexity(model, streams[name], config.seq_len), 3)
        metrics[f"{name}_unigram_perplexity"] = round(
            unigram_perplexity(streams["train"], streams[name], vocab, config.seq_len), 3
        )

    hf_dir = out / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)  # type: ignore[attr-defined]
    save_optimizer(out / OPTIMIZER_FILE, model, optimizer, config, done)
    for name in SPLITS:
        (out / f"{name}.txt").write_text("\n\n".join(splits[name]) + "\n", encoding="utf-8")
    _write_json(
        out / "splits.json",
        {
            "source": "espace_export.io.data.pydoc_text() split on blank lines, paragraphs stripped",
            "rule": "int(sha1(paragraph.encode('utf-8')).hexdigest()[:8], 16) % 20: 0-15 train, 16-17 validation, 18-19 test",
            "paragraphs": {name: len(splits[name]) for name in SPLITS},
            "tokens": {name: int(len(streams[name])) for name in SPLITS},
        },
    )
    if export:
        export_onnx(model, out / "model.onnx")
    metrics["total_minutes"] = round((time.perf_counter() - began) / 60, 2)
    _write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2), file=sys.stderr)
    return out


def save_optimizer(
    path: pathlib.Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: LMConfig, steps: int
) -> None:
    """Write the AdamW state and where its schedule ended (see the module docstring), atomically."""
    last_lr = optimizer.param_groups[0]["lr"]
    state = {
        "optimizer": optimizer.state_dict(),
        "parameter_names": optimizer_parameter_names(model),
        "schedule": {"steps": steps, "last_lr": last_lr, "peak_lr": config.lr, "warmup_steps": config.warmup_steps},
        "config": asdict(config),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_optimizer(out_dir: str | os.PathLike[str], model: torch.nn.Module, config: LMConfig) -> torch.optim.AdamW:
    """An AdamW for ``model`` with the moments :func:`train_lm` saved, for a model whose parameters have the
    trained LM's names and shapes (the dense LM, or one projected by ``espace_export.heal``, whose weights
    stay the same Parameters); raises ``ValueError`` otherwise. Learning rate and weight decay: ``config``'s."""
    saved = torch.load(pathlib.Path(out_dir) / OPTIMIZER_FILE, weights_only=True)
    names = optimizer_parameter_names(model)
    if names != saved["parameter_names"]:
        raise ValueError("the model's parameters are not the trained LM's: its optimizer state does not apply")
    optimizer = make_optimizer(model, config)
    shapes = {i: p.shape for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for i, moments in saved["optimizer"]["state"].items():
        if moments["exp_avg"].shape != shapes[i]:
            raise ValueError(
                f"{names[i]} has shape {tuple(shapes[i])}, its saved moments {tuple(moments['exp_avg'].shape)}"
            )
    optimizer.load_state_dict(saved["optimizer"])
    for group in optimizer.param_groups:
        group["weight_decay"] = config.weight_decay if group["weight_decay"] else 0.0
    return optimizer


def export_onnx(model: torch.nn.Module, path: pathlib.Path) -> pathlib.Path:
    """TorchScript export: ``(input_ids, attention_mask) -> logits``, batch and sequence dynamic."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from samples.make_models import CausalLMWrapper, export_module

    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones_like(ids)
    tmp = path.with_suffix(".tmp.onnx")
    export_module(
        CausalLMWrapper(model).eval(),
        (ids, mask),
        tmp,
        exporter="torchscript",
        input_names=("input_ids", "attention_mask"),
        output_name="logits",
        output_axes={0: "batch", 1: "seq"},
    )
    tmp.replace(path)
    return path


def load_lm(out_dir: str | os.PathLike[str] = DEFAULT_OUT) -> tuple[torch.nn.Module, object]:
    """The trained ``LlamaForCausalLM`` (eval mode, eager attention) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = pathlib.Path(out_dir) / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(hf_dir)


def load_split(out_dir: str | os.PathLike[str], split: str) -> list[str]:
    """The paragraphs of one split as saved by :func:`train_lm`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    text = (pathlib.Path(out_dir) / f"{split}.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=pathlib.Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--steps", type=int, default=300, help="training steps (the cosine schedule's length)")
    parser.add_argument(
        "--minutes", type=float, default=None, help="instead of --steps: a wall-clock budget for the whole run"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    args = parser.parse_args(argv)
    out = train_lm(
        args.out,
        minutes=args.minutes if args.minutes is not None else 8.0,
        seed=args.seed,
        steps=None if args.minutes is not None else args.steps,
        threads=args.threads,
        export=not args.no_export,
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
