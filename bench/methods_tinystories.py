"""PPL and KL of every method on TinyStories-656K, at 4 bits, group 32/128, symmetric/asymmetric.

Protocol (the one tests/test_methods.py asserts on): the TinyStories validation head; evaluation on its
first 156 windows of BOS + 256 text tokens (39,936 scored tokens); calibration on 64 windows of BOS + 255
text tokens from the end of the same file. KL is mean KL(fp32 || quantized) per token, in nats.

    python bench/methods_tinystories.py [--data ../shared/data] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from quantfab.pipelines.recipe import QuantizeSpec
from quantfab.tasks.store import Store
from quantfab.tasks.trial import Trial, protocol_windows

SCHEMES = [(32, True), (32, False), (128, True), (128, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("QUANTFAB_DATA", "../shared/data")))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    calib, evals = protocol_windows(args.data / "tinystories-valid-head.txt", args.data / "tinystories-656k", 156, 257, 64, 256)
    with tempfile.TemporaryDirectory() as tmp:
        trial = Trial(args.data / "tinystories-656k", Store(tmp), calib, evals, args.device)
        builds = [(f"INT4_G{g}_{'SYM' if sym else 'ASYM'}", method) for g, sym in SCHEMES for method in ("rtn", "gptq", "awq")]
        builds += [("INT4_G64_SYM", "rtn"), ("NF4_B64", "nf4")]
        print(f"{'grid':<16} {'method':<6} {'PPL':>8} {'KL':>8} {'KL/rtn':>7} {'top1':>7} {'s':>6}", flush=True)
        rtn: dict[str, float] = {}
        for grid, method in builds:
            t = time.perf_counter()
            m = trial.metrics(QuantizeSpec(method=method), grid)
            secs = time.perf_counter() - t
            if method == "rtn":
                rtn[grid] = m["kl_divergence"]
            base = rtn.get(grid) or rtn[grid.replace("NF4_B", "INT4_G") + "_SYM"]
            print(f"{grid:<16} {method:<6} {m['perplexity']:8.3f} {m['kl_divergence']:8.5f} "
                  f"{m['kl_divergence'] / base:7.3f} {m['top1_agreement'] * 100:6.2f}% {secs:6.1f}", flush=True)
        print(f"FP32 PPL {m['baseline_perplexity']:.3f} on {m['tokens']} tokens")


if __name__ == "__main__":
    main()
