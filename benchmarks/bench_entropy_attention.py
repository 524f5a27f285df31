"""The entropy-aware attention: the regularised step against its twin, the baseline against a bare
nanoGPT-style model, step time and memory as T grows, and entropy measurement before/after.

    python benchmarks/bench_entropy_attention.py steps --size cpu-small --batch 16
    python benchmarks/bench_entropy_attention.py scaling --tokens 2048
    python benchmarks/bench_entropy_attention.py kernel --batch 16 --heads 8 --T 128 --head-dim 32
    python benchmarks/bench_entropy_attention.py loss --rows 2048 --width 256 --steps 25 --warmup 3
    python benchmarks/bench_entropy_attention.py phases --size gpt2-small --batch 8 --cases reference baseline
    python benchmarks/bench_entropy_attention.py profile --size cpu-small --steps 3 --warmup 2 --cases reference baseline
    python benchmarks/bench_entropy_attention.py entropy --run results/cpu/runs/ereg-sm-t-scfuffn --data results/cpu/data
    python benchmarks/bench_entropy_attention.py entropy --size cpu-small --T 512 --batch 4   # untrained, random tokens

Cases, all trained by the same bare loop (forward with loss, backward, clip, AdamW, zero_grad):
  reference     nanoGPT-style GPT (fused c_attn, SDPA), from bench_train_throughput.py
  reference-split  the same with three d x d q/k/v projections, as piformer's model (an ablation)
  baseline      piformer SM+LN+G (its loss straight from the hidden states in chunks, piformer.loss)
  baseline-full-loss  the same with the loss from full (B, T, V) logits, as before (PIFORMER_LOSS=full)
  twin-full-loss, ereg-full-loss  twin and ereg with the loss from full logits (ablations)
  twin          piformer SM(t)+ScFuFFN (fused SDPA, no entropies)
  ereg          piformer EReg(SM(t)+ScFuFFN): fused attention with row entropies, the C++ kernel
                at head width D (piformer.attention, kernel "cpp"; the default)
  ereg-flash    the same model on PyTorch's flash kernel at width 2D (kernel "flash", the fallback)
  ereg-explicit the same model through the explicit (B, H, T, T) path, as every regularised step
                ran before (return_attention=True forces it): the 'before' column

Timing: the cases take turns step by step (round robin, the order reversed every other round), so
load from other processes hits them alike (with `steps --isolated` each case lives in a worker
process of its own, so that no two share a heap or allocator cache; `--processes K` repeats that
with fresh processes K times, for intervals over runs); each case's figure is the median of its measured steps,
and the ratios are also given paired (the median over rounds of the two cases' ratio in a round). Memory: each case runs alone in a
fresh process; after one warm-up step (AdamW allocates its state there) the peak resident set is
reset (/proc/self/clear_refs) and one step is measured: 'step MiB' is that peak minus the resident
set just before it (activations, gradients, temporaries; weights and optimizer state excluded),
with every block over 64 KiB mapped on its own so that freed memory leaves the resident set.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_throughput import RefGPT  # noqa: E402

from piformer.attention import KERNEL_ENV  # noqa: E402
from piformer.config import ModelConfig, RegLoss  # noqa: E402
from piformer.loss import LOSS_ENV  # noqa: E402
from piformer.model import PiGPT  # noqa: E402

CASES = {
    "reference": None,
    "reference-split": None,
    "baseline": "SM+LN+G",
    "baseline-full-loss": "SM+LN+G",
    "twin": "SM(t)+ScFuFFN",
    "ereg": "EReg(SM(t)+ScFuFFN)",
    "ereg-flash": "EReg(SM(t)+ScFuFFN)",
    "ereg-explicit": "EReg(SM(t)+ScFuFFN)",
    "twin-full-loss": "SM(t)+ScFuFFN",
    "ereg-full-loss": "EReg(SM(t)+ScFuFFN)",
}
OPTIONAL = ("reference-split", "twin-full-loss", "ereg-full-loss")  # ablations: run when named in --cases
REFERENCE_LABEL = {"reference": "nanoGPT-style", "reference-split": "nanoGPT-style, split q/k/v"}  # cases with no preset
KERNEL = {"ereg": "cpp", "ereg-flash": "flash", "ereg-full-loss": "cpp"}  # the entropy kernel each case runs
FULL_LOSS = {"baseline-full-loss", "twin-full-loss", "ereg-full-loss"}  # cases whose loss forms the (B, T, V) logits (PIFORMER_LOSS=full)
VOCAB = 8192
# Pairs `steps` also reports when both cases ran: (numerator, denominator, what the ratio shows)
ABLATION_PAIRS = (
    ("ereg-full-loss", "twin-full-loss", "with the loss from full logits: ereg-full-loss / twin-full-loss"),
    ("reference", "baseline-full-loss", "before (the loss from full (B, T, V) logits): reference ms / baseline-full-loss ms"),
    ("reference", "reference-split", "the reference with three q/k/v projections (reference ms / reference-split ms)"),
    ("reference-split", "baseline", "baseline vs the reference with three q/k/v projections"),
)


def build(case: str, size: str, T: int, seed: int = 0, phases: dict[str, float] | None = None):
    """(model, step function) for one case; the step runs one optimisation step on (x, y).
    With `phases`, each step also writes its forward, backward and optimizer seconds there."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(CASES[case] or "SM+LN+G", size, vocab_size=VOCAB, block_size=T)
    if case.startswith("reference"):
        model = RefGPT(VOCAB, T, cfg.n_layer, cfg.n_head, cfg.n_embd, split_qkv=case == "reference-split")
        loss_fn = lambda x, y: model(x, y)  # noqa: E731
    else:
        model = PiGPT(cfg)
        kw = {"return_attention": True} if case == "ereg-explicit" else {}
        reg = RegLoss()
        loss_fn = lambda x, y: model(x, targets=y, reg=reg, **kw).loss  # noqa: E731
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-4)

    def step(x, y):
        if case in KERNEL:  # read at each call: cases taking turns in one process each get theirs
            os.environ[KERNEL_ENV] = KERNEL[case]
        os.environ[LOSS_ENV] = "full" if case in FULL_LOSS else "chunked"
        t0 = time.perf_counter()
        loss = loss_fn(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if phases is not None:
            phases.update(forward=t1 - t0, backward=t2 - t1, optimizer=time.perf_counter() - t2)
        return loss.item()

    return model, step


def batch(B: int, T: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def step_times(cases, size, B, T, steps, warmup) -> dict[str, list[float]]:
    """Wall seconds of each measured step of each case. The cases take turns step by step, in
    turn forward and reversed order (A B C, C B A, ...): a case that always ran right after
    another would inherit its cache and allocator state every time (the phases table below
    showed a 5-10% swing with the order)."""
    runs = {c: build(c, size, T)[1] for c in cases}
    x, y = batch(B, T)

    def one_step(c: str) -> float:
        t0 = time.perf_counter()
        runs[c](x, y)
        return time.perf_counter() - t0

    return _take_turns(cases, steps, warmup, one_step)


def _take_turns(cases, steps, warmup, one_step) -> dict[str, list[float]]:
    """Seconds of each measured step of each case, `one_step(case)` timing one: forward and
    reversed order in turn, the first `warmup` rounds not kept."""
    times = {c: [] for c in cases}
    for i in range(warmup + steps):
        for c in (cases if i % 2 == 0 else cases[::-1]):
            t = one_step(c)
            if i >= warmup:
                times[c].append(t)
    return times


def _step_worker(conn, case: str, size: str, B: int, T: int, threads: int) -> None:
    """One case in a process of its own: build, then one timed step per request."""
    torch.set_num_threads(threads)
    step = build(case, size, T)[1]
    x, y = batch(B, T)
    conn.send("ready")
    while conn.recv() == "step":
        t0 = time.perf_counter()
        step(x, y)
        conn.send(time.perf_counter() - t0)


def step_times_isolated(cases, size, B, T, steps, warmup, threads) -> dict[str, list[float]]:
    """As `step_times`, but each case lives in a worker process of its own and the workers step in
    turn (one computing at a time): the load drift still cancels within a round, while no case
    shares a heap, an allocator cache or a thread pool with another."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # not fork: the parent's OpenMP pool must not be inherited
    workers = {}
    try:
        for c in cases:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_step_worker, args=(child, c, size, B, T, threads), daemon=True)
            proc.start()
            workers[c] = (parent, proc)
        for parent, _ in workers.values():
            parent.recv()  # "ready"

        def one_step(c: str) -> float:
            workers[c][0].send("step")
            return workers[c][0].recv()

        return _take_turns(cases, steps, warmup, one_step)
    finally:
        for parent, proc in workers.values():
            try:
                parent.send("stop")
            except OSError:
                pass
            proc.join(timeout=30)


def time_cases(cases, size, B, T, steps, warmup):
    """Median wall seconds per step of each case (`step_times`)."""
    return {c: statistics.median(v) for c, v in step_times(cases, size, B, T, steps, warmup).items()}


def paired_summary(times: dict[str, list[float]], num: str, den: str, resamples: int = 4000) -> str:
    """The median over rounds of num's step / den's step in the same round (drift of the machine's
    load over the run cancels within a round), with a 95% bootstrap interval (rounds resampled with
    replacement, seeded) and the rounds in which num's step took longer: whether a ratio near a
    target is resolved by the run or lies within its noise."""
    ratios = [a / b for a, b in zip(times[num], times[den])]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    lo, hi = meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]
    longer = sum(r > 1 for r in ratios)
    return f"{statistics.median(ratios):.3f}x (95% CI {lo:.3f}-{hi:.3f}; {num} slower in {longer} of {len(ratios)} rounds)"


def paired_runs_summary(runs: list[dict[str, list[float]]], num: str, den: str, resamples: int = 2000) -> str:
    """As `paired_summary` over several runs, each in fresh worker processes: a process's own
    placement (heap, pages, threads) shifts all of its steps alike, which rounds within one run
    cannot average out. The interval resamples runs, then rounds within each (hierarchical
    bootstrap); each run's own paired ratio is listed."""
    per_run = [[a / b for a, b in zip(r[num], r[den])] for r in runs]
    rng = random.Random(0)
    meds = []
    for _ in range(resamples):
        pooled = [x for ratios in rng.choices(per_run, k=len(per_run)) for x in rng.choices(ratios, k=len(ratios))]
        meds.append(statistics.median(pooled))
    meds.sort()
    lo, hi = meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]
    each = ", ".join(f"{statistics.median(r):.3f}" for r in per_run)
    pooled = [x for r in per_run for x in r]
    return (f"{statistics.median(pooled):.3f}x (95% CI {lo:.3f}-{hi:.3f} over {len(runs)} runs of fresh processes; "
            f"each run: {each})")


def cmd_phases(args) -> None:
    """Each case's step split into forward, backward and optimizer (clip + AdamW), interleaved."""
    header(args)
    T = args.T or 128
    last = {c: {} for c in args.cases}
    runs = {c: build(c, args.size, T, phases=last[c])[1] for c in args.cases}
    x, y = batch(args.batch, T)
    times = {c: {"forward": [], "backward": [], "optimizer": []} for c in args.cases}
    for i in range(args.warmup + args.steps):
        for c in args.cases:
            runs[c](x, y)
            if i >= args.warmup:
                for k, v in last[c].items():
                    times[c][k].append(v)
    print(f"\nsize {args.size}, T={T}, batch {args.batch}: median ms of {args.steps} interleaved steps after {args.warmup} warm-up\n")
    print("| case | forward | backward | optimizer | step |")
    print("|---|---:|---:|---:|---:|")
    for c in args.cases:
        med = {k: statistics.median(v) * 1e3 for k, v in times[c].items()}
        print(f"| {c} | {med['forward']:.1f} | {med['backward']:.1f} | {med['optimizer']:.1f} | {sum(med.values()):.1f} |")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def step_memory_mib(case, size, B, T, threads) -> float:
    """Peak resident memory of one training step above the resident set before it, in a fresh process.

    glibc would keep the blocks the warm-up step freed and hand them out again, so a step could
    peak without raising the resident set at all (the smaller the step, the more of it hides).
    The worker therefore runs with MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB, which gives every
    larger block its own mapping, returned to the system when freed, and trims the heap before
    measuring: the resident set then follows the live tensors."""
    cmd = [sys.executable, __file__, "_memory", case, "--size", size, "--batch", str(B), "--T", str(T),
           "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["step_mib"]


def _memory_worker(args) -> None:
    _, step = build(args.case, args.size, args.T)
    x, y = batch(args.batch, args.T)
    step(x, y)  # warm-up: AdamW state, allocator
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the heap's free blocks back: RSS = what is live
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step(x, y)
    print(json.dumps({"step_mib": (_status_kib("VmHWM") - before) / 1024}))


def header(args, extra: str = "") -> None:
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}{extra}")
    print(f"# {' '.join(sys.argv)}")


def cmd_steps(args) -> None:
    header(args)
    cases = args.cases
    runs = []
    isolated = args.isolated or args.processes > 1  # --processes runs are isolated runs
    if isolated:
        for _ in range(args.processes):
            runs.append(step_times_isolated(cases, args.size, args.batch, args.T or 128, args.steps, args.warmup, args.threads))
        times = {c: [t for r in runs for t in r[c]] for c in cases}
    else:
        times = step_times(cases, args.size, args.batch, args.T or 128, args.steps, args.warmup)
    med = {c: statistics.median(v) for c, v in times.items()}
    cfg = ModelConfig.from_preset("SM+LN+G", args.size, vocab_size=VOCAB)
    print(f"\nsize {args.size}: L={cfg.n_layer} H={cfg.n_head} d={cfg.n_embd} T={args.T or 128} V={VOCAB}, "
          f"batch {args.batch}, median of {args.steps} interleaved steps after {args.warmup} warm-up"
          f"{', each case in a process of its own' if isolated else ', all cases in one process'}"
          f"{f', {args.processes} runs, fresh processes each' if args.processes > 1 else ''}\n")
    print("| case | config | ms/step | vs twin | vs reference |")
    print("|---|---|---:|---:|---:|")
    for c in cases:
        vs_twin = f"{med[c] / med['twin']:.3f}x" if c.startswith(("ereg", "twin")) and "twin" in med else ""
        vs_ref = f"{med['reference'] / med[c]:.3f}x" if c in ("reference", "reference-split", "baseline", "baseline-full-loss") and "reference" in med else ""
        print(f"| {c} | {CASES[c] or REFERENCE_LABEL[c]} | {med[c] * 1e3:.1f} | {vs_twin} | {vs_ref} |")
    if {"ereg", "twin"} <= med.keys():
        r = med["ereg"] / med["twin"]
        before = "; ".join(f"{c}: {med[c] / med['twin']:.3f}x" for c in ("ereg-flash", "ereg-explicit") if c in med)
        print(f"\nEReg / twin step time: {r:.3f}x (target <= 1.05x: {'met' if r <= 1.05 else 'MISSED'}); "
              f"paired by round: {paired_summary(times, 'ereg', 'twin')}" + (f"; before ({before})" if before else ""))
    if {"reference", "baseline"} <= med.keys():
        b = med["reference"] / med["baseline"]
        print(f"baseline speed vs reference (reference ms / baseline ms): {b:.3f}x (target >= 1.00x: {'met' if b >= 1 else 'MISSED'}); "
              f"paired by round: {paired_summary(times, 'reference', 'baseline')}")
    if len(runs) > 1:
        for num, den in (("ereg", "twin"), ("reference", "baseline"), ("reference", "baseline-full-loss")):
            if {num, den} <= med.keys():
                print(f"{num} / {den}, paired by round, over runs: {paired_runs_summary(runs, num, den)}")
    for num, den, label in ABLATION_PAIRS:
        if {num, den} <= med.keys():
            print(f"{label}, paired by round: {paired_summary(times, num, den)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "batch": args.batch, "isolated": isolated, "ms": {c: v * 1e3 for c, v in med.items()},
                                               "step_ms": {c: [t * 1e3 for t in v] for c, v in times.items()},
                                               **({"runs_step_ms": [{c: [t * 1e3 for t in v] for c, v in r.items()} for r in runs]}
                                                  if len(runs) > 1 else {})}, indent=1))


def cmd_profile(args) -> None:
    """Self CPU time per ATen op of each case (torch.profiler, the cases one after another), side by
    side: where two cases' steps differ, op by op, apart from the machine's noise."""
    from torch.profiler import ProfilerActivity, profile

    header(args)
    per_op, wall = {}, {}
    for c in args.cases:
        _, step = build(c, args.size, args.T or 128)
        x, y = batch(args.batch, args.T or 128)
        for _ in range(args.warmup):
            step(x, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            wall[c] = (time.perf_counter() - t0) * 1e3 / args.steps
        per_op[c] = {e.key: (e.self_cpu_time_total / 1e3 / args.steps, e.count // args.steps) for e in prof.key_averages()}
    ops = sorted(set().union(*per_op.values()), key=lambda k: -max(v.get(k, (0, 0))[0] for v in per_op.values()))
    print(f"\nsize {args.size}, batch {args.batch}, self CPU ms per step (calls per step), mean of {args.steps} steps\n")
    print("| op | " + " | ".join(args.cases) + " |")
    print("|---|" + "---:|" * len(args.cases))
    for k in ops[:args.top]:
        print(f"| {k} | " + " | ".join(f"{per_op[c].get(k, (0, 0))[0]:.1f} ({per_op[c].get(k, (0, 0))[1]})" for c in args.cases) + " |")
    ops_ms = {c: sum(v[0] for v in per_op[c].values()) for c in args.cases}
    print("| all ops | " + " | ".join(f"{ops_ms[c]:.1f}" for c in args.cases) + " |")
    # what no op accounts for: Python, module calls, the dispatcher, the autograd engine
    print("| wall per step (profiled) | " + " | ".join(f"{wall[c]:.1f}" for c in args.cases) + " |")
    print("| wall outside ops | " + " | ".join(f"{wall[c] - ops_ms[c]:.1f}" for c in args.cases) + " |")


def cmd_scaling(args) -> None:
    header(args)
    cases = args.cases
    cfg = ModelConfig.from_preset("SM+LN+G", args.size, vocab_size=VOCAB)
    print(f"\nsize {args.size} (L={cfg.n_layer} H={cfg.n_head} d={cfg.n_embd}), B x T = {args.tokens} tokens per step, "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up; step MiB: peak RSS of one step above "
          "the RSS before it, each case alone in a fresh process\n")
    print("| T | B | " + " | ".join(f"{c} ms" for c in cases) + " | " + " | ".join(f"{c} MiB" for c in cases)
          + " | EReg/twin time | EReg/twin MiB |")
    print("|" + "---:|" * (2 + 2 * len(cases) + 2), flush=True)
    rows = []
    for T in args.lengths:  # each row printed when measured
        B = max(1, args.tokens // T)
        med = time_cases(cases, args.size, B, T, args.steps, args.warmup)
        mem = {c: step_memory_mib(c, args.size, B, T, torch.get_num_threads()) for c in cases}
        rows.append({"T": T, "B": B, "ms": {c: v * 1e3 for c, v in med.items()}, "mib": mem})
        print(f"| {T} | {B} | " + " | ".join(f"{med[c] * 1e3:.0f}" for c in cases) + " | "
              + " | ".join(f"{mem[c]:.0f}" for c in cases)
              + (f" | {med['ereg'] / med['twin']:.3f}x | {mem['ereg'] / mem['twin']:.3f}x |"
                 if {"ereg", "twin"} <= med.keys() else " | | |"), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def cmd_entropy(args) -> None:
    """`piformer entropy`'s measurement (measure_head_entropy) on a run: the fused path against the
    explicit one it used before, interleaved repeats."""
    from piformer.analysis.measure import measure_head_entropy, val_batches
    from piformer.checkpoint import load_model, resolve_checkpoint

    header(args)
    if args.run:
        if not args.data:
            raise SystemExit("entropy --run needs --data, the run's prepared data directory")
        model = load_model(resolve_checkpoint(Path(args.run), "best")).eval()
        T = model.config.block_size
        batches = list(val_batches(args.data, T, args.batch, args.batches, vocab_size=model.config.vocab_size))
    else:  # an untrained model of --size at context --T on random tokens: the cost does not depend on the weights
        model, _ = build("ereg", args.size, args.T)
        model.eval()
        T = args.T
        batches = [batch(args.batch, T, seed=i)[0] for i in range(args.batches)]
    def with_kernel(kernel):
        def fn(idx):
            os.environ[KERNEL_ENV] = kernel
            return model(idx, return_entropy=True).head_entropy
        return fn

    ways = {"explicit (before)": lambda idx: model(idx, return_attention=True).head_entropy,
            "fused, flash kernel at 2D": with_kernel("flash"), "fused, C++ kernel": with_kernel("cpp")}
    times = {name: [] for name in ways}
    results = {}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            results[name], _ = measure_head_entropy(fn, batches)
            times[name].append(time.perf_counter() - t0)
    diff = max(float((results["explicit (before)"] - r).abs().max()) for r in results.values())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.run or f'untrained EReg(SM(t)+ScFuFFN), {args.size}'}: L={model.config.n_layer} H={model.config.n_head} d={model.config.n_embd} T={T}, "
          f"{len(batches)} batches x {args.batch} sequences, median of {args.repeats} interleaved repeats\n")
    print("| entropy measurement | seconds | speed-up |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {med['explicit (before)'] / v:.2f}x |")
    print(f"\nlargest difference between the fused and explicit (L, H) entropy tables: {diff:.2e} nats")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "run": args.run, "size": None if args.run else args.size, "T": T, "batch": args.batch,
            "batches": len(batches), "repeats": args.repeats, "seconds": med,
            "speedup": {k: med["explicit (before)"] / v for k, v in med.items()}, "max_abs_diff_nats": diff}, indent=1))


def cmd_kernel(args) -> None:
    """The attention alone, forward + backward: SDPA (the twin) against the fused entropy pass."""
    import torch.nn.functional as F

    from piformer.attention import attention_with_entropy

    header(args)
    B, H, T, D = args.batch, args.heads, args.T, args.head_dim
    qkv = torch.randn(B, T, 3 * H * D, requires_grad=True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, -1))  # strided, as PiGPT's

    def sdpa():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.transpose(1, 2).sum().backward()

    def fused(kernel):
        def run():
            y, ent = attention_with_entropy(q, k, v, kernel=kernel)
            (y.transpose(1, 2).sum() + ent.sum()).backward()
        return run

    ways = {"sdpa": sdpa, "entropy, flash kernel at 2D": fused("flash"), "entropy, C++ kernel": fused("cpp")}
    times = {name: [] for name in ways}
    for i in range(args.warmup + args.steps):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nattention forward + backward, B={B} H={H} T={T} D={D}, median of {args.steps} interleaved runs\n")
    print("| attention | ms | vs sdpa |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.1f} | {v / med['sdpa']:.2f}x |")


def cmd_loss(args) -> None:
    """The loss alone, forward + backward from the final hidden states: F.cross_entropy over full
    logits against piformer.loss's chunked loss at several chunk sizes, side by side."""
    from piformer.loss import linear_cross_entropy

    header(args)
    N, C, V = args.rows, args.width, args.vocab
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.02
    targets = torch.randint(0, V, (N,), generator=g)
    losses = {"full": lambda h, w: torch.nn.functional.cross_entropy(h @ w.t(), targets)}
    for rows in args.chunks:
        losses[f"chunked {rows}"] = lambda h, w, rows=rows: linear_cross_entropy(h, w, targets, chunk_rows=rows)

    def one_step(name: str) -> float:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        t0 = time.perf_counter()
        losses[name](h, w).backward()
        return time.perf_counter() - t0

    times = _take_turns(list(losses), args.steps, args.warmup, one_step)
    print(f"\nloss forward + backward from hidden (N={N}, C={C}) and weight (V={V}), median of {args.steps} "
          f"interleaved runs after {args.warmup} warm-up\n")
    print("| loss | ms | paired vs full (95% CI) |")
    print("|---|---:|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t) * 1e3:.1f} | {'' if name == 'full' else paired_summary(times, name, 'full')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": N, "width": C, "vocab": V,
                                               "step_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--size", default="cpu-small")
    common.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2, this machine's cores)")
    common.add_argument("--steps", type=int, default=5)
    common.add_argument("--warmup", type=int, default=1)
    common.add_argument("--json", default=None)
    common.add_argument("--cases", nargs="+", choices=list(CASES), default=[c for c in CASES if c not in OPTIONAL],
                        help="cases to run (steps, scaling); default all; 'twin' and 'ereg' give the ratio")
    p = sub.add_parser("steps", parents=[common], help="every case at one shape")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--T", type=int, default=None, help="context (default 128)")
    p.add_argument("--isolated", action="store_true",
                   help="each case in a worker process of its own (still stepping in turn), not all in one process")
    p.add_argument("--processes", type=int, default=1,
                   help="with more than 1: that many --isolated runs, each with fresh worker processes, and the "
                        "ratios' intervals over runs (a process's placement shifts all its steps alike)")
    p = sub.add_parser("phases", parents=[common], help="each case's step split into forward, backward, optimizer")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--T", type=int, default=None, help="context (default 128)")
    p = sub.add_parser("profile", parents=[common], help="self CPU time per op of each case (torch.profiler), side by side")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--T", type=int, default=None, help="context (default 128)")
    p.add_argument("--top", type=int, default=25, help="ops shown, by largest time")
    p = sub.add_parser("scaling", parents=[common], help="T = 128..1024 at a fixed number of tokens per step")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    p = sub.add_parser("entropy", parents=[common], help="measure_head_entropy on a run, before/after")
    p.add_argument("--run", default=None, help="a run directory (default: an untrained model of --size)")
    p.add_argument("--data", default=None, help="the run's data directory (with --run)")
    p.add_argument("--T", type=int, default=512, help="context of the untrained model (without --run)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("kernel", parents=[common], help="the attention alone: SDPA against both entropy kernels")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=32)
    p = sub.add_parser("loss", parents=[common], help="the loss alone: full logits against the chunked loss")
    p.add_argument("--rows", type=int, default=2048, help="tokens per step (B x T)")
    p.add_argument("--width", type=int, default=256, help="hidden width C")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512, 1024, 2048], help="rows per chunk to try")
    p = sub.add_parser("_memory", parents=[common])
    p.add_argument("case", choices=list(CASES))
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--T", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"steps": cmd_steps, "phases": cmd_phases, "profile": cmd_profile, "scaling": cmd_scaling, "entropy": cmd_entropy, "kernel": cmd_kernel,
     "loss": cmd_loss, "_memory": _memory_worker}[args.cmd](args)


if __name__ == "__main__":
    main()
