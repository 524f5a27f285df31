"""The HF path: a transformers GPT-2 model directory analysed through eager attention outputs."""

import json
import sys

import numpy as np
import pytest
import torch

from piformer.analysis import analyse_hf, analyse_paths, is_hf_model_dir, val_batches
from piformer.cli import main

try:
    import transformers
except ImportError:  # optional dependency: the tests that need it skip, the error path still runs
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not installed (pip install transformers)")

V = 100


def _data(root, n_val=3000):
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 2000), ("val", n_val)):
        rng.integers(0, V, n).astype("<u2").tofile(d / f"{split}.bin")
    (d / "meta.json").write_text(json.dumps({
        "vocab_size": V, "eot_id": 0, "dtype": "uint16",
        "splits": {"train": {"tokens": 2000}, "val": {"tokens": n_val}},
    }))
    return d


def test_missing_transformers_is_a_clear_error(tmp_path, monkeypatch, capsys):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert is_hf_model_dir(d)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ValueError, match="pip install transformers"):
        analyse_hf(d, _data(tmp_path))
    assert main(["entropy", str(d), "--data", str(tmp_path / "data")]) == 2
    assert "optional package 'transformers'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=64, vocab_size=V,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharpen attention so heads differ from uniform
        for block in model.transformer.h:
            block.attn.c_attn.weight.normal_(0, 0.3)
    d = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(d)
    return d


def _direct_entropy(model_dir, batches):
    """Eq. 7 written out from the attentions, independently of piformer.entropy."""
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    total, n = None, 0
    with torch.no_grad():
        for idx in batches:
            att = model(idx, output_attentions=True).attentions  # L x (B, H, T, T)
            p = torch.stack(att).double()  # (L, B, H, T, T)
            plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
            e = (-plogp.sum(-1)).mean(-1).sum(1)  # (L, H): sum over batch of row-averaged entropies
            total = e if total is None else total + e
            n += idx.shape[0]
    return (total / n).numpy()


@needs_transformers
def test_hf_entropies_match_a_direct_computation_from_attentions(gpt2_dir, tmp_path):
    data = _data(tmp_path)
    assert is_hf_model_dir(gpt2_dir)
    r = analyse_hf(gpt2_dir, data, batches=3, batch_size=3, seq_len=48)
    assert r.kind == "hf" and r.preset == "gpt2" and r.seq_len == 48 and r.n_sequences == 9
    assert r.head_entropy.shape == (3, 4)
    expected = _direct_entropy(gpt2_dir, list(val_batches(data, 48, 3, 3)))
    np.testing.assert_allclose(r.head_entropy, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(r.head_entropy) > 0.05  # heads really differ: the check is not vacuous
    assert len(r.bands_max) == 4 and r.diagnosis is not None


@needs_transformers
def test_hf_default_context_is_capped_by_the_model(gpt2_dir, tmp_path):
    r = analyse_hf(gpt2_dir, _data(tmp_path), batches=1, batch_size=2)
    assert r.seq_len == 64  # min(128, n_positions=64)
    with pytest.raises(ValueError, match="outside"):
        analyse_hf(gpt2_dir, tmp_path / "data", seq_len=65)
    with pytest.raises(ValueError, match="exactly one of --data"):
        analyse_hf(gpt2_dir)


@needs_transformers
def test_hf_text_file_uses_the_model_directorys_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(V - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=V,
                                  bos_token_id=0, eos_token_id=0)
    d = tmp_path / "model"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(d)
    text = tmp_path / "val.txt"
    rng = np.random.default_rng(0)
    text.write_text(" ".join(rng.choice(words, 500)))
    r = analyse_hf(d, text=text, batches=2, batch_size=4, seq_len=32)
    assert r.n_sequences == 8 and r.data == str(text) and r.head_entropy.shape == (2, 2)


@needs_transformers
def test_cli_compares_a_hf_model_with_a_piformer_run(gpt2_dir, tmp_path, capsys):
    from piformer.checkpoint import save_checkpoint
    from piformer.config import ModelConfig
    from piformer.model import PiGPT

    data = _data(tmp_path)
    cfg = ModelConfig.from_preset("SM+LN+G", size="tiny", vocab_size=V, block_size=48)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best", PiGPT(cfg))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"preset": "SM+LN+G", "data": {"dir": str(data)}}))
    rs = analyse_paths([gpt2_dir, tmp_path / "run"], data, batches=1, batch_size=2, seq_len=48)
    assert [r.kind for r in rs] == ["hf", "piformer"]
    out = tmp_path / "figs"
    code = main(["entropy", str(gpt2_dir), str(tmp_path / "run"), "--data", str(data), "--seq-len", "48",
                 "--batches", "1", "--out", str(out), "--formats", "png", "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "== tiny-gpt2" in text and "== SM+LN+G" in text and "Comparison" in text
    assert (out / "entropy_heatmap.png").is_file()
