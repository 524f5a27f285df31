"""A cross-check of the per-step accounting: the whole forward pass as ONE SPU executable.

`pi-run` runs the program step by step, pays SPU's one-time setup in a setup pass and reports
it apart. This runs the same program composed into a single JAX function, compiled once, on a
fresh pair of runtimes with no warm-up, and reads the one run's counters from SPU's log: its
bytes are the one-time setup plus one inference, with nothing subtracted or attributed. The
two tools agree when `report.total_bytes + report.setup["bytes"]` equals `bytes` here.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from piformer.config import ModelConfig
from piformer.pi import jax_forward as jf
from piformer.pi.secure import CLIENT, SERVER, _example, _input_dtype, _reconstruct, in_two_threads
from piformer.pi.spu_backend import SPULog, SPUSettings, compile_step, local_share, mem_link_desc, require_spu


def whole_program(program: jf.Program):
    """The program's steps composed into one function of (client inputs..., server inputs...)."""
    names = [*program.client_inputs, *program.server_inputs]

    def forward(*args):
        env = dict(zip(names, args))
        for s in program.steps:
            env.update(zip(s.outputs, s.fn(*(env[n] for n in s.inputs))))
        return tuple(env[n] for n in program.logit_outputs)

    return forward, names


def run_as_one_program(sd: dict[str, np.ndarray], cfg: ModelConfig, ids: np.ndarray,
                       settings: SPUSettings | None = None, vocab_chunk: int = 4096) -> dict[str, Any]:
    """Bytes, messages and seconds of the whole secure forward pass run as one executable, both
    parties as threads over a fresh in-memory link, plus the logits it reconstructs."""
    spu = require_spu()
    settings = settings or SPUSettings()
    ids = np.asarray(ids).reshape(-1)
    program = jf.build_program(cfg, len(ids), vocab_chunk=vocab_chunk, exp_clip=settings.exp_clip)
    params = jf.chunk_params(jf.prepare_params(sd, cfg, len(ids)), program.vocab_chunks)
    inputs = {**jf.one_hot_chunks(ids, program.vocab_chunks), **{n: params[n] for n in program.server_inputs}}
    fn, names = whole_program(program)
    shapes = {**program.client_inputs, **program.server_inputs}
    exe = compile_step(fn, [_example(shapes[n], n) for n in names], names, program.logit_outputs,
                       "whole-program", settings.compiler_options())
    owners = {**{n: CLIENT for n in program.client_inputs}, **{n: SERVER for n in program.server_inputs}}
    desc = mem_link_desc()
    offset = SPULog.offset()

    def party(rank: int) -> dict[str, Any]:
        cfg_rt = settings.runtime_config(profile=rank == CLIENT)
        io = spu.Io(2, cfg_rt)
        rt = spu.Runtime(spu.libspu.link.create_mem(desc, rank), cfg_rt)
        for n in names:
            mine = inputs[n] if owners[n] == rank else None
            rt.set_var(n, local_share(io, mine, rank, owners[n], shapes[n], _input_dtype(n)))
        rt.run(exe)
        return {n: rt.get_var(n) for n in program.logit_outputs}

    outputs = in_two_threads(party, "single-program secure run")
    (run,) = [r for r in SPULog.read_from(offset) if r.name == "whole-program"]
    logits = _reconstruct(settings, program, outputs[CLIENT], outputs[SERVER])
    return {"bytes": run.bytes, "messages": run.messages, "seconds": run.exec_s, "logits": logits}


def run_op_repeatedly(fn, pairs: list[tuple[np.ndarray, np.ndarray]], settings: SPUSettings | None = None,
                      name: str = "op") -> list[tuple[np.ndarray, float]]:
    """One two-input function under SPU, compiled once and executed once per (x, y) pair in ONE
    session (the same link and runtimes throughout, as a long secure run uses them): the client
    holds x, the server y. Returns each execution's reconstructed output and seconds, in order.

    This is how a single primitive is stress-tested: every output can be checked exactly."""
    spu = require_spu()
    settings = settings or SPUSettings()
    x0, y0 = pairs[0]
    exe = compile_step(fn, [np.zeros_like(x0, np.float32), np.zeros_like(y0, np.float32)], ["x", "y"], ["out"],
                       name, settings.compiler_options())
    owners, desc = {"x": CLIENT, "y": SERVER}, mem_link_desc()

    def party(rank: int) -> list[tuple[Any, float]]:
        cfg_rt = settings.runtime_config(profile=False)
        io = spu.Io(2, cfg_rt)
        rt = spu.Runtime(spu.libspu.link.create_mem(desc, rank), cfg_rt)
        got = []
        for x, y in pairs:
            for n, v in (("x", x), ("y", y)):
                mine = v.astype(np.float32) if owners[n] == rank else None
                rt.set_var(n, local_share(io, mine, rank, owners[n], v.shape, np.float32))
            t0 = time.perf_counter()
            rt.run(exe)
            got.append((rt.get_var("out"), time.perf_counter() - t0))
        return got

    outs = in_two_threads(party, f"secure {name}")
    io = spu.Io(2, settings.runtime_config(profile=False))
    return [(np.asarray(io.reconstruct([c[0], s[0]])), c[1]) for c, s in zip(outs[CLIENT], outs[SERVER])]
