"""Hugging Face interop: every preset exported and loaded back with AutoModelForCausalLM gives
piformer's logits; the Pre-LN presets are plain GPT2LMHeadModels; generate(), attentions,
loglikelihood scoring and AutoTokenizer work; and training can start from a GPT-2 checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import piformer.hf  # noqa: E402,F401  (registers PiformerForCausalLM with the Auto classes)
from piformer.checkpoint import save_checkpoint  # noqa: E402
from piformer.cli import main  # noqa: E402
from piformer.config import ARCH_PRESETS, ModelConfig  # noqa: E402
from piformer.data.tokenizer import EOT, load_tokenizer  # noqa: E402
from piformer.generate import sample  # noqa: E402
from piformer.hf.export import export_hf, to_hf_model  # noqa: E402
from piformer.hf.gpt2 import gpt2_incompatibilities  # noqa: E402
from piformer.hf.init import init_from_pretrained  # noqa: E402
from piformer.model import PiGPT  # noqa: E402
from tiny_runs import VOCAB, prepared_data, tiny_run  # noqa: E402

PRE_LN = {"SM+LN+G", "SM+LN+R", "SM+LN"}  # LayerNorm + standard FFN: what GPT-2 can express
TEXT = "def add(a, b):\n    return a + b  # piformer\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_data(tmp_path_factory.mktemp("hfdata"))


def _model(preset: str, seed: int = 0, **overrides) -> PiGPT:
    """A tiny model with every parameter moved off its initial value (so biases, gains, alpha/beta
    and per-position temperatures all matter to the logits)."""
    torch.manual_seed(seed)
    model = PiGPT(ModelConfig.from_preset(preset, "tiny", vocab_size=VOCAB, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for block in model.transformer.h:
            if block.attn.temperature is not None:
                block.attn.set_temperature(0.2 + torch.rand(model.config.n_head, model.config.block_size))
        # Spectral norm's singular vectors follow the moved weights only through power iterations,
        # one per training-mode forward: without them sigma is misestimated and attention saturates.
        for _ in range(20 if model.config.spectral_norm else 0):
            model(torch.zeros(1, 1, dtype=torch.long))
    return model.eval()


def _export(model: PiGPT, root, data, name="m", **kw):
    ckpt = save_checkpoint(root / f"ckpt-{name}", model)
    return export_hf(ckpt, root / f"hf-{name}", tokenizer=data / "tokenizer.json", **kw)


@pytest.mark.parametrize("preset", list(ARCH_PRESETS))
def test_every_preset_loads_back_with_piformers_logits(preset, tmp_path, data):
    model = _model(preset)
    r = _export(model, tmp_path, data)
    assert r.format == ("gpt2" if preset in PRE_LN else "piformer")
    hf = transformers.AutoModelForCausalLM.from_pretrained(r.out).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if preset in PRE_LN else "PiformerForCausalLM")
    idx = torch.randint(0, VOCAB, (3, model.config.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx).logits, hf(input_ids=idx).logits
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), float((theirs - ours).abs().max())
    assert r.max_abs_diff < 1e-5
    assert r.dropped == ([f"transformer.h.{l}.attn.reg_threshold" for l in range(2)] if "EReg" in preset else [])


def test_gpt2_mapping_covers_exactly_the_pre_ln_presets():
    for name in ARCH_PRESETS:
        assert (not gpt2_incompatibilities(ModelConfig.from_preset(name, "tiny"))) == (name in PRE_LN), name
    # Folded norms and a bias-free model still map onto GPT-2 (the biases become zeros).
    cfg = ModelConfig.from_preset("SM+LN+G", "tiny", weight_norm="qk", spectral_norm="ffn", bias=False, vocab_size=VOCAB)
    assert not gpt2_incompatibilities(cfg)
    torch.manual_seed(0)
    model = PiGPT(cfg).eval()
    hf, fmt, _ = to_hf_model(model)
    idx = torch.randint(0, VOCAB, (2, 16))
    assert fmt == "gpt2" and torch.allclose(hf(input_ids=idx).logits, model(idx).logits, atol=1e-5, rtol=0)


def test_export_refuses_only_what_cannot_be_mapped(tmp_path, data, capsys):
    with pytest.raises(ValueError, match="cannot export as GPT2LMHeadModel: .*fused"):
        to_hf_model(_model("SM+ScFuFFN"), format="gpt2")
    broken = _model("SM+LN+G")
    with torch.no_grad():
        broken.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite weights"):
        to_hf_model(broken)
    ckpt = save_checkpoint(tmp_path / "ck", _model("SM+ScFuFFN"))
    assert main(["export-hf", str(ckpt), "--out", str(tmp_path / "x"), "--format", "gpt2"]) == 2
    assert "use --format piformer" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["export-hf", str(ckpt), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").is_file()


@pytest.mark.parametrize("preset", ["SM+LN+G", "EReg(SM(t)+ScFuFFN)"])
def test_generate_attentions_and_loglikelihood(preset, tmp_path, data):
    model = _model(preset)
    r = _export(model, tmp_path, data)
    hf = transformers.AutoModelForCausalLM.from_pretrained(r.out, attn_implementation="eager").eval()
    eot = load_tokenizer(data / "tokenizer.json").token_to_id(EOT)
    prompt = torch.tensor([[5, 17, 42, 7]])

    # generate(): greedy decoding is deterministic, so it must match piformer's own sampler at t=0.
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    ours = sample(model, prompt, 8, temperature=0, stop_id=eot)
    assert out.tolist() == ours[:, : out.shape[1]].tolist() and out.shape[1] > prompt.shape[1]
    sampled = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=True, top_k=5)
    assert sampled.shape[1] > prompt.shape[1]

    # output_attentions=True: piformer's attention probabilities, per layer (B, H, T, T).
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        att = hf(input_ids=idx, output_attentions=True).attentions
        ref = model(idx, return_attention=True).attentions
    assert len(att) == model.config.n_layer and att[0].shape == (2, model.config.n_head, 12, 12)
    for a, b in zip(att, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)

    # lm-eval style scoring: a right-padded batch with attention_mask and -100 labels gives the
    # mean CE of the real tokens, and padding does not change their logits.
    long, short = idx[0], idx[1, :7]
    batch = torch.stack([long, torch.cat([short, torch.full((5,), eot)])])
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    labels = batch.masked_fill(mask == 0, -100)
    with torch.no_grad():
        o = hf(input_ids=batch, attention_mask=mask, labels=labels)
        lg = model(idx).logits
        lg_short = model(short[None]).logits[0]
    ce = torch.cat([torch.nn.functional.cross_entropy(lg[0, :-1], long[1:], reduction="none"),
                    torch.nn.functional.cross_entropy(lg_short[:-1], short[1:], reduction="none")])
    assert o.loss.item() == pytest.approx(ce.mean().item(), abs=1e-5)
    assert torch.allclose(o.logits[1, :7], lg_short, atol=1e-5, rtol=0)


def test_left_padding_keeps_each_sequence_s_positions(tmp_path, data):
    """The piformer class counts positions from attention_mask, so a left-padded row sees the
    positions (and per-position temperatures) it would see alone."""
    model = _model("SM(t)+ScFuFFN")
    hf = transformers.AutoModelForCausalLM.from_pretrained(_export(model, tmp_path, data).out).eval()
    seq = torch.tensor([[9, 8, 7, 6, 5]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone, left = model(seq).logits, hf(input_ids=padded, attention_mask=mask).logits[:, 3:]
    assert torch.allclose(left, alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="beyond the model's context"):
        hf(input_ids=torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


def test_fresh_process_without_piformer(tmp_path, data):
    """What a transformers user gets: GPT-2 exports load as GPT2LMHeadModel, the others through
    the modeling code shipped beside them (trust_remote_code), with piformer unimportable."""
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    expected = {}
    for preset in ("SM+LN+R", "EReg(SM(t)+ScFuFFN)", "SM+SN(QKVO+FFN)"):
        model = _model(preset)
        r = _export(model, tmp_path, data, name=preset)
        with torch.no_grad():
            expected[str(r.out)] = model(ids).logits.numpy()
    np.save(tmp_path / "ids.npy", ids.numpy())
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["piformer"] = None  # importing piformer now fails
        import numpy as np, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ids = torch.from_numpy(np.load({str(tmp_path / "ids.npy")!r}))
        report = {{}}
        for d in {list(expected)!r}:
            m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
            tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
            with torch.no_grad():
                np.save(d + "/logits.npy", m(input_ids=ids).logits.numpy())
            enc = tok({TEXT!r})["input_ids"]
            report[d] = {{"class": type(m).__name__, "ids": enc, "text": tok.decode(enc)}}
        print(json.dumps(report))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    want_ids = load_tokenizer(data / "tokenizer.json").encode(TEXT, add_special_tokens=False).ids
    for d, logits in expected.items():
        assert report[d]["class"] == ("GPT2LMHeadModel" if d.endswith("SM+LN+R") else "PiformerForCausalLM")
        assert np.abs(np.load(d + "/logits.npy") - logits).max() < 1e-5
        assert report[d]["ids"] == want_ids and report[d]["text"] == TEXT


def test_autotokenizer_round_trip(tmp_path, data):
    r = _export(_model("SM+G"), tmp_path, data)
    tok = transformers.AutoTokenizer.from_pretrained(r.out)
    ours = load_tokenizer(data / "tokenizer.json")
    ids = tok(TEXT)["input_ids"]
    assert ids == ours.encode(TEXT, add_special_tokens=False).ids
    assert tok.decode(ids) == TEXT
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOT and tok.eos_token_id == ours.token_to_id(EOT)
    batch = tok(["a", "abc def"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].tolist()[0].count(0) > 0


def test_export_hf_cli_on_a_run(tmp_path, data, capsys):
    run = tiny_run(tmp_path, data, "SM+WN(QK+FFN)")
    capsys.readouterr()
    assert main(["export-hf", str(run), "--out", str(tmp_path / "hf"), "--checkpoint", "last"]) == 0
    out = capsys.readouterr().out
    assert "PiformerForCausalLM" in out and "tokenizer:" in out
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "modeling_piformer.py", "configuration_piformer.py"} <= files
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "piformer" and cfg["auto_map"]["AutoModelForCausalLM"].endswith("PiformerForCausalLM")
    # The exported model is an ordinary HF model for piformer's own analysis too.
    assert main(["eval", str(tmp_path / "hf"), "--data", str(data), "--json"]) == 0
    hf_eval = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--checkpoint", "last", "--json"]) == 0
    assert hf_eval["loss"] == pytest.approx(json.loads(capsys.readouterr().out)["loss"], abs=1e-5)


# ---------------------------------------------------------------------------------------
# And back: a piformer model started from a GPT-2 checkpoint


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    model.save_pretrained(d)
    return d


def test_init_from_gpt2_reproduces_it_where_shapes_match(gpt2_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    model = PiGPT(ModelConfig.from_preset("SM+LN+G", "tiny", n_layer=3, block_size=32, vocab_size=VOCAB)).eval()
    report = init_from_pretrained(model, gpt2_dir)
    assert not report.initialised and not report.unused
    assert any("first 32 of 64 positions" in n for n in report.notes)
    idx = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        assert torch.allclose(model(idx).logits, hf(input_ids=idx).logits, atol=1e-5, rtol=0)


def test_init_from_gpt2_takes_what_fits_and_says_what_it_initialised(gpt2_dir):
    model = PiGPT(ModelConfig.from_preset("EReg(SM(t)+ScFuFFN)", "tiny", weight_norm="qk", vocab_size=VOCAB))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = init_from_pretrained(model, gpt2_dir)
    src = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).state_dict()
    # q of layer 1 went through weight norm's parametrisation and reads back as GPT-2's.
    q = src["transformer.h.1.attn.c_attn.weight"][:, :32].t()
    assert torch.allclose(model.transformer.h[1].attn.q_proj.weight, q, atol=1e-6)
    assert "transformer.h.1.attn.q_proj.weight" in report.taken and "transformer.wte.weight" in report.taken
    for name in ("transformer.h.0.attn.temperature", "transformer.h.0.mlp.c_fused.weight",
                 "transformer.h.1.attn.reg_threshold", "transformer.h.0.ffn_alpha"):
        assert report.initialised[name] == "not in the source"
    assert torch.equal(model.transformer.h[0].attn.temperature_leaf, before["transformer.h.0.attn.parametrizations.temperature.original"])
    assert "transformer.h.2.ln_1.weight" in report.unused and "transformer.h.0.mlp.c_fc.weight" in report.unused
    text = "\n".join(report.lines())
    assert "took" in text and "initialised (not in the source)" in text and "transformer.h.{0,1}.attn.temperature" in text


def test_train_cli_init_from(tmp_path, data, gpt2_dir, capsys):
    args = ["train", "--preset", "SM+LN+G", "--size", "tiny", "--data", str(data), "--quiet",
            "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.micro_batch_size=4"]
    assert main(args + ["--out", str(tmp_path / "r"), "--init-from", str(gpt2_dir)]) == 0
    out = capsys.readouterr().out
    assert "init-from" in out and "took" in out
    saved = json.loads((tmp_path / "r" / "init_from.json").read_text())
    assert "transformer.h.0.attn.q_proj.weight" in saved["taken"]
    # A source that is not there fails before a run directory exists.
    assert main(args + ["--out", str(tmp_path / "bad"), "--init-from", "no-such-model-xyz"]) == 2
    assert "local Hugging Face cache" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(args + ["--out", str(tmp_path / "r"), "--resume", "--init-from", str(gpt2_dir)]) == 2
    assert "--init-from starts a new run" in capsys.readouterr().err


def test_init_from_a_piformer_export_restores_the_model(tmp_path, data):
    """An exported PiformerForCausalLM is a valid --init-from source: the same architecture gets
    every tensor back (the thresholds, which the export leaves out, stay initialised)."""
    model = _model("EReg(SM(t)+ScFuFFN)")
    r = _export(model, tmp_path, data)
    fresh = PiGPT(model.config).eval()
    report = init_from_pretrained(fresh, r.out)
    assert set(report.initialised) == {f"transformer.h.{l}.attn.reg_threshold" for l in range(2)}
    assert not report.unused
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(fresh(idx).logits, model(idx).logits, atol=1e-5, rtol=0)
