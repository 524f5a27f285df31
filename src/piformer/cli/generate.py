"""`piformer generate`: sample text from a run or checkpoint with its tokenizer."""

from __future__ import annotations

import argparse

NAME = "generate"
HELP = "sample continuations of a prompt from a run or checkpoint (the run's tokenizer; seeded, so repeatable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="RUN_OR_CKPT", help="run directory or checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, i.e. start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divide the logits by this before sampling; 0 = greedy (always the most likely token)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--seed", type=int, default=1337, help="random seed: the same seed gives the same text")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to print")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint of a run")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or a data directory) for a bare checkpoint")
    p.add_argument("--no-stop", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from piformer.generate import generate_text

    texts = generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, seed=args.seed, num_samples=args.num_samples, which=args.checkpoint,
                          device=args.device, tokenizer=args.tokenizer, stop_at_eot=not args.no_stop)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1}/{len(texts)}")
        print(text)
    return 0
