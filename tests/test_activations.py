"""Static activation scales: the |x| histogram calibrate keeps and the clip chosen from it.

The served arithmetic itself (dynamic and static, FP8 and INT8) is checked against transformers and
compressed-tensors in tests/test_formats.py; here, that the histogram counts what it should and that the
scale chosen from it is as good as the best clip found by quantizing the values themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantfab.tasks.activations import (HALF_RANGE, HIST_BINS, HIST_LOG2, HIST_PER_OCTAVE, SCHEMES,
                                        add_abs_histogram, static_scale)


def test_the_histogram_bins_log2_of_each_magnitude_and_keeps_every_value() -> None:
    a = torch.tensor([[1.0, 1.5, 2.0, 0.0], [2.0 ** -40, 2.0 ** 40, 3.0, 1.0]])
    hist = torch.zeros(HIST_BINS, dtype=torch.float64)
    add_abs_histogram(hist, a)
    one = -HIST_LOG2[0] * HIST_PER_OCTAVE  # the bin starting at 1.0
    expected = np.zeros(HIST_BINS)
    for b, n in [(one, 2), (one + 9, 1), (one + 16, 1), (one + 25, 1), (0, 2), (HIST_BINS - 1, 1)]:
        expected[b] += n  # 1.5 = 2^0.585 -> bin 9 of the octave; 3 = 2^1.585 -> 16 + 9; 0 and 2^-40 -> the first
    assert hist.numpy().tolist() == expected.tolist()


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_the_chosen_scale_is_within_two_percent_of_the_best_clip_on_the_values_themselves(kind: str) -> None:
    """Heavy-tailed inputs with a few large outliers: the histogram's choice, quantized for real, has a squared
    error at most 2 % above the best of the same candidate clips quantized for real; for INT8 it clips well below
    the largest value."""
    rng = np.random.default_rng(0)
    x = rng.laplace(0, 1, 200_000).astype(np.float32)
    x[:20] *= 60  # outliers, as a few hidden channels carry
    t = torch.from_numpy(x)
    hist = torch.zeros(HIST_BINS, dtype=torch.float64)
    add_abs_histogram(hist, t.abs()[None])
    x_max = float(np.abs(x).max())
    rule = SCHEMES[f"{kind}-tensor"][0]

    def error(scale: float) -> float:
        return float(((rule(t, scale) - t) ** 2).sum())

    chosen = static_scale(hist.numpy(), x_max, kind)
    clips = x_max * 2.0 ** (-np.arange(0, 161) / 16)
    best = min(error(float(np.float32(c) / np.float32(HALF_RANGE[kind]))) for c in clips)
    assert error(chosen) <= 1.02 * best
    if kind == "int8":
        assert chosen * HALF_RANGE[kind] < 0.6 * x_max  # saturating the outliers beats coarse steps for the rest


def test_no_input_gives_the_smallest_scale_rather_than_zero() -> None:
    assert static_scale(np.zeros(HIST_BINS), 0.0, "int8") == float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("scheme,strategy", [("fp8-token", {"strategy": "token"}),
                                             ("fp8-group128", {"strategy": "group", "group_size": 128}),
                                             ("nvfp4-group16", "NVFP4"), ("mxfp4-group32", "MXFP4")])
def test_dynamic_inputs_are_rounded_as_compressed_tensors_forward_quantize_rounds_them(scheme: str,
                                                                                    strategy: dict | str) -> None:
    """FP8_DYNAMIC's per-token, FP8_BLOCK's per-token-and-group-of-128, NVFP4's (over a global scale) and MXFP4's
    input rounding, bit for bit, on inputs with an outlier feature, an all-zero token and an all-zero group."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 5, 384)).astype(np.float32))
    x[0, 1, 7] = 300.0
    x[1, 2] = 0.0
    x[1, 3, 128:256] = 0.0
    x[0, 0, :64] *= 1e-5
    holder = torch.nn.Module()
    holder.quantization_status = QuantizationStatus.COMPRESSED
    if isinstance(strategy, str):  # llm-compressor's preset
        args = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[strategy]).input_activations
    else:
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=True, **strategy)
    g = float(np.float32(448 * 6) / np.float32(240.0))  # NVFP4's global scale, which clips the outlier
    if scheme.startswith("nvfp4"):
        holder.register_parameter("input_global_scale", torch.nn.Parameter(torch.tensor([g]), requires_grad=False))
    theirs = forward_quantize(holder, x, "input", args)
    ours = SCHEMES[scheme][0](x, g)
    assert torch.equal(ours, theirs)
    for other in SCHEMES:
        if other != scheme and not other.endswith("tensor"):
            assert not torch.equal(SCHEMES[other][0](x, g), theirs), other
