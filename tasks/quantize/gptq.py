"""gptq: quantize columns one at a time, pushing each column's rounding error onto the columns not yet done.

Frantar et al. 2022 (GPTQ), with the lazy-batch and Cholesky formulation of its reference code:
H = 2 X^T X / n from the layer's real inputs, dampened by ``damp_percent`` of its mean diagonal; the
upper Cholesky factor U of H^-1 gives each column's error weight; updates are applied inside blocks of
``block_size`` columns and to the rest of the matrix once per block. Linears that read the same input
(q/k/v, gate/up) share H, so their rows are quantized together in one pass.

Groups are contiguous blocks of the original column order on every grid (GGUF has no g_idx), so
``act_order`` changes the order columns are processed in (descending H diagonal) but not which columns
share a scale. A group's scale is taken from the current, error-updated weights when its first column is
reached, or from the original weights up front with ``static_groups``. On a K-quant grid the unit is the
super-block: its sub-block scales are integers of one shared scale, so all of them are set, from the
current weights, when the super-block's first column is reached. Float32 throughout.
"""

from __future__ import annotations

import numpy as np
import torch

from quantfab.tasks.errors import UserError
from quantfab.tasks.modelio import INPUT_OF
from quantfab.tasks.quantize.grids import Encoded, Grid
from quantfab.tasks.quantize.group import clip_search, weighted_squares
from quantfab.tasks.quantize.layer import LayerInput, LayerResult, PerModule
from quantfab.tasks.quantize.stats import InputStats

DAMP_RETRIES = 4  # multiply the dampening by 10 up to this many times before giving up


class GPTQ(PerModule):
    name = "gptq"
    sequential = True

    def quantize_layer(self, layer: LayerInput) -> LayerResult:
        """Quantize Linears that share an input and a grid together: they share H and its factorisation."""
        result = LayerResult()
        batches: dict[tuple[str, str], list[str]] = {}
        for module, grid in layer.grids.items():
            batches.setdefault((INPUT_OF[module], grid.name), []).append(module)
        for modules in batches.values():
            grid, st = layer.grids[modules[0]], layer.stats_of(modules[0])
            rows = [layer.weight(m).shape[0] for m in modules]
            stacked = np.concatenate([layer.weight(m) for m in modules], axis=0)
            enc = self.quantize(stacked, grid, st, f"{layer.name}.{'/'.join(m.split('.')[-1] for m in modules)}")
            start = 0
            for m, n in zip(modules, rows):
                sl = slice(start, start + n)
                part = Encoded(enc.codes[sl], enc.d[sl], None if enc.m is None else enc.m[sl])
                result.encoded[m] = grid.finalize(part)
                result.stats[m] = st
                start += n
        return result

    def quantize(self, w: np.ndarray, grid: Grid, stats: InputStats, name: str = "tensor") -> Encoded:
        opts = self.spec.gptq
        ratios = np.linspace(1.0, 1.0 - opts.max_shrink, opts.clip_points, dtype=np.float32) if opts.clip else None
        return gptq(w, stats.hessian * np.float32(2 / max(stats.count, 1)), grid, opts.damp_percent, opts.block_size,
                    opts.act_order, opts.static_groups, name, ratios)


def inverse_cholesky(h: np.ndarray, damp_percent: float, name: str) -> np.ndarray:
    """Upper Cholesky factor of (H + damp I)^-1, raising the dampening tenfold on failure."""
    mean_diag = float(np.mean(np.diag(h)))
    damp = damp_percent * mean_diag
    eye = torch.eye(h.shape[0], dtype=torch.float32)
    for _ in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(torch.from_numpy(h) + damp * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0:
                return upper.numpy()
        damp *= 10
    raise UserError(f"{name}: GPTQ's Hessian is not positive definite even with dampening {damp / 10:.3g} "
                    f"({damp_percent} x 10^{DAMP_RETRIES} of its mean diagonal {mean_diag:.3g}); raise "
                    "quantize.gptq.damp_percent or calibrate on more tokens")


def gptq(w: np.ndarray, h: np.ndarray, grid: Grid, damp_percent: float, block_size: int, act_order: bool,
         static_groups: bool, name: str, clip_ratios: np.ndarray | None = None) -> Encoded:
    rows, cols = w.shape
    group = grid.block
    W = w.astype(np.float32, copy=True)
    H = h.astype(np.float32, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    inv_perm = np.argsort(perm)
    H = H[perm][:, perm]
    U = inverse_cholesky(H, damp_percent, name)
    # Work on W transposed, (cols, rows) in processing order: each column GPTQ reads, quantizes and
    # updates is then a contiguous row, and so are the scales of a group.
    WT = np.ascontiguousarray(W[:, perm].T)

    span = grid.span  # columns whose scales are set together: a group, or a K-quant super-block of groups
    per = span // group
    dT = np.zeros((cols // group, rows), np.float32)
    mT = None if grid.symmetric else np.zeros((cols // group, rows), np.float32)  # asymmetric grids store a min or zero
    done = np.zeros(cols // span, bool)
    energy = np.diag(H)  # per permuted column: what a clipping search weighs each column's error by

    def set_span_scales(s: int, current: np.ndarray, columns: np.ndarray) -> None:
        """Scales of span ``s`` from ``current`` (rows, span columns in original order)."""
        if clip_ratios is None:
            ds, ms = grid.scale_candidates(current, 1.0)
        else:
            best = clip_search(current, grid, clip_ratios, weighted_squares(grid, energy[columns]))
            ds, ms = best.d, best.m
        dT[s * per:(s + 1) * per] = ds.T
        if mT is not None and ms is not None:
            mT[s * per:(s + 1) * per] = ms.T

    if static_groups:
        for s in range(cols // span):
            set_span_scales(s, w[:, s * span:(s + 1) * span].astype(np.float32), inv_perm[s * span:(s + 1) * span])
        done[:] = True
    codesT = np.zeros((cols, rows), np.int8)

    WTt, Ut = torch.from_numpy(WT), torch.from_numpy(U)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, W1t = WT[i1:i2], WTt[i1:i2]  # views: numpy reads a column, torch updates the rest in place (BLAS ger)
        Err1 = np.zeros((i2 - i1, rows), np.float32)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g, s = col // group, col // span
            if not done[s]:
                members = inv_perm[s * span:(s + 1) * span]  # positions of the span's columns in WT
                set_span_scales(s, np.ascontiguousarray(WT[members].T), members)
                done[s] = True
            x = W1[i]
            mg = None if mT is None else mT[g]
            q = grid.encode_values(x, dT[g], mg)
            codesT[col] = q
            err = (x - grid.decode_values(q, dT[g], mg)) / U[i1 + i, i1 + i]
            W1t[i:].addr_(Ut[i1 + i, i1 + i:i2], torch.from_numpy(err), alpha=-1)
            Err1[i] = err
        if i2 < cols:  # the rest of the matrix takes this block's errors at once (torch: MKL, in place)
            WTt[i2:].sub_(Ut[i1:i2, i2:].T @ torch.from_numpy(Err1))
    return Encoded(np.ascontiguousarray(codesT.T), np.ascontiguousarray(dT.T),
                   None if mT is None else np.ascontiguousarray(mT.T))

