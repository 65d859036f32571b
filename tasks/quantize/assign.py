"""Which grid and method each Linear gets for one output: ignore globs, overrides, row-length fallback.

Plan and quantize both call this, so what plan shows is what quantize does. Every Linear that ends up
other than the recipe asked (a format's fallback type, a smaller group, kept in float, rtn for a lattice type that
gptq or awq cannot code) carries the reason in ``fallback``. A group or block that does not divide a row is never
turned into float silently: ``quantize.indivisible`` refuses (the default, naming the Linears and the group sizes that
would fit), picks the largest group that divides every row, or keeps those Linears in float.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Any

from quantfab.tasks.modelio import TensorInfo
from quantfab.tasks.errors import UserError
from quantfab.tasks.quantize.grids import GridRequest, grid_named
from quantfab.tasks.quantize.lattice import LatticeGrid
from quantfab.tasks.model_structure import layout, model_units



@dataclass(frozen=True)
class Assignment:
    module: str  # e.g. model.layers.0.mlp.down_proj
    method: str
    grid: str | None  # None: kept in float
    note: str = ""
    asked: str | None = None  # the grid the recipe asked for, where a fallback changed it
    fallback: str = ""  # why this differs from what the recipe asked ("" when it does not)


def matches(module: str, pattern: str) -> bool:
    """Globs match the full name or any dotted suffix, so 'lm_head' and '*.down_proj' both work."""
    parts = module.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def request(method: str, bits: int | None, group_size: int | None, symmetric: bool | None, quant: Any) -> GridRequest:
    """The grid a method asks for: nf4 asks for the NF4 codebook, every other method for integers."""
    if method == "nf4":
        return GridRequest(bits, group_size, symmetric, nf4=True, double_quant=quant.nf4.double_quant)
    return GridRequest(bits, group_size, symmetric)


def keeps_floats(options: Any, preset: str | None, cols: int) -> str:
    return f"{options.key} keeps floats" + (f" (row length {cols} fits no block of its type)" if preset else "")


def assign(module: str, cols: int, quant: Any, fmt: Any, options: Any, preset: str | None = None,
           preset_fallback: str = "", chosen: str | None = None) -> Assignment:
    """``quant`` is the recipe's QuantizeSpec; ``fmt``/``options`` the output's format and options; ``preset``
    the type the format's own per-tensor rules give this module (``fmt.presets``), if it has any, and
    ``preset_fallback`` why those rules moved it off the type asked for; ``chosen`` the grid the output's size
    budget gave it (the allocate stage), which takes the place of both."""
    if any(matches(module, pat) for pat in quant.ignore):
        return Assignment(module, quant.method, None, "ignored by quantize.ignore")
    method, bits, group_size, symmetric = quant.method, quant.bits, quant.group_size, quant.symmetric
    for pattern, o in quant.overrides.items():
        if matches(module, pattern):
            method = o.method or method
            bits = o.bits if o.bits is not None else bits
            group_size = o.group_size if o.group_size is not None else group_size
            symmetric = o.symmetric if o.symmetric is not None else symmetric
    if chosen:
        grid, preset_fallback = grid_named(chosen), ""
    else:
        grid = fmt.grid_for(options, request(method, bits, group_size, symmetric, quant), preset)
    if grid is None:  # a format may say why itself (GGUF's split tensors)
        note = fmt.float_note(options, preset) if hasattr(fmt, "float_note") else None
        return Assignment(module, method, None, note or keeps_floats(options, preset, cols), fallback=preset_fallback)
    grid = grid.for_row(cols)
    if cols % grid.span:
        kept = getattr(options, "float_type", "float")
        return Assignment(module, method, None, f"row length {cols} is not a multiple of the {grid.name} block "
                          f"{grid.span}: kept as {kept}", asked=grid.name,
                          fallback=f"row {cols} not a multiple of {grid.span} ({grid.name}) -> {kept}")
    if isinstance(grid, LatticeGrid) and method != "rtn":
        return Assignment(module, "rtn", grid.name, f"{method} -> rtn: {grid.name} picks one codebook point per group "
                          "of weights, which only its own search (llama.cpp's) chooses", asked=grid.name,
                          fallback=f"{method} cannot code {grid.name} -> rtn")
    return Assignment(module, method, grid.name, fallback=preset_fallback if grid.name == preset else "")


def assign_layers(config, tensors: dict[str, TensorInfo], quant: Any, fmt: Any, options: Any,
                  chosen: dict[str, str] | None = None) -> list[dict[str, Assignment]]:
    """Per decoder layer, every unit's assignment for one output (what plan shows and quantize does): units are
    the checkpoint's matrices (Linears, and each expert's), named as on disk. Linears a group or block would
    leave in float are handled by ``quant.indivisible``. ``chosen``: the grids the output's size budget gave
    (the allocate stage's table)."""
    chosen = chosen or {}
    presets = fmt.presets(options, config, tensors)
    format_fallbacks = fmt.fallbacks(options, config, tensors) if hasattr(fmt, "fallbacks") else {}
    shape = layout(config)
    units = model_units(config, {n: t.shape for n, t in tensors.items()})

    def assign_all(q: Any) -> list[dict[str, Assignment]]:
        named = [{lin: f"{shape.prefix(i)}{lin}" for lin in linears} for i, linears in enumerate(units)]
        return [{lin: assign(m, tensors[f"{m}.weight"].shape[1], q, fmt, options, presets.get(m),
                             format_fallbacks.get(m, ""), chosen.get(m)) for lin, m in layer.items()} for layer in named]

    layers = assign_all(quant)
    stuck = [a for layer in layers for a in layer.values() if a.grid is None and a.fallback]
    if not stuck or quant.indivisible == "keep_float":
        return layers
    rows = {a.module: tensors[f"{a.module}.weight"].shape[1] for layer in layers for a in layer.values()
            if a.grid or a in stuck}
    group = quant.group_size or max((grid_named(a.asked).span for a in stuck if a.asked), default=0)
    fits = _dividing_groups(rows.values(), group, options, fmt, quant)
    if quant.indivisible == "largest_group" and fits:
        asked = {a.module: a.grid or a.asked for layer in layers for a in layer.values()}
        why = (f"group {group} -> {fits[0]}: rows of {', '.join(map(str, sorted({rows[a.module] for a in stuck})))} "
               f"are not multiples of {group} (quantize.indivisible: largest_group)")
        return [{lin: replace(a, asked=asked[a.module], fallback=a.fallback or why) if a.grid else a
                 for lin, a in layer.items()} for layer in assign_all(quant.model_copy(update={"group_size": fits[0]}))]
    raise UserError(_refusal(options.key, stuck, rows, fits, quant.indivisible))


def budget_of(options: Any) -> float | None:
    """An output's size budget, ``target_bits_per_weight`` (None: its type decides every tensor)."""
    return getattr(options, "target_bits_per_weight", None)


def reads_statistics(config, tensors: dict[str, TensorInfo], quant: Any, outputs: list, full: bool | None = None) -> bool:
    """Whether any output reads the calibrate stage's statistics of the unquantized model: it fits its layers to
    them (``reads_full_statistics``; ``full``, where the caller has it already), it ships an importance matrix
    (GGUF's), which is their diagonal, or a size budget weighs its candidates' errors by that diagonal."""
    if ships_importance(outputs) or any(budget_of(o) for o in outputs):
        return True
    return full if full is not None else reads_full_statistics(config, tensors, quant, outputs)


def ships_importance(outputs: list) -> bool:
    """Whether any output ships llama.cpp's importance matrix (made by convert from the calibration)."""
    from quantfab.tasks.convert import FORMATS  # on demand: loading a recipe imports this module, not the formats

    return any(FORMATS[o.format].ships_importance(o) for o in outputs)


def reads_full_statistics(config, tensors: dict[str, TensorInfo], quant: Any, outputs: list) -> bool:
    """Whether any output fits its layers to the unquantized model's statistics, XᵀX whole: where none does,
    calibrate gathers the diagonal alone for an importance matrix (a 70B's XᵀX are hundreds of GB).

    An output with a module on a sequential method carries hidden states through the quantized model
    and measures every layer's inputs there, for all its methods; of the others, those with a method that
    reads its inputs (group, awq) read them, and those of rtn or nf4 alone only for the module report. An output
    with static activation scales measures its inputs as a sequential one does. SmoothQuant reads them for every
    output. NVFP4 needs the pass for which Linears read one input (they share a global scale).
    """
    from quantfab.tasks.convert import FORMATS  # on demand: loading a recipe imports this module, not the formats
    from quantfab.tasks.quantize import METHODS

    for o in outputs:
        if not FORMATS[o.format].stores_codes(o):
            continue
        if quant.smoothquant is not None:  # its scales come from the unquantized model's input ranges
            return True
        layers = assign_layers(config, tensors, quant, FORMATS[o.format], o)
        if not measures_inputs(layers, FORMATS[o.format].measured_scales(o)) and (quant.module_report or any(
                METHODS[a.method].reads_inputs or grid_named(a.grid).fused_scale for layer in layers
                for a in layer.values() if a.grid)):
            return True
    return False


def measures_inputs(plans: list[dict[str, Assignment]], measured: Any) -> bool:
    """Whether an output's layers are fitted in one pass of the calibration tokens through the model as built: a
    sequential method needs it, and so do scales measured there (activations.MeasuredScales: static input and
    KV-cache scales, from the inputs and keys the served layers will get)."""
    return sequential(plans) or bool(measured)


def sequential(plans: list[dict[str, Assignment]]) -> bool:
    """Whether any Linear of these layers is quantized by a sequential method (GPTQ)."""
    from quantfab.tasks.quantize import METHODS

    return any(METHODS[a.method].sequential for plan in plans for a in plan.values() if a.grid)


def _dividing_groups(rows: Any, group: int, options: Any, fmt: Any, quant: Any) -> list[int]:
    """Group sizes below ``group`` (powers of two down to 16, largest first) that divide every quantized row and
    that the format accepts for this request; none where no group was asked (a format's fixed blocks)."""
    rows = list(rows)
    found = []
    for g in (256, 128, 64, 32, 16):
        if g >= group or any(r % g for r in rows):
            continue
        try:
            grid = fmt.grid_for(options, request(quant.method, quant.bits, g, quant.symmetric, quant), None)
        except ValueError:
            continue
        if grid is not None and grid.span == g:
            found.append(g)
    return found


def _refusal(key: str, stuck: list[Assignment], rows: dict[str, int], fits: list[int], policy: str) -> str:
    by_row: dict[int, list[str]] = {}
    for a in stuck:
        by_row.setdefault(rows[a.module], []).append(a.module)
    listed = "; ".join(f"row {r}: {len(m)} ({', '.join(m[:3])}{', ...' if len(m) > 3 else ''})" for r, m in sorted(by_row.items()))
    hint = (f"group sizes that divide every quantized row: {', '.join(map(str, fits))} (quantize.group_size), or "
            "quantize.indivisible: largest_group picks the first" if fits else
            "no group size this format accepts divides every row")
    done = "largest_group found none that fits; " if policy == "largest_group" else ""
    return (f"outputs[{key}]: {len(stuck)} Linears would be kept in float ({stuck[0].fallback}): {listed}; "
            f"{done}{hint}; or quantize.indivisible: keep_float to keep them in float")
