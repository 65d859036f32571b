"""Grids and GGUF packing against gguf-py, the ecosystem's own reference, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from quantfab.tasks.convert.gguf import GRID_OF_TYPE, TYPE_OF_GRID, permute_rows, unpermute_rows
from quantfab.kernels.gguf_blocks import PACKERS
from quantfab.tasks.quantize import METHODS
from quantfab.tasks.quantize.gptq import gptq
from quantfab.tasks.quantize.grids import GRIDS, Encoded, grid_named
from quantfab.tasks.quantize.grid_base import reference_by_rows
from quantfab.tasks.quantize.lattice import LatticeGrid
from quantfab.tasks.quantize.stats import InputStats

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


UNWEIGHTED = ("Q8_0", "MXFP4_GGML")  # grids whose codes llama.cpp chooses without the importance matrix
LATTICE = [n for n, g in GRIDS.items() if isinstance(g, LatticeGrid)]  # searched only (tests/test_iq*_grid*.py)


def weights(rows: int = 64, cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block: scale 0, codes must stay finite
    w[1, 5] = 40.0  # an outlier block
    w[2, 32:64] = 0.5  # a constant block (max == min for Q4_1)
    w[3, 64:96] = np.float32(1e-8) * rng.standard_normal(32).astype(np.float32)  # tiny scales
    w[4, 256:] = 0.0  # an all-zero K-quant super-block
    w[5, :256] = np.abs(w[5, :256])  # a super-block without negatives: every min is 0
    return w


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"])
def test_rtn_reference_is_llama_cpp_bytes(name: str) -> None:
    """rtn on a GGUF grid packs to exactly the bytes gguf-py's port of llama.cpp's reference produces (MXFP4's: ties
    against the grid included)."""
    w = weights()
    w[6] = np.round(w[6] * 4) / 4  # values halfway between two of MXFP4's
    enc = GRIDS[GRID_OF_TYPE.get(name, name)].reference(w)
    ours = PACKERS[name](enc)
    theirs = gguf.quants.quantize(w, gguf.GGMLQuantizationType[name])
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


def skewed_inputs(cols: int, seed: int = 7) -> np.ndarray:
    """Calibration inputs whose channels differ in energy by orders of magnitude, as a real model's do."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1024, cols)) * np.exp(rng.standard_normal(cols) * 1.5)).astype(np.float32)


def input_stats(x: np.ndarray) -> InputStats:
    return InputStats(np.abs(x).mean(axis=0), x.T @ x, len(x), np.abs(x).max(axis=0), None)


@pytest.mark.parametrize(("name", "method"), [(n, m) for n in GRIDS for m in ("rtn", "rtn-imatrix", "group", "gptq")
                                              if n not in LATTICE or m == "rtn-imatrix"])
def test_decode_equals_gguf_dequantize(name: str, method: str) -> None:
    """What our grid decodes is, bit for bit, what gguf-py decodes from the packed bytes, for every GGUF type (with
    an importance matrix too: its K-quants store the super-block fields their search chose)."""
    w = weights(seed=1)
    grid = GRIDS[name]
    if method == "gptq":
        x = np.random.default_rng(7).standard_normal((1024, w.shape[1])).astype(np.float32)
        enc = grid.finalize(gptq(w, x.T @ x / np.float32(x.shape[0]), grid, 0.01, 128, True, False, "w"))
    elif method == "rtn-imatrix":
        enc = METHODS["rtn"](importance=True).quantize(w, grid, input_stats(skewed_inputs(w.shape[1])))
    else:
        enc = METHODS[method]().quantize(w, grid, None)
    assert enc.codes.min() >= grid.qmin and enc.codes.max() <= grid.qmax
    qtype = gguf.GGMLQuantizationType[TYPE_OF_GRID.get(name, name)]
    packed = PACKERS[qtype.name](enc)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert packed.dtype == np.uint8 and packed.shape == (w.shape[0], w.shape[1] // block * size)
    decoded = gguf.quants.dequantize(packed, qtype)
    assert np.array_equal(decoded.view(np.uint32), grid.decode(enc).view(np.uint32))


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quant_scales_are_integers_of_one_super_block_scale(name: str) -> None:
    """Every sub-block scale (and min) is fp16(d) times an integer in the type's range; split recovers them."""
    grid = GRIDS[name]
    enc = grid.reference(weights(seed=6))
    fields = grid.split(enc.d.reshape(-1), None if enc.m is None else enc.m.reshape(-1))
    per = 256 // grid.block
    d = np.repeat(fields["d"], per).reshape(enc.d.shape)
    assert np.array_equal(fields["d"].astype(np.float16).astype(np.float32), fields["d"])
    assert np.array_equal(d * fields["scales"].reshape(enc.d.shape).astype(np.float32), enc.d)
    if enc.m is not None:
        assert np.array_equal(-(np.repeat(fields["dmin"], per).reshape(enc.m.shape)
                                * fields["mins"].reshape(enc.m.shape).astype(np.float32)), enc.m)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", *K_TYPES])
def test_gptq_beats_rtn_on_output_error(name: str) -> None:
    """GPTQ on the same grid (K-quant super-block scales included) lowers the output error on correlated inputs."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((128, 512)).astype(np.float32)
    mixing = rng.standard_normal((64, 512)).astype(np.float32)
    x = rng.standard_normal((2048, 64)).astype(np.float32) @ mixing + 0.3 * rng.standard_normal((2048, 512)).astype(np.float32)
    stats = InputStats(np.abs(x).mean(0), x.T @ x, x.shape[0], np.abs(x).max(0), None)
    grid = GRIDS[name]
    rtn = grid.decode(grid.reference(w))
    ours = grid.decode(gptq(w, stats.hessian * np.float32(2 / stats.count), grid, 0.01, 128, True, False, "w"))
    assert stats.relative_output_error(w, ours) < 0.5 * stats.relative_output_error(w, rtn)


def test_group_never_worse_than_rtn_per_block() -> None:
    """The clipping search includes ratio 1.0 with stored scales, so its weighted error cannot exceed rtn's by more than fp16 rounding allows; overall it is lower."""
    w = weights(seed=2)
    x = np.random.default_rng(3).standard_normal((512, w.shape[1])).astype(np.float32)
    stats = InputStats(np.abs(x).mean(0), x.T @ x, x.shape[0], np.abs(x).max(0), None)
    for name in ("Q4_0", "Q4_1"):
        grid = GRIDS[name]
        rtn = grid.decode(METHODS["rtn"]().quantize(w, grid, stats))
        group = grid.decode(METHODS["group"]().quantize(w, grid, stats))
        assert stats.relative_output_error(w, group) < stats.relative_output_error(w, rtn)


def test_round_half_away_from_zero_matches_c_roundf() -> None:
    enc = GRIDS["Q8_0"].encode(np.array([[0.5, -0.5, 1.5, -2.5, 0.49999997] + [0.0] * 27], np.float32),
                               np.ones((1, 1), np.float32), None)
    assert enc[0, :5].tolist() == [1, -1, 2, -3, 0]


def test_q_k_permutation_round_trips() -> None:
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    p = permute_rows(w, heads=4)
    assert not np.array_equal(p, w)
    assert np.array_equal(unpermute_rows(p, heads=4), w)



def _bnb_nf4(w: np.ndarray, double_quant: bool):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    packed, state = functional.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                             compress_statistics=double_quant)
    p = packed.reshape(-1).numpy()
    codes = np.empty(p.size * 2, np.uint8)
    codes[0::2], codes[1::2] = p >> 4, p & 15  # bitsandbytes: the first element in the high nibble
    return codes, state, functional.dequantize_4bit(packed, state).numpy()


def test_nf4_codes_and_absmax_equal_bitsandbytes() -> None:
    w = weights(rows=96, cols=320, seed=4)
    ours = grid_named("NF4_B64").reference(w)
    codes, state, decoded = _bnb_nf4(w, double_quant=False)
    assert np.array_equal(ours.codes.reshape(-1).astype(np.uint8), codes)
    assert np.array_equal(ours.d.reshape(-1), state.absmax.numpy())
    assert np.array_equal(grid_named("NF4_B64").decode(ours), decoded)


def test_nf4_double_quant_codes_equal_bitsandbytes_and_nested_codes_are_nearest() -> None:
    """4-bit codes and the nested absmax/offset equal bitsandbytes'. Its CPU kernel picks the nested 8-bit codes
    through a 65,536-entry lookup table; ours are the exact nearest dynamic-map value, so where the two differ
    ours is strictly closer."""
    from quantfab.tasks.quantize.grids import dynamic_map

    w = weights(rows=96, cols=320, seed=5)
    ours = grid_named("NF4_B64_DQ").reference(w)
    codes, state, _ = _bnb_nf4(w, double_quant=True)
    assert np.array_equal(ours.codes.reshape(-1).astype(np.uint8), codes)
    assert np.array_equal(ours.extra["nested_absmax"], state.state2.absmax.numpy())
    assert ours.extra["offset"][0] == state.offset.item()
    absmax = np.abs(grid_named("NF4_B64").blocks(w)).max(axis=-1).reshape(-1) - state.offset.item()
    target = absmax / np.repeat(ours.extra["nested_absmax"], 256)[: absmax.size]
    theirs = state.absmax.numpy()
    differ = ours.extra["nested_codes"] != theirs
    assert differ.mean() < 0.05
    ours_err = np.abs(dynamic_map()[ours.extra["nested_codes"][differ]] - target[differ])
    assert np.all(ours_err < np.abs(dynamic_map()[theirs[differ]] - target[differ]))


@pytest.mark.parametrize("name", ["INT4_G32_SYM", "INT4_G128_ASYM", "INT8_G64_SYM", "INT4_CH_ASYM"])
def test_int_round_trip_is_bitwise_decode_of_encode(name: str) -> None:
    """round_trip (torch, what every clipping search scores) computes exactly what decode(encode) does in NumPy,
    zero scales and ranges clipped by a shrunk scale included."""
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((40, 256)) * rng.uniform(0.01, 3, (40, 1))).astype(np.float32)
    w[3] = 0
    grid = grid_named(name).for_row(w.shape[1])
    d, m = grid.scale_candidates(w, 0.7)
    assert np.array_equal(grid.round_trip(w, d, m), grid.decode(Encoded(grid.encode(w, d, m), d, m)))


@pytest.mark.parametrize(("name", "importance"), [(n, i) for n in (*GRIDS, "NF4_B64", "NF4_B64_DQ", "INT4_G32_ASYM")
                                                  for i in (False, True) if i or n not in LATTICE])
def test_reference_by_rows_equals_the_whole_tensors_reference(name: str, importance: bool) -> None:
    """Encoding a slice of rows at a time (how rtn and GGUF's float tensors bound their memory) changes no code,
    scale, min or stored field, also where the slices do not divide the rows, with an importance matrix too."""
    grid = grid_named(name)
    w = weights(rows=37, cols=512, seed=9)
    imp = input_stats(skewed_inputs(512)).importance() if importance else None
    whole, sliced = grid.reference(w, imp), reference_by_rows(grid, w, imp, elements=5 * 512)
    np.testing.assert_array_equal(sliced.codes, whole.codes)
    np.testing.assert_array_equal(sliced.d, whole.d)
    assert (sliced.m is None) == (whole.m is None)
    if whole.m is not None:
        np.testing.assert_array_equal(sliced.m, whole.m)
    assert sliced.extra.keys() == whole.extra.keys()
    for key in whole.extra:
        np.testing.assert_array_equal(sliced.extra[key], whole.extra[key])


def test_fp8_codes_are_torchs_e4m3_rounding_on_every_tie_and_edge() -> None:
    """E4M3 in NumPy rounds as torch's float8_e4m3fn cast: every finite code value, every midpoint between two
    neighbours (ties to even) and the floats either side of it, saturation past 448, subnormals, signed zeros."""
    import torch

    from quantfab.tasks.quantize.float_grids import e4m3_decode, e4m3_encode

    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[~values.isnan()].sort().values
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, mids, mids.nextafter(torch.tensor(np.inf)), mids.nextafter(torch.tensor(-np.inf)),
                   torch.tensor([1e9, -1e9, 449.0, -464.0, 1e-12, -1e-12, 0.0, -0.0]),
                   torch.from_numpy(np.random.default_rng(0).standard_normal(50_000).astype(np.float32) * 100)])
    theirs = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    ours = e4m3_encode(x.numpy())
    assert np.array_equal(ours.view(np.uint8), theirs.view(torch.uint8).numpy())
    assert np.array_equal(e4m3_decode(ours), theirs.float().numpy())


def test_fp8_channel_scales_codes_and_decode_equal_compressed_tensors() -> None:
    """FP8_CH picks compressed-tensors' own scale (its observer's absmax / 448, eps for an all-zero row), codes
    (``quantize`` to float8_e4m3fn) and decode (``dequantize``), bit for bit."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weights()
    w[6] = 0.0  # scale 0 becomes float32 eps
    grid = grid_named("FP8_CH").for_row(w.shape[1])
    enc = grid.reference(w)
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    wt = torch.from_numpy(w)
    scale, _ = calculate_qparams(wt.amin(dim=1, keepdim=True), wt.amax(dim=1, keepdim=True), args)
    codes = quantize(wt, scale, None, args, dtype=torch.float8_e4m3fn)
    assert np.array_equal(enc.d, scale.numpy())
    assert np.array_equal(enc.codes.view(np.uint8), codes.view(torch.uint8).numpy())
    assert np.array_equal(grid.decode(enc), dequantize(codes, scale, None, args).numpy())


def test_fp8_block_scales_codes_and_decode_equal_compressed_tensors_also_for_a_short_last_row_block() -> None:
    """FP8_B128 (FP8_BLOCK's weights) picks compressed-tensors' scale per 128 x 128 block (absmax / 448 over the block
    zero-padded to 128 rows, eps for an all-zero block), its codes and its decode, bit for bit; encoding a slice of
    rows at a time keeps whole row blocks, so changes nothing."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weights(rows=300, cols=384, seed=4)  # row blocks of 128, 128 and 44
    w[128:256, 128:256] = 0.0
    grid = grid_named("FP8_B128")
    enc = grid.reference(w)
    args = QuantizationArgs(num_bits=8, type="float", strategy="block", symmetric=True, block_structure=[128, 128])
    padded = torch.nn.functional.pad(torch.from_numpy(w), (0, 0, 0, 84)).reshape(3, 128, 3, 128)
    scale, _ = calculate_qparams(padded.amin(dim=(1, 3)), padded.amax(dim=(1, 3)), args)
    codes = quantize(torch.from_numpy(w), scale, None, args, dtype=torch.float8_e4m3fn)
    assert scale.shape == (3, 3) and scale[1, 1] == torch.finfo(torch.float32).eps
    assert np.array_equal(grid.block_scales(enc.d), scale.numpy())
    assert np.array_equal(enc.codes.view(np.uint8), codes.view(torch.uint8).numpy())
    assert np.array_equal(grid.decode(enc), dequantize(codes, scale, None, args).numpy())
    sliced = reference_by_rows(grid, w, elements=200 * 384)  # 200 rows asked: slices of 128
    assert np.array_equal(sliced.codes, enc.codes) and np.array_equal(sliced.d, enc.d)


@pytest.mark.parametrize("method", ["group", "gptq"])
def test_searches_and_gptq_keep_one_scale_per_fp8_block(method: str) -> None:
    """A clipping search and GPTQ choose FP8_B128's scales per block of 128 rows, not per row: every row of a block
    holds the same scale, so the file's one scale per block is what the codes were chosen against."""
    from quantfab.tasks.quantize.group import RATIOS, clip_search, weighted_squares

    grid = grid_named("FP8_B128")
    w = weights(rows=200, cols=256, seed=5)
    x = np.random.default_rng(6).standard_normal((512, 256)).astype(np.float32)
    h = x.T @ x
    enc = clip_search(w, grid, RATIOS, weighted_squares(grid, np.diag(h).copy())) if method == "group" else \
        gptq(w, h, grid, 0.01, 128, True, False, "test", clip_ratios=RATIOS)
    for block in (enc.d[:128], enc.d[128:]):
        assert np.array_equal(block, np.broadcast_to(block[:1], block.shape))
    assert not np.array_equal(enc.d[0], enc.d[128])
    assert np.array_equal(grid.decode(enc), grid.decode(Encoded(grid.encode(grid.decode(enc), enc.d, None), enc.d,
                                                                None)))


def test_e2m1_rounding_and_bfloat16_are_compressed_tensors_and_torchs() -> None:
    """E2M1 codes as compressed-tensors' cast_to_fp4 and pack_fp4_to_uint8 make them (every bound between two
    values and the floats beside it, saturation, a negative value rounding to a signed 0, -0.0 to +0), and bfloat16
    rounding as torch's cast (ties to even, subnormals)."""
    import torch
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    from quantfab.tasks.quantize.fp4_grids import e2m1_decode, e2m1_encode, to_bfloat16

    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    x = torch.cat([bounds, bounds.nextafter(torch.tensor(9.0)), bounds.nextafter(torch.tensor(0.0)), -bounds,
                   torch.tensor([0.0, -0.0, -0.1, 7.0, -7.0, 1e-30]),
                   torch.from_numpy(np.random.default_rng(1).uniform(-7, 7, 9_992).astype(np.float32))])
    rounded = cast_to_fp4(x.clamp(-6, 6))
    ours = e2m1_encode(x.numpy())
    assert np.array_equal(e2m1_decode(ours), rounded.numpy())
    packed = pack_fp4_to_uint8(rounded.reshape(1, -1)).numpy().reshape(-1)
    assert np.array_equal(np.stack([packed & 15, packed >> 4], axis=1).reshape(-1).astype(np.int8), ours)
    y = torch.from_numpy(np.random.default_rng(2).standard_normal(100_000).astype(np.float32)) * \
        torch.logspace(-42, 30, 100_000)
    assert np.array_equal(to_bfloat16(y.numpy()), y.to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("name", ["NVFP4", "MXFP4"])
def test_fp4_scales_codes_packing_and_decode_equal_compressed_tensors(name: str) -> None:
    """NVFP4 (global scale, E4M3 block scales, 0.125 for an all-zero block) and MXFP4 (E8M0 exponents) pick
    llm-compressor's scales from compressed-tensors' own qparams; the codes we pack are the bytes its compressor
    packs, and its decompressor gives our decode bit for bit (bfloat16)."""
    import torch
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    from quantfab.tasks.convert.compressed_fp4 import pack_fp4, stored_fp4

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 256)) * rng.uniform(0.001, 0.2, (48, 1))).astype(np.float32)
    w[0, :32] = 0.0
    w[1, 5] = 3.0
    w[2, 40:48] = -1e-9
    w[3] *= 1e-6
    grid = grid_named(name)
    enc = grid.reference(w)
    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[f"{name}A16"])
    compressor = NVFP4PackedCompressor if name == "NVFP4" else MXFP4PackedCompressor
    wt = torch.from_numpy(w)
    blocks = wt.reshape(48, -1, grid.block)
    g = generate_gparam(wt.min(), wt.max()) if name == "NVFP4" else None
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), scheme.weights, global_scale=g)
    state = compressor.compress({"weight": wt, "weight_scale": scale, **({"weight_global_scale": g} if g is not None
                                                                          else {})}, scheme)
    ours = {k.removeprefix("m."): v for k, v in pack_fp4("m", grid, enc).items()}
    assert sorted(ours) == sorted(state)
    for k in state:
        assert ours[k].dtype == state[k].dtype and torch.equal(ours[k].view(torch.uint8) if ours[k].dtype ==
                                                               torch.float8_e4m3fn else ours[k],
                                                               state[k].view(torch.uint8) if state[k].dtype ==
                                                               torch.float8_e4m3fn else state[k]), k
    theirs = compressor.decompress(state, scheme)["weight"]
    assert theirs.dtype == torch.bfloat16 and np.array_equal(theirs.float().numpy(), grid.decode(enc))
    back = stored_fp4(lambda n: ours[n.removeprefix("m.")], "m", grid)
    assert np.array_equal(back.codes, enc.codes) and np.array_equal(back.d, enc.d)


def test_nvfp4_bound_to_fused_linears_shares_their_global_scale() -> None:
    """The Linears the engine fuses (q/k/v) share one global scale, the one of their largest weight."""
    grid = grid_named("NVFP4")
    q, k = weights(rows=16, cols=512, seed=1), weights(rows=16, cols=512, seed=2) * 3
    bound = grid.bind([q, k])
    assert bound.reference(q).extra["global_scale"][0] == bound.reference(k).extra["global_scale"][0] == \
        grid.reference(k).extra["global_scale"][0] != grid.reference(q).extra["global_scale"][0]


@pytest.mark.parametrize("name", [n for n in GRIDS if n not in UNWEIGHTED and n not in LATTICE])
def test_an_importance_matrix_lowers_the_error_it_weighs(name: str) -> None:
    """With llama.cpp's importance matrix (each column's mean squared input), every GGUF type but Q8_0 (whose scale
    llama.cpp never searches) and MXFP4 (whose exponent it never searches) rounds to a lower error on the calibration
    inputs than without it; those two are unchanged."""
    w = weights(seed=4, cols=1024)
    stats = input_stats(skewed_inputs(1024, seed=5))
    grid = GRIDS[name]
    imp = stats.importance()
    error = lambda enc: float((imp * (w - grid.decode(enc)) ** 2).sum())  # noqa: E731
    assert error(reference_by_rows(grid, w, imp)) < 0.8 * error(reference_by_rows(grid, w))
    for unweighted in UNWEIGHTED:
        assert np.array_equal(GRIDS[unweighted].reference(w, imp).codes, GRIDS[unweighted].reference(w).codes)


def test_importance_is_what_llama_quantize_reads() -> None:
    """in_sum2 / count in float32, as llama-quantize divides the file's sums; all ones for a matrix no token reached
    (an expert the router never chose)."""
    x = skewed_inputs(64)
    stats = input_stats(x)
    assert np.array_equal(stats.importance(), np.diag(x.T @ x).astype(np.float32) / np.float32(len(x)))
    unused = InputStats(np.zeros(64, np.float32), np.zeros((64, 64), np.float32), 0, np.zeros(64, np.float32), None)
    assert np.array_equal(unused.importance(), np.ones(64, np.float32))
