"""`piformer reproduce`: run the whole study at one scale and write the report."""

from __future__ import annotations

from ..reproduce import TIERS, reproduce

NAME = "reproduce"
HELP = "run the paper's study at one scale (data, training, entropy, PI cost, secure inference) and write the report"


def add_arguments(p) -> None:
    p.add_argument("--tier", default="quick", choices=list(TIERS),
                   help="quick: a smoke run of tiny models, about 5-7 min on 2 CPU cores (4.9 min measured, see README); cpu: the committed study "
                   "(17 runs of 6-layer models, under 2 hours on 2 cores); gpt2: the paper's scale, for a GPU")
    p.add_argument("--out", required=True, help="run root: data, runs, figures and the report go here")
    p.add_argument("--data", default=None, help="a prepared data directory to use instead of the tier's corpus")
    p.add_argument("--presets", nargs="+", default=None, metavar="PRESET",
                   help="train only these configurations (default: the tier's list)")
    p.add_argument("--max-steps", type=int, default=None, help="override the tier's training steps")
    p.add_argument("--no-secure", action="store_true", help="skip the secure (SPU) inference runs")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once, each in its own process with cores/jobs threads "
                        "(default: the tier's; the cpu tier uses 2)")


def run(args) -> int:
    paths = reproduce(args.tier, args.out, data=args.data, presets=args.presets,
                      max_steps=args.max_steps, secure=not args.no_secure, jobs=args.jobs)
    print(f"open {paths['html']}")
    return 0
