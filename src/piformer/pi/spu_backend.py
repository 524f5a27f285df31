"""The thin layer over SecretFlow SPU 0.9.5: settings, compilation, shares, links, log counters.

SPU is optional (the `pi` extra); every function here imports it lazily through `require_spu`.

What SPU 0.9.5 offers and what this module relies on (measured on our machines):
* `Io.make_shares(x, VIS_SECRET, owner)` with `experimental_enable_colocated_optimization`
  gives a *private* value (`Priv2k<FM64,owner>`): the owner's share holds the data, the other
  party's share is all zeros. So each party builds its own share locally and the non-owner
  builds a zero placeholder of the same shape: no input ever crosses the network.
* There is no Python API for link statistics. With `enable_pphlo_profile` every `Runtime.run`
  logs per-op counters and a "Link details" line (bytes and actions sent/received *during that
  run*). We route SPU's log to a file and parse it: every number we report comes from there.
  "Actions" are messages, not rounds.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPU_MISSING = "secure inference needs SecretFlow SPU and JAX: pip install 'piformer[pi]' (spu==0.9.5, Python < 3.12)"


class SPUMissingError(ImportError):
    pass


def require_spu():
    """Import spu lazily; raise a clear error if the `pi` extra is not installed."""
    try:
        import spu  # noqa: F401
        import spu.libspu  # noqa: F401
        from spu.utils import frontend  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised only without spu
        raise SPUMissingError(f"{SPU_MISSING} ({err})") from None
    return spu


# ----------------------------------------------------------------------------------------
# Settings


@dataclass
class SPUSettings:
    """Protocol, fixed-point encoding and the SPU options that change the measured cost."""

    protocol: str = "cheetah"
    """'cheetah' (the 2PC protocol family the paper measured with) or 'semi2k' (additive
    sharing; its Beaver triples come from a simulated trusted first party, so its numbers
    exclude the offline phase)."""
    field: str = "FM64"
    """Ring: FM64 (64-bit) or FM128. 24 fraction bits overflow on GPT-2-style outliers in FM64."""
    fxp_fraction_bits: int = 18
    denominator_broadcast: bool = False
    """Compiler: rewrite x / broadcast(y) into x * broadcast(1/y) (softmax and LayerNorm)."""
    ot_kind: str = "YACL_Ferret"
    """CHEETAH's OT extension: YACL_Ferret (default), EMP_Ferret (same bytes, fewer messages)."""
    mul_lsb_error: bool = False
    """CHEETAH: allow a 1-bit error in the low bit of products (cheaper multiplications).
    In SPU 0.9.5 it also makes whole 8,192-slot batches of squarings come back as garbage: 10 of
    196 exponentials of 12x128x128 (docs/private_inference.md, 'Wrong values'): cost studies only."""
    exp_clip: float | None = None
    """Program-level: clamp softmax inputs x - max to >= -exp_clip before the exponential."""
    causal_pack: bool = False
    """Program-level: exponentiate and normalise only the causal (visible) attention entries,
    packed into one vector (about half the softmax's squarings and products); same outputs."""
    ln_wide: bool = False
    """Program-level: LayerNorms stay right for rows of variance beyond SPU's rsqrt (2^17), as
    the final LayerNorm of a model without LayerNorms in its blocks needs (`jax_forward._layernorm`)."""

    def program_options(self) -> dict[str, Any]:
        """The fields that shape the program SPU runs (`jax_forward.build_program`'s keywords)."""
        return {name: getattr(self, name) for name in PROGRAM_OPTIONS}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SPUSettings":
        if name not in SETTINGS_PRESETS:
            raise ValueError(f"unknown SPU settings {name!r}; valid: {', '.join(SETTINGS_PRESETS)}")
        return cls(**{**SETTINGS_PRESETS[name], **overrides})

    def validate(self) -> None:
        if self.protocol not in ("cheetah", "semi2k"):
            raise ValueError(f"protocol must be 'cheetah' or 'semi2k', got {self.protocol!r}")
        if self.field not in ("FM64", "FM128"):
            raise ValueError(f"field must be FM64 or FM128, got {self.field!r}")
        if self.ot_kind not in ("YACL_Ferret", "YACL_Softspoken", "EMP_Ferret"):
            raise ValueError(f"ot_kind must be YACL_Ferret, YACL_Softspoken or EMP_Ferret, got {self.ot_kind!r}")

    def runtime_config(self, profile: bool = True):
        """The SPU RuntimeConfig. CHEETAH's ot_kind is settable only through JSON in 0.9.5."""
        require_spu()
        import spu.libspu as libspu

        self.validate()
        conf: dict[str, Any] = {
            "protocol": self.protocol.upper(), "field": self.field,
            "fxp_fraction_bits": self.fxp_fraction_bits,
            "experimental_enable_colocated_optimization": True,  # owner-held (private) inputs
            "enable_pphlo_profile": profile,  # per-run link counters in the log
        }
        if self.protocol == "cheetah":
            conf["cheetah_2pc_config"] = {"ot_kind": self.ot_kind, "enable_mul_lsb_error": self.mul_lsb_error}
        cfg = libspu.RuntimeConfig()
        if not cfg.ParseFromJsonString(json.dumps(conf)):
            raise ValueError(f"SPU rejected runtime config {conf}")
        return cfg

    def compiler_options(self):
        require_spu()
        import spu.libspu as libspu

        return libspu.CompilerOptions(enable_optimize_denominator_with_broadcast=self.denominator_broadcast)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROGRAM_OPTIONS = ("exp_clip", "causal_pack", "ln_wide")

SETTINGS_PRESETS: dict[str, dict[str, Any]] = {
    # SPU 0.9.5's defaults: what you get without touching a knob.
    "default": {},
    # Every knob measured to lower communication or messages without changing the results.
    "optimised": {"denominator_broadcast": True, "ot_kind": "EMP_Ferret"},
    # The above plus CHEETAH's cheaper products, which return wrong batches (see mul_lsb_error):
    # kept to price that setting and to compare with figures measured with it, never for answers.
    "optimised-lsb-error": {"denominator_broadcast": True, "ot_kind": "EMP_Ferret", "mul_lsb_error": True},
}

UNSAFE_SETTINGS_WARNING = (
    "mul_lsb_error=True: in SPU 0.9.5 CHEETAH's squaring then returns whole 8,192-value batches of "
    "garbage in a fraction of exponentials (docs/private_inference.md, 'Wrong values'); use it to "
    "price the setting, not for outputs")


# ----------------------------------------------------------------------------------------
# Compilation


def compile_step(fn, example_args: list, input_names: list[str], output_names: list[str], name: str, copts):
    """Compile one JAX function into an SPU executable whose inputs/outputs are named values."""
    spu = require_spu()
    from spu.utils import frontend as fe

    vis = [spu.libspu.Visibility.VIS_SECRET] * len(example_args)
    exe, _ = fe.compile(fe.Kind.JAX, fn, example_args, {}, list(input_names), vis,
                        lambda outs: list(output_names), copts=copts)
    return rename(exe, name, input_names, output_names)


def rename(exe, name: str, input_names, output_names):
    """The same compiled code bound to other value names (SPU binds arguments by position)."""
    import spu.libspu as libspu

    return libspu.Executable(name=name, input_names=list(input_names), output_names=list(output_names), code=exe.code)


# ----------------------------------------------------------------------------------------
# Shares


def local_share(io, value, rank: int, owner: int, shape=None, dtype=None):
    """This party's share of a value `owner` holds privately.

    The owner passes the data; the other party passes only shape and dtype and gets the
    all-zero placeholder share a colocated private value has for the non-owner.
    """
    import numpy as np
    import spu.libspu as libspu

    if rank != owner:
        value = np.zeros(shape, dtype=dtype)
    return io.make_shares(np.ascontiguousarray(value), libspu.Visibility.VIS_SECRET, owner)[rank]


def share_to_bytes(share) -> bytes:
    meta = bytes(share.meta)
    chunks = [bytes(c) for c in share.share_chunks]
    header = json.dumps({"meta": len(meta), "chunks": [len(c) for c in chunks]}).encode()
    return len(header).to_bytes(4, "little") + header + meta + b"".join(chunks)


def share_from_bytes(data: bytes):
    import spu.libspu as libspu

    n = int.from_bytes(data[:4], "little")
    header = json.loads(data[4:4 + n])
    pos = 4 + n
    share = libspu.Share()
    share.meta = data[pos:pos + header["meta"]]
    pos += header["meta"]
    chunks = []
    for size in header["chunks"]:
        chunks.append(data[pos:pos + size])
        pos += size
    share.share_chunks = chunks
    return share


# ----------------------------------------------------------------------------------------
# Links


def mem_link_desc(recv_timeout_s: float = 3600.0):
    import spu.libspu as libspu

    desc = libspu.link.Desc()
    # Its own id per session: in-memory links with one id share channels process-wide, so a
    # message a session left unread would reach the next one.
    desc.id = f"piformer-mem-{uuid.uuid4().hex}"
    desc.add_party("client", "thread_0")
    desc.add_party("server", "thread_1")
    desc.recv_timeout_ms = int(recv_timeout_s * 1000)  # the 30 s default kills large HE matmuls
    return desc


def wait_for_listener(address: str, timeout_s: float, what: str = "the server") -> None:
    """Return once `address` (host:port) accepts a TCP connection; ConnectionError after timeout_s.

    brpc's own connect retries wait far longer than their count suggests (each retry has its
    own connect timeout), so a client with no server would sit silently for minutes; a plain
    socket probe fails at the stated time with the address in the message.
    """
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{what}'s address must be host:port, got {address!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, max(0.1, timeout_s))):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"{what} at {address} did not answer within {timeout_s:g} s ({err}); "
                                      "is `piformer pi-serve` running there?") from None
            time.sleep(0.25)


def brpc_link(rank: int, addresses: list[str], recv_timeout_s: float = 3600.0, connect_timeout_s: float = 120.0):
    """A brpc (TCP) link between two processes. addresses[i] is party i's host:port as seen by this party."""
    import spu.libspu as libspu

    desc = libspu.link.Desc()
    desc.id = "piformer"
    desc.add_party("client", addresses[0])
    desc.add_party("server", addresses[1])
    desc.recv_timeout_ms = int(recv_timeout_s * 1000)
    desc.http_max_payload_size = 32 * 1024 * 1024
    desc.connect_retry_interval_ms = 500
    desc.connect_retry_times = max(1, int(connect_timeout_s * 2))
    desc.brpc_channel_protocol = "baidu_std"
    return libspu.link.create_brpc(desc, rank)


# ----------------------------------------------------------------------------------------
# SPU's log: the per-run counters


_EXEC = re.compile(r"SPU execution (\S+) completed.*total time ([0-9.eE+-]+)s")
_OP = re.compile(r"- (pphlo\.\w+), executed (\d+) times, duration ([0-9.eE+-]+)s, send bytes (\d+) recv bytes (\d+), "
                 r"send actions (\d+), recv actions (\d+)")
_LINK = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), recv actions (\d+)")


@dataclass
class RunCounters:
    """One `Runtime.run` as SPU logged it, seen from the party that profiled it."""

    name: str
    exec_s: float = 0.0
    sent: int = 0
    recv: int = 0
    sent_msgs: int = 0
    recv_msgs: int = 0
    ops: dict[str, dict[str, float]] = field(default_factory=dict)  # pphlo op -> counters

    @property
    def bytes(self) -> int:  # both directions
        return self.sent + self.recv

    @property
    def messages(self) -> int:  # both directions
        return self.sent_msgs + self.recv_msgs


class SPULog:
    """SPU's process-wide log, routed to one file; `read_from(offset)` parses new runs."""

    _lock = threading.Lock()
    _path: Path | None = None

    @classmethod
    def path(cls) -> Path:
        with cls._lock:
            if cls._path is None:
                require_spu()
                import spu.libspu as libspu

                target = os.environ.get("PIFORMER_SPU_LOG")
                p = Path(target) if target else Path(tempfile.mkdtemp(prefix="piformer-spu-")) / "spu.log"
                p.parent.mkdir(parents=True, exist_ok=True)
                opts = libspu.logging.LogOptions()
                opts.enable_console_logger = False
                opts.system_log_path = str(p)
                opts.log_level = libspu.logging.LogLevel.INFO
                opts.max_log_file_size = 1 << 40  # never rotate under us
                libspu.logging.setup_logging(opts)
                cls._path = p
            return cls._path

    @classmethod
    def offset(cls) -> int:
        p = cls.path()
        return p.stat().st_size if p.exists() else 0

    @classmethod
    def read_from(cls, offset: int) -> list[RunCounters]:
        p = cls.path()
        if not p.exists():
            return []
        with open(p, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        return parse_log(text)


def parse_log(text: str) -> list[RunCounters]:
    """Runs in log order. Assumes one profiling party per log (lines of one run are contiguous
    enough that each 'Link details' follows its own 'SPU execution' line)."""
    runs: list[RunCounters] = []
    cur: RunCounters | None = None
    for line in text.splitlines():
        m = _EXEC.search(line)
        if m:
            cur = RunCounters(m.group(1), exec_s=float(m.group(2)))
            runs.append(cur)
            continue
        if cur is None:
            continue
        m = _OP.search(line)
        if m:
            op = cur.ops.setdefault(m.group(1), {"count": 0, "seconds": 0.0, "bytes": 0, "messages": 0})
            op["count"] += int(m.group(2))
            op["seconds"] += float(m.group(3))
            op["bytes"] += int(m.group(4)) + int(m.group(5))
            op["messages"] += int(m.group(6)) + int(m.group(7))
            continue
        m = _LINK.search(line)
        if m:
            cur.sent, cur.recv, cur.sent_msgs, cur.recv_msgs = map(int, m.groups())
    return runs
