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


def llama_cpp_perplexity(path: Path, ids: np.ndarray, threads: int = 1) -> float:
    """Perplexity llama.cpp computes on token windows (BOS first), every position scored but the last,
    as validate scores them."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ids.shape[1], n_batch=ids.shape[1], logits_all=True,
                          n_threads=threads, verbose=False)
    nll, n = 0.0, 0
    try:
        for window in ids:
            llm.reset()
            llm.eval(window.tolist())
            logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
            n += len(window) - 1
    finally:
        llm.close()
    return math.exp(nll / n)
