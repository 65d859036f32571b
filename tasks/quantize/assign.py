"""Which grid and method each Linear gets for one output: ignore globs, overrides, row-length fallback.

Plan and quantize both call this, so what plan shows is what quantize does.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from quantfab.tasks.decoder import layout, model_units
from quantfab.tasks.modelio import TensorInfo
from quantfab.tasks.quantize.grids import GridRequest


@dataclass(frozen=True)
class Assignment:
    module: str  # e.g. model.layers.0.mlp.down_proj
    method: str
    grid: str | None  # None: kept in float
    note: str = ""


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


def assign(module: str, cols: int, quant: Any, fmt: Any, options: Any, preset: str | None = None) -> Assignment:
    """``quant`` is the recipe's QuantizeSpec; ``fmt``/``options`` the output's format and options; ``preset``
    the type the format's own per-tensor rules give this module (``fmt.presets``), if it has any."""
    if any(matches(module, pat) for pat in quant.ignore):
        return Assignment(module, quant.method, None, "ignored by quantize.ignore")
    method, bits, group_size, symmetric = quant.method, quant.bits, quant.group_size, quant.symmetric
    for pattern, o in quant.overrides.items():
        if matches(module, pattern):
            method = o.method or method
            bits = o.bits if o.bits is not None else bits
            group_size = o.group_size if o.group_size is not None else group_size
            symmetric = o.symmetric if o.symmetric is not None else symmetric
    grid = fmt.grid_for(options, request(method, bits, group_size, symmetric, quant), preset)
    if grid is None:  # a format may say why itself (GGUF's split tensors)
        note = fmt.float_note(options, preset) if hasattr(fmt, "float_note") else None
        return Assignment(module, method, None, note or keeps_floats(options, preset, cols))
    grid = grid.for_row(cols)
    if cols % grid.span:
        return Assignment(module, method, None, f"row length {cols} is not a multiple of the {grid.name} block "
                          f"{grid.span}: kept as {getattr(options, 'float_type', 'float')}")
    return Assignment(module, method, grid.name)


def assign_layers(config, tensors: dict[str, TensorInfo], quant: Any, fmt: Any, options: Any) -> list[dict[str, Assignment]]:
    """Per decoder layer, every unit's assignment for one output (what plan shows and quantize does): units are
    the checkpoint's matrices (Linears, and each expert's), named as on disk."""
    presets = fmt.presets(options, config, tensors)
    shape = layout(config)
    units = model_units(config, {n: t.shape for n, t in tensors.items()})
    return [{lin: assign(f"{shape.prefix(i)}{lin}", tensors[f"{shape.prefix(i)}{lin}.weight"].shape[1], quant, fmt,
                         options, presets.get(f"{shape.prefix(i)}{lin}")) for lin in linears}
            for i, linears in enumerate(units)]
