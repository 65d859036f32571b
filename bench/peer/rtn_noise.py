"""How far RTN's KL moves when each block's scale moves by less than an fp16 rounding step.

Both sides' RTN follow one rule (min-max range, scale = range / levels, round half to even). The peer keeps
the float32 scale; we keep fp16, as the GPTQ and AWQ checkpoint layouts require, and choose codes against
it. This script measures whether the KL gap between the two is larger than what sub-fp16 perturbations of
the same rule already produce:

* ``exact``: compressed-tensors' RTN replicated in NumPy (float32 scale, ``round(x / d + z)``), which must
  land on the KL that ``run_llmcompressor.py`` recorded for the peer;
* ``nudged``: the same, every block's scale multiplied by (1 + u), u uniform in ±2⁻¹² (an fp16 half-step),
  one draw per seed;
* ``ours``: quantfab's RTN (``grid.reference``).

    python bench/peer/rtn_noise.py [--data ../shared/data] [--seeds 6] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402

from quantfab.tasks.quantize.grids import grid_named  # noqa: E402

SCHEMES = {"rtn-g32-sym": (32, True), "rtn-g128-sym": (128, True), "rtn-g32-asym": (32, False),
           "rtn-g128-asym": (128, False)}
HALF_STEP = 2.0 ** -12  # half the spacing of fp16 values, relative


def compressed_tensors_rtn(w: np.ndarray, group: int, symmetric: bool, nudge: np.ndarray | None) -> np.ndarray:
    """Dequantized INT4 weights by compressed-tensors 0.19's rule, optionally with scales times (1 + nudge)."""
    b = w.reshape(w.shape[0], -1, group)
    lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), 0)
    d = np.maximum(-lo, hi) / np.float32(7.5) if symmetric else (hi - lo) / np.float32(15)
    if nudge is not None:
        d = (d * (1 + nudge)).astype(np.float32)
    z = np.zeros_like(d) if symmetric else np.rint(np.clip(-8 - lo / d, -8, 7))
    q = np.clip(np.rint(b / d[..., None] + z[..., None]), -8, 7)
    return ((q - z[..., None]) * d[..., None]).astype(np.float32).reshape(w.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("QUANTFAB_DATA", "../shared/data")))
    ap.add_argument("--peer", type=Path, default=Path(__file__).resolve().parent / "results-tinystories.json")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model_dir = args.data / "tinystories-656k"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chunks = protocol.eval_chunks(tokenizer, args.data / "tinystories-valid-head.txt")
    reference = protocol.fp32_logprobs(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
                                       chunks)
    weights = {k: v.astype(np.float32) for k, v in load_file(str(model_dir / "model.safetensors")).items()
               if k.endswith("_proj.weight")}
    peer = json.loads(args.peer.read_text())["schemes"] if args.peer.is_file() else {}

    def kl(state: dict[str, np.ndarray]) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
        return protocol.evaluate(model, chunks, reference)["kl"]

    print(f"{'scheme':<14} {'peer':>8} {'exact':>8} {'nudged mean':>11} {'sd %':>6} {'nudged/exact':>13} "
          f"{'ours':>8} {'ours/peer':>9}")
    results = {}
    for scheme, (group, symmetric) in SCHEMES.items():
        exact = kl({k: compressed_tensors_rtn(w, group, symmetric, None) for k, w in weights.items()})
        nudged = []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            nudged.append(kl({k: compressed_tensors_rtn(w, group, symmetric, rng.uniform(
                -HALF_STEP, HALF_STEP, (w.shape[0], w.shape[1] // group)).astype(np.float32))
                for k, w in weights.items()}))
        grid = grid_named(f"INT4_G{group}_{'SYM' if symmetric else 'ASYM'}")
        ours = kl({k: grid.decode(grid.reference(w)) for k, w in weights.items()})
        theirs = peer.get(scheme, {}).get("kl")
        n = np.array(nudged)
        results[scheme] = {"peer": theirs, "exact": exact, "nudged": nudged, "ours": ours}
        print(f"{scheme:<14} {theirs or float('nan'):8.5f} {exact:8.5f} {n.mean():11.5f} "
              f"{100 * n.std(ddof=1) / exact:6.2f} {n.min() / exact:6.3f}–{n.max() / exact:.3f} {ours:8.5f} "
              f"{ours / theirs if theirs else float('nan'):9.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"seeds": args.seeds, "half_step": HALF_STEP, "schemes": results}, indent=2)
                            + "\n")


if __name__ == "__main__":
    main()
