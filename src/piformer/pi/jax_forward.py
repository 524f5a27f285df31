"""A pure-JAX forward pass of a PiGPT checkpoint, written as a *program of steps*.

SPU executes JAX programs, so this module is what private inference runs. The forward pass is
a list of `Step`s, each a small pure JAX function of named values (weights, activations) that
belongs to one operator class (embedding, layernorm, matmul, softmax, activation, other, head).
Two executors run the same program:

* `run_program` here, in plain JAX (float32): the reference, held to PyTorch by the tests;
* `piformer.pi.secure`, which compiles every step for SPU and runs it under two-party
  computation. Splitting at operator-class boundaries is what lets SPU's own per-run link
  counters attribute communication to softmax / LayerNorm / activation / ... exactly.

Server-side weight preparation (`prepare_params`) applies exact algebraic rewrites the server
can do on its own plaintext weights, so they cost nothing under PI:
  * Linear weights transposed to (in, out);
  * 1/sqrt(d_k) folded into the query projection (no temperature), or 1/(t * sqrt(d_k))
    expanded to a (T, d) multiplier of q (SM(t)): dividing q's row i of head h by t[h, i]
    divides logits row i by t[h, i], as the PyTorch model does;
  * 1/alpha folded into the FFN's output projection (ScFFN / ScFuFFN), so only beta remains
    an elementwise product.

The softmax is written for fixed point: the causal mask replaces masked logits by the row's
diagonal (always visible) before the max, so masked entries neither raise the max nor need a
large negative constant (which SPU's exponential approximation cannot take), and the
exponentials of masked entries are zeroed with a public select. `exp_clip` optionally bounds
``x - max`` from below (SPU's exp is only accurate on a bounded range; see docs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from piformer.config import ModelConfig

OP_CLASSES = ("embedding", "layernorm", "matmul", "softmax", "activation", "other", "head", "input")
LN_EPS = 1e-5


@dataclass(frozen=True)
class Step:
    """One piece of the forward pass: `outputs = fn(*inputs)` on named values."""

    name: str  # unique, e.g. "h0.softmax"
    op_class: str  # one of OP_CLASSES
    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    key: str  # identifies fn's semantics: steps with equal key and input shapes share one compiled program


@dataclass
class Program:
    """A forward pass as steps, plus who owns which input."""

    steps: list[Step]
    client_inputs: dict[str, tuple[int, ...]]  # one-hot token chunks (client, party 0)
    server_inputs: dict[str, tuple[int, ...]]  # prepared weights (server, party 1)
    logit_outputs: list[str]  # vocabulary chunks of the logits, in order
    seq_len: int
    vocab_chunks: list[tuple[int, int]]  # [start, stop) per chunk
    settings: dict[str, Any] = field(default_factory=dict)

    def last_use(self) -> dict[str, int]:
        """Index of the last step reading each value (to free secret values early)."""
        last: dict[str, int] = {}
        for i, s in enumerate(self.steps):
            for name in s.inputs:
                last[name] = i
        return last


# ----------------------------------------------------------------------------------------
# Weights


def state_dict_to_numpy(model) -> dict[str, np.ndarray]:
    """The folded (static norms baked in) float32 numpy state dict of a PiGPT model.

    Folds a *copy*, so the caller's model keeps its parametrisations. The copy is a fresh model
    loaded with the weights: a deepcopy would share torch's dynamically made parametrised classes
    with the original, and folding it would strip the original's parametrised attributes.
    """
    from piformer.model import PiGPT

    m = PiGPT(model.config)
    m.load_state_dict(model.state_dict())
    m.fold_static_norms()
    return {k: v.detach().cpu().float().numpy() for k, v in m.state_dict().items()}


def prepare_params(sd: dict[str, np.ndarray], cfg: ModelConfig, seq_len: int) -> dict[str, np.ndarray]:
    """Server-side plaintext preparation of a folded state dict into the program's named inputs."""
    T, D = seq_len, cfg.head_dim
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    p: dict[str, np.ndarray] = {"wte": f32(sd["transformer.wte.weight"]), "wpe": f32(sd["transformer.wpe.weight"][:T])}

    def linear(prefix: str, out: str, scale: float | np.ndarray = 1.0) -> None:
        p[f"{out}.w"] = f32(sd[f"{prefix}.weight"].T * scale)
        if cfg.bias:
            p[f"{out}.b"] = f32(sd[f"{prefix}.bias"] * scale)

    def layernorm(prefix: str, out: str) -> None:
        p[f"{out}.w"] = f32(sd[f"{prefix}.weight"])
        if cfg.bias:
            p[f"{out}.b"] = f32(sd[f"{prefix}.bias"])

    for l in range(cfg.n_layer):
        pre = f"transformer.h.{l}"
        if cfg.norm == "layernorm":
            layernorm(f"{pre}.ln_1", f"h{l}.ln_1")
            layernorm(f"{pre}.ln_2", f"h{l}.ln_2")
        q_scale = 1.0 if cfg.attn_temperature else 1.0 / math.sqrt(D)
        linear(f"{pre}.attn.q_proj", f"h{l}.q", q_scale)
        linear(f"{pre}.attn.k_proj", f"h{l}.k")
        linear(f"{pre}.attn.v_proj", f"h{l}.v")
        linear(f"{pre}.attn.c_proj", f"h{l}.o")
        if cfg.attn_temperature:
            t = np.asarray(sd[f"{pre}.attn.temperature"], dtype=np.float64)[:, :T]  # (H, T)
            inv = 1.0 / (t * math.sqrt(D))
            p[f"h{l}.inv_t"] = f32(np.repeat(inv.T, D, axis=1))  # (T, H*D): column h*D+j scaled by row's t[h]
        inv_alpha = 1.0 / float(sd[f"{pre}.ffn_alpha"]) if cfg.ffn_scale else 1.0
        if cfg.ffn == "fused":
            linear(f"{pre}.mlp.c_fused", f"h{l}.fused", inv_alpha)
        else:
            linear(f"{pre}.mlp.c_fc", f"h{l}.fc")
            linear(f"{pre}.mlp.c_proj", f"h{l}.proj", inv_alpha)
        if cfg.ffn_scale:
            p[f"h{l}.beta"] = f32(np.full((1, cfg.n_embd), float(sd[f"{pre}.ffn_beta"])))
    layernorm("transformer.ln_f", "ln_f")
    return p


def vocab_chunks(vocab_size: int, chunk: int) -> list[tuple[int, int]]:
    chunk = max(1, int(chunk))
    return [(s, min(s + chunk, vocab_size)) for s in range(0, vocab_size, chunk)]


def chunk_params(p: dict[str, np.ndarray], chunks: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Add the per-chunk slices of the tied embedding the program reads (wte.c, wte_t.c)."""
    out = dict(p)
    for c, (a, b) in enumerate(chunks):
        out[f"wte.{c}"] = np.ascontiguousarray(p["wte"][a:b])  # (C, d) for the embedding
        out[f"wte_t.{c}"] = np.ascontiguousarray(p["wte"][a:b].T)  # (d, C) for the head
    return out


def one_hot_chunks(ids: np.ndarray, chunks: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """The client's private input: its token ids, one-hot encoded per vocabulary chunk.

    One-hot rows are integers so that SPU multiplies them into the fixed-point embedding
    without a truncation.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return {f"onehot.{c}": (ids[:, None] == np.arange(a, b)[None, :]).astype(np.int32) for c, (a, b) in enumerate(chunks)}


# ----------------------------------------------------------------------------------------
# The operators (jax.numpy); each is the body of one or more steps.


def _jnp():
    import jax.numpy as jnp

    return jnp


RSQRT_VALID_BELOW = 2.0 ** 17
"""SPU 0.9.5's rsqrt returns 0 at and above 2^17 = 131,072 (measured, CHEETAH, 18 fraction bits,
FM64 and FM128 alike): a LayerNorm over a row of variance beyond it outputs zeros. Residual
streams without LayerNorm grow past it in deep layers (std ~1e4 at the last block of the
softmax-only GPT-2 trained for docs/private_inference.md), which the final LayerNorm sees."""

LN_WIDE_SHIFT = 8
"""The wide LayerNorm's second variance is that of x * 2^-8: right up to variance 2^33 (std
~92,700) and squares of |x| up to ~3e6 (FM64's headroom for a product is 2^27)."""


def _layernorm(x, w, b=None, wide: bool = False):
    """LayerNorm. `wide` keeps it right for rows whose variance is beyond SPU's rsqrt
    (`RSQRT_VALID_BELOW`): the variance is also computed on x scaled by 2^-LN_WIDE_SHIFT, and each
    row takes that branch (rsqrt of the scaled variance, scaled back) when its variance is at
    least 2^(2 shift); small rows keep the unscaled variance and its precision. The extra cost is
    one truncation and one squaring of the (T, d) input, a comparison and a select per row."""
    jnp = _jnp()
    import jax

    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(var + LN_EPS)
    if wide:
        k = float(2 ** -LN_WIDE_SHIFT)
        xs = xc * k
        var_s = jnp.mean(xs * xs, axis=-1, keepdims=True)  # var * 2^-16, no overflow where var's square overflows
        inv = jnp.where(var_s >= 1.0, jax.lax.rsqrt(var_s + LN_EPS * k * k) * k, inv)
    y = xc * inv * w
    return y + b if b is not None else y


def _linear(x, w, b=None):
    y = x @ w
    return y + b if b is not None else y


def _split_heads(x, H):
    T, C = x.shape
    return x.reshape(T, H, C // H).transpose(1, 0, 2)  # (H, T, D)


def masked_softmax(s, exp_clip: float | None = None, causal_pack: bool = False):
    """Causal softmax over the last axis of (H, T, T) logits, in a fixed-point-friendly form.

    `causal_pack` exponentiates only the visible entries (see `pack_groups`): about half the
    squarings and products of the full layout; the result is the same function.
    """
    jnp = _jnp()
    T = s.shape[-1]
    causal = np.tril(np.ones((T, T), dtype=bool))  # public
    diag = jnp.diagonal(s, axis1=-2, axis2=-1)[..., None]  # (H, T, 1): entry (i, i) is always visible
    z = jnp.where(causal, s, diag)
    z = z - jnp.max(z, axis=-1, keepdims=True)  # <= 0 on visible entries
    if causal_pack:
        return _packed_exp_normalise(z, causal, exp_clip)
    if exp_clip is not None:
        z = jnp.maximum(z, -float(exp_clip))
    e = jnp.where(causal, jnp.exp(z), 0.0)
    return e / jnp.sum(e, axis=-1, keepdims=True)


PACK_GROUPS = 32
"""Row groups of the packed causal softmax. Group g's rows see only the first `stop_g` columns,
so the packed tensor holds sum_g rows_g * stop_g of the T*T entries: (G + 1) / 2G of them for
equal groups (51.6% at 32, against 50% for the exact triangle). More groups pack tighter but
add slices to the compiled program; slices, pads and concatenations of shares are local (free)."""


def pack_groups(T: int, groups: int = PACK_GROUPS) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the packed causal softmax; group rows see columns [0, stop)."""
    bounds = np.linspace(0, T, min(T, groups) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def packed_entries(T: int) -> int:
    """Entries per head that the packed causal softmax exponentiates."""
    return sum((b - a) * b for a, b in pack_groups(T))


def _packed_exp_normalise(z, causal: np.ndarray, exp_clip: float | None):
    """exp and normalisation of max-shifted causal logits z (H, T, T), on the visible block only.

    Row group [a, b) is sliced to its (H, b - a, b) block, the blocks are flattened into one
    vector (so the secret exponential and product run once, in full HE batches), and the
    probabilities are padded back to (H, T, T) with public zeros. The denominator is one
    reciprocal per row times the numerators, as SPU's denominator-broadcast rewrite does (its
    pattern, a division by a broadcast, does not survive the packing).
    """
    jnp = _jnp()
    H, T, _ = z.shape
    groups = pack_groups(T)
    cuts = np.cumsum([(b - a) * b for a, b in groups])[:-1]

    def pack(blocks):  # one (H, b - a, b) block per group -> (H, packed)
        return jnp.concatenate([block.reshape(H, -1) for block in blocks], axis=-1)

    def unpack(flat):  # (H, packed) -> the groups' blocks
        return [part.reshape(H, b - a, b) for part, (a, b) in zip(jnp.split(flat, cuts, axis=-1), groups)]

    flat = pack([z[:, a:b, :b] for a, b in groups])
    visible = np.concatenate([causal[a:b, :b].reshape(-1) for a, b in groups])
    if exp_clip is not None:
        flat = jnp.maximum(flat, -float(exp_clip))
    e = jnp.where(visible, jnp.exp(flat), 0.0)  # (H, packed)
    inv = 1.0 / jnp.concatenate([block.sum(-1, keepdims=True) for block in unpack(e)], axis=1)  # (H, T, 1)
    p = unpack(e * pack([jnp.broadcast_to(inv[:, a:b], (H, b - a, b)) for a, b in groups]))
    return jnp.concatenate([jnp.pad(block, ((0, 0), (0, 0), (0, T - b))) for block, (a, b) in zip(p, groups)], axis=1)


def gelu_tanh(x):
    """GELU, tanh approximation (GPT-2's and the PyTorch model's `approximate='tanh'`)."""
    jnp = _jnp()
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _relu(x):
    return _jnp().maximum(x, 0.0)


# ----------------------------------------------------------------------------------------
# The program


def build_program(
    cfg: ModelConfig,
    seq_len: int | None = None,
    vocab_chunk: int = 4096,
    exp_clip: float | None = None,
    layers: int | None = None,
    embed_head: bool = True,
    last_only: bool = False,
    causal_pack: bool = False,
    ln_wide: bool = False,
) -> Program:
    """The forward pass of `cfg` on `seq_len` tokens as steps.

    `layers` limits the number of transformer blocks (the benchmark measures one and
    extrapolates); by default all `cfg.n_layer` run. `embed_head=False` leaves out the
    embedding, final LayerNorm and head: the client then supplies the first block's input
    "x.in" (T, d) itself, which an "input" step turns into a secret value (no communication),
    so a block is measured exactly as it runs inside the model. `last_only` computes (and
    reveals) the logits of the last position only: all that generating the next token needs.
    `causal_pack` runs each softmax on its visible (causal) entries only (`masked_softmax`);
    `ln_wide` makes every LayerNorm right beyond SPU's rsqrt range (`_layernorm`).
    """
    T = int(seq_len or cfg.block_size)
    if not 0 < T <= cfg.block_size:
        raise ValueError(f"seq_len must be in [1, block_size={cfg.block_size}], got {seq_len!r}")
    L = cfg.n_layer if layers is None else int(layers)
    H, d, bias = cfg.n_head, cfg.n_embd, cfg.bias
    chunks = vocab_chunks(cfg.vocab_size, vocab_chunk)
    steps: list[Step] = []
    server: dict[str, tuple[int, ...]] = {}
    wide_key = ":wide" if ln_wide else ""

    def w(name: str, shape: tuple[int, ...]) -> str:
        server[name] = shape
        return name

    def lin_inputs(prefix: str, fan_in: int, fan_out: int) -> tuple[str, ...]:
        names = (w(f"{prefix}.w", (fan_in, fan_out)),)
        return names + ((w(f"{prefix}.b", (fan_out,)),) if bias else ())

    def ln_inputs(prefix: str) -> tuple[str, ...]:
        return (w(f"{prefix}.w", (d,)),) + ((w(f"{prefix}.b", (d,)),) if bias else ())

    # -- embedding: sum over vocabulary chunks of onehot_c @ wte_c, plus positions ----------
    client = {f"onehot.{c}": (T, b - a) for c, (a, b) in enumerate(chunks)} if embed_head else {"x.in": (T, d)}
    if embed_head:
        w("wpe", (T, d))
    else:  # client's private x plus the server's private zeros: a secret-shared block input
        steps.append(Step("input", "input", lambda xc, zs: (xc + zs,), ("x.in", w("x.zero", (T, d))), ("x.emb",), "input"))
        chunks = []
    prev = None
    for c, (a, b) in enumerate(chunks):
        w(f"wte.{c}", (b - a, d))
        out = "x.emb" if c == len(chunks) - 1 else f"emb.{c}"
        if prev is None:
            steps.append(Step(f"embed.{c}", "embedding", lambda oh, we, pe: (oh @ we + pe,),
                              (f"onehot.{c}", f"wte.{c}", "wpe"), (out,), "embed_first"))
        else:
            steps.append(Step(f"embed.{c}", "embedding", lambda acc, oh, we: (acc + oh @ we,),
                              (prev, f"onehot.{c}", f"wte.{c}"), (out,), "embed_acc"))
        prev = out
    x = "x.emb"

    def block_norm(name: str, src: str, dst: str) -> str:
        """A block's LayerNorm step writing `dst`; without LayerNorm the input passes through."""
        if cfg.norm != "layernorm":
            return src
        steps.append(Step(name, "layernorm", lambda x_, *wb: (_layernorm(x_, *wb, wide=ln_wide),),
                          (src,) + ln_inputs(name), (dst,), f"ln:{bias}" + wide_key))
        return dst

    # -- blocks -----------------------------------------------------------------------------
    for l in range(L):
        p = f"h{l}"
        a_in = block_norm(f"{p}.ln_1", x, f"{p}.a_in")
        qkv_w = lin_inputs(f"{p}.q", d, d) + lin_inputs(f"{p}.k", d, d) + lin_inputs(f"{p}.v", d, d)

        def qkv(x_, *wb, _n=2 if bias else 1):
            return tuple(_linear(x_, *wb[i * _n:(i + 1) * _n]) for i in range(3))

        steps.append(Step(f"{p}.qkv", "matmul", qkv, (a_in,) + qkv_w, (f"{p}.q", f"{p}.k", f"{p}.v"), f"qkv:{bias}"))
        q = f"{p}.q"
        if cfg.attn_temperature:
            steps.append(Step(f"{p}.temperature", "other", lambda q_, it: (q_ * it,),
                              (q, w(f"{p}.inv_t", (T, d))), (f"{p}.qt",), "scale"))
            q = f"{p}.qt"
        steps.append(Step(f"{p}.scores", "matmul",
                          lambda q_, k_, _H=H: (_jnp().einsum("htd,hsd->hts", _split_heads(q_, _H), _split_heads(k_, _H)),),
                          (q, f"{p}.k"), (f"{p}.s",), f"scores:{H}"))
        steps.append(Step(f"{p}.softmax", "softmax", lambda s_, _c=exp_clip, _p=causal_pack: (masked_softmax(s_, _c, _p),),
                          (f"{p}.s",), (f"{p}.prob",), f"softmax:{exp_clip}" + (":packed" if causal_pack else "")))

        def attn_out(pr, v_, x_, *wb, _H=H):
            jnp = _jnp()
            y = jnp.einsum("hts,hsd->htd", pr, _split_heads(v_, _H))
            y = y.transpose(1, 0, 2).reshape(v_.shape)
            return (x_ + _linear(y, *wb),)

        steps.append(Step(f"{p}.attn_out", "matmul", attn_out,
                          (f"{p}.prob", f"{p}.v", x) + lin_inputs(f"{p}.o", d, d), (f"{p}.x_sa",), f"attn_out:{H}:{bias}"))
        x_sa = f"{p}.x_sa"
        f_in = block_norm(f"{p}.ln_2", x_sa, f"{p}.f_in")
        # The FFN's output projection also adds the residual unless ScFFN's beta must scale it first.
        residual = not cfg.ffn_scale
        if cfg.ffn == "fused":
            ffn_in, ffn_w = f_in, lin_inputs(f"{p}.fused", d, d)
        else:
            steps.append(Step(f"{p}.fc", "matmul", lambda h_, *wb: (_linear(h_, *wb),),
                              (f_in,) + lin_inputs(f"{p}.fc", d, 4 * d), (f"{p}.u",), f"linear:{bias}"))
            act = {"gelu": gelu_tanh, "relu": _relu, "none": None}[cfg.ffn_act]
            if act is not None:
                steps.append(Step(f"{p}.act", "activation", lambda u_, _a=act: (_a(u_),),
                                  (f"{p}.u",), (f"{p}.g",), f"act:{cfg.ffn_act}"))
                ffn_in = f"{p}.g"
            else:
                ffn_in = f"{p}.u"
            ffn_w = lin_inputs(f"{p}.proj", 4 * d, d)
        out = f"x.{l}" if residual else f"{p}.f"
        if residual:
            steps.append(Step(f"{p}.ffn_out", "matmul", lambda h_, x_, *wb: (x_ + _linear(h_, *wb),),
                              (ffn_in, x_sa) + ffn_w, (out,), f"linear_res:{bias}"))
        else:
            steps.append(Step(f"{p}.ffn_out", "matmul", lambda h_, *wb: (_linear(h_, *wb),),
                              (ffn_in,) + ffn_w, (out,), f"linear:{bias}"))
            steps.append(Step(f"{p}.ffn_scale", "other", lambda x_, f_, be: (x_ * be + f_,),
                              (x_sa, out, w(f"{p}.beta", (1, d))), (f"x.{l}",), "beta_res"))
        x = f"x.{l}"

    # -- final LayerNorm and the tied vocabulary projection, chunked --------------------------
    if not embed_head:
        return Program(steps, client, server, [x], T, [],
                       settings={"vocab_chunk": vocab_chunk, "exp_clip": exp_clip, "layers": L, "embed_head": False,
                                 "causal_pack": causal_pack, "ln_wide": ln_wide})
    if last_only:  # LayerNorm is per row: normalising only the last one is exact
        steps.append(Step("ln_f", "layernorm", lambda x_, *wb: (_layernorm(x_[-1:], *wb, wide=ln_wide),),
                          (x,) + ln_inputs("ln_f"), ("x.final",), f"ln_last:{bias}" + wide_key))
    else:
        steps.append(Step("ln_f", "layernorm", lambda x_, *wb: (_layernorm(x_, *wb, wide=ln_wide),),
                          (x,) + ln_inputs("ln_f"), ("x.final",), f"ln:{bias}" + wide_key))
    outputs = []
    for c, (a, b) in enumerate(chunks):
        steps.append(Step(f"head.{c}", "head", lambda x_, wt: (x_ @ wt,),
                          ("x.final", w(f"wte_t.{c}", (d, b - a))), (f"logits.{c}",), "head"))
        outputs.append(f"logits.{c}")
    return Program(steps, client, server, outputs, T, chunks,
                   settings={"vocab_chunk": vocab_chunk, "exp_clip": exp_clip, "layers": L, "embed_head": True,
                             "last_only": last_only, "causal_pack": causal_pack, "ln_wide": ln_wide})


def run_program(program: Program, inputs: dict[str, np.ndarray], jit: bool = True) -> dict[str, np.ndarray]:
    """Run a program in plain JAX. Returns every value the program produced."""
    import jax

    env: dict[str, Any] = dict(inputs)
    compiled: dict[str, Callable] = {}
    for s in program.steps:
        fn = s.fn
        if jit:
            if s.key not in compiled:  # equal keys mean equal functions; jit retraces per shape
                compiled[s.key] = jax.jit(s.fn)
            fn = compiled[s.key]
        outs = fn(*(env[n] for n in s.inputs))
        env.update(zip(s.outputs, outs))
    return env


def forward(
    sd: dict[str, np.ndarray],
    cfg: ModelConfig,
    ids: np.ndarray,
    vocab_chunk: int = 4096,
    exp_clip: float | None = None,
    last_only: bool = False,
    causal_pack: bool = False,
    ln_wide: bool = False,
) -> np.ndarray:
    """Logits (T, V) of one token sequence from a folded numpy state dict ((1, V) if last_only)."""
    ids = np.asarray(ids).reshape(-1)
    program = build_program(cfg, len(ids), vocab_chunk=vocab_chunk, exp_clip=exp_clip, last_only=last_only,
                            causal_pack=causal_pack, ln_wide=ln_wide)
    params = chunk_params(prepare_params(sd, cfg, len(ids)), program.vocab_chunks)
    return plaintext_logits(program, {**params, **one_hot_chunks(ids, program.vocab_chunks)})


def plaintext_logits(program: Program, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The program run in plaintext on all its inputs (the server's parameters and the client's
    tokens), its vocabulary chunks joined: the logits a secure run is checked against."""
    return logits_of(program, run_program(program, inputs))


def logits_of(program: Program, env: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(env[o]) for o in program.logit_outputs], axis=-1)


EXP_VALID_RANGE = 500.0
"""SPU 0.9.5's exponential is accurate on [-500, 0] (measured) and garbage below about -1000."""


def softmax_input_span(program: Program, env: dict[str, np.ndarray]) -> float:
    """The largest gap between an attention row's maximum logit and a visible logit of that row,
    over every softmax of a plaintext run: the most negative input the exponential will see.
    Softmax-only models whose deep layers collapse (near-zero entropy) grow it past
    EXP_VALID_RANGE; `exp_clip` then keeps the secure result right."""
    span = 0.0
    for step in program.steps:
        if step.op_class != "softmax":
            continue
        s = np.asarray(env[step.inputs[0]], dtype=np.float64)  # (H, T, T)
        T = s.shape[-1]
        visible = np.tril(np.ones((T, T), dtype=bool))
        hi = np.where(visible, s, -np.inf).max(-1, keepdims=True)
        lo = np.where(visible, s, np.inf).min(-1, keepdims=True)
        span = max(span, float((hi - lo).max()))
    return span


def layernorm_input_variance(program: Program, env: dict[str, np.ndarray]) -> float:
    """The largest row variance any LayerNorm of a plaintext run normalises: beyond
    RSQRT_VALID_BELOW an unwidened LayerNorm returns zeros under SPU (`ln_wide` fixes it)."""
    worst = 0.0
    for step in program.steps:
        if step.op_class != "layernorm":
            continue
        x = np.asarray(env[step.inputs[0]], dtype=np.float64)
        worst = max(worst, float(x.var(axis=-1).max()))
    return worst
