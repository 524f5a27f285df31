"""Data preparation: determinism, the reader's batches, atomicity, and clear errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from piformer.cli import main
from piformer.data import TokenData, load_tokenizer, prepare, token_dtype
from piformer.data.sources import open_corpus, split_of, stdlib_files

SMALL = dict(max_files=12, vocab_size=300, progress=False)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("builtin_small")
    prepare("builtin", d, **SMALL)
    return d


def test_builtin_prepare_is_deterministic(small_dir, tmp_path):
    meta2 = prepare("builtin", tmp_path, **SMALL)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (small_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name
    meta1 = json.loads((small_dir / "meta.json").read_text())
    assert meta1["splits"] == meta2["splits"]
    assert meta1["manifest"] == meta2["manifest"]


def test_meta_contents(small_dir):
    meta = json.loads((small_dir / "meta.json").read_text())
    assert meta["source"] == "builtin" and meta["vocab_size"] <= 300
    assert meta["dtype"] == "uint16"
    assert meta["info"]["python_version"] == sys.version.split()[0]
    assert len(meta["manifest"]) == 12
    assert all(len(m["sha256"]) == 64 for m in meta["manifest"])
    assert {m["split"] for m in meta["manifest"]} == {"train", "val"}
    tok = load_tokenizer(small_dir)
    assert tok.token_to_id("<|endoftext|>") == meta["eot_id"]
    data = TokenData(small_dir)
    # one EOT after every document
    for split in ("train", "val"):
        assert int((np.asarray(getattr(data, split)) == meta["eot_id"]).sum()) == meta["splits"][split]["documents"]


def test_tokens_round_trip(small_dir):
    meta = json.loads((small_dir / "meta.json").read_text())
    root, _ = stdlib_files()
    first_train = next(m["path"] for m in meta["manifest"] if m["split"] == "train")
    text = (root / first_train).read_text(encoding="utf-8", errors="replace")
    data, tok = TokenData(small_dir), load_tokenizer(small_dir)
    ids = np.asarray(data.train)
    end = int(np.argmax(ids == meta["eot_id"]))
    assert tok.decode(ids[:end].tolist()) == text


def test_stdlib_selection_excludes_site_packages_and_tests():
    _, rels = stdlib_files()
    assert rels == sorted(rels) and all(r.endswith(".py") for r in rels)
    assert not any(r.startswith("site-packages/") or "/test/" in f"/{r}" for r in rels)
    _, with_tests = stdlib_files(include_tests=True)
    assert set(rels) <= set(with_tests)


def test_split_is_by_path_hash_and_stable():
    assert split_of("asyncio/base_events.py", 0.05) == split_of("asyncio/base_events.py", 0.05)
    keys = [f"f{i}.py" for i in range(4000)]
    frac = sum(split_of(k, 0.05) == "val" for k in keys) / len(keys)
    assert 0.04 < frac < 0.06


def test_get_batch_is_pure_function_of_step(small_dir):
    data = TokenData(small_dir)
    a = data.get_batch("train", 4, 16, step=7, micro_step=1, rank=0, seed=3)
    b = TokenData(small_dir).get_batch("train", 4, 16, step=7, micro_step=1, rank=0, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = a
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for other in (dict(step=8, micro_step=1, rank=0, seed=3), dict(step=7, micro_step=0, rank=0, seed=3),
                  dict(step=7, micro_step=1, rank=1, seed=3), dict(step=7, micro_step=1, rank=0, seed=4)):
        assert not torch.equal(data.get_batch("train", 4, 16, **other)[0], x)


def test_val_batches_fixed_and_cover_each_window_once(small_dir):
    data = TokenData(small_dir)
    v1 = data.get_batch("val", 4, 16, step=0, seed=1)[0]
    v2 = data.get_batch("val", 4, 16, step=0, seed=99, rank=1)[0]
    assert torch.equal(v1, v2)
    xs = [x for x, _ in data.iter_val(8, 16)]
    n_windows = (data.n_tokens("val") - 1) // 16
    assert sum(len(x) for x in xs) == n_windows
    # two ranks together see exactly what one process sees
    r0 = [x for x, _ in data.iter_val(8, 16, rank=0, world_size=2)]
    r1 = [x for x, _ in data.iter_val(8, 16, rank=1, world_size=2)]
    assert sum(len(x) for x in r0 + r1) == n_windows
    assert torch.equal(torch.cat(r0 + r1).sort(dim=0)[0], torch.cat(xs).sort(dim=0)[0])


def test_token_dtype():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_reuse_tokenizer(small_dir, tmp_path):
    meta = prepare("builtin", tmp_path, tokenizer=small_dir, max_files=12, progress=False)
    assert meta["vocab_size"] == json.loads((small_dir / "meta.json").read_text())["vocab_size"]
    assert (tmp_path / "train.bin").read_bytes() == (small_dir / "train.bin").read_bytes()
    with pytest.raises(ValueError, match="not both"):
        prepare("builtin", tmp_path, tokenizer=small_dir, vocab_size=300)


def test_user_dir_and_glob(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(40):
        (src / ("sub" if i % 2 else "") / f"m{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    (src / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    meta = prepare(str(src), tmp_path / "d1", vocab_size=300, progress=False)
    assert meta["source_kind"] == "files" and len(meta["manifest"]) == 40
    meta2 = prepare(str(src / "**" / "*.txt"), tmp_path / "d2", vocab_size=300, progress=False)
    assert len(meta2["manifest"]) == 40
    assert (tmp_path / "d1" / "train.bin").read_bytes() == (tmp_path / "d2" / "train.bin").read_bytes()


def test_interrupted_prepare_leaves_no_complete_looking_dir(small_dir, tmp_path, monkeypatch):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(small_dir, d)  # a complete directory, about to be re-prepared
    calls = {"n": 0}

    from piformer.data import shards

    orig_write = shards.TokenWriter.write

    def boom(self, ids):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of the train split
        orig_write(self, ids)

    monkeypatch.setattr(shards.TokenWriter, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare("builtin", d, **SMALL)
    assert not (d / "meta.json").exists()
    assert not [p for p in d.iterdir() if ".tmp-" in p.name]
    with pytest.raises(FileNotFoundError, match="piformer data prepare"):
        TokenData(d)


def test_missing_and_inconsistent_dirs(small_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="piformer data prepare"):
        TokenData(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenData(tmp_path)
    import shutil

    d = tmp_path / "cut"
    shutil.copytree(small_dir, d)
    with open(d / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="inconsistent"):
        TokenData(d)
    d2 = tmp_path / "noval"
    shutil.copytree(small_dir, d2)
    (d2 / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match="val.bin"):
        TokenData(d2)


def test_block_size_too_long(small_dir):
    data = TokenData(small_dir)
    with pytest.raises(ValueError, match="block_size"):
        data.check_block_size(data.n_tokens("val") + 5)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="valid sources"):
        open_corpus(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="matched no files"):
        open_corpus(str(tmp_path / "*.nothing"))
    with pytest.raises(ValueError, match="max_files"):
        open_corpus("builtin", max_files=1)
    with pytest.raises(ValueError, match="val_fraction"):
        open_corpus("builtin", val_fraction=1.5)


def test_hf_source_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match="pip install"):
        open_corpus("hf:some/dataset")


def _rows(n=60):
    return [f"class C{i}:\n    def m(self):\n        return {i} + {i}\n" * 5 for i in range(n)]


def test_hf_saved_dataset_and_json(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": _rows(), "repo": ["r"] * 60}).save_to_disk(str(saved))
    meta = prepare(f"hf:{saved}", tmp_path / "d1", vocab_size=300, progress=False)
    assert meta["source_kind"] == "hf" and meta["splits"]["val"]["documents"] > 0
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 60
    again = prepare(f"hf:{saved}", tmp_path / "d1b", vocab_size=300, progress=False)
    assert (tmp_path / "d1" / "train.bin").read_bytes() == (tmp_path / "d1b" / "train.bin").read_bytes()
    assert again["splits"] == meta["splits"]

    js = tmp_path / "rows.jsonl"
    js.write_text("".join(json.dumps({"text": t}) + "\n" for t in _rows()))
    meta2 = prepare(f"hf:{js}", tmp_path / "d2", vocab_size=300, progress=False)  # falls back to 'text'
    assert meta2["manifest"][0]["text_field"] == "text"
    # separate validation dataset
    meta3 = prepare(f"hf:{saved}", tmp_path / "d3", vocab_size=300, val_source=f"hf:{js}", progress=False)
    assert meta3["splits"]["train"]["documents"] == 60 and meta3["splits"]["val"]["documents"] == 60
    with pytest.raises(ValueError, match="--text-field"):
        prepare(f"hf:{saved}", tmp_path / "d4", text_field="body", progress=False)


def test_hf_unreachable_dataset_is_a_clear_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):  # what load_dataset does without a network: never download in tests
        raise ConnectionError("Couldn't reach 'piformer-test/surely-not-a-dataset-xyz' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="--source builtin"):
        open_corpus("hf:piformer-test/surely-not-a-dataset-xyz")


def test_cli_prepare_and_info(tmp_path, capsys):
    assert main(["data", "prepare", "--max-files", "6", "--vocab-size", "280", "--out", str(tmp_path), "--quiet"]) == 0
    assert "vocab" in capsys.readouterr().out
    assert main(["data", "info", str(tmp_path)]) == 0
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    assert "piformer data prepare" in capsys.readouterr().err
