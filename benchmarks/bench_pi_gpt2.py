"""GPT-2 small under two-party secure inference (SPU, CHEETAH), beside the paper's Table 2.

What is measured, per SPU settings ('default' = SPU 0.9.5 as shipped, 'optimised' = see
docs/private_inference.md):
  * one GPT-2-small-sized block (d=768, H=12, T=128) of SM+LN+G, SM+LN+R and SM+ScFuFFN,
    starting from a secret-shared input exactly as inside the model;
  * the parts every architecture shares: one-hot embedding (vocabulary in chunks), final
    LayerNorm and the tied vocabulary projection (V=50304).
The 12-layer model is extrapolated as 12 x block + shared parts; every number in it is a
measured one (SPU's own per-run link counters), multiplied by the layer count. MPC costs do
not depend on the weights' values, so random N(0, 0.02) weights stand in for trained ones.

Both parties run as threads of this process over SPU's in-memory link (2 cores here; the
paper used two 32-core machines), so "compute" times are pessimistic.

Usage (about an hour on 2 cores; results are saved piece by piece, rerun to resume):
    nohup python benchmarks/bench_pi_gpt2.py > out/bench_pi_gpt2.log 2>&1 &
    python benchmarks/bench_pi_gpt2.py --report-only          # print the table from saved results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PRESETS = ("SM+LN+G", "SM+LN+R", "SM+ScFuFFN")
PAPER = {  # Table 2: comm GB, latency min (WAN 100 Mbit/s, 80 ms), savings vs SM+LN+G
    "SM+LN+G": (25.32, 8.21),
    "SM+LN+R": (9.44, 6.06),
    "SM+ScFuFFN": (6.43, 4.76),
}
N_LAYER = 12


def measure(part: str, preset: str, settings_name: str, args) -> dict:
    import torch

    from piformer.config import ModelConfig
    from piformer.model import PiGPT
    from piformer.pi.jax_forward import state_dict_to_numpy
    from piformer.pi.secure import run_secure
    from piformer.pi.spu_backend import SPUSettings

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, size="gpt2-small", block_size=args.seq_len)
    sd = state_dict_to_numpy(PiGPT(cfg))
    ids = np.random.default_rng(0).integers(0, 50257, args.seq_len)
    settings = SPUSettings.preset(settings_name)
    t0 = time.perf_counter()
    if part == "block":
        r = run_secure(sd, cfg, ids, settings, layers=1, embed_head=False)
    else:  # embedding + final LayerNorm + head, no block
        r = run_secure(sd, cfg, ids, settings, layers=0, vocab_chunk=args.vocab_chunk)
    d = r.to_dict()
    d["elapsed_s"] = time.perf_counter() - t0
    return d


def measure_rounds(preset: str, settings_name: str, args) -> dict:
    """One-way waits of the protocol, measured over TCP with an added delay (see
    piformer.pi.secure.measure_rounds) on a *narrow* model of GPT-2's depth structure: same
    T=128 (the softmax's max is a log2(T)-deep comparison tree) and the same 13 vocabulary
    chunks, but d=64, H=2, V=13x64. Round counts follow the dependency depth, not the widths;
    narrow tensors keep compute noise out of the time difference."""
    import tempfile

    import torch

    from piformer.checkpoint import save_checkpoint
    from piformer.config import ModelConfig
    from piformer.model import PiGPT
    from piformer.pi.secure import measure_rounds as measure
    from piformer.pi.spu_backend import SPUSettings

    chunks = -(-50304 // args.vocab_chunk)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, size="gpt2-small", n_layer=2, n_head=2, n_embd=64,
                                  block_size=args.seq_len, vocab_size=64 * chunks)
    ckpt = save_checkpoint(Path(tempfile.mkdtemp(prefix="bench-rounds-")) / "ckpt", PiGPT(cfg))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, args.seq_len)
    r = measure(str(ckpt), ids, SPUSettings.preset(settings_name), delay_s=args.delay_ms / 1e3, vocab_chunk=64)
    steps = r["per_step_one_way_waits"]
    r["per_layer"] = sum(v for k, v in steps.items() if k.startswith("h")) / cfg.n_layer
    r["shared"] = sum(v for k, v in steps.items() if not k.startswith("h"))
    r["narrow_config"] = cfg.to_dict()
    return r


def extrapolate(block: dict, shared: dict, n_layer: int = N_LAYER, rounds: dict | None = None) -> dict:
    """12 x block + shared parts, per class and in total; latency terms recomputed.

    With measured `rounds`, the waiting term is one-way waits x RTT / 2; without, it falls back
    to messages x RTT / 2 (an upper bound: SPU's messages overlap)."""
    from piformer.pi.secure import NETWORKS, latency_model

    per_class: dict[str, dict] = {}
    for src, k in ((block, n_layer), (shared, 1)):
        for name, c in src["per_class"].items():
            acc = per_class.setdefault(name, {"bytes": 0, "messages": 0, "seconds": 0.0})
            for f in acc:
                acc[f] += k * c[f]
    total_bytes = n_layer * block["total_bytes"] + shared["total_bytes"] + shared["reveal_bytes"]
    messages = n_layer * block["total_messages"] + shared["total_messages"]
    compute = n_layer * block["wall_s"] + shared["wall_s"]
    waits = n_layer * rounds["per_layer"] + rounds["shared"] if rounds else messages
    # latency_model charges RTT / 2 per message; pass the measured one-way waits in its place
    lat = {name: latency_model(compute, total_bytes, int(round(waits)), bw, rtt) for name, (bw, rtt) in NETWORKS.items()}
    return {"per_class": per_class, "total_bytes": total_bytes, "messages": messages, "compute_s": compute,
            "one_way_waits": waits, "waits_measured": bool(rounds), "latency": lat}


def softmax_ops(block: dict) -> dict:
    """SPU's per-op bytes inside the block's softmax step (what explains its cost)."""
    for s in block["steps"]:
        if s["class"] == "softmax":
            return {op: v["bytes"] for op, v in sorted(s["ops"].items(), key=lambda kv: -kv[1]["bytes"]) if v["bytes"]}
    return {}


def report(results: dict, rounds: dict | None = None) -> str:
    rounds = rounds or {}
    lines = []
    settings_names = [s for s in ("default", "optimised") if f"{s}/shared" in results]
    ext: dict[tuple[str, str], dict] = {}
    for s in settings_names:
        for p in PRESETS:
            if f"{s}/{p}" in results:
                ext[(s, p)] = extrapolate(results[f"{s}/{p}"], results[f"{s}/shared"], rounds=rounds.get(f"{s}/{p}"))

    lines.append("GPT-2 small (L=12, H=12, d=768, T=128), CHEETAH, FM64/18 bits, weights private to the server.")
    lines.append("Ours = 12 x one measured block + measured embedding, final LayerNorm, head and output reveal.\n")
    hdr = f"{'config':<12} {'paper GB':>9}"
    for s in settings_names:
        hdr += f" | {s + ' GB':>13} {'/paper':>7} {'savings':>8}"
    hdr += f" | {'paper savings':>13}"
    lines.append(hdr)
    base_paper = PAPER["SM+LN+G"][0]
    for p in PRESETS:
        row = f"{p:<12} {PAPER[p][0]:>9.2f}"
        for s in settings_names:
            e = ext.get((s, p))
            b = ext.get((s, "SM+LN+G"))
            if e is None:
                row += f" | {'-':>13} {'-':>7} {'-':>8}"
                continue
            gb = e["total_bytes"] / 1e9
            sav = b["total_bytes"] / e["total_bytes"] if b else float("nan")
            row += f" | {gb:>13.2f} {gb / PAPER[p][0]:>7.2f} {sav:>7.2f}x"
        row += f" | {base_paper / PAPER[p][0]:>12.2f}x"
        lines.append(row)

    lines.append("\nSavings ratio vs SM+LN+G, ours / paper's (target: within 10%):")
    for s in settings_names:
        parts = []
        for p in PRESETS[1:]:
            if (s, p) in ext and (s, "SM+LN+G") in ext:
                ours = ext[(s, "SM+LN+G")]["total_bytes"] / ext[(s, p)]["total_bytes"]
                paper = base_paper / PAPER[p][0]
                parts.append(f"{p} {ours:.2f}x vs {paper:.2f}x ({ours / paper - 1:+.1%})")
        lines.append(f"  {s:<9}: " + "; ".join(parts))

    lines.append("\nPer operator class, GB (12 layers + shared parts):")
    classes = ("embedding", "layernorm", "matmul", "softmax", "activation", "other", "head")
    lines.append(f"  {'settings/config':<22}" + "".join(f"{c:>11}" for c in classes))
    for (s, p), e in ext.items():
        lines.append(f"  {s + '/' + p:<22}" + "".join(
            f"{e['per_class'].get(c, {}).get('bytes', 0) / 1e9:>11.3f}" for c in classes))

    lines.append("\nLatency, minutes = compute + bytes x 8 / bandwidth + one-way waits x RTT / 2")
    lines.append("  (waits measured with a delayed TCP link on a narrow model of the same depth, marked *;")
    lines.append("   otherwise SPU's message count stands in for them, an upper bound)")
    for (s, p), e in ext.items():
        w = e["latency"]["WAN"]
        lan = e["latency"]["LAN"]
        mark = "*" if e["waits_measured"] else " "
        lines.append(f"  {s + '/' + p:<22} WAN {w['total_s'] / 60:6.2f} = {w['compute_s'] / 60:.2f} + "
                     f"{w['transfer_s'] / 60:.2f} + {w['waiting_s'] / 60:.2f}  | LAN {lan['total_s'] / 60:5.2f}"
                     f"  | waits {e['one_way_waits']:,.0f}{mark} messages {e['messages']:,d}  | paper {PAPER[p][1]:.2f}")
    lines.append("  (the paper's own 25.32 GB cannot cross 100 Mbit/s in 8.21 min: transfer alone is "
                 f"{25.32e9 * 8 / 100e6 / 60:.1f} min)")

    lines.append("\nSoftmax of one block, bytes by SPU op (MB):")
    for s in settings_names:
        b = results.get(f"{s}/SM+LN+G")
        if b:
            ops = softmax_ops(b)
            lines.append(f"  {s:<9}: " + ", ".join(f"{k.replace('pphlo.', '')} {v / 1e6:.1f}" for k, v in ops.items()))
    lines.append("\nOne block, MB per class:")
    for s in settings_names:
        for p in PRESETS:
            b = results.get(f"{s}/{p}")
            if b:
                lines.append(f"  {s + '/' + p:<22} total {b['total_bytes'] / 1e6:8.1f}  " + ", ".join(
                    f"{c} {v['bytes'] / 1e6:.1f}" for c, v in b["per_class"].items() if v["bytes"]))
    for s in settings_names:
        sh = results[f"{s}/shared"]
        lines.append(f"  {s + '/shared':<22} total {sh['total_bytes'] / 1e6:8.1f}  " + ", ".join(
            f"{c} {v['bytes'] / 1e6:.1f}" for c, v in sh["per_class"].items()) + f", reveal {sh['reveal_bytes'] / 1e6:.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["default", "optimised"], choices=("default", "optimised"))
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab-chunk", type=int, default=4096, help="one-hot rows per HE matmul (memory: ~12 GB at 4096)")
    ap.add_argument("--skip-shared", action="store_true", help="do not measure embedding/head (slowest part)")
    ap.add_argument("--out", default="out/bench_pi_gpt2.json", help="results file (resumed if present)")
    ap.add_argument("--report-only", action="store_true", help="print the table from the results file")
    ap.add_argument("--fresh", action="store_true", help="ignore saved results")
    ap.add_argument("--rounds", action="store_true",
                    help="measure one-way waits (two processes, delayed TCP link, narrow models) instead")
    ap.add_argument("--delay-ms", type=float, default=40.0, help="one-way delay for --rounds (default 40 = WAN RTT/2)")
    args = ap.parse_args()

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() and not args.fresh else {}
    rounds_out = out.with_name(out.stem + "_rounds.json")
    rounds = json.loads(rounds_out.read_text()) if rounds_out.is_file() and not args.fresh else {}
    if args.rounds and not args.report_only:
        rounds_out.parent.mkdir(parents=True, exist_ok=True)
        for s in args.settings:
            for p in args.presets:
                key = f"{s}/{p}"
                if key in rounds:
                    print(f"[skip] rounds {key}", flush=True)
                    continue
                print(f"[run ] rounds {key} ...", flush=True)
                rounds[key] = measure_rounds(p, s, args)
                print(f"[done] rounds {key}: {rounds[key]['per_layer']:.0f} waits per layer, "
                      f"{rounds[key]['shared']:.0f} shared", flush=True)
                rounds_out.write_text(json.dumps(rounds, indent=1))
    elif not args.report_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        todo = [(s, p, "block") for s in args.settings for p in args.presets]
        if not args.skip_shared:
            todo += [(s, "SM+LN+G", "shared") for s in args.settings]
        for s, p, part in todo:
            key = f"{s}/{p if part == 'block' else 'shared'}"
            if key in results and results[key].get("seq_len") == args.seq_len:
                print(f"[skip] {key}: already measured", flush=True)
                continue
            print(f"[run ] {key} ...", flush=True)
            results[key] = measure(part, p, s, args)
            print(f"[done] {key}: {results[key]['total_bytes'] / 1e6:.1f} MB, "
                  f"{results[key]['total_messages']} messages, {results[key]['elapsed_s']:.0f} s", flush=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(out)
    print(report(results, rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
