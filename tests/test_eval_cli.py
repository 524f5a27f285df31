"""`piformer eval`: runs, checkpoints and HF directories on data directories, text files and globs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from piformer.checkpoint import load_model
from piformer.cli import main
from piformer.data import TokenData
from piformer.data.tokenizer import EOT, load_tokenizer
from piformer.evaluate import MIN_TOKENS, evaluate, text_windows
from piformer.train import evaluate as training_eval
from piformer.train import evaluate_run
from tiny_runs import prepared_data, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    return tiny_run(root, prepared_data(root), "SM(t)+ScFuFFN", steps=6)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "a.txt").write_text("import os\n\ndef main():\n    return os.getcwd()\n" * 40)
    (d / "b.txt").write_text("class Foo:\n    x = 1\n" * 30)
    (d / "short.txt").write_text("x = 1\n")
    return d


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def _manual_text_loss(run, files) -> tuple[float, int]:
    """CE of every token of the files, each preceded by EOT, in windows of block_size: written out."""
    tok = load_tokenizer(run.parent / "data" / "tokenizer.json")
    model = load_model(run)
    ids = []
    for f in files:
        ids += [tok.token_to_id(EOT)] + tok.encode(f.read_text(), add_special_tokens=False).ids
    T, losses = model.config.block_size, []
    for s in range(0, len(ids) - 1, T):
        x = torch.tensor(ids[s: min(s + T, len(ids) - 1)])[None]
        y = torch.tensor(ids[s + 1: s + 1 + x.shape[1]])[None]
        with torch.no_grad():
            losses.append(torch.nn.functional.cross_entropy(model(x).logits[0], y[0], reduction="none"))
    ce = torch.cat(losses)
    return ce.double().mean().item(), ce.numel()


def test_run_on_its_data_matches_the_training_evaluation(run, capsys):
    data = TokenData(run.parent / "data")
    want = training_eval(load_model(run), data, batch_size=4)
    assert main(["eval", str(run), "--json", "--batch-size", "4", "--device", "cpu"]) == 0
    r = _json(capsys)
    assert r["loss"] == pytest.approx(want["val_loss"], abs=1e-6) and r["tokens"] == want["val_tokens"]
    assert r["val_loss"] == r["loss"] and r["ppl"] == pytest.approx(math.exp(r["loss"]))
    assert r["val_tokens"] == r["tokens"] and r["checkpoint"].endswith("best") and r["data_dir"] == r["data"]
    assert r["data_kind"] == "data" and r["step"] == 6 and r["warning"] is None and r["loss_stderr"] > 0
    # The library entry point reproduce() uses keeps its keys.
    ev = evaluate_run(run, batch_size=4)
    assert ev["val_loss"] == pytest.approx(want["val_loss"], abs=1e-6) and ev["val_tokens"] == want["val_tokens"]
    assert set(ev) >= {"val_loss", "ppl", "val_tokens", "checkpoint", "step", "data_dir"}


def test_text_file_and_glob_with_the_run_tokenizer(run, texts, capsys):
    assert main(["eval", str(run), "--data", str(texts / "a.txt"), "--json"]) == 0
    r = _json(capsys)
    loss, n = _manual_text_loss(run, [texts / "a.txt"])
    assert r["data_kind"] == "text" and r["tokens"] == n and r["loss"] == pytest.approx(loss, abs=1e-5)
    assert main(["eval", str(run), "--data", str(texts / "[ab].txt"), "--json"]) == 0
    r = _json(capsys)
    loss, n = _manual_text_loss(run, [texts / "a.txt", texts / "b.txt"])
    assert r["tokens"] == n and r["loss"] == pytest.approx(loss, abs=1e-5) and "2 files" in r["data"]
    assert main(["eval", str(run), "--data", str(texts / "a.txt"), "--batches", "1", "--batch-size", "2", "--json"]) == 0
    assert _json(capsys)["tokens"] == 2 * load_model(run).config.block_size


def test_short_text_warns_and_long_text_does_not(run, texts, capsys):
    assert main(["eval", str(run), "--data", str(texts / "short.txt")]) == 0
    cap = capsys.readouterr()
    assert "loss" in cap.out and "ppl" in cap.out
    assert "warning" in cap.err and "says little" in cap.err and f"fewer than {MIN_TOKENS}" in cap.err
    r = evaluate(run, texts / "a.txt")
    assert r["tokens"] >= MIN_TOKENS and r["warning"] is None


def test_hf_export_scores_like_the_run(run, texts, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["export-hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "hf"), "--data", str(texts / "a.txt"), "--json"]) == 0
    hf = _json(capsys)
    ours = evaluate(run, texts / "a.txt")
    assert hf["kind"] == "hf" and hf["tokens"] == ours["tokens"]  # the exported tokenizer is the run's
    assert hf["loss"] == pytest.approx(ours["loss"], abs=1e-5)
    # A data directory tokenized with another tokenizer is refused, not scored.
    other = tmp_path / "other"
    from piformer.data import prepare

    prepare(str(texts / "*.txt"), other, vocab_size=280, val_fraction=0.5, progress=False)
    assert main(["eval", str(tmp_path / "hf"), "--data", str(other)]) == 2
    assert "different tokenizer" in capsys.readouterr().err


def test_checkpoint_flag_and_deprecated_which(run, capsys):
    assert main(["eval", str(run), "--checkpoint", "last", "--json"]) == 0
    a = _json(capsys)
    assert main(["eval", str(run), "--which", "last", "--json"]) == 0
    assert _json(capsys) == a and a["model"].endswith("last")
    assert "--which" not in capsys.readouterr().out
    main_help = pytest.raises(SystemExit, main, ["eval", "--help"])
    assert main_help.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--which" not in out


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--batches", "-1"], "--batches must be a positive integer, got -1"),
    (["--batches", "0"], "--batches must be a positive integer, got 0"),
    (["--device", "tpu9"], "--device 'tpu9'"),
    (["--data", "no/such/*.txt"], "no data directory, file or glob match"),
])
def test_bad_input_is_one_line(run, args, message, capsys):
    assert main(["eval", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_a_cpu_only_torch_is_one_line(run, capsys):
    assert main(["eval", str(run), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "use --device cpu" in err and err.count("\n") == 1


def test_directory_without_meta_is_explained(run, texts, capsys):
    assert main(["eval", str(run), "--data", str(texts)]) == 2
    assert "not a prepared data directory" in capsys.readouterr().err


def test_text_windows_score_every_token_once():
    ids = list(range(23))
    batches = text_windows(ids, context=5, batch_size=3)
    xs = torch.cat([x.flatten() for x, _ in batches]).tolist()
    ys = torch.cat([y.flatten() for _, y in batches]).tolist()
    assert xs == ids[:-1] and ys == ids[1:]
    assert [tuple(x.shape) for x, _ in batches] == [(3, 5), (1, 5), (1, 2)]
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        text_windows([5], 4, 2)
