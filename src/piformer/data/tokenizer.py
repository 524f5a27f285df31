"""Byte-level BPE tokenizer (GPT-2 style), trained with `tokenizers` or loaded from a file.

Byte-level means every input is representable (no unknown token), which matters for
source code full of unusual characters. Training is deterministic for a given text
stream: `tokenizers` breaks ties between equally frequent pairs by the pair itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
"""End-of-text token placed after every document (GPT-2's separator)."""


def default_vocab_size(n_bytes: int) -> int:
    """A vocabulary that the corpus can fill: BPE needs many occurrences per merge.

    8192 suits the built-in stdlib corpus (~12 MB); small slices get fewer merges, large
    corpora (>= 256 MB) the 16384 that the paper's Languini setup uses.
    """
    if n_bytes < 1 << 20:
        return 2048
    if n_bytes < 256 << 20:
        return 8192
    return 16384


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + EOT + one merge), got {vocab_size}")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (including the 256 bytes and EOT)."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `tokenizer.json` (or a directory containing one, e.g. another prepared data dir)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file {str(p)!r} not found (expected a tokenizer.json or a directory with one)")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as err:
        raise ValueError(f"{str(p)!r} is not a readable `tokenizers` tokenizer.json: {err}") from None
    if tok.token_to_id(EOT) is None:
        # A tokenizer without GPT-2's separator: add it, so documents stay separated.
        tok.add_special_tokens([EOT])
    return tok


def eot_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOT)
    if i is None:
        raise ValueError(f"tokenizer has no {EOT!r} token")
    return i
