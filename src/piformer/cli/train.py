"""`piformer train`: train one configuration on a prepared data directory."""

from __future__ import annotations

import argparse
import math
import os

NAME = "train"
HELP = ("train a model (one process, or DDP under torchrun); exit status 0 finished, "
        "2 bad input, 3 diverged (non-finite loss: recorded, last good checkpoint kept)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None,
                   help="architecture, e.g. 'SM+LN+G', 'SM+ScFuFFN', 'EReg(SM(t)+ScFuFFN)' (default SM+LN+G; "
                        "see `piformer presets`)")
    p.add_argument("--size", default=None,
                   help="size preset and its training recipe: gpt2-small, gpt2-18l, cpu-small, tiny (default cpu-small)")
    p.add_argument("--data", default=None, help="prepared data directory (default data/builtin; see `piformer data prepare`)")
    p.add_argument("--out", required=True, help="run directory (config, status, metrics, checkpoints)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-4 --set model.n_layer=4 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from checkpoints/last (its saved config; --set may change train fields)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (sets train.device; default: the recipe's, auto)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the initial weights and the batch order (sets train.seed; default: the recipe's)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to RUN_DIR/tensorboard: scalars, per-layer entropy, thresholds and temperatures "
                        "(sets train.tensorboard; needs `pip install tensorboard`)")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log to this Weights & Biases project (needs `pip install wandb`)")
    p.add_argument("--init-from", default=None, metavar="DIR|NAME",
                   help="start from a Hugging Face GPT-2 checkpoint (a directory, or e.g. 'gpt2' if in the local HF "
                        "cache): takes every tensor whose shape fits, initialises the rest, and says which")


def build_configs(args: argparse.Namespace):
    """(model_cfg, train_cfg, data_dir, preset, size) from the arguments (and the run's config on --resume)."""
    from piformer.config import ModelConfig, parse_overrides, train_recipe
    from piformer.data import read_meta

    overrides = parse_overrides(args.set)
    # The flags are shorthands for --set train.*; an explicit flag wins over a --set of the same field.
    for key, value in (("device", args.device), ("seed", args.seed), ("tensorboard", args.tensorboard or None)):
        if value is not None:
            overrides["train"][key] = value
    if "vocab_size" in overrides["model"]:
        raise ValueError("model.vocab_size comes from the data's tokenizer (meta.json); do not --set it")
    if args.resume:  # the run's saved configs, with the overrides on top (piformer.run_dir)
        from piformer.run_dir import resume_configs

        return resume_configs(args.out, overrides, preset=args.preset, size=args.size, data=args.data)
    preset, size = args.preset or "SM+LN+G", args.size or "cpu-small"
    data_dir = args.data or "data/builtin"
    vocab = int(read_meta(data_dir)["vocab_size"])  # fail fast, with the "run data prepare" hint
    model = ModelConfig.from_preset(preset, size, vocab_size=vocab, **overrides["model"])
    train = train_recipe(size, **overrides["train"])
    return model, train, data_dir, preset, size


def run(args: argparse.Namespace) -> int:
    from piformer.train import EXIT_DIVERGED, train

    callbacks = []
    if args.wandb:  # imports wandb now: a missing package fails before anything is written
        from piformer.logging_sinks import WandbSink

        callbacks.append(WandbSink(args.wandb))
    model_cfg, train_cfg, data_dir, preset, size = build_configs(args)
    if args.init_from and args.resume:
        raise ValueError("--init-from starts a new run; a resumed run continues from its own checkpoint (drop one)")
    if args.init_from:
        from piformer.hf.init import check_source

        check_source(args.init_from)  # before the run directory is written
    result = train(model_cfg, train_cfg, data_dir, args.out, resume=args.resume, preset=preset, size=size,
                   progress=not args.quiet, init_from=args.init_from, callbacks=callbacks)
    if int(os.environ.get("RANK", "0")) == 0:
        if result["status"] == "diverged":
            kept = (f"last good checkpoint (step {result['last_checkpoint_step']}) kept in {args.out}/checkpoints/last"
                    if result["last_checkpoint_step"] is not None else "no checkpoint had been written yet")
            print(f"{args.out}: diverged at step {result['diverged_at']} (non-finite loss); {kept}")
        else:
            ppl = result["val_ppl"]
            print(f"{args.out}: finished {result['step']} steps; val loss {result['val_loss']:.4f}, "
                  f"ppl {ppl:.3f}" if ppl is not None and math.isfinite(ppl) else f"{args.out}: finished")
    return EXIT_DIVERGED if result["status"] == "diverged" else 0
