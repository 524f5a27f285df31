"""Corpus sources: where the text comes from, and which documents go to train or val.

A source is named by one string (the `--source` flag):

- ``builtin``           the ``.py`` files of the running interpreter's standard library
                        (the offline stand-in for CodeParrot, SPEC section 4);
- ``DIR`` or ``GLOB``   the user's own text/code files;
- ``hf:NAME[:SPLIT]``   a Hugging Face dataset by name, or a local one: ``hf:/path/saved``
                        (``Dataset.save_to_disk``) or ``hf:/path/file.jsonl`` (json/csv/parquet);
- ``codeparrot``        shorthand for the paper's CodeParrot train/valid datasets (online).

File sources are split by a hash of each file's relative path, so a file's split never
depends on which other files exist (adding files does not reshuffle the validation set).
Dataset rows are split by a hash of their text unless a separate validation source is given.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

# Directories of the standard library that are not "the standard library's source":
# third-party packages, compiled extensions, build configuration and caches.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "lib-dynload", "__pycache__"}
# Test suites: left out by default because many Python installations (e.g. Debian's
# python3) do not ship them, and the built-in corpus should be the same everywhere.
_TEST_DIRS = {"test", "tests", "idle_test"}

CODEPARROT = ("huggingface-course/codeparrot-ds-train", "huggingface-course/codeparrot-ds-valid")


def split_of(key: str, val_fraction: float) -> str:
    """'train' or 'val' for a document key (relative path or text), from a stable hash."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def _hash_rank(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def read_text(path: str | Path) -> str:
    # Invalid UTF-8 (a few test files are deliberately latin-1) becomes U+FFFD rather than
    # an error, so every file contributes and the result is the same on every machine.
    return Path(path).read_bytes().decode("utf-8", errors="replace")


@dataclass
class Corpus:
    """Documents of one source, split into train and val, plus a manifest describing them."""

    source: str
    """The source spec as the user gave it (or 'builtin')."""
    kind: str
    """'builtin', 'files' or 'hf'."""
    iter_train: Callable[[], Iterator[str]]
    iter_val: Callable[[], Iterator[str]]
    manifest: list[dict[str, Any]] = field(default_factory=list)
    """Files: one entry per file (path, bytes, sha256, split). Datasets: one per dataset."""
    info: dict[str, Any] = field(default_factory=dict)
    """Source-specific facts recorded in meta.json (python version, stdlib path, ...)."""

    def texts(self, split: str) -> Iterator[str]:
        return self.iter_train() if split == "train" else self.iter_val()


# ---------------------------------------------------------------------------------------
# Files (builtin and user directories / globs)


def stdlib_files(include_tests: bool = False) -> tuple[Path, list[str]]:
    """(stdlib root, sorted relative POSIX paths of its .py files)."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = _STDLIB_SKIP_DIRS | (set() if include_tests else _TEST_DIRS)
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith("config-")]
        for name in filenames:
            # _sysconfigdata_*.py records this machine's build paths: not portable source.
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                rels.append(Path(dirpath, name).relative_to(root).as_posix())
    return root, sorted(rels)


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def user_files(spec: str) -> tuple[Path, list[str]]:
    """(root, sorted relative paths) for a directory (all non-hidden text files) or a glob."""
    p = Path(spec).expanduser()
    if p.is_dir():
        root = p.resolve()
        paths = [Path(d, n) for d, dn, fn in os.walk(root) for n in fn
                 if not any(part.startswith(".") for part in Path(d, n).relative_to(root).parts)]
    elif any(c in spec for c in "*?["):
        paths = [Path(m).resolve() for m in glob.glob(os.path.expanduser(spec), recursive=True)]
        paths = [m for m in paths if m.is_file()]
        if not paths:
            raise ValueError(f"--source {spec!r}: the glob matched no files")
        root = Path(os.path.commonpath([m.parent for m in paths]))
    elif p.is_file():
        raise ValueError(
            f"--source {spec!r} is a single file; a corpus needs at least two documents "
            "(one for train, one for val): give a directory or a glob"
        )
    else:
        raise FileNotFoundError(
            f"--source {spec!r}: no such directory or file, and not a glob or 'hf:NAME'; "
            "valid sources: builtin, DIR, GLOB, hf:NAME[:split], codeparrot"
        )
    paths = [q for q in paths if q.is_file() and not _looks_binary(q)]
    return root, sorted(q.relative_to(root).as_posix() for q in paths)


def files_corpus(
    source: str,
    kind: str,
    root: Path,
    rels: list[str],
    val_fraction: float,
    max_files: int | None = None,
    max_bytes: int | None = None,
    info: dict[str, Any] | None = None,
) -> Corpus:
    """A corpus of files under `root`; `max_files` / `max_bytes` take a prefix of the sorted list."""
    chosen: list[str] = []
    total = 0
    for rel in rels:
        if max_files is not None and len(chosen) >= max_files:
            break
        size = (root / rel).stat().st_size
        if max_bytes is not None and total + size > max_bytes and len(chosen) >= 2:
            break
        chosen.append(rel)
        total += size
    if len(chosen) < 2:
        raise ValueError(f"source {source!r} has {len(chosen)} usable file(s) under {root}; need at least 2")

    splits = {rel: split_of(rel, val_fraction) for rel in chosen}
    # A small slice may hash entirely into one split: then move the file whose hash is
    # lowest (the one "closest" to val) so that both splits are non-empty, deterministically.
    if "val" not in splits.values():
        splits[min(chosen, key=_hash_rank)] = "val"
    if "train" not in splits.values():
        splits[max(chosen, key=_hash_rank)] = "train"

    manifest = []
    for rel in chosen:
        data = (root / rel).read_bytes()
        manifest.append({"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                         "split": splits[rel]})

    def make_iter(split: str) -> Callable[[], Iterator[str]]:
        return lambda: (read_text(root / rel) for rel in chosen if splits[rel] == split)

    info = dict(info or {})
    info.update({"root": str(root), "n_files": len(chosen), "n_bytes": total,
                 "max_files": max_files, "max_bytes": max_bytes})
    return Corpus(source, kind, make_iter("train"), make_iter("val"), manifest, info)


# ---------------------------------------------------------------------------------------
# Hugging Face datasets (optional dependency)


def _import_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ValueError(
            "--source hf:... needs the 'datasets' package: pip install 'piformer[hf]' "
            "(or pip install datasets); offline, use --source builtin or a directory of files"
        ) from None
    return datasets


def load_hf(spec: str, split: str | None = None):
    """A `datasets.Dataset` for 'NAME', a saved dataset directory or a local data file."""
    datasets = _import_datasets()
    path = Path(spec).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
        elif path.is_file():
            ext = path.suffix.lstrip(".").lower()
            builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}.get(ext)
            if builder is None:
                raise ValueError(f"hf:{spec}: unsupported local file type {ext!r}; valid: json, jsonl, csv, parquet, txt")
            ds = datasets.load_dataset(builder, data_files=str(path))
        else:
            ds = datasets.load_dataset(spec, split=split) if split else datasets.load_dataset(spec)
    except ValueError:
        raise
    except Exception as err:  # network, missing dataset, auth: all mean "cannot use this source"
        raise ValueError(
            f"could not load Hugging Face dataset {spec!r} ({type(err).__name__}: {err}). "
            "Offline? Use --source builtin, a directory of files, or hf:/path/to/saved_dataset"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split:
            if split not in ds:
                raise ValueError(f"hf:{spec}: no split {split!r}; available: {', '.join(ds)}")
            ds = ds[split]
        elif "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            # A dataset with one split under another name: CodeParrot's validation set
            # (huggingface-course/codeparrot-ds-valid) has only a 'validation' split.
            ds = next(iter(ds.values()))
        else:
            raise ValueError(f"hf:{spec}: several splits ({', '.join(ds)}); name one as hf:{spec}:SPLIT")
    return ds


def _parse_hf(spec: str) -> tuple[str, str | None]:
    """'hf:NAME[:SPLIT]' -> (NAME, SPLIT). Local paths may contain ':' only via the split suffix."""
    body = spec[3:]
    if not body:
        raise ValueError("--source hf: needs a dataset name, e.g. hf:huggingface-course/codeparrot-ds-train")
    name, sep, split = body.rpartition(":")
    if sep and split and "/" not in split and name:
        return name, split
    return body, None


def _text_column(ds, spec: str, text_field: str | None) -> str:
    cols = list(ds.column_names)
    wanted = [text_field] if text_field else ["content", "text"]
    for name in wanted:
        if name in cols:
            return name
    raise ValueError(
        f"hf:{spec}: no text field {' or '.join(map(repr, wanted))}; columns: {', '.join(cols)} "
        "(choose one with --text-field)"
    )


def hf_corpus(
    source: str,
    val_source: str | None,
    text_field: str | None,
    val_fraction: float,
    max_docs: int | None = None,
) -> Corpus:
    name, split = _parse_hf(source)
    ds = load_hf(name, split)
    col = _text_column(ds, name, text_field)
    n = len(ds) if max_docs is None else min(len(ds), max_docs)
    manifest = [{"dataset": name, "split": split, "rows": n, "fingerprint": getattr(ds, "_fingerprint", None),
                 "text_field": col, "role": "train" if val_source else "train+val"}]

    def rows(d, count: int, column: str) -> Iterator[str]:
        # Batched column access is ~50x faster than row dicts for Arrow-backed datasets.
        for start in range(0, count, 1000):
            yield from d[start:min(start + 1000, count)][column]

    if val_source:
        vname, vsplit = _parse_hf(val_source) if val_source.startswith("hf:") else (val_source, None)
        vds = load_hf(vname, vsplit)
        vcol = _text_column(vds, vname, text_field)
        vn = len(vds) if max_docs is None else min(len(vds), max(1, max_docs // 20))
        manifest.append({"dataset": vname, "split": vsplit, "rows": vn,
                         "fingerprint": getattr(vds, "_fingerprint", None), "text_field": vcol, "role": "val"})
        it_train = lambda: rows(ds, n, col)  # noqa: E731
        it_val = lambda: rows(vds, vn, vcol)  # noqa: E731
    else:
        # Split by a hash of the text: duplicates land in the same split, so val never
        # contains a verbatim copy of a training document.
        it_train = lambda: (t for t in rows(ds, n, col) if split_of(t, val_fraction) == "train")  # noqa: E731
        it_val = lambda: (t for t in rows(ds, n, col) if split_of(t, val_fraction) == "val")  # noqa: E731
    return Corpus(source, "hf", it_train, it_val, manifest, {"max_docs": max_docs})


# ---------------------------------------------------------------------------------------


def open_corpus(
    source: str = "builtin",
    *,
    val_fraction: float = 0.05,
    max_files: int | None = None,
    max_bytes: int | None = None,
    include_tests: bool = False,
    text_field: str | None = None,
    val_source: str | None = None,
) -> Corpus:
    """Resolve a `--source` string into a Corpus. See the module docstring for the forms."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_files is not None and max_files < 2:
        raise ValueError(f"max_files must be >= 2 (one train and one val document), got {max_files}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    if source == "builtin":
        root, rels = stdlib_files(include_tests)
        info = {"python_version": sys.version.split()[0], "python_implementation": sys.implementation.name,
                "include_tests": include_tests}
        return files_corpus("builtin", "builtin", root, rels, val_fraction, max_files, max_bytes, info)
    if source == "codeparrot":
        return hf_corpus("hf:" + CODEPARROT[0], "hf:" + CODEPARROT[1], text_field, val_fraction, max_files)
    if source.startswith("hf:"):
        return hf_corpus(source, val_source, text_field, val_fraction, max_files)
    root, rels = user_files(source)
    return files_corpus(source, "files", root, rels, val_fraction, max_files, max_bytes)
