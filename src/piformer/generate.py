"""Sample text from a trained model.

    texts = generate_text("runs/baseline", "def fib(n):", max_new_tokens=64, temperature=0.8, top_k=50, seed=1)

Sampling is nanoGPT's: the last block_size tokens are the context, logits are divided by the
temperature, optionally cut to the top k, and the next token is drawn from the softmax. The
draws come from a torch.Generator seeded with `seed`, so a seed gives the same text every time
(on the same device). Temperature 0 means greedy decoding (always the most likely token).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .data.tokenizer import EOT, load_tokenizer
from .evaluate import resolve_device, run_tokenizer_path
from .model import PiGPT


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, num_samples: int = 1) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be a positive integer (or omitted for the full vocabulary), got {top_k}")
    if num_samples < 1:
        raise ValueError(f"--num-samples must be a positive integer, got {num_samples}")


@torch.no_grad()
def sample(
    model: PiGPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> torch.Tensor:
    """Continue each row of idx (B, T) by up to max_new_tokens tokens -> (B, T + n).

    With `stop_id`, generation ends once every row has produced it (rows that finished early
    are padded with it)."""
    check_sampling(max_new_tokens, temperature, top_k)
    model.eval()
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size:]).logits[:, -1, :].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.size(-1):
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        if stop_id is not None:
            nxt = nxt.masked_fill(done.unsqueeze(1), stop_id)
            done |= nxt.squeeze(1) == stop_id
        idx = torch.cat((idx, nxt), dim=1)
        if stop_id is not None and bool(done.all()):
            break
    return idx


def generate_text(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 1337,
    num_samples: int = 1,
    which: str = "best",
    device: str = "auto",
    tokenizer: str | Path | None = None,
    stop_at_eot: bool = True,
) -> list[str]:
    """Prompt + continuation, `num_samples` times, from a run or checkpoint and its tokenizer.

    An empty prompt starts from the end-of-text token, i.e. a new document."""
    check_sampling(max_new_tokens, temperature, top_k, num_samples)
    dev = resolve_device(device)
    tok_path = Path(tokenizer) if tokenizer is not None else run_tokenizer_path(path, which)
    if tok_path is None:
        raise ValueError(f"no tokenizer is known for {path} (not a run directory whose data directory is present); "
                         "pass --tokenizer")
    tok = load_tokenizer(tok_path)
    model = ckpt_io.load_model(path, device=dev, which=which)
    eot = tok.token_to_id(EOT)
    ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else [eot]
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"tokenizer {tok_path} does not belong to the model (token id {max(ids)} >= vocab_size "
                         f"{model.config.vocab_size})")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = sample(model, idx, max_new_tokens, temperature, top_k, gen, eot if stop_at_eot else None)
    texts = []
    for row in out.tolist():
        new = row[len(ids):]
        if stop_at_eot and eot in new:
            new = new[: new.index(eot)]
        texts.append(prompt + tok.decode(new, skip_special_tokens=False))
    return texts
