"""`prepare`: corpus -> tokenizer -> token shards + meta.json (the `piformer data prepare` command)."""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from ..fileio import atomic_write_text
from .shards import SPLITS, TokenWriter, token_dtype
from .sources import Corpus, open_corpus
from .tokenizer import EOT, check_vocab_size, default_vocab_size, eot_id, load_tokenizer, train_tokenizer

META_VERSION = 1


def _take_bytes(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """The prefix of `texts` up to about `max_bytes` of UTF-8 (the first text always passes)."""
    total = 0
    for t in texts:
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(t.encode("utf-8", "surrogatepass"))
        yield t


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def prepare(
    source: str = "builtin",
    out_dir: str | Path = "data/builtin",
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
    *,
    val_fraction: float = 0.05,
    max_files: int | None = None,
    max_bytes: int | None = None,
    include_tests: bool = False,
    text_field: str | None = None,
    val_source: str | None = None,
    tokenizer_train_bytes: int | None = 256 << 20,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize a corpus into `out_dir` and return the meta dict that is also written to meta.json.

    source: 'builtin' | DIR | GLOB | 'hf:NAME[:SPLIT]' | 'codeparrot' (see piformer.data.sources).
    vocab_size: BPE size to train (default from corpus size: 8192 for the built-in corpus).
    tokenizer: reuse this tokenizer.json (or a data dir holding one) instead of training.
    max_files / max_bytes: take only a prefix of the sorted file list (quick runs, tests);
        for hf sources max_files caps the number of rows.
    tokenizer_train_bytes: train the BPE on at most this much training text (large corpora).
    """
    if vocab_size is not None and tokenizer is not None:
        raise ValueError("give either vocab_size (train a new tokenizer) or tokenizer (reuse one), not both")
    if vocab_size is not None:
        check_vocab_size(vocab_size)  # before anything is written
    t0 = time.time()
    corpus: Corpus = open_corpus(
        source, val_fraction=val_fraction, max_files=max_files, max_bytes=max_bytes,
        include_tests=include_tests, text_field=text_field, val_source=val_source,
    )
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # meta.json marks a complete directory: drop any old one before touching the shards,
    # so an interrupted re-prepare can never pair new shards with old metadata.
    (out / "meta.json").unlink(missing_ok=True)

    # 1. tokenizer
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        tokenizer_info: dict[str, Any] = {"from": str(tokenizer)}
    else:
        if vocab_size is None:
            n_bytes = corpus.info.get("n_bytes") or sum(m.get("bytes", 0) for m in corpus.manifest)
            vocab_size = default_vocab_size(n_bytes) if n_bytes else 16384
        tok = train_tokenizer(_take_bytes(corpus.texts("train"), tokenizer_train_bytes), vocab_size)
        tokenizer_info = {"trained": True, "requested_vocab_size": vocab_size,
                          "train_bytes_cap": tokenizer_train_bytes}
    atomic_write_text(out / "tokenizer.json", tok.to_str())
    vocab = tok.get_vocab_size()
    eot = eot_id(tok)
    dtype = token_dtype(vocab)

    # 2. shards: every document followed by EOT, GPT-2 style
    splits: dict[str, Any] = {}
    for split in SPLITS:
        writer = TokenWriter(out / f"{split}.bin", dtype)
        n_docs = 0
        try:
            bar = tqdm(desc=f"tokenizing {split}", unit="doc", disable=not progress, leave=False)
            for chunk in _batched(corpus.texts(split), 256):
                for enc in tok.encode_batch(chunk, add_special_tokens=False):
                    ids = np.asarray(enc.ids, dtype=np.int64)
                    writer.write(np.append(ids, eot))
                n_docs += len(chunk)
                bar.update(len(chunk))
            bar.close()
        except BaseException:
            writer.abort()
            raise
        if n_docs == 0:
            writer.abort()
            raise ValueError(f"source {source!r} produced no {split} documents; use more data or another val_fraction")
        splits[split] = {**writer.commit(), "documents": n_docs}

    meta = {
        "version": META_VERSION,
        "source": source,
        "source_kind": corpus.kind,
        "val_source": val_source,
        "val_fraction": val_fraction,
        "vocab_size": vocab,
        "eot_token": EOT,
        "eot_id": eot,
        "dtype": dtype.name,
        "tokenizer": {"file": "tokenizer.json", **tokenizer_info},
        "splits": splits,
        "info": corpus.info,
        "manifest": corpus.manifest,
        "prepared_with_python": sys.version.split()[0],
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    return meta
