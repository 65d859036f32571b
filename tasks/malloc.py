"""glibc malloc limits for the compute stages.

glibc serves blocks above a threshold (dynamic, 32 MiB at most) with mmap and hands them back to the
kernel when they are freed, and trims the free top of its heap beyond twice that. A layer's activations
and matmul outputs are such blocks, so every layer page-faulted and zeroed them again (bench/peer/
run_ours.py --synthetic spent 15 s of its 161 s in the kernel). Raising both limits keeps freed memory
for the next layer, whose shapes are the same: GPTQ on 2 layers of the synthetic 1024-wide Llama went
from 16.2 to 14.5 s. The price is a higher peak (bench/rss_layers.py: +140-240 MiB at that width).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
KEEP = 1 << 30  # blocks up to this size come from the heap; this much free heap top is kept


def keep_freed_memory() -> bool:
    """Whether the limits were set: False where the C library is not glibc (nothing to tune there)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP))
