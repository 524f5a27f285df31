"""Score a language model: mean next-token cross-entropy and perplexity, on any text.

    evaluate("runs/baseline")                           # the run's validation split
    evaluate("runs/baseline", "notes/*.md")             # text files, with the run's tokenizer
    evaluate("hf/baseline", "corpus.txt")               # a Hugging Face model directory and its tokenizer
    evaluate_run("runs/baseline", max_batches=10)       # the val split, the keys reproduce() records

The model is a piformer run or checkpoint directory, or a Hugging Face model directory (an
`export-hf` output or any causal LM on disk). The data is a prepared data directory (its val
split, already tokenized: it must be the model's tokenizer), a text file, or a glob of text
files, tokenized with the model's own tokenizer: the run's (its data directory's
tokenizer.json), or the HF directory's (AutoTokenizer).

Text is scored as every token of every file: each file is preceded by the end-of-text token
(as documents are separated in training), and the stream is cut into non-overlapping windows
of the model's context, the last one shorter. Perplexity is exp(mean cross-entropy over the
scored tokens). With few tokens the estimate is noisy: results carry the standard error of
the mean token loss (tokens treated as independent, so it is a lower bound) and a warning
below MIN_TOKENS.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt_io
from .data.shards import TokenData
from .data.tokenizer import EOT, load_tokenizer

MIN_TOKENS = 1000
"""Fewer scored tokens than this draw a warning: a perplexity from so little text says little."""


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when this torch has it and a GPU is present), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {name}: {build} (torch {torch.__version__}); use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: unsupported device type {device.type!r}; valid: auto, cpu, cuda, cuda:N")
    return device


def check_positive(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")


# ---------------------------------------------------------------------------------------
# What is scored: the model


@dataclass
class Scorer:
    """A model reduced to what scoring needs."""

    name: str
    kind: str
    """'piformer' (a run or checkpoint) or 'hf' (a Hugging Face model directory)."""
    logits: Callable[[torch.Tensor], torch.Tensor]
    """(B, T) ids -> (B, T, V) logits."""
    context: int
    vocab_size: int
    encode: Callable[[str], list[int]] | None
    """Text -> ids with the model's tokenizer (None: no tokenizer is known)."""
    eot_id: int | None
    tokenizer_vocab: dict[str, int] | None = None
    """The tokenizer's vocabulary, to check that a prepared data directory used the same one."""
    step: int | None = None
    run_data_dir: Path | None = None
    """The data directory a piformer run was trained on."""
    tokenizer_sha256: str | None = None
    """A run's recorded tokenizer fingerprint."""
    info: dict[str, Any] = field(default_factory=dict)


def run_tokenizer_path(path: str | Path, which: str = "best") -> Path | None:
    """tokenizer.json of the data a run (or a checkpoint inside one) was trained on, if known."""
    from .analysis.runs import open_run

    data_dir = open_run(path, which).recorded_data_dir()
    if data_dir is not None and (data_dir / "tokenizer.json").is_file():
        return data_dir / "tokenizer.json"
    return None


def open_scorer(path: str | Path, which: str = "best", device: str | torch.device = "cpu",
                tokenizer: str | Path | None = None) -> Scorer:
    """A piformer run/checkpoint or a HF model directory, ready to score."""
    from .analysis.hf import is_hf_model_dir

    path = Path(path).expanduser()
    device = torch.device(device)
    if is_hf_model_dir(path):
        return _open_hf(path, device, tokenizer)
    return _open_piformer(path, which, device, tokenizer)


def _open_piformer(path: Path, which: str, device: torch.device, tokenizer: str | Path | None) -> Scorer:
    from .analysis.runs import open_run

    run = open_run(path, which)
    model = ckpt_io.load_model(run.checkpoint, device=device)
    tok_path = Path(tokenizer) if tokenizer is not None else run_tokenizer_path(path, which)
    tok = load_tokenizer(tok_path) if tok_path is not None else None
    state = ckpt_io.load_trainer_state(run.checkpoint, mmap=True) \
        if (run.checkpoint / ckpt_io.TRAINER_STATE).is_file() else None
    return Scorer(
        name=str(run.checkpoint), kind="piformer", logits=lambda x: model(x).logits,
        context=model.config.block_size, vocab_size=model.config.vocab_size,
        encode=(lambda text: tok.encode(text, add_special_tokens=False).ids) if tok is not None else None,
        eot_id=tok.token_to_id(EOT) if tok is not None else None,
        tokenizer_vocab=tok.get_vocab() if tok is not None else None,
        step=state.get("step") if state else None, run_data_dir=run.recorded_data_dir(),
        tokenizer_sha256=(run.config.get("data") or {}).get("fingerprint", {}).get("tokenizer_sha256")
        if isinstance(run.config.get("data"), dict) else None,
    )


def _open_hf(path: Path, device: torch.device, tokenizer: str | Path | None) -> Scorer:
    from .analysis.hf import _transformers, hf_context_length, load_hf_causal_lm

    tf = _transformers()
    from .hf.export import quiet_transformers  # importing piformer.hf registers PiformerForCausalLM

    with quiet_transformers():
        model = load_hf_causal_lm(path, device)
    tok = None
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(tokenizer or path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        if tokenizer is not None:
            raise ValueError(f"cannot load a tokenizer from {tokenizer}") from None
    context = hf_context_length(model) or 1024

    @torch.no_grad()
    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits

    return Scorer(
        name=str(path), kind="hf", logits=logits, context=context, vocab_size=model.config.vocab_size,
        encode=(lambda text: tok(text, add_special_tokens=False, verbose=False)["input_ids"]) if tok else None,
        eot_id=tok.eos_token_id if tok is not None else None,
        tokenizer_vocab=tok.get_vocab() if tok is not None else None,
        info={"model_type": getattr(model.config, "model_type", None)},
    )


# ---------------------------------------------------------------------------------------
# What is scored: the data


def resolve_data(spec: str | Path) -> tuple[str, Path | list[Path]]:
    """('data', DIR) for a prepared data directory, ('text', [files]) for a file or a glob."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "meta.json").is_file():
            return "data", p
        raise ValueError(f"{p} is a directory but not a prepared data directory (no meta.json); "
                         f"pass a text file or a glob such as '{p}/**/*.py'")
    if p.is_file():
        return "text", [p]
    files = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(f"no data directory, file or glob match at {spec!r}; valid: a prepared data "
                                "directory, a text file, or a glob of text files (quote it: '*.txt')")
    return "text", files


def text_windows(ids: list[int], context: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches covering every token of `ids` after the first once, in windows of at most
    `context` inputs; the last (shorter) window is a batch of its own."""
    n_pred = len(ids) - 1
    if n_pred < 1:
        raise ValueError("the text gives fewer than 2 tokens: nothing to score")
    t = torch.tensor(ids, dtype=torch.long)
    full = n_pred // context
    batches = []
    if full:
        x = t[: full * context].view(full, context)
        y = t[1: full * context + 1].view(full, context)
        batches += list(zip(x.split(batch_size), y.split(batch_size)))
    rest = n_pred - full * context
    if rest:
        s = full * context
        batches.append((t[s: s + rest].view(1, rest), t[s + 1: s + rest + 1].view(1, rest)))
    return batches


@torch.no_grad()
def score_batches(logits_fn: Callable[[torch.Tensor], torch.Tensor], batches, device: torch.device) -> dict[str, float]:
    """Mean token cross-entropy over (x, y) batches, its standard error, and perplexity."""
    total = total_sq = 0.0
    n = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        ce = torch.nn.functional.cross_entropy(logits_fn(x).float().flatten(0, 1), y.flatten(), reduction="none")
        ce = ce.double()
        total += float(ce.sum())
        total_sq += float(ce.square().sum())
        n += ce.numel()
    if n == 0:
        raise ValueError("nothing was scored (no batches)")
    loss = total / n
    var = max(total_sq / n - loss * loss, 0.0)
    stderr = math.sqrt(var / (n - 1)) if n > 1 else float("inf")
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else float("inf"), "tokens": n, "loss_stderr": stderr}


def _check_data_tokenizer(scorer: Scorer, data: TokenData) -> None:
    if scorer.vocab_size < data.vocab_size:
        raise ValueError(f"{data.dir} has vocab_size {data.vocab_size} but the model {scorer.name} only "
                         f"{scorer.vocab_size}: evaluate on data prepared with the model's tokenizer")
    tok_file = data.dir / "tokenizer.json"
    if scorer.tokenizer_sha256 and tok_file.is_file():
        if hashlib.sha256(tok_file.read_bytes()).hexdigest() != scorer.tokenizer_sha256:
            raise ValueError(f"{data.dir} was tokenized with a different tokenizer than {scorer.name} was trained on")
    elif scorer.tokenizer_vocab is not None and tok_file.is_file():
        if load_tokenizer(tok_file).get_vocab() != scorer.tokenizer_vocab:
            raise ValueError(f"{data.dir} was tokenized with a different tokenizer than {scorer.name}'s; "
                             "score a text file instead (it is tokenized with the model's own tokenizer)")
    if scorer.vocab_size != data.vocab_size and scorer.kind == "piformer":
        raise ValueError(f"{data.dir} has vocab_size {data.vocab_size} but the model in {scorer.name} has "
                         f"{scorer.vocab_size}: evaluate on data prepared with the run's tokenizer")


def evaluate(
    model: str | Path,
    data: str | Path | None = None,
    which: str = "best",
    max_batches: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    tokenizer: str | Path | None = None,
) -> dict[str, Any]:
    """Score `model` (run, checkpoint or HF directory) on `data` (see the module docstring).

    `data` defaults to the run's own data directory. Returns loss, ppl, tokens, loss_stderr,
    what was scored, and `warning` (None, or why the number says little).
    """
    check_positive("--batch-size", batch_size, allow_none=False)
    check_positive("--batches", max_batches)
    dev = resolve_device(device)
    scorer = open_scorer(model, which, dev, tokenizer)
    if data is None:
        if scorer.run_data_dir is None:
            raise ValueError(f"{model} records no data directory; pass --data (a data directory, a text file or a glob)")
        data = scorer.run_data_dir
    kind, where = resolve_data(data)
    if kind == "data":
        tokens = TokenData(where)
        _check_data_tokenizer(scorer, tokens)
        T = min(scorer.context, tokens.n_tokens("val") - 1) if scorer.kind == "hf" else scorer.context
        tokens.check_block_size(T)
        result = score_batches(scorer.logits, tokens.iter_val(batch_size, T, max_batches), dev)
        source = str(tokens.dir)
    else:
        if scorer.encode is None:
            raise ValueError(f"no tokenizer is known for {model} (not a run directory, and no tokenizer beside it); "
                             "pass --tokenizer")
        ids: list[int] = []
        for f in where:
            ids += ([scorer.eot_id] if scorer.eot_id is not None else []) + scorer.encode(f.read_text(errors="replace"))
        batches = text_windows(ids, scorer.context, batch_size)
        result = score_batches(scorer.logits, batches[:max_batches] if max_batches else batches, dev)
        source = str(where[0]) if len(where) == 1 else f"{len(where)} files matching {data}"
    result.update(model=scorer.name, kind=scorer.kind, step=scorer.step, data=source, data_kind=kind,
                  context=scorer.context, warning=short_text_warning(result))
    return result


def short_text_warning(result: dict[str, Any]) -> str | None:
    """Why the perplexity says little, or None."""
    n = result["tokens"]
    if n >= MIN_TOKENS:
        return None
    half = 1.96 * result["loss_stderr"]
    spread = (f"its 95% interval is about x{math.exp(-half):.2f} to x{math.exp(half):.2f} of the value"
              if math.isfinite(half) else "no interval can be given")
    return (f"only {n} tokens were scored (fewer than {MIN_TOKENS}): the perplexity says little; {spread} "
            "(score more text for a usable number)")


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    which: str = "best",
    max_batches: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score a run's checkpoint (best, else last) on the val split of its data (or `data_dir`'s).

    The keys `piformer reproduce` records: val_loss, ppl, val_tokens, checkpoint, step, data_dir
    (and loss_stderr, warning)."""
    if data_dir is not None and not (Path(data_dir).expanduser() / "meta.json").is_file():
        # read_meta's message names the fix (`piformer data prepare`)
        TokenData(data_dir)
    r = evaluate(run_dir, data_dir, which=which, max_batches=max_batches, batch_size=batch_size, device=device)
    return {"val_loss": r["loss"], "ppl": r["ppl"], "val_tokens": r["tokens"], "checkpoint": r["model"],
            "step": r["step"], "data_dir": r["data"], "loss_stderr": r["loss_stderr"], "warning": r["warning"]}


__all__ = ["evaluate", "evaluate_run", "open_scorer", "resolve_data", "resolve_device", "score_batches",
           "text_windows", "run_tokenizer_path", "MIN_TOKENS"]
