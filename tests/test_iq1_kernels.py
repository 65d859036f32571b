"""kernels/iq1_search.cu: the IQ1_S / IQ1_M searches built for the CPU by g++ (and on CuPy under the ``gpu`` marker)
write the NumPy reference's ggml bytes (tasks/quantize/iq1_grids.py ``search_reference``, itself llama.cpp's bytes),
and ``search`` reads the reference's codes and scales back from them on every backend."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from quantfab.kernels import iq1_search
from quantfab.kernels.backends import CpuBuild, cuda_available, current
from quantfab.tasks.quantize.iq1_grids import IQ1_GRIDS

GRIDS = {g.name: g for g in IQ1_GRIDS}
KINDS = ("normal", "heavy", "positive", "tiny", "zeros")


def weights(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Rows the searches branch on: per-row scales, heavy tails, all positive, tiny values with exact zeros (some
    blocks under IQ1_M's 1e-7), zero super-blocks with zero 32-, 16- and 8-blocks in live ones."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal((rows, cols)) * rng.uniform(0.001, 3, (rows, 1))
    elif kind == "heavy":
        x = rng.standard_t(2, (rows, cols)) * 0.02
    elif kind == "positive":
        x = np.abs(rng.standard_normal((rows, cols))) + 0.1
    elif kind == "tiny":
        x = rng.standard_normal((rows, cols)) * 1e-4
        x[rng.uniform(size=x.shape) < 0.3] = 0
        x[:, 16:32] *= 1e-4
    else:
        x = rng.standard_normal((rows, cols))
        x[0, :256] = 0
        x[1, 32:64] = 0
        x[1, 96:112] = 0
        x[-1, 200:208] = 0
    return x.astype(np.float32)


def importance(kind: str, cols: int, seed: int) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "ones":
        return np.ones(cols, np.float32)
    q = (np.random.default_rng(seed).uniform(size=cols) ** 4 * 50).astype(np.float32)
    q[::9] = 0
    return q


@pytest.fixture(params=["cpu", pytest.param("cupy", marks=pytest.mark.gpu)])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernel backend for a test: the g++ build, or CuPy on a CUDA device."""
    if request.param == "cpu" and not shutil.which("g++"):
        pytest.skip("no g++ here: the cpu backend builds the .cu with it")
    if request.param == "cupy" and not cuda_available():
        pytest.skip("no CUDA device here: the CuPy cases need a GPU")
    monkeypatch.setenv("QUANTFAB_KERNELS", request.param)
    return request.param


def cases(name: str) -> list[tuple[str, str, int]]:
    """(weights kind, importance kind, columns): every kind under a skewed importance, all-ones and (IQ1_M) None."""
    imps = ("skewed", "ones") + (("none",) if name == "IQ1_M" else ())
    return [(k, i, 256 * (1 + (3 * n + 5 * m) % 11)) for n, k in enumerate(KINDS) for m, i in enumerate(imps)]


@pytest.mark.parametrize("name", GRIDS)
def test_kernel_bytes_codes_and_scales_are_the_references(name: str, kernels: str) -> None:
    grid = GRIDS[name]
    for seed, (kind, imp, cols) in enumerate(cases(name)):
        x, q = weights(kind, 3, cols, seed), importance(imp, cols, seed + 100)
        codes, d, raw = grid.search_reference(x, q)
        assert current().name == kernels
        assert np.array_equal(iq1_search.search_blocks(name, x, q), raw), (kind, imp, cols)
        got = grid.search(x, q)
        for ref, ours in zip((codes, d, raw), got):
            assert ref.dtype == ours.dtype and ref.shape == ours.shape and np.array_equal(ref, ours), (kind, imp)


@pytest.mark.parametrize("name", GRIDS)
def test_search_on_the_numpy_backend_reads_the_references_codes_back(name: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTFAB_KERNELS", "numpy")
    x, q = weights("zeros", 4, 512, 3), importance("skewed", 512, 4)
    for ref, ours in zip(GRIDS[name].search_reference(x, q), GRIDS[name].search(x, q)):
        assert ref.dtype == ours.dtype and np.array_equal(ref, ours)


@pytest.mark.parametrize(("blocks", "threads"), [(1, 1), (7, 5)])
def test_the_cpu_build_answers_alike_on_any_launch_shape(monkeypatch: pytest.MonkeyPatch, blocks: int,
                                                         threads: int) -> None:
    if not shutil.which("g++"):
        pytest.skip("no g++ here: the cpu backend builds the .cu with it")
    x, q = weights("normal", 5, 768, 9), importance("skewed", 768, 10)
    monkeypatch.setattr(iq1_search, "current", lambda: CpuBuild(blocks, threads))
    for grid in IQ1_GRIDS:
        assert np.array_equal(iq1_search.search_blocks(grid.name, x, q), grid.search_reference(x, q)[2])


def test_the_kernels_refuse_what_the_reference_refuses(kernels: str) -> None:
    x, q = weights("normal", 2, 512, 0), importance("skewed", 512, 1)
    with pytest.raises(ValueError, match="IQ1_S needs an importance matrix"):
        GRIDS["IQ1_S"].search(x, None)
    for grid in IQ1_GRIDS:
        with pytest.raises(ValueError, match="multiple of 256"):
            grid.search(x[:, :300], q[:300])
        with pytest.raises(ValueError, match="importance per column"):
            grid.search(x, q[:256])
