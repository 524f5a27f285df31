"""The paper-scale recipes' pipelines on CPU, with the data replaced by a small local stand-in.

- The `gpt2` tier of `piformer reproduce`: source 'codeparrot' (resolved exactly as on a GPU
  machine, with the two Hugging Face datasets served from local `save_to_disk` copies shaped like
  the real ones: a 'train' split and a 'validation'-only split), the tier's tokenizer request
  (vocab 50257), its size preset and the GPT-2 small training recipe; only the model's width and
  depth, the step and batch counts and the evaluation lengths shrink.
- The Languini recipe (size and training recipe 'languini') on a directory of small text "books".
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from piformer.config import ARCH_PRESETS, SIZE_PRESETS, TRAIN_RECIPES, ModelConfig, TrainConfig, train_recipe

datasets = pytest.importorskip("datasets", reason="the codeparrot source needs the 'datasets' package (piformer[hf])")

PRESETS = ("SM+LN+G", "SM(t)+ScFuFFN", "EReg(SM(t)+ScFuFFN)")
STEPS = 4

# -------------------------------------------------------------------------------------------
# A CodeParrot look-alike: Python source rows with CodeParrot's columns


_NAMES = ["alpha", "beta", "gamma", "delta", "value", "count", "items", "result", "data", "index",
          "total", "path", "name", "config", "buffer", "token", "offset", "weight", "matrix", "frame"]
_MODULES = ["os", "sys", "json", "math", "re", "numpy as np", "pandas as pd", "collections", "itertools"]


def _python_file(rng: random.Random, i: int) -> str:
    a, b, c = rng.sample(_NAMES, 3)
    imports = "".join(f"import {m}\n" for m in rng.sample(_MODULES, 3))
    body = [
        imports, "\n\n",
        f"def {a}_{i}({b}, {c}=None):\n",
        f'    """Return the {b} scaled by {i}."""\n',
        f"    if {c} is None:\n        {c} = []\n",
        f"    for k in range(len({b})):\n        {c}.append({b}[k] * {i} + {rng.randint(0, 99)})\n",
        f"    return {c}\n\n\n",
        f"class {a.title()}{b.title()}{i}(object):\n",
        f"    def __init__(self, {b}, {c}={rng.randint(0, 9)}):\n",
        f"        self.{b} = {b}\n        self.{c} = {c}\n\n",
        f"    def __repr__(self):\n        return '{a.title()}(%r)' % (self.{b},)\n",
    ]
    if rng.random() < 0.5:
        body.append(f"\n\nif __name__ == '__main__':\n    print({a}_{i}([1, 2, 3]))\n")
    return "".join(body)


def _codeparrot_like(rng: random.Random, n: int, start: int) -> datasets.Dataset:
    rows = [_python_file(rng, start + i) for i in range(n)]
    return datasets.Dataset.from_dict({
        "repo_name": [f"user{i % 7}/repo{i % 13}" for i in range(n)],
        "path": [f"pkg/mod_{start + i}.py" for i in range(n)],
        "copies": ["1"] * n,
        "size": [str(len(r)) for r in rows],
        "content": rows,
        "license": ["mit"] * n,
    })


@pytest.fixture
def codeparrot_hub(tmp_path, monkeypatch):
    """`datasets.load_dataset` answers CodeParrot's two hub names from local saved copies laid out
    like the hub's (train: split 'train'; valid: only split 'validation'); anything else fails
    as it would offline. Returns the local train/valid datasets."""
    rng = random.Random(0)
    train, valid = _codeparrot_like(rng, 160, 0), _codeparrot_like(rng, 16, 10_000)
    saved = {"huggingface-course/codeparrot-ds-train": tmp_path / "hub" / "codeparrot-ds-train",
             "huggingface-course/codeparrot-ds-valid": tmp_path / "hub" / "codeparrot-ds-valid"}
    datasets.DatasetDict({"train": train}).save_to_disk(str(saved["huggingface-course/codeparrot-ds-train"]))
    datasets.DatasetDict({"validation": valid}).save_to_disk(str(saved["huggingface-course/codeparrot-ds-valid"]))

    from piformer.data import sources

    # the names the 'codeparrot' source asks the hub for
    assert {sources._parse_hf("hf:" + c)[0] for c in sources.CODEPARROT} == set(saved)
    asked = []

    def load_dataset(path, name=None, split=None, **kwargs):
        asked.append(path)
        if path not in saved:
            raise ConnectionError(f"offline test: {path!r} is not served")
        ds = datasets.load_from_disk(str(saved[path]))
        return ds[split] if split else ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return {"train": train, "valid": valid, "asked": asked}


# -------------------------------------------------------------------------------------------
# The gpt2 tier


def _runs(root: Path) -> dict[str, Path]:
    """preset -> run directory (a directory with the trainer's config.json and status.json)."""
    runs = {}
    for cfg in (root / "runs").rglob("config.json"):
        if (cfg.parent / "status.json").is_file():
            runs.setdefault(json.loads(cfg.read_text())["preset"], []).append(cfg.parent)
    return runs


def test_gpt2_tier_pipeline_on_a_local_codeparrot(tmp_path, codeparrot_hub):
    from piformer.data import TokenData, load_tokenizer
    from piformer.reproduce import TIERS, reproduce
    from piformer.train import lr_at

    tier = TIERS["gpt2"]
    assert tier.size == "gpt2-small" and tier.data["source"] == "codeparrot" and tier.data["vocab_size"] == 50257
    assert all(p in ARCH_PRESETS for p in PRESETS)
    small = dataclasses.replace(
        tier,
        model={**tier.model, "n_layer": 2, "n_head": 2, "n_embd": 64},  # block_size stays the tier's T=128
        train={**tier.train, "max_steps": STEPS, "batch_size": 4, "micro_batch_size": 2, "eval_interval": 2,
               "eval_batches": 2, "log_interval": 1, "checkpoint_interval": 2, "reg_grad_interval": 2},
        presets=PRESETS,
        entropy_batches=1,
        eval_batches=2,
        # one run per preset, trained in this process (fields of newer Tier versions, where present)
        **{k: v for k, v in (("extra_seeds", ()), ("variants", ()), ("jobs", 1))
           if k in {f.name for f in dataclasses.fields(tier)}},
    )
    root = tmp_path / "run"
    paths = reproduce(tier=small, out=root, secure=False)

    # -- data: the codeparrot source, both datasets asked for by their hub names --------------
    assert set(codeparrot_hub["asked"]) == {"huggingface-course/codeparrot-ds-train",
                                             "huggingface-course/codeparrot-ds-valid"}
    data_dir = root / "data"
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["source"] == "codeparrot" and meta["source_kind"] == "hf"
    assert [m["role"] for m in meta["manifest"]] == ["train", "val"]
    assert [m["text_field"] for m in meta["manifest"]] == ["content", "content"]
    assert meta["splits"]["train"]["documents"] == len(codeparrot_hub["train"])
    assert meta["splits"]["val"]["documents"] == len(codeparrot_hub["valid"])  # the 'validation'-only dataset
    # The tier asks for GPT-2's 50257; BPE stops once no pair occurs twice, so a tiny corpus gets
    # every merge it affords and the models are sized to the tokenizer actually trained.
    assert meta["tokenizer"]["requested_vocab_size"] == 50257
    tok = load_tokenizer(data_dir)
    assert meta["vocab_size"] == tok.get_vocab_size() and 258 < meta["vocab_size"] < 50257
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 0
    # the shards hold the rows verbatim, in order, each followed by EOT
    data = TokenData(data_dir)
    for split, rows in (("train", codeparrot_hub["train"]), ("val", codeparrot_hub["valid"])):
        ids = np.asarray(getattr(data, split))
        assert int((ids == meta["eot_id"]).sum()) == len(rows)
        first = ids[:int(np.argmax(ids == meta["eot_id"]))]
        assert tok.decode(first.tolist()) == rows[0]["content"]

    # -- runs: each finished its steps with the gpt2-small recipe ------------------------------
    runs = _runs(root)
    assert set(runs) == set(PRESETS)
    recipe = train_recipe("gpt2-small")
    assert TRAIN_RECIPES["gpt2-small"] == {}  # the TrainConfig defaults: the paper's CodeParrot recipe
    for preset, dirs in runs.items():
        for run in dirs:
            status = json.loads((run / "status.json").read_text())
            assert status["status"] == "finished" and status["step"] == STEPS, (preset, status)
            cfg = json.loads((run / "config.json").read_text())
            tr = cfg["train"]
            assert cfg["size"] == "gpt2-small" and cfg["data"]["source"] == "codeparrot"
            assert tr["max_steps"] == STEPS and tr["batch_size"] == 4 and tr["micro_batch_size"] == 2
            assert cfg["grad_accum"] == 2 and cfg["device"] == "cpu"
            for key in ("lr", "min_lr", "schedule", "warmup", "weight_decay", "beta1", "beta2", "eps",
                        "grad_clip", "dtype", "compile", "reg_lambda", "reg_gamma", "reg_mode", "reg_reduction"):
                assert tr[key] == getattr(recipe, key), (preset, key)
            assert (tr["lr"], tr["schedule"], tr["warmup"], tr["weight_decay"]) == (1e-3, "linear", 0.05, 0.1)
            assert (tr["beta2"], tr["dtype"], tr["compile"]) == (0.999, "auto", False)
            m = cfg["model"]
            assert (m["n_layer"], m["n_head"], m["n_embd"], m["block_size"]) == (2, 2, 64, 128)
            assert m["vocab_size"] == meta["vocab_size"]
            for k, v in ARCH_PRESETS[preset].items():
                assert m[k] == v, (preset, k)
            assert m["temperature_init"] == 1e-2  # the CodeParrot value

            # the logged learning rates are the recipe's schedule (5% of 4 steps rounds to 0 warm-up)
            tcfg = TrainConfig.from_dict(tr)
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in lines if "lr" in r and r.get("event") is None]
            assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
            for r in steps:
                assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, tcfg))
                assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
            assert [r["lr"] for r in steps] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])

            ev = json.loads((run / "eval.json").read_text())
            assert math.isfinite(ev["ppl"]) and 1.0 < ev["ppl"] < 2 * meta["vocab_size"], (preset, ev)
            windows = len(data.val_windows(128))  # eval_batches=2 batches of 16 windows of T=128, at most
            assert ev["val_tokens"] == min(2 * 16, windows) * 128 > 0
            ent = json.loads((run / "entropy.json").read_text())
            assert ent and all(math.isfinite(b) for b in ent["bands_max"])
            assert (run / "pi_cost.json").is_file() and (run / "pi_cost_gpt2.json").is_file()

    ereg = [json.loads((d / "config.json").read_text()) for d in runs["EReg(SM(t)+ScFuFFN)"]]
    assert all(c["model"]["entropy_reg"] and c["train"]["reg_lambda"] == 1e-5 for c in ereg)
    assert all(c["train"]["reg_gamma"] == 0.2 and c["train"]["reg_mode"] == "query" for c in ereg)
    for d in runs["EReg(SM(t)+ScFuFFN)"]:
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        regs = [r["reg"] for r in lines if r.get("reg") is not None]
        assert len(regs) == STEPS and all(math.isfinite(v) and v >= 0 for v in regs)
        assert any("reg_grad_ratio" in r for r in lines)

    # -- the report --------------------------------------------------------------------------
    for key in ("md", "html", "results"):
        assert Path(paths[key]).is_file()
    assert (root / "report.md").is_file() and (root / "results.json").is_file()
    results = json.loads((root / "results.json").read_text())
    assert {r["preset"] for r in results["runs"]} >= set(PRESETS)
    assert results["data"]["source"] == "codeparrot"
    md = (root / "report.md").read_text()
    for preset in PRESETS:
        assert f"`{preset}`" in md
    manifest = json.loads((root / "reproduce.json").read_text())
    assert manifest["tier"]["name"] == "gpt2" and manifest["tier"]["size"] == "gpt2-small"


def test_single_split_dataset_resolves_to_that_split(tmp_path):
    """CodeParrot's validation dataset has one split, named 'validation' (not 'train')."""
    from piformer.data.sources import load_hf

    saved = tmp_path / "valid"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"content": ["a", "b"]})}).save_to_disk(str(saved))
    assert load_hf(str(saved))["content"] == ["a", "b"]
    two = tmp_path / "two"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"content": ["a"]}),
                          "test": datasets.Dataset.from_dict({"content": ["b"]})}).save_to_disk(str(two))
    with pytest.raises(ValueError, match="several splits"):
        load_hf(str(two))
    assert load_hf(str(two), "test")["content"] == ["b"]


# -------------------------------------------------------------------------------------------
# The Languini recipe


def _book(rng: random.Random, i: int, n_sentences: int) -> str:
    people = ["Anna", "the captain", "Mr. Hale", "her brother", "the old woman", "Thomas", "the doctor"]
    verbs = ["walked to", "looked at", "spoke of", "remembered", "waited by", "returned to", "thought of"]
    things = ["the harbour", "the letter", "the garden", "the long road", "the house on the hill",
              "the winter", "the river", "the little church", "the ship"]
    out = [f"CHAPTER {i}\n\n"]
    for s in range(n_sentences):
        out.append(f"{rng.choice(people).capitalize()} {rng.choice(verbs)} {rng.choice(things)}, "
                   f"and {rng.choice(people)} {rng.choice(verbs)} {rng.choice(things)}.")
        out.append("\n\n" if s % 5 == 4 else " ")
    return "".join(out)


def test_languini_recipe_end_to_end(tmp_path):
    from piformer.data import TokenData
    from piformer.data.prepare import prepare
    from piformer.train import lr_at, train

    # the recipe itself (SPEC section 4)
    size = SIZE_PRESETS["languini"]
    assert (size["n_layer"], size["n_head"], size["n_embd"], size["block_size"]) == (12, 12, 768, 512)
    assert size["temperature_init"] == 1e-1
    rec = TRAIN_RECIPES["languini"]
    assert (rec["lr"], rec["min_lr"], rec["schedule"], rec["warmup"]) == (6e-4, 6e-6, "cosine", 200)
    assert (rec["batch_size"], rec["beta2"], rec["reg_lambda"]) == (128, 0.95, 5e-5)
    assert rec["batch_size"] * size["block_size"] * rec["max_steps"] == pytest.approx(1.2e9, rel=1e-3)

    books = tmp_path / "books"
    books.mkdir()
    rng = random.Random(1)
    for i in range(8):
        (books / f"book_{i:02d}.txt").write_text(_book(rng, i, 60))
    data_dir = tmp_path / "data"
    meta = prepare(source=str(books), out_dir=data_dir, vocab_size=384, progress=False)
    assert meta["source_kind"] == "files" and meta["vocab_size"] <= 384
    assert min(meta["splits"][s]["tokens"] for s in ("train", "val")) > 512  # T=512 windows fit

    # Everything the recipe sets is kept but the length and batch (and a 1-step warm-up, so that
    # the cosine decay is visible within 4 steps: with 3 its only decayed point is the midpoint,
    # where cosine and linear agree).
    model_cfg = ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", size="languini", n_layer=1, n_head=2, n_embd=32,
                                        vocab_size=meta["vocab_size"])
    assert model_cfg.block_size == 512 and model_cfg.temperature_init == 1e-1
    train_cfg = train_recipe("languini", max_steps=STEPS, batch_size=2, micro_batch_size=2, warmup=1,
                             eval_interval=STEPS, eval_batches=1, log_interval=1, checkpoint_interval=STEPS)
    assert (train_cfg.lr, train_cfg.min_lr, train_cfg.schedule, train_cfg.beta2, train_cfg.reg_lambda) == (
        6e-4, 6e-6, "cosine", 0.95, 5e-5)
    out = tmp_path / "run"
    result = train(model_cfg, train_cfg, data_dir, out, preset="EReg(SM(t)+ScFuFFN)", size="languini",
                   progress=False)
    assert result["status"] == "finished" and result["step"] == STEPS
    assert math.isfinite(result["val_loss"]) and math.isfinite(result["val_ppl"])
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == STEPS

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["size"] == "languini" and cfg["model"]["block_size"] == 512
    assert cfg["model"]["temperature_init"] == 1e-1 and cfg["model"]["entropy_reg"]
    for key in ("lr", "min_lr", "schedule", "beta1", "beta2", "reg_lambda", "weight_decay"):
        assert cfg["train"][key] == getattr(train_cfg, key)

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "lr" in r and r.get("event") is None]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    lrs = [r["lr"] for r in steps]
    assert lrs == pytest.approx([lr_at(s, train_cfg) for s in range(STEPS)])
    cosine = [6e-6 + 0.5 * (1 + math.cos(math.pi * p)) * (6e-4 - 6e-6) for p in (0, 1 / 3, 2 / 3)]
    assert lrs == pytest.approx([6e-4, *cosine])
    linear = dataclasses.replace(train_cfg, schedule="linear")
    assert lrs[2] != pytest.approx(lr_at(2, linear))  # it is the cosine schedule, not the linear one
    assert all(r["reg"] is not None and math.isfinite(r["reg"]) for r in steps)
    assert all(np.shape(r["head_entropy"]) == (1, 2) for r in steps)
    assert any(r.get("event") == "eval" and math.isfinite(r["val_loss"]) for r in lines)
    assert TokenData(data_dir).vocab_size == cfg["model"]["vocab_size"]
