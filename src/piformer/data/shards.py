"""Token shards on disk and the batches drawn from them.

Layout of a prepared data directory (written by `piformer data prepare`):

    tokenizer.json   the BPE tokenizer
    train.bin        token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    val.bin          same, validation documents
    meta.json        written last: its presence means the directory is complete

Batches are a pure function of (seed, step, micro_step, rank): the "data position" of
a run is just its step, so a resumed run sees exactly the batches an uninterrupted one
would have seen, with no sampler state to save.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPLITS = ("train", "val")
_PREPARE_HINT = "run `piformer data prepare --out {dir}` first (see `piformer data prepare --help`)"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


VERIFY_MODES = ("fast", "full", "none")
_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 4096
_FULL_HASH_UNDER = 64 << 20
"""Shards up to this size are hashed whole on every open (a fraction of a second); larger ones
by the sampled hash, and whole only when asked (verify='full', `piformer data verify`)."""


def _sample_offsets(size: int) -> list[int]:
    """Where the sampled hash reads: 64 blocks spread evenly from the first byte to the last."""
    if size <= _SAMPLE_BLOCKS * _SAMPLE_BYTES:
        return [0]
    last = size - _SAMPLE_BYTES
    return sorted({round(i * last / (_SAMPLE_BLOCKS - 1)) for i in range(_SAMPLE_BLOCKS)})


def sample_digest(path: str | Path) -> str:
    """sha256 over 64 blocks of 4 KiB spread over the file (the whole file when it is smaller)
    and its size: cheap enough for every open, and it changes when any sampled byte or the
    length does."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for off in _sample_offsets(size):
            f.seek(off)
            h.update(f.read(_SAMPLE_BYTES if size > _SAMPLE_BLOCKS * _SAMPLE_BYTES else size))
    return h.hexdigest()


def full_digest(path: str | Path) -> str:
    """sha256 of the whole file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


class TokenWriter:
    """Append token arrays to `path` through a temp file; `commit()` moves it into place."""

    def __init__(self, path: str | Path, dtype: np.dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._f = open(self.tmp, "wb")
        self._sha = hashlib.sha256()
        self.n_tokens = 0

    def write(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        b = arr.tobytes()
        self._f.write(b)
        self._sha.update(b)
        self.n_tokens += arr.size

    def commit(self) -> dict[str, Any]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "tokens": self.n_tokens, "sha256": self._sha.hexdigest(),
                "sample_sha256": sample_digest(self.path)}

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"data directory {str(d)!r} does not exist; " + _PREPARE_HINT.format(dir=d))
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{str(meta_path)!r} not found: {str(d)!r} is not a prepared (or completely prepared) "
            "data directory; " + _PREPARE_HINT.format(dir=d)
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(meta_path)!r} is not valid JSON ({err}); " + _PREPARE_HINT.format(dir=d)) from None


class TokenData:
    """Read-only view of a prepared data directory: memmaps, vocabulary size, batches.

    verify: how the shards are checked against meta.json on open. 'fast' (default): sizes, the
    full sha256 of shards up to 64 MiB and the sampled hash of larger ones; 'full': every byte's
    sha256; 'none': sizes only. Every batch is also checked for token ids outside the vocabulary.
    """

    def __init__(self, data_dir: str | Path, verify: str = "fast"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"TokenData: unknown verify mode {verify!r}; valid: {', '.join(VERIFY_MODES)}")
        self.dir = Path(data_dir).expanduser()
        self.meta = read_meta(self.dir)
        try:
            self.vocab_size: int = int(self.meta["vocab_size"])
            self.eot_id: int = int(self.meta["eot_id"])
            self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            split_meta = {split: self.meta["splits"][split] for split in SPLITS}
            tokens = {split: int(m["tokens"]) for split, m in split_meta.items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{str(self.dir / 'meta.json')!r} is incomplete or malformed ({type(err).__name__}: "
                             f"{err}); " + _PREPARE_HINT.format(dir=self.dir)) from None
        self._data: dict[str, np.memmap] = {}
        self._val_order: dict[int, np.ndarray] = {}
        for split in SPLITS:
            path = self.dir / f"{split}.bin"
            n = tokens[split]
            if not path.is_file():
                raise FileNotFoundError(f"{str(path)!r} is missing; " + _PREPARE_HINT.format(dir=self.dir))
            size = path.stat().st_size
            if size != n * self.dtype.itemsize:
                raise ValueError(
                    f"{str(path)!r} has {size} bytes but meta.json says {n} tokens of {self.dtype.name} "
                    f"({n * self.dtype.itemsize} bytes): the directory is inconsistent; "
                    + _PREPARE_HINT.format(dir=self.dir)
                )
            self._verify(path, split_meta[split], verify)
            self._data[split] = np.memmap(path, dtype=self.dtype, mode="r")

    def _verify(self, path: Path, split_meta: dict[str, Any], verify: str) -> None:
        full = split_meta.get("sha256")
        sample = split_meta.get("sample_sha256")
        if verify == "none" or (full is None and sample is None):
            return
        if full is not None and (verify == "full" or path.stat().st_size <= _FULL_HASH_UNDER):
            ok, what = full_digest(path) == full, "sha256"
        elif sample is not None:
            ok, what = sample_digest(path) == sample, "sampled hash"
        else:
            return  # a large legacy shard on the fast path: sizes only (`piformer data verify` hashes it)
        if not ok:
            raise ValueError(
                f"{str(path)!r} is corrupted: its {what} differs from the one meta.json recorded when it was "
                f"written; " + _PREPARE_HINT.format(dir=self.dir)
            )

    def _checked(self, buf: np.ndarray) -> np.ndarray:
        """The batch, after checking that every id is a token of the vocabulary."""
        top = int(buf.max()) if buf.size else 0
        if top >= self.vocab_size:
            raise ValueError(
                f"{str(self.dir)!r} holds token id {top}, outside its vocabulary of {self.vocab_size} "
                f"(meta.json): the shards do not belong to this tokenizer or are corrupted; "
                + _PREPARE_HINT.format(dir=self.dir)
            )
        return buf

    @property
    def train(self) -> np.memmap:
        return self._data["train"]

    @property
    def val(self) -> np.memmap:
        return self._data["val"]

    def n_tokens(self, split: str) -> int:
        return len(self._data[split])

    def check_block_size(self, block_size: int) -> None:
        """Fail early if a split is too short to cut even one (block_size + 1)-token window."""
        for split in SPLITS:
            n = self.n_tokens(split)
            if n < block_size + 1:
                raise ValueError(
                    f"block_size={block_size} is too long for {str(self.dir)!r}: its {split} split has only "
                    f"{n} tokens (need >= block_size + 1 = {block_size + 1}); lower model.block_size "
                    "or prepare more data (e.g. a larger --max-files/--max-bytes)"
                )

    # -- batches -----------------------------------------------------------------------
    def val_windows(self, block_size: int) -> np.ndarray:
        """Start offsets of the val split's non-overlapping windows, in a fixed shuffled order.

        The order is seed-independent, so every run (and every evaluation) of the same data
        scores the same windows; shuffling spreads a partial evaluation over the whole split.
        """
        if block_size not in self._val_order:
            n = (self.n_tokens("val") - 1) // block_size
            order = np.random.default_rng(0).permutation(n)
            self._val_order[block_size] = order.astype(np.int64) * block_size
        return self._val_order[block_size]

    def num_val_batches(self, batch_size: int, block_size: int) -> int:
        """Batches that cover every val window once (the last one may be short)."""
        return -(-len(self.val_windows(block_size)) // batch_size)

    def get_batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        step: int = 0,
        micro_step: int = 0,
        rank: int = 0,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape (batch_size, block_size); y is x shifted by one.

        train: random windows drawn from an RNG seeded by (seed, step, micro_step, rank).
        val:   batch number `step` of the fixed window order (micro_step, rank, seed ignored);
               it wraps around when `step` runs past the end.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        data = self._data[split]
        self.check_block_size(block_size)
        if split == "train":
            rng = np.random.default_rng([seed, step, micro_step, rank])
            starts = rng.integers(0, len(data) - block_size, size=batch_size)
        else:
            windows = self.val_windows(block_size)
            idx = (np.arange(batch_size) + step * batch_size) % len(windows)
            starts = windows[idx]
        buf = self._checked(np.stack([data[s:s + block_size + 1] for s in starts]).astype(np.int64))
        t = torch.from_numpy(buf)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def iter_val(
        self,
        batch_size: int,
        block_size: int,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        """Yield val batches in the fixed order, each window once (the last batch may be short).

        `max_batches` caps the total over all ranks; rank r takes batches r, r + world, ...
        so that the ranks together score exactly the windows one process would.
        """
        self.check_block_size(block_size)
        windows = self.val_windows(block_size)
        n = self.num_val_batches(batch_size, block_size)
        if max_batches is not None:
            n = min(n, max_batches)
        data = self.val
        for b in range(rank, n, world_size):
            starts = windows[b * batch_size:(b + 1) * batch_size]
            t = torch.from_numpy(self._checked(np.stack([data[s:s + block_size + 1] for s in starts]).astype(np.int64)))
            yield t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device)
