"""gptq: quantize columns one at a time, pushing each column's rounding error onto the columns not yet done.

Frantar et al. 2022 (GPTQ), with the lazy-batch and Cholesky formulation of its reference code:
H = 2 X^T X / n from the layer's real inputs, dampened by ``damp_percent`` of its mean diagonal; the
upper Cholesky factor U of H^-1 gives each column's error weight; updates are applied inside blocks of
``block_size`` columns (there, by sub-blocks of ``SUB_BLOCK``) and to the rest of the matrix once per
block. Linears that read the same input (q/k/v, gate/up) share H, so their rows are quantized together.

Groups are contiguous blocks of the original column order on every grid (GGUF has no g_idx), so
``act_order`` changes the order columns are processed in (descending H diagonal) but not which columns
share a scale. A group's scale is taken when its first column is reached, from its weights as updated by
every column quantized before (the updates the lazy batches still hold back for them are applied to a copy
first, so the codes do not depend on ``block_size``), or from the original weights up front with
``static_groups``. On a K-quant grid the unit is the super-block: its sub-block scales are integers of one
shared scale, so all of them are set, the same way, when the super-block's first column is reached.
Float32 throughout; a test checks its codes against a one-column-at-a-time float64 loop of the reference.
"""

from __future__ import annotations

import numpy as np

from quantfab.tasks.errors import UserError
from quantfab.tasks.modelio import CPU
from quantfab.tasks.quantize.grids import Encoded, Grid
from quantfab.tasks.quantize.group import clip_search, weighted_squares
from quantfab.tasks.quantize.layer import LayerInput, LayerResult, PerModule
from quantfab.tasks.quantize.stats import InputStats
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

DAMP_RETRIES = 4  # multiply the dampening by 10 up to this many times before giving up
TRIANGULAR_BASE = 128  # upper_triangular_inverse solves blocks this small directly
SUB_BLOCK = 16  # columns whose updates inside a lazy-batch block are applied one by one


class GPTQ(PerModule):
    name = "gptq"
    sequential = True

    def quantize_layer(self, layer: LayerInput) -> LayerResult:
        """Quantize Linears that share an input and a grid together: they share H and its factorisation."""
        result = LayerResult()
        batches: dict[tuple[str, str], list[str]] = {}
        for module, grid in layer.grids.items():
            # stacked rows keep a grid's row blocks whole only where each module fills its own (FP8_B128)
            alone = module if layer.weight(module).shape[0] % grid.row_span else ""
            batches.setdefault((layer.structure.group_of(module), grid.name, alone), []).append(module)
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
                    opts.act_order, opts.static_groups, name, ratios, self.device)


def inverse_cholesky(reversed_h: torch.Tensor, damp_percent: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 = U^T U, from J H J (J reverses the order; the caller's
    copy, dampened in place), raising the dampening tenfold on failure.

    With J (H + damp I) J = R^T R, U = J R^-T J: one factorisation and one triangular inverse instead
    of the reference code's factorise, invert, factorise again.
    """
    diagonal = reversed_h.diagonal().clone()
    mean_diag = float(diagonal.mean())
    damp = damp_percent * mean_diag
    for _ in range(DAMP_RETRIES + 1):
        reversed_h.diagonal().copy_(diagonal + damp)  # in place: a fresh damp * eye costs a third of the factorisation
        r, info = torch.linalg.cholesky_ex(reversed_h, upper=True)
        if info.item() == 0:
            return upper_triangular_inverse(r).T.flip(0, 1).contiguous()
        damp *= 10
    raise UserError(f"{name}: GPTQ's Hessian is not positive definite even with dampening {damp / 10:.3g} "
                    f"({damp_percent} x 10^{DAMP_RETRIES} of its mean diagonal {mean_diag:.3g}); raise "
                    "quantize.gptq.damp_percent or calibrate on more tokens")


def upper_triangular_inverse(r: torch.Tensor) -> torch.Tensor:
    """R^-1 by halves, [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]: the work is in matmuls,
    twice as fast as a triangular solve against the identity on one core."""
    n = r.shape[0]
    if n <= TRIANGULAR_BASE:
        return torch.linalg.solve_triangular(r, torch.eye(n, dtype=r.dtype, device=r.device), upper=True)
    k = n // 2
    a, c = upper_triangular_inverse(r[:k, :k]), upper_triangular_inverse(r[k:, k:])
    out = torch.zeros_like(r)
    out[:k, :k], out[k:, k:] = a, c
    out[:k, k:] = -(a @ r[:k, k:]) @ c
    return out


def gptq(w: np.ndarray, h: np.ndarray, grid: Grid, damp_percent: float, block_size: int, act_order: bool,
         static_groups: bool, name: str, clip_ratios: np.ndarray | None = None,
         device: torch.device = CPU) -> Encoded:
    """Codes of ``w`` on ``grid``. The factorisation and the updates of columns beyond the current lazy batch
    (nearly all the arithmetic) run on ``device``; each batch's columns are quantized on the CPU, where the
    grids' NumPy rules live, and only the batch and its errors cross over."""
    rows, cols = w.shape
    group = grid.block
    W = w.astype(np.float32, copy=True)
    diag = np.diag(h).astype(np.float32)
    dead = diag == 0
    W[:, dead] = 0
    diag[dead] = 1
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(cols)
    inv_perm = np.argsort(perm)
    # H in processing order, reversed (what inverse_cholesky factorises), in one copy: np.take is 7x
    # faster than fancy indexing on both axes.
    backwards = perm[::-1]
    reversed_h = np.take(np.take(h.astype(np.float32, copy=False), backwards, axis=0), backwards, axis=1)
    reversed_h[dead[backwards], dead[backwards]] = 1
    U = inverse_cholesky(torch.from_numpy(reversed_h).to(device), damp_percent, name)
    # Work on W transposed, (cols, rows) in processing order: each column GPTQ reads, quantizes and
    # updates is then a contiguous row, and so are the scales of a group.
    WT = torch.from_numpy(W).to(device).T.contiguous().index_select(0, torch.from_numpy(perm).to(device))

    span = grid.span  # columns whose scales are set together: a group, or a K-quant super-block of groups
    per = span // group
    dT = np.zeros((cols // group, rows), np.float32)
    mT = None if grid.symmetric else np.zeros((cols // group, rows), np.float32)  # asymmetric grids store a min or zero
    done = np.zeros(cols // span, bool)
    energy = diag[perm]  # per permuted column: what a clipping search weighs each column's error by

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

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        batch = WT[i1:i2].cpu()  # on the CPU already: a view, updated in place
        Ub = U[i1:i2, i1:i2].cpu()
        B, diagonal = batch.numpy(), Ub.diagonal().numpy()  # NumPy views: no per-column .item() in the loop
        Err1 = np.zeros((i2 - i1, rows), np.float32)  # each column's rounding error over its U diagonal
        Err1t = torch.from_numpy(Err1)
        # Inside the batch, columns update only their sub-block one by one (BLAS ger, in place); the rest
        # of the batch takes a sub-block's errors at once, as the rest of the matrix takes the batch's.
        for j1 in range(i1, i2, SUB_BLOCK):
            j2 = min(j1 + SUB_BLOCK, i2)
            for i in range(j1, j2):
                col = int(perm[i])
                g, s = col // group, col // span
                if not done[s]:
                    members = inv_perm[s * span:(s + 1) * span]  # positions of the span's columns in WT
                    set_span_scales(s, _span_columns(WT, U, batch, Ub, Err1t, members, i, i1, i2, j1, j2), members)
                    done[s] = True
                x = B[i - i1]
                mg = None if mT is None else mT[g]
                q = grid.encode_values(x, dT[g], mg)
                codesT[col] = q
                err = Err1[i - i1]
                np.divide(x - grid.decode_values(q, dT[g], mg), diagonal[i - i1], out=err)
                batch[i + 1 - i1:j2 - i1].addr_(Ub[i - i1, i + 1 - i1:j2 - i1], Err1t[i - i1], alpha=-1)
            if j2 < i2:
                batch[j2 - i1:].addmm_(Ub[j1 - i1:j2 - i1, j2 - i1:].T, Err1t[j1 - i1:j2 - i1], alpha=-1)
        if i2 < cols:
            WT[i2:].addmm_(U[i1:i2, i2:].T, Err1t.to(device), alpha=-1)
    return Encoded(np.ascontiguousarray(codesT.T), np.ascontiguousarray(dT.T),
                   None if mT is None else np.ascontiguousarray(mT.T))


def _span_columns(WT: torch.Tensor, U: torch.Tensor, batch: torch.Tensor, Ub: torch.Tensor, Err1: torch.Tensor,
                  members: np.ndarray, i: int, i1: int, i2: int, j1: int, j2: int) -> np.ndarray:
    """A span's columns, (rows, span) on the CPU, as fully updated by every column before position ``i``.

    Its members are all at positions >= i. Those in the current sub-block [i, j2) are up to date; those
    later in the batch still lack the sub-block's pending updates, and those beyond the batch (on the
    device) the whole batch's so far: both are applied to copies.
    """
    current = torch.empty(len(members), batch.shape[1], dtype=batch.dtype)
    beyond, later = members >= i2, (members >= j2) & (members < i2)
    here = ~(beyond | later)
    current[here] = batch[members[here] - i1]
    if later.any():
        m = members[later] - i1
        current[later] = batch[m] - Ub[j1 - i1:i - i1, m].T @ Err1[j1 - i1:i - i1]
    if beyond.any():
        m = torch.from_numpy(members[beyond]).to(WT.device)
        current[beyond] = (WT[m] - U[i1:i, m].T @ Err1[:i - i1].to(WT.device)).cpu()
    return np.ascontiguousarray(current.numpy().T)
