"""Which tokens a private-inference query runs on: given ids, text, the run's own validation
data, or (failing all) seeded random ids. Kept apart so the CLI stays thin."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..run_dir import run_data_dir


def parse_ids(spec: str) -> np.ndarray:
    try:
        return np.array([int(t) for t in spec.replace(",", " ").split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"--tokens expects integers separated by commas or spaces, got {spec!r}") from None


def resolve_tokens(
    run_dir: str | Path | None,
    seq_len: int | None,
    vocab_size: int,
    block_size: int,
    tokens: str | None = None,
    text: str | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """(ids, where they came from). Ids are checked against the model's vocabulary and context."""
    T = seq_len
    if tokens:
        ids, source = parse_ids(tokens), "--tokens"
    elif text:
        from piformer.data.tokenizer import load_tokenizer

        data_dir = run_data_dir(run_dir) if run_dir else None
        if data_dir is None:
            raise ValueError("--text needs the run's tokenizer: the run directory records no data directory")
        ids = np.array(load_tokenizer(data_dir).encode(text).ids, dtype=np.int64)
        source = f"--text, tokenized with {data_dir / 'tokenizer.json'}"
    else:
        ids, source = None, ""
        data_dir = run_data_dir(run_dir) if run_dir else None
        if data_dir is not None and T:
            try:
                from piformer.data.shards import TokenData

                val = TokenData(data_dir).val
                if len(val) >= T:
                    ids, source = np.asarray(val[:T], dtype=np.int64), f"first {T} validation tokens of {data_dir}"
            except (FileNotFoundError, ValueError):
                pass
        if ids is None:
            n = T or block_size
            ids = np.random.default_rng(seed).integers(0, vocab_size, n)
            source = f"{n} random token ids (seed {seed})"
    if T is not None:
        if len(ids) < T:
            raise ValueError(f"{source} gives {len(ids)} tokens but --seq-len is {T}")
        ids = ids[:T]
    if not 1 <= len(ids) <= block_size:
        raise ValueError(f"{len(ids)} tokens: the model takes 1..{block_size} (block_size)")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    return ids, source


def validation_windows(run_dir: str | Path, seq_len: int, n: int, vocab_size: int, block_size: int) -> tuple[np.ndarray, str]:
    """(n, seq_len) ids: n windows of the run's validation split, evenly spaced from its first
    token to its last (n different texts), and where they came from."""
    if not 1 <= seq_len <= block_size:
        raise ValueError(f"--seq-len {seq_len}: the model takes 1..{block_size} tokens (block_size)")
    data_dir = run_data_dir(run_dir)
    if data_dir is None:
        raise ValueError(f"{run_dir} records no data directory: --prompts reads the run's validation split")
    from piformer.data.shards import TokenData

    try:
        val = np.asarray(TokenData(data_dir).val)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--prompts reads the run's validation split, and {data_dir} has none readable: {err}") from None
    if len(val) < n * seq_len:
        raise ValueError(f"the validation split of {data_dir} has {len(val)} tokens, fewer than "
                         f"--prompts {n} x --seq-len {seq_len}")
    starts = np.linspace(0, len(val) - seq_len, n).astype(int)
    ids = np.stack([val[s:s + seq_len] for s in starts]).astype(np.int64)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"validation token ids must be in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    return ids, f"{n} windows of {seq_len} validation tokens of {data_dir}, evenly spaced"
