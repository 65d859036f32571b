"""The result of a dequant-verify pass, and its NumPy reference (``qf_check`` in qf_cuda.h is the kernel side).

Policy, the same on every backend: an element mismatches when |decoded - expected| > atol (0 by default:
bit-equal values, -0.0 equal to 0.0), or when either side is NaN or Inf unless both are the same
infinity. ``max_abs_error`` is the largest difference seen, +Inf where a NaN or Inf was involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quantfab.kernels.backends import Backend

NONE = np.iinfo(np.uint64).max
VERDICT_DTYPE = np.dtype([("max_err_bits", "<u4"), ("pad", "<u4"), ("mismatches", "<u8"), ("first", "<u8")])


@dataclass(frozen=True)
class Verdict:
    elements: int
    max_abs_error: float
    mismatches: int
    first: int | None  # flat index of the first mismatching element

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


def compare(decoded: np.ndarray, expected: np.ndarray, atol: float = 0.0) -> Verdict:
    """NumPy reference of the verify policy over two float32 arrays of one shape."""
    a, b = decoded.astype(np.float32).reshape(-1), expected.astype(np.float32).reshape(-1)
    special = ~np.isfinite(a) | ~np.isfinite(b)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a - b)
    same_special = special & (a == b)
    err = np.where(special, np.where(same_special, np.float32(0), np.float32(np.inf)), err).astype(np.float32)
    bad = np.where(special, ~same_special, err > np.float32(atol))
    hits = np.flatnonzero(bad)
    return Verdict(a.size, float(err.max(initial=np.float32(0))), int(hits.size), int(hits[0]) if hits.size else None)


def new_verdict(be: Backend) -> Any:
    """A zeroed device-side verdict record (first = "none")."""
    v = np.zeros(1, VERDICT_DTYPE)
    v["first"] = NONE
    return be.to_device(v.view(np.uint8))


def read_verdict(be: Backend, raw: Any, elements: int) -> Verdict:
    v = be.to_host(raw).view(VERDICT_DTYPE)[0]
    first = int(v["first"])
    return Verdict(elements, float(np.uint32(v["max_err_bits"]).view(np.float32)), int(v["mismatches"]),
                   None if first == NONE else first)
