"""kernels/: the .cu sources built for the CPU by g++ equal their NumPy references bit for bit.

Every case runs the host call twice, once with QUANTFAB_KERNELS=numpy (the reference answers) and once
with QUANTFAB_KERNELS=cpu (the same .cu file CuPy compiles, built as C++ and launched as one block of 3
threads per core, the blocks at once on a thread pool, so the grid-stride indexing and the atomics are
exercised). Inputs are random and adversarial: one row, lengths that no word
or block divides, codes outside the grid, fp16 overflow and subnormals, NaN and Inf. The word layouts
are also checked against compressed-tensors' own ``pack_to_int32``. The same cases run on CuPy, against
the same references, under the ``gpu`` marker: `pytest -m gpu tests/test_kernels.py` on a CUDA machine.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

from quantfab.kernels import gguf_blocks, nf4, words
from quantfab.kernels.backends import (KERNEL_SOURCES, NVRTC_OPTIONS, SOURCES, KernelBackendError, backend_named,
                                       cuda_available, current)
from quantfab.kernels.verdict import Verdict
from quantfab.kernels.words import PackedInts, WordLayout
from quantfab.tasks.quantize.grids import GRIDS, Encoded, NF4Grid, dynamic_map, grid_named

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SHAPES = [(1, 1), (1, 33), (3, 7), (5, 64), (7, 100), (16, 256)]


@contextmanager
def backend(name: str) -> Iterator[None]:
    old = os.environ.get("QUANTFAB_KERNELS")
    os.environ["QUANTFAB_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["QUANTFAB_KERNELS"]
        else:
            os.environ["QUANTFAB_KERNELS"] = old


Both = Callable[..., tuple[Any, Any]]


@pytest.fixture(params=["cpu", pytest.param("cupy", marks=pytest.mark.gpu)])
def both(request: pytest.FixtureRequest) -> Both:
    """Runs one host call on the reference and on a kernel backend: (reference answer, kernel answer)."""
    if request.param == "cupy" and not cuda_available():
        pytest.skip("no CUDA device here: the CuPy cases need a GPU")

    def run(fn: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
        with backend("numpy"):
            ref = fn(*args)
        with backend(request.param):
            assert current().name == request.param
            got = fn(*args)
        return ref, got

    return run


def assert_same_array(ref: np.ndarray, got: np.ndarray) -> None:
    assert ref.dtype == got.dtype and ref.shape == got.shape
    assert ref.tobytes() == got.tobytes()


def layouts(bits: int) -> list[WordLayout]:
    out = [WordLayout(bits, axis, line_major, 1 << (bits - 1)) for axis in (0, 1) for line_major in (True, False)]
    if bits == 4:
        out += [WordLayout(4, axis, True, 8, AWQ_ORDER) for axis in (0, 1)]
    return out


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_words_equals_reference_and_unpacks(bits: int, both: Both) -> None:
    rng = np.random.default_rng(bits)
    for shape in SHAPES:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        codes = rng.integers(lo, hi + 1, size=shape).astype(np.int8)
        for layout in layouts(bits):
            if layout.order and shape[layout.axis] % 8:
                continue  # an interleave needs whole runs of 8
            ref, got = both(words.pack_words, codes, layout)
            assert_same_array(ref, got)
            assert ref.shape == layout.words_shape(shape)
            np.testing.assert_array_equal(words.unpack_words_reference(ref, layout, shape), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("packed_dim", [0, 1])
def test_word_layouts_equal_compressed_tensors_pack_to_int32(bits: int, packed_dim: int, both: Both) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rng = np.random.default_rng(100 + bits)
    codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(6, 45)).astype(np.int8)
    theirs = pack_to_int32(torch.from_numpy(codes), bits, packed_dim=packed_dim).numpy()
    layout = WordLayout(bits, packed_dim, packed_dim == 1, 1 << (bits - 1))
    ref, got = both(words.pack_words, codes, layout)
    assert_same_array(theirs, ref)
    assert_same_array(theirs, got)


def test_codes_outside_the_grid_are_masked_to_their_width_and_caught_by_verify(both: Both) -> None:
    """A code that does not fit its bits must never spill into its neighbours; verify then names it."""
    codes = np.zeros((2, 16), np.int8)
    codes[1, 5] = 9  # int4 holds -8..7: 9 + 8 = 17 = 0b10001 keeps only 0b0001
    layout = WordLayout(4, 1, True, 8)
    ref, got = both(words.pack_words, codes, layout)
    assert_same_array(ref, got)
    back = words.unpack_words_reference(ref, layout, codes.shape)
    assert back[1, 5] == 1 - 8 and (np.delete(back.reshape(-1), 21) == 0).all()
    p = PackedInts(ref, layout, np.ones((2, 1), np.float16), 16)
    ref_v, got_v = both(words.verify_words, p, codes.astype(np.float32))
    assert ref_v == got_v == Verdict(32, 16.0, 1, 21)


def int_case(rng: np.random.Generator, bits: int, group: int, shape: tuple[int, int], symmetric: bool):
    grid = grid_named(f"INT{bits}_G{group}_{'SYM' if symmetric else 'ASYM'}")
    enc = grid.reference(rng.standard_normal(shape).astype(np.float32))
    return grid, enc, grid.decode(enc)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64), (3, 32), (2, 16)])
def test_verify_words_passes_every_layout_and_finds_each_corruption(bits: int, group: int, symmetric: bool, both: Both) -> None:
    rng = np.random.default_rng(bits * 1000 + group)
    grid, enc, expected = int_case(rng, bits, group, (24, 256), symmetric)
    zero = np.zeros(enc.d.shape, np.int8) if enc.m is None else enc.m.astype(np.int8)
    offset = 1 << (bits - 1)
    cases = [  # compressed-tensors, GPTQ v1 (zero - 1 stored, scales transposed), AWQ (interleaved)
        (WordLayout(bits, 1, True, offset), WordLayout(bits, 0, False, offset), 0, False, 0),
        (WordLayout(bits, 1, False, offset), WordLayout(bits, 0, True, offset - 1), 1, True, 1),
    ]
    if bits == 4:
        cases.append((WordLayout(4, 0, True, 8, AWQ_ORDER), WordLayout(4, 0, True, 8, AWQ_ORDER), 0, True, 0))
    for code_layout, zero_layout, adjust, transposed, stored_minus in cases:
        packed = words.pack_words_reference(enc.codes, code_layout)
        zeros = words.pack_words_reference(zero, zero_layout)
        read_zero = WordLayout(bits, zero_layout.axis, zero_layout.line_major, zero_layout.offset + stored_minus,
                               zero_layout.order)
        scales = (enc.d.T if transposed else enc.d).astype(np.float16)
        p = PackedInts(packed, code_layout, np.ascontiguousarray(scales), group, transposed, zeros, read_zero, adjust)
        ref, got = both(words.verify_words, p, expected)
        assert ref == got == Verdict(expected.size, 0.0, 0, None)
        bad = expected.copy()
        bad[3, 17] += np.float32(1e-3)
        bad[20, 200] = np.float32(np.nan)
        ref, got = both(words.verify_words, p, bad)
        assert ref == got
        assert (got.mismatches, got.first, got.max_abs_error) == (2, 3 * 256 + 17, float("inf"))
        ref, got = both(words.verify_words, p, np.where(np.isnan(bad), expected, bad), 2e-3)  # within atol
        assert ref == got and got.ok and got.max_abs_error > 0


F16_EDGES = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 65520.0, 1e6, -1e6, 6.1e-05, 5.96e-08, 2.98e-08, 3e-08,
                      1e-10, 0.000123, np.inf, -np.inf, np.nan], np.float32)


@pytest.mark.parametrize("name", list(gguf_blocks.LEGACY))
def test_gguf_blocks_equal_reference_with_random_and_extreme_scales(name: str, both: Both) -> None:
    rng = np.random.default_rng(len(name))
    grid = GRIDS[name]
    enc = grid.reference(rng.standard_normal((5, 96)).astype(np.float32) * 3)
    ref, got = both(gguf_blocks.pack_gguf, name, enc)
    assert_same_array(ref, got)
    d = np.resize(F16_EDGES, enc.d.size).reshape(enc.d.shape)  # fp16 rounding: overflow, subnormals, NaN
    m = None if enc.m is None else -d[::-1].copy()
    odd = Encoded(rng.integers(grid.qmin, grid.qmax + 1, size=enc.codes.shape).astype(np.int8), d, m)
    ref, got = both(gguf_blocks.pack_gguf, name, odd)
    assert_same_array(ref, got)
    assert_same_array(ref, gguf_blocks.PACKERS[name](odd))


@pytest.mark.parametrize("name", list(gguf_blocks.LEGACY))
def test_gguf_verify_equals_reference_and_gguf_py(name: str, both: Both) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(7 + len(name))
    grid = GRIDS[name]
    enc = grid.reference(rng.standard_normal((3, 160)).astype(np.float32))
    data = gguf_blocks.PACKERS[name](enc)
    expected = grid.decode(enc)
    np.testing.assert_array_equal(gguf_blocks.decode_legacy_reference(name, data, expected.size),
                                  dequantize(data, GGMLQuantizationType[name]).reshape(-1))
    ref, got = both(gguf_blocks.verify_gguf, name, data, expected)
    assert ref == got == Verdict(expected.size, 0.0, 0, None)
    flipped = data.copy()
    flipped[2, -1] ^= 0x10  # the high nibble (or top bits) of the last byte of row 2
    ref, got = both(gguf_blocks.verify_gguf, name, flipped, expected)
    assert ref == got and got.mismatches == 1 and got.first is not None and got.first // 160 == 2


@pytest.mark.parametrize("name", list(gguf_blocks.KQUANT))
def test_kquant_super_blocks_pack_and_verify_equal_reference(name: str, both: Both) -> None:
    """Random rows, a row of zeros (zero scales), a row of huge values and a row of tiny ones."""
    rng = np.random.default_rng(11 + len(name))
    w = rng.standard_normal((6, 512)).astype(np.float32)
    w[1] = 0
    w[2] *= 3e4
    w[3] *= 1e-6
    grid = GRIDS[name]
    enc = grid.reference(w)
    ref, got = both(gguf_blocks.pack_gguf, name, enc)
    assert_same_array(ref, got)
    expected = grid.decode(enc)
    ref, got = both(gguf_blocks.verify_gguf, name, ref, expected)
    assert ref == got == Verdict(expected.size, 0.0, 0, None)
    flipped = gguf_blocks.PACKERS[name](enc)
    flipped[4, gguf_blocks.KQUANT[name][1] + 100] ^= 0x04  # a code byte in the second super-block of row 4
    ref, got = both(gguf_blocks.verify_gguf, name, flipped, expected)
    assert ref == got and got.mismatches >= 1 and got.first is not None and got.first // 512 == 4


@pytest.mark.parametrize("blocks,threads", [(1, 1), (8, 5), (64, 3)])
def test_the_cpu_build_answers_alike_on_any_grid_its_blocks_running_at_once(monkeypatch: pytest.MonkeyPatch,
                                                                            blocks: int, threads: int) -> None:
    """Packing, and verifying (whose counts are atomics), on grids wider than this machine, blocks racing."""
    from quantfab.kernels.backends import CpuBuild

    w = np.random.default_rng(5).standard_normal((64, 1024)).astype(np.float32)
    enc = GRIDS["Q4_K"].reference(w)
    flipped = gguf_blocks.PACKERS["Q4_K"](enc)
    flipped[::3, 100] ^= 0x04  # a code byte in every third row
    expected = GRIDS["Q4_K"].decode(enc)
    with backend("numpy"):
        ref = gguf_blocks.pack_gguf("Q4_K", enc), gguf_blocks.verify_gguf("Q4_K", flipped, expected)
    monkeypatch.setattr(gguf_blocks, "current", lambda: CpuBuild(blocks, threads))
    got = gguf_blocks.pack_gguf("Q4_K", enc), gguf_blocks.verify_gguf("Q4_K", flipped, expected)
    assert_same_array(ref[0], got[0])
    assert ref[1] == got[1] and got[1].mismatches >= 22


def sub_blocks(n: int, seed: int) -> np.ndarray:
    """Sub-blocks of ``n`` at every scale, with the cases the searches branch on: all zero, constant, one
    value apart, exact zeros, ties of magnitude of either sign, all positive and all negative."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4000, n)).astype(np.float32) * (10.0 ** rng.uniform(-6, 3, (4000, 1))).astype(np.float32)
    x[0] = 0
    x[1] = 0.25
    x[2, 1:] = 0
    x[3, :5] = 0
    x[4, [3, 9]] = [2.0, -2.0]
    x[5] = np.abs(x[5]) + 1
    x[6] = -np.abs(x[6]) - 1
    x[7] = np.float32(1e-16)
    return x


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q5_K"])
def test_kquant_min_scale_search_equals_the_reference(name: str, both: Both) -> None:
    """make_qkx2_quants as a kernel: scales, mins and codes of every sub-block equal the NumPy port's."""
    from quantfab.kernels.kquant_search import search_min_scale

    grid = grid_named(name)
    x = sub_blocks(grid.block, 1)
    ref, got = both(search_min_scale, x, grid.weights(x), grid.qmax, *grid.search)
    for r, g in zip(ref, got):
        assert_same_array(np.ascontiguousarray(r), g)


@pytest.mark.parametrize("weighted", [False, True])
def test_kquant_signed_scale_search_equals_the_reference(weighted: bool, both: Both) -> None:
    """make_qx_quants as a kernel, with x * x as weights (Q6_K's) and with an importance's (zeros among them): scales
    and codes equal the NumPy port's."""
    from quantfab.kernels.kquant_search import search_signed_scale

    x = sub_blocks(16, 2)
    weights = x * x
    if weighted:
        weights = np.random.default_rng(4).uniform(0, 3, x.shape).astype(np.float32) ** 4
        weights[::5, :3] = 0
    ref, got = both(search_signed_scale, x, weights, 32)
    for r, g in zip(ref, got):
        assert_same_array(np.ascontiguousarray(r), g)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_grids_encode_alike_on_every_backend(name: str, weighted: bool, both: Both) -> None:
    """What rtn writes, without an importance matrix and with one: a whole tensor's encoding (and the stored fields a
    weighted K-quant chose) is the same whichever backend searched it."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 512)).astype(np.float32)
    importance = (rng.uniform(0, 2, 512) ** 4).astype(np.float32) if weighted else None
    ref, got = both(grid_named(name).reference, w, importance)
    for field in ("codes", "d", "m"):
        if getattr(ref, field) is not None:
            assert_same_array(getattr(ref, field), getattr(got, field))
    assert ref.extra.keys() == got.extra.keys() and (not weighted or name in ("Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
                                                       or ref.extra)
    for key in ref.extra:
        assert_same_array(ref.extra[key], got.extra[key])


def test_gguf_verify_counts_nan_and_inf_by_policy(both: Both) -> None:
    grid = GRIDS["Q8_0"]
    enc = Encoded(np.ones((1, 64), np.int8), np.array([[np.inf, np.nan]], np.float32), None)
    data = gguf_blocks.PACKERS["Q8_0"](enc)
    same = grid.decode(enc)  # +Inf where d is Inf, NaN where d is NaN
    ref, got = both(gguf_blocks.verify_gguf, "Q8_0", data, same)
    assert ref == got == Verdict(64, float("inf"), 32, 32)  # equal infinities pass, NaN never does


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n", [64 * 300, 64 * 300 + 1])
def test_nf4_pack_and_verify_equal_reference(double_quant: bool, n: int, both: Both) -> None:
    rng = np.random.default_rng(n)
    grid: NF4Grid = grid_named(f"NF4_B64{'_DQ' if double_quant else ''}")  # type: ignore[assignment]
    w = rng.standard_normal((1, 64 * 300)).astype(np.float32)
    enc = grid.reference(w)
    codes = np.concatenate([enc.codes.reshape(-1), [15]])[:n].astype(np.uint8)  # an odd count pads a zero nibble
    ref, got = both(nf4.pack_nf4, codes)
    assert_same_array(ref, got)
    assert ref.size == (n + 1) // 2 and (n % 2 == 0 or ref[-1] & 15 == 0)
    packed = nf4.pack_nf4_reference(enc.codes)
    expected = grid.decode(enc).reshape(-1)
    if double_quant:
        absmax = enc.extra["nested_codes"]
        nested = (enc.extra["nested_absmax"], dynamic_map(), NF4Grid.NESTED_BLOCK, float(enc.extra["offset"][0]))
    else:
        absmax, nested = enc.d.reshape(-1), None
    ref, got = both(nf4.verify_nf4, packed, absmax, NF4Grid.CODEBOOK, 64, expected, nested)
    assert ref == got == Verdict(expected.size, 0.0, 0, None)
    packed[1000] ^= 0x01  # element 2001 (the low nibble of byte 1000)
    ref, got = both(nf4.verify_nf4, packed, absmax, NF4Grid.CODEBOOK, 64, expected, nested)
    assert ref == got and (got.mismatches, got.first) == (1, 2001)


def test_backend_choice_is_explicit() -> None:
    with backend("numpy"):
        assert current().name == "numpy"
    with backend("auto"):  # CuPy on a GPU, else the C build where g++ is (here), else NumPy
        assert current().name == ("cupy" if cuda_available() else "cpu" if shutil.which("g++") else "numpy")
    with pytest.raises(KernelBackendError, match="expected auto, cupy, numpy or cpu"):
        backend_named("opencl")
    if not cuda_available():
        with pytest.raises(KernelBackendError, match="no CUDA device"):
            backend_named("cupy")


def nvrtc_library() -> ctypes.CDLL:
    """NVRTC from the nvidia-cuda-nvrtc wheel (the dev extra): the compiler CuPy runs, which needs no GPU."""
    try:
        import nvidia.cu13  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("nvidia-cuda-nvrtc (cu13) is not installed: pip install -e '.[dev]'")
    found = sorted(Path(next(iter(nvidia.cu13.__path__))).glob("lib/libnvrtc.so*"))
    if not found:
        pytest.skip("the nvidia-cuda-nvrtc wheel holds no libnvrtc here")
    return ctypes.CDLL(str(found[0]))


@pytest.mark.parametrize("source", KERNEL_SOURCES)
def test_every_kernel_source_compiles_with_nvrtc_as_cupy_compiles_it(source: str) -> None:
    """The CuPy path's compile step, run here without a GPU: same source, same options, PTX for sm_90."""
    lib = nvrtc_library()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), (SOURCES / source).read_bytes(), source.encode(), 0, None, None) == 0
    options = [o.encode() for o in (*NVRTC_OPTIONS, "--gpu-architecture=compute_90")]
    rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    entries = set(re.findall(r"\.entry (\w+)\(", ptx.value.decode()))
    defined = set(re.findall(r"^QF_KERNEL void (\w+)\(", (SOURCES / source).read_text(), re.M))
    assert defined and entries == defined
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
