"""Every bad input is one line on stderr, exit 2, no traceback, and nothing on disk changes.

One table: the command line, the files it is pointed at, the words the message must contain.
Runs in-process through `piformer.cli.main`, as the console script does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from piformer.cli import main
from piformer.config import ModelConfig, train_recipe
from piformer.data import prepare
from piformer.train import train


def _tree(root: Path) -> dict[str, str]:
    """Every file under root and the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data directory, a finished tiny run, and broken copies of both."""
    w = tmp_path_factory.mktemp("bad_input")
    data = w / "data"
    prepare("builtin", data, vocab_size=300, max_files=20, progress=False)
    run = w / "run"
    train(ModelConfig.from_preset("SM+LN+G", "tiny"),
          train_recipe("tiny", max_steps=4, batch_size=4, micro_batch_size=4, eval_interval=2, eval_batches=1,
                       log_interval=2, checkpoint_interval=2),
          data, run, progress=False)

    def data_copy(name, damage):
        d = w / name
        shutil.copytree(data, d)
        damage(d)
        return d

    data_copy("empty_meta", lambda d: (d / "meta.json").write_text(""))
    data_copy("meta_without_splits", lambda d: (d / "meta.json").write_text(json.dumps({"vocab_size": 300})))
    data_copy("missing_shard", lambda d: (d / "val.bin").unlink())
    data_copy("truncated_shard", lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:1000]))

    def flip(d):  # same size, two bytes changed: only the hash can tell
        b = bytearray((d / "train.bin").read_bytes())
        b[5000:5002] = bytes([b[5000] ^ 1, b[5001] ^ 1])
        (d / "train.bin").write_bytes(bytes(b))

    data_copy("flipped_shard", flip)
    tiny = w / "ten_bytes"
    tiny.mkdir()
    (tiny / "a.py").write_text("hello")
    (tiny / "b.py").write_text("world")
    prepare(str(tiny), w / "ten_byte_data", progress=False)
    single = w / "single.txt"
    single.write_text("just one file")

    def run_copy(name, damage):
        r = w / name
        shutil.copytree(run, r)
        damage(r / "checkpoints" / "best")
        return r

    run_copy("torn_weights", lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:999]))
    run_copy("garbage_weights", lambda c: (c / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(3000)))
    run_copy("torn_config", lambda c: (c / "config.json").write_text('{"n_layer": 2,'))

    def wider(c):
        cfg = json.loads((c / "config.json").read_text())
        cfg["n_embd"] = 64
        (c / "config.json").write_text(json.dumps(cfg))

    run_copy("shape_mismatch", wider)

    # A run whose checkpoints/last holds another architecture than its config.json names.
    other = w / "other"
    train(ModelConfig.from_preset("SM+ScFuFFN", "tiny"),
          train_recipe("tiny", max_steps=2, batch_size=4, micro_batch_size=4, eval_interval=2, eval_batches=1,
                       log_interval=2, checkpoint_interval=2),
          data, other, progress=False)
    mixed = w / "mixed"
    shutil.copytree(run, mixed)
    shutil.rmtree(mixed / "checkpoints" / "last")
    shutil.copytree(other / "checkpoints" / "last", mixed / "checkpoints" / "last")
    return w


TRAIN = ["train", "--size", "tiny", "--data", "{w}/data", "--out", "{w}/new", "--quiet"]

CASES = [
    # name, argv, words the one-line message contains
    ("checkpoint interval 0", TRAIN + ["--set", "train.checkpoint_interval=0"], ["checkpoint_interval", "> 0"]),
    ("eval interval 0", TRAIN + ["--set", "train.eval_interval=0"], ["eval_interval", "> 0"]),
    ("log interval 0", TRAIN + ["--set", "train.log_interval=0"], ["log_interval", "> 0"]),
    ("eval batches 0", TRAIN + ["--set", "train.eval_batches=0"], ["eval_batches", "> 0"]),
    ("batch size 0", TRAIN + ["--set", "train.batch_size=0"], ["batch_size", "> 0"]),
    ("negative micro batch", TRAIN + ["--set", "train.micro_batch_size=-2"], ["micro_batch_size", "> 0"]),
    ("negative max steps", TRAIN + ["--set", "train.max_steps=-1"], ["max_steps", "> 0"]),
    ("negative reg interval", TRAIN + ["--set", "train.reg_grad_interval=-1"], ["reg_grad_interval", ">= 0"]),
    ("lr 0", TRAIN + ["--set", "train.lr=0"], ["lr", "> 0"]),
    ("lr nan", TRAIN + ["--set", "train.lr=nan"], ["lr", "finite"]),
    ("beta2 1.5", TRAIN + ["--set", "train.beta2=1.5"], ["beta2", "[0, 1)"]),
    ("negative grad clip", TRAIN + ["--set", "train.grad_clip=-1"], ["grad_clip", ">= 0"]),
    ("device nope", TRAIN + ["--set", "train.device=tpu"], ["device", "cpu"]),
    ("zero layers", TRAIN + ["--set", "model.n_layer=0"], ["n_layer", "positive"]),
    ("negative width", TRAIN + ["--set", "model.n_embd=-8"], ["n_embd"]),
    ("wrong type float", TRAIN + ["--set", "train.lr=abc"], ["TrainConfig.lr", "float"]),
    ("wrong type int", TRAIN + ["--set", "train.max_steps=1.5"], ["max_steps", "int"]),
    ("unknown key", TRAIN + ["--set", "train.nope=1"], ["nope", "valid train fields"]),
    ("no equals sign", TRAIN + ["--set", "train.lr"], ["KEY=VALUE"]),
    ("unknown preset", TRAIN + ["--preset", "NOPE"], ["NOPE", "valid presets"]),
    ("unknown size", TRAIN + ["--size", "huge"], ["huge", "tiny"]),
    ("vocab from data", TRAIN + ["--set", "model.vocab_size=50"], ["vocab_size", "meta.json"]),
    ("no data dir", ["train", "--size", "tiny", "--data", "{w}/absent", "--out", "{w}/new"], ["absent", "data prepare"]),
    ("empty meta.json", ["train", "--size", "tiny", "--data", "{w}/empty_meta", "--out", "{w}/new"],
     ["meta.json", "not valid JSON"]),
    ("meta.json without splits", ["train", "--size", "tiny", "--data", "{w}/meta_without_splits", "--out", "{w}/new"],
     ["meta.json", "malformed"]),
    ("missing shard", ["train", "--size", "tiny", "--data", "{w}/missing_shard", "--out", "{w}/new"],
     ["val.bin", "missing"]),
    ("truncated shard", ["train", "--size", "tiny", "--data", "{w}/truncated_shard", "--out", "{w}/new"],
     ["train.bin", "1000 bytes"]),
    ("corrupted shard", ["train", "--size", "tiny", "--data", "{w}/flipped_shard", "--out", "{w}/new"],
     ["train.bin", "corrupted", "sha256"]),
    ("corrupted shard, data verify", ["data", "verify", "{w}/flipped_shard"], ["train.bin", "corrupted"]),
    ("10-byte corpus", ["train", "--size", "tiny", "--data", "{w}/ten_byte_data", "--out", "{w}/new"],
     ["too long", "tokens"]),
    ("single-file corpus", ["data", "prepare", "--source", "{w}/single.txt", "--out", "{w}/new", "--quiet"],
     ["single file", "directory"]),
    ("vocabulary 0", ["data", "prepare", "--out", "{w}/new", "--vocab-size", "0", "--quiet"], ["vocab_size", ">="]),
    ("max files 0", ["data", "prepare", "--out", "{w}/new", "--max-files", "0", "--quiet"], ["max_files", ">="]),
    ("val fraction 2", ["data", "prepare", "--out", "{w}/new", "--val-fraction", "2", "--quiet"], ["val_fraction"]),
    ("resume another architecture", ["train", "--out", "{w}/mixed", "--resume", "--quiet", "--set", "train.max_steps=6"],
     ["different model", "norm"]),
    ("resume nothing", ["train", "--out", "{w}/absent", "--resume", "--quiet"], ["no run", "without --resume"]),
    ("fresh start over a run", TRAIN[:-3] + ["--out", "{w}/run", "--quiet"], ["already holds a run", "--resume"]),
    ("eval batch size 0", ["eval", "{w}/run", "--batch-size", "0"], ["batch"]),
    ("eval batches -1", ["eval", "{w}/run", "--batches", "-1"], ["batches"]),
    ("eval batches 0", ["eval", "{w}/run", "--batches", "0"], ["batches"]),
    ("eval no such run", ["eval", "{w}/absent"], ["no checkpoint", "absent"]),
    ("eval torn weights", ["eval", "{w}/torn_weights"], ["corrupt checkpoint", "model.safetensors"]),
    ("eval garbage weights", ["eval", "{w}/garbage_weights"], ["corrupt checkpoint", "model.safetensors"]),
    ("eval torn config", ["eval", "{w}/torn_config"], ["corrupt checkpoint", "config.json"]),
    ("eval shapes disagree with config", ["eval", "{w}/shape_mismatch"], ["does not match its config.json", "size mismatch"]),
    ("entropy batches 0", ["entropy", "{w}/run", "--batches", "0"], ["--batches", ">= 1"]),
    ("pi-cost T 0", ["pi-cost", "--preset", "SM+LN+G", "--seq-len", "0"], ["--seq-len", ">= 1"]),
    ("pi-cost T -4", ["pi-cost", "--preset", "SM+LN+G", "--seq-len", "-4"], ["--seq-len", ">= 1"]),
    ("pi-cost unknown preset", ["pi-cost", "--preset", "NOPE"], ["NOPE", "valid presets"]),
    ("pi-cost neither run nor preset", ["pi-cost"], ["run directory or --preset"]),
    ("pi-run T 0", ["pi-run", "{w}/run", "--seq-len", "0"], ["--seq-len", ">= 1"]),
    ("reproduce unknown tier", ["reproduce", "--tier", "nope", "--out", "{w}/new"], ["--tier", "quick"]),
    ("report of nothing", ["report", "{w}/absent"], ["no study", "reproduce"]),
]
if not torch.cuda.is_available():
    CASES.append(("eval on cuda without cuda", ["eval", "{w}/run", "--device", "cuda"], ["cuda", "cpu"]))


@pytest.mark.parametrize("name,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, capsys, name, argv, words):
    before = _tree(world)
    try:
        rc = main([a.format(w=world) for a in argv])
    except SystemExit as exit_:  # argparse refuses a flag's value itself (usage line + error line)
        rc = exit_.code
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert rc == 2, f"{name}: exit {rc}, stderr:\n{err}"
    assert "Traceback" not in err
    assert last.startswith("piformer"), err  # argparse adds a usage line before; ours is the one line
    for word in words:
        assert word.lower() in last.lower(), f"{name}: {word!r} not in {last!r}"
    assert _tree(world) == before, f"{name}: files changed on disk"
    assert not (world / "new").exists()
