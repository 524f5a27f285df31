"""Two-party secure inference of a PiGPT checkpoint under SecretFlow SPU, measured.

Parties: the client (rank 0) owns its token ids; the server (rank 1) owns the weights. Each
is a *private input* of its owner (SPU's colocated private values): nothing is sent to share
them. The forward pass (`piformer.pi.jax_forward` program: one-hot embedding over vocabulary
chunks, every block, final LayerNorm, tied vocabulary projection) runs step by step under SPU;
the server then sends its shares of the logits to the client, who alone reconstructs them.

Counting: every step is its own SPU executable; SPU's profiler logs the bytes and messages its
link carried during each run, and we sum those per operator class. Nothing is estimated by a
formula. SPU pays one-time setup lazily (base OTs, HE keys, and more the first time an
operator runs at a new shape), so a *setup pass* runs first on the same runtimes: the same
program with one block and the vocabulary cut to the chunk shapes it uses, on dummy inputs, so every
distinct step (function and shapes) has run once before the measured pass. The setup is
reported apart: what the setup pass cost beyond the steady-state cost of the same steps.

Two modes share this code: both parties as threads of one process over SPU's in-memory link
(`run_secure`, for tests and benchmarks), and two OS processes over brpc/TCP (`serve` and
`query`, behind `piformer pi-serve` / `pi-query`, or `pi-run --two-process`).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from piformer.config import ModelConfig
from piformer.pi import jax_forward as jf
from piformer.pi.spu_backend import (
    PROGRAM_OPTIONS, UNSAFE_SETTINGS_WARNING, RunCounters, SPULog, SPUSettings, brpc_link, compile_step, local_share,
    mem_link_desc, rename, require_spu, share_from_bytes, share_to_bytes, wait_for_listener,
)

CLIENT, SERVER = 0, 1

# Network models for the latency projection: (bits per second, round-trip time in seconds).
NETWORKS = {
    "LAN": (3e9, 0.8e-3),  # 3 Gbit/s, 0.8 ms: a common LAN setting in PI papers
    "WAN": (100e6, 80e-3),  # the paper's WAN: 100 Mbit/s, 80 ms
}


# ----------------------------------------------------------------------------------------
# Report


@dataclass
class ClassCost:
    bytes: int = 0
    messages: int = 0
    seconds: float = 0.0
    steps: int = 0


@dataclass
class SecureReport:
    """What one secure forward pass cost and how close it came to plaintext."""

    settings: dict[str, Any]
    mode: str  # "threads" or "processes"
    seq_len: int
    config: dict[str, Any]
    layers_run: int
    steps: list[dict[str, Any]] = field(default_factory=list)  # per step: name, class, bytes, messages, seconds
    per_class: dict[str, ClassCost] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)  # the setup pass beyond steady state (one-time costs)
    reveal_bytes: int = 0  # server -> client shares of the logits
    wall_s: float = 0.0  # forward pass, both parties, after the setup pass
    compile_s: float = 0.0
    accuracy: dict[str, Any] = field(default_factory=dict)
    network: dict[str, Any] = field(default_factory=dict)  # emulated link, two-process mode
    one_way_waits: float | None = None  # measured by `measure_rounds`; else messages stand in
    logits: np.ndarray | None = None

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.per_class.values())

    @property
    def total_messages(self) -> int:
        return sum(c.messages for c in self.per_class.values())

    def latency(self, network: str | tuple[float, float]) -> dict[str, float]:
        """compute + bytes / bandwidth + waits x RTT / 2 (see `latency_model`): measured one-way
        waits if `measure_rounds` ran, else SPU's message count (an upper bound)."""
        bw, rtt = NETWORKS[network] if isinstance(network, str) else network
        waits = self.one_way_waits if self.one_way_waits is not None else self.total_messages
        return latency_model(self.wall_s, self.total_bytes + self.reveal_bytes, waits, bw, rtt)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "logits"}
        d["per_class"] = {k: asdict(v) for k, v in self.per_class.items()}
        d["total_bytes"] = self.total_bytes
        d["total_messages"] = self.total_messages
        d["latency"] = {name: self.latency(name) for name in NETWORKS}
        return d


def latency_model(compute_s: float, nbytes: int, waits: float, bandwidth_bps: float, rtt_s: float) -> dict[str, float]:
    """Projected latency = compute + transfer + waiting.

    * compute: the measured wall time of the secure run (both parties on this machine, link in
      memory or on loopback, so it holds almost no network time);
    * transfer: bytes (both directions) x 8 / bandwidth, i.e. the two directions do not overlap;
    * waiting: one-way waits x RTT / 2. The waits are measured by `measure_rounds` (a delayed
      TCP link); without that measurement SPU's message count stands in, an upper bound
      (SPU 0.9.5 reports messages, not rounds, and most of its messages overlap).
    """
    transfer = nbytes * 8.0 / bandwidth_bps
    waiting = waits * rtt_s / 2.0
    return {"compute_s": compute_s, "transfer_s": transfer, "waiting_s": waiting,
            "total_s": compute_s + transfer + waiting, "bandwidth_bps": bandwidth_bps, "rtt_s": rtt_s}


# ----------------------------------------------------------------------------------------
# Compilation of a program


def _input_dtype(name: str):
    """One-hot token chunks are integers (multiplied into the embedding without truncation)."""
    return np.int32 if name.startswith("onehot.") else np.float32


def _example(shape, name: str):
    return np.zeros(shape, dtype=_input_dtype(name))


def compile_program(program: jf.Program, settings: SPUSettings, cache: dict | None = None,
                    prefix: str = "") -> tuple[dict[str, Any], dict[str, tuple]]:
    """One SPU executable per step, and each step's signature (function key, input shapes and
    dtypes); steps with the same signature share the code.

    `cache` shares compiled code between programs (the setup pass and the measured pass);
    `prefix` binds the executables to prefixed step and value names, so that two programs can
    run on one runtime and SPU's log tells their runs apart.
    """
    import jax

    copts = settings.compiler_options()
    shapes: dict[str, tuple[int, ...]] = {**program.client_inputs, **program.server_inputs}
    cache = {} if cache is None else cache
    exes: dict[str, Any] = {}
    sigs: dict[str, tuple] = {}
    for s in program.steps:
        args = [_example(shapes[n], n) for n in s.inputs]
        sig = (s.key, tuple((a.shape, a.dtype.str) for a in args))
        if sig not in cache:
            cache[sig] = compile_step(s.fn, args, list(s.inputs), list(s.outputs), s.name, copts)
        exes[s.name] = rename(cache[sig], prefix + s.name, [prefix + n for n in s.inputs],
                              [prefix + n for n in s.outputs])
        sigs[s.name] = sig
        # shapes of this step's outputs, for the steps that read them
        outs = jax.eval_shape(s.fn, *args)
        for n, o in zip(s.outputs, outs):
            shapes[n] = tuple(o.shape)
    return exes, sigs


SETUP_PREFIX = "setup/"


def setup_program(cfg: ModelConfig, program: jf.Program) -> jf.Program:
    """The setup pass of `program`: one block, and a vocabulary of at most three chunks (first,
    a middle one, the last, which may be shorter), so that every distinct step of `program`
    (same function, same shapes) occurs in it. Its cost is paid once per session."""
    from dataclasses import replace

    st = program.settings
    chunk = st["vocab_chunk"]
    n = len(program.vocab_chunks)
    vocab = cfg.vocab_size if n <= 3 else 2 * chunk + (cfg.vocab_size - (n - 1) * chunk)
    return jf.build_program(replace(cfg, vocab_size=vocab), program.seq_len, vocab_chunk=chunk,
                            layers=min(1, st["layers"]), embed_head=st["embed_head"],
                            last_only=bool(st.get("last_only")),
                            **{name: st.get(name) for name in PROGRAM_OPTIONS})


@dataclass
class _Compiled:
    """A program and its setup pass, compiled (they share code)."""

    program: jf.Program
    exes: dict[str, Any]
    sigs: dict[str, tuple]
    setup: jf.Program
    setup_exes: dict[str, Any]
    setup_sigs: dict[str, tuple]


def compile_with_setup(cfg: ModelConfig, program: jf.Program, settings: SPUSettings) -> _Compiled:
    cache: dict = {}
    exes, sigs = compile_program(program, settings, cache)
    setup = setup_program(cfg, program)
    setup_exes, setup_sigs = compile_program(setup, settings, cache, prefix=SETUP_PREFIX)
    return _Compiled(program, exes, sigs, setup, setup_exes, setup_sigs)


# ----------------------------------------------------------------------------------------
# One party's execution


@dataclass
class _PartyResult:
    outputs: dict[str, Any] = field(default_factory=dict)  # name -> this party's share
    wall_s: float = 0.0
    warm_s: float = 0.0


def _open_session(rank: int, lctx, settings: SPUSettings, compiled: _Compiled, profile: bool,
                  progress: Progress | None = None) -> tuple[Any, Any, float]:
    """(io, runtime, seconds of the setup pass) of party `rank`: its runtime on `lctx`, after the
    setup pass on dummy inputs has paid SPU's one-time costs."""
    spu = require_spu()
    cfg = settings.runtime_config(profile=profile)
    io, rt = spu.Io(2, cfg), spu.Runtime(lctx, cfg)
    t0 = time.perf_counter()
    _execute(rt, io, rank, compiled.setup, compiled.setup_exes, _dummy_inputs(compiled.setup), SETUP_PREFIX, keep=(),
             progress=(lambda *a: progress("setup pass", *a)) if progress else None)
    return io, rt, time.perf_counter() - t0


def _run_party(rank: int, lctx, settings: SPUSettings, compiled: _Compiled, inputs: dict[str, np.ndarray],
               profile: bool, progress: Progress | None = None) -> _PartyResult:
    """Run the setup pass on dummy inputs, then the whole program, as party `rank`. `inputs`
    holds only this party's own data."""
    res = _PartyResult()
    io, rt, res.warm_s = _open_session(rank, lctx, settings, compiled, profile, progress)
    t0 = time.perf_counter()
    _execute(rt, io, rank, compiled.program, compiled.exes, inputs, "", keep=compiled.program.logit_outputs,
             progress=(lambda *a: progress("secure forward", *a)) if progress else None)
    res.wall_s = time.perf_counter() - t0
    res.outputs = {n: rt.get_var(n) for n in compiled.program.logit_outputs}
    return res


def _dummy_inputs(program: jf.Program) -> dict[str, np.ndarray]:
    """Inputs for the setup pass: its costs do not depend on the values, but they must not be
    all zero (Cheetah refuses an HE product with a zero plaintext: a 'transparent' ciphertext)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, program.vocab_chunks[-1][1], program.seq_len) if program.vocab_chunks else None
    out = jf.one_hot_chunks(ids, program.vocab_chunks) if ids is not None else {}
    for n, shape in {**program.client_inputs, **program.server_inputs}.items():
        if n not in out:
            out[n] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return out


Progress = Callable[..., None]
"""progress(phase, steps_done, steps_total, part, elapsed_s): called as each part (embedding, a
block, the head) of a pass finishes, on one party."""


def print_progress(phase: str, done: int, total: int, part: str, elapsed: float) -> None:
    """A `Progress` that prints one line per part to stderr, with an ETA from the steps left."""
    import sys

    eta = elapsed / done * (total - done) if done else float("nan")
    print(f"{phase}: {part} done (step {done}/{total}), {elapsed:.0f} s, ETA {eta:.0f} s", file=sys.stderr, flush=True)


def _part(step_name: str) -> str:
    """The part of the model a step belongs to: 'embedding', 'block 3', 'final LayerNorm', 'head'."""
    head = step_name.split(".")[0]
    if head.startswith("h") and head[1:].isdigit():
        return f"block {head[1:]}"
    return {"embed": "embedding", "ln_f": "final LayerNorm"}.get(head, head)


def _execute(rt, io, rank: int, program: jf.Program, exes: dict[str, Any], inputs: dict[str, np.ndarray],
             prefix: str, keep, progress: Callable[[int, int, str, float], None] | None = None) -> None:
    """Run `program`'s steps in order; values are named with `prefix`. Private inputs enter right
    before their first use and every value is deleted after its last one (except `keep`), to
    bound memory."""
    owners = {**{n: CLIENT for n in program.client_inputs}, **{n: SERVER for n in program.server_inputs}}
    shapes = {**program.client_inputs, **program.server_inputs}
    last = program.last_use()
    keep = set(keep)
    entered: set[str] = set()
    t0 = time.perf_counter()
    for i, s in enumerate(program.steps):
        for n in s.inputs:
            if n in owners and n not in entered:
                rt.set_var(prefix + n, local_share(io, inputs.get(n), rank, owners[n], shapes[n], _input_dtype(n)))
                entered.add(n)
        rt.run(exes[s.name])
        for n in s.inputs:
            if last.get(n) == i and n not in keep:
                rt.del_var(prefix + n)
        ends_part = i + 1 == len(program.steps) or _part(program.steps[i + 1].name) != _part(s.name)
        if progress is not None and ends_part:
            progress(i + 1, len(program.steps), _part(s.name), time.perf_counter() - t0)
    for n in (o for s in program.steps for o in s.outputs):
        if n not in keep and last.get(n) is None:  # outputs nothing reads (the setup pass's logits)
            rt.del_var(prefix + n)


def _aggregate(report: SecureReport, compiled: _Compiled, runs: list[RunCounters]) -> None:
    program = compiled.program
    by_name = {r.name: r for r in runs}
    missing = [s.name for s in program.steps if s.name not in by_name]
    if missing:
        raise RuntimeError(f"SPU's log has no counters for steps {missing[:5]}... (log: {SPULog.path()})")
    for s in program.steps:
        r = by_name[s.name]
        report.steps.append({"name": s.name, "class": s.op_class, "bytes": r.bytes, "messages": r.messages,
                             "seconds": r.exec_s, "ops": r.ops})
        c = report.per_class.setdefault(s.op_class, ClassCost())
        c.bytes += r.bytes
        c.messages += r.messages
        c.seconds += r.exec_s
        c.steps += 1
    report.setup = setup_cost(compiled, by_name)


def setup_cost(compiled: _Compiled, by_name: dict[str, RunCounters]) -> dict[str, Any]:
    """SPU's one-time setup: what the setup pass cost beyond the measured pass's cost of the
    same steps. A step's steady-state cost is the mean over the measured steps with its
    signature: OT buffers are refilled now and then, inside whichever step empties them, and
    the mean spreads those refills over the steps that consume them."""
    groups: dict[tuple, list[RunCounters]] = {}
    for s in compiled.program.steps:
        groups.setdefault(compiled.sigs[s.name], []).append(by_name[s.name])
    counters = {"bytes": "bytes", "messages": "messages", "seconds": "exec_s"}  # report key -> RunCounters field
    steady = {sig: {k: np.mean([getattr(r, f) for r in rs]) for k, f in counters.items()} for sig, rs in groups.items()}
    total = dict.fromkeys(counters, 0.0)
    beyond = dict.fromkeys(counters, 0.0)
    for s in compiled.setup.steps:
        r = by_name.get(SETUP_PREFIX + s.name)
        if r is None:
            raise RuntimeError(f"SPU's log has no counters for the setup step {s.name} (log: {SPULog.path()})")
        ref = steady[compiled.setup_sigs[s.name]]
        for k, f in counters.items():
            total[k] += getattr(r, f)
            beyond[k] += getattr(r, f) - ref[k]
    beyond = {"bytes": int(round(beyond["bytes"])), "messages": int(round(beyond["messages"])),
              "seconds": max(0.0, float(beyond["seconds"]))}  # timing noise can exceed the setup's own time
    return {**beyond, "pass_bytes": int(total["bytes"]), "pass_messages": int(total["messages"]),
            "pass_seconds": total["seconds"], "steps": len(compiled.setup.steps)}


LOGIT_TOLERANCE = 0.5
"""Largest |secure - plaintext| logit that counts as fixed-point imprecision rather than a wrong
result. FM64 with 18 fraction bits measured 0.09 at most on GPT-2-small-sized parts; the
wrong results seen so far were off by 1e6 and more."""


def _accuracy(secure: np.ndarray, plain: np.ndarray, settings: SPUSettings,
              tolerance: float = LOGIT_TOLERANCE, softmax_span: float | None = None,
              ln_variance: float | None = None) -> dict[str, Any]:
    err = np.abs(secure - plain)
    worst = float(err.max()) if np.isfinite(err).all() else float("inf")
    span = {}
    if softmax_span is not None:
        clip = settings.exp_clip
        span = {"softmax_input_span": softmax_span,
                "exp_out_of_range": softmax_span > jf.EXP_VALID_RANGE and (clip is None or clip > jf.EXP_VALID_RANGE)}
    if ln_variance is not None:
        span.update({"layernorm_input_variance": ln_variance,
                     "layernorm_out_of_range": ln_variance >= jf.RSQRT_VALID_BELOW and not settings.ln_wide})
    # A flip where plaintext's top two logits are closer than the fixed-point error is a tie
    # broken the other way, not a wrong value: each disagreement carries plaintext's top-2 gap.
    top2 = np.sort(plain, axis=-1)[..., -2:]
    flips = np.flatnonzero(secure.argmax(-1) != plain.argmax(-1))
    return {
        **span,
        "argmax_disagreements": [{"position": int(j), "plaintext_top2_gap": float(top2[j, 1] - top2[j, 0])}
                                 for j in flips],
        "max_abs_logit_error": worst,
        "mean_abs_logit_error": float(err.mean()),
        "max_abs_logit": float(np.abs(plain).max()),
        "argmax_agreement": float((secure.argmax(-1) == plain.argmax(-1)).mean()),
        "next_token_match": bool(secure[-1].argmax() == plain[-1].argmax()),
        "fixed_point": f"{settings.field}, {settings.fxp_fraction_bits} fraction bits",
        **_judged(worst, tolerance),
    }


def _check_against_plaintext(logits: np.ndarray, program: jf.Program, inputs: dict[str, np.ndarray],
                             settings: SPUSettings, tolerance: float = LOGIT_TOLERANCE) -> dict[str, Any]:
    """`_accuracy` of secure `logits` against the plaintext program run on the same `inputs`
    (weights and the client's one-hot chunks), with the ranges the fixed point must cover."""
    env = jf.run_program(program, inputs)
    return _accuracy(logits, jf.logits_of(program, env), settings, tolerance,
                     softmax_span=jf.softmax_input_span(program, env),
                     ln_variance=jf.layernorm_input_variance(program, env))


def exp_range_hint(span: float) -> str:
    return (f"softmax inputs reach {span:.4g} below their row's maximum (plaintext run); SPU's exponential is "
            f"accurate only down to -{jf.EXP_VALID_RANGE:g}: rerun with --exp-clip 20 (exact at 18 fraction bits, "
            "where exp(-20) rounds to 0 anyway)")


def layernorm_range_hint(variance: float) -> str:
    return (f"a LayerNorm normalises rows of variance up to {variance:.4g} (plaintext run); SPU's rsqrt returns 0 "
            f"from {jf.RSQRT_VALID_BELOW:.0f} on: rerun with --ln-wide")


def _judged(max_abs_logit_error: float, tolerance: float) -> dict[str, Any]:
    return {"tolerance": tolerance, "within_tolerance": max_abs_logit_error <= tolerance}


def judge(report: "SecureReport", tolerance: float) -> None:
    """Re-judge a checked report against another logit tolerance."""
    if report.accuracy:
        report.accuracy.update(_judged(report.accuracy["max_abs_logit_error"], tolerance))


def disagrees(report: "SecureReport") -> bool:
    """True when the secure logits were checked and are further from plaintext than tolerated."""
    return bool(report.accuracy) and not report.accuracy.get("within_tolerance", True)


# ----------------------------------------------------------------------------------------
# One process, two threads


def in_two_threads(party: Callable[[int], Any], what: str) -> list[Any]:
    """[party(CLIENT), party(SERVER)], each in its own thread (the two ends of an in-memory link);
    the first error either raised is raised here, naming `what` failed."""
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = party(rank)
        except BaseException as err:  # surfaced below, in the caller's thread
            errors.append(err)

    # Daemon threads: on Ctrl-C the main thread stops waiting, and the parties (blocked inside
    # SPU's C++ on each other) must not keep the process alive.
    threads = [threading.Thread(target=run, args=(r,), name=f"spu-party-{r}", daemon=True) for r in (CLIENT, SERVER)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{what} stopped; the secure session was abandoned and nothing was written") from None
    if errors:
        raise RuntimeError(f"{what} failed: {errors[0]}") from errors[0]
    return results


def run_secure(
    sd: dict[str, np.ndarray],
    cfg: ModelConfig,
    ids: np.ndarray,
    settings: SPUSettings | None = None,
    vocab_chunk: int = 4096,
    layers: int | None = None,
    check: bool = True,
    embed_head: bool = True,
    last_only: bool = False,
    progress: Progress | None = None,
) -> SecureReport:
    """Secure forward of token ids `ids` (T,) with both parties as threads of this process.

    `sd` is the folded numpy state dict (`jax_forward.state_dict_to_numpy`). `layers` runs only
    the first blocks and `embed_head=False` leaves out embedding, final LayerNorm and head (the
    benchmark measures parts and extrapolates; the blocks then start from the plaintext
    embedding of `ids`, entered as the client's private input). `check` also runs the plaintext
    program and reports the agreement.
    """
    require_spu()
    settings = settings or SPUSettings()
    ids = np.asarray(ids).reshape(-1)
    T = len(ids)
    program = jf.build_program(cfg, T, vocab_chunk=vocab_chunk, layers=layers, embed_head=embed_head,
                               last_only=last_only, **settings.program_options())
    params = jf.chunk_params(jf.prepare_params(sd, cfg, T), program.vocab_chunks)
    if embed_head:
        client_in = jf.one_hot_chunks(ids, program.vocab_chunks)
    else:
        client_in = {"x.in": (params["wte"][ids] + params["wpe"][:T]).astype(np.float32)}
        params["x.zero"] = np.zeros((T, cfg.n_embd), np.float32)
    server_in = {n: params[n] for n in program.server_inputs}

    t0 = time.perf_counter()
    compiled = compile_with_setup(cfg, program, settings)
    compile_s = time.perf_counter() - t0

    desc = mem_link_desc()
    offset = SPULog.offset()

    def party(rank: int) -> _PartyResult:
        import spu.libspu as libspu

        lctx = libspu.link.create_mem(desc, rank)
        own = client_in if rank == CLIENT else server_in
        # only the client profiles: one party's log sees both directions of the link
        return _run_party(rank, lctx, settings, compiled, own, rank == CLIENT, progress if rank == CLIENT else None)

    results = in_two_threads(party, "secure run")

    report = SecureReport(settings=settings.to_dict(), mode="threads", seq_len=len(ids), config=cfg.to_dict(),
                          layers_run=program.settings["layers"], compile_s=compile_s,
                          wall_s=max(r.wall_s for r in results))
    _aggregate(report, compiled, SPULog.read_from(offset))
    # the server's output shares are what would cross the network to reveal the logits
    report.reveal_bytes = sum(len(share_to_bytes(results[SERVER].outputs[n])) for n in program.logit_outputs)
    logits = _reconstruct(settings, program, results[CLIENT].outputs, results[SERVER].outputs)
    report.logits = logits
    if check:
        report.accuracy = _check_against_plaintext(logits, program, {**params, **client_in}, settings)
    return report


@dataclass
class PromptResult:
    """One prompt of a multi-prompt session (`run_secure_prompts`)."""

    index: int
    seconds: float  # this prompt's secure forward, both parties (setup and compile excluded)
    accuracy: dict[str, Any]


def run_secure_prompts(
    sd: dict[str, np.ndarray],
    cfg: ModelConfig,
    prompts: np.ndarray,
    settings: SPUSettings | None = None,
    vocab_chunk: int = 4096,
    on_prompt: Callable[[PromptResult], None] | None = None,
    tolerance: float = LOGIT_TOLERANCE,
) -> list[PromptResult]:
    """Secure forwards of N prompts of T tokens each, `prompts` (N, T), in one session.

    The program is compiled once and SPU's setup pass runs once; each prompt is then a full
    measured forward on the same runtimes, its logits checked against plaintext as soon as it
    ends and handed to `on_prompt` (so a caller can save prompt by prompt). What it saves over
    N `run_secure` calls is the compile and the setup pass per prompt: at GPT-2 small's shape
    the setup pass alone costs about a fifth of a T=128 forward. Costs per operator are not
    itemised here (the runtimes do not profile); `run_secure` measures those.
    """
    require_spu()
    settings = settings or SPUSettings()
    SPULog.path()  # SPU logs to its file, not the console
    prompts = np.atleast_2d(np.asarray(prompts))
    T = prompts.shape[1]
    program = jf.build_program(cfg, T, vocab_chunk=vocab_chunk, **settings.program_options())
    params = jf.chunk_params(jf.prepare_params(sd, cfg, T), program.vocab_chunks)
    server_in = {n: params[n] for n in program.server_inputs}
    compiled = compile_with_setup(cfg, program, settings)
    desc = mem_link_desc()
    shares: list[dict | None] = [None, None]
    ends = threading.Barrier(2)  # both parties hold their logit shares of the current prompt
    checked = threading.Barrier(2)  # the client has checked them; the next prompt may start
    results: list[PromptResult] = []

    def check(i: int, client_in: dict[str, np.ndarray], seconds: float) -> None:
        logits = _reconstruct(settings, program, shares[CLIENT], shares[SERVER])
        acc = _check_against_plaintext(logits, program, {**params, **client_in}, settings, tolerance)
        results.append(PromptResult(i, seconds, acc))
        if on_prompt is not None:
            on_prompt(results[-1])

    def party(rank: int) -> None:
        import spu.libspu as libspu

        try:
            io, rt, _ = _open_session(rank, libspu.link.create_mem(desc, rank), settings, compiled, profile=False)
            for i, ids in enumerate(prompts):
                t0 = time.perf_counter()
                own = jf.one_hot_chunks(ids, program.vocab_chunks) if rank == CLIENT else server_in
                _execute(rt, io, rank, program, compiled.exes, own, "", keep=program.logit_outputs)
                shares[rank] = {n: rt.get_var(n) for n in program.logit_outputs}
                for n in program.logit_outputs:
                    rt.del_var(n)
                ends.wait()
                if rank == CLIENT:
                    check(i, own, time.perf_counter() - t0)
                checked.wait()
        except BaseException:
            ends.abort()  # the other party must not wait at a barrier for this one
            checked.abort()
            raise

    in_two_threads(party, "secure session")
    return results


def summarise_prompts(results: list[PromptResult], seq_len: int) -> dict[str, Any]:
    """All prompts of a session in one verdict: argmax agreement over every next-token
    prediction, the largest logit error, and each flip with plaintext's top-2 gap there."""
    flips = [{"prompt": r.index, **d} for r in results for d in r.accuracy["argmax_disagreements"]]
    n = len(results) * seq_len
    worst = max((r.accuracy["max_abs_logit_error"] for r in results), default=float("nan"))
    return {
        "prompts": len(results), "predictions": n,
        "argmax_agreement": 1.0 - len(flips) / n if n else float("nan"),
        "argmax_disagreements": flips,
        "max_abs_logit_error": worst,
        "prompts_beyond_tolerance": [r.index for r in results if not r.accuracy["within_tolerance"]],
        "seconds_per_prompt": float(np.median([r.seconds for r in results])) if results else float("nan"),
    }


def _reconstruct(settings: SPUSettings, program: jf.Program, mine: dict, theirs: dict) -> np.ndarray:
    spu = require_spu()
    io = spu.Io(2, settings.runtime_config(profile=False))
    parts = [io.reconstruct([mine[n], theirs[n]]) for n in program.logit_outputs]
    return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts], axis=-1)


# ----------------------------------------------------------------------------------------
# Two processes over brpc: server (weights) and client (tokens)


def _send_json(lctx, dst: int, obj: dict) -> None:
    lctx.send(dst, json.dumps(obj))


def _recv_json(lctx, src: int) -> dict:
    return json.loads(bytes(lctx.recv(src)).decode())


def load_weights(run_dir: str, which: str = "best") -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """What the server holds: a checkpoint's model config and its folded numpy state dict
    (`jax_forward.state_dict_to_numpy`), from a run or checkpoint directory."""
    from piformer.checkpoint import load_model

    model = load_model(run_dir, which=which)
    return model.config, jf.state_dict_to_numpy(model)


def serve(run_dir: str, listen: str, client: str, which: str = "best", log: Callable[[str], None] = print,
          max_queries: int = 1) -> None:
    """The server: load the checkpoint, wait for a client, run its queries securely.

    The client learns the architecture (config.json: public in this threat model) and the
    logits of its own tokens; the weights never leave this process.
    """
    require_spu()
    cfg, sd = load_weights(run_dir, which)
    log(f"pi-serve: SPU's log goes to {SPULog.path()}")
    for _ in range(max_queries):  # one link per client session
        log(f"pi-serve: waiting for a client at {client} (listening on {listen})")
        lctx = brpc_link(SERVER, [client, listen])
        try:
            _serve_one(lctx, cfg, sd, log)
        finally:
            lctx.stop_link()


def _serve_one(lctx, cfg: ModelConfig, sd: dict[str, np.ndarray], log: Callable[[str], None]) -> None:
    _send_json(lctx, CLIENT, {"config": cfg.to_dict()})
    req = _recv_json(lctx, CLIENT)
    if req.get("op") == "close":  # the client gave up (e.g. its tokens did not fit the model)
        return
    settings = SPUSettings(**req["settings"])
    T = int(req["seq_len"])
    program = jf.build_program(cfg, T, vocab_chunk=req["vocab_chunk"], layers=req.get("layers"),
                               last_only=bool(req.get("last_only")), **settings.program_options())
    params = jf.chunk_params(jf.prepare_params(sd, cfg, T), program.vocab_chunks)
    compiled = compile_with_setup(cfg, program, settings)
    log(f"pi-serve: query of {T} tokens, protocol {settings.protocol}")
    res = _run_party(SERVER, lctx, settings, compiled, {n: params[n] for n in program.server_inputs}, profile=False)
    for n in program.logit_outputs:  # reveal to the client only
        lctx.send(CLIENT, share_to_bytes(res.outputs[n]))
    _recv_json(lctx, CLIENT)  # the client's close: it has everything, the link may go
    log(f"pi-serve: done in {res.wall_s:.1f}s")


def query(ids, server: str, listen: str, settings: SPUSettings | None = None, vocab_chunk: int = 4096,
          layers: int | None = None, reference: np.ndarray | None = None, last_only: bool = False,
          connect_timeout_s: float = 30.0, progress: Progress | None = None) -> SecureReport:
    """The client: connect to a server, tell it only how many tokens, get the logits of its tokens.

    `ids` is an array of token ids, or a function of the server's (public) ModelConfig that
    returns one. `reference` (plaintext logits, if the caller has them) adds the agreement check.
    No server answering at `server` within `connect_timeout_s` is a ConnectionError. Any error
    before the query starts (ids that do not fit the model, a bad `ids` function) first tells the
    server to close, so neither side is left waiting.
    """
    require_spu()
    settings = settings or SPUSettings()
    wait_for_listener(server, connect_timeout_s)
    lctx = brpc_link(CLIENT, [listen, server], connect_timeout_s=connect_timeout_s)
    try:
        cfg = ModelConfig.from_dict(_recv_json(lctx, SERVER)["config"])
        try:
            ids = np.asarray(ids(cfg) if callable(ids) else ids).reshape(-1)
            T = len(ids)
            if not 1 <= T <= cfg.block_size:
                raise ValueError(f"{T} tokens: the server's model takes 1..{cfg.block_size}")
            if int(ids.max()) >= cfg.vocab_size or int(ids.min()) < 0:
                raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); got {ids.min()}..{ids.max()}")
        except BaseException:
            _send_json(lctx, SERVER, {"op": "close"})
            raise
        return _query(lctx, cfg, ids, settings, vocab_chunk, layers, reference, last_only, progress)
    finally:
        lctx.stop_link()


def _query(lctx, cfg, ids, settings, vocab_chunk, layers, reference, last_only, progress=None) -> SecureReport:
    T = len(ids)
    _send_json(lctx, SERVER, {"seq_len": T, "settings": settings.to_dict(), "vocab_chunk": vocab_chunk,
                              "layers": layers, "last_only": last_only})
    t0 = time.perf_counter()
    program = jf.build_program(cfg, T, vocab_chunk=vocab_chunk, layers=layers, last_only=last_only,
                               **settings.program_options())
    compiled = compile_with_setup(cfg, program, settings)
    compile_s = time.perf_counter() - t0
    offset = SPULog.offset()
    res = _run_party(CLIENT, lctx, settings, compiled, jf.one_hot_chunks(ids, program.vocab_chunks), True, progress)
    theirs, reveal = {}, 0
    for n in program.logit_outputs:
        data = bytes(lctx.recv(SERVER))
        reveal += len(data)
        theirs[n] = share_from_bytes(data)
    _send_json(lctx, SERVER, {"op": "close"})
    report = SecureReport(settings=settings.to_dict(), mode="processes", seq_len=T, config=cfg.to_dict(),
                          layers_run=program.settings["layers"], compile_s=compile_s, wall_s=res.wall_s,
                          reveal_bytes=reveal)
    _aggregate(report, compiled, SPULog.read_from(offset))
    report.logits = _reconstruct(settings, program, res.outputs, theirs)
    if reference is not None:
        report.accuracy = _accuracy(report.logits, reference, settings)
    return report


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_two_process(
    run_dir: str,
    ids,
    settings: SPUSettings | None = None,
    which: str = "best",
    vocab_chunk: int = 4096,
    layers: int | None = None,
    reference: np.ndarray | None = None,
    delay_s: float | None = None,
    bandwidth_bps: float | None = None,
    ports: tuple[int, int] | None = None,
    log_dir: str | None = None,
    last_only: bool = False,
    progress: Progress | None = None,
) -> SecureReport:
    """Start the server (`python -m piformer.pi.serve`, what `piformer pi-serve` runs) as a child
    process and query it from this process over TCP.

    With `delay_s` (one way; 0 still routes through the relay, as a baseline) or
    `bandwidth_bps`, both connections pass through a userspace relay (`piformer.pi.netsim`)
    that delays and paces them: a measured emulation of a WAN.
    """
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from piformer.pi.netsim import DelayRelay

    client_port, server_port = ports or _free_ports(2)
    client_addr, server_addr = f"127.0.0.1:{client_port}", f"127.0.0.1:{server_port}"
    relays: list[DelayRelay] = []
    if delay_s is not None or bandwidth_bps:
        # the server reaches the client through one relay, the client the server through another
        relays = [DelayRelay(0, ("127.0.0.1", client_port), delay_s or 0.0, bandwidth_bps).start(),
                  DelayRelay(0, ("127.0.0.1", server_port), delay_s or 0.0, bandwidth_bps).start()]
        client_seen_by_server, server_seen_by_client = f"127.0.0.1:{relays[0].port}", f"127.0.0.1:{relays[1].port}"
    else:
        client_seen_by_server, server_seen_by_client = client_addr, server_addr
    log = Path(log_dir or tempfile.mkdtemp(prefix="piformer-serve-")) / "pi-serve.log"
    # The library's own server entry point (not the `piformer` CLI): the same serve() as `piformer pi-serve`.
    cmd = [sys.executable, "-m", "piformer.pi.serve", str(run_dir), "--checkpoint", which,
           "--listen", server_addr, "--client", client_seen_by_server]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            report = query(ids, server_seen_by_client, client_addr, settings, vocab_chunk=vocab_chunk,
                           layers=layers, reference=reference, last_only=last_only, progress=progress)
            rc = server.wait(timeout=300)
        except KeyboardInterrupt:
            server.kill()
            server.wait()
            raise KeyboardInterrupt("secure query stopped; the pi-serve child process was stopped and nothing "
                                    "was written") from None
        except BaseException as err:
            server.kill()
            server.wait()
            raise RuntimeError(f"two-process run failed ({err}); pi-serve said:\n{log.read_text()[-3000:]}") from err
        finally:
            for r in relays:
                r.stop()
    if rc != 0:
        raise RuntimeError(f"pi-serve exited with status {rc}; its output is in {log}")
    report.network = {"delay_s": delay_s, "bandwidth_bps": bandwidth_bps, "server_pid": server.pid,
                      "server_log": str(log)}
    return report


def measure_rounds(run_dir: str, ids, settings: SPUSettings | None = None, delay_s: float = 0.02,
                   vocab_chunk: int = 4096, layers: int | None = None, which: str = "best",
                   last_only: bool = False) -> dict[str, Any]:
    """How many one-way delays the protocol waits for, measured: run the same query over TCP,
    through the relay, without and with an added one-way delay; each step's extra time / delay
    is its count.

    SPU reports messages, not rounds, and most of its messages overlap (OT extension and HE
    traffic is pipelined), so this is the number a latency projection should multiply.
    Run it on a small model: the count depends on depth (layers, sequence length), not on the
    tensor sizes, and small tensors keep compute noise out of the difference.
    """
    def timed(delay: float) -> SecureReport:
        return run_two_process(run_dir, ids, settings, which=which, vocab_chunk=vocab_chunk, layers=layers,
                               delay_s=delay, last_only=last_only)

    base, slow = timed(0.0), timed(delay_s)
    per_class: dict[str, float] = {}
    per_step: dict[str, float] = {}
    for a, b in zip(base.steps, slow.steps):
        extra = max(0.0, b["seconds"] - a["seconds"]) / delay_s
        per_step[a["name"]] = extra
        per_class[a["class"]] = per_class.get(a["class"], 0.0) + extra
    return {
        "delay_s": delay_s, "wall_s": base.wall_s, "wall_delayed_s": slow.wall_s,
        "one_way_waits": (slow.wall_s - base.wall_s) / delay_s,
        "per_class_one_way_waits": per_class, "per_step_one_way_waits": per_step,
        "messages": base.total_messages,
    }


# ----------------------------------------------------------------------------------------
# Formatting


def _red(text: str, color: bool) -> str:
    return f"\033[1;31m{text}\033[0m" if color else text


def format_report(report: SecureReport, color: bool = False) -> str:
    """The report as text; `color` marks a wrong result in red (ANSI), e.g. on a terminal."""
    s = report.settings
    lines = [
        f"secure inference ({report.mode}): protocol {s['protocol']}, {s['field']} with "
        f"{s['fxp_fraction_bits']} fraction bits, T={report.seq_len}, {report.layers_run} of "
        f"{report.config['n_layer']} blocks",
        f"SPU settings: denominator_broadcast={s['denominator_broadcast']} exp_clip={s['exp_clip']}"
        + (f" ot_kind={s['ot_kind']} mul_lsb_error={s['mul_lsb_error']}" if s["protocol"] == "cheetah"
           else " (Beaver triples from a simulated trusted first party: offline phase not counted)"),
    ]
    if s.get("mul_lsb_error"):
        lines.append(_red(f"WARNING: {UNSAFE_SETTINGS_WARNING}", color))
    lines += [
        "",
        f"{'operator class':<12} {'MB (both ways)':>15} {'messages':>10} {'seconds':>9} {'steps':>6}",
    ]
    for name in jf.OP_CLASSES:
        c = report.per_class.get(name)
        if c is None:
            continue
        lines.append(f"{name:<12} {c.bytes / 1e6:>15.3f} {c.messages:>10d} {c.seconds:>9.2f} {c.steps:>6d}")
    lines.append(f"{'total':<12} {report.total_bytes / 1e6:>15.3f} {report.total_messages:>10d} {report.wall_s:>9.2f}")
    lines.append(f"(plus one-time setup {report.setup.get('bytes', 0) / 1e6:.1f} MB, "
                 f"{report.setup.get('messages', 0)} messages; output reveal {report.reveal_bytes / 1e6:.3f} MB "
                 "server -> client)")
    lines.append("messages = link send actions both ways as SPU counts them (not rounds: many overlap)")
    if report.accuracy:
        a = report.accuracy
        lines += ["", f"agreement with plaintext ({a['fixed_point']}): max |logit error| {a['max_abs_logit_error']:.4g} "
                  f"(max |logit| {a['max_abs_logit']:.3g}), argmax agreement {a['argmax_agreement']:.1%}, "
                  f"next token {'matches' if a['next_token_match'] else 'DIFFERS'}"]
        if disagrees(report):
            lines.append(_red(f"WRONG RESULT: the secure logits differ from plaintext by up to {a['max_abs_logit_error']:.4g}, "
                              f"beyond the tolerance of {a['tolerance']:g} (see docs/private_inference.md, 'Accuracy'); "
                              "communication counts are unaffected", color))
        if a.get("exp_out_of_range"):
            lines.append(exp_range_hint(a["softmax_input_span"]))
        if a.get("layernorm_out_of_range"):
            lines.append(layernorm_range_hint(a["layernorm_input_variance"]))
    if report.one_way_waits is not None:
        lines += ["", f"latency = compute + bytes x 8 / bandwidth + one-way waits x RTT / 2, "
                  f"with {report.one_way_waits:.0f} waits measured over a delayed TCP link"]
    else:
        lines += ["", "latency = compute + bytes x 8 / bandwidth + messages x RTT / 2 (messages stand in for "
                  "one-way waits: an upper bound; --measure-rounds measures them)"]
    for name, (bw, rtt) in NETWORKS.items():
        lat = report.latency(name)
        lines.append(f"  {name} ({bw / 1e6:g} Mbit/s, {rtt * 1e3:g} ms): {lat['compute_s']:.2f} + {lat['transfer_s']:.2f} "
                     f"+ {lat['waiting_s']:.2f} = {lat['total_s']:.2f} s")
    if report.network.get("delay_s") or report.network.get("bandwidth_bps"):
        n = report.network
        bw = f"{n['bandwidth_bps'] / 1e6:g} Mbit/s" if n.get("bandwidth_bps") else "unlimited bandwidth"
        lines.append(f"emulated link (userspace relay): {n['delay_s'] * 1e3:g} ms one-way delay, {bw}: "
                     f"the wall time below includes it")
    lines.append(f"wall time {report.wall_s:.2f} s after {report.compile_s:.1f} s compiling")
    return "\n".join(lines)
