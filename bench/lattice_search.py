"""llama.cpp's lattice searches (IQ1_S ... IQ3_S): the NumPy reference beside the kernel (the same .cu built for the
CPU by g++, on QUANTFAB_THREADS cores), side by side in one run on one random tensor with a skewed importance; the
bytes must be equal, the ratio is the speed-up.

    /work/main/.venv/bin/python bench/lattice_search.py [--rows 512] [--cols 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from quantfab.tasks.quantize.grids import GRIDS
from quantfab.tasks.quantize.lattice import LatticeGrid


def timed(backend: str, grid: LatticeGrid, w: np.ndarray, importance: np.ndarray) -> tuple[float, np.ndarray]:
    os.environ["QUANTFAB_KERNELS"] = backend
    grid.search(w[:8], importance)  # tables built, library compiled: not timed
    start = time.perf_counter()
    blocks = grid.search(w, importance)[2]
    return time.perf_counter() - start, blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["QUANTFAB_THREADS"] = str(args.threads)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.rows, args.cols)) * rng.uniform(0.01, 0.1, (args.rows, 1))).astype(np.float32)
    importance = (rng.uniform(size=args.cols) ** 4 * 50).astype(np.float32)
    print(f"{args.rows} x {args.cols} weights, {args.threads} threads for the kernel\n")
    print("| type | NumPy (M weights/s) | kernel, cpu (M weights/s) | ratio | bytes equal |\n|---|---|---|---|---|")
    for name, grid in GRIDS.items():
        if not isinstance(grid, LatticeGrid):
            continue
        ref_s, ref = timed("numpy", grid, w, importance)
        cpu_s, got = timed("cpu", grid, w, importance)
        print(f"| {name} | {w.size / ref_s / 1e6:.2f} | {w.size / cpu_s / 1e6:.2f} | {ref_s / cpu_s:.1f} | "
              f"{np.array_equal(ref, got)} |", flush=True)


if __name__ == "__main__":
    main()
