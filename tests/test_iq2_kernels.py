"""kernels/iq2_search.cu built by g++ (QUANTFAB_KERNELS=cpu) writes the bytes of the NumPy search it ports
(IQ2Grid.search_reference: llama.cpp's quantize_iq2_xxs / _xs / _s), and so the same codes and scales, for every
2-bit lattice type on inputs that take each of its branches: sub-blocks left zero, super-blocks whose scales all come
out 0, groups with an odd count of negatives, keys off the codebook, scales that come out negative."""

from __future__ import annotations

import shutil
from typing import Iterator

import numpy as np
import pytest

from quantfab.kernels import iq2_search
from quantfab.kernels.backends import CpuBuild
from quantfab.tasks.quantize.iq2_grids import IQ2_GRIDS, IQ2Grid

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the cpu kernel backend needs g++")

GRIDS = [g for g in IQ2_GRIDS if isinstance(g, IQ2Grid)]
F = np.float32


def tensors(rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray]]:
    for rows, cols in ((1, 256), (3, 768), (2, 2816), (5, 512)):
        yield "normal", (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3, (rows, 1))).astype(F)
        yield "heavy tails", rng.standard_t(2, (rows, cols)).astype(F)
        yield "positive", (np.abs(rng.standard_normal((rows, cols))) * 0.1).astype(F)
        tiny = (rng.standard_normal((rows, cols)) * 1e-4).astype(F)
        tiny[rng.random((rows, cols)) < 0.3] = 0
        yield "tiny", tiny
        zeros = rng.standard_normal((rows, cols)).astype(F)
        zeros[-1, :256] = 0  # a zero super-block
        zeros[0, 16:48] = 0  # zero sub-blocks of either size beside live ones
        zeros[0, 64:72] = -1.0  # an even run of equal negatives: ties in the flip and in rounding
        zeros[0, 72:88] *= 1e-20  # far below the super-block's scale
        yield "zeros", zeros


def importances(rng: np.random.Generator, cols: int) -> Iterator[tuple[str, np.ndarray]]:
    skewed = (rng.random(cols) ** 4 * 50).astype(F)
    skewed[rng.random(cols) < 0.1] = 0
    yield "skewed", skewed
    yield "ones", np.ones(cols, F)


def adverse(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Heavy columns of tiny negatives beside light large positives: the kept sign dominates its block and the fitted
    scale comes out negative, so the block's signs are flipped."""
    imp = np.full(1024, 1e-4, F)
    imp[::8] = 1e4
    x = (np.abs(rng.standard_normal((4, 1024))) * 100 + 50).astype(F)
    x[:, ::8] = -0.01 * rng.uniform(0.5, 1.5, (4, 128)).astype(F)
    x[1, ::16] = 0.01
    return x, imp


def cases(grid: IQ2Grid) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(7)
    for label, x in tensors(rng):
        for ilabel, imp in importances(rng, x.shape[1]):
            yield f"{label}/{ilabel}", x, imp
        if not grid.asserts_importance:
            yield f"{label}/none", x, None
    yield "adverse", *adverse(rng)


def assert_same(ref: tuple[np.ndarray, ...], got: tuple[np.ndarray, ...], label: str) -> None:
    for r, g in zip(ref, got):
        assert r.dtype == g.dtype and r.shape == g.shape, label
        assert r.tobytes() == g.tobytes(), label


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.name)
def test_the_kernel_writes_the_references_bytes(grid: IQ2Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTFAB_KERNELS", "cpu")
    for label, x, imp in cases(grid):
        assert_same(grid.search_reference(x, imp), grid.search(x, imp), f"{grid.name} {label} {x.shape}")


def test_the_adverse_case_reaches_a_negative_scale() -> None:
    """The adverse case does take the sign flip where there is one: IQ2_S stores every sign, its magnitudes are never
    negative, and neither is its scale."""
    x, imp = adverse(np.random.default_rng(7))
    for grid in (g for g in GRIDS if g.name != "IQ2_S"):
        xb = x.reshape(-1, grid.block)
        weight = grid.weigh(xb, imp)
        scale = grid.search_blocks(grid.split_signs(xb, weight)[0], weight)[0]
        assert (scale < 0).any(), grid.name


@pytest.mark.parametrize("blocks,threads", [(1, 1), (5, 3), (64, 2)])
def test_any_launch_shape_writes_the_same_bytes(monkeypatch: pytest.MonkeyPatch, blocks: int, threads: int) -> None:
    """Super-blocks go to threads grid-stride: more threads than super-blocks, or fewer, change nothing."""
    x = np.random.default_rng(3).standard_normal((7, 512)).astype(F)
    imp = np.random.default_rng(4).random(512).astype(F)
    monkeypatch.setattr(iq2_search, "current", lambda: CpuBuild(blocks, threads))
    for grid in GRIDS:
        assert_same(grid.search_reference(x, imp), grid.search(x, imp), grid.name)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.name)
def test_the_kernel_path_refuses_what_the_reference_refuses(grid: IQ2Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTFAB_KERNELS", "cpu")
    with pytest.raises(ValueError, match=f"{grid.name}.*multiple of 256"):
        grid.search(np.ones((2, 384), F), np.ones(384, F))
    with pytest.raises(ValueError, match=f"{grid.name}.*importance per column \\(512\\)"):
        grid.search(np.ones((2, 512), F), np.ones(256, F))
    if grid.asserts_importance:
        with pytest.raises(ValueError, match=f"{grid.name}.*importance"):
            grid.search(np.ones((1, 256), F), None)
