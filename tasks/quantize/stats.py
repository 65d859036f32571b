"""Per-Linear input statistics recorded by calibrate and read by the methods."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantfab.tasks.gram import hessian_weighted
from quantfab.tasks.modelio import CPU
from quantfab.tasks.lazy import lazy

torch = lazy("torch")


@dataclass(frozen=True)
class InputStats:
    """Statistics of the inputs a Linear saw on the calibration set.

    ``hessian`` is the sum of x x^T over ``count`` tokens (float32, in x in out), so H / count is
    E[x x^T], or only its diagonal (in,) where calibrate gathered no more (``diagonal_only``: for an importance
    matrix); ``mean_abs`` is the per-channel mean |x| that AWQ-style methods scale by, ``max_abs`` the
    per-channel max |x| that SmoothQuant scales by, ``abs_hist`` the histogram of every |x| (activations.HIST_*)
    that a static activation scale is chosen from (measured only for outputs with static scales).
    """

    mean_abs: np.ndarray  # (in,)
    hessian: np.ndarray  # (in, in)
    count: int
    max_abs: np.ndarray  # (in,)
    abs_hist: np.ndarray | None  # (HIST_BINS,); None where not measured, or once scaled per channel

    def scaled(self, s: np.ndarray) -> "InputStats":
        """Statistics of x / s, the input a Linear reads once a scale s per channel moved into its weights."""
        inv = (1 / s).astype(np.float32)
        return InputStats((self.mean_abs * inv).astype(np.float32),
                          (self.hessian * inv[:, None] * inv[None, :]).astype(np.float32), self.count,
                          (self.max_abs * inv).astype(np.float32), None)

    @property
    def diagonal_only(self) -> bool:
        return self.hessian.ndim == 1

    def squares(self) -> np.ndarray:
        """The sum over tokens of each input channel's square: the Hessian's diagonal."""
        return self.hessian if self.diagonal_only else np.diag(self.hessian)

    def channel_energy(self) -> np.ndarray:
        """E[x_j^2] per input channel: the diagonal of the mean Hessian."""
        return (self.squares() / max(self.count, 1)).astype(np.float32)

    def importance(self) -> np.ndarray:
        """llama.cpp's importance matrix row as llama-quantize reads it from the file convert ships: in_sum2 / count
        in float32, all ones for a matrix that saw no token."""
        if self.count == 0:
            return np.ones(len(self.hessian), np.float32)
        return self.squares().astype(np.float32) / np.float32(self.count)

    def relative_output_error(self, w: np.ndarray, w_hat: np.ndarray, device: torch.device = CPU) -> float:
        """||(W - W')X||^2 / ||W X||^2 over the calibration inputs, from the Hessian alone (on ``device``)."""
        h = torch.from_numpy(self.hessian.astype(np.float32, copy=False)).to(device)
        den = hessian_weighted(w, h)
        return hessian_weighted(w_hat - w, h) / den if den > 0 else 0.0
