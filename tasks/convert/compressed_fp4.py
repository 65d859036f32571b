"""compressed-tensors' FP4 Linears (nvfp4-pack-quantized, mxfp4-pack-quantized), as llm-compressor saves them.

``weight_packed``: two E2M1 codes per byte along the row, the even column in the low nibble (uint8, rows x
cols / 2). ``weight_scale``: NVFP4's E4M3 block scales (float8_e4m3fn, one per 16) or MXFP4's biased E8M0
exponents (uint8, one per 32). NVFP4 adds ``weight_global_scale`` (float32, [1]), which its block scales are
relative to, and, with NVFP4 activations, ``input_global_scale`` (float32, [1]).
"""

from __future__ import annotations

import numpy as np

from quantfab.tasks.lazy import lazy
from quantfab.tasks.quantize.fp4_grids import MXFP4Grid, NVFP4Grid, mx_scale
from quantfab.tasks.quantize.float_grids import e4m3_decode
from quantfab.tasks.quantize.grid_base import Encoded, Grid

torch = lazy("torch")

FORMATS = {"NVFP4": "nvfp4-pack-quantized", "MXFP4": "mxfp4-pack-quantized"}  # grid -> quantization_config format
PRESETS = {("NVFP4", "float"): "NVFP4A16", ("NVFP4", "nvfp4"): "NVFP4",  # (grid, activations) -> llm-compressor's
           ("MXFP4", "float"): "MXFP4A16", ("MXFP4", "mxfp4"): "MXFP4"}  # preset, whose args the config holds


def is_fp4(grid: Grid) -> bool:
    return isinstance(grid, (NVFP4Grid, MXFP4Grid))


def fp4_bytes(rows: int, cols: int, grid: Grid) -> int:
    """Stored bytes of one Linear: half a byte per weight, a byte per block scale, NVFP4's global scale."""
    return rows * cols // 2 + rows * (cols // grid.block) + (4 if isinstance(grid, NVFP4Grid) else 0)


def pack_fp4(module: str, grid: Grid, enc: Encoded) -> dict[str, torch.Tensor]:
    codes = enc.codes.astype(np.uint8)
    out = {f"{module}.weight_packed": torch.from_numpy(np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)))}
    if isinstance(grid, NVFP4Grid):
        stored = NVFP4Grid.stored_scales(enc).view(np.uint8)
        out[f"{module}.weight_scale"] = torch.from_numpy(np.ascontiguousarray(stored)).view(torch.float8_e4m3fn)
        out[f"{module}.weight_global_scale"] = torch.from_numpy(enc.extra["global_scale"].astype(np.float32))
    else:
        exponent = np.rint(np.log2(enc.d)) + 127  # d = 2^(e - 127)
        out[f"{module}.weight_scale"] = torch.from_numpy(exponent.astype(np.uint8))
    return out


def stored_fp4(raw, module: str, grid: Grid) -> Encoded:
    """The codes and effective block scales a file holds for ``module`` (``raw(name)`` reads a stored tensor)."""
    packed = raw(f"{module}.weight_packed").numpy()
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    codes[:, 0::2], codes[:, 1::2] = packed & 15, packed >> 4
    scale = raw(f"{module}.weight_scale")
    if isinstance(grid, NVFP4Grid):
        g = raw(f"{module}.weight_global_scale").numpy().astype(np.float32)
        return Encoded(codes, (e4m3_decode(scale.view(torch.uint8).numpy()) / g[0]).astype(np.float32), None,
                       {"global_scale": g})
    return Encoded(codes, mx_scale(scale.numpy()), None)
