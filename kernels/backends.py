"""Where kernels run: CuPy on a CUDA device, the same .cu sources built for the CPU by g++, or NumPy.

``QUANTFAB_KERNELS`` picks one: ``auto`` (default: CuPy when a CUDA device is present, else the g++ build
when g++ is there, else NumPy), ``cupy``, ``numpy``, or ``cpu`` (the g++ build, on every core: how the CPU
path packs at C speed, and how the tests prove the kernels' logic without a GPU). The NumPy backend
launches nothing: every kernel's NumPy reference answers instead.

A launch passes arrays of the backend's array module, Python ints (as 64-bit) and floats (as float32),
in the order of the kernel's parameters. The host calls in words.py, nf4.py and gguf_blocks.py take
NumPy arrays and return NumPy arrays; given arrays already on the device (CuPy), they leave the result
there, which is what a GPU-resident pipeline and bench/kernel_throughput.py want.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

SOURCES = Path(__file__).resolve().parent
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false", f"-I{SOURCES}")  # no fused multiply-add: rounding as on the CPU
KERNEL_SOURCES = ("words.cu", "nf4.cu", "gguf_blocks.cu", "kquant_blocks.cu", "kquant_search.cu", "iq1_search.cu",
                  "iq2_search.cu", "iq3_search.cu")
BLOCK = 256  # threads per block on the GPU; kernels loop grid-stride, so any shape covers every item
MAX_BLOCKS = 65535 * 8


class KernelBackendError(RuntimeError):
    """A backend was asked for but cannot run here (no CUDA device, no compiler)."""


class Backend:
    name: str
    xp: ModuleType  # numpy or cupy: where a launch's arrays live

    def launch(self, source: str, kernel: str, items: int, *args: Any) -> None:
        raise NotImplementedError

    def to_device(self, a: np.ndarray) -> Any:
        return self.xp.ascontiguousarray(self.xp.asarray(a))

    def to_host(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def result(self, out: Any, like: Any) -> Any:
        """A launch's output where its input lived: on the host for NumPy input, else left on the device."""
        return self.to_host(out) if isinstance(like, np.ndarray) else out


class NumpyBackend(Backend):
    name, xp = "numpy", np


class CpuBuild(Backend):
    """Each .cu file built by g++ into a shared library, the grid run on the CPU's cores.

    A launch is ``blocks`` blocks of ``threads`` threads: each block on a thread of a pool (ctypes lets go
    of the GIL during the call), its threads one after another. Every kernel loops grid-stride, so the
    interleaved threads exercise the same indexing a GPU grid does, and the result does not depend on the
    shape. ``blocks`` defaults to the cores this process may use (``QUANTFAB_THREADS`` overrides it).
    """

    name, xp = "cpu", np

    def __init__(self, blocks: int | None = None, threads: int = 3):
        self.blocks, self.threads = blocks or cpu_threads(), threads

    def launch(self, source: str, kernel: str, items: int, *args: Any) -> None:
        fn = getattr(_cpu_library(source), kernel)
        c_args = [_c_arg(a) for a in args]
        blocks = max(1, min(self.blocks, -(-items // self.threads)))

        def run_block(b: int) -> None:
            for t in range(self.threads):
                _cpu_library(source).qf_set_launch(b, t, self.threads, blocks)
                fn(*c_args)

        if blocks == 1:
            run_block(0)
        else:
            list(_pool(self.blocks).map(run_block, range(blocks)))


def cpu_threads() -> int:
    """The cores this process may use, or ``QUANTFAB_THREADS``."""
    return int(os.environ.get("QUANTFAB_THREADS") or 0) or len(os.sched_getaffinity(0))


@lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="quantfab-kernel")


def _c_arg(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise ValueError("kernel arrays must be C-contiguous")
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, (bool, int, np.integer)):
        return ctypes.c_longlong(int(a))
    if isinstance(a, (float, np.floating)):
        return ctypes.c_float(float(a))
    raise TypeError(f"cannot pass {type(a).__name__} to a kernel")


# -march=native: the host's vector instructions (rintf inlined, loops vectorized) make the K-quant searches ~30 %
# faster; -ffp-contract=off keeps every float operation as written, so results stay bit for bit NumPy's
GXX_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off"]


def _digest(source: str) -> str:
    """Of the source, the shim, the flags and the host's CPU (a library built for one CPU may not run on another)."""
    h = hashlib.sha256()
    for name in (source, "qf_cuda.h"):
        h.update((SOURCES / name).read_bytes())
    h.update(" ".join([*GXX_FLAGS, platform.machine(), platform.processor(), _cpu_model()]).encode())
    return h.hexdigest()[:16]


def _cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in info.splitlines() if line.startswith(("model name", "flags"))), "")


@lru_cache(maxsize=None)
def _cpu_library(source: str) -> ctypes.CDLL:
    """g++ of one .cu as C++ (cached by the digest of its text, the shim's, the flags and the CPU), loaded once per
    process."""
    cache = Path(os.environ.get("QUANTFAB_KERNEL_CACHE", Path(tempfile.gettempdir()) / "quantfab-kernels"))
    so = cache / f"{Path(source).stem}-{_digest(source)}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", *GXX_FLAGS, "-x", "c++", f"-I{SOURCES}", str(SOURCES / source), "-o", str(tmp)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise KernelBackendError("QUANTFAB_KERNELS=cpu needs g++ on PATH") from e
        except subprocess.CalledProcessError as e:
            raise KernelBackendError(f"g++ could not build kernels/{source}:\n{e.stderr}") from e
        os.replace(tmp, so)  # atomic: a concurrent build never loads a half-written library
    lib = ctypes.CDLL(str(so))
    lib.qf_set_launch.argtypes = [ctypes.c_uint] * 4
    return lib


class CupyBackend(Backend):
    """NVRTC-compiled RawModules, one per .cu file, compiled once per process (CuPy caches them on disk too)."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self.xp = cupy

    def to_host(self, a: Any) -> np.ndarray:
        return self.xp.asnumpy(a)

    def launch(self, source: str, kernel: str, items: int, *args: Any) -> None:
        fn = _cupy_module(source).get_function(kernel)
        blocks = max(1, min(MAX_BLOCKS, -(-items // BLOCK)))
        fn((blocks,), (BLOCK,), tuple(_cupy_arg(a) for a in args))


def _cupy_arg(a: Any) -> Any:
    if isinstance(a, (bool, int, np.integer)):
        return np.int64(a)
    if isinstance(a, (float, np.floating)):
        return np.float32(a)
    return a


@lru_cache(maxsize=None)
def _cupy_module(source: str) -> Any:
    import cupy

    return cupy.RawModule(code=(SOURCES / source).read_text(), options=NVRTC_OPTIONS)


def cuda_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "not here"
        return False


@lru_cache(maxsize=None)
def backend_named(name: str) -> Backend:
    if name == "numpy":
        return NumpyBackend()
    if name == "cpu":
        return CpuBuild()
    if name == "cupy":
        if not cuda_available():
            raise KernelBackendError("QUANTFAB_KERNELS=cupy, but CuPy finds no CUDA device here "
                                     "(install the gpu extra on a machine with one, or use auto/numpy/cpu)")
        return CupyBackend()
    if name == "auto":
        if cuda_available():
            return backend_named("cupy")
        try:
            for source in KERNEL_SOURCES:
                _cpu_library(source)  # built once per source text, kept under the kernel cache
        except KernelBackendError:
            return NumpyBackend()  # no g++ here: the references answer
        return backend_named("cpu")
    raise KernelBackendError(f"QUANTFAB_KERNELS={name!r}: expected auto, cupy, numpy or cpu")


def current() -> Backend:
    """The backend QUANTFAB_KERNELS names (read at every call, so a test or a run can switch it)."""
    return backend_named(os.environ.get("QUANTFAB_KERNELS", "auto").strip().lower() or "auto")
