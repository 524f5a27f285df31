"""Where SPU's rsqrt stops being right: the range behind `jax_forward.RSQRT_VALID_BELOW`.

Runs jax.lax.rsqrt under SPU's simulator (CHEETAH, 18 fraction bits, FM64 and FM128) on values
from 1e-3 to 1e9 and prints each relative error; results/pi/rsqrt_range.json keeps them. Also
LayerNorm, plain and wide (`--ln-wide`), on rows of standard deviation 0.01 to 3,000.

    python benchmarks/bench_pi_rsqrt_range.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from piformer.fileio import atomic_write_text  # noqa: E402

VALUES = [1e-3, 1e-1, 1.0, 1e2, 1e4, 1e5, 1.2e5, 1.31e5, 1.32e5, 1.5e5, 1e6, 1e7, 1e8, 1e9]
ROW_STDS = [0.01, 0.1, 1.0, 10.0, 100.0, 300.0, 1000.0, 3000.0]


def main() -> None:
    import jax
    import spu.libspu as libspu
    import spu.utils.simulation as spsim

    from piformer.pi.jax_forward import _layernorm

    out: dict = {"rsqrt": {}, "layernorm": {}}
    for field in ("FM64", "FM128"):
        conf = libspu.RuntimeConfig(protocol=libspu.ProtocolKind.CHEETAH, field=getattr(libspu.FieldType, field),
                                    fxp_fraction_bits=18)
        sim = spsim.Simulator(2, conf)
        v = np.array(VALUES, np.float32)
        got = np.asarray(spsim.sim_jax(sim, lambda a: jax.lax.rsqrt(a))(v), np.float64)
        rel = np.abs(got * np.sqrt(v.astype(np.float64)) - 1.0)
        out["rsqrt"][field] = {f"{a:g}": float(e) for a, e in zip(VALUES, rel)}
        print(f"rsqrt, CHEETAH {field}, 18 fraction bits: relative error by input")
        for a, e in zip(VALUES, rel):
            print(f"  {a:>10g}  {e:.2e}{'   WRONG' if e > 0.01 else ''}")
    conf = libspu.RuntimeConfig(protocol=libspu.ProtocolKind.CHEETAH, field=libspu.FieldType.FM64, fxp_fraction_bits=18)
    sim = spsim.Simulator(2, conf)
    rows = np.random.default_rng(0).normal(size=(len(ROW_STDS), 768)).astype(np.float32) * np.array(ROW_STDS, np.float32)[:, None]
    w = np.ones(768, np.float32)
    ref = np.asarray(_layernorm(rows, w))
    print("LayerNorm (d=768), CHEETAH FM64: max |error| per row of standard deviation s")
    for wide in (False, True):
        got = np.asarray(spsim.sim_jax(sim, lambda a, ww, _w=wide: _layernorm(a, ww, wide=_w))(rows, w))
        err = np.abs(got - ref).max(-1)
        out["layernorm"]["wide" if wide else "plain"] = {f"{s:g}": float(e) for s, e in zip(ROW_STDS, err)}
        print(f"  {'wide ' if wide else 'plain'}: " + ", ".join(f"s={s:g}: {e:.3g}" for s, e in zip(ROW_STDS, err)))
    atomic_write_text(ROOT / "results/pi/rsqrt_range.json", json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
