"""glibc malloc limits for the compute stages.

glibc serves blocks above a threshold (dynamic, 32 MiB at most) with mmap and hands them back to the
kernel when they are freed, and trims the free top of its heap beyond twice that. A layer's activations
and matmul outputs are such blocks, so every layer page-faulted and zeroed them again (bench/peer/
run_ours.py --synthetic spent 15 s of its 161 s in the kernel). Raising both limits keeps freed memory
for the next layer, whose shapes are the same: GPTQ on 2 layers of the synthetic 1024-wide Llama went
from 16.2 to 14.5 s. The price is a higher peak while the stage runs, so the limits hold only inside
``freed_memory_kept``, which hands every free page back when the stage ends. Kept for the whole run, a
0.84B synthetic Llama's rtn -> Q4_K_M build peaked at 4.85 GB RSS in validate (4.15 GB of it anonymous),
against 2.4 GB with glibc's own thresholds throughout (`quantfab run` sampled every 50 ms, 2026-12-05).
How much is kept: GPTQ on 6 layers of a 1.1B-shaped Llama (hidden 2048, ffn 5632, 32 x 256 calibration
tokens, in a thread as a Prefect task runs it) peaked at 2681 MiB in 149.9 s with 1 GiB, 2115 MiB in
147.2 s with 256 MiB, 1986 MiB in 156.5 s with glibc's 32 MiB (2026-12-06): 256 MiB keeps the time.

What the heap keeps is not only its free top: freed blocks inside it stay resident until ``malloc_trim``
hands their pages back. Before a GPTQ solve (``hand_back_free_pages``), the first 4 layers of that
1.1B shape peaked at 2545, 2625 and 2633 MiB against 2940-3374 MiB without, in the same time (50.9 s and
50.8 s), while the bytes in use peaked near 1.8 GB either way (mallinfo2; 2026-12-06).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
KEEP = 1 << 28  # inside a stage: blocks up to this size come from the heap; this much free heap top is kept
MMAP_AFTER, TRIM_AFTER = 32 << 20, 64 << 20  # afterwards: where glibc's dynamic thresholds end up at most

_lock = threading.Lock()
_depth = 0  # stages (threads of one process) inside freed_memory_kept


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both; musl has neither)
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Keep freed memory for the next layer while the block runs; then return every free page to the kernel."""
    global _depth
    libc = _libc()
    if libc is None:  # not glibc: nothing to tune
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_THRESHOLD, KEEP)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_THRESHOLD, MMAP_AFTER)
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER)
                libc.malloc_trim(0)


def hand_back_free_pages() -> None:
    """Return the pages of every free block to the kernel (the heap keeps its blocks, and refaults them on use):
    before a step whose working memory is large, so that it does not stack on what earlier steps freed."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
