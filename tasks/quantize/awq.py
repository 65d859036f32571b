"""awq: activation-aware scaling, then a clipping search, then codes on the format's grid.

Lin et al. 2023 (AWQ), as AutoAWQ applies it to Llama. For each group of Linears that read one input
made by a norm or a Linear (q/k/v after input_layernorm, gate/up after post_attention_layernorm in a
Llama: the layer's forward shows which), or that the family's table pairs with a Linear before them (o
after v when their shapes match, down after up), a per-input-channel scale s = mean|x|^alpha (normalised by sqrt(max s * min s)) is
searched over ``grid_points`` values of alpha in [0, 1); the one kept minimises the group's output error
sum ||(Q(W s) / s - W) X||^2, computed exactly from the calibration Hessian X^T X. alpha = 0 is plain
round-to-nearest, so the search never does worse than it on that error. The scale is folded into the
preceding norm weight or Linear rows (x / s) and into the Linears' columns (W s): the float model is
unchanged. Then, for every Linear but q and k (as AutoAWQ), each block's range is shrunk by up to
``max_shrink`` over ``clip_points`` ratios, keeping the ratio with the least output error of that block.

A group with no such op before it (an expert's gate and up read the tokens routed to it, a gather no
module makes) gets the clipping search only, and its report says so; an expert's down is paired with its up.

Statistics are the unquantized model's, which are the scaled model's: scaling leaves its outputs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantfab.tasks.gram import hessian_weighted
from quantfab.tasks.modelio import CPU
from quantfab.tasks.quantize.grids import Encoded, Grid
from quantfab.tasks.quantize.group import clip_search
from quantfab.tasks.quantize.layer import LayerInput, LayerResult, PerModule, bind_by_input
from quantfab.tasks.quantize.stats import InputStats
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

NO_CLIP = ("q_proj", "k_proj")  # AutoAWQ leaves these unclipped: attention scores are sensitive


@dataclass(frozen=True)
class Scaling:
    """One input group's scale: folded into ``into`` (a norm, or the last of ``blocks`` equal row blocks of a
    Linear: Phi-3's v in qkv_proj, up in gate_up_proj), multiplied into ``modules``, which read input ``key``."""

    into: str
    linear: bool
    modules: tuple[str, ...]
    key: str
    blocks: int = 1


def scalings(layer: LayerInput) -> list[Scaling]:
    """Per input group, in forward order, where its scale folds; groups with no such module are left out."""
    out = []
    for key, members in layer.structure.groups.items():
        width = layer.weight(key).shape[1]
        producer = layer.structure.producers.get(key)
        made = layer.weights.get(f"{producer}.weight")
        if made is not None and made.ndim == 1 and made.shape[0] == width and "norm" in producer.lower():
            out.append(Scaling(producer, False, members, key))
        elif made is not None and made.ndim == 2 and made.shape[0] == width:  # a Linear feeding this one directly
            out.append(Scaling(producer, True, members, key))
        elif (pair := layer.family.smooth_pair(key)) is not None and len(members) == 1:
            out.append(Scaling(pair[0], True, members, key, pair[1]))
    return out


class AWQ(PerModule):
    name = "awq"
    stepwise = False  # scales move between a group and the norm or Linear before it

    def quantize_layer(self, layer: LayerInput) -> LayerResult:
        opts = self.spec.awq
        weights = {k: v.astype(np.float32, copy=True) for k, v in layer.weights.items()}
        stats = dict(layer.stats)
        changed: set[str] = set()
        scaled: set[str] = set()
        offset = np.float32(layer.family.norm_offset)
        for sc in scalings(layer):
            prev, modules, key = sc.into, sc.modules, sc.key
            width = weights[f"{modules[0]}.weight"].shape[1]
            if not all(m in layer.grids for m in modules):
                continue  # a Linear here is kept in float or quantized by another method: leave the group alone
            if sc.linear and (prev not in layer.grids or weights[f"{prev}.weight"].shape[0] != sc.blocks * width):
                continue  # e.g. grouped-query attention: v's outputs do not line up with o's inputs
            s = search_scale([weights[f"{m}.weight"] for m in modules], [layer.grids[m] for m in modules],
                             stats[key], opts.grid_points, self.device)
            for tensor in (f"{prev}.weight", f"{prev}.bias"):  # a norm's or Linear's outputs, divided by s
                if tensor not in weights:
                    continue
                if sc.linear:  # its last ``width`` output rows (all of them but for a fused Linear)
                    tail = weights[tensor][-width:]
                    weights[tensor][-width:] = tail / (s[:, None] if tail.ndim == 2 else s)
                elif tensor.endswith(".weight"):
                    weights[tensor] = ((weights[tensor] + offset) / s - offset).astype(np.float32)
                else:
                    weights[tensor] = (weights[tensor] / s).astype(np.float32)
                changed.add(tensor)
            scaled.update(modules)
            for m in modules:
                weights[f"{m}.weight"] = (weights[f"{m}.weight"] * s[None, :]).astype(np.float32)
            stats[key] = stats[key].scaled(s)
        result = LayerResult()
        for module, grid in bind_by_input(layer.grids, weights, layer.structure).items():  # the scaled weights'
            w = weights[f"{module}.weight"]
            st = stats[layer.structure.group_of(module)]
            if opts.clip and module.rsplit(".", 1)[-1] not in NO_CLIP:
                enc = clip(w, grid, st, opts.max_shrink, opts.clip_points)
            else:
                enc = grid.reference(w)
            result.encoded[module] = grid.finalize(enc)
            result.stats[module] = st
            result.fitted[module] = w
            if module not in scaled:
                result.notes[module] = ("awq: no norm or quantized Linear before its input to fold a scale into: "
                                        "clip search only")
        result.floats = {name: weights[name] for name in changed if name.removesuffix(".weight") not in layer.grids}
        return result


def search_scale(ws: list[np.ndarray], grids: list[Grid], st: InputStats, points: int,
                 device: torch.device = CPU) -> np.ndarray:
    """The per-input-channel scale with the least output error of the scaled, quantized group (the error's
    matmuls on ``device``, the codes on the CPU)."""
    x_mean = np.maximum(st.mean_abs.astype(np.float32), np.float32(0))
    h = torch.from_numpy(st.hessian.astype(np.float32, copy=False)).to(device)
    best_s, best_loss = np.ones_like(x_mean), np.inf
    for alpha in np.arange(points, dtype=np.float32) / np.float32(points):
        s = np.maximum(x_mean ** alpha, np.float32(1e-4))
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        loss = 0.0
        for w, grid in zip(ws, grids):
            scaled = (w * s[None, :]).astype(np.float32)
            delta = grid.decode(grid.reference(scaled)) / s[None, :] - w
            loss += hessian_weighted(delta, h)
        if loss < best_loss:
            best_s, best_loss = s, loss
    return best_s


def clip(w: np.ndarray, grid: Grid, st: InputStats, max_shrink: float, points: int) -> Encoded:
    """Per block (per super-block of a K-quant), the range shrink ratio in [1 - max_shrink, 1] with the least
    output error there (the diagonal blocks of H, so errors of different blocks are not coupled)."""
    cols, b = w.shape[1], grid.block
    idx = np.arange(cols // b)
    h_blocks = st.hessian.reshape(cols // b, b, cols // b, b)[idx, :, idx, :]  # (blocks, b, b): diagonal blocks
    return clip_search(w, grid, np.linspace(1.0, 1.0 - max_shrink, points, dtype=np.float32),
                       lambda delta: np.einsum("rki,kij,rkj->rk", delta, h_blocks, delta, optimize=True))
