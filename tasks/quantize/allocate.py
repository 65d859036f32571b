"""allocate: each Linear's type under a size budget (an output's ``target_bits_per_weight``).

Users hold a memory budget (a 24 GB card, a 16 GB laptop), not a type name. For every decoder-layer Linear the
candidates are the format's types (``fmt.budget_grids``) whose block divides its row. A candidate costs its bytes in
the file (the format's own ``plan``) and brings a predicted KL: its output error on the calibration inputs,
sum_j h_j sum_i (w_ij - w'_ij)^2, with h the mean squared input per column (the importance matrix, the calibrate
stage's XᵀX diagonal) and w' the type's round-to-nearest codes weighed by h, as llama-quantize --imatrix picks them
(estimated on an even sample of rows), times the Linear's own KL per unit of that error (``kl_per_error``: one forward
per Linear). Choosing one candidate per Linear to minimise the summed KL within the budget is a multiple-choice
knapsack; it is solved as its Lagrangian relaxation is: on each Linear's lower convex hull of (bytes, KL), starting
from the smallest, take the step that removes the most KL per byte while the budget holds. The experts stacked in one
tensor move together. Everything else (the embedding, the head, norms, Linears kept in float or pinned by an
override) keeps the output type's choice and counts against the budget first.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors import safe_open

from quantfab.tasks.convert import FORMATS
from quantfab.tasks.convert.imatrix import importance
from quantfab.tasks.download import materialize
from quantfab.tasks.errors import UserError
from quantfab.tasks.manifests import Allocation, AllocationManifest, CalibrationManifest, ModelManifest
from quantfab.tasks.modelio import TensorInfo, WeightIndex
from quantfab.tasks.quantize.assign import assign_layers, budget_of, matches
from quantfab.tasks.quantize.grid_base import reference_by_rows
from quantfab.tasks.quantize.grids import grid_named
from quantfab.tasks.store import Store

KL_TOKENS = 4096  # calibration tokens (whole windows, at least one) each unit's KL is measured on
SAMPLE_ROWS = 256  # rows per Linear the error is measured on (evenly spaced), scaled up to all its rows
STACKED = re.compile(r"\.experts\.\d+\.")  # experts one file tensor holds: they share a type


@dataclass(frozen=True)
class Option:
    """One candidate type of one unit (a Linear, or the experts stacked in one tensor)."""

    grid: str
    nbytes: int
    error: float


def lower_hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, error), smallest first: the only ones a Lagrangian choice
    takes (each step then buys less error per byte than the one before)."""
    hull: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.error, o.grid)):
        if hull and o.error >= hull[-1].error:
            continue  # as large or larger and no better
        while len(hull) >= 2 and ((hull[-2].error - hull[-1].error) * (o.nbytes - hull[-1].nbytes)
                                  <= (hull[-1].error - o.error) * (hull[-1].nbytes - hull[-2].nbytes)):
            hull.pop()  # above the segment from hull[-2] to o
        hull.append(o)
    return hull


def choose(units: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """One option per unit, within ``budget`` bytes: the greedy Lagrangian walk up each unit's hull. A step that
    does not fit ends that unit's walk (its later steps cost more); smaller steps of other units may still fit."""
    hulls = {u: lower_hull(o) for u, o in units.items()}
    at = {u: 0 for u in hulls}
    spent = sum(h[0].nbytes for h in hulls.values())
    steps = [(_rate(h, 0), u) for u, h in hulls.items() if len(h) > 1]
    heapq.heapify(steps)
    while steps:
        _, u = heapq.heappop(steps)
        h, i = hulls[u], at[u]
        cost = h[i + 1].nbytes - h[i].nbytes
        if spent + cost > budget:
            continue
        at[u], spent = i + 1, spent + cost
        if i + 2 < len(h):
            heapq.heappush(steps, (_rate(h, i + 1), u))
    return {u: hulls[u][i] for u, i in at.items()}


def _rate(hull: list[Option], i: int) -> float:
    """Minus the error removed per byte by the step from hull[i] to hull[i + 1] (a min-heap takes the best first)."""
    return -(hull[i].error - hull[i + 1].error) / (hull[i + 1].nbytes - hull[i].nbytes)


def weighted_error(grid_name: str, w: np.ndarray, importance: np.ndarray) -> float:
    """sum_j h_j sum_i (w_ij - w'_ij)^2 over an even sample of ``SAMPLE_ROWS`` rows, scaled to all rows."""
    grid = grid_named(grid_name)
    rows = w.shape[0]
    step = max(1, rows // SAMPLE_ROWS)
    sample = np.ascontiguousarray(w[::step][:SAMPLE_ROWS])
    diff = sample - grid.decode(reference_by_rows(grid, sample, importance))
    return float(np.einsum("ij,j->", diff.astype(np.float64) ** 2, importance.astype(np.float64)) * rows / len(sample))


def kl_windows(samples: int, seq_len: int) -> int:
    """How many calibration windows the KL per unit is measured on: ``KL_TOKENS`` worth, at least one."""
    return max(1, min(samples, KL_TOKENS // seq_len))


def fitting(grids: list[str], cols: int) -> list[str]:
    """The grids a row of ``cols`` fits (a per-row grid named for the row, as ``assign`` names it), in order."""
    out: list[str] = []
    for name in grids:
        grid = grid_named(name).for_row(cols)
        if cols % grid.span == 0 and grid.name not in out:
            out.append(grid.name)
    return out


def pinned(module: str, quant: Any) -> bool:
    """An override that sets bits, group or symmetry fixes the Linear's type: the budget leaves it alone."""
    return any(matches(module, p) and (o.bits, o.group_size, o.symmetric) != (None, None, None)
               for p, o in quant.overrides.items())


def allocate_output(config, tensors: dict[str, TensorInfo], weights: WeightIndex, importance: dict[str, Any],
                    quant: Any, fmt: Any, options: Any, ids: np.ndarray, device: str = "cpu") -> Allocation:
    """The type of every Linear the budget decides for one output, with the bytes and KL it predicts.

    ``ids``: calibration windows on which each unit's KL at one type is measured (``kl_per_error``)."""
    target = options.target_bits_per_weight
    params = sum(t.numel for n, t in tensors.items() if n == t.name)
    budget = int(target * params / 8)
    assigned = [a for layer in assign_layers(config, tensors, quant, fmt, options) for a in layer.values()]
    free = [a for a in assigned if a.grid and not pinned(a.module, quant)]
    if not free:
        raise UserError(f"outputs[{options.key}]: target_bits_per_weight has no Linear to choose a type for "
                        "(every one is ignored, pinned by an override or kept in float)")
    fixed = {a.module: a.grid for a in assigned if a not in free}
    presets = fmt.presets(options, config, tensors)
    cols = {a.module: tensors[f"{a.module}.weight"].shape[1] for a in free}
    candidates = {m: fitting(fmt.budget_grids(options, presets.get(m)), c) for m, c in cols.items()}
    for m, c in candidates.items():
        if not c:
            raise UserError(f"outputs[{options.key}]: {m}: no type {fmt.name}'s budget picks among fits its rows of "
                            f"{cols[m]}: add it to quantize.ignore (or pin it with an override)")
    sizes, rest = _module_bytes(fmt, options, config, tensors, fixed, candidates)
    units: dict[str, list[str]] = {}
    for a in free:
        units.setdefault(STACKED.sub(".experts.*.", a.module), []).append(a.module)
    errors: dict[str, dict[str, float]] = {}
    nbytes: dict[str, dict[str, int]] = {}
    for unit, modules in units.items():
        shared = [g for g in candidates[modules[0]] if all(g in candidates[m] for m in modules)]
        raw = weights.load([f"{m}.weight" for m in modules])
        loaded = {m: (raw[f"{m}.weight"].numpy(), _importance(importance, m, cols[m])) for m in modules}
        errors[unit] = {g: sum(weighted_error(g, w, h) for w, h in loaded.values()) for g in shared}
        nbytes[unit] = {g: sum(sizes[g][m] for m in modules) for g in shared}
    least = rest + sum(min(n.values()) for n in nbytes.values())
    if least > budget:
        raise UserError(f"outputs[{options.key}]: target_bits_per_weight {target:g} is below the smallest this "
                        f"format reaches on this model, {least * 8 / params:.3f} (every chosen Linear at its smallest "
                        "type; the embedding, head and other tensors as the output type has them)")
    reference = {u: min(n, key=lambda g: (abs(n[g] * 8 / _weights(tensors, units[u]) - target), g))
                 for u, n in nbytes.items()}
    scale = kl_per_error(config, weights, units, reference, importance, errors, ids, device)
    options_of = {u: [Option(g, nbytes[u][g], errors[u][g] * scale[u]) for g in errors[u]] for u in units}
    chosen = choose(options_of, budget - rest)
    types = {m: chosen[u].grid for u, modules in units.items() for m in modules}
    return Allocation(target_bits_per_weight=target,
                      bits_per_weight=(rest + sum(o.nbytes for o in chosen.values())) * 8 / params, types=types,
                      kl=sum(o.error for o in chosen.values()))


def kl_per_error(config, weights: WeightIndex, units: dict[str, list[str]], reference: dict[str, str],
                 importance: dict[str, Any], errors: dict[str, dict[str, float]], ids: np.ndarray,
                 device: str) -> dict[str, float]:
    """Per unit, the KL of the model's next-token distribution (against the float model, on ``ids``) with that unit
    alone on its ``reference`` type, per unit of its weighted error there.

    The weighted error is each Linear's own output error; how much of it reaches the logits differs by orders of
    magnitude between Linears (an early o_proj against a late up_proj), while for one Linear the ratio barely moves
    with the type (measured within ~20 % from IQ1_S to Q6_K). So one forward per unit turns every candidate's error
    into its KL. The float model runs once, keeping each layer's input (on the CPU); units then run in batches
    ordered by layer, each from its own layer's float input onward, every layer's float weights read once per
    batch (a unit's model differs from the float one in that unit alone)."""
    import torch

    from quantfab.tasks.decoder import Decoder
    from quantfab.tasks.modelio import pick_device

    with torch.no_grad():
        dev = pick_device(device)
        decoder = Decoder(config, dev)
        decoder.load_outer(weights.load(weights.checkpoint_names(decoder.entry_names())))
        hidden = decoder.embed(torch.from_numpy(ids))
        inputs = []
        for i in range(decoder.num_layers):
            inputs.append(hidden.cpu())
            hidden = decoder.run_layer(i, decoder.layer(i, weights.layer(i)), hidden)
        decoder.load_outer(weights.load(weights.checkpoint_names(decoder.exit_names())))
        layer_of = {u: _layer_index(weights, modules[0]) for u, modules in units.items()}
        order = sorted(units, key=lambda u: (layer_of[u], u))
        batch = max(1, KL_STATES // (ids.size * int(config.hidden_size) * 4))
        out: dict[str, float] = {}
        for start in range(0, len(order), batch):
            part = order[start:start + batch]
            states: dict[str, torch.Tensor] = {}
            for i in range(layer_of[part[0]], decoder.num_layers):
                tensors = weights.layer(i)
                plain = decoder.layer(i, tensors)
                for u in part:
                    if layer_of[u] == i:
                        patched = {n.removeprefix(weights.prefix(i)): torch.from_numpy(w)
                                   for n, w in _dequantized(weights, units[u], reference[u], importance).items()}
                        states[u] = decoder.run_layer(i, decoder.layer(i, {**tensors, **patched}), inputs[i].to(dev))
                    elif u in states:
                        states[u] = decoder.run_layer(i, plain, states[u])
            kl = _mean_kl(decoder, hidden, states)
            for u in part:
                err = errors[u][reference[u]]
                out[u] = kl[u] / err if err > 0 else 0.0
        return out


KL_STATES = 1 << 30  # bytes of hidden states ``kl_per_error`` holds for a batch of units
LOGPROB_CHUNK = 1 << 22  # float64 log-probabilities per model at a time, as validate computes them


def _layer_index(weights: WeightIndex, module: str) -> int:
    return int(module.removeprefix(weights.layers_name + ".").split(".")[0])


def _mean_kl(decoder: Any, base: Any, hidden: dict[str, Any]) -> dict[str, float]:
    """Each model's KL(float || it) of the next-token distributions, averaged over every predicting position (each
    window's last predicts nothing), a chunk of positions at a time as validate's metrics compute it."""
    import torch

    width = base.shape[1] - 1
    step = max(1, min(LOGPROB_CHUNK // int(decoder.config.vocab_size), width))
    total = dict.fromkeys(hidden, 0.0)
    for w in range(base.shape[0]):
        for s in range(0, width, step):
            lp_base = torch.log_softmax(decoder.logits(base[w:w + 1, s:s + step])[0].double(), dim=-1)
            p = lp_base.exp()
            for key, h in hidden.items():
                lp = torch.log_softmax(decoder.logits(h[w:w + 1, s:s + step])[0].double(), dim=-1)
                total[key] += (p * (lp_base - lp)).sum().item()
    return {key: t / (base.shape[0] * width) for key, t in total.items()}


def _dequantized(weights: WeightIndex, modules: list[str], grid_name: str, importance: dict[str, Any]) -> dict[str, np.ndarray]:
    """The unit's weights as its round-to-nearest codes on ``grid_name`` decode (by checkpoint tensor name)."""
    grid = grid_named(grid_name)
    loaded = weights.load([f"{m}.weight" for m in modules])
    return {n: grid.decode(reference_by_rows(grid, w.numpy(), _importance(importance, n.removesuffix(".weight"),
                                                                          w.shape[1])))
            for n, w in loaded.items()}


def _weights(tensors: dict[str, TensorInfo], modules: list[str]) -> int:
    return sum(tensors[f"{m}.weight"].numel for m in modules)


def _importance(importance: dict[str, Any], module: str, cols: int) -> np.ndarray:
    """The module's mean squared input per column; all ones where the calibration saw none (as llama.cpp's)."""
    sums, count = importance.get(f"{module}.weight", (None, 0))
    if sums is None or not count:
        return np.ones(cols, np.float32)
    return (np.asarray(sums, np.float32) / np.float32(count)).astype(np.float32)


def _module_bytes(fmt: Any, options: Any, config, tensors: dict[str, TensorInfo], fixed: dict[str, str | None],
                  candidates: dict[str, list[str]]) -> tuple[dict[str, dict[str, int]], int]:
    """Each candidate's bytes per module, from the format's plan with every module that fits it on that type, and
    the bytes of everything the budget does not choose (the same in every plan)."""
    sizes: dict[str, dict[str, int]] = {}
    rest = 0
    for g in sorted({g for c in candidates.values() for g in c}):
        chosen = {m: (g if g in c else c[0]) for m, c in candidates.items()}
        by_module: dict[str, int] = {}
        for t in fmt.plan(options, config, tensors, {**fixed, **chosen}):
            module = t.hf_name.removesuffix(".weight")
            by_module[module] = by_module.get(module, 0) + t.nbytes
        sizes[g] = {m: by_module[m] for m in candidates}
        rest = sum(n for m, n in by_module.items() if m not in candidates)
    return sizes, rest


def allocate(model: ModelManifest, calibration: CalibrationManifest, quant: Any, outputs: list, device: str,
             store: Store) -> AllocationManifest:
    """The allocate stage: every output with a ``target_bits_per_weight`` gets its table of types."""
    budgeted = [o for o in outputs if budget_of(o) is not None]
    if not budgeted:
        return AllocationManifest()
    model_dir = materialize(store, model.files)
    config, weights = model_dir.config(), model_dir.weights()
    if not calibration.stats:
        raise RuntimeError("allocate got a calibration without statistics: reads_statistics decided otherwise")
    sums = importance(calibration, weights, store)
    with safe_open(str(store.local_path(calibration.tokens)), framework="np") as f:
        ids = f.get_tensor("input_ids")
    ids = ids[:kl_windows(*ids.shape)]
    return AllocationManifest(outputs={o.key: allocate_output(config, weights.tensors, weights, sums, quant,
                                                              FORMATS[o.format], o, ids, device) for o in budgeted})
