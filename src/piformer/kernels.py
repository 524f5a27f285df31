"""piformer's C++ CPU kernels (csrc/), compiled for this machine at first use and cached.

    ext = load_kernel("entropy_attention")   # the module, or raises KernelUnavailable

torch.utils.cpp_extension builds each source once per machine (about 30 s on 2 cores) into its
extensions directory ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and reloads it
from there afterwards; it rebuilds by itself when the source or the flags change. The build
targets the vector width this CPU has (PyTorch's own capability: AVX512, AVX2 or plain), so a
cached build is named after it. Callers keep a pure-PyTorch path for when a build fails (no C++
compiler, another platform) and say so.
"""

from __future__ import annotations

import os
import sys
import time
from importlib import resources
from pathlib import Path

import torch

_VECTOR_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
}


class KernelUnavailable(RuntimeError):
    """A C++ kernel could not be built or loaded here; the message says why."""


def _already_built(name: str) -> bool:
    try:  # where torch.utils.cpp_extension keeps it (a private helper; a guess of False only costs a message)
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:
        return False


_loaded: dict[str, object] = {}  # source -> module, or the KernelUnavailable its build raised


def load_kernel(source: str):
    """The compiled module for csrc/<source>.cpp (built at the first call in this machine's life).

    Raises KernelUnavailable, naming the reason, when it cannot be built; a process tries once."""
    if source not in _loaded:
        try:
            _loaded[source] = _build(source)
        except KernelUnavailable as e:
            _loaded[source] = e
    if isinstance(_loaded[source], KernelUnavailable):
        raise _loaded[source]
    return _loaded[source]


def _build(source: str):
    capability = torch.backends.cpu.get_cpu_capability()
    name = f"piformer_{source}_{capability.lower()}"
    cpp = resources.files("piformer").joinpath("csrc", f"{source}.cpp")
    try:
        from torch.utils.cpp_extension import load
    except ImportError as e:  # pragma: no cover - torch always ships it
        raise KernelUnavailable(f"torch.utils.cpp_extension is missing ({e})") from e
    fresh = not _already_built(name)
    if fresh:
        print(f"piformer: compiling the {source} kernel for this CPU ({capability}), once; about 30 s",
              file=sys.stderr, flush=True)
    # The ninja that pip installs with piformer sits next to this interpreter, which need not be
    # on PATH (a virtualenv used without activating it).
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    start = time.perf_counter()
    try:
        with resources.as_file(cpp) as src:
            module = load(name=name, sources=[str(src)], extra_cflags=["-O3", *_VECTOR_FLAGS.get(capability, [])])
    except Exception as e:  # a compiler error, no compiler, no ninja, a link error: all mean the same here
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise KernelUnavailable(f"building csrc/{source}.cpp failed: {first}") from e
    finally:
        os.environ["PATH"] = path
    if fresh:
        print(f"piformer: {source} kernel built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module
