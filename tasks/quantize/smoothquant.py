"""smoothquant: move each input's outlier channels into the weights that read it, before a method quantizes them.

Xiao et al. 2023 (SmoothQuant), on the groups llm-compressor's SmoothQuantModifier maps for Llama: the Linears
whose shared input a norm produces (q/k/v after input_layernorm, gate/up after post_attention_layernorm; the
layer's forward shows which, as for AWQ). Per input channel j,

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)     (over the calibration tokens and the group's rows)

the norm's weight and bias are divided by s and the Linears' columns multiplied by it: the float model computes
the same function, while the input's per-channel range flattens. That is what dynamic per-token activation
quantization (W8A8) needs: one outlier channel sets a whole token's scale. A channel that never fired, or whose
weights are all zero, keeps s = 1 (llm-compressor would divide its norm weight by 1e-5 there).

max|x_j| is the unquantized model's, from calibrate. A group with a Linear left in float is left alone.
"""

from __future__ import annotations

import numpy as np

from quantfab.tasks.quantize.awq import scalings
from quantfab.tasks.quantize.layer import LayerInput
from quantfab.tasks.quantize.stats import InputStats


def smoothing_scale(x_max: np.ndarray, ws: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|x_j|^alpha / max|W_j|^(1-alpha) over the columns of ``ws``; 1 where either maximum is 0."""
    w_max = np.max([np.abs(w).max(axis=0) for w in ws], axis=0).astype(np.float64)
    x_max = x_max.astype(np.float64)
    live = (x_max > 0) & (w_max > 0)
    s = np.ones_like(x_max)
    s[live] = x_max[live] ** alpha / w_max[live] ** (1 - alpha)
    return s.astype(np.float32)


def smooth(layer: LayerInput, alpha: float) -> tuple[dict[str, np.ndarray], dict[str, InputStats], dict[str, np.ndarray]]:
    """The layer's tensors and statistics with every norm-fed group of quantized Linears smoothed, and the norm
    tensors it changed (relative names), which the layer file stores as replaced floats."""
    weights = dict(layer.weights)
    stats = dict(layer.stats)
    changed: dict[str, np.ndarray] = {}
    offset = np.float32(layer.family.norm_offset)  # a norm that scales by (offset + w): Gemma's 1 + w
    for sc in scalings(layer):
        if sc.linear or not all(m in layer.grids for m in sc.modules):
            continue
        s = smoothing_scale(stats[sc.key].max_abs, [weights[f"{m}.weight"] for m in sc.modules], alpha)
        for tensor in (f"{sc.into}.weight", f"{sc.into}.bias"):
            if tensor in weights:
                shift = offset if tensor.endswith(".weight") else np.float32(0)
                changed[tensor] = weights[tensor] = ((weights[tensor] + shift) / s - shift).astype(np.float32)
        for m in sc.modules:
            weights[f"{m}.weight"] = (weights[f"{m}.weight"] * s[None, :]).astype(np.float32)
        stats[sc.key] = stats[sc.key].scaled(s)
    return weights, stats, changed
