"""MLX{bits}_G{group}_{F16|BF16|F32}: MLX's affine grid, what mlx-lm's quantized checkpoints hold.

value = s * u + b with unsigned u in [0, 2**bits - 1] and a scale s and bias b per group of ``group`` inputs,
both stored in the checkpoint's float type (the grid's last part). Codes are held as q = u - 2**(bits - 1), so
that 8-bit ones fit the int8 codes every grid hands a format. ``reference`` is mx.quantize's affine rule
(mlx/backend/cpu/quantized.cpp) in float32 on the weights rounded to that type, as mlx-lm converts a model:
the range (max - min) / (2**bits - 1) signed so that the extreme of larger magnitude is a code, the scale then
adjusted so that extreme is one exactly (its bias), codes rounded half to even against the float32 scale and bias.
"""

from __future__ import annotations

import numpy as np

from quantfab.tasks.quantize.grid_base import Encoded, Grid
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

F = np.float32
EPS = F(1e-7)
SCALE_TYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}  # name part -> torch dtype


class MLXAffineGrid(Grid):
    """MLX's affine grid for one bit width, group size and stored float type."""

    symmetric = False

    def __init__(self, bits: int, block: int, scale_type: str):
        self.bits, self.block, self.scale_type = bits, block, scale_type
        self.offset = 1 << (bits - 1)
        self.qmin, self.qmax = -self.offset, self.offset - 1
        self.levels = F((1 << bits) - 1)
        self.name = f"MLX{bits}_G{block}_{scale_type}"

    def store_scale(self, x: np.ndarray) -> np.ndarray:
        """Round to the stored float type and back (bfloat16 through torch: NumPy has none)."""
        dtype = getattr(torch, SCALE_TYPES[self.scale_type])
        return torch.from_numpy(np.ascontiguousarray(x, dtype=F)).to(dtype).float().numpy()

    def _fit(self, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float32 scale and bias of groups spanning [lo, hi], as mx.quantize chooses them."""
        larger_min = np.abs(lo) > np.abs(hi)
        scale = np.maximum((hi - lo) / self.levels, EPS).astype(F)
        scale = np.where(larger_min, scale, -scale).astype(F)
        edge = np.where(larger_min, lo, hi).astype(F)
        q0 = np.rint(edge / scale)
        exact = q0 != 0
        scale = np.where(exact, edge / np.where(exact, q0, F(1)), scale).astype(F)
        return scale, np.where(exact, edge, F(0)).astype(F)

    def reference(self, w: np.ndarray, importance: np.ndarray | None = None) -> Encoded:
        x = self.blocks(self.store_scale(w))  # mlx-lm casts the model to its type, then quantizes
        scale, bias = self._fit(x.max(axis=-1), x.min(axis=-1))
        codes = self._codes((x - bias[..., None]) / scale[..., None])  # against the float32 scale and bias
        return Encoded(codes.reshape(w.shape), self.store_scale(scale), self.store_scale(bias))

    def scale_candidates(self, w: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
        x = self.blocks(w)
        scale, bias = self._fit(x.max(axis=-1) * F(ratio), x.min(axis=-1) * F(ratio))
        return self.store_scale(scale), self.store_scale(bias)

    def encode_values(self, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        assert m is not None
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._codes(np.where(d == 0, F(0), (x - m) / np.where(d == 0, F(1), d)))

    def decode_values(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        assert m is not None
        return np.multiply(d, q.astype(np.int16) + self.offset, dtype=np.float32) + m

    def _codes(self, ratio: np.ndarray) -> np.ndarray:
        """Unsigned rint(ratio) clipped to [0, 2**bits - 1], held as u - 2**(bits - 1)."""
        return (np.clip(np.rint(ratio), F(0), self.levels) - F(self.offset)).astype(np.int8)
