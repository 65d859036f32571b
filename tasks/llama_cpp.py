"""llama.cpp itself, through llama-cpp-python (the optional extra ``llama-cpp``): its quantizer and its perplexity.

The GGUF consumer's own numbers, for the consumer tests and the bench beside ours; imported only there,
so the package needs no llama.cpp build.
"""

from __future__ import annotations

import ctypes
import math
import time
from pathlib import Path

import numpy as np


def llama_quantize(src: Path, dst: Path, file_type: str, threads: int = 1) -> float:
    """llama-quantize ``src`` into ``dst`` as ``file_type`` (e.g. Q4_K_M); returns the seconds it took."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = threads
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {file_type} returned {rc}")
    return time.perf_counter() - start


def llama_cpp_logits(path: Path, ids: np.ndarray, threads: int = 1) -> np.ndarray:
    """llama.cpp's logits (windows, tokens, vocab) for token windows ``ids``, each window evaluated afresh."""
    llm = _load(path, ids.shape[1], threads)
    try:
        out = []
        for window in ids:
            llm.reset()
            llm.eval(window.tolist())
            out.append(np.array(llm.scores[: len(window)], dtype=np.float32))  # a copy: the next eval reuses the buffer
        return np.stack(out)
    finally:
        llm.close()


def llama_cpp_perplexity(path: Path, ids: np.ndarray, threads: int = 1) -> float:
    """Perplexity llama.cpp computes on token windows (BOS first), every position scored but the last,
    as validate scores them."""
    logits = llama_cpp_logits(path, ids, threads)[:, :-1].astype(np.float64)
    logits -= logits.max(axis=2, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    targets = ids[:, 1:]
    nll = -np.take_along_axis(logp, targets[..., None], axis=2).sum()
    return math.exp(nll / targets.size)


def _load(path: Path, n_ctx: int, threads: int):
    """A llama_cpp.Llama without llama.cpp's extra CPU buffer types (weight repacking, AMX).

    A native build on a CPU that reports AMX crashes in decode on quantized weights when the OS does not
    grant the AMX tile state (this 2-core VM); plain CPU buffers compute the same model.
    """
    import llama_cpp
    import llama_cpp.llama as high_level

    default = high_level.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    high_level.llama_cpp.llama_model_default_params = plain_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads,
                               verbose=False)
    finally:
        high_level.llama_cpp.llama_model_default_params = default
