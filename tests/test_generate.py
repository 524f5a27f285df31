"""Sampling: greedy at temperature 0, top-k restricts the draw, seeds repeat, the CLI uses the run's tokenizer."""

from __future__ import annotations

import pytest
import torch

from piformer.checkpoint import load_model
from piformer.cli import main
from piformer.config import ModelConfig
from piformer.data.tokenizer import EOT, load_tokenizer
from piformer.generate import generate_text, sample
from piformer.model import PiGPT
from tiny_runs import prepared_data, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return tiny_run(root, prepared_data(root), "SM+LN+G", steps=6)


def _model(scale: float = 50.0) -> PiGPT:
    torch.manual_seed(0)
    model = PiGPT(ModelConfig.from_preset("SM+ScFuFFN", "tiny"))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(scale)  # > 1: peaked next-token distributions
    return model.eval()


def test_temperature_zero_is_greedy_and_slides_the_context():
    model = _model()
    idx = torch.tensor([[1, 2, 3]])
    out = sample(model, idx, 20, temperature=0)  # 23 tokens > block_size 16: the context slides
    ref = idx
    for _ in range(20):
        with torch.no_grad():
            nxt = model(ref[:, -16:]).logits[:, -1].argmax(-1, keepdim=True)
        ref = torch.cat([ref, nxt], 1)
    assert out.tolist() == ref.tolist()
    assert sample(model, idx, 20, temperature=1.0, top_k=1).tolist() == ref.tolist()  # top-1 is greedy too


def test_top_k_draws_only_among_the_k_most_likely():
    model = _model(scale=1.0)  # nearly flat: without top-k, 400 draws spread over many tokens
    idx = torch.tensor([[4, 5, 6]]).repeat(400, 1)
    with torch.no_grad():
        top3 = set(model(idx[:1]).logits[0, -1].topk(3).indices.tolist())
    drawn = sample(model, idx, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(0))[:, -1]
    assert set(drawn.tolist()) == top3  # all three appear in 400 hot draws, and nothing else
    wide = sample(model, idx, 1, temperature=2.0, generator=torch.Generator().manual_seed(0))[:, -1]
    assert len(set(wide.tolist())) > 3


def test_seed_repeats_and_stop_token_ends_rows():
    model = _model(scale=1.0)
    idx = torch.tensor([[7, 8]]).repeat(3, 1)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a, b, c = (sample(model, idx, 12, generator=g(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    stop = int(a[0, 2])  # the first token row 0 drew: row 0 stops at once
    out = sample(model, idx, 12, generator=g(1), stop_id=stop)
    assert (out[0, 3:] == stop).all()  # a finished row is padded with the stop token
    for row in out.tolist():
        assert stop in row[2:] or len(row) == 14


def test_generate_text_and_cli_use_the_run_tokenizer(run, capsys):
    tok = load_tokenizer(run.parent / "data" / "tokenizer.json")
    texts = generate_text(run, "def f(x):", max_new_tokens=10, seed=3, num_samples=2, device="cpu")
    assert len(texts) == 2 and all(t.startswith("def f(x):") for t in texts)
    model = load_model(run)
    ids = tok.encode("def f(x):", add_special_tokens=False).ids
    out = sample(model, torch.tensor([ids] * 2), 10, generator=torch.Generator().manual_seed(3),
                 stop_id=tok.token_to_id(EOT))
    expected = []
    for row in out.tolist():
        new = row[len(ids):]
        new = new[: new.index(tok.token_to_id(EOT))] if tok.token_to_id(EOT) in new else new
        expected.append("def f(x):" + tok.decode(new, skip_special_tokens=False))
    assert texts == expected
    assert main(["generate", str(run), "--prompt", "def f(x):", "--max-new-tokens", "10", "--seed", "3",
                 "--num-samples", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert texts[0] in printed and texts[1] in printed and "--- sample 2/2" in printed
    assert main(["generate", str(run), "--temperature", "0", "--max-new-tokens", "5", "--checkpoint", "last"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", str(run), "--temperature", "0", "--max-new-tokens", "5", "--checkpoint", "last",
                 "--seed", "99"]) == 0
    assert capsys.readouterr().out == greedy  # greedy ignores the seed


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-k", "0"], "--top-k must be a positive integer"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--num-samples", "0"], "--num-samples must be a positive integer"),
])
def test_bad_sampling_arguments_are_one_line_errors(run, args, message, capsys):
    assert main(["generate", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bare_checkpoint_needs_a_tokenizer(run, tmp_path, capsys):
    import shutil

    bare = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "best", bare)
    assert main(["generate", str(bare), "--max-new-tokens", "3"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert main(["generate", str(bare), "--max-new-tokens", "3", "--tokenizer", str(run.parent / "data")]) == 0
