"""`piformer pi-run`: secure two-party inference of a checkpoint under SPU, measured."""

from __future__ import annotations

import argparse
import json
import sys
import time

from piformer.pi.spu_backend import SETTINGS_PRESETS

from ._types import positive_float, positive_int

NAME = "pi-run"
HELP = ("run a checkpoint under two-party secure inference (SPU): communication, messages and time "
        "per operator class, agreement with plaintext, LAN/WAN latency")


def add_spu_arguments(p: argparse.ArgumentParser) -> None:
    """SPU options shared by pi-run and pi-query."""
    g = p.add_argument_group("SPU")
    g.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"), help="2PC protocol (default cheetah)")
    g.add_argument("--settings", default="default", choices=tuple(SETTINGS_PRESETS),
                   help="'default': SPU 0.9.5 as shipped; 'optimised': denominator broadcast and EMP Ferret OT; "
                        "'optimised-lsb-error': also CHEETAH's mul LSB error, which returns wrong values in "
                        "SPU 0.9.5 (cost studies only; see docs/private_inference.md)")
    g.add_argument("--field", default=None, choices=("FM64", "FM128"), help="ring (default FM64)")
    g.add_argument("--fxp-bits", type=int, default=None, help="fixed-point fraction bits (default 18)")
    g.add_argument("--exp-clip", type=float, default=None, help="clamp softmax inputs x - max at -CLIP before exp")
    g.add_argument("--causal-pack", action="store_true",
                   help="exponentiate only the visible (causal) attention entries: about half the softmax's "
                        "cost, same outputs")
    g.add_argument("--ln-wide", action="store_true",
                   help="LayerNorm right for rows of variance beyond SPU's rsqrt range (2^17): a second, scaled "
                        "variance per LayerNorm (models without LayerNorm in their blocks need it at ln_f)")
    g.add_argument("--vocab-chunk", type=int, default=4096,
                   help="vocabulary rows per one-hot embedding / head matmul (memory bound; default 4096)")
    g.add_argument("--layers", type=int, default=None, help="run only the first N blocks (default: all)")
    g.add_argument("--last-only", action="store_true",
                   help="compute and reveal only the last position's logits (all next-token generation needs)")


def settings_from_args(args: argparse.Namespace):
    from piformer.pi.spu_backend import UNSAFE_SETTINGS_WARNING, SPUSettings

    over = {"protocol": args.protocol}
    if args.field:
        over["field"] = args.field
    if args.fxp_bits is not None:
        over["fxp_fraction_bits"] = args.fxp_bits
    if args.exp_clip is not None:
        over["exp_clip"] = args.exp_clip
    if args.causal_pack:
        over["causal_pack"] = True
    if args.ln_wide:
        over["ln_wide"] = True
    s = SPUSettings.preset(args.settings, **over)
    s.validate()
    if s.mul_lsb_error:
        print(f"piformer: warning: {UNSAFE_SETTINGS_WARNING}", file=sys.stderr)
    return s


def add_token_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("query tokens (default: the run's first validation tokens, else random ids)")
    g.add_argument("--seq-len", type=positive_int, default=None, help="number of tokens T")
    g.add_argument("--tokens", default=None, help="token ids, e.g. '12,7,99'")
    g.add_argument("--text", default=None, help="text, tokenized with the run's tokenizer")
    g.add_argument("--seed", type=int, default=0, help="seed for random token ids")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from piformer.cli._options import add_checkpoint_argument

    p.add_argument("run_dir", help="run directory or checkpoint directory")
    add_checkpoint_argument(p)
    add_token_arguments(p)
    add_spu_arguments(p)
    p.add_argument("--prompts", type=positive_int, default=None, metavar="N",
                   help="check correctness on N windows of the run's validation split (--seq-len tokens each, "
                        "evenly spaced) in one secure session: one line per prompt, then the agreement over all "
                        "N x T predictions; exit status 4 if any prompt is beyond the tolerance")
    p.add_argument("--two-process", action="store_true",
                   help="server and client as two OS processes over loopback TCP (brpc) instead of two threads")
    p.add_argument("--port", type=int, default=0, help="with --two-process: first of two ports (default: free ports)")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="with --two-process: add this one-way delay to every byte (userspace relay)")
    p.add_argument("--bandwidth-mbit", type=float, default=None,
                   help="with --two-process: cap each direction at this rate (userspace relay)")
    p.add_argument("--measure-rounds", type=float, default=None, metavar="MS",
                   help="also run twice over TCP (two processes), without and with MS ms of one-way delay, "
                        "and project latency from the measured waits instead of the message count")
    p.add_argument("--tolerance", type=positive_float, default=None,
                   help="largest |secure - plaintext| logit accepted as fixed-point imprecision; beyond it the "
                        "report says WRONG RESULT (in red on a terminal) and the exit status is 4 (default 0.5)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (by default one per embedding, block and head, with an ETA)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--ops", action="store_true", help="with --json: include SPU's per-op counters of every step")


def _require_spu() -> None:
    from piformer.pi.spu_backend import SPUMissingError, require_spu

    try:
        require_spu()
    except SPUMissingError as err:
        raise ValueError(str(err)) from None


EXIT_WRONG_RESULT = 4
"""The secure logits disagreed with plaintext beyond the tolerance (the report says so)."""


def print_report(report, as_json: bool, ops: bool = False, extra: dict | None = None) -> int:
    """Print the report; the exit status: 0, or EXIT_WRONG_RESULT when the checked logits disagree."""
    import os
    import sys

    from piformer.pi.secure import disagrees, format_report

    if as_json:
        d = report.to_dict()
        if not ops:
            for s in d["steps"]:
                s.pop("ops", None)
        d.update(extra or {})
        print(json.dumps(d, indent=1))
    else:
        for k, v in (extra or {}).items():
            print(f"{k}: {v}")
        print(format_report(report, color=sys.stdout.isatty() and "NO_COLOR" not in os.environ))
    if disagrees(report):
        print(f"piformer: WRONG RESULT: secure logits differ from plaintext by {report.accuracy['max_abs_logit_error']:.4g} "
              f"> tolerance {report.accuracy['tolerance']:g}", file=sys.stderr)
        if report.accuracy.get("exp_out_of_range"):
            from piformer.pi.secure import exp_range_hint

            print(f"piformer: {exp_range_hint(report.accuracy['softmax_input_span'])}", file=sys.stderr)
        if report.accuracy.get("layernorm_out_of_range"):
            from piformer.pi.secure import layernorm_range_hint

            print(f"piformer: {layernorm_range_hint(report.accuracy['layernorm_input_variance'])}", file=sys.stderr)
        return EXIT_WRONG_RESULT
    return 0


def run(args: argparse.Namespace) -> int:
    _require_spu()
    from piformer.pi import jax_forward as jf
    from piformer.pi.secure import judge, load_weights, measure_rounds, print_progress, run_secure, run_two_process
    from piformer.pi.tokens import resolve_tokens

    settings = settings_from_args(args)
    cfg, sd = load_weights(args.run_dir, args.checkpoint)
    if args.prompts:
        return run_prompts(args, settings, cfg, sd)
    ids, source = resolve_tokens(args.run_dir, args.seq_len, cfg.vocab_size, cfg.block_size,
                                 args.tokens, args.text, args.seed)
    extra = {"checkpoint": str(args.run_dir), "tokens": source}
    if (args.delay_ms or args.bandwidth_mbit) and not args.two_process:
        raise ValueError("--delay-ms and --bandwidth-mbit need --two-process (they shape a real TCP link)")
    rounds = None
    if args.measure_rounds:
        rounds = measure_rounds(args.run_dir, ids, settings, delay_s=args.measure_rounds / 1e3,
                                vocab_chunk=args.vocab_chunk, layers=args.layers, which=args.checkpoint,
                                last_only=args.last_only)
        extra["rounds"] = {k: v for k, v in rounds.items() if k != "per_step_one_way_waits"}
    progress = None if args.quiet else print_progress
    if not args.two_process:
        report = run_secure(sd, cfg, ids, settings, vocab_chunk=args.vocab_chunk, layers=args.layers,
                            last_only=args.last_only, progress=progress)
    else:
        # Two OS processes: a pi-serve child (weights) and this process as the client (tokens).
        # This process also runs the plaintext program, only to report the agreement.
        program = jf.build_program(cfg, len(ids), vocab_chunk=args.vocab_chunk, layers=args.layers,
                                   last_only=args.last_only, **settings.program_options())
        params = jf.chunk_params(jf.prepare_params(sd, cfg, len(ids)), program.vocab_chunks)
        reference = jf.plaintext_logits(program, {**params, **jf.one_hot_chunks(ids, program.vocab_chunks)})
        t0 = time.perf_counter()
        report = run_two_process(args.run_dir, ids, settings, which=args.checkpoint, vocab_chunk=args.vocab_chunk,
                                 layers=args.layers, reference=reference,
                                 delay_s=args.delay_ms / 1e3 if args.delay_ms else None,
                                 bandwidth_bps=args.bandwidth_mbit * 1e6 if args.bandwidth_mbit else None,
                                 ports=(args.port, args.port + 1) if args.port else None, last_only=args.last_only,
                                 progress=progress)
        extra["end_to_end_s"] = round(time.perf_counter() - t0, 2)
    report.one_way_waits = rounds["one_way_waits"] if rounds else None
    if args.tolerance is not None:
        judge(report, args.tolerance)
    return print_report(report, args.json, args.ops, extra)


def run_prompts(args: argparse.Namespace, settings, cfg, sd) -> int:
    """`pi-run --prompts N`: N validation windows through one secure session."""
    from piformer.pi.secure import LOGIT_TOLERANCE, run_secure_prompts, summarise_prompts
    from piformer.pi.tokens import validation_windows

    clash = [flag for flag, on in (("--tokens", args.tokens), ("--text", args.text), ("--two-process", args.two_process),
                                   ("--layers", args.layers is not None), ("--last-only", args.last_only),
                                   ("--measure-rounds", args.measure_rounds)) if on]
    if clash:
        raise ValueError(f"--prompts runs whole models on validation windows in one process; drop {', '.join(clash)}")
    if args.seq_len is None:
        raise ValueError("--prompts needs --seq-len (tokens per prompt)")
    prompts, source = validation_windows(args.run_dir, args.seq_len, args.prompts, cfg.vocab_size, cfg.block_size)
    tolerance = args.tolerance or LOGIT_TOLERANCE

    def line(r) -> None:
        a = r.accuracy
        if not args.quiet:
            print(f"prompt {r.index + 1}/{len(prompts)}: argmax {a['argmax_agreement']:.1%}, "
                  f"max |dlogit| {a['max_abs_logit_error']:.3g}, {r.seconds:.0f} s", file=sys.stderr, flush=True)

    results = run_secure_prompts(sd, cfg, prompts, settings, vocab_chunk=args.vocab_chunk, on_prompt=line,
                                 tolerance=tolerance)
    summary = {"checkpoint": str(args.run_dir), "tokens": source, "settings": settings.to_dict(),
               "tolerance": tolerance, **summarise_prompts(results, args.seq_len)}
    if args.json:
        summary["per_prompt"] = [{"prompt": r.index, "seconds": round(r.seconds, 2), **r.accuracy} for r in results]
        print(json.dumps(summary, indent=1))
    else:
        flips = ", ".join(f"prompt {f['prompt']} position {f['position']} (plaintext top-2 gap {f['plaintext_top2_gap']:.2g})"
                          for f in summary["argmax_disagreements"]) or "none"
        print(f"{summary['tokens']}\n"
              f"argmax agreement {summary['argmax_agreement']:.2%} of {summary['predictions']} next-token predictions; "
              f"flips: {flips}\n"
              f"max |secure - plaintext| logit {summary['max_abs_logit_error']:.4g} (tolerance {tolerance:g}); "
              f"{summary['seconds_per_prompt']:.0f} s per prompt (median)")
    if summary["prompts_beyond_tolerance"]:
        print(f"piformer: WRONG RESULT: prompts {summary['prompts_beyond_tolerance']} differ from plaintext beyond "
              f"tolerance {tolerance:g}", file=sys.stderr)
        return EXIT_WRONG_RESULT
    return 0
