"""kernels/iq3_search.cu built for the CPU by g++ (and on CuPy under the ``gpu`` marker) writes the NumPy reference's
IQ3_XXS and IQ3_S bytes, bit for bit.

The reference (``search_reference`` in tasks/quantize/iq3_grids.py) writes llama.cpp's bytes
(tests/test_lattice_grids.py holds known answers); here the kernel path (``search`` under QUANTFAB_KERNELS=cpu or
cupy) must equal it on inputs that reach every branch of the search: per-row scales, heavy tails, all-positive
weights (IQ3_XXS's parity flips nothing), tiny values with zeros, zero super-blocks and zero 32-blocks (IQ3_S's
shifted cursors), blocks under IQ3_XXS's 1e-8 threshold, and importances that are skewed, all ones, absent, or
signed (negative weights drive a block's scale below zero, llama.cpp's sign-flip guard).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from quantfab.kernels import iq3_search
from quantfab.kernels.backends import cuda_available
from quantfab.tasks.quantize.iq3_grids import IQ3_GRIDS
from quantfab.tasks.quantize.lattice import LatticeGrid

SHAPES = [(3, 256), (2, 768), (4, 1024), (1, 2816)]


def weights(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    rows, cols = shape
    if kind == "scaled":
        w = rng.standard_normal(shape) * rng.uniform(0.01, 2, (rows, 1))
    elif kind == "heavy":
        w = rng.standard_t(2, shape) * 0.05
    elif kind == "positive":
        w = np.abs(rng.standard_normal(shape))
    elif kind == "tiny":
        w = rng.standard_normal(shape) * 1e-4
        w[rng.uniform(size=shape) < 0.3] = 0
    else:  # zeros: a zero super-block, zero 32-blocks in live ones, a zero group, a block under 1e-8
        w = rng.standard_normal(shape)
        w[0, :256] = 0
        w[-1, cols - 256:cols - 192] = 0
        w[:, 96:128] = 0
        w[:, 132:136] = 0
        w[:, 160:192] = 1e-9
    return w.astype(np.float32)


def importances(cols: int, rng: np.random.Generator) -> dict[str, np.ndarray | None]:
    skewed = (rng.uniform(size=cols) ** 4 * 50).astype(np.float32)
    skewed[rng.uniform(size=cols) < 0.1] = 0
    skewed[64:96] = 0  # a block whose weights are all zero
    return {"skewed": skewed, "ones": np.ones(cols, np.float32), "none": None,
            "signed": rng.standard_normal(cols).astype(np.float32)}


@pytest.fixture(params=["cpu", pytest.param("cupy", marks=pytest.mark.gpu)])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernel backend under test: the g++ build here, CuPy under the ``gpu`` marker on a CUDA machine."""
    if request.param == "cpu" and shutil.which("g++") is None:
        pytest.skip("no g++ here: the cpu backend builds the .cu with it")
    if request.param == "cupy" and not cuda_available():
        pytest.skip("no CUDA device here: the CuPy cases need a GPU")
    monkeypatch.setenv("QUANTFAB_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("grid", IQ3_GRIDS, ids=lambda g: g.name)
@pytest.mark.parametrize("kind", ["scaled", "heavy", "positive", "tiny", "zeros"])
def test_kernel_bytes_equal_the_reference(grid: LatticeGrid, kind: str, kernels: str) -> None:
    rng = np.random.default_rng(["scaled", "heavy", "positive", "tiny", "zeros"].index(kind))
    for shape in SHAPES:
        x = weights(kind, shape, rng)
        for label, importance in importances(shape[1], rng).items():
            with np.errstate(invalid="ignore"):  # the signed importance's sqrt of negative weights, as in C
                ref = grid.search_reference(x, importance)[2]
            codes, d, raw = grid.search(x, importance)
            assert raw.dtype == np.uint8 and raw.shape == ref.shape, (shape, label)
            assert np.array_equal(raw, ref), (shape, label, np.argwhere(raw != ref)[:4].tolist())
            assert codes.shape == x.shape and d.shape == (shape[0], shape[1] // grid.block)


@pytest.mark.parametrize("grid", IQ3_GRIDS, ids=lambda g: g.name)
def test_kernel_path_refuses_what_the_reference_refuses(grid: LatticeGrid, kernels: str) -> None:
    with pytest.raises(ValueError, match=f"{grid.name}.*multiple of 256"):
        grid.search(np.ones((2, 384), np.float32), np.ones(384, np.float32))
    with pytest.raises(ValueError, match=f"{grid.name}.*importance per column"):
        iq3_search.search_blocks(grid.name, np.ones((2, 512), np.float32), np.ones(256, np.float32))
