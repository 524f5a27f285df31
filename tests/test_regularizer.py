"""The entropy regulariser as a standalone loss module, on PiGPT and on a Hugging Face GPT-2."""

import math

import pytest
import torch

from piformer.analysis.hf import hf_sliding_window
from piformer.analysis.result import analyse_entropy
from piformer.config import ModelConfig, RegLoss
from piformer.entropy import causal_row_ceiling, row_entropy, uniform_causal_entropy
from piformer.model import PiGPT
from piformer.regularizer import EntropyRegularizer, hf_layer_windows

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from piformer.hf.regularize import RegularizedCausalLM  # noqa: E402


def uniform_attention(T: int, window: int | None = None, B: int = 1, H: int = 1) -> torch.Tensor:
    """(B, H, T, T) probabilities of a head that spreads evenly over the keys it may see."""
    i, j = torch.arange(T).view(-1, 1), torch.arange(T).view(1, -1)
    allowed = (j <= i) & ((i - j < window) if window is not None else True)
    p = allowed.float() / allowed.float().sum(-1, keepdim=True)
    return p.expand(B, H, T, T).clone()


# -- ceilings ---------------------------------------------------------------------------------


def test_causal_row_ceiling_with_and_without_a_sliding_window():
    assert torch.allclose(causal_row_ceiling(6), torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.float64).log())
    assert torch.allclose(causal_row_ceiling(6, window=3), torch.tensor([1, 2, 3, 3, 3, 3], dtype=torch.float64).log())
    assert torch.equal(causal_row_ceiling(6, window=6), causal_row_ceiling(6))
    assert uniform_causal_entropy(6) == pytest.approx(sum(math.log(i + 1) for i in range(6)) / 6)
    assert uniform_causal_entropy(6, window=3) == pytest.approx((math.log(2) + 4 * math.log(3)) / 6)
    assert uniform_causal_entropy(64, window=4) < uniform_causal_entropy(64)
    with pytest.raises(ValueError, match="window must be a positive"):
        causal_row_ceiling(6, window=0)


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_uniform_sliding_window_head_reaches_exactly_its_ceiling(window):
    ent = row_entropy(uniform_attention(8, window))[0, 0]
    assert torch.allclose(ent.double(), causal_row_ceiling(8, window), atol=1e-6)


def test_hf_layer_windows_from_configs():
    from transformers import MistralConfig, Qwen2Config

    assert hf_layer_windows(MistralConfig(num_hidden_layers=3, sliding_window=8)) == [8, 8, 8]
    assert hf_sliding_window(MistralConfig(num_hidden_layers=3, sliding_window=8)) == 8
    assert hf_layer_windows(GPT2Config(n_layer=2)) == [None, None]
    assert hf_layer_windows(Qwen2Config(num_hidden_layers=2)) == [None, None]  # use_sliding_window=False
    mixed = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert hf_layer_windows(mixed) == [None, None, 8, 8]
    assert hf_sliding_window(mixed) is None  # no single model-wide ceiling


def test_entropy_analysis_uses_the_sliding_window_ceiling():
    e = torch.full((2, 2), 1.0)
    full = analyse_entropy(e, 64, reference="causal")
    slid = analyse_entropy(e, 64, reference="causal", window=4)
    assert full.causal_ceiling == pytest.approx(uniform_causal_entropy(64))
    assert slid.causal_ceiling == pytest.approx(uniform_causal_entropy(64, 4))
    assert slid.diagnosis.overload_threshold == pytest.approx(0.75 * uniform_causal_entropy(64, 4))
    assert "min(i+1, 4)" in slid.diagnosis.criteria


def test_piformer_entropy_on_a_sliding_window_hf_model_uses_its_ceiling(tmp_path):
    import json

    import numpy as np
    from transformers import MistralConfig, MistralForCausalLM

    from piformer.analysis import analyse_hf

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=4, bos_token_id=0, eos_token_id=0)
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "mistral")
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        np.random.default_rng(0).integers(0, 100, 2000).astype("<u2").tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": 100, "eot_id": 0, "dtype": "uint16", "splits": {
        "train": {"tokens": 2000}, "val": {"tokens": 2000}}}))
    res = analyse_hf(tmp_path / "mistral", data, batches=1, batch_size=2, seq_len=32, reference="causal")
    assert res.causal_ceiling == pytest.approx(uniform_causal_entropy(32, window=4))
    assert "min(i+1, 4)" in res.diagnosis.criteria
    # no head can exceed the sliding-window ceiling of its rows
    assert (res.head_entropy <= uniform_causal_entropy(32, window=4) + 1e-6).all()


# -- the module against PiGPT's built-in regulariser --------------------------------------------


@pytest.mark.parametrize("mode", ["query", "head"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_standalone_module_equals_pigpt_penalty(mode, reduction):
    torch.manual_seed(0)
    model = PiGPT(ModelConfig.from_preset("SM+LN+G", size="tiny", entropy_reg=True))
    L, H = model.config.n_layer, model.config.n_head
    with torch.no_grad():  # thresholds spread so that some heads are inside their band and some not
        for l, block in enumerate(model.transformer.h):
            block.attn.reg_threshold.copy_(torch.linspace(0.3, 0.95, H) - 0.05 * l)
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    loss = RegLoss(lam=1.0, gamma=0.1, mode=mode, reduction=reduction)
    out = model(idx, targets=torch.roll(idx, -1, 1), return_attention=True, reg=loss)
    assert out.reg_loss > 0

    reg = EntropyRegularizer(L, H, gamma=0.1, mode=mode, reduction=reduction)
    with torch.no_grad():
        reg.thresholds.copy_(model.thresholds())
    from_probs = reg(out.attentions)
    from_rows = reg(entropies=[out.cache[f"blocks.{l}.attn.hook_entropy"] for l in range(L)])
    for got in (from_probs, from_rows):
        assert torch.allclose(got.penalty, out.reg_loss, rtol=1e-5, atol=0)
        assert torch.allclose(got.outside, out.reg_outside)
        assert torch.allclose(got.head_entropy, out.head_entropy, atol=1e-5)


def test_penalty_is_zero_inside_the_band_and_squared_outside():
    T = 8
    ent = torch.stack([row_entropy(uniform_attention(T, B=2, H=2))] * 3)  # (L=3, B, H, T)
    reg = EntropyRegularizer(3, 2, gamma=0.0, mode="head", threshold_init=1.0, ceiling="causal")
    assert reg(entropies=ent).penalty == 0  # a uniform causal head sits exactly at its ceiling
    reg_logt = EntropyRegularizer(3, 2, gamma=0.0, mode="head", threshold_init=1.0)
    expected = (uniform_causal_entropy(T) - math.log(T)) ** 2  # every head below log T by the same amount
    assert reg_logt(entropies=ent).penalty.item() == pytest.approx(expected, rel=1e-5)
    wide = EntropyRegularizer(3, 2, gamma=0.5, mode="head", threshold_init=1.0)  # |dev| < 0.5 log T
    assert wide(entropies=ent).penalty == 0 and wide(entropies=ent).outside == 0


def test_causal_ceiling_per_query_row_and_sliding_window():
    T, w = 10, 3
    probs = uniform_attention(T, window=w, B=2, H=2)
    at_ceiling = EntropyRegularizer(1, 2, gamma=0.0, threshold_init=1.0, ceiling="causal", window=w)
    assert at_ceiling([probs]).penalty == 0
    # against the full causal ceiling log(i + 1), the rows beyond the window fall short
    full = EntropyRegularizer(1, 2, gamma=0.0, threshold_init=1.0, ceiling="causal")
    short = (causal_row_ceiling(T) - causal_row_ceiling(T, w)).square().sum() * 2  # 2 sequences, 'sum'
    assert full([probs]).penalty.item() == pytest.approx(short.item(), rel=1e-5)
    # 'logT' with a window: E_max = log(min(T, window))
    logt = EntropyRegularizer(1, 2, gamma=0.0, threshold_init=1.0, window=w, reduction="mean")
    rows = causal_row_ceiling(T, w)
    assert logt([probs]).penalty.item() == pytest.approx((rows - math.log(w)).square().mean().item(), rel=1e-5)


def test_per_layer_windows_average_the_layers():
    ent = torch.rand(2, 3, 2, 12) * 2  # (L, B, H, T)
    both = EntropyRegularizer(2, 2, window=[None, 4], ceiling="causal", gamma=0.05)
    one = [EntropyRegularizer(1, 2, window=w, ceiling="causal", gamma=0.05) for w in (None, 4)]
    expected = (one[0](entropies=ent[:1]).penalty + one[1](entropies=ent[1:]).penalty) / 2
    assert torch.allclose(both(entropies=ent).penalty, expected)


def test_padded_query_rows_are_not_penalised():
    torch.manual_seed(0)
    ent = torch.rand(2, 1, 2, 7) * 2  # (L, B=1, H, T)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    for mode in ("query", "head"):
        reg = EntropyRegularizer(2, 2, ceiling="causal", mode=mode, gamma=0.05)
        padded = reg(entropies=ent, attention_mask=mask).penalty
        assert torch.allclose(padded, reg(entropies=ent[..., :5]).penalty)
        assert not torch.allclose(padded, reg(entropies=ent).penalty)


@pytest.mark.parametrize(
    "kwargs, inputs, message",
    [
        ({"mode": "row"}, None, "unknown mode 'row'"),
        ({"reduction": "max"}, None, "unknown reduction"),
        ({"ceiling": "e"}, None, "unknown ceiling"),
        ({"window": [4]}, None, "1 windows given for 2 layers"),
        ({"window": 0}, None, "window must be a positive int"),
        ({}, {"attentions": [torch.rand(1, 2, 4, 4)]}, "attentions for 1 layers"),
        ({}, {"attentions": [torch.rand(1, 3, 4, 4)] * 2}, r"\(B, H, T, T\) per layer with H=2"),
        ({}, {"attentions": (None, None)}, "output_attentions=True"),
        ({}, {}, "exactly one of attentions"),
    ],
)
def test_bad_input_is_named(kwargs, inputs, message):
    with pytest.raises(ValueError, match=message):
        reg = EntropyRegularizer(2, 2, **kwargs)
        reg(**inputs)


# -- on a Hugging Face causal LM ---------------------------------------------------------------


def tiny_gpt2(attn="eager", attn_pdrop=0.0) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=100,
                     bos_token_id=0, eos_token_id=0, attn_pdrop=attn_pdrop)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)


def test_fine_tuning_gpt2_with_the_regulariser():
    wrapped = RegularizedCausalLM(tiny_gpt2(), lam=0.1, gamma=0.1, threshold_init=0.3)
    opt = torch.optim.AdamW(wrapped.optim_groups(weight_decay=0.1), lr=1e-2)
    thresholds = wrapped.regularizer.thresholds
    in_optimizer = [g for g in opt.param_groups if any(p is thresholds for p in g["params"])]
    assert len(in_optimizer) == 1 and in_optimizer[0]["weight_decay"] == 0.0
    start = thresholds.detach().clone()

    ids = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(1))
    c_attn = wrapped.model.transformer.h[0].attn.c_attn.weight
    losses = []
    for step in range(5):
        out = wrapped(input_ids=ids, labels=ids)
        assert out.reg_loss > 0 and 0 < out.reg_outside <= 1
        assert torch.allclose(out.loss, out.lm_loss + 0.1 * out.reg_loss)
        if step == 0:  # the penalty alone reaches the attention weights
            g = torch.autograd.grad(out.reg_loss, c_attn, retain_graph=True)[0]
            assert g.abs().sum() > 0
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert not torch.allclose(thresholds, start)
    assert losses[-1] < losses[0]
    assert out.head_entropy.shape == (2, 2)


def test_the_wrapper_skips_padding_and_refuses_non_eager_attention():
    wrapped = RegularizedCausalLM(tiny_gpt2(), lam=1.0).eval()  # eval: no residual/embedding dropout
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    out = wrapped(input_ids=ids, attention_mask=mask, labels=ids)
    direct = wrapped.model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert torch.allclose(out.reg_loss, wrapped.regularizer(direct.attentions, attention_mask=mask).penalty)
    assert not torch.allclose(out.reg_loss, wrapped.regularizer(direct.attentions).penalty)
    assert out.logits.shape == (2, 12, 100)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        RegularizedCausalLM(tiny_gpt2("sdpa"))
    with pytest.warns(UserWarning, match=r"attention dropout \{'attn_pdrop': 0.1\}"):
        RegularizedCausalLM(tiny_gpt2(attn_pdrop=0.1))


def test_trainer_trains_the_thresholds_without_weight_decay(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from piformer.hf import EntropyRegTrainer

    wrapped = RegularizedCausalLM(tiny_gpt2(), lam=0.1, threshold_init=0.3)
    start = wrapped.regularizer.thresholds.detach().clone()
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 100, (8, 16), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, logging_steps=1, report_to=[],
                             save_strategy="steps", save_steps=3, use_cpu=True, disable_tqdm=True)
    trainer = EntropyRegTrainer(model=wrapped, args=args, train_dataset=data)
    trainer.train()
    groups = [g for g in trainer.optimizer.param_groups
              if any(p is wrapped.regularizer.thresholds for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert not torch.allclose(wrapped.regularizer.thresholds, start)
    logged = [h for h in trainer.state.log_history if "reg_loss" in h]
    assert len(logged) == 3 and all(h["reg_loss"] > 0 and "lm_loss" in h for h in logged)

    # the step-3 checkpoint: the HF model loadable on its own, the thresholds beside it, both restored
    ckpt = tmp_path / "checkpoint-3"
    alone = GPT2LMHeadModel.from_pretrained(ckpt)
    assert torch.equal(alone.transformer.h[1].attn.c_attn.weight, wrapped.model.transformer.h[1].attn.c_attn.weight)
    fresh = RegularizedCausalLM(tiny_gpt2(), lam=0.1, threshold_init=0.3)
    EntropyRegTrainer(model=fresh, args=args, train_dataset=data)._load_from_checkpoint(str(ckpt))
    assert torch.equal(fresh.regularizer.thresholds, wrapped.regularizer.thresholds)
    assert torch.equal(fresh.model.lm_head.weight, wrapped.model.lm_head.weight)
    args.max_steps = 4  # and Trainer's own resume goes through the same loader
    resumed = EntropyRegTrainer(model=RegularizedCausalLM(tiny_gpt2(), lam=0.1), args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4
